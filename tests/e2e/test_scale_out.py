"""Scale-out on loopback: reward replicas, policy/value data-parallel groups, failover.

The same PPO run (seed, data, hyperparameters) on 1 process per service and on
2 reward replicas + 2-rank policy and value groups must end with the same
weights up to floating-point noise: each Generate batch and each Train
minibatch is sharded across the ranks, and one optimizer step stays one step.
"""

import asyncio
import math

import grpc
import pytest
import torch

from controller.config import ControllerConfig
from controller.metrics import ControllerMetrics
from controller.service import run_controller
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from services import codec
from services.batch import Sequences
from services.launcher import LocalMesh
from tests.support.data import write_pairs, write_prompts
from tests.support.mesh import max_difference, saved_weights, service_configs
from tests.support.metrics import scrape, value
from tests.support.rpc import (
    float_rows,
    ppo_train,
    rows,
    sequences_from_generation,
    text_generate,
)
from training import synthetic

SCALED = {"policy": 2, "value": 2, "reward": 2}
PPO = {"total_steps": 2, "batch_size": 8, "minibatch_size": 4, "ppo_epochs": 2, "max_new_tokens": 8}


def handled(mesh: LocalMesh, name: str, service: str, method: str) -> float:
    """grpc_server_handled_total{OK} of one process, from its /metrics."""
    scraped = scrape(f"http://{mesh.metrics_endpoints[name]}/metrics")
    return value(scraped, "grpc_server_handled_total", grpc_code="OK", grpc_method=method,
                 grpc_service=f"rlhf.v1.{service}", grpc_type="unary")


def controller_config(mesh: LocalMesh, tmp_path, run_id: str, **ppo) -> ControllerConfig:
    prompts = write_prompts(tmp_path / "prompts.jsonl", synthetic.train_prompts(32, seed=3))
    return ControllerConfig.model_validate({
        "run_id": run_id, "seed": 7, "services": mesh.endpoints, "data": {"prompts": str(prompts)},
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": -1}, "output_dir": str(tmp_path / run_id),
        "ready_timeout_seconds": 300, "ppo": PPO | ppo,
    })


def run_ppo(tiny_dirs, tmp_path, name: str, replicas: dict[str, int]):
    """One PPO run on a fresh mesh; returns (stats per step, responses per step, saved weights, metrics)."""
    work = tmp_path / name
    metrics = {f"{role}-{i}": 0 for role, n in replicas.items() for i in range(n) if n > 1}
    steps = []
    with LocalMesh(work, service_configs(tiny_dirs, work / "checkpoints"), metrics, replicas) as mesh:
        asyncio.run(mesh.wait_ready(300))
        asyncio.run(run_controller(controller_config(mesh, work, "equivalence"), steps.append))
        rpcs = {"policy": ("PolicyService", ("Generate", "Train")), "value": ("ValueService", ("Train",)),
                "reward": ("RewardService", ("Score",))}
        calls = {n: {m: handled(mesh, n, rpcs[n.split("-")[0]][0], m) for m in rpcs[n.split("-")[0]][1]}
                 for n in metrics}
        mesh.check_alive()
    saved = {role: saved_weights(work / "checkpoints" / role / "final") for role in ("policy", "value")}
    return [s.stats for s in steps], [s.experience.responses for s in steps], saved, calls


def test_two_replicas_and_two_ranks_train_like_one_process(tiny_dirs, tmp_path):
    one_stats, one_responses, one_weights, _ = run_ppo(tiny_dirs, tmp_path, "one", {})
    two_stats, two_responses, two_weights, calls = run_ppo(tiny_dirs, tmp_path, "two", SCALED)
    # Every process of the scaled mesh did its share: both reward replicas scored, both ranks trained.
    for name in ("reward-0", "reward-1"):
        assert calls[name]["Score"] >= PPO["total_steps"], calls
    for name in ("policy-0", "policy-1"):
        assert calls[name]["Generate"] >= PPO["total_steps"], calls
        assert calls[name]["Train"] == PPO["total_steps"] * PPO["ppo_epochs"] * 2, calls
    assert calls["value-1"]["Train"] == PPO["total_steps"] * PPO["ppo_epochs"] * 2, calls
    # The same samples, then the same optimizer steps.
    assert one_responses == two_responses
    for role in ("policy", "value"):
        initial = saved_weights(tiny_dirs["lm" if role == "policy" else "rm"])
        moved = max_difference({k: one_weights[role][k] for k in initial if k in one_weights[role]}, initial)
        difference = max_difference(one_weights[role], two_weights[role])
        print(f"{role}: largest weight change {moved:.2e}, largest 1-vs-2 difference {difference:.2e}")
        assert moved > 1e-3, f"{role} barely trained; the comparison would prove nothing"
        assert difference < 2e-5, role
    for a, b in zip(one_stats, two_stats):
        for key in ("reward/mean", "objective/kl", "policy/loss", "policy/clipfrac", "policy/grad_norm",
                    "value/loss", "value/grad_norm", "value/explained_variance", "policy/version"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-5), (key, a[key], b[key])


