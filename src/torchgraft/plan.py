"""The dry run: decide, from names and shapes alone, what happens to every tensor.

``plan(model, source)`` renames source keys (:mod:`torchgraft.rules`), resolves the
base-model prefix in either direction (a base checkpoint into a model with a head and
the other way round), matches names, checks shapes, applies ignore patterns, and decides
one action per model entry:

* ``copy``: load the source tensor (cast to the target dtype when they differ);
* ``adapt``: load it through a named adapter (shape change);
* ``init``: nothing to load (missing, or shapes differ): the owning module is initialised;
* ``tied``: the entry is the same tensor as another entry that is loaded or initialised;
* ``default``: filled by the module's own loading hook (BatchNorm's ``num_batches_tracked``
  in checkpoints saved before it existed).

Source entries that nothing uses are ``unexpected``, in the checkpoint's own names.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import PlanError
from .integrations import hf
from .keys import prefix_gains, split_key
from .rules import RuleSpec, apply_rules, compile_rules, suffix_matcher
from .sources import Source
from .sources import open as open_source
from .target import TargetView

if TYPE_CHECKING:  # torch is imported where it is used, so `import torchgraft` stays light
    from torch import nn

    from .policy import AdaptSpec

__all__ = ["PLAN_VERSION", "Entry", "Plan", "plan"]

PLAN_VERSION = 1
Action = Literal["copy", "adapt", "init", "tied", "default"]


@dataclass
class Entry:
    """What happens to one model entry.

    Attributes:
        target: the model's state-dict name.
        action: ``copy``, ``adapt``, ``init``, ``tied`` or ``default`` (see the module docs).
        shape, dtype: the model's.
        source: the checkpoint's own name for the tensor loaded into it, if any.
        source_shape, source_dtype: the checkpoint's.
        adapter: ``{"name": ..., "args": {...}}`` for ``adapt``.
        mismatched: the names matched but the shapes differ (and no adapter was chosen).
        ignored: missing, but the model or the caller said that is expected.
        buffer: a non-persistent buffer (loaded only to materialise a model built on meta).
        note: why, in words (rename rule, prefix, tie partner...).
        aligned: ``{"confidence": float, "reason": str}`` when ``align=True`` paired it by structure.
    """

    target: str
    action: Action
    shape: tuple[int, ...]
    dtype: str
    source: str | None = None
    source_shape: tuple[int, ...] | None = None
    source_dtype: str | None = None
    adapter: dict[str, Any] | None = None
    mismatched: bool = False
    ignored: bool = False
    buffer: bool = False
    note: str = ""
    aligned: dict[str, Any] | None = None

    @property
    def loads(self) -> bool:
        return self.action in ("copy", "adapt")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["source_shape"] = None if self.source_shape is None else list(self.source_shape)
        return {k: v for k, v in d.items() if v not in (None, False, "")}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Entry:
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        if d.get("source_shape") is not None:
            d["source_shape"] = tuple(d["source_shape"])
        return cls(**d)


@dataclass
class Plan:
    """A reviewable, reusable decision for every tensor: plain data, JSON round-trip.

    Example:
        >>> p = tg.plan(model, "all-MiniLM-L6-v2/")
        >>> print(p)                      # what would happen, nothing loaded yet
        >>> p.missing, p.unexpected
        (['classifier.weight', 'classifier.bias'], ['pooler.dense.weight', 'pooler.dense.bias'])
        >>> p.save("plan.json"); tg.load(model, "all-MiniLM-L6-v2/", plan=tg.Plan.load("plan.json"))
    """

    entries: dict[str, Entry]
    unexpected: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    rename_reasons: dict[str, list[str]] = field(default_factory=dict)
    prefix: dict[str, str] = field(default_factory=dict)
    metadata_map: dict[str, str] = field(default_factory=dict)
    model: str = ""
    source: str = ""
    source_format: str = ""
    container: str = ""
    model_fingerprint: str = ""
    source_fingerprint: str = ""
    notes: list[str] = field(default_factory=list)
    ambiguous: list[dict[str, Any]] = field(default_factory=list)

    # Views ---------------------------------------------------------------
    def _where(self, pred) -> list[str]:
        return [k for k, e in self.entries.items() if pred(e)]

    @property
    def loaded(self) -> list[str]:
        """Model entries that receive a checkpoint tensor."""
        return self._where(lambda e: e.loads)

    @property
    def missing(self) -> list[str]:
        """Model entries with no checkpoint tensor (initialised), minus the ignored and the re-initialised ones."""
        return self._where(lambda e: e.action == "init" and not e.mismatched and not e.ignored and not e.adapter)

    @property
    def missing_ignored(self) -> list[str]:
        return self._where(lambda e: e.action == "init" and not e.mismatched and e.ignored)

    @property
    def to_initialise(self) -> list[str]:
        return self._where(lambda e: e.action == "init")

    @property
    def mismatched(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.mismatched]

    @property
    def adapted(self) -> dict[str, dict[str, Any]]:
        """Model name -> ``{"name", "args"}`` for every entry the ``adapt=`` policy changed (``reinit`` included)."""
        return {k: e.adapter for k, e in self.entries.items() if e.action in ("adapt", "init") and e.adapter}

    @property
    def tied(self) -> dict[str, str]:
        return {k: e.note for k, e in self.entries.items() if e.action == "tied"}

    @property
    def aligned(self) -> dict[str, dict[str, Any]]:
        """Model name -> ``{"source", "confidence", "reason"}`` for entries ``align=True`` paired by structure."""
        return {k: {"source": e.source, **e.aligned} for k, e in self.entries.items() if e.aligned}

    def rules(self) -> dict[str, str]:
        """The aligned pairs as a rules table to paste into ``rules=`` (``{}`` = layer number).

        Example:
            >>> tg.plan(model, ckpt, align=True).rules()
            {'encoder.layer.{}.attention.self.query': 'blocks.{}.attn.q', ...}
        """
        from .align import plan_rules

        return plan_rules(self)

    def problems(self) -> list[str]:
        """Every missing, unexpected and mismatched key, one line each (what ``strict=True`` refuses)."""
        lines = [f"missing: {k} {list(self.entries[k].shape)}" for k in self.missing]
        lines += [f"unexpected: {k}" for k in self.unexpected]
        lines += [
            f"shape mismatch: {e.target} expects {list(e.shape)}, checkpoint {e.source!r} has {list(e.source_shape or ())}"
            f" (adapt='auto' or adapt={{{e.target!r}: adapter}} adapts it)"
            for e in self.mismatched
        ]
        lines += [
            f"ambiguous: {', '.join(a['targets'])} could come from {', '.join(a['candidates'])} ({a['reason']}); pass rules= to decide"
            for a in self.ambiguous
        ]
        return lines

    def summary(self) -> dict[str, int]:
        counts = Counter(e.action for e in self.entries.values())
        return {
            "loaded": counts["copy"] + counts["adapt"],
            "adapted": len(self.adapted),
            "initialised": counts["init"],
            "tied": counts["tied"],
            "missing": len(self.missing),
            "mismatched": len(self.mismatched),
            "unexpected": len(self.unexpected),
            "ignored": len(self.ignored) + len(self.missing_ignored),
            "renamed": len(self.renamed),
            "aligned": len(self.aligned),
            "ambiguous": len(self.ambiguous),
        }

    # Serialisation -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "torchgraft_plan": PLAN_VERSION,
            "model": self.model,
            "source": self.source,
            "source_format": self.source_format,
            "container": self.container,
            "model_fingerprint": self.model_fingerprint,
            "source_fingerprint": self.source_fingerprint,
            "prefix": self.prefix,
            "summary": self.summary(),
            "entries": [e.to_dict() for e in self.entries.values()],
            "unexpected": self.unexpected,
            "ignored": self.ignored,
            "renamed": self.renamed,
            "rename_reasons": self.rename_reasons,
            "metadata_map": self.metadata_map,
            "notes": self.notes,
            "ambiguous": self.ambiguous,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        version = d.get("torchgraft_plan")
        if version != PLAN_VERSION:
            raise PlanError(f"not a torchgraft plan of version {PLAN_VERSION} (found {version!r})")
        entries = [Entry.from_dict(e) for e in d["entries"]]
        return cls(
            entries={e.target: e for e in entries},
            unexpected=list(d.get("unexpected", [])),
            ignored=dict(d.get("ignored", {})),
            renamed=dict(d.get("renamed", {})),
            rename_reasons={k: list(v) for k, v in d.get("rename_reasons", {}).items()},
            prefix=dict(d.get("prefix", {})),
            metadata_map=dict(d.get("metadata_map", {})),
            model=d.get("model", ""),
            source=d.get("source", ""),
            source_format=d.get("source_format", ""),
            container=d.get("container", ""),
            model_fingerprint=d.get("model_fingerprint", ""),
            source_fingerprint=d.get("source_fingerprint", ""),
            notes=list(d.get("notes", [])),
            ambiguous=[dict(a) for a in d.get("ambiguous", [])],
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON, atomically (temporary file + rename)."""
        from .fileio import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, huge integers
            raise PlanError(f"cannot read plan {str(path)!r}: {e}") from None
        if not isinstance(data, dict):
            raise PlanError(f"{str(path)!r} is not a torchgraft plan (a JSON object is expected)")
        try:
            return cls.from_dict(data)
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a damaged or hand-edited file
            raise PlanError(f"{str(path)!r} is not a valid torchgraft plan ({type(e).__name__}: {e})") from None

    def check_fits(self, view: TargetView, source: Source) -> None:
        """Refuse a stale plan: the model or checkpoint layout changed since it was made."""
        problems = []
        if self.model_fingerprint and self.model_fingerprint != view.fingerprint():
            problems.append(f"the model's names or shapes changed (plan made for {self.model or 'another model'})")
        if self.source_fingerprint and self.source_fingerprint != source.fingerprint():
            problems.append(
                f"the checkpoint's names, shapes or dtypes changed (plan made for {self.source or 'another file'})"
            )
        if problems:
            raise PlanError("stale plan: " + "; ".join(problems) + ". Make a new one with tg.plan(model, source).")

    # Rendering -----------------------------------------------------------
    def __repr__(self) -> str:
        """Short, for a REPL: the counts and the first problems (``print(plan)`` shows the full table)."""
        counts = ", ".join(f"{v} {k}" for k, v in self.summary().items() if v)
        problems = self.problems()
        shown = "; ".join(problems[:3]) + (f"; ... {len(problems) - 3} more" if len(problems) > 3 else "")
        return f"<Plan {self.source} -> {self.model}: {counts or 'empty'}{'; ' + shown if shown else ''}>"

    def __str__(self) -> str:
        from .report import render_plan

        return render_plan(self)

    def __rich__(self):
        from .report import plan_renderable

        return plan_renderable(self)


