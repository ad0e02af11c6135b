"""Small helpers on dotted key names: module paths, natural order, collapsing repeated layers."""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal
from json.encoder import encode_basestring_ascii as _json_string  # what json.dumps uses for str

__all__ = [
    "Prefix",
    "collapse_groups",
    "collapse_keys",
    "format_ranges",
    "grouped_keys",
    "layout_fingerprint",
    "natural_key",
    "prefix_gains",
    "resolve_prefix",
    "split_key",
]

_NUM = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")


def split_key(key: str) -> tuple[str, str]:
    """``"encoder.layer.0.dense.weight"`` -> ``("encoder.layer.0.dense", "weight")``."""
    module, _, attr = key.rpartition(".")
    return module, attr


def layout_fingerprint(rows: Iterable[tuple[str, Sequence[int]] | tuple[str, Sequence[int], str]]) -> str:
    """16 hex digits of SHA-256 over ``(name, shape[, dtype])`` rows, each hashed as ``json.dumps([...])``.

    Plans store these to refuse a stale plan. The bytes are built directly (the same as
    ``json.dumps`` writes, so saved plans stay valid) because one ``json.dumps`` per tensor
    cost a millisecond per load.

        >>> layout_fingerprint([("w", (2, 3), "float32")]) == layout_fingerprint([("w", [2, 3], "float32")])
        True
    """
    parts = []
    for name, shape, *rest in rows:
        fields = [_json_string(name), "[" + ", ".join(str(int(d)) for d in shape) + "]"]
        fields += [_json_string(r) for r in rest]
        parts.append("[" + ", ".join(fields) + "]")
    return hashlib.sha256("".join(parts).encode()).hexdigest()[:16]


