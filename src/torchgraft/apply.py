"""Executing a plan: stage every tensor, then commit into the model as one transaction.

Stage (nothing in the model changes): read each planned source tensor once (memory-mapped
where the format allows), run its adapter, cast and move it when it will be assigned, check
shapes, scan for NaN/Inf, and refuse a load that would leave meta tensors. Any error stops here.

Commit:
  1. materialise and initialise the modules that miss weights (fast init);
  2. run torch's own ``load_state_dict`` recursion over one state dict of staged tensors in
     model names, with the checkpoint's metadata: every module's ``_load_from_state_dict``,
     pre-hooks and post-hooks run as under ``load_state_dict`` (the root and modules without
     tensors included, each seeing its whole subtree), remembering what each module that
     assigns or runs code of its own may change; any error there undoes everything;
  3. then the in-place copies into torch's own layers that no hook can observe (all of them
     in a model without load hooks), which only copy checked bytes and cannot fail, so nothing
     is copied aside for them (memory: model + staged tensors); Ctrl-C waits until this phase
     is done; tied weights are restored.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from .align.trace import ExampleInputs
from .errors import LoadError
from .keys import collapse_keys, split_key
from .plan import Plan
from .planner import IgnorePatterns, PlanOptions, build_plan
from .policy import AdaptSpec
from .report import LoadReport
from .rules import RuleSpec
from .sources import Source
from .sources import open as open_source
from .sources.base import EXTRA_STATE
from .staging import (
    UNWRITTEN,
    EntryReader,
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
from .target import TargetView, runs_own_loading_code

__all__ = ["load"]

logger = logging.getLogger("torchgraft")


class _Undo:
    """Remembers what the commit changes so that a failure puts everything back.

    Slots are restored through the module's own ``__setattr__`` (an RNN's cached
    ``_flat_weights`` follows), lazy parameters become uninitialised again, and
    ``set_extra_state`` runs again with what ``get_extra_state`` returned before.
    """

    def __init__(self) -> None:
        self._slots: dict[int, tuple[nn.Module, dict[str, Any], dict[str, Any], dict[str, tuple[Any, ...]]]] = {}
        self._values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._extra: dict[int, tuple[nn.Module, Any]] = {}

    def slots(self, module: nn.Module) -> None:
        if id(module) not in self._slots:
            lazy = {
                k: (type(t), t.requires_grad, t.device, t.dtype)
                for k, t in [*module._parameters.items(), *module._buffers.items()]
                if t is not None and is_lazy(t)
            }
            self._slots[id(module)] = (module, dict(module._parameters), dict(module._buffers), lazy)

    def values(self, tensor: torch.Tensor | None) -> None:
        if tensor is not None and not tensor.is_meta and not is_lazy(tensor) and id(tensor) not in self._values:
            self._values[id(tensor)] = (tensor, tensor.detach().clone())

    def extra_state(self, module: nn.Module) -> None:
        if id(module) not in self._extra:
            self._extra[id(module)] = (module, copy.deepcopy(module.get_extra_state()))

    def rollback(self) -> None:
        for module, state in self._extra.values():
            module.set_extra_state(state)
        with torch.no_grad():
            for tensor, saved in self._values.values():
                tensor.copy_(saved)
        for module, params, buffers, lazy in self._slots.values():
            for key, (cls, requires_grad, device, dtype) in lazy.items():  # materialize() changed them in place
                fresh = cls(requires_grad=requires_grad, device=device, dtype=dtype)
                (params if key in params else buffers)[key] = fresh
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
            for key, value in [*params.items(), *buffers.items()]:
                set_slot(module, key, value)


def set_slot(module: nn.Module, key: str, value: torch.Tensor | None) -> None:
    """Put ``value`` in the module's parameter or buffer ``key`` through its own ``__setattr__``.

    Modules that cache their tensors (an RNN's ``_flat_weights``) see the change. A value
    ``__setattr__`` would refuse (a plain tensor some code put among the parameters) goes into
    the store directly.
    """
    store = module._parameters if key in module._parameters else module._buffers
    if value is None or (store is module._parameters and not isinstance(value, nn.Parameter)):
        store[key] = value
        return
    try:
        setattr(module, key, value)
    except Exception:  # a module's own __setattr__ refused: the value is still put back
        store[key] = value


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A handed checkpoint tensor in ``dtype`` when it is floating point (what the module's own code gets)."""
    return tensor.to(dtype) if dtype is not None and is_float(tensor.dtype) else tensor


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
    example_inputs: ExampleInputs | None = None,
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
        example_inputs: with ``align=True``: inputs for one forward traced on a meta copy of the
            model, so modules are aligned in the order they run (see :func:`torchgraft.plan`);
            ``"auto"`` builds them from the model's config. Ignored when ``plan=`` is given.

    Returns:
        A :class:`~torchgraft.LoadReport`; warnings about unused and newly initialised
        weights also go to the ``torchgraft`` logger.

    Raises:
        CheckpointError: the checkpoint cannot be read (the model is unchanged).
        LoadError: ``strict=True`` and the checkpoint does not fit (checked after their own
            code ran for modules with loading code of their own, as ``load_state_dict`` does), a
            module's loading hook failed, meta tensors would be left, or ``check_finite="error"``
            found NaN / Inf (the model is unchanged).
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
                                  ignore_unexpected=ignore_unexpected, adapt=adapt, align=align,
                                  example_inputs=example_inputs)  # fmt: skip
            plan = build_plan(model, view, src, options)
        else:
            plan.check_fits(view, src)
        own = _OwnCode.of(view, plan)
        extra_state, extra_unused, extra_missing = _extra_states(view, plan, src)
        if strict and (problems := _extra_problems(extra_unused, extra_missing) + own.problems(plan)):
            plain = not own.candidates and not extra_unused and not extra_missing  # the plan's own problems
            raise strict_error(src, type(model).__name__, plan, None if plain else problems)

        groups = ModuleGroups.of(view, plan)
        materialise_on = torch.device(device) if device is not None else torch.device("cpu")
        staged, assign_modules = _stage(view, plan, groups, src, dtype, materialise_on)
        nonfinite = _find_nonfinite(staged, view, dtype) if check_finite else {}
        if nonfinite and check_finite == "error":
            raise nonfinite_error(src, nonfinite)

        _check_complete(model, view, plan, groups, staged)
        handed = {name: _cast(src[orig].load(), dtype) for orig, name in plan.handed.items()}
        undo = _Undo()
        init_methods: dict[str, str] = {}
        try:
            with torch.no_grad():
                init_methods = _initialise(model, view, groups, undo, materialise_on, dtype, init_missing)
                walk = _commit(
                    model, view, plan, src, {**staged, **handed}, extra_state, assign_modules, undo,
                    check=own.strict_check(src, type(model).__name__) if strict and own.active else None,
                )  # fmt: skip
            settled, filled = own.settle(plan, walk)
        except BaseException:
            undo.rollback()
            raise
    finally:
        if src is not source:  # opened here from a path: release it (tensors assigned from its maps stay valid)
            src.close()
    report = LoadReport.from_plan(
        settled,  # the plan as it happened: what modules' own loading code filled or left unused
        model=model,
        source=src,
        initialised={p: how for p, how in init_methods.items() if not set(groups.to_initialise[p]) <= filled},
        dtype=None if dtype is None else str(dtype).removeprefix("torch."),
        seconds=time.perf_counter() - started,
    )
    report.nonfinite = nonfinite
    report.notes += _extra_state_notes(extra_state, extra_unused, extra_missing)
    report.log(logger)
    return report


