"""What a load did, for people (grouped tables, plain-words guidance) and for programs (JSON)."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .keys import collapse_groups, collapse_keys, grouped_keys, split_key
from .messages import describe_adapter  # re-exported: report.describe_adapter keeps working

if TYPE_CHECKING:
    from torch import nn

    from .plan import Plan
    from .sources import Source

__all__ = ["LoadReport", "alignment_renderable", "render_plan", "render_text"]

_MAX_LINES = 12
#: Groups of keys a warning names before it says how many more there are.
_MAX_GROUPS = 16


def _keys_cell(keys: Sequence[str], limit: int = _MAX_LINES) -> str:
    """Collapsed keys; when that is still long, group by ever shorter module paths (``features.{1..17}.* (280)``)."""
    lines = collapse_keys(keys)
    depth = max((k.count(".") for k in keys), default=0)
    while len(lines) > limit and depth > 0:
        heads: dict[str, int] = {}
        for k in keys:
            parts = k.split(".")
            head = ".".join(parts[:depth]) + (".*" if len(parts) > depth else "")
            heads[head] = heads.get(head, 0) + 1
        lines = [
            f"{label} ({sum(heads[h] for h in members)})" if label.endswith("*") else label
            for label, members in collapse_groups(heads)
        ]
        depth -= 1
    if len(lines) > limit:
        lines = lines[: limit - 1] + [f"... and {len(lines) - limit + 1} more groups"]
    return "\n".join(lines)


def _renderable(title: str, rows: Iterable[tuple[str, Sequence[str], str]], footer: Sequence[str] = ()):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(show_lines=True, expand=False)
    table.add_column("what", no_wrap=True)
    table.add_column("n", justify="right")
    table.add_column("keys (model names; {a..b} = repeated layers)", overflow="fold")
    for label, keys, extra in rows:
        if keys:
            table.add_row(label, str(len(keys)), _keys_cell(keys) + (f"\n{extra}" if extra else ""))
    return Group(Text(title, style="bold"), table, *(Text(line) for line in footer))


def render_text(renderable: Any, *, width: int = 120) -> str:
    """Plain text of a rich renderable (no colours, trailing spaces trimmed): what ``str()`` of reports returns."""
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False, color_system=None, highlight=False).print(renderable)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


def _adapter_summary(adapted: dict[str, dict[str, Any]]) -> str:
    """``by input_channels(method='sum') (1), reinit (2)``."""
    counts: dict[str, int] = {}
    for spec in adapted.values():
        d = describe_adapter(spec)
        counts[d] = counts.get(d, 0) + 1
    return "by " + ", ".join(f"{d} ({n})" for d, n in counts.items()) if counts else ""


def _transform_summary(transformed: Mapping[str, str], limit: int = 8) -> str:
    """The distinct transforms with layer numbers folded (``h.{}.mlp.c_fc.weight``), one a line, with counts."""
    def fold(text: str) -> str:  # layer numbers in dotted names, not index=0
        return re.sub(r"(?<=\.)\d+(?=\.)", "{}", text)

    counts: dict[str, int] = {}
    for target, expr in transformed.items():
        line = f"{fold(target)} = {fold(expr)}"
        counts[line] = counts.get(line, 0) + 1
    lines = [f"{line}" + (f"  (x{n})" if n > 1 else "") for line, n in counts.items()]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... {len(lines) - limit} more (report.transformed / plan.transformed)"]
    return "\n".join(lines)


def _prefix_line(prefix: dict[str, str]) -> str:
    if not prefix:
        return ""
    if prefix["mode"] == "add":
        return f"base-model prefix: added {prefix['prefix']!r} to checkpoint names"
    return f"base-model prefix: removed {prefix['prefix']!r} from checkpoint names"


#: ``report.initialised`` values of modules that nothing initialised (``init_missing=False``, or no
#: initialiser knows the module): ``"kept"`` their values, or ``"zeros"`` (they were on the meta device).
NOT_INITIALISED = {"kept": "kept their values", "zeros": "zeros (built on the meta device)"}


@dataclass
class LoadReport:
    """What :func:`torchgraft.load` did. ``str(report)`` is a grouped table; ``to_dict()`` is JSON-ready.

    Attributes:
        loaded: model entries that received a checkpoint tensor.
        missing: model entries the checkpoint did not have; their modules were initialised
            (entries the model or caller marked as ignorable are in ``ignored`` instead).
        unexpected: checkpoint entries nothing used, in the checkpoint's own names.
        mismatched: ``{"key", "shape", "source", "source_shape"}`` for names that matched with
            other shapes (initialised, not loaded).
        renamed: checkpoint name -> model name, for every name that changed.
        adapted: model name -> ``{"name": adapter, "args": {...}}``.
        initialised: module path -> how it was initialised (``"reset_parameters"``, ...).
        tied: model name -> the entry it shares a tensor with.
        ignored: name -> why it is not reported (ignore pattern, non-persistent buffer, ...).
        dropped: checkpoint names (among ``ignored``) that nothing used because an ignore pattern
            or a rule (``None``, ``select_layers``) left them out.
        aligned: model name -> ``{"source", "confidence", "reason"}`` for entries paired by
            structure (``align=True``).
        ambiguous: ``{"targets", "candidates", "reason"}`` for same-shaped entries alignment
            could not tell apart (left missing).
        nonfinite: model name -> ``{"nan": n, "inf": n}`` for loaded tensors holding NaN or Inf
            in the dtype they were stored in (see ``check_finite=`` of :func:`torchgraft.load`).
        verdict: one paragraph when the checkpoint does not belong to the model, else ``""``.
        converted: model name -> what the reader of another framework's file did to reach torch's
            layout (``"Keras Dense kernel [in, out] transposed"``, ``"dequantised from Q4_K"``).
        transformed: model name -> the transform that computed it from checkpoint entries
            (``"split(transpose(h.0.attn.c_attn.weight), dim=0, parts=3, index=0)"``; see
            :mod:`torchgraft.transforms`). Not counted in ``loaded``.

    Example:
        >>> report = tg.load(model, "all-MiniLM-L6-v2/")
        >>> print(report)
        >>> report.missing, report.unexpected
        (['classifier.weight', 'classifier.bias'], ['pooler.dense.weight', 'pooler.dense.bias'])
    """

    model: str
    source: str
    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[dict[str, Any]] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    adapted: dict[str, dict[str, Any]] = field(default_factory=dict)
    initialised: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    prefix: dict[str, str] = field(default_factory=dict)
    container: str = ""
    dtype: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    nonfinite: dict[str, dict[str, int]] = field(default_factory=dict)
    aligned: dict[str, dict[str, Any]] = field(default_factory=dict)
    ambiguous: list[dict[str, Any]] = field(default_factory=list)
    verdict: str = ""
    converted: dict[str, str] = field(default_factory=dict)
    transformed: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_plan(
        cls,
        plan: Plan,
        *,
        model: nn.Module,
        source: Source,
        initialised: dict[str, str],
        dtype: str | None,
        seconds: float,
    ) -> LoadReport:
        ignored = dict(plan.ignored)
        for k in plan.missing_ignored:
            ignored[k] = plan.entries[k].note
        return cls(
            model=type(model).__name__,
            source=source.path or "state dict",
            format=source.format,
            loaded=plan.loaded,
            missing=plan.missing,
            unexpected=list(plan.unexpected),
            mismatched=[
                {
                    "key": e.target,
                    "shape": list(e.shape),
                    "source": e.source,
                    "source_shape": list(e.source_shape or ()),
                }
                for e in plan.mismatched
            ],
            renamed=dict(plan.renamed),
            adapted=plan.adapted,
            initialised=initialised,
            tied=plan.tied,
            ignored=ignored,
            dropped=list(plan.ignored),
            prefix=dict(plan.prefix),
            container=source.container,
            dtype=dtype,
            seconds=seconds,
            notes=list(plan.notes),
            aligned=plan.aligned,
            ambiguous=list(plan.ambiguous),
            verdict=plan.verdict,
            converted={
                k: source.conversions[e.source]
                for k, e in plan.entries.items()
                if e.loads and e.source in source.conversions
            },
            transformed=plan.transformed,
        )

    @property
    def ok(self) -> bool:
        """True when every model entry came from the checkpoint and every checkpoint entry was used."""
        return not (self.missing or self.unexpected or self.mismatched)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary of every field."""
        return {
            "model": self.model,
            "source": self.source,
            "format": self.format,
            "container": self.container,
            "prefix": self.prefix,
            "dtype": self.dtype,
            "seconds": round(self.seconds, 4),
            "loaded": self.loaded,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "mismatched": self.mismatched,
            "renamed": self.renamed,
            "adapted": self.adapted,
            "initialised": self.initialised,
            "tied": self.tied,
            "ignored": self.ignored,
            "dropped": self.dropped,
            "notes": self.notes,
            "nonfinite": self.nonfinite,
            "aligned": self.aligned,
            "ambiguous": self.ambiguous,
            "verdict": self.verdict,
            "converted": self.converted,
            "transformed": self.transformed,
        }

    # Words ---------------------------------------------------------------
    def unused_message(self) -> str:
        m = self.model
        return (
            f"Some weights of the checkpoint at {self.source} were not used when initialising {m}: "
            f"{grouped_keys(self.unexpected, _MAX_GROUPS)}.\n"
            f"- This IS expected if you are initialising {m} from a checkpoint trained on another task or with another "
            "architecture (e.g. a BertForSequenceClassification from a BertForPreTraining checkpoint).\n"
            f"- This IS NOT expected if the checkpoint comes from a model you expect to be exactly identical to {m}."
        )

    @property
    def not_initialised(self) -> dict[str, list[str]]:
        """``"kept"`` / ``"zeros"`` -> missing entries whose module nothing initialised (see ``initialised``)."""
        out: dict[str, list[str]] = {}
        for key in self.missing:
            how = self.initialised.get(split_key(key)[0])
            if how in NOT_INITIALISED:
                out.setdefault(how, []).append(key)
        return out

    def missing_message(self) -> str:
        lines = []
        not_init = {k for keys in self.not_initialised.values() for k in keys}
        if initialised := [k for k in self.missing if k not in not_init]:
            lines.append(
                f"Some weights of {self.model} were not in the checkpoint at {self.source} and are newly initialised: "
                f"{grouped_keys(initialised, _MAX_GROUPS)}.\n"
                "You should probably TRAIN this model on a downstream task before using it for predictions and inference."
            )
        for how, keys in self.not_initialised.items():
            lines.append(
                f"Some weights of {self.model} were not in the checkpoint at {self.source} and were NOT initialised "
                f"(init_missing=False, or no initialiser for their module): {grouped_keys(keys, _MAX_GROUPS)}.\n"
                f"They hold {NOT_INITIALISED[how]}: give them values before using the model."
            )
        return "\n".join(lines)

    def mismatched_message(self) -> str:
        lines = [f"  {m['key']}: checkpoint {m['source_shape']}, model {m['shape']}" for m in self.mismatched]
        return (
            f"Some weights of {self.model} were newly initialised because their shapes differ from the checkpoint at "
            f"{self.source}:\n" + "\n".join(lines) + "\nPass adapt=... to adapt them instead, if that is what you want."
        )

    def nonfinite_message(self) -> str:
        counts = [f"{k} ({c['nan']} NaN, {c['inf']} Inf)" for k, c in self.nonfinite.items()]
        shown = ", ".join(counts[:_MAX_LINES]) + (
            f" and {len(counts) - _MAX_LINES} more" if len(counts) > _MAX_LINES else ""
        )
        return (
            f"Some weights of {self.model} loaded from {self.source} hold NaN or Inf values: {shown}.\n"
            "The checkpoint is damaged, or a cast to a narrower dtype overflowed; pass check_finite='error' to refuse such loads."
        )

    @property
    def reinitialised(self) -> list[str]:
        """Entries the checkpoint has but the ``adapt=`` policy re-initialised (``"reinit"``)."""
        return [k for k, spec in self.adapted.items() if spec.get("name") == "reinit"]

    def log(self, logger: logging.Logger) -> None:
        """Warn about unused, missing, mismatched and re-initialised weights; one info line when all fit."""
        if self.verdict:  # first and loudest: the rest of the warnings follow from it
            logger.warning(self.verdict)
        if self.unexpected:
            logger.warning(self.unused_message())
        for note in self.notes if not self.ok else ():
            logger.warning("%s", note)
        if self.missing:
            logger.warning(self.missing_message())
        if self.mismatched:
            logger.warning(self.mismatched_message())
        if reinit := self.reinitialised:
            logger.warning(
                "Some weights of %s were re-initialised by the adapt policy although the checkpoint has them: %s.\n"
                "You should probably TRAIN them on a downstream task before using the model for predictions.",
                self.model,
                ", ".join(collapse_keys(reinit)),
            )
        adapted = {k: v for k, v in self.adapted.items() if v.get("name") != "reinit"}
        if adapted:
            logger.info(
                "Adapted %d weights of %s to its shapes %s.", len(adapted), self.model, _adapter_summary(adapted)
            )
        if self.nonfinite:
            logger.warning(self.nonfinite_message())
        missing_modules = {split_key(k)[0] for k in self.missing}
        if zeroed := [p or "(root)" for p, how in self.initialised.items() if how == "zeros" and p not in missing_modules]:
            logger.warning(
                "Buffers that %s computes itself (not saved in checkpoints) were left as zeros in %s: the model was built "
                "on the meta device and nothing knows how to compute them. Build these modules outside "
                "torch.device('meta'), or set the buffers yourself before using the model.",
                self.model,
                ", ".join(zeroed),
            )
        if self.ok and not reinit and not self.nonfinite:
            logger.info(
                "All weights of %s were loaded from %s and %s; "
                "if your task is the one the checkpoint was trained for, the model is ready for predictions.",
                self.model,
                self.source,
                self._use_of_checkpoint(),
            )

    def _use_of_checkpoint(self) -> str:
        """How much of the checkpoint was used, in words that never overclaim."""
        if not self.dropped:
            return "all checkpoint weights were used"
        return (
            f"{len(self.dropped)} checkpoint weights were left out on purpose "
            f"(ignore patterns or rules: {', '.join(collapse_keys(self.dropped)[:4])})"
        )

    def _renderable(self):
        title = f"{self.source} ({self.format}{', ' + self.container if self.container else ''}) -> {self.model}"
        inits = sorted({v for v in self.initialised.values()})
        not_init = {k for keys in self.not_initialised.values() for k in keys}
        rows = [
            ("loaded", self.loaded, ""),
            ("adapted", list(self.adapted), _adapter_summary(self.adapted)),
            ("transformed", list(self.transformed), _transform_summary(self.transformed)),
            ("converted by the reader", list(self.converted), "to torch's layout (report.converted says how)"),
            (
                "missing (initialised)",
                [k for k in self.missing if k not in not_init],
                f"by {', '.join(real)}" if (real := [i for i in inits if i not in NOT_INITIALISED]) else "",
            ),
            *[(f"missing (NOT initialised: {NOT_INITIALISED[h]})", keys, "") for h, keys in self.not_initialised.items()],
            ("shape mismatch (initialised)", [m["key"] for m in self.mismatched], ""),
            ("unused (checkpoint names)", self.unexpected, ""),
            ("tied", list(self.tied), ""),
            ("ignored", list(self.ignored), ""),
            ("NaN / Inf values", list(self.nonfinite), ""),
        ]
        footer = [
            line
            for line in [_prefix_line(self.prefix), f"renamed: {len(self.renamed)} keys" if self.renamed else ""]
            if line
        ]
        if len(not_init) < len(self.missing):
            footer.append("Newly initialised: train these on a downstream task before relying on predictions.")
        if not_init:
            footer.append("NOT initialised (init_missing=False, or no initialiser): give them values before use.")
        if self.unexpected:
            footer.append(
                "Unused: expected when loading a checkpoint trained for another task or architecture; "
                "not expected if the checkpoint's model should be identical."
            )
        if self.mismatched:
            footer.append("Shape mismatches were initialised, not loaded: pass adapt=... to adapt them.")
        if self.reinitialised:
            footer.append("Re-initialised by the adapt policy (reinit): train these before relying on predictions.")
        if self.nonfinite:
            footer.append("NaN / Inf values were loaded: the checkpoint is damaged or a cast overflowed.")
        if self.ok and not self.reinitialised:
            footer.append(f"Every weight came from the checkpoint; {self._use_of_checkpoint()}.")
        return _with_alignment(_renderable(title, rows, footer), self.aligned, self.ambiguous)

    def __rich__(self):
        return self._renderable()

    def __repr__(self) -> str:
        """Short, for a REPL: the counts and the first problems (``print(report)`` shows the full table)."""
        groups = {
            "loaded": self.loaded,
            "adapted": self.adapted,
            "missing": self.missing,
            "mismatched": self.mismatched,
            "unexpected": self.unexpected,
            "tied": self.tied,
            "renamed": self.renamed,
            "nonfinite": self.nonfinite,
        }
        counts = ", ".join(f"{len(v)} {k}" for k, v in groups.items() if v)
        problems = [f"missing: {k}" for k in self.missing] + [f"unexpected: {k}" for k in self.unexpected]
        problems += [f"shape mismatch: {m['key']}" for m in self.mismatched]
        shown = "; ".join(problems[:3]) + (f"; ... {len(problems) - 3} more" if len(problems) > 3 else "")
        return f"<LoadReport {self.source} -> {self.model}: {counts or 'nothing'}{'; ' + shown if shown else ''}>"

    def __str__(self) -> str:
        return render_text(self._renderable())


