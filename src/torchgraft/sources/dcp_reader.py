"""torch.distributed.checkpoint (DCP) directories: names, shapes and dtypes from ``.metadata``.

A DCP checkpoint is a directory with a pickled ``.metadata`` file and ``__<rank>_<n>.distcp``
data files. DCP itself reads ``.metadata`` with a plain ``pickle.load``; torchgraft never
unpickles freely, so the file goes through a restricted unpickler that resolves only DCP's
metadata classes, ``torch.Size``, dtypes and paths, and refuses everything else with
:class:`~torchgraft.UnsafeCheckpointError` (nothing from the file is executed). Tensor bytes are
read on demand through DCP's own reader (``torch.load(weights_only=True)`` per chunk), so a
tensor saved in shards by several ranks comes back whole.

Training checkpoints saved as ``dcp.save({"model": ..., "optim": ...})`` keep the nesting in
the metadata; the weights are found by the same rule as for torch files
(:func:`~torchgraft.sources.containers.find_state_dict`: ``container=`` or the first of
``state_dict``, ``model``, ...).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, UnsafeCheckpointError
from .base import Source, TensorRef, dtype_name
from .containers import find_state_dict
from .pickle_scan import PickleRefused, TupleBudget, bounded_dispatch

if TYPE_CHECKING:
    import torch

__all__ = ["FORMAT", "METADATA_FILE", "dcp_root", "looks_like_dcp", "open_dcp", "read_dcp_metadata", "storage_key"]

FORMAT = "dcp"
METADATA_FILE = ".metadata"

#: The globals a DCP ``.metadata`` pickle may name (module -> names). Anything else is refused.
_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "TensorStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.distributed.checkpoint._hf_utils": frozenset({"_HFStorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
}


def dcp_root(path: Path) -> Path:
    """The checkpoint directory for a path to it or to its ``.metadata`` file."""
    return path.parent if path.name == METADATA_FILE else path


def looks_like_dcp(path: Path) -> bool:
    """True for a directory holding ``.metadata`` (or that file itself)."""
    return (path.is_dir() and (path / METADATA_FILE).is_file()) or (path.name == METADATA_FILE and path.is_file())


class _Refused:
    """Stands in for a refused global while the rest of the pickle is parsed; never runs anything."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _MetadataUnpickler(pickle._Unpickler):
    """Python's own unpickler, restricted to :data:`_ALLOWED`.

    The pure-Python one: its memo is a dict (the C unpickler sizes an array by the largest
    memo index a pickle names: 9 bytes can ask for gigabytes). Tuples are bounded as they are
    built (:class:`~torchgraft.sources.pickle_scan.TupleBudget`), ``BYTEARRAY8`` is refused, and
    ``BUILD`` only sets instance state of the allowed classes: a ``BUILD`` on a class object
    would set attributes on the class itself, for the whole process.
    """

    dispatch = bounded_dispatch(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.refused: list[str] = []
        self.tuples = TupleBudget()
        self.allowed_types: set[type] = set()

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if name in _ALLOWED.get(module, ()):
            found = super().find_class(module, name)
            if isinstance(found, type):
                self.allowed_types.add(found)
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        self.refused.append(f"{module}.{name}")
        return _Refused

    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]  # BUILD: the state on top, the object below it
        if isinstance(inst, type):
            raise PickleRefused(
                f"the pickle sets attributes on the class {inst.__module__}.{inst.__qualname__} itself "
                "(that would change it for the whole process: crafted file)"
            )
        if type(inst) is not _Refused and type(inst) not in self.allowed_types:
            raise PickleRefused(f"the pickle sets state on a {type(inst).__name__}, not on a DCP metadata object")
        if getattr(inst, "__setstate__", None) is not None:  # the allowed class's own method
            super().load_build()
            return
        for part in state if isinstance(state, tuple) else (state,):
            if part is not None and (
                not isinstance(part, dict) or not all(isinstance(k, str) and not k.startswith("__") for k in part)
            ):
                raise PickleRefused("the pickle sets state other than plain attributes on a DCP metadata object")
        super().load_build()

    def refuse_bytearray8(self) -> None:
        raise PickleRefused("the pickle holds a BYTEARRAY8, which DCP metadata never does")

    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.BYTEARRAY8[0]] = refuse_bytearray8


