"""`rlhf demo --algorithm`: the critic-free demo starts no value service and runs the estimator."""

import pathlib

import pytest

from demo.run import DemoSettings, controller_config, service_configs


@pytest.mark.parametrize("algorithm, roles", [
    ("ppo", {"policy", "reference", "reward", "value"}),
    ("grpo", {"policy", "reference", "reward"}),
    ("rloo", {"policy", "reference", "reward"}),
    ("reinforce_pp", {"policy", "reference", "reward"}),
])
def test_each_algorithm_starts_only_the_services_it_needs(algorithm, roles, tmp_path):
    s = DemoSettings(algorithm=algorithm)
    paths = {"sft": pathlib.Path("sft"), "rm": pathlib.Path("rm")}
    configs = service_configs(paths, tmp_path, s, 0)
    assert set(configs) == roles
    cfg = controller_config({r: f"127.0.0.1:{5000 + i}" for i, r in enumerate(configs)}, tmp_path, s, 0)
    assert cfg.algorithm == algorithm and set(cfg.roles()) == roles
