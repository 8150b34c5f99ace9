"""The DeepSpeed training engine of a trainable service (policy, value).

One Train request = one optimizer step: the request's micro-batches each run
forward and backward, gradients accumulate, and the step happens on the last
micro-batch (DeepSpeed's accumulation boundary is set per request, since
requests carry different numbers of micro-batches).

Data parallelism: the policy (or value) may run as W processes that form one
torch.distributed world (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; on
Kubernetes a StatefulSet). The controller sends each rank a shard of every
minibatch at the same time; the ranks agree on the minibatch's normalisers
(`agree`), run the same number of micro-steps, and DeepSpeed all-reduces the
gradients, so the W shards make exactly the optimizer step one process would
make on the whole minibatch.
"""

import datetime
import logging
import math
import os
import pathlib
import sys
import tempfile
import threading
from typing import Callable, Sequence

import torch

from services.config import TrainingConfig
from services.errors import GroupRejected

log = logging.getLogger(__name__)

# loss_fn(engine) -> loss of one micro-batch, already divided by the whole
# minibatch's normaliser so that the micro-batch losses add up to its loss.
MicroLoss = Callable[[torch.nn.Module], torch.Tensor]
AGREE_WIDTH = 8  # numbers one `agree` call sums over the group


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


def init_distributed(device: torch.device, timeout_seconds: float = 600.0) -> None:
    """A one-rank torch.distributed world unless the environment names a group (RANK, WORLD_SIZE, ...)."""
    _deepspeed_env(device.type)
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    import deepspeed

    if torch.distributed.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_seconds)
    if int(os.environ["WORLD_SIZE"]) > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE > 1 needs the group's rendezvous address: set {' and '.join(missing)}")
        log.info("joining data-parallel group as rank %s of %s at %s:%s", os.environ["RANK"],
                 os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    else:
        # Alone: a file store instead of a TCP one, so no port can be taken by another process
        # between choosing it and binding it (and no MPI discovery for the missing MASTER_* variables).
        store = pathlib.Path(tempfile.mkdtemp(prefix="rlhf-dist-")) / "store"
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout, init_method=f"file://{store}",
                                   rank=0, world_size=1, auto_mpi_discovery=False)


def _group_lost(error: BaseException) -> None:
    """A collective failed (a peer died or timed out): the group can no longer agree on steps.

    Exit so that the orchestrator restarts the whole group from its last checkpoint;
    carrying on would let the ranks' weights drift apart.
    """
    log.critical("data-parallel group lost (%s); exiting so the group restarts", error)
    logging.shutdown()
    os._exit(70)


def _watch_rank0(timeout_seconds: float, closing: threading.Event, period: float = 5.0) -> None:
    """On ranks > 0: exit when rank 0 (the rendezvous store's host) is gone.

    A rank that is idle when a peer dies would otherwise notice only at its next
    collective; leaving at once lets the orchestrator restart the whole group.
    """
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                       timeout=datetime.timedelta(seconds=timeout_seconds))
    while not closing.wait(period):
        try:
            store.check(["rlhf/rank0-watch"])
        except Exception as error:  # noqa: BLE001 - any failure means the store (rank 0) is unreachable
            if not closing.is_set():
                _group_lost(error)


