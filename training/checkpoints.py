"""Saving the models of steps 1 and 2, and resumable trainer checkpoints.

A checkpoint is a directory OUT/checkpoint-STEP holding:

    config.json, model.safetensors, tokenizer files   `save_pretrained`: loads with `from_pretrained`
    deepspeed/                                        DeepSpeed's `save_checkpoint`: optimizer, LR scheduler
    trainer_state.json                                step, epoch, next batch, the run's settings, eval history
    rng_state.json                                    torch / numpy / python RNG states (dropout), as plain JSON

The data order of an epoch is a function of (seed, epoch) alone, so the state
needs only the position in it; with the RNG states restored, `--resume`
continues exactly as an uninterrupted run would.
"""

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from services import models

CHECKPOINT = re.compile(r"checkpoint-(\d+)")
DEEPSPEED_TAG = "deepspeed"  # DeepSpeed's sub-directory inside a checkpoint
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng_state.json"


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run (missing, or made with other settings)."""


@dataclass
class TrainerState:
    """Where a run is: optimizer steps taken and the next batch of the epoch's order."""

    step: int = 0  # optimizer steps applied
    epoch: int = 0  # current epoch, 0-based
    batch: int = 0  # index of the next batch within the epoch
    run: dict = field(default_factory=dict)  # settings that must match to resume (data size, batch, seed...)
    history: list[dict] = field(default_factory=list)  # eval results, one dict per evaluation


# ---- loading ----------------------------------------------------------------------------------

def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """`services.models.load_tokenizer`, refusing a tokenizer with no eos (or sep) to end examples with."""
    tokenizer = models.load_tokenizer(str(path))
    if tokenizer.eos_token is None:
        raise ValueError(f"{path}: the tokenizer has neither an eos nor a sep token to end sequences with")
    return tokenizer


# ---- saving -------------------------------------------------------------------------------------

def save_model(engine, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """`save_pretrained` of the engine's model (gathered first under ZeRO-3) and the tokenizer."""
    import deepspeed

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        module.save_pretrained(str(out_dir))  # a no-op gather below ZeRO-3
    tokenizer.save_pretrained(str(out_dir))


def save_checkpoint(engine, tokenizer: PreTrainedTokenizerBase, state: TrainerState,
                    out_dir: str | Path) -> Path:
    """Write OUT/checkpoint-STEP (see the module docstring) and return its path."""
    path = Path(out_dir) / f"checkpoint-{state.step}"
    path.mkdir(parents=True, exist_ok=True)
    save_model(engine, tokenizer, path)
    engine.save_checkpoint(str(path), tag=DEEPSPEED_TAG, save_latest=False)
    (path / RNG_FILE).write_text(json.dumps(rng_states()))
    (path / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    return path


# ---- resuming -----------------------------------------------------------------------------------

def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint-STEP under out_dir with the highest STEP, or None."""
    found = []
    for path in Path(out_dir).glob("checkpoint-*"):
        match = CHECKPOINT.fullmatch(path.name)
        if match and (path / STATE_FILE).is_file():  # no state file: interrupted while saving
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def restore_checkpoint(engine, path: Path, run: dict) -> TrainerState:
    """Load weights, optimizer and scheduler into the engine and the RNG states; return the state.

    Raises ResumeError when the checkpoint was made with other run settings,
    since the data order and the LR schedule would then differ.
    """
    state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
    changed = [f"{key} {state.run.get(key)!r} -> {value!r}" for key, value in run.items()
               if state.run.get(key) != value]
    if changed:
        raise ResumeError(f"{path} was made with other settings ({', '.join(changed)}); "
                          "resume with the same data and arguments, or start a new --out")
    loaded, _ = engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise ResumeError(f"{path}: DeepSpeed could not load {path / DEEPSPEED_TAG}")
    try:
        set_rng_states(json.loads((path / RNG_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ResumeError(f"{path / RNG_FILE}: not a readable RNG state ({error})") from None
    return state


def rng_states() -> dict:
    """The torch, CUDA, numpy and python RNG states as JSON-ready data (no pickle to load back)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {"torch": torch.get_rng_state().tolist(),
              "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
              "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        states["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return states


def set_rng_states(states: dict) -> None:
    """Put back what rng_states() returned."""
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in states["cuda"]])
