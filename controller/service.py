"""The controller process: ControllerService (Status, Evaluate) plus the run it reports on."""

import asyncio
import logging
import signal
import time
import uuid
from typing import Callable

from grpc_health.v1 import health_pb2

from controller.clients import ServiceClients, check_shared_tokenizer
from controller.config import ControllerConfig
from controller.data import read_texts
from controller.dpo import DPORunner
from controller.driver import Driver, resume_point
from controller.durability import RunDirectory
from controller.evaluation import Pair, compare_async, summarize
from controller.grpo import CriticFreeRunner
from controller.loop import PPORunner, StepResult
from controller.metrics import ControllerMetrics
from rlhf.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from services.errors import NotReady
from services.metrics import metrics_port
from services.serving import build_server

log = logging.getLogger(__name__)


class ControllerServicer(controller_pb2_grpc.ControllerServiceServicer):
    """Reports the run's state and runs reward-model comparison evaluations."""

    def __init__(self, cfg: ControllerConfig, eval_pairs: list[Pair] | None = None,
                 metrics: ControllerMetrics | None = None):
        self.cfg = cfg
        self.metrics = (metrics or ControllerMetrics()).attach(self)
        self.state = "starting"
        self.error = ""
        self.runner: PPORunner | DPORunner | None = None
        self.clients: ServiceClients | None = None
        self.eval_pairs = eval_pairs or []
        self.last_evaluation: controller_pb2.EvaluateResponse | None = None
        self.driver: Driver | None = None

    async def after_step(self, result: StepResult) -> None:
        """The periodic RM evaluation (its figures join the step's stats), then the step's metrics."""
        total = self.cfg.total_steps()
        step = self.runner.step_count
        if self.eval_pairs and (step % self.cfg.evaluation.every == 0 or step == total):
            e = await self.evaluate()
            result.stats.update({"eval/rm_accuracy": e.accuracy, "eval/rm_mean_margin": e.mean_margin,
                                 "eval/rm_ece": e.ece})
        self.metrics.observe_step(result.stats)

    def waiting(self) -> tuple[str, float, str]:
        """(service, since, last error) the run waits for now, or ("", 0, "")."""
        outage = self.clients.outage if self.clients is not None else None
        if not outage or not outage.since:
            return "", 0.0, ""
        role = min(outage.since, key=outage.since.get)
        return role, outage.since[role], outage.errors.get(role, "")

    async def evaluate(self) -> controller_pb2.EvaluateResponse:
        """Score the held-out pairs with the reward service; keep the result for Status."""
        if not self.eval_pairs:
            raise NotReady("no evaluation.pairs configured")
        if self.clients is None or "reward" not in self.clients.roles:
            raise NotReady("the controller is not connected to a reward service yet")
        start = time.perf_counter()
        chosen, rejected = await compare_async(self.clients, self.eval_pairs, self.cfg.evaluation.chunk)
        s = summarize(chosen, rejected)
        self.last_evaluation = controller_pb2.EvaluateResponse(
            accuracy=s["accuracy"], mean_margin=s["mean_margin"], ece=s["ece"], pairs=s["pairs"],
            step=self.runner.step_count if self.runner else 0, seconds=time.perf_counter() - start)
        return self.last_evaluation

    async def Evaluate(self, request, context):
        return await self.evaluate()

    def current_state(self) -> str:
        """The run's state; "waiting" while a running run retries a service that is away."""
        return "waiting" if self.state == "running" and self.waiting()[0] else self.state

    async def Status(self, request, context):
        r, d = self.runner, self.driver
        stats = {k: float(v) for k, v in (r.last_stats if r else {}).items() if isinstance(v, (int, float))}
        role, since, error = self.waiting()
        return controller_pb2.StatusResponse(
            run_id=r.run_id if r else "", state=self.current_state(), step=r.step_count if r else 0,
            total_steps=self.cfg.total_steps(), policy_version=r.policy_version if r else 0,
            stats=stats, error=self.error, algorithm=self.cfg.algorithm, last_evaluation=self.last_evaluation,
            waiting_for=role, waiting_since=since, last_error=error,
            checkpoint_step=d.checkpoint_step if d else -1, restores=d.restores if d else 0,
            phase=r.phase if r else "idle",
        )


async def start_controller_server(servicer: ControllerServicer):
    """ControllerService + health + reflection on the configured port (services' server builder); (server, port)."""
    s = servicer.cfg.server
    name = controller_pb2.DESCRIPTOR.services_by_name["ControllerService"].full_name
    server, health_servicer, port = build_server(
        [(servicer, controller_pb2_grpc.add_ControllerServiceServicer_to_server)], [name],
        [servicer.metrics.interceptor], s, s.port)
    servicer.metrics.serve(s.host, metrics_port(s.metrics_port, s.port, "controller"))
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port


async def connect(cfg: ControllerConfig) -> ServiceClients:
    """Clients of the run's services, once all report SERVING and share a tokenizer."""
    endpoints = {role: getattr(cfg.services, role) for role in cfg.roles() if role != "reward"}
    if "reward" in cfg.roles():
        endpoints |= {pool: target for pool, target, _, _ in cfg.reward_sources()}
    clients = ServiceClients(endpoints, cfg.rpc_timeout_seconds, cfg.rpc_retries, cfg.probe_seconds,
                             cfg.services.restart_timeout_seconds, security=cfg.services)
    try:
        await clients.wait_ready(cfg.ready_timeout_seconds)
        check_shared_tokenizer(await clients.infos())
        check_minibatches(cfg, clients)
    except BaseException:
        await clients.close()
        raise
    return clients


