"""Reading tensor bytes of a DCP checkpoint: DCP's own file reader, with a safe ``.metadata`` and a byte count.

:mod:`~torchgraft.sources.dcp_reader` lists a DCP checkpoint from its metadata; this module reads
its tensors, through ``torch.distributed.checkpoint`` (``torch.load(weights_only=True)`` per
chunk), so that a tensor saved in chunks by several ranks comes back whole. It imports
``torch.distributed.checkpoint``, so the reader imports it only when a tensor is loaded.

Example:
    >>> read_dcp_tensor("minilm-dcp/", "pooler.dense.bias").shape
    torch.Size([384])
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from ..errors import CheckpointError
from .dcp_reader import read_dcp_metadata

__all__ = ["DCPStorageReader", "checkpoint_error", "dcp_call", "read_dcp_tensor"]


class DCPStorageReader(FileSystemReader):
    """DCP's ``FileSystemReader`` with a safe ``.metadata`` read and a byte count.

    DCP unpickles ``.metadata`` with a plain ``pickle.load``; this reader goes through
    :func:`torchgraft.sources.dcp_reader.read_dcp_metadata` (DCP classes only) instead.

    Attributes:
        bytes_read: bytes of the ``.distcp`` chunks read so far.

    Example:
        >>> reader = DCPStorageReader("minilm-dcp/")
        >>> dcp.load({"pooler.dense.bias": torch.empty(384)}, storage_reader=reader, no_dist=True)
        >>> reader.bytes_read
        1536
    """

    def __init__(self, path: str | os.PathLike[str], *, metadata: Metadata | None = None) -> None:
        super().__init__(path)
        self._metadata = metadata
        self.bytes_read = 0
        self._checked: set[str] = set()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            self._metadata = read_dcp_metadata(Path(os.fspath(self.path)))
        md = self._metadata
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id  # type: ignore[union-attr]
        return md

    def read_data(self, plan: Any, planner: Any) -> Any:
        """DCP's read, after every tensor's chunks passed :func:`~torchgraft.sources.dcp_reader.check_chunks`.

        Both executors read through this reader, so no ``.distcp`` pickle reaches ``torch.load``
        unchecked, whichever path asked for it.
        """
        from .dcp_reader import check_chunks

        metadata = self._metadata if self._metadata is not None else self.read_metadata()
        for fqn in sorted({item.storage_index.fqn for item in plan.items} - self._checked):
            if fqn in metadata.state_dict_metadata:
                check_chunks(Path(os.fspath(self.path)), fqn, metadata)
            self._checked.add(fqn)
        return super().read_data(plan, planner)

    def _slice_file(self, file: Any, sinfo: Any) -> Any:
        self.bytes_read += int(getattr(sinfo, "length", 0) or 0)
        return super()._slice_file(file, sinfo)


def read_dcp_tensor(path: str | os.PathLike[str], fqn: str, *, metadata: Metadata | None = None) -> torch.Tensor:
    """Read one whole tensor of a DCP checkpoint in this process (all its chunks).

    Args:
        path: the checkpoint directory.
        fqn: the tensor's DCP key (``"model.embeddings.word_embeddings.weight"``).
        metadata: the checkpoint's metadata, when already read.

    Returns:
        The tensor, on the CPU.

    Raises:
        CheckpointError: the key is not a tensor of the checkpoint, or a chunk cannot be read.

    Example:
        >>> read_dcp_tensor("minilm-dcp/", "pooler.dense.bias").shape
        torch.Size([384])
    """
    reader = DCPStorageReader(path, metadata=metadata)
    md = reader.read_metadata()
    info = md.state_dict_metadata.get(fqn)
    if not isinstance(info, TensorStorageMetadata):
        raise CheckpointError(path, f"{fqn!r} is not a tensor of this DCP checkpoint", format="dcp")
    tensor = torch.empty(tuple(info.size), dtype=info.properties.dtype)
    try:
        dcp_call(dcp.load, {fqn: tensor}, storage_reader=reader, no_dist=True)
    except CheckpointException as e:
        raise checkpoint_error(e, str(path), "dcp") from None
    return tensor


def dcp_call(fn: Callable[..., None], state: dict[str, Any], **kwargs: Any) -> None:
    """``dcp.load`` / ``dcp.save`` without DCP's warning that ``no_dist`` means a single process (we know)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state, **kwargs)


def checkpoint_error(e: CheckpointException, path: str | None, fmt: str) -> BaseException:
    """DCP's CheckpointException -> the first rank's own error (a CheckpointError stays one)."""
    failures = getattr(e, "failures", {}) or {}
    for rank in sorted(failures):
        inner = failures[rank]
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, Exception):
            if hasattr(inner, "add_note"):
                inner.add_note(
                    f"(raised on rank {rank} while torch.distributed.checkpoint read the checkpoint; the model is unchanged)"
                )
            return inner
    return CheckpointError(path, f"torch.distributed.checkpoint failed: {e}", format=fmt)
