"""Tensor transforms as plan data: transpose, permute, reshape, split, slice, concat, stack, rotary layouts.

A checkpoint from another codebase often holds the same weights in another layout: GPT-2's
``Conv1D`` stores ``[in, out]`` where ``nn.Linear`` wants ``[out, in]``; timm fuses q, k and v into
one ``qkv``; Meta's Llama files are tensor-parallel shards with an interleaved rotary layout;
MoE experts are separate tensors in one codebase and one stacked tensor in another. A transform
says how a model entry is computed from checkpoint entries, as an expression tree of pure ops:

    >>> import torchgraft as tg
    >>> rules = {
    ...     "blocks.{}.attn.{q,k,v}.weight": tg.split(tg.transpose("h.{}.attn.c_attn.weight"), dim=0),
    ...     "blocks.{}.mlp.fc.weight": tg.transpose("h.{}.mlp.c_fc.weight"),
    ... }
    >>> report = tg.load(model, "gpt2/", rules=rules)
    >>> report.transformed["blocks.0.attn.q.weight"]
    'split(transpose(h.0.attn.c_attn.weight), dim=0, parts=3, index=0)'

A rule whose value is a transform is keyed by the *model's* name (the value names checkpoint
entries); ``{}`` is a layer number, shared by order, and a brace set in the key (``{q,k,v}``)
makes one entry per alternative, each taking its piece of an equal ``split`` (or ``unstack``).

Every op has a shape rule (checked on the meta device when the plan is made, so a wrong
transform fails before any byte is read) and an exact inverse, so a plan runs backwards:
:func:`reverse` gives the checkpoint's layout back, bit for bit (``tg.convert(...,
plan=plan, reverse=True)`` writes it). A fused tensor is read and transformed once per load,
not once per piece.

Ops (each a function here, re-exported as ``tg.<op>``; a string argument is a checkpoint entry):

==================  ==========================================================================
``transpose``       swap two dims (``dim0=0, dim1=1``)
``permute``         reorder dims (``dims=[...]``)
``reshape``         another shape with the same elements
``split``           one piece along ``dim``: ``sizes=[...]`` (uneven allowed: GQA's q, k, v) or ``parts=n``
``slice``           rows ``start:stop`` along ``dim`` (not reversible unless the slices cover the tensor)
``concat``          join along ``dim`` (tensor-parallel shards, fused ``gate_up``)
``stack``           a new leading (or ``dim``) axis (per-expert weights into one tensor)
``unstack``         one entry of that axis (``index=``)
``rope_permute``    interleaved <-> half-split rotary rows (``heads=``, ``to="half"`` or ``"interleaved"``)
``same``            replicated copies (tensor-parallel norms): checked equal when loaded, one taken
==================  ==========================================================================

Importing this module does not import torch.
"""

from __future__ import annotations

import builtins
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import LoadError, PlanError

if TYPE_CHECKING:
    import torch

    from .plan import Plan

__all__ = [
    "OPS",
    "Expr",
    "Op",
    "concat",
    "evaluate",
    "expand_rule",
    "infer_shape",
    "is_transform",
    "permute",
    "reshape",
    "reverse",
    "rope_permute",
    "same",
    "slice",
    "source",
    "split",
    "stack",
    "transpose",
    "unstack",
]

Shape = tuple[int, ...]

# ---------------------------------------------------------------------------
# The ops: a registry of pure functions with shape rules (run on meta) and inverses


@dataclass(frozen=True)
class Op:
    """One transform op.

    Attributes:
        name: as written in plans.
        kind: ``"unary"`` (one input, one output), ``"merge"`` (several inputs -> one) or
            ``"piece"`` (one part of its input: reversed by putting the pieces together).
        run: ``run(inputs, **args) -> tensor``; also the shape rule, run on meta tensors.
        args: argument name -> (types accepted, required).
        invert: for unary and merge ops, ``invert(value, input_shapes, **args) -> one value per input``.
    """

    name: str
    kind: str
    run: Callable[..., torch.Tensor]
    args: dict[str, tuple[tuple[type, ...], bool]]
    invert: Callable[..., list[torch.Tensor]] | None = None


