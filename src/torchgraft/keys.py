"""Small helpers on dotted key names: module paths, natural order, collapsing repeated layers."""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from json.encoder import encode_basestring_ascii as _json_string  # what json.dumps uses for str

__all__ = ["collapse_groups", "collapse_keys", "format_ranges", "layout_fingerprint", "natural_key", "split_key"]

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
