"""The adaptation policy: which model entries get which adapter, decided in the plan.

``tg.plan(model, ckpt, adapt=...)`` / ``tg.load(..., adapt=...)``:

* ``None`` (default): conservative; a shape mismatch is reported and the module initialised.
* ``"auto"``: for each shape mismatch, the adapter that fits the shapes and the entry's role
  (:func:`auto_choice`); anything else stays reported as mismatched.
* ``{pattern: spec}``: explicit. Patterns are globs on the model's names
  (``"classifier.*"``), first match wins; a spec is an adapter name or shorthand
  (``"luminance"``, ``"embedding_rows"``), ``{"name": ..., "args": {...}}``, ``"reinit"``
  (initialise the module even though the checkpoint has the tensor), or ``"auto"``. An
  explicit adapter applies whenever its pattern matches an entry the checkpoint has, also
  when the shapes already agree (a BGR -> RGB channel matrix).

Every decision lands in the plan entry (``action="adapt"`` with ``adapter={"name", "args"}``,
or ``action="init"`` with ``adapter={"name": "reinit"}``), so it is printed, saved, and
reported in ``plan.adapted`` / ``report.adapted``. Each adapter is run on a meta tensor while
planning, so a spec that cannot produce the model's shape fails here, before any byte is read.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from . import adapters
from .errors import AdapterError, PlanError
from .keys import split_key
from .messages import describe_adapter
from .surgery import find_head, find_input_conv

if TYPE_CHECKING:
    from .plan import Entry
    from .sources import Source
    from .target import TargetView

__all__ = ["AdaptSpec", "apply_policy", "auto_choice"]

#: What ``adapt=`` accepts.
AdaptSpec = Literal["auto"] | Mapping[str, str | Mapping[str, Any]]

_POSITION = re.compile(r"position|pos_embed|(^|\.)wpe(\.|$)", re.IGNORECASE)
_MAX_PREFIX = 8


@dataclass
class _Roles:
    """What the model's entries are for, found once per plan."""

    input_conv: str | None
    head: str | None
    output_embeddings: set[str]
    model: nn.Module
    view: TargetView


def _roles(model: nn.Module, view: TargetView) -> _Roles:
    conv = find_input_conv(model)
    head = find_head(model)
    out: set[str] = set()
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            module = getter()
        except (NotImplementedError, AttributeError):
            module = None
        if isinstance(module, nn.Module):
            path = next((p for p, m in view.modules.items() if m is module), None)
            if path is not None:
                out = {k for k in view.entries if split_key(k)[0] == path}
                out |= {k for k, owner in view.tied.items() if owner in out}
                out |= {owner for k, owner in view.tied.items() if k in out}
    return _Roles(conv.path if conv else None, head.path if head else None, out, model, view)


def _differ(a: tuple[int, ...], b: tuple[int, ...]) -> list[int] | None:
    if len(a) != len(b):
        return None
    return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


def _square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _prefix_tokens(roles: _Roles, owner: str, source_rows: int, target_rows: int) -> int | None:
    """Leading non-grid rows of a ViT position table: the model says, or the only count that makes both grids square."""
    for path in (owner, ""):
        module = roles.view.modules.get(path)
        k = getattr(module, "num_prefix_tokens", None)
        if isinstance(k, int) and not isinstance(k, bool):
            return k if _square(source_rows - k) and _square(target_rows - k) else None
    for k in range(_MAX_PREFIX + 1):
        if _square(source_rows - k) and _square(target_rows - k):
            return k
    return None


def _beside_conv(roles: _Roles, owner: str) -> bool:
    """A 2-d table in an embeddings module that also holds a patch convolution is a grid (CLIP's vision
    ``embeddings.position_embedding``). Root-level tables do not count: every CNN's root holds a conv
    (timm's root-level ``pos_embed`` is ``[1, tokens, dim]`` and recognised by its rank)."""
    parent = owner.rpartition(".")[0] if isinstance(roles.view.modules.get(owner), nn.Embedding) else owner
    if not parent:
        return False
    return any(_conv(m) for p, m in roles.view.modules.items() if p == parent or p.startswith(f"{parent}."))