def render_plan(plan: Plan) -> str:
    """``str(plan)``: what each group of tensors will go through, before anything is read."""
    return render_text(plan_renderable(plan))


def plan_renderable(plan: Plan):
    """A rich renderable of the plan (``console.print(plan)`` uses it)."""
    by_action: dict[str, list[str]] = {}
    for name, e in plan.entries.items():
        label = {
            "copy": "load",
            "adapt": "adapt",
            "init": "initialise (shape mismatch)"
            if e.mismatched
            else (
                "initialise (adapt: reinit)"
                if e.adapter
                else ("initialise (ignored)" if e.ignored else "initialise (missing)")
            ),
            "tied": "tied",
            "default": "module default",
            "transform": "transform",
        }[e.action]
        by_action.setdefault(label, []).append(name)
    casts = [n for n, e in plan.entries.items() if e.loads and e.source_dtype and e.source_dtype != e.dtype]
    rows = [
        (label, keys, _adapter_summary({k: plan.entries[k].adapter or {} for k in keys}) if label == "adapt" else "")
        for label, keys in by_action.items()
        if label != "transform"
    ]
    if transformed := by_action.get("transform"):
        rows.append(("transform", transformed, _transform_summary(plan.transformed)))
    if casts:
        rows.append(("cast", casts, ""))
    rows.append(("unused (checkpoint names)", plan.unexpected, ""))
    rows.append(("ignored (checkpoint names)", list(plan.ignored), ""))
    footer = [line for line in [_prefix_line(plan.prefix)] if line]
    if plan.renamed:
        footer.append(f"renamed: {len(plan.renamed)} keys (plan.renamed)")
    footer += plan.notes
    return _with_alignment(
        _renderable(f"plan: {plan.source} ({plan.source_format}) -> {plan.model}", rows, footer),
        plan.aligned,
        plan.ambiguous,
    )


