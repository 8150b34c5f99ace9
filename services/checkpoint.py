"""SaveCheckpoint and LoadCheckpoint, inside the service's checkpoint_dir.

A plain SaveCheckpoint writes what from_pretrained loads. With
`training_state` every rank of a trainable service writes PATH/rank-R/: its
weights, optimizer state, model version, RNG state and applied Train keys
(services/training_state.py), into a temporary directory renamed into place
once its manifest is written, so a crash leaves either the old state or the
new one. LoadCheckpoint reads a complete one back.
"""

import pathlib
import re
import shutil
import uuid

import torch
from safetensors.torch import load_file, save_file

from rlhf.v1 import common_pb2
from services import training_state
from services.errors import InvalidArgument, Refused

WEIGHTS = "weights.safetensors"


def checkpoint_path(root: str, requested: str, version: int) -> pathlib.Path:
    """Resolve a client's relative path under `root`; refuse anything that escapes it."""
    base = pathlib.Path(root).resolve()
    relative = requested or f"version-{version}"
    if pathlib.PurePath(relative).is_absolute():
        raise InvalidArgument("path", f"must be relative to the service's checkpoint_dir, got {relative!r}")
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise InvalidArgument("path", f"{relative!r} leaves the checkpoint_dir")
    return target


def checkpoint_root(servicer) -> str:
    """The service's checkpoint_dir (default checkpoints/<role>)."""
    return servicer.cfg.server.checkpoint_dir or f"checkpoints/{servicer.role}"


async def save_checkpoint(servicer, request, module, tokenizer) -> common_pb2.SaveCheckpointResponse:
    """Write module + tokenizer with save_pretrained on the model thread."""
    version = servicer.model_version()
    target = checkpoint_path(checkpoint_root(servicer), request.path, version)

    def write() -> list[str]:
        target.mkdir(parents=True, exist_ok=True)
        module.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
        return sorted(p.name for p in target.iterdir())

    files = await servicer.on_model_thread(write)
    return common_pb2.SaveCheckpointResponse(path=str(target), model_version=version, files=files,
                                             instance_id=servicer.instance_id)


def save_weights(module: torch.nn.Module, path: pathlib.Path) -> None:
    """The module's state_dict as safetensors, every entry copied out (ZeRO keeps parameters as views of
    one flat buffer, and tied weights share storage, which safetensors refuses)."""
    save_file({name: t.detach().to("cpu").clone().contiguous() for name, t in module.state_dict().items()},
              str(path))


def _write_state(servicer, target: pathlib.Path) -> list[str]:
    """Write this rank's full training state to `target` (on the model thread); returns its files."""
    trainer = servicer.trainer
    partial = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    partial.mkdir(parents=True)
    try:
        save_weights(trainer.module, partial / WEIGHTS)
        extra = {"version": trainer.version, "applied": servicer.applied.export(), "rng": torch.get_rng_state()}
        training_state.save_rank_state(partial, trainer.optimizer_state(), extra)
        training_state.write_manifest(partial, {"role": servicer.role, "rank": trainer.rank,
                                                "world_size": trainer.world_size, "model_version": trainer.version})
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return sorted(p.name for p in target.iterdir())


def prune_states(directory: pathlib.Path, keep: int) -> None:
    """Remove all but the `keep` newest sibling states of `directory` (same name before the trailing number)."""
    match = re.fullmatch(r"(.*?)(\d+)", directory.name)
    if keep <= 0 or match is None:
        return
    pattern = re.compile(re.escape(match.group(1)) + r"(\d+)")
    found = sorted((int(m.group(1)), p) for p in directory.parent.iterdir()
                   if (m := pattern.fullmatch(p.name)) and p.is_dir())
    for _, old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


async def save_training_state(servicer, request) -> common_pb2.SaveCheckpointResponse:
    """SaveCheckpoint(training_state): PATH/rank-R/ on every rank, then prune to `keep` states."""
    if servicer.cfg.training.zero_stage == 3:
        raise Refused("training_state: ZeRO stage 3 partitions the weights; use stage 0-2 to save a "
                      "resumable state")
    if request.keep < 0:
        raise InvalidArgument("keep", f"must be >= 0, got {request.keep}")
    base = checkpoint_path(checkpoint_root(servicer), request.path, servicer.model_version())
    target = base / f"rank-{servicer.trainer.rank}"
    files = await servicer.on_model_thread(_write_state, servicer, target)
    prune_states(base, request.keep)
    return common_pb2.SaveCheckpointResponse(path=str(target), model_version=servicer.trainer.version,
                                             files=files, instance_id=servicer.instance_id)


def read_state(servicer, source: pathlib.Path) -> dict:
    """Load this rank's weights, optimizer state, version and RNG from `source` (on the model thread).

    Returns the saved applied-key record, for the caller to put back on the event loop (where Train keys are
    recorded), after any Train that ran before it on the model thread has recorded its key.
    """
    trainer = servicer.trainer
    manifest = training_state.read_manifest(source)
    if manifest is None:
        raise Refused(f"{source} is not a complete training state (no manifest)")
    if (manifest["role"], manifest["world_size"]) != (servicer.role, trainer.world_size):
        raise Refused(f"{source} holds a {manifest['role']} state of {manifest['world_size']} rank(s); this is a "
                      f"{servicer.role} service of {trainer.world_size}")
    trainer.module.load_state_dict(load_file(str(source / WEIGHTS)))
    optimizer, extra = training_state.load_rank_state(source, trainer.optimizer_state())
    trainer.load_optimizer_state(optimizer)
    trainer.version = int(extra["version"])
    torch.set_rng_state(extra["rng"])
    return extra["applied"]


async def load_training_state(servicer, request) -> common_pb2.LoadCheckpointResponse:
    """LoadCheckpoint: this rank's part (PATH/rank-R/) of a state written by save_training_state."""
    if not request.path:
        raise InvalidArgument("path", "required: the directory SaveCheckpoint(training_state) wrote")
    base = checkpoint_path(checkpoint_root(servicer), request.path, 0)
    source = base / f"rank-{servicer.trainer.rank}"
    applied = await servicer.on_model_thread(read_state, servicer, source)
    servicer.applied.restore(applied, servicer.train_response)
    return common_pb2.LoadCheckpointResponse(path=str(source), model_version=servicer.trainer.version,
                                             instance_id=servicer.instance_id)


def latest_state(root: pathlib.Path, rank: int) -> pathlib.Path | None:
    """The newest complete state for `rank` among root/<name><N>/rank-R (by N), or None."""
    found = []
    for candidate in root.glob(f"*/rank-{rank}") if root.is_dir() else []:
        match = re.search(r"(\d+)$", candidate.parent.name)
        if match and training_state.read_manifest(candidate) is not None:
            found.append((int(match.group(1)), candidate.parent))
    return max(found)[1] if found else None
