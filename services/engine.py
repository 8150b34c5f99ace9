"""The DeepSpeed training engine of a trainable service (policy, value).

One Train request = one optimizer step: the request's micro-batches each run
forward and backward, gradients accumulate, and the step happens on the last
micro-batch (DeepSpeed's accumulation boundary is set per request, since
requests carry different numbers of micro-batches).
"""

import logging
import os
import pathlib
import socket
import sys
from typing import Callable, Sequence

import torch

from services.config import TrainingConfig

log = logging.getLogger(__name__)

# loss_fn(engine) -> loss of one micro-batch, already divided by the whole
# minibatch's normaliser so that the micro-batch losses add up to its loss.
MicroLoss = Callable[[torch.nn.Module], torch.Tensor]


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_env(device_type: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device_type == "cuda" else "cpu")
    # DeepSpeed JIT-builds its CPU comm op; keep the build with this environment.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(pathlib.Path(sys.prefix) / "torch_extensions"))


def build_cpu_ops() -> None:
    """Build DeepSpeed's CPU communication op ahead of time (make install does), so services start fast."""
    if torch.cuda.is_available():
        return
    _deepspeed_env("cpu")
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def _init_distributed(device: torch.device) -> None:
    """A one-rank torch.distributed world unless the launcher set one up."""
    _deepspeed_env(device.type)
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def deepspeed_config(cfg: TrainingConfig, dtype: torch.dtype, device: torch.device) -> dict:
    """The DeepSpeed JSON config for one service's optimizer and ZeRO stage."""
    params = {"lr": cfg.learning_rate, "betas": list(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if device.type != "cuda":
        params["torch_adam"] = True  # fused CUDA Adam does not exist on CPU
    return {
        "train_micro_batch_size_per_gpu": 1,  # nominal: each request sets its own boundary
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {"type": "AdamW", "params": params},
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


class TrainEngine:
    """Wraps deepspeed.initialize; counts applied steps as the model version."""

    def __init__(self, module: torch.nn.Module, cfg: TrainingConfig, dtype: torch.dtype, device: torch.device):
        _init_distributed(device)
        import deepspeed

        self.engine, *_ = deepspeed.initialize(
            model=module,
            model_parameters=[p for p in module.parameters() if p.requires_grad],
            config=deepspeed_config(cfg, dtype, device),
        )
        self.engine.eval()  # dropout stays off while training (see models._finish)
        self.version = 0

    @property
    def module(self) -> torch.nn.Module:
        """The model itself, for inference."""
        return self.engine.module

    def _grad_norm(self) -> float | None:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else None

    def step(self, micro_losses: Sequence[MicroLoss]) -> float:
        """Forward/backward every micro-batch, then one optimizer step; returns the grad norm."""
        norm = None
        last = len(micro_losses) - 1
        for i, loss_fn in enumerate(micro_losses):
            self.engine.set_gradient_accumulation_boundary(i == last)
            loss = loss_fn(self.engine)
            self.engine.backward(loss, scale_wrt_gas=False)
            if i == last:
                norm = self._grad_norm()  # before clipping; ZeRO keeps grads elsewhere
            self.engine.step()
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        self.version += 1
        return float(norm) if norm is not None else float("nan")
