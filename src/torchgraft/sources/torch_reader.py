"""torch checkpoints (zip and legacy pickle) through torch's ``weights_only`` unpickler, never a plain unpickle.

Before ``torch.load`` sees a zip it is checked without unpickling anything: its directory
must be sound (records inside the file, no duplicate names, no record that would inflate
absurdly), and every storage reference in ``data.pkl`` must match the size of the record
that holds it (found by Python's unpickler with inert stand-ins for the pickle's globals, see
:func:`~torchgraft.sources.pickle_scan.storage_records`). Legacy files are read by
:mod:`~torchgraft.sources.legacy_reader` (the same unpickler; records checked before any
allocation, mapped where aligned, otherwise read by threads), or by ``torch.load`` for layouts
it leaves alone, after checking that the file holds the bytes it declares. That keeps a
hostile or damaged file from making torch allocate unbounded memory or map the wrong bytes."""

from __future__ import annotations

import contextlib
import importlib
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..dangers import dangerous_globals
from ..errors import CheckpointError, UnsafeCheckpointError
from ..messages import first_line
from .base import Source, TensorRef, constant_loader, dtype_name, is_extra_state, valid_module_metadata
from .containers import MAX_DEPTH, find_state_dict
from .legacy_reader import NOT_PLAIN, element_size, read_legacy
from .pickle_scan import (
    MAX_SCAN_BYTES,
    PickleRefused,
    checkpoint_globals,
    refused_globals,
    scan_pickles,
    storage_records,
)

__all__ = [
    "MAX_INFLATED_BYTES",
    "check_zip_directory",
    "open_torch",
    "resolve_allow_globals",
    "safe_torch_load",
    "torch_format",
]

_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)")
_ZIP_MAGIC = b"PK\x03\x04"

#: A compressed zip record may not inflate to more than this (torch never compresses records).
MAX_INFLATED_BYTES = 1 << 30
#: ... nor by a larger factor than this (deflate reaches ~1000x only on crafted data).
_MAX_INFLATE_RATIO = 200
#: Pickle opcodes and messages of torch's safe unpickler that mean "refused", not "damaged".
_REFUSALS = (
    "GLOBAL",
    "Trying to call reduce",
    "Can only create new object",
    "Can only build",
    "Only persistent_load of storage",
)

_HINT_CORRUPT = (
    "the file is truncated or damaged: download it again. If it is a TensorFlow or Flax checkpoint, "
    "convert it to PyTorch first (transformers: from_tf=True / from_flax=True)"
)


def torch_format(path: Path) -> str:
    """``"torch-zip"`` for zip archives (also damaged ones that start like a zip), else ``"torch-legacy"``."""
    try:
        with path.open("rb") as f:
            if f.read(4) == _ZIP_MAGIC:
                return "torch-zip"
    except OSError:
        pass
    return "torch-zip" if zipfile.is_zipfile(path) else "torch-legacy"


# allow_globals ------------------------------------------------------------------------------


def _global_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def _resolve_global(name: str) -> Any:
    """``"pkg.mod.Outer.Inner"`` -> the object, importing the longest module prefix that exists."""
    parts = name.split(".")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"allow_globals: {name!r} is not a dotted 'module.Name'")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise ValueError(f"allow_globals: cannot import {name!r}; install its package, or pass the class itself")


def resolve_allow_globals(allow_globals: Iterable[str | Any] | None) -> list[tuple[str, Any]]:
    """``allow_globals`` as ``(name, object)`` pairs, checked before any file is touched.

    Raises:
        ValueError: a name cannot be imported, or it names something that runs code
            (``os.system``, ``builtins.eval``, ...): allowing it would defeat the safe loader.
    """
    if isinstance(allow_globals, (str, bytes)):
        raise TypeError("allow_globals must be a list of names or classes, e.g. ['argparse.Namespace']")
    out: list[tuple[str, Any]] = []
    for g in allow_globals or ():
        obj = _resolve_global(g) if isinstance(g, str) else g
        names = {g, _global_name(obj)} if isinstance(g, str) else {_global_name(obj)}
        bad = dangerous_globals(sorted(names)) or _dangerous_alias(obj)
        if bad:
            raise ValueError(
                f"allow_globals: refusing to allow {', '.join(bad)}: it runs code when a pickle calls it. "
                "A checkpoint that needs it is not a weights file; do not load it"
            )
        out.append((_global_name(obj), obj))
    return out


