"""Flax/JAX msgpack files (``flax.serialization.to_bytes``), read with the ``msgpack`` package alone.

The format is flax's: msgpack with extension types for arrays (code 1: a nested msgpack
``(shape, dtype name, row-major bytes)``), native complex numbers (2) and numpy scalars (3), and
arrays above 1 GiB split into ``__msgpack_chunked_array__`` dicts. Neither flax nor jax is
imported; the ext hook accepts only these three codes, and every length is checked against the
file before anything is allocated.

msgpack has no index, so the file is decoded once at open (memory about the file's size, no
tensor built); a tensor is made when it is loaded. Nested names are flattened to dotted names
and flax's conventions become torch's, each change recorded in ``Source.conversions``:
``kernel`` -> ``weight`` (2-D transposed, convolution kernels (spatial..., in, out) -> (out, in,
spatial...)), ``scale``/``embedding`` -> ``weight``, ``batch_stats`` ``mean``/``var`` ->
``running_mean``/``running_var``.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .base import Source, TensorRef
from .layouts import LAYOUTS

__all__ = ["FLAX_DTYPES", "flax_scan_note", "looks_like_flax_msgpack", "open_flax"]

FORMAT = "flax-msgpack"

#: dtype names flax writes (numpy's / ml_dtypes' ``dtype.name``) -> (torch dtype name, bytes per element)
FLAX_DTYPES: dict[str, tuple[str, int]] = {
    "float64": ("float64", 8), "float32": ("float32", 4), "float16": ("float16", 2), "bfloat16": ("bfloat16", 2),
    "float8_e4m3fn": ("float8_e4m3fn", 1), "float8_e5m2": ("float8_e5m2", 1),
    "complex64": ("complex64", 8), "complex128": ("complex128", 16),
    "int64": ("int64", 8), "int32": ("int32", 4), "int16": ("int16", 2), "int8": ("int8", 1),
    "uint64": ("uint64", 8), "uint32": ("uint32", 4), "uint16": ("uint16", 2), "uint8": ("uint8", 1),
    "bool": ("bool", 1),
}  # fmt: skip

_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"
_MAX_NDIM = 64
_MAX_KEY_CHARS = 4096
#: most entries one msgpack array or map may declare (msgpack preallocates a list of that length)
_MAX_CONTAINER = 1 << 20

#: flax leaf name -> torch's (``kernel`` also changes layout, see :func:`_kernel_layout`)
_RENAMES: dict[str, str] = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
#: BatchNorm statistics in the ``batch_stats`` collection -> torch's buffers
_STAT_RENAMES: dict[str, str] = {"mean": "running_mean", "var": "running_var"}


def looks_like_flax_msgpack(path: Path, head: bytes) -> bool:
    """A ``.msgpack`` file whose first byte starts a msgpack map (flax writes a dict of collections)."""
    return path.suffix == ".msgpack" and bool(head) and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF))


class _Bad(ValueError):
    """Raised inside the msgpack hooks; becomes a CheckpointError with the file's name."""


class _Array:
    """An array leaf: shape, dtype and its row-major bytes (one or more chunks)."""

    __slots__ = ("chunks", "dtype", "shape")

    def __init__(self, shape: tuple[int, ...], dtype: str, chunks: list[bytes]):
        self.shape, self.dtype, self.chunks = shape, dtype, chunks

    def tensor(self) -> Any:
        import torch

        dtype = getattr(torch, FLAX_DTYPES[self.dtype][0])
        if math.prod(self.shape) == 0:
            return torch.empty(self.shape, dtype=dtype)
        data = bytearray(self.chunks[0]) if len(self.chunks) == 1 else bytearray(b"".join(self.chunks))
        if dtype == torch.bool:  # any byte other than 0 or 1 would make an invalid torch bool
            return torch.frombuffer(data, dtype=torch.uint8).reshape(self.shape) != 0
        return torch.frombuffer(data, dtype=dtype).reshape(self.shape)


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > _MAX_NDIM:
        raise _Bad(f"{what} has an invalid shape")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 62 for d in value):
        raise _Bad(f"{what} has an invalid shape {list(value)[:8]!r}")
    return tuple(value)


