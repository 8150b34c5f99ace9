"""The pieces that make a run durable: the training-state codec, the applied-key record, run checkpoints,
the stats log, restart detection and the resume decision."""

import asyncio
import json
import types

import pytest
import torch

from controller.config import ControllerConfig
from controller.driver import resume_point
from controller.durability import (
    InstanceWatch,
    ResumeRefused,
    RunDirectory,
    ServiceRestarted,
    decode_generator,
    encode_generator,
)
from rlhf.v1 import policy_pb2
from services import training_state
from services.errors import Refused
from services.idempotency import AppliedSteps


def test_an_optimizer_state_tree_round_trips_through_safetensors_and_json(tmp_path):
    live_object = types.SimpleNamespace(cur_scale=1.0)  # like DeepSpeed's loss scaler: configuration, not state
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
             "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.95), "foreach": None, "params": [0]}],
             "loss_scaler": live_object, "flat": [torch.arange(4)]}
    files = training_state.save_rank_state(tmp_path, state, {"version": 7, "rng": torch.get_rng_state()})
    assert files == ["optimizer.safetensors", "state.json"]
    assert b"pickle" not in (tmp_path / "state.json").read_bytes()
    loaded, extra = training_state.load_rank_state(tmp_path, {**state, "loss_scaler": live_object})
    assert loaded["state"][0]["step"] == 3.0 and torch.equal(loaded["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert list(loaded["state"]) == [0]  # integer keys stay integers
    assert loaded["param_groups"][0]["betas"] == (0.9, 0.95) and loaded["param_groups"][0]["foreach"] is None
    assert loaded["loss_scaler"] is live_object and torch.equal(loaded["flat"][0], torch.arange(4))
    assert extra["version"] == 7 and torch.equal(extra["rng"], torch.get_rng_state())
    with pytest.raises(ValueError, match="another optimizer or ZeRO stage"):
        training_state.load_rank_state(tmp_path, {**state, "loss_scaler": 1.0})


def test_a_state_directory_without_its_manifest_is_incomplete(tmp_path):
    assert training_state.read_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text("{truncated")
    assert training_state.read_manifest(tmp_path) is None
    training_state.write_manifest(tmp_path, {"role": "policy"})
    assert training_state.read_manifest(tmp_path)["role"] == "policy"
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary name is gone after the rename


def reply(version: int) -> policy_pb2.PolicyTrainResponse:
    return policy_pb2.PolicyTrainResponse(model_version=version)


def test_a_key_below_the_runs_mark_is_never_applied_again_whatever_the_cache_size():
    async def run():
        applied, calls = AppliedSteps(capacity=2), []

        async def step():
            calls.append(1)
            return reply(len(calls))

        for mb in range(4):
            await applied.run(("r", 0, mb), step)
        assert (await applied.run(("r", 0, 3), step)) == (reply(4), True)  # kept: replayed
        with pytest.raises(Refused, match="not applied again"):
            await applied.run(("r", 0, 0), step)  # applied, result evicted: refused, not re-applied
        await applied.run(("other-run", 0, 0), step)  # another run has its own mark
        await applied.run(("r", 1, 0), step)  # the next step goes through
        return calls

    assert len(asyncio.run(run())) == 6


def test_the_applied_record_survives_export_and_restore():
    async def run():
        applied = AppliedSteps(capacity=8)
        for mb in range(3):
            await applied.run(("r", 5, mb), lambda mb=mb: asyncio.sleep(0, reply(mb)))
        copy = AppliedSteps(capacity=8)
        copy.restore(json.loads(json.dumps(applied.export())), policy_pb2.PolicyTrainResponse)
        assert (await copy.run(("r", 5, 1), lambda: asyncio.sleep(0, reply(99)))) == (reply(1), True)
        with pytest.raises(Refused):
            await copy.run(("r", 4, 0), lambda: asyncio.sleep(0, reply(99)))
        assert (await copy.run(("r", 6, 0), lambda: asyncio.sleep(0, reply(7)))) == (reply(7), False)

    asyncio.run(run())


def checkpoint(step: int, run_id: str = "r1", algorithm: str = "ppo") -> dict:
    return {"run_id": run_id, "algorithm": algorithm, "step": step, "runner": {}, "stats_size": 0, "services": {}}


def test_run_checkpoints_keep_the_newest_and_the_stats_log_cuts_back(tmp_path):
    files = RunDirectory(str(tmp_path), keep=2)
    assert files.latest() is None
    for step in (0, 2, 4, 10):
        files.write(checkpoint(step))
    assert sorted(p.name for p in files.checkpoints.iterdir()) == ["step-10.json", "step-4.json"]
    assert files.latest()["step"] == 10  # by number, not by name
    files.stats.append({"step": 0})
    size = files.stats.size
    files.stats.append({"step": 1})
    files.stats.truncate(size)
    assert [json.loads(line)["step"] for line in files.stats.path.read_text().splitlines()] == [0]


def config(tmp_path, resume: str, run_id: str | None = None, algorithm: str = "ppo") -> ControllerConfig:
    data = {"prompts": "p"} if algorithm == "ppo" else {"pairs": "p"}
    return ControllerConfig.model_validate({"run_id": run_id, "algorithm": algorithm, "data": data,
                                            "output_dir": str(tmp_path), "checkpoint": {"resume": resume}})


def test_resume_point_refuses_what_would_start_a_run_over_or_mix_two(tmp_path):
    files = RunDirectory(str(tmp_path), keep=3)
    assert resume_point(config(tmp_path, "no"), files) is None
    assert resume_point(config(tmp_path, "auto"), files) is None
    with pytest.raises(ResumeRefused, match="--resume: no complete run checkpoint"):
        resume_point(config(tmp_path, "yes"), files)
    files.write(checkpoint(4))
    with pytest.raises(ResumeRefused, match="holds run 'r1' .*continue it with --resume"):
        resume_point(config(tmp_path, "no"), files)
    assert resume_point(config(tmp_path, "yes"), files)["step"] == 4
    assert resume_point(config(tmp_path, "auto", run_id="r1"), files)["step"] == 4
    with pytest.raises(ResumeRefused, match="not run 'r2'"):
        resume_point(config(tmp_path, "auto", run_id="r2"), files)
    with pytest.raises(ResumeRefused, match="cannot continue as dpo"):
        resume_point(config(tmp_path, "yes", algorithm="dpo"), files)


def test_a_reply_from_a_new_process_or_an_unexpected_version_is_a_restart():
    watch = InstanceWatch()
    info = types.SimpleNamespace
    watch.reset({"policy": [info(instance_id="a"), info(instance_id="b")], "reward": [info(instance_id="x")]},
                {"policy": 4})
    watch.check("policy", policy_pb2.GenerateResponse(instance_id="b"))
    watch.check("reward", policy_pb2.GenerateResponse(instance_id="new"))  # frozen services are not watched
    with pytest.raises(ServiceRestarted, match="policy answered from a new process"):
        watch.check("policy", policy_pb2.GenerateResponse(instance_id="c"))
    watch.check_version("policy", 4)
    with pytest.raises(ServiceRestarted, match="serves model version 0, expected 4"):
        watch.check_version("policy", 0)
    watch.trained("policy", [reply(5)])
    watch.check_version("policy", 5)


def test_a_generator_state_round_trips_as_text():
    generator = torch.Generator().manual_seed(3)
    torch.randperm(10, generator=generator)
    text = encode_generator(generator)
    expected = torch.randperm(10, generator=generator)
    other = torch.Generator()
    decode_generator(other, json.loads(json.dumps(text)))
    assert torch.equal(torch.randperm(10, generator=other), expected)