def deepspeed_config(cfg: TrainingConfig, dtype: torch.dtype, device: torch.device) -> dict:
    """The DeepSpeed JSON config for one service's optimizer and ZeRO stage.

    On CUDA the optimizer is DeepSpeed's fused Adam, named here; on a CPU it is none: `cpu_adamw` builds it and
    the engine hands it to deepspeed.initialize.
    """
    params = {"lr": cfg.learning_rate, "betas": list(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    return {
        "train_micro_batch_size_per_gpu": 1,  # nominal: each request sets its own boundary
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        **({"optimizer": {"type": "AdamW", "params": params}} if device.type == "cuda" else {}),
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def cpu_adamw(params, cfg: TrainingConfig) -> torch.optim.AdamW:
    """torch's AdamW with its fused CPU kernel, the same update as DeepSpeed's CUDA-only fused Adam.

    DeepSpeed's CPU fallback (torch's foreach AdamW) took 21 ms per step for 3.7M parameters on one thread,
    this kernel 3.7 ms (docs/benchmarks.md).
    """
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=True)


class TrainEngine:
    """Wraps deepspeed.initialize; counts applied steps as the model version."""

    def __init__(self, module: torch.nn.Module, cfg: TrainingConfig, dtype: torch.dtype, device: torch.device):
        init_distributed(device, cfg.collective_timeout_seconds)
        import deepspeed

        trained = [p for p in module.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(
            model=module,
            model_parameters=trained,
            optimizer=None if device.type == "cuda" else cpu_adamw(trained, cfg),
            config=deepspeed_config(cfg, dtype, device),
        )
        self.engine.eval()  # dropout stays off while training (see models._finish)
        self.version = 0
        self.device = device
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        if self.world_size == 1 and self.engine.zero_optimization_stage() == 0:
            self.engine.enable_backward_allreduce = False  # alone, DeepSpeed's all-reduce only copies the gradients
        self.closing = threading.Event()  # set when the service drains: peers leaving is expected then
        if self.world_size > 1 and self.rank > 0:
            threading.Thread(target=_watch_rank0, args=(cfg.collective_timeout_seconds, self.closing), daemon=True,
                             name="rank0-watch").start()

    def _all_reduce(self, values: list[float], op) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        try:
            torch.distributed.all_reduce(t, op=op)
        except Exception as error:  # noqa: BLE001 - any collective failure breaks the group
            _group_lost(error)
        return t.cpu()

    def agree(self, local: Sequence[float], ok: bool = True) -> list[float]:
        """Sum `local` (this shard's counts, at most AGREE_WIDTH) over the group; the first collective of every Train.

        Each rank calls it once per Train request, also when its own shard was
        invalid (ok=False), so that every rank fails the step together
        (GroupRejected) instead of waiting for a rank that will not come.
        """
        if self.world_size == 1:
            return list(local)
        padded = [0.0 if ok else 1.0, *local] + [0.0] * (AGREE_WIDTH - len(local))  # same shape on every rank
        total = self._all_reduce(padded, torch.distributed.ReduceOp.SUM)
        if total[0] > 0:
            raise GroupRejected(f"{int(total[0])} rank(s) of the data-parallel group rejected their shard of this step")
        return total[1 : 1 + len(local)].tolist()

    @property
    def module(self) -> torch.nn.Module:
        """The model itself, for inference."""
        return self.engine.module

    def optimizer_state(self) -> dict:
        """This rank's optimizer state (a torch optimizer's, or DeepSpeed's ZeRO / bf16 optimizer's)."""
        return self.engine.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        """Load what `optimizer_state` returned; the weights must already be in the module."""
        optimizer = self.engine.optimizer
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer.load_state_dict(state)
            return
        # DeepSpeed's optimizers take a list indexed by data-parallel rank. Alone, the fp32 master
        # weights come from the saved state; in a group they are rebuilt from the loaded weights.
        optimizer.load_state_dict([state] * self.world_size, load_optimizer_states=True,
                                  load_from_fp32_weights=self.world_size == 1)

    def _grad_norm(self) -> float | None:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else None

    def _optimizer_skipped(self) -> bool:
        """Whether DeepSpeed's ZeRO optimizer skipped its last step for inf/NaN gradients."""
        return bool(getattr(self.engine.optimizer, "overflow", False))

    def _idle_loss(self, engine) -> torch.Tensor:
        """A zero loss for a rank with fewer micro-batches than the others.

        It runs a real (two-token) forward pass, so that backward reaches the
        parameters in the same order as a real micro-batch: ZeRO-2 reduces
        gradients in buckets filled in that order, and the ranks' buckets must line up.
        """
        ids = torch.zeros((1, 2), dtype=torch.long, device=self.device)
        out = engine(input_ids=ids, attention_mask=torch.ones_like(ids))
        return getattr(out, "logits", out).float().sum() * 0.0

    def step(self, micro_losses: Sequence[MicroLoss]) -> tuple[float, bool]:
        """Forward/backward every micro-batch, then one optimizer step; returns (grad norm, applied).

        Every rank of a group runs as many micro-steps as the rank with the most
        (ZeRO reduces gradients per micro-step), the extra ones with a zero loss.
        Losses are multiplied by the world size because DeepSpeed averages the
        all-reduced gradients while each shard's loss is already divided by the
        whole minibatch's normaliser.

        A step whose loss or gradient norm is not finite (on any rank) is not
        applied: the gradients are dropped and the weights, optimizer state and
        version stay as they were. Without ZeRO this is checked here before the
        optimizer runs; ZeRO 1-2 optimizers check the gradients themselves and
        skip the update.
        """
        micro_losses = list(micro_losses)
        if self.world_size > 1:
            most = int(self._all_reduce([len(micro_losses)], torch.distributed.ReduceOp.MAX)[0])
            micro_losses += [self._idle_loss] * (most - len(micro_losses))
        norm = None
        finite = True
        last = len(micro_losses) - 1
        for i, loss_fn in enumerate(micro_losses):
            self.engine.set_gradient_accumulation_boundary(i == last)
            loss = loss_fn(self.engine) * self.world_size
            finite = finite and bool(torch.isfinite(loss.detach()).all())
            try:
                self.engine.backward(loss, scale_wrt_gas=False)
            except RuntimeError as error:
                if self.world_size == 1:
                    raise
                _group_lost(error)
            if i == last:
                norm = self._grad_norm()  # before clipping; ZeRO keeps grads elsewhere
                finite = finite and (norm is None or math.isfinite(norm))
                if self.world_size > 1:  # every rank skips or none does
                    finite = self._all_reduce([0.0 if finite else 1.0], torch.distributed.ReduceOp.MAX)[0] == 0
                if not finite and self.engine.zero_optimization_stage() == 0:
                    self.engine.zero_grad()
                    return float("nan") if norm is None else norm, False
            self.engine.step()
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if self._optimizer_skipped():
            return norm, False
        self.version += 1
        return norm, True
