"""Common server plumbing: the servicer base class and `serve()`.

Each model service is a grpc.aio server with the role's servicer, the gRPC
health service (NOT_SERVING until the weights are loaded and while draining)
and server reflection. All model work runs on one "model thread" so that
inference and optimizer steps never interleave and the event loop stays free
to answer health checks.
"""

import asyncio
import contextlib
import dataclasses
import logging
import math
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rlhf.v1 import policy_pb2, tensor_pb2
from services import codec
from services.batch import Sequences
from services.batcher import Batcher
from services.checkpoint import save_checkpoint
from services.config import ServiceConfig
from services.engine import TrainEngine
from services.errors import ErrorInterceptor, GroupRejected, InvalidArgument, NotReady, WrongRank
from services.idempotency import AppliedSteps, key_from_pb
from services.metrics import NoMetrics, ServiceMetrics, metrics_for, metrics_port
from services.models import LOADERS, LoadedModel

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class ModelServicer:
    """Base of the four model servicers: loading, readiness, the model thread, Info."""

    role = ""
    service_name = ""  # full proto service name, e.g. rlhf.v1.PolicyService

    def __init__(self, cfg: ServiceConfig):
        self.cfg = cfg
        self.loaded: LoadedModel | None = None
        self.draining = False
        self.metrics: ServiceMetrics | NoMetrics | None = None  # set by build_server
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.role}-model")

    def load(self) -> None:
        """Load weights (runs on the model thread); subclasses add engines in after_load."""
        if self.cfg.server.num_threads:
            torch.set_num_threads(self.cfg.server.num_threads)
        torch.manual_seed(self.cfg.server.seed)
        loaded = LOADERS[self.role](self.cfg.model)
        # every decoder of token rows enforces the configured rows-per-request bound
        loaded.limits = dataclasses.replace(loaded.limits, max_batch=self.cfg.batching.max_request_rows)
        self.after_load(loaded)
        self.loaded = loaded

    def after_load(self, loaded: LoadedModel) -> None:
        """Hook for role-specific set-up once the model is in memory."""

    def on_drain(self) -> None:
        """Hook called when SIGTERM starts the drain."""

    def require(self) -> LoadedModel:
        """The loaded model, or UNAVAILABLE while loading or draining."""
        if self.loaded is None:
            raise NotReady(f"{self.role} service is still loading its weights")
        if self.draining:
            raise NotReady(f"{self.role} service is shutting down")
        return self.loaded

    async def on_model_thread(self, fn, *args):
        """Run fn(*args) on the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def model_version(self) -> int:
        """Applied optimizer steps; frozen models stay at 0."""
        return 0

    def model_info(self) -> tensor_pb2.ModelInfo:
        """Info RPC payload."""
        m = self.require()
        rank, size = self.data_parallel()
        return tensor_pb2.ModelInfo(
            role=self.role,
            model_name=self.cfg.model.path,
            tokenizer_fingerprint=m.fingerprint,
            vocab_size=m.limits.vocab_size,
            max_sequence_length=m.limits.max_length,
            device=str(m.device),
            dtype=self.cfg.model.dtype,
            model_version=self.model_version(),
            eos_token_id=m.eos_id,
            pad_token_id=m.pad_id,
            num_parameters=sum(p.numel() for p in m.model.parameters()),
            data_parallel_rank=rank,
            data_parallel_size=size,
        )

    def data_parallel(self) -> tuple[int, int]:
        """(rank, size) of this process in its data-parallel group; (0, 1) when alone."""
        return 0, 1

    async def Info(self, request, context):
        return self.model_info()

    def per_sequence(self, fn, model, items: list[tuple[torch.Tensor, int]], *args) -> list:
        """fn(model, Sequences, pad_id, device, *args) over max_batch_size chunks of (row, prompt length) items.

        Runs without gradients on the model thread (batchers call it); returns one result per item.
        """
        m = self.loaded
        batch = Sequences([row for row, _ in items], [p for _, p in items])
        out = []
        with torch.no_grad():
            for idx in chunks(len(batch), self.cfg.batching.max_batch_size):
                out.extend(fn(model, batch.select(idx), m.pad_id, m.device, *args))
        return out

    async def answer_logprobs(self, request, batcher, version: int) -> policy_pb2.LogProbsResponse:
        """Validate a LogProbsRequest, run it through `batcher`, encode the reply."""
        m = self.require()
        seqs = Sequences.from_pb(request.sequences, "sequences", m.limits)
        temperature = check_temperature(request.temperature, "temperature")
        tokens = sum(int(r.numel()) for r in seqs.rows)
        rows = await batcher.submit(temperature, list(zip(seqs.rows, seqs.prompt_lengths)), tokens)
        return policy_pb2.LogProbsResponse(logprobs=codec.ragged_to_pb(rows, torch.float32), model_version=version)

    async def close(self) -> None:
        """Stop the batching tasks (after the server has drained)."""
        for value in vars(self).values():
            if isinstance(value, Batcher):
                await value.close()


class TrainableServicer(ModelServicer):
    """A servicer with a DeepSpeed TrainEngine (policy, value): Train steps, versions, checkpoints."""

    def __init__(self, cfg: ServiceConfig):
        super().__init__(cfg)
        self.trainer: TrainEngine | None = None
        self.applied = AppliedSteps(cfg.training.idempotency_cache)

    def after_load(self, loaded: LoadedModel) -> None:
        self.trainer = TrainEngine(loaded.model, self.cfg.training, loaded.dtype, loaded.device)

    def model_version(self) -> int:
        return self.trainer.version if self.trainer else 0

    def data_parallel(self) -> tuple[int, int]:
        return (self.trainer.rank, self.trainer.world_size) if self.trainer else (0, 1)

    def on_drain(self) -> None:
        if self.trainer is not None:
            self.trainer.closing.set()

    async def train_step(self, request, decode, work):
        """Decode a Train request, then apply `work(*decoded)` once per idempotency key on the model thread.

        decode(request, loaded) -> tuple of arguments; it raises InvalidArgument.
        In a data-parallel group a rank whose shard fails to decode still joins
        the step's first collective, so the other ranks fail the step too
        (ABORTED) instead of waiting for it.
        """
        m = self.require()
        try:
            key = key_from_pb(request.key)
            decoded = decode(request, m)
        except InvalidArgument:
            if self.trainer is not None and self.trainer.world_size > 1:
                with contextlib.suppress(GroupRejected):
                    await self.on_model_thread(self.trainer.agree, [], False)
            raise
        result, replayed = await self.applied.run(key, lambda: self.on_model_thread(work, *decoded))
        response = type(result)()
        response.CopyFrom(result)
        response.replayed = replayed
        return response

    async def SaveCheckpoint(self, request, context):
        m = self.require()
        if self.trainer.rank != 0:  # every rank holds the same weights; rank 0 writes them
            raise WrongRank(f"SaveCheckpoint goes to rank 0 of the {self.role} data-parallel group, "
                            f"this is rank {self.trainer.rank}")
        return await save_checkpoint(self, request, self.trainer.module, m.tokenizer)


def check_temperature(value: float, field: str) -> float:
    """A finite, non-negative temperature (0 = unset/greedy)."""
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(field, f"must be a finite number >= 0, got {value}")
    return value


def chunks(n: int, size: int) -> list[list[int]]:
    """Index lists [0..size), [size..2*size), ... covering range(n)."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def micro_batch_size(requested: int, default: int) -> int:
    """The request's micro-batch size (0 = the configured default)."""
    if requested < 0:
        raise InvalidArgument("micro_batch_size", f"must be >= 0, got {requested}")
    return requested or default


