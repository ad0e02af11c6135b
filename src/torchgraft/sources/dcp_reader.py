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


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.refused: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        self.refused.append(f"{module}.{name}")
        return _Refused


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
    return metadata


def _check_storage(root: Path, metadata: Any) -> None:
    """Data files must be named relative to the checkpoint and stay inside it; byte ranges must be sane."""
    inside = root.resolve()
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
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


def _loader(root: Path, fqn: str, metadata: Any):
    def load() -> torch.Tensor:
        from .dcp_storage import read_dcp_tensor

        return read_dcp_tensor(root, fqn, metadata=metadata)

    return load
