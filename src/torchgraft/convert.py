"""Writing safetensors: one file or shards with an index, dtype casts, shared tensors, atomic writes.

``convert(src, dst)`` reads any checkpoint :func:`torchgraft.open` reads (or an in-memory state dict)
and writes it as safetensors. Nothing is half-written: every file goes to a temporary name in the
destination folder first and is renamed into place only when all of them are complete (the index
last), and an existing destination is never replaced unless ``force=True``.

Importing this module does not import torch; :func:`convert` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .sources.base import DTYPE_SIZES, Source

if TYPE_CHECKING:
    import torch

    from .plan import Plan

__all__ = ["DTYPE_ALIASES", "FLOAT_DTYPES", "ConvertResult", "convert", "destination_path", "parse_dtype", "parse_size"]

#: Spellings accepted for ``dtype=`` / ``--dtype``.
DTYPE_ALIASES: dict[str, str] = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "f16": "float16", "half": "float16", "float16": "float16",
    "fp32": "float32", "f32": "float32", "float": "float32", "float32": "float32",
    "fp64": "float64", "f64": "float64", "double": "float64", "float64": "float64",
}  # fmt: skip
#: Only these are cast by ``dtype=``; integer, bool, complex and float8 tensors keep theirs.
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)
_SHARD_NAME = re.compile(r"^(?P<stem>.+)-\d{5}-of-\d{5}\.safetensors$")
ALIASES_KEY = "torchgraft_aliases"
_INDEX_ONLY_KEYS = frozenset({"total_size", "total_parameters"})


def parse_dtype(value: str | Any | None) -> str | None:
    """``"bf16"`` / ``torch.bfloat16`` -> ``"bfloat16"``; ``None`` stays ``None``.

    Raises:
        ValueError: not a floating-point dtype torchgraft casts to.
    """
    if value is None:
        return None
    name = str(value).removeprefix("torch.").lower()
    if name not in DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {value!r}; use one of bf16, fp16, fp32, fp64")
    return DTYPE_ALIASES[name]


def parse_size(value: str | int | None) -> int | None:
    """``"2GB"`` -> ``2_000_000_000``, ``"500MiB"`` -> ``524288000``, ``1024`` -> ``1024``.

    Units: B, KB/MB/GB/TB (powers of 1000, as Hugging Face uses), KiB/MiB/GiB/TiB (powers of 1024).

    Raises:
        ValueError: not a positive size.
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ValueError(f"cannot read the size {value!r}; write e.g. 2GB, 500MB, 4GiB or a number of bytes")
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if size <= 0:
        raise ValueError(f"the shard size must be positive, got {value!r}")
    return size