def check_minibatches(cfg: ControllerConfig, clients: ServiceClients) -> None:
    """Every data-parallel rank needs at least one row of each minibatch."""
    rows = cfg.dpo.batch_size if cfg.algorithm == "dpo" else cfg.ppo.minibatch_size
    for role in ("policy", "value"):
        if role in clients.roles and clients.ranks(role) > rows:
            raise ValueError(f"{role} runs {clients.ranks(role)} data-parallel ranks but each minibatch has only "
                             f"{rows} rows: raise the minibatch size to at least the number of ranks")


async def save_final(clients: ServiceClients, path: str) -> dict[str, str]:
    """SaveCheckpoint on the trainable services (rank 0 of a group: every rank holds the same weights).

    The name is the config's: each run replaces the checkpoint of that name.
    """
    request = common_pb2.SaveCheckpointRequest(path=path, overwrite=True)
    roles = [r for r in ("policy", "value") if r in clients.roles]
    replies = await asyncio.gather(*(clients.on_rank(r, 0, lambda s: s.SaveCheckpoint, request) for r in roles))
    return {role: reply.path for role, reply in zip(roles, replies)}


async def release(clients: ServiceClients, lease: common_pb2.Lease) -> None:
    """End the finished run's lease on every rank of the trained services, so the next run need not wait for
    it to expire; a failure only delays the next run, so it is logged."""
    request = common_pb2.ReleaseRequest(lease=lease)
    for role in (r for r in ("policy", "value") if r in clients.roles):
        try:
            await clients.each_rank(role, lambda s: s.Release, [request] * clients.ranks(role))
        except Exception as error:  # noqa: BLE001 - the lease then expires by itself
            log.warning("could not release the %s lease (%s); it expires after training.lease_seconds", role, error)


def load_data(cfg: ControllerConfig) -> dict:
    """Prompts (PPO), pairs (DPO), held-out evaluation pairs and PPO-ptx text, per the config."""
    from training.datasets import load_pairs, load_prompts, to_pairs

    skip = cfg.data.skip_bad_rows

    def pairs(source):
        records, report = load_pairs(source, skip_bad_rows=skip)
        log.info("%s", report.summary())
        return [Pair(p.prompt, p.chosen, p.rejected) for p in to_pairs(records)]

    data: dict = {"ptx": read_texts(cfg.data.ptx, "text") if cfg.data.ptx else None, "eval_pairs": []}
    if cfg.data.prompts:
        data["prompts"], report = load_prompts(cfg.data.prompts, skip_bad_rows=skip)
        log.info("%s", report.summary())
    if cfg.data.pairs:
        data["pairs"] = pairs(cfg.data.pairs)
    if cfg.evaluation.pairs:
        data["eval_pairs"] = pairs(cfg.evaluation.pairs)[: cfg.evaluation.max_pairs]
    return data


def make_runner(cfg: ControllerConfig, clients: ServiceClients, data: dict) -> PPORunner | DPORunner:
    """The configured algorithm's runner."""
    if cfg.algorithm == "ppo":
        return PPORunner(cfg, clients, data["prompts"], data["ptx"])
    if cfg.critic_free_run():
        return CriticFreeRunner(cfg, clients, data["prompts"], data["ptx"])
    return DPORunner(cfg, clients, data["pairs"])


async def run_controller(cfg: ControllerConfig, on_step: Callable[[StepResult], None] | None = None,
                         metrics: ControllerMetrics | None = None, handle_sigterm: bool = False):
    """Serve Status/Evaluate, connect, run the configured algorithm with run checkpoints, save the final models.

    Starts a new run or resumes one per `checkpoint.resume` (controller/driver.py:resume_point).
    handle_sigterm: SIGTERM stops the run at the next step boundary with a checkpoint (RunStopped).
    The /metrics endpoint stops at the end unless the caller passed `metrics` (then it is the caller's).
    """
    files = RunDirectory(cfg.output_dir, cfg.checkpoint.keep)
    checkpoint = resume_point(cfg, files)
    cfg = cfg.model_copy(update={"run_id": checkpoint["run_id"] if checkpoint else cfg.run_id or uuid.uuid4().hex[:12]})
    data = load_data(cfg)
    servicer = ControllerServicer(cfg, data["eval_pairs"], metrics)
    server, port = await start_controller_server(servicer)
    log.info("controller listening on %s:%d (run %s)", cfg.server.host, port, cfg.run_id)
    loop = asyncio.get_running_loop()
    try:
        clients = servicer.clients = await connect(cfg)
        runner = servicer.runner = make_runner(cfg, clients, data)
        if checkpoint is not None:  # the resumed run keeps its lease on the trainers
            runner.lease_secret = (files.run_info() or {}).get("lease_secret", runner.lease_secret)
        driver = servicer.driver = Driver(cfg, servicer, runner, files, on_step)
        if handle_sigterm:
            loop.add_signal_handler(signal.SIGTERM, driver.request_stop)
        await driver.begin(checkpoint)
        servicer.state = "running"
        servicer.metrics.run_started()
        await driver.run()
        if cfg.save_checkpoint:
            log.info("checkpoints: %s", await save_final(clients, cfg.save_checkpoint))
        await release(clients, runner.lease())
        servicer.state = "finished"
        return runner
    except BaseException as error:
        servicer.state, servicer.error = "failed", str(error)
        raise
    finally:
        if handle_sigterm:
            loop.remove_signal_handler(signal.SIGTERM)
        if servicer.clients is not None:
            await servicer.clients.close()
        await server.stop(1)
        if metrics is None:
            servicer.metrics.close()