@dataclass(frozen=True)
class _OwnCode:
    """Modules with loading code of their own and the plan's entries under them, which their code may fill.

    Such a module gets its whole subtree's entries (``plan.handed``: checkpoint keys it may rename or
    convert); whether its ``init`` entries were filled and its handed keys used is what torch's
    recursion reports (its missing / unexpected lists), not what the plan could see.
    """

    candidates: frozenset[str]  # init entries (not mismatched) under such a module
    active: bool = False  # the plan hands checkpoint keys to such modules

    @classmethod
    def of(cls, view: TargetView, plan: Plan) -> _OwnCode:
        owners = [p for p, m in view.modules.items() if runs_own_loading_code(m)]
        if not owners or not plan.handed:
            return cls(frozenset())
        under = tuple(f"{p}." for p in owners if p)
        every = "" in owners
        return cls(
            frozenset(
                n
                for n, e in plan.entries.items()
                if e.action == "init" and not e.mismatched and (every or n.startswith(under))
            ),
            active=True,
        )

    def problems(self, plan: Plan) -> list[str]:
        """``strict=True`` before loading: the plan's problems, less what the modules' own code may still settle."""
        problems = [p for p in plan.problems() if not any(p.startswith(f"missing: {n} ") for n in self.candidates)]
        return problems if any(not p.startswith("note: ") for p in problems) else []

    def strict_check(self, src: Source, model_name: str) -> Callable[[_Walk], None]:
        def check(walk: _Walk) -> None:
            missing = set(walk.missing)
            left = sorted(self.candidates & missing)
            problems = [f"missing: {n} (after the module's own loading code)" for n in left]
            problems += [f"unexpected: {k} (left unused by the module's own loading code)" for k in walk.unexpected]
            if problems:
                raise strict_error(src, model_name, None, problems)

        return check

    def settle(self, plan: Plan, walk: _Walk) -> tuple[Plan, set[str]]:
        """The plan as it happened: entries the modules' code filled are loaded; handed keys it left, unexpected."""
        if not self.active:
            return plan, set()
        missing, unexpected = set(walk.missing), set(walk.unexpected)
        filled = {n for n in self.candidates if n not in missing}
        left = [orig for orig, name in plan.handed.items() if name in unexpected]
        entries = dict(plan.entries)
        for n in filled:
            entries[n] = dataclasses.replace(
                entries[n], action="copy", note="filled by its module's own loading code from the handed entries"
            )
        used = [orig for orig in plan.handed if orig not in left]
        notes = list(plan.notes)
        if used:
            notes.append(f"used by modules' own loading code: {', '.join(collapse_keys(used))}")
        return dataclasses.replace(plan, entries=entries, unexpected=[*plan.unexpected, *left], notes=notes), filled


