"""Comparing two checkpoints, or a checkpoint and a model: names, shapes, dtypes, and values on request.

``diff(a, b)`` works from names, shapes and dtypes alone (no tensor bytes, and no torch import for
safetensors files). Names found on one side only are paired up where they look like renames: a
base-model prefix added or removed, or the same shape under a similar path. ``values=True`` reads
both sides and adds per-tensor and per-layer relative change (``‖B − A‖ / ‖A‖``), which
:meth:`CheckpointDiff.plot` draws.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .align.vocabulary import path_similarity
from .keys import collapse_keys, natural_key, resolve_prefix
from .sources import Source

if TYPE_CHECKING:
    from torch import nn

__all__ = ["CheckpointDiff", "Rename", "diff", "layer_of"]

_MIN_SCORE = 0.5  # similar enough among several same-shaped candidates
_MIN_SCORE_UNIQUE = 0.2  # the only tensor of its shape on both sides
_MAX_PAIRS_PER_SHAPE = 250_000  # beyond this a shape bucket is too ambiguous to pair by name


@dataclass
class Rename:
    """A name on one side that looks like a name on the other.

    Attributes:
        a, b: the name in A and in B.
        shape_a, shape_b, dtype_a, dtype_b: both sides' (the shapes differ only for prefix pairs).
        score: how sure (1.0 for a prefix change, else path similarity in 0..1).
        reason: why, in words.
        kind: ``"prefix"`` (a base-model prefix added or removed) or ``"similar"``.
    """

    a: str
    b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    score: float
    reason: str
    kind: str = "similar"


@dataclass
class CheckpointDiff:
    """The difference between two checkpoints (A = before, B = after).

    Attributes:
        a, b: what was compared (path and format).
        common: names present on both sides.
        only_a, only_b: names present on one side only (including those in ``renames``).
        renames: suggested pairs among ``only_a`` x ``only_b``.
        prefix: ``{"mode": "add" | "strip", "prefix": "bert.", "count": n}`` when B's names are
            A's with a base-model prefix added (or removed).
        shape_changed, dtype_changed: common names whose shape or dtype differs.
        values: with ``values=True``: per compared tensor ``{"name", "b", "max_abs", "rel",
            "identical"}``, ``rel`` = ``‖B − A‖ / ‖A‖`` (``None`` when A is all zeros).
        layers: with ``values=True``: per layer (``encoder.layer.3``) ``{"layer", "rel",
            "tensors", "changed"}`` in model order.
        skipped_values: names whose values could not be compared, and why.

    Example:
        >>> d = tg.diff("base/model.safetensors", "finetuned/model.safetensors", values=True)
        >>> d.only_a, [r.b for r in d.renames], d.layers[0]
        >>> d.plot("change.png")
    """

    a: str
    b: str
    common: list[str] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    renames: list[Rename] = field(default_factory=list)
    prefix: dict[str, Any] = field(default_factory=dict)
    shape_changed: list[dict[str, Any]] = field(default_factory=list)
    dtype_changed: list[dict[str, Any]] = field(default_factory=list)
    values: list[dict[str, Any]] | None = None
    layers: list[dict[str, Any]] | None = None
    skipped_values: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        """True when anything differs: names, shapes, dtypes, or (when compared) values."""
        structural = self.only_a or self.only_b or self.shape_changed or self.dtype_changed
        return bool(structural) or any(not v["identical"] for v in self.values or ())

    def summary(self) -> dict[str, int]:
        out = {
            "common": len(self.common),
            "only_a": len(self.only_a),
            "only_b": len(self.only_b),
            "renames": len(self.renames),
            "shape_changed": len(self.shape_changed),
            "dtype_changed": len(self.dtype_changed),
        }
        if self.values is not None:
            out["values_compared"] = len(self.values)
            out["values_changed"] = sum(not v["identical"] for v in self.values)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (shapes as lists)."""
        d = asdict(self)
        d["renames"] = [{**r, "shape_a": list(r["shape_a"]), "shape_b": list(r["shape_b"])} for r in d["renames"]]
        d["summary"] = self.summary()
        d["changed"] = self.changed
        return d

    # Rendering ------------------------------------------------------------
    def __rich__(self):
        return _renderable(self)

    def __str__(self) -> str:
        from .report import render_text

        return render_text(self)

    def plot(self, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
        """Draw the per-layer relative change as a bar chart (PNG), written atomically.

        Raises:
            ValueError: values were not compared (``diff(..., values=True)``).
            ImportError: matplotlib is not installed (``pip install 'torchgraft[plot]'``).
        """
        if self.layers is None:
            raise ValueError("no values to plot: compare them first with diff(a, b, values=True) (--values)")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("plotting needs matplotlib: pip install 'torchgraft[plot]'") from None
        from .fileio import atomic_path

        labels = [row["layer"] for row in self.layers]
        rel = [row["rel"] if row["rel"] is not None else 0.0 for row in self.layers]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(labels) + 2), 4.5), layout="constrained")
        ax.bar(range(len(labels)), rel, color="#3b7dd8")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        positive = [r for r in rel if r > 0]
        if positive and max(positive) / min(positive) > 1e3:
            ax.set_yscale("log")
        ax.set_ylabel("relative change  ‖B − A‖ / ‖A‖")
        ax.set_title(title or f"per-layer change: {_short(self.b)} vs {_short(self.a)}", fontsize=9)
        out = Path(path)
        try:
            with atomic_path(out) as tmp:
                fig.savefig(tmp, format="png", dpi=120)
        finally:
            plt.close(fig)
        return out


