"""The aligner: pairs leftover model units with leftover checkpoint units, region by region.

See :mod:`torchgraft.align` for the algorithm in words. Names used throughout: the *model*
side and the *checkpoint* side (``ckpt``); an *item* is a unit or a subtree (node); a
*class* is the items of one signature in one region; a *region* is a pair of subtrees
(or everything left over) whose insides are paired with each other.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING, Any, Literal

from ..keys import natural_key
from .layouts import Layout, fused_name, fused_order, transposed_modules
from .units import (
    NUM_BATCHES_TRACKED,
    Node,
    Side,
    Tensor,
    Unit,
    compatible,
    describe,
    distinctive,
    format_shape,
    nodes,
    ordinal,
    parent,
    total_order,
)
from .vocabulary import agree, conflict, path_order, relative, role

if TYPE_CHECKING:
    from ..sources import Source

__all__ = ["CONFIDENCE", "MIN_CONFIDENCE", "Aligned", "Alignment", "Confidences", "align", "source_order_trusted"]

_UNORDERED_FORMATS = ("safetensors", "sharded")  # keys sorted (by dtype, then name), not network order


@dataclass(frozen=True)
class Confidences:
    """Every confidence the aligner gives a pair, by the evidence behind it (one table: change them here).

    Attributes:
        minimum: pairs below this are never made (:data:`MIN_CONFIDENCE`).
        only_in_region: the only item of its shapes in a region both sides fill with the same shapes.
        last_in_region: as above, but it was one of several and the others were placed first.
        unique_everywhere: the only item of its shapes in the whole model and the whole checkpoint,
            big enough that a coincidence is unlikely, and names do not contradict it.
        single_names_agree: the only item of its shapes left in the region; names agree.
        single_neighbours: the only item of its shapes left in the region; its neighbour is paired
            next to its candidate.
        rank_by_file_order: one of several, paired by rank in model order and the checkpoint's
            (trusted) file order, in a complete region or everywhere-unique class.
        rank_by_path_numbers: the same, ranks from the numbers in paths (``layer.2`` < ``layer.10``):
            numbers are written on purpose, a file order can be accidental.
        rank_support_bonus: added to a rank pair that names or neighbours also support.
        rank_ceiling: a rank pair is never surer than this.
        rank_supported_partial: a rank pair in a region that also holds unrelated modules: made only
            when names or neighbours support it.
        names_agree_complete, names_agree_partial: several of one shape, told apart by names, in a
            complete region or not.
        neighbours_complete, neighbours_partial: several of one shape, told apart by neighbours.
        gap_same_shapes: what is left between two paired units, in the same order on both sides.
        gap_other_shapes: the same, or the only module left on either side, with the same layout
            but other sizes: a shape mismatch for ``adapt=``, not a load.
        attribute_by_order: inside a paired module, attributes with other names and equal shapes
            paired by their order in the (trusted) file.
        single_tensor: the only tensor of its shape in the model and in the checkpoint, big or named alike.
        fused_in_layer: a tensor whose rows are the sum of 2-3 sibling modules' rows on the other side
            (``qkv`` for ``q``, ``k``, ``v``; either side fused), their order told by their names, the
            fused module named for them, the only such tensor in the same layer (same numbers in the path).
    """

    minimum: float = 0.5
    only_in_region: float = 0.95
    last_in_region: float = 0.85
    unique_everywhere: float = 0.9
    single_names_agree: float = 0.8
    single_neighbours: float = 0.75
    rank_by_file_order: float = 0.85
    rank_by_path_numbers: float = 0.9
    rank_support_bonus: float = 0.05
    rank_ceiling: float = 0.95
    rank_supported_partial: float = 0.75
    names_agree_complete: float = 0.8
    names_agree_partial: float = 0.7
    neighbours_complete: float = 0.75
    neighbours_partial: float = 0.7
    gap_same_shapes: float = 0.75
    gap_other_shapes: float = 0.6
    attribute_by_order: float = 0.75
    single_tensor: float = 0.8
    fused_in_layer: float = 0.8


#: The confidences the aligner uses (see :class:`Confidences` for why each is what it is).
CONFIDENCE = Confidences()
#: Pairs are only made with at least this confidence.
MIN_CONFIDENCE = CONFIDENCE.minimum


# ---------------------------------------------------------------------------
# Public results


@dataclass(frozen=True)
class Aligned:
    """One pair: model entry ``target`` receives checkpoint entry ``source``.

    ``exact`` is false when the shapes differ (a shape mismatch for ``adapt=`` to handle).
    ``layout`` says how the checkpoint tensor becomes the model's when it is not as it is: stored
    transposed (a ``Conv1D`` module), one piece of a fused tensor, or the first of the pieces a fused
    model tensor is joined from (``None``: as it is; square pairs are decided later, by
    :func:`.layouts.orient`).
    """

    target: str
    source: str
    confidence: float
    reason: str
    exact: bool = True
    layout: Layout | None = None


@dataclass
class Alignment:
    """What :func:`align` found: ``pairs`` and ``ambiguous`` records.

    An ambiguous record is ``{"targets": [model keys], "candidates": [checkpoint keys],
    "reason": str}``: same-shaped candidates that could not be told apart; nothing of it is loaded.
    """

    pairs: list[Aligned] = field(default_factory=list)
    ambiguous: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------
# The aligner


@dataclass(eq=False)
class _Region:
    """A model subtree and a checkpoint subtree whose units are paired with each other."""

    model_root: str
    ckpt_root: str
    model_units: list[Unit]
    ckpt_units: list[Unit]
    complete: bool  # both sides hold the same signatures
    confidence: float = 1.0  # the ceiling for pairs inside (the confidence of the pair that made the region)
    reason: str = ""  # why the region's roots were paired, appended to the reasons inside
    start_counts: dict[tuple[str, tuple], tuple[int, int]] = field(default_factory=dict)  # (level, sig) -> counts
    why: dict[int, str] = field(default_factory=dict)  # id(unit) -> why it was left unpaired
    vetoed: set[int] = field(default_factory=set)  # id(unit): signals contradicted each other; never paired here
    ckpt_ids: set[int] | None = None  # id(unit) of ckpt_units, built on first use

    @property
    def context(self) -> str:
        if not self.model_root and not self.ckpt_root:
            return "the unmatched entries"
        return f"{self.model_root or '<root>'} / {self.ckpt_root or '<root>'}"


Item = Unit | Node
Pair = tuple[Any, Any, float, str]  # (model item, checkpoint item, confidence, reason)


class _Aligner:
    """Pairs the leftover units of ``model`` with those of ``ckpt``; :meth:`run` returns the :class:`Alignment`.

    ``anchors`` (model module path -> checkpoint module path) are modules already matched by
    name: they give order and neighbours. ``model_leftover`` / ``ckpt_leftover`` are the entry
    keys that may be paired (single tensors are only taken from these).
    """

    def __init__(
        self,
        model: Side,
        ckpt: Side,
        anchors: Mapping[str, str],
        model_leftover: frozenset[str],
        ckpt_leftover: frozenset[str],
        model_order: str = "registration",
    ):
        self.model, self.ckpt = model, ckpt
        # "registration" (state-dict order) or "execution" (traced): named in the reasons that rely on it
        self.model_order = model_order
        self.model_leftover, self.ckpt_leftover = model_leftover, ckpt_leftover
        self.model_to_ckpt: dict[Unit, Unit] = {}
        self.ckpt_to_model: dict[Unit, Unit] = {}
        for model_path, ckpt_path in anchors.items():
            m, c = model.units.get(model_path), ckpt.units.get(ckpt_path)
            if m is not None and c is not None and m not in self.model_to_ckpt and c not in self.ckpt_to_model:
                self.model_to_ckpt[m], self.ckpt_to_model[c] = c, m
        self.owner: dict[int, _Region] = {}  # id(unit) -> the smallest region holding it
        self.regions: list[_Region] = []
        self.result = Alignment()
        self.paired_model: set[str] = set()  # entry keys
        self.paired_ckpt: set[str] = set()

    # Regions ---------------------------------------------------------------
    def run(self) -> Alignment:
        self._fused()
        model_units = [u for u in self.model.seq if u.leftover and u not in self.model_to_ckpt]
        ckpt_units = [u for u in self.ckpt.seq if u.leftover and u not in self.ckpt_to_model]
        if model_units and ckpt_units:
            complete = Counter(u.sig for u in model_units) == Counter(u.sig for u in ckpt_units)
            self._region(_Region("", "", model_units, ckpt_units, complete))
        self._single_tensors()
        self._unnamed_fused()
        self._record_ambiguous()
        self.result.ambiguous.sort(key=lambda a: natural_key(a["targets"][0]))
        return self.result

    def _free(self, region: _Region) -> tuple[list[Unit], list[Unit]]:
        """Units of ``region`` not yet paired and not handed to a smaller region."""
        return (
            [u for u in region.model_units if self._is_free(region, u, self.model_to_ckpt)],
            [u for u in region.ckpt_units if self._is_free(region, u, self.ckpt_to_model)],
        )

    def _is_free(self, region: _Region, unit: Unit, pairs: dict[Unit, Unit]) -> bool:
        return unit not in pairs and self.owner.get(id(unit)) is region

    def _region(self, region: _Region) -> None:
        self.regions.append(region)
        for u in [*region.model_units, *region.ckpt_units]:
            self.owner[id(u)] = region
        for level in ("node", "unit"):
            model_items, ckpt_items = self._items(region, level)
            n_model, n_ckpt = Counter(i.sig for i in model_items), Counter(i.sig for i in ckpt_items)
            for sig in n_model.keys() | n_ckpt.keys():
                region.start_counts[level, sig] = (n_model[sig], n_ckpt[sig])
        while self._pass(region, "node") or self._pass(region, "unit"):
            pass
        self._gaps(region)

    def _items(self, region: _Region, level: str) -> tuple[list, list]:
        model_free, ckpt_free = self._free(region)
        if level == "unit":
            return model_free, ckpt_free
        return nodes(model_free, region.model_root), nodes(ckpt_free, region.ckpt_root)

    def _pass(self, region: _Region, level: str) -> bool:
        """Pair classes of one level (subtrees or units) in ``region``; whether anything was paired."""
        model_items, ckpt_items = self._items(region, level)
        classes: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
        for i in model_items:
            classes[i.sig][0].append(i)
        for i in ckpt_items:
            classes[i.sig][1].append(i)
        progress = False

        def order(sig: tuple) -> tuple:  # one-to-one classes first: their pairs anchor the order of the others
            in_model, in_ckpt = classes[sig]
            return (max(len(in_model), len(in_ckpt)) > 1, -len(sig), min(i.lo for i in in_model + in_ckpt))

        for sig in sorted(classes, key=order):
            in_model, in_ckpt = classes[sig]
            if progress and max(len(in_model), len(in_ckpt)) > 1:
                return True
            in_model = [i for i in in_model if all(self._is_free(region, u, self.model_to_ckpt) for u in i.units)]
            in_ckpt = [i for i in in_ckpt if all(self._is_free(region, u, self.ckpt_to_model) for u in i.units)]
            if not in_model or not in_ckpt:
                continue
            for m, c, confidence, reason in self._resolve(region, level, in_model, in_ckpt):
                progress = True
                confidence = min(confidence, region.confidence)
                if level == "node":  # units inside inherit the nearest reason that is not plain uniqueness
                    why = region.reason if reason.startswith(("only", "last")) else f"{m.path} = {c.path}: {reason}"
                    self._region(_Region(m.path, c.path, m.units, c.units, True, confidence, why))
                else:
                    self._pair_units(m, c, confidence, reason + (f"; {region.reason}" if region.reason else ""))
        return progress

    # One class -------------------------------------------------------------
    def _resolve(self, region: _Region, level: str, model_items: list, ckpt_items: list) -> list[Pair]:
        """Pairs for one class: items of one signature, ``model_items`` and ``ckpt_items``, in ``region``."""
        model_items = sorted(model_items, key=lambda i: i.lo)
        sig, n_model, n_ckpt = model_items[0].sig, len(model_items), len(ckpt_items)
        what, context = describe(model_items[0]), region.context
        everywhere = self.model.count(level, sig) == n_model and self.ckpt.count(level, sig) == n_ckpt
        if n_model == n_ckpt == 1:
            return self._resolve_one(region, level, model_items[0], ckpt_items[0], what, everywhere)

        names = self._name_pairs(region, model_items, ckpt_items)
        near = self._neighbour_pairs(region, model_items, ckpt_items)
        ckpt_order = total_order(ckpt_items, trusted=self.ckpt.trusted) if n_model == n_ckpt else None
        if ckpt_order is not None and (
            crossing := [m.path for m, c in zip(model_items, ckpt_order) if self._crosses(region, m, c)]
        ):
            # both orders are registration orders, but of parallel branches (a shortcut registered before
            # or after the main path): ranks would cross pairs already made, so order says nothing here
            self._why(
                region,
                model_items,
                f"the checkpoint's order crosses pairs already made (at {', '.join(crossing[:3])}), and names do not tell them apart",
            )
            ckpt_order = None
        if ckpt_order is not None:
            return self._by_rank(region, model_items, ckpt_items, ckpt_order, names, near, everywhere)

        out: list[Pair] = []
        used: set[int] = set()
        for m, (c, why) in names.items():
            if m in near and near[m][0] is not c:
                continue
            confidence = CONFIDENCE.names_agree_complete if region.complete else CONFIDENCE.names_agree_partial
            out.append((m, c, confidence, f"{what} in {context}; names agree: {why}"))
            used.add(id(c))
        paired = {id(m) for m, *_ in out}
        for m, (c, why) in near.items():
            if id(m) not in paired and id(c) not in used and not (m in names and names[m][0] is not c):
                confidence = CONFIDENCE.neighbours_complete if region.complete else CONFIDENCE.neighbours_partial
                out.append((m, c, confidence, f"{what} in {context}; {why}"))
        if len(out) < n_model:
            sorted_note = (
                "the checkpoint's key order is not the network's" if not self.ckpt.trusted else "counts differ"
            )
            self._why(
                region,
                model_items,
                f"{n_model} model and {n_ckpt} checkpoint items of the same shapes; {sorted_note}, and names do not tell them apart",
            )
        return out

    def _resolve_one(self, region: _Region, level: str, m: Item, c: Item, what: str, everywhere: bool) -> list[Pair]:
        """A class of one model item and one checkpoint item."""
        context = region.context
        if region.complete:
            if max(region.start_counts.get((level, m.sig), (1, 1))) > 1:
                return [(m, c, CONFIDENCE.last_in_region, f"last {what} left in {context} once the others were placed")]
            return [(m, c, CONFIDENCE.only_in_region, f"only {what} in {context}")]
        model_words = role(relative(m.path, region.model_root))
        ckpt_words = role(relative(c.path, region.ckpt_root))
        if everywhere and distinctive(m) and (level == "node" or not conflict(model_words, ckpt_words)):
            return [(m, c, CONFIDENCE.unique_everywhere, f"only {what} in the model and the checkpoint")]
        if (why := agree(model_words, ckpt_words)) is not None:
            return [(m, c, CONFIDENCE.single_names_agree, f"only {what} left in {context}; names agree: {why}")]
        if (why := self._neighbour(region, m, c)) is not None:
            return [(m, c, CONFIDENCE.single_neighbours, f"only {what} left in {context}; {why}")]
        self._why(region, [m], f"{c.path} has the same shapes, but nothing else links them")
        return []

    def _by_rank(
        self,
        region: _Region,
        model_items: list,
        ckpt_items: list,
        ckpt_order: list,
        names: dict[Any, tuple[Any, str]],
        near: dict[Any, tuple[Any, str]],
        everywhere: bool,
    ) -> list[Pair]:
        """Pair a class by rank (model order against checkpoint order), unless names or neighbours disagree."""
        n_model, context = len(model_items), region.context
        if self.model_order == "execution":
            how = (
                "in execution order and file order"
                if self.ckpt.trusted
                else "in execution order and by the numbers in the checkpoint's names"
            )
        else:
            how = "in model and file order" if self.ckpt.trusted else "by the numbers in their names"
        ranked = list(zip(model_items, ckpt_order))
        if clash := [m.path for m, c in ranked if any(m in d and d[m][0] is not c for d in (names, near))]:
            self._why(region, model_items, f"order and names or neighbours disagree on {', '.join(clash[:3])}")
            region.vetoed.update(id(u) for i in [*model_items, *ckpt_items] for u in i.units)
            return []
        base = CONFIDENCE.rank_by_file_order if self.ckpt.trusted else CONFIDENCE.rank_by_path_numbers
        out: list[Pair] = []
        for rank, (m, c) in enumerate(ranked):
            support = names.get(m) or near.get(m)
            reason = f"{ordinal(rank + 1)} of {n_model} {describe(m, plural=True)} in {context}, {how}"
            if support is not None:
                reason += f"; {support[1]}"
            if region.complete or everywhere:
                bonus = CONFIDENCE.rank_support_bonus if support else 0.0
                out.append((m, c, min(CONFIDENCE.rank_ceiling, base + bonus), reason))
            elif support is not None:
                out.append((m, c, CONFIDENCE.rank_supported_partial, reason))
        if not out:
            self._why(
                region,
                model_items,
                f"{n_model} on each side in order, but {context} also holds unrelated modules and nothing confirms these",
            )
        return out

    def _crosses(self, region: _Region, m: Item, c: Item) -> bool:
        """Would pairing ``m`` with ``c`` cross a pair already made in ``region`` (one before it, the other after)?"""
        if region.ckpt_ids is None:
            region.ckpt_ids = {id(u) for u in region.ckpt_units}
        for model_unit in region.model_units:
            ckpt_unit = self.model_to_ckpt.get(model_unit)
            if ckpt_unit is None or id(ckpt_unit) not in region.ckpt_ids or model_unit in m.units:
                continue
            model_side = 1 if model_unit.order < m.lo else -1 if model_unit.order > m.hi else 0
            if self.ckpt.trusted:
                ckpt_side = 1 if ckpt_unit.order < c.lo else -1 if ckpt_unit.order > c.hi else 0
            else:
                cmp = path_order(ckpt_unit.path, c.path)
                ckpt_side = 0 if cmp is None else -cmp
            if model_side and ckpt_side and model_side != ckpt_side:
                return True
        return False

    def _why(self, region: _Region, items: list, text: str) -> None:
        for i in items:
            for u in i.units:
                region.why.setdefault(id(u), text)

    def _name_pairs(self, region: _Region, model_items: list, ckpt_items: list) -> dict[Any, tuple[Any, str]]:
        """Model item -> (checkpoint item, why) where their names, minus the words all share, agree one to one."""
        model_words = {m: role(relative(m.path, region.model_root)) for m in model_items}
        ckpt_words = {c: role(relative(c.path, region.ckpt_root)) for c in ckpt_items}
        common_model = set.intersection(*(set(v) for v in model_words.values())) if len(model_items) > 1 else set()
        common_ckpt = set.intersection(*(set(v) for v in ckpt_words.values())) if len(ckpt_items) > 1 else set()
        ok: dict[tuple[int, int], str] = {}
        for m in model_items:
            for c in ckpt_items:
                why = agree(
                    [w for w in model_words[m] if w not in common_model],
                    [w for w in ckpt_words[c] if w not in common_ckpt],
                )
                if why is not None:
                    ok[id(m), id(c)] = why
        return self._mutual(model_items, ckpt_items, ok)

    def _neighbour(self, region: _Region, m: Item, c: Item) -> str | None:
        """Why ``m`` and ``c`` sit in the same place: ``m``'s neighbour is paired with ``c``'s sibling.

        Siblings count only inside a module below the region's root: at the root every item is a
        sibling of every other, so being one says nothing about where ``c`` sits.
        """
        for model_next in self.model.neighbours(m):
            ckpt_next = self.model_to_ckpt.get(model_next)
            if (
                ckpt_next is not None
                and ckpt_next not in c.units
                and parent(ckpt_next.path) == parent(c.path)
                and parent(c.path) != region.ckpt_root
            ):
                return f"next to {model_next.path or '<root>'}, as {c.path} sits with {ckpt_next.path}"
            if ckpt_next is not None and self.ckpt.trusted and ckpt_next in self.ckpt.neighbours(c):
                return f"next to {model_next.path or '<root>'} in both orders"
        return None

    def _neighbour_pairs(self, region: _Region, model_items: list, ckpt_items: list) -> dict[Any, tuple[Any, str]]:
        ok: dict[tuple[int, int], str] = {}
        for m in model_items:
            for c in ckpt_items:
                if (why := self._neighbour(region, m, c)) is not None:
                    ok[id(m), id(c)] = why
        return self._mutual(model_items, ckpt_items, ok)

    @staticmethod
    def _mutual(model_items: list, ckpt_items: list, ok: dict[tuple[int, int], str]) -> dict[Any, tuple[Any, str]]:
        """Pairs where each side has exactly one supported partner."""
        by_model: dict[int, list] = defaultdict(list)
        by_ckpt: dict[int, list] = defaultdict(list)
        for m in model_items:
            for c in ckpt_items:
                if (id(m), id(c)) in ok:
                    by_model[id(m)].append(c)
                    by_ckpt[id(c)].append(m)
        out = {}
        for m in model_items:
            candidates = by_model.get(id(m), [])
            if len(candidates) == 1 and len(by_ckpt[id(candidates[0])]) == 1:
                out[m] = (candidates[0], ok[id(m), id(candidates[0])])
        return out

    # Gaps ------------------------------------------------------------------
    def _gaps(self, region: _Region) -> None:
        """Pair what is left in order between paired units; shapes may differ (adapters)."""
        model_free, ckpt_free = self._free(region)
        model_free = [u for u in model_free if id(u) not in region.vetoed]
        ckpt_free = [u for u in ckpt_free if id(u) not in region.vetoed]
        if not model_free or not ckpt_free:
            return
        if (
            len(model_free) == 1
            and len(ckpt_free) == 1
            and model_free[0].sig != ckpt_free[0].sig
            and compatible(model_free[0], ckpt_free[0])
        ):
            m, c = model_free[0], ckpt_free[0]
            why = agree(role(relative(m.path, region.model_root)), role(relative(c.path, region.ckpt_root)))
            why = f"names agree: {why}" if why is not None else self._neighbour(region, m, c)
            if why is not None:
                self._pair_units(
                    m,
                    c,
                    min(CONFIDENCE.gap_other_shapes, region.confidence),
                    f"the only unmatched module on either side in {region.context}, same layout, other shapes; {why}",
                )
                return
        model_seq = sorted(region.model_units, key=lambda u: u.order)
        ckpt_seq = total_order(list(region.ckpt_units), trusted=self.ckpt.trusted)
        if ckpt_seq is None:
            return
        ckpt_pos = {id(u): i for i, u in enumerate(ckpt_seq)}
        model_open, ckpt_open = set(model_free), set(ckpt_free)
        run: list[Unit] = []
        before: Unit | None = None
        for u in [*model_seq, None]:
            if u is not None and u in model_open:
                run.append(u)
                continue
            if u is not None and u not in self.model_to_ckpt:  # inside an unresolved subtree: the boundary is unknown
                run, before = [], None
                continue
            if run:
                self._gap(region, run, before, u, ckpt_seq, ckpt_pos, ckpt_open)
            run, before = [], u

    def _gap(
        self,
        region: _Region,
        run: list[Unit],
        before: Unit | None,
        after: Unit | None,
        ckpt_seq: list[Unit],
        ckpt_pos: dict[int, int],
        ckpt_open: set[Unit],
    ) -> None:
        """Pair model units ``run`` (between paired ``before``, ``after``) with the checkpoint units between theirs."""
        lo = ckpt_pos.get(id(self.model_to_ckpt[before]), None) if before is not None else -1
        hi = ckpt_pos.get(id(self.model_to_ckpt[after]), None) if after is not None else len(ckpt_seq)
        if lo is None or hi is None or lo >= hi:
            return
        candidates = [c for c in ckpt_seq[lo + 1 : hi] if c in ckpt_open]
        if len(candidates) != len(run) or not all(
            m.sig == c.sig or compatible(m, c) for m, c in zip(run, candidates)
        ):
            return
        where = f"between {before.path if before else 'the start'} and {after.path if after else 'the end'}"
        if self.model_order == "execution":
            where = f"in execution order {where}"
        else:
            where = f"in order {where}"
        for m, c in zip(run, candidates):
            if m.sig == c.sig:
                confidence = min(CONFIDENCE.gap_same_shapes, region.confidence)
                self._pair_units(m, c, confidence, f"{where} in {region.context}")
            else:
                self._pair_units(
                    m,
                    c,
                    min(CONFIDENCE.gap_other_shapes, region.confidence),
                    f"{where} in {region.context}, same layout, other shapes",
                )
            ckpt_open.discard(c)

    # Units -> tensors ------------------------------------------------------
    def _pair_units(self, m: Unit, c: Unit, confidence: float, reason: str) -> None:
        """Pair two units and their tensors: by attribute name, then by unique shape, then by order."""
        self.model_to_ckpt[m], self.ckpt_to_model[c] = c, m
        by_attr = {y.attr: y for y in c.tensors}
        rest_model: list[Tensor] = []
        used: set[str] = set()
        exact_unit = m.sig == c.sig
        for x in m.tensors:
            y = by_attr.get(x.attr)
            if y is not None and (x.shape == y.shape or not exact_unit):
                self._pair_tensor(x, y, confidence, reason)
                used.add(y.attr)
            elif x.attr != NUM_BATCHES_TRACKED:
                rest_model.append(x)
        rest_ckpt = [y for y in c.tensors if y.attr not in used and y.attr != NUM_BATCHES_TRACKED]
        for x in rest_model:  # other attribute names: by unique shape, then by order within the module
            same_ckpt = [y for y in rest_ckpt if (y.shape, y.kind) == (x.shape, x.kind)]
            same_model = [z for z in rest_model if (z.shape, z.kind) == (x.shape, x.kind)]
            if len(same_ckpt) == 1 and len(same_model) == 1:
                self._pair_tensor(x, same_ckpt[0], confidence, f"{reason}; {x.attr} ~ {same_ckpt[0].attr}")
            elif len(same_ckpt) == len(same_model) and self.ckpt.trusted:
                y = same_ckpt[same_model.index(x)]
                self._pair_tensor(
                    x,
                    y,
                    min(confidence, CONFIDENCE.attribute_by_order),
                    f"{reason}; {x.attr} ~ {y.attr} by order in the module",
                )

    def _pair_tensor(self, x: Tensor, y: Tensor, confidence: float, reason: str) -> None:
        if x.key in self.paired_model or y.key in self.paired_ckpt or confidence < MIN_CONFIDENCE:
            return
        self.paired_model.add(x.key)
        self.paired_ckpt.add(y.key)
        exact = x.shape == y.shape or (x.shape == () and y.shape == (1,))
        layout = None
        if y.transposed:
            layout = Layout(transpose=True)
            reason += f"; stored transposed ({format_shape(y.shape[::-1])}), as its module's other weights"
        self.result.pairs.append(Aligned(x.key, y.key, round(confidence, 2), reason, exact, layout))

    # Fused tensors -----------------------------------------------------------
    def _fused(self) -> None:
        """2-3 sibling modules on one side, one module holding them stacked by rows on the other (``qkv``, ``gate_up``).

        A fused checkpoint tensor is split into the model's pieces; fused model tensors are joined
        from the checkpoint's pieces. The pieces' order in the fused tensor comes from their names
        (``q``, ``k``, ``v``; ``gate``, ``up``), never from shapes; a fused tensor is taken only when
        it is the only one of its shape in the same layer (same numbers in the path). ``[in, out]``
        layouts (``Conv1D``) are seen in the fused tensor's non-square shape.
        """
        for pieces_in_model in (True, False):
            model_free = [u for u in self.model.seq if u.leftover and u not in self.model_to_ckpt]
            ckpt_free = [u for u in self.ckpt.seq if u.leftover and u not in self.ckpt_to_model]
            by_parent: dict[str, list[Unit]] = defaultdict(list)
            for u in model_free if pieces_in_model else ckpt_free:
                by_parent[parent(u.path)].append(u)
            for module, siblings in by_parent.items():
                for group in self._fused_groups(siblings):
                    self._fused_group(module, group, ckpt_free if pieces_in_model else model_free, pieces_in_model)

    @staticmethod
    def _fused_groups(siblings: list[Unit]) -> list[list[Unit]]:
        """Sets of 2-3 siblings named as parts of one fused tensor, in the fused tensor's order."""
        out: list[list[Unit]] = []
        named = [u for u in siblings if fused_order([u.path.rpartition(".")[2]]) is not None]
        for size in (3, 2):
            for start in range(len(named) - size + 1):
                group = named[start : start + size]
                order = fused_order(u.path.rpartition(".")[2] for u in group)
                if order is None or any(u in g for g in out for u in group):
                    continue
                group = [u for _, u in sorted(zip(order, group, strict=True), key=lambda p: p[0])]
                layouts = {tuple(sorted((t.attr, len(t.shape), t.kind) for t in u.body)) for u in group}
                weights = [next((t for t in u.body if t.attr == "weight" and len(t.shape) == 2), None) for u in group]
                if (
                    len(layouts) == 1
                    and all(w is not None and w.kind == "f" and not w.transposed for w in weights)
                    and len({w.shape[1] for w in weights}) == 1
                ):
                    out.append(group)
        return out

    def _fused_group(self, module: str, group: list[Unit], others: list[Unit], pieces_in_model: bool) -> None:
        """Pair ``group`` (pieces, on one side) with the one module in ``others`` that holds them stacked."""
        weights = [next(t for t in u.body if t.attr == "weight") for u in group]
        sizes = tuple(w.shape[0] for w in weights)
        rows, cols = sum(sizes), weights[0].shape[1]
        attrs = sorted(t.attr for t in group[0].body)
        paired = self.ckpt_to_model if pieces_in_model else self.model_to_ckpt

        def fits(c: Unit) -> bool | None:  # transposed?, or None when it does not fit
            if c in paired or sorted(t.attr for t in c.body) != attrs:
                return None
            got = {t.attr: t for t in c.body}
            if got["weight"].kind != "f" or any(got[a].shape != (rows,) for a in attrs if a != "weight"):
                return None
            shape = _stored(got["weight"])
            return False if shape == (rows, cols) else True if rows != cols and shape == (cols, rows) else None

        numbers = [p for p in module.split(".") if p.isdigit()]
        piece_names = [u.path.rpartition(".")[2] for u in group]
        same_layer = [
            c
            for c in others
            if fits(c) is not None
            and [p for p in c.path.split(".") if p.isdigit()] == numbers
            and fused_name(c.path, module, piece_names) is not None
        ]
        names = ", ".join(piece_names)
        side = "checkpoint" if pieces_in_model else "model"
        if len(same_layer) != 1:
            if same_layer:
                pieces = [t.key for u in group for t in u.body]
                wholes = [t.key for c in same_layer for t in c.body]
                self.result.ambiguous.append(
                    {
                        "targets": pieces if pieces_in_model else wholes,
                        "candidates": wholes if pieces_in_model else pieces,
                        "reason": f"{len(same_layer)} {side} tensors of {rows} rows could hold {names} of "
                        f"{module or '<root>'}; nothing tells which",
                    }
                )
            return
        whole = same_layer[0]
        transposed = bool(fits(whole))
        got = {t.attr: t for t in whole.body}
        where = f"layer {'.'.join(numbers)}" if numbers else f"the {side}"
        reason = (
            f"{whole.path} has {rows} rows = {' + '.join(map(str, sizes))} of {names} in {module or '<root>'}, "
            f"in the order their names say ({fused_name(whole.path, module, piece_names)}); "
            f"the only such {side} tensor in {where}"
        )
        if transposed:
            reason += f" (stored [in, out]: {format_shape(_stored(got['weight']))})"
        confidence = CONFIDENCE.fused_in_layer
        if pieces_in_model:
            self.model_to_ckpt.update((u, whole) for u in group)
            self.ckpt_to_model[whole] = group[0]
            for index, u in enumerate(group):
                for x in u.body:
                    y = got[x.attr]
                    layout = Layout(transpose=transposed and x.attr == "weight", sizes=sizes, index=index)
                    self.paired_model.add(x.key)
                    self.paired_ckpt.add(y.key)
                    self.result.pairs.append(Aligned(x.key, y.key, confidence, reason, True, layout))
            return
        self.ckpt_to_model.update((u, whole) for u in group)
        self.model_to_ckpt[whole] = group[0]
        for x in whole.body:
            ys = [next(t for t in u.body if t.attr == x.attr) for u in group]
            layout = Layout(transpose=transposed and x.attr == "weight", join=tuple(y.key for y in ys[1:]))
            self.paired_model.add(x.key)
            self.paired_ckpt.update(y.key for y in ys)
            self.result.pairs.append(Aligned(x.key, ys[0].key, confidence, reason, True, layout))

    def _unnamed_fused(self) -> None:
        """Report (never pair) fused tensors whose pieces' names do not say their order.

        A module left unpaired whose rows are the sum of 2-3 unpaired sibling modules' rows in the
        same layer on the other side: the split is plausible, but which rows belong to which piece
        cannot be told, so it is ambiguous.
        """
        for pieces_in_model in (True, False):
            pieces_side, whole_side = (self.model, self.ckpt) if pieces_in_model else (self.ckpt, self.model)
            done = self.model_to_ckpt if pieces_in_model else self.ckpt_to_model
            whole_done = self.ckpt_to_model if pieces_in_model else self.model_to_ckpt
            paired, whole_paired = (
                (self.paired_model, self.paired_ckpt) if pieces_in_model else (self.paired_ckpt, self.paired_model)
            )
            free = [
                u for u in pieces_side.seq if u.leftover and u not in done and not any(t.key in paired for t in u.body)
            ]
            by_parent: dict[str, list[Unit]] = defaultdict(list)
            for u in free:
                w = next((t for t in u.body if t.attr == "weight" and len(t.shape) == 2 and not t.transposed), None)
                if w is not None and w.kind == "f":
                    by_parent[parent(u.path)].append(u)
            for whole in whole_side.seq:
                if not whole.leftover or whole in whole_done or any(t.key in whole_paired for t in whole.body):
                    continue
                w = next((t for t in whole.body if t.attr == "weight" and len(t.shape) == 2), None)
                if w is None or w.kind != "f":
                    continue
                numbers = [p for p in whole.path.split(".") if p.isdigit()]
                shapes = {_stored(w), _stored(w)[::-1]}  # as stored, or stored [in, out]
                for module, siblings in by_parent.items():
                    if [p for p in module.split(".") if p.isdigit()] != numbers or len(siblings) > 4:
                        continue
                    hits = [
                        group
                        for size in (2, 3)
                        for group in combinations(siblings, size)
                        if any(self._stacks(group, shape) for shape in shapes)
                    ]
                    if len(hits) != 1:
                        continue
                    group = hits[0]
                    pieces = [t.key for u in group for t in u.body]
                    wholes = [t.key for t in whole.body]
                    names = ", ".join(u.path.rpartition(".")[2] for u in group)
                    self.result.ambiguous.append(
                        {
                            "targets": pieces if pieces_in_model else wholes,
                            "candidates": wholes if pieces_in_model else pieces,
                            "reason": f"{whole.path} has the rows of {names} of {module or '<root>'} stacked, "
                            "but their names do not say in which order",
                        }
                    )

    @staticmethod
    def _stacks(group: tuple[Unit, ...], shape: tuple[int, ...]) -> bool:
        """Do the 2-D weights of ``group`` stack by rows into ``shape``?"""
        weights = [next(t for t in u.body if t.attr == "weight") for u in group]
        rows = sum(w.shape[0] for w in weights)
        return len({w.shape[1] for w in weights}) == 1 and shape == (rows, weights[0].shape[1])

    def _single_tensors(self) -> None:
        """Tensors whose shape occurs once in the model and once in the checkpoint, still unpaired."""
        model_left = [
            x
            for u in self.model.seq
            for x in u.tensors
            if x.key in self.model_leftover and x.key not in self.paired_model
        ]
        ckpt_left = [
            y for u in self.ckpt.seq for y in u.tensors if y.key in self.ckpt_leftover and y.key not in self.paired_ckpt
        ]
        by_shape = {(y.shape, y.kind): y for y in ckpt_left if self.ckpt.tensor_count[(y.shape, y.kind)] == 1}
        for x in model_left:
            y = by_shape.get((x.shape, x.kind))
            if y is None or self.model.tensor_count[(x.shape, x.kind)] != 1 or x.attr == NUM_BATCHES_TRACKED:
                continue
            if x.numel >= 4096 or agree(role(x.key), role(y.key)) is not None:
                self._pair_tensor(
                    x,
                    y,
                    CONFIDENCE.single_tensor,
                    f"only tensor of shape {format_shape(x.shape)} in the model and the checkpoint",
                )

    def _record_ambiguous(self) -> None:
        done: set[int] = set()
        for region in reversed(self.regions):  # deepest first: a unit is reported in the smallest region holding it
            model_left = [
                u
                for u in region.model_units
                if u not in self.model_to_ckpt
                and id(u) not in done
                and any(x.key not in self.paired_model for x in u.body)
            ]
            ckpt_left = [
                u
                for u in region.ckpt_units
                if u not in self.ckpt_to_model and any(y.key not in self.paired_ckpt for y in u.body)
            ]
            done.update(id(u) for u in region.model_units)
            groups: dict[tuple, list[Unit]] = defaultdict(list)
            for u in model_left:
                groups[u.sig].append(u)
            for sig, units in groups.items():
                candidates = [c for c in ckpt_left if c.sig == sig]
                if not candidates:
                    continue
                reason = next(
                    (region.why[id(u)] for u in units if id(u) in region.why), "same shapes; nothing tells them apart"
                )
                self.result.ambiguous.append(
                    {
                        "targets": [x.key for u in units for x in u.tensors if x.key not in self.paired_model],
                        "candidates": [y.key for c in candidates for y in c.tensors if y.key not in self.paired_ckpt],
                        "reason": f"{reason} (in {region.context})",
                    }
                )


