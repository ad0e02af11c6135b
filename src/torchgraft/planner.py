"""Building a plan: decide, from names and shapes alone, what happens to every tensor.

``plan(model, source)`` renames source keys (:mod:`torchgraft.rules`), resolves the
base-model prefix in either direction (:func:`torchgraft.keys.resolve_prefix`), matches
names, checks shapes, pairs leftovers by structure on request (:mod:`torchgraft.align`),
settles tied weights, applies ignore patterns and the ``adapt=`` policy, and returns a
:class:`~torchgraft.plan.Plan` (the data: entries, actions, JSON). Each step is one function
below, in the order :func:`build_plan` runs them.

The planning options travel as one :class:`PlanOptions`; :func:`plan`, :func:`torchgraft.load`
and :func:`torchgraft.distributed.load` take them as keyword arguments of the same names.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import transforms as tg_transforms
from .align import align, source_order_trusted
from .align.layouts import Layout, orient
from .align.trace import ExampleInputs, ExecutionOrder, check_example_inputs, trace_order
from .errors import PlanError
from .integrations import hf
from .keys import Prefix, collapse_keys, resolve_prefix, split_key
from .plan import FOREIGN, Entry, Plan
from .rules import RenameResult, RuleSpec, apply_rules, compile_rules, suffix_matcher
from .sources import Source
from .sources import open as open_source
from .target import TargetView, runs_own_loading_code
from .transforms import Expr, expand_rule, fill, infer_shape, is_transform

if TYPE_CHECKING:  # torch is imported where it is used, so `import torchgraft` stays light
    from torch import nn

    from .policy import AdaptSpec

__all__ = ["IgnorePatterns", "PlanOptions", "align_plan", "build_plan", "plan"]

#: What ``ignore_missing=`` / ``ignore_unexpected=`` accept: regexes, as strings or compiled.
IgnorePatterns = Iterable[str | re.Pattern[str]]


@dataclass(frozen=True)
class PlanOptions:
    """Everything that decides a plan besides the model and the checkpoint (see :func:`plan` for each).

    The ignore patterns are kept as tuples, so a generator passed by the caller is read once.

    Example:
        >>> build_plan(model, TargetView.of(model), tg.open("ckpt.pth"), PlanOptions(align=True))
    """

    rules: RuleSpec | None = None
    prefix: str | None = None
    ignore_missing: tuple[str | re.Pattern[str], ...] = ()
    ignore_unexpected: tuple[str | re.Pattern[str], ...] = ()
    adapt: AdaptSpec | None = None
    align: bool = False
    example_inputs: ExampleInputs | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ignore_missing", tuple(self.ignore_missing))
        object.__setattr__(self, "ignore_unexpected", tuple(self.ignore_unexpected))


def plan(
    model: nn.Module,
    source: str | os.PathLike[str] | Source | Mapping[str, Any],
    *,
    rules: RuleSpec | None = None,
    prefix: str | None = None,
    ignore_missing: IgnorePatterns = (),
    ignore_unexpected: IgnorePatterns = (),
    adapt: AdaptSpec | None = None,
    allow_globals: Iterable[str | Any] | None = None,
    align: bool = False,
    example_inputs: ExampleInputs | None = None,
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
        example_inputs: with ``align=True``: inputs for one forward pass, traced on a meta copy
            of the model (no weight read, the model unchanged), so the model's modules are
            aligned in the order they run instead of the order they are registered (see
            :mod:`torchgraft.align.trace`). A tensor, a tuple or list of positional arguments,
            a dict of keyword arguments (tensors become meta tensors of the same shape and
            dtype), or ``"auto"``: built from the model's config (transformers ``input_ids``
            or ``pixel_values`` models, timm models). A plan note says how many modules ran.

    Returns:
        A :class:`Plan`.

    Raises:
        CheckpointError: the source cannot be opened (``UnsafeCheckpointError``: its pickle
            wants globals the safe loader refuses).
        PlanError: an invalid ignore pattern, rule or ``adapt`` pattern, or ``align`` not a bool;
            ``example_inputs`` without ``align=True``, of no accepted form, ``"auto"`` for a model
            no convention covers, or a forward that fails on them on the meta device.
        AdapterError: an ``adapt`` adapter is unknown or cannot produce the model's shape.

    Example:
        >>> from transformers import BertConfig, BertForTokenClassification
        >>> model = BertForTokenClassification(BertConfig.from_pretrained("all-MiniLM-L6-v2", num_labels=2))
        >>> p = tg.plan(model, "all-MiniLM-L6-v2/model.safetensors")
        >>> p.prefix, p.missing
        ({'mode': 'add', 'prefix': 'bert.'}, ['classifier.weight', 'classifier.bias'])
    """
    src = open_source(source, allow_globals=allow_globals)
    options = PlanOptions(
        rules=rules,
        prefix=prefix,
        ignore_missing=ignore_missing,
        ignore_unexpected=ignore_unexpected,
        adapt=adapt,
        align=align,
        example_inputs=example_inputs,
    )
    return build_plan(model, TargetView.of(model), src, options)


