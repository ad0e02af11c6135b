"""Argument checks and the working dtype every adapter family shares."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import AdapterError

__all__ = ["check_float", "positive_int", "work_dtype"]


def check_float(weight: torch.Tensor, adapter: str) -> None:
    """Refuse a tensor that is not floating point, naming the adapter, the dtype and the shape."""
    if not (weight.dtype.is_floating_point):
        raise AdapterError(
            f"{adapter}: needs a floating-point tensor, got {str(weight.dtype).removeprefix('torch.')} "
            f"of shape {list(weight.shape)}"
        )


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic in float64 for float32/64 (one rounding at the end), float32 for half types."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def positive_int(value: Any, what: str, adapter: str) -> int:
    """``value`` when it is an int >= 1 (not a bool); otherwise an :class:`AdapterError` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterError(f"{adapter}: {what} must be a positive int, got {value!r}")
    return value
