"""Directories (Hugging Face layout) and sharded checkpoints with an ``*.index.json``."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import CheckpointError
from ..messages import first_line
from ..messages import short_repr as _r
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
    try:
        children = sorted(path.iterdir())
    except OSError as e:
        raise CheckpointError(path, f"cannot list the directory ({e.strerror or e})", format="directory") from None
    loose = [p for p in children if p.suffix in _LOOSE_SUFFIXES and p.is_file()]
    if len(loose) == 1:
        return open_source(loose[0], **options)
    listing = ", ".join(p.name for p in children[:15]) or "nothing"
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


#: An index lists names and file names; even the largest models need a few megabytes.
MAX_INDEX_BYTES = 64 * 1024 * 1024


def _hf_blobs(root: Path) -> Path | None:
    """``<repo>/blobs`` when ``root`` lies in a Hugging Face cache snapshot (``<repo>/snapshots/<rev>/...``)."""
    for folder in (root, *root.parents):
        if folder.parent.name == "snapshots":
            blobs = folder.parent.parent / "blobs"
            if blobs.is_dir() and not blobs.is_symlink():
                return blobs
            return None
    return None


def _confined_shard(index: Path, root: Path, shard: str, bad) -> Path:
    """The file a shard name points at, refusing anything outside the index's directory."""
    outside = "refusing to read files outside the checkpoint directory"
    if not shard or "\0" in shard:
        raise bad(f"shard name {_r(shard)} is not a file name")
    name = PurePosixPath(shard.replace("\\", "/"))
    if name.is_absolute() or Path(shard).is_absolute() or ".." in name.parts:
        raise bad(f"shard {_r(shard)} lies outside {root}", hint=outside)
    try:
        target = (index.parent / shard).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loops, names the OS refuses
        raise bad(f"shard {_r(shard)} cannot be resolved ({first_line(e, 200)})") from None
    if not target.is_relative_to(root):
        blobs = _hf_blobs(root)
        if blobs is None or not target.is_relative_to(blobs):
            raise bad(f"shard {_r(shard)} lies outside {root} (a symlink leads to {target})", hint=outside)
    if not target.exists():
        raise bad(f"shard {_r(shard)} named by the index does not exist", hint="download the missing shard")
    if not target.is_file():
        raise bad(f"shard {_r(shard)} named by the index is not a regular file")
    if target.name.endswith(".index.json"):
        raise bad(f"shard {_r(shard)} is itself an index; shards must be weight files")
    return target


#: Readers that open folders or lists of files: a shard is never read through them (no recursion).
_NOT_SHARD_READERS = frozenset({"directory", "index", "dcp", "meta-shards"})


def _open_shard(target: Path, options: dict[str, Any]) -> Source:
    """Open one shard with a single-file reader, chosen by content like :func:`torchgraft.open`."""
    from . import READERS, read_head

    head, size = read_head(target)
    for reader in READERS:
        if reader.name not in _NOT_SHARD_READERS and reader.matches(target, head, size):
            return reader.open(target, **options)
    raise CheckpointError(
        target,
        f"not a safetensors file or a torch checkpoint (first bytes: {head[:8]!r})",
        hint="a shard named by an index must be a weights file; download it again",
    )


#: Threads that open legacy-pickle shards at once. Measured with benchmarks/shards.py (bert-large,
#: 4 shards, median of 5): legacy pickles, read at open, 1.15x faster with 2 threads when each file
#: was read on one thread; 1.06x now that each file's records are read by its own threads
#: (legacy_reader); safetensors and torch zip shards, only mapped at open, 0.93-0.98x: they are
#: opened one by one.
SHARD_WORKERS = 2


def _reads_whole_file(path: Path) -> bool:
    """Legacy torch pickles (not zip, not safetensors) are read completely when opened."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _open_shards(shards: dict[str, Path], options: dict[str, Any]) -> dict[str, Source]:
    """Open every shard (in parallel threads when it helps); on any failure close the rest and raise the first."""
    # allow_globals enters torch's process-wide safe_globals context: keep those loads one at a time
    if (
        SHARD_WORKERS <= 1
        or len(shards) < 2
        or options.get("allow_globals")
        or not any(_reads_whole_file(p) for p in shards.values())
    ):
        opened: dict[str, Source] = {}
        try:
            for shard, target in shards.items():
                opened[shard] = _open_shard(target, options)
        except BaseException:
            for s in opened.values():
                s.close()
            raise
        return opened
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=SHARD_WORKERS, thread_name_prefix="torchgraft-shard") as pool:
        futures = {shard: pool.submit(_open_shard, target, options) for shard, target in shards.items()}
    done = {shard: f for shard, f in futures.items() if f.exception() is None}
    failed = next((f.exception() for f in futures.values() if f.exception() is not None), None)
    if failed is not None:
        for f in done.values():
            f.result().close()
        raise failed
    return {shard: f.result() for shard, f in futures.items()}


def open_index(path: Path, **options: Any) -> Source:
    """Open a sharded checkpoint from its ``*.index.json`` (``weight_map``: tensor name -> shard file).

    Shard names must stay inside the index's directory: absolute paths, ``..``, and
    symlinks that lead out are refused (except into the ``blobs/`` folder of a Hugging Face
    cache, where a snapshot's files are symlinks). A shard is always a weights file, never
    another index or a directory.
    """
    fmt = "sharded-safetensors" if ".safetensors" in path.name else "sharded-torch"

    def bad(reason: str, hint: str = "the index is damaged; download it again") -> CheckpointError:
        return CheckpointError(path, reason, format=fmt, hint=hint)

    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise bad(f"the index is {path.stat().st_size} bytes, more than the {MAX_INDEX_BYTES} an index needs")
        index = json.loads(path.read_bytes().decode("utf-8"))
    except CheckpointError:
        raise
    except OSError as e:
        raise bad(f"cannot read the index ({e.strerror or e})", hint="check that the path is a readable file") from None
    except RecursionError:
        raise bad("the index is not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, integers with too many digits
        raise bad(f"the index is not valid JSON ({first_line(e, 200)})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise bad("the index has no 'weight_map' object mapping tensor names to shard files")
    root = path.parent.resolve()
    shards: dict[str, Path] = {}
    for shard in dict.fromkeys(weight_map.values()):
        shards[shard] = _confined_shard(path, root, shard, bad)
    opened: dict[str, Source] = {}
    try:
        opened.update(_open_shards(shards, options))
        entries = {}
        for name, shard in weight_map.items():
            src = opened[shard]
            if name not in src:
                raise bad(f"the index puts {_r(name)} in {_r(shard)}, but that shard does not hold it")
            entries[name] = src[name]
    except BaseException:
        for s in opened.values():
            s.close()
        raise
    module_metadata: dict[str, Any] = {}
    metadata: dict[str, str] = {}
    extra_state: dict[str, Any] = {}
    for src in opened.values():
        module_metadata.update(src.module_metadata)
        metadata.update(src.metadata)
        extra_state.update(src.extra_state)
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
        extra_state=extra_state,
    )
