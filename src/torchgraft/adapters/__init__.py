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

Depth changes are renames, not tensor changes: :func:`torchgraft.rules.select_layers` (also
here as ``tg.adapters.select_layers``) builds the rules for ``tg.plan(..., rules=...)``.

The plan refers to adapters by name through :data:`ADAPTERS` (``{"name": ..., "args": {...}}``
in a plan entry, JSON-serialisable); :func:`run` executes such a spec against the target shape.
:func:`register_adapter` adds your own.

One module per family (``channels``, ``rows``, ``embedding``, ``positions``); the names the
plan uses live in ``registry``; every public name is re-exported here.

Example:
    >>> w = torch.randn(32, 3, 3, 3)
    >>> input_channels(w, 1, method="luminance").shape
    torch.Size([32, 1, 3, 3])
    >>> run({"name": "input_channels", "args": {"method": "sum"}}, w, target_shape=(32, 1, 3, 3)).shape
    torch.Size([32, 1, 3, 3])
"""

from __future__ import annotations

from ..rules import select_layers
from .channels import LUMINANCE, ChannelMethod, input_channels
from .embedding import embedding_rows
from .positions import positions_1d, positions_2d
from .registry import ADAPTERS, SHORTHANDS, Adapter, json_args, register_adapter, resolve, run
from .rows import Fill, label_rows, output_rows

__all__ = [
    "ADAPTERS",
    "LUMINANCE",
    "SHORTHANDS",
    "Adapter",
    "ChannelMethod",
    "Fill",
    "embedding_rows",
    "input_channels",
    "json_args",
    "label_rows",
    "output_rows",
    "positions_1d",
    "positions_2d",
    "register_adapter",
    "resolve",
    "run",
    "select_layers",
]
