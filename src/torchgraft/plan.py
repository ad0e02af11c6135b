"""A plan as data: what happens to every tensor, decided before anything is read.

:func:`torchgraft.plan` (built in :mod:`torchgraft.planner`) decides one action per model entry:

* ``copy``: load the source tensor (cast to the target dtype when they differ);
* ``adapt``: load it through a named adapter (shape change);
* ``init``: nothing to load (missing, or shapes differ): the owning module is initialised;
* ``tied``: the entry is the same tensor as another entry that is loaded or initialised;
* ``default``: filled by the module's own loading hook (BatchNorm's ``num_batches_tracked``
  in checkpoints saved before it existed);
* ``transform``: computed from one or more checkpoint tensors by a transform
  (:mod:`torchgraft.transforms`: transpose, split, concat, stack, rotary permutation...).

Source entries that nothing uses are ``unexpected``, in the checkpoint's own names, except those
under a module with loading code of its own (a custom ``_load_from_state_dict`` or a load
pre-hook), which are ``handed`` to it as ``load_state_dict`` would (it may rename or convert
them); what it leaves unused is reported unexpected after the load. A
:class:`Plan` round-trips through JSON (:meth:`Plan.save` / :meth:`Plan.load`) and carries
fingerprints of the model and checkpoint layouts, so a stale plan is refused
(:meth:`Plan.check_fits`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import PlanError

if TYPE_CHECKING:
    from .planner import build_plan, plan
    from .sources import Source
    from .target import TargetView

__all__ = ["PLAN_VERSION", "Entry", "Plan", "build_plan", "plan"]

PLAN_VERSION = 1
#: What fixes which problem: option -> (Python spelling, command-line spelling, what it does).
FIXES: dict[str, tuple[str, str, str]] = {
    "adapt": ("adapt='auto' (or adapt={name: adapter})", "--adapt auto (or --adapt 'NAME=ADAPTER')",
              "adapts the shape mismatches"),
    "align": ("align=True", "--align", "pairs differently named entries by structure"),
    "rules": ("rules={'old.{}': 'new.{}'}", "--rules 'OLD=NEW'", "renames checkpoint entries ('{}' = layer number)"),
    "ignore_missing": ("ignore_missing=[regex]", "--ignore-missing REGEX", "accepts missing entries you expect (a new head)"),
    "ignore_unexpected": ("ignore_unexpected=[regex]", "--ignore-unexpected REGEX",
                          "accepts unused checkpoint entries (a pretraining head)"),
    "decide": ("rules=", "--rules 'OLD=NEW'", "decides the ambiguous pairs"),
}  # fmt: skip
#: The verdict's words for a checkpoint of another network (see :attr:`Plan.verdict`).
FOREIGN = "Most likely a checkpoint of another architecture or task"
Action = Literal["copy", "adapt", "init", "tied", "default", "transform"]


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
        transform: for ``transform``: the expression (:meth:`torchgraft.transforms.Expr.to_dict`) whose
            leaves are checkpoint entries with their shapes and dtypes; ``source`` is its first leaf.
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
    transform: dict[str, Any] | None = None

    @property
    def loads(self) -> bool:
        return self.action in ("copy", "adapt", "transform")

    @property
    def sources(self) -> list[str]:
        """Every checkpoint entry this entry reads (several for a merge; one otherwise; none for ``init``)."""
        if self.transform is not None:
            from .transforms import Expr

            return Expr.from_dict(self.transform).sources()
        return [self.source] if self.source is not None and self.loads else []

    def expression(self) -> str:
        """The transform in words (``split(transpose(h.0.attn.c_attn.weight), dim=0, parts=3, index=0)``), or ``""``."""
        if self.transform is None:
            return ""
        from .transforms import Expr

        return str(Expr.from_dict(self.transform))

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
    verdict: str = ""
    handed: dict[str, str] = field(default_factory=dict)

    # Views ---------------------------------------------------------------
    def _where(self, pred) -> list[str]:
        return [k for k, e in self.entries.items() if pred(e)]

    @property
    def loaded(self) -> list[str]:
        """Model entries that receive a checkpoint tensor as it is (cast at most); adapted ones are in :attr:`adapted`.

        Every entry is counted once: ``loaded``, ``adapted``, ``missing``, ``mismatched``, ``tied``,
        module defaults and ignored entries add up to the model's entries.
        """
        return self._where(lambda e: e.action == "copy")

    @property
    def missing(self) -> list[str]:
        """Model entries with no checkpoint tensor (initialised), minus the ignored and the re-initialised ones."""
        return self._where(lambda e: e.action == "init" and not e.mismatched and not e.ignored and not e.adapter)

    @property
    def missing_ignored(self) -> list[str]:
        return self._where(lambda e: e.action == "init" and not e.mismatched and e.ignored)

    @property
    def mismatched(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.mismatched]

    @property
    def adapted(self) -> dict[str, dict[str, Any]]:
        """Model name -> ``{"name", "args"}`` for every entry the ``adapt=`` policy changed (``reinit`` included)."""
        return {k: e.adapter for k, e in self.entries.items() if e.action in ("adapt", "init") and e.adapter}

    @property
    def transformed(self) -> dict[str, str]:
        """Model name -> the transform that computes it from checkpoint entries, in words.

        Example:
            >>> tg.plan(nanogpt, "gpt2/", align=True).transformed["transformer.h.0.mlp.c_fc.weight"]
            'transpose(h.0.mlp.c_fc.weight, dim0=0, dim1=1)'
        """
        return {k: e.expression() for k, e in self.entries.items() if e.action == "transform"}

    def used_sources(self) -> set[str]:
        """Every checkpoint entry some model entry reads."""
        return {s for e in self.entries.values() for s in e.sources}

    @property
    def tied(self) -> dict[str, str]:
        return {k: e.note for k, e in self.entries.items() if e.action == "tied"}

    @property
    def aligned(self) -> dict[str, dict[str, Any]]:
        """Model name -> ``{"source", "confidence", "reason"}`` for entries ``align=True`` paired by structure."""
        return {k: {"source": e.source, **e.aligned} for k, e in self.entries.items() if e.aligned}

    def aligned_rules(self) -> dict[str, str]:
        """The pairs ``align=True`` made, as a rules table to paste into ``rules=`` (``{}`` = layer number).

        Loading with these rules (and without ``align=True``) gives the same pairs.

        Example:
            >>> tg.plan(model, ckpt, align=True).aligned_rules()
            {'encoder.layer.{}.attention.self.query': 'blocks.{}.attn.q', ...}
        """
        from .rules import plan_rules

        return plan_rules(self)

    def rules(self) -> dict[str, str]:
        """Deprecated name of :meth:`aligned_rules`."""
        warnings.warn("Plan.rules() is now Plan.aligned_rules()", DeprecationWarning, stacklevel=2)
        return self.aligned_rules()

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
        if lines:  # why, where the plan knows (a conversion it cannot run, an adapter it could not apply)
            lines += [f"note: {n}" for n in self.notes]
        return lines

    def grouped_problems(self, *, limit: int = 8) -> list[str]:
        """:meth:`problems` grouped like the report (repeated layers collapsed), one kind a line, then the notes.

        Example:
            >>> plan.grouped_problems()
            ['missing (314): features.{0..18}.0.weight, ...', 'unused checkpoint entries (104): ...']
        """
        from .keys import grouped_keys

        def grouped(keys: list[str]) -> str:
            return grouped_keys(keys, limit)

        lines = []
        if self.missing:
            lines.append(f"missing ({len(self.missing)}): {grouped(self.missing)}")
        if self.mismatched:
            shown = [f"{e.target} {list(e.shape)} <- {e.source} {list(e.source_shape or ())}" for e in self.mismatched]
            more = f", ... ({len(shown) - 6} more)" if len(shown) > 6 else ""
            lines.append(f"shape mismatch ({len(shown)}): {', '.join(shown[:6])}{more}")
        if self.unexpected:
            lines.append(f"unused checkpoint entries ({len(self.unexpected)}): {grouped(self.unexpected)}")
        if self.ambiguous:
            lines.append(
                f"ambiguous ({len(self.ambiguous)}): "
                + "; ".join(f"{', '.join(a['targets'])} from {' or '.join(a['candidates'])}" for a in self.ambiguous[:4])
            )
        if lines:
            lines += [f"note: {n}" for n in self.notes]
        return lines

    def fixes(self, *, cli: bool = False) -> list[str]:
        """What to pass so that the problems go away or are accepted, in Python or command-line spelling.

        None for a checkpoint of another network (:data:`FOREIGN` in the verdict): no option makes it fit.

        Example:
            >>> plan.fixes()
            ["adapt='auto' (or adapt={name: adapter}) adapts the shape mismatches"]
        """
        if FOREIGN in self.verdict:
            return []
        wanted = [
            ("adapt", bool(self.mismatched)),
            ("align", bool(self.missing and self.unexpected)),
            ("rules", bool(self.missing and self.unexpected)),
            ("ignore_missing", bool(self.missing)),
            ("ignore_unexpected", bool(self.unexpected)),
            ("decide", bool(self.ambiguous)),
        ]
        return [f"{FIXES[k][1 if cli else 0]} {FIXES[k][2]}" for k, needed in wanted if needed]

    def summary(self) -> dict[str, int]:
        counts = Counter(e.action for e in self.entries.values())
        return {
            "loaded": counts["copy"],
            "adapted": len(self.adapted),
            "transformed": counts["transform"],
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
            "verdict": self.verdict,
            "handed": self.handed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        """A plan from :meth:`to_dict`'s output, every field checked first (a plan file may be hand-edited or hostile).

        Raises:
            PlanError: a wrong version, a field of the wrong type, a shape that is not a list of
                sane non-negative integers, an entry that loads without a source, an adapt entry
                without an adapter, two entries for one target, or an empty fingerprint.
        """
        version = d.get("torchgraft_plan") if isinstance(d, Mapping) else None
        if version != PLAN_VERSION:
            raise PlanError(f"not a torchgraft plan of version {PLAN_VERSION} (found {version!r})")
        _check_plan_dict(d)
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
            verdict=d.get("verdict", ""),
            handed=dict(d.get("handed", {})),
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
        """Refuse a stale plan: the model or checkpoint layout changed since it was made.

        Besides the fingerprints (which must be there), every entry must name a tensor of the
        model with the entry's shape, and every entry that loads a source tensor of the source's
        shape: a hand-edited plan cannot make the loader allocate or read what the two do not hold.
        """
        problems = []
        if not self.model_fingerprint or not self.source_fingerprint:
            raise PlanError("the plan has no fingerprints, so a stale plan cannot be detected; make it with tg.plan()")
        if self.model_fingerprint != view.fingerprint():
            problems.append(f"the model's names or shapes changed (plan made for {self.model or 'another model'})")
        if self.source_fingerprint != source.fingerprint():
            problems.append(
                f"the checkpoint's names, shapes or dtypes changed (plan made for {self.source or 'another file'})"
            )
        if problems:
            raise PlanError("stale plan: " + "; ".join(problems) + ". Make a new one with tg.plan(model, source).")
        wrong = []
        for name, e in self.entries.items():
            info = view.entries.get(name) or view.nonpersistent.get(name)
            if info is None or tuple(info.shape) != tuple(e.shape):
                wrong.append(f"{name!r} (the model {'has no such entry' if info is None else 'has another shape'})")
            elif e.loads and (
                e.source not in source
                or (e.source_shape is not None and tuple(source[e.source].shape) != tuple(e.source_shape))
            ):
                wrong.append(f"{name!r} (its source {e.source!r} is not in the checkpoint with that shape)")
            elif e.transform is not None:
                from .transforms import Expr

                from .transforms import infer_shape

                tree = Expr.from_dict(e.transform)
                for leaf in tree.leaves():
                    if leaf.source not in source or tuple(source[leaf.source].shape) != leaf.shape:
                        wrong.append(f"{name!r} (its transform input {leaf.source!r} is not in the checkpoint with that shape)")
                        break
                else:  # the tree must give the entry's shape, checked on meta before anything is allocated
                    try:
                        shape = infer_shape(tree)
                    except PlanError as err:
                        shape, why = None, str(err)
                    if shape != tuple(e.shape):
                        why = why if shape is None else f"gives {list(shape)}"
                        wrong.append(f"{name!r} (its transform {why})")
        if wrong:
            raise PlanError(
                f"the plan does not fit: {', '.join(wrong[:5])}. Make a new one with tg.plan(model, source)."
            )

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
# Checking a plan read from JSON

#: Bounds on what a plan file may state (a model's tensors are far inside them).
_MAX_DIMS = 64
_MAX_DIM = 1 << 40
_ACTIONS = frozenset(Action.__args__)  # type: ignore[attr-defined]
_ENTRY_TYPES: dict[str, tuple[type, ...]] = {
    "target": (str,), "action": (str,), "shape": (list,), "dtype": (str,), "source": (str, type(None)),
    "source_shape": (list, type(None)), "source_dtype": (str, type(None)), "adapter": (dict, type(None)),
    "mismatched": (bool,), "ignored": (bool,), "buffer": (bool,), "note": (str,), "aligned": (dict, type(None)),
    "transform": (dict, type(None)),
}  # fmt: skip


def _bad_plan(where: str, reason: str) -> PlanError:
    return PlanError(f"not a valid torchgraft plan: {where} {reason}")


def _check_shape(where: str, value: Any) -> None:
    if not (
        isinstance(value, list)
        and len(value) <= _MAX_DIMS
        and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= _MAX_DIM for n in value)
    ):
        raise _bad_plan(where, f"is not a list of at most {_MAX_DIMS} integers in 0..2**40: {str(value)[:80]}")


def _check_strings(where: str, value: Any, kind: type) -> None:
    if kind is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    if not ok:
        raise _bad_plan(where, f"must be a {'list' if kind is list else 'mapping'} of strings")


def _check_plan_dict(d: Mapping[str, Any]) -> None:
    """Every field of a plan's JSON has the type and range :meth:`Plan.to_dict` writes (-> :class:`PlanError`)."""
    if "entries" not in d:
        raise _bad_plan("the plan", "has no 'entries'")
    entries = d["entries"]
    if not isinstance(entries, list):
        raise _bad_plan("'entries'", "must be a list")
    seen: set[str] = set()
    for i, e in enumerate(entries):
        where = f"entry {i}"
        if not isinstance(e, dict):
            raise _bad_plan(where, f"is a {type(e).__name__}, not an object")
        unknown = sorted(set(e) - _ENTRY_TYPES.keys())
        if unknown:
            raise _bad_plan(where, f"has unknown fields {unknown[:5]}")
        for key in ("target", "action", "shape", "dtype"):
            if key not in e:
                raise _bad_plan(where, f"lacks {key!r}")
        for key, value in e.items():
            if not isinstance(value, _ENTRY_TYPES[key]):
                raise _bad_plan(where, f"has {key!r} of type {type(value).__name__}")
        where = f"entry {e['target'][:120]!r}"
        if not e["target"] or e["target"] in seen:
            raise _bad_plan(where, "is empty or appears twice")
        seen.add(e["target"])
        if e["action"] not in _ACTIONS:
            raise _bad_plan(where, f"has unknown action {e['action'][:40]!r}")
        _check_shape(f"{where}: 'shape'", e["shape"])
        if e.get("source_shape") is not None:
            _check_shape(f"{where}: 'source_shape'", e["source_shape"])
        if e["action"] in ("copy", "adapt") and not e.get("source"):
            raise _bad_plan(where, f"has action {e['action']!r} but no source")
        adapter = e.get("adapter")
        if adapter is not None and not (
            isinstance(adapter.get("name"), str) and isinstance(adapter.get("args", {}), dict)
        ):
            raise _bad_plan(where, "has an adapter without a name or with args that are not a mapping")
        if e["action"] == "adapt" and adapter is None:
            raise _bad_plan(where, "has action 'adapt' but no adapter")
        if (e["action"] == "transform") != (e.get("transform") is not None):
            raise _bad_plan(where, "has a transform without action 'transform' or the action without a transform")
        if e.get("transform") is not None:
            from .transforms import Expr

            tree = Expr.from_dict(e["transform"])  # -> PlanError for an unknown op, a bad argument, a deep tree
            if any(leaf.shape is None for leaf in tree.leaves()):
                raise _bad_plan(where, "has a transform input without its shape")
            if tree.sources()[0] != e.get("source"):
                raise _bad_plan(where, "has a source other than its transform's first input")
    for key in ("model", "source", "source_format", "container", "model_fingerprint", "source_fingerprint", "verdict"):
        if not isinstance(d.get(key, ""), str):
            raise _bad_plan(f"{key!r}", "must be a string")
    for key in ("model_fingerprint", "source_fingerprint"):
        if not d.get(key):
            raise _bad_plan(f"{key!r}", "is missing or empty (without it a stale plan could not be detected)")
    for key in ("unexpected", "notes"):
        _check_strings(f"{key!r}", d.get(key, []), list)
    for key in ("ignored", "renamed", "prefix", "metadata_map", "handed"):
        _check_strings(f"{key!r}", d.get(key, {}), dict)
    reasons = d.get("rename_reasons", {})
    if not isinstance(reasons, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) for x in v) for k, v in reasons.items()
    ):
        raise _bad_plan("'rename_reasons'", "must map strings to lists of strings")
    ambiguous = d.get("ambiguous", [])
    if not isinstance(ambiguous, list) or not all(isinstance(a, dict) for a in ambiguous):
        raise _bad_plan("'ambiguous'", "must be a list of objects")



def __getattr__(name: str) -> Any:
    """``plan`` and ``build_plan`` live in :mod:`torchgraft.planner` (which imports this module); found here too."""
    if name in ("plan", "build_plan"):
        from . import planner

        return getattr(planner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