def build_server(servicer: ModelServicer, add_to_server, host: str, port: int):
    """A grpc.aio server with the servicer, health and reflection; returns (server, health, bound port)."""
    servicer.metrics = metrics_for(servicer)
    # Metrics first: it times the whole call and sees the status that ErrorInterceptor sets.
    server = grpc.aio.server(interceptors=[*servicer.metrics.interceptors, ErrorInterceptor()], options=GRPC_OPTIONS)
    add_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (servicer.service_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    return server, health_servicer, bound


async def set_health(health_servicer, servicer: ModelServicer, serving: bool) -> None:
    """Report SERVING or NOT_SERVING for the whole server and the role's service."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", servicer.service_name):
        await health_servicer.set(name, status)
    if servicer.metrics is not None:
        servicer.metrics.set_ready(serving)


async def serve(servicer: ModelServicer, add_to_server, stop: asyncio.Event | None = None, on_bound=None) -> None:
    """Listen, load the weights, serve until `stop` is set (default: SIGTERM/SIGINT), then drain.

    on_bound(port) is called once the port is bound, before the weights load.
    """
    cfg = servicer.cfg
    server, health_servicer, port = build_server(servicer, add_to_server, cfg.server.host, cfg.grpc_port())
    await set_health(health_servicer, servicer, serving=False)
    servicer.metrics.serve(cfg.server.host, metrics_port(cfg.server.metrics_port, cfg.server.port, servicer.role))
    await server.start()
    log.info("%s service listening on %s:%d, loading %s", servicer.role, cfg.server.host, port, cfg.model.path)
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    if on_bound is not None:
        on_bound(port)
    try:
        start = time.perf_counter()
        await servicer.on_model_thread(servicer.load)
        servicer.metrics.model_loaded(servicer, time.perf_counter() - start)
        await set_health(health_servicer, servicer, serving=True)
        log.info("%s service ready (%s on %s)", servicer.role, cfg.model.dtype, cfg.model.device)
        await stop.wait()
    finally:
        log.info("%s service draining (up to %.0fs)", servicer.role, cfg.server.grace_seconds)
        servicer.draining = True
        servicer.on_drain()
        await set_health(health_servicer, servicer, serving=False)
        await server.stop(cfg.server.grace_seconds)
        await servicer.close()
        servicer.metrics.close()
        servicer.executor.shutdown(wait=True)