# ---------------------------------------------------------------------------
# Building a plan


def _compile_patterns(patterns: Iterable[str | re.Pattern[str]]) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(p if isinstance(p, re.Pattern) else re.compile(p))
        except re.error as e:
            raise PlanError(f"ignore pattern {p!r} is not a valid regex: {e}") from None
    return out


def _matches(patterns: list[re.Pattern[str]], *names: str | None) -> re.Pattern[str] | None:
    for p in patterns:
        if any(n is not None and p.search(n) for n in names):
            return p
    return None


@dataclass(frozen=True)
class _Prefix:
    mode: Literal["", "add", "strip"]
    prefix: str  # with trailing dot

    def to_target(self, key: str, expected: set[str]) -> str:
        if key in expected or not self.mode:
            return key
        if self.mode == "add" and self.prefix + key in expected:
            return self.prefix + key
        if self.mode == "strip" and key.startswith(self.prefix) and key[len(self.prefix) :] in expected:
            return key[len(self.prefix) :]
        return key


def _resolve_prefix(option: str | None, declared: str | None, keys: set[str], expected: set[str]) -> _Prefix:
    """Pick the prefix handling that matches the most keys, like ``from_pretrained``'s add/remove_prefix.

    ``option``: ``None`` = automatic (the model's ``base_model_prefix`` or one inferred from
    the key sets), ``""`` = off, anything else = that prefix only.
    """
    if option == "":
        return _Prefix("", "")
    unmatched = keys - expected
    gains = prefix_gains(unmatched, expected)
    if option is not None:
        want = option.rstrip(".") + "."
        gains = Counter({k: v for k, v in gains.items() if k[1] == want})
    else:  # inferred: the declared base_model_prefix, or a prefix that explains more than one coincidence
        declared_prefix = f"{declared}." if declared else None
        gains = Counter({k: v for k, v in gains.items() if k[1] == declared_prefix or v >= 2 or v == len(unmatched)})
    if not gains:
        return _Prefix("", "")
    preferred = (declared or "") + "."
    (mode, prefix), _n = max(gains.items(), key=lambda kv: (kv[1], kv[0][1] == preferred, -len(kv[0][1])))
    return _Prefix(mode, prefix)  # type: ignore[arg-type]


