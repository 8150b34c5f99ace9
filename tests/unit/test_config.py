"""Config validation, the tokenizer check, and CLI errors as one-line messages."""

import pytest

from controller.clients import TokenizerMismatch, check_shared_tokenizer
from rlhf.v1 import common_pb2
from services.config import ConfigError, load_service_config
from tests.support import ROOT


def test_service_config_errors_name_the_file_and_field(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("model:\n  path: x\nbatching:\n  max_batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"policy.yaml: batching.max_batch_size"):
        load_service_config(path, "policy")
    path.write_text("model: {path: x}\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_service_config(path, "policy")
    path.write_text("role: reward\nmodel: {path: x}\n")
    with pytest.raises(ConfigError, match="serves 'policy'"):
        load_service_config(path, "policy")
    with pytest.raises(ConfigError, match="No such file"):
        load_service_config(tmp_path / "missing.yaml", "policy")


def test_default_ports_follow_the_design():
    cfg = load_service_config.__globals__["ServiceConfig"].model_validate({"role": "reward", "model": {"path": "x"}})
    assert cfg.grpc_port() == 50053


def info(fingerprint):
    return common_pb2.ModelInfo(tokenizer_fingerprint=fingerprint)


def test_tokenizer_mismatch_names_the_disagreeing_services():
    check_shared_tokenizer({"policy": [info("a" * 64)] * 2, "reference": [info("a" * 64)], "value": [info("a" * 64)]})
    with pytest.raises(TokenizerMismatch, match="value use tokenizer bbbb") as caught:
        check_shared_tokenizer({"policy": [info("a" * 64)], "reference": [info("a" * 64)], "value": [info("b" * 64)]})
    assert "policy and reference use tokenizer aaaa" in str(caught.value)
    with pytest.raises(TokenizerMismatch, match="reference use tokenizer cccc"):  # one replica of two differs
        check_shared_tokenizer({"policy": [info("a" * 64)], "reference": [info("a" * 64), info("c" * 64)]})


def test_example_configs_in_the_readme_validate():
    from controller.config import load_controller_config

    root = ROOT / "configs"
    for role in ("policy", "reference", "reward", "value"):
        assert load_service_config(root / f"{role}.yaml", role).role == role
    assert load_controller_config(root / "controller.yaml").ppo.total_steps == 500