def layer_of(name: str) -> str:
    """The layer a tensor belongs to, for per-layer summaries.

    The path up to the first layer number (``encoder.layer.3``, ``features.3``); names without a
    number group by their module path, at most two levels deep (``embeddings.word_embeddings``).
    """
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    module = parts[:-1] or parts
    return ".".join(module[:2])


def diff(
    a: str | os.PathLike[str] | Source | Mapping[str, Any] | nn.Module,
    b: str | os.PathLike[str] | Source | Mapping[str, Any] | nn.Module,
    *,
    values: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CheckpointDiff:
    """Compare two checkpoints (or a checkpoint and a model's state dict).

    Args:
        a, b: paths (file, ``*.index.json``, directory, ``hf:org/name``), open sources, state
            dicts, or ``nn.Module`` s (their ``state_dict()``; a model on the meta device has
            names and shapes but no values).
        values: also read the tensors and compute, per tensor present on both sides (or paired
            as a rename) with the same shape, the largest absolute change and the relative
            change ``‖B − A‖ / ‖A‖``, and the same per layer. Needs torch.
        progress: called as ``progress(done, total)`` while values are compared.

    Returns:
        A :class:`CheckpointDiff`; ``str()`` is a readable report, ``to_dict()`` JSON-ready.

    Raises:
        CheckpointError: either side cannot be read.

    Example:
        >>> d = tg.diff("all-MiniLM-L6-v2/", "finetuned/")
        >>> d.only_a, d.only_b, [(r.a, r.b) for r in d.renames]
    """
    src_a, src_b = _as_source(a), _as_source(b)
    names_a, names_b = list(src_a), set(src_b)
    common = [n for n in names_a if n in names_b]
    only_a = [n for n in names_a if n not in names_b]
    set_a = set(names_a)
    only_b = [n for n in src_b if n not in set_a]
    result = CheckpointDiff(a=src_a.describe(), b=src_b.describe(), common=common, only_a=only_a, only_b=only_b)
    for n in common:
        ra, rb = src_a[n], src_b[n]
        if ra.shape != rb.shape:
            result.shape_changed.append({"name": n, "a": list(ra.shape), "b": list(rb.shape)})
        if ra.dtype != rb.dtype:
            result.dtype_changed.append({"name": n, "a": ra.dtype, "b": rb.dtype})
    result.prefix, prefix_pairs = _prefix_pairs(only_a, only_b)
    result.renames = [
        _rename(src_a, src_b, x, y, 1.0, _prefix_reason(result.prefix), "prefix") for x, y in prefix_pairs
    ]
    paired_a = {r.a for r in result.renames}
    paired_b = {r.b for r in result.renames}
    result.renames += _similar_pairs(
        src_a, src_b, [n for n in only_a if n not in paired_a], [n for n in only_b if n not in paired_b]
    )
    if values:
        _compare_values(result, src_a, src_b, progress)
    return result


# ---------------------------------------------------------------------------


def _as_source(x: Any) -> Source:
    from .sources import open as open_source

    if hasattr(x, "state_dict") and callable(x.state_dict) and not isinstance(x, (Source, Mapping)):
        return Source.from_state_dict(x.state_dict(), name=f"model {type(x).__name__}")
    return open_source(x)


def _rename(src_a: Source, src_b: Source, a: str, b: str, score: float, reason: str, kind: str = "similar") -> Rename:
    ra, rb = src_a[a], src_b[b]
    return Rename(a, b, ra.shape, rb.shape, ra.dtype, rb.dtype, round(score, 3), reason, kind)


def _prefix_reason(prefix: Mapping[str, Any]) -> str:
    verb = "added" if prefix.get("mode") == "add" else "removed"
    return f"base-model prefix {prefix.get('prefix')!r} {verb}"


def _prefix_pairs(only_a: list[str], only_b: list[str]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """B's names are A's with a leading ``p.`` added (``add``) or removed (``strip``), decided as for plans."""
    set_a, set_b = set(only_a), set(only_b)
    pfx = resolve_prefix(set_a, set_b)
    if not pfx.mode:
        return {}, []
    if pfx.mode == "add":
        pairs = [(pfx.to_source(n), n) for n in only_b if n.startswith(pfx.prefix) and pfx.to_source(n) in set_a]
    else:
        pairs = [(n, pfx.to_target(n, set_b)) for n in only_a if pfx.to_target(n, set_b) != n]
    return {"mode": pfx.mode, "prefix": pfx.prefix, "count": len(pairs)}, pairs


def _similar_pairs(src_a: Source, src_b: Source, only_a: list[str], only_b: list[str]) -> list[Rename]:
    """Pair leftovers of the same shape and dtype kind by path similarity, best pairs first."""
    buckets_b: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for n in only_b:
        buckets_b[src_b[n].shape].append(n)
    buckets_a: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for n in only_a:
        if src_a[n].shape in buckets_b:
            buckets_a[src_a[n].shape].append(n)
    out: list[Rename] = []
    for shape, names_a in buckets_a.items():
        names_b = buckets_b[shape]
        if len(names_a) * len(names_b) > _MAX_PAIRS_PER_SHAPE:
            continue
        unique = len(names_a) == 1 and len(names_b) == 1
        scored = sorted(
            ((path_similarity(x, y), x, y) for x in names_a for y in names_b), key=lambda t: (-t[0], t[1], t[2])
        )
        used_a: set[str] = set()
        used_b: set[str] = set()
        for score, x, y in scored:
            if x in used_a or y in used_b:
                continue
            if score < (_MIN_SCORE_UNIQUE if unique else _MIN_SCORE):
                break
            used_a.add(x)
            used_b.add(y)
            reason = (
                f"only tensor of shape {list(shape)} on either side"
                if unique
                else f"same shape {list(shape)}, similar path"
            )
            out.append(_rename(src_a, src_b, x, y, score, reason))
    return sorted(out, key=lambda r: natural_key(r.a))


def _compare_values(
    result: CheckpointDiff, src_a: Source, src_b: Source, progress: Callable[[int, int], None] | None
) -> None:
    import torch

    shapes_changed = {d["name"] for d in result.shape_changed}
    pairs = [(n, n) for n in result.common if n not in shapes_changed]
    pairs += [(r.a, r.b) for r in result.renames if r.shape_a == r.shape_b]
    rows: list[dict[str, Any]] = []
    per_layer: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0, 0])  # diff², base², tensors, changed
    order: dict[str, int] = {}
    for i, (na, nb) in enumerate(pairs):
        ta, tb = src_a[na].load(), src_b[nb].load()
        if ta.is_meta or tb.is_meta:
            result.skipped_values[na] = "no values (a model on the meta device)"
            continue
        if not (_numeric(ta) and _numeric(tb)):
            result.skipped_values[na] = f"cannot compare {ta.dtype} with {tb.dtype}"
            continue
        identical = ta.dtype == tb.dtype and torch.equal(ta, tb)
        if identical:
            max_abs = dn2 = 0.0
            base2 = _sq_norm(ta)
        else:
            da, db = ta.detach().to(torch.float64), tb.detach().to(torch.float64)
            delta = db - da
            max_abs = float(delta.abs().max()) if delta.numel() else 0.0
            dn2, base2 = float(delta.pow(2).sum()), float(da.pow(2).sum())
            del da, db, delta
        rel = math.sqrt(dn2) / math.sqrt(base2) if base2 > 0 else (0.0 if dn2 == 0 else None)
        if not math.isfinite(max_abs) or (rel is not None and not math.isfinite(rel)):  # NaN / Inf: JSON-safe None
            max_abs, rel = (max_abs if math.isfinite(max_abs) else None), None
        rows.append({"name": na, "b": nb, "max_abs": max_abs, "rel": rel, "identical": identical})
        layer = layer_of(nb)
        order.setdefault(layer, len(order))
        acc = per_layer[layer]
        acc[0] += dn2
        acc[1] += base2
        acc[2] += 1
        acc[3] += 0 if identical else 1
        if progress is not None:
            progress(i + 1, len(pairs))
    result.values = rows
    identical = {(v["name"], v["b"]) for v in rows if v["identical"]}
    for r in result.renames:
        if (r.a, r.b) in identical:
            r.reason += "; values identical"
    layers = sorted(per_layer, key=lambda l: (natural_key(l), order[l]))
    result.layers = [
        {
            "layer": layer,
            "rel": _finite_or_none(math.sqrt(per_layer[layer][0]) / math.sqrt(per_layer[layer][1]))
            if per_layer[layer][1] > 0
            else None,
            "tensors": int(per_layer[layer][2]),
            "changed": int(per_layer[layer][3]),
        }
        for layer in layers
    ]


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _numeric(t: Any) -> bool:
    return not t.is_complex()


