"""Small helpers on dotted key names: module paths, natural order, collapsing repeated layers."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

__all__ = ["split_key", "natural_key", "collapse_keys", "format_ranges"]

_NUM = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")


def split_key(key: str) -> tuple[str, str]:
    """``"encoder.layer.0.dense.weight"`` -> ``("encoder.layer.0.dense", "weight")``."""
    module, _, attr = key.rpartition(".")
    return module, attr


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
    keys = list(dict.fromkeys(keys))
    # 1) leaves of the same module: module.{weight,bias}
    by_module: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        module, attr = split_key(k)
        by_module[module].append(attr)
    step1: list[str] = []
    for module, attrs in by_module.items():
        leaf = attrs[0] if len(attrs) == 1 else "{" + ",".join(sorted(attrs)) + "}"
        step1.append(f"{module}.{leaf}" if module else leaf)
    # 2) numbered copies: replace every number by a slot, collapse when the product is complete
    groups: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    for k in step1:
        nums = tuple(int(m.group()) for m in _NUM.finditer(k))
        groups[_NUM.sub("#", k)].append(nums)
    out: list[tuple[str, str]] = []
    for template, rows in groups.items():
        if len(rows) == 1 or not rows[0]:
            for r in rows:
                out.append((_fill(template, [str(n) for n in r]), ""))
            continue
        columns = [sorted({r[i] for r in rows}) for i in range(len(rows[0]))]
        size = 1
        for c in columns:
            size *= len(c)
        if size == len(rows):
            slots = [str(c[0]) if len(c) == 1 else "{" + format_ranges(c) + "}" for c in columns]
            out.append((_fill(template, slots), ""))
        else:  # incomplete product: collapse only the last number
            sub: dict[tuple[int, ...], list[int]] = defaultdict(list)
            for r in rows:
                sub[r[:-1]].append(r[-1])
            for head, lasts in sub.items():
                last = str(lasts[0]) if len(lasts) == 1 else "{" + format_ranges(lasts) + "}"
                out.append((_fill(template, [str(n) for n in head] + [last]), ""))
    return sorted((o for o, _ in out), key=natural_key)


def _fill(template: str, values: list[str]) -> str:
    it = iter(values)
    return re.sub("#", lambda _m: next(it), template)
