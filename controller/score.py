"""`rlhf score`: a minimal RewardService client, as an application's would be."""

import grpc

from rlhf.v1 import reward_pb2, reward_pb2_grpc
from services import codec


def score_text(target: str, prompt: str, response: str, timeout: float = 30.0) -> float:
    """Score one (prompt, response) with the RewardService at `target`; RuntimeError on failure."""
    with grpc.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        request = reward_pb2.ScoreRequest(texts=reward_pb2.TextPairs(prompts=[prompt], responses=[response]))
        try:
            reply = stub.Score(request, timeout=timeout)
        except grpc.RpcError as error:
            raise RuntimeError(f"{target}: {error.code().name}: {error.details()}") from None
    return float(codec.tensor_from_pb(reply.scores, "scores")[0])
