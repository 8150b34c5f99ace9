"""`rlhf score`: a minimal RewardService client, as an application's would be."""

import grpc

from rlhf.v1 import reward_pb2, reward_pb2_grpc
from services import codec
from services.channels import open_channel
from services.config import ClientSecurity


def score_text(target: str, prompt: str, response: str, timeout: float = 30.0,
               security: ClientSecurity | None = None) -> float:
    """Score one (prompt, response) with the RewardService at `target`; RuntimeError on failure.

    security: TLS and the bearer token (default: $RLHF_TOKEN).
    """
    with open_channel(target, security, aio=False) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        request = reward_pb2.ScoreRequest(texts=reward_pb2.TextPairs(prompts=[prompt], responses=[response]))
        try:
            reply = stub.Score(request, timeout=timeout)
        except grpc.RpcError as error:
            raise RuntimeError(f"{target}: {error.code().name}: {error.details()}") from None
    return float(codec.tensor_from_pb(reply.scores, "scores")[0])