def _ints(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _one(inputs: Sequence[torch.Tensor], op: str) -> torch.Tensor:
    if len(inputs) != 1:
        raise PlanError(f"{op} takes one input, got {len(inputs)}")
    return inputs[0]


def _split_sizes(length: int, dim: int, sizes: Sequence[int] | None, parts: int | None) -> list[int]:
    if sizes is not None:
        if sum(sizes) != length or any(s < 0 for s in sizes):
            raise PlanError(f"split sizes {list(sizes)} do not add up to {length} (the size of dim {dim})")
        return list(sizes)
    if not parts or parts < 1 or length % parts:
        raise PlanError(f"cannot split {length} rows of dim {dim} into {parts} equal parts")
    return [length // parts] * parts


def _pick(pieces: Sequence[Any], index: int | None, op: str) -> Any:
    if index is None:
        raise PlanError(f"{op} needs index= (which piece); in a rule, a brace set in the key gives it")
    if not 0 <= index < len(pieces):
        raise PlanError(f"{op} index {index} is out of range for {len(pieces)} pieces")
    return pieces[index]


def _run_transpose(inputs, *, dim0=0, dim1=1):
    return _one(inputs, "transpose").transpose(dim0, dim1)


def _run_permute(inputs, *, dims):
    return _one(inputs, "permute").permute(*dims)


def _run_reshape(inputs, *, shape):
    x = _one(inputs, "reshape")
    if math.prod(shape) != x.numel():
        raise PlanError(f"cannot reshape {list(x.shape)} to {list(shape)}")
    return x.reshape(*shape)


def _run_split(inputs, *, dim=0, sizes=None, parts=None, index=None):
    import torch

    x = _one(inputs, "split")
    pieces = torch.split(x, _split_sizes(x.shape[dim], dim, sizes, parts), dim=dim)
    return _pick(pieces, index, "split")


def _run_slice(inputs, *, dim=0, start=0, stop=None):
    x = _one(inputs, "slice")
    stop = x.shape[dim] if stop is None else stop
    if not 0 <= start <= stop <= x.shape[dim]:
        raise PlanError(f"slice {start}:{stop} is outside dim {dim} of size {x.shape[dim]}")
    return x.narrow(dim, start, stop - start)


def _run_concat(inputs, *, dim=0):
    import torch

    return torch.cat(list(inputs), dim=dim)


def _run_stack(inputs, *, dim=0):
    import torch

    return torch.stack(list(inputs), dim=dim)


def _run_unstack(inputs, *, dim=0, index=None):
    x = _one(inputs, "unstack")
    _pick(range(x.shape[dim]), index, "unstack")
    return x.select(dim, index)


def _rope(x: torch.Tensor, heads: int, to: str) -> torch.Tensor:
    rows, rest = x.shape[0], tuple(x.shape[1:])
    if heads < 1 or rows % heads or (rows // heads) % 2:
        raise PlanError(f"rope_permute: {rows} rows are not {heads} heads of an even size")
    half = rows // heads // 2
    if to == "half":  # Meta's interleaved (x0, y0, x1, y1, ...) -> transformers' halves (x0, x1, ..., y0, y1, ...)
        return x.reshape(heads, half, 2, *rest).transpose(1, 2).reshape(rows, *rest)
    if to == "interleaved":
        return x.reshape(heads, 2, half, *rest).transpose(1, 2).reshape(rows, *rest)
    raise PlanError(f"rope_permute: to= must be 'half' or 'interleaved', not {to!r}")


def _run_rope(inputs, *, heads, to="half"):
    return _rope(_one(inputs, "rope_permute"), heads, to)


def _run_same(inputs):
    first = inputs[0]
    for i, other in enumerate(inputs[1:], 1):
        if tuple(other.shape) != tuple(first.shape):
            raise PlanError(f"same: input {i} has shape {list(other.shape)}, input 0 {list(first.shape)}")
        if not first.is_meta and not bool((other == first).all()):
            raise _NotSame(i)
    return first


class _NotSame(Exception):
    """Replicated copies that differ (raised while loading, turned into a LoadError naming the entry)."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def _inv_concat(value, shapes, *, dim=0):
    import torch

    return list(torch.split(value, [s[dim] for s in shapes], dim=dim))


def _inv_stack(value, shapes, *, dim=0):
    return list(value.unbind(dim))


def _inv_permute(value, shapes, *, dims):
    inverse = sorted(range(len(dims)), key=lambda i: dims[i])
    return [value.permute(*inverse)]


_DIM = ((int,), False)
OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("transpose", "unary", _run_transpose, {"dim0": _DIM, "dim1": _DIM},
           lambda v, shapes, dim0=0, dim1=1: [v.transpose(dim0, dim1)]),
        Op("permute", "unary", _run_permute, {"dims": ((list,), True)}, _inv_permute),
        Op("reshape", "unary", _run_reshape, {"shape": ((list,), True)}, lambda v, shapes, shape: [v.reshape(*shapes[0])]),
        Op("rope_permute", "unary", _run_rope, {"heads": ((int,), True), "to": ((str,), False)},
           lambda v, shapes, heads, to="half": [_rope(v, heads, "interleaved" if to == "half" else "half")]),
        Op("concat", "merge", _run_concat, {"dim": _DIM}, _inv_concat),
        Op("stack", "merge", _run_stack, {"dim": _DIM}, _inv_stack),
        Op("same", "merge", _run_same, {}, lambda v, shapes: [v] * len(shapes)),
        Op("split", "piece", _run_split,
           {"dim": _DIM, "sizes": ((list, type(None)), False), "parts": ((int, type(None)), False), "index": ((int, type(None)), False)}),
        Op("slice", "piece", _run_slice, {"dim": _DIM, "start": _DIM, "stop": ((int, type(None)), False)}),
        Op("unstack", "piece", _run_unstack, {"dim": _DIM, "index": ((int, type(None)), False)}),
    )
}  # fmt: skip
_LIST_ARGS = {"dims", "shape", "sizes"}  # lists of ints
#: Arguments left out of plans and printed expressions when they have these values.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "transpose": {"dim0": 0, "dim1": 1}, "rope_permute": {"to": "half"}, "slice": {"start": 0},
}  # fmt: skip


# ---------------------------------------------------------------------------
# Expressions


@dataclass(frozen=True)
class Expr:
    """A transform: a checkpoint entry (a leaf: ``source`` set) or an op applied to other expressions.

    Leaves in a plan carry the checkpoint tensor's ``shape`` and ``dtype``, so the plan can check
    shapes without the file and run backwards (:func:`reverse`). Hashable: equal subtrees are
    computed once per load.

    Example:
        >>> e = tg.split(tg.transpose("h.0.attn.c_attn.weight"), dim=0, parts=3, index=0)
        >>> str(e)
        'split(transpose(h.0.attn.c_attn.weight), dim=0, parts=3, index=0)'
        >>> Expr.from_dict(e.to_dict()) == e
        True
    """

    op: str | None = None
    args: tuple[tuple[str, Any], ...] = ()
    inputs: tuple[Expr, ...] = ()
    source: str | None = None
    shape: Shape | None = field(default=None, compare=False)
    dtype: str | None = field(default=None, compare=False)

    @property
    def kwargs(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.args}

    def leaves(self) -> Iterator[Expr]:
        """The checkpoint entries, left to right (an entry used twice appears twice)."""
        if self.source is not None:
            yield self
        for x in self.inputs:
            yield from x.leaves()

    def nodes(self) -> Iterator[Expr]:
        """Every subtree, this one first (a subtree used twice appears twice)."""
        yield self
        for x in self.inputs:
            yield from x.nodes()

    def sources(self) -> list[str]:
        """The checkpoint entries this transform reads, in order, each once."""
        return list(dict.fromkeys(leaf.source for leaf in self.leaves() if leaf.source is not None))

    def map_sources(self, fn: Callable[[Expr], Expr]) -> Expr:
        """The same tree with every leaf replaced by ``fn(leaf)``."""
        if self.source is not None:
            return fn(self)
        return Expr(self.op, self.args, tuple(x.map_sources(fn) for x in self.inputs))

    def with_args(self, **changes: Any) -> Expr:
        args = dict(self.args)
        args.update({k: _frozen(v) for k, v in changes.items()})
        return Expr(self.op, tuple(sorted(args.items())), self.inputs, self.source, self.shape, self.dtype)

    def __str__(self) -> str:
        if self.source is not None:
            return self.source
        args = "".join(f", {k}={self.kwargs[k]}" for k in _arg_order(self))
        return f"{self.op}({', '.join(str(x) for x in self.inputs)}{args})"

    def to_dict(self) -> dict[str, Any]:
        if self.source is not None:
            d: dict[str, Any] = {"source": self.source}
            if self.shape is not None:
                d["shape"] = list(self.shape)
            if self.dtype is not None:
                d["dtype"] = self.dtype
            return d
        return {"op": self.op, "args": {k: self.kwargs[k] for k in _arg_order(self)}, "inputs": [x.to_dict() for x in self.inputs]}

    @classmethod
    def from_dict(cls, d: Any, *, _depth: int = 0, _budget: list[int] | None = None) -> Expr:
        """An expression from :meth:`to_dict`'s output, every field checked (a plan file may be hostile).

        Raises:
            PlanError: an unknown op, an argument of the wrong type, more than 64 levels or 100,000 nodes.
        """
        budget = _budget if _budget is not None else [100_000]
        budget[0] -= 1
        if _depth > 64 or budget[0] < 0:
            raise PlanError("not a valid transform: nested deeper than 64 levels or more than 100,000 nodes")
        if not isinstance(d, dict):
            raise PlanError(f"not a valid transform: {type(d).__name__} where an object is expected")
        if "source" in d:
            unknown = set(d) - {"source", "shape", "dtype"}
            shape = d.get("shape")
            if (
                unknown
                or not isinstance(d["source"], str)
                or not d["source"]
                or not (shape is None or (_ints(shape) and len(shape) <= 64 and all(0 <= n < 1 << 40 for n in shape)))
                or not isinstance(d.get("dtype", ""), str)
            ):
                raise PlanError(f"not a valid transform leaf: {json.dumps(d)[:120]}")
            return cls(source=d["source"], shape=None if shape is None else tuple(shape), dtype=d.get("dtype"))
        if set(d) - {"op", "args", "inputs"} or d.get("op") not in OPS:
            raise PlanError(f"not a valid transform: unknown op or fields in {json.dumps(d)[:120]}")
        inputs = d.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise PlanError(f"not a valid transform: {d['op']} without inputs")
        args = d.get("args", {})
        if not isinstance(args, dict):
            raise PlanError(f"not a valid transform: {d['op']} args must be an object")
        return node(d["op"], [cls.from_dict(x, _depth=_depth + 1, _budget=budget) for x in inputs], **args)


def _arg_order(e: Expr) -> list[str]:
    op = OPS[e.op or ""]
    return [k for k in op.args if k in dict(e.args)]


def _frozen(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _as_expr(x: Expr | str) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, str) and x:
        return Expr(source=x)
    raise PlanError(f"a transform input must be a checkpoint entry name or a transform, not {x!r}")


def node(op: str, inputs: Sequence[Expr | str], **args: Any) -> Expr:
    """An op applied to inputs, its arguments checked (the builders below call this).

    Raises:
        PlanError: an unknown op or argument, an argument of the wrong type, the wrong number of inputs.
    """
    spec = OPS.get(op)
    if spec is None:
        raise PlanError(f"unknown transform op {op!r}; known: {', '.join(OPS)}")
    for name, value in args.items():
        if name not in spec.args:
            raise PlanError(f"{op} has no argument {name!r} (it takes {', '.join(spec.args) or 'none'})")
        types, _ = spec.args[name]
        ok = isinstance(value, types) and not isinstance(value, bool)
        if name in _LIST_ARGS and value is not None:
            ok = _ints(value) and len(value) <= 4096
        if not ok:
            raise PlanError(f"{op}: {name}={value!r} is not {' or '.join(t.__name__ for t in types)}")
    for name, (_, required) in spec.args.items():
        if required and args.get(name) is None:
            raise PlanError(f"{op} needs {name}=")
    exprs = tuple(_as_expr(x) for x in inputs)
    if spec.kind != "merge" and len(exprs) != 1:
        raise PlanError(f"{op} takes one input, got {len(exprs)}")
    if spec.kind == "merge" and not exprs:
        raise PlanError(f"{op} needs at least one input")
    if op == "split" and args.get("sizes") is not None and args.get("parts") is not None:
        raise PlanError("split takes sizes= or parts=, not both")
    defaults = _DEFAULTS.get(op, {})
    clean = {k: _frozen(v) for k, v in args.items() if v is not None and not (k in defaults and defaults[k] == v)}
    return Expr(op, tuple(sorted(clean.items())), exprs)


# Builders (re-exported as tg.<name>) ----------------------------------------


def source(key: str) -> Expr:
    """The checkpoint entry ``key`` (``{}`` = a layer number in a rule)."""
    return _as_expr(key)


def transpose(x: Expr | str, *, dim0: int = 0, dim1: int = 1) -> Expr:
    """Swap two dims: ``tg.transpose("h.{}.mlp.c_fc.weight")`` (GPT-2 ``Conv1D`` [in, out] -> ``Linear`` [out, in])."""
    return node("transpose", [x], dim0=dim0, dim1=dim1)


def permute(x: Expr | str, dims: Sequence[int]) -> Expr:
    """Reorder dims: ``tg.permute("conv.kernel", [3, 2, 0, 1])`` (HWIO -> OIHW)."""
    return node("permute", [x], dims=list(dims))


def reshape(x: Expr | str, shape: Sequence[int]) -> Expr:
    """Another shape with the same elements: ``tg.reshape("attn.q", [512, 512])``."""
    return node("reshape", [x], shape=list(shape))


def split(
    x: Expr | str,
    *,
    dim: int = 0,
    sizes: Sequence[int] | None = None,
    parts: int | None = None,
    index: int | None = None,
) -> Expr:
    """One piece of ``x`` along ``dim``: ``sizes=`` (uneven: GQA's q, k, v rows) or ``parts=`` equal ones.

    In a rule whose key has a brace set (``"attn.{q,k,v}.weight"``), ``index`` and ``parts`` come
    from it: ``{"blocks.{}.attn.{q,k,v}.weight": tg.split("blocks.{}.attn.qkv.weight")}``.
    """
    return node("split", [x], dim=dim, sizes=None if sizes is None else list(sizes), parts=parts, index=index)


def slice(x: Expr | str, *, dim: int = 0, start: int = 0, stop: int | None = None) -> Expr:  # noqa: A001
    """Rows ``start:stop`` of ``x`` along ``dim`` (reversible only where the slices cover the tensor)."""
    return node("slice", [x], dim=dim, start=start, stop=stop)


def concat(*xs: Expr | str, dim: int = 0) -> Expr:
    """Join along ``dim``: ``tg.concat("consolidated.00/wq", "consolidated.01/wq", dim=0)``."""
    return node("concat", list(xs), dim=dim)


def stack(*xs: Expr | str, dim: int = 0) -> Expr:
    """A new axis at ``dim``: per-expert weights into one ``[experts, ...]`` tensor."""
    return node("stack", list(xs), dim=dim)


def unstack(x: Expr | str, *, dim: int = 0, index: int | None = None) -> Expr:
    """Entry ``index`` of ``dim`` (one expert of a stacked tensor)."""
    return node("unstack", [x], dim=dim, index=index)


def rope_permute(x: Expr | str, *, heads: int, to: str = "half") -> Expr:
    """Rotary rows from Meta's interleaved layout to transformers' half-split one (``to="half"``) or back.

    ``heads`` is the number of heads the rows hold: ``n_kv_heads`` for k under grouped-query
    attention. Never guessed from shapes (the two layouts have the same shape): a recipe says so.
    """
    return node("rope_permute", [x], heads=heads, to=to)


def same(*xs: Expr | str) -> Expr:
    """Replicated copies (a norm in every tensor-parallel shard): checked equal when loaded, the first taken."""
    return node("same", list(xs))


def is_transform(value: Any) -> bool:
    """Whether a ``rules=`` value is a transform (then its key names a model entry)."""
    return isinstance(value, Expr)


# ---------------------------------------------------------------------------
# Rules: a model template -> an expression over checkpoint templates

_BRACES = re.compile(r"\{([A-Za-z0-9_]+(?:,[A-Za-z0-9_]+)+)\}")


def expand_rule(key: str, expr: Expr) -> list[tuple[str, Expr]]:
    """A rule with a brace set in its key as one rule per alternative, each with its piece index.

    ``"attn.{q,k,v}.weight": split(x)`` -> ``attn.q.weight: split(x, parts=3, index=0)``, ... The
    outermost ``split`` or ``unstack`` without an index takes it.

    Raises:
        PlanError: more than one brace set, or a brace set without a piece op to index.
    """
    sets = _BRACES.findall(key)
    if not sets:
        return [(key, expr)]
    if len(sets) > 1:
        raise PlanError(f"rule {key!r}: one brace set per key")
    alternatives = sets[0].split(",")
    out = []
    for i, alt in enumerate(alternatives):
        indexed = _index_piece(expr, i, len(alternatives))
        if indexed is None:
            raise PlanError(f"rule {key!r}: a brace set needs a split or unstack without index= in the transform")
        out.append((_BRACES.sub(alt, key, count=1), indexed))
    return out


def _index_piece(e: Expr, i: int, n: int) -> Expr | None:
    if e.op in ("split", "unstack") and e.kwargs.get("index") is None:
        extra = {"parts": n} if e.op == "split" and e.kwargs.get("sizes") is None else {}
        return e.with_args(index=i, **extra)
    for j, x in enumerate(e.inputs):
        found = _index_piece(x, i, n)
        if found is not None:
            return Expr(e.op, e.args, (*e.inputs[:j], found, *e.inputs[j + 1 :]))
    return None


def fill(expr: Expr, numbers: Sequence[str]) -> Expr:
    """The expression with each leaf's ``{}`` placeholders filled by ``numbers``, in order."""

    def one(leaf: Expr) -> Expr:
        assert leaf.source is not None
        try:
            return Expr(source=leaf.source.format(*numbers))
        except (IndexError, KeyError, ValueError) as e:
            raise PlanError(f"transform input {leaf.source!r}: cannot fill its placeholders with {list(numbers)} ({e})") from None

    return expr.map_sources(one)


# ---------------------------------------------------------------------------
# Running transforms: shapes at plan time (meta), values at load time (each subtree once)


def infer_shape(expr: Expr) -> Shape:
    """The shape ``expr`` produces, from its leaves' shapes and dtypes, computed on the meta device.

    Raises:
        PlanError: a leaf without a shape, or an op that cannot apply (naming the op and the shapes).
    """
    import torch

    def load(leaf: Expr) -> torch.Tensor:
        if leaf.shape is None:
            raise PlanError(f"transform input {leaf.source!r} has no shape")
        return torch.empty(leaf.shape, dtype=_torch_dtype(leaf.dtype), device="meta")

    cache: dict[Expr, torch.Tensor] = {}
    result = evaluate(expr, load, cache)
    sizes = {leaf.source: math.prod(leaf.shape or ()) for leaf in expr.leaves()}
    for sub, value in cache.items():  # no step may hold more than it reads (concat(x, x, ...) would)
        if sub.source is None and value.numel() > sum(sizes[k] for k in sub.sources()):
            raise PlanError(
                f"{sub.op} makes {value.numel()} elements from {sum(sizes[k] for k in sub.sources())}: a transform "
                "may not produce more elements than the checkpoint entries it reads"
            )
    return tuple(result.shape)


def _torch_dtype(name: str | None) -> torch.dtype:
    import torch

    value = getattr(torch, name or "float32", None)
    return value if isinstance(value, torch.dtype) else torch.float32


def evaluate(
    expr: Expr,
    load: Callable[[Expr], torch.Tensor],
    cache: dict[Expr, torch.Tensor] | None = None,
    *,
    keep: Callable[[Expr], bool] | None = None,
) -> torch.Tensor:
    """The tensor ``expr`` computes; ``load(leaf)`` gives a checkpoint tensor. Subtrees in ``cache`` are reused.

    Pass one ``cache`` for a whole load: a fused ``qkv`` is read and transposed once, and its three
    pieces are views of that one result. ``keep(subtree)`` says which results go into ``cache``
    (default: all of them); a load keeps only those another entry still needs.

    A ``concat`` of ``stack``s (per-expert weights into one fused ``gate_up``), or any tree of the two,
    is written straight into one result: each checkpoint tensor is copied once, no inner ``stack`` is
    held on its own.

    Raises:
        PlanError: an op cannot apply to these shapes (``RuntimeError`` from torch, with the op named).
        LoadError: ``same`` inputs that differ.
    """
    cache = {} if cache is None else cache
    hit = cache.get(expr)
    if hit is not None:
        return hit
    if expr.source is not None:
        value = load(expr)
    elif expr.op in _GATHER and any(x.op in _GATHER and x not in cache for x in expr.inputs):
        value = _gather(expr, load, cache, keep)
    else:
        value = _apply(expr, [evaluate(x, load, cache, keep=keep) for x in expr.inputs])
    if keep is None or keep(expr):
        cache[expr] = value
    return value


def _apply(expr: Expr, inputs: list[torch.Tensor]) -> torch.Tensor:
    """One op on its input values; torch's errors named with the op and the shapes."""
    try:
        return OPS[expr.op or ""].run(inputs, **expr.kwargs)
    except PlanError as e:
        raise PlanError(f"{expr}: {e}") from None
    except _NotSame as e:
        raise LoadError(
            "Replicated copies differ:",
            [f"{expr.inputs[e.index]} is not equal to {expr.inputs[0]} (same() takes one copy of equal tensors)"],
        ) from None
    except (RuntimeError, IndexError, TypeError, ValueError) as e:
        shapes = ", ".join(str(list(t.shape)) for t in inputs)
        raise PlanError(f"{expr.op} cannot apply to shapes {shapes}: {e}") from None


#: Ops whose nested trees are written into one result (:func:`_gather`), not op by op.
_GATHER = frozenset({"concat", "stack"})


def _gather(expr: Expr, load: Callable[[Expr], torch.Tensor], cache: dict, keep: Callable[[Expr], bool] | None):
    """A tree of ``concat`` / ``stack`` nodes as one tensor, each other input copied once into its place.

    The result's shape and dtype come from the same ops run on meta (torch's own shape checks and type
    promotion); then every input is copied into its view of the result (``narrow`` for concat,
    ``select`` for stack). Bit-identical to running the ops one by one, without their intermediates.
    """
    import torch

    def collect(e: Expr):  # a gather node's children, other subtrees evaluated (each once, as usual)
        if e.op in _GATHER and e not in cache:
            return (e, [collect(x) for x in e.inputs])
        return evaluate(e, load, cache, keep=keep)

    def on_meta(tree) -> torch.Tensor:
        if isinstance(tree, torch.Tensor):
            return torch.empty_like(tree, device="meta")
        e, children = tree
        return _apply(e, [on_meta(c) for c in children])

    def write(tree, out: torch.Tensor) -> None:
        if isinstance(tree, torch.Tensor):
            out.copy_(tree)
            return
        e, children = tree
        dim = e.kwargs.get("dim", 0)
        if e.op == "stack":
            for i, c in enumerate(children):
                write(c, out.select(dim, i))
            return
        start = 0
        for c in children:
            shape = on_meta(c).shape
            if len(shape) == 1 and shape[0] == 0 and out.dim() > 1:
                continue  # torch.cat skips a legacy empty [0] input of another rank
            write(c, out.narrow(dim, start, shape[dim]))
            start += shape[dim]

    def first(tree) -> torch.Tensor:
        return tree if isinstance(tree, torch.Tensor) else first(tree[1][0])

    tree = collect(expr)
    spec = on_meta(tree)
    out = torch.empty(spec.shape, dtype=spec.dtype, device=first(tree).device)
    write(tree, out)
    return out


# ---------------------------------------------------------------------------
# Running a plan backwards


def reverse(plan: Plan, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's tensors in the checkpoint's names, layout and dtypes: the plan run backwards.

    Copies go back under their checkpoint names, transforms are inverted (a transpose transposed
    back, pieces of a split put together, a concatenation split, a stack unstacked, a rotary
    permutation undone, replicated copies written to every name), each tensor cast to the
    checkpoint's dtype. A checkpoint loaded and reversed gives its tensors back bit for bit.
    Checkpoint entries the plan did not use cannot come back and are left out.

    Example:
        >>> plan = tg.plan(model, "gpt2/", rules=tg.recipe("gpt2-to-nanogpt", n_layer=12, n_embd=768))
        >>> tg.load(model, "gpt2/", plan=plan)
        >>> back = tg.transforms.reverse(plan, model.state_dict())   # GPT-2's names and Conv1D layout

    Raises:
        PlanError: an entry was adapted (adapters are not reversible), pieces of a tensor are
            missing (a slice dropped rows), or the state dict lacks an entry the plan loads.
    """
    out: dict[str, torch.Tensor] = {}
    pieces: dict[Expr, dict[int, tuple[torch.Tensor, str]]] = {}
    origin: dict[str, str] = {}  # checkpoint key -> the model entry it came back from
    for name, e in plan.entries.items():
        if not e.loads:
            continue
        if name not in state_dict:
            raise PlanError(f"cannot reverse the plan: the state dict has no {name!r}")
        value = state_dict[name]
        if e.action == "adapt":
            adapter = (e.adapter or {}).get("name", "?")
            raise PlanError(f"cannot reverse the plan: {name!r} was adapted ({adapter}), which has no inverse")
        if e.transform is None:
            assert e.source is not None
            shape = tuple(e.source_shape) if e.source_shape is not None else tuple(value.shape)
            _put(out, origin, e.source, value.reshape(shape), e.source_dtype, name)
            continue
        _unwind(Expr.from_dict(e.transform), value, out, pieces, origin, name)
    while pieces:
        parent, got = pieces.popitem()
        whole = _assemble(parent, got)
        _unwind(parent.inputs[0], whole, out, pieces, origin, " + ".join(dict.fromkeys(w for _, w in got.values())))
    return out


def _put(out, origin, key: str, value, dtype: str | None, why: str) -> None:
    target = _torch_dtype(dtype) if dtype else value.dtype
    value = value.detach().to(device="cpu", dtype=target).contiguous()
    if key in out:
        if out[key].shape != value.shape or not bool((out[key] == value).all()):
            raise PlanError(f"cannot reverse the plan: {origin[key]!r} and {why!r} give different values for {key!r}")
        return
    out[key] = value
    origin[key] = why


def _unwind(e: Expr, value, out, pieces, origin, why: str) -> None:
    """Push a value backwards through ``e`` until it reaches leaves (written) or piece ops (collected)."""
    if e.source is not None:
        _put(out, origin, e.source, value, e.dtype, why)
        return
    op = OPS[e.op or ""]
    if op.kind == "piece":
        child = e.inputs[0]
        key = e.kwargs.get("index", e.kwargs.get("start", 0))
        whole = Expr(e.op, tuple((k, v) for k, v in e.args if k not in ("index", "start", "stop")), (child,))
        pieces.setdefault(whole, {})[key] = (value, why)
        return
    shapes = [_shape_of(x) for x in e.inputs]
    assert op.invert is not None
    for x, v in zip(e.inputs, op.invert(value, shapes, **e.kwargs)):
        _unwind(x, v, out, pieces, origin, why)


def _shape_of(e: Expr) -> Shape:
    return infer_shape(e)


def _assemble(parent: Expr, got: dict[int, tuple[Any, str]]):
    """The tensor that the collected pieces are parts of (``parent`` is the piece op without its position)."""
    import torch

    child = parent.inputs[0]
    full = _shape_of(child)
    args = parent.kwargs
    dim = args.get("dim", 0)
    where = f"{child}"
    if parent.op == "unstack":
        missing = [i for i in builtins.range(full[dim]) if i not in got]
        if missing:
            raise PlanError(f"cannot reverse the plan: entries {missing[:8]} of {where} along dim {dim} are not in the model")
        return torch.stack([got[i][0] for i in builtins.range(full[dim])], dim=dim)
    if parent.op == "split":
        n = len(args["sizes"]) if args.get("sizes") is not None else args.get("parts", 0)
        missing = [i for i in builtins.range(n) if i not in got]
        if missing:
            raise PlanError(f"cannot reverse the plan: pieces {missing} of {where} are not in the model")
        return torch.cat([got[i][0] for i in builtins.range(n)], dim=dim)
    # slice: the slices must tile the whole dim
    at, parts = 0, []
    for start in sorted(got):
        value = got[start][0]
        if start != at:
            break
        parts.append(value)
        at += value.shape[dim]
    if at != full[dim]:
        raise PlanError(
            f"cannot reverse the plan: the slices of {where} cover rows 0:{at} of {full[dim]} along dim {dim}; "
            "the rest is not in the model"
        )
    return torch.cat(parts, dim=dim)
