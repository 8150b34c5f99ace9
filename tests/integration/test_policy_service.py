"""PolicyService over a real gRPC server on a loopback port."""

import math
import pathlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.v1 import common_pb2, policy_pb2, tensor_pb2
from services import codec
from services.batch import Sequences
from tests.support.rpc import (
    expect_invalid,
    ppo_train,
    rows,
    sequences_from_generation,
    text_generate,
)
from training import synthetic


@pytest.fixture(scope="module")
def policy(stubs):
    return stubs["policy"]


def logprobs_of(policy, seqs: Sequences):
    reply = policy.LogProbs(common_pb2.LogProbsRequest(sequences=seqs.to_pb(), temperature=1.0), timeout=60)
    return rows(reply.logprobs), reply.model_version


def test_info_reports_role_tokenizer_and_limits(policy, tiny_dirs):
    info = policy.Info(common_pb2.InfoRequest(), timeout=30)
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["lm"])
    assert info.role == "policy"
    assert len(info.tokenizer_fingerprint) == 64
    assert info.vocab_size == model.config.vocab_size and info.max_sequence_length == 128
    assert info.num_parameters == sum(p.numel() for p in model.parameters())
    assert info.torch_threads == 1 and info.cpu_limit > 0  # the test config sets num_threads: 1


def test_generate_returns_tokens_logprobs_texts_and_version(policy):
    prompts = synthetic.train_prompts(5, seed=1)
    reply = policy.Generate(text_generate(prompts, max_new_tokens=6, seed=3), timeout=60)
    responses, logprobs = rows(reply.response_tokens), rows(reply.response_logprobs)
    assert len(responses) == len(prompts) == len(reply.response_texts) == len(reply.finished)
    for r, lp, done in zip(responses, logprobs, reply.finished):
        assert 1 <= r.numel() <= 6 and lp.numel() == r.numel()
        assert torch.isfinite(lp).all() and (lp <= 0).all()
        assert done == (r[-1].item() == 1)  # eos id of the demo tokenizer
    assert reply.policy_version == policy.Info(common_pb2.InfoRequest(), timeout=30).model_version


def test_greedy_generation_is_deterministic(policy):
    request = text_generate(synthetic.heldout_prompts(3, seed=0), temperature=0.0, max_new_tokens=8)
    first, second = policy.Generate(request, timeout=60), policy.Generate(request, timeout=60)
    assert first.response_tokens == second.response_tokens


def test_seeded_rows_sample_the_same_tokens_however_the_batch_is_split(policy):
    prompts = synthetic.train_prompts(6, seed=21)
    whole = policy.Generate(text_generate(prompts, max_new_tokens=10, seed=9), timeout=60)
    head = policy.Generate(text_generate(prompts[:2], max_new_tokens=10, seed=9), timeout=60)
    tail = text_generate(prompts[2:], max_new_tokens=10, seed=9)
    tail.first_row_index = 2
    tail = policy.Generate(tail, timeout=60)
    split = rows(head.response_tokens) + rows(tail.response_tokens)
    assert [r.tolist() for r in split] == [r.tolist() for r in rows(whole.response_tokens)]
    other = policy.Generate(text_generate(prompts, max_new_tokens=10, seed=10), timeout=60)
    assert [r.tolist() for r in rows(other.response_tokens)] != [r.tolist() for r in split]


def test_generate_logprobs_match_logprobs_rpc(policy):
    reply = policy.Generate(text_generate(synthetic.train_prompts(6, seed=2), max_new_tokens=10, seed=7), timeout=60)
    seqs = sequences_from_generation(reply)
    scored, _ = logprobs_of(policy, seqs)
    for a, b in zip(rows(reply.response_logprobs), scored):
        assert torch.allclose(a, b, atol=1e-4), (a, b)


def test_token_prompts_equal_text_prompts(policy):
    texts = synthetic.train_prompts(2, seed=4)
    by_text = policy.Generate(text_generate(texts, temperature=0.0), timeout=60)
    request = policy_pb2.GenerateRequest(
        prompt_tokens=by_text.prompt_tokens, sampling=policy_pb2.SamplingParams(temperature=0.0, max_new_tokens=8))
    assert policy.Generate(request, timeout=60).response_tokens == by_text.response_tokens