def _dangerous_alias(obj: Any) -> list[str]:
    """The dangerous names that resolve to ``obj`` itself (``io.open`` is ``builtins.open``): judged by object."""
    import sys

    from .pickle_scan import DANGERS

    out = []
    for name in DANGERS:
        module, _, attr = name.rpartition(".")
        if not module:  # a whole module ("os"): its functions carry its name in __module__, checked above
            continue
        try:
            mod = sys.modules.get(module) or importlib.import_module(module)
            if getattr(mod, attr, None) is obj:
                out.append(name)
        except Exception:  # noqa: BLE001, S112 - a module this Python lacks cannot be what obj is
            continue
    return out


@contextlib.contextmanager
def _allowed(extra: list[tuple[str, Any]]) -> Iterator[None]:
    import torch.serialization as ts

    if not extra:
        yield
        return
    with ts.safe_globals([obj for _, obj in extra]):
        yield


# checks before torch.load ---------------------------------------------------------------------


def check_zip_directory(zf: zipfile.ZipFile, size: int, bad) -> list[zipfile.ZipInfo]:
    """The members of a torch zip, refused when a reader could be fooled or flooded by them.

    Every name is unique, also ignoring case (torch and ``zipfile`` could otherwise resolve
    ``data.pkl`` to two different members, one checked and one loaded); every record lies inside
    the file; nothing is encrypted; compressed records inflate by a bounded factor. Shared by
    ``open`` and ``scan``.
    """
    infos = zf.infolist()
    seen: dict[str, str] = {}
    for info in infos:
        folded = info.filename.casefold()
        if folded in seen:
            if seen[folded] == info.filename:
                raise bad(f"the archive holds two records named {info.filename!r}")
            raise bad(
                f"the archive holds records named {seen[folded]!r} and {info.filename!r}, which differ only in case "
                "(a reader could pick either: crafted file)"
            )
        seen[folded] = info.filename
        if info.header_offset + info.compress_size > size:
            raise bad(f"record {info.filename!r} reaches past the end of the file (truncated?)")
        if info.flag_bits & 0x1:
            raise bad(f"record {info.filename!r} is encrypted, which torch cannot read")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size:
                raise bad(f"record {info.filename!r} is stored uncompressed but its two sizes disagree")
        elif info.compress_type != zipfile.ZIP_DEFLATED:
            raise bad(f"record {info.filename!r} uses compression method {info.compress_type}, which torch cannot read")
        elif info.file_size > min(MAX_INFLATED_BYTES, max(1 << 20, _MAX_INFLATE_RATIO * info.compress_size)):
            raise bad(
                f"record {info.filename!r} would inflate from {info.compress_size} to {info.file_size} bytes "
                "(a zip bomb?); torch writes records uncompressed"
            )
    return infos


