"""A trainable service's full training state on disk, without pickle: safetensors + JSON.

One rank's state directory (services/checkpoint.py writes PATH/rank-R/ under
the service's checkpoint_dir) holds:

    weights.safetensors        the module's state_dict (services/checkpoint.py)
    optimizer.safetensors      the tensors of the rank's optimizer state
    state.json                 the rest of it: the optimizer's tree with its tensors replaced by names,
                               the model version, the RNG state and the applied Train keys
    manifest.json              written last (temporary name, fsync, rename): without it the directory
                               is incomplete and never loaded

The optimizer's state_dict is a tree of dicts, lists, tuples, numbers and
tensors; `encode_tree` stores it as JSON with every tensor named into the
safetensors file. Objects of neither kind (DeepSpeed's loss scaler, enums)
are stored by type name only and taken back from the live optimizer when the
state is loaded, since they are configuration, not training state.
"""

import json
import os
import pathlib
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
FORMAT = "rlhf-training-state/1"


def encode_tree(tree: Any, tensors: dict[str, torch.Tensor], path: str = "t") -> Any:
    """`tree` as JSON-ready data; its tensors go into `tensors` under names derived from `path`."""
    if isinstance(tree, torch.Tensor):
        tensors[path] = tree.detach().to("cpu").clone().contiguous()  # clone: safetensors refuses shared storage
        return {"tensor": path}
    if isinstance(tree, dict):
        return {"dict": [[encode_tree(k, tensors, f"{path}.k{i}"), encode_tree(v, tensors, f"{path}.{i}")]
                         for i, (k, v) in enumerate(tree.items())]}
    if isinstance(tree, (list, tuple)):
        kind = "list" if isinstance(tree, list) else "tuple"
        return {kind: [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(tree)]}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return {"value": tree}
    return {"live": type(tree).__name__}  # configuration object: taken from the live optimizer on load


def decode_tree(data: Any, tensors: dict[str, torch.Tensor], live: Any = None) -> Any:
    """The inverse of `encode_tree`; `live` is the same tree as it is now, the source of "live" objects."""
    kind, value = next(iter(data.items()))
    if kind == "tensor":
        return tensors[value]
    if kind == "value":
        return value
    if kind == "live":
        if live is None or type(live).__name__ != value:
            raise ValueError(f"the saved optimizer state has a {value} where the live optimizer has "
                             f"{type(live).__name__}: it was saved by another optimizer or ZeRO stage")
        return live
    if kind == "dict":
        out = {}
        for k, v in value:
            key = decode_tree(k, tensors)
            out[key] = decode_tree(v, tensors, live.get(key) if isinstance(live, dict) else None)
        return out
    items = [decode_tree(v, tensors, live[i] if isinstance(live, (list, tuple)) and i < len(live) else None)
             for i, v in enumerate(value)]
    return items if kind == "list" else tuple(items)


def write_json_atomically(path: pathlib.Path, data: dict) -> None:
    """Write JSON to a temporary name, fsync it, rename it over `path`, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_rank_state(directory: pathlib.Path, optimizer_state: dict, extra: dict) -> list[str]:
    """Write one rank's optimizer state and `extra` (JSON-ready, may hold tensors) into `directory`."""
    tensors: dict[str, torch.Tensor] = {}
    tree = {"optimizer": encode_tree(optimizer_state, tensors, "opt"), "extra": encode_tree(extra, tensors, "x")}
    tensor_file, json_file = directory / OPTIMIZER_FILE, directory / STATE_FILE
    save_file(tensors, str(tensor_file))
    with open(tensor_file, "rb+") as handle:
        os.fsync(handle.fileno())
    write_json_atomically(json_file, {"format": FORMAT, "tree": tree})
    return [tensor_file.name, json_file.name]


def load_rank_state(directory: pathlib.Path, live_optimizer_state: dict) -> tuple[dict, dict]:
    """(optimizer state, extra) as saved by `save_rank_state` into `directory`."""
    data = json.loads((directory / STATE_FILE).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{directory}: unknown training-state format {data.get('format')!r}")
    tensors = load_file(str(directory / OPTIMIZER_FILE))
    tree = data["tree"]
    return decode_tree(tree["optimizer"], tensors, live_optimizer_state), decode_tree(tree["extra"], tensors)


def write_manifest(directory: pathlib.Path, manifest: dict) -> None:
    """Mark `directory` complete: the manifest is the last file written."""
    write_json_atomically(directory / MANIFEST, {"format": FORMAT, **manifest})


def read_manifest(directory: pathlib.Path) -> dict | None:
    """The manifest of a complete state directory, or None when it is incomplete or not one."""
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("format") == FORMAT else None
