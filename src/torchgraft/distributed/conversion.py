"""Conversion: any checkpoint to a DCP directory, and a DCP directory to safetensors."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from ..fileio import replace_dir
from ..sources import Source
from ..sources import open as open_source
from ..sources.dcp_storage import dcp_call

__all__ = ["DCPConvertResult", "convert_from_dcp", "convert_to_dcp"]


@dataclass
class DCPConvertResult:
    """What :func:`convert_to_dcp` wrote.

    Attributes:
        source: the checkpoint read.
        dest: the DCP directory written.
        files: the files in it (``.metadata`` and ``__0_0.distcp``).
        tensors: how many tensors were written.
        bytes: total tensor bytes written.
        skipped: non-tensor entries of the source that were left out (name -> type).
    """

    source: str
    dest: str
    files: list[str]
    tensors: int
    bytes: int
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "dest": self.dest,
            "files": list(self.files),
            "tensors": self.tensors,
            "bytes": self.bytes,
            "skipped": dict(self.skipped),
        }


def convert_to_dcp(
    source: str | os.PathLike[str] | Source | Mapping[str, Any],
    dest: str | os.PathLike[str],
    *,
    force: bool = False,
    container: str | None = None,
    allow_globals: Iterable[str | Any] | None = None,
) -> DCPConvertResult:
    """Write any checkpoint :func:`torchgraft.open` reads as a ``torch.distributed.checkpoint`` directory.

    Names, dtypes and values are kept as they are (renames and prefixes belong to loading, not
    to conversion). The result loads with ``dcp.load`` or :func:`load` on any number of ranks.
    It runs in this process (``no_dist``) even inside a distributed job: call it on one rank.
    The directory is written under a temporary name next to ``dest`` and renamed into place
    when complete.

    Args:
        source: a path, an open :class:`~torchgraft.Source` or a state dict.
        dest: the directory to create.
        force: replace an existing ``dest``.
        container, allow_globals: as for :func:`torchgraft.open`.

    Returns:
        A :class:`DCPConvertResult`.

    Raises:
        FileExistsError: ``dest`` exists and ``force`` is false (nothing written).
        CheckpointError: the source cannot be read (nothing written).

    Example:
        >>> convert_to_dcp("all-MiniLM-L6-v2/", "minilm-dcp/")
        DCPConvertResult(source='.../model.safetensors', dest='minilm-dcp', files=['.metadata', '__0_0.distcp'], tensors=104, ...)
    """
    from torch.distributed.checkpoint import FileSystemWriter

    dest_path = Path(os.fspath(dest)).expanduser()
    if dest_path.exists() and not force:
        raise FileExistsError(f"{str(dest_path)!r} exists; pass force=True (--force) to replace it")
    src = (
        source if isinstance(source, Source) else open_source(source, container=container, allow_globals=allow_globals)
    )
    state = {name: ref.load() for name, ref in src.items()}
    dest_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_path.name}.", suffix=".tmp", dir=dest_path.parent))
    try:
        dcp_call(dcp.save, state, storage_writer=FileSystemWriter(tmp, single_file_per_rank=True), no_dist=True)
        replace_dir(tmp, dest_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DCPConvertResult(
        source=src.path or "state dict",
        dest=str(dest_path),
        files=sorted(p.name for p in dest_path.iterdir()),
        tensors=len(state),
        bytes=sum(t.numel() * t.element_size() for t in state.values()),
        skipped=dict(src.skipped),
    )


def convert_from_dcp(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int | None = None,
    force: bool = False,
    container: str | None = None,
) -> Any:
    """Write a DCP checkpoint directory as safetensors (one file, or shards with an index).

    Tensors saved in chunks by several ranks are reassembled; non-tensor entries (optimizer
    step counters, ...) are left out. A thin layer over :func:`torchgraft.convert.convert`.

    Args:
        source: the DCP checkpoint directory.
        dest: the ``.safetensors`` file or directory to write.
        dtype, max_shard_size, force: as for :func:`torchgraft.convert.convert`.
        container: which part of a training checkpoint to write (``"model"``); by default
            the weights are found as :func:`torchgraft.open` finds them.

    Returns:
        The :class:`torchgraft.convert.ConvertResult`.

    Raises:
        CheckpointError: ``source`` is not a readable DCP checkpoint.
        UnsafeCheckpointError: its ``.metadata`` names globals other than DCP's classes.
        FileExistsError: a destination file exists and ``force`` is false.

    Example:
        >>> convert_from_dcp("minilm-dcp/", "minilm-safetensors/")
    """
    from ..convert import convert

    src = open_source(source, format="dcp", container=container)
    return convert(src, dest, dtype=dtype, max_shard_size=max_shard_size, force=force)