def test_train_first_minibatch_has_ratio_one_then_changes_weights(policy):
    reply = policy.Generate(text_generate(synthetic.train_prompts(8, seed=5), max_new_tokens=8, seed=11), timeout=60)
    seqs = sequences_from_generation(reply)
    old = rows(reply.response_logprobs)
    advantages = [torch.randn(r.numel()) for r in old]
    before = policy.Info(common_pb2.InfoRequest(), timeout=30).model_version
    result = policy.Train(ppo_train(seqs, old, advantages, step=100), timeout=120)
    assert abs(result.approx_kl) < 1e-6 and result.clip_fraction == 0.0
    assert result.model_version == before + 1 and not result.replayed
    assert result.tokens == sum(r.numel() for r in old)
    for name in ("loss", "policy_loss", "entropy", "grad_norm"):
        assert torch.isfinite(torch.tensor(getattr(result, name))), name
    assert result.grad_norm > 0 and result.entropy > 0
    after, _ = logprobs_of(policy, seqs)
    assert any(not torch.allclose(a, b) for a, b in zip(old, after))


def test_train_replay_returns_stored_result_and_changes_nothing(policy):
    reply = policy.Generate(text_generate(synthetic.train_prompts(4, seed=6), seed=12), timeout=60)
    seqs = sequences_from_generation(reply)
    old = rows(reply.response_logprobs)
    request = ppo_train(seqs, old, [torch.ones(r.numel()) for r in old], step=200, minibatch=3)
    first = policy.Train(request, timeout=120)
    weights, version = logprobs_of(policy, seqs)
    again = policy.Train(request, timeout=120)
    assert again.replayed and again.model_version == first.model_version == version
    assert again.loss == first.loss
    unchanged, _ = logprobs_of(policy, seqs)
    assert all(torch.equal(a, b) for a, b in zip(weights, unchanged))


def test_ptx_loss_is_reported(policy):
    reply = policy.Generate(text_generate(synthetic.train_prompts(2, seed=8), seed=13), timeout=60)
    seqs = sequences_from_generation(reply)
    old = rows(reply.response_logprobs)
    request = ppo_train(seqs, old, [torch.zeros(r.numel()) for r in old], step=300)
    request.ptx.CopyFrom(policy_pb2.PtxBatch(texts=tensor_pb2.TextBatch(texts=synthetic.corpus_texts(0)[:4]), coef=0.5))
    result = policy.Train(request, timeout=120)
    assert result.ptx_loss > 0 and abs(result.loss - (result.policy_loss - 0 + 0.5 * result.ptx_loss)) < 1e-4


def test_save_checkpoint_loads_with_from_pretrained(policy, services):
    reply = policy.SaveCheckpoint(common_pb2.SaveCheckpointRequest(path="policy-test"), timeout=120)
    path = pathlib.Path(reply.path)
    assert "model.safetensors" in reply.files
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(model(ids).logits).all()
    expect_invalid(policy.SaveCheckpoint, common_pb2.SaveCheckpointRequest(path="../../escape"), "path")
    expect_invalid(policy.SaveCheckpoint, common_pb2.SaveCheckpointRequest(path="/etc/x"), "path")


# --- bad input: INVALID_ARGUMENT naming the field, weights untouched ---------


def _good_batch(policy):
    reply = policy.Generate(text_generate(synthetic.train_prompts(3, seed=9), seed=14), timeout=60)
    seqs = sequences_from_generation(reply)
    return seqs, rows(reply.response_logprobs)


def test_generate_rejects_bad_prompts(policy):
    sampling = policy_pb2.SamplingParams(temperature=1.0, max_new_tokens=4)
    floats = codec.ragged_to_pb([torch.tensor([1.0, 2.0])])
    expect_invalid(policy.Generate, policy_pb2.GenerateRequest(prompt_tokens=floats, sampling=sampling), "prompt_tokens.values.dtype")
    outside = codec.ragged_to_pb([torch.tensor([3, 99999], dtype=torch.int32)])
    expect_invalid(policy.Generate, policy_pb2.GenerateRequest(prompt_tokens=outside, sampling=sampling), "outside the vocabulary")
    broken = codec.ragged_to_pb([torch.tensor([3, 4], dtype=torch.int32)])
    broken.lengths[:] = [5]
    expect_invalid(policy.Generate, policy_pb2.GenerateRequest(prompt_tokens=broken, sampling=sampling), "prompt_tokens.lengths")
    expect_invalid(policy.Generate, policy_pb2.GenerateRequest(sampling=sampling), "prompts")
    too_long = codec.ragged_to_pb([torch.full((200,), 5, dtype=torch.int32)])
    expect_invalid(policy.Generate, policy_pb2.GenerateRequest(prompt_tokens=too_long, sampling=sampling), "limit of 128")
    expect_invalid(policy.Generate, text_generate(["hi"], max_new_tokens=0), "sampling.max_new_tokens")
    expect_invalid(policy.Generate, text_generate(["hi"], temperature=float("nan")), "sampling.temperature")
    shape = codec.ragged_to_pb([torch.tensor([3, 4], dtype=torch.int32)])
    shape.values.shape[:] = [3]
    expect_invalid(policy.Generate, policy_pb2.GenerateRequest(prompt_tokens=shape, sampling=sampling), "prompt_tokens.values.raw")


