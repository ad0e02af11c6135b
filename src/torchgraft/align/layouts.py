"""Layouts: which pairs need a tensor transform (a transpose, one piece of a fused tensor), by evidence only.

Two codebases may store the same layer in different layouts: transformers' GPT-2 ``Conv1D`` keeps
a weight as ``[in, out]`` where ``nn.Linear`` keeps ``[out, in]``; timm fuses ``q``, ``k``, ``v``
into one ``qkv`` tensor of ``[3D, D]`` rows where Hugging Face keeps three. This module reads
names, shapes and module types only (never tensor bytes) and says, per pair, how the checkpoint
tensor becomes the model's (a :class:`Layout`), with a confidence and a reason.

What it never does: guess. A square weight (``[D, D]``) looks the same either way, so it is
transposed only when evidence says so (:func:`orient`): a sibling in the same module, or in the
same layer pattern, whose non-square weight is transposed (and none that is not), or, for a model
module of transformers' ``Conv1D`` type, the other ``Conv1D`` modules of the model. Without
evidence, and with transposes found elsewhere in the model, it is reported ambiguous. Rotary
permutations (``rope_permute``) cannot be seen in shapes at all: they come from a recipe.

Example:
    >>> o = orient([("h.0.attn.c_attn.weight", "h.0.attn.c_attn.weight", (96, 32), (32, 96)),
    ...             ("h.0.attn.c_proj.weight", "h.0.attn.c_proj.weight", (32, 32), (32, 32))])
    >>> sorted(o.transposed)
    ['h.0.attn.c_attn.weight', 'h.0.attn.c_proj.weight']
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..keys import split_key
from .units import format_shape, parent
from .vocabulary import GENERIC, conflict, role, tokens

__all__ = [
    "FUSED_PARTS",
    "TRANSPOSED_TYPES",
    "Layout",
    "Orientation",
    "fused_name",
    "fused_order",
    "is_transpose",
    "layer_scope",
    "orient",
    "transposed_modules",
]

#: Model module types that store a linear map as ``[in, out]`` (the transpose of ``nn.Linear``).
TRANSPOSED_TYPES = frozenset({"transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.Conv1D"})

#: The parts a fused tensor is made of, in the order the fused tensor holds them; each part is the
#: words that name it. A model's sibling modules named after 2-3 parts of one group are the pieces.
FUSED_PARTS: tuple[tuple[frozenset[str], ...], ...] = tuple(
    tuple(frozenset(words.split()) for words in group)
    for group in (
        ("q query wq", "k key wk", "v value wv"),
        ("gate w1", "up w3"),
    )
)


@dataclass(frozen=True)
class Layout:
    """How checkpoint tensors become a model entry.

    A piece of a fused tensor: the checkpoint tensor transposed first (when ``transpose``), then
    piece ``index`` of a split along dim 0 into ``sizes`` rows. A fused model tensor: the
    checkpoint tensor and those in ``join`` concatenated along dim 0, then transposed (when
    ``transpose``). Neither: just the transpose.
    """

    transpose: bool = False
    sizes: tuple[int, ...] | None = None
    index: int | None = None
    join: tuple[str, ...] = ()

    def describe(self, key: str) -> str:
        """``split(transpose(key), dim=0, sizes=[32, 32, 32], index=0)``: as the transforms print it."""
        text = f"concat({', '.join((key, *self.join))}, dim=0)" if self.join else key
        text = f"transpose({text})" if self.transpose else text
        if self.sizes is not None:
            text = f"split({text}, dim=0, sizes={list(self.sizes)}, index={self.index})"
        return text


def is_transpose(model_shape: tuple[int, ...], ckpt_shape: tuple[int, ...]) -> bool:
    """A 2-D, non-square ``model_shape`` that is ``ckpt_shape`` transposed."""
    return len(model_shape) == 2 and model_shape[0] != model_shape[1] and tuple(ckpt_shape) == model_shape[::-1]


def _square(shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and shape[0] == shape[1]


_NUMBER = re.compile(r"^\d+$")


def _signature(rows: list[tuple[str, tuple[int, ...], str]], *, flip: bool = False) -> tuple:
    out = []
    for _attr, shape, dtype in rows:
        f = _floating(dtype)
        out.append((tuple(shape)[::-1] if flip and f and len(shape) == 2 else tuple(shape), "f" if f else "i"))
    return tuple(sorted(out))


def _floating(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat", "complex"))


def transposed_modules(
    model: Iterable[tuple[str, tuple[int, ...], str]], ckpt: Iterable[tuple[str, tuple[int, ...], str]]
) -> frozenset[str]:
    """Checkpoint modules whose 2-D weights are stored transposed (``[in, out]``), judged against the model's modules.

    ``model`` and ``ckpt`` are the leftover ``(name, shape, dtype)`` on each side. A checkpoint
    module is transposed when its shapes, transposed, are those of a model module and, as they
    are, those of none. When both fit (no bias: ``[D, 4D]`` could be ``fc2`` or ``fc1``
    transposed), the modules of its layer decide: transposed when some there are surely
    transposed and none is surely not. Square-only modules are never taken transposed here (their
    shapes say nothing: :func:`orient` decides them by the same kind of evidence).

    Example:
        >>> sorted(transposed_modules([("fc.weight", (8, 4), "float32"), ("fc.bias", (8,), "float32")],
        ...                           [("c_fc.weight", (4, 8), "float32"), ("c_fc.bias", (8,), "float32")]))
        ['c_fc']
    """

    def modules(rows: Iterable[tuple[str, tuple[int, ...], str]]) -> dict[str, list[tuple[str, tuple[int, ...], str]]]:
        out: dict[str, list[tuple[str, tuple[int, ...], str]]] = {}
        for name, shape, dtype in rows:
            module, attr = split_key(name)
            out.setdefault(module, []).append((attr, tuple(shape), dtype))
        return out

    model_sigs = {_signature(rows) for rows in modules(model).values()}
    sure: dict[str, bool] = {}
    unsure: list[str] = []
    for module, rows in modules(ckpt).items():
        if not any(len(s) == 2 and s[0] != s[1] and _floating(d) for _a, s, d in rows):
            continue
        straight, flipped = _signature(rows) in model_sigs, _signature(rows, flip=True) in model_sigs
        if flipped and not straight:
            sure[module] = True
        elif straight and not flipped:
            sure[module] = False
        elif straight and flipped:
            unsure.append(module)

    def scope(module: str) -> str:
        return layer_scope(module + ".x") or parent(module)

    out = {m for m, t in sure.items() if t}
    for module in unsure:
        votes = [t for m, t in sure.items() if scope(m) == scope(module)]
        if votes and all(votes):
            out.add(module)
    return frozenset(out)


def layer_scope(key: str) -> str | None:
    """The layer pattern of a key: its path up to the last number, numbers as ``{}``; ``None`` outside layers."""
    parts = key.split(".")
    last = max((i for i, p in enumerate(parts[:-1]) if _NUMBER.match(p)), default=None)
    if last is None:
        return None
    return ".".join("{}" if _NUMBER.match(p) else p for p in parts[: last + 1])


def fused_order(names: Iterable[str]) -> list[int] | None:
    """Positions in a fused tensor of sibling modules ``names`` (``["v", "q", "k"]`` -> ``[2, 0, 1]``), or ``None``.

    Every name must say exactly one part of one :data:`FUSED_PARTS` group, each part once.
    """
    found = _fused_parts(list(names))
    return None if found is None else found[1]


def _words(name: str) -> set[str]:
    """Words of a module name, with and without their numbers (``w1`` is Meta's gate: ``{"w1", "w"}``)."""
    return set(tokens(name)) | {w for w in re.split(r"[._\-]", name.lower()) if w}


def _fused_parts(names: list[str]) -> tuple[tuple[frozenset[str], ...], list[int]] | None:
    for group in FUSED_PARTS:
        positions = []
        for name in names:
            words = _words(name)
            hits = [i for i, part in enumerate(group) if words & part]
            if len(hits) != 1:
                break
            positions.append(hits[0])
        else:
            if len(set(positions)) == len(positions):
                return group, positions
    return None


def fused_name(whole: str, pieces_parent: str, pieces: list[str]) -> str | None:
    """Why module ``whole`` may be the fused tensor of sibling modules ``pieces`` (under ``pieces_parent``), or None.

    Its own name names every piece (``qkv``, ``query_key_value``, ``gate_up``), or it agrees with
    the pieces' parent (``c_attn`` with ``attention``). A module named for something else
    (``gate_proj`` for ``wq``, ``wk``, ``wv``) is never their fused tensor, whatever its shape.

    Example:
        >>> fused_name("blocks.0.attn.qkv", "layer.0.attention", ["query", "key", "value"])
        'qkv names q, k, v'
    """
    name = whole.rpartition(".")[2]
    words = _words(name)
    found = _fused_parts(pieces)
    if found is None:
        return None
    group, order = found
    parts = [group[i] for i in sorted(order)]
    letters = "".join(next((w for w in p if len(w) == 1), "?") for p in parts)
    if all(any(w in p for w in words) for p in parts) or letters in words:
        return f"{name} names {', '.join(n for _, n in sorted(zip(order, pieces, strict=True)))}"
    mine, theirs = role(whole), role(pieces_parent)
    if [w for w in theirs if w not in GENERIC] and not conflict(mine, theirs):
        return f"{whole.rpartition('.')[2]} ~ {pieces_parent.rpartition('.')[2]}"
    return None


def _scopes(key: str, kind: str | None) -> list[tuple[str, str | None, str | None]]:
    """Where evidence for ``key`` is looked for, nearest first: its module's siblings, its layer pattern, its type.

    Each scope holds only modules of the same type (``kind``) when types are known.
    """
    out = [("siblings", parent(split_key(key)[0]), kind)]
    layer = layer_scope(key)
    if layer is not None:
        out.append(("layer", layer, kind))
    if kind in TRANSPOSED_TYPES:
        out.append(("type", None, kind))
    return out


def _scope_words(scope: tuple[str, str | None, str | None]) -> tuple[str, float]:
    what, where, kind = scope
    if what == "siblings":
        return f"its siblings in {where or '<root>'}", TRANSPOSE_BY_SIBLINGS
    if what == "layer":
        return f"the layers {where}", TRANSPOSE_BY_LAYER
    return f"the model's other {(kind or '').rpartition('.')[2]} modules", TRANSPOSE_BY_TYPE


@dataclass
class Orientation:
    """What :func:`orient` decided: ``transposed`` (target -> ``(confidence, reason)``) and ``ambiguous`` records."""

    transposed: dict[str, tuple[float, str]] = field(default_factory=dict)
    ambiguous: list[dict[str, Any]] = field(default_factory=list)


#: Confidences of transposes (see :class:`torchgraft.align.Confidences` for the pairs themselves).
TRANSPOSE_SEEN = 0.9  # the shapes are each other's transpose (and the names or structure pair them)
TRANSPOSE_BY_SIBLINGS = 0.85  # square, its siblings' non-square weights are all transposed
TRANSPOSE_BY_LAYER = 0.8  # square, the same layer pattern's non-square weights are all transposed
TRANSPOSE_BY_TYPE = 0.8  # square, the model's other modules of its type are all transposed


def orient(
    pairs: Iterable[tuple[str, str, tuple[int, ...], tuple[int, ...]]],
    *,
    module_types: Mapping[str, str] | None = None,
    flipped: Mapping[str, bool] | None = None,
    foreign: Iterable[str] = (),
) -> Orientation:
    """Decide which 2-D pairs are transposed: the non-square ones by their shapes, the square ones by evidence.

    Args:
        pairs: ``(target, source, model_shape, checkpoint_shape)`` of every pair made so far (by name,
            by rules or by alignment), floating point tensors only.
        module_types: model module path -> the module's type (``module.qualname``), where known.
        flipped: targets whose orientation is already decided elsewhere (a fused tensor's pieces):
            ``True`` transposed, ``False`` not. They count as evidence and are not decided again.
        foreign: targets paired by structure across naming schemes (another codebase). Such a
            square pair into a model module of a :data:`TRANSPOSED_TYPES` type (``Conv1D``) needs
            evidence even when nothing else is transposed: the model stores ``[in, out]``, most
            other codebases ``[out, in]``, and the shapes cannot tell.

    Returns:
        An :class:`Orientation`: the pairs to transpose, with a confidence and a reason, and an
        ambiguous record for each square pair that could be either and that nothing decides.

    Example:
        >>> orient([("fc.weight", "fc.weight", (8, 4), (4, 8))]).transposed["fc.weight"][0]
        0.9
    """
    pairs = list(pairs)
    types = module_types or {}
    decided = dict(flipped or {})
    out = Orientation()
    evidence: dict[str, bool] = dict(decided)  # target -> transposed?, for non-square 2-D pairs
    for target, source, mshape, cshape in pairs:
        if target in decided or len(mshape) != 2 or _square(mshape):
            continue
        if is_transpose(mshape, cshape):
            evidence[target] = True
            out.transposed[target] = (
                TRANSPOSE_SEEN,
                f"shape {format_shape(mshape)} is the checkpoint's {format_shape(tuple(cshape))} transposed",
            )
        elif tuple(cshape) == mshape:
            evidence[target] = False
    foreign = set(foreign)

    def suspect(target: str) -> bool:  # a square pair whose layout differs by default
        return target in foreign and types.get(split_key(target)[0]) in TRANSPOSED_TYPES

    if not any(evidence.values()) and not any(suspect(t) for t, *_ in pairs):
        return out  # nothing anywhere is transposed: a square pair is what it looks like

    # evidence indexed by scope: (kind of scope, scope, module type) -> [(target, transposed?)]
    index: dict[tuple[str, str | None, str | None], list[tuple[str, bool]]] = defaultdict(list)
    for key, flip in evidence.items():
        kind = types.get(split_key(key)[0])
        for scope in _scopes(key, kind):
            index[scope].append((key, flip))

    def decide(target: str, mshape: tuple[int, ...]) -> tuple[float, str] | str | None:
        """``(confidence, reason)`` to transpose, ``None`` to keep, or why it is ambiguous."""
        kind = types.get(split_key(target)[0])
        for scope in _scopes(target, kind):
            votes = index.get(scope)
            if not votes:
                continue
            words, confidence = _scope_words(scope)
            flips = sorted(k for k, v in votes if v)
            if not flips:
                return None
            if len(flips) < len(votes):
                return f"the non-square weights of {words} are transposed in some places and not in others"
            names = ", ".join(split_key(k)[0] for k in flips[:3]) + (", ..." if len(flips) > 3 else "")
            shape = format_shape(mshape)
            return confidence, f"square {shape}: the non-square weights of {words} are all transposed ({names})"
        if not any(evidence.values()) and not suspect(target):
            return None
        why = "nothing near it (its module, its layer) has a non-square weight that says which way"
        if suspect(target):
            kind = types[split_key(target)[0]].rpartition(".")[2]
            return f"{why}; the model's {kind} stores [in, out], a checkpoint of another codebase may not"
        return f"{why}, and other weights of this checkpoint are transposed"

    for target, source, mshape, cshape in pairs:
        if target in decided or not _square(mshape) or tuple(cshape) != mshape:
            continue
        verdict = decide(target, mshape)
        if isinstance(verdict, tuple):
            out.transposed[target] = verdict
        elif isinstance(verdict, str):
            out.ambiguous.append(
                {
                    "targets": [target],
                    "candidates": [source],
                    "reason": f"square {format_shape(mshape)}: could be transposed or not; {verdict}",
                }
            )
    return out
