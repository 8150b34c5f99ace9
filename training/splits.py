"""Deterministic splits of loaded records by a hash of their prompt: train/eval, and the phases of steps 1-3.

A record is a prompt string or anything with a `.prompt` (the records of
training/datasets.py). Membership depends on (seed, prompt) only: all records
of one prompt land on the same side, whatever the file order or the other rows.
"""

import hashlib
from typing import Sequence, TypeVar

R = TypeVar("R")


def prompt_of(record) -> str:
    """The prompt a record belongs to (a str record is a prompt)."""
    return record if isinstance(record, str) else record.prompt


def _unit_hash(prompt: str, salt: str, seed: int) -> float:
    """A stable pseudo-uniform number in [0, 1) for a prompt (the same in every process)."""
    digest = hashlib.blake2b(f"{salt}\0{seed}\0{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def train_eval_split(records: Sequence[R], eval_fraction: float, seed: int = 0
                     ) -> tuple[list[R], list[R]]:
    """(train, eval): a record is in eval when the hash of (seed, its prompt) falls below eval_fraction.

    All records of one prompt land on the same side, membership does not depend
    on order or on the other rows, and each side keeps the input order. The
    eval share is eval_fraction of the prompts in expectation, not exactly.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    train, evaluation = [], []
    for record in records:
        side = evaluation if _unit_hash(prompt_of(record), "eval", seed) < eval_fraction else train
        side.append(record)
    return train, evaluation


def parse_fractions(fractions: str | Sequence[float]) -> tuple[float, float, float]:
    """Three phase weights ("2,4,4" or (0.2, 0.4, 0.4)) normalised to sum to 1."""
    parts = fractions.split(",") if isinstance(fractions, str) else list(fractions)
    try:
        weights = [float(part) for part in parts]
    except (TypeError, ValueError):
        raise ValueError(f"phase fractions must be numbers, got {fractions!r}") from None
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"phase fractions must be three non-negative numbers (sft, rm, ppo) "
                         f"with a positive sum, like '2,4,4'; got {fractions!r}")
    total = sum(weights)
    return weights[0] / total, weights[1] / total, weights[2] / total


def phase_split(records: Sequence[R], fractions: str | Sequence[float] = (0.2, 0.4, 0.4),
                seed: int = 0) -> tuple[list[R], list[R], list[R]]:
    """(sft, rm, ppo) disjoint by prompt, like DeepSpeed-Chat's data_split="2,4,4".

    Membership is decided by a hash of (seed, prompt), independent of the one
    train_eval_split uses, so each phase can be split again for eval.
    """
    sft_share, rm_share, _ = parse_fractions(fractions)
    phases: tuple[list[R], list[R], list[R]] = ([], [], [])
    for record in records:
        u = _unit_hash(prompt_of(record), "phase", seed)
        phases[0 if u < sft_share else 1 if u < sft_share + rm_share else 2].append(record)
    return phases