def test_a_reward_replica_stopped_mid_run_is_routed_around(tiny_dirs, tmp_path):
    work = tmp_path / "failover"
    configs = service_configs(tiny_dirs, work / "checkpoints")
    metrics = {"reward-0": 0, "reward-1": 0}
    with LocalMesh(work, configs, metrics, {"reward": 2}) as mesh:
        asyncio.run(mesh.wait_ready(300))
        stopped, steps, replicas = {}, [], []
        metrics = ControllerMetrics()

        def on_step(result):
            steps.append(result.stats)
            scraped = scrape(metrics.endpoint.url)
            replicas.append({state: value(scraped, "rlhf_replicas", service="reward", state=state)
                             for state in ("serving", "out")})
            if result.step == 0:  # stop one replica between iterations; its channel still looks healthy
                stopped["code"] = mesh.stop_process("reward-1")
                stopped["score_calls"] = handled(mesh, "reward-0", "RewardService", "Score")

        cfg = controller_config(mesh, work, "failover", total_steps=4)
        cfg.server.metrics_port = 0
        try:
            asyncio.run(run_controller(cfg, on_step, metrics))
        finally:
            metrics.close()
        mesh.check_alive()
        after = handled(mesh, "reward-0", "RewardService", "Score")
    assert stopped["code"] == 0 and len(steps) == 4
    assert after >= stopped["score_calls"] + 3  # the remaining replica scored every later batch in full
    assert all(math.isfinite(v) for s in steps for v in s.values())
    assert replicas[0] == {"serving": 2, "out": 0} and replicas[-1] == {"serving": 1, "out": 1}


@pytest.fixture(scope="module")
def group(tiny_dirs, tmp_path_factory):
    work = tmp_path_factory.mktemp("group")
    configs = {"policy": service_configs(tiny_dirs, work / "checkpoints")["policy"]}
    with LocalMesh(work, configs, replicas={"policy": 2}) as mesh:
        asyncio.run(mesh.wait_ready(300))
        yield mesh


def rank_stubs(mesh: LocalMesh):
    return [policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(a)) for a in mesh.endpoints["policy"].split(",")]


def test_ranks_report_their_place_in_the_group_and_rank_0_saves(group):
    stubs = rank_stubs(group)
    infos = [stub.Info(common_pb2.InfoRequest(), timeout=30) for stub in stubs]
    assert [(i.data_parallel_rank, i.data_parallel_size) for i in infos] == [(0, 2), (1, 2)]
    with pytest.raises(grpc.RpcError) as refused:
        stubs[1].SaveCheckpoint(common_pb2.SaveCheckpointRequest(path="by-rank-1"), timeout=60)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "rank 0" in refused.value.details()
    saved = stubs[0].SaveCheckpoint(common_pb2.SaveCheckpointRequest(path="by-rank-0"), timeout=60)
    assert "model.safetensors" in saved.files


def shard_request(stub, seed: int, step: int) -> policy_pb2.PolicyTrainRequest:
    """A PPO Train shard on freshly sampled responses of `stub`."""
    reply = stub.Generate(text_generate(synthetic.train_prompts(3, seed=seed), max_new_tokens=6, seed=seed), timeout=60)
    logprobs = rows(reply.response_logprobs)
    advantages = [torch.linspace(-1, 1, len(lp)) for lp in logprobs]
    return ppo_train(sequences_from_generation(reply), logprobs, advantages, step=step, run_id="group")


def outcome(future) -> grpc.StatusCode:
    try:
        future.result()
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


def test_a_rank_with_a_bad_shard_fails_the_step_on_every_rank(group):
    stubs = rank_stubs(group)
    good, bad = shard_request(stubs[0], 1, 0), shard_request(stubs[1], 2, 0)
    bad.ppo.clip_range = -1.0
    futures = [stubs[0].Train.future(good, timeout=120), stubs[1].Train.future(bad, timeout=120)]
    assert [outcome(f) for f in futures] == [grpc.StatusCode.ABORTED, grpc.StatusCode.INVALID_ARGUMENT]
    # The group is still in step: a valid step sent to both ranks applies on both, as one version.
    requests = [shard_request(stubs[0], 3, 1), shard_request(stubs[1], 4, 1)]
    replies = [f.result() for f in [s.Train.future(r, timeout=120) for s, r in zip(stubs, requests)]]
    assert [r.model_version for r in replies] == [1, 1]
    assert replies[0].grad_norm == pytest.approx(replies[1].grad_norm)


def test_a_group_drains_with_exit_code_0(group):
    assert group.stop(timeout=60) == {"policy-0": 0, "policy-1": 0}


