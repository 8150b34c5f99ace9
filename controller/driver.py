"""The run loop: steps, run checkpoints, going back to one when a trained service restarted, SIGTERM.

`Driver.run` takes the runner (PPO or DPO) from its current step to the end:

- every `checkpoint.every` steps, at the start and at the end it writes a run
  checkpoint (controller/durability.py): the policy and value save their
  training state at the step (SaveCheckpoint with training_state), then the
  controller writes its own state, last;
- when a trained service answers from a new process or with a version it
  should not have (ServiceRestarted), it waits for the services, has policy
  and value load the last checkpoint (LoadCheckpoint), puts its own state
  back, cuts stats.jsonl back and goes on from there;
- on SIGTERM it stops at the next step boundary (a step still generating is
  abandoned, one that is training finishes), writes a checkpoint and raises
  RunStopped.
"""

import asyncio
import logging
import pathlib
from typing import Callable

from google.protobuf import json_format

from controller.config import ControllerConfig
from controller.durability import TRAINED, ResumeRefused, RunDirectory, RunStopped, ServiceRestarted, service_state_name
from rlhf.v1 import common_pb2, controller_pb2

log = logging.getLogger(__name__)


class Driver:
    """Runs one run's steps with checkpoints and restores; `servicer` reports it (ControllerServicer)."""

    def __init__(self, cfg: ControllerConfig, servicer, runner, files: RunDirectory,
                 on_step: Callable | None = None):
        self.cfg = cfg
        self.servicer = servicer
        self.runner = runner
        self.clients = runner.clients
        self.files = files
        self.on_step = on_step
        self.checkpoint_step = -1
        self.restores = 0
        self.stop = asyncio.Event()
        self._step_task: asyncio.Task | None = None

    def trained_roles(self) -> list[str]:
        """The services whose training state a checkpoint holds, in this run."""
        return [role for role in TRAINED if role in self.clients.roles]

    # ---- checkpoints -------------------------------------------------------------------------

    async def save(self) -> None:
        """Write a run checkpoint at the runner's current step (services first, the controller's file last)."""
        step, run_id = self.runner.step_count, self.runner.run_id
        path = service_state_name(step)
        request = common_pb2.SaveCheckpointRequest(path=path, training_state=True, keep=self.cfg.checkpoint.keep + 1,
                                                   lease=self.runner.lease(), overwrite=True)
        services = {}
        for role in self.trained_roles():  # keep + 1: the newest may not be referenced by a checkpoint yet
            ranks = self.clients.ranks(role)
            replies = await self.clients.each_rank(role, lambda s: s.SaveCheckpoint, [request] * ranks)
            services[role] = {"path": path, "model_version": replies[0].model_version, "ranks": ranks}
        evaluation = self.servicer.last_evaluation
        self.files.write({
            "run_id": run_id, "algorithm": self.cfg.algorithm, "step": step, "runner": self.runner.state_dict(),
            "stats_size": self.files.stats.size, "services": services,
            "evaluation": json_format.MessageToDict(evaluation) if evaluation is not None else None,
        })
        self.checkpoint_step = step
        log.info("run checkpoint at step %d (%s)", step,
                 ", ".join(f"{r} version {s['model_version']}" for r, s in services.items()))

    async def restore(self, checkpoint: dict) -> None:
        """Put the services and the controller back to `checkpoint`."""
        await self.clients.wait_ready(self.cfg.services.restart_timeout_seconds)
        self.clients.watch.reset(await self.clients.infos(), {})  # the processes as they are now
        versions = {}
        for role, saved in checkpoint["services"].items():
            ranks = self.clients.ranks(role)
            if ranks != saved["ranks"]:
                raise ResumeRefused(f"{role} runs {ranks} data-parallel rank(s); the checkpoint of step "
                                    f"{checkpoint['step']} was made with {saved['ranks']}")
            # a name under the run's directory (older checkpoints stored runs/<run_id>/NAME)
            request = common_pb2.LoadCheckpointRequest(path=pathlib.PurePath(saved["path"]).name,
                                                       lease=self.runner.lease())
            replies = await self.clients.each_rank(role, lambda s: s.LoadCheckpoint, [request] * ranks)
            got = {reply.model_version for reply in replies}
            if got != {saved["model_version"]}:
                raise RuntimeError(f"{role} loaded {saved['path']} but reports model version(s) {sorted(got)}, "
                                   f"not {saved['model_version']}")
            versions[role] = saved["model_version"]
        self.runner.load_state_dict(checkpoint["runner"])
        self.files.stats.truncate(checkpoint["stats_size"])
        if checkpoint.get("evaluation"):
            self.servicer.last_evaluation = json_format.ParseDict(checkpoint["evaluation"],
                                                                  controller_pb2.EvaluateResponse())
        self.clients.watch.versions = versions
        self.checkpoint_step = checkpoint["step"]

    async def begin(self, checkpoint: dict | None) -> None:
        """Resume from `checkpoint`, or start a new run (services must be untrained) and checkpoint step 0."""
        if checkpoint is not None:
            log.info("resuming run %s from its checkpoint of step %d", checkpoint["run_id"], checkpoint["step"])
            await self.restore(checkpoint)
            return
        infos = await self.clients.infos()
        trained = {role: infos[role][0].model_version for role in self.trained_roles()}
        for role, version in trained.items():
            if version != 0:
                raise ResumeRefused(f"{role} has applied {version} optimizer step(s) already: start it afresh, or "
                                    "continue the run that trained it with --resume")
        self.clients.watch.reset(infos, trained)
        self.files.start(self.runner.run_id, self.cfg.algorithm, self.runner.lease_secret)
        await self.save()

    # ---- the loop ----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """SIGTERM: stop at the next step boundary; a step that has not started training is abandoned now."""
        if not self.stop.is_set():
            log.warning("SIGTERM: stopping at the next step boundary to write a checkpoint")
            self.stop.set()
            self.servicer.state = "stopping"
        if self._step_task is not None and self.runner.phase in ("generate", "score"):
            self._step_task.cancel()

    async def _one_step(self):
        """One step, or None when it was abandoned (SIGTERM before its training) and the runner rewound."""
        before = self.runner.state_dict()
        self._step_task = asyncio.create_task(self.runner.step())
        try:
            return await self._step_task
        except asyncio.CancelledError:
            if not self.stop.is_set():
                raise
            self.runner.load_state_dict(before)  # no Train of the step was sent: nothing to undo elsewhere
            return None
        finally:
            self._step_task = None

    async def _go_back(self, restarted: ServiceRestarted) -> None:
        """A trained service restarted: back to the last checkpoint (bounded by checkpoint.max_restores)."""
        self.servicer.state = "restoring"
        while True:
            self.restores += 1
            if self.restores > self.cfg.checkpoint.max_restores:
                raise RuntimeError(f"{restarted}; the run went back to a checkpoint {self.restores - 1} times "
                                   f"already (checkpoint.max_restores)") from None
            checkpoint = self.files.latest()
            log.warning("%s: going back to the checkpoint of step %d", restarted, checkpoint["step"])
            try:
                await self.restore(checkpoint)
                break
            except ServiceRestarted as again:  # another restart while restoring: start the restore over
                restarted = again
        self.servicer.state = "running"

    async def run(self) -> None:
        """Steps to the end, with checkpoints; RunStopped on SIGTERM."""
        total, every = self.cfg.total_steps(), self.cfg.checkpoint.every
        while True:
            if self.runner.step_count >= total or self.stop.is_set():
                if self.runner.step_count == self.checkpoint_step or await self._checkpoint_or_go_back():
                    break
                continue
            try:
                result = await self._one_step()
            except ServiceRestarted as restarted:
                await self._go_back(restarted)
                continue
            if result is None:  # abandoned on SIGTERM: the loop checkpoints next
                continue
            await self.servicer.after_step(result)
            self.files.stats.append(result.stats)
            if self.on_step:
                self.on_step(result)
            if every and self.runner.step_count % every == 0 and self.runner.step_count < total:
                await self._checkpoint_or_go_back()
        if self.stop.is_set():
            raise RunStopped(f"stopped by SIGTERM at step {self.runner.step_count} of {total}; checkpoint written "
                             f"to {self.files.checkpoints}; continue with --resume")

    async def _checkpoint_or_go_back(self) -> bool:
        """Checkpoint now (True); a service that restarted meanwhile sends the run back instead (False)."""
        try:
            await self.save()
        except ServiceRestarted as restarted:
            await self._go_back(restarted)
            return False
        return True


def resume_point(cfg: ControllerConfig, files: RunDirectory) -> dict | None:
    """The checkpoint to continue from (None: a new run), per checkpoint.resume; ResumeRefused when they clash."""
    latest, mode = files.latest(), cfg.checkpoint.resume
    if latest is None:
        if mode == "yes":
            raise ResumeRefused(f"--resume: no complete run checkpoint under {files.checkpoints}")
        return None
    held = f"{files.root} holds run {latest['run_id']!r} ({latest['algorithm']}, checkpoint of step {latest['step']})"
    if mode == "no":
        raise ResumeRefused(f"{held}: continue it with --resume, or choose another output_dir")
    if cfg.run_id and cfg.run_id != latest["run_id"]:
        raise ResumeRefused(f"{held}, not run {cfg.run_id!r}: choose another output_dir")
    if latest["algorithm"] != cfg.algorithm:
        raise ResumeRefused(f"{held}: it cannot continue as {cfg.algorithm}")
    return latest
