"""Exactly-once Train steps keyed by (run id, step, minibatch index).

Two records: the results of recently applied keys (answered again to a
retry), and per run the highest (step, minibatch) applied. A key at or below
that mark is never applied again: it is answered from the results when they
still hold it, and refused otherwise, so no cache size can let a late retry
through. Both records are part of the service's training state
(services/training_state.py): they survive a restart that loads it, and go
back with the weights when an older state is loaded.
"""

import asyncio
import base64
import collections
from typing import Awaitable, Callable

from rlhf.v1 import common_pb2
from services.errors import InvalidArgument, Refused

Key = tuple[str, int, int]


def key_from_pb(pb: common_pb2.TrainKey, field: str = "key") -> Key:
    """Validate a TrainKey: run_id is required, step and minibatch_index >= 0."""
    if not pb.run_id:
        raise InvalidArgument(f"{field}.run_id", "required (idempotency key)")
    if pb.step < 0 or pb.minibatch_index < 0:
        raise InvalidArgument(field, "step and minibatch_index must be >= 0")
    return (pb.run_id, pb.step, pb.minibatch_index)


class AppliedSteps:
    """Remembers applied keys; a repeat gets the stored result, a key below the run's mark is never re-applied.

    A repeat that arrives while the first is still running waits for it. A
    step that failed is forgotten, so it can be retried.
    """

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._done: collections.OrderedDict[Key, object] = collections.OrderedDict()
        self._running: dict[Key, asyncio.Future] = {}
        self._last: dict[str, tuple[int, int]] = {}  # run id -> highest (step, minibatch) applied

    async def run(self, key: Key, step: Callable[[], Awaitable[object]]) -> tuple[object, bool]:
        """Apply `step` once per key; returns (result, replayed). Refused: applied before, result gone."""
        if key in self._done:
            return self._done[key], True
        if key in self._running:
            return await asyncio.shield(self._running[key]), True
        run_id, position = key[0], key[1:]
        if run_id in self._last and position <= self._last[run_id]:
            raise Refused(f"Train key (run {run_id!r}, step {key[1]}, minibatch {key[2]}) is at or below the last "
                          f"step this service applied for the run {self._last[run_id]} and its result is no longer "
                          "kept: it is not applied again")
        future = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            result = await step()
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            self._running.pop(key, None)
        future.set_result(result)
        self._remember(key, result)
        return result, False

    def _remember(self, key: Key, result) -> None:
        self._done[key] = result
        self._last[key[0]] = max(self._last.get(key[0], (-1, -1)), key[1:])
        while len(self._done) > self._capacity:
            self._done.popitem(last=False)

    def export(self) -> dict:
        """The record as JSON-ready data: each kept result as its serialized protobuf, and the marks."""
        return {"results": [[list(key), base64.b64encode(result.SerializeToString()).decode()]
                            for key, result in self._done.items()],
                "last": {run: list(mark) for run, mark in self._last.items()}}

    def restore(self, data: dict, message_class) -> None:
        """Replace the record with one `export` wrote; results parse as `message_class`."""
        self._done.clear()
        for key, encoded in data["results"]:
            self._done[(key[0], int(key[1]), int(key[2]))] = message_class.FromString(base64.b64decode(encoded))
        self._last = {run: (int(mark[0]), int(mark[1])) for run, mark in data["last"].items()}
