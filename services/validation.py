"""Checks of request scalars and texts that several RPCs share; each failure names its field.

The ranges keep every accepted request numerically safe: a temperature of
1e-40 or a clip range of 1e30 is refused here rather than turning the
weights into NaN a step later.
"""

import math
from typing import Sequence

from services.config import BatchingConfig
from services.errors import InvalidArgument

MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 1e2
MAX_COEF = 1e3  # clip ranges, entropy/ptx coefficients, DPO beta


def check_temperature(value: float, field: str) -> float:
    """0 (unset: greedy sampling, or 1 for log-probs) or a finite temperature in [1e-2, 1e2]."""
    low = MIN_TEMPERATURE * (1 - 1e-6)  # the float32 nearest to 0.01 is a hair below it
    if value != 0 and not (math.isfinite(value) and low <= value <= MAX_TEMPERATURE):
        raise InvalidArgument(field, f"must be 0 (unset) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {value}")
    return value


def check_range(value: float, field: str, low: float, high: float, low_open: bool = False) -> float:
    """A finite value in [low, high] ((low, high] with low_open)."""
    inside = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not inside:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise InvalidArgument(field, f"must be in {interval}, got {value}")
    return value


def micro_batch_size(requested: int, default: int) -> int:
    """The request's micro-batch size (0 = the configured default)."""
    if requested < 0:
        raise InvalidArgument("micro_batch_size", f"must be >= 0, got {requested}")
    return requested or default


def check_texts(columns: Sequence[tuple[str, Sequence[str]]], cfg: BatchingConfig) -> None:
    """Row count and UTF-8 size of a request's texts, before anything is tokenised.

    columns: (field name, texts) pairs of one request. A text longer than
    max_text_bytes characters is refused without being encoded.
    """
    total = 0
    for field, texts in columns:
        if len(texts) > cfg.max_request_rows:
            raise InvalidArgument(field, f"{len(texts)} rows exceed the limit of {cfg.max_request_rows}")
        for i, text in enumerate(texts):
            size = len(text) if len(text) > cfg.max_text_bytes else len(text.encode("utf-8", "surrogatepass"))
            if size > cfg.max_text_bytes:
                raise InvalidArgument(f"{field}[{i}]", f"{size} bytes exceed the limit of {cfg.max_text_bytes} "
                                      "(batching.max_text_bytes)")
            total += size
            if total > cfg.max_request_text_bytes:
                raise InvalidArgument(field, f"the request's texts exceed {cfg.max_request_text_bytes} bytes "
                                      "(batching.max_request_text_bytes)")