def _conv(m: nn.Module) -> bool:
    from torch.nn.modules.conv import _ConvNd

    return isinstance(m, _ConvNd) and not m.transposed


def auto_choice(e: Entry, roles: _Roles) -> tuple[dict[str, Any] | None, str]:
    """The adapter ``adapt="auto"`` picks for a mismatched entry, and why (or ``None`` and why not).

    =============================================  ======================================================
    role and shapes                                choice
    =============================================  ======================================================
    first conv's weight, only in-channels differ   ``input_channels`` ``sum`` (``repeat`` when growing or
                                                   the counts do not divide)
    classifier (weight or bias), only rows differ  ``reinit``
    ``nn.Embedding`` / output embeddings, rows     ``embedding_rows`` (mean and covariance)
    position table ``[P, D]``, rows differ         ``positions_1d`` (interpolation)
    position grid ``[1, k + H*W, D]`` (or beside   ``positions_2d`` (class tokens kept)
    a patch conv), rows differ
    =============================================  ======================================================
    """
    assert e.source_shape is not None
    diff = _differ(e.shape, e.source_shape)
    if not diff:
        return None, "ranks differ" if diff is None else "shapes agree"
    owner, attr = split_key(e.target)
    module = roles.view.modules.get(owner)
    rank = len(e.shape)
    if owner == roles.input_conv and attr == "weight" and diff == [1]:
        n, m = e.source_shape[1], e.shape[1]
        method = "sum" if m <= n and n % m == 0 else "repeat"
        return {"name": "input_channels", "args": {"method": method}}, f"first convolution: {n} -> {m} input channels"
    if owner == roles.head and diff == [0]:
        return {"name": "reinit", "args": {}}, f"classifier: {e.source_shape[0]} -> {e.shape[0]} classes"
    positional = bool(_POSITION.search(e.target))
    if positional and diff == [rank - 2] and rank in (2, 3) and (rank == 2 or e.shape[0] == 1):
        rows_src, rows_tgt = e.source_shape[-2], e.shape[-2]
        if rank == 3 or _beside_conv(roles, owner):
            k = _prefix_tokens(roles, owner, rows_src, rows_tgt)
            if k is None:
                return None, f"position grid: {rows_src} -> {rows_tgt} rows are not square grids after the same prefix"
            return {
                "name": "positions_2d",
                "args": {"num_prefix_tokens": k},
            }, f"position grid: {rows_src} -> {rows_tgt} rows"
        return {"name": "positions_1d", "args": {}}, f"position table: {rows_src} -> {rows_tgt} positions"
    if diff == [0] and ((isinstance(module, nn.Embedding) and attr == "weight") or e.target in roles.output_embeddings):
        return {"name": "embedding_rows", "args": {}}, f"vocabulary: {e.source_shape[0]} -> {e.shape[0]} rows"
    return None, "no adapter fits this role and shape change"


def _meta(e: Entry) -> torch.Tensor | None:
    dtype = getattr(torch, e.source_dtype or "", None)
    if not isinstance(dtype, torch.dtype) or e.source_shape is None:
        return None
    return torch.empty(e.source_shape, dtype=dtype, device="meta")


