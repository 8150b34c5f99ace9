"""The four model services as local processes on loopback ports (demo, tests, benchmarks).

Each process is `rlhf serve ROLE` (`python -m cli serve ROLE`) with a YAML
written here; readiness is the standard gRPC health check, as a Kubernetes
probe would ask it.

`replicas` runs a role as several processes: independent replicas for
reference and reward, one data-parallel group (RANK/WORLD_SIZE over a
loopback rendezvous) for policy and value. A role's endpoint is then the
comma-separated list of its processes' addresses.
"""

import asyncio
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cpus import PROCESSES_ENV, set_passive_openmp

ROLES = ("policy", "reference", "reward", "value")
DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


GROUPED = ("policy", "value")  # several processes of these form one data-parallel group


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def serving(address: str, timeout: float = 1.0) -> bool:
    """Whether the gRPC server at `address` answers its health check with SERVING."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class LocalMesh:
    """Writes one YAML per service process, starts `rlhf serve ROLE` for each, stops them with SIGTERM."""

    def __init__(self, workdir: str | pathlib.Path, configs: dict[str, dict], metrics_ports: dict[str, int] | None = None,
                 replicas: dict[str, int] | None = None):
        """metrics_ports: process name -> /metrics port (0: a free one); other processes serve no metrics.

        replicas: role -> processes (default 1). A process is named after its role, or `ROLE-i`
        when the role has several.
        """
        self.workdir = pathlib.Path(workdir)
        self.configs = configs
        self.replicas = {role: (replicas or {}).get(role, 1) for role in configs}
        self.names = {role: [role] if n == 1 else [f"{role}-{i}" for i in range(n)] for role, n in self.replicas.items()}
        self.ports = {name: free_port() for names in self.names.values() for name in names}
        self.metrics_ports = {name: port or free_port() for name, port in (metrics_ports or {}).items()}
        self.processes: dict[str, subprocess.Popen] = {}
        self._commands: dict[str, tuple[list[str], dict]] = {}  # name -> (command, env), to start it again

    @property
    def metrics_endpoints(self) -> dict[str, str]:
        """process name -> 127.0.0.1:port of its /metrics endpoint."""
        return {name: f"127.0.0.1:{port}" for name, port in self.metrics_ports.items()}

    @property
    def endpoints(self) -> dict[str, str]:
        """role -> its target: 127.0.0.1:port, or a comma-separated list of its processes."""
        return {role: ",".join(f"127.0.0.1:{self.ports[n]}" for n in names) for role, names in self.names.items()}

    def _env(self, role: str, rank: int, master_port: int) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env[PROCESSES_ENV] = str(sum(self.replicas.values()))  # the services share this machine's CPUs
        set_passive_openmp(env)
        for name in DISTRIBUTED_ENV:  # by default each service forms its own torch.distributed world
            env.pop(name, None)
        if role in GROUPED and self.replicas[role] > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port), RANK=str(rank),
                       WORLD_SIZE=str(self.replicas[role]), LOCAL_RANK="0")
        return env

    def start(self) -> "LocalMesh":
        """Start every service process (they load their weights in the background)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for role, cfg in self.configs.items():
            master_port = free_port()
            for rank, name in enumerate(self.names[role]):
                self._start_process(role, name, cfg, self._env(role, rank, master_port))
        return self

    def _start_process(self, role: str, name: str, cfg: dict, env: dict) -> None:
        cfg = dict(cfg, role=role)
        cfg["server"] = dict(cfg.get("server", {}), host="127.0.0.1", port=self.ports[name],
                             metrics_port=self.metrics_ports.get(name, -1))
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        command = [sys.executable, "-m", "cli", "serve", role, "--config", str(path)]
        self._commands[name] = (command, env)
        self._spawn(name)

    def _spawn(self, name: str) -> None:
        command, env = self._commands[name]
        with open(self.workdir / f"{name}.log", "a") as log:  # a restarted process appends to the same log
            self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def kill(self, name: str) -> int:
        """SIGKILL one process (a crash, an OOM kill, a lost node) and reap it; returns its exit code."""
        proc = self.processes.pop(name)
        proc.kill()
        return proc.wait()

    def restart(self, name: str) -> None:
        """Start a process that was killed or stopped again, with the same config and port (a restarted pod)."""
        if name in self.processes and self.processes[name].poll() is None:
            raise RuntimeError(f"{name} is still running")
        self._spawn(name)

    def stop_process(self, name: str, timeout: float = 30.0) -> int:
        """SIGTERM one process (e.g. a replica) and wait for it; returns its exit code."""
        proc = self.processes.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def check_alive(self) -> None:
        """Raise RuntimeError naming a service process that exited, with its log's tail."""
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                tail = (self.workdir / f"{name}.log").read_text().splitlines()[-15:]
                raise RuntimeError(f"{name} service exited with code {proc.returncode}:\n" + "\n".join(tail))

    async def wait_ready(self, timeout: float = 600.0) -> None:
        """Wait until every service process reports SERVING; fail at once if one exits."""
        end = time.monotonic() + timeout
        waiting = {name: f"127.0.0.1:{self.ports[name]}" for name in self.processes}
        while waiting:
            self.check_alive()
            for name, address in list(waiting.items()):
                if await serving(address):
                    del waiting[name]
            if waiting and time.monotonic() > end:
                raise TimeoutError(f"not serving after {timeout:.0f}s: {', '.join(sorted(waiting))}")
            if waiting:
                await asyncio.sleep(0.3)

    def stop(self, timeout: float = 30.0) -> dict[str, int]:
        """SIGTERM every service, wait for the drain, return exit codes."""
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        deadline = time.monotonic() + timeout
        for name, proc in self.processes.items():
            try:
                codes[name] = proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes

    def __enter__(self) -> "LocalMesh":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
