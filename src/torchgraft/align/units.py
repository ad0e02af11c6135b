"""Both sides of an alignment as trees of units: leaf modules, their subtrees, and their order.

A :class:`Unit` is one leaf module's entries (a conv's weight; a BatchNorm's weight, bias,
running stats and ``num_batches_tracked``); its *signature* is the sorted multiset of its
shapes and dtype kinds, ``num_batches_tracked`` left out. A :class:`Node` is a module
subtree holding two or more units; its signature is the multiset of its units' signatures.
A :class:`Side` holds one side's units in order (model registration order, or the
checkpoint's file order) and whether that order can be trusted.
"""

from __future__ import annotations

import functools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..keys import split_key
from .vocabulary import path_order

__all__ = [
    "NUM_BATCHES_TRACKED",
    "Node",
    "Side",
    "Tensor",
    "Unit",
    "compatible",
    "describe",
    "distinctive",
    "format_shape",
    "nodes",
    "ordinal",
    "parent",
    "total_order",
]

NUM_BATCHES_TRACKED = "num_batches_tracked"


@dataclass(frozen=True)
class Tensor:
    key: str  # the name the plan uses: model key, or the checkpoint's own key
    attr: str
    shape: tuple[int, ...]
    kind: str  # "f" floating point / complex, "i" integer / bool
    transposed: bool = False  # a checkpoint tensor stored [in, out]: ``shape`` is the one it has transposed

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(eq=False)
class Unit:
    """A leaf module's entries (or a module's direct parameters)."""

    path: str
    order: int
    tensors: list[Tensor] = field(default_factory=list)
    leftover: bool = True
    sig: tuple = ()

    @property
    def units(self) -> list[Unit]:
        return [self]

    @property
    def lo(self) -> int:
        return self.order

    @property
    def hi(self) -> int:
        return self.order

    @property
    def body(self) -> list[Tensor]:
        return [t for t in self.tensors if t.attr != NUM_BATCHES_TRACKED]

    def __repr__(self) -> str:
        return f"<unit {self.path}>"


@dataclass(eq=False)
class Node:
    """A module subtree: the leftover units under ``path``."""

    path: str
    units: list[Unit]
    sig: tuple

    @property
    def lo(self) -> int:
        return min(u.order for u in self.units)

    @property
    def hi(self) -> int:
        return max(u.order for u in self.units)

    def __repr__(self) -> str:
        return f"<node {self.path} ({len(self.units)} units)>"


def _kind(dtype: str) -> str:
    return "f" if dtype.startswith(("float", "bfloat", "complex")) else "i"


def parent(path: str) -> str:
    return path.rpartition(".")[0]


def _depth(path: str) -> int:
    return 0 if not path else path.count(".") + 1


def nodes(units: Iterable[Unit], root: str) -> list[Node]:
    """Subtrees strictly under ``root`` holding two or more of ``units``; one per unit set (the deepest path)."""
    under: dict[str, list[Unit]] = defaultdict(list)
    start = _depth(root)
    for u in units:
        parts = u.path.split(".") if u.path else []
        for i in range(start + 1, len(parts) + 1):
            under[".".join(parts[:i])].append(u)
    best: dict[frozenset[int], tuple[str, list[Unit]]] = {}
    for path, us in under.items():
        if len(us) < 2:
            continue
        key = frozenset(id(u) for u in us)
        if key not in best or _depth(path) > _depth(best[key][0]):
            best[key] = (path, us)
    return [Node(p, us, tuple(sorted(u.sig for u in us))) for p, us in best.values()]


class Side:
    """One side (model or checkpoint): units in order, signature counts, order trust.

    ``rows`` are ``(key, name, shape, dtype, leftover)``: ``name`` places the entry in the
    module tree (the checkpoint key after rules), ``key`` is what pairs report. The 2-D floating
    point tensors of the modules in ``transposed`` are taken transposed (stored ``[in, out]``).
    """

    def __init__(
        self,
        rows: Iterable[tuple[str, str, tuple[int, ...], str, bool]],
        *,
        trusted: bool,
        transposed: frozenset[str] = frozenset(),
    ):
        self.trusted = trusted
        self.units: dict[str, Unit] = {}
        self.tensor_count: Counter[tuple] = Counter()
        for key, path, shape, dtype, leftover in rows:
            module, attr = split_key(path)
            unit = self.units.get(module)
            if unit is None:
                unit = self.units[module] = Unit(module, len(self.units))
            flip = module in transposed and len(shape) == 2 and _kind(dtype) == "f"
            t = Tensor(key, attr, tuple(shape)[::-1] if flip else tuple(shape), _kind(dtype), flip)
            unit.tensors.append(t)
            unit.leftover = unit.leftover and leftover
            self.tensor_count[(t.shape, t.kind)] += 1
        for u in self.units.values():
            u.sig = tuple(sorted((t.shape, t.kind) for t in u.body))
            if not u.sig:
                u.leftover = False
        self.seq = list(self.units.values())
        self.unit_count = Counter(u.sig for u in self.seq)
        self.node_count = Counter(n.sig for n in nodes(self.seq, ""))

    def count(self, level: str, sig: tuple) -> int:
        return self.node_count[sig] if level == "node" else self.unit_count[sig]

    def neighbours(self, item: Unit | Node) -> list[Unit]:
        out = []
        if item.lo > 0:
            out.append(self.seq[item.lo - 1])
        if item.hi + 1 < len(self.seq):
            out.append(self.seq[item.hi + 1])
        return out


def total_order(items: list, *, trusted: bool) -> list | None:
    """``items`` in network order, or ``None`` when it is not known for every pair."""
    if trusted:
        return sorted(items, key=lambda i: i.lo)

    def cmp(a, b) -> int:
        return path_order(a.path, b.path) or 0

    ordered = sorted(items, key=functools.cmp_to_key(cmp))
    for i in range(len(ordered)):
        for j in range(i + 1, len(ordered)):
            if path_order(ordered[i].path, ordered[j].path) != -1:
                return None
    return ordered


# ---------------------------------------------------------------------------
# Descriptions (for reasons)


def format_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def describe(item: Unit | Node, plural: bool = False) -> str:
    """``tensor of shape (32, 3, 3, 3)``, ``module with shapes (384, 384) + (384,)``, ``block of 8 modules``."""
    s = "s" if plural else ""
    if isinstance(item, Node):
        return f"block{s} of {len(item.units)} modules with {'the same structure' if plural else 'this structure'}"
    if len(item.body) == 1:
        return f"tensor{s} of shape {format_shape(item.body[0].shape)}"
    parts = [
        (f"{n} x " if n > 1 else "") + format_shape(shape) for shape, n in Counter(t.shape for t in item.body).items()
    ]
    return f"module{s} with shapes " + " + ".join(parts)


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def distinctive(item: Unit | Node) -> bool:
    """Big enough that a coincidence is unlikely: a subtree, two or more tensors, or 4096+ elements."""
    if isinstance(item, Node) or len(item.body) >= 2:
        return True
    return sum(t.numel for t in item.body) >= 4096


def compatible(model_unit: Unit, ckpt_unit: Unit) -> bool:
    """Same layout (names, ranks, kinds), maybe other sizes: a candidate for a shape mismatch."""
    a = {x.attr: (len(x.shape), x.kind) for x in model_unit.body}
    b = {x.attr: (len(x.shape), x.kind) for x in ckpt_unit.body}
    return bool(a) and a == b
