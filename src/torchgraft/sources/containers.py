"""Finding the state dict inside what ``torch.load`` returned (Lightning, mmengine, timm, DDP saves)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError
from ..messages import short_repr

__all__ = ["CONTAINER_KEYS", "EMA_KEYS", "MAX_DEPTH", "find_state_dict"]

#: Keys under which training frameworks nest the weights, in the order they are tried.
#: Lightning and mmengine use ``state_dict``; timm and many repos ``model`` / ``state_dict``;
#: some DDP saves ``module``.
CONTAINER_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
#: EMA copies: only used when asked (``container="state_dict_ema"``) or when nothing else is there.
EMA_KEYS: tuple[str, ...] = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")
#: Nested mappings deeper than this are not searched (a hostile pickle may nest without end or in a cycle).
MAX_DEPTH = 16


def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _tensor_count(obj: Any, depth: int = 0, seen: set[int] | None = None) -> int:
    """Tensors reachable through nested mappings, at most :data:`MAX_DEPTH` deep.

    Each mapping is visited once: a pickle can reference one dict from many places (a cycle,
    or a tree of shared references that would take exponential time to walk path by path).
    """
    if _is_tensor(obj):
        return 1
    seen = set() if seen is None else seen
    if not isinstance(obj, Mapping) or depth >= MAX_DEPTH or id(obj) in seen:
        return 0
    seen.add(id(obj))
    return sum(_tensor_count(v, depth + 1, seen) for v in obj.values())


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and any(_is_tensor(v) for v in obj.values())


def _candidates(obj: Any, prefix: str = "", depth: int = 0, seen: set[int] | None = None) -> list[str]:
    """Dotted paths of nested mappings that directly hold tensors (depth <= 3, each mapping once)."""
    seen = set() if seen is None else seen
    if not isinstance(obj, Mapping) or depth > 3 or id(obj) in seen:
        return []
    seen.add(id(obj))
    out = [prefix] if _is_state_dict(obj) else []
    for k, v in obj.items():
        if isinstance(k, str) and isinstance(v, Mapping):
            out.extend(_candidates(v, f"{prefix}.{k}" if prefix else k, depth + 1, seen))
    return out


def _get(obj: Any, path: str) -> Any:
    for part in path.split(".") if path else []:
        if not isinstance(obj, Mapping) or part not in obj:
            raise KeyError(part)
        obj = obj[part]
    return obj


def find_state_dict(
    obj: Any, *, container: str | None, path: str, format: str
) -> tuple[Mapping[str, Any], str, list[str]]:
    """Pick the state dict out of a loaded checkpoint object.

    Rule: with ``container`` given, exactly that dotted path (``"state_dict_ema"``,
    ``"model.module"``). Otherwise the object itself when its values are tensors;
    else the first of :data:`CONTAINER_KEYS` (descending through nested containers)
    that holds tensors; else an EMA copy when that is all there is.

    Returns:
        ``(state_dict, chosen_path, all_candidate_paths)``.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            path,
            f"the file holds a {type(obj).__name__}, not a state dict",
            format=format,
            hint="save `model.state_dict()` rather than the model object",
        )
    candidates = _candidates(obj)
    if container is not None:
        try:
            chosen = _get(obj, container)
        except KeyError:
            raise CheckpointError(
                path,
                f"container {container!r} is not in the file",
                format=format,
                hint=f"choose one of {candidates or sorted(map(str, obj))}",
            ) from None
        if not _is_state_dict(chosen):
            raise CheckpointError(
                path, f"container {container!r} holds no tensors", format=format, hint=f"choose one of {candidates}"
            )
        return chosen, container, candidates
    if len(obj) == 0:  # a module without parameters or buffers saves an empty state dict: nothing to load
        return obj, "", candidates
    node: Mapping[str, Any] = obj
    trail: list[str] = []
    visited = {id(obj)}
    while len(trail) < MAX_DEPTH:
        key = next((k for k in CONTAINER_KEYS if isinstance(node.get(k), Mapping) and _tensor_count(node[k])), None)
        if key is None or id(node[key]) in visited:  # a container that holds itself leads nowhere
            break
        node, trail = node[key], trail + [key]
        visited.add(id(node))
    if _is_state_dict(node):
        return node, ".".join(trail), candidates
    for key in EMA_KEYS:
        if _is_state_dict(obj.get(key)):
            return obj[key], key, candidates
    top = ", ".join(short_repr(k) for k in list(obj)[:12])
    raise CheckpointError(
        path,
        f"no state dict found; top-level keys are {top}",
        format=format,
        hint="pass container='<key>' to tg.open() to say where the weights are",
    )