def read_dcp_metadata(path: str | Path) -> Any:
    """Read a DCP checkpoint's ``.metadata`` safely.

    Args:
        path: the checkpoint directory (or its ``.metadata`` file).

    Returns:
        DCP's ``torch.distributed.checkpoint.metadata.Metadata``.

    Raises:
        UnsafeCheckpointError: the pickle names globals other than DCP's metadata classes.
        CheckpointError: the file is missing, truncated or not a DCP metadata pickle.
    """
    root = dcp_root(Path(path))
    file = root / METADATA_FILE
    try:
        data = file.read_bytes()
    except OSError as e:
        raise CheckpointError(
            root,
            f"cannot read {METADATA_FILE} ({e.strerror or e})",
            format=FORMAT,
            hint="a DCP checkpoint directory holds .metadata and __*.distcp files",
        ) from None
    unpickler = _MetadataUnpickler(data)
    try:
        metadata = unpickler.load()
    except Exception as e:  # noqa: BLE001 - truncated, or not a pickle at all: one CheckpointError
        raise CheckpointError(
            root,
            f"{METADATA_FILE} is not a readable DCP metadata pickle ({type(e).__name__}: {e})",
            format=FORMAT,
            hint="the save was interrupted or the file is damaged; save it again",
        ) from None
    if unpickler.refused:
        raise UnsafeCheckpointError(root, list(dict.fromkeys(unpickler.refused)), format=FORMAT)
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise CheckpointError(
            root,
            f"{METADATA_FILE} holds a {type(metadata).__name__}, not DCP Metadata",
            format=FORMAT,
            hint="this directory is not a torch.distributed.checkpoint checkpoint",
        )
    _check_storage(root, metadata)
    _check_tensors(root, metadata)
    return metadata


#: A tensor may have at most this many dimensions, and be sharded into at most this many
#: chunks whose overlap is checked pairwise (a DCP save has one chunk per rank that holds a piece).
_MAX_DIMS = 64
_MAX_CHUNK_PAIRS = 20_000_000
#: Chunks written through a compressing transform may inflate by at most this factor.
_MAX_TRANSFORM_RATIO = 200


def _bad(root: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        root, f"{METADATA_FILE} {reason}", format=FORMAT, hint="the file is damaged or crafted; save it again"
    )


def _int_tuple(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, (tuple, list)) or len(value) > _MAX_DIMS:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return None
    return tuple(value)


def _check_tensors(root: Path, metadata: Any) -> None:
    """Every tensor's size, dtype and chunks are sane, and its chunks cover it exactly, each backed by file bytes.

    So that ``load()`` allocates no more than the files hold and every value it returns was read
    from them (DCP itself leaves uncovered parts of a tensor as whatever memory held).
    """
    import math

    import torch
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    storage = metadata.storage_data
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise _bad(root, f"names an entry {type(fqn).__name__} {fqn!r:.80}, not a string")
        if isinstance(md, BytesStorageMetadata):
            continue
        if not isinstance(md, TensorStorageMetadata):
            raise _bad(root, f"describes {fqn!r} with a {type(md).__name__}")
        size = _int_tuple(md.size)
        props = md.properties
        if size is None:
            raise _bad(root, f"gives {fqn!r} an invalid size {md.size!r:.80}")
        if not isinstance(props, TensorProperties) or not isinstance(props.dtype, torch.dtype):
            raise _bad(root, f"gives {fqn!r} an invalid dtype {getattr(props, 'dtype', None)!r:.80}")
        if getattr(props, "layout", torch.strided) != torch.strided:
            raise _bad(root, f"gives {fqn!r} the layout {props.layout}; only dense tensors load")
        chunks = md.chunks
        if not isinstance(chunks, list) or not all(isinstance(c, ChunkStorageMetadata) for c in chunks):
            raise _bad(root, f"gives {fqn!r} an invalid list of chunks")
        boxes = []
        itemsize = props.dtype.itemsize
        covered = 0
        for chunk in chunks:
            offsets, lengths = _int_tuple(chunk.offsets), _int_tuple(chunk.sizes)
            if (
                offsets is None
                or lengths is None
                or len(offsets) != len(size)
                or len(lengths) != len(size)
                or any(o + n > d for o, n, d in zip(offsets, lengths, size))
            ):
                raise _bad(root, f"gives {fqn!r} (size {list(size)}) a chunk outside it: {chunk!r:.120}")
            volume = math.prod(lengths)
            if volume == 0:
                continue
            info = storage.get(MetadataIndex(fqn, offsets))
            if info is None:
                raise _bad(root, f"names no data for the chunk of {fqn!r} at {list(offsets)}")
            length = info.length
            stored = length * (_MAX_TRANSFORM_RATIO if getattr(info, "transform_descriptors", None) else 1)
            if volume * itemsize > stored:
                raise _bad(
                    root,
                    f"gives the chunk of {fqn!r} at {list(offsets)} {volume * itemsize} bytes of values, "
                    f"but only {length} bytes in {info.relative_path!r}",
                )
            covered += volume
            boxes.append((offsets, lengths))
        if len(boxes) ** 2 > 2 * _MAX_CHUNK_PAIRS:
            raise _bad(root, f"splits {fqn!r} into {len(boxes)} chunks, too many to check")
        for i, (o1, n1) in enumerate(boxes):
            for o2, n2 in boxes[i + 1 :]:
                if all(a < b + m and b < a + n for a, n, b, m in zip(o1, n1, o2, n2)):
                    raise _bad(root, f"gives {fqn!r} two chunks that overlap, at {list(o1)} and {list(o2)}")
        if covered != math.prod(size):
            raise _bad(
                root,
                f"gives {fqn!r} (size {list(size)}, {math.prod(size)} values) chunks that hold only {covered} "
                "values: the rest would not come from the file",
            )


