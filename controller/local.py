"""The four model services as local processes on loopback ports (demo, tests, benchmarks)."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import yaml

from services.engine import free_port

ROLES = ("policy", "reference", "reward", "value")
DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


class LocalMesh:
    """Writes one YAML per service, starts `rlhf serve ROLE` for each, stops them with SIGTERM."""

    def __init__(self, workdir: str | pathlib.Path, configs: dict[str, dict], metrics_ports: dict[str, int] | None = None):
        """metrics_ports: role -> /metrics port (0: a free one); other roles serve no metrics."""
        self.workdir = pathlib.Path(workdir)
        self.configs = configs
        self.ports = {role: free_port() for role in configs}
        self.metrics_ports = {role: port or free_port() for role, port in (metrics_ports or {}).items()}
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def metrics_endpoints(self) -> dict[str, str]:
        """role -> 127.0.0.1:port of its /metrics endpoint."""
        return {role: f"127.0.0.1:{port}" for role, port in self.metrics_ports.items()}

    @property
    def endpoints(self) -> dict[str, str]:
        """role -> 127.0.0.1:port."""
        return {role: f"127.0.0.1:{port}" for role, port in self.ports.items()}

    def start(self) -> "LocalMesh":
        """Start every service process (they load their weights in the background)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for name in DISTRIBUTED_ENV:  # each service forms its own torch.distributed world
            env.pop(name, None)
        for role, cfg in self.configs.items():
            cfg = dict(cfg, role=role)
            cfg["server"] = dict(cfg.get("server", {}), host="127.0.0.1", port=self.ports[role],
                                 metrics_port=self.metrics_ports.get(role, -1))
            path = self.workdir / f"{role}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            log = open(self.workdir / f"{role}.log", "w")
            command = [sys.executable, "-m", "controller.cli", "serve", role, "--config", str(path)]
            self.processes[role] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def check_alive(self) -> None:
        """Raise RuntimeError naming a service process that exited, with its log's tail."""
        for role, proc in self.processes.items():
            if proc.poll() is not None:
                tail = (self.workdir / f"{role}.log").read_text().splitlines()[-15:]
                raise RuntimeError(f"{role} service exited with code {proc.returncode}:\n" + "\n".join(tail))

    async def wait_ready(self, timeout: float = 600.0) -> None:
        """Wait until every service reports SERVING; fail at once if one exits."""
        from controller.clients import ServiceClients

        clients = ServiceClients(self.endpoints)
        try:
            await clients.wait_ready(timeout, check=self.check_alive)
        finally:
            await clients.close()

    def stop(self, timeout: float = 30.0) -> dict[str, int]:
        """SIGTERM every service, wait for the drain, return exit codes."""
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        deadline = time.monotonic() + timeout
        for role, proc in self.processes.items():
            try:
                codes[role] = proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[role] = proc.wait()
        return codes

    def __enter__(self) -> "LocalMesh":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
