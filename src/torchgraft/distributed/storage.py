"""DCP storage reading for any torchgraft source: :class:`SourceStorageReader`, and which reader a source needs."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..errors import CheckpointError
from ..sources import Source
from ..sources.dcp_reader import storage_key
from ..sources.dcp_storage import DCPStorageReader

__all__ = ["SourceStorageReader", "storage_reader_for", "torch_dtype"]

_SAFETENSORS_FORMATS = ("safetensors", "sharded-safetensors")
#: Formats whose tensors are memory-mapped (or already in memory): narrowing one touches only its slice.
#: Any other format (a legacy torch pickle) is read whole, and counted whole, once per tensor.
_MAPPED_FORMATS = (*_SAFETENSORS_FORMATS, "torch-zip", "state-dict")


class SourceStorageReader(StorageReader):
    """A DCP ``StorageReader`` over any torchgraft :class:`~torchgraft.Source`.

    Metadata comes from the source's names, shapes and dtypes (one chunk per tensor, no bytes
    read). ``read_data`` serves each read item (a rank's slice of a tensor): safetensors files
    (single or ``*.index.json`` shards) are sliced with ``safe_open(...).get_slice``, so only
    the requested rows are read; other formats load the (memory-mapped) tensor and narrow it.
    Unlike DCP's ``HuggingFaceStorageReader`` it reads exactly the files the source names (a
    single file, the shards of an index) rather than every ``*.safetensors`` in a directory.

    Attributes:
        bytes_read: tensor bytes this reader read from the checkpoint: the slices it served
            for memory-mapped formats (safetensors, torch zip), whole tensors for formats that
            cannot be read in part (legacy torch pickles).

    Example:
        >>> reader = SourceStorageReader(tg.open("all-MiniLM-L6-v2/"))
        >>> dcp.load({"pooler.dense.bias": torch.empty(384)}, storage_reader=reader, no_dist=True)
        >>> reader.bytes_read
        1536
    """

    def __init__(self, source: Source) -> None:
        super().__init__()
        self.source = source
        self.bytes_read = 0
        self._file_of = _safetensors_files(source)
        self._read_whole: set[str] = set()

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        tensors: dict[str, TensorStorageMetadata] = {}
        storage: dict[MetadataIndex, str] = {}
        for name, ref in self.source.items():
            zeros = torch.Size([0] * len(ref.shape))
            tensors[name] = TensorStorageMetadata(
                properties=TensorProperties(dtype=torch_dtype(ref.dtype)),
                size=torch.Size(ref.shape),
                chunks=[ChunkStorageMetadata(offsets=zeros, sizes=torch.Size(ref.shape))],
            )
            storage[MetadataIndex(name, zeros)] = name
        return Metadata(state_dict_metadata=tensors, storage_data=storage, storage_meta=StorageMeta())  # type: ignore[arg-type]

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: dict[str | None, list[ReadItem]] = {}
        for item in plan.items:
            by_file.setdefault(self._file_of.get(item.storage_index.fqn), []).append(item)
        for file, items in by_file.items():
            if file is None:
                mapped = self.source.format in _MAPPED_FORMATS
                for item in items:
                    name = item.storage_index.fqn
                    tensor = self._load(name)
                    if not mapped and name not in self._read_whole:
                        self._read_whole.add(name)
                        self.bytes_read += tensor.numel() * tensor.element_size()
                    self._deliver(item, _narrow(tensor, item), planner, count=mapped)
                continue
            from safetensors import safe_open

            try:
                handle = safe_open(file, framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001 - the library's error types vary by version
                raise CheckpointError(
                    file,
                    f"cannot open for slicing: {e}",
                    format="safetensors",
                    hint="re-download or re-convert the file",
                ) from None
            for item in items:
                name = item.storage_index.fqn
                try:
                    if not item.lengths:  # a 0-d tensor has nothing to slice
                        piece = handle.get_tensor(name)
                    else:
                        slices = tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths))
                        piece = handle.get_slice(name)[slices]
                except Exception as e:  # noqa: BLE001 - as above, one CheckpointError naming the tensor
                    raise CheckpointError(
                        file, f"reading a slice of {name!r} failed: {e}", format="safetensors"
                    ) from None
                self._deliver(item, piece, planner)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _load(self, name: str) -> torch.Tensor:
        try:
            return self.source[name].load()
        except KeyError:
            raise CheckpointError(
                self.source.path, f"{name!r} is not in the checkpoint", format=self.source.format
            ) from None

    def _deliver(self, item: ReadItem, piece: torch.Tensor, planner: LoadPlanner, *, count: bool = True) -> None:
        target = planner.resolve_tensor(item).detach()
        if tuple(target.shape) != tuple(piece.shape):
            raise CheckpointError(
                self.source.path,
                f"{item.storage_index.fqn!r}: read {list(piece.shape)}, needed {list(target.shape)}",
                format=self.source.format,
                hint="the checkpoint changed while loading",
            )
        target.copy_(piece)
        if count:
            self.bytes_read += piece.numel() * piece.element_size()
        planner.commit_tensor(item, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False


def storage_reader_for(source: Source) -> tuple[StorageReader, Callable[[str], str]]:
    """The DCP storage reader for a source, and how a source name becomes its DCP key.

    Returns:
        ``(reader, key)``: :class:`DCPStorageReader` for DCP checkpoints (keys carry the
        container path), :class:`SourceStorageReader` for everything else (keys are the names).
    """
    if source.format == "dcp":
        assert source.path is not None
        return DCPStorageReader(source.path), lambda name: storage_key(source, name)
    return SourceStorageReader(source), lambda name: name


def _safetensors_files(source: Source) -> dict[str, str]:
    """Name -> file for safetensors sources: the file each reader put on its refs (no header read again)."""
    if source.format not in _SAFETENSORS_FORMATS:
        return {}
    return {name: ref.file for name, ref in source.items() if ref.file is not None}


def _narrow(tensor: torch.Tensor, item: ReadItem) -> torch.Tensor:
    for dim, (offset, length) in enumerate(zip(item.storage_offsets, item.lengths)):
        tensor = tensor.narrow(dim, offset, length)
    return tensor


def torch_dtype(name: str) -> torch.dtype:
    """A dtype name as a reader reports it (``"bfloat16"``) -> the ``torch.dtype``."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(None, f"dtype {name!r} is not known to this torch", hint="upgrade torch")
    return dtype


