"""The replicas of one model service, as the controller sees them.

A `Replicas` pool follows a Discovery source (static list, DNS, or the
Kubernetes EndpointSlices of a headless Service), keeps one channel per
replica, and spreads a batch's shards over the replicas that are serving.
A replica whose call fails with UNAVAILABLE or DEADLINE_EXCEEDED is taken out
and its shard goes to another; a background probe of grpc.health.v1 puts it
back once it reports SERVING again.

Policy and value may instead be one data-parallel group (ranks that share
every optimizer step, see services/engine.py): `each_rank` sends shard r of a
Train minibatch to rank r, all at once, with no failover, since a group
trains only with every rank present.
"""

import asyncio
import itertools
import logging
import random
import time
from typing import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.discovery import Discovery, DiscoveryError, DnsDiscovery, parse_target
from rlhf.v1 import common_pb2
from services.channels import open_channel
from services.config import ClientSecurity
from services.pushback import pushback_seconds

log = logging.getLogger(__name__)

FAILOVER = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}  # the replica, not the request
RETRY_SAME = FAILOVER | {grpc.StatusCode.RESOURCE_EXHAUSTED}  # transient on a rank: retried on the same one
Select = Callable[[object], Callable[..., Awaitable]]  # stub -> one of its RPC methods, e.g. lambda s: s.Score


def backoff(attempt: int, cap: float = 8.0) -> float:
    """Seconds to wait before retry `attempt` (0, 1, ...): 0.5 s doubling up to `cap`, times a jitter in
    [0.5, 1) so that many callers retrying one restarted service do not arrive together."""
    return min(0.5 * 2**attempt, cap) * random.uniform(0.5, 1.0)


def retry_delay(error: grpc.aio.AioRpcError, attempt: int) -> float:
    """Seconds before retrying a failed call: the backoff, or longer when the server asked for longer
    (grpc-retry-pushback-ms on an overloaded service's refusals, services/pushback.py)."""
    return max(backoff(attempt), pushback_seconds(error))


class Outage:
    """The services the run is waiting for: since when and the last error, for Status and metrics."""

    def __init__(self):
        self.since: dict[str, float] = {}  # role -> Unix time the wait began
        self.errors: dict[str, str] = {}  # role -> the last error of its calls

    def waiting(self, role: str, error: str) -> None:
        """A call to `role` failed transiently or found no replica; the run waits for it."""
        if role not in self.since:
            log.warning("waiting for %s: %s", role, error)
            self.since[role] = time.time()
        self.errors[role] = error

    def recovered(self, role: str) -> None:
        """A call to `role` succeeded again."""
        if self.since.pop(role, None) is not None:
            log.info("%s answers again", role)
        self.errors.pop(role, None)


class ServiceUnavailable(RuntimeError):
    """A service stayed unavailable past services.restart_timeout_seconds."""


class NoReplica(RuntimeError):
    """No replica of a service is serving."""


class GroupError(RuntimeError):
    """The replicas of a trainable service do not form one complete data-parallel group."""


