"""Prometheus metrics of a process: gRPC server metrics, batching and the model, over HTTP.

Naming follows Prometheus conventions: one `rlhf_` prefix, base units
(`_seconds`, `_bytes`), `_total` on counters, labels of low cardinality
(`role`, `queue`, `device`). The gRPC server metrics keep the names and labels
of go-grpc-prometheus / py-grpc-prometheus (`grpc_server_handled_total{grpc_code,
grpc_service, grpc_method, grpc_type}` ...), so dashboards built for those work.

Each process builds its own CollectorRegistry (never prometheus_client's
global one), so several services in one test process keep their numbers apart.
"""

import asyncio
import contextlib
import inspect
import logging
import time
from typing import Callable

import grpc
import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.batcher import Batcher
from services.config import DEFAULT_METRICS_PORTS
from services.handlers import HandlerCache, behaviour, kind, rebuild
from services.metrics_http import BoundedHTTPServer

log = logging.getLogger(__name__)

# `_created` series double every counter and histogram for a value no dashboard reads.
prometheus_client.disable_created_metrics()

DISABLED = -1  # metrics_port value that turns the endpoint off

# Model calls, PPO phases and training RPCs range from milliseconds to minutes.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

GRPC_TYPES = {(False, False): "unary", (True, False): "client_stream", (False, True): "server_stream", (True, True): "bidi_stream"}
GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")


def metrics_port(configured: int | None, grpc_port: int | None, process: str) -> int:
    """The port to serve /metrics on: the configured one, else 0 beside an ephemeral gRPC port, else the default."""
    if configured is not None:
        return configured
    return 0 if grpc_port == 0 else DEFAULT_METRICS_PORTS[process]


class MetricsEndpoint:
    """One registry's exposition over HTTP (text or OpenMetrics, gzip when asked), on a bounded server.

    `timeout` (seconds): a connection silent that long is closed, and a request must arrive within it.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int, timeout: float = 5.0):
        try:
            self._server = BoundedHTTPServer(prometheus_client.make_wsgi_app(registry), host, port, timeout=timeout)
        except OSError as error:
            raise OSError(f"cannot serve metrics on {host}:{port}: {error.strerror or error} "
                          f"(set server.metrics_port; -1 disables)") from None
        self.host, self.port = host, self._server.port

    @property
    def url(self) -> str:
        """http://host:port/metrics (loopback when listening on all addresses)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.close()


class _Method:
    """Label children of one RPC method, bound once so that each call only increments."""

    def __init__(self, m: "GrpcServerMetrics", labels: tuple[str, str, str]):
        self.started = m.started.labels(*labels)
        self.seconds = m.seconds.labels(*labels)
        self.received = m.received.labels(*labels)
        self.sent = m.sent.labels(*labels)
        self._handled_family, self._labels = m.handled, labels
        self._handled = {grpc.StatusCode.OK: m.handled.labels(*labels, "OK")}

    def done(self, code: grpc.StatusCode, seconds: float) -> None:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = self._handled_family.labels(*self._labels, code.name)
        child.inc()
        self.seconds.observe(seconds)


class GrpcServerMetrics:
    """The go-grpc-prometheus server metric families, in `registry`."""

    def __init__(self, registry: CollectorRegistry):
        self.started = Counter("grpc_server_started_total", "RPCs started on the server.", GRPC_LABELS, registry=registry)
        self.handled = Counter("grpc_server_handled_total", "RPCs completed on the server, by status code.",
                               (*GRPC_LABELS, "grpc_code"), registry=registry)
        self.seconds = Histogram("grpc_server_handling_seconds", "Time from RPC start to its status, in seconds.",
                                 GRPC_LABELS, buckets=SECONDS_BUCKETS, registry=registry)
        self.received = Counter("grpc_server_msg_received_total", "Request messages received.", GRPC_LABELS,
                                registry=registry)
        self.sent = Counter("grpc_server_msg_sent_total", "Response messages sent.", GRPC_LABELS, registry=registry)


def _final_code(error: BaseException | None, context) -> grpc.StatusCode:
    """The status the client sees: what the handler (or ErrorInterceptor) set, else OK/CANCELLED/UNKNOWN."""
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):  # the client went away mid-call or mid-stream
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if code is not None and code is not grpc.StatusCode.OK:
        return code
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