def _extra_problems(unused: list[str], missing: list[str]) -> list[str]:
    """What ``strict=True`` refuses about extra state, as ``load_state_dict(strict=True)`` does."""
    return [f"missing: {n} (set_extra_state)" for n in missing] + [f"unexpected: {k} (extra state)" for k in unused]


def _extra_state_notes(loaded: dict[str, Any], unused: list[str], missing: list[str]) -> list[str]:
    notes = []
    if loaded:
        notes.append(f"extra state given to set_extra_state: {', '.join(loaded)}")
    if unused:
        notes.append(f"extra state in the checkpoint that no module of the model takes (not used): {', '.join(unused)}")
    if missing:
        notes.append(f"no extra state in the checkpoint for (set_extra_state not called): {', '.join(missing)}")
    return notes


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
    reader = EntryReader(plan.entries.values(), src)  # a fused qkv read and transformed once for its pieces
    for name, e in plan.entries.items():
        if not e.loads:
            continue
        assert e.source is not None
        current = live[name]
        shape = e.shape if is_lazy(current) else tuple(current.shape)
        tensor = stage_entry(name, e, reader.read(e), shape=shape, source=src)
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
                for key, t in list(store.items()):
                    if t is not None and is_float(t.dtype) and t.dtype != dtype:
                        set_slot(module, key, _like(t, t.to(dtype)))
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
        for key, t in list(store.items()):
            if t is not None and t.is_meta and not is_lazy(t):
                value = torch.full(t.shape, fill if is_float(t.dtype) else 0, dtype=t.dtype, device=device)
                set_slot(module, key, _like(t, value))


def _stock_loader(module: nn.Module) -> bool:
    """True when loading into ``module`` runs only torch's own code, which cannot fail on checked tensors."""
    return not runs_own_loading_code(module) and not _takes_extra_state(module)


def _takes_extra_state(module: nn.Module) -> bool:
    """True when torch's loading hands the module its ``_extra_state`` (``set_extra_state`` is its own)."""
    return type(module).set_extra_state is not nn.Module.set_extra_state


def _extra_states(view: TargetView, plan: Plan, src: Source) -> tuple[dict[str, Any], list[str], list[str]]:
    """The checkpoint's ``_extra_state`` values in model names; the unused checkpoint keys; the model's missing ones.

    Names follow the plan's base-model prefix (they are not tensors, so rules do not see them).
    """
    wanted = {f"{p}.{EXTRA_STATE}" if p else EXTRA_STATE for p, m in view.modules.items() if _takes_extra_state(m)}
    mode, pfx = plan.prefix.get("mode", ""), plan.prefix.get("prefix", "")
    found: dict[str, Any] = {}
    unused: list[str] = []
    for key, value in src.extra_state.items():
        names = [key, pfx + key] if mode == "add" else [key, key.removeprefix(pfx)] if mode == "strip" else [key]
        target = next((n for n in names if n in wanted), None)
        if target is None:
            unused.append(key)
        else:
            found[target] = value
    return found, unused, [n for n in wanted if n not in found]


