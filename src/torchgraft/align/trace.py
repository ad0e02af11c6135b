"""Execution order: which modules run, and in what order, in one forward pass on the meta device.

Registration order (the order ``__init__`` assigns sub-modules, and so the order of the state
dict) is what :func:`torchgraft.align.align` uses for the model side by default. It can lie: a
block may register ``bn2`` before ``conv_pw`` and run ``conv_pw`` first. With example inputs,
:func:`trace_order` runs the forward once on a copy of the model whose tensors are all on the
meta device (shapes and dtypes, no values: nothing is computed, no weight is read, the model
itself is not touched) and records every module in the order its forward starts (a forward
pre-hook). :meth:`ExecutionOrder.sort` then puts the model's entries in that order.

Modules whose forward never starts (a head not used by this forward, an ``out_proj`` whose weight
``nn.MultiheadAttention`` reads directly) keep their registration order among themselves and go
right after the modules that ran inside their nearest ancestor that ran (for a module directly
under the root: after every module that ran).

``example_inputs="auto"`` builds the input from the model's own conventions (a registry,
:data:`INPUT_BUILDERS`): transformers models with ``main_input_name == "input_ids"`` and a
``config.vocab_size`` get ``input_ids`` of shape ``[1, 8]``; ``pixel_values`` models get
``[1, num_channels, image_size, image_size]``; timm models their ``pretrained_cfg["input_size"]``.

Example:
    >>> order, how = trace_order(model, torch.randn(1, 3, 32, 32))
    >>> order.ran[:3], order.not_run
    (['', 'stem', 'blocks'], [])
    >>> order.sort(["blocks.0.bn2.weight", "blocks.0.conv_dw.weight"])
    ['blocks.0.conv_dw.weight', 'blocks.0.bn2.weight']
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

from ..errors import PlanError
from ..keys import split_key

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["INPUT_BUILDERS", "ExampleInputs", "ExecutionOrder", "auto_inputs", "check_example_inputs", "trace_order"]

#: What ``example_inputs=`` accepts: one tensor, a tuple or list of positional arguments, a dict of
#: keyword arguments (tensors anywhere inside are replaced by meta tensors of the same shape and
#: dtype; other values are passed as they are), or ``"auto"`` (built from the model's config).
ExampleInputs = Union["torch.Tensor", tuple[Any, ...], list[Any], dict[str, Any], Literal["auto"]]

_AUTO_SEQUENCE_LENGTH = 8


@dataclass(frozen=True)
class ExecutionOrder:
    """Module paths in the order their forward started in one traced pass, and those that never started.

    Attributes:
        ran: module paths (``""`` is the model itself) in the order their forward started.
        not_run: module paths whose forward never started, in registration order.
        placed: module path -> its position in the order the aligner uses (every module).
    """

    ran: list[str]
    not_run: list[str]
    placed: dict[str, int]

    def sort(self, keys: Iterable[str]) -> list[str]:
        """State-dict ``keys`` in execution order of their modules (a module's own entries keep their order)."""
        keys = list(keys)
        last = len(self.placed)
        position = {k: i for i, k in enumerate(keys)}
        return sorted(keys, key=lambda k: (self.placed.get(split_key(k)[0], last), position[k]))

    def ran_and_not(self, keys: Iterable[str]) -> tuple[list[str], list[str]]:
        """Modules holding ``keys`` that ran, and those that did not (each in the order used)."""
        holders = list(dict.fromkeys(split_key(k)[0] for k in self.sort(keys)))
        never = set(self.not_run)
        return [m for m in holders if m not in never], [m for m in holders if m in never]


def check_example_inputs(example_inputs: ExampleInputs, *, align: bool) -> None:
    """Raise :class:`PlanError` when ``example_inputs`` has no accepted form or comes without ``align=True``."""
    if example_inputs is None:
        return
    if not align:
        raise PlanError(
            "example_inputs orders the model's modules for alignment only; pass align=True with it, "
            "or leave example_inputs out"
        )
    import torch

    if isinstance(example_inputs, str):
        if example_inputs != "auto":
            raise PlanError(f"example_inputs must be tensors or 'auto', not the string {example_inputs!r}")
        return
    if not isinstance(example_inputs, torch.Tensor | tuple | list | dict):
        raise PlanError(
            "example_inputs must be a tensor, a tuple or list of positional arguments, a dict of keyword "
            f"arguments, or 'auto', not {type(example_inputs).__name__}"
        )
    if isinstance(example_inputs, dict) and not all(isinstance(k, str) for k in example_inputs):
        raise PlanError("example_inputs as a dict holds keyword arguments: its keys must be strings")


# ---------------------------------------------------------------------------
# Inputs built from the model's conventions


def _hf_input_ids(model: nn.Module) -> dict[str, Any] | None:
    import torch

    config = getattr(model, "config", None)
    if getattr(model, "main_input_name", None) != "input_ids" or not isinstance(
        getattr(config, "vocab_size", None), int
    ):
        return None
    return {"input_ids": torch.zeros(1, _AUTO_SEQUENCE_LENGTH, dtype=torch.long, device="meta")}


def _hf_pixel_values(model: nn.Module) -> dict[str, Any] | None:
    import torch

    config = getattr(model, "config", None)
    if getattr(model, "main_input_name", None) != "pixel_values" or config is None:
        return None
    channels, size = getattr(config, "num_channels", None), getattr(config, "image_size", None)
    if isinstance(size, int):
        size = (size, size)
    if not isinstance(channels, int) or not (
        isinstance(size, tuple | list) and len(size) == 2 and all(isinstance(s, int) for s in size)
    ):
        return None
    return {"pixel_values": torch.zeros(1, channels, *size, device="meta")}


def _timm_input_size(model: nn.Module) -> tuple[Any, ...] | None:
    import torch

    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
    if not (isinstance(size, tuple | list) and size and all(isinstance(s, int) for s in size)):
        return None
    return (torch.zeros(1, *size, device="meta"),)


#: Conventions that say how to build an input for a model, tried in order: (name, builder). A builder
#: returns positional arguments (a tuple) or keyword arguments (a dict) of meta tensors, or None.
INPUT_BUILDERS: list[tuple[str, Callable[[nn.Module], tuple[Any, ...] | dict[str, Any] | None]]] = [
    ("transformers input_ids [1, 8] (config.vocab_size)", _hf_input_ids),
    ("transformers pixel_values [1, num_channels, image_size, image_size]", _hf_pixel_values),
    ("timm pretrained_cfg['input_size']", _timm_input_size),
]


def auto_inputs(model: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any], str]:
    """Positional and keyword arguments for one forward of ``model``, from its conventions, and which convention.

    Raises:
        PlanError: no convention in :data:`INPUT_BUILDERS` applies to this model.
    """
    for name, build in INPUT_BUILDERS:
        built = build(model)
        if isinstance(built, dict):
            return (), built, name
        if built is not None:
            return built, {}, name
    main = getattr(model, "main_input_name", None)
    what = f" (its main input is {main!r})" if main else ""
    raise PlanError(
        f"example_inputs='auto' cannot build an input for {type(model).__name__}{what}: no known convention "
        "says how (transformers input_ids or pixel_values models, timm models). Pass example_inputs= with "
        "tensors its forward accepts, e.g. example_inputs=torch.zeros(1, 3, 224, 224)"
    )


