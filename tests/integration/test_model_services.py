"""Reference, reward and value services, health, reflection and batching over real gRPC."""

import concurrent.futures
import json
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf.v1 import (
    common_pb2,
    reference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    value_pb2,
)
from services import codec
from services.formatting import encode_for_reward
from services.pushback import pushback_seconds
from tests.support.rpc import (
    expect_invalid,
    rows,
    score_texts,
    sequences_from_generation,
    text_generate,
    value_train,
)
from tests.support.servers import ServerThread, service_config
from training import synthetic


@pytest.fixture(scope="module")
def rollout(stubs):
    reply = stubs["policy"].Generate(text_generate(synthetic.train_prompts(6, seed=21), seed=5), timeout=60)
    return reply, sequences_from_generation(reply)


def test_reference_logprobs_equal_the_untrained_policy(stubs, tiny_dirs):
    # The reference holds the same checkpoint the policy started from.
    from transformers import AutoModelForCausalLM

    reply = stubs["policy"].Generate(text_generate(synthetic.train_prompts(3, seed=22), seed=6), timeout=60)
    seqs = sequences_from_generation(reply)
    ref = rows(stubs["reference"].LogProbs(common_pb2.LogProbsRequest(sequences=seqs.to_pb()), timeout=60).logprobs)
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["lm"]).eval()
    for row, p, lp in zip(seqs.rows, seqs.prompt_lengths, ref):
        with torch.no_grad():
            logits = model(row.unsqueeze(0)).logits[0, p - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(1, row[p:].unsqueeze(1)).squeeze(1)
        assert torch.allclose(lp, expected, atol=1e-5)


def test_reference_rejects_bad_sequences(stubs, rollout):
    _, seqs = rollout
    bad = seqs.to_pb()
    bad.prompt_lengths.pop()
    expect_invalid(stubs["reference"].LogProbs, common_pb2.LogProbsRequest(sequences=bad), "sequences.prompt_lengths")
    expect_invalid(stubs["reference"].LogProbs, common_pb2.LogProbsRequest(sequences=seqs.to_pb(), temperature=-1), "temperature")


def test_reward_scores_text_like_the_offline_model(stubs, tiny_dirs):
    prompts = synthetic.train_prompts(4, seed=23)
    responses = ["a nice answer", "another", "x", "the longest of the responses here"]
    scores = codec.tensor_from_pb(stubs["reward"].Score(score_texts(prompts, responses), timeout=60).scores, "s")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["rm"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dirs["rm"]).eval()
    for prompt, response, score in zip(prompts, responses, scores):
        ids = torch.tensor([encode_for_reward(tokenizer, prompt, response, 128)])
        with torch.no_grad():
            assert abs(model(ids).logits[0, 0].item() - score.item()) < 1e-4
    tokens = [torch.tensor(encode_for_reward(tokenizer, p, r, 128)) for p, r in zip(prompts, responses)]
    by_tokens = stubs["reward"].Score(reward_pb2.ScoreRequest(tokens=codec.ragged_to_pb(tokens, torch.int32)), timeout=60)
    assert torch.allclose(codec.tensor_from_pb(by_tokens.scores, "s"), scores, atol=1e-5)


def test_reward_rejects_bad_input(stubs):
    expect_invalid(stubs["reward"].Score, score_texts(["a", "b"], ["c"]), "texts.responses")
    expect_invalid(stubs["reward"].Score, reward_pb2.ScoreRequest(), "input")
    expect_invalid(stubs["reward"].Score, score_texts([], []), "texts.prompts")
    outside = codec.ragged_to_pb([torch.tensor([1, -4], dtype=torch.int32)])
    expect_invalid(stubs["reward"].Score, reward_pb2.ScoreRequest(tokens=outside), "outside the vocabulary")


def test_value_train_moves_values_toward_returns_and_replays(stubs, rollout):
    _, seqs = rollout
    values = rows(stubs["value"].Values(value_pb2.ValuesRequest(sequences=seqs.to_pb()), timeout=60).values)
    assert [v.numel() for v in values] == seqs.response_lengths
    returns = [torch.full_like(v, 1.0) for v in values]
    error_before = sum(((v - 1.0) ** 2).sum() for v in values)
    first = stubs["value"].Train(value_train(seqs, values, returns, step=1), timeout=120)
    assert first.model_version >= 1 and first.loss > 0 and first.grad_norm > 0 and not first.replayed
    again = stubs["value"].Train(value_train(seqs, values, returns, step=1), timeout=120)
    assert again.replayed and again.model_version == first.model_version
    after = rows(stubs["value"].Values(value_pb2.ValuesRequest(sequences=seqs.to_pb()), timeout=60).values)
    assert sum(((v - 1.0) ** 2).sum() for v in after) < error_before


def test_value_rejects_nan_returns_without_a_step(stubs, rollout):
    _, seqs = rollout
    values = rows(stubs["value"].Values(value_pb2.ValuesRequest(sequences=seqs.to_pb()), timeout=60).values)
    version = stubs["value"].Info(common_pb2.InfoRequest(), timeout=30).model_version
    nan = [torch.full_like(v, float("nan")) for v in values]
    expect_invalid(stubs["value"].Train, value_train(seqs, values, nan, step=2), "returns")
    assert stubs["value"].Info(common_pb2.InfoRequest(), timeout=30).model_version == version


def test_value_checkpoint_is_a_sequence_classifier(stubs):
    reply = stubs["value"].SaveCheckpoint(common_pb2.SaveCheckpointRequest(path="value-test"), timeout=120)
    model = AutoModelForSequenceClassification.from_pretrained(reply.path)
    assert model.config.num_labels == 1


def test_health_serving_and_reflection_lists_services(services):
    for role, server in services.items():
        channel = server.channel()
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answer.list_services_response.service}
        assert server.servicer.service_name in names and "grpc.health.v1.Health" in names