# ---------------------------------------------------------------------------
# The steps


@dataclass
class _Draft:
    """A plan being built: what the steps below fill in, then :meth:`finish` turns into a :class:`Plan`."""

    renames: RenameResult
    live: dict[str, str]  # checkpoint key -> its name after rules (dropped keys left out)
    prefix: Prefix
    entries: dict[str, Entry] = field(default_factory=dict)
    claims: dict[str, str] = field(default_factory=dict)  # model name -> the checkpoint key that fills it
    unused: list[str] = field(default_factory=list)  # checkpoint keys nothing uses (so far)
    renamed: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    metadata_map: dict[str, str] = field(default_factory=dict)  # model module -> checkpoint module
    notes: list[str] = field(default_factory=list)
    ambiguous: list[dict[str, Any]] = field(default_factory=list)

    def source_module(self, key: str) -> str | None:
        return self.metadata_map.get(split_key(key)[0])


@dataclass(frozen=True)
class _IgnoreRules:
    """The ignore patterns in force: the model's own (Hugging Face ``_keys_to_ignore_on_load_*``) and the caller's."""

    missing: list[re.Pattern[str]]
    unexpected: list[re.Pattern[str]]

    @classmethod
    def of(cls, model: nn.Module, options: PlanOptions) -> _IgnoreRules:
        own_missing, own_unexpected = hf.ignore_patterns(model)
        return cls(
            _compile_patterns([*own_missing, *options.ignore_missing]),
            _compile_patterns([*own_unexpected, *options.ignore_unexpected]),
        )


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


def _rename(model: nn.Module, view: TargetView, src: Source, options: PlanOptions) -> _Draft:
    """Rules, then the base-model prefix: the name each checkpoint key goes by."""
    try:
        user_rules = compile_rules(_rename_rules(options.rules))
    except (TypeError, ValueError) as e:
        raise PlanError(str(e)) from None
    expected = set(view.entries) | set(view.nonpersistent)
    renames = apply_rules(src.keys(), user_rules, is_expected=suffix_matcher(expected))
    read = [_template_regex(k) for _, e in _transform_rules(options.rules) for k in e.sources()]
    table_notes = _model_table_renames(model, renames, expected, read=lambda k: any(r.fullmatch(k) for r in read))
    live = {orig: new for orig, new in renames.mapping.items() if new is not None}
    pfx = resolve_prefix(set(live.values()), expected, option=options.prefix, declared=hf.base_model_prefix(model))
    draft = _Draft(renames, live, pfx)
    draft.notes += table_notes
    return draft


def _rename_rules(spec: RuleSpec | None) -> RuleSpec | None:
    """The rename rules of a ``rules=`` table (transform rules are :func:`_transform_rules`)."""
    if spec is None:
        return None
    items = spec.items() if isinstance(spec, Mapping) else spec
    return [(k, v) for k, v in items if not is_transform(v)]


