"""Structural alignment: pair model entries and checkpoint entries that names alone did not pair.

``tg.plan(model, ckpt, align=True)`` runs this after rules and the base-model prefix, on what is
left over on both sides (model entries still missing, checkpoint entries still unused). It reads
names, shapes and dtype kinds only, never tensor bytes, so it works on lazy and sharded sources.

How it decides:

1. **Units.** Entries are grouped by leaf module: a conv's weight; a BatchNorm's weight, bias,
   running stats and ``num_batches_tracked``. A unit's *signature* is the multiset of its
   shapes (and whether they are floating point); ``num_batches_tracked`` is left out of it.
2. **Regions, largest structure first.** The leftovers form one region. Inside a region,
   module subtrees with the same multiset of unit signatures are paired first, the biggest
   first (``encoder.layer`` with ``blocks``, then each layer with each block), and every pair
   becomes a smaller region. A layout grouped differently (Hugging Face's ``conv_stem`` holds
   torchvision's ``features.0`` and ``features.1``) falls through to smaller subtrees and
   single units. Then units are paired inside the region.
3. **Classes.** Items (subtrees or units) of one signature form a class. One item on each
   side is paired when the region is *complete* (both sides hold the same signatures), when
   the structure occurs once in the whole model and once in the whole checkpoint, or when
   names or neighbours support it. Several items are paired by rank when both sides have a
   trustworthy order: the model's registration order, and the checkpoint's file order unless
   the file sorts its keys (safetensors does: ``layer.10`` before ``layer.2``); otherwise only
   numbers in paths order them (``layer.2`` before ``layer.10``, ``conv1`` before ``conv2``).
   Without order: by names (``q`` ~ ``query``, ``attn`` ~ ``attention``; every distinguishing
   word on both sides must agree) or by neighbours (a norm sits next to the linear it follows
   in the model, and with it in the checkpoint). Order is dropped where ranks would cross pairs
   already made (implementations that register parallel branches, a shortcut and the main
   path, in opposite orders); when order and names disagree, nothing of that class is paired.
4. **Gaps.** What is left between paired units is paired in order when the layouts agree; a
   pair whose shapes differ (a first conv with 1 input channel instead of 3) becomes a shape
   mismatch that ``adapt=`` can adapt, never a load.
5. **Single tensors** whose shape occurs once in the model and once in the checkpoint are
   paired last (a ``cls_token`` moved into another module).

Every pair carries a confidence and a reason. Pairs below :data:`MIN_CONFIDENCE` are never
made; items with same-shaped candidates that could not be told apart are reported as
``ambiguous`` with their candidates, and stay missing.

Example:
    >>> plan = tg.plan(hf_mobilenet, "mobilenet_v2-b0353104.pth", align=True)
    >>> plan.aligned["mobilenet_v2.conv_stem.first_conv.convolution.weight"]
    {'source': 'features.0.0.weight', 'confidence': 0.95, 'reason': 'only tensor of shape (32, 3, 3, 3) in ...'}
    >>> rules = plan.rules()      # paste into tg.load(..., rules=rules) to skip alignment next time
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .keys import collapse_keys, natural_key, split_key

if TYPE_CHECKING:
    from .plan import Entry, Plan
    from .sources import Source
    from .target import TargetView

__all__ = ["MIN_CONFIDENCE", "Aligned", "Alignment", "align", "align_plan", "alignment_renderable", "export_rules"]

#: Pairs are only made with at least this confidence.
MIN_CONFIDENCE = 0.5
_NBT = "num_batches_tracked"
_UNORDERED_FORMATS = ("safetensors", "sharded")  # keys sorted (by dtype, then name), not network order

# Words that name a kind of layer or a container, not a role: they never decide a pair by name.
_GENERIC = frozenset({
    "weight", "bias", "layer", "layers", "block", "blocks", "module", "modules", "model", "net", "network",
    "dense", "linear", "fc", "conv", "convolution", "proj", "projection", "norm", "bn", "ln", "layernorm",
    "batchnorm", "groupnorm", "gn", "self", "op", "ops", "seq", "sequential", "main", "body", "features",
    "feature", "stage", "stages", "unit", "units", "sub", "wrapper", "inner", "base", "backbone", "param",
    "params", "parameter",
})  # fmt: skip
# Words that mean the same role under different conventions (timm / torchvision / Hugging Face / original repos).
_SYNONYMS: tuple[frozenset[str], ...] = tuple(
    frozenset(group.split())
    for group in (
        "head classifier cls logits",
        "mlp ffn ff feedforward intermediate",
        "embed embedding embeddings wte tok token word",
        "pos position positional wpe",
        "attn attention",
        "stem embedder",
        "pool pooler pooling",
        "downsample shortcut skip",
    )
)
_STEM_NUMBER = re.compile(r"^(.*?[A-Za-z_])(\d+)$")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


# ---------------------------------------------------------------------------
# Public results


@dataclass(frozen=True)
class Aligned:
    """One pair: model entry ``target`` receives checkpoint entry ``source``.

    ``exact`` is false when the shapes differ (a shape mismatch for ``adapt=`` to handle).
    """

    target: str
    source: str
    confidence: float
    reason: str
    exact: bool = True


@dataclass
class Alignment:
    """What :func:`align` found: ``pairs`` and ``ambiguous`` records.

    An ambiguous record is ``{"targets": [model keys], "candidates": [checkpoint keys],
    "reason": str}``: same-shaped candidates that could not be told apart; nothing of it is loaded.
    """

    pairs: list[Aligned] = field(default_factory=list)
    ambiguous: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Both sides as trees of units


@dataclass(frozen=True)
class _Tensor:
    key: str  # the name the plan uses: model key, or the checkpoint's own key
    attr: str
    shape: tuple[int, ...]
    kind: str  # "f" floating point / complex, "i" integer / bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(eq=False)
class _Unit:
    """A leaf module's entries (or a module's direct parameters)."""

    path: str
    order: int
    tensors: list[_Tensor] = field(default_factory=list)
    leftover: bool = True
    sig: tuple = ()

    @property
    def units(self) -> list[_Unit]:
        return [self]

    @property
    def lo(self) -> int:
        return self.order

    @property
    def hi(self) -> int:
        return self.order

    @property
    def body(self) -> list[_Tensor]:
        return [t for t in self.tensors if t.attr != _NBT]

    def __repr__(self) -> str:
        return f"<unit {self.path}>"


@dataclass(eq=False)
class _Node:
    """A module subtree: the leftover units under ``path``."""

    path: str
    units: list[_Unit]
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


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _depth(path: str) -> int:
    return 0 if not path else path.count(".") + 1


def _nodes(units: Iterable[_Unit], root: str) -> list[_Node]:
    """Subtrees strictly under ``root`` holding two or more of ``units``; one per unit set (the deepest path)."""
    under: dict[str, list[_Unit]] = defaultdict(list)
    start = _depth(root)
    for u in units:
        parts = u.path.split(".") if u.path else []
        for i in range(start + 1, len(parts) + 1):
            under[".".join(parts[:i])].append(u)
    best: dict[frozenset[int], tuple[str, list[_Unit]]] = {}
    for path, us in under.items():
        if len(us) < 2:
            continue
        key = frozenset(id(u) for u in us)
        if key not in best or _depth(path) > _depth(best[key][0]):
            best[key] = (path, us)
    return [_Node(p, us, tuple(sorted(u.sig for u in us))) for p, us in best.values()]


class _Side:
    """One side (model or checkpoint): units in order, signature counts, order trust."""

    def __init__(self, rows: Iterable[tuple[str, str, tuple[int, ...], str, bool]], *, trusted: bool):
        self.trusted = trusted
        self.units: dict[str, _Unit] = {}
        self.tensor_count: Counter[tuple] = Counter()
        for key, path, shape, dtype, leftover in rows:
            module, attr = split_key(path)
            unit = self.units.get(module)
            if unit is None:
                unit = self.units[module] = _Unit(module, len(self.units))
            t = _Tensor(key, attr, tuple(shape), _kind(dtype))
            unit.tensors.append(t)
            unit.leftover = unit.leftover and leftover
            self.tensor_count[(t.shape, t.kind)] += 1
        for u in self.units.values():
            u.sig = tuple(sorted((t.shape, t.kind) for t in u.body))
            if not u.sig:
                u.leftover = False
        self.seq = list(self.units.values())
        self.unit_count = Counter(u.sig for u in self.seq)
        self.node_count = Counter(n.sig for n in _nodes(self.seq, ""))

    def count(self, level: str, sig: tuple) -> int:
        return self.node_count[sig] if level == "node" else self.unit_count[sig]

    def neighbours(self, item: _Unit | _Node) -> list[_Unit]:
        out = []
        if item.lo > 0:
            out.append(self.seq[item.lo - 1])
        if item.hi + 1 < len(self.seq):
            out.append(self.seq[item.hi + 1])
        return out


def _path_cmp(a: str, b: str) -> int | None:
    """Order two paths by the numbers in them where they part: -1, 1, or None when names decide."""
    for x, y in zip(a.split("."), b.split(".")):
        if x == y:
            continue
        if x.isdigit() and y.isdigit():
            return -1 if int(x) < int(y) else 1 if int(x) > int(y) else None
        mx, my = _STEM_NUMBER.match(x), _STEM_NUMBER.match(y)
        if mx and my and mx.group(1) == my.group(1) and int(mx.group(2)) != int(my.group(2)):
            return -1 if int(mx.group(2)) < int(my.group(2)) else 1
        return None
    return None


def _total_order(items: list, *, trusted: bool) -> list | None:
    """``items`` in network order, or ``None`` when it is not known for every pair."""
    if trusted:
        return sorted(items, key=lambda i: i.lo)

    def cmp(a, b) -> int:
        return _path_cmp(a.path, b.path) or 0

    ordered = sorted(items, key=functools.cmp_to_key(cmp))
    for i in range(len(ordered)):
        for j in range(i + 1, len(ordered)):
            if _path_cmp(ordered[i].path, ordered[j].path) != -1:
                return None
    return ordered


# ---------------------------------------------------------------------------
# Names


def _tokens(path: str) -> list[str]:
    """``"attention.self.LayerNorm_1"`` -> ``["attention", "self", "layer", "norm"]`` (numbers dropped)."""
    out: list[str] = []
    for part in re.split(r"[._\-]", path):
        for word in _CAMEL.split(part):
            word = word.lower().rstrip("0123456789")
            if word and word not in out:
                out.append(word)
    return out


def _role(path: str) -> list[str]:
    """The words that say what a module is: its last name part with a non-generic word.

    ``attention.output.dense`` -> ``["output"]``, ``self_attn.q_proj`` -> ``["q", "proj"]``,
    ``post_attention_layernorm`` -> ``["post", "attention", "layernorm"]``. Containers above
    it (``attention.attention``) do not count: they differ between conventions.
    """
    for part in reversed(path.split(".") if path else []):
        words = _tokens(part)
        if any(w not in _GENERIC for w in words):
            return words
    return []


def _is_subsequence(short: str, long: str) -> bool:
    it = iter(long)
    return all(c in it for c in short)


def _sim(a: str, b: str) -> float:
    """How well two words agree: equal, prefix (``q``/``query``), abbreviation (``attn``/``attention``)."""
    if a == b:
        return 1.0
    if any(a in group and b in group for group in _SYNONYMS):
        return 0.9
    short, long = sorted((a, b), key=len)
    if long.startswith(short):
        return 0.8
    if len(short) >= 2 and short[0] == long[0] and _is_subsequence(short, long):
        return 0.7
    if (len(short) >= 3 and short in long) or (len(short) == 1 and len(long) == 2 and long.endswith(short)):
        return 0.5  # "norm" in "layernorm", "q" in "wq"
    return 0.0


def _rel(path: str, root: str) -> str:
    return path[len(root) + 1 :] if root and path.startswith(root + ".") else ("" if path == root else path)


def _conflict(a: list[str], b: list[str]) -> bool:
    """Both names say what they are, and no word of one agrees with any word of the other."""
    a = [w for w in a if w not in _GENERIC]
    b = [w for w in b if w not in _GENERIC]
    return bool(a and b) and all(_sim(x, y) == 0 for x in a for y in b)


def _agree(a: list[str], b: list[str]) -> str | None:
    """Words that agree, when every non-generic word on each side has a partner on the other."""
    a = [w for w in a if w not in _GENERIC]
    b = [w for w in b if w not in _GENERIC]
    if not a or not b:
        return None
    if any(max(_sim(x, y) for y in b) == 0 for x in a) or any(max(_sim(x, y) for x in a) == 0 for y in b):
        return None
    return ", ".join(f"{x} ~ {max(b, key=lambda y: _sim(x, y))}" for x in a)


# ---------------------------------------------------------------------------
# Descriptions


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _what(item: _Unit | _Node, plural: bool = False) -> str:
    """``tensor of shape (32, 3, 3, 3)``, ``module with shapes (384, 384) + (384,)``, ``block of 8 modules``."""
    s = "s" if plural else ""
    if isinstance(item, _Node):
        return f"block{s} of {len(item.units)} modules with {'the same structure' if plural else 'this structure'}"
    if len(item.body) == 1:
        return f"tensor{s} of shape {_fmt_shape(item.body[0].shape)}"
    parts = [
        (f"{n} x " if n > 1 else "") + _fmt_shape(shape) for shape, n in Counter(t.shape for t in item.body).items()
    ]
    return f"module{s} with shapes " + " + ".join(parts)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _distinctive(item: _Unit | _Node) -> bool:
    """Big enough that a coincidence is unlikely: a subtree, two or more tensors, or 4096+ elements."""
    if isinstance(item, _Node) or len(item.body) >= 2:
        return True
    return sum(t.numel for t in item.body) >= 4096


def _compatible(t: _Unit, s: _Unit) -> bool:
    """Same layout (names, ranks, kinds), maybe other sizes: a candidate for a shape mismatch."""
    a = {x.attr: (len(x.shape), x.kind) for x in t.body}
    b = {x.attr: (len(x.shape), x.kind) for x in s.body}
    return bool(a) and a == b


# ---------------------------------------------------------------------------
# The aligner


@dataclass(eq=False)
class _Region:
    t_root: str
    s_root: str
    t_units: list[_Unit]
    s_units: list[_Unit]
    complete: bool
    conf: float = 1.0
    reason: str = ""
    start: dict[tuple[str, tuple], tuple[int, int]] = field(default_factory=dict)
    why: dict[int, str] = field(default_factory=dict)  # id(unit) -> why it was left unpaired
    vetoed: set[int] = field(default_factory=set)  # id(unit): signals contradicted each other; never paired here
    s_set: set[int] | None = None  # id(unit) of s_units, built on first use

    @property
    def ctx(self) -> str:
        if not self.t_root and not self.s_root:
            return "the unmatched entries"
        return f"{self.t_root or '<root>'} / {self.s_root or '<root>'}"


Pair = tuple[Any, Any, float, str]


class _Aligner:
    def __init__(self, T: _Side, S: _Side, anchors: Mapping[str, str], left_t: frozenset[str], left_s: frozenset[str]):
        self.T, self.S = T, S
        self.left_t, self.left_s = left_t, left_s
        self.t2s: dict[_Unit, _Unit] = {}
        self.s2t: dict[_Unit, _Unit] = {}
        for t_path, s_path in anchors.items():
            t, s = T.units.get(t_path), S.units.get(s_path)
            if t is not None and s is not None and t not in self.t2s and s not in self.s2t:
                self.t2s[t], self.s2t[s] = s, t
        self.owner: dict[int, _Region] = {}  # id(unit) -> the smallest region holding it
        self.regions: list[_Region] = []
        self.result = Alignment()
        self.paired_t: set[str] = set()
        self.paired_s: set[str] = set()

    # Regions ---------------------------------------------------------------
    def run(self) -> Alignment:
        t_units = [u for u in self.T.seq if u.leftover and u not in self.t2s]
        s_units = [u for u in self.S.seq if u.leftover and u not in self.s2t]
        if t_units and s_units:
            complete = Counter(u.sig for u in t_units) == Counter(u.sig for u in s_units)
            self._region(_Region("", "", t_units, s_units, complete))
        self._single_tensors()
        self._record_ambiguous()
        self.result.ambiguous.sort(key=lambda a: natural_key(a["targets"][0]))
        return self.result

    def _free(self, R: _Region) -> tuple[list[_Unit], list[_Unit]]:
        """Units of ``R`` not yet paired and not handed to a smaller region."""
        return (
            [u for u in R.t_units if u not in self.t2s and self.owner.get(id(u)) is R],
            [u for u in R.s_units if u not in self.s2t and self.owner.get(id(u)) is R],
        )

    def _region(self, R: _Region) -> None:
        self.regions.append(R)
        for u in [*R.t_units, *R.s_units]:
            self.owner[id(u)] = R
        for level in ("node", "unit"):
            ts, ss = self._items(R, level)
            ct, cs = Counter(i.sig for i in ts), Counter(i.sig for i in ss)
            for sig in ct.keys() | cs.keys():
                R.start[level, sig] = (ct[sig], cs[sig])
        while self._pass(R, "node") or self._pass(R, "unit"):
            pass
        self._gaps(R)

    def _items(self, R: _Region, level: str) -> tuple[list, list]:
        ft, fs = self._free(R)
        if level == "unit":
            return ft, fs
        return _nodes(ft, R.t_root), _nodes(fs, R.s_root)

    def _pass(self, R: _Region, level: str) -> bool:
        ts, ss = self._items(R, level)
        classes: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
        for i in ts:
            classes[i.sig][0].append(i)
        for i in ss:
            classes[i.sig][1].append(i)
        progress = False

        def order(sig: tuple) -> tuple:  # one-to-one classes first: their pairs anchor the order of the others
            ct, cs = classes[sig]
            return (max(len(ct), len(cs)) > 1, -len(sig), min(i.lo for i in ct + cs))

        for sig in sorted(classes, key=order):
            ct, cs = classes[sig]
            if progress and max(len(ct), len(cs)) > 1:
                return True
            ct = [i for i in ct if all(self._is_free(R, u, self.t2s) for u in i.units)]
            cs = [i for i in cs if all(self._is_free(R, u, self.s2t) for u in i.units)]
            if not ct or not cs:
                continue
            for t, s, conf, reason in self._resolve(R, level, ct, cs):
                progress = True
                conf = min(conf, R.conf)
                if level == "node":  # units inside inherit the nearest reason that is not plain uniqueness
                    why = R.reason if reason.startswith(("only", "last")) else f"{t.path} = {s.path}: {reason}"
                    self._region(_Region(t.path, s.path, t.units, s.units, True, conf, why))
                else:
                    self._pair_units(t, s, conf, reason + (f"; {R.reason}" if R.reason else ""))
        return progress

    def _is_free(self, R: _Region, u: _Unit, pairs: dict[_Unit, _Unit]) -> bool:
        return u not in pairs and self.owner.get(id(u)) is R

    # One class -------------------------------------------------------------
    def _resolve(self, R: _Region, level: str, ts: list, ss: list) -> list[Pair]:
        ts = sorted(ts, key=lambda i: i.lo)
        sig, kt, ks = ts[0].sig, len(ts), len(ss)
        what, ctx = _what(ts[0]), R.ctx
        everywhere = self.T.count(level, sig) == kt and self.S.count(level, sig) == ks
        if kt == ks == 1:
            t, s = ts[0], ss[0]
            if R.complete:
                if max(R.start.get((level, sig), (1, 1))) > 1:
                    return [(t, s, 0.85, f"last {what} left in {ctx} once the others were placed")]
                return [(t, s, 0.95, f"only {what} in {ctx}")]
            t_words, s_words = _role(_rel(t.path, R.t_root)), _role(_rel(s.path, R.s_root))
            if everywhere and _distinctive(t) and (level == "node" or not _conflict(t_words, s_words)):
                return [(t, s, 0.9, f"only {what} in the model and the checkpoint")]
            if (why := _agree(t_words, s_words)) is not None:
                return [(t, s, 0.8, f"only {what} left in {ctx}; names agree: {why}")]
            if (why := self._neighbour(t, s)) is not None:
                return [(t, s, 0.75, f"only {what} left in {ctx}; {why}")]
            self._why(R, ts, f"{s.path} has the same shapes, but nothing else links them")
            return []

        names = self._name_pairs(R, ts, ss)
        near = self._neighbour_pairs(ts, ss)
        order = _total_order(ss, trusted=self.S.trusted) if kt == ks else None
        if order is not None and (crossing := [t.path for t, s in zip(ts, order) if self._crosses(R, t, s)]):
            # both orders are registration orders, but of parallel branches (a shortcut registered before
            # or after the main path): ranks would cross pairs already made, so order says nothing here
            self._why(
                R,
                ts,
                f"the checkpoint's order crosses pairs already made (at {', '.join(crossing[:3])}), and names do not tell them apart",
            )
            order = None
        out: list[Pair] = []
        if order is not None:
            how = "in model and file order" if self.S.trusted else "by the numbers in their names"
            if clash := [t.path for t, s in zip(ts, order) if any(t in d and d[t][0] is not s for d in (names, near))]:
                self._why(R, ts, f"order and names or neighbours disagree on {', '.join(clash[:3])}")
                R.vetoed.update(id(u) for i in [*ts, *ss] for u in i.units)
                return []
            base = 0.85 if self.S.trusted else 0.9
            for i, (t, s) in enumerate(zip(ts, order)):
                support = names.get(t) or near.get(t)
                reason = f"{_ordinal(i + 1)} of {kt} {_what(t, plural=True)} in {ctx}, {how}"
                if support is not None:
                    reason += f"; {support[1]}"
                if R.complete or everywhere:
                    out.append((t, s, min(0.95, base + (0.05 if support else 0.0)), reason))
                elif support is not None:
                    out.append((t, s, 0.75, reason))
            if not out:
                self._why(
                    R,
                    ts,
                    f"{kt} on each side in order, but {ctx} also holds unrelated modules and nothing confirms these",
                )
            return out
        used: set[int] = set()
        for t, (s, why) in names.items():
            if t in near and near[t][0] is not s:
                continue
            out.append((t, s, 0.8 if R.complete else 0.7, f"{what} in {ctx}; names agree: {why}"))
            used.add(id(s))
        paired = {id(t) for t, *_ in out}
        for t, (s, why) in near.items():
            if id(t) not in paired and id(s) not in used and not (t in names and names[t][0] is not s):
                out.append((t, s, 0.75 if R.complete else 0.7, f"{what} in {ctx}; {why}"))
        if len(out) < kt:
            sorted_note = "the checkpoint's key order is not the network's" if not self.S.trusted else "counts differ"
            self._why(
                R,
                ts,
                f"{kt} model and {ks} checkpoint items of the same shapes; {sorted_note}, and names do not tell them apart",
            )
        return out

    def _crosses(self, R: _Region, t, s) -> bool:
        """Would pairing ``t`` with ``s`` cross a pair already made in ``R`` (one side before it, the other after)?"""
        if R.s_set is None:
            R.s_set = {id(u) for u in R.s_units}
        for tu in R.t_units:
            su = self.t2s.get(tu)
            if su is None or id(su) not in R.s_set or tu in t.units:
                continue
            dt = 1 if tu.order < t.lo else -1 if tu.order > t.hi else 0
            if self.S.trusted:
                ds = 1 if su.order < s.lo else -1 if su.order > s.hi else 0
            else:
                c = _path_cmp(su.path, s.path)
                ds = 0 if c is None else -c
            if dt and ds and dt != ds:
                return True
        return False

    def _why(self, R: _Region, items: list, text: str) -> None:
        for i in items:
            for u in i.units:
                R.why.setdefault(id(u), text)

    def _name_pairs(self, R: _Region, ts: list, ss: list) -> dict[Any, tuple[Any, str]]:
        tt = {t: _role(_rel(t.path, R.t_root)) for t in ts}
        st = {s: _role(_rel(s.path, R.s_root)) for s in ss}
        common_t = set.intersection(*(set(v) for v in tt.values())) if len(ts) > 1 else set()
        common_s = set.intersection(*(set(v) for v in st.values())) if len(ss) > 1 else set()
        ok: dict[tuple[int, int], str] = {}
        for t in ts:
            for s in ss:
                why = _agree([w for w in tt[t] if w not in common_t], [w for w in st[s] if w not in common_s])
                if why is not None:
                    ok[id(t), id(s)] = why
        return self._mutual(ts, ss, ok)

    def _neighbour(self, t, s) -> str | None:
        """Why ``t`` and ``s`` sit in the same place: ``t``'s neighbour is paired with ``s``'s sibling."""
        for tn in self.T.neighbours(t):
            sn = self.t2s.get(tn)
            if sn is not None and sn not in s.units and _parent(sn.path) == _parent(s.path):
                return f"next to {tn.path or '<root>'}, as {s.path} sits with {sn.path}"
            if sn is not None and self.S.trusted and sn in self.S.neighbours(s):
                return f"next to {tn.path or '<root>'} in both orders"
        return None

    def _neighbour_pairs(self, ts: list, ss: list) -> dict[Any, tuple[Any, str]]:
        ok: dict[tuple[int, int], str] = {}
        for t in ts:
            for s in ss:
                if (why := self._neighbour(t, s)) is not None:
                    ok[id(t), id(s)] = why
        return self._mutual(ts, ss, ok)

    @staticmethod
    def _mutual(ts: list, ss: list, ok: dict[tuple[int, int], str]) -> dict[Any, tuple[Any, str]]:
        """Pairs where each side has exactly one supported partner."""
        by_t: dict[int, list] = defaultdict(list)
        by_s: dict[int, list] = defaultdict(list)
        for t in ts:
            for s in ss:
                if (id(t), id(s)) in ok:
                    by_t[id(t)].append(s)
                    by_s[id(s)].append(t)
        out = {}
        for t in ts:
            cands = by_t.get(id(t), [])
            if len(cands) == 1 and len(by_s[id(cands[0])]) == 1:
                out[t] = (cands[0], ok[id(t), id(cands[0])])
        return out

    # Gaps ------------------------------------------------------------------
    def _gaps(self, R: _Region) -> None:
        """Pair what is left in order between paired units; shapes may differ (adapters)."""
        ft, fs = self._free(R)
        ft = [u for u in ft if id(u) not in R.vetoed]
        fs = [u for u in fs if id(u) not in R.vetoed]
        if not ft or not fs:
            return
        if len(ft) == 1 and len(fs) == 1 and ft[0].sig != fs[0].sig and _compatible(ft[0], fs[0]):
            t, s = ft[0], fs[0]
            why = _agree(_role(_rel(t.path, R.t_root)), _role(_rel(s.path, R.s_root)))
            why = f"names agree: {why}" if why is not None else self._neighbour(t, s)
            if why is not None:
                self._pair_units(
                    t,
                    s,
                    min(0.6, R.conf),
                    f"the only unmatched module on either side in {R.ctx}, same layout, other shapes; {why}",
                )
                return
        t_seq = sorted(R.t_units, key=lambda u: u.order)
        s_seq = _total_order(list(R.s_units), trusted=self.S.trusted)
        if s_seq is None:
            return
        s_pos = {id(u): i for i, u in enumerate(s_seq)}
        free_t, free_s = set(ft), set(fs)
        run: list[_Unit] = []
        before: _Unit | None = None
        for u in [*t_seq, None]:
            if u is not None and u in free_t:
                run.append(u)
                continue
            if u is not None and u not in self.t2s:  # inside an unresolved subtree: the boundary is unknown
                run, before = [], None
                continue
            if run:
                self._gap(R, run, before, u, s_seq, s_pos, free_s)
            run, before = [], u
        return

    def _gap(self, R, run, before, after, s_seq, s_pos, free_s) -> None:
        lo = s_pos.get(id(self.t2s[before]), None) if before is not None else -1
        hi = s_pos.get(id(self.t2s[after]), None) if after is not None else len(s_seq)
        if lo is None or hi is None or lo >= hi:
            return
        cands = [s for s in s_seq[lo + 1 : hi] if s in free_s]
        if len(cands) != len(run) or not all(t.sig == s.sig or _compatible(t, s) for t, s in zip(run, cands)):
            return
        where = f"between {before.path if before else 'the start'} and {after.path if after else 'the end'}"
        for t, s in zip(run, cands):
            if t.sig == s.sig:
                self._pair_units(t, s, min(0.75, R.conf), f"in order {where} in {R.ctx}")
            else:
                self._pair_units(t, s, min(0.6, R.conf), f"in order {where} in {R.ctx}, same layout, other shapes")
            free_s.discard(s)

    # Units -> tensors ------------------------------------------------------
    def _pair_units(self, t: _Unit, s: _Unit, conf: float, reason: str) -> None:
        self.t2s[t], self.s2t[s] = s, t
        by_attr = {x.attr: x for x in s.tensors}
        rest_t: list[_Tensor] = []
        used: set[str] = set()
        exact_unit = t.sig == s.sig
        for x in t.tensors:
            y = by_attr.get(x.attr)
            if y is not None and (x.shape == y.shape or not exact_unit):
                self._pair_tensor(x, y, conf, reason)
                used.add(y.attr)
            elif x.attr != _NBT:
                rest_t.append(x)
        rest_s = [y for y in s.tensors if y.attr not in used and y.attr != _NBT]
        for x in rest_t:  # other attribute names: by unique shape, then by order within the module
            same_s = [y for y in rest_s if (y.shape, y.kind) == (x.shape, x.kind)]
            same_t = [z for z in rest_t if (z.shape, z.kind) == (x.shape, x.kind)]
            if len(same_s) == 1 and len(same_t) == 1:
                self._pair_tensor(x, same_s[0], conf, f"{reason}; {x.attr} ~ {same_s[0].attr}")
            elif len(same_s) == len(same_t) and self.S.trusted:
                y = same_s[same_t.index(x)]
                self._pair_tensor(x, y, min(conf, 0.75), f"{reason}; {x.attr} ~ {y.attr} by order in the module")

    def _pair_tensor(self, x: _Tensor, y: _Tensor, conf: float, reason: str) -> None:
        if x.key in self.paired_t or y.key in self.paired_s or conf < MIN_CONFIDENCE:
            return
        self.paired_t.add(x.key)
        self.paired_s.add(y.key)
        self.result.pairs.append(
            Aligned(x.key, y.key, round(conf, 2), reason, x.shape == y.shape or (x.shape == () and y.shape == (1,)))
        )

    def _single_tensors(self) -> None:
        """Tensors whose shape occurs once in the model and once in the checkpoint, still unpaired."""
        left_t = [x for u in self.T.seq for x in u.tensors if x.key in self.left_t and x.key not in self.paired_t]
        left_s = [y for u in self.S.seq for y in u.tensors if y.key in self.left_s and y.key not in self.paired_s]
        by_shape_s = {(y.shape, y.kind): y for y in left_s if self.S.tensor_count[(y.shape, y.kind)] == 1}
        for x in left_t:
            y = by_shape_s.get((x.shape, x.kind))
            if y is None or self.T.tensor_count[(x.shape, x.kind)] != 1 or x.attr == _NBT:
                continue
            if x.numel >= 4096 or _agree(_role(x.key), _role(y.key)) is not None:
                self._pair_tensor(
                    x, y, 0.8, f"only tensor of shape {_fmt_shape(x.shape)} in the model and the checkpoint"
                )

    def _record_ambiguous(self) -> None:
        done: set[int] = set()
        for R in reversed(self.regions):  # deepest first: a unit is reported in the smallest region holding it
            left_t = [
                u
                for u in R.t_units
                if u not in self.t2s and id(u) not in done and any(x.key not in self.paired_t for x in u.body)
            ]
            left_s = [u for u in R.s_units if u not in self.s2t and any(y.key not in self.paired_s for y in u.body)]
            done.update(id(u) for u in R.t_units)
            groups: dict[tuple, list[_Unit]] = defaultdict(list)
            for u in left_t:
                groups[u.sig].append(u)
            for sig, us in groups.items():
                cands = [s for s in left_s if s.sig == sig]
                if not cands:
                    continue
                reason = next((R.why[id(u)] for u in us if id(u) in R.why), "same shapes; nothing tells them apart")
                self.result.ambiguous.append(
                    {
                        "targets": [x.key for u in us for x in u.tensors if x.key not in self.paired_t],
                        "candidates": [y.key for s in cands for y in s.tensors if y.key not in self.paired_s],
                        "reason": f"{reason} (in {R.ctx})",
                    }
                )


# ---------------------------------------------------------------------------
# Entry points


def source_order_trusted(source: Source) -> bool:
    """Is the checkpoint's key order its network's order? Not for sorted files (safetensors, indexes)."""
    if any(f in source.format for f in _UNORDERED_FORMATS):
        return False
    keys = list(source.keys())
    return keys != sorted(keys)


def align(
    targets: Iterable[tuple[str, tuple[int, ...], str, bool]],
    sources: Iterable[tuple[str, str, tuple[int, ...], str, bool]],
    *,
    source_ordered: bool,
    anchors: Mapping[str, str] | None = None,
) -> Alignment:
    """Pair leftover model entries with leftover checkpoint entries by structure.

    Args:
        targets: every model entry in model order: ``(name, shape, dtype, leftover)``;
            ``leftover`` marks the ones still missing. The others give context.
        sources: every checkpoint entry in file order: ``(key, name_after_rules, shape,
            dtype, leftover)``; ``leftover`` marks the ones still unused.
        source_ordered: the file order is the network's (false for sorted formats).
        anchors: model module path -> checkpoint module path (after rules) for modules
            already matched by name.

    Returns:
        An :class:`Alignment`: pairs (each with confidence and reason) and ambiguous records.

    Example:
        >>> a = align([("a.weight", (4, 3), "float32", True)], [("x.weight", "x.weight", (4, 3), "float32", True)],
        ...           source_ordered=False)
        >>> a.pairs[0].source, a.pairs[0].confidence
        ('x.weight', 0.95)
    """
    targets = list(targets)
    sources = list(sources)
    T = _Side(((k, k, shape, dt, left) for k, shape, dt, left in targets), trusted=True)
    S = _Side(sources, trusted=source_ordered)
    left_t = frozenset(k for k, _s, _d, left in targets if left)
    left_s = frozenset(k for k, _p, _s, _d, left in sources if left)
    return _Aligner(T, S, anchors or {}, left_t, left_s).run()


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
) -> list[dict[str, Any]]:
    """Align a plan in progress in place; return the ambiguous records.

    Model entries still ``init`` (not mismatched, not a tied alias) and checkpoint entries in
    ``unused`` (minus those ``skip`` says are ignorable) are aligned. Paired entries become
    ``copy`` (or a shape mismatch with their source set, for ``adapt=``) with ``aligned =
    {"confidence", "reason"}``; their sources leave ``unused`` and join ``renamed``.
    """
    unused_set = {k for k in unused if not skip(k)}
    left_t = {k for k, e in entries.items() if e.action == "init" and not e.mismatched and k not in view.tied}
    if not left_t or not unused_set:
        return []
    anchors: dict[str, str] = {}
    for k, e in entries.items():
        if e.loads and e.source is not None and e.source in names:
            anchors.setdefault(split_key(k)[0], split_key(names[e.source])[0])
    result = align(
        ((k, info.shape, info.dtype, k in left_t) for k, info in view.entries.items()),
        ((k, names[k], source[k].shape, source[k].dtype, k in unused_set) for k in source if k in names),
        source_ordered=source_order_trusted(source),
        anchors=anchors,
    )
    taken: set[str] = set()
    for p in result.pairs:
        e, ref = entries[p.target], source[p.source]
        e.source, e.source_shape, e.source_dtype = p.source, ref.shape, ref.dtype
        e.action, e.mismatched = ("copy", False) if p.exact else ("init", True)
        e.aligned = {"confidence": p.confidence, "reason": p.reason}
        e.note = f"aligned ({p.confidence:.2f}): {p.reason}"
        renamed[p.source] = p.target
        metadata_map.setdefault(split_key(p.target)[0], split_key(p.source)[0])
        taken.add(p.source)
    unused[:] = [k for k in unused if k not in taken]
    return result.ambiguous


# ---------------------------------------------------------------------------
# Rules export


def _numbers(path: str) -> list[str]:
    return [p for p in path.split(".") if p.isdigit()]


def _template(path: str) -> str:
    return ".".join("{}" if p.isdigit() else p for p in path.split("."))


def _apply(table: Mapping[str, str], keys: Iterable[str]) -> dict[str, str | None]:
    from .rules import apply_rules, compile_rules

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
    """
    all_keys = list(dict.fromkeys(all_keys))
    keep = set(loaded_by_name)
    target_names = set(targets)

    def works(table: dict[str, str]) -> bool:
        got = _apply(table, all_keys)
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


def plan_rules(plan: Plan) -> dict[str, str]:
    """``plan.rules()``: the aligned pairs of ``plan`` as a rules table (see :func:`export_rules`)."""
    pairs = {e.source: k for k, e in plan.entries.items() if e.aligned and e.source}
    if not pairs:
        return {}
    keys = [e.source for e in plan.entries.values() if e.source] + list(plan.unexpected) + list(plan.ignored)
    by_name = [e.source for e in plan.entries.values() if e.source and not e.aligned]
    return export_rules(pairs, keys, loaded_by_name=by_name, targets=plan.entries)


# ---------------------------------------------------------------------------
# Rendering


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
                f"aligned by structure: {len(aligned)} entries (plan.aligned; plan.rules() exports them)", style="bold"
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
