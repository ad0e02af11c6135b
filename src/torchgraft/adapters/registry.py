"""The adapters the plan can name: ``{"name": ..., "args": {...}}`` specs, resolved and run here.

:data:`ADAPTERS` maps each name to an :class:`Adapter` (a function of the tensor and the target's
shape); :data:`SHORTHANDS` are the short policy values (``"luminance"``, ``"tile"``);
:func:`resolve` turns a policy value into a JSON-serialisable spec, :func:`run` executes one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import AdapterError
from .channels import input_channels
from .embedding import embedding_rows
from .positions import positions_1d, positions_2d, square_grid
from .rows import label_list, label_rows, output_rows

__all__ = ["ADAPTERS", "SHORTHANDS", "Adapter", "json_args", "register_adapter", "resolve", "run"]


@dataclass(frozen=True)
class Adapter:
    """A named adapter the plan can refer to.

    ``fn(tensor, target_shape, **args)`` returns the adapted tensor; ``prepare(args, context)``
    (optional) runs once at plan time and returns the final, JSON-serialisable args and a note
    (e.g. label names resolved to row indices).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    summary: str
    prepare: Callable[[dict[str, Any], Mapping[str, Any]], tuple[dict[str, Any], str]] | None = None


def _target_rows(shape: Sequence[int], axis: int = 0) -> int:
    return int(shape[axis])


def _run_input_channels(t: torch.Tensor, target_shape: tuple[int, ...], **args: Any) -> torch.Tensor:
    if "method" not in args:
        raise AdapterError("input_channels: needs args {'method': 'sum' | 'mean' | 'luminance' | 'repeat' | [[...]]}")
    if len(target_shape) < 2:
        raise AdapterError(f"input_channels: the target {list(target_shape)} is not a weight [out, in, *kernel]")
    return input_channels(t, target_shape[1], **args)


def _run_output_rows(t: torch.Tensor, target_shape: tuple[int, ...], **args: Any) -> torch.Tensor:
    return output_rows(t, _target_rows(target_shape), **args)


def _run_embedding_rows(t: torch.Tensor, target_shape: tuple[int, ...], **args: Any) -> torch.Tensor:
    return embedding_rows(t, _target_rows(target_shape), **args)


def _run_positions_1d(t: torch.Tensor, target_shape: tuple[int, ...], **args: Any) -> torch.Tensor:
    if len(target_shape) not in (2, 3):
        raise AdapterError(f"positions_1d: the target {list(target_shape)} is not a table [positions, dim]")
    return positions_1d(t, int(target_shape[-2]), **args)


def _run_positions_2d(t: torch.Tensor, target_shape: tuple[int, ...], **args: Any) -> torch.Tensor:
    args = dict(args)
    if len(target_shape) not in (2, 3):
        raise AdapterError(f"positions_2d: the target {list(target_shape)} is not a table [1, tokens, dim]")
    if "grid" not in args:
        k = args.get("num_prefix_tokens", 1)
        grid = square_grid(int(target_shape[-2]) - (k if isinstance(k, int) else 0))
        if grid is None:
            raise AdapterError(
                f"positions_2d: the model's {target_shape[-2]} rows minus {k} prefix rows are not a square grid; "
                "pass args {'grid': [height, width]}"
            )
        args["grid"] = grid
    return positions_2d(t, **args)


