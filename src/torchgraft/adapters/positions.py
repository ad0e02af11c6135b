"""Position tables of another length (1-d, by interpolation or tiling) or grid size (2-d, ViT)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..errors import AdapterError
from .checks import check_float, positive_int, work_dtype

__all__ = ["positions_1d", "positions_2d", "square_grid"]


def positions_1d(
    weight: torch.Tensor,
    n: int,
    *,
    method: Literal["interpolate", "tile"] = "interpolate",
    num_prefix_tokens: int = 0,
) -> torch.Tensor:
    """Resize a position table ``[positions, dim]`` (or ``[1, positions, dim]``) to ``n`` positions.

    * ``method="interpolate"``: linear interpolation along the positions (``F.interpolate``,
      ``align_corners=False``): the table is stretched over the new length.
    * ``method="tile"``: the old rows are kept bit-identical and the table is repeated after
      them (Longformer's way to go from 512 to 4096 positions); shrinking keeps the first rows.

    The first ``num_prefix_tokens`` rows (RoBERTa's 2 padding offsets, a class token) are kept
    as they are and not counted as positions (``n`` includes them).

    Args:
        weight: ``[P, dim]`` or ``[1, P, dim]`` floating-point table.
        n: the new number of rows (including prefix rows).
        method: ``"interpolate"`` or ``"tile"``.
        num_prefix_tokens: leading rows kept as they are.

    Returns:
        A new table with ``n`` rows in ``weight``'s dtype; ``weight`` itself when the length matches.

    Raises:
        AdapterError: another rank, not floating point, an unknown method, or prefix rows that
            leave no positions.

    Example:
        >>> w = torch.randn(512, 384)
        >>> positions_1d(w, 1024).shape
        torch.Size([1024, 384])
    """
    name = "positions_1d"
    if weight.dim() not in (2, 3) or (weight.dim() == 3 and weight.shape[0] != 1):
        raise AdapterError(
            f"{name}: expects a table [positions, dim] or [1, positions, dim], got shape {list(weight.shape)}"
        )
    check_float(weight, name)
    n = positive_int(n, "n", name)
    if method not in ("interpolate", "tile"):
        raise AdapterError(f"{name}: unknown method {method!r}; use 'interpolate' or 'tile'")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise AdapterError(f"{name}: num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    table = weight if weight.dim() == 2 else weight[0]
    rows = table.shape[0]
    if n == rows:
        return weight
    k = num_prefix_tokens
    if k >= rows or k >= n:
        raise AdapterError(f"{name}: {k} prefix rows leave no positions to resize ({rows} -> {n} rows)")
    prefix, grid = table[:k], table[k:]
    if method == "tile":
        reps = math.ceil((n - k) / grid.shape[0])
        resized = grid.repeat(reps, 1)[: n - k] if not weight.is_meta else grid.new_empty((n - k, grid.shape[1]))
    else:
        work = work_dtype(weight.dtype)
        x = grid.to(work).T.unsqueeze(0)  # [1, dim, P]
        resized = F.interpolate(x, size=n - k, mode="linear", align_corners=False)[0].T.to(weight.dtype)
    out = torch.cat([prefix, resized], 0)
    return out if weight.dim() == 2 else out.unsqueeze(0)


def _grid_of(value: int | Sequence[int], adapter: str, what: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise AdapterError(f"{adapter}: {what} must be an int or (height, width), got {value!r}")
    h, w = (positive_int(v, what, adapter) for v in value)
    return h, w


def square_grid(tokens: int) -> tuple[int, int] | None:
    """``(side, side)`` when ``tokens`` positions form a square grid, else ``None``."""
    side = math.isqrt(tokens) if tokens >= 0 else 0
    return (side, side) if side > 0 and side * side == tokens else None


def positions_2d(
    weight: torch.Tensor,
    grid: int | Sequence[int],
    *,
    num_prefix_tokens: int = 1,
    source_grid: int | Sequence[int] | None = None,
    mode: Literal["bicubic", "bilinear", "nearest"] = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resize a ViT position table ``[1, prefix + H*W, dim]`` (or ``[prefix + H*W, dim]``) to a new grid.

    The grid is interpolated as an image (``mode``, ``align_corners=False``, ``antialias`` as
    timm's ``resample_abs_pos_embed`` does); the ``num_prefix_tokens`` leading rows (class and
    distillation tokens, registers) are kept bit-identical.

    Args:
        weight: the position table, rows in row-major grid order after the prefix.
        grid: the new grid, ``side`` or ``(height, width)``.
        num_prefix_tokens: leading rows that are not grid positions (1 for a class token).
        source_grid: the checkpoint's grid; by default the square that fits its rows.
        mode: interpolation mode.
        antialias: smooth when shrinking (``F.interpolate``'s flag; bilinear/bicubic only).

    Returns:
        A new table with ``prefix + height*width`` rows in ``weight``'s dtype; ``weight`` itself
        when the grid is unchanged.

    Raises:
        AdapterError: another rank, not floating point, a source grid that does not fit the
            rows, or an unknown mode.

    Example:
        >>> pos = torch.randn(1, 1 + 14 * 14, 768)
        >>> positions_2d(pos, 24, num_prefix_tokens=1).shape
        torch.Size([1, 577, 768])
    """
    name = "positions_2d"
    if weight.dim() not in (2, 3) or (weight.dim() == 3 and weight.shape[0] != 1):
        raise AdapterError(f"{name}: expects a table [1, tokens, dim] or [tokens, dim], got shape {list(weight.shape)}")
    check_float(weight, name)
    if mode not in ("bicubic", "bilinear", "nearest"):
        raise AdapterError(f"{name}: unknown mode {mode!r}; use 'bicubic', 'bilinear' or 'nearest'")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise AdapterError(f"{name}: num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    new_h, new_w = _grid_of(grid, name, "grid")
    table = weight if weight.dim() == 2 else weight[0]
    k = num_prefix_tokens
    tokens = table.shape[0] - k
    if source_grid is None:
        found = square_grid(tokens)
        if found is None:
            raise AdapterError(
                f"{name}: the checkpoint's {tokens} grid positions ({table.shape[0]} rows minus {k} prefix) are not a square; "
                "pass source_grid=(height, width) or the right num_prefix_tokens"
            )
        old_h, old_w = found
    else:
        old_h, old_w = _grid_of(source_grid, name, "source_grid")
        if old_h * old_w != tokens:
            raise AdapterError(
                f"{name}: source_grid {old_h}x{old_w} = {old_h * old_w} positions, but the table has {tokens} after {k} prefix rows"
            )
    if (old_h, old_w) == (new_h, new_w):
        return weight
    prefix, positions = table[:k], table[k:]
    if weight.is_meta:
        resized = positions.new_empty((new_h * new_w, positions.shape[1]))
    else:
        work = torch.float64 if weight.dtype == torch.float64 else torch.float32
        img = positions.to(work).reshape(old_h, old_w, -1).permute(2, 0, 1).unsqueeze(0)  # [1, dim, H, W]
        kwargs: dict[str, Any] = {} if mode == "nearest" else {"align_corners": False, "antialias": bool(antialias)}
        img = F.interpolate(img, size=(new_h, new_w), mode=mode, **kwargs)
        resized = img[0].permute(1, 2, 0).reshape(new_h * new_w, -1).to(weight.dtype)
    out = torch.cat([prefix, resized], 0)
    return out if weight.dim() == 2 else out.unsqueeze(0)
