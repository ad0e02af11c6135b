"""Directories (Hugging Face layout) and sharded checkpoints with an ``*.index.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .base import Source

__all__ = ["WEIGHT_FILES", "open_directory", "open_index"]

#: What a directory is searched for, in order: the first one present is opened.
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
)
_LOOSE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def open_directory(path: Path, **options: Any) -> Source:
    """Open the weights of a model directory (``model.safetensors``, ``pytorch_model.bin``, shards...)."""
    from . import open as open_source

    for name in WEIGHT_FILES:
        candidate = path / name
        if candidate.is_file():
            return open_source(candidate, **options)
    loose = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _LOOSE_SUFFIXES)
    if len(loose) == 1:
        return open_source(loose[0], **options)
    listing = ", ".join(sorted(p.name for p in path.iterdir())[:15]) or "nothing"
    if loose:
        raise CheckpointError(
            path,
            f"the directory holds several weight files ({', '.join(p.name for p in loose)}) and no index",
            format="directory",
            hint="pass the file you mean, or add a *.index.json that lists the shards",
        )
    raise CheckpointError(
        path,
        f"no weights found; the directory holds {listing}",
        format="directory",
        hint=f"expected one of {', '.join(WEIGHT_FILES[:4])}; if the weights are TensorFlow (tf_model.h5) or Flax, "
        "convert them with transformers (from_tf=True) first",
    )


def open_index(path: Path, **options: Any) -> Source:
    """Open a sharded checkpoint from its ``*.index.json`` (``weight_map``: tensor name -> shard file).

    Shard names must stay inside the index's directory: absolute paths, ``..`` and
    symlinks that lead out are refused.
    """
    from . import open as open_source

    fmt = "sharded-safetensors" if ".safetensors" in path.name else "sharded-torch"

    def bad(reason: str, hint: str = "the index is damaged; download it again") -> CheckpointError:
        return CheckpointError(path, reason, format=fmt, hint=hint)

    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the index is not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise bad("the index has no 'weight_map' object mapping tensor names to shard files")
    root = path.parent.resolve()
    shards: dict[str, Path] = {}
    for shard in dict.fromkeys(weight_map.values()):
        target = (path.parent / shard).resolve()
        if Path(shard).is_absolute() or not target.is_relative_to(root):
            raise bad(f"shard {shard!r} lies outside {root}", hint="refusing to read files outside the checkpoint directory")
        if not target.is_file():
            raise bad(f"shard {shard!r} named by the index does not exist", hint="download the missing shard")
        shards[shard] = target
    opened: dict[str, Source] = {}
    try:
        for shard, target in shards.items():
            opened[shard] = open_source(target, **options)
    except BaseException:
        for s in opened.values():
            s.close()
        raise
    entries = {}
    for name, shard in weight_map.items():
        src = opened[shard]
        if name not in src:
            raise bad(f"the index puts {name!r} in {shard!r}, but that shard does not hold it")
        entries[name] = src[name]
    module_metadata: dict[str, Any] = {}
    metadata: dict[str, str] = {}
    for src in opened.values():
        module_metadata.update(src.module_metadata)
        metadata.update(src.metadata)
    meta = index.get("metadata")
    if isinstance(meta, dict):
        metadata.update({k: str(v) for k, v in meta.items()})

    def close() -> None:
        for s in opened.values():
            s.close()

    return Source(
        entries,
        path=str(path),
        format=fmt,
        metadata=metadata,
        module_metadata=module_metadata,
        files=[str(t) for t in shards.values()],
        closer=close,
    )