def _norm_version_default(view: TargetView, key: str, source: Source, src_module: str | None) -> bool:
    """BatchNorm fills ``num_batches_tracked`` itself for checkpoints older than version 2."""
    from torch.nn.modules.batchnorm import _NormBase

    module_path, attr = split_key(key)
    if attr != "num_batches_tracked" or not isinstance(view.modules.get(module_path), _NormBase):
        return False
    version = source.module_metadata.get(src_module or "", {}).get("version") if src_module is not None else None
    return version is None or version < 2


def plan(
    model: nn.Module,
    source: str | os.PathLike[str] | Source | Mapping[str, Any],
    *,
    rules: RuleSpec | None = None,
    prefix: str | None = None,
    ignore_missing: Iterable[str | re.Pattern[str]] = (),
    ignore_unexpected: Iterable[str | re.Pattern[str]] = (),
    adapt: AdaptSpec | None = None,
    allow_globals: Iterable[str | Any] | None = None,
    align: bool = False,
) -> Plan:
    """Decide what loading ``source`` into ``model`` would do, without reading tensor bytes.

    Args:
        model: any ``nn.Module``; it may live on the meta device. It is not modified.
        source: a path, an open :class:`~torchgraft.sources.Source` or a state dict.
        rules: key renames applied first: ``{"old.{}.x": "new.{}.x", "drop.me": None}`` or
            ``re.Pattern`` keys (see :mod:`torchgraft.rules`).
        prefix: base-model prefix handling: ``None`` = automatic (``model.base_model_prefix``
            or inferred from the two key sets), ``""`` = none, ``"bert"`` = only that prefix.
        ignore_missing: regexes for model entries whose absence is expected (not warned about,
            still initialised). Added to the model's own ``_keys_to_ignore_on_load_missing``.
        ignore_unexpected: regexes for checkpoint entries that may go unused silently.
            Added to ``_keys_to_ignore_on_load_unexpected``.
        adapt: what to do with shape mismatches (see :mod:`torchgraft.policy`): ``None``
            reports them; ``"auto"`` adapts by role (first conv, classifier, embeddings,
            positions); ``{"features.0.0.weight": "luminance", "classifier.*": "reinit"}``
            names adapters per glob pattern. Decisions are in ``plan.adapted``.
        allow_globals: when ``source`` is a path: classes a trusted pickle may hold
            (``["argparse.Namespace"]``), as for :func:`torchgraft.open`.
        align: after rules and prefixes, pair the leftovers on both sides by structure
            (:mod:`torchgraft.align`): module tree, shapes, order where trustworthy, names.
            Pairs are in ``plan.aligned`` with a confidence and a reason; same-shaped
            candidates that cannot be told apart stay missing and are in ``plan.ambiguous``.

    Returns:
        A :class:`Plan`.

    Raises:
        CheckpointError: the source cannot be opened (``UnsafeCheckpointError``: its pickle
            wants globals the safe loader refuses).
        PlanError: an invalid ignore pattern, rule or ``adapt`` pattern, or ``align`` not a bool.
        AdapterError: an ``adapt`` adapter is unknown or cannot produce the model's shape.

    Example:
        >>> from transformers import BertConfig, BertForTokenClassification
        >>> model = BertForTokenClassification(BertConfig.from_pretrained("all-MiniLM-L6-v2", num_labels=2))
        >>> p = tg.plan(model, "all-MiniLM-L6-v2/model.safetensors")
        >>> p.prefix, p.missing
        ({'mode': 'add', 'prefix': 'bert.'}, ['classifier.weight', 'classifier.bias'])
    """
    src = open_source(source, allow_globals=allow_globals)
    return build_plan(
        model,
        TargetView.of(model),
        src,
        rules=rules,
        prefix=prefix,
        ignore_missing=ignore_missing,
        ignore_unexpected=ignore_unexpected,
        adapt=adapt,
        align=align,
    )


