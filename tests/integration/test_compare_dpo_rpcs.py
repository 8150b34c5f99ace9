"""RewardService.Compare(Stream), PolicyService.Tokenize and DPO Train over real gRPC."""

import math

import grpc
import pytest
import torch

from rlhf.v1 import common_pb2, policy_pb2
from services import codec
from services.formatting import IGNORE_INDEX, encode_sft_example
from tests.support.data import FIVE_PAIRS
from tests.support.rpc import compare_request, expect_invalid, rows, score_texts


@pytest.fixture(scope="module")
def reward(stubs):
    return stubs["reward"]


@pytest.fixture(scope="module")
def policy(stubs):
    return stubs["policy"]


def test_compare_scores_both_sides_like_score(reward):
    prompts, chosen, rejected = map(list, zip(*FIVE_PAIRS))
    reply = reward.Compare(compare_request(prompts, chosen, rejected), timeout=60)
    c = codec.tensor_from_pb(reply.chosen_scores, "c")
    r = codec.tensor_from_pb(reply.rejected_scores, "r")
    p = codec.tensor_from_pb(reply.p_chosen, "p")
    expected_c = codec.tensor_from_pb(reward.Score(score_texts(prompts, chosen), timeout=60).scores, "s")
    assert torch.allclose(c, expected_c, atol=1e-5)
    assert torch.allclose(p, torch.sigmoid(c - r), atol=1e-6)


def test_compare_stream_answers_each_chunk_in_order(reward):
    prompts, chosen, rejected = map(list, zip(*FIVE_PAIRS))
    chunks = [compare_request(prompts[i : i + 2], chosen[i : i + 2], rejected[i : i + 2]) for i in range(0, 5, 2)]
    replies = list(reward.CompareStream(iter(chunks), timeout=60))
    assert [len(r.chosen_scores.raw) // 4 for r in replies] == [2, 2, 1]
    streamed = torch.cat([codec.tensor_from_pb(r.chosen_scores, "c") for r in replies])
    whole = codec.tensor_from_pb(reward.Compare(compare_request(prompts, chosen, rejected), timeout=60).chosen_scores, "c")
    assert torch.allclose(streamed, whole, atol=1e-5)


def test_compare_rejects_ragged_pairs_in_unary_and_stream(reward):
    expect_invalid(reward.Compare, compare_request(["a", "b"], ["c", "d"], ["e"]), "pairs.rejected")
    expect_invalid(reward.Compare, compare_request([], [], []), "pairs.prompts")
    bad = [compare_request(["a"], ["b"], ["c"]), compare_request(["a"], [], ["c"])]
    with pytest.raises(grpc.RpcError) as caught:
        list(reward.CompareStream(iter(bad), timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pairs.chosen" in caught.value.details()


def test_tokenize_matches_the_sft_encoding(policy, tiny_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["lm"])
    prompt, response = FIVE_PAIRS[0][0], FIVE_PAIRS[0][1]
    batch = policy.Tokenize(policy_pb2.TokenizeRequest(prompts=[prompt], responses=[response]), timeout=30)
    ids, labels = encode_sft_example(tokenizer, prompt, response, 128)
    assert rows(batch.tokens)[0].tolist() == ids
    assert batch.prompt_lengths[0] == sum(label == IGNORE_INDEX for label in labels)
    expect_invalid(policy.Tokenize, policy_pb2.TokenizeRequest(prompts=["a"], responses=[]), "responses")
    expect_invalid(policy.Tokenize, policy_pb2.TokenizeRequest(), "prompts")


def test_dpo_train_matches_a_hand_computed_loss(policy):
    pairs = FIVE_PAIRS[:2]
    request = policy_pb2.TokenizeRequest(prompts=[p for p, _, _ in pairs for _ in (0, 1)],
                                         responses=[t for _, c, r in pairs for t in (c, r)])
    sequences = policy.Tokenize(request, timeout=30)
    logps = [row.sum().item() for row in rows(policy.LogProbs(common_pb2.LogProbsRequest(sequences=sequences), timeout=60).logprobs)]
    reference = [logps[0] - 1.0, logps[1] + 0.5, logps[2] + 0.2, logps[3] - 0.3]  # pretend reference
    beta = 0.5
    # pair 0: beta * ((pc - rc) - (pr - rr)) = 0.5 * (1.0 - (-0.5)) = 0.75; pair 1: 0.5 * (-0.2 - 0.3) = -0.25
    expected = (-math.log(1 / (1 + math.exp(-0.75))) - math.log(1 / (1 + math.exp(0.25)))) / 2
    objective = policy_pb2.DPOObjective(sequences=sequences, beta=beta,
                                        reference_logps=codec.tensor_to_pb(torch.tensor(reference)))
    policy.Release(common_pb2.ReleaseRequest(lease=common_pb2.Lease(run_id="test")), timeout=30)  # the other tests' run
    key = common_pb2.TrainKey(run_id="dpo-test", step=0)
    reply = policy.Train(policy_pb2.PolicyTrainRequest(key=key, dpo=objective, micro_batch_size=2), timeout=120)
    release(policy, "dpo-test")  # the service's other tests train it as run "test"
    assert abs(reply.policy_loss - expected) < 1e-4
    assert reply.reward_accuracy == 0.5
    assert abs(reply.reward_margin - (0.75 - 0.25) / 2) < 1e-4
    assert reply.grad_norm > 0


def test_dpo_train_rejects_bad_minibatches(policy):
    sequences = policy.Tokenize(policy_pb2.TokenizeRequest(prompts=["a ", "b ", "c "], responses=["x", "y", "z"]), timeout=30)
    policy.Release(common_pb2.ReleaseRequest(lease=common_pb2.Lease(run_id="test")), timeout=30)  # the other tests' run
    key = common_pb2.TrainKey(run_id="dpo-bad", step=0)
    odd = policy_pb2.DPOObjective(sequences=sequences, beta=0.1, reference_logps=codec.tensor_to_pb(torch.zeros(3)))
    expect_invalid(policy.Train, policy_pb2.PolicyTrainRequest(key=key, dpo=odd), "dpo.sequences")
    two = policy.Tokenize(policy_pb2.TokenizeRequest(prompts=["a ", "b "], responses=["x", "y"]), timeout=30)
    short = policy_pb2.DPOObjective(sequences=two, beta=0.1, reference_logps=codec.tensor_to_pb(torch.zeros(3)))
    expect_invalid(policy.Train, policy_pb2.PolicyTrainRequest(key=key, dpo=short), "dpo.reference_logps.shape")
    beta = policy_pb2.DPOObjective(sequences=two, beta=0.0, reference_logps=codec.tensor_to_pb(torch.zeros(2)))
    expect_invalid(policy.Train, policy_pb2.PolicyTrainRequest(key=key, dpo=beta), "dpo.beta")
    nan = policy_pb2.DPOObjective(sequences=two, beta=0.1, reference_logps=codec.tensor_to_pb(torch.tensor([0.0, float("nan")])))
    expect_invalid(policy.Train, policy_pb2.PolicyTrainRequest(key=key, dpo=nan), "dpo.reference_logps")
    release(policy, "dpo-bad")


def release(policy, run_id: str) -> None:
    """End the run's lease on the policy (its key has no secret)."""
    lease = common_pb2.Lease(run_id=run_id)
    assert policy.Release(common_pb2.ReleaseRequest(lease=lease), timeout=30).released
