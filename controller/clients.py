"""Typed async clients of the four model services: replicas, failover, readiness and tokenizer checks."""

import asyncio
import functools
import logging
import time
from typing import Callable

from controller.durability import InstanceWatch
from controller.replicas import Outage, Replicas, Select, split_rows
from rlhf.v1 import (
    common_pb2,
    policy_pb2_grpc,
    reference_pb2_grpc,
    reward_pb2_grpc,
    value_pb2_grpc,
)
from services.config import ClientSecurity

log = logging.getLogger(__name__)

TRAINABLE = ("policy", "value")  # one data-parallel group each
STUBS = {
    "policy": policy_pb2_grpc.PolicyServiceStub,
    "reference": reference_pb2_grpc.ReferenceServiceStub,
    "reward": reward_pb2_grpc.RewardServiceStub,
    "value": value_pb2_grpc.ValueServiceStub,
}


class TokenizerMismatch(RuntimeError):
    """Policy, reference and value do not share one tokenizer."""


class ServiceClients:
    """One `Replicas` pool per service (see controller.replicas); calls fail over between replicas.

    `endpoints` maps each role to a target: `host:port`, a comma-separated
    list, `dns:///host:port` or `kubernetes:///service:port`. Policy and value
    replicas must form one data-parallel group; `wait_ready` checks that.
    Retrying Train is safe: every Train request carries an idempotency key.
    """

    def __init__(self, endpoints: dict[str, str], timeout: float = 600.0, retries: int = 3,
                 probe_seconds: float = 2.0, wait_seconds: float = 600.0, security: ClientSecurity | None = None):
        """wait_seconds: how long a call keeps retrying an unavailable service (or waits for a replica);
        security: TLS and bearer token of the channels."""
        self.outage = Outage()
        self.watch = InstanceWatch()
        # a role may carry a suffix ("reward:rule"): another pool of the same service kind
        self.pools = {role: Replicas(role, target, STUBS[role.partition(":")[0]], timeout, retries, probe_seconds,
                                     wait_seconds=wait_seconds,
                                     outage=self.outage, security=security)
                      for role, target in endpoints.items()}
        for role, pool in self.pools.items():
            pool.on_reply = functools.partial(self.watch.check, role)
        self._started = False

    @property
    def roles(self) -> list[str]:
        """The services this client talks to."""
        return list(self.pools)

    async def _start(self) -> None:
        if not self._started:
            self._started = True
            for pool in self.pools.values():
                await pool.start()

    async def wait_ready(self, deadline_seconds: float, check: Callable[[], None] | None = None) -> None:
        """Discover the replicas, wait until they report SERVING, order policy/value ranks.

        `check()` runs before each round and may raise (e.g. when a local service process exited).
        """
        await self._start()
        end = time.monotonic() + deadline_seconds
        for role, pool in self.pools.items():
            await pool.wait_ready(max(end - time.monotonic(), 0.0), check, every=role in TRAINABLE)
            if role in TRAINABLE:
                size = await pool.form_group()
                if size > 1:
                    log.info("%s: data-parallel group of %d ranks", role, size)

    async def one(self, role: str, select: Select, request):
        """Call one serving replica of `role` (failing over to another)."""
        await self._start()
        return await self.pools[role].one(select, request)

    async def spread(self, role: str, select: Select, requests) -> list:
        """Spread `requests` over the serving replicas of `role`; replies in order."""
        await self._start()
        return await self.pools[role].spread(select, requests)

    async def each_rank(self, role: str, select: Select, requests) -> list:
        """requests[r] to data-parallel rank r of `role`, all at once."""
        return await self.pools[role].each_rank(select, requests)

    async def spread_rows(self, role: str, n: int, request_for: Callable[[list[int]], object], select: Select,
                          rows_of: Callable[[object], list]) -> list:
        """Cut rows 0..n-1 into one contiguous shard per serving replica of `role`, call them, join the rows.

        request_for(index) builds a shard's request; rows_of(reply) gives its per-row results.
        """
        shards = split_rows(n, self.width(role))
        replies = await self.spread(role, select, [request_for(index) for index in shards])
        rows = [row for reply in replies for row in rows_of(reply)]
        if len(rows) != n:
            raise RuntimeError(f"{role} answered {len(rows)} rows for {n}")
        return rows

    async def on_rank(self, role: str, rank: int, select: Select, request):
        """Call data-parallel rank `rank` of `role` (no failover: ranks are not interchangeable)."""
        return await self.pools[role].on_rank(rank, select, request)

    def width(self, role: str) -> int:
        """How many shards to cut a batch for `role` into (serving replicas)."""
        return self.pools[role].width()

    def ranks(self, role: str) -> int:
        """Ranks of the data-parallel group of `role` (1 when alone)."""
        return max(len(self.pools[role].ranks), 1)

    async def infos(self) -> dict[str, list[common_pb2.ModelInfo]]:
        """Info of every replica of every service (of each rank, in rank order, for a data-parallel group)."""
        async def of(pool):
            return list(await asyncio.gather(*(pool.info(a) for a in pool.ranks or pool.serving())))

        replies = await asyncio.gather(*(of(pool) for pool in self.pools.values()))
        return dict(zip(self.pools, replies))

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()


def check_shared_tokenizer(infos: dict[str, list[common_pb2.ModelInfo]], roles=("policy", "reference", "value")) -> None:
    """Refuse to train when the token-id services (any of their replicas) disagree on the tokenizer."""
    present = [r for r in roles if r in infos]
    groups: dict[str, list[str]] = {}
    for role in present:
        for fingerprint in dict.fromkeys(i.tokenizer_fingerprint for i in infos[role]):
            groups.setdefault(fingerprint, []).append(role)
    if len(groups) > 1:
        parts = "; ".join(f"{' and '.join(rs)} use tokenizer {fp[:12]}" for fp, rs in groups.items())
        raise TokenizerMismatch(
            f"policy, reference and value must share one tokenizer, but {parts}. "
            "Serve all three from checkpoints with the same tokenizer."
        )
