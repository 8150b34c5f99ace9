"""A PPO run whose controller is a real `rlhf controller` process, watched through ControllerService.Status.

Faults are injected the way Kubernetes delivers them: SIGKILL of a process at
a chosen point of the run (a phase of a step, seen in Status), and the process
started again on the same port a second later.
"""

import json
import pathlib
import signal
import subprocess
import sys
import time

import grpc
import yaml

from rlhf.v1 import controller_pb2, controller_pb2_grpc
from services.launcher import LocalMesh, free_port

STEPS, EVERY = 6, 2  # PPO iterations per run; a run checkpoint every EVERY steps


class ControllerRun:
    """One run: its YAML, its controller process(es), its output directory."""

    def __init__(self, mesh: LocalMesh, work: pathlib.Path, name: str, restart_timeout: float = 120.0):
        self.work = work / name
        self.work.mkdir(parents=True)
        self.name = name
        self.port = free_port()
        self.config = self.work / "controller.yaml"
        self.config.write_text(yaml.safe_dump({
            "run_id": name, "services": {**mesh.endpoints, "restart_timeout_seconds": restart_timeout},
            "data": {"prompts": str(work / "prompts.jsonl")}, "output_dir": str(self.work / "out"),
            "server": {"host": "127.0.0.1", "port": self.port, "metrics_port": -1},
            "save_checkpoint": f"final-{name}", "ready_timeout_seconds": 120, "probe_seconds": 0.25,
            "checkpoint": {"every": EVERY, "keep": 2},
            "ppo": {"total_steps": STEPS, "batch_size": 8, "minibatch_size": 4, "ppo_epochs": 2, "max_new_tokens": 8},
        }))
        self.process: subprocess.Popen | None = None
        self.statuses: list[controller_pb2.StatusResponse] = []

    def start(self, *args: str) -> None:
        """Start `rlhf controller` (with extra flags such as --resume); its stderr goes to controller.log."""
        with open(self.work / "controller.log", "a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "cli", "controller", "--config", str(self.config),
                                             *args], stdout=log, stderr=subprocess.STDOUT)

    def status(self) -> controller_pb2.StatusResponse | None:
        """Status now, or None while the controller does not answer."""
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            try:
                reply = controller_pb2_grpc.ControllerServiceStub(channel).Status(
                    controller_pb2.StatusRequest(), timeout=2)
            except grpc.RpcError:
                return None
        self.statuses.append(reply)
        return reply

    def wait_for(self, condition, timeout: float = 120.0) -> controller_pb2.StatusResponse:
        """Poll Status every 5 ms until `condition(status)`; fails if the controller exits first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            reply = self.status()
            if reply is not None and condition(reply):
                return reply
            if self.process.poll() is not None:
                raise AssertionError(f"controller exited ({self.process.returncode}) first:\n{self.log()[-3000:]}")
            time.sleep(0.005)
        raise AssertionError(f"timed out; last status {self.statuses[-1:] }")

    def finish(self, timeout: float = 300.0) -> int:
        """Wait for the controller to exit; its exit code."""
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the controller."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def log(self) -> str:
        return (self.work / "controller.log").read_text()

    def stats(self) -> list[dict]:
        """stats.jsonl, one dict per line."""
        return [json.loads(line) for line in (self.work / "out" / "stats.jsonl").read_text().splitlines()]


def in_phase(phase: str, from_step: int = 3):
    """A Status condition: the run is in `phase` of a step at or after `from_step`."""
    return lambda s: s.state == "running" and s.phase == phase and s.step >= from_step