def _check_storage(root: Path, metadata: Any) -> None:
    """Data files must be named relative to the checkpoint and stay inside it; byte ranges must be sane."""
    inside = root.resolve()
    storage = getattr(metadata, "storage_data", None)
    if storage is None:
        storage = metadata.storage_data = {}
    if not isinstance(storage, dict):
        raise _bad(root, f"holds storage_data as a {type(storage).__name__}, not a mapping")
    file_sizes: dict[str, int] = {}
    for index, info in storage.items():
        where = getattr(index, "fqn", index)
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or Path(rel).is_absolute() or not (root / rel).resolve().is_relative_to(inside):
            raise CheckpointError(
                root,
                f"{METADATA_FILE} points {where!r} at {rel!r}, outside the checkpoint",
                format=FORMAT,
                hint="refusing to read files outside the checkpoint directory",
            )
        span = (getattr(info, "offset", 0), getattr(info, "length", 0))
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in span):
            raise CheckpointError(
                root,
                f"{METADATA_FILE} gives {where!r} an invalid byte range {span!r}",
                format=FORMAT,
                hint="the file is damaged; save it again",
            )
        if rel not in file_sizes:  # a missing data file is reported when a tensor is read (listing needs none)
            file = root / rel
            file_sizes[rel] = file.stat().st_size if file.exists() else -1
            if file_sizes[rel] >= 0 and not file.is_file():
                raise _bad(root, f"points {where!r} at {rel!r}, which is not a regular file")
        if file_sizes[rel] >= 0 and span[0] + span[1] > file_sizes[rel]:
            raise _bad(
                root,
                f"points {where!r} at bytes {span[0]}..{span[0] + span[1]} of {rel!r}, which holds {file_sizes[rel]}",
            )