async def _counted(iterator, counter):
    async for message in iterator:
        counter.inc()
        yield message


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every RPC; put it first so that it sees the status ErrorInterceptor produced."""

    def __init__(self, metrics: GrpcServerMetrics):
        self._metrics = metrics
        self._wrapped = HandlerCache(self._wrap)

    def _wrap(self, handler, method: str):
        service, _, name = method.lstrip("/").rpartition("/")
        m = _Method(self._metrics, (GRPC_TYPES[kind(handler)], service, name))
        request_streaming, response_streaming = kind(handler)
        wrap = _streaming if response_streaming else _unary
        return rebuild(handler, wrap(m, behaviour(handler), request_streaming))

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        return None if handler is None else self._wrapped.get(handler, handler_call_details.method)


def _begin(m: _Method, request, request_streaming: bool):
    """Count the call as started and its request message(s) as received; returns the request to pass on."""
    m.started.inc()
    if request_streaming:
        return _counted(request, m.received)
    m.received.inc()
    return request


@contextlib.contextmanager
def _timed(m: _Method, context):
    """Time the body as one call and record its final status code, whatever ends it."""
    start, error = time.perf_counter(), None
    try:
        yield
    except BaseException as e:
        error = e
        raise
    finally:
        m.done(_final_code(error, context), time.perf_counter() - start)


def _unary(m: _Method, inner, request_streaming: bool):
    """Wrap a handler that returns one response (unary-unary or stream-unary)."""

    async def handle(request, context):
        request = _begin(m, request, request_streaming)
        with _timed(m, context):
            reply = inner(request, context)
            if inspect.isawaitable(reply):  # aio handlers may also be plain functions
                reply = await reply
            m.sent.inc()
            return reply

    return handle


def _streaming(m: _Method, inner, request_streaming: bool):
    """Wrap a handler that streams responses: an async generator, or a coroutine using context.write."""

    async def generate(request, context):
        request = _begin(m, request, request_streaming)
        with _timed(m, context):
            async for reply in inner(request, context):
                m.sent.inc()
                yield reply

    async def write(request, context):
        request = _begin(m, request, request_streaming)
        with _timed(m, context):
            return await inner(request, context)

    return generate if inspect.isasyncgenfunction(inner) else write


def generated_tokens(results: list) -> int:
    """Response tokens in PolicyServicer._run_generate's results: (response, logprobs, finished, version) rows."""
    return sum(int(r[0].numel()) for r in results)


# Queue label of each batcher attribute; `batcher` alone takes the role's RPC.
QUEUE_NAMES = {"generate_batcher": "generate", "logprob_batcher": "logprobs"}
ROLE_QUEUES = {"reference": "logprobs", "reward": "score", "value": "values"}
# Queues whose model call samples new tokens (counted from the results, not the request budget).
GENERATING = {"generate": generated_tokens}


class DeviceMemoryCollector(Collector):
    """torch.cuda allocator figures of one device, read at scrape time."""

    def __init__(self, role: str, device):
        import torch

        self._cuda, self._role = torch.cuda, role
        self._device = torch.device(device)
        self._label = str(self._device)

    def collect(self):
        index = self._device.index if self._device.index is not None else self._cuda.current_device()
        figures = (
            ("rlhf_device_memory_allocated_bytes", "Device memory held by tensors.", self._cuda.memory_allocated(index)),
            ("rlhf_device_memory_reserved_bytes", "Device memory reserved by the caching allocator.",
             self._cuda.memory_reserved(index)),
            ("rlhf_device_memory_max_allocated_bytes", "Peak device memory held by tensors.",
             self._cuda.max_memory_allocated(index)),
            ("rlhf_device_memory_total_bytes", "Device memory in total.", self._cuda.get_device_properties(index).total_memory),
        )
        for name, doc, value in figures:
            family = GaugeMetricFamily(name, doc, labels=["role", "device"])
            family.add_metric([self._role, self._label], float(value))
            yield family


class CounterFunction(Collector):
    """A counter whose value a function reads from the service's own count, with a `role` label."""

    def __init__(self, name: str, documentation: str, role: str, read: Callable[[], float]):
        self.name, self.documentation, self.role, self.read = name, documentation, role, read

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation, labels=["role"])
        family.add_metric([self.role], self.read())
        yield family


