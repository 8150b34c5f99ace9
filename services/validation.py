"""Checks of request scalars that several RPCs share; each failure names its field."""

import math

from services.errors import InvalidArgument


def check_temperature(value: float, field: str) -> float:
    """A finite, non-negative temperature (0 = unset/greedy)."""
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(field, f"must be a finite number >= 0, got {value}")
    return value


def micro_batch_size(requested: int, default: int) -> int:
    """The request's micro-batch size (0 = the configured default)."""
    if requested < 0:
        raise InvalidArgument("micro_batch_size", f"must be >= 0, got {requested}")
    return requested or default