def _check_zip(path: Path, size: int, bad) -> bool:
    """Validate a torch zip before torch reads it; return whether it may be memory-mapped."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = check_zip_directory(zf, size, bad)
            if not infos:
                raise bad("the zip archive is empty")
            root = infos[0].filename.split("/", 1)[0] + "/"
            by_name = {i.filename: i for i in infos}
            pkl = by_name.get(root + "data.pkl")
            if pkl is None:
                listing = ", ".join(i.filename for i in infos[:6])
                raise bad(
                    f"the zip archive has no {root}data.pkl, so it is not a torch checkpoint (it holds {listing})"
                )
            with zf.open(pkl) as f:
                data = f.read(pkl.file_size + 1)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - BadZipFile, zlib.error, EOFError, struct.error, ...
        raise bad(f"the zip archive is truncated or damaged ({type(e).__name__}: {first_line(str(e))})") from None
    try:
        records = storage_records(data)  # 4x faster; the opcode scan below handles what it gives up on
    except PickleRefused as e:
        raise bad(str(e)) from None
    if records is None:
        scan = scan_pickles(data, max_pickles=1)
        if scan.problems:
            raise bad(scan.problems[0])
        if not scan.resolved:
            return False  # torch checks record sizes itself when it reads them into memory
        records = scan.storages
    mmap = True
    for record in records:  # every reference to a storage (torch sizes it by the first one)
        info = by_name.get(f"{root}data/{record.key}")
        if info is None:
            raise bad(f"data.pkl names the tensor storage 'data/{record.key}', which the archive does not hold")
        itemsize = element_size(record.type)
        if itemsize is None:
            mmap = False
            continue
        if info.file_size != record.numel * itemsize:
            raise bad(
                f"the tensor storage 'data/{record.key}' holds {info.file_size} bytes, but data.pkl declares "
                f"{record.numel} x {record.type} = {record.numel * itemsize} bytes"
            )
        if info.compress_type != zipfile.ZIP_STORED:
            mmap = False  # a compressed record cannot be memory-mapped; torch inflates it (bounded above)
    return mmap


def _check_legacy(path: Path, size: int, bad) -> None:
    """A legacy file may not declare more storage bytes than it holds (torch allocates them first)."""
    try:
        with path.open("rb") as f:
            data = f.read(min(size, MAX_SCAN_BYTES))
    except OSError as e:
        raise bad(f"cannot read the file ({e.strerror or e})") from None
    scan = scan_pickles(data, max_pickles=5)  # magic number, protocol, sys info, payload, storage keys
    if scan.problems:
        raise bad(scan.problems[0])
    declared = 0
    for record in {r.key: r for r in reversed(scan.storages)}.values():  # torch sizes a storage by its first reference
        declared += record.numel * (element_size(record.type) or 0)
    if declared > size:
        raise bad(
            f"the pickle declares {declared} bytes of tensor data, but the file holds only {size} bytes (truncated or corrupt)"
        )


# loading ----------------------------------------------------------------------------------------


def safe_torch_load(path: Path, *, mmap: bool, allow_globals: Iterable[str | Any] | None = None) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with errors that say what to do.

    The file is checked first (see the module docs); ``mmap`` is dropped for zip files whose
    records cannot be mapped safely (torch then checks every record size as it reads it).
    There is no fallback to unsafe loading, whatever the environment says.

    Raises:
        UnsafeCheckpointError: the pickle references globals outside torch's allow-list
            (nothing was executed; the globals are named).
        CheckpointError: the file is truncated, corrupt or not a torch checkpoint.
        ValueError: ``allow_globals`` names something that cannot be imported or that runs code.
    """
    import torch

    fmt = torch_format(path)
    extra = resolve_allow_globals(allow_globals)

    def bad(reason: str) -> CheckpointError:
        return CheckpointError(path, reason, format=fmt, hint=_HINT_CORRUPT)

    try:
        size = path.stat().st_size
    except OSError as e:
        raise bad(f"cannot read the file ({e.strerror or e})") from None
    if fmt == "torch-zip":
        mmap = _check_zip(path, size, bad) and mmap
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; we raise instead
            with _allowed(extra):
                if fmt == "torch-legacy":
                    loaded = read_legacy(path, size=size, bad=bad)  # parallel reads, see legacy_reader
                    if loaded is not NOT_PLAIN:
                        return loaded
                    _check_legacy(path, size, bad)
                    mmap = False
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        raise _refusal(path, fmt, str(e), extra) from None
    except Exception as e:  # noqa: BLE001 - RuntimeError, EOFError, struct.error, AssertionError, MemoryError, ...
        raise bad(f"{type(e).__name__}: {first_line(str(e))}") from None


def _refusal(path: Path, fmt: str, msg: str, extra: list[tuple[str, Any]]) -> CheckpointError:
    """Turn an ``UnpicklingError`` of the safe loader into an unsafe-file or a damaged-file error."""
    try:
        names = refused_globals(checkpoint_globals(path))
    except Exception:  # noqa: BLE001 - the names are a courtesy; the refusal stands
        names = []
    allowed = {name for name, _ in extra}
    names = [n for n in names if n not in allowed]
    reason = _unpickler_reason(msg)
    if names or any(r in reason for r in _REFUSALS):
        names = names or [n for n in _GLOBAL_IN_MESSAGE.findall(reason) if n not in allowed]
        return UnsafeCheckpointError(path, names, format=fmt, detail=reason)
    return CheckpointError(
        path,
        f"the pickle is corrupt or uses what the safe loader does not support ({reason})",
        format=fmt,
        hint=_HINT_CORRUPT,
    )


