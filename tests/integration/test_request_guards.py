"""No accepted request leaves weights non-finite, and no request takes unbounded memory or time.

The first payloads are the ones that used to poison or exhaust a service:
a 1e-40 temperature, returns of 3.39e38, a 50 MB prompt, two million empty
rows. A property-based test then sends many accepted-but-extreme Train
requests and checks every parameter after each.
"""

import concurrent.futures
import resource
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc, tensor_pb2, value_pb2_grpc
from services import codec
from services.batch import Sequences, budget_chunks
from services.pushback import pushback_seconds
from tests.support.rpc import expect_invalid, ppo_train, score_texts, text_generate, value_train
from tests.support.servers import ServerThread, service_config


@pytest.fixture(scope="module")
def trainers(tiny_dirs):
    """A policy and a value service of their own (the test changes their weights)."""
    policy = ServerThread(service_config("policy", tiny_dirs["lm"])).start()
    value = ServerThread(service_config("value", tiny_dirs["rm"])).start()
    yield policy, value
    policy.stop()
    value.stop()


def parameters(server) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in server.servicer.trainer.module.state_dict().items()}


def all_finite(server) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in server.servicer.trainer.module.parameters())


def batch(seed: int, n: int = 3) -> Sequences:
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 800, (int(k),), generator=gen) for k in torch.randint(6, 14, (n,), generator=gen)]
    return Sequences(rows, [3] * n)


_steps = iter(range(10**6))


def fresh_step() -> int:
    return next(_steps)


def test_the_payloads_that_poisoned_weights_are_refused_and_change_nothing(trainers):
    policy_server, value_server = trainers
    policy = policy_pb2_grpc.PolicyServiceStub(policy_server.channel())
    value = value_pb2_grpc.ValueServiceStub(value_server.channel())
    seqs = batch(0)
    zeros = [torch.zeros(n) for n in seqs.response_lengths]
    before_p, before_v = parameters(policy_server), parameters(value_server)
    cold = ppo_train(seqs, zeros, zeros, step=fresh_step())
    cold.ppo.temperature = 1e-40
    expect_invalid(policy.Train, cold, "ppo.temperature")
    for field, value_ in (("clip_range", 1e30), ("entropy_coef", float("inf"))):
        request = ppo_train(seqs, zeros, zeros, step=fresh_step())
        setattr(request.ppo, field, value_)
        expect_invalid(policy.Train, request, f"ppo.{field}")
    huge = [torch.full((n,), 3.39e38) for n in seqs.response_lengths]
    expect_invalid(value.Train, value_train(seqs, zeros, huge, step=fresh_step()), "returns")
    expect_invalid(policy.Train, ppo_train(seqs, zeros, huge, step=fresh_step()), "ppo.advantages")
    sampling = text_generate(["Q: hi"], temperature=1e-40)
    expect_invalid(policy.Generate, sampling, "sampling.temperature")
    for name, saved in parameters(policy_server).items():
        assert torch.equal(saved, before_p[name])
    for name, saved in parameters(value_server).items():
        assert torch.equal(saved, before_v[name])


def test_a_step_whose_loss_is_not_finite_is_skipped_and_reported(trainers):
    policy_server, _ = trainers
    policy = policy_pb2_grpc.PolicyServiceStub(policy_server.channel())
    seqs = batch(1)
    # old log-probs of -1e6 are within max_abs_input, but the ratio exp(new - old) overflows
    old = [torch.full((n,), -1e6) for n in seqs.response_lengths]
    negative = [-torch.ones(n) for n in seqs.response_lengths]
    version = policy.Info(common_pb2.InfoRequest()).model_version
    before = parameters(policy_server)
    skipped_before = policy_server.servicer.skipped_steps
    reply = policy.Train(ppo_train(seqs, old, negative, step=fresh_step()), timeout=60)
    assert reply.skipped and reply.model_version == version
    assert policy.Info(common_pb2.InfoRequest()).model_version == version
    assert policy_server.servicer.skipped_steps == skipped_before + 1
    assert all(torch.equal(t, before[k]) for k, t in parameters(policy_server).items())
    applied = policy.Train(ppo_train(seqs, [torch.zeros(n) for n in seqs.response_lengths], negative,
                                     step=fresh_step()), timeout=60)
    assert not applied.skipped and applied.model_version == version + 1 and all_finite(policy_server)