def test_train_rejects_bad_minibatches_without_touching_weights(policy):
    seqs, old = _good_batch(policy)
    before, version = logprobs_of(policy, seqs)
    nan_adv = [torch.full((r.numel(),), float("nan")) for r in old]
    expect_invalid(policy.Train, ppo_train(seqs, old, nan_adv, step=400), "ppo.advantages")
    short = [r[:-1] if r.numel() > 1 else torch.zeros(2) for r in old]
    expect_invalid(policy.Train, ppo_train(seqs, old, short, step=401), "ppo.advantages.lengths")
    no_key = ppo_train(seqs, old, [torch.zeros(r.numel()) for r in old], run_id="")
    expect_invalid(policy.Train, no_key, "key.run_id")
    bad_prompt = Sequences(seqs.rows, [r.numel() for r in seqs.rows])  # no response tokens
    expect_invalid(policy.Train, ppo_train(bad_prompt, old, old, step=402), "ppo.sequences.prompt_lengths")
    expect_invalid(policy.Train, policy_pb2.PolicyTrainRequest(key=common_pb2.TrainKey(run_id="test", step=403)), "objective")
    wrong_dtype = ppo_train(seqs, old, [torch.zeros(r.numel()) for r in old], step=403)
    wrong_dtype.ppo.old_logprobs.CopyFrom(codec.ragged_to_pb([r.long() for r in old], torch.int64))
    expect_invalid(policy.Train, wrong_dtype, "ppo.old_logprobs.values.dtype")
    after, version_after = logprobs_of(policy, seqs)
    assert version_after == version
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_logprobs_rejects_empty_batch(policy):
    empty = tensor_pb2.SequenceBatch(tokens=codec.ragged_to_pb([], torch.int32))
    expect_invalid(policy.LogProbs, common_pb2.LogProbsRequest(sequences=empty), "sequences.tokens.lengths")


@pytest.mark.parametrize("by_sequence", [False, True])
def test_grpo_loss_terms_kl_in_the_loss_and_sequence_aggregation(policy, by_sequence):
    prompts = synthetic.train_prompts(3, seed=40)
    seqs = sequences_from_generation(policy.Generate(text_generate(prompts, max_new_tokens=6, seed=2), timeout=60))
    current, _ = logprobs_of(policy, seqs)
    advantages = [torch.full((int(n),), float(i + 1)) for i, n in enumerate(seqs.response_lengths)]  # 1, 2, 3
    request = ppo_train(seqs, current, advantages, step=700 + by_sequence)
    request.ppo.kl_coef = 0.1
    request.ppo.ref_logprobs.CopyFrom(codec.ragged_to_pb([lp - 0.5 for lp in current], torch.float32))
    if by_sequence:
        request.ppo.aggregation = policy_pb2.LOSS_AGGREGATION_SEQUENCE
    reply = policy.Train(request, timeout=120)
    lengths = torch.tensor(seqs.response_lengths, dtype=torch.float32)
    # ratio 1 at the first step: the surrogate is -mean(advantage), by token or by response
    expected = -2.0 if by_sequence else -float((torch.tensor([1.0, 2.0, 3.0]) * lengths).sum() / lengths.sum())
    assert reply.policy_loss == pytest.approx(expected, abs=1e-4)
    k3 = math.exp(-0.5) - 1 + 0.5  # (r - 1) - log r with log r = ref - logprob = -0.5 on every token
    assert reply.kl_loss == pytest.approx(k3, abs=1e-4)
    assert reply.loss == pytest.approx(reply.policy_loss - 0.0 * reply.entropy + 0.1 * reply.kl_loss, abs=1e-4)
    bad = ppo_train(seqs, current, advantages, step=710)
    bad.ppo.kl_coef = 0.1  # no reference log-probs
    expect_invalid(policy.Train, bad, "ppo.ref_logprobs")
    unknown = ppo_train(seqs, current, advantages, step=711)
    unknown.ppo.aggregation = 7
    expect_invalid(policy.Train, unknown, "ppo.aggregation")