def _transform_rules(spec: RuleSpec | None) -> list[tuple[str, Expr]]:
    """``{model template: transform}`` rules, each brace set expanded (see :func:`torchgraft.transforms.expand_rule`)."""
    if spec is None:
        return []
    items = spec.items() if isinstance(spec, Mapping) else spec
    out: list[tuple[str, Expr]] = []
    for key, value in items:
        if not is_transform(value):
            continue
        if not isinstance(key, str):
            raise PlanError(f"a transform rule is keyed by a model name template (a string), not {key!r}")
        out += [(f"{key} -> {t}" if t != key else key, e) for t, e in expand_rule(key, value)]
    return out


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(r"(\d+)".join(re.escape(part) for part in template.split("{}")))


def _template_hit(regex: re.Pattern[str], name: str, pfx: Prefix) -> re.Match[str] | None:
    """A model name matched by a transform rule's template, as it is or up to the resolved base-model prefix."""
    if m := regex.fullmatch(name):
        return m
    if pfx.mode == "add" and name.startswith(pfx.prefix):  # a recipe for the base model, a model with a head
        return regex.fullmatch(name[len(pfx.prefix) :])
    if pfx.mode == "strip":  # a recipe in the checkpoint's prefixed names, the base model
        return regex.fullmatch(pfx.prefix + name)
    return None


def _transform(draft: _Draft, view: TargetView, src: Source, options: PlanOptions) -> None:
    """Transform rules: model entries computed from checkpoint entries; shapes checked on meta, nothing read.

    A transform rule overrides a plain match of the same model name (the caller said how to fill
    it). Checkpoint entries a transform reads leave ``unused``.

    Raises:
        PlanError: a transform does not produce the model entry's shape, or an op cannot apply.
    """
    rules = _transform_rules(options.rules)
    if not rules:
        return
    targets = [*view.entries]
    overridden: set[str] = set()
    for label, expr in rules:
        template = label.split(" -> ")[-1]
        regex = _template_regex(template)
        hits = [(name, m.groups()) for name in targets if (m := _template_hit(regex, name, draft.prefix))]
        if not hits:
            draft.notes.append(f"transform rule {label!r} matches no entry of the model")
            continue
        for name, numbers in hits:
            filled = fill(expr, numbers)
            absent = [k for k in filled.sources() if k not in src]
            if absent:
                draft.notes.append(
                    f"transform rule {label!r} leaves {name!r} unfilled: the checkpoint has no {absent[0]!r}"
                )
                continue
            tree = filled.map_sources(lambda leaf: Expr(source=leaf.source, shape=src[leaf.source].shape,
                                                        dtype=src[leaf.source].dtype))  # fmt: skip
            info = view.entries[name]
            try:
                shape = infer_shape(tree)
            except PlanError as e:
                raise PlanError(f"transform rule {label!r} for {name!r}: {e}") from None
            if shape != tuple(info.shape) and not (info.shape == () and shape == (1,)):
                raise PlanError(
                    f"transform rule {label!r}: {tree} gives shape {list(shape)}, "
                    f"the model's {name!r} is {list(info.shape)}"
                )
            first = tree.sources()[0]
            ref = src[first]
            overridden.add(name)
            if tree.source is not None:  # a bare checkpoint name: a plain copy under another name
                draft.entries[name] = Entry(name, "copy", info.shape, info.dtype, first, ref.shape, ref.dtype,
                                            note=f"rule {label}")  # fmt: skip
                if first != name:
                    draft.renamed[first] = name
            else:
                draft.entries[name] = Entry(name, "transform", info.shape, info.dtype, first, ref.shape, ref.dtype,
                                            note=f"transform rule {label}", transform=tree.to_dict())  # fmt: skip
            draft.metadata_map.setdefault(split_key(name)[0], split_key(first)[0])
    used = {k for e in draft.entries.values() for k in e.sources}
    freed = [k for t, k in draft.claims.items() if t in overridden and k not in used]  # a plain match replaced
    draft.unused[:] = [k for k in draft.unused if k not in used] + freed