def test_concurrent_requests_share_a_batch(stubs, services):
    seen = []
    batcher = services["reward"].servicer.batcher
    batcher.on_batch = lambda n_rows, tokens: seen.append(n_rows)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(stubs["reward"].Score, score_texts(["p"], [f"r{i}"]), timeout=60) for i in range(24)]
            results = [c.result() for c in calls]
    finally:
        batcher.on_batch = None
    assert len(results) == 24 and sum(seen) == 24
    assert max(seen) > 1, seen  # at least one model call served several requests


def test_full_queue_is_resource_exhausted_and_loading_is_unavailable(tiny_dirs):
    server = ServerThread(service_config("reward", tiny_dirs["rm"], batching={"max_queue": 1, "max_wait_ms": 200}))
    server.start()
    try:
        stub = reward_pb2_grpc.RewardServiceStub(server.channel())
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            calls = [pool.submit(stub.Score, score_texts(["p"] * 8, ["r"] * 8), timeout=60) for _ in range(16)]
            codes, waits = [], []
            for c in calls:
                try:
                    c.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    codes.append(error.code())
                    waits.append(pushback_seconds(error))
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
        assert all(wait > 0 for wait in waits), waits  # each refusal says when to come back
        server.servicer.draining = True
        with pytest.raises(grpc.RpcError) as caught:
            stub.Score(score_texts(["p"], ["r"]), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_a_grpc_retry_policy_retries_a_full_queue_at_the_pace_the_server_asks(tiny_dirs):
    """The client's own backoff would wait up to 10 s between attempts; the refusals' grpc-retry-pushback-ms
    (milliseconds while few calls are refused) sets the pace instead, so all five attempts are spent at once."""
    config = {"methodConfig": [{"name": [{"service": "rlhf.v1.RewardService"}], "retryPolicy": {
        "maxAttempts": 5, "initialBackoff": "10s", "maxBackoff": "10s", "backoffMultiplier": 1,
        "retryableStatusCodes": ["RESOURCE_EXHAUSTED"]}}]}
    server = ServerThread(service_config("reward", tiny_dirs["rm"], batching={"max_queue": 1, "max_wait_ms": 1500}))
    server.start()
    try:
        holder = reward_pb2_grpc.RewardServiceStub(server.channel())
        options = [("grpc.service_config", json.dumps(config)), ("grpc.enable_retries", 1)]
        with grpc.insecure_channel(server.address, options=options) as channel, \
                concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(holder.Score, score_texts(["p"], ["r"]), timeout=60)  # the one slot, for ~1.5 s
            deadline = time.monotonic() + 10
            while server.servicer.batcher.admitted == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            refused_before = server.servicer.batcher.refused
            start = time.perf_counter()
            with pytest.raises(grpc.RpcError) as raised:
                reward_pb2_grpc.RewardServiceStub(channel).Score(score_texts(["p"], ["r"]), timeout=60)
            elapsed = time.perf_counter() - start
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert server.servicer.batcher.refused - refused_before == 5  # every attempt was made ...
            assert elapsed < 2.0, elapsed  # ... at the server's pace, not the policy's 10 s backoff
            assert held.result().values
    finally:
        server.stop()


def test_bf16_reference_agrees_with_fp32(stubs, tiny_dirs, rollout):
    _, seqs = rollout
    server = ServerThread(service_config("reference", tiny_dirs["lm"], model={"dtype": "bf16"})).start()
    try:
        stub = reference_pb2_grpc.ReferenceServiceStub(server.channel())
        info = stub.Info(common_pb2.InfoRequest(), timeout=30)
        assert info.dtype == "bf16"
        request = common_pb2.LogProbsRequest(sequences=seqs.to_pb())
        low = rows(stub.LogProbs(request, timeout=60).logprobs)
        full = rows(stubs["reference"].LogProbs(request, timeout=60).logprobs)
        for a, b in zip(low, full):
            assert a.dtype == torch.float32 and torch.allclose(a, b, atol=0.15)
    finally:
        server.stop()


def test_health_is_not_serving_and_rpcs_unavailable_until_weights_load(tiny_dirs):
    import threading

    gate = threading.Event()
    server = ServerThread(service_config("reward", tiny_dirs["rm"]), gate=gate).start(wait=False)
    try:
        channel = server.channel()
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="rlhf.v1.RewardService"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Score(score_texts(["p"], ["r"]), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in caught.value.details()
        gate.set()
        assert server._ready.wait(60)
        for _ in range(100):  # SERVING follows the load by one event-loop turn
            reply = health.Check(health_pb2.HealthCheckRequest(service="rlhf.v1.RewardService"), timeout=10)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.05)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        gate.set()
        server.stop()


def test_rows_per_request_bound_applies_to_text_and_token_input(tiny_dirs):
    server = ServerThread(service_config("reward", tiny_dirs["rm"], batching={"max_request_rows": 2})).start()
    try:
        stub = reward_pb2_grpc.RewardServiceStub(server.channel())
        assert len(stub.Score(score_texts(["p", "q"], ["r", "s"]), timeout=30).scores.raw) == 8
        expect_invalid(stub.Score, score_texts(["p"] * 3, ["r"] * 3), "3 rows exceed the limit of 2")
        tokens = codec.ragged_to_pb([torch.tensor([5, 6], dtype=torch.int32)] * 3)
        expect_invalid(stub.Score, reward_pb2.ScoreRequest(tokens=tokens), "tokens.lengths")
    finally:
        server.stop()