def _skeleton(metadata: Any) -> tuple[dict[Any, Any], dict[int, str], dict[str, str]]:
    """Nested mapping with meta tensors in place of the saved tensors, the fqn of each, and non-tensors."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    planner_data = metadata.planner_data if isinstance(getattr(metadata, "planner_data", None), dict) else {}
    root: dict[Any, Any] = {}
    fqn_of: dict[int, str] = {}
    skipped: dict[str, str] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            skipped[fqn] = "bytes"
            continue
        leaf = torch.empty(tuple(md.size), dtype=md.properties.dtype, device="meta")
        fqn_of[id(leaf)] = fqn
        path = planner_data.get(fqn)
        path = tuple(path) if isinstance(path, (tuple, list)) and path else (fqn,)
        node = root
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = leaf
    return root, fqn_of, skipped


def open_dcp(path: Path, *, container: str | None = None, **_: Any) -> Source:
    """Open a DCP checkpoint directory lazily: metadata now, each tensor's chunks on ``load()``."""
    root = dcp_root(path)
    metadata = read_dcp_metadata(root)
    skeleton, fqn_of, skipped = _skeleton(metadata)
    if not fqn_of:
        raise CheckpointError(
            root,
            "the checkpoint holds no tensors",
            format=FORMAT,
            hint="it may hold only optimizer state or other objects",
        )
    state, chosen, candidates = find_state_dict(skeleton, container=container, path=str(root), format=FORMAT)
    entries: dict[str, TensorRef] = {}
    for name, value in state.items():
        fqn = fqn_of.get(id(value))
        if fqn is None:  # a nested mapping or a non-tensor next to the weights
            skipped.setdefault(f"{chosen}.{name}" if chosen else str(name), type(value).__name__)
            continue
        entries[str(name)] = TensorRef(
            str(name), tuple(value.shape), dtype_name(value.dtype), _loader(root, fqn, metadata)
        )
    files = sorted(
        {str(root / info.relative_path) for info in metadata.storage_data.values() if hasattr(info, "relative_path")}
    )
    return Source(
        entries, path=str(root), format=FORMAT, container=chosen, containers=candidates, skipped=skipped, files=files
    )


def storage_key(source: Source, name: str) -> str:
    """The fully qualified DCP key of a source entry (the container path, a dot, the name)."""
    return f"{source.container}.{name}" if source.container else name


class _Window(io.RawIOBase):
    """A read-only, seekable view of ``length`` bytes of a file from ``offset`` (a chunk, without copying it)."""

    def __init__(self, f: Any, offset: int, length: int) -> None:
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, [pos, self.pos + pos, self.length + pos][whence])
        return self.pos

    def readinto(self, buf: Any) -> int:
        n = max(0, min(len(buf), self.length - self.pos))
        self.f.seek(self.offset + self.pos)
        got = self.f.readinto(memoryview(buf)[:n])
        self.pos += got
        return got


def check_chunks(root: Path, fqn: str, metadata: Any) -> None:
    """The pickles in ``fqn``'s chunks pass the same inert pass as a torch file before DCP's ``torch.load`` sees them.

    (Tuples nested too deep or too shared to hash, and calls that allocate what the file does not hold.)
    """
    import zipfile

    from torch.distributed.checkpoint.metadata import MetadataIndex

    from .pickle_scan import storage_records
    from .torch_reader import check_zip_directory

    md = metadata.state_dict_metadata[fqn]

    def bad(reason: str) -> CheckpointError:
        return _bad(root, f"names a chunk of {fqn!r} that cannot be read safely: {reason}")

    for chunk in md.chunks:
        info = metadata.storage_data.get(MetadataIndex(fqn, chunk.offsets))
        if info is None or getattr(info, "transform_descriptors", None):
            continue  # a transformed (compressed) chunk: DCP's extension decodes it
        with (root / info.relative_path).open("rb") as f:
            window = io.BufferedReader(_Window(f, info.offset, info.length))
            try:
                if window.peek(4)[:4] == b"PK\x03\x04":
                    with zipfile.ZipFile(window) as zf:
                        pkls = [i for i in check_zip_directory(zf, info.length, bad) if i.filename.endswith("data.pkl")]
                        for member in pkls:
                            with zf.open(member) as pkl:
                                storage_records(pkl.read())
                else:
                    for _ in range(5):  # a legacy torch file: five pickles, then raw bytes
                        if storage_records(window) is None:
                            break
            except PickleRefused as e:
                raise bad(str(e)) from None
            except CheckpointError:
                raise
            except Exception:  # noqa: BLE001, S110 - damaged: DCP's own read says what is wrong
                pass


def _loader(root: Path, fqn: str, metadata: Any):
    def load() -> torch.Tensor:
        from .dcp_storage import read_dcp_tensor

        try:
            return read_dcp_tensor(root, fqn, metadata=metadata)  # its reader checks the chunks first
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - a chunk the safe loader refuses, or damaged bytes: one error
            text = (str(e).strip().splitlines() or ["no details"])[0][:300]
            raise CheckpointError(
                root,
                f"reading {fqn!r} from its chunks failed ({type(e).__name__}: {text})",
                format=FORMAT,
                hint="a .distcp file is damaged or was not written by torch.distributed.checkpoint",
            ) from None

    return load