def _array(data: bytes, msgpack: Any) -> _Array:
    """Decode flax's ndarray extension: msgpack ``[shape, dtype name, bytes]``, lengths checked."""
    try:
        item = msgpack.unpackb(
            data, raw=True, max_bin_len=len(data), max_str_len=64, max_array_len=_MAX_NDIM, max_map_len=0, max_ext_len=0
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise _Bad(f"an array extension is not valid msgpack ({e})") from None
    if not (isinstance(item, (list, tuple)) and len(item) == 3):
        raise _Bad("an array extension is not (shape, dtype, bytes)")
    shape, dtype, buffer = item
    shape = _shape(shape, "an array")
    dtype = dtype.decode("ascii", "replace") if isinstance(dtype, bytes) else dtype
    if not isinstance(dtype, str) or dtype not in FLAX_DTYPES:
        raise _Bad(f"an array has the unsupported dtype {str(dtype)[:40]!r}")
    if not isinstance(buffer, bytes):
        raise _Bad("an array's data is not a byte string")
    expected = math.prod(shape) * FLAX_DTYPES[dtype][1]
    if len(buffer) != expected:
        raise _Bad(f"an array of shape {list(shape)} ({dtype}) needs {expected} bytes but holds {len(buffer)}")
    return _Array(shape, dtype, [buffer])


def _ext_hook(msgpack: Any) -> Callable[[int, bytes], Any]:
    def hook(code: int, data: bytes) -> Any:
        if code in (_EXT_NDARRAY, _EXT_NPSCALAR):
            array = _array(data, msgpack)
            if code == _EXT_NPSCALAR and array.shape != ():
                raise _Bad("a numpy scalar extension holds an array")
            return array
        if code == _EXT_COMPLEX:
            try:
                pair = msgpack.unpackb(data, max_array_len=2, max_map_len=0, max_str_len=0, max_bin_len=0)
            except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
                raise _Bad(f"a complex extension is not valid msgpack ({e})") from None
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, (int, float)) for x in pair)):
                raise _Bad("a complex extension is not (real, imag)")
            return complex(pair[0], pair[1])
        raise _Bad(f"unknown msgpack extension type {code} (flax writes 1, 2 and 3)")

    return hook


def _unchunk(node: dict[Any, Any], where: str) -> _Array:
    """flax's ``{__msgpack_chunked_array__: True, shape: {"0": d0, ...}, chunks: {"0": array, ...}}``."""
    shape_d, chunks_d = node.get("shape"), node.get("chunks")
    if not (isinstance(shape_d, dict) and isinstance(chunks_d, dict)):
        raise _Bad(f"chunked array {where} lacks shape or chunks")
    shape = _shape([shape_d.get(str(i)) for i in range(len(shape_d))], f"chunked array {where}")
    chunks = [chunks_d.get(str(i)) for i in range(len(chunks_d))]
    if not chunks or not all(isinstance(c, _Array) and len(c.shape) == 1 for c in chunks):
        raise _Bad(f"chunked array {where} has chunks that are not 1-D arrays")
    dtypes = {c.dtype for c in chunks}
    if len(dtypes) != 1:
        raise _Bad(f"chunked array {where} mixes dtypes {sorted(dtypes)}")
    if sum(c.shape[0] for c in chunks) != math.prod(shape):
        raise _Bad(f"chunked array {where} has shape {list(shape)} but its chunks hold another number of elements")
    return _Array(shape, chunks[0].dtype, [b for c in chunks for b in c.chunks])


