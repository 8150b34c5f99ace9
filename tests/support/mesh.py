"""Service configs for LocalMesh runs of the four model services on the tiny models."""

import pathlib

import torch
from safetensors.torch import load_file

ROLES = ("policy", "reference", "reward", "value")


def service_configs(tiny_dirs, checkpoints: pathlib.Path | None = None, grace_seconds: int = 5) -> dict[str, dict]:
    """role -> service config: policy and reference on the tiny LM, reward and value on the tiny RM.

    Policy and value train (lr 5e-4, micro-batches of 4); with `checkpoints`, each role saves under it.
    """
    paths = {"policy": tiny_dirs["lm"], "reference": tiny_dirs["lm"], "reward": tiny_dirs["rm"], "value": tiny_dirs["rm"]}
    configs = {}
    for role, path in paths.items():
        server = {"num_threads": 1, "grace_seconds": grace_seconds}
        if checkpoints is not None:
            server["checkpoint_dir"] = str(checkpoints / role)
        configs[role] = {"model": {"path": str(path)}, "server": server}
        if role in ("policy", "value"):
            configs[role]["training"] = {"learning_rate": 5e-4, "micro_batch_size": 4}
    return configs


def saved_weights(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """The tensors of a model.safetensors file, or of the one in a model directory."""
    path = pathlib.Path(path)
    return load_file(str(path / "model.safetensors" if path.is_dir() else path))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between same-named tensors (over the names of `a`)."""
    return max(float((a[k] - b[k]).abs().max()) for k in a)
