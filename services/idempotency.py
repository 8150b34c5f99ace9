"""At-most-once Train steps keyed by (run id, step, minibatch index)."""

import asyncio
import collections
from typing import Awaitable, Callable

from rlhf.v1 import common_pb2
from services.errors import InvalidArgument

Key = tuple[str, int, int]


def key_from_pb(pb: common_pb2.TrainKey, field: str = "key") -> Key:
    """Validate a TrainKey: run_id is required, step and minibatch_index >= 0."""
    if not pb.run_id:
        raise InvalidArgument(f"{field}.run_id", "required (idempotency key)")
    if pb.step < 0 or pb.minibatch_index < 0:
        raise InvalidArgument(field, "step and minibatch_index must be >= 0")
    return (pb.run_id, pb.step, pb.minibatch_index)


class AppliedSteps:
    """Remembers the results of applied keys; a repeat gets the stored result.

    A repeat that arrives while the first is still running waits for it. A
    step that failed is forgotten, so it can be retried.
    """

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._done: collections.OrderedDict[Key, object] = collections.OrderedDict()
        self._running: dict[Key, asyncio.Future] = {}

    async def run(self, key: Key, step: Callable[[], Awaitable[object]]) -> tuple[object, bool]:
        """Apply `step` once per key; returns (result, replayed)."""
        if key in self._done:
            return self._done[key], True
        if key in self._running:
            return await asyncio.shield(self._running[key]), True
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
        self._done[key] = result
        while len(self._done) > self._capacity:
            self._done.popitem(last=False)
        return result, False
