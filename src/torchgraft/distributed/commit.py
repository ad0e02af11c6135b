"""Adapt and initialise identically on every rank, then commit: nothing changes until every rank is ready."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from ..keys import split_key
from ..plan import Plan
from ..sources import Source
from ..staging import UNWRITTEN, ModuleGroups, count_nonfinite, initialise_entries, is_float, live, retie, slot, stage_entry
from ..target import TargetView
from .layouts import place, write
from .ranks import Ranks, SharedRandom

__all__ = ["commit", "compute", "gather_nonfinite"]


def compute(
    model: nn.Module,
    view: TargetView,
    plan: Plan,
    groups: ModuleGroups,
    src: Source,
    whole: dict[str, torch.Tensor],
    device: torch.device,
    random: SharedRandom,
    init_missing: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """Adapt, then initialise, on full tensors under the shared random state (as tg.load orders them); keep this rank's part."""
    adapted: dict[str, torch.Tensor] = {}
    with random(), torch.no_grad():
        for name, tensor in whole.items():
            e = plan.entries[name]
            value = stage_entry(name, e, tensor, shape=e.shape, source=src)
            adapted[name] = place(value, live(view, name), device)
        inits, methods = _initial_values(model, view, groups, init_missing)
    initial = {name: place(v, live(view, name), device) for name, v in inits.items()}
    return adapted, initial, methods


def commit(
    view: TargetView,
    plan: Plan,
    initial: dict[str, torch.Tensor],
    loaded: dict[str, torch.Tensor],
    device: torch.device,
) -> None:
    """Materialise a meta model, write the initial values, then the checkpoint's (local copies only)."""
    with torch.no_grad():
        _materialise(view, device)
        for name, value in initial.items():
            write(live(view, name), value)
        for name, e in plan.entries.items():
            if e.action == "default":  # BatchNorm's num_batches_tracked in checkpoints that predate it
                live(view, name).zero_()
        for name, value in loaded.items():
            write(live(view, name), value)


def gather_nonfinite(ranks: Ranks, loaded: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """NaN / Inf counts of the loaded values, each element counted once: summed over the ranks' own parts."""
    local: dict[str, dict[str, int]] = {}
    for name, t in loaded.items():
        if not is_float(t.dtype) or not _counts_here(t, ranks.rank):
            continue
        if (counts := count_nonfinite(t.to_local() if isinstance(t, DTensor) else t)) is not None:
            local[name] = counts
    total: dict[str, dict[str, int]] = {}
    for part in ranks.gather(local):
        for name, counts in part.items():
            into = total.setdefault(name, {"nan": 0, "inf": 0})
            into["nan"] += counts["nan"]
            into["inf"] += counts["inf"]
    return {name: total[name] for name in loaded if name in total}


def _counts_here(t: torch.Tensor, rank: int) -> bool:
    """Whether this rank counts ``t``: a plain (replicated) tensor on rank 0; a DTensor on the first replica."""
    if not isinstance(t, DTensor):
        return rank == 0
    coordinate = t.device_mesh.get_coordinate() or []
    return all(c == 0 for c, p in zip(coordinate, t.placements) if isinstance(p, Replicate))


def _materialise(view: TargetView, device: torch.device) -> None:
    """Give meta tensors storage (``to_empty`` per module, so loaded modules keep their values); re-tie."""
    had_meta = False
    for module in view.modules.values():
        own = [t for t in [*module._parameters.values(), *module._buffers.values()] if t is not None]
        if any(t.is_meta for t in own):
            module.to_empty(device=device, recurse=False)
            had_meta = True
    if had_meta:  # to_empty gives each name its own tensor: tie them again before anything is written
        retie(view)


def _initial_values(
    model: nn.Module, view: TargetView, groups: ModuleGroups, init_missing: bool
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Full CPU values for every entry that needs initialising, from the model's own initialisers.

    Each module's own tensors are swapped for plain full-size CPU tensors (:data:`UNWRITTEN` where
    the model holds a meta tensor, zeros where it holds a shard, a copy otherwise), the initialisers
    run as in :func:`torchgraft.load` (:func:`~torchgraft.staging.initialise_entries`), and the
    modules get their own tensors back.
    """
    values: dict[str, torch.Tensor] = {}
    saved: dict[str, tuple[dict, dict]] = {}
    todo = groups.to_initialise
    was_meta = {name: live(view, name).is_meta for names in todo.values() for name in names}
    try:
        for path in todo:
            module = view.modules[path]
            saved[path] = (dict(module._parameters), dict(module._buffers))
            for store in (module._parameters, module._buffers):
                for key, t in store.items():
                    if t is not None:
                        store[key] = _full_start(t, fill=UNWRITTEN if init_missing else 0)
        methods = initialise_entries(
            model, view, todo, init_missing=init_missing,
            was_meta={path: any(was_meta[n] for n in names) for path, names in todo.items()},
        )  # fmt: skip
        for path, names in todo.items():
            module = view.modules[path]
            for name in names:
                value = slot(module, split_key(name)[1])
                assert value is not None
                if methods.get(path) == "kept" and not was_meta[name]:
                    continue  # nothing initialised it: the model keeps its values
                values[name] = value.detach()
    finally:
        for path, (params, buffers) in saved.items():
            module = view.modules[path]
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
    return values, methods


def _full_start(t: torch.Tensor, *, fill: float) -> torch.Tensor:
    if t.is_meta:
        value = torch.full(t.shape, fill if is_float(t.dtype) else 0, dtype=t.dtype)
    elif isinstance(t, DTensor):
        value = torch.zeros(t.shape, dtype=t.dtype)
    else:
        value = t.detach().to("cpu", copy=True)
    return nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value

