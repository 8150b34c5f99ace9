"""/metrics served over HTTP by live services and the controller: gRPC server metrics, model metrics."""

import types

import grpc
import pytest

from controller.metrics import ControllerMetrics
from rlhf.v1 import policy_pb2_grpc, reward_pb2, reward_pb2_grpc
from services.formatting import encode_for_reward
from services.metrics import NoMetrics, ServiceMetrics, metrics_for
from services.reward import RewardServicer
from tests.support.metrics import scrape, value
from tests.support.rpc import rows, text_generate
from tests.support.servers import ServerThread, service_config

SCORE = {"grpc_service": "rlhf.v1.RewardService", "grpc_method": "Score", "grpc_type": "unary"}
COMPARE_STREAM = {"grpc_service": "rlhf.v1.RewardService", "grpc_method": "CompareStream", "grpc_type": "bidi_stream"}


@pytest.fixture(scope="module")
def reward(tiny_dirs):
    """A reward service of its own, so that counts start from zero; its /metrics on a free port."""
    with ServerThread(service_config("reward", tiny_dirs["rm"])).start() as server:
        yield server


def pairs(n: int) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(texts=reward_pb2.TextPairs(prompts=["Say hi: "] * n, responses=["hi there"] * n))


def compare(n: int) -> reward_pb2.CompareRequest:
    return reward_pb2.CompareRequest(pairs=reward_pb2.ComparePairs(prompts=["Q: "] * n, chosen=["a"] * n, rejected=["b"] * n))


def test_grpc_metrics_count_each_status_code_of_unary_and_streaming_calls(reward):
    stub = reward_pb2_grpc.RewardServiceStub(reward.channel())
    before = scrape(reward.servicer.metrics.endpoint.url)
    stub.Score(pairs(3))
    stub.Score(pairs(1))
    with pytest.raises(grpc.RpcError) as bad:
        stub.Score(reward_pb2.ScoreRequest())
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(list(stub.CompareStream(iter([compare(2), compare(1)])))) == 2
    with pytest.raises(grpc.RpcError) as bad_stream:
        list(stub.CompareStream(iter([reward_pb2.CompareRequest()])))
    assert bad_stream.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(reward.servicer.metrics.endpoint.url)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("grpc_server_started_total", **SCORE) == 3
    assert delta("grpc_server_handled_total", grpc_code="OK", **SCORE) == 2
    assert delta("grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **SCORE) == 1
    assert delta("grpc_server_handling_seconds_count", **SCORE) == 3
    assert delta("grpc_server_msg_sent_total", **SCORE) == 2  # no reply to the bad request
    assert delta("grpc_server_handled_total", grpc_code="OK", **COMPARE_STREAM) == 1
    assert delta("grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **COMPARE_STREAM) == 1
    assert delta("grpc_server_msg_received_total", **COMPARE_STREAM) == 3
    assert delta("grpc_server_msg_sent_total", **COMPARE_STREAM) == 2


def test_model_metrics_follow_the_batches(reward):
    stub = reward_pb2_grpc.RewardServiceStub(reward.channel())
    url = reward.servicer.metrics.endpoint.url
    q = {"role": "reward", "queue": "score"}
    before = scrape(url)
    stub.Score(pairs(5))
    after = scrape(url)
    assert value(after, "rlhf_sequences_total", **q) - value(before, "rlhf_sequences_total", **q) == 5
    assert value(after, "rlhf_batch_size_count", **q) - value(before, "rlhf_batch_size_count", **q) == 1
    assert value(after, "rlhf_batch_size_sum", **q) - value(before, "rlhf_batch_size_sum", **q) == 5
    m = reward.servicer.loaded
    expected = 5 * len(encode_for_reward(m.tokenizer, "Say hi: ", "hi there", m.limits.max_length))
    assert value(after, "rlhf_tokens_scored_total", **q) - value(before, "rlhf_tokens_scored_total", **q) == expected
    assert value(after, "rlhf_inference_seconds_count", **q) - value(before, "rlhf_inference_seconds_count", **q) == 1
    assert value(after, "rlhf_queue_depth", **q) == 0
    assert value(after, "rlhf_queue_capacity", **q) == reward.cfg.batching.max_queue
    assert value(after, "rlhf_service_ready", role="reward") == 1
    assert value(after, "rlhf_model_version", role="reward") == 0
    assert value(after, "rlhf_model_load_seconds", role="reward") > 0
    assert value(after, "rlhf_torch_threads", role="reward") == reward.cfg.server.num_threads
    waste = value(after, "rlhf_padding_waste_count", role="reward") - value(before, "rlhf_padding_waste_count", role="reward")
    assert waste == 1  # one model call
    assert value(after, "rlhf_model_info", role="reward", model=str(reward.cfg.model.path), device="cpu", dtype="fp32") == 1


def test_policy_counts_the_tokens_it_generates(services):
    policy = services["policy"]
    url = policy.servicer.metrics.endpoint.url
    q = {"role": "policy", "queue": "generate"}
    before = scrape(url)
    reply = policy_pb2_grpc.PolicyServiceStub(policy.channel()).Generate(text_generate(["Say hi: ", "Count: "]))
    after = scrape(url)
    generated = sum(int(r.numel()) for r in rows(reply.response_tokens))
    assert value(after, "rlhf_tokens_generated_total", **q) - value(before, "rlhf_tokens_generated_total", **q) == generated
    assert value(after, "rlhf_sequences_total", **q) - value(before, "rlhf_sequences_total", **q) == 2
    assert ("rlhf_queue_depth", (("queue", "logprobs"), ("role", "policy"))) in after


def test_minus_one_disables_everything_and_a_taken_port_is_a_clear_error(tiny_dirs):
    off = RewardServicer(service_config("reward", tiny_dirs["rm"], server={"metrics_port": -1}))
    assert isinstance(metrics_for(off), NoMetrics) and not metrics_for(off).interceptors
    assert off.batcher.on_batch is None and off.batcher.on_result is None  # no per-batch hooks either
    off.executor.shutdown()
    servicer = RewardServicer(service_config("reward", tiny_dirs["rm"]))
    metrics = metrics_for(servicer)
    assert isinstance(metrics, ServiceMetrics) and servicer.batcher.on_result is not None
    metrics.serve("127.0.0.1", 0)
    try:
        taken = metrics.endpoint.port
        with pytest.raises(OSError, match="metrics_port"):
            ServiceMetrics(servicer).serve("127.0.0.1", taken)
    finally:
        metrics.close()
        servicer.executor.shutdown()


def test_demo_keeps_the_endpoints_up_until_ctrl_c_and_prints_them(monkeypatch, capsys):
    from demo import run as demo_run

    metrics = ControllerMetrics()
    metrics.serve("127.0.0.1", 0)
    url = metrics.endpoint.url
    mesh = types.SimpleNamespace(metrics_endpoints={"policy": "127.0.0.1:9401"})

    held = []

    def ctrl_c(seconds):
        held.append(scrape(url))  # what /metrics serves while the demo waits
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_run.time, "sleep", ctrl_c)
    demo_run.hold_metrics(mesh, metrics)
    out = capsys.readouterr().out
    assert len(held) == 1 and held[0], held  # it waited, served the controller's metrics, and Ctrl-C ended the wait
    assert url in out and "http://127.0.0.1:9401/metrics" in out
    assert metrics.endpoint is None  # closed after Ctrl-C
