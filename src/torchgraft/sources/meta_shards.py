"""Meta's tensor-parallel checkpoints: a directory of ``consolidated.00.pth``, ``consolidated.01.pth``, ...

Meta's Llama code (fairscale's model parallelism) saves one file per model-parallel rank, every
file with the same keys: a column-parallel weight (``wq``, ``w1``, ``output``) holds its rank's
rows, a row-parallel one (``wo``, ``w2``) its columns, and 1-D norms are replicated. The directory
opens as ONE :class:`~torchgraft.sources.base.Source` whose keys are qualified by each file's stem,
``consolidated.00/layers.0.attention.wq.weight``, so that a recipe can merge the pieces with
``concat`` and ``same`` (``torchgraft.recipes``, ``"meta-llama-to-hf-llama"``). Each file is read
by the torch reader (memory-mapped, ``weights_only``); nothing is merged or copied here.

A directory claims this reader when it holds two or more ``consolidated.NN.pth`` files and none of
the Hugging Face weight files; a single ``consolidated.00.pth`` opens as the plain file it is
(its keys unqualified), as before. ``format="meta-shards"`` opens even one file this way.
``params.json`` (optional) is read into ``Source.metadata``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..messages import first_line
from .base import Source, TensorRef
from .directory import WEIGHT_FILES, _open_shards

__all__ = ["FORMAT", "SHARD_NAME", "MetaShardsSource", "looks_like_meta_shards", "open_meta_shards"]

#: The reader's name in :data:`torchgraft.sources.READERS` and the opened Source's ``format``.
FORMAT = "meta-shards"
#: A tensor-parallel shard's file name; the number is the model-parallel rank.
SHARD_NAME = re.compile(r"consolidated\.(\d{1,4})\.pth")
#: ``params.json`` holds a dozen numbers; anything larger is not Meta's.
MAX_PARAMS_BYTES = 1 << 20
#: How many differing keys an error lists.
_SHOWN = 5


class MetaShardsSource(Source):
    """A :class:`Source` over Meta's shards; a plan that leaves model entries missing says how to merge them."""

    def plan_notes(self, missing: list[str]) -> list[str]:
        if not missing:
            return []
        heads = self.metadata.get("n_heads", "N_HEADS")
        params = {"n_heads": heads, "n_kv_heads": self.metadata.get("n_kv_heads", heads), "n_shards": len(self.files)}
        args = ", ".join(f"{k}={v}" for k, v in params.items())
        return [
            f"{self.path} holds Meta's tensor-parallel shards ({len(self.files)} files, keys 'consolidated.NN/...'): "
            "each weight is split across them or replicated in each, so no single entry has the model's shape. "
            f"Merge them with a recipe, e.g. for transformers' Llama: rules=tg.recipe('meta-llama-to-hf-llama', {args})"
        ]


def _shard_files(path: Path) -> list[tuple[int, Path]]:
    """``(rank, file)`` for every ``consolidated.NN.pth`` in ``path``, by name (not yet checked)."""
    found = []
    for child in path.iterdir():
        m = SHARD_NAME.fullmatch(child.name)
        if m:
            found.append((int(m.group(1)), child))
    return sorted(found, key=lambda rf: (rf[0], rf[1].name))


def looks_like_meta_shards(path: Path) -> bool:
    """A directory with two or more ``consolidated.NN.pth`` files and no Hugging Face weight file."""
    if not path.is_dir():
        return False
    try:
        if any((path / name).exists() for name in WEIGHT_FILES):
            return False
        return len(_shard_files(path)) >= 2
    except OSError:  # unreadable: the directory reader says why
        return False


def _read_params(path: Path) -> dict[str, str]:
    """``params.json`` as string metadata (``{"dim": "4096", "n_heads": "32", ...}``), or ``{}`` when absent."""
    params = path / "params.json"
    if not params.exists():
        return {}

    def bad(reason: str) -> CheckpointError:
        return CheckpointError(
            params, reason, format=FORMAT, hint="params.json is optional: fix it, or move it out of the directory"
        )

    try:
        if not params.is_file():
            raise bad("not a regular file")
        if params.stat().st_size > MAX_PARAMS_BYTES:
            raise bad(f"{params.stat().st_size} bytes, more than the {MAX_PARAMS_BYTES} a params.json needs")
        data = json.loads(params.read_bytes().decode("utf-8"))
    except CheckpointError:
        raise
    except OSError as e:
        raise bad(f"cannot read it ({e.strerror or e})") from None
    except RecursionError:
        raise bad("not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise bad(f"not valid JSON ({first_line(e, 200)})") from None
    if not isinstance(data, dict):
        raise bad(f"a JSON {type(data).__name__}, not an object of model settings")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}


