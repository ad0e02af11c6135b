"""Layout changes from other frameworks' weight conventions to torch's, as data: one entry per kind.

Readers of Keras and Flax files record, per entry, which of these they applied
(``Source.conversions``); the shape function gives the torch shape at open time without reading
any bytes, the tensor function does the same change to the values on load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["LAYOUTS", "Layout"]


@dataclass(frozen=True)
class Layout:
    """One layout change: ``shape(stored) -> torch shape``, ``apply(tensor) -> tensor``, ``describe(stored)``."""

    ndims: tuple[int, ...]
    shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    apply: Callable[[torch.Tensor], torch.Tensor]
    words: str

    def describe(self, stored: tuple[int, ...]) -> str:
        return f"{self.words}: {list(stored)} -> {list(self.shape(stored))}"


def _dense_shape(s: tuple[int, ...]) -> tuple[int, ...]:
    return (s[1], s[0])


def _conv_shape(s: tuple[int, ...]) -> tuple[int, ...]:  # (*spatial, in, out) -> (out, in, *spatial)
    return (s[-1], s[-2], *s[:-2])


def _conv(t: torch.Tensor) -> torch.Tensor:
    n = t.ndim
    return t.permute(n - 1, n - 2, *range(n - 2)).contiguous()


def _depthwise_shape(s: tuple[int, ...]) -> tuple[int, ...]:  # (*spatial, channels, multiplier) -> (c*m, 1, *spatial)
    return (s[-2] * s[-1], 1, *s[:-2])


def _depthwise(t: torch.Tensor) -> torch.Tensor:
    # Keras orders depthwise outputs channel-major (output c*m + q), as torch's grouped conv does
    n = t.ndim
    return t.permute(n - 2, n - 1, *range(n - 2)).reshape(_depthwise_shape(tuple(t.shape))).contiguous()


#: kind -> layout change. ``dense``: [in, out] -> [out, in]; ``conv``: channels-last kernels
#: (W/HW/DHW, in, out) -> torch's (out, in, W/HW/DHW); ``depthwise``: (HW, channels, multiplier) -> (c*m, 1, HW).
LAYOUTS: dict[str, Layout] = {
    "dense": Layout((2,), _dense_shape, lambda t: t.t().contiguous(), "kernel [in, out] transposed to [out, in]"),
    "conv": Layout((3, 4, 5), _conv_shape, _conv, "kernel (spatial..., in, out) permuted to (out, in, spatial...)"),
    "depthwise": Layout(
        (3, 4),
        _depthwise_shape,
        _depthwise,
        "depthwise kernel (spatial..., channels, multiplier) to (c*m, 1, spatial...)",
    ),
}
