"""Classifier rows: the first n, rows by index, rows by label name (``id2label``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from ..errors import AdapterError
from .checks import check_float, positive_int, work_dtype

__all__ = ["Fill", "label_list", "label_rows", "output_rows"]


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
    src = label_list(source_labels, "source")
    tgt = label_list(target_labels, "target")
    index: dict[str, int] = {}
    for i, label in enumerate(src):
        index.setdefault(label, i)
    return [index.get(label) for label in tgt]


def label_list(labels: Mapping[Any, str] | Sequence[str], which: str) -> list[str]:
    """Label names in row order from an ``id2label`` mapping (keys may be strings) or a list.

    Raises:
        AdapterError: keys that are not row numbers, rows with gaps, or neither a mapping nor a list;
            ``which`` (``"source"`` / ``"target"``) names the side in the message.
    """
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
    n = positive_int(n, "n", name)
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
                    for i, lab in enumerate(label_list(labels, "source")):
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
        check_float(weight_or_bias, name + " fill='mean'")
        out[new] = weight_or_bias.to(work_dtype(weight_or_bias.dtype)).mean(0).to(weight_or_bias.dtype)
    return out
