"""Opening checkpoints: one reader per format, chosen from a registry by content, never by if/elif."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .base import DTYPE_SIZES, Source, TensorRef, dtype_name
from .dcp_reader import looks_like_dcp, open_dcp
from .directory import open_directory, open_index
from .meta_shards import looks_like_meta_shards, open_meta_shards
from .safetensors_reader import looks_like_safetensors, open_safetensors
from .torch_reader import open_torch

__all__ = [
    "DTYPE_SIZES",
    "READERS",
    "Reader",
    "Source",
    "TensorRef",
    "dtype_name",
    "open",
    "read_head",
    "register_reader",
]

_HEAD_BYTES = 16


@dataclass(frozen=True)
class Reader:
    """A checkpoint format: how to recognise it and how to open it.

    ``matches(path, head, size)`` gets the first bytes of a file (``b""`` for a directory)
    and says whether this reader handles it; ``open(path, **options)`` returns a :class:`Source`.
    """

    name: str
    matches: Callable[[Path, bytes, int], bool]
    open: Callable[..., Source]


def _lazy(module: str, name: str) -> Callable[..., Any]:
    """A function of one of the other frameworks' reader modules, imported on its first call.

    ``import torchgraft`` then pays for none of them (each costs 7-10 ms to import, their format
    libraries far more, and those are imported only when such a file is opened).
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


looks_like_flax_msgpack, open_flax = _lazy("flax_reader", "looks_like_flax_msgpack"), _lazy("flax_reader", "open_flax")
looks_like_gguf, open_gguf = _lazy("gguf_reader", "looks_like_gguf"), _lazy("gguf_reader", "open_gguf")
looks_like_hdf5, open_keras = _lazy("keras_reader", "looks_like_hdf5"), _lazy("keras_reader", "open_keras")
looks_like_keras_zip = _lazy("keras_reader", "looks_like_keras_zip")
looks_like_onnx, open_onnx = _lazy("onnx_reader", "looks_like_onnx"), _lazy("onnx_reader", "open_onnx")
looks_like_tf_checkpoint = _lazy("tf_reader", "looks_like_tf_checkpoint")
open_tf_checkpoint = _lazy("tf_reader", "open_tf_checkpoint")

READERS: list[Reader] = [
    # torch.distributed.checkpoint: a directory with .metadata (before "directory"; the file is a pickle)
    Reader("dcp", lambda p, head, size: looks_like_dcp(p), open_dcp),
    # TensorFlow: a SavedModel folder (variables/variables.index), PREFIX.index or PREFIX.data-* (before "directory")
    Reader("tf-checkpoint", lambda p, head, size: looks_like_tf_checkpoint(p), open_tf_checkpoint),
    # Meta's tensor-parallel consolidated.00.pth, .01.pth, ... (before "directory"): keys "consolidated.00/..."
    Reader("meta-shards", lambda p, head, size: looks_like_meta_shards(p), open_meta_shards),
    Reader("directory", lambda p, head, size: p.is_dir(), open_directory),
    Reader("index", lambda p, head, size: p.name.endswith(".index.json"), open_index),
    Reader("safetensors", lambda p, head, size: looks_like_safetensors(head, size), open_safetensors),
    # Keras: HDF5 (.h5, .weights.h5), or a zip with model.weights.h5 + config.json (.keras; before "torch-zip")
    Reader("keras", lambda p, head, size: looks_like_hdf5(head) or looks_like_keras_zip(p, head), open_keras),
    # Flax msgpack (a msgpack map can start with 0x80..0x8f: before "torch-legacy")
    Reader("flax", lambda p, head, size: looks_like_flax_msgpack(p, head), open_flax),
    Reader("torch-zip", lambda p, head, size: head[:4] == b"PK\x03\x04", open_torch),
    # pickle protocol 2+ starts with PROTO (0x80); torch's legacy format is a series of pickles
    Reader("torch-legacy", lambda p, head, size: head[:1] == b"\x80", open_torch),
    Reader("onnx", lambda p, head, size: looks_like_onnx(p, head), open_onnx),
    Reader("gguf", lambda p, head, size: looks_like_gguf(head), open_gguf),
]


