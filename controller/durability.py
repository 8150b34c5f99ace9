"""What lets a run survive the loss of any process: run checkpoints, the stats log, restart detection.

A run's output directory holds:

    run.json                      the run id and algorithm, written when the run starts
    stats.jsonl                   one line per completed step
    checkpoints/step-N.json       a run checkpoint: the controller's state at step N (prompt order and
                                  generator, KL coefficient, reward moments, evaluation, the length of
                                  stats.jsonl) and where the policy and value services saved their full
                                  training state at the same step (runs/<run_id>/step-N under their
                                  checkpoint_dir, services/checkpoint.py)

A checkpoint file is written last, to a temporary name, fsynced and renamed,
after every service confirmed its own state: a checkpoint that exists is
complete. Resuming loads the newest one, has the services load their part and
cuts stats.jsonl back to the checkpoint's length, so every step is in it once.
"""

import base64
import json
import logging
import pathlib
import re

import torch

from services.training_state import write_json_atomically

log = logging.getLogger(__name__)

TRAINED = ("policy", "value")  # the services whose state a checkpoint holds
_STEP_FILE = re.compile(r"step-(\d+)\.json")


class ServiceRestarted(RuntimeError):
    """A trained service answered from another process (instance id) or with a version it should not have."""

    def __init__(self, role: str, why: str):
        super().__init__(f"{role} {why}")
        self.role = role


class RunStopped(RuntimeError):
    """The run stopped on SIGTERM after writing a checkpoint; it continues with --resume."""


class ResumeRefused(ValueError):
    """The output directory and the requested start do not fit (another run's checkpoints, none to resume)."""


def encode_generator(generator: torch.Generator) -> str:
    """A torch.Generator's state as text."""
    return base64.b64encode(bytes(generator.get_state().tolist())).decode()


def decode_generator(generator: torch.Generator, text: str) -> None:
    """Set `generator` to a state `encode_generator` wrote."""
    generator.set_state(torch.tensor(list(base64.b64decode(text)), dtype=torch.uint8))


def service_state_name(step: int) -> str:
    """The name of a trained service's state for step `step` (it lives in checkpoint_dir/runs/<run_id>/)."""
    return f"step-{step}"


class StatsLog:
    """stats.jsonl: one JSON line per step, appended and flushed; cut back to a checkpoint's length on resume."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.path.touch()

    @property
    def size(self) -> int:
        """Bytes written so far (a checkpoint records it)."""
        return self.path.stat().st_size

    def append(self, stats: dict) -> None:
        """Write one step's statistics."""
        with open(self.path, "a") as handle:
            handle.write(json.dumps(stats) + "\n")

    def truncate(self, size: int) -> None:
        """Drop every line written after a checkpoint of length `size`."""
        with open(self.path, "r+") as handle:
            handle.truncate(size)


class RunDirectory:
    """The output directory of one run: its id, stats log and checkpoints."""

    def __init__(self, output_dir: str, keep: int):
        self.root = pathlib.Path(output_dir)
        self.checkpoints = self.root / "checkpoints"
        self.keep = keep
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.stats = StatsLog(self.root / "stats.jsonl")

    def run_info(self) -> dict | None:
        """run.json, if a run started here."""
        path = self.root / "run.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def start(self, run_id: str, algorithm: str, lease_secret: str) -> None:
        """Record a new run here, with an empty stats log; the lease secret stays here for a resume."""
        for old in self.checkpoints.glob("step-*.json"):
            old.unlink()
        self.stats.truncate(0)
        write_json_atomically(self.root / "run.json", {"run_id": run_id, "algorithm": algorithm,
                                                       "lease_secret": lease_secret})

    def _files(self) -> list[tuple[int, pathlib.Path]]:
        """(step, path) of every checkpoint file, oldest first."""
        return sorted((int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := _STEP_FILE.fullmatch(p.name)))

    def latest(self) -> dict | None:
        """The newest complete run checkpoint, or None."""
        for _, path in reversed(self._files()):
            try:
                return json.loads(path.read_text())
            except ValueError:  # cannot happen with the atomic rename; skip rather than fail the resume
                log.warning("skipping unreadable checkpoint %s", path)
        return None

    def write(self, checkpoint: dict) -> pathlib.Path:
        """Write checkpoint step-N.json atomically, then remove all but the `keep` newest."""
        path = self.checkpoints / f"step-{checkpoint['step']}.json"
        write_json_atomically(path, checkpoint)
        for _, old in self._files()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path


class InstanceWatch:
    """The process and model version each trained service should answer from.

    Every reply the controller uses passes `check`: a trained service that
    answers from another process (it restarted) or with another version
    raises ServiceRestarted, so that the run goes back to its last checkpoint
    instead of training on reset weights. Frozen services are not watched.
    """

    def __init__(self):
        self.instances: dict[str, set[str]] = {}
        self.versions: dict[str, int] = {}

    def reset(self, infos: dict[str, list], versions: dict[str, int]) -> None:
        """Take the trained services' current instances (Info of every rank) and versions as the expected ones."""
        self.instances = {role: {i.instance_id for i in infos[role]} for role in TRAINED if role in infos}
        self.versions = dict(versions)

    def check(self, role: str, reply) -> None:
        """Raise ServiceRestarted when `reply` comes from a process of `role` other than the expected ones."""
        instance = getattr(reply, "instance_id", "")
        if role in self.instances and instance and instance not in self.instances[role]:
            raise ServiceRestarted(role, f"answered from a new process (instance {instance[:8]}): it restarted")

    def check_version(self, role: str, version: int) -> None:
        """Raise ServiceRestarted when `role` serves a model version other than the one its last step left."""
        if role in self.versions and version != self.versions[role]:
            raise ServiceRestarted(role, f"serves model version {version}, expected {self.versions[role]}")

    def trained(self, role: str, replies: list) -> None:
        """After a Train step: the version every rank reports is the expected one from now on."""
        self.versions[role] = replies[0].model_version
