"""A few PPO iterations across four service processes driven by the controller."""

import asyncio
import json
import math
import threading

import grpc
import pytest
import torch

from controller.config import ControllerConfig
from controller.service import run_controller
from rlhf.v1 import controller_pb2, controller_pb2_grpc, reward_pb2_grpc
from services.launcher import LocalMesh, free_port
from tests.support.data import write_pairs, write_prompts
from tests.support.mesh import saved_weights, service_configs
from tests.support.rpc import compare_margins
from training import synthetic


def changed_tensors(before_dir, after_file) -> list[str]:
    before, after = saved_weights(before_dir), saved_weights(after_file)
    return [k for k in before if k in after and not torch.equal(before[k], after[k])]


@pytest.fixture(scope="module")
def mesh(tiny_dirs, tmp_path_factory):
    work = tmp_path_factory.mktemp("mesh")
    with LocalMesh(work, service_configs(tiny_dirs, work / "checkpoints")) as running:
        yield running


def poll_status(port: int, replies: list, evaluations: list, done: threading.Event) -> None:
    """Ask ControllerService.Status until `done`, as a dashboard would; call Evaluate once while running.

    Evaluate runs beside the polling (a slow evaluation must not hide the run's states); it is recorded
    with the index from which Status replies were all asked for after it finished.
    """
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        pending = None
        while not done.wait(0.02):  # the tiny run takes about a second
            try:
                replies.append(stub.Status(controller_pb2.StatusRequest(), timeout=2))
                if replies[-1].state == "running" and pending is None:
                    pending = stub.Evaluate.future(controller_pb2.EvaluateRequest(), timeout=60)
                if pending is not None and pending.done() and not evaluations:
                    evaluations.append((pending.result(), len(replies)))
            except grpc.RpcError:
                if pending is not None and pending.done() and not evaluations:
                    pending = None  # the Evaluate failed: ask again while running


def run_watched(cfg: ControllerConfig, port: int) -> tuple[list, list, list]:
    """Run the controller while poll_status watches it: (steps, Status replies, [(Evaluate reply, index)])."""
    steps, replies, evaluations, done = [], [], [], threading.Event()
    poller = threading.Thread(target=poll_status, args=(port, replies, evaluations, done))
    poller.start()
    try:
        asyncio.run(run_controller(cfg, steps.append))
    finally:
        done.set()
        poller.join()
    return steps, replies, evaluations


def test_ppo_iterations_change_weights_with_finite_stats(mesh, tiny_dirs, tmp_path):
    port = free_port()
    prompts = write_prompts(tmp_path / "prompts.jsonl", synthetic.train_prompts(32, seed=3))
    pairs = synthetic.preference_pairs(40, seed=9)
    heldout = write_pairs(tmp_path / "heldout.jsonl", pairs)
    cfg = ControllerConfig.model_validate({
        "run_id": "e2e", "services": mesh.endpoints, "data": {"prompts": str(prompts)},
        "evaluation": {"pairs": str(heldout), "every": 2, "chunk": 16},
        "server": {"host": "127.0.0.1", "port": port, "metrics_port": 0}, "output_dir": str(tmp_path / "run"),
        "ready_timeout_seconds": 300,
        "ppo": {"total_steps": 3, "batch_size": 8, "minibatch_size": 4, "ppo_epochs": 2, "max_new_tokens": 8,
                "adaptive_kl": True, "kl_target": 1.0},
    })
    asyncio.run(mesh.wait_ready(300))
    steps, replies, evaluations = run_watched(cfg, port)
    running = [r for r in replies if r.state == "running"]
    assert running and running[-1].run_id == "e2e" and running[-1].total_steps == 3
    assert any(r.step >= 1 and "reward/mean" in r.stats for r in running)
    # Reward-model comparison evaluation: on demand, after steps 2 and 3, and in Status.
    assert evaluations
    evaluation, after = evaluations[0]
    assert evaluation.pairs == 40
    with grpc.insecure_channel(mesh.endpoints["reward"]) as channel:  # the frozen RM's own verdict on the pairs
        margins = compare_margins(reward_pb2_grpc.RewardServiceStub(channel), pairs)
    assert evaluation.accuracy == pytest.approx(float((margins > 0).float().mean()))
    assert evaluation.mean_margin == pytest.approx(float(margins.mean()), abs=1e-4)
    with_eval = [s.stats for s in steps if "eval/rm_accuracy" in s.stats]
    assert [s["step"] for s in with_eval] == [1, 2]
    assert abs(with_eval[-1]["eval/rm_accuracy"] - evaluation.accuracy) < 1e-9  # the RM is frozen
    # Every Status after it reports it (the run may have finished by then: the evaluation is kept).
    later = replies[after:]
    assert later and all(r.last_evaluation.pairs == 40 for r in later)
    mesh.check_alive()
    lines = [json.loads(x) for x in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert len(lines) == len(steps) == 3
    for stats in lines:
        assert all(math.isfinite(v) for v in stats.values()), stats
    # The first minibatch of the first epoch trains on freshly sampled data: ratio 1.
    assert all(abs(s["policy/first_minibatch_approx_kl"]) < 1e-5 for s in lines)
    assert lines[-1]["policy/version"] == 3 * 2 * 2
    assert lines[-1]["objective/kl_coef"] != lines[0]["objective/kl_coef"]  # adaptive controller moved
    saved = mesh.workdir / "checkpoints"
    assert changed_tensors(tiny_dirs["lm"], saved / "policy" / "final" / "model.safetensors"), "policy unchanged"
    assert changed_tensors(tiny_dirs["rm"], saved / "value" / "final" / "model.safetensors"), "value unchanged"


def test_sigterm_drains_and_exits_cleanly(mesh):
    codes = mesh.stop(timeout=60)
    assert codes == {role: 0 for role in mesh.processes}, codes
    assert "draining" in (mesh.workdir / "policy.log").read_text()
