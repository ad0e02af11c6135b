"""Model layouts: which a DCP load can fill (FSDP2, DTensor, plain) and tensors laid out like the model's."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..errors import LoadError

__all__ = ["check_layout", "default_device", "empty_like", "model_name", "place", "unwrap", "write"]


def unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def model_name(model: nn.Module) -> str:
    """``FSDPBertModel`` -> ``BertModel`` (fully_shard makes a subclass per wrapped class)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return type(model).__name__
    cls = type(model)
    if isinstance(model, FSDPModule):
        for base in cls.__mro__[1:]:
            if not issubclass(base, FSDPModule):
                return base.__name__
    return cls.__name__


def check_layout(model: nn.Module) -> None:
    """Refuse layouts DCP cannot load into, naming the parameter and what to do instead."""
    problems: list[str] = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        FullyShardedDataParallel = ()  # type: ignore[assignment,misc]
    for path, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel):  # type: ignore[arg-type]
            problems.append(
                f"{path or '(root)'}: FSDP1 FullyShardedDataParallel keeps flat parameters; shard with "
                "torch.distributed.fsdp.fully_shard (FSDP2) instead, or load before wrapping"
            )
            break
    from torch.distributed.tensor import Partial

    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if hasattr(t, "ds_id") or hasattr(t, "ds_numel"):
            problems.append(
                f"{name}: a DeepSpeed ZeRO-3 partition; load before deepspeed.initialize, or use "
                "deepspeed.zero.GatheredParameters"
            )
        elif isinstance(t, DTensor) and any(isinstance(p, Partial) for p in t.placements):
            problems.append(
                f"{name}: a DTensor with a Partial placement {t.placements} holds partial sums, not values; "
                "redistribute it to Shard or Replicate first"
            )
        elif type(t).__name__ == "ShardedTensor":
            problems.append(f"{name}: a legacy ShardedTensor; use DTensor (fully_shard or distribute_tensor)")
        if len(problems) >= 12:
            break
    if problems:
        raise LoadError(
            f"{model_name(model)} has a layout torchgraft.distributed cannot load into (nothing was read):", problems
        )


def empty_like(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Fresh storage laid out like ``t`` (the same DTensor mesh and placements), on ``device`` if ``t`` is meta."""
    where = device if t.is_meta else t.device
    if isinstance(t, DTensor):
        local = torch.empty(t.to_local().shape, dtype=t.dtype, device=where)
        return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
    return torch.empty(t.shape, dtype=t.dtype, device=where)


def place(value: torch.Tensor, like: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A full CPU tensor -> this rank's part of it, laid out like ``like`` (no communication)."""
    where = device if like.is_meta else like.device
    value = value.to(device=where, dtype=like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)
    return value


def write(target: torch.Tensor, value: torch.Tensor) -> None:
    if isinstance(target, DTensor):
        local = value.to_local() if isinstance(value, DTensor) else value
        target.to_local().copy_(local)
    else:
        target.copy_(value)


def default_device(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        if isinstance(t, DTensor):
            kind = t.device_mesh.device_type
            if kind == "cuda" and torch.cuda.is_available():
                return torch.device("cuda", torch.cuda.current_device())
            return torch.device(kind)
    return torch.device("cpu")

