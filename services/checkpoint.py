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
from services.errors import AlreadyExists, InvalidArgument, NotFound, OverQuota, Refused
from services.idempotency import check_run_id

WEIGHTS = "weights.safetensors"


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=@-]{0,127}")
RUNS = "runs"  # checkpoint_dir/runs/<run_id>/<name>: the training states of each run


def checkpoint_name(requested: str, version: int, field: str = "path") -> str:
    """A checkpoint name: one path component of 1-128 letters, digits and . _ + = @ -; empty means version-N."""
    name = requested or f"version-{version}"
    if not NAME.fullmatch(name):
        raise InvalidArgument(field, f"{name[:40]!r} is not a checkpoint name: use one path component of 1-128 "
                              "letters, digits and . _ + = @ - (starting with a letter or digit)")
    return name


def resolve_under(root: str, relative: str) -> pathlib.Path:
    """A configured directory under `root` (training.restore_from); refuse anything that escapes it."""
    base = pathlib.Path(root).resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"{relative!r} leaves the checkpoint_dir {base}")
    return target


def checkpoint_root(servicer) -> str:
    """The service's checkpoint_dir (default checkpoints/<role>)."""
    return servicer.cfg.server.checkpoint_dir or f"checkpoints/{servicer.role}"


def state_dir(servicer, run_id: str, name: str) -> pathlib.Path:
    """Where a run's training state NAME lives: checkpoint_dir/runs/<run_id>/NAME."""
    return pathlib.Path(checkpoint_root(servicer)).resolve() / RUNS / run_id / name


def _size(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _checkpoints(root: pathlib.Path) -> list[pathlib.Path]:
    """Every checkpoint in the directory: weights at the top, training states under runs/<run_id>/."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name != RUNS and not p.name.startswith(".")]
    runs = root / RUNS
    for run in runs.iterdir() if runs.is_dir() else []:
        found += [p for p in run.iterdir() if p.is_dir() and not p.name.startswith(".")] if run.is_dir() else []
    return found


def ensure_room(servicer, unit: pathlib.Path, target: pathlib.Path, new_bytes: int, overwrite: bool,
                pruned: int = 0) -> None:
    """Refuse a save that would replace `target` without `overwrite` (ALREADY_EXISTS) or pass the quota
    (server.checkpoint_max_count and checkpoint_max_gb, RESOURCE_EXHAUSTED).

    unit: the checkpoint `target` belongs to (the same directory, or the state directory of a rank's part);
    pruned: checkpoints the save removes once written.
    """
    cfg = servicer.cfg.server
    if target.exists() and not overwrite:
        raise AlreadyExists(f"checkpoint {unit.name!r} exists ({target}); set overwrite to replace it")
    root = pathlib.Path(checkpoint_root(servicer)).resolve()
    existing = _checkpoints(root)
    count = len(existing) + (0 if unit.exists() else 1) - pruned
    if count > cfg.checkpoint_max_count:
        raise OverQuota(f"checkpoint_dir holds {len(existing)} checkpoints; the quota is "
                        f"{cfg.checkpoint_max_count} (server.checkpoint_max_count)")
    used = _size(root) - (_size(target) if overwrite else 0)
    limit = cfg.checkpoint_max_gb * 2**30
    if used + new_bytes > limit:
        raise OverQuota(f"checkpoint_dir holds {used / 2**30:.2f} GiB and this checkpoint needs about "
                        f"{new_bytes / 2**30:.2f} GiB more; the quota is {cfg.checkpoint_max_gb:g} GiB "
                        "(server.checkpoint_max_gb)")


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters as stored."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


async def save_checkpoint(servicer, request, module, tokenizer) -> common_pb2.SaveCheckpointResponse:
    """Write module + tokenizer with save_pretrained to checkpoint_dir/NAME on the model thread."""
    version = servicer.model_version()
    target = pathlib.Path(checkpoint_root(servicer)).resolve() / checkpoint_name(request.path, version)
    ensure_room(servicer, target, target, parameter_bytes(module), request.overwrite)

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
        extra = {"version": trainer.version, "applied": servicer.applied.export(), "lease": servicer.lease.export(),
                 "rng": torch.get_rng_state()}
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


def _siblings(directory: pathlib.Path) -> list[pathlib.Path]:
    """Sibling states of `directory` (same name before the trailing number), oldest first."""
    match = re.fullmatch(r"(.*?)(\d+)", directory.name)
    if match is None or not directory.parent.is_dir():
        return []
    pattern = re.compile(re.escape(match.group(1)) + r"(\d+)")
    found = sorted((int(m.group(1)), p) for p in directory.parent.iterdir()
                   if (m := pattern.fullmatch(p.name)) and p.is_dir())
    return [p for _, p in found]


def prune_states(directory: pathlib.Path, keep: int) -> None:
    """Remove all but the `keep` newest sibling states of `directory`."""
    if keep > 0:
        for old in _siblings(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


async def save_training_state(servicer, request) -> common_pb2.SaveCheckpointResponse:
    """SaveCheckpoint(training_state): runs/<run_id>/NAME/rank-R/ on every rank, then prune to `keep` states."""
    if servicer.cfg.training.zero_stage == 3:
        raise Refused("training_state: ZeRO stage 3 partitions the weights; use stage 0-2 to save a "
                      "resumable state")
    if request.keep < 0:
        raise InvalidArgument("keep", f"must be >= 0, got {request.keep}")
    run_id = check_run_id(request.lease.run_id, "lease.run_id")
    servicer.lease.take(run_id, request.lease.secret, servicer.role)
    base = state_dir(servicer, run_id, checkpoint_name(request.path, servicer.model_version()))
    target = base / f"rank-{servicer.trainer.rank}"
    module = servicer.trainer.module
    siblings = [p for p in _siblings(base) if p != base]
    pruned = max(0, len(siblings) + 1 - request.keep) if request.keep else 0
    ensure_room(servicer, base, target, parameter_bytes(module) + 8 * sum(p.numel() for p in module.parameters()),
                request.overwrite, pruned)
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
    return extra


async def load_training_state(servicer, request) -> common_pb2.LoadCheckpointResponse:
    """LoadCheckpoint: this rank's part (runs/<run_id>/NAME/rank-R/) of a state save_training_state wrote."""
    if not request.path:
        raise InvalidArgument("path", "required: the name SaveCheckpoint(training_state) wrote")
    run_id = check_run_id(request.lease.run_id, "lease.run_id")
    source = state_dir(servicer, run_id, checkpoint_name(request.path, 0)) / f"rank-{servicer.trainer.rank}"
    servicer.lease.take(run_id, request.lease.secret, servicer.role)
    if not source.is_dir():
        raise NotFound(f"no training state {request.path!r} of run {run_id!r} ({source})")
    extra = await servicer.on_model_thread(read_state, servicer, source)
    servicer.applied.restore(extra["applied"], servicer.train_response)
    servicer.row_cache.clear()  # rows kept for the rolled-back steps may be sent again with other contents
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
