"""Executing a plan: stage every tensor, then commit into the model as one transaction.

Stage (nothing in the model changes): read each planned source tensor once (memory-mapped
where the format allows), run its adapter, cast and move it when it will be assigned, check
shapes, scan for NaN/Inf, and refuse a load that would leave meta tensors. Any error stops here.

Commit:
  1. materialise and initialise the modules that miss weights (fast init);
  2. hand each module its entries through its own ``_load_from_state_dict`` with the
     checkpoint's metadata (version hooks such as BatchNorm's run as in ``load_state_dict``):
     first the modules that assign (meta device, dtype change) or run loading code of their
     own, remembering what they change; any error there undoes everything;
  3. then the in-place copies into torch's own layers, which only copy checked bytes and
     cannot fail, so nothing is copied aside for them (memory: model + staged tensors);
     Ctrl-C waits until this phase is done; tied weights are restored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import nn

from .errors import LoadError
from .keys import split_key
from .plan import Plan
from .planner import IgnorePatterns, PlanOptions, build_plan
from .policy import AdaptSpec
from .report import LoadReport
from .rules import RuleSpec
from .sources import Source
from .sources import open as open_source
from .staging import (
    UNWRITTEN,
    ModuleGroups,
    count_nonfinite,
    initialise_entries,
    is_float,
    nonfinite_error,
    retie,
    slot,
    stage_entry,
    strict_error,
    tie_groups,
)
from .target import TargetView

__all__ = ["load"]

logger = logging.getLogger("torchgraft")


class _Undo:
    """Remembers what the commit changes so that a failure puts everything back."""

    def __init__(self) -> None:
        self._slots: dict[int, tuple[nn.Module, dict[str, Any], dict[str, Any]]] = {}
        self._values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def slots(self, module: nn.Module) -> None:
        if id(module) not in self._slots:
            self._slots[id(module)] = (module, dict(module._parameters), dict(module._buffers))

    def values(self, tensor: torch.Tensor | None) -> None:
        if tensor is not None and not tensor.is_meta and id(tensor) not in self._values:
            self._values[id(tensor)] = (tensor, tensor.detach().clone())

    def rollback(self) -> None:
        with torch.no_grad():
            for tensor, saved in self._values.values():
                tensor.copy_(saved)
        for module, params, buffers in self._slots.values():
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)


def _final_dtype(current: torch.dtype, wanted: torch.dtype | None) -> torch.dtype:
    """The dtype an entry ends up in: ``wanted`` for floating-point entries, else unchanged."""
    return wanted if wanted is not None and is_float(current) else current


def load(
    model: nn.Module,
    source: str | os.PathLike[str] | Source | Mapping[str, Any],
    *,
    strict: bool = False,
    rules: RuleSpec | None = None,
    prefix: str | None = None,
    ignore_missing: IgnorePatterns = (),
    ignore_unexpected: IgnorePatterns = (),
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    plan: Plan | None = None,
    init_missing: bool = True,
    adapt: AdaptSpec | None = None,
    check_finite: Literal["warn", "error", False] | None = False,
    allow_globals: Iterable[str | Any] | None = None,
    align: bool = False,
) -> LoadReport:
    """Load a checkpoint into ``model``, initialise only what is missing, and report what happened.

    Args:
        model: any ``nn.Module``, built normally or on the meta device
            (``with torch.device("meta"): model = Net()``).
        source: a path (file, directory, ``*.index.json``), an open ``Source`` or a state dict.
        strict: raise :class:`~torchgraft.LoadError` listing every missing, unexpected and
            mismatched key instead of loading.
        rules, prefix, ignore_missing, ignore_unexpected: as for :func:`torchgraft.plan`.
        dtype: floating-point tensors end up in this dtype (cast while loading); by default
            each tensor takes the dtype the model already has.
        device: where tensors of a meta-device model are materialised (default ``"cpu"``);
            tensors already on a device stay there.
        plan: execute this plan (from :func:`torchgraft.plan` or :meth:`Plan.load`) instead of
            making one; it is checked against the model and checkpoint first.
        init_missing: initialise the modules whose weights are missing (fast init). When
            false they keep their current values.
        adapt: adapt shape mismatches instead of initialising them: ``"auto"`` or
            ``{glob: adapter}`` (see :func:`torchgraft.plan`); every adaptation is in
            ``report.adapted``. Part of planning, so ignored when ``plan=`` is given.
        check_finite: look for NaN / Inf in every floating-point tensor as it will be stored
            (after adapting and casting, so a cast that overflows counts too). ``False``
            (default): no check, so a zero-copy load reads no tensor bytes; ``"warn"``: list
            them in ``report.nonfinite`` and warn; ``"error"``: raise
            :class:`~torchgraft.LoadError` naming them, the model unchanged. The check reads
            every loaded value once (about 0.4 s for 4.8 GiB on 2 cores).
        allow_globals: when ``source`` is a path: classes a trusted pickle may hold
            (``["argparse.Namespace"]``), as for :func:`torchgraft.open`.
        align: pair differently named entries by structure (see :func:`torchgraft.plan`);
            ``report.aligned`` says which, with confidence and reason. Part of planning,
            so ignored when ``plan=`` is given (a saved plan keeps its alignment).

    Returns:
        A :class:`~torchgraft.LoadReport`; warnings about unused and newly initialised
        weights also go to the ``torchgraft`` logger.

    Raises:
        CheckpointError: the checkpoint cannot be read (the model is unchanged).
        LoadError: ``strict=True`` and the checkpoint does not fit, a module's loading hook
            failed, meta tensors would be left, or ``check_finite="error"`` found NaN / Inf
            (the model is unchanged).
        PlanError: ``plan`` was made for another model or checkpoint layout, or ``adapt`` is malformed.
        AdapterError: an ``adapt`` adapter cannot produce the model's shape (the model is unchanged).

    Example:
        >>> import torch, torchgraft as tg
        >>> from transformers import BertConfig, BertForTokenClassification
        >>> config = BertConfig.from_pretrained("all-MiniLM-L6-v2", num_labels=2)
        >>> with torch.device("meta"):
        ...     model = BertForTokenClassification(config)
        >>> report = tg.load(model, "all-MiniLM-L6-v2/")
        >>> report.missing
        ['classifier.weight', 'classifier.bias']
    """
    started = time.perf_counter()
    if check_finite not in ("warn", "error", False, None):
        raise ValueError(f"check_finite must be 'warn', 'error' or False, not {check_finite!r}")
    src = open_source(source, allow_globals=allow_globals)
    try:
        view = TargetView.of(model)
        if plan is None:
            options = PlanOptions(rules=rules, prefix=prefix, ignore_missing=ignore_missing,
                                  ignore_unexpected=ignore_unexpected, adapt=adapt, align=align)  # fmt: skip
            plan = build_plan(model, view, src, options)
        else:
            plan.check_fits(view, src)
        if strict and plan.problems():
            raise strict_error(src, type(model).__name__, plan)

        groups = ModuleGroups.of(view, plan)
        materialise_on = torch.device(device) if device is not None else torch.device("cpu")
        staged, assign_modules = _stage(view, plan, groups, src, dtype, materialise_on)
        nonfinite = _find_nonfinite(staged, view, dtype) if check_finite else {}
        if nonfinite and check_finite == "error":
            raise nonfinite_error(src, nonfinite)

        _check_complete(model, view, plan, groups, staged)
        undo = _Undo()
        init_methods: dict[str, str] = {}
        try:
            with torch.no_grad():
                init_methods = _initialise(model, view, groups, undo, materialise_on, dtype, init_missing)
                _commit(model, view, plan, groups, src, staged, assign_modules, undo)
        except BaseException:
            undo.rollback()
            raise
    finally:
        if src is not source:  # opened here from a path: release it (tensors assigned from its maps stay valid)
            src.close()
    report = LoadReport.from_plan(
        plan,
        model=model,
        source=src,
        initialised=init_methods,
        dtype=None if dtype is None else str(dtype).removeprefix("torch."),
        seconds=time.perf_counter() - started,
    )
    report.nonfinite = nonfinite
    report.log(logger)
    return report


def _stage(
    view: TargetView,
    plan: Plan,
    groups: ModuleGroups,
    src: Source,
    dtype: torch.dtype | None,
    materialise_on: torch.device,
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Read every planned tensor once; adapt; cast/move those that will be assigned."""
    live = view.tensors
    assign_modules: set[str] = set()
    for name, e in plan.entries.items():
        if not e.loads:
            continue
        current = live[name]
        if current.is_meta or _final_dtype(current.dtype, dtype) != current.dtype:
            assign_modules.add(groups.module[name])
    staged: dict[str, torch.Tensor] = {}
    for name, e in plan.entries.items():
        if not e.loads:
            continue
        assert e.source is not None
        current = live[name]
        tensor = stage_entry(name, e, src[e.source].load(), shape=tuple(current.shape), source=src)
        if groups.module[name] in assign_modules:
            target_dtype = _final_dtype(current.dtype, dtype)
            target_device = materialise_on if current.is_meta else current.device
            tensor = tensor.to(device=target_device, dtype=target_dtype)
        elif tensor.device != current.device:
            # an in-place copy across devices must not allocate at commit time: cast here, on the source side
            tensor = tensor.to(dtype=current.dtype).contiguous()
        staged[name] = tensor
    return staged, assign_modules


