"""Serving: the grpc.aio server every process runs, its channel options, and `serve()`.

A server carries its servicers, the gRPC health service (NOT_SERVING until
the weights are loaded and while draining), server reflection and the
metrics and error interceptors. The model services and the ControllerService
are built by the same `build_server`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.channels import GRPC_OPTIONS
from services.errors import ErrorInterceptor
from services.metrics import metrics_for, metrics_port

if TYPE_CHECKING:  # the model code is imported only by the processes that serve a model
    from services.servicer import ModelServicer

log = logging.getLogger(__name__)



def build_server(services: list, service_names: list[str], interceptors: list, host: str, port: int):
    """A grpc.aio server with `services` ((servicer, add_to_server) pairs), health and reflection.

    Interceptors run in order, then ErrorInterceptor maps domain errors to
    status codes. Returns (server, health servicer, bound port).
    """
    server = grpc.aio.server(interceptors=[*interceptors, ErrorInterceptor()], options=GRPC_OPTIONS)
    for servicer, add_to_server in services:
        add_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    return server, health_servicer, bound


def build_model_server(servicer: ModelServicer, add_to_server, host: str, port: int):
    """build_server for one model servicer, with its metrics interceptor (first: it times the whole call)."""
    servicer.metrics = metrics_for(servicer)
    return build_server([(servicer, add_to_server)], [servicer.service_name], servicer.metrics.interceptors,
                        host, port)


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
    server, health_servicer, port = build_model_server(servicer, add_to_server, cfg.server.host, cfg.grpc_port())
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