_BOILERPLATE = ("Weights only load failed", "Check the documentation", "Please file an issue")


def _unpickler_reason(msg: str) -> str:
    """The one line of torch's long weights_only message that says what was refused."""
    for line in msg.splitlines():
        line = line.strip()
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
        if line and not line.startswith(_BOILERPLATE):
            return line[:300]
    return first_line(msg)


def _flatten(
    sd: Mapping[str, Any],
    skipped: dict[str, str],
    prefix: str = "",
    depth: int = 0,
    seen: set[int] | None = None,
) -> Iterator[tuple[str, Any]]:
    """Nested mappings as dotted keys, in order.

    Each mapping is expanded once (a pickle can reference one dict from many places: a cycle,
    or shared references that would multiply the keys exponentially); repeats and nesting
    deeper than :data:`MAX_DEPTH` are listed in ``skipped``.
    """
    seen = {id(sd)} if seen is None else seen
    for k, v in sd.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and not hasattr(v, "shape") and not is_extra_state(key):
            if id(v) in seen or depth + 1 > MAX_DEPTH:
                skipped[key] = f"{type(v).__name__} (nested too deep, cyclic or repeated)"
            else:
                seen.add(id(v))
                yield from _flatten(v, skipped, key + ".", depth + 1, seen)
        else:
            yield key, v


def open_torch(
    path: Path, *, container: str | None = None, allow_globals: Iterable[str | Any] | None = None, **_: Any
) -> Source:
    """Open a ``.bin/.pt/.pth/.ckpt`` file: zip files memory-mapped, legacy pickles read once."""
    import torch

    fmt = torch_format(path)
    obj = safe_torch_load(path, mmap=fmt == "torch-zip", allow_globals=allow_globals)
    state_dict, chosen, candidates = find_state_dict(obj, container=container, path=str(path), format=fmt)
    entries: dict[str, TensorRef] = {}
    skipped: dict[str, str] = {}
    unusable: list[str] = []
    extra: dict[str, Any] = {}
    for key, value in _flatten(state_dict, skipped):
        if isinstance(value, torch.Tensor):
            why = unusable_tensor(value)
            if why:
                unusable.append(f"{key!r} ({why})")
            entries[key] = TensorRef(key, tuple(value.shape), dtype_name(value.dtype), constant_loader(value))
        else:
            skipped[key] = type(value).__name__
            if is_extra_state(key):  # get_extra_state's value: set_extra_state takes it on load
                extra[key] = value
    if unusable:
        raise CheckpointError(
            path,
            f"{len(unusable)} tensor(s) cannot be loaded as weights: {', '.join(unusable[:5])}"
            + (" ..." if len(unusable) > 5 else ""),
            format=fmt,
            hint="only dense tensors with their values in the file load; re-save them with .to_dense() "
            "(sparse), .dequantize() (quantized) or with their values (meta tensors hold none)",
        )
    meta = valid_module_metadata(getattr(state_dict, "_metadata", None))
    return Source(
        entries,
        path=str(path),
        format=fmt,
        module_metadata=meta,
        container=chosen,
        containers=candidates,
        skipped=skipped,
        extra_state=extra,
    )


def unusable_tensor(t: Any) -> str:
    """Why a loaded tensor cannot be a weight (``""`` when it can): its values are not plain bytes from the file.

    Sparse tensors are not checked by torch when loaded (out-of-range indices crash later),
    meta tensors hold no values, quantized and nested ones cannot be copied into a dense parameter.
    """
    import torch

    if t.is_meta:
        return "a meta tensor: the file holds no values for it"
    if t.layout != torch.strided:
        return f"{str(t.layout).removeprefix('torch.')} layout"
    if t.is_quantized:
        return "quantized"
    if getattr(t, "is_nested", False):
        return "nested"
    return ""