def _kernel_layout(module: str, ndim: int) -> str | None:
    """flax kernels: 2-D Dense -> transposed; 4-D Conv -> OIHW; 3-D/5-D only under a ``Conv`` module
    (a ``DenseGeneral`` kernel can be 3-D too, and has no torch layout)."""
    if ndim == 2:
        return "dense"
    if ndim == 4 or (ndim in (3, 5) and module.startswith("Conv") and not module.startswith("ConvTranspose")):
        return "conv"
    return None


class _Builder:
    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, TensorRef] = {}
        self.origin: dict[str, str] = {}
        self.conversions: dict[str, str] = {}
        self.skipped: dict[str, str] = {}

    def walk(self, tree: Any, prefix: list[str], collection: str, where: list[str]) -> None:
        stack: list[tuple[Any, list[str], list[str]]] = [(tree, prefix, where)]
        while stack:
            node, names, stored = stack.pop()
            if isinstance(node, dict) and _CHUNKED in node:
                node = _unchunk(node, "/".join(stored))
            if isinstance(node, _Array):
                self.add(node, names, collection, "/".join(stored))
            elif isinstance(node, dict):
                for key, value in reversed(list(node.items())):
                    key = str(key)
                    if len(key) > _MAX_KEY_CHARS:
                        raise _Bad(f"a key under {'/'.join(stored) or 'the root'} is {len(key)} characters long")
                    stack.append((value, [*names, key], [*stored, key]))
            elif isinstance(node, (list, tuple)):  # flax writes lists as {"0": ...}; plain msgpack arrays too
                for i, value in reversed(list(enumerate(node))):
                    stack.append((value, [*names, str(i)], [*stored, str(i)]))
            else:
                self.skipped["/".join(stored)] = type(node).__name__

    def skip(self, tree: Any, stored: list[str]) -> None:
        """List every leaf of a collection that is not model weights (optimizer state, step, rngs)."""
        why = "optimizer state" if stored[0] in ("opt_state", "optimizer") else f"flax collection {stored[0]!r}"
        stack: list[tuple[Any, list[str]]] = [(tree, stored)]
        while stack:
            node, where = stack.pop()
            if isinstance(node, dict) and _CHUNKED not in node:
                stack.extend((v, [*where, str(k)]) for k, v in node.items())
            elif isinstance(node, (list, tuple)):
                stack.extend((v, [*where, str(i)]) for i, v in enumerate(node))
            else:
                kind = "array" if isinstance(node, (_Array, dict)) else type(node).__name__
                self.skipped["/".join(where)] = f"{why} ({kind}, not a model weight)"

    def add(self, array: _Array, names: list[str], collection: str, stored: str) -> None:
        leaf = names[-1] if names else ""
        module = names[-2] if len(names) > 1 else ""
        layout = None
        if collection == "batch_stats" and leaf in _STAT_RENAMES:
            new = _STAT_RENAMES[leaf]
        else:
            new = _RENAMES.get(leaf, leaf)
            if leaf == "kernel":
                kind = _kernel_layout(module, len(array.shape))
                layout = LAYOUTS[kind] if kind else None
        name = ".".join([*names[:-1], new]) if names else stored
        if name in self.entries:
            raise _Bad(f"{stored} and {self.origin[name]} both become {name!r}")
        shape = array.shape
        if layout is not None:
            self.conversions[name] = f"flax {leaf!r} ({stored}): {layout.describe(shape)}"
            shape = layout.shape(shape)
        elif leaf == "kernel":
            self.conversions[name] = f"flax {leaf!r} ({stored}): renamed; a {len(shape)}-D kernel is left as stored"
        elif new != leaf:
            self.conversions[name] = f"flax {leaf!r} ({stored}): renamed to {new!r}"
        self.entries[name] = TensorRef(name, shape, FLAX_DTYPES[array.dtype][0], self.loader(array, layout))
        self.origin[name] = stored

    def loader(self, array: _Array, layout: Any) -> Callable[[], Any]:
        def load() -> Any:
            tensor = array.tensor()
            return layout.apply(tensor) if layout is not None else tensor

        return load


