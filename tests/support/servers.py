"""Model services in this process: one per background thread, on an ephemeral loopback port."""

import asyncio
import threading
from typing import Self

import grpc

from services.channels import GRPC_OPTIONS, open_channel
from services.config import ClientSecurity, ServiceConfig
from services.registry import SERVICES
from services.serving import serve


class ServerThread:
    """A model service on an ephemeral loopback port, in a background thread with its own event loop."""

    def __init__(self, cfg: ServiceConfig, gate: threading.Event | None = None):
        self.cfg = cfg
        self.gate = gate  # when given, loading the weights waits for it
        self.bound = threading.Event()
        self.servicer_cls, self.add = SERVICES[cfg.role]
        self.servicer = None
        self.port = None
        self._ready = threading.Event()
        self._loop = None
        self._stop = None
        self._error = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as error:  # noqa: BLE001 - surfaced by start()
            self._error = error
            self._ready.set()

    async def _main(self):
        self._stop = asyncio.Event()
        self.servicer = self.servicer_cls(self.cfg)

        def bound(port):
            self.port = port
            self.bound.set()

        original_load = self.servicer.load

        def load_then_signal():
            if self.gate is not None:
                self.gate.wait(60)
            original_load()
            self._ready.set()

        self.servicer.load = load_then_signal
        await serve(self.servicer, self.add, stop=self._stop, on_bound=bound)

    def start(self, timeout: float = 300, wait: bool = True) -> "ServerThread":
        self._thread.start()
        if not wait:
            self.bound.wait(timeout)
            return self
        if not self._ready.wait(timeout) or self._error:
            raise RuntimeError(f"{self.cfg.role} service failed to start: {self._error!r}")
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self, security: ClientSecurity | None = None) -> grpc.Channel:
        """A blocking channel; with `security`, its TLS and token (else plain text, no token)."""
        if security is None:
            return grpc.insecure_channel(self.address, options=GRPC_OPTIONS)
        return open_channel(self.address, security, aio=False)

    def stop(self):
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def service_config(role: str, path, **overrides) -> ServiceConfig:
    """A loopback config for `role` on an ephemeral port."""
    data = {
        "role": role,
        "model": {"path": str(path)},
        # freeze_gc off: gc.freeze() acts on the whole process, here the test runner (test_serving covers it)
        "server": {"host": "127.0.0.1", "port": 0, "num_threads": 1, "grace_seconds": 1, "freeze_gc": False},
        "training": {"learning_rate": 1e-3, "micro_batch_size": 4},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return ServiceConfig.model_validate(data)
