"""Rule-based rewards: a Python function served behind the RewardService contract (`backend: python`).

The function is `package.module:function`, called as function(prompt,
response, **kwargs) -> float, or with `batched` as function(prompts,
responses, **kwargs) -> list of floats. Requests are batched like a model's
and the calls run on their own threads: a request whose rows take longer
than `timeout_seconds` is DEADLINE_EXCEEDED (the call keeps running on its
thread; the service keeps serving), and one whose row raises or returns
anything but a finite number is INTERNAL naming the exception type or the
row.
"""

from __future__ import annotations

import asyncio
import importlib
import math
from typing import Callable

from services.config import PythonRewardConfig
from services.errors import RuleFailed, TooSlow


def load_function(spec: str) -> Callable:
    """The callable that `package.module:function` names; ValueError saying what is missing."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"python.function {spec!r}: cannot import {module_name}: {error}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"python.function {spec!r}: {module_name} has no function {name!r}")
    return function


class RuleScorer:
    """Scores (prompt, response) rows with the configured function through a batcher of its own threads.

    Concurrent requests are merged into one batch (a `batched` function sees all their rows at once) and
    batches run side by side on `workers` threads, so one slow call does not hold up the others. A row whose
    call fails fails its own request; with a batched function, a failed call fails the requests of its batch.
    """

    def __init__(self, cfg: PythonRewardConfig):
        self.cfg = cfg
        self.function = load_function(cfg.function)

    def _checked(self, score, row: int) -> float | RuleFailed:
        try:
            value = float(score)
        except (TypeError, ValueError):
            return RuleFailed(f"{self.cfg.function} returned {score!r} for row {row}: not a number")
        if not math.isfinite(value):
            return RuleFailed(f"{self.cfg.function} returned {value} for row {row}: not finite")
        return value

    def _failed(self, error: Exception) -> RuleFailed:
        return RuleFailed(f"{self.cfg.function} raised {type(error).__name__}: {error}")

    def run_rows(self, _key, items: list[tuple[str, str]]) -> list:
        """One float (or the RuleFailed of that row) per (prompt, response) item; runs on a rule thread."""
        if self.cfg.batched:
            try:
                scores = list(self.function([p for p, _ in items], [r for _, r in items], **self.cfg.kwargs))
            except Exception as error:  # noqa: BLE001 - the user's function: any failure is the batch's
                return [self._failed(error)] * len(items)
            if len(scores) != len(items):
                return [RuleFailed(f"{self.cfg.function} returned {len(scores)} scores for {len(items)} rows")
                        ] * len(items)
            return [self._checked(score, i) for i, score in enumerate(scores)]
        out = []
        for i, (prompt, response) in enumerate(items):
            try:
                out.append(self._checked(self.function(prompt, response, **self.cfg.kwargs), i))
            except Exception as error:  # noqa: BLE001 - the user's function: any failure is this row's
                out.append(self._failed(error))
        return out

    def close(self) -> None:
        """Nothing to release: the function runs on the service's threads."""

    async def score(self, batcher, prompts: list[str], responses: list[str], alive) -> list[float]:
        """One score per row through `batcher`; TooSlow past timeout_seconds, RuleFailed for a failed row."""
        try:
            results = await asyncio.wait_for(
                batcher.submit(None, list(zip(prompts, responses)), len(prompts), alive), self.cfg.timeout_seconds)
        except TimeoutError:
            raise TooSlow(f"{self.cfg.function} took longer than python.timeout_seconds="
                          f"{self.cfg.timeout_seconds:g} s for {len(prompts)} rows") from None
        for result in results:
            if isinstance(result, RuleFailed):
                raise result
        return results
