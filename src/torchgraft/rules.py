"""Key renames as data: ordered tables of templates and regexes, applied by one function.

User rules come first and always apply. Built-in rules (legacy names, wrapper prefixes,
weight-norm layouts) are careful: they never rename a key the model already expects, so a
LayerScale ``ls1.gamma`` or a ``beta_proj`` Linear stays as it is (transformers bug #29554).

Templates (torchtune style): ``"layers.{}.attn.q.weight": "blocks.{}.q.weight"``, where ``{}``
stands for a layer number, ``None`` drops the key, and a template that names a module path
(``"backbone": "features"``) renames everything under it. Regex rules are
``re.Pattern -> replacement`` pairs (``re.compile(r"^enc\\.(\\d+)\\.")``: ``r"encoder.\\1."``).

:func:`select_layers` builds the rules for a shallower model from chosen checkpoint layers.

Example:
    >>> rules = compile_rules({"old.{}.fc": "new.{}.proj", "aux_head": None})
    >>> apply_rules(["old.3.fc.weight", "aux_head.bias"], rules).mapping
    {'old.3.fc.weight': 'new.3.proj.weight', 'aux_head.bias': None}
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .errors import AdapterError
from .keys import natural_key, split_key

if TYPE_CHECKING:
    from .plan import Plan

__all__ = [
    "BUILTIN_RULES",
    "RenameResult",
    "Rule",
    "RuleSpec",
    "apply_rules",
    "compile_rules",
    "export_rules",
    "export_transform_rules",
    "invert_rules",
    "plan_rules",
    "select_layers",
    "suffix_matcher",
]


@dataclass(frozen=True)
class Rule:
    """One rename: ``pattern`` is searched in a key and replaced (``None`` drops the key).

    ``builtin`` rules never rename a key the model expects as it is; ``needs_target``
    rules apply only when the renamed key is one the model expects.
    """

    name: str
    pattern: re.Pattern[str]
    replacement: str | None
    builtin: bool = False
    needs_target: bool = False
    repeat: bool = False
    #: substrings one of which every key the pattern matches contains (a cheap first test)
    hints: tuple[str, ...] = ()

    def apply(self, key: str) -> str | None:
        if self.replacement is None:
            return None
        return self.pattern.sub(self.replacement, key, count=0 if self.repeat else 1)


_NORM = r"(?:[A-Za-z_]*[Nn]orm[A-Za-z0-9_]*|ln(?:_?[A-Za-z0-9]+)?|LayerNorm[A-Za-z0-9_]*)"

#: Rules every load applies (after the user's), in order.
BUILTIN_RULES: tuple[Rule, ...] = (
    Rule("wrapper prefix", re.compile(r"(?:^|(?<=\.))(?:module|_orig_mod)\."), "", builtin=True, repeat=True, hints=("module.", "_orig_mod.")),
    Rule("legacy LayerNorm.gamma", re.compile(rf"(^|\.)({_NORM})\.gamma$"), r"\1\2.weight", builtin=True, hints=(".gamma",)),
    Rule("legacy LayerNorm.beta", re.compile(rf"(^|\.)({_NORM})\.beta$"), r"\1\2.bias", builtin=True, hints=(".beta",)),
    Rule("weight_norm g -> parametrizations", re.compile(r"(^|\.)weight_g$"), r"\1parametrizations.weight.original0", builtin=True, needs_target=True, hints=("weight_g",)),
    Rule("weight_norm v -> parametrizations", re.compile(r"(^|\.)weight_v$"), r"\1parametrizations.weight.original1", builtin=True, needs_target=True, hints=("weight_v",)),
    Rule("parametrizations -> weight_norm g", re.compile(r"(^|\.)parametrizations\.weight\.original0$"), r"\1weight_g", builtin=True, needs_target=True, hints=("parametrizations.",)),
    Rule("parametrizations -> weight_norm v", re.compile(r"(^|\.)parametrizations\.weight\.original1$"), r"\1weight_v", builtin=True, needs_target=True, hints=("parametrizations.",)),
)  # fmt: skip

RuleSpec = Mapping["str | re.Pattern[str]", "str | None"] | Sequence[tuple["str | re.Pattern[str]", "str | None"]]


def _template_rule(template: str, replacement: str | None) -> Rule:
    if template.count("{}") == 0:
        pattern = re.escape(template)
    else:
        pattern = r"(\d+)".join(re.escape(part) for part in template.split("{}"))
    # whole key, or a module path prefix that ends at a dot
    regex = re.compile(rf"^{pattern}(?=\.|$)")
    repl = None
    if replacement is not None:
        n = template.count("{}")
        if replacement.count("{}") != n:
            raise ValueError(
                f"rule {template!r} -> {replacement!r}: both sides need the same number of '{{}}' placeholders"
            )
        parts = replacement.replace("\\", "\\\\").split("{}")
        repl = parts[0] + "".join(rf"\g<{i + 1}>" + p for i, p in enumerate(parts[1:]))
    return Rule(f"{template} -> {replacement}", regex, repl)


def compile_rules(spec: RuleSpec | None) -> list[Rule]:
    """Turn a user table into rules, in order. Strings are templates, ``re.Pattern`` keys regexes."""
    if spec is None:
        return []
    items = spec.items() if isinstance(spec, Mapping) else spec
    rules: list[Rule] = []
    for src, dst in items:
        if isinstance(src, re.Pattern):
            rules.append(Rule(f"/{src.pattern}/ -> {dst}", src, dst))
        elif isinstance(src, str):
            rules.append(_template_rule(src, dst))
        else:
            raise TypeError(f"rule keys must be str templates or re.Pattern, got {type(src).__name__}: {src!r}")
        if dst is not None and not isinstance(dst, str):
            raise TypeError(f"rule {src!r}: the replacement must be a string or None, got {type(dst).__name__}")
    return rules


def invert_rules(spec: Mapping[str, str | None]) -> dict[str, str]:
    """The reverse direction of a template table (drops are left out)."""
    inverted: dict[str, str] = {}
    for src, dst in spec.items():
        if dst is None:
            continue
        if dst in inverted:
            raise ValueError(f"cannot invert: {inverted[dst]!r} and {src!r} both map to {dst!r}")
        inverted[dst] = src
    return inverted


def suffix_matcher(expected: Iterable[str]) -> Callable[[str], bool]:
    """A predicate: is ``key`` expected, up to a leading module prefix on either side?

    ``embeddings.x`` matches an expected ``bert.embeddings.x`` and ``bert.embeddings.x``
    matches an expected ``embeddings.x``. Used by built-in rules before the base-model
    prefix is resolved.
    """
    exact = set(expected)
    suffixes: set[str] = set()  # built on the first call: most loads never ask

    def is_expected(key: str) -> bool:
        if not suffixes:
            suffixes.update(".".join(parts[i:]) for k in exact for parts in [k.split(".")] for i in range(len(parts)))
        if key in suffixes:
            return True
        parts = key.split(".")
        return any(".".join(parts[i:]) in exact for i in range(1, len(parts)))

    return is_expected


@dataclass
class RenameResult:
    """What the rules did: ``mapping`` original -> new name (``None`` = dropped), and why."""

    mapping: dict[str, str | None]
    reasons: dict[str, list[str]] = field(default_factory=dict)

    @property
    def renamed(self) -> dict[str, str]:
        return {k: v for k, v in self.mapping.items() if v is not None and v != k}

    @property
    def dropped(self) -> list[str]:
        return [k for k, v in self.mapping.items() if v is None]


def apply_rules(
    keys: Iterable[str],
    rules: Sequence[Rule] = (),
    *,
    builtin: bool = True,
    is_expected: Callable[[str], bool] | None = None,
) -> RenameResult:
    """Rename every key: the user's ``rules`` in order, then :data:`BUILTIN_RULES`.

    Args:
        keys: source names.
        rules: compiled user rules (:func:`compile_rules`); each applies at most once per key.
        builtin: also apply :data:`BUILTIN_RULES`.
        is_expected: tells which names the target model expects (see :func:`suffix_matcher`);
            without it built-in rules apply wherever their pattern matches, except those
            that need a target.
    """
    result = RenameResult(mapping={})
    for original in keys:
        applied: list[str] = []
        key = _apply(rules, original, applied, is_expected)
        # most keys match no built-in rule: substring tests rule them out before any regex runs
        if builtin and key is not None and any(h in key for h in _BUILTIN_HINTS):
            key = _apply(BUILTIN_RULES, key, applied, is_expected)
        result.mapping[original] = key
        if applied:
            result.reasons[original] = applied
    return result


_BUILTIN_HINTS = tuple(dict.fromkeys(h for rule in BUILTIN_RULES for h in rule.hints))


def _apply(
    table: Sequence[Rule], key: str | None, applied: list[str], is_expected: Callable[[str], bool] | None
) -> str | None:
    for rule in table:
        if key is None:
            break
        if not rule.pattern.search(key):
            continue
        if rule.builtin and is_expected is not None and is_expected(key):
            continue
        new = rule.apply(key)
        if rule.needs_target and (is_expected is None or new is None or not is_expected(new)):
            continue
        if new != key:
            applied.append(rule.name)
            key = new
    return key


# ---------------------------------------------------------------------------
# depth: layer selection as rename rules


def select_layers(
    layers: Mapping[int, int] | Sequence[int] | Literal["every_other"],
    *,
    template: str,
    num_layers: int | None = None,
    source_layers: int | None = None,
) -> list[tuple[re.Pattern[str], str | None]]:
    """Rename rules that build a shallower (or reordered) model from chosen checkpoint layers.

    A 6-layer student taking layers 0, 2, 4, ... of a 12-layer checkpoint is a rename: the
    checkpoint's ``encoder.layer.2.*`` becomes the model's ``encoder.layer.1.*``. The rules
    returned here do that and drop every checkpoint layer that is not selected (reported as
    ``ignored: dropped by a rule``, not as unexpected). Pass them as ``rules=`` to
    :func:`torchgraft.plan` / :func:`torchgraft.load`, alone or followed by your own rules.

    Args:
        layers: which checkpoint layer each model layer takes: ``{0: 0, 1: 2, 2: 4}`` (model
            layer -> checkpoint layer), the list ``[0, 2, 4]`` (the same), or ``"every_other"``
            (model layer ``i`` takes checkpoint layer ``2 * i``; needs ``num_layers``).
        template: the checkpoint's layer path with ``{}`` for the number, e.g.
            ``"encoder.layer.{}"`` or ``"model.layers.{}"``. It also matches after a leading
            prefix (``bert.encoder.layer.3.*``).
        num_layers: the model's number of layers (for ``"every_other"``).
        source_layers: the checkpoint's number of layers, to check the selection against.

    Returns:
        Ordered ``(re.Pattern, replacement)`` rules (``None`` = drop), a valid ``rules=`` value.

    Raises:
        AdapterError: the template has no single ``{}``, a layer number is negative or beyond
            ``source_layers``, one checkpoint layer is selected twice (a rename feeds one model
            layer), the selection swaps layers in a cycle, or ``"every_other"`` lacks ``num_layers``.

    Example:
        >>> rules = select_layers({0: 0, 1: 2, 2: 4}, template="encoder.layer.{}")
        >>> report = tg.load(student, "all-MiniLM-L6-v2/", rules=rules)   # 3-layer BERT
        >>> report.renamed["encoder.layer.2.output.dense.weight"]
        'encoder.layer.1.output.dense.weight'
    """
    name = "select_layers"
    if not isinstance(template, str) or template.count("{}") != 1:
        raise AdapterError(
            f"{name}: template must contain exactly one '{{}}' for the layer number, e.g. 'encoder.layer.{{}}'; got {template!r}"
        )
    mapping = _layer_mapping(layers, num_layers)
    for tgt, src in mapping.items():
        for value, what in ((tgt, "model layer"), (src, "checkpoint layer")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise AdapterError(f"{name}: {what} numbers must be ints >= 0, got {value!r}")
        if source_layers is not None and src >= source_layers:
            raise AdapterError(
                f"{name}: model layer {tgt} takes checkpoint layer {src}, but the checkpoint has layers 0..{source_layers - 1}"
            )
    seen: dict[int, int] = {}
    for tgt, src in mapping.items():
        if src in seen:
            raise AdapterError(
                f"{name}: checkpoint layer {src} is selected for model layers {seen[src]} and {tgt}; a rename feeds one "
                "model layer. Copy the layer after loading, or load twice with different rules"
            )
        seen[src] = tgt

    head, tail = template.split("{}")
    lead = r"(?:^|(?<=\.))" + re.escape(head)

    def pattern(number: str) -> re.Pattern[str]:
        return re.compile(lead + number + re.escape(tail) + r"(?=\.|$)")

    rules: list[tuple[re.Pattern[str], str | None]] = []
    selected = "|".join(str(s) for s in sorted(mapping.values()))
    # 1) drop every checkpoint layer that is not selected (any number, before any rename)
    rules.append((pattern(rf"(?!(?:{selected})(?:\D|$))\d+" if selected else r"\d+"), None))
    # 2) renames, ordered so that no renamed key meets a later rule: a rename s -> t must come
    #    after the rule that consumes the checkpoint's own layer t.
    moves = {src: tgt for tgt, src in mapping.items() if src != tgt}
    done: set[int] = set()
    order: list[int] = []
    while len(order) < len(moves):
        ready = [s for s in sorted(moves) if s not in done and (moves[s] not in moves or moves[s] in done)]
        if not ready:
            cycle = sorted(s for s in moves if s not in done)
            raise AdapterError(
                f"{name}: checkpoint layers {cycle} swap places in a cycle; renames cannot express a permutation. "
                "Load with the layers in order and permute the modules afterwards"
            )
        for s in ready:
            done.add(s)
            order.append(s)
    for s in order:
        rules.append((pattern(str(s)), f"{head}{moves[s]}{tail}"))
    return rules


def _layer_mapping(layers: Any, num_layers: int | None) -> dict[int, int]:
    name = "select_layers"
    if isinstance(layers, str):
        if layers != "every_other":
            raise AdapterError(
                f"{name}: unknown selection {layers!r}; use 'every_other', a list or a {{model: checkpoint}} dict"
            )
        if num_layers is None:
            raise AdapterError(f"{name}: 'every_other' needs num_layers= (the model's number of layers)")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise AdapterError(f"{name}: num_layers must be a positive int, got {num_layers!r}")
        return {i: 2 * i for i in range(num_layers)}
    if isinstance(layers, Mapping):
        return dict(layers)
    if isinstance(layers, Sequence):
        return dict(enumerate(layers))
    raise AdapterError(f"{name}: layers must be a {{model: checkpoint}} dict, a list or 'every_other', got {layers!r}")


# ---------------------------------------------------------------------------
# Exporting pairs (from ``align=True``) as a rules table


def _numbers(path: str) -> list[str]:
    return [p for p in path.split(".") if p.isdigit()]


def _template(path: str) -> str:
    return ".".join("{}" if p.isdigit() else p for p in path.split("."))


def _table_mapping(table: Mapping[str, str], keys: Iterable[str]) -> dict[str, str | None]:
    """What ``table`` (user rules only, no built-ins) renames each of ``keys`` to."""
    return apply_rules(keys, compile_rules(table), builtin=False).mapping


def export_rules(
    pairs: Mapping[str, str],
    all_keys: Iterable[str],
    *,
    loaded_by_name: Iterable[str] = (),
    targets: Iterable[str] = (),
) -> dict[str, str]:
    """A rules table that maps each checkpoint key in ``pairs`` to its model key.

    Module-level templates (``"encoder.layer.{}.attention.self.query": "blocks.{}.attn.q"``)
    where every instance agrees, module-level literals otherwise, full keys as a last resort.
    The table is checked: it must give every pair, and leave the keys matched by name alone.

    Example:
        >>> export_rules({"enc.0.q.weight": "blocks.0.attn.q.weight", "enc.1.q.weight": "blocks.1.attn.q.weight"},
        ...              ["enc.0.q.weight", "enc.1.q.weight"])
        {'enc.{}.q': 'blocks.{}.attn.q'}
    """
    all_keys = list(dict.fromkeys(all_keys))
    keep = set(loaded_by_name)
    target_names = set(targets)

    def works(table: dict[str, str]) -> bool:
        got = _table_mapping(table, all_keys)
        for k in all_keys:
            if k in pairs:
                if got.get(k) != pairs[k]:
                    return False
            elif got.get(k) != k and (k in keep or got.get(k) in target_names):
                return False
        return True

    by_module: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for s, t in pairs.items():
        by_module[split_key(s)[0], split_key(t)[0]].append((s, t))
    modules: dict[str, str] = {}
    entry_level: dict[str, str] = {}
    seen_src: dict[str, str] = {}
    for (sm, tm), members in by_module.items():
        if (
            sm
            and tm
            and all(split_key(s)[1] == split_key(t)[1] for s, t in members)
            and seen_src.setdefault(sm, tm) == tm
        ):
            modules[sm] = tm
        else:
            entry_level.update(members)
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for sm, tm in modules.items():
        groups[_template(sm)].append((sm, tm))
    templated: dict[str, str] = {}
    for tmpl, members in groups.items():
        t_tmpls = {_template(tm) for _, tm in members}
        if "{}" in tmpl and len(t_tmpls) == 1 and all(_numbers(sm) == _numbers(tm) for sm, tm in members):
            templated[tmpl] = t_tmpls.pop()
        else:
            templated.update(dict(members))

    def ordered(table: dict[str, str]) -> dict[str, str]:
        return dict(sorted(table.items(), key=lambda kv: natural_key(kv[0])))

    for table in (ordered({**templated, **entry_level}), ordered({**modules, **entry_level}), ordered(dict(pairs))):
        if works(table):
            return table
    return ordered(dict(pairs))


def plan_rules(plan: Plan) -> dict[str, Any]:
    """``plan.aligned_rules()``: the aligned pairs of ``plan`` as a rules table (see :func:`export_rules`).

    Pairs that alignment made with a transform (a transpose, a piece of a fused tensor) are rules
    keyed by the model's template whose value is the transform over checkpoint templates
    (:func:`export_transform_rules`); the others are renames.
    """
    transformed = {k: e.transform for k, e in plan.entries.items() if e.aligned and e.transform is not None}
    pairs = {e.source: k for k, e in plan.entries.items() if e.aligned and e.source and e.transform is None}
    table: dict[str, Any] = {}
    if pairs:
        keys = [e.source for e in plan.entries.values() if e.source] + list(plan.unexpected) + list(plan.ignored)
        by_name = [s for k, e in plan.entries.items() if k not in pairs.values() for s in e.sources]
        table.update(export_rules(pairs, keys, loaded_by_name=by_name, targets=plan.entries))
    table.update(export_transform_rules(transformed, targets=plan.entries))
    return table


def export_transform_rules(
    transforms: Mapping[str, Mapping[str, Any]], *, targets: Iterable[str] | None = None
) -> dict[str, Any]:
    """Transform rules (model template -> :class:`~torchgraft.transforms.Expr`) for model entries and their trees.

    A model key's layer numbers become ``{}`` where every entry of that template has the same
    transform with the same numbers in its checkpoint names (filled in order, as ``rules=`` fills
    them) and, when ``targets`` (every model entry) is given, the template matches no other model
    entry; otherwise the entries are exported one by one, literally.

    Example:
        >>> from torchgraft.transforms import transpose, source
        >>> trees = {f"h.{i}.fc.weight": transpose(source(f"h.{i}.c_fc.weight")).to_dict() for i in (0, 1)}
        >>> {k: str(v) for k, v in export_transform_rules(trees).items()}
        {'h.{}.fc.weight': 'transpose(h.{}.c_fc.weight)'}
    """
    from .transforms import Expr

    def bare(leaf: Expr) -> Expr:
        return Expr(source=leaf.source)

    literal = {k: Expr.from_dict(tree).map_sources(bare) for k, tree in transforms.items()}
    groups: dict[str, list[tuple[str, Expr | None]]] = defaultdict(list)
    for key, expr in literal.items():
        numbers = _numbers(key)

        def templated(leaf: Expr, numbers: list[str] = numbers) -> Expr:
            assert leaf.source is not None
            own = _numbers(leaf.source)
            if own != numbers[: len(own)] or "{" in leaf.source or "}" in leaf.source:
                raise ValueError(leaf.source)
            return Expr(source=_template(leaf.source))

        try:
            groups[_template(key)].append((key, expr.map_sources(templated)))
        except ValueError:
            groups[_template(key)].append((key, None))
    all_targets = None if targets is None else list(targets)

    def covers(template: str, members: list[tuple[str, Expr | None]]) -> bool:
        if all_targets is None:
            return True
        regex = re.compile(r"(\d+)".join(re.escape(part) for part in template.split("{}")))
        return {t for t in all_targets if regex.fullmatch(t)} == {k for k, _ in members}

    out: dict[str, Any] = {}
    for template, members in groups.items():
        shapes = {str(e) if e is not None else None for _, e in members}
        if "{}" in template and len(shapes) == 1 and None not in shapes and covers(template, members):
            out[template] = members[0][1]
        else:
            out.update((key, literal[key]) for key, _ in members)
    return dict(sorted(out.items(), key=lambda kv: natural_key(kv[0])))