def _find_nonfinite(
    staged: dict[str, torch.Tensor], view: TargetView, dtype: torch.dtype | None
) -> dict[str, dict[str, int]]:
    """Model name -> ``{"nan": n, "inf": n}`` for staged tensors that are not finite in their final dtype."""
    out: dict[str, dict[str, int]] = {}
    for name, tensor in staged.items():
        if not is_float(tensor.dtype):
            continue
        info = view.entries.get(name) or view.nonpersistent.get(name)
        final = _final_dtype(getattr(torch, info.dtype), dtype) if info is not None else tensor.dtype
        if final != tensor.dtype and is_float(final):
            tensor = tensor.to(final)  # copy_ casts the same way at commit: overflow becomes Inf
        counts = count_nonfinite(tensor)
        if counts is not None:
            out[name] = counts
    return out


def _initialise(
    model: nn.Module,
    view: TargetView,
    groups: ModuleGroups,
    undo: _Undo,
    materialise_on: torch.device,
    dtype: torch.dtype | None,
    init_missing: bool,
) -> dict[str, str]:
    todo = groups.to_initialise
    was_meta: dict[str, bool] = {}
    for path in todo:
        module = view.modules[path]
        undo.slots(module)
        for t in [*module.parameters(), *module.buffers()]:
            undo.values(t)
        for sub in module.modules():
            undo.slots(sub)
        was_meta[path] = any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])
        _materialise(module, materialise_on, fill=UNWRITTEN if init_missing else 0)
    methods = initialise_entries(model, view, todo, init_missing=init_missing, was_meta=was_meta)
    for path in todo:
        module = view.modules[path]
        if dtype is not None:
            for store in (module._parameters, module._buffers):
                for key, t in store.items():
                    if t is not None and is_float(t.dtype) and t.dtype != dtype:
                        store[key] = _like(t, t.to(dtype))
    return methods


