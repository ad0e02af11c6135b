"""Vocabulary rows: old rows kept, new rows from the old rows' mean and covariance (or zeros)."""

from __future__ import annotations

from typing import Literal

import torch

from ..errors import AdapterError
from .checks import check_float, positive_int

__all__ = ["embedding_rows"]


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
    check_float(weight, name)
    n = positive_int(n, "n", name)
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