def _model_table_renames(
    model: nn.Module, renames: RenameResult, expected: set[str], *, read: Callable[[str], bool] = lambda k: False
) -> list[str]:
    """Apply the model's own checkpoint conversion table (transformers) to names the rules left alone.

    Changes ``renames`` in place (reported like any rename); returns plan notes for names the table
    would convert with a tensor operation, which a rename cannot do, except those a transform rule reads (``read``).
    """
    names = {new: orig for orig, new in renames.mapping.items() if new is not None}
    table = hf.conversion_renames(model, names, expected)
    for new, target in table.renamed.items():
        orig = names[new]
        renames.mapping[orig] = target
        renames.reasons.setdefault(orig, []).append(table.reasons[new])
    by_operation: dict[str, list[str]] = defaultdict(list)
    for new, operation in table.unsupported.items():
        if not read(names[new]):
            by_operation[operation].append(names[new])
    return [
        f"transformers converts {len(keys)} checkpoint entries of {type(model).__name__} with {operation} "
        f"({', '.join(collapse_keys(keys)[:3])}): torchgraft renames but does not yet run tensor conversions, "
        "so they stay unused; load this checkpoint with from_pretrained, or save it from transformers first"
        for operation, keys in by_operation.items()
    ]


def _claim(draft: _Draft, view: TargetView) -> None:
    """Which checkpoint key fills which model name; the rest is unused. Two claimants: the exact name wins."""
    expected = set(view.entries) | set(view.nonpersistent)
    claims: dict[str, list[str]] = defaultdict(list)
    for orig, new in draft.live.items():
        target = draft.prefix.to_target(new, expected)
        if target != orig:
            draft.renamed[orig] = target
        if target in expected:
            claims[target].append(orig)
        else:
            draft.unused.append(orig)
    for target, origs in claims.items():
        keep = next((o for o in origs if o == target), origs[0])
        for o in origs:
            if o != keep:
                draft.unused.append(o)
                draft.notes.append(f"{o!r} and {keep!r} both map to {target!r}; {keep!r} is used")
        draft.claims[target] = keep
    for orig in draft.renames.dropped:
        draft.ignored[orig] = "dropped by a rule"


def _match(draft: _Draft, view: TargetView, src: Source) -> None:
    """One entry per model name: ``copy`` from its claimant, ``init`` when none or the shapes differ."""
    pfx = draft.prefix
    for name, info in view.entries.items():
        src_name = draft.claims.get(name)
        if src_name is None:
            draft.entries[name] = Entry(name, "init", info.shape, info.dtype)
            continue
        ref = src[src_name]
        draft.metadata_map.setdefault(split_key(name)[0], split_key(src_name)[0])
        if info.lazy:  # a lazy module never run: materialised in the checkpoint's shape, as torch's lazy hook does
            info = dataclasses.replace(info, shape=ref.shape)
        e = Entry(name, "copy", info.shape, info.dtype, src_name, ref.shape, ref.dtype)
        why = list(draft.renames.reasons.get(src_name, []))
        if draft.live[src_name] != name:
            why.append(f"prefix {pfx.mode} {pfx.prefix!r}")
        e.note = "; ".join(why)
        if ref.shape != info.shape and not (info.shape == () and ref.shape == (1,)):  # (1,) -> () as load_state_dict
            e.action, e.mismatched = "init", True
        draft.entries[name] = e