def _like(old: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    if isinstance(old, nn.Parameter):
        return nn.Parameter(value, requires_grad=old.requires_grad)
    return value


def _materialise(module: nn.Module, device: torch.device, *, fill: float = 0) -> None:
    """Give the module's own meta tensors real storage, ready for its initialiser.

    Floating-point tensors are filled with ``fill`` (NaN marks what no initialiser wrote), the others with zeros.
    """
    for store in (module._parameters, module._buffers):
        for key, t in store.items():
            if t is not None and t.is_meta:
                value = torch.full(t.shape, fill if is_float(t.dtype) else 0, dtype=t.dtype, device=device)
                store[key] = _like(t, value)


def _stock_loader(module: nn.Module) -> bool:
    """True when loading into ``module`` runs only torch's own code, which cannot fail on checked tensors."""
    from torch.nn.modules.batchnorm import _NormBase

    stock = (nn.Module._load_from_state_dict, _NormBase._load_from_state_dict)
    return type(module)._load_from_state_dict in stock and not module._load_state_dict_pre_hooks


def _commit(
    model: nn.Module,
    view: TargetView,
    plan: Plan,
    groups: ModuleGroups,
    src: Source,
    staged: dict[str, torch.Tensor],
    assign_modules: set[str],
    undo: _Undo,
) -> None:
    """Hand every module its entries; ties restored at the end.

    Modules that assign, or whose loading runs code of their own (a custom
    ``_load_from_state_dict`` or a pre-hook), go first, with what they change remembered.
    In-place copies into stock torch modules go last: shapes and values were checked while
    staging, so they cannot fail, and nothing needs to be copied aside for them (memory stays
    at the model plus the staged tensors).
    """
    # modules with only BatchNorm-style "default" entries are there too: their hook fills them
    by_module = {path: {name: staged[name] for name in names} for path, names in groups.loads.items()}
    first = [p for p in by_module if p in assign_modules or not _stock_loader(view.modules[p])]
    last = [p for p in by_module if p not in set(first)]
    errors: list[str] = []
    for path in first:
        _load_module(view, plan, src, path, by_module[path], path in assign_modules, undo, True, errors)
    if errors:
        raise LoadError(f"Loading into {type(model).__name__} failed; the model is unchanged:", errors)
    with _interrupts_deferred():  # the last phase only copies bytes: let Ctrl-C wait until it is done
        for path in last:
            _load_module(view, plan, src, path, by_module[path], False, undo, False, errors)
        retie(view, plan, before_change=undo.slots)
    if errors:  # unreachable for stock modules with checked tensors; said plainly if it ever happens
        raise LoadError(
            f"Loading into {type(model).__name__} failed part way; some tensors were already copied:", errors
        )


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT back while a phase that cannot be undone runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


def _load_module(
    view: TargetView,
    plan: Plan,
    src: Source,
    path: str,
    local: dict[str, torch.Tensor],
    assign: bool,
    undo: _Undo,
    remember_values: bool,
    errors: list[str],
) -> None:
    module = view.modules[path]
    undo.slots(module)
    if remember_values and not assign:
        for name in local:
            undo.values(slot(module, split_key(name)[1]))
    prefix = f"{path}." if path else ""
    src_module = plan.metadata_map.get(path)
    metadata = dict(src.module_metadata.get(src_module, {})) if src_module is not None else {}
    metadata["assign_to_params_buffers"] = assign
    # non-persistent buffers are invisible to _load_from_state_dict: set them directly
    for name in [n for n in local if n in view.nonpersistent]:
        module._buffers[split_key(name)[1]] = local.pop(name)
    module._load_from_state_dict(local, prefix, metadata, False, [], [], errors)


def _check_complete(
    model: nn.Module, view: TargetView, plan: Plan, groups: ModuleGroups, staged: dict[str, torch.Tensor]
) -> None:
    """Before anything changes: refuse a load that would leave tensors on the meta device."""
    meta = [n for n, i in view.entries.items() if i.meta] + [n for n, i in view.nonpersistent.items() if i.meta]
    if not meta:
        return
    defaults = {n for n, e in plan.entries.items() if e.action == "default"}
    covered = {n for n in meta if n in staged or n in defaults or groups.module[n] in groups.to_initialise}
    for names in tie_groups(view).values():
        if any(n in covered for n in names):
            covered.update(names)
    left = [n for n in meta if n not in covered]
    if left:
        raise LoadError(
            f"{type(model).__name__} would keep tensors on the meta device (no checkpoint value, no way to initialise them); "
            "the model is unchanged. Give them values in the checkpoint, or build these modules outside torch.device('meta'):",
            left,
        )
