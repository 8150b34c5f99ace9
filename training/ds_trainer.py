"""A small DeepSpeed training loop shared by `rlhf sft` and `rlhf train-rm`.

One optimizer step = one batch of `batch_size` examples (SFT) or prompts (RM),
run as micro-batches of `micro_batch_size` whose gradients accumulate. Each
micro-batch loss is already divided by the whole batch's normaliser (response
tokens for SFT, comparison pairs for the RM), so the micro-batch gradients add
up exactly to the batch's gradient, as in services/engine.py.

Optimizer: AdamW, betas (0.9, 0.95); schedule: linear warmup, then cosine to
10 % of the peak learning rate (`adamw_with_cosine`). `rlhf sft`, `rlhf
train-rm` and the demo all train through this loop. Checkpoints and
`--resume`: training/checkpoints.py.
"""

import math
import time
from typing import Any, Literal, Protocol, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from services.config import TrainingConfig
from services.engine import deepspeed_config, init_distributed
from training.checkpoints import (
    ResumeError,
    TrainerState,
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)


class TrainerConfig(BaseModel):
    """Optimizer, batching, checkpointing and device of one training run."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(1, ge=1, description="Passes over the training data")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate")
    batch_size: int = Field(32, ge=1, description="Examples (SFT) or prompts (RM) per optimizer step")
    micro_batch_size: int = Field(8, ge=1, description="Examples or prompts per forward/backward pass")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of the steps spent warming up linearly")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate / peak (cosine floor)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 disables")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage")
    save_every: int = Field(0, ge=0, description="Checkpoint every N optimizer steps; 0: final model only")
    eval_every: int = Field(0, ge=0, description="Evaluate every N optimizer steps; 0: at the end only")
    seed: int = Field(0, description="Seed for initialisation, data order and dropout")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when there is one")
    dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="fp32, or bf16 weights and activations with fp32 master weights in the optimizer")
    progress: bool = Field(True, description="Show a progress bar")

    @model_validator(mode="after")
    def _micro_fits_batch(self):
        if self.micro_batch_size > self.batch_size:
            raise ValueError(f"micro batch size {self.micro_batch_size} is larger than batch size {self.batch_size}")
        return self


class Objective(Protocol):
    """What the loop trains: the per-micro-batch loss and the evaluation of one task."""

    name: str  # progress-bar label
    unit: str  # what `weight` counts ("tokens", "pairs")

    def weight(self, item: Any) -> int:
        """This item's share of the batch normaliser (its response tokens or pairs)."""

    def loss(self, engine, items: Sequence[Any], normaliser: int) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss already divided by normaliser, sums of extra statistics such as correct pairs)."""

    def evaluate(self, module: torch.nn.Module) -> dict[str, float]:
        """Metrics on the eval split ({} without one); runs in no_grad and eval mode."""


def resolve_device(name: str) -> torch.device:
    """cpu, cuda, or auto (cuda when there is one)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(name)


def total_steps(n_items: int, cfg: TrainerConfig) -> int:
    """Optimizer steps of the whole run (the last batch of an epoch may be short)."""
    return cfg.epochs * math.ceil(n_items / cfg.batch_size)