def _source_labels(source: Source) -> Any:
    """``id2label`` from the checkpoint's ``config.json`` (in its directory), if there is one."""
    if not source.path:
        return None
    p = Path(source.path)
    for folder in (p, p.parent) if p.is_dir() else (p.parent,):
        cfg = folder / "config.json"
        if cfg.is_file():
            try:
                data = json.loads(cfg.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return data.get("id2label") if isinstance(data, dict) else None
    return None


def _prepare(spec: dict[str, Any], e: Entry, model: nn.Module, source: Source) -> tuple[dict[str, Any], str]:
    adapter = adapters.ADAPTERS.get(spec["name"])
    if adapter is None or adapter.prepare is None:
        return spec, ""
    config = getattr(model, "config", None)
    ctx = {
        "target": e.target,
        "target_labels": getattr(config, "id2label", None) if config is not None else None,
        "source_labels": _source_labels(source),
    }
    try:
        args, note = adapter.prepare(dict(spec["args"]), ctx)
    except AdapterError as err:
        raise AdapterError(f"{err} (for {e.target!r})") from None
    return {"name": spec["name"], "args": adapters.json_args(args, spec["name"])}, note


def _check(spec: dict[str, Any], e: Entry) -> None:
    """Run the adapter on a meta tensor: the shapes must work out before anything is read."""
    fake = _meta(e)
    if fake is not None:
        adapters.run(spec, fake, target_shape=e.shape, target=e.target)


def _add_note(e: Entry, note: str) -> None:
    e.note = f"{e.note}; {note}" if e.note else note


def _normalise(adapt: Any) -> list[tuple[str, Any]]:
    if isinstance(adapt, str):
        if adapt != "auto":
            raise PlanError(
                f"adapt={adapt!r}: use 'auto' or a dict {{glob pattern: adapter}}, e.g. {{'features.0.0.weight': 'luminance'}}"
            )
        return [("*", "auto")]
    if not isinstance(adapt, Mapping):
        raise PlanError(f"adapt must be 'auto' or a dict {{glob pattern: adapter}}, got {type(adapt).__name__}")
    rules = []
    for pattern, spec in adapt.items():
        if not isinstance(pattern, str) or not pattern:
            raise PlanError(f"adapt patterns are non-empty glob strings on the model's names, got {pattern!r}")
        rules.append((pattern, "auto" if spec == "auto" else adapters.resolve(spec)))
    return rules


def apply_policy(
    entries: dict[str, Entry],
    adapt: AdaptSpec,
    *,
    model: nn.Module,
    view: TargetView,
    source: Source,
) -> list[str]:
    """Turn matching entries into ``adapt`` (or ``init`` for ``reinit``) in place; return plan notes.

    Raises:
        PlanError: ``adapt`` is malformed, or a pattern matches none of the model's names.
        AdapterError: an explicit adapter is unknown, has bad args, or cannot produce the
            model's shape from the checkpoint's (the message names the entry).
    """
    rules = _normalise(adapt)
    names = list(view.entries)
    for pattern, spec in rules:
        if spec != "auto" and not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            close = difflib.get_close_matches(pattern, names, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise PlanError(f"adapt pattern {pattern!r} matches none of {type(model).__name__}'s names{hint}")
    roles: _Roles | None = None
    notes: list[str] = []
    used: set[str] = set()
    for name, e in entries.items():
        if (
            e.source is None
            or e.source_shape is None
            or not (e.action == "copy" or (e.action == "init" and e.mismatched))
        ):
            continue
        match = next(((p, s) for p, s in rules if fnmatch.fnmatchcase(name, p)), None)
        if match is None:
            continue
        pattern, spec = match
        used.add(pattern)
        how = "adapt='auto'" if spec == "auto" and pattern == "*" else f"adapt[{pattern!r}]"
        if spec == "auto":
            if not e.mismatched:
                continue
            roles = roles or _roles(model, view)
            choice, why = auto_choice(e, roles)
            if choice is None:
                notes.append(f"{how}: {name} {list(e.source_shape)} -> {list(e.shape)} left as a mismatch ({why})")
                continue
            spec = choice
        else:
            why = ""
        if spec["name"] == "reinit":
            e.action, e.mismatched, e.adapter = "init", False, spec
            _add_note(
                e,
                f"re-initialised by {how}" + (f" ({why})" if why else "") + f"; checkpoint has {list(e.source_shape)}",
            )
            continue
        spec, prep_note = _prepare(spec, e, model, source)
        try:
            _check(spec, e)
        except AdapterError as err:
            if match[1] != "auto":
                raise
            notes.append(f"{how}: {name} left as a mismatch: {err}")
            continue
        e.action, e.mismatched, e.adapter = "adapt", False, spec
        _add_note(
            e,
            f"{describe_adapter(spec)} by {how}"
            + (f" ({why})" if why else "")
            + (f"; {prep_note}" if prep_note else ""),
        )
    for pattern, spec in rules:
        if spec != "auto" and pattern not in used:
            notes.append(
                f"adapt[{pattern!r}]: its names get no checkpoint tensor (missing, or tied to another entry); nothing adapted"
            )
    return notes
