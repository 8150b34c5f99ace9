"""What the services and the controller export on /metrics, read from their registries (no server, no GPU)."""

import types

import pytest

from controller.config import ControllerConfig, ControllerServerConfig
from controller.metrics import PHASES, STEP_GAUGES, ControllerMetrics
from controller.replicas import Outage
from controller.service import ControllerServicer
from services.config import ServerConfig
from services.metrics import DeviceMemoryCollector, exposition, metrics_port
from tests.support.metrics import PPO_STATS, fake_cuda, samples, value


def test_port_defaults_follow_the_design_and_minus_one_disables():
    assert [metrics_port(None, None, r) for r in ("controller", "policy", "reference", "reward", "value")] == [
        9400, 9401, 9402, 9403, 9404]
    assert metrics_port(None, 0, "reward") == 0  # an ephemeral gRPC port gets an ephemeral metrics port
    assert metrics_port(None, 7000, "policy") == 9401
    assert metrics_port(-1, 0, "policy") == -1 and metrics_port(9999, 0, "policy") == 9999
    assert ServerConfig(metrics_port=-1).metrics_port == -1 and ControllerServerConfig().metrics_port is None
    with pytest.raises(ValueError):
        ServerConfig(metrics_port=-2)


def controller_servicer(metrics: ControllerMetrics, total_steps: int = 10) -> ControllerServicer:
    """A real ControllerServicer, not connected to services, reporting to `metrics`."""
    cfg = ControllerConfig.model_validate({"run_id": "r1", "data": {"prompts": "unused"},
                                           "ppo": {"total_steps": total_steps}})
    servicer = ControllerServicer(cfg, metrics=metrics)
    servicer.state = "running"
    return servicer


def test_controller_exports_every_step_statistic():
    metrics = ControllerMetrics()
    controller_servicer(metrics)
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
    assert value(got, "rlhf_run_checkpoint_step") == -1 and value(got, "rlhf_run_restores_total") == 0
    metrics.observe_step({"reward/rm/mean": 0.25, "reward/format/mean": 1.0, "group/zero_variance_fraction": 0.5})
    got = samples(exposition(metrics.registry))
    assert value(got, "rlhf_reward_source_mean", source="rm") == 0.25
    assert value(got, "rlhf_reward_source_mean", source="format") == 1.0
    assert value(got, "rlhf_group_zero_variance_ratio") == 0.5


def test_a_run_that_retries_a_service_reports_waiting_for_it():
    metrics = ControllerMetrics()
    servicer = controller_servicer(metrics)
    pool = types.SimpleNamespace(serving=lambda: [], channels={"a": 0})
    servicer.clients = types.SimpleNamespace(pools={"reward": pool, "policy": pool}, outage=Outage())
    servicer.clients.outage.waiting("reward", "UNAVAILABLE: connection refused")
    got = samples(exposition(metrics.registry))
    assert value(got, "rlhf_waiting_for_service", service="reward") == 1
    assert value(got, "rlhf_waiting_for_service", service="policy") == 0
    assert value(got, "rlhf_run_state", state="waiting") == 1 and value(got, "rlhf_run_state", state="running") == 0
    assert servicer.waiting()[0] == "reward" and "connection refused" in servicer.waiting()[2]
    servicer.clients.outage.recovered("reward")
    got = samples(exposition(metrics.registry))
    assert value(got, "rlhf_waiting_for_service", service="reward") == 0
    assert value(got, "rlhf_run_state", state="running") == 1


def test_device_memory_is_read_from_the_cuda_allocator_at_scrape_time():
    collector = DeviceMemoryCollector("policy", "cuda:0")
    collector._cuda = fake_cuda()
    got = {s.name: s.value for family in collector.collect() for s in family.samples}
    assert got == {"rlhf_device_memory_allocated_bytes": 1024, "rlhf_device_memory_reserved_bytes": 2048,
                   "rlhf_device_memory_max_allocated_bytes": 4096, "rlhf_device_memory_total_bytes": 8192}
