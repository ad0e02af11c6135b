"""What both executors share: staging one entry, NaN / Inf counts, the modules to initialise, their errors.

:func:`torchgraft.load` (``apply``) and :func:`torchgraft.distributed.load` execute the same
:class:`~torchgraft.Plan` in different ways (one process with an undo log; several ranks through
``torch.distributed.checkpoint``), but decide the same things the same way, here:

- :class:`ModuleGroups`: the plan's entries by module, computed once per load;
- :func:`stage_entry`: a checkpoint tensor adapted (when the plan says so) and given the model's shape;
- :func:`count_nonfinite`: NaN / Inf in one tensor;
- :func:`strict_error`, :func:`nonfinite_error`: the errors both raise, in the same words;
- :func:`slot`, :func:`live`, :func:`retie`: a module's tensors by name, and ties made again.

Example:
    >>> groups = ModuleGroups.of(TargetView.of(model), plan)
    >>> list(groups.to_initialise)          # modules whose weights the checkpoint does not give
    ['classifier']
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import LoadError
from .keys import split_key

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .plan import Entry, Plan
    from .sources import Source
    from .target import TargetView

__all__ = [
    "UNWRITTEN",
    "EntryReader",
    "ModuleGroups",
    "count_nonfinite",
    "initialise_entries",
    "is_float",
    "live",
    "nonfinite_error",
    "retie",
    "slot",
    "stage_entry",
    "strict_error",
    "tie_groups",
]


def is_float(dtype: torch.dtype) -> bool:
    """Floating point or complex: the dtypes that can hold NaN / Inf and that ``dtype=`` casts."""
    return dtype.is_floating_point or dtype.is_complex


@dataclass(frozen=True)
class ModuleGroups:
    """A plan's entries grouped by the module that holds them: computed once per load, read by every phase.

    Attributes:
        module: entry name (plan entries and non-persistent buffers) -> its module path.
        loads: module path -> its entries that load a checkpoint tensor, in plan order; then the
            modules with only ``default`` entries (BatchNorm's ``num_batches_tracked``), which
            their loading hook fills, with none.
        to_initialise: module path -> its entries that need values the checkpoint does not give
            (``init``, ``tied`` to an ``init``, non-persistent buffers on the meta device).
    """

    module: dict[str, str]
    loads: dict[str, list[str]]
    to_initialise: dict[str, list[str]]

    @classmethod
    def of(cls, view: TargetView, plan: Plan) -> ModuleGroups:
        module = {name: split_key(name)[0] for name in [*plan.entries, *view.entries, *view.nonpersistent]}
        loads: dict[str, list[str]] = {}
        for name, e in plan.entries.items():
            if e.loads:
                loads.setdefault(module[name], []).append(name)
        for name, e in plan.entries.items():
            if e.action == "default":
                loads.setdefault(module[name], [])
        todo: dict[str, list[str]] = defaultdict(list)
        lazy = {n for n, info in view.entries.items() if info.lazy}  # no shape to initialise: left lazy, as torch does
        for name, e in plan.entries.items():
            if name in lazy:
                continue
            if e.action == "init" or (
                e.action == "tied" and plan.entries.get(view.tied.get(name, ""), e).action == "init"
            ):
                todo[module[name]].append(name)
        loaded_buffers = {n for n, e in plan.entries.items() if e.buffer}
        for name, info in view.nonpersistent.items():
            if info.meta and name not in loaded_buffers:
                todo[module[name]].append(name)
        return cls(module, loads, dict(todo))


class EntryReader:
    """Reads the checkpoint tensor of each entry of one load: its source's, or its transform's result.

    A subtree several entries read (a fused ``qkv`` their q, k and v are split from) is read and
    transformed once, each piece a view of that one result, and held only until the last entry that
    needs it has been read; nothing else is kept (the inner ``stack``s of a fused ``gate_up`` are
    not held beside it).

    Example:
        >>> reader = EntryReader(plan.entries.values(), source)
        >>> q = reader.read(plan.entries["blocks.0.attn.q.weight"])   # reads and transposes c_attn once
    """

    def __init__(self, entries: Iterable[Entry], source: Source) -> None:
        from collections import Counter

        from .transforms import Expr

        self.source = source
        self._exprs: dict[int, tuple[Expr, set[Expr]]] = {}  # id(entry) -> its tree, its distinct subtrees
        uses: Counter = Counter()
        for e in entries:
            if e.loads and e.transform is not None:
                expr = Expr.from_dict(e.transform)
                nodes = set(expr.nodes())
                self._exprs[id(e)] = expr, nodes
                uses.update(nodes)
        self._left = {x: n for x, n in uses.items() if n > 1}  # shared subtrees -> readers still to come
        self._cache: dict = {}

    def read(self, entry: Entry) -> torch.Tensor:
        """The tensor ``entry`` loads (contiguous where it is a transform's result).

        Raises:
            LoadError: replicated copies (``same``) differ.
        """
        if entry.transform is None:
            assert entry.source is not None
            return self.source[entry.source].load()
        from .transforms import Expr, evaluate

        expr, nodes = self._exprs.get(id(entry)) or (Expr.from_dict(entry.transform), set())
        value = evaluate(expr, lambda leaf: self.source[leaf.source].load(), self._cache, keep=self._left.__contains__)
        for x in nodes & self._left.keys():
            self._left[x] -= 1
            if not self._left[x]:
                del self._left[x]
                self._cache.pop(x, None)
        return value.contiguous()


def stage_entry(
    name: str,
    entry: Entry,
    tensor: torch.Tensor,
    *,
    shape: tuple[int, ...],
    source: Source,
) -> torch.Tensor:
    """A checkpoint tensor as the model's ``name`` takes it: adapted if the plan says so, in the model's shape.

    A one-element tensor becomes a 0-d one where the model holds a scalar (``(1,) -> ()``);
    casting and placing are the executor's.

    Raises:
        AdapterError: the entry's adapter cannot produce the model's shape.
        LoadError: the checkpoint changed since it was planned (another shape), or the tensor is
            sparse, meta, quantized or nested (it would fail mid-commit, past the undo).
    """
    from .sources.torch_reader import unusable_tensor

    if why := unusable_tensor(tensor):
        raise LoadError(f"Checkpoint {source.describe()} cannot be loaded; the model is unchanged:", [f"{name}: {why}"])
    if entry.action == "adapt":
        from . import adapters

        assert entry.adapter is not None
        tensor = adapters.run(entry.adapter, tensor, target_shape=entry.shape, target=entry.target)
    if tuple(tensor.shape) != tuple(shape):
        if shape != () or tensor.numel() != 1:
            raise LoadError(
                f"Checkpoint {source.describe()} changed since it was planned:",
                [f"{entry.source!r} has shape {list(tensor.shape)}, the model's {name!r} needs {list(shape)}"],
            )
        tensor = tensor.reshape(())
    return tensor


def count_nonfinite(tensor: torch.Tensor) -> dict[str, int] | None:
    """``{"nan": n, "inf": n}``, or ``None`` when every value is finite.

    Fast path: one reduction (NaN and Inf propagate through a sum), about 25x faster than
    ``isfinite(t).all()``, which writes a mask as large as the tensor. Only when the sum is not
    finite are the values counted exactly (a sum of large finite values may overflow).

    Example:
        >>> count_nonfinite(torch.tensor([1.0, float("nan"), float("inf")]))
        {'nan': 1, 'inf': 1}
    """
    import torch

    try:
        wide = (
            tensor.sum(dtype=torch.float32) if tensor.element_size() < 4 and not tensor.is_complex() else tensor.sum()
        )
        if bool(torch.isfinite(wide)):
            return None
        counts = {"nan": int(torch.isnan(tensor).sum()), "inf": int(torch.isinf(tensor).sum())}
    except (RuntimeError, TypeError, NotImplementedError):  # float8 and friends: count in float32
        try:
            wide = tensor.float()
            counts = {"nan": int(torch.isnan(wide).sum()), "inf": int(torch.isinf(wide).sum())}
        except (RuntimeError, TypeError, NotImplementedError):  # packed float4 holds no NaN or Inf
            return None
    return counts if counts["nan"] or counts["inf"] else None


#: Up to this many problems are listed one key a line; more are grouped like the report table.
STRICT_LINES = 12


def strict_error(
    source: Source, model_name: str, plan: Plan | None, problems: list[str] | None = None
) -> LoadError:
    """``strict=True`` and the checkpoint does not fit: every problem listed, then what fixes it.

    ``problems`` defaults to the plan's. A checkpoint that does not belong to the model at all says
    so first (``plan.verdict``); a long list of the plan's own problems is grouped with repeated
    layers collapsed, like the report.
    """
    if problems is None:
        assert plan is not None
        problems = plan.problems() if len(plan.problems()) <= STRICT_LINES else plan.grouped_problems()
    title = f"Checkpoint {source.describe()} does not fit {model_name} (strict=True):"
    if plan is not None and plan.verdict:
        title = f"{plan.verdict}\n{title}"
    fixes = plan.fixes() if plan is not None else []
    return LoadError(title, [*problems, *(f"fix: {f}" for f in fixes)])


def nonfinite_error(source: Source, nonfinite: Mapping[str, Mapping[str, int]]) -> LoadError:
    """``check_finite="error"`` found NaN / Inf: every tensor named with its counts."""
    return LoadError(
        f"Checkpoint {source.describe()} holds NaN or Inf values (check_finite='error'); the model is unchanged:",
        [f"{name}: {c['nan']} NaN, {c['inf']} Inf" for name, c in nonfinite.items()],
    )


def slot(module: nn.Module, attr: str) -> torch.Tensor | None:
    """The module's own parameter or buffer ``attr`` (not a submodule's), or ``None``."""
    t = module._parameters.get(attr)
    return t if t is not None else module._buffers.get(attr)


def live(view: TargetView, name: str) -> torch.Tensor:
    """The model's tensor for ``name`` now (after earlier assignments, unlike ``view.tensors``).

    Raises:
        KeyError: the module holds no tensor of that name.
    """
    t = slot(view.module_of(name), split_key(name)[1])
    if t is None:
        raise KeyError(name)
    return t


def tie_groups(view: TargetView) -> dict[str, list[str]]:
    """First name -> every name of the same tensor (first included)."""
    groups: dict[str, list[str]] = {}
    for name, owner in view.tied.items():
        groups.setdefault(owner, [owner]).append(name)
    return groups


def retie(
    view: TargetView,
    plan: Plan | None = None,
    *,
    before_change: Callable[[nn.Module], None] | None = None,
) -> None:
    """Names that shared one tensor before the load share one again (assignment breaks ties).

    The tensor kept is the one that was loaded when ``plan`` is given (the checkpoint may hold
    a tie under its second name), else the first name's. ``before_change(module)`` runs before a
    module's tensor is replaced (to remember it for an undo).
    """
    for owner, names in tie_groups(view).items():
        keep = next((n for n in names if plan.entries[n].loads), owner) if plan is not None else owner
        value = slot(view.module_of(keep), split_key(keep)[1])
        for name in names:
            module, attr = view.module_of(name), split_key(name)[1]
            store = module._parameters if attr in module._parameters else module._buffers
            if store.get(attr) is not value:
                if before_change is not None:
                    before_change(module)
                store[attr] = value


#: Floating-point tensors that come from the meta device start as NaN, so that what no
#: initialiser writes can be found afterwards (and zeroed, reported, warned).
UNWRITTEN = float("nan")


def initialise_entries(
    model: nn.Module,
    view: TargetView,
    todo: Mapping[str, list[str]],
    *,
    init_missing: bool,
    was_meta: Mapping[str, bool],
) -> dict[str, str]:
    """Run the model's initialisers on the entries ``todo`` (module path -> names); module path -> how.

    Both executors call it once their tensors are real (:data:`UNWRITTEN` where they came from meta).
    transformers 5 models are initialised all at once by their own ``initialize_weights`` with every
    other tensor marked, as ``from_pretrained`` does (parents' rules included); other modules by the
    first initialiser that knows them (:mod:`torchgraft.initialize`). ``"kept"``: nothing initialised
    them (``init_missing=False`` or no initialiser); ``"zeros"``: and they came from the meta device,
    or no rule wrote them, so they hold zeros. Modules whose only entries were non-persistent buffers
    that the model computed are left out, as a CPU build would report them.
    """
    import torch

    from .initialize import initialise_module
    from .integrations import hf

    chosen = {
        path: [t for name in names if (t := slot(view.modules[path], split_key(name)[1])) is not None]
        for path, names in todo.items()
    }
    methods: dict[str, str] = {}
    if init_missing and todo and hf.initialise_tensors(model, [t for ts in chosen.values() for t in ts]):
        methods = dict.fromkeys(todo, hf.INITIALIZE_WEIGHTS)
    for path in todo:
        if path not in methods:
            methods[path] = initialise_module(model, view.modules[path]) if init_missing else "kept"
            if methods[path] == "kept" and was_meta[path]:
                methods[path] = "zeros"
        with torch.no_grad():
            unwritten = [t for t in chosen[path] if is_float(t.dtype) and bool(torch.isnan(t).any())]
            if unwritten and was_meta[path]:  # no rule covers them: zeros, reported and warned, never NaN
                for t in unwritten:
                    t.nan_to_num_(0.0)
                methods[path] = "zeros"
    for path, names in todo.items():
        if all(n in view.nonpersistent for n in names) and methods[path] not in ("kept", "zeros"):
            del methods[path]  # buffers the model computed, as a CPU build does: nothing to report
    return methods