extreme = st.sampled_from([0.0, 1e-6, -1e-6, 1.0, -1.0, 37.0, -88.0, 1e3, -1e3, 1e6, -1e6])


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_accepted_extreme_train_requests_keep_every_parameter_finite(trainers, data):
    policy_server, value_server = trainers
    policy = policy_pb2_grpc.PolicyServiceStub(policy_server.channel())
    value = value_pb2_grpc.ValueServiceStub(value_server.channel())
    seqs = batch(data.draw(st.integers(0, 1000)), n=data.draw(st.integers(1, 4)))
    lengths = seqs.response_lengths

    def rows_of(strategy):
        return [torch.tensor([data.draw(strategy) for _ in range(n)]) for n in lengths]

    old = rows_of(st.sampled_from([0.0, -1e-3, -5.0, -80.0, -1e3, -1e6]))
    request = ppo_train(seqs, old, rows_of(extreme), step=fresh_step())
    request.ppo.temperature = data.draw(st.sampled_from([0.0, 0.01, 1.0, 100.0]))
    request.ppo.clip_range = data.draw(st.sampled_from([1e-6, 0.2, 10.0, 1e3]))
    request.ppo.entropy_coef = data.draw(st.sampled_from([-1e3, 0.0, 1e3]))
    if data.draw(st.booleans()):
        request.ptx.tokens.CopyFrom(codec.ragged_to_pb(batch(7, 2).rows, torch.int32))
        request.ptx.coef = data.draw(st.sampled_from([0.0, 1.0, 1e3]))
    reply = policy.Train(request, timeout=120)
    assert all_finite(policy_server), reply
    v = value_train(seqs, rows_of(extreme), rows_of(extreme), step=fresh_step())
    v.clip_range_value = data.draw(st.sampled_from([0.0, 0.2, 1e6]))
    reply = value.Train(v, timeout=120)
    assert all_finite(value_server), reply


@pytest.fixture(scope="module")
def small_limits(tiny_dirs):
    """A reward and a policy service with small request limits."""
    batching = {"max_request_rows": 8, "max_request_tokens": 400, "max_text_bytes": 1000,
                "max_request_text_bytes": 4000}
    reward = ServerThread(service_config("reward", tiny_dirs["rm"], batching=batching,
                                         server={"max_message_mb": 1})).start()
    policy = ServerThread(service_config("policy", tiny_dirs["lm"], batching=batching,
                                         server={"max_concurrent_rpcs": 2})).start()
    yield reward, policy
    reward.stop()
    policy.stop()


def refused_fast(call, code=grpc.StatusCode.INVALID_ARGUMENT, fragment="", within=2.0) -> float:
    start = time.perf_counter()
    with pytest.raises(grpc.RpcError) as raised:
        call()
    elapsed = time.perf_counter() - start
    assert raised.value.code() == code and fragment in raised.value.details(), raised.value.details()
    assert elapsed < within, elapsed
    return elapsed


