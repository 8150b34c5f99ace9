"""Shared fixtures: a tiny model built locally, and model services on loopback ports."""

import asyncio
import pathlib
import threading

import grpc
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from demo import task, tiny
from services.config import ServiceConfig
from services.registry import SERVICES
from services.server import GRPC_OPTIONS, serve


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """A tiny GPT-2 causal LM and a one-label reward model sharing a locally trained tokenizer."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tokenizer = tiny.build_tokenizer(task.corpus_texts(0), root / "tokenizer")
    lm = pathlib.Path(tiny.build_tiny_lm(tokenizer, root / "lm"))
    rm = AutoModelForSequenceClassification.from_pretrained(lm, num_labels=1)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    return {"lm": lm, "rm": root / "rm", "root": root}


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

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=GRPC_OPTIONS)

    def stop(self):
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


def service_config(role: str, path, **overrides) -> ServiceConfig:
    """A loopback config for `role` on an ephemeral port."""
    data = {
        "role": role,
        "model": {"path": str(path)},
        "server": {"host": "127.0.0.1", "port": 0, "num_threads": 1, "grace_seconds": 1},
        "training": {"learning_rate": 1e-3, "micro_batch_size": 4},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return ServiceConfig.model_validate(data)


@pytest.fixture(scope="session")
def services(tiny_dirs, tmp_path_factory):
    """All four services, started once for the integration tests."""
    ckpt = tmp_path_factory.mktemp("checkpoints")
    paths = {"policy": tiny_dirs["lm"], "reference": tiny_dirs["lm"], "reward": tiny_dirs["rm"], "value": tiny_dirs["rm"]}
    running = {}
    try:
        for role, path in paths.items():
            running[role] = ServerThread(service_config(role, path, server={"checkpoint_dir": str(ckpt)})).start()
        yield running
    finally:
        for server in running.values():
            server.stop()


@pytest.fixture(scope="session")
def sft_dir(tiny_dirs) -> pathlib.Path:
    """The tiny LM after a short SFT on the demo's synthetic instructions."""
    from training.sft import train_sft

    out = tiny_dirs["root"] / "sft"
    train_sft(tiny_dirs["lm"], task.sft_examples(1500, seed=0), out, epochs=1, seed=0, progress=False)
    return out