class _Walk:
    """torch's ``load_state_dict`` recursion (``load(module, local_state_dict, prefix)``) over one state dict.

    Every module gets its whole subtree's entries, its checkpoint metadata and its hooks, in
    torch's order (pre-hooks inside ``_load_from_state_dict``, post-hooks after the children,
    with the shared missing / unexpected lists). Before any code of a module runs, what it may
    change is remembered in ``undo``. Stock in-place copies that no code of the model's own can
    observe (they come after the last hook or custom loader in torch's order) are deferred to
    :meth:`finish`, which only copies checked bytes.
    """

    def __init__(
        self,
        model: nn.Module,
        metadata: dict[str, dict[str, Any]],
        assign_modules: set[str],
        undo: _Undo,
        *,
        defer: bool = True,
    ) -> None:
        self.model, self.metadata, self.assign_modules, self.undo = model, metadata, assign_modules, undo
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.errors: list[str] = []
        self.deferred: list[tuple[nn.Module, dict[str, Any], str, dict[str, Any]]] = []
        events = list(self._events(model, ""))
        observed = [i for i, (kind, m) in enumerate(events) if _observes(kind, m)]
        self._last_observer = (observed[-1] if observed else -1) if defer else len(events)
        self._step = 0

    @staticmethod
    def _events(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        yield "load", module
        for name, child in module._modules.items():
            if child is not None:
                yield from _Walk._events(child, f"{prefix}{name}.")
        yield "post", module

    def run(self, state_dict: dict[str, Any]) -> None:
        self._load(self.model, state_dict, "")

    def _load(self, module: nn.Module, local: dict[str, Any], prefix: str) -> None:
        path = prefix[:-1]
        metadata = dict(self.metadata.get(path, {}))
        metadata.pop("assign_to_params_buffers", None)  # decided here, never by the file
        assign = path in self.assign_modules
        if assign:  # only then, as load_state_dict(assign=True) sets it: hooks see the metadata torch gives them
            metadata["assign_to_params_buffers"] = True
        step, self._step = self._step, self._step + 1
        if step > self._last_observer and _stock_loader(module) and not assign:
            self.deferred.append((module, local, prefix, metadata))
        else:
            self._remember(module, local, prefix, assign)
            module._load_from_state_dict(local, prefix, metadata, True, self.missing, self.unexpected, self.errors)
        by_child: dict[str, dict[str, Any]] = defaultdict(dict)  # torch filters with startswith per child: same dicts
        for k, v in local.items():
            head, dot, _ = k[len(prefix) :].partition(".")
            if dot and k.startswith(prefix):
                by_child[head][k] = v
        for name, child in module._modules.items():
            if child is not None:
                self._load(child, by_child.get(name, {}), f"{prefix}{name}.")
        self._step += 1
        if module._load_state_dict_post_hooks:
            from torch.nn.modules.module import _IncompatibleKeys

            incompatible = _IncompatibleKeys(self.missing, self.unexpected)
            for hook in module._load_state_dict_post_hooks.values():
                if hook(module, incompatible) is not None:
                    raise LoadError(
                        f"A load_state_dict post-hook of {type(module).__name__} at {path or 'the root'!r} "
                        "returned a value; it must change the incompatible keys in place "
                        "(torch refuses the same); the model is unchanged:",
                        [repr(hook)],
                    )

    def _remember(self, module: nn.Module, local: dict[str, Any], prefix: str, assign: bool) -> None:
        self.undo.slots(module)
        stock = _stock_loader(module)
        if not assign or not stock:
            for attr, t in [*module._parameters.items(), *module._buffers.items()]:
                if not stock or prefix + attr in local:
                    self.undo.values(t)
        if prefix + EXTRA_STATE in local and type(module).get_extra_state is not nn.Module.get_extra_state:
            self.undo.extra_state(module)

    def finish(self) -> None:
        """The deferred stock copies (they only copy bytes that were checked while staging)."""
        for module, local, prefix, metadata in self.deferred:
            module._load_from_state_dict(local, prefix, metadata, True, self.missing, self.unexpected, self.errors)


def _observes(kind: str, module: nn.Module) -> bool:
    """True when this step of torch's recursion runs code of the model's own (a hook or a custom loader)."""
    if kind == "post":
        return bool(module._load_state_dict_post_hooks)
    return not _stock_loader(module)


def _commit(
    model: nn.Module,
    view: TargetView,
    plan: Plan,
    src: Source,
    staged: dict[str, torch.Tensor],
    extra_state: dict[str, Any],
    assign_modules: set[str],
    undo: _Undo,
    *,
    check: Callable[[_Walk], None] | None = None,
) -> _Walk:
    """Run torch's ``load_state_dict`` recursion over one state dict of staged tensors (model names).

    Every module's ``_load_from_state_dict`` and load hooks run as under ``load_state_dict``, the
    root and modules without tensors of their own included, each with its whole subtree's entries.
    Modules that assign (meta device, dtype change) or run code of their own have what they change
    remembered; any error there, or in ``error_msgs``, undoes everything. In-place copies into
    stock torch modules that no hook can observe go last: shapes and values were checked while
    staging, so they cannot fail, and nothing is copied aside for them (memory stays at the model
    plus the staged tensors); Ctrl-C waits until they are done. Tied weights are restored.
    ``check(walk)`` runs before anything is left that cannot be undone (then nothing is deferred).
    """
    state = _state_dict(view, staged, assign_modules, undo)
    state.update(extra_state)
    loading = {split_key(n)[0] for n in staged if n not in view.nonpersistent}
    assigned = assign_modules | _assigning_containers(model, assign_modules, loading)
    walk = _Walk(model, _module_metadata(view, plan, src), assigned, undo, defer=check is None)
    walk.run(state)
    if check is not None:
        check(walk)
    if walk.errors:
        raise LoadError(f"Loading into {type(model).__name__} failed; the model is unchanged:", walk.errors)
    with _interrupts_deferred():  # the last phase only copies bytes: let Ctrl-C wait until it is done
        walk.finish()
        retie(view, plan, before_change=undo.slots)
    if walk.errors:  # unreachable for stock modules with checked tensors; said plainly if it ever happens
        raise LoadError(
            f"Loading into {type(model).__name__} failed part way; some tensors were already copied:", walk.errors
        )
    return walk


def _assigning_containers(model: nn.Module, assign_modules: set[str], loading: set[str]) -> set[str]:
    """Modules without tensors of their own that hooks should see as assigning (``assign_to_params_buffers``).

    Those whose subtree assigns everything it loads (a model built on meta, loaded as with
    ``load_state_dict(assign=True)``); where the subtree loads nothing, as the whole model does.
    """
    subtree: dict[str, tuple[bool, bool]] = {}  # path -> (loads anything, assigns all it loads)
    order: list[tuple[str, nn.Module]] = []

    def visit(module: nn.Module, path: str) -> tuple[bool, bool]:
        loads, assigns = path in loading, path not in loading or path in assign_modules
        for name, child in module._modules.items():
            if child is not None:
                child_loads, child_assigns = visit(child, f"{path}.{name}" if path else name)
                loads, assigns = loads or child_loads, assigns and child_assigns
        subtree[path] = (loads, assigns)
        order.append((path, module))
        return loads, assigns

    root_loads, root_assigns = visit(model, "")
    everywhere = root_loads and root_assigns
    out = set()
    for path, module in order:
        if any(t is not None for t in [*module._parameters.values(), *module._buffers.values()]):
            continue
        loads, assigns = subtree[path]
        if (loads and assigns) or (not loads and everywhere):
            out.add(path)
    return out


def _state_dict(
    view: TargetView, staged: dict[str, torch.Tensor], assign_modules: set[str], undo: _Undo
) -> dict[str, Any]:
    """The one state dict torch's recursion reads, in model names; non-persistent buffers are set here.

    Tied names carry the loaded tensor, as the model's own ``state_dict()`` would, where their
    module takes it the same way (both assign or both copy); :func:`retie` restores the tie after.
    """
    state: dict[str, Any] = {}
    for name, tensor in staged.items():
        if name in view.nonpersistent:  # invisible to _load_from_state_dict: set directly
            module = view.module_of(name)
            undo.slots(module)
            module._buffers[split_key(name)[1]] = tensor
        else:
            state[name] = tensor
    for names in tie_groups(view).values():
        first = next((n for n in names if n in state), None)
        if first is not None:
            assigns = split_key(first)[0] in assign_modules
            for n in names:
                if (split_key(n)[0] in assign_modules) == assigns:
                    state.setdefault(n, state[first])
    return state


def _module_metadata(view: TargetView, plan: Plan, src: Source) -> dict[str, dict[str, Any]]:
    """Model module path -> the checkpoint's ``_metadata`` for it (its version), modules without tensors included.

    A module without entries of its own takes its checkpoint name from a descendant's mapping
    (``block.proj`` <- ``block.proj`` gives ``block`` <- ``block``).
    """
    names: dict[str, str] = dict(plan.metadata_map)
    for model_path, src_path in plan.metadata_map.items():
        m, s = model_path, src_path
        while m:
            m_parent, m_last = split_key(m)
            s_parent, s_last = split_key(s) if s else ("", "")
            if m_last != s_last:
                break
            names.setdefault(m_parent, s_parent)
            m, s = m_parent, s_parent
    out: dict[str, dict[str, Any]] = {}
    for path in view.modules:
        src_path = names.get(path, path if path in src.module_metadata else None)
        if src_path is not None and src_path in src.module_metadata:
            out[path] = dict(src.module_metadata[src_path])
    return out


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