class ServiceMetrics:
    """Every metric of one model service process: gRPC, readiness, queues, batches, the model."""

    def __init__(self, servicer):
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        self.interceptors = (MetricsInterceptor(GrpcServerMetrics(r)),)
        self.role = role = servicer.role
        self.endpoint: MetricsEndpoint | None = None
        self._ready = Gauge("rlhf_service_ready", "1 while the service reports SERVING.", ["role"], registry=r).labels(role)
        Gauge("rlhf_model_version", "Optimizer steps applied to the model (0 when frozen).", ["role"],
              registry=r).labels(role).set_function(servicer.model_version)
        self.load_seconds = Gauge("rlhf_model_load_seconds", "Seconds the weights took to load.", ["role"],
                                  registry=r).labels(role)
        self._info = Gauge("rlhf_model_info", "The loaded checkpoint (value 1).", ["role", "model", "device", "dtype"],
                           registry=r)
        queue = ["role", "queue"]
        self._depth = Gauge("rlhf_queue_depth", "Requests waiting for a model call.", queue, registry=r)
        self._capacity = Gauge("rlhf_queue_capacity", "Requests that fit in the queue before RESOURCE_EXHAUSTED.",
                               queue, registry=r)
        self._batch = Histogram("rlhf_batch_size", "Sequences per model call.", queue, buckets=BATCH_BUCKETS, registry=r)
        self._sequences = Counter("rlhf_sequences_total", "Sequences through the model.", queue, registry=r)
        self._scored = Counter("rlhf_tokens_scored_total", "Tokens of the sequences run through forward passes.",
                               queue, registry=r)
        self._generated = Counter("rlhf_tokens_generated_total", "Response tokens sampled.", queue, registry=r)
        self._seconds = Histogram("rlhf_inference_seconds", "Seconds per batched model call.", queue,
                                  buckets=SECONDS_BUCKETS, registry=r)
        waste = Histogram("rlhf_padding_waste", "Share of padded positions in one model call (rows are grouped by "
                          "length to keep it low).", ["role"], buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0),
                          registry=r)
        servicer.on_padding = waste.labels(role).observe
        if hasattr(servicer, "skipped_steps"):
            r.register(CounterFunction("rlhf_train_steps_skipped", "Train steps not applied because their loss or "
                                       "gradient norm was not finite.", role, lambda: servicer.skipped_steps))
        for attr, value in vars(servicer).items():
            if isinstance(value, Batcher):
                name = QUEUE_NAMES.get(attr) or ROLE_QUEUES.get(role, attr.removesuffix("_batcher"))
                self.watch(value, name, servicer.cfg.batching.max_queue)

    def watch(self, batcher, queue: str, capacity: int) -> None:
        """Export `batcher`'s depth and hook its batches into the queue's metrics."""
        labels = (self.role, queue)
        self._depth.labels(*labels).set_function(batcher.depth)
        self._capacity.labels(*labels).set(capacity)
        batch, sequences, seconds = self._batch.labels(*labels), self._sequences.labels(*labels), self._seconds.labels(*labels)
        count = GENERATING.get(queue)
        tokens = (self._generated if count else self._scored).labels(*labels)

        def on_batch(rows: int, n_tokens: int) -> None:
            batch.observe(rows)
            sequences.inc(rows)
            if count is None:
                tokens.inc(n_tokens)

        def on_result(results: list, elapsed: float) -> None:
            seconds.observe(elapsed)
            if count is not None:
                tokens.inc(count(results))

        batcher.on_batch, batcher.on_result = on_batch, on_result
        batcher.on_tokens = None if count else tokens.inc

    def set_ready(self, serving: bool) -> None:
        """Follow the health status (SERVING or not)."""
        self._ready.set(1 if serving else 0)

    def serve(self, host: str, port: int) -> None:
        """Start the /metrics endpoint (port 0: a free one; -1: none)."""
        if port != DISABLED:
            self.endpoint = MetricsEndpoint(self.registry, host, port)
            log.info("%s metrics on %s", self.role, self.endpoint.url)

    def model_loaded(self, servicer, seconds: float) -> None:
        """Record the load time, the checkpoint, the torch threads, and device memory when the model sits on a GPU."""
        self.load_seconds.set(seconds)
        if servicer.threads is not None:
            Gauge("rlhf_torch_threads", "torch intra-op threads of the process (see services/cpus.py).", ["role"],
                  registry=self.registry).labels(self.role).set(servicer.threads.intra_op)
        cfg, m = servicer.cfg.model, servicer.loaded
        self._info.labels(self.role, cfg.path, str(m.device), cfg.dtype).set(1)
        if getattr(m.device, "type", str(m.device)) == "cuda":
            self.registry.register(DeviceMemoryCollector(self.role, m.device))

    def close(self) -> None:
        """Stop the endpoint."""
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None


class NoMetrics:
    """ServiceMetrics' stand-in when metrics_port is -1: no interceptor, no batch hooks, no endpoint."""

    interceptors = ()
    endpoint = None

    def set_ready(self, serving: bool) -> None:
        pass

    def serve(self, host: str, port: int) -> None:
        pass

    def model_loaded(self, servicer, seconds: float) -> None:
        pass

    def close(self) -> None:
        pass


def metrics_for(servicer) -> ServiceMetrics | NoMetrics:
    """The servicer's metrics, or NoMetrics when its config disables them (server.metrics_port: -1)."""
    s = servicer.cfg.server
    return NoMetrics() if metrics_port(s.metrics_port, s.port, servicer.role) == DISABLED else ServiceMetrics(servicer)


def exposition(registry: CollectorRegistry) -> str:
    """The registry in the Prometheus text format (what /metrics serves)."""
    return prometheus_client.generate_latest(registry).decode()