@dataclass
class ConvertResult:
    """What :func:`convert` wrote.

    Attributes:
        files: the safetensors files written (one, or the shards in order).
        index: the ``*.index.json`` written for shards, else ``None``.
        tensors: how many tensors were written.
        bytes: total tensor bytes written.
        dtype: the dtype floating-point tensors were cast to, or ``None``.
        metadata: the safetensors header metadata written to every file.
        shared: names whose tensor shared memory with another name's; written as their own copy. With
            ``reverse=True`` it is empty: names sharing memory there are the plan's own doing (the
            pieces of one model tensor, such as unstacked experts; the copies of a replicated tensor).
        aliases: with ``dedupe_tied``: name left out -> the name it is identical to.
        skipped: non-tensor entries of the source that safetensors cannot hold (name -> type).
        removed: stale files of an earlier conversion to the same name, removed with ``force``.
    """

    source: str
    files: list[str]
    index: str | None
    tensors: int
    bytes: int
    dtype: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def convert(
    source: str | os.PathLike[str] | Source | Mapping[str, Any],
    dest: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int | None = None,
    force: bool = False,
    dedupe_tied: bool = False,
    metadata: Mapping[str, str] | None = None,
    container: str | None = None,
    allow_globals: Any = None,
    progress: Callable[[int, int], None] | None = None,
    plan: Plan | None = None,
    reverse: bool = False,
) -> ConvertResult:
    """Write a checkpoint (any format :func:`torchgraft.open` reads, or a state dict) as safetensors.

    Args:
        source: a path (file, ``*.index.json``, directory, ``hf:org/name``), an open
            :class:`~torchgraft.Source` or a state dict such as ``model.state_dict()``.
        dest: the ``.safetensors`` file to write, or a directory (``model.safetensors`` in it).
            Shards are named ``model-00001-of-00003.safetensors`` next to
            ``model.safetensors.index.json``, as Hugging Face names them.
        dtype: cast floating-point tensors (``"bf16"``, ``"fp16"``, ``torch.float32``...); integer
            and bool tensors keep their dtype.
        max_shard_size: split into shards of at most this many bytes (``"2GB"``, ``"500MiB"``,
            an int). A tensor larger than that gets a shard of its own. One shard is written
            as a single file without an index.
        force: replace existing files (and remove the stale index or shards of an earlier
            conversion to the same name). Without it an existing destination is an error.
        dedupe_tied: write a tensor that appears under several names (tied weights) once,
            under its first name, as ``safetensors.torch.save_model`` does; the names left out
            are listed in the header metadata (``torchgraft_aliases``). By default every name is
            written, each with its own copy of the data.
        metadata: extra header metadata (strings). The source's own metadata is kept, and
            ``format: pt`` is added when missing (``transformers`` expects it).
        container, allow_globals: as for :func:`torchgraft.open`.
        progress: called as ``progress(bytes_done, bytes_total)`` after each tensor.
        plan, reverse: with ``reverse=True``, ``source`` holds a model's tensors (``model.state_dict()``,
            or a file of them) and ``plan`` is the plan that loaded them: the plan runs backwards
            (:func:`torchgraft.transforms.reverse`) and the file is written in the checkpoint's names,
            layout and dtypes, so a checkpoint converted A -> B -> A comes back bit for bit.

    Returns:
        A :class:`ConvertResult` naming the files written.

    Raises:
        FileExistsError: a destination file exists and ``force`` is false (nothing written).
        PlanError: ``reverse=True`` and the plan cannot run backwards (an adapted entry, a slice
            that dropped rows) or does not fit ``source``.
        ValueError: ``reverse=True`` without ``plan`` (or ``plan`` without ``reverse``), an unknown ``dtype``, a bad ``max_shard_size``, a destination that is
            neither a directory nor a ``.safetensors`` file, or an in-memory sparse, meta or
            quantized tensor (safetensors holds dense values only).
        CheckpointError: the source cannot be read (nothing written).

    Example:
        >>> import torchgraft as tg
        >>> r = tg.convert("mobilenet_v2-b0353104.pth", "out/model.safetensors", max_shard_size="5MB")
        >>> r.files[0], r.index
        ('out/model-00001-of-00003.safetensors', 'out/model.safetensors.index.json')
    """
    from .sources import open as open_source

    if reverse != (plan is not None):
        raise ValueError("pass plan= together with reverse=True: the plan that loaded the tensors, run backwards")
    out_dtype = parse_dtype(dtype)
    shard_limit = parse_size(max_shard_size)
    dest = destination_path(dest)
    opened_here = not isinstance(source, (Source, Mapping))
    src = open_source(source, container=container, allow_globals=allow_globals) if opened_here else open_source(source)
    if plan is not None:
        from .transforms import reverse as run_backwards

        try:
            backwards = run_backwards(plan, {name: ref.load() for name, ref in src.items()})
        finally:
            if opened_here:
                src.close()
        opened_here, src = False, open_source(backwards)
    from .fileio import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():  # a kill -TERM removes the temporary files, as Ctrl-C does
            result = _convert(src, dest, out_dtype, shard_limit, force, dedupe_tied, metadata, progress)
    finally:
        if opened_here:
            src.close()
    if plan is not None:  # pieces of one model tensor, copies of a replicated one: shared by construction
        result.shared = {}
    return result