def _check_ranks(path: Path, shards: list[tuple[int, Path]]) -> None:
    """Ranks 0..N-1, each once, each a regular file."""

    def bad(reason: str, hint: str) -> CheckpointError:
        return CheckpointError(path, reason, format=FORMAT, hint=hint)

    if not shards:
        raise bad("no consolidated.NN.pth files in the directory", "pass a directory of Meta's consolidated.*.pth")
    seen: dict[int, str] = {}
    for rank, file in shards:
        if rank in seen:
            raise bad(
                f"{seen[rank]} and {file.name} are both rank {rank}",
                "keep one file per model-parallel rank: consolidated.00.pth, consolidated.01.pth, ...",
            )
        seen[rank] = file.name
        if not file.is_file():
            raise bad(f"{file.name} is not a regular file", "each shard must be a torch checkpoint file")
    missing = [r for r in range(max(seen) + 1) if r not in seen]
    if missing:
        width = len(shards[0][1].name.split(".")[1])
        names = ", ".join(f"consolidated.{r:0{width}d}.pth" for r in missing[:_SHOWN])
        raise bad(
            f"the shards are ranks {sorted(seen)}, but {names} {'is' if len(missing) == 1 else 'are'} missing",
            "download every shard: a tensor-parallel checkpoint needs all of them",
        )


def _differences(path: Path, opened: dict[str, Source]) -> list[str]:
    """What differs between the shards' keys, shapes and dtypes (each shard holds every key, same shape)."""
    names = list(opened)
    first_name, first = names[0], opened[names[0]]
    problems = []
    for name in names[1:]:
        src = opened[name]
        only_first = [k for k in first if k not in src]
        only_here = [k for k in src if k not in first]
        for keys, holder, lacker in ((only_first, first_name, name), (only_here, name, first_name)):
            if keys:
                shown = ", ".join(repr(k) for k in keys[:_SHOWN]) + (" ..." if len(keys) > _SHOWN else "")
                problems.append(f"{len(keys)} key(s) in {holder} but not in {lacker}: {shown}")
        unlike = [
            f"{k!r} ({list(first[k].shape)} {first[k].dtype} vs {list(src[k].shape)} {src[k].dtype})"
            for k in first
            if k in src and (first[k].shape != src[k].shape or first[k].dtype != src[k].dtype)
        ]
        if unlike:
            shown = ", ".join(unlike[:_SHOWN]) + (" ..." if len(unlike) > _SHOWN else "")
            problems.append(f"{len(unlike)} key(s) differ in shape or dtype between {first_name} and {name}: {shown}")
    return problems


def open_meta_shards(path: Path, **options: Any) -> Source:
    """Open Meta's tensor-parallel shards as one Source with keys ``consolidated.NN/<key>``.

    Args:
        path: the directory that holds ``consolidated.00.pth``, ``consolidated.01.pth``, ...
        options: ``container`` and ``allow_globals``, as :func:`torchgraft.open` takes them, for each file.

    Returns:
        A lazy Source (each file memory-mapped by the torch reader); ``files`` lists the shards in rank
        order, ``metadata`` holds ``params.json``'s settings (JSON-encoded where not strings).

    Raises:
        CheckpointError: a shard is missing, duplicated or unreadable, the shards hold different keys,
            shapes or dtypes, or ``params.json`` is damaged.

    Example:
        >>> src = tg.open("llama-2-13b/")            # consolidated.00.pth, consolidated.01.pth, params.json
        >>> src.format, src["consolidated.01/layers.0.attention.wq.weight"].shape
        ('meta-shards', (2560, 5120))
    """
    try:
        shards = _shard_files(path)
    except OSError as e:
        raise CheckpointError(path, f"cannot list the directory ({e.strerror or e})", format=FORMAT) from None
    _check_ranks(path, shards)
    metadata = _read_params(path)
    by_stem = {file.name.removesuffix(".pth"): file for _, file in shards}
    opened = _open_shards(by_stem, options)
    try:
        problems = _differences(path, opened)
        if problems:
            raise CheckpointError(
                path,
                "the tensor-parallel shards do not match: " + "; ".join(problems),
                format=FORMAT,
                hint="every consolidated.NN.pth of one checkpoint holds the same keys with the same shapes: "
                "download the shards of one model again, all from the same release",
            )
    except BaseException:
        for s in opened.values():
            s.close()
        raise
    entries: dict[str, TensorRef] = {}
    skipped: dict[str, str] = {}
    extra_state: dict[str, Any] = {}
    module_metadata: dict[str, dict[str, Any]] = {}
    for stem, src in opened.items():
        for key, ref in src.items():
            name = f"{stem}/{key}"
            entries[name] = TensorRef(name, ref.shape, ref.dtype, ref.load, file=ref.file)
        skipped.update({f"{stem}/{k}": v for k, v in src.skipped.items()})
        extra_state.update({f"{stem}/{k}": v for k, v in src.extra_state.items()})
        module_metadata.update({f"{stem}/{k}" if k else stem: v for k, v in src.module_metadata.items()})
        metadata.update({k: v for k, v in src.metadata.items() if k not in metadata})

    def close() -> None:
        for s in opened.values():
            s.close()

    return MetaShardsSource(
        entries,
        path=str(path),
        format=FORMAT,
        metadata=metadata,
        module_metadata=module_metadata,
        skipped=skipped,
        files=[str(f) for f in by_stem.values()],
        closer=close,
        extra_state=extra_state,
        container=next(iter(opened.values())).container,
    )