def _stored(t: Tensor) -> tuple[int, ...]:
    """A checkpoint tensor's shape as stored (the aligner sees ``[in, out]`` ones transposed)."""
    return t.shape[::-1] if t.transposed else t.shape


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
    model_order: Literal["registration", "execution"] = "registration",
) -> Alignment:
    """Pair leftover model entries with leftover checkpoint entries by structure.

    Args:
        targets: every model entry in model order: ``(name, shape, dtype, leftover)``;
            ``leftover`` marks the ones still missing. The others give context.
            A module's entries come together; the order of modules is registration
            (state-dict) order, or the order a traced forward ran them in
            (:meth:`torchgraft.align.trace.ExecutionOrder.sort`).
        sources: every checkpoint entry in file order: ``(key, name_after_rules, shape,
            dtype, leftover)``; ``leftover`` marks the ones still unused.
        source_ordered: the file order is the network's (false for sorted formats).
        anchors: model module path -> checkpoint module path (after rules) for modules
            already matched by name.
        model_order: which order ``targets`` are in: ``"registration"`` or ``"execution"``
            (traced); reasons that rely on it say which.

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
    model = Side(((k, k, shape, dtype, left) for k, shape, dtype, left in targets), trusted=True)
    flip = transposed_modules(
        [(k, shape, dtype) for k, shape, dtype, left in targets if left],
        [(name, shape, dtype) for _k, name, shape, dtype, left in sources if left],
    )
    ckpt = Side(sources, trusted=source_ordered, transposed=flip)
    model_leftover = frozenset(k for k, _shape, _dtype, left in targets if left)
    ckpt_leftover = frozenset(k for k, _name, _shape, _dtype, left in sources if left)
    if model_order not in ("registration", "execution"):
        raise ValueError(f"model_order must be 'registration' or 'execution', not {model_order!r}")
    return _Aligner(model, ckpt, anchors or {}, model_leftover, ckpt_leftover, model_order).run()