def build_plan(
    model: nn.Module,
    view: TargetView,
    src: Source,
    *,
    rules: RuleSpec | None = None,
    prefix: str | None = None,
    ignore_missing: Iterable[str | re.Pattern[str]] = (),
    ignore_unexpected: Iterable[str | re.Pattern[str]] = (),
    adapt: AdaptSpec | None = None,
    align: bool = False,
) -> Plan:
    """:func:`plan` for callers that already hold the model's :class:`TargetView` and an open source."""
    if not isinstance(align, bool):
        raise PlanError(f"align must be True or False, not {align!r}")
    try:
        user_rules = compile_rules(rules)
    except (TypeError, ValueError) as e:
        raise PlanError(str(e)) from None
    expected = set(view.entries) | set(view.nonpersistent)

    renames = apply_rules(src.keys(), user_rules, is_expected=suffix_matcher(expected))
    live = {orig: new for orig, new in renames.mapping.items() if new is not None}
    pfx = _resolve_prefix(prefix, hf.base_model_prefix(model), set(live.values()), expected)

    own_missing, own_unexpected = hf.ignore_patterns(model)
    miss_patterns = _compile_patterns([*own_missing, *ignore_missing])
    unexp_patterns = _compile_patterns([*own_unexpected, *ignore_unexpected])

    # Which source entries claim which model entry
    claims: dict[str, list[str]] = defaultdict(list)
    unused: list[str] = []
    renamed: dict[str, str] = {}
    for orig, new in live.items():
        target = pfx.to_target(new, expected)
        if target != orig:
            renamed[orig] = target
        if target in expected:
            claims[target].append(orig)
        else:
            unused.append(orig)
    notes: list[str] = []
    for target, origs in claims.items():
        if len(origs) > 1:
            keep = next((o for o in origs if o == target), origs[0])
            for o in origs:
                if o != keep:
                    unused.append(o)
                    notes.append(f"{o!r} and {keep!r} both map to {target!r}; {keep!r} is used")
            claims[target] = [keep]

    entries: dict[str, Entry] = {}
    ignored: dict[str, str] = {}
    metadata_map: dict[str, str] = {}
    for orig in renames.dropped:
        ignored[orig] = "dropped by a rule"

    def source_module(key: str) -> str | None:
        return metadata_map.get(split_key(key)[0])

    for name, info in view.entries.items():
        src_name = claims.get(name, [None])[0]
        if src_name is None:
            entries[name] = Entry(name, "init", info.shape, info.dtype)
            continue
        ref = src[src_name]
        metadata_map.setdefault(split_key(name)[0], split_key(src_name)[0])
        e = Entry(name, "copy", info.shape, info.dtype, src_name, ref.shape, ref.dtype)
        why = list(renames.reasons.get(src_name, []))
        if live[src_name] != name:
            why.append(f"prefix {pfx.mode} {pfx.prefix!r}")
        e.note = "; ".join(why)
        if ref.shape != info.shape and not (
            info.shape == () and ref.shape == (1,)
        ):  # (1,) -> () as load_state_dict allows
            e.action, e.mismatched = "init", True
        entries[name] = e

    # Non-persistent buffers: load only what a meta-built model needs; otherwise the model computes them.
    for name, info in view.nonpersistent.items():
        src_name = claims.get(name, [None])[0]
        if src_name is None:
            continue
        ref = src[src_name]
        if info.meta and ref.shape == info.shape:
            entries[name] = Entry(
                name,
                "copy",
                info.shape,
                info.dtype,
                src_name,
                ref.shape,
                ref.dtype,
                buffer=True,
                note="non-persistent buffer, loaded to materialise the meta model",
            )
        else:
            ignored[src_name] = f"non-persistent buffer {name!r}: computed by the model, not loaded"

    ambiguous: list[dict[str, Any]] = []
    if align:
        from .align import align_plan

        ambiguous = align_plan(
            view,
            src,
            entries,
            unused,
            live,
            renamed=renamed,
            metadata_map=metadata_map,
            skip=lambda k: _matches(unexp_patterns, k, live.get(k)) is not None,
        )

    # Tied weights: one tensor under several names is loaded once.
    for name, owner in view.tied.items():
        e, first = entries[name], entries[owner]
        if first.loads or not e.loads:
            if e.loads:
                ignored[e.source or name] = f"same tensor as {owner!r}, which is loaded from {first.source!r}"
            entries[name] = Entry(name, "tied", e.shape, e.dtype, note=f"tied to {owner}")
        else:  # only the later name is in the checkpoint: load through it, the owner follows
            entries[owner] = Entry(owner, "tied", first.shape, first.dtype, note=f"tied to {name}")

    for name, e in entries.items():
        if e.action != "init" or e.mismatched:
            continue
        if _norm_version_default(view, name, src, source_module(name)):
            e.action, e.note = "default", "set to 0 by BatchNorm's loading hook (checkpoint predates it)"
        elif (p := _matches(miss_patterns, name, _source_name_guess(name, pfx))) is not None:
            e.ignored, e.note = True, f"missing, ignored by pattern {p.pattern!r}"

    if adapt is not None:
        from .policy import apply_policy  # imports torch: only when adapting

        notes += apply_policy(entries, adapt, model=model, view=view, source=src)

    unexpected: list[str] = []
    for orig in unused:
        p = _matches(unexp_patterns, orig, live.get(orig))
        if p is not None:
            ignored[orig] = f"unused, ignored by pattern {p.pattern!r}"
        else:
            unexpected.append(orig)

    if pfx.mode == "add":
        metadata_map.setdefault(pfx.prefix[:-1], "")
    return Plan(
        entries=entries,
        unexpected=unexpected,
        ignored=ignored,
        renamed=renamed,
        rename_reasons=renames.reasons,
        prefix={"mode": pfx.mode, "prefix": pfx.prefix} if pfx.mode else {},
        metadata_map=metadata_map,
        model=type(model).__name__,
        source=src.path or "state dict",
        source_format=src.format,
        container=src.container,
        model_fingerprint=view.fingerprint(),
        source_fingerprint=src.fingerprint(),
        notes=notes,
        ambiguous=ambiguous,
    )


def _source_name_guess(target: str, pfx: _Prefix) -> str:
    """The checkpoint-side spelling of a model name (ignore patterns may be written either way)."""
    if pfx.mode == "add" and target.startswith(pfx.prefix):
        return target[len(pfx.prefix) :]
    if pfx.mode == "strip":
        return pfx.prefix + target
    return target