def test_a_rank_left_waiting_exits_and_takes_the_group_down(tiny_dirs, tmp_path):
    # A Train sent to one rank only (a lost controller, a hostile client) cannot
    # complete; after collective_timeout_seconds both ranks exit (70) so that the
    # StatefulSet restarts the group, instead of hanging with diverging weights.
    configs = {"policy": service_configs(tiny_dirs, tmp_path / "checkpoints")["policy"]}
    configs["policy"]["training"]["collective_timeout_seconds"] = 5
    with LocalMesh(tmp_path / "lone", configs, replicas={"policy": 2}) as mesh:
        asyncio.run(mesh.wait_ready(300))
        stubs = rank_stubs(mesh)
        lone = stubs[0].Train.future(shard_request(stubs[0], 5, 0), timeout=120)
        assert outcome(lone) == grpc.StatusCode.UNAVAILABLE
        codes = [mesh.processes[name].wait(60) for name in ("policy-0", "policy-1")]
        assert codes == [70, 70]
        assert "data-parallel group lost" in (mesh.workdir / "policy-1.log").read_text()


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_uneven_shards_make_the_step_one_process_makes(tiny_dirs, tmp_path, zero_stage):
    # 3 rows on rank 0 and 1 on rank 1 (micro-batches of 1: rank 1 runs two idle micro-steps)
    # must move the weights exactly as one process training on all 4 rows.
    config = service_configs(tiny_dirs, tmp_path / "checkpoints")["policy"]
    config["training"] = {"learning_rate": 5e-3, "micro_batch_size": 1, "zero_stage": zero_stage}
    with LocalMesh(tmp_path / "one", {"policy": config}) as one, \
            LocalMesh(tmp_path / "two", {"policy": config}, replicas={"policy": 2}) as two:
        asyncio.run(one.wait_ready(300))
        asyncio.run(two.wait_ready(300))
        single, ranks = rank_stubs(one)[0], rank_stubs(two)
        whole = shard_request(single, 11, 0)
        seqs = sequences_from_generation(single.Generate(
            text_generate(synthetic.train_prompts(3, seed=11), max_new_tokens=6, seed=11), timeout=60))
        parts = []
        for index in ([0, 1, 2], [2]):  # rows 0-2 of `whole` on rank 0, row 2 again as rank 1's single row
            part = policy_pb2.PolicyTrainRequest()
            part.CopyFrom(whole)
            part.ppo.CopyFrom(select_rows(whole.ppo, index))
            parts.append(part)
        whole.ppo.CopyFrom(select_rows(whole.ppo, [0, 1, 2, 2]))
        alone = single.Train(whole, timeout=120)
        together = [f.result() for f in [s.Train.future(p, timeout=120) for s, p in zip(ranks, parts)]]
        probe = common_pb2.LogProbsRequest(sequences=seqs.to_pb(), temperature=1.0)
        after = [rows(stub.LogProbs(probe, timeout=60).logprobs) for stub in (single, *ranks)]
    assert together[0].grad_norm == pytest.approx(alone.grad_norm, rel=1e-4)
    assert together[0].policy_loss + together[1].policy_loss == pytest.approx(alone.policy_loss, rel=1e-4, abs=1e-6)
    assert together[0].tokens + together[1].tokens == alone.tokens
    for other in after[1:]:
        for a, b in zip(after[0], other):
            assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def select_rows(objective: policy_pb2.PPOObjective, index: list[int]) -> policy_pb2.PPOObjective:
    """The PPO objective restricted to rows `index` (repeats allowed)."""
    seqs = Sequences(codec.ragged_from_pb(objective.sequences.tokens, "t"), list(objective.sequences.prompt_lengths))
    old = codec.ragged_from_pb(objective.old_logprobs, "o")
    adv = codec.ragged_from_pb(objective.advantages, "a")
    return policy_pb2.PPOObjective(
        sequences=seqs.select(index).to_pb(), old_logprobs=float_rows([old[i] for i in index]),
        advantages=float_rows([adv[i] for i in index]), clip_range=objective.clip_range,
        temperature=objective.temperature)


def run_dpo(tiny_dirs, tmp_path, name: str, replicas: dict[str, int]) -> dict:
    work = tmp_path / name
    configs = {r: c for r, c in service_configs(tiny_dirs, work / "checkpoints").items() if r in ("policy", "reference")}
    configs["reference"]["model"]["path"] = configs["policy"]["model"]["path"]
    work.mkdir(parents=True)
    pairs = write_pairs(work / "pairs.jsonl", synthetic.preference_pairs(40, seed=5))
    with LocalMesh(work / "services", configs, replicas=replicas) as mesh:
        asyncio.run(mesh.wait_ready(300))
        cfg = ControllerConfig.model_validate({
            "algorithm": "dpo", "run_id": "dpo", "seed": 3, "services": mesh.endpoints, "data": {"pairs": str(pairs)},
            "server": {"host": "127.0.0.1", "port": 0, "metrics_port": -1}, "output_dir": str(work / "run"),
            "dpo": {"total_steps": 3, "batch_size": 5, "beta": 0.1},
        })
        asyncio.run(run_controller(cfg))
    return saved_weights(work / "checkpoints" / "policy" / "final")


def test_dpo_on_a_two_rank_policy_trains_like_one_process(tiny_dirs, tmp_path):
    one = run_dpo(tiny_dirs, tmp_path, "one", {})
    two = run_dpo(tiny_dirs, tmp_path, "two", {"policy": 2})  # 5 pairs per step: 3 on rank 0, 2 on rank 1
    initial = saved_weights(tiny_dirs["lm"])
    assert max_difference({k: one[k] for k in initial}, initial) > 1e-3
    assert max_difference(one, two) < 2e-5