def _with_alignment(renderable, aligned: dict[str, dict[str, Any]], ambiguous: list[dict[str, Any]]):
    """Append the structural-alignment tables (pairs with reasons, ambiguous candidates) when there are any."""
    if not aligned and not ambiguous:
        return renderable
    from rich.console import Group

    return Group(renderable, alignment_renderable(aligned, ambiguous))


# ---------------------------------------------------------------------------
# Structural alignment (``align=True``)


_LAYER_NUMBER = re.compile(r"(?<![^.\s(])\d+(?![^.\s)])")


def _group_pairs(aligned: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, float, float, str, int]]:
    """Collapse aligned pairs into rows: (model label, checkpoint label, min conf, max conf, reason, n)."""
    groups: dict[tuple[str, str], list[tuple[str, Mapping[str, Any]]]] = {}
    for target, info in aligned.items():
        t_mod, s_mod = split_key(target)[0], split_key(str(info["source"]))[0]
        groups.setdefault((_LAYER_NUMBER.sub("#", t_mod), _LAYER_NUMBER.sub("#", s_mod)), []).append((target, info))
    rows = []
    for members in groups.values():
        t_label = ", ".join(collapse_keys(t for t, _ in members))
        s_label = ", ".join(collapse_keys(str(i["source"]) for _, i in members))
        confs = [float(i["confidence"]) for _, i in members]
        rows.append((t_label, s_label, min(confs), max(confs), str(members[0][1]["reason"]), len(members)))
    return rows


