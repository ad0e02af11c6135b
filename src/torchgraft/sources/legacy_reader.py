"""Legacy (non-zip) torch files: torch's safe unpickler for the structure, the bytes mapped or read in parallel.

A legacy file (``torch.save(..., _use_new_zipfile_serialization=False)``, and every file
written before torch 1.6) is five pickles followed by raw storage records:

    magic number | protocol version | system info | payload | storage keys
    then, for each key in that order: numel (int64, little endian) + numel x element size bytes

The payload refers to storages through persistent ids ``('storage', type, key, location,
numel, view)``. ``torch.load`` allocates each storage, then reads the records one after the
other on one thread. Here:

1. the payload is first run with inert stand-ins for every global (nothing imported,
   see :func:`~torchgraft.sources.pickle_scan.storage_records`) to learn which
   storages it declares; with the storage keys, every record's offset is computed and
   checked against its header and the file size before anything is allocated;
2. the payload is then unpickled by torch's ``weights_only`` unpickler (the same allow-list
   as ``torch.load``): a storage whose record is aligned for its element type becomes a
   slice of a private memory map of the file (zero-copy, like the zip format); any other
   gets fresh memory;
3. those are filled by a few threads with ``os.preadv``, so the page faults of fresh memory
   and the copies from the page cache run on every core.

Files outside that plain layout (torch < 0.4's tar format, big-endian files, storage views,
untyped storages, payloads the inert pass cannot follow) make :func:`read_legacy` return
:data:`NOT_PLAIN`; the caller then uses ``torch.load``, which reads them one record at a time.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .pickle_scan import PickleRefused, storage_records

__all__ = ["NOT_PLAIN", "READ_WORKERS", "element_size", "read_legacy"]

#: Threads that fill storages whose records cannot be mapped (page faults and copies scale
#: with cores: bert-large 0.63 s with 2 threads, 1.08 s with torch.load's one; README, Performance).
READ_WORKERS = max(1, min(4, os.cpu_count() or 1))
#: Reads are split into pieces of at most this many bytes, so threads share large tensors.
PIECE_BYTES = 16 << 20
#: Below this many bytes to read in all, one thread reads everything (a pool costs more than it saves).
PARALLEL_FROM_BYTES = 32 << 20

NOT_PLAIN: Any = object()
"""Returned by :func:`read_legacy` for a file it leaves to ``torch.load``."""

_HEADER = struct.Struct("<q")


class _NotPlain(Exception):
    """The file is not in the plain legacy layout this reader handles."""


@functools.lru_cache(maxsize=64)
def element_size(storage_type: str) -> int | None:
    """Bytes per element of a pickled storage class (``"torch.FloatStorage"`` -> 4); ``None`` if unknown."""
    import torch

    short = storage_type.rpartition(".")[2]
    if short == "UntypedStorage":
        return 1
    try:
        return int(torch._utils._element_size(torch.storage._get_dtype_from_pickle_storage_type(short)))
    except Exception:  # noqa: BLE001 - an unknown storage type: let torch check it
        return None


@dataclass(frozen=True)
class _Record:
    offset: int  # of the first data byte in the file
    numel: int
    itemsize: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def read_legacy(
    path: Path,
    *,
    size: int,
    bad: Callable[[str], CheckpointError],
    workers: int = READ_WORKERS,
    zero_copy: bool = True,
) -> Any:
    """Load a legacy torch file like ``torch.load(path, map_location="cpu", weights_only=True)``.

    Call it inside ``torch.serialization.safe_globals`` to allow more globals, as for
    ``torch.load``. With ``zero_copy`` (default) aligned records are memory-mapped, not read.
    Returns the unpickled object, or :data:`NOT_PLAIN` when the file is not in the layout
    this reader handles (no tensor memory has been allocated then).

    Raises:
        pickle.UnpicklingError: the payload wants a global outside the allow-list (nothing ran).
        CheckpointError: through ``bad``: declared sizes exceed the file, a record header
            disagrees with the payload, a storage has no record, the file ends early.
    """
    try:
        from torch import _weights_only_unpickler as safe
    except ImportError:  # private module moved: torch.load does the job, one record at a time
        return NOT_PLAIN
    with path.open("rb") as f:
        try:
            return _read_legacy(f, path, size, bad, workers, zero_copy, safe)
        except PickleRefused as e:
            raise bad(str(e)) from None


def _checked_load(safe: Any, f: Any) -> Any:
    """``safe.load(f)`` after an inert pass over the same pickle: a deep or shared tuple never reaches it."""
    at = f.tell()
    storage_records(f)  # raises PickleRefused; a pickle it cannot follow is torch's to judge
    f.seek(at)
    return safe.load(f, encoding="utf-8")


def _read_legacy(
    f: Any, path: Path, size: int, bad: Callable[[str], CheckpointError], workers: int, zero_copy: bool, safe: Any
) -> Any:
    """:func:`read_legacy` on the open file (every pickle checked by an inert pass before ``safe`` loads it)."""
    import torch
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    try:
        if _checked_load(safe, f) != MAGIC_NUMBER:
            return NOT_PLAIN  # e.g. the tar format of torch < 0.4
    except PickleRefused:
        raise
    except Exception:  # noqa: BLE001 - not a pickle at byte 0: let torch.load say what it is
        return NOT_PLAIN
    if _checked_load(safe, f) != PROTOCOL_VERSION:
        return NOT_PLAIN
    sys_info = _checked_load(safe, f)
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not (sys.byteorder == "little"):
        return NOT_PLAIN  # torch swaps the bytes of files from big-endian machines
    payload_at = f.tell()
    declared = storage_records(f)  # inert pass: which storages, of what type and size
    if declared is None:
        return NOT_PLAIN
    payload_end = f.tell()
    keys = _checked_load(safe, f)
    records = _layout(f.fileno(), f.tell(), keys, declared, size, bad)
    if records is None:
        return NOT_PLAIN

    mapping = None
    if zero_copy and any(r.offset % r.itemsize == 0 for r in records.values()):
        try:
            mapping = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
        except RuntimeError:  # a file system without mmap: read everything instead
            mapping = None
    storages: dict[str, Any] = {}
    to_read: list[tuple[int, int, int]] = []

    def persistent_load(pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6):
            raise _NotPlain
        _, storage_type, key, _location, numel, view = pid
        dtype = getattr(storage_type, "dtype", None)
        if view is not None or not isinstance(dtype, torch.dtype) or not isinstance(key, str):
            raise _NotPlain  # storage views and untyped storages: torch.load handles them
        record = records.get(key)
        # every reference, not only the first: one key declared with two dtypes or sizes is refused
        if record is None or record.nbytes != numel * torch._utils._element_size(dtype):
            raise bad(f"the pickle changed between two reads (storage {key!r})")
        if record.itemsize != torch._utils._element_size(dtype):
            raise bad(f"storage {key!r} is declared with two different element types")
        untyped = storages.get(key)
        if untyped is None:
            if mapping is not None and record.offset % record.itemsize == 0:
                untyped = mapping[record.offset : record.offset + record.nbytes]
            else:
                # A slice of a storage cannot be resized: a tensor rebuilt larger than its
                # storage makes torch raise instead of reallocating the memory that the
                # reads below are queued for (they would land in freed heap).
                untyped = torch.UntypedStorage(record.nbytes)[0 : record.nbytes]
                to_read.extend(_pieces(record, untyped.data_ptr()))
            storages[key] = untyped
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

    f.seek(payload_at)
    unpickler = safe.Unpickler(f, encoding="utf-8")
    unpickler.persistent_load = persistent_load
    try:
        result = unpickler.load()
    except _NotPlain:
        return NOT_PLAIN
    except RuntimeError as e:
        if "not resizable" in str(e) or "out of bounds for storage" in str(e):
            raise bad("a tensor reaches past the end of its storage (corrupt or crafted file)") from None
        raise
    if f.tell() != payload_end:
        raise bad("the pickle changed between two reads")
    _read(f.fileno(), to_read, bad, workers=workers)
    torch._utils._validate_loaded_sparse_tensors()
    return result


def _layout(
    fd: int, offset: int, keys: Any, declared: list[Any], size: int, bad: Callable[[str], CheckpointError]
) -> dict[str, _Record] | None:
    """Storage key -> its record, every header and size checked before anything is allocated."""
    first: dict[str, Any] = {}
    for d in declared:  # torch sizes a storage by its first reference; torch.save never writes two
        seen = first.setdefault(d.key, d)
        if (seen.type, seen.numel) != (d.type, d.numel):
            raise bad(
                f"storage {d.key!r} is declared twice, as {seen.numel} x {seen.type} and as "
                f"{d.numel} x {d.type} (corrupt or crafted file)"
            )
    total = 0
    for d in first.values():
        itemsize = element_size(d.type)
        if itemsize is None:
            return None  # a storage type this torch does not know: torch.load says so
        total += d.numel * itemsize
    if total > size:
        raise bad(
            f"the pickle declares {total} bytes of tensor data, but the file holds only {size} bytes (truncated or corrupt)"
        )
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise bad("the list of storage keys after the pickle is damaged")
    missing = sorted(set(first) - set(keys))
    if missing:
        raise bad(f"the storages {missing[:5]} have no record in the file")
    records: dict[str, _Record] = {}
    for key in keys:
        d = first.get(key)
        if d is None:
            raise bad(f"the file holds a record for storage {key!r}, which the pickle never uses")
        header = os.pread(fd, _HEADER.size, offset)
        if len(header) != _HEADER.size:
            raise bad(f"the file ends before the record of storage {key!r} (truncated?)")
        (numel,) = _HEADER.unpack(header)
        if numel != d.numel:
            raise bad(f"the record of storage {key!r} holds {numel} elements, but the pickle declares {d.numel}")
        record = _Record(offset + _HEADER.size, numel, element_size(d.type) or 1)
        if record.offset + record.nbytes > size:
            raise bad(f"the record of storage {key!r} reaches past the end of the file (truncated?)")
        records[key] = record
        offset = record.offset + record.nbytes
    return records


def _pieces(record: _Record, address: int) -> list[tuple[int, int, int]]:
    """``(file offset, address, length)`` reads that fill one storage."""
    return [
        (record.offset + begin, address + begin, min(PIECE_BYTES, record.nbytes - begin))
        for begin in range(0, record.nbytes, PIECE_BYTES)
    ]


def _read(fd: int, pieces: list[tuple[int, int, int]], bad: Callable[[str], CheckpointError], *, workers: int) -> None:
    def read(piece: tuple[int, int, int]) -> None:
        offset, address, length = piece
        view = memoryview((ctypes.c_char * length).from_address(address)).cast("B")
        done = 0
        while done < length:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise bad("the file ended while its tensor bytes were read (truncated while loading?)")
            done += got

    total = sum(length for _, _, length in pieces)
    if workers <= 1 or total < PARALLEL_FROM_BYTES:
        for piece in pieces:
            read(piece)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="torchgraft-read") as pool:
        for _ in pool.map(read, pieces):
            pass
