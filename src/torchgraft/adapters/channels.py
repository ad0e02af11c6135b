"""Input channels of a first convolution or patch embedding (3 -> 1, N -> M, a mixing matrix)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from ..errors import AdapterError
from .checks import check_float, positive_int, work_dtype

__all__ = ["LUMINANCE", "ChannelMethod", "input_channels"]


#: ITU-R BT.601 luma weights for R, G, B: ``0.299 R + 0.587 G + 0.114 B``.
LUMINANCE: tuple[float, float, float] = (0.299, 0.587, 0.114)

ChannelMethod = Literal["sum", "mean", "luminance", "repeat"]


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
    * ``"luminance"``: 3 -> 1 only, ``0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601 luma).
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
    check_float(weight, name)
    m_out = positive_int(in_channels, "in_channels", name)
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
    work = work_dtype(weight.dtype)
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