def register_reader(reader: Reader, *, first: bool = True) -> None:
    """Add a format. ``first=True`` lets it claim files before the built-in readers."""
    READERS[:] = [r for r in READERS if r.name != reader.name]
    READERS.insert(0 if first else len(READERS), reader)


def read_head(path: Path) -> tuple[bytes, int]:
    """The first bytes every :class:`Reader` sniffs, and the file's size.

    Raises:
        CheckpointError: the file cannot be read, or is empty.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError as e:
        raise CheckpointError(
            path, f"cannot read the file ({e.strerror or e})", hint="check the file's permissions"
        ) from None
    if size == 0:
        raise CheckpointError(path, "the file is empty", hint="the download or save was interrupted: fetch it again")
    return head, size


def open(
    path: str | os.PathLike[str] | Source | Mapping[str, Any],
    *,
    format: str | None = None,
    container: str | None = None,
    allow_globals: Iterable[str | Any] | None = None,
) -> Source:
    """Open a checkpoint lazily: names, shapes and dtypes now, tensor bytes on demand.

    Args:
        path: a file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``, ``.ckpt``), a sharded
            checkpoint's ``*.index.json``, a model directory, a ``torch.distributed.checkpoint``
            directory (``.metadata`` + ``*.distcp``), a directory of Meta's tensor-parallel
            ``consolidated.00.pth``, ``consolidated.01.pth``, ... (keys ``consolidated.00/<key>``), Keras ``.keras`` / ``.weights.h5`` / legacy ``.h5``
            and Flax ``.msgpack`` files (kernels converted to torch's layout, see
            ``Source.conversions``), a Hugging Face repository
            ``"hf:org/name[@revision]"`` (from the local cache, needs ``huggingface_hub``),
            an open :class:`Source` (returned as is) or an in-memory state dict.
        format: force a reader by name (see :data:`READERS`) instead of sniffing the content.
        container: where the state dict sits inside a training checkpoint, as a dotted
            path (``"state_dict"``, ``"model_ema"``, ``"model.module"``). By default the
            weights are found by the rule in :func:`torchgraft.sources.containers.find_state_dict`.
        allow_globals: extra classes (objects or ``"module.Name"`` strings) that pickle-based
            files may contain, for trusted files only, e.g. ``["argparse.Namespace"]``.

    Returns:
        A read-only mapping ``name -> TensorRef``.

    Raises:
        CheckpointError: missing, unreadable, corrupt or unsupported input (an ``OSError``).
        UnsafeCheckpointError: a pickle that wants globals the safe loader refuses.

    Example:
        >>> import torchgraft as tg
        >>> src = tg.open("all-MiniLM-L6-v2/")
        >>> src.format, len(src), src["pooler.dense.weight"].shape
        ('safetensors', 104, (384, 384))
    """
    if isinstance(path, Source):
        return path
    if isinstance(path, Mapping):
        return Source.from_state_dict(path)
    if isinstance(path, str) and path.startswith("hf:"):  # a Hugging Face repo: hf:org/name[@revision]
        from ..hub import resolve_hub_path

        path = resolve_hub_path(path)
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(
            p,
            "no such file or directory",
            hint="check the path; for a Hugging Face model pass the local directory that holds config.json and the weights",
        )
    head, size = b"", 0
    if p.is_file():
        head, size = read_head(p)
    elif not p.is_dir():  # a FIFO or device would block or never end
        raise CheckpointError(p, "not a regular file or directory", hint="pass the checkpoint file itself")
    options = {"container": container, "allow_globals": allow_globals}
    if format is not None:
        reader = next((r for r in READERS if r.name == format), None)
        if reader is None:
            raise CheckpointError(p, f"unknown format {format!r}", hint=f"use one of {[r.name for r in READERS]}")
        return reader.open(p, **options)
    for reader in READERS:
        if reader.matches(p, head, size):
            return reader.open(p, **options)
    raise CheckpointError(
        p,
        f"not a checkpoint format torchgraft knows (first bytes: {head[:8]!r})",
        hint="supported: .safetensors, torch .bin/.pt/.pth/.ckpt (zip or legacy), *.index.json shards, "
        "model directories, torch.distributed.checkpoint folders, GGUF, ONNX, TensorFlow checkpoints "
        "(PREFIX.index + data), Keras .keras/.weights.h5/.h5 and Flax .msgpack files",
    )