def _sq_norm(t: Any) -> float:
    import torch

    return float(t.detach().to(torch.float64).pow(2).sum())


# ---------------------------------------------------------------------------
# Rendering (rich is imported only here)

_MAX_ROWS = 20


def _short(desc: str) -> str:
    head = desc.split(" (")[0]
    parts = Path(head).parts
    return "/".join(parts[-2:]) if len(parts) > 2 else head


def _keys_text(keys: Iterable[str], limit: int = 12) -> str:
    lines = collapse_keys(keys)
    if len(lines) > limit:
        lines = lines[: limit - 1] + [f"... and {len(lines) - limit + 1} more groups"]
    return "\n".join(lines)


def _fmt(x: float | None, missing: str = "n/a (A is zero)") -> str:
    if x is None:
        return missing
    if x == 0:
        return "0"
    return f"{x:.3g}"


def _renderable(d: CheckpointDiff):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = [Text(f"A: {d.a}\nB: {d.b}", style="bold")]
    s = d.summary()
    paired_a = {r.a for r in d.renames}
    paired_b = {r.b for r in d.renames}
    alone_a = [k for k in d.only_a if k not in paired_a]
    alone_b = [k for k in d.only_b if k not in paired_b]
    line = (  # the same counts as the tables below: names a suggested rename explains are counted there
        f"common: {s['common']}   only in A: {len(alone_a)}   only in B: {len(alone_b)}   "
        f"suggested renames: {s['renames']}   shape changes: {s['shape_changed']}   dtype changes: {s['dtype_changed']}"
    )
    if d.values is not None:
        line += f"\nvalues changed: {s['values_changed']} of {s['values_compared']} compared"
    parts.append(Text(line))
    if not d.changed:
        parts.append(
            Text(
                "no differences"
                + (" (names, shapes, dtypes and values)" if d.values is not None else " in names, shapes and dtypes"),
                style="green",
            )
        )
    def more(t: Any, total: int, columns: int) -> None:
        if total > _MAX_ROWS:
            t.add_row(f"... and {total - _MAX_ROWS} more (--json / to_dict() lists all)", *[""] * (columns - 1))

    def keys_table(title: str, keys: list[str]) -> None:
        if keys:
            t = Table(title=title, title_justify="left", show_header=False)
            t.add_column("keys", overflow="fold")
            t.add_row(_keys_text(keys))
            parts.append(t)

    keys_table(f"only in A ({len(alone_a)}, renames aside)", alone_a)
    keys_table(f"only in B ({len(alone_b)}, renames aside)", alone_b)
    if d.prefix:
        parts.append(
            Text(
                f"{_prefix_reason(d.prefix)} in B: {d.prefix['count']} names ({d.prefix['prefix']}<name>)",
                style="yellow",
            )
        )
    other = [r for r in d.renames if r.kind != "prefix"]
    shown_prefix = [r for r in d.renames if r.kind == "prefix" and r.shape_a != r.shape_b]  # the rest is one line
    if other or shown_prefix:
        in_line = len(d.renames) - len(other) - len(shown_prefix)
        title = f"suggested renames ({len(other) + len(shown_prefix)}" + (
            f"; the other {in_line} are the prefix line above)" if in_line else ")"
        )
        t = Table(title=title, title_justify="left")
        t.add_column("A name\n-> B name", overflow="fold", ratio=3)
        t.add_column("shape", overflow="fold", ratio=1)
        t.add_column("why (score)", overflow="fold", ratio=2)
        for r in (other + shown_prefix)[:_MAX_ROWS]:
            shape = str(list(r.shape_a)) if r.shape_a == r.shape_b else f"{list(r.shape_a)} -> {list(r.shape_b)}"
            t.add_row(f"{r.a}\n-> {r.b}", shape, f"{r.reason} ({r.score:.2f})")
        more(t, len(other) + len(shown_prefix), 3)
        parts.append(t)
    if d.shape_changed:
        t = Table(title=f"shape changes ({len(d.shape_changed)})", title_justify="left")
        for col in ("name", "A", "B"):
            t.add_column(col, overflow="fold")
        for row in d.shape_changed[:_MAX_ROWS]:
            t.add_row(row["name"], str(row["a"]), str(row["b"]))
        more(t, len(d.shape_changed), 3)
        parts.append(t)
    if d.dtype_changed:
        t = Table(title=f"dtype changes ({len(d.dtype_changed)})", title_justify="left")
        for col in ("name", "A", "B"):
            t.add_column(col, overflow="fold")
        for row in d.dtype_changed[:_MAX_ROWS]:
            t.add_row(row["name"], row["a"], row["b"])
        more(t, len(d.dtype_changed), 3)
        parts.append(t)
    if d.values is not None:
        changed = sorted(
            (v for v in d.values if not v["identical"]), key=lambda v: -(v["rel"] if v["rel"] is not None else math.inf)
        )
        if changed:
            t = Table(title=f"changed values ({len(changed)}; largest relative change first)", title_justify="left")
            for col, just in (("name", "left"), ("max abs change", "right"), ("relative change", "right")):
                t.add_column(col, justify=just, overflow="fold")
            for v in changed[:_MAX_ROWS]:
                name = v["name"] if v["name"] == v["b"] else f"{v['name']} -> {v['b']}"
                t.add_row(name, _fmt(v["max_abs"], "NaN/Inf"), _fmt(v["rel"], "n/a (A is zero, or NaN/Inf)"))
            more(t, len(changed), 3)
            parts.append(t)
        if d.layers:
            top = max((row["rel"] or 0.0 for row in d.layers), default=0.0)
            t = Table(title="relative change per layer", title_justify="left")
            for col, just in (
                ("layer", "left"),
                ("tensors", "right"),
                ("changed", "right"),
                ("relative change", "right"),
                ("bar (largest = 30)", "left"),
            ):
                t.add_column(col, justify=just)
            for row in d.layers:
                width = round(30 * (row["rel"] or 0.0) / top) if top > 0 else 0
                t.add_row(row["layer"], str(row["tensors"]), str(row["changed"]), _fmt(row["rel"]), "█" * width)
            parts.append(t)
        if d.skipped_values:
            parts.append(
                Text(f"values not compared: {len(d.skipped_values)} ({next(iter(d.skipped_values.values()))})")
            )
    return Group(*parts)
