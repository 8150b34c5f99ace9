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
import hashlib
import hmac
import re
import time
from typing import Awaitable, Callable

from rlhf.v1 import common_pb2
from services.errors import InvalidArgument, Refused

Key = tuple[str, int, int]


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_id(run_id: str, field: str) -> str:
    """A run id names a directory of checkpoints: 1-128 letters, digits, '.', '_' or '-', not starting with '.'."""
    if not run_id:
        raise InvalidArgument(field, "required")
    if not RUN_ID.fullmatch(run_id):
        raise InvalidArgument(field, f"{run_id[:40]!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a "
                              "letter or digit")
    return run_id


def key_from_pb(pb: common_pb2.TrainKey, field: str = "key") -> Key:
    """Validate a TrainKey: run_id is required, step and minibatch_index >= 0."""
    check_run_id(pb.run_id, f"{field}.run_id")
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


class TrainerLease:
    """Which run may train this service: the first Train of a run leases it to (run id, SHA-256 of the secret).

    The lease lasts `seconds` after the holder's last call. While it is live,
    Train, LoadCheckpoint and training-state saves of any other run (or with
    the wrong secret) are refused, so no caller can apply steps under another
    run's keys or be answered its replays. It is part of the training state:
    a service that restarts from its run's state is still leased to that run.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self._clock = clock
        self.run_id: str | None = None
        self._digest = b""
        self._expires = 0.0

    def live(self) -> bool:
        """Whether a run holds the lease now."""
        return self.run_id is not None and self._clock() < self._expires

    def holds(self, run_id: str, secret: str) -> bool:
        """Whether (run_id, secret) is the live lease's holder."""
        return self.live() and run_id == self.run_id and hmac.compare_digest(_digest(secret), self._digest)

    def take(self, run_id: str, secret: str, role: str) -> None:
        """Take or renew the lease for (run_id, secret); Refused while another run holds it."""
        if self.live() and not self.holds(run_id, secret):
            left = self._expires - self._clock()
            raise Refused(f"the {role} service is leased to another run for {left:.0f} s more (until its last "
                          f"call is training.lease_seconds={self.seconds:g} s old or it calls Release); "
                          f"run {run_id!r} with this secret may not train it")
        self.run_id, self._digest, self._expires = run_id, _digest(secret), self._clock() + self.seconds

    def release(self, run_id: str, secret: str) -> bool:
        """End the lease if (run_id, secret) holds it; returns whether it did."""
        if not self.holds(run_id, secret):
            return False
        self.run_id, self._digest, self._expires = None, b"", 0.0
        return True

    def export(self) -> dict | None:
        """The holder (run id and secret digest) for the training state; None when free."""
        return {"run_id": self.run_id, "digest": self._digest.hex()} if self.live() else None

    def restore(self, data: dict | None) -> None:
        """Hold the lease a saved state names, for a fresh `seconds`."""
        if data:
            self.run_id, self._digest = data["run_id"], bytes.fromhex(data["digest"])
            self._expires = self._clock() + self.seconds


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()
