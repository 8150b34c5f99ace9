"""Request builders and reply readers shared by the tests that call the services."""

import grpc
import torch

from rlhf.v1 import common_pb2, policy_pb2, reward_pb2, tensor_pb2, value_pb2
from services import codec
from services.batch import Sequences


def text_generate(prompts, temperature=1.0, max_new_tokens=8, seed=0):
    return policy_pb2.GenerateRequest(
        prompt_texts=tensor_pb2.TextBatch(texts=prompts),
        sampling=policy_pb2.SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed),
    )


def sequences_from_generation(reply) -> Sequences:
    prompts = codec.ragged_from_pb(reply.prompt_tokens, "p")
    responses = codec.ragged_from_pb(reply.response_tokens, "r")
    return Sequences([torch.cat([p, r]).long() for p, r in zip(prompts, responses)], [len(p) for p in prompts])


def rows(ragged) -> list[torch.Tensor]:
    return codec.ragged_from_pb(ragged, "rows")


def float_rows(values: list[torch.Tensor]) -> tensor_pb2.RaggedTensor:
    return codec.ragged_to_pb(values, torch.float32)


def ppo_train(seqs: Sequences, old_logprobs, advantages, step=0, minibatch=0, run_id="test", clip=0.2, secret=""):
    return policy_pb2.PolicyTrainRequest(
        key=common_pb2.TrainKey(run_id=run_id, step=step, minibatch_index=minibatch, secret=secret),
        ppo=policy_pb2.PPOObjective(
            sequences=seqs.to_pb(), old_logprobs=float_rows(old_logprobs), advantages=float_rows(advantages),
            clip_range=clip, temperature=1.0,
        ),
    )


def value_train(seqs: Sequences, old_values, returns, step=0, minibatch=0, run_id="test", secret=""):
    return value_pb2.ValueTrainRequest(
        key=common_pb2.TrainKey(run_id=run_id, step=step, minibatch_index=minibatch, secret=secret),
        sequences=seqs.to_pb(), old_values=float_rows(old_values), returns=float_rows(returns), clip_range_value=0.2,
    )


def score_texts(prompts, responses):
    return reward_pb2.ScoreRequest(texts=reward_pb2.TextPairs(prompts=prompts, responses=responses))


def compare_request(prompts, chosen, rejected):
    return reward_pb2.CompareRequest(pairs=reward_pb2.ComparePairs(prompts=prompts, chosen=chosen, rejected=rejected))


def compare_margins(reward_stub, pairs) -> torch.Tensor:
    """Score(chosen) - score(rejected) of each (prompt, chosen, rejected) pair, from the reward service's Compare."""
    prompts, chosen, rejected = map(list, zip(*pairs))
    reply = reward_stub.Compare(compare_request(prompts, chosen, rejected), timeout=60)
    return codec.tensor_from_pb(reply.chosen_scores, "c") - codec.tensor_from_pb(reply.rejected_scores, "r")


def expect_invalid(call, request, field_fragment: str):
    """The call fails with INVALID_ARGUMENT and a message naming the field."""
    try:
        call(request, timeout=60)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        assert field_fragment in error.details(), error.details()
        return error.details()
    raise AssertionError(f"expected INVALID_ARGUMENT naming {field_fragment!r}")
