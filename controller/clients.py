"""Typed async clients of the four model services, with retries and readiness checks."""

import asyncio
import logging
import time
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.v1 import policy_pb2_grpc, reference_pb2_grpc, reward_pb2_grpc, tensor_pb2, value_pb2_grpc
from services.server import GRPC_OPTIONS

log = logging.getLogger(__name__)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
STUBS = {
    "policy": policy_pb2_grpc.PolicyServiceStub,
    "reference": reference_pb2_grpc.ReferenceServiceStub,
    "reward": reward_pb2_grpc.RewardServiceStub,
    "value": value_pb2_grpc.ValueServiceStub,
}


class TokenizerMismatch(RuntimeError):
    """Policy, reference and value do not share one tokenizer."""


class ServiceClients:
    """One channel and stub per service; `call` retries transient failures.

    Retrying Train is safe: every Train request carries an idempotency key.
    """

    def __init__(self, endpoints: dict[str, str], timeout: float = 600.0, retries: int = 3):
        self.endpoints = dict(endpoints)
        self.timeout = timeout
        self.retries = retries
        self.channels = {role: grpc.aio.insecure_channel(addr, options=GRPC_OPTIONS) for role, addr in endpoints.items()}
        self.stubs = {role: STUBS[role](ch) for role, ch in self.channels.items()}

    def __getattr__(self, role: str):
        try:
            return self.__dict__["stubs"][role]
        except KeyError:
            raise AttributeError(role) from None

    async def call(self, method, request):
        """Invoke a stub method with a deadline, retrying UNAVAILABLE / RESOURCE_EXHAUSTED."""
        for attempt in range(self.retries + 1):
            try:
                return await method(request, timeout=self.timeout)
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE or attempt == self.retries:
                    raise
                delay = min(0.5 * 2**attempt, 8.0)
                log.warning("%s (%s); retrying in %.1fs", error.code().name, error.details(), delay)
                await asyncio.sleep(delay)

    async def wait_ready(self, deadline_seconds: float, check: Callable[[], None] | None = None) -> None:
        """Poll grpc.health.v1 until every service reports SERVING.

        `check()` runs before each round and may raise (e.g. when a local service process exited).
        """
        end = time.monotonic() + deadline_seconds
        pending = set(self.channels)
        while pending:
            if check is not None:
                check()
            for role in sorted(pending):
                try:
                    reply = await health_pb2_grpc.HealthStub(self.channels[role]).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        pending.discard(role)
                except grpc.aio.AioRpcError:
                    pass
            if pending and time.monotonic() > end:
                where = ", ".join(f"{r} at {self.endpoints[r]}" for r in sorted(pending))
                raise TimeoutError(f"{where} did not become ready in {deadline_seconds:.0f}s")
            if pending:
                await asyncio.sleep(0.3)

    async def infos(self) -> dict[str, tensor_pb2.ModelInfo]:
        """Info of every service."""
        roles = list(self.stubs)
        replies = await asyncio.gather(*(self.call(self.stubs[r].Info, tensor_pb2.InfoRequest()) for r in roles))
        return dict(zip(roles, replies))

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()


def check_shared_tokenizer(infos: dict[str, tensor_pb2.ModelInfo], roles=("policy", "reference", "value")) -> None:
    """Refuse to train when the token-id services disagree on the tokenizer."""
    present = [r for r in roles if r in infos]
    groups: dict[str, list[str]] = {}
    for role in present:
        groups.setdefault(infos[role].tokenizer_fingerprint, []).append(role)
    if len(groups) > 1:
        parts = "; ".join(f"{' and '.join(rs)} use tokenizer {fp[:12]}" for fp, rs in groups.items())
        raise TokenizerMismatch(
            f"policy, reference and value must share one tokenizer, but {parts}. "
            "Serve all three from checkpoints with the same tokenizer."
        )