# ---------------------------------------------------------------------------
# Tracing


def _to_meta(value: Any) -> Any:
    import torch
    from torch.utils._pytree import tree_map

    def meta(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return torch.empty(x.shape, dtype=x.dtype, device="meta")
        return x

    return tree_map(meta, value)


def _refuse_sharded(model: nn.Module) -> None:
    """A sharded model's forward runs collectives (FSDP2 gathers its parameters): it is not traced on one rank."""
    import torch

    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    sharded = next((n for n, m in model.named_modules() if isinstance(m, FSDPModule)), None)
    if sharded is None:
        sharded = next((n for n, t in model.state_dict(keep_vars=True).items() if isinstance(t, DTensor)), None)
    if sharded is not None:
        raise PlanError(
            f"example_inputs cannot trace {type(model).__name__}: it is sharded ({sharded or '<root>'} is an FSDP "
            "module or a DTensor), and its forward would run collectives. Make the plan on the same model built "
            "unsharded on the meta device (tg.plan(meta_model, source, align=True, example_inputs=...)) and pass "
            "it as plan="
        )


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose tensors (parameters, buffers, tensor attributes) are empty meta tensors.

    ``copy.deepcopy`` with every tensor of the model pre-set in its memo: the modules and their
    attributes are copied, no tensor's bytes are read or copied.
    """
    import torch
    from torch import nn
    from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

    memo: dict[int, Any] = {}
    for module in model.modules():
        for t in [*module._parameters.values(), *module._buffers.values()]:
            if is_lazy(t) and id(t) not in memo:  # a lazy module never run: its forward materialises it, on meta
                kind = UninitializedParameter if isinstance(t, nn.Parameter) else UninitializedBuffer
                memo[id(t)] = kind(requires_grad=t.requires_grad, device="meta", dtype=t.dtype)
        for value in module.__dict__.values():
            if isinstance(value, torch.Tensor) and id(value) not in memo:
                memo[id(value)] = torch.empty(value.shape, dtype=value.dtype, device="meta")
        for p in module._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad
                )
        for b in module._buffers.values():
            if b is not None and id(b) not in memo:
                memo[id(b)] = torch.empty(b.shape, dtype=b.dtype, device="meta")
    try:
        return copy.deepcopy(model, memo)
    except Exception as e:  # a module holding something that cannot be copied (a lock, a file)
        raise PlanError(
            f"example_inputs: could not copy {type(model).__name__} to trace it on the meta device "
            f"({type(e).__name__}: {e}). Align without example_inputs, or pass rules="
        ) from e


def trace_order(model: nn.Module, example_inputs: ExampleInputs) -> tuple[ExecutionOrder, str]:
    """Run one forward pass of a meta copy of ``model`` and record the order modules start running.

    Args:
        model: any ``nn.Module``, on any device (meta included); it is not changed and no weight is read.
        example_inputs: see :data:`ExampleInputs`.

    Returns:
        The :class:`ExecutionOrder`, and how the inputs were made (for the plan note).

    Raises:
        PlanError: ``"auto"`` found no convention for this model, the model is sharded (FSDP2,
            DTensors), cannot be copied, or its forward raised on the meta device (the model's
            error is quoted).

    Example:
        >>> order, how = trace_order(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    """
    import torch

    if isinstance(example_inputs, str):
        args, kwargs, how = auto_inputs(model)
        how = f"an input built from the model's config ({how})"
    else:
        if isinstance(example_inputs, dict):
            args, kwargs = (), _to_meta(dict(example_inputs))
        elif isinstance(example_inputs, tuple | list):
            args, kwargs = tuple(_to_meta(list(example_inputs))), {}
        else:
            args, kwargs = (_to_meta(example_inputs),), {}
        how = "example inputs"
    _refuse_sharded(model)
    copied = _meta_copy(model)
    names: dict[int, list[str]] = {}
    for name, module in copied.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    started: dict[str, int] = {}

    def pre_hook(module: nn.Module, _args: Any) -> None:
        for name in names.get(id(module), ()):
            started.setdefault(name, len(started))

    handles = [m.register_forward_pre_hook(pre_hook) for m in copied.modules()]
    try:
        with torch.no_grad(), torch.device("meta"):  # tensors the forward makes itself (torch.arange(n)) on meta too
            copied(*args, **kwargs)
    except Exception as e:
        raise PlanError(
            f"example_inputs: {type(model).__name__}'s forward failed on the meta device with {how} "
            f"({type(e).__name__}: {e}). Pass example_inputs= that its forward accepts (tensors of the "
            "shapes and dtypes it expects; a forward that reads tensor values cannot run on meta), "
            "or align without example_inputs"
        ) from e
    finally:
        for h in handles:
            h.remove()
    return _placed(model, started), how


def _placed(model: nn.Module, started: Mapping[str, int]) -> ExecutionOrder:
    """Positions for every module: those that ran by start; the others after their nearest ran ancestor's span."""
    registered = [name for name, _ in model.named_modules(remove_duplicate=False)]
    ran = sorted((n for n in registered if n in started), key=started.__getitem__)
    not_run = [n for n in registered if n not in started]
    rank = {n: i for i, n in enumerate(ran)}
    span_end = dict(rank)  # module -> the last rank of it or anything under it that ran
    for n in ran:
        parts = n.split(".") if n else []
        for i in range(len(parts)):
            ancestor = ".".join(parts[:i])
            if ancestor in span_end:
                span_end[ancestor] = max(span_end[ancestor], rank[n])
    keys: dict[str, tuple[int, int, int]] = {n: (rank[n], 0, 0) for n in ran}
    for index, n in enumerate(not_run):
        parts = n.split(".")
        ancestor = next(
            (a for a in (".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)) if a in span_end), None
        )
        keys[n] = (span_end[ancestor] if ancestor is not None else len(ran), 1, index)
    placed = {n: i for i, n in enumerate(sorted(keys, key=keys.__getitem__))}
    return ExecutionOrder(ran, not_run, placed)
