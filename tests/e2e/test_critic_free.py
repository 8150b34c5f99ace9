"""GRPO through policy, reference and a rule-based reward process, with no value service at all."""

import asyncio
import json
import math

import pytest
import torch

from controller.config import ControllerConfig
from controller.service import run_controller
from services.launcher import LocalMesh
from tests.support.data import write_prompts
from tests.support.mesh import saved_weights, service_configs
from training import synthetic


@pytest.mark.parametrize("loss", [{}, {"kl_in_loss": True, "loss_aggregation": "sequence"}])
def test_grpo_trains_the_policy_on_a_rule_without_a_value_service(tiny_dirs, tmp_path, loss):
    configs = {role: cfg for role, cfg in service_configs(tiny_dirs, tmp_path / "checkpoints").items()
               if role in ("policy", "reference")}
    configs["reward"] = {"backend": "python", "python": {"function": "demo.rules:tidy_answer"}}
    prompts = write_prompts(tmp_path / "prompts.jsonl", synthetic.train_prompts(64, seed=5))
    second = {"reward": {"backend": "python", "python": {"function": "tests.support.rules:length_score",
                                                         "kwargs": {"scale": 0.01}}}}
    with LocalMesh(tmp_path / "services", configs) as mesh, LocalMesh(tmp_path / "length", second) as lengths:
        rewards = [{"name": "tidy", "target": mesh.endpoints["reward"], "weight": 1.0},
                   {"name": "length", "target": lengths.endpoints["reward"], "weight": 0.5}]
        cfg = ControllerConfig.model_validate({
            "algorithm": "grpo", "run_id": "grpo-e2e", "services": mesh.endpoints, "rewards": rewards,
            "data": {"prompts": str(prompts)}, "server": {"host": "127.0.0.1", "port": 0},
            "output_dir": str(tmp_path / "run"), "save_checkpoint": "final",
            "ppo": {"total_steps": 3, "batch_size": 16, "minibatch_size": 8, "ppo_epochs": 1, "max_new_tokens": 8},
            "critic_free": {"samples_per_prompt": 4, **loss}})

        async def run():
            await mesh.wait_ready(300)
            await lengths.wait_ready(300)
            return await run_controller(cfg)

        runner = asyncio.run(run())
        mesh.check_alive()
    lines = [json.loads(x) for x in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and runner.policy_version == 3 * 2  # 2 minibatches per iteration, 1 epoch
    for line in lines:
        assert all(math.isfinite(v) for v in line.values() if isinstance(v, float)), line
        assert "value/loss" not in line and 0 <= line["group/zero_variance_fraction"] <= 1
        # two sources, weighted: the row rewards' mean is the weighted sum of the sources' means
        assert line["reward/mean"] == pytest.approx(line["reward/tidy/mean"] + 0.5 * line["reward/length/mean"],
                                                    rel=1e-5)
        assert line["reward/length/mean"] > 0
        if loss:  # the KL is a loss term: zero at the first step only, where the policy is the reference
            assert line["policy/kl_loss"] > 0 or line["step"] == 0
        else:
            assert line["policy/kl_loss"] == 0
    before = saved_weights(tiny_dirs["lm"])
    after = saved_weights(tmp_path / "checkpoints" / "policy" / "final")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "reinforce_pp"])
def test_a_critic_free_run_needs_no_value_service(algorithm):
    cfg = ControllerConfig.model_validate({"algorithm": algorithm, "data": {"prompts": "p.jsonl"},
                                           "ppo": {"batch_size": 8, "minibatch_size": 8}, "critic_free": {"samples_per_prompt": 2}})
    assert cfg.roles() == ("policy", "reference", "reward")


def test_reward_sources_are_named_weighted_and_distinct():
    base = {"data": {"prompts": "p.jsonl"}}
    assert ControllerConfig.model_validate(base).reward_sources() == [("reward", "127.0.0.1:50053", 1.0, "reward")]
    rewards = [{"name": "rm", "target": "a:1"}, {"name": "rule", "target": "b:2", "weight": 0.3}]
    cfg = ControllerConfig.model_validate(base | {"rewards": rewards})
    assert cfg.reward_sources() == [("reward", "a:1", 1.0, "rm"), ("reward:rule", "b:2", 0.3, "rule")]
    with pytest.raises(ValueError, match="names must differ"):
        ControllerConfig.model_validate(base | {"rewards": [rewards[0], rewards[0]]})

