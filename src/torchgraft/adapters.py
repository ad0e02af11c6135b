"""Shape adapters: pure functions that turn a checkpoint tensor into the shape a changed model needs.

Every adapter takes the source tensor and what it needs to know about the target, returns a
**new** tensor of the target's shape and the **source's dtype** (arithmetic runs in float64 or
float32 and is rounded once), never modifies its input, and raises
:class:`~torchgraft.AdapterError` with the reason and the fix when it cannot handle a shape.
When the shapes already match, the string methods return the input unchanged.

==================  =====================================================================
adapter             for
==================  =====================================================================
input_channels      first conv / patch embedding with other input channels (3 -> 1, N -> M)
output_rows         classifier heads: first n rows, rows by index, rows by label name
embedding_rows      vocabulary growth or shrink (new rows from the old rows' mean and covariance)
positions_1d        position tables of another length (BERT 512 -> 1024), by interpolation
positions_2d        ViT position grids of another size (14x14 -> 24x24), class tokens kept
==================  =====================================================================

Depth changes are renames, not tensor changes: :func:`select_layers` builds the rules for
``tg.plan(..., rules=...)``.

The plan refers to adapters by name through :data:`ADAPTERS` (``{"name": ..., "args": {...}}``
in a plan entry, JSON-serialisable); :func:`run` executes such a spec against the target shape.
:func:`register_adapter` adds your own.

Example:
    >>> w = torch.randn(32, 3, 3, 3)
    >>> input_channels(w, 1, method="luminance").shape
    torch.Size([32, 1, 3, 3])
    >>> run({"name": "input_channels", "args": {"method": "sum"}}, w, target_shape=(32, 1, 3, 3)).shape
    torch.Size([32, 1, 3, 3])
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from .errors import AdapterError

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ADAPTERS",
    "LUMINANCE",
    "SHORTHANDS",
    "Adapter",
    "embedding_rows",
    "input_channels",
    "label_rows",
    "output_rows",
    "positions_1d",
    "positions_2d",
    "register_adapter",
    "resolve",
    "run",
    "select_layers",
]

#: ITU-R BT.601 luma weights for R, G, B: the seed's ``0.299 R + 0.587 G + 0.114 B``.
LUMINANCE: tuple[float, float, float] = (0.299, 0.587, 0.114)

ChannelMethod = Literal["sum", "mean", "luminance", "repeat"]


# ---------------------------------------------------------------------------
# helpers


def _check_float(weight: torch.Tensor, adapter: str) -> None:
    if not (weight.dtype.is_floating_point):
        raise AdapterError(
            f"{adapter}: needs a floating-point tensor, got {str(weight.dtype).removeprefix('torch.')} "
            f"of shape {list(weight.shape)}"
        )


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic in float64 for float32/64 (one rounding at the end), float32 for half types."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _positive_int(value: Any, what: str, adapter: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterError(f"{adapter}: {what} must be a positive int, got {value!r}")
    return value


# ---------------------------------------------------------------------------
# input channels


def input_channels(
    weight: torch.Tensor,
    in_channels: int,
    *,
    method: ChannelMethod | Sequence[Sequence[float]] | torch.Tensor,
) -> torch.Tensor:
    """Adapt a conv (or linear) weight ``[out, N, *kernel]`` to ``in_channels`` = M input channels.

    Methods (``k = N / M``; channel ``m`` of the new weight takes the checkpoint's channels
    ``m*k .. m*k + k - 1`` for ``sum``/``mean``):

    * ``"sum"``: add each group of ``k`` channels (timm's ``adapt_input_conv`` for 1 channel and
      for space-to-depth stems). Exact: the new conv on ``x`` equals the old conv on ``x`` with
      every channel repeated ``k`` times (``x.repeat_interleave(k, 1)``); for 3 -> 1, a grey image
      through the new conv equals the RGB conv on that image repeated to 3 channels.
      Needs ``M <= N`` and ``N % M == 0``.
    * ``"mean"``: the same groups, averaged (``sum / k``).
    * ``"luminance"``: 3 -> 1 only, ``0.299 R + 0.587 G + 0.114 B`` (the seed's formula).
    * ``"repeat"``: tile the channels and scale by ``N / M`` (timm, for ``M != N``): channel ``m``
      takes ``weight[:, m % N] * N / M``. Exact when ``M`` is a multiple of ``N``: the new conv on
      ``x`` tiled ``M / N`` times equals the old conv on ``x``.
    * a mixing matrix of shape ``[M, N]`` (nested lists or a tensor): ``new[:, m] = sum_n
      matrix[m][n] * weight[:, n]``, so the new conv on ``y`` equals the old one on
      ``matrix.T @ y``. Always applied, also when ``M == N`` (``[[0,0,1],[0,1,0],[1,0,0]]``
      turns an RGB stem into a BGR one).

    Args:
        weight: ``[out, N, *kernel]`` floating-point tensor (conv 1d/2d/3d, or a linear layer's ``[out, N]``).
        in_channels: M, the number of input channels the new layer has.
        method: one of the names above, or a mixing matrix.

    Returns:
        A new tensor ``[out, M, *kernel]`` in ``weight``'s dtype; ``weight`` itself when
        ``M == N`` and ``method`` is a name.

    Raises:
        AdapterError: ``weight`` has fewer than 2 dimensions or is not floating point, the method
            is unknown, ``sum``/``mean`` cannot group N channels into M, ``luminance`` is not
            3 -> 1, or the matrix is not ``[M, N]``.

    Example:
        >>> w = torch.randn(32, 3, 3, 3)
        >>> grey = input_channels(w, 1, method="sum")
        >>> x = torch.randn(1, 1, 8, 8)
        >>> torch.allclose(F.conv2d(x, grey), F.conv2d(x.repeat(1, 3, 1, 1), w), atol=1e-5)
        True
    """
    name = "input_channels"
    if weight.dim() < 2:
        raise AdapterError(f"{name}: expects a weight [out, in, *kernel], got shape {list(weight.shape)}")
    _check_float(weight, name)
    m_out = _positive_int(in_channels, "in_channels", name)
    n_in = weight.shape[1]
    if isinstance(method, str):
        if method not in ("sum", "mean", "luminance", "repeat"):
            raise AdapterError(
                f"{name}: unknown method {method!r}; use 'sum', 'mean', 'luminance', 'repeat' or a [M, N] mixing matrix"
            )
        if m_out == n_in:
            return weight
        matrix = _channel_matrix(method, n_in, m_out)
    else:
        matrix = _as_matrix(method, m_out, n_in)
    work = _work_dtype(weight.dtype)
    out = torch.einsum("oc...,mc->om...", weight.to(work), matrix.to(device=weight.device, dtype=work))
    return out.to(weight.dtype)


def _channel_matrix(method: str, n_in: int, m_out: int) -> torch.Tensor:
    """The [M, N] matrix each named method stands for (float64, exact small fractions)."""
    name = "input_channels"
    mat = torch.zeros(m_out, n_in, dtype=torch.float64)
    if method in ("sum", "mean"):
        if m_out > n_in or n_in % m_out:
            raise AdapterError(
                f"{name}: method {method!r} adds groups of channels and needs the new count to divide the old one; "
                f"{n_in} -> {m_out} does not. Use method='repeat' (tile and rescale) or an explicit [M, N] mixing matrix"
            )
        k = n_in // m_out
        for m in range(m_out):
            mat[m, m * k : (m + 1) * k] = 1.0 if method == "sum" else 1.0 / k
    elif method == "luminance":
        if (n_in, m_out) != (3, 1):
            raise AdapterError(
                f"{name}: method 'luminance' turns 3 RGB channels into 1 grey channel; this weight goes {n_in} -> {m_out}. "
                "Use 'sum', 'mean', 'repeat' or an explicit [M, N] mixing matrix"
            )
        mat[0] = torch.tensor(LUMINANCE, dtype=torch.float64)
    else:  # repeat
        for m in range(m_out):
            mat[m, m % n_in] = n_in / m_out
    return mat


def _as_matrix(method: Any, m_out: int, n_in: int) -> torch.Tensor:
    name = "input_channels"
    try:
        mat = (
            method.detach().to("cpu", torch.float64)
            if isinstance(method, torch.Tensor)
            else torch.tensor(method, dtype=torch.float64)
        )
    except (TypeError, ValueError, RuntimeError):
        raise AdapterError(
            f"{name}: method must be 'sum', 'mean', 'luminance', 'repeat' or a [M, N] matrix of numbers, got {method!r}"
        ) from None
    if tuple(mat.shape) != (m_out, n_in):
        raise AdapterError(
            f"{name}: the mixing matrix has shape {list(mat.shape)}; mapping {n_in} checkpoint channels to "
            f"{m_out} new channels needs [{m_out}, {n_in}] (row m says how much of each old channel goes into new channel m)"
        )
    if not torch.isfinite(mat).all():
        raise AdapterError(f"{name}: the mixing matrix contains inf or nan")
    return mat


# ---------------------------------------------------------------------------
# output rows (classifier heads)

Fill = Literal["zeros", "mean"]


def label_rows(
    source_labels: Mapping[Any, str] | Sequence[str],
    target_labels: Mapping[Any, str] | Sequence[str],
) -> list[int | None]:
    """For each target label (in target row order), its row in the source head, or ``None``.

    Labels are ``id2label`` mappings (``{0: "cat", "1": "dog"}``, keys may be strings as in
    ``config.json``) or plain lists.

    Example:
        >>> label_rows({0: "cat", 1: "dog", 2: "fox"}, ["fox", "cat", "owl"])
        [2, 0, None]
    """
    src = _label_list(source_labels, "source")
    tgt = _label_list(target_labels, "target")
    index: dict[str, int] = {}
    for i, label in enumerate(src):
        index.setdefault(label, i)
    return [index.get(label) for label in tgt]


def _label_list(labels: Mapping[Any, str] | Sequence[str], which: str) -> list[str]:
    if isinstance(labels, Mapping):
        try:
            items = sorted((int(k), str(v)) for k, v in labels.items())
        except (TypeError, ValueError):
            raise AdapterError(
                f"output_rows: {which} labels must map row numbers to names, got keys {list(labels)[:5]}"
            ) from None
        if [i for i, _ in items] != list(range(len(items))):
            raise AdapterError(
                f"output_rows: {which} labels must number rows 0..{len(items) - 1} without gaps, got {[i for i, _ in items][:10]}"
            )
        return [v for _, v in items]
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise AdapterError(
            f"output_rows: {which} labels must be an id2label mapping or a list of names, got {labels!r}"
        )
    return [str(v) for v in labels]


def output_rows(
    weight_or_bias: torch.Tensor,
    n: int,
    *,
    keep: Sequence[int | str | None] | None = None,
    labels: Mapping[Any, str] | Sequence[str] | None = None,
    fill: Fill | None = None,
) -> torch.Tensor:
    """Pick the rows of a classifier head (weight ``[classes, features]`` or bias ``[classes]``).

    Re-initialising a head is a plan action (``adapt={"classifier.*": "reinit"}``), not an
    adapter: the module's own initialisation runs. This adapter keeps trained rows:

    * ``keep=None``: the first ``n`` rows (a head trained on a superset whose first classes you keep);
    * ``keep=[i0, i1, ...]``: new row ``j`` is the checkpoint's row ``keep[j]``; ``None`` = a new class;
    * ``keep=["cat", "dog"]`` with ``labels`` (the checkpoint's ``id2label``): rows by label name;
      a name the checkpoint does not have is a new class.

    New classes (``None`` entries, unknown labels, ``n`` beyond the checkpoint's rows) get
    ``fill``: ``"zeros"`` or ``"mean"`` (the mean of the checkpoint's rows); without ``fill`` they
    are an error, so no row is invented silently.

    Args:
        weight_or_bias: ``[classes, *rest]`` tensor (any dtype).
        n: the number of rows the new head has.
        keep: which checkpoint row each new row takes (see above); ``len(keep)`` must be ``n``.
        labels: the checkpoint's labels (``id2label`` or a list), needed when ``keep`` has names.
        fill: how to make rows for new classes.

    Returns:
        A new ``[n, *rest]`` tensor in the input's dtype; the input itself when ``keep`` is
        ``None`` and ``n`` equals its number of rows.

    Raises:
        AdapterError: a 0-d tensor, ``len(keep) != n``, an index out of range, names without
            ``labels``, new classes without ``fill``, or an unknown ``fill``.

    Example:
        >>> b = torch.arange(5.0)
        >>> output_rows(b, 3, keep=[4, 0, None], fill="zeros")
        tensor([4., 0., 0.])
        >>> output_rows(b, 2, keep=["fox", "cat"], labels={0: "cat", 1: "dog", 4: "fox", 2: "a", 3: "b"})
        tensor([4., 0.])
    """
    name = "output_rows"
    if weight_or_bias.dim() < 1:
        raise AdapterError(f"{name}: expects a weight [classes, features] or a bias [classes], got a 0-d tensor")
    n = _positive_int(n, "n", name)
    rows = weight_or_bias.shape[0]
    if fill is not None and fill not in ("zeros", "mean"):
        raise AdapterError(f"{name}: unknown fill {fill!r}; use 'zeros', 'mean' or None (new classes are an error)")
    picks: list[int | None]
    if keep is None:
        if n == rows:
            return weight_or_bias
        picks = [i if i < rows else None for i in range(n)]
    else:
        if isinstance(keep, (str, bytes)) or not isinstance(keep, Sequence):
            raise AdapterError(f"{name}: keep must be a list of row indices or label names (or None), got {keep!r}")
        if len(keep) != n:
            raise AdapterError(
                f"{name}: keep lists {len(keep)} rows but the new head has {n}; give exactly one entry per new row"
            )
        index: dict[str, int] | None = None
        picks = []
        for j, k in enumerate(keep):
            if k is None:
                picks.append(None)
            elif isinstance(k, str):
                if labels is None:
                    raise AdapterError(
                        f"{name}: keep names label {k!r} but no labels were given; pass labels=<checkpoint id2label>"
                    )
                if index is None:
                    index = {}
                    for i, lab in enumerate(_label_list(labels, "source")):
                        index.setdefault(lab, i)
                picks.append(index.get(k))
            elif isinstance(k, int) and not isinstance(k, bool):
                if not 0 <= k < rows:
                    raise AdapterError(
                        f"{name}: keep[{j}] = {k} is not a row of the checkpoint's head (it has rows 0..{rows - 1})"
                    )
                picks.append(k)
            else:
                raise AdapterError(f"{name}: keep[{j}] must be a row index, a label name or None, got {k!r}")
    new = [j for j, p in enumerate(picks) if p is None]
    if new and fill is None:
        raise AdapterError(
            f"{name}: new rows {new[:10]}{' ...' if len(new) > 10 else ''} have no checkpoint row "
            f"(the checkpoint's head has {rows}); pass fill='zeros' or fill='mean', or re-initialise the head with 'reinit'"
        )
    if weight_or_bias.is_meta:
        return weight_or_bias.new_empty((n, *weight_or_bias.shape[1:]))
    out = weight_or_bias.new_zeros((n, *weight_or_bias.shape[1:]))
    taken = [(j, p) for j, p in enumerate(picks) if p is not None]
    if taken:
        dst = torch.tensor([j for j, _ in taken], device=out.device)
        src = torch.tensor([p for _, p in taken], device=out.device)
        out[dst] = weight_or_bias[src]
    if new and fill == "mean":
        _check_float(weight_or_bias, name + " fill='mean'")
        out[new] = weight_or_bias.to(_work_dtype(weight_or_bias.dtype)).mean(0).to(weight_or_bias.dtype)
    return out


# ---------------------------------------------------------------------------
# embedding rows (vocabulary)


def embedding_rows(
    weight: torch.Tensor,
    n: int,
    *,
    init: Literal["mean", "zeros"] = "mean",
    covariance_scale: float = 1e-9,
    seed: int = 0,
) -> torch.Tensor:
    """Grow or shrink a vocabulary table ``[vocab, dim]`` (or an LM-head bias ``[vocab]``) to ``n`` rows.

    The first ``min(n, vocab)`` rows are the checkpoint's, bit-identical. New rows (``n > vocab``):

    * ``init="mean"``: transformers' ``mean_resizing``: drawn from a normal distribution with the
      old rows' mean and ``covariance_scale`` times their covariance (``1e-9`` as transformers
      does: the new rows sit at the mean, close to every old row, so logits barely move). When
      that covariance is not positive definite (fewer rows than dimensions), the rows are the
      mean exactly; ``covariance_scale=0`` always gives the mean. The draw is seeded, so a
      plan loads the same values every time.
    * ``init="zeros"``: zero rows.

    Args:
        weight: ``[vocab, dim]`` or ``[vocab]`` floating-point tensor.
        n: the new number of rows.
        init: how to make new rows.
        covariance_scale: factor on the covariance new rows are drawn with (``>= 0``).
        seed: seed of the draw.

    Returns:
        A new ``[n, dim]`` (or ``[n]``) tensor in ``weight``'s dtype; ``weight`` itself when ``n == vocab``.

    Raises:
        AdapterError: not 1-d or 2-d, not floating point, an unknown ``init``, a negative
            ``covariance_scale``, or ``init="mean"`` from an empty table.

    Example:
        >>> w = torch.randn(10, 4)
        >>> grown = embedding_rows(w, 12)
        >>> torch.equal(grown[:10], w), torch.allclose(grown[10], w.mean(0), atol=1e-3)
        (True, True)
    """
    name = "embedding_rows"
    if weight.dim() not in (1, 2):
        raise AdapterError(f"{name}: expects a table [vocab, dim] or a bias [vocab], got shape {list(weight.shape)}")
    _check_float(weight, name)
    n = _positive_int(n, "n", name)
    if init not in ("mean", "zeros"):
        raise AdapterError(f"{name}: unknown init {init!r}; use 'mean' (transformers' mean_resizing) or 'zeros'")
    if (
        not isinstance(covariance_scale, (int, float))
        or isinstance(covariance_scale, bool)
        or not covariance_scale >= 0
    ):
        raise AdapterError(f"{name}: covariance_scale must be a number >= 0, got {covariance_scale!r}")
    rows = weight.shape[0]
    if n == rows:
        return weight
    if n < rows:
        return weight[:n].clone()
    if init == "mean" and rows == 0:
        raise AdapterError(
            f"{name}: init='mean' needs at least one checkpoint row; the table is empty. Use init='zeros'"
        )
    added = n - rows
    shape = (n, *weight.shape[1:])
    if weight.is_meta:
        return weight.new_empty(shape)
    out = weight.new_empty(shape)
    out[:rows] = weight
    if init == "zeros":
        out[rows:] = 0
        return out
    table = weight.reshape(rows, -1).to(torch.float64)
    mean = table.mean(0)
    new = mean.expand(added, -1).clone()
    if covariance_scale > 0:
        centred = table - mean
        cov = centred.T @ centred / rows * float(covariance_scale)
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info) == 0:
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            z = torch.randn(added, table.shape[1], generator=gen, dtype=torch.float64)
            new = new + z @ chol.T.to(z.device)
    out[rows:] = new.reshape(added, *weight.shape[1:]).to(device=weight.device, dtype=weight.dtype)
    return out


# ---------------------------------------------------------------------------
# position tables


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
    _check_float(weight, name)
    n = _positive_int(n, "n", name)
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
        work = _work_dtype(weight.dtype)
        x = grid.to(work).T.unsqueeze(0)  # [1, dim, P]
        resized = F.interpolate(x, size=n - k, mode="linear", align_corners=False)[0].T.to(weight.dtype)
    out = torch.cat([prefix, resized], 0)
    return out if weight.dim() == 2 else out.unsqueeze(0)


def _grid_of(value: int | Sequence[int], adapter: str, what: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise AdapterError(f"{adapter}: {what} must be an int or (height, width), got {value!r}")
    h, w = (_positive_int(v, what, adapter) for v in value)
    return h, w


def _square_grid(tokens: int) -> tuple[int, int] | None:
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
    _check_float(weight, name)
    if mode not in ("bicubic", "bilinear", "nearest"):
        raise AdapterError(f"{name}: unknown mode {mode!r}; use 'bicubic', 'bilinear' or 'nearest'")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise AdapterError(f"{name}: num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    new_h, new_w = _grid_of(grid, name, "grid")
    table = weight if weight.dim() == 2 else weight[0]
    k = num_prefix_tokens
    tokens = table.shape[0] - k
    if source_grid is None:
        found = _square_grid(tokens)
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


# ---------------------------------------------------------------------------
# depth: layer selection as rename rules


def select_layers(
    layers: Mapping[int, int] | Sequence[int] | Literal["every_other"],
    *,
    template: str,
    num_layers: int | None = None,
    source_layers: int | None = None,
) -> list[tuple[re.Pattern[str], str | None]]:
    """Rename rules that build a shallower (or reordered) model from chosen checkpoint layers.

    A 6-layer student taking layers 0, 2, 4, ... of a 12-layer checkpoint is a rename: the
    checkpoint's ``encoder.layer.2.*`` becomes the model's ``encoder.layer.1.*``. The rules
    returned here do that and drop every checkpoint layer that is not selected (reported as
    ``ignored: dropped by a rule``, not as unexpected). Pass them as ``rules=`` to
    :func:`torchgraft.plan` / :func:`torchgraft.load`, alone or followed by your own rules.

    Args:
        layers: which checkpoint layer each model layer takes: ``{0: 0, 1: 2, 2: 4}`` (model
            layer -> checkpoint layer), the list ``[0, 2, 4]`` (the same), or ``"every_other"``
            (model layer ``i`` takes checkpoint layer ``2 * i``; needs ``num_layers``).
        template: the checkpoint's layer path with ``{}`` for the number, e.g.
            ``"encoder.layer.{}"`` or ``"model.layers.{}"``. It also matches after a leading
            prefix (``bert.encoder.layer.3.*``).
        num_layers: the model's number of layers (for ``"every_other"``).
        source_layers: the checkpoint's number of layers, to check the selection against.

    Returns:
        Ordered ``(re.Pattern, replacement)`` rules (``None`` = drop), a valid ``rules=`` value.

    Raises:
        AdapterError: the template has no single ``{}``, a layer number is negative or beyond
            ``source_layers``, one checkpoint layer is selected twice (a rename feeds one model
            layer), the selection swaps layers in a cycle, or ``"every_other"`` lacks ``num_layers``.

    Example:
        >>> rules = select_layers({0: 0, 1: 2, 2: 4}, template="encoder.layer.{}")
        >>> report = tg.load(student, "all-MiniLM-L6-v2/", rules=rules)   # 3-layer BERT
        >>> report.renamed["encoder.layer.2.output.dense.weight"]
        'encoder.layer.1.output.dense.weight'
    """
    name = "select_layers"
    if not isinstance(template, str) or template.count("{}") != 1:
        raise AdapterError(
            f"{name}: template must contain exactly one '{{}}' for the layer number, e.g. 'encoder.layer.{{}}'; got {template!r}"
        )
    mapping = _layer_mapping(layers, num_layers)
    for tgt, src in mapping.items():
        for value, what in ((tgt, "model layer"), (src, "checkpoint layer")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise AdapterError(f"{name}: {what} numbers must be ints >= 0, got {value!r}")
        if source_layers is not None and src >= source_layers:
            raise AdapterError(
                f"{name}: model layer {tgt} takes checkpoint layer {src}, but the checkpoint has layers 0..{source_layers - 1}"
            )
    seen: dict[int, int] = {}
    for tgt, src in mapping.items():
        if src in seen:
            raise AdapterError(
                f"{name}: checkpoint layer {src} is selected for model layers {seen[src]} and {tgt}; a rename feeds one "
                "model layer. Copy the layer after loading, or load twice with different rules"
            )
        seen[src] = tgt

    head, tail = template.split("{}")
    lead = r"(?:^|(?<=\.))" + re.escape(head)

    def pattern(number: str) -> re.Pattern[str]:
        return re.compile(lead + number + re.escape(tail) + r"(?=\.|$)")

    rules: list[tuple[re.Pattern[str], str | None]] = []
    selected = "|".join(str(s) for s in sorted(mapping.values()))
    # 1) drop every checkpoint layer that is not selected (any number, before any rename)
    rules.append((pattern(rf"(?!(?:{selected})(?:\D|$))\d+" if selected else r"\d+"), None))
    # 2) renames, ordered so that no renamed key meets a later rule: a rename s -> t must come
    #    after the rule that consumes the checkpoint's own layer t.
    moves = {src: tgt for tgt, src in mapping.items() if src != tgt}
    done: set[int] = set()
    order: list[int] = []
    while len(order) < len(moves):
        ready = [s for s in sorted(moves) if s not in done and (moves[s] not in moves or moves[s] in done)]
        if not ready:
            cycle = sorted(s for s in moves if s not in done)
            raise AdapterError(
                f"{name}: checkpoint layers {cycle} swap places in a cycle; renames cannot express a permutation. "
                "Load with the layers in order and permute the modules afterwards"
            )
        for s in ready:
            done.add(s)
            order.append(s)
    for s in order:
        rules.append((pattern(str(s)), f"{head}{moves[s]}{tail}"))
    return rules


def _layer_mapping(layers: Any, num_layers: int | None) -> dict[int, int]:
    name = "select_layers"
    if isinstance(layers, str):
        if layers != "every_other":
            raise AdapterError(
                f"{name}: unknown selection {layers!r}; use 'every_other', a list or a {{model: checkpoint}} dict"
            )
        if num_layers is None:
            raise AdapterError(f"{name}: 'every_other' needs num_layers= (the model's number of layers)")
        return {i: 2 * i for i in range(_positive_int(num_layers, "num_layers", name))}
    if isinstance(layers, Mapping):
        return dict(layers)
    if isinstance(layers, Sequence):
        return dict(enumerate(layers))
    raise AdapterError(f"{name}: layers must be a {{model: checkpoint}} dict, a list or 'every_other', got {layers!r}")


# ---------------------------------------------------------------------------
# registry: names the plan refers to


@dataclass(frozen=True)
class Adapter:
    """A named adapter the plan can refer to.

    ``fn(tensor, target_shape, **args)`` returns the adapted tensor; ``prepare(args, context)``
    (optional) runs once at plan time and returns the final, JSON-serialisable args and a note
    (e.g. label names resolved to row indices).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    summary: str
    prepare: Callable[[dict[str, Any], Mapping[str, Any]], tuple[dict[str, Any], str]] | None = None


def _target_rows(shape: Sequence[int], axis: int = 0) -> int:
    return int(shape[axis])


def _run_input_channels(t: torch.Tensor, target_shape: tuple[int, ...], **args: Any) -> torch.Tensor:
    if "method" not in args:
        raise AdapterError("input_channels: needs args {'method': 'sum' | 'mean' | 'luminance' | 'repeat' | [[...]]}")
    if len(target_shape) < 2:
        raise AdapterError(f"input_channels: the target {list(target_shape)} is not a weight [out, in, *kernel]")
    return input_channels(t, target_shape[1], **args)


def _run_output_rows(t: torch.Tensor, target_shape: tuple[int, ...], **args: Any) -> torch.Tensor:
    return output_rows(t, _target_rows(target_shape), **args)


def _run_embedding_rows(t: torch.Tensor, target_shape: tuple[int, ...], **args: Any) -> torch.Tensor:
    return embedding_rows(t, _target_rows(target_shape), **args)


def _run_positions_1d(t: torch.Tensor, target_shape: tuple[int, ...], **args: Any) -> torch.Tensor:
    if len(target_shape) not in (2, 3):
        raise AdapterError(f"positions_1d: the target {list(target_shape)} is not a table [positions, dim]")
    return positions_1d(t, int(target_shape[-2]), **args)


def _run_positions_2d(t: torch.Tensor, target_shape: tuple[int, ...], **args: Any) -> torch.Tensor:
    args = dict(args)
    if len(target_shape) not in (2, 3):
        raise AdapterError(f"positions_2d: the target {list(target_shape)} is not a table [1, tokens, dim]")
    if "grid" not in args:
        k = args.get("num_prefix_tokens", 1)
        grid = _square_grid(int(target_shape[-2]) - (k if isinstance(k, int) else 0))
        if grid is None:
            raise AdapterError(
                f"positions_2d: the model's {target_shape[-2]} rows minus {k} prefix rows are not a square grid; "
                "pass args {'grid': [height, width]}"
            )
        args["grid"] = grid
    return positions_2d(t, **args)


def _prepare_output_rows(args: dict[str, Any], ctx: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """``keep="labels"``: match rows by ``id2label`` of the checkpoint's and the model's configs."""
    if args.get("keep") != "labels":
        return args, ""
    args = dict(args)
    del args["keep"]
    source_labels = args.pop("source_labels", None) or ctx.get("source_labels")
    target_labels = args.pop("target_labels", None) or ctx.get("target_labels")
    if source_labels is None:
        raise AdapterError(
            "output_rows: keep='labels' needs the checkpoint's labels: put its config.json (with id2label) next to the "
            "checkpoint, or pass args {'source_labels': [...]}"
        )
    if target_labels is None:
        raise AdapterError(
            "output_rows: keep='labels' needs the model's labels: model.config.id2label, or args {'target_labels': [...]}"
        )
    rows = label_rows(source_labels, target_labels)
    names = _label_list(target_labels, "target")
    args["keep"] = rows
    pairs = ", ".join(f"{lab}<-{'new' if r is None else r}" for lab, r in zip(names, rows))
    return args, f"rows by label: {pairs}"


#: Every adapter the plan can name.
ADAPTERS: dict[str, Adapter] = {}

#: Short names for the policy (``adapt={"features.0.0.weight": "luminance"}``) -> (adapter, args).
SHORTHANDS: dict[str, tuple[str, dict[str, Any]]] = {
    "sum": ("input_channels", {"method": "sum"}),
    "mean": ("input_channels", {"method": "mean"}),
    "luminance": ("input_channels", {"method": "luminance"}),
    "repeat": ("input_channels", {"method": "repeat"}),
    "first_rows": ("output_rows", {}),
    "tile": ("positions_1d", {"method": "tile"}),
}


def register_adapter(adapter: Adapter, *, replace: bool = False) -> None:
    """Make an adapter available to plans by name.

    Args:
        adapter: ``Adapter(name, fn, summary)``; ``fn(tensor, target_shape, **args)`` must keep
            the dtype and return ``target_shape``.
        replace: allow replacing an adapter of the same name.

    Raises:
        AdapterError: the name is taken (and ``replace`` is false) or is a shorthand.

    Example:
        >>> register_adapter(Adapter("negate", lambda t, target_shape: -t, "flip the sign"))
        >>> tg.load(model, ckpt, adapt={"head.weight": "negate"})
    """
    if adapter.name in SHORTHANDS or adapter.name == "reinit" or (adapter.name in ADAPTERS and not replace):
        raise AdapterError(
            f"an adapter named {adapter.name!r} already exists; pass replace=True or choose another name"
        )
    ADAPTERS[adapter.name] = adapter


for _a in (
    Adapter(
        "input_channels", _run_input_channels, "input channels of a first conv (sum, mean, luminance, repeat, matrix)"
    ),
    Adapter("output_rows", _run_output_rows, "classifier rows: first n, by index or by label", _prepare_output_rows),
    Adapter("embedding_rows", _run_embedding_rows, "vocabulary rows: old rows kept, new rows from mean and covariance"),
    Adapter("positions_1d", _run_positions_1d, "position table length, by interpolation (or tiling)"),
    Adapter("positions_2d", _run_positions_2d, "ViT position grid, by 2-d interpolation, prefix tokens kept"),
):
    register_adapter(_a)


def resolve(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """A policy value as a plan spec: ``"luminance"`` -> ``{"name": "input_channels", "args": {"method": "luminance"}}``.

    Accepts an adapter name, a shorthand from :data:`SHORTHANDS`, ``"reinit"``, or
    ``{"name": ..., "args": {...}}``. The result holds only JSON types (tuples become lists,
    tensors nested lists).

    Raises:
        AdapterError: unknown name, a malformed dict, or args that are not JSON data.
    """
    if isinstance(spec, str):
        if spec == "reinit":
            return {"name": "reinit", "args": {}}
        if spec in SHORTHANDS:
            name, args = SHORTHANDS[spec]
            return {"name": name, "args": _jsonable(dict(args), name)}
        if spec in ADAPTERS:
            return {"name": spec, "args": {}}
        raise AdapterError(f"unknown adapter {spec!r}; choose from {_choices()}")
    if isinstance(spec, Mapping):
        extra = set(spec) - {"name", "args"}
        if "name" not in spec or extra:
            raise AdapterError(f"an adapter spec is {{'name': ..., 'args': {{...}}}}, got {dict(spec)!r}")
        base = resolve(spec["name"])
        args = spec.get("args") or {}
        if not isinstance(args, Mapping):
            raise AdapterError(f"adapter {spec['name']!r}: args must be a dict, got {args!r}")
        return {"name": base["name"], "args": {**base["args"], **_jsonable(dict(args), base["name"])}}
    raise AdapterError(
        f"an adapter is named by a string or {{'name': ..., 'args': {{...}}}}, got {type(spec).__name__}; "
        "for your own function, register_adapter(Adapter(name, fn, summary)) and use its name"
    )


def _choices() -> str:
    return ", ".join([*sorted(ADAPTERS), *sorted(SHORTHANDS), "reinit"])


def _jsonable(value: Any, adapter: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise AdapterError(f"adapter {adapter!r}: argument names must be strings, got {k!r}")
            out[k] = _jsonable(v, adapter)
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, adapter) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise AdapterError(
        f"adapter {adapter!r}: argument {value!r} ({type(value).__name__}) is not JSON data; plans must be saveable"
    )


def run(
    spec: Mapping[str, Any],
    tensor: torch.Tensor,
    *,
    target_shape: Sequence[int],
    model: nn.Module | None = None,
    target: str | None = None,
) -> torch.Tensor:
    """Execute a plan entry's adapter: ``{"name": ..., "args": {...}}`` on ``tensor`` for ``target_shape``.

    Works on meta tensors too (the plan uses that to check shapes without reading data).

    Args:
        spec: the entry's ``adapter``.
        tensor: the checkpoint's tensor.
        target_shape: the model entry's shape; the result is checked against it.
        model, target: the model and entry name, for error messages.

    Returns:
        The adapted tensor, of ``target_shape`` and ``tensor``'s dtype.

    Raises:
        AdapterError: unknown adapter, bad args, a shape it cannot handle, or a result of
            another shape than ``target_shape``; the message names ``target``.

    Example:
        >>> run({"name": "embedding_rows", "args": {}}, torch.randn(10, 4), target_shape=(12, 4)).shape
        torch.Size([12, 4])
    """
    where = f" for {target!r}" if target else ""
    name = spec.get("name")
    if name == "reinit":
        raise AdapterError(f"'reinit'{where} is a plan action (the module is initialised), not a tensor adapter")
    adapter = ADAPTERS.get(name)  # type: ignore[arg-type]
    if adapter is None:
        raise AdapterError(f"unknown adapter {name!r}{where}; choose from {_choices()}")
    args = spec.get("args") or {}
    shape = tuple(int(d) for d in target_shape)
    try:
        out = adapter.fn(tensor, shape, **args)
    except AdapterError as e:
        raise AdapterError(f"{e}{where}") from None
    except TypeError as e:
        raise AdapterError(f"adapter {name!r}{where}: bad arguments {dict(args)!r}: {e}") from None
    if tuple(out.shape) != shape:
        raise AdapterError(
            f"adapter {name!r}{where} turned {list(tensor.shape)} into {list(out.shape)}, but the model needs {list(shape)}: "
            "it changes one dimension and the others differ too"
        )
    if out.dtype != tensor.dtype:
        raise AdapterError(
            f"adapter {name!r}{where} changed the dtype {tensor.dtype} -> {out.dtype}; adapters must keep it"
        )
    return out
