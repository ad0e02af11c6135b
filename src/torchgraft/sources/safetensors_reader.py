"""safetensors files: header parsed for names/shapes, bytes mapped by the safetensors library."""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..messages import first_line
from ..messages import short_repr as _r  # names and shapes in a hostile header can be megabytes long
from .base import DTYPE_SIZES, Source, TensorRef

__all__ = ["SAFETENSORS_DTYPES", "looks_like_safetensors", "open_safetensors", "read_header", "torch_shape"]

FORMAT = "safetensors"

#: safetensors dtype codes -> torch dtype names
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn_x2", "C64": "complex64", "C128": "complex128",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip

#: Sub-byte dtypes: safetensors counts their elements, torch packs two into one (shape[-1] halves).
_PACKED: dict[str, int] = {"F4": 4}


def _bits(dtype: str) -> int:
    return _PACKED.get(dtype) or int(DTYPE_SIZES[SAFETENSORS_DTYPES[dtype]] * 8)


def torch_shape(dtype: str, shape: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """The shape torch gives a stored entry: packed dtypes (``F4``) halve the last dimension."""
    if dtype in _PACKED and shape:
        return (*shape[:-1], shape[-1] * _PACKED[dtype] // 8)
    return tuple(shape)


#: The safetensors library refuses headers larger than this; so do we, before allocating.
MAX_HEADER_BYTES = 100_000_000
#: At most this many tensors in one file, counted before the header is parsed (the largest
#: single files of real models hold a few thousand; a sharded 405B model ~3,000 per shard).
MAX_ENTRIES = 200_000


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Build many small objects without the cyclic collector rescanning them all again and again (quadratic)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """True when the first bytes look like a safetensors file: an 8-byte length, then ``{``.

    The length itself is not judged here, so that a header length past the end of the file
    or absurdly large is reported by :func:`read_header` in those words.
    """
    return len(head) >= 9 and head[8:9] == b"{"


def read_header(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """Read and validate a safetensors header without importing torch.

    Returns:
        ``(tensors, metadata, data_start)``: ``tensors`` maps names to
        ``{"dtype", "shape", "data_offsets"}`` as stored, ``metadata`` is the
        ``__metadata__`` dict, ``data_start`` the byte offset of the data block.

    Raises:
        CheckpointError: truncated file, header too large, invalid JSON, unknown dtype,
            or offsets that disagree with shapes or the file size.
    """
    path = Path(path)

    def bad(
        reason: str, hint: str = "the file is damaged or not safetensors; download or convert it again"
    ) -> CheckpointError:
        return CheckpointError(path, reason, format=FORMAT, hint=hint)

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"the file is {size} bytes long, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise bad(f"the header claims {n} bytes, more than the {MAX_HEADER_BYTES} the format allows")
            if n > size - 8:
                raise bad(
                    f"the header claims {n} bytes but the file holds only {size - 8} after the length field (truncated?)"
                )
            raw = f.read(n)
    except OSError as e:
        if isinstance(e, CheckpointError):
            raise
        raise bad(f"cannot read the file ({e.strerror or e})", hint="check that the path is a readable file") from None
    if len(raw) != n:
        raise bad(f"the header claims {n} bytes but only {len(raw)} could be read (the file changed while reading?)")
    entries = raw.count(b'"data_offsets"')  # an upper bound on the entries, before any object is built
    if entries > MAX_ENTRIES:
        raise bad(
            f"the header describes {entries} tensors, more than the {MAX_ENTRIES} torchgraft reads from one file",
            hint="split the checkpoint into shards (tg.convert(..., max_shard_size=...))",
        )
    try:
        with _no_gc():
            header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise bad(f"the header names {_r(e.args[0])} twice") from None
    except RecursionError:
        raise bad("the header is not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, integers with too many digits
        raise bad(f"the header is not valid JSON ({first_line(e, 200)})") from None
    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("'__metadata__' must map strings to strings")
    with _no_gc():
        _check_entries(header, size - 8 - n, bad)
    return header, metadata, 8 + n


def _check_entries(header: dict[str, Any], data_len: int, bad: Any) -> None:
    """Every entry's dtype, shape and offsets, and the entries tiling the data block exactly."""
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise bad(f"entry {_r(name)} lacks dtype, shape or data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise bad(
                f"entry {_r(name)} has unknown dtype {_r(dtype)}",
                hint="upgrade torchgraft/safetensors, or re-save the file",
            )
        if not (
            isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise bad(f"entry {_r(name)} has an invalid shape {_r(shape)}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise bad(f"entry {_r(name)} has invalid data_offsets {_r(offsets)}")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        bits = numel * _bits(dtype)
        if bits % 8 or (dtype in _PACKED and (not shape or shape[-1] % 2)):
            raise bad(f"entry {_r(name)} has shape {_r(shape)}, which does not fill whole bytes as {dtype}")
        expected = bits // 8
        if not 0 <= begin <= end <= data_len:
            raise bad(
                f"entry {_r(name)} points at bytes {begin}..{end}, outside the {data_len}-byte data block (truncated?)"
            )
        if end - begin != expected:
            raise bad(
                f"entry {_r(name)} has shape {_r(shape)} ({expected} bytes as {dtype}) but spans {end - begin} bytes"
            )
        spans.append((begin, end, name))
    spans.sort()
    for (b1, e1, n1), (b2, _e2, n2) in itertools.pairwise(spans):
        if b2 < e1:
            raise bad(f"entries {_r(n1)} and {_r(n2)} overlap in the data block")
    # like the safetensors library: the entries tile the data block exactly, from byte 0 to its end
    covered = 0
    for begin, end, name in spans:
        if begin != covered:
            raise bad(
                f"entry {_r(name)} starts at byte {begin} of the data block, but the previous entry ends at {covered} (a gap)"
            )
        covered = end
    if covered != data_len:
        raise bad(
            f"the entries cover {covered} of the {data_len} bytes in the data block (trailing bytes: damaged or appended to?)"
        )


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _LazySafeOpen:
    """Opens the file with ``safetensors.safe_open`` on first use (that imports torch)."""

    def __init__(self, path: Path):
        self.path = path
        self._handle: Any = None
        self._lock = threading.Lock()

    def get(self, name: str):
        if self._handle is None:
            with self._lock:
                if self._handle is None:
                    from safetensors import SafetensorError, safe_open

                    try:
                        self._handle = safe_open(str(self.path), framework="pt", device="cpu")
                    except (SafetensorError, OSError) as e:
                        raise CheckpointError(
                            self.path, str(e), format=FORMAT, hint="re-download or re-convert the file"
                        ) from None
        try:
            return self._handle.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - the library's own error types vary by version
            raise CheckpointError(self.path, f"reading {name!r} failed: {e}", format=FORMAT) from None

    def close(self) -> None:
        self._handle = None


def open_safetensors(path: Path, **_: Any) -> Source:
    """Open one ``.safetensors`` file lazily (zero-copy: tensors are memory-mapped)."""
    header, metadata, _ = read_header(path)
    handle = _LazySafeOpen(path)
    with _no_gc():
        entries = {
            name: TensorRef(
                name,
                torch_shape(info["dtype"], info["shape"]),
                SAFETENSORS_DTYPES[info["dtype"]],
                _getter(handle, name),
                file=str(path),
            )
            for name, info in header.items()
        }
    return Source(entries, path=str(path), format=FORMAT, metadata=metadata, closer=handle.close)


def _getter(handle: _LazySafeOpen, name: str):
    return lambda: handle.get(name)