def open_flax(path: Path, **_: Any) -> Source:
    """Open a flax msgpack file (``flax.serialization.to_bytes``) without flax or jax.

    A variables dict (``{"params": ..., "batch_stats": ...}``) or a train state with ``params``
    gives the model's weights (other collections and optimizer state go to ``skipped``); any other
    tree is read whole.

    Args:
        path: the ``.msgpack`` file.

    Returns:
        A :class:`Source` with dotted torch-style names (``Conv_0.weight``, ``BatchNorm_0.running_mean``).

    Raises:
        CheckpointError: ``msgpack`` missing; a damaged or hostile file (truncated, unknown
            extension types, lengths or shapes that disagree with the bytes, nesting too deep).

    Example:
        >>> src = tg.open("flax_model.msgpack")
        >>> src["Dense_0.weight"].shape, src.conversions["Dense_0.weight"]
        ((10, 32), "flax 'kernel' (params/Dense_0/kernel): kernel [in, out] transposed to [out, in]: [32, 10] -> [10, 32]")
    """
    path = Path(path)
    try:
        import msgpack
    except ImportError:
        raise CheckpointError(
            path,
            "reading Flax msgpack files needs the msgpack package, which is not installed",
            format=FORMAT,
            hint="pip install 'torchgraft[flax]'",
        ) from None
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise CheckpointError(path, "the file is empty", format=FORMAT, hint="fetch or save it again")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # pages, not a copy, while decoding
    except OSError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(path, f"cannot read the file ({e.strerror or e})", format=FORMAT) from None
    n = min(size, _MAX_CONTAINER)
    try:
        tree = msgpack.unpackb(
            data,
            ext_hook=_ext_hook(msgpack),
            raw=False,
            strict_map_key=False,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=n,
            max_map_len=n,
            max_ext_len=size,
        )
    except _Bad as e:
        raise CheckpointError(
            path, str(e), format=FORMAT, hint="the file is damaged or not a flax checkpoint"
        ) from None
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, RecursionError) as e:
        kind = type(e).__name__
        reason = "nested too deeply" if kind in ("StackError", "RecursionError") else str(e)[:200] or kind
        raise CheckpointError(
            path, f"not a valid msgpack file ({reason})", format=FORMAT, hint="the file is damaged or truncated"
        ) from None
    finally:
        with contextlib.suppress(BufferError):  # every array's bytes were copied out: nothing should refer to it
            data.close()
    if not isinstance(tree, dict):
        raise CheckpointError(
            path, f"the file holds a msgpack {type(tree).__name__}, not a dict of weights", format=FORMAT
        )
    builder = _Builder(path)
    try:
        params = tree.get("params")
        if isinstance(params, dict):
            if set(params) == {"params"} and isinstance(params["params"], dict):  # a train state of variables
                params = params["params"]
            builder.walk(params, [], "params", ["params"])
            stats = tree.get("batch_stats")
            if isinstance(stats, dict):
                builder.walk(stats, [], "batch_stats", ["batch_stats"])
            for key, value in tree.items():
                if key not in ("params", "batch_stats"):
                    builder.skip(value, [str(key)])
        else:
            builder.walk(tree, [], "params", [])
    except _Bad as e:
        raise CheckpointError(
            path, str(e), format=FORMAT, hint="the file is damaged or not a flax checkpoint"
        ) from None
    return Source(
        builder.entries, path=str(path), format=FORMAT, skipped=builder.skipped, conversions=builder.conversions
    )


def flax_scan_note(path: Path) -> tuple[str, str]:
    """``(format, note)`` for ``torchgraft scan``: a flax msgpack file holds data only.

    Raises:
        CheckpointError: the file is not a valid flax msgpack file.
    """
    with open_flax(path) as src:
        return src.format, f"{len(src)} tensors; msgpack holds data only (arrays, numbers, strings), nothing in it runs"
