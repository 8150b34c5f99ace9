"""Serving: the grpc.aio server every process runs, its channel options, and `serve()`.

A server carries its servicers, the gRPC health service (NOT_SERVING until
the weights are loaded and while draining), server reflection and the
metrics and error interceptors. The model services and the ControllerService
are built by the same `build_server`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.auth import AuthInterceptor, load_grants
from services.channels import server_credentials, server_options
from services.config import ListenConfig
from services.errors import ErrorInterceptor
from services.limits import ConcurrencyLimit
from services.metrics import metrics_for, metrics_port
from services.pushback import RetryPushback
from services.reflection import enable_reflection

if TYPE_CHECKING:  # the model code is imported only by the processes that serve a model
    from services.servicer import ModelServicer

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def build_server(services: list, service_names: list[str], interceptors: list, listen: ListenConfig, port: int):
    """A grpc.aio server with `services` ((servicer, add_to_server) pairs), health and reflection.

    `listen` (a ListenConfig) says where and for whom: TLS, bearer tokens, the
    message size, the cap on calls in progress and reflection. Interceptors
    run in order, then the concurrency cap, the token check, and
    ErrorInterceptor, which maps domain errors to status codes. Returns
    (server, health servicer, bound port).
    """
    grants = load_grants(listen.auth)
    pushback = RetryPushback(listen.refusals_per_second)
    guards = [ConcurrencyLimit(listen.max_concurrent_rpcs, pushback), *([AuthInterceptor(grants)] if grants else [])]
    server = grpc.aio.server(interceptors=[*interceptors, *guards, ErrorInterceptor(pushback)],
                             options=server_options(listen.max_message_mb))
    for servicer, add_to_server in services:
        add_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if listen.reflection:
        enable_reflection(server, [*service_names, health.SERVICE_NAME])
    address = f"{listen.host}:{port}"
    if listen.tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, server_credentials(listen.tls))
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    _warn_if_open(listen, grants)
    return server, health_servicer, bound


def _warn_if_open(listen: ListenConfig, grants: list) -> None:
    """Say so when a server beyond loopback asks for no token or speaks plain text."""
    if listen.host in LOOPBACK:
        return
    if not grants:
        log.warning("listening on %s without authentication: any client that reaches the port can call every "
                    "RPC (set server.auth.tokens; docs/security.md)", listen.host)
    if listen.tls is None:
        log.warning("listening on %s in plain text (set server.tls; docs/security.md)", listen.host)


def build_model_server(servicer: ModelServicer, add_to_server, port: int):
    """build_server for one model servicer, with its metrics interceptor (first: it times the whole call)."""
    servicer.metrics = metrics_for(servicer)
    return build_server([(servicer, add_to_server)], [servicer.service_name], servicer.metrics.interceptors,
                        servicer.cfg.server, port)


def freeze_loaded_objects() -> None:
    """Collect, then move every live object (the loaded model's modules, parameters, tokenizer) to the garbage
    collector's permanent generation: a full collection no longer walks them, which paused the event loop for
    tens of milliseconds at a time under load. Reference counting still frees them."""
    gc.collect()
    gc.freeze()
    log.info("%d objects alive now moved out of the garbage collector's scans (gc.freeze)", gc.get_freeze_count())


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
    server, health_servicer, port = build_model_server(servicer, add_to_server, cfg.grpc_port())
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
        if cfg.server.freeze_gc:
            freeze_loaded_objects()
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
        servicer.text_pool.shutdown(wait=True)
