"""/metrics of the services and the controller: gRPC server metrics, model metrics, per-step statistics."""

import types
import urllib.request

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from controller.config import ControllerServerConfig
from controller.metrics import PHASES, STEP_GAUGES, ControllerMetrics
from rlhf.v1 import policy_pb2_grpc, reward_pb2, reward_pb2_grpc
from services.config import ServerConfig
from services.metrics import DeviceMemoryCollector, NoMetrics, ServiceMetrics, exposition, metrics_for, metrics_port
from services.reward import RewardServicer
from tests.conftest import ServerThread, service_config
from tests.rpc import rows, text_generate

SCORE = {"grpc_service": "rlhf.v1.RewardService", "grpc_method": "Score", "grpc_type": "unary"}
COMPARE_STREAM = {"grpc_service": "rlhf.v1.RewardService", "grpc_method": "CompareStream", "grpc_type": "bidi_stream"}


def samples(text: str) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value of a text exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(url: str) -> dict[tuple, float]:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return samples(reply.read().decode())


def value(scraped: dict, name: str, **labels) -> float:
    """The sample's value, 0 when it is absent (a counter not yet created)."""
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def reward(tiny_dirs):
    """A reward service of its own, so that counts start from zero; its /metrics on a free port."""
    server = ServerThread(service_config("reward", tiny_dirs["rm"])).start()
    yield server
    server.stop()


def pairs(n: int) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(texts=reward_pb2.TextPairs(prompts=["Say hi: "] * n, responses=["hi there"] * n))


def compare(n: int) -> reward_pb2.CompareRequest:
    return reward_pb2.CompareRequest(pairs=reward_pb2.ComparePairs(prompts=["Q: "] * n, chosen=["a"] * n, rejected=["b"] * n))


def test_port_defaults_follow_the_design_and_minus_one_disables():
    assert [metrics_port(None, None, r) for r in ("controller", "policy", "reference", "reward", "value")] == [
        9400, 9401, 9402, 9403, 9404]
    assert metrics_port(None, 0, "reward") == 0  # an ephemeral gRPC port gets an ephemeral metrics port
    assert metrics_port(None, 7000, "policy") == 9401
    assert metrics_port(-1, 0, "policy") == -1 and metrics_port(9999, 0, "policy") == 9999
    assert ServerConfig(metrics_port=-1).metrics_port == -1 and ControllerServerConfig().metrics_port is None
    with pytest.raises(ValueError):
        ServerConfig(metrics_port=-2)


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
    assert value(after, "rlhf_tokens_scored_total", **q) > value(before, "rlhf_tokens_scored_total", **q)
    assert value(after, "rlhf_inference_seconds_count", **q) - value(before, "rlhf_inference_seconds_count", **q) == 1
    assert value(after, "rlhf_queue_depth", **q) == 0
    assert value(after, "rlhf_queue_capacity", **q) == reward.cfg.batching.max_queue
    assert value(after, "rlhf_service_ready", role="reward") == 1
    assert value(after, "rlhf_model_version", role="reward") == 0
    assert value(after, "rlhf_model_load_seconds", role="reward") > 0
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


PPO_STATS = {
    "reward/mean": 0.5, "reward/std": 0.2, "objective/kl": 1.5, "objective/kl_coef": 0.05, "policy/loss": -0.1,
    "value/loss": 0.3, "policy/clipfrac": 0.1, "value/clipfrac": 0.05, "policy/approx_kl": 0.01, "policy/entropy": 2.0,
    "value/explained_variance": 0.4, "response/length": 7.5, "advantages/mean": 0.0, "advantages/std": 1.0,
    "returns/mean": 0.2, "returns/std": 0.5, "time/generate": 0.4, "time/score": 0.2, "time/train": 1.2,
    "samples": 8, "step": 0, "policy/version": 4, "eval/rm_accuracy": 0.75,
}


def test_controller_exports_every_step_statistic():
    metrics = ControllerMetrics()
    servicer = types.SimpleNamespace(state="running", runner=None, clients=None,
                                     cfg=types.SimpleNamespace(total_steps=lambda: 10, run_id="r1", algorithm="ppo"))
    metrics.attach(servicer)
    metrics.observe_step(PPO_STATS)
    metrics.observe_step(PPO_STATS | {"samples": 16, "step": 1, "reward/mean": 0.7})
    got = samples(exposition(metrics.registry))
    for key in PPO_STATS:
        assert key in STEP_GAUGES or key in PHASES or key in ("samples", "step"), key
    assert value(got, "rlhf_reward_mean") == 0.7 and value(got, "rlhf_objective_kl") == 1.5
    assert value(got, "rlhf_eval_rm_accuracy_ratio") == 0.75 and value(got, "rlhf_policy_clip_ratio") == 0.1
    assert value(got, "rlhf_steps_total") == 2 and value(got, "rlhf_samples_total") == 16
    assert value(got, "rlhf_response_tokens_total") == 16 * 7.5
    assert value(got, "rlhf_phase_seconds_count", phase="train") == 2
    assert value(got, "rlhf_phase_seconds_sum", phase="generate") == pytest.approx(0.8)
    assert value(got, "rlhf_run_state", state="running") == 1 and value(got, "rlhf_run_state", state="failed") == 0
    assert value(got, "rlhf_steps_planned") == 10
    assert value(got, "rlhf_last_step_timestamp_seconds") > 1e9
    assert not any(name.startswith("rlhf_dpo_") for name, _ in got)  # a PPO run exports no DPO gauges


def fake_cuda():
    """Stands in for torch.cuda on a machine without a GPU."""
    return types.SimpleNamespace(
        memory_allocated=lambda i: 1024, memory_reserved=lambda i: 2048, max_memory_allocated=lambda i: 4096,
        current_device=lambda: 0, get_device_properties=lambda i: types.SimpleNamespace(total_memory=8192))


def test_device_memory_is_read_from_the_cuda_allocator_at_scrape_time():
    collector = DeviceMemoryCollector("policy", "cuda:0")
    collector._cuda = fake_cuda()
    got = {s.name: s.value for family in collector.collect() for s in family.samples}
    assert got == {"rlhf_device_memory_allocated_bytes": 1024, "rlhf_device_memory_reserved_bytes": 2048,
                   "rlhf_device_memory_max_allocated_bytes": 4096, "rlhf_device_memory_total_bytes": 8192}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_memory_on_a_real_gpu():
    torch.ones(1024, device="cuda")
    got = {s.name: s.value for f in DeviceMemoryCollector("policy", "cuda").collect() for s in f.samples}
    assert got["rlhf_device_memory_allocated_bytes"] > 0 and got["rlhf_device_memory_total_bytes"] > 0


def test_demo_keeps_the_endpoints_up_until_ctrl_c_and_prints_them(monkeypatch, capsys):
    from demo import run as demo_run

    metrics = ControllerMetrics()
    metrics.serve("127.0.0.1", 0)
    url = metrics.endpoint.url
    mesh = types.SimpleNamespace(metrics_endpoints={"policy": "127.0.0.1:9401"})

    def ctrl_c(seconds):
        assert scrape(url)  # still serving while held
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_run.time, "sleep", ctrl_c)
    demo_run.hold_metrics(mesh, metrics)
    out = capsys.readouterr().out
    assert url in out and "http://127.0.0.1:9401/metrics" in out
    assert metrics.endpoint is None  # closed after Ctrl-C
