"""The controller process: ControllerService.Status plus the PPO run it reports on."""

import asyncio
import json
import logging
import pathlib
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controller.clients import ServiceClients, check_shared_tokenizer
from controller.config import ControllerConfig
from controller.data import read_texts
from controller.loop import PPORunner, StepResult
from rlhf.v1 import controller_pb2, controller_pb2_grpc, tensor_pb2
from services.errors import ErrorInterceptor

log = logging.getLogger(__name__)


class ControllerServicer(controller_pb2_grpc.ControllerServiceServicer):
    """Reports the run's state; the run itself is driven by `run_controller`."""

    def __init__(self, cfg: ControllerConfig):
        self.cfg = cfg
        self.state = "starting"
        self.error = ""
        self.runner: PPORunner | None = None

    async def Status(self, request, context):
        r = self.runner
        stats = {k: float(v) for k, v in (r.last_stats if r else {}).items() if isinstance(v, (int, float))}
        return controller_pb2.StatusResponse(
            run_id=r.run_id if r else "", state=self.state, step=r.step_count if r else 0,
            total_steps=self.cfg.ppo.total_steps, policy_version=r.policy_version if r else 0,
            stats=stats, error=self.error, algorithm=self.cfg.algorithm,
        )


async def start_controller_server(servicer: ControllerServicer):
    """ControllerService + health + reflection on the configured port; returns (server, port)."""
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    controller_pb2_grpc.add_ControllerServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = ("rlhf.v1.ControllerService", health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(f"{servicer.cfg.server.host}:{servicer.cfg.server.port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port


async def connect(cfg: ControllerConfig) -> ServiceClients:
    """Clients of the four services, once all report SERVING and share a tokenizer."""
    clients = ServiceClients(cfg.services.model_dump(), cfg.rpc_timeout_seconds, cfg.rpc_retries)
    await clients.wait_ready(cfg.ready_timeout_seconds)
    check_shared_tokenizer(await clients.infos())
    return clients


async def save_final(clients: ServiceClients, path: str) -> dict[str, str]:
    """SaveCheckpoint on policy and value; returns where each wrote."""
    request = tensor_pb2.SaveCheckpointRequest(path=path)
    policy, value = await asyncio.gather(
        clients.call(clients.policy.SaveCheckpoint, request), clients.call(clients.value.SaveCheckpoint, request)
    )
    return {"policy": policy.path, "value": value.path}


async def run_controller(cfg: ControllerConfig, on_step: Callable[[StepResult], None] | None = None) -> PPORunner:
    """Serve Status, connect, run cfg.ppo.total_steps iterations, write stats.jsonl, checkpoint."""
    servicer = ControllerServicer(cfg)
    server, port = await start_controller_server(servicer)
    log.info("controller listening on %s:%d", cfg.server.host, port)
    clients = None
    try:
        prompts = read_texts(cfg.data.prompts, "prompt")
        ptx = read_texts(cfg.data.ptx, "text") if cfg.data.ptx else None
        clients = await connect(cfg)
        runner = servicer.runner = PPORunner(cfg, clients, prompts, ptx)
        servicer.state = "running"
        out = pathlib.Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "stats.jsonl", "a") as stats_file:
            for _ in range(cfg.ppo.total_steps):
                result = await runner.step()
                stats_file.write(json.dumps(result.stats) + "\n")
                stats_file.flush()
                if on_step:
                    on_step(result)
        if cfg.save_checkpoint:
            log.info("checkpoints: %s", await save_final(clients, cfg.save_checkpoint))
        servicer.state = "finished"
        return runner
    except BaseException as error:
        servicer.state, servicer.error = "failed", str(error)
        raise
    finally:
        if clients is not None:
            await clients.close()
        await server.stop(1)
