"""Rule-based rewards: a Python function served behind the RewardService contract (`backend: python`).

The function is `package.module:function`, called as function(prompt,
response, **kwargs) -> float, or with `batched` as function(prompts,
responses, **kwargs) -> list of floats. It runs on its own threads: a
request whose rows take longer than `timeout_seconds` is DEADLINE_EXCEEDED
(the call keeps running on its thread; the service keeps serving), and one
that raises or returns anything but finite numbers is INTERNAL naming the
exception type or the row.
"""

from __future__ import annotations

import asyncio
import importlib
import math
from concurrent.futures import ThreadPoolExecutor
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
    """Scores (prompt, response) rows with the configured function, off the event loop, within the timeout."""

    def __init__(self, cfg: PythonRewardConfig):
        self.cfg = cfg
        self.function = load_function(cfg.function)
        self.pool = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="reward-rule")

    def _call(self, prompts: list[str], responses: list[str]) -> list[float]:
        try:
            if self.cfg.batched:
                scores = list(self.function(prompts, responses, **self.cfg.kwargs))
            else:
                scores = [self.function(p, r, **self.cfg.kwargs) for p, r in zip(prompts, responses)]
        except Exception as error:  # noqa: BLE001 - the user's function: any failure is this request's
            raise RuleFailed(f"{self.cfg.function} raised {type(error).__name__}: {error}") from error
        if len(scores) != len(prompts):
            raise RuleFailed(f"{self.cfg.function} returned {len(scores)} scores for {len(prompts)} rows")
        out = []
        for i, score in enumerate(scores):
            try:
                value = float(score)
            except (TypeError, ValueError):
                raise RuleFailed(f"{self.cfg.function} returned {score!r} for row {i}: not a number") from None
            if not math.isfinite(value):
                raise RuleFailed(f"{self.cfg.function} returned {value} for row {i}: not finite")
            out.append(value)
        return out

    async def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One score per row; TooSlow past timeout_seconds, RuleFailed when the function fails."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self.pool, self._call, prompts, responses),
                                          self.cfg.timeout_seconds)
        except TimeoutError:
            raise TooSlow(f"{self.cfg.function} took longer than python.timeout_seconds="
                          f"{self.cfg.timeout_seconds:g} s for {len(prompts)} rows") from None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