def test_text_rows_and_token_limits_are_checked_before_any_work(tiny_dirs, small_limits):
    reward_server, policy_server = small_limits
    reward = reward_pb2_grpc.RewardServiceStub(reward_server.channel())
    policy = policy_pb2_grpc.PolicyServiceStub(policy_server.channel())
    refused_fast(lambda: reward.Score(score_texts(["q"], ["x" * 2000]), timeout=10), fragment="max_text_bytes")
    refused_fast(lambda: reward.Score(score_texts(["q"] * 5, ["é" * 450] * 5), timeout=10),
                 fragment="max_request_text_bytes")
    refused_fast(lambda: reward.Score(score_texts(["q"] * 9, ["a"] * 9), timeout=10), fragment="limit of 8")
    wide = codec.ragged_to_pb([torch.full((60,), 5)] * 8, torch.int32)  # 8 rows x 60 tokens > 400
    refused_fast(lambda: reward.Score(reward_pb2.ScoreRequest(tokens=wide), timeout=10), fragment="max_request_tokens")
    long_texts = score_texts(["q"] * 8, ["many words " * 20] * 8)  # 8 rows x about 60 tokens > 400
    refused_fast(lambda: reward.Score(long_texts, timeout=10), fragment="max_request_tokens")
    tokenize = policy_pb2.TokenizeRequest(prompts=["q"] * 9, responses=["a"] * 9)
    refused_fast(lambda: policy.Tokenize(tokenize, timeout=10), fragment="limit of 8")
    generate = text_generate(["Q: hi"] * 8, max_new_tokens=60)
    refused_fast(lambda: policy.Generate(generate, timeout=10), fragment="max_request_tokens")
    # two million empty rows: 1.9 MB on the wire, refused before a single row is built
    empty = tensor_pb2.RaggedTensor(values=codec.tensor_to_pb(torch.zeros(0, dtype=torch.int32)),
                                    lengths=[0] * 2_000_000)
    refused_fast(lambda: policy.LogProbs(common_pb2.LogProbsRequest(
        sequences=tensor_pb2.SequenceBatch(tokens=empty)), timeout=10), fragment="limit of 8")
    # above server.max_message_mb gRPC itself refuses the message
    refused_fast(lambda: reward.Score(score_texts(["q"], ["x" * 2_000_000]), timeout=10),
                 grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert reward.Score(score_texts(["q"], ["a fine answer"]), timeout=10).values


def test_a_50_mb_prompt_is_refused_in_milliseconds_without_the_memory(tiny_dirs):
    with ServerThread(service_config("reward", tiny_dirs["rm"])).start() as server:
        reward = reward_pb2_grpc.RewardServiceStub(server.channel())
        request = score_texts(["q"], ["x" * 50_000_000])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        elapsed = refused_fast(lambda: reward.Score(request, timeout=30), fragment="max_text_bytes")
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
        assert grown_mb < 1024, grown_mb  # the message itself, parsed once; tokenising it took gigabytes
        print(f"50 MB prompt refused in {elapsed * 1000:.0f} ms; peak RSS grew {grown_mb:.0f} MiB")


def test_calls_beyond_the_concurrency_cap_are_refused_at_once_and_probes_still_answer(small_limits):
    _, policy_server = small_limits
    gate = threading.Event()
    original = policy_server.servicer._run_generate

    def slow(key, items):
        gate.wait(20)
        return original(key, items)

    policy_server.servicer.generate_batcher._run = slow
    try:
        channel = policy_server.channel()
        policy = policy_pb2_grpc.PolicyServiceStub(channel)
        request = text_generate(["Q: hi"], max_new_tokens=2)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            held = [pool.submit(policy.Generate, request, timeout=30) for _ in range(2)]
            time.sleep(0.5)  # both are in progress now
            elapsed = refused_fast(lambda: policy.Generate(request, timeout=30), grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   "max_concurrent_rpcs", within=0.5)
            with pytest.raises(grpc.RpcError) as refused:
                policy.Generate(request, timeout=30)
            assert pushback_seconds(refused.value) > 0  # how long to wait before calling again
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            gate.set()
            assert all(f.result().response_tokens.lengths for f in held)
        print(f"refused beyond the cap in {elapsed * 1000:.1f} ms")
    finally:
        gate.set()
        policy_server.servicer.generate_batcher._run = original


def test_micro_batches_stay_within_the_token_budget():
    lengths = [10, 50, 12, 128, 3, 3, 3, 3]
    for size, budget in ((8, 100), (2, 1000), (8, 60)):
        parts = budget_chunks(lengths, size, budget)
        assert sorted(i for part in parts for i in part) == list(range(len(lengths)))
        for part in parts:
            assert len(part) <= size
            assert len(part) == 1 or len(part) * max(lengths[i] for i in part) <= budget


def test_rows_of_similar_length_share_a_model_call():
    lengths = [50, 3, 48, 4, 51, 5]
    parts = budget_chunks(lengths, 3, 10_000, by_length=True)
    assert parts == [[1, 3, 5], [2, 0, 4]]  # short rows together, long rows together
    assert budget_chunks(lengths, 3, 10_000) == [[0, 1, 2], [3, 4, 5]]