class Replicas:
    """Channels to every discovered replica of one service, with failover across them."""

    def __init__(self, role: str, target: str, stub_class, timeout: float = 600.0, retries: int = 3,
                 probe_seconds: float = 2.0, discovery: Discovery | None = None, wait_seconds: float = 600.0,
                 outage: Outage | None = None, security: ClientSecurity | None = None):
        """timeout: deadline of each call; retries: of RESOURCE_EXHAUSTED; wait_seconds: how long calls keep
        retrying an unavailable service (and wait for a replica when none serves)."""
        self.outage = outage or Outage()
        self.security = security
        self.on_reply: Callable[[object], None] | None = None  # sees every successful reply (restart detection)
        self.role = role
        self.target = target
        self.stub_class = stub_class
        self.timeout = timeout
        self.retries = retries
        self.probe_seconds = probe_seconds
        self.wait_seconds = wait_seconds  # how long a call waits for some replica to serve again
        self.discovery = discovery or parse_target(target)
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.stubs: dict[str, object] = {}
        self.down: set[str] = set()  # not sent work: not yet seen SERVING, or taken out
        self.taken_out: set[str] = set()  # down after failing calls or health checks
        self._synced = False
        self.ranks: list[str] = []  # address of each data-parallel rank, once `form_group` ran
        self._next = 0
        self._probe: asyncio.Task | None = None

    async def start(self) -> None:
        """Resolve the replicas once and start the background health probe.

        A DNS name without records yet (a headless Service before its first pod)
        is not fatal: `wait_ready` keeps waiting for records until its deadline.
        """
        try:
            await self.discovery.start()
        except DiscoveryError as error:
            if not isinstance(self.discovery, DnsDiscovery):
                raise
            log.warning("%s: %s; waiting for records", self.role, error)
        self.sync()
        self._probe = asyncio.create_task(self._probe_loop())

    def sync(self) -> None:
        """Open channels to new addresses, drop the ones discovery no longer lists."""
        current = self.discovery.addresses()
        for address in current:
            if address not in self.channels:  # the first resolution is routine; later ones are news
                log.log(logging.INFO if self._synced else logging.DEBUG, "%s replica %s discovered", self.role, address)
                self.channels[address] = open_channel(address, self.security)
                self.stubs[address] = self.stub_class(self.channels[address])
                self.down.add(address)  # until a health check says SERVING
        self._synced = True
        for address in [a for a in self.channels if a not in current and a not in self.ranks]:
            log.info("%s replica %s left", self.role, address)
            asyncio.ensure_future(self.channels.pop(address).close())
            self.stubs.pop(address)
            self.down.discard(address)
            self.taken_out.discard(address)

    def serving(self) -> list[str]:
        """Addresses not taken out, in discovery order."""
        return [a for a in self.channels if a not in self.down]

    async def health(self, address: str, timeout: float = 2.0) -> bool | None:
        """True if the replica at `address` reports SERVING, False if it says otherwise or
        refuses the connection, None if it did not answer in time (busy, not necessarily gone)."""
        try:
            reply = await health_pb2_grpc.HealthStub(self.channels[address]).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            return None if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED else False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def check(self, address: str, timeout: float = 2.0) -> bool:
        """Whether the replica at `address` reports SERVING now."""
        return bool(await self.health(address, timeout))

    async def _probe_loop(self) -> None:
        """Every probe_seconds: take out replicas that are not serving (or silent 3 times), bring back the rest."""
        silent: dict[str, int] = {}
        while True:
            await asyncio.sleep(self.probe_seconds)
            self.sync()
            for address in list(self.channels):
                ok = await self.health(address)
                silent[address] = silent.get(address, 0) + 1 if ok is None else 0
                if ok and address in self.down:
                    was_out = address in self.taken_out
                    log.log(logging.INFO if was_out else logging.DEBUG, "%s replica %s is serving", self.role, address)
                    self.down.discard(address)
                    self.taken_out.discard(address)
                elif address not in self.down and (ok is False or silent[address] >= 3):
                    self.take_out(address, "health check: not serving" if ok is False else "health check: no answer")

    def take_out(self, address: str, why: str) -> None:
        """Stop sending work to `address` until it reports SERVING again."""
        if address not in self.taken_out:
            log.warning("%s replica %s taken out (%s)", self.role, address, why)
            self.taken_out.add(address)
        self.down.add(address)

    async def wait_ready(self, deadline_seconds: float, check: Callable[[], None] | None = None,
                         every: bool = False) -> None:
        """Wait until every discovered replica reports SERVING.

        At the deadline, a stateless service (every=False) goes on with the
        replicas that are serving, if any; a data-parallel group needs them all.
        """
        end = time.monotonic() + deadline_seconds
        while True:
            if check is not None:
                check()
            self.sync()
            ready = [a for a in self.channels if await self.check(a)]
            self.down = set(self.channels) - set(ready)
            if ready and len(ready) == len(self.channels):
                return
            if time.monotonic() > end:
                if ready and not every:
                    log.warning("%s: going on with %d of %d replicas serving", self.role, len(ready), len(self.channels))
                    return
                raise TimeoutError(
                    f"{self.role} at {self.target}: {len(ready)} of {len(self.channels)} replica(s) ready after "
                    f"{deadline_seconds:.0f}s (discovered: {', '.join(self.channels) or 'none'})")
            await asyncio.sleep(0.3)

    async def _pick(self, avoid: set[str]) -> str:
        """The next serving replica (round robin); when none serves, wait up to wait_seconds for one.

        Waiting covers a restarting pod (rescheduled, reloading its weights) behind a
        single replica, instead of failing the run at once.
        """
        deadline = time.monotonic() + self.wait_seconds
        for attempt in itertools.count():
            self.sync()
            candidates = [a for a in self.serving() if a not in avoid] or self.serving()
            if candidates:
                self._next += 1
                return candidates[self._next % len(candidates)]
            for address in list(self.down):  # all out: re-probe before waiting
                if await self.check(address):
                    self.down.discard(address)
                    self.taken_out.discard(address)
            if self.serving():
                continue
            if time.monotonic() >= deadline:
                break
            if attempt == 0:
                self.outage.waiting(self.role, f"no replica serving; waiting up to {self.wait_seconds:.0f}s")
            await asyncio.sleep(min(backoff(attempt, 5.0), max(deadline - time.monotonic(), 0.0)))
        raise NoReplica(f"{self.role}: no replica is serving after {self.wait_seconds:.0f}s "
                        f"(services.restart_timeout_seconds; target {self.target}; "
                        f"known: {', '.join(self.channels) or 'none'})")

    async def _call_on(self, address: str, select: Select, request):
        return await select(self.stubs[address])(request, timeout=self.timeout)

    async def info(self, address: str) -> common_pb2.ModelInfo:
        """Info of the replica at `address`, as it is now (no failover, not watched)."""
        return await self._call_on(address, lambda s: s.Info, common_pb2.InfoRequest())

    async def one(self, select: Select, request, first: str | None = None):
        """Call one replica; on UNAVAILABLE/DEADLINE_EXCEEDED take it out and try another, for up to wait_seconds."""
        tried: set[str] = set()
        address = first if first in self.stubs and first not in self.down else await self._pick(tried)
        deadline = time.monotonic() + self.wait_seconds
        for attempt in itertools.count():
            try:
                reply = await self._call_on(address, select, request)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if not self._retry(error, attempt, deadline):
                    raise self._gave_up(error, deadline) from None
                if code in FAILOVER:
                    self.take_out(address, f"{code.name}: {error.details()}")
                tried.add(address)
                address = await self._pick(tried)  # another replica at once; it waits when none serves
                if address in tried or code not in FAILOVER:  # the same one again, or overloaded: give it time
                    await asyncio.sleep(retry_delay(error, attempt))
                continue
            return self._answered(reply)

    def _answered(self, reply):
        """A call succeeded: the service is back if it was away; `on_reply` may still reject the reply."""
        self.outage.recovered(self.role)
        if self.on_reply is not None:
            self.on_reply(reply)
        return reply

    def _retry(self, error: grpc.aio.AioRpcError, attempt: int, deadline: float) -> bool:
        """Whether to try a failed call again: a transient code within the deadline (and `retries` when
        overloaded). Other codes (INVALID_ARGUMENT, ...) never are."""
        code = error.code()
        if code not in RETRY_SAME or time.monotonic() >= deadline:
            return False
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and attempt >= self.retries:
            return False
        self.outage.waiting(self.role, f"{code.name}: {error.details()}")
        return True

    def _gave_up(self, error: grpc.aio.AioRpcError, deadline: float) -> Exception:
        """The error to raise for a call that is not retried again."""
        if error.code() in FAILOVER and time.monotonic() >= deadline:
            return ServiceUnavailable(f"{self.role} ({self.target}) did not answer for {self.wait_seconds:.0f}s "
                                      f"(services.restart_timeout_seconds); last error {error.code().name}: "
                                      f"{error.details()}")
        return error

    def width(self) -> int:
        """Shards to cut a batch into: the serving replicas (at least 1)."""
        self.sync()
        return max(len(self.serving()), 1)

    async def spread(self, select: Select, requests: Sequence) -> list:
        """Send request i to serving replica i (mod their number), concurrently; replies in order."""
        serving = self.serving()
        firsts = [serving[i % len(serving)] if serving else None for i in range(len(requests))]
        return list(await asyncio.gather(*(self.one(select, r, f) for r, f in zip(requests, firsts))))

    async def form_group(self) -> int:
        """Order the replicas by data-parallel rank (Info); returns the group's size.

        Raises GroupError unless the discovered replicas are exactly ranks 0..W-1 of one group.
        """
        self.sync()
        addresses = list(self.channels)
        infos = await asyncio.gather(*(self.info(a) for a in addresses))
        sizes = {max(i.data_parallel_size, 1) for i in infos}
        by_rank = {i.data_parallel_rank: a for i, a in zip(infos, addresses)}
        size = sizes.pop() if len(sizes) == 1 else 0
        if size != len(addresses) or sorted(by_rank) != list(range(size)):
            found = ", ".join(f"{a} (rank {i.data_parallel_rank} of {max(i.data_parallel_size, 1)})"
                              for i, a in zip(infos, addresses))
            raise GroupError(f"{self.role} replicas must form one data-parallel group with every rank "
                             f"present, found: {found}. Run them as one StatefulSet (WORLD_SIZE, RANK).")
        self.ranks = [by_rank[r] for r in range(size)]
        return size

    async def on_rank(self, rank: int, select: Select, request):
        """Call data-parallel rank `rank` (e.g. SaveCheckpoint on rank 0), without failover."""
        return (await self._each(select, [request], self.ranks[rank : rank + 1]))[0]

    async def each_rank(self, select: Select, requests: Sequence) -> list:
        """Send requests[r] to rank r at once (a collective step); retries transient errors on the same rank."""
        if len(requests) != len(self.ranks):
            raise ValueError(f"{len(requests)} shards for {len(self.ranks)} {self.role} ranks")
        return await self._each(select, requests, self.ranks)

    async def _each(self, select: Select, requests: Sequence, addresses: Sequence[str]) -> list:
        deadline = time.monotonic() + self.wait_seconds

        async def on_rank(address, request):
            for attempt in itertools.count():
                try:
                    reply = await self._call_on(address, select, request)
                except grpc.aio.AioRpcError as error:
                    if not self._retry(error, attempt, deadline):
                        raise self._gave_up(error, deadline) from None
                    await asyncio.sleep(retry_delay(error, attempt))
                    continue
                return self._answered(reply)

        return list(await asyncio.gather(*(on_rank(a, r) for a, r in zip(addresses, requests))))

    async def close(self) -> None:
        """Stop probing and close every channel."""
        if self._probe is not None:
            self._probe.cancel()
        await self.discovery.close()
        for channel in self.channels.values():
            await channel.close()


def split_rows(n: int, parts: int) -> list[list[int]]:
    """Contiguous index lists over range(n), sizes differing by at most one, none empty."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for p in range(parts):
        end = start + base + (p < extra)
        bounds.append(list(range(start, end)))
        start = end
    return bounds