def alignment_renderable(aligned: Mapping[str, Mapping[str, Any]], ambiguous: list[Mapping[str, Any]]):
    """Rich renderable: the aligned pairs with confidence and reason, then the ambiguous ones."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    if aligned:
        table = Table(show_lines=True, expand=False)
        table.add_column("model (aligned)", overflow="fold")
        table.add_column("checkpoint", overflow="fold")
        table.add_column("conf", justify="right", no_wrap=True)
        table.add_column("why", overflow="fold")
        for t, s, lo, hi, reason, n in _group_pairs(aligned):
            conf = f"{lo:.2f}" if lo == hi else f"{lo:.2f}-{hi:.2f}"
            table.add_row(t, s, conf, reason + (f" (+{n - 1} like it)" if n > 1 else ""))
        parts += [
            Text(
                f"aligned by structure: {len(aligned)} entries (plan.aligned; plan.aligned_rules() exports them)",
                style="bold",
            ),
            table,
        ]
    if ambiguous:
        table = Table(show_lines=True, expand=False)
        table.add_column("model (not loaded)", overflow="fold")
        table.add_column("candidates in the checkpoint", overflow="fold")
        table.add_column("why", overflow="fold")
        rows: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
        for a in ambiguous:  # the same ambiguity in every layer is one row
            key = (*sorted({_LAYER_NUMBER.sub("#", k) for k in a["targets"]}), _LAYER_NUMBER.sub("#", str(a["reason"])))
            rows.setdefault(key, []).append(a)
        for group in rows.values():
            targets = [k for a in group for k in a["targets"]]
            candidates = [k for a in group for k in a["candidates"]]
            more = f" (and {len(group) - 1} more like it)" if len(group) > 1 else ""
            table.add_row(
                "\n".join(collapse_keys(targets)), "\n".join(collapse_keys(candidates)), str(group[0]["reason"]) + more
            )
        parts += [Text("ambiguous: left missing, pass rules= to decide", style="bold"), table]
    return Group(*parts)