def _convert(
    src: Source,
    dest: Path,
    out_dtype: str | None,
    shard_limit: int | None,
    force: bool,
    dedupe_tied: bool,
    metadata: Mapping[str, str] | None,
    progress: Callable[[int, int], None] | None,
) -> ConvertResult:
    import torch
    from safetensors.torch import save_file

    from .fileio import atomic_path

    import time

    from .fileio import remove_stale_temps
    from .sources.torch_reader import unusable_tensor

    names = list(src)
    tensors_now = _preloaded(src)
    unusable = [f"{n!r} ({why})" for n, t in tensors_now.items() if (why := unusable_tensor(t))]
    if unusable:  # an in-memory state dict (files are refused when opened)
        raise ValueError(f"cannot write {', '.join(unusable[:5])} as safetensors: only dense tensors with values")
    # temporary files that a killed conversion to these names left behind (see torchgraft.fileio)
    stem = re.escape(dest.name.removesuffix(".safetensors"))
    ours = re.compile(rf"{stem}(?:-\d{{5}}-of-\d{{5}})?\.safetensors(?:\.index\.json)?")
    remove_stale_temps(dest.parent, ours, before=time.time())
    aliases, shared = _sharing(tensors_now) if tensors_now else ({}, {})
    if not dedupe_tied:
        aliases = {}
    keep = [n for n in names if n not in aliases]

    def final_dtype(name: str) -> str:
        d = src[name].dtype
        return out_dtype if out_dtype and d in FLOAT_DTYPES else d

    sizes = {n: int(src[n].numel * DTYPE_SIZES.get(final_dtype(n), 0)) for n in keep}
    shards = _split(keep, sizes, shard_limit)
    if len(shards) == 1:
        files, index_path = [dest], None
    else:
        stem = dest.name.removesuffix(".safetensors")
        files = [dest.with_name(f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors") for i in range(1, len(shards) + 1)]
        index_path = dest.with_name(dest.name + ".index.json")
    stale = _stale_files(dest, files, index_path)
    if not force:
        existing = [p for p in [*files, *([index_path] if index_path else []), *stale] if p.exists()]
        if existing:
            raise FileExistsError(f"{existing[0]} exists; pass --force (force=True) to replace it")

    # an index's own numbers (total_size) describe the old shards, not the new files
    header: dict[str, str] = {k: str(v) for k, v in src.metadata.items() if k not in _INDEX_ONLY_KEYS}
    header.update({str(k): str(v) for k, v in (metadata or {}).items()})
    header.setdefault("format", "pt")
    if aliases:
        header[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)

    total = sum(sizes.values())
    done = 0
    with contextlib.ExitStack() as stack:
        # entered first, renamed last: readers never see an index whose shards are not in place
        index_tmp = stack.enter_context(atomic_path(index_path, overwrite=force)) if index_path else None
        for shard_names, path in zip(shards, files):
            tmp = stack.enter_context(atomic_path(path, overwrite=force))
            batch: dict[str, torch.Tensor] = {}
            for name in shard_names:
                t = tensors_now[name] if tensors_now else src[name].load()
                target = getattr(torch, final_dtype(name))
                if t.dtype != target:
                    t = t.to(target)
                if name in shared:  # safetensors refuses tensors that share memory: give it its own copy
                    t = t.clone(memory_format=torch.contiguous_format)
                elif not t.is_contiguous():
                    t = t.contiguous()
                batch[name] = t
                done += sizes[name]
                if progress is not None:
                    progress(done, total)
            save_file(batch, str(tmp), metadata=header)
            del batch
        if index_tmp is not None:
            weight_map = {n: files[i].name for i, group in enumerate(shards) for n in group}
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            index_tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    removed = _remove_stale(stale, src) if force else []
    return ConvertResult(
        source=src.describe(),
        files=[str(p) for p in files],
        index=None if index_path is None else str(index_path),
        tensors=len(keep),
        bytes=total,
        dtype=out_dtype,
        metadata=header,
        shared={n: shared[n] for n in keep if n in shared},
        aliases=aliases,
        skipped=dict(src.skipped),
        removed=removed,
    )


def destination_path(dest: str | os.PathLike[str]) -> Path:
    """The file :func:`convert` writes (a directory, or a name ending in ``/``, means ``model.safetensors`` in it).

    Raises:
        ValueError: neither a directory nor a ``.safetensors`` file name.
    """
    raw = os.fspath(dest)
    path = Path(raw).expanduser()
    if path.is_dir() or raw.endswith(("/", os.sep)):
        return path / "model.safetensors"
    if not path.name.endswith(".safetensors") or path.name == ".safetensors":
        raise ValueError(f"the destination {raw!r} must be a directory or a file name ending in .safetensors")
    return path


def _preloaded(src: Source) -> dict[str, torch.Tensor]:
    """Tensors that are in memory (or mapped) already: torch files and state dicts, not safetensors."""
    if src.format in ("safetensors", "sharded-safetensors"):
        return {}
    return {name: ref.load() for name, ref in src.items()}


def _sharing(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, str], dict[str, str]]:
    """Names whose tensors share memory with an earlier name's.

    Returns:
        ``(aliases, shared)``: ``aliases`` the exact same view (tied weights), ``shared`` every
        later name in a storage group (exact aliases and partial views alike) -> the first name.
    """
    first_in_storage: dict[tuple[str, int], str] = {}
    aliases: dict[str, str] = {}
    shared: dict[str, str] = {}
    for name, t in tensors.items():
        storage = t.untyped_storage()
        if storage.nbytes() == 0 or t.device.type == "meta":
            continue
        key = (str(t.device), storage.data_ptr())
        owner = first_in_storage.setdefault(key, name)
        if owner == name:
            continue
        shared[name] = owner
        o = tensors[owner]
        if (o.data_ptr(), o.shape, o.stride(), o.dtype) == (t.data_ptr(), t.shape, t.stride(), t.dtype):
            aliases[name] = owner
    return aliases, shared


def _split(names: list[str], sizes: Mapping[str, int], limit: int | None) -> list[list[str]]:
    if limit is None or sum(sizes.values()) <= limit:
        return [names]
    shards: list[list[str]] = [[]]
    used = 0
    for n in names:
        if shards[-1] and used + sizes[n] > limit:
            shards.append([])
            used = 0
        shards[-1].append(n)
        used += sizes[n]
    return shards


def _stale_files(dest: Path, files: list[Path], index_path: Path | None) -> list[Path]:
    """Files of an earlier conversion to the same name that the new one would leave behind:
    the old index and its shards when a single file is written, the old single file and old
    shards when shards are written."""
    old_index = dest.with_name(dest.name + ".index.json")
    stale: list[Path] = []
    if index_path is None and old_index.is_file():
        stale.append(old_index)
    if old_index.is_file():
        stale += _index_shards(old_index, dest.name.removesuffix(".safetensors"))
    if index_path is not None and dest.is_file():
        stale.append(dest)
    return [p for p in dict.fromkeys(stale) if p not in files and p != index_path]


def _index_shards(index: Path, stem: str) -> list[Path]:
    """Shards named by an old index that follow our naming (``stem-00001-of-00003.safetensors``)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
    except (OSError, ValueError, AttributeError):
        return []
    out = []
    for shard in dict.fromkeys(weight_map.values() if isinstance(weight_map, dict) else ()):
        m = _SHARD_NAME.match(str(shard))
        if m and m.group("stem") == stem and "/" not in str(shard) and "\\" not in str(shard):
            out.append(index.with_name(str(shard)))
    return out


def _remove_stale(stale: list[Path], src: Source) -> list[str]:
    reading = {os.path.realpath(f) for f in src.files}
    removed = []
    for p in stale:
        if p.is_file() and os.path.realpath(p) not in reading:
            p.unlink()
            removed.append(str(p))
    return removed