def _prepare_output_rows(args: dict[str, Any], ctx: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """``keep="labels"``: match rows by ``id2label`` of the checkpoint's and the model's configs."""
    if args.get("keep") != "labels":
        return args, ""
    args = dict(args)
    del args["keep"]
    source_labels = args.pop("source_labels", None) or ctx.get("source_labels")
    target_labels = args.pop("target_labels", None) or ctx.get("target_labels")
    if source_labels is None:
        raise AdapterError(
            "output_rows: keep='labels' needs the checkpoint's labels: put its config.json (with id2label) next to the "
            "checkpoint, or pass args {'source_labels': [...]}"
        )
    if target_labels is None:
        raise AdapterError(
            "output_rows: keep='labels' needs the model's labels: model.config.id2label, or args {'target_labels': [...]}"
        )
    rows = label_rows(source_labels, target_labels)
    names = label_list(target_labels, "target")
    args["keep"] = rows
    pairs = ", ".join(f"{lab}<-{'new' if r is None else r}" for lab, r in zip(names, rows))
    return args, f"rows by label: {pairs}"


#: Every adapter the plan can name.
ADAPTERS: dict[str, Adapter] = {}

#: Short names for the policy (``adapt={"features.0.0.weight": "luminance"}``) -> (adapter, args).
SHORTHANDS: dict[str, tuple[str, dict[str, Any]]] = {
    "sum": ("input_channels", {"method": "sum"}),
    "mean": ("input_channels", {"method": "mean"}),
    "luminance": ("input_channels", {"method": "luminance"}),
    "repeat": ("input_channels", {"method": "repeat"}),
    "first_rows": ("output_rows", {}),
    "tile": ("positions_1d", {"method": "tile"}),
}


def register_adapter(adapter: Adapter, *, replace: bool = False) -> None:
    """Make an adapter available to plans by name.

    Args:
        adapter: ``Adapter(name, fn, summary)``; ``fn(tensor, target_shape, **args)`` must keep
            the dtype and return ``target_shape``.
        replace: allow replacing an adapter of the same name.

    Raises:
        AdapterError: the name is taken (and ``replace`` is false) or is a shorthand.

    Example:
        >>> register_adapter(Adapter("negate", lambda t, target_shape: -t, "flip the sign"))
        >>> tg.load(model, ckpt, adapt={"head.weight": "negate"})
    """
    if adapter.name in SHORTHANDS or adapter.name == "reinit" or (adapter.name in ADAPTERS and not replace):
        raise AdapterError(
            f"an adapter named {adapter.name!r} already exists; pass replace=True or choose another name"
        )
    ADAPTERS[adapter.name] = adapter


for _a in (
    Adapter(
        "input_channels", _run_input_channels, "input channels of a first conv (sum, mean, luminance, repeat, matrix)"
    ),
    Adapter("output_rows", _run_output_rows, "classifier rows: first n, by index or by label", _prepare_output_rows),
    Adapter("embedding_rows", _run_embedding_rows, "vocabulary rows: old rows kept, new rows from mean and covariance"),
    Adapter("positions_1d", _run_positions_1d, "position table length, by interpolation (or tiling)"),
    Adapter("positions_2d", _run_positions_2d, "ViT position grid, by 2-d interpolation, prefix tokens kept"),
):
    register_adapter(_a)


def resolve(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """A policy value as a plan spec: ``"luminance"`` -> ``{"name": "input_channels", "args": {"method": "luminance"}}``.

    Accepts an adapter name, a shorthand from :data:`SHORTHANDS`, ``"reinit"``, or
    ``{"name": ..., "args": {...}}``. The result holds only JSON types (tuples become lists,
    tensors nested lists).

    Raises:
        AdapterError: unknown name, a malformed dict, or args that are not JSON data.
    """
    if isinstance(spec, str):
        if spec == "reinit":
            return {"name": "reinit", "args": {}}
        if spec in SHORTHANDS:
            name, args = SHORTHANDS[spec]
            return {"name": name, "args": json_args(args, name)}
        if spec in ADAPTERS:
            return {"name": spec, "args": {}}
        raise AdapterError(f"unknown adapter {spec!r}; choose from {_choices()}")
    if isinstance(spec, Mapping):
        extra = set(spec) - {"name", "args"}
        if "name" not in spec or extra:
            raise AdapterError(f"an adapter spec is {{'name': ..., 'args': {{...}}}}, got {dict(spec)!r}")
        base = resolve(spec["name"])
        args = spec.get("args") or {}
        if not isinstance(args, Mapping):
            raise AdapterError(f"adapter {spec['name']!r}: args must be a dict, got {args!r}")
        return {"name": base["name"], "args": {**base["args"], **json_args(args, base["name"])}}
    raise AdapterError(
        f"an adapter is named by a string or {{'name': ..., 'args': {{...}}}}, got {type(spec).__name__}; "
        "for your own function, register_adapter(Adapter(name, fn, summary)) and use its name"
    )


def _choices() -> str:
    return ", ".join([*sorted(ADAPTERS), *sorted(SHORTHANDS), "reinit"])


def json_args(args: Mapping[str, Any], adapter: str) -> dict[str, Any]:
    """``args`` as JSON data, so a plan that holds them can be saved: tuples become lists, tensors nested lists.

    Raises:
        AdapterError: a key that is not a string, or a value that is not JSON data (the message names ``adapter``).

    Example:
        >>> json_args({"method": torch.eye(2), "grid": (24, 24)}, "input_channels")
        {'method': [[1.0, 0.0], [0.0, 1.0]], 'grid': [24, 24]}
    """
    return _jsonable(dict(args), adapter)


def _jsonable(value: Any, adapter: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise AdapterError(f"adapter {adapter!r}: argument names must be strings, got {k!r}")
            out[k] = _jsonable(v, adapter)
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, adapter) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise AdapterError(
        f"adapter {adapter!r}: argument {value!r} ({type(value).__name__}) is not JSON data; plans must be saveable"
    )


def run(
    spec: Mapping[str, Any],
    tensor: torch.Tensor,
    *,
    target_shape: Sequence[int],
    target: str | None = None,
) -> torch.Tensor:
    """Execute a plan entry's adapter: ``{"name": ..., "args": {...}}`` on ``tensor`` for ``target_shape``.

    Works on meta tensors too (the plan uses that to check shapes without reading data).

    Args:
        spec: the entry's ``adapter``.
        tensor: the checkpoint's tensor.
        target_shape: the model entry's shape; the result is checked against it.
        target: the entry's name, for error messages.

    Returns:
        The adapted tensor, of ``target_shape`` and ``tensor``'s dtype.

    Raises:
        AdapterError: unknown adapter, bad args, a shape it cannot handle, or a result of
            another shape than ``target_shape``; the message names ``target``.

    Example:
        >>> run({"name": "embedding_rows", "args": {}}, torch.randn(10, 4), target_shape=(12, 4)).shape
        torch.Size([12, 4])
    """
    where = f" for {target!r}" if target else ""
    name = spec.get("name")
    if name == "reinit":
        raise AdapterError(f"'reinit'{where} is a plan action (the module is initialised), not a tensor adapter")
    adapter = ADAPTERS.get(name)  # type: ignore[arg-type]
    if adapter is None:
        raise AdapterError(f"unknown adapter {name!r}{where}; choose from {_choices()}")
    args = spec.get("args") or {}
    shape = tuple(int(d) for d in target_shape)
    try:
        out = adapter.fn(tensor, shape, **args)
    except AdapterError as e:
        raise AdapterError(f"{e}{where}") from None
    except TypeError as e:
        raise AdapterError(f"adapter {name!r}{where}: bad arguments {dict(args)!r}: {e}") from None
    if tuple(out.shape) != shape:
        raise AdapterError(
            f"adapter {name!r}{where} turned {list(tensor.shape)} into {list(out.shape)}, but the model needs {list(shape)}: "
            "it changes one dimension and the others differ too"
        )
    if out.dtype != tensor.dtype:
        raise AdapterError(
            f"adapter {name!r}{where} changed the dtype {tensor.dtype} -> {out.dtype}; adapters must keep it"
        )
    return out
