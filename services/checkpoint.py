"""SaveCheckpoint: safetensors that from_pretrained can load, inside checkpoint_dir."""

import pathlib

from rlhf.v1 import common_pb2
from services.errors import InvalidArgument


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


async def save_checkpoint(servicer, request, module, tokenizer) -> common_pb2.SaveCheckpointResponse:
    """Write module + tokenizer with save_pretrained on the model thread."""
    version = servicer.model_version()
    root = servicer.cfg.server.checkpoint_dir or f"checkpoints/{servicer.role}"
    target = checkpoint_path(root, request.path, version)

    def write() -> list[str]:
        target.mkdir(parents=True, exist_ok=True)
        module.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
        return sorted(p.name for p in target.iterdir())

    files = await servicer.on_model_thread(write)
    return common_pb2.SaveCheckpointResponse(path=str(target), model_version=version, files=files)
