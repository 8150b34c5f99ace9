"""Wire codec: raw little-endian tensors and ragged batches <-> torch.

Every decoder validates what it reads and raises InvalidArgument naming the
field, so servicers never see a malformed tensor.
"""

import array
import math
import sys

import torch

from rlhf.v1 import tensor_pb2
from services.errors import InvalidArgument

_TORCH_DTYPE = {
    tensor_pb2.DTYPE_INT32: torch.int32,
    tensor_pb2.DTYPE_INT64: torch.int64,
    tensor_pb2.DTYPE_FLOAT32: torch.float32,
    tensor_pb2.DTYPE_FLOAT16: torch.float16,
    tensor_pb2.DTYPE_BFLOAT16: torch.bfloat16,
    tensor_pb2.DTYPE_UINT16: torch.uint16,
}
_PB_DTYPE = {v: k for k, v in _TORCH_DTYPE.items()}
INT_DTYPES = (torch.uint16, torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if sys.byteorder != "little":  # the wire format is little-endian only
    raise ImportError("rlhf-mesh's codec needs a little-endian host")


def tensor_to_pb(t: torch.Tensor) -> tensor_pb2.Tensor:
    """Encode a CPU-able tensor as raw little-endian bytes with dtype and shape."""
    t = t.detach().contiguous().cpu()
    if t.dtype not in _PB_DTYPE:
        t = t.to(torch.float32 if t.is_floating_point() else torch.int64)
    raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return tensor_pb2.Tensor(dtype=_PB_DTYPE[t.dtype], shape=list(t.shape), raw=raw)


def floats_to_pb(values: list[float]) -> tensor_pb2.Tensor:
    """A 1-D float32 Tensor of Python floats, without building a torch tensor (small replies on the event loop)."""
    raw = array.array("f", values).tobytes()
    return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[len(values)], raw=raw)


def tensor_from_pb(pb: tensor_pb2.Tensor, field: str, allowed=None, ndim: int | None = None) -> torch.Tensor:
    """Decode and validate a Tensor; `allowed` restricts dtypes, `ndim` the rank."""
    dtype = _TORCH_DTYPE.get(pb.dtype)
    if dtype is None:
        raise InvalidArgument(f"{field}.dtype", f"unknown or unspecified dtype {pb.dtype}")
    if allowed is not None and dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise InvalidArgument(f"{field}.dtype", f"got {str(dtype).removeprefix('torch.')}, expected one of {names}")
    shape = list(pb.shape)
    if ndim is not None and len(shape) != ndim:
        raise InvalidArgument(f"{field}.shape", f"expected {ndim} dimensions, got {shape}")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape", f"negative dimension in {shape}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = math.prod(shape)
    if count * itemsize != len(pb.raw):
        raise InvalidArgument(f"{field}.raw", f"{len(pb.raw)} bytes do not hold shape {shape} of {itemsize}-byte items")
    if count == 0:
        return torch.empty(shape, dtype=torch.int32 if dtype == torch.uint16 else dtype)
    t = torch.frombuffer(bytearray(pb.raw), dtype=dtype).reshape(shape)
    return t.to(torch.int32) if dtype == torch.uint16 else t  # torch computes little on uint16


def token_rows_to_pb(rows: list[torch.Tensor]) -> tensor_pb2.RaggedTensor:
    """Token-id rows in the narrowest dtype that holds them: uint16 for ids below 65536, else int32."""
    values = _concat(rows, torch.int32)
    narrow = values.numel() == 0 or (int(values.min()) >= 0 and int(values.max()) <= 0xFFFF)
    return _ragged(rows, values.to(torch.uint16 if narrow else torch.int32))


def ragged_to_pb(rows: list[torch.Tensor], dtype: torch.dtype | None = None) -> tensor_pb2.RaggedTensor:
    """Encode a list of 1-D rows as concatenated values plus lengths."""
    values = _concat(rows, dtype or torch.float32)
    return _ragged(rows, values if dtype is None else values.to(dtype))


def _concat(rows: list[torch.Tensor], empty_dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([r.reshape(-1) for r in rows]) if rows else torch.empty(0, dtype=empty_dtype)


def _ragged(rows: list[torch.Tensor], values: torch.Tensor) -> tensor_pb2.RaggedTensor:
    return tensor_pb2.RaggedTensor(values=tensor_to_pb(values), lengths=[int(r.numel()) for r in rows])


def ragged_from_pb(pb: tensor_pb2.RaggedTensor, field: str, allowed=None, finite: bool = False,
                   max_rows: int | None = None) -> list[torch.Tensor]:
    """Decode and validate a RaggedTensor into a list of 1-D rows; more than `max_rows` rows is refused
    before any row is built."""
    if not pb.lengths:
        raise InvalidArgument(f"{field}.lengths", "empty batch")
    if max_rows is not None and len(pb.lengths) > max_rows:
        raise InvalidArgument(f"{field}.lengths", f"{len(pb.lengths)} rows exceed the limit of {max_rows}")
    lengths = list(pb.lengths)
    if any(n < 0 for n in lengths):
        raise InvalidArgument(f"{field}.lengths", "negative row length")
    values = tensor_from_pb(pb.values, f"{field}.values", allowed=allowed, ndim=1)
    if sum(lengths) != values.shape[0]:
        raise InvalidArgument(f"{field}.lengths", f"lengths add up to {sum(lengths)} but values hold {values.shape[0]}")
    if finite and values.is_floating_point() and not torch.isfinite(values).all():
        raise InvalidArgument(f"{field}.values", "contains NaN or infinity")
    return list(torch.split(values, lengths))


def float_rows_from_pb(pb, field: str, expected_lengths: list[int], finite: bool = True,
                       bound: float | None = None) -> list[torch.Tensor]:
    """Decode per-token float rows that must match `expected_lengths`; as float32.

    finite: NaN and infinity are refused; bound: so is any magnitude above it.
    """
    if len(pb.lengths) != len(expected_lengths):
        raise InvalidArgument(f"{field}.lengths", f"{len(pb.lengths)} rows for {len(expected_lengths)} sequences")
    rows = ragged_from_pb(pb, field, allowed=FLOAT_DTYPES, finite=finite)
    lengths = [int(r.numel()) for r in rows]
    if lengths != list(expected_lengths):
        raise InvalidArgument(f"{field}.lengths", f"expected one value per response token {list(expected_lengths)}, got {lengths}")
    rows = [r.float() for r in rows]
    if bound is not None:
        check_bound(torch.cat(rows), field, bound)
    return rows


def check_bound(values: torch.Tensor, field: str, bound: float) -> None:
    """Refuse values whose magnitude exceeds `bound` (training.max_abs_input)."""
    if values.numel() and float(values.abs().max()) > bound:
        raise InvalidArgument(f"{field}.values", f"magnitude {float(values.abs().max()):.3g} exceeds the limit of "
                              f"{bound:g} (training.max_abs_input)")


def pad_rows(rows: list[torch.Tensor], pad_value=0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D rows into (B, T) and return it with a (B, T) float mask."""
    width = max((int(r.numel()) for r in rows), default=0)
    dtype = rows[0].dtype if rows else torch.float32
    out = torch.full((len(rows), width), pad_value, dtype=dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row
        mask[i, : row.numel()] = 1.0
    return out, mask


def unpad_rows(padded: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of pad_rows: the first mask.sum(1) entries of each row."""
    lengths = mask.sum(1).long().tolist()
    return [padded[i, :n] for i, n in enumerate(lengths)]