def epoch_batches(n_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's shuffled item indices cut into batches: a function of (seed, epoch) only."""
    order = np.random.default_rng([seed, epoch]).permutation(n_items).tolist()
    return [order[i:i + batch_size] for i in range(0, n_items, batch_size)]


def adamw_with_cosine(model: torch.nn.Module, lr: float, total_steps: int, warmup_ratio: float = 0.05,
                      min_lr_ratio: float = 0.1, weight_decay: float = 0.0
                      ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (betas 0.9, 0.95) and a schedule: linear warmup, cosine to min_lr_ratio * lr."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    warmup = max(1, int(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_engine(model: torch.nn.Module, cfg: TrainerConfig, steps: int):
    """deepspeed.initialize with AdamW (0.9, 0.95) and the warmup + cosine schedule."""
    device = resolve_device(cfg.device)
    init_distributed(device)
    import deepspeed

    optimizer, scheduler = adamw_with_cosine(model, cfg.lr, steps, cfg.warmup_ratio, cfg.min_lr_ratio,
                                             cfg.weight_decay)
    engine_cfg = TrainingConfig(learning_rate=cfg.lr, grad_clip=cfg.grad_clip, zero_stage=cfg.zero_stage)
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    ds_config = deepspeed_config(engine_cfg, dtype, device)  # bf16: DeepSpeed casts the model, keeps fp32 masters
    ds_config.pop("optimizer", None)  # the client optimizer above replaces it, so that the scheduler can wrap it
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_config)
    return engine


def train_step(engine, objective: Objective, items: Sequence[Any], micro_batch_size: int) -> dict[str, float]:
    """One optimizer step over `items`; returns the batch loss and the mean of extra statistics."""
    normaliser = max(1, sum(objective.weight(item) for item in items))
    chunks = [items[i:i + micro_batch_size] for i in range(0, len(items), micro_batch_size)]
    loss_sum, sums = 0.0, {}
    for i, chunk in enumerate(chunks):
        engine.set_gradient_accumulation_boundary(i == len(chunks) - 1)
        loss, extra = objective.loss(engine, chunk, normaliser)
        engine.backward(loss, scale_wrt_gas=False)  # the loss is already normalised
        engine.step()  # the optimizer steps on the boundary only
        loss_sum += float(loss.detach())
        for key, value in extra.items():
            sums[key] = sums.get(key, 0.0) + value
    return {"loss": loss_sum, **{key: value / normaliser for key, value in sums.items()},
            objective.unit: normaliser}


def run_signature(n_items: int, cfg: TrainerConfig) -> dict:
    """The settings a checkpoint must share with a run to resume it exactly."""
    return {"items": n_items, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "warmup_ratio": cfg.warmup_ratio, "min_lr_ratio": cfg.min_lr_ratio, "seed": cfg.seed,
            "zero_stage": cfg.zero_stage, "dtype": cfg.dtype}


def resume_point(out_dir, resume: bool):
    """The checkpoint to resume from (None: start fresh); checked before any model is loaded.

    Raises ResumeError for --resume without a checkpoint, and for a fresh run
    into an out_dir that already holds checkpoints (they would be mixed up).
    """
    checkpoint = latest_checkpoint(out_dir)
    if resume and checkpoint is None:
        raise ResumeError(f"--resume: no checkpoint-STEP directory under {out_dir}")
    if not resume and checkpoint is not None:
        raise ResumeError(f"{out_dir} already holds {checkpoint.name}; pass --resume to continue "
                          "that run, or choose another --out")
    return checkpoint


def fit(engine, objective: Objective, items: Sequence[Any], cfg: TrainerConfig, tokenizer, out_dir,
        state: TrainerState) -> dict:
    """Train from `state` to the end; evaluate and checkpoint on schedule. Returns a summary."""
    steps = total_steps(len(items), cfg)
    recent: list[dict] = []
    train_seconds, done = 0.0, 0
    engine.train()
    with tqdm(total=steps, initial=state.step, desc=objective.name, disable=not cfg.progress) as bar:
        while state.epoch < cfg.epochs:
            batches = epoch_batches(len(items), cfg.batch_size, cfg.seed, state.epoch)
            for index in range(state.batch, len(batches)):
                start = time.perf_counter()
                stats = train_step(engine, objective, [items[i] for i in batches[index]], cfg.micro_batch_size)
                train_seconds += time.perf_counter() - start
                done += stats[objective.unit]
                state.step, state.batch = state.step + 1, index + 1
                recent = (recent + [stats])[-max(1, steps // 10):]
                bar.update(1)
                bar.set_postfix(_postfix(stats, engine))
                _on_schedule(engine, objective, cfg, tokenizer, out_dir, state, steps, bar)
            state.epoch, state.batch = state.epoch + 1, 0
    if not state.history or state.history[-1]["step"] != state.step:
        _evaluate(engine, objective, state, steps, tqdm.write)
    train = {key: sum(s[key] for s in recent) / len(recent) for key in recent[0]} if recent else {}
    return {"steps": state.step, "train": train, "eval": state.history[-1] if state.history else {},
            "history": state.history, "train_seconds": train_seconds, objective.unit: done,
            f"{objective.unit}_per_s": done / train_seconds if train_seconds else float("nan")}


def format_metrics(metrics: dict) -> str:
    """'name value' pairs for a log line: floats to 4 decimals, counts as integers."""
    return " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def _postfix(stats: dict[str, float], engine) -> dict[str, str]:
    shown = {key: f"{value:.3f}" for key, value in stats.items() if isinstance(value, float)}
    return {**shown, "lr": f"{engine.get_lr()[0]:.2e}"}


def _on_schedule(engine, objective, cfg: TrainerConfig, tokenizer, out_dir, state: TrainerState,
                 steps: int, bar) -> None:
    """Evaluate every eval_every steps and checkpoint every save_every steps."""
    if cfg.eval_every and state.step % cfg.eval_every == 0:
        _evaluate(engine, objective, state, steps, bar.write)
    if cfg.save_every and state.step % cfg.save_every == 0:
        # at an epoch's end the state reads (epoch, batch = len(batches)): resuming skips to the next epoch
        path = save_checkpoint(engine, tokenizer, state, out_dir)
        bar.write(f"step {state.step}/{steps}: saved {path}")


def _evaluate(engine, objective: Objective, state: TrainerState, steps: int, write) -> None:
    """Run the objective's evaluation, record it in the history and print one line."""
    metrics = objective.evaluate(engine.module)
    engine.train()
    if metrics:
        state.history.append({"step": state.step, **metrics})
        write(f"step {state.step}/{steps}: " + format_metrics(metrics))


def train(model: torch.nn.Module, tokenizer, objective: Objective, items: Sequence[Any], cfg: TrainerConfig,
          out_dir, resume: bool = False) -> tuple[Any, dict]:
    """Build the engine, start or resume, and fit. Returns (engine, summary); the caller saves the model."""
    if not items:
        raise ValueError("no training examples")
    checkpoint = resume_point(out_dir, resume)
    engine = build_engine(model, cfg, total_steps(len(items), cfg))
    run = run_signature(len(items), cfg)
    state = restore_checkpoint(engine, checkpoint, run) if checkpoint else TrainerState(run=run)
    return engine, fit(engine, objective, items, cfg, tokenizer, out_dir, state)