def _match_nonpersistent(draft: _Draft, view: TargetView, src: Source, model: nn.Module) -> None:
    """Non-persistent buffers: load only what a meta-built model needs; otherwise the model computes them.

    transformers 5 models recompute them on meta too, so a meta and a CPU build report the same.
    """
    recomputed = hf.computes_buffers(model)
    for name, info in view.nonpersistent.items():
        src_name = draft.claims.get(name)
        if src_name is None:
            continue
        ref = src[src_name]
        if info.meta and ref.shape == info.shape and not recomputed:
            draft.entries[name] = Entry(
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
            draft.ignored[src_name] = f"non-persistent buffer {name!r}: computed by the model, not loaded"


def _align(
    draft: _Draft, view: TargetView, src: Source, ignore: _IgnoreRules, model: nn.Module, options: PlanOptions
) -> None:
    """``align=True``: pair the leftovers by structure (checkpoint keys the caller ignores are left out).

    With ``example_inputs``, the model side is in the order a traced forward ran its modules.
    """
    order = None
    if options.example_inputs is not None:
        order, how = trace_order(model, options.example_inputs)
        ran, not_run = order.ran_and_not(view.entries)
        note = f"aligned in execution order, traced with {how}: {len(ran)} modules ran, {len(not_run)} did not"
        if not_run:
            note += (
                f" ({', '.join(not_run[:3])}{', ...' if len(not_run) > 3 else ''}: kept in registration order, "
                "after the modules that ran in their nearest parent that ran)"
            )
        draft.notes.append(note)
    draft.ambiguous = align_plan(
        view,
        src,
        draft.entries,
        draft.unused,
        draft.live,
        renamed=draft.renamed,
        metadata_map=draft.metadata_map,
        skip=lambda k: _matches(ignore.unexpected, k, draft.live.get(k)) is not None,
        order=order,
    )


def _tie(draft: _Draft, view: TargetView) -> None:
    """Tied weights: one tensor under several names is loaded once."""
    entries = draft.entries
    for name, owner in view.tied.items():
        e, first = entries[name], entries[owner]
        if first.loads or not e.loads:
            if e.loads:
                draft.ignored[e.source or name] = f"same tensor as {owner!r}, which is loaded from {first.source!r}"
            entries[name] = Entry(name, "tied", e.shape, e.dtype, note=f"tied to {owner}")
        else:  # only the later name is in the checkpoint: load through it, the owner follows
            entries[owner] = Entry(owner, "tied", first.shape, first.dtype, note=f"tied to {name}")


def _settle_missing(draft: _Draft, view: TargetView, src: Source, ignore: _IgnoreRules) -> None:
    """Missing entries the module fills itself (``default``) or the ignore patterns expect (``ignored``)."""
    for name, e in draft.entries.items():
        if e.action != "init" or e.mismatched:
            continue
        if _norm_version_default(view, name, src, draft.source_module(name)):
            e.action, e.note = "default", "set to 0 by BatchNorm's loading hook (checkpoint predates it)"
        elif (p := _matches(ignore.missing, name, draft.prefix.to_source(name))) is not None:
            e.ignored, e.note = True, f"missing, ignored by pattern {p.pattern!r}"


def _norm_version_default(view: TargetView, key: str, source: Source, src_module: str | None) -> bool:
    """BatchNorm fills ``num_batches_tracked`` itself for checkpoints older than version 2."""
    from torch.nn.modules.batchnorm import _NormBase

    module_path, attr = split_key(key)
    if attr != "num_batches_tracked" or not isinstance(view.modules.get(module_path), _NormBase):
        return False
    version = source.module_metadata.get(src_module or "", {}).get("version") if src_module is not None else None
    return version is None or version < 2


def _unexpected(draft: _Draft, ignore: _IgnoreRules) -> list[str]:
    """Unused checkpoint keys, minus those the ignore patterns expect (recorded in ``ignored``)."""
    unexpected: list[str] = []
    for orig in draft.unused:
        p = _matches(ignore.unexpected, orig, draft.live.get(orig))
        if p is not None:
            draft.ignored[orig] = f"unused, ignored by pattern {p.pattern!r}"
        else:
            unexpected.append(orig)
    return unexpected


def _hand_over(draft: _Draft, view: TargetView, unexpected: list[str]) -> dict[str, str]:
    """Unused checkpoint keys under a module with loading code of its own go to it, as ``load_state_dict`` gives them.

    Such a module may rename or convert them by version (old child names, old ``spectral_norm``
    files); what it leaves unused is reported after the load, from torch's own unexpected list.
    Takes them out of ``unexpected``; returns checkpoint key -> its name on the model's side.
    """
    owners = sorted((p for p, m in view.modules.items() if runs_own_loading_code(m)), key=len, reverse=True)
    if not owners:
        return {}
    pfx = draft.prefix
    taken = set(view.entries) | set(view.nonpersistent)
    handed: dict[str, str] = {}
    by_owner: dict[str, list[str]] = defaultdict(list)
    for orig in unexpected:
        name = draft.live.get(orig, orig)
        if pfx.mode == "add":
            name = pfx.prefix + name
        elif pfx.mode == "strip":
            name = name.removeprefix(pfx.prefix)
        if name in taken:  # another key fills that entry: this one stays unexpected
            continue
        owner = next((p for p in owners if not p or name.startswith(p + ".")), None)
        if owner is not None:
            handed[orig] = name
            by_owner[owner].append(orig)
    unexpected[:] = [k for k in unexpected if k not in handed]
    for owner, keys in by_owner.items():
        module = view.modules[owner]
        fills = [n for n, e in draft.entries.items() if e.action == "init" and (not owner or n.startswith(owner + "."))]
        may_fill = f"; it may fill {', '.join(collapse_keys(fills)[:3])}" if fills else ""
        draft.notes.append(
            f"{len(keys)} checkpoint entries handed to the loading code of {type(module).__name__} "
            f"at {owner or '(root)'!r} ({', '.join(collapse_keys(keys)[:3])}), as load_state_dict does{may_fill}: "
            "what it fills and leaves unused is reported after the load"
        )
    return handed


def build_plan(model: nn.Module, view: TargetView, src: Source, options: PlanOptions | None = None) -> Plan:
    """:func:`plan` for callers that already hold the model's :class:`TargetView` and an open source.

    Raises:
        PlanError, AdapterError: as :func:`plan`.
    """
    options = options if options is not None else PlanOptions()
    if not isinstance(options.align, bool):
        raise PlanError(f"align must be True or False, not {options.align!r}")
    check_example_inputs(options.example_inputs, align=options.align)
    draft = _rename(model, view, src, options)
    ignore = _IgnoreRules.of(model, options)
    _claim(draft, view)
    _match(draft, view, src)
    _match_nonpersistent(draft, view, src, model)
    _transform(draft, view, src, options)
    if options.align:
        _align(draft, view, src, ignore, model, options)
    _tie(draft, view)
    _settle_missing(draft, view, src, ignore)
    draft.notes += src.plan_notes([k for k, e in draft.entries.items() if e.action == "init" and not e.mismatched])
    if options.adapt is not None:
        from .policy import apply_policy  # imports torch: only when adapting

        draft.notes += apply_policy(draft.entries, options.adapt, model=model, view=view, source=src)
    unexpected = _unexpected(draft, ignore)
    handed = _hand_over(draft, view, unexpected)
    if draft.prefix.mode == "add":
        draft.metadata_map.setdefault(draft.prefix.prefix[:-1], "")
    verdict = _verdict(draft, src, unexpected, model, aligned=options.align)
    return Plan(
        entries=draft.entries,
        unexpected=unexpected,
        ignored=draft.ignored,
        renamed=draft.renamed,
        rename_reasons=draft.renames.reasons,
        prefix=draft.prefix.to_dict(),
        metadata_map=draft.metadata_map,
        model=type(model).__name__,
        source=src.path or "state dict",
        source_format=src.format,
        container=src.container,
        model_fingerprint=view.fingerprint(),
        source_fingerprint=src.fingerprint(),
        notes=draft.notes,
        ambiguous=draft.ambiguous,
        verdict=verdict,
        handed=handed,
    )


def _verdict(draft: _Draft, src: Source, unexpected: list[str], model: nn.Module, *, aligned: bool) -> str:
    """One paragraph when the checkpoint does not belong to the model (most of neither side fits), else ``""``.

    The most likely reason, from names and shapes alone: a prefix guessed from a few names; the
    same shapes under other names (another naming scheme: ``align=True``); or another network.
    """
    counted = [e for e in draft.entries.values() if not e.ignored and e.action not in ("tied", "default")]
    fit = [e for e in counted if e.loads]
    n_model, n_ckpt = len(counted), len(fit) + len(unexpected)
    if not n_model or not n_ckpt or 2 * len(fit) >= n_model or 2 * len(fit) >= n_ckpt:
        return ""
    head = (
        f"The checkpoint {src.describe()} does not belong to {type(model).__name__}: only {len(fit)} of the model's "
        f"{n_model} entries and {len(fit)} of the checkpoint's {n_ckpt} entries fit."
    )
    declared = hf.base_model_prefix(model)
    missing_shapes = Counter(tuple(e.shape) for e in counted if e.action == "init")
    unused_shapes = Counter(tuple(src[k].shape) for k in unexpected if k in src)
    same_shapes = sum((missing_shapes & unused_shapes).values())
    if draft.prefix.mode and draft.prefix.prefix.rstrip(".") != declared:
        verb = "removing" if draft.prefix.mode == "strip" else "adding"
        why = (
            f"Most likely a coincidence: those names matched only after {verb} the prefix {draft.prefix.prefix!r}, "
            "guessed from a few names. Check that this is the model's checkpoint; to load them anyway, "
            f"pass prefix={draft.prefix.prefix.rstrip('.')!r}."
        )
    elif not aligned and 2 * same_shapes >= sum(missing_shapes.values()):
        why = (
            f"Most likely the same network under another naming scheme: {same_shapes} of the missing entries have "
            "a same-shaped unused entry in the checkpoint. Pass align=True (or rules=) to pair them."
        )
    else:
        why = (
            f"{FOREIGN}: few of the model's shapes occur in it. "
            "Check the model and the file; adapt= and rules= help only with a checkpoint of this network."
        )
    return f"{head} {why}"


# ---------------------------------------------------------------------------
# Alignment, applied to a plan in progress


def align_plan(
    view: TargetView,
    source: Source,
    entries: dict[str, Entry],
    unused: list[str],
    names: Mapping[str, str],
    *,
    renamed: dict[str, str],
    metadata_map: dict[str, str],
    skip: Callable[[str], bool] = lambda key: False,
    order: ExecutionOrder | None = None,
) -> list[dict[str, Any]]:
    """Align a plan in progress in place; return the ambiguous records.

    Model entries still ``init`` (not mismatched, not a tied alias) and checkpoint entries in
    ``unused`` (minus those ``skip`` says are ignorable) are aligned. Paired entries become
    ``copy`` (or a shape mismatch with their source set, for ``adapt=``) with ``aligned =
    {"confidence", "reason"}``; their sources leave ``unused`` and join ``renamed``. With
    ``order`` (a traced forward), the model's entries are aligned in execution order.

    Then layouts (:mod:`torchgraft.align.layouts`): a piece of a fused checkpoint tensor, and every
    pair (by name or by alignment) whose weight is stored transposed, becomes a ``transform`` entry
    (``Entry.transform``: ``split`` / ``transpose`` over the checkpoint entry) with ``aligned`` set;
    a square pair that could be transposed or not, with nothing to decide it, is left missing and
    reported ambiguous.
    """
    unused_set = {k for k in unused if not skip(k)}
    left_t = {k for k, e in entries.items() if e.action == "init" and not e.mismatched and k not in view.tied}
    ambiguous: list[dict[str, Any]] = []
    flipped: dict[str, bool] = {}
    taken: set[str] = set()
    if left_t and unused_set:
        anchors: dict[str, str] = {}
        for k, e in entries.items():
            if e.loads and e.source is not None and e.source in names:
                anchors.setdefault(split_key(k)[0], split_key(names[e.source])[0])
        model_keys = order.sort(view.entries) if order is not None else list(view.entries)
        result = align(
            ((k, view.entries[k].shape, view.entries[k].dtype, k in left_t) for k in model_keys),
            ((k, names[k], source[k].shape, source[k].dtype, k in unused_set) for k in source if k in names),
            source_ordered=source_order_trusted(source),
            anchors=anchors,
            model_order="execution" if order is not None else "registration",
        )
        for p in result.pairs:
            e, ref = entries[p.target], source[p.source]
            e.source, e.source_shape, e.source_dtype = p.source, ref.shape, ref.dtype
            e.action, e.mismatched = ("copy", False) if p.exact else ("init", True)
            e.aligned = {"confidence": p.confidence, "reason": p.reason}
            e.note = f"aligned ({p.confidence:.2f}): {p.reason}"
            if p.layout is not None:
                _set_transform(e, source, p.layout)
                if len(e.shape) == 2:  # evidence for the square weights next to it
                    flipped[p.target] = p.layout.transpose
            for key in (p.source, *(p.layout.join if p.layout is not None else ())):
                if key not in taken:  # a fused tensor is renamed to its first piece
                    renamed[key] = p.target
                taken.add(key)
            metadata_map.setdefault(split_key(p.target)[0], split_key(p.source)[0])
        ambiguous += result.ambiguous
    unused[:] = [k for k in unused if k not in taken]
    foreign = {k for k, e in entries.items() if e.aligned}  # paired by structure, across naming schemes
    ambiguous += _orient(view, source, entries, flipped, unused, renamed, foreign=foreign)
    return ambiguous


def _set_transform(e: Entry, source: Source, layout: Layout) -> None:
    """Make ``e`` a ``transform`` entry: its source through ``layout`` (a transpose, a split piece, a concat)."""

    def leaf(key: str) -> Expr:
        return Expr(source=key, shape=tuple(source[key].shape), dtype=source[key].dtype)

    expr = leaf(e.source)
    if layout.join:
        expr = tg_transforms.concat(expr, *(leaf(k) for k in layout.join), dim=0)
    if layout.transpose:
        expr = tg_transforms.transpose(expr)
    if layout.sizes is not None:
        expr = tg_transforms.split(expr, dim=0, sizes=list(layout.sizes), index=layout.index)
    shape = infer_shape(expr)
    if shape != tuple(e.shape):  # the aligner proposed it from these shapes: a bug, never a silent load
        raise PlanError(f"alignment proposed {expr} for {e.target!r}: it gives {list(shape)}, not {list(e.shape)}")
    e.action, e.mismatched, e.transform = "transform", False, expr.to_dict()


def _orient(
    view: TargetView,
    source: Source,
    entries: dict[str, Entry],
    flipped: dict[str, bool],
    unused: list[str],
    renamed: dict[str, str],
    *,
    foreign: set[str],
) -> list[dict[str, Any]]:
    """Transpose the pairs whose weights are stored the other way round; square ones by evidence only.

    ``foreign``: the targets alignment paired across naming schemes (see :func:`.layouts.orient`).
    """
    pairs = [
        (k, e.source, tuple(e.shape), tuple(e.source_shape))
        for k, e in entries.items()
        if e.source is not None
        and e.source_shape is not None
        and (e.action == "copy" or (e.mismatched and e.action == "init"))
        and not e.note.startswith("rule ")  # the caller's tg.source(...) rule: decided, as it is
        and len(e.shape) == 2
        and _floating(e.dtype)
        and _floating(e.source_dtype or "")
    ]
    if not pairs:
        return []
    types = {path: f"{type(m).__module__}.{type(m).__qualname__}" for path, m in view.modules.items()}
    found = orient(pairs, module_types=types, flipped=flipped, foreign=foreign)
    for k, (confidence, reason) in found.transposed.items():
        e = entries[k]
        if e.aligned:
            confidence = min(confidence, e.aligned["confidence"])
            reason = f"{e.aligned['reason']}; {reason}"
        e.aligned = {"confidence": round(confidence, 2), "reason": reason}
        _set_transform(e, source, Layout(transpose=True))
        e.note = f"aligned ({confidence:.2f}): {reason}"
    for record in found.ambiguous:
        e = entries[record["targets"][0]]
        record["reason"] += (
            f"; decide with rules={{{e.target!r}: tg.transpose({e.source!r})}}, "
            f"or tg.transforms.source({e.source!r}) for as it is"
        )
        src = e.source
        e.action, e.source, e.source_shape, e.source_dtype, e.aligned = "init", None, None, None, None
        e.note = ""
        if src is not None and src not in unused:
            unused.append(src)
        if src is not None and renamed.get(src) == e.target:
            del renamed[src]
    return found.ambiguous


def _floating(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))