def natural_key(key: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that puts ``layer.2`` before ``layer.10``."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in key.split("."))


def format_ranges(numbers: Iterable[int]) -> str:
    """``[0, 1, 2, 3, 5, 7, 8]`` -> ``"0..3,5,7..8"``."""
    nums = sorted(set(numbers))
    runs: list[str] = []
    start = prev = None
    for n in nums + [None]:  # type: ignore[list-item]
        if start is None:
            start = prev = n
        elif n is not None and n == prev + 1:
            prev = n
        else:
            runs.append(f"{start}" if start == prev else f"{start}..{prev}")
            start = prev = n
    return ",".join(runs)


def collapse_keys(keys: Iterable[str]) -> list[str]:
    """Group keys for humans: repeated layers become ``{0..11}``, sibling leaves ``{weight,bias}``.

    Only collapses when the group is exactly the full product, so no key is invented:
    ``encoder.layer.{0..5}.output.dense.{weight,bias}`` means all 12 of those keys.

    Example:
        >>> collapse_keys(["a.0.w", "a.1.w", "a.0.b", "a.1.b", "c"])
        ['a.{0..1}.{b,w}', 'c']
    """
    return [label for label, _ in collapse_groups(keys)]


def collapse_groups(keys: Iterable[str]) -> list[tuple[str, list[str]]]:
    """Like :func:`collapse_keys`, with the keys each label stands for."""
    keys = list(dict.fromkeys(keys))
    # 1) leaves of the same module: module.{weight,bias}
    by_module: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        by_module[split_key(k)[0]].append(k)
    step1: list[tuple[str, list[str]]] = []
    for module, members in by_module.items():
        attrs = [split_key(k)[1] for k in members]
        leaf = attrs[0] if len(attrs) == 1 else "{" + ",".join(sorted(attrs)) + "}"
        step1.append((f"{module}.{leaf}" if module else leaf, members))
    # 2) numbered copies: replace every number by a slot, collapse when the product is complete
    groups: dict[str, list[tuple[tuple[int, ...], list[str]]]] = defaultdict(list)
    for label, members in step1:
        nums = tuple(int(m.group()) for m in _NUM.finditer(label))
        groups[_NUM.sub("#", label)].append((nums, members))
    out: list[tuple[str, list[str]]] = []
    for template, rows in groups.items():
        if len(rows) == 1 or not rows[0][0]:
            out.extend((_fill(template, [str(n) for n in r]), m) for r, m in rows)
            continue
        columns = [sorted({r[i] for r, _ in rows}) for i in range(len(rows[0][0]))]
        size = 1
        for c in columns:
            size *= len(c)
        if size == len(rows):
            slots = [str(c[0]) if len(c) == 1 else "{" + format_ranges(c) + "}" for c in columns]
            out.append((_fill(template, slots), [k for _, m in rows for k in m]))
            continue
        # incomplete product: collapse only the last number
        sub: dict[tuple[int, ...], list[tuple[int, list[str]]]] = defaultdict(list)
        for r, m in rows:
            sub[r[:-1]].append((r[-1], m))
        for head, lasts in sub.items():
            last = str(lasts[0][0]) if len(lasts) == 1 else "{" + format_ranges(n for n, _ in lasts) + "}"
            out.append((_fill(template, [str(n) for n in head] + [last]), [k for _, m in lasts for k in m]))
    return sorted(out, key=lambda g: natural_key(g[0]))


def _fill(template: str, values: list[str]) -> str:
    it = iter(values)
    return re.sub("#", lambda _m: next(it), template)


def prefix_gains(source: set[str], target: set[str], *, max_depth: int = 2) -> Counter[tuple[str, str]]:
    """How many names would match if a leading module path were added or removed.

    Returns counts keyed by ``("add", "p.")`` (a target name is ``p.`` + a source name) and
    ``("strip", "p.")`` (a source name is ``p.`` + a target name), for prefixes of up to
    ``max_depth`` components.

    Example:
        >>> prefix_gains({"embeddings.w", "encoder.w"}, {"bert.embeddings.w", "bert.encoder.w"})
        Counter({('add', 'bert.'): 2})
    """
    gains: Counter[tuple[str, str]] = Counter()
    for depth in range(1, max_depth + 1):
        for t in target:
            parts = t.split(".", depth)
            if len(parts) > depth and parts[depth] in source:
                gains["add", ".".join(parts[:depth]) + "."] += 1
        for s in source:
            parts = s.split(".", depth)
            if len(parts) > depth and parts[depth] in target:
                gains["strip", ".".join(parts[:depth]) + "."] += 1
    return gains


@dataclass(frozen=True)
class Prefix:
    """A base-model prefix (``"bert."``, with its dot) that target names add to source names, or strip from them.

    ``mode``: ``"add"`` (a target name is ``prefix`` + a source name: a base checkpoint into a
    model with a head), ``"strip"`` (a source name is ``prefix`` + a target name: the other
    way round), ``""`` (no prefix).

    Example:
        >>> p = Prefix("add", "bert.")
        >>> p.to_target("encoder.w", {"bert.encoder.w"}), p.to_source("bert.encoder.w")
        ('bert.encoder.w', 'encoder.w')
    """

    mode: Literal["", "add", "strip"] = ""
    prefix: str = ""

    def to_target(self, key: str, expected: Collection[str]) -> str:
        """``key`` as the target names it: changed only when that gives a name in ``expected``."""
        if key in expected or not self.mode:
            return key
        if self.mode == "add" and self.prefix + key in expected:
            return self.prefix + key
        if self.mode == "strip" and key.startswith(self.prefix) and key[len(self.prefix) :] in expected:
            return key[len(self.prefix) :]
        return key

    def to_source(self, target: str) -> str:
        """The source-side spelling of a target name (the other direction of :meth:`to_target`)."""
        if self.mode == "add" and target.startswith(self.prefix):
            return target[len(self.prefix) :]
        if self.mode == "strip":
            return self.prefix + target
        return target

    def to_dict(self) -> dict[str, str]:
        """``{"mode", "prefix"}``, or ``{}`` for no prefix (as plans store it)."""
        return {"mode": self.mode, "prefix": self.prefix} if self.mode else {}


def resolve_prefix(
    source: set[str], target: set[str], *, option: str | None = None, declared: str | None = None
) -> Prefix:
    """The prefix handling that matches the most names, like ``from_pretrained``'s add/remove prefix.

    The one rename-by-prefix guess, used by :func:`torchgraft.plan` (source = checkpoint names
    after rules, target = the model's) and :func:`torchgraft.diff` (A's and B's names).

    Args:
        source, target: the two name sets; only ``source - target`` is looked at.
        option: ``None`` = automatic: ``declared``, or a prefix that explains two or more
            names, or every unmatched name; ``""`` = no prefix; anything else = that prefix only.
        declared: the model's own ``base_model_prefix`` (without the dot), preferred on ties.

    Example:
        >>> resolve_prefix({"embeddings.w", "encoder.w"}, {"bert.embeddings.w", "bert.encoder.w", "head.w"})
        Prefix(mode='add', prefix='bert.')
    """
    if option == "":
        return Prefix()
    unmatched = source - target
    gains = prefix_gains(unmatched, target)
    if option is not None:
        want = option.rstrip(".") + "."
        gains = Counter({k: v for k, v in gains.items() if k[1] == want})
    else:  # inferred: the declared base_model_prefix, or a prefix that explains more than one coincidence
        declared_prefix = f"{declared}." if declared else None
        gains = Counter({k: v for k, v in gains.items() if k[1] == declared_prefix or v >= 2 or v == len(unmatched)})
    if not gains:
        return Prefix()
    preferred = (declared or "") + "."
    (mode, prefix), _n = max(gains.items(), key=lambda kv: (kv[1], kv[0][1] == preferred, -len(kv[0][1])))
    return Prefix(mode, prefix)  # type: ignore[arg-type]


def grouped_keys(keys: list[str], limit: int = 8) -> str:
    """Keys as collapsed groups on one line, at most ``limit`` groups (``"a.{0..5}.w, b, ... (3 more groups)"``).

    Example:
        >>> grouped_keys(["l.0.w", "l.1.w", "head"])
        'l.{0..1}.w, head'
    """
    groups = collapse_keys(keys)
    more = f", ... ({len(groups) - limit} more groups)" if len(groups) > limit else ""
    return ", ".join(groups[:limit]) + more
