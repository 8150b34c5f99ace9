"""Dynamic batching: concurrent requests share one model call.

Requests wait in a bounded queue; one task takes the head, waits up to
max_wait_ms for company, merges requests with the same key while the batch
stays within max_batch_size rows and max_batch_tokens tokens, and runs the
merged batch on the model thread. A full queue is RESOURCE_EXHAUSTED.

Handlers take an `admit()` slot before they decode or tokenise a request:
at most max_queue requests of one batcher are in progress (being decoded,
queued or running), and the one beyond is refused at once, before any work
is spent on it, so that an overloaded service answers refusals in
milliseconds and keeps its throughput.

A request whose call was cancelled or whose deadline passed (`alive()` is
False) is dropped before it runs; while a batch runs, `batch_alive()` tells
the model call whether any of its requests still wants the result, so a long
call (generation) can stop early.
"""

import asyncio
import collections
import contextlib
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from services.config import BatchingConfig
from services.errors import Overloaded

# run(key, items) -> one result per item, executed on the model thread.
RunBatch = Callable[[Hashable, list[Any]], list[Any]]


def _always() -> bool:
    return True


@dataclass
class _Request:
    key: Hashable
    items: list[Any]
    tokens: int
    alive: Callable[[], bool] = _always  # False once the caller gave up (cancelled, deadline passed)
    exact: bool = True  # tokens is the count; False: a guess for grouping, and the run reports the count (on_tokens)
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def call_alive(context) -> Callable[[], bool]:
    """alive() for a grpc.aio call: False once it is cancelled or its deadline has passed."""
    def alive() -> bool:
        remaining = context.time_remaining()
        return not context.cancelled() and (remaining is None or remaining > 0)

    return alive


class Batcher:
    """Merges queued requests into batches and runs them on `executor`."""

    def __init__(self, run: RunBatch, cfg: BatchingConfig, executor: Executor, concurrent: bool = False):
        """concurrent: start the next batch while earlier ones still run (an executor of several threads, whose
        calls may hang: a rule-based reward), instead of one batch at a time (the model thread)."""
        self._run = run
        self._cfg = cfg
        self._executor = executor
        self._queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=cfg.max_queue)
        self._held: collections.deque[_Request] = collections.deque()
        self._task: asyncio.Task | None = None
        self._concurrent = concurrent
        self._running: set[asyncio.Task] = set()
        self.batch_alive: Callable[[], bool] = _always  # whether the running batch is still wanted (model thread)
        self.dropped = 0  # requests dropped unrun because their caller had gone
        self.admitted = 0  # requests holding an admit() slot now
        self.refused = 0  # requests refused by admit() because max_queue were in progress
        self.on_batch: Callable[[int, int], None] | None = None  # (rows, tokens) hook for metrics
        self.on_tokens: Callable[[int], None] | None = None  # tokens of inexact requests, reported by the run
        self.on_result: Callable[[list, float], None] | None = None  # (results, seconds) hook, on the model thread

    def _timed_run(self, key: Hashable, items: list[Any]) -> list[Any]:
        start = time.perf_counter()
        results = self._run(key, items)
        if self.on_result:
            self.on_result(results, time.perf_counter() - start)
        return results

    @contextlib.contextmanager
    def admit(self):
        """A slot for one request, held while it is decoded, queued and run; Overloaded when none is free."""
        if self.admitted >= self._cfg.max_queue:
            self.refused += 1
            raise Overloaded(f"{self.admitted} requests in progress; the queue holds {self._cfg.max_queue} "
                             "(batching.max_queue)")
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    def depth(self) -> int:
        """Requests waiting, not counting the batch running now."""
        return self._queue.qsize() + len(self._held)

    async def submit(self, key: Hashable, items: list[Any], tokens: int,
                     alive: Callable[[], bool] = _always, exact: bool = True) -> list[Any]:
        """Queue `items` (rows of one request) and wait for their results; `alive` see the module docstring.

        exact=False: `tokens` is only an estimate (texts not yet tokenised), used to group the batch; the run
        counts the real tokens and reports them through `on_tokens`.
        """
        if self._task is None:
            self._task = asyncio.create_task(self._loop())
        request = _Request(key, items, tokens, alive, exact)
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            raise Overloaded(f"request queue is full ({self._cfg.max_queue} waiting)") from None
        return await request.future

    def _fits(self, group: list[_Request], nxt: _Request) -> bool:
        rows = sum(len(r.items) for r in group) + len(nxt.items)
        tokens = sum(r.tokens for r in group) + nxt.tokens
        return nxt.key == group[0].key and rows <= self._cfg.max_batch_size and tokens <= self._cfg.max_batch_tokens

    async def _collect(self) -> list[_Request]:
        group = [self._held.popleft() if self._held else await self._queue.get()]
        if self._cfg.max_wait_ms > 0 and self._queue.empty():
            await asyncio.sleep(self._cfg.max_wait_ms / 1000)
        while not self._held and not self._queue.empty():
            nxt = self._queue.get_nowait()
            if not self._fits(group, nxt):
                self._held.append(nxt)
                break
            group.append(nxt)
        return group

    def _drop_abandoned(self, group: list[_Request]) -> list[_Request]:
        """The requests of `group` whose callers still wait; the others are cancelled unrun."""
        kept = []
        for r in group:
            if r.alive():
                kept.append(r)
            else:
                self.dropped += 1
                if not r.future.done():
                    r.future.cancel()
        return kept

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = self._drop_abandoned(await self._collect())
            if not group:
                continue
            self.batch_alive = lambda: any(r.alive() for r in group)
            items = [item for r in group for item in r.items]
            if self.on_batch:
                self.on_batch(len(items), sum(r.tokens for r in group if r.exact))
            call = loop.run_in_executor(self._executor, self._timed_run, group[0].key, items)
            if self._concurrent:
                task = asyncio.ensure_future(self._answer(group, call))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            else:
                await self._answer(group, call)

    @staticmethod
    async def _answer(group: list[_Request], call) -> None:
        """Give each request of `group` its slice of the batch's results, or the batch's error."""
        try:
            results = await call
        except Exception as error:  # noqa: BLE001 - every waiter hears of it
            for r in group:
                if not r.future.done():
                    r.future.set_exception(error)
            return
        start = 0
        for r in group:
            if not r.future.done():
                r.future.set_result(results[start : start + len(r.items)])
            start += len(r.items)

    async def close(self) -> None:
        """Stop the batching task."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
