"""torch checkpoints (zip and legacy pickle) through ``torch.load(weights_only=True)``, never a plain unpickle."""

from __future__ import annotations

import contextlib
import importlib
import pickle
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, UnsafeCheckpointError
from .base import Source, TensorRef, dtype_name
from .containers import find_state_dict
from .pickle_scan import checkpoint_globals, refused_globals

__all__ = ["open_torch", "torch_format", "safe_torch_load"]

_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)")


def torch_format(path: Path) -> str:
    """``torch-zip`` when the file starts like a zip archive (even a truncated one), else ``torch-legacy``."""
    with open(path, "rb") as f:
        return "torch-zip" if f.read(4) == b"PK\x03\x04" else "torch-legacy"


def _resolve_global(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError:
        # nested qualname: "pkg.mod.Outer.Inner"
        mod_name, _, outer = module.rpartition(".")
        obj = getattr(importlib.import_module(mod_name), outer)
    return getattr(obj, attr)


@contextlib.contextmanager
def _allowed(allow_globals: Iterable[str | Any] | None) -> Iterator[None]:
    import torch.serialization as ts

    extra = [(_resolve_global(g) if isinstance(g, str) else g) for g in (allow_globals or ())]
    if not extra:
        yield
        return
    with ts.safe_globals(extra):
        yield


def safe_torch_load(path: Path, *, mmap: bool, allow_globals: Iterable[str | Any] | None = None) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with errors that say what to do.

    Raises:
        UnsafeCheckpointError: the pickle references globals outside torch's allow-list
            (nothing was executed; the globals are named).
        CheckpointError: the file is truncated, corrupt or not a torch checkpoint.
    """
    import torch

    fmt = torch_format(path)
    try:
        with _allowed(allow_globals):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "GLOBAL" in msg or "Unsupported" in msg:
            try:
                names = refused_globals(checkpoint_globals(path))
            except Exception:
                names = []
            names = names or _GLOBAL_IN_MESSAGE.findall(msg)
            if allow_globals:
                names = [n for n in names if n not in {str(g) for g in allow_globals}]
            raise UnsafeCheckpointError(path, names, format=fmt, detail=msg.splitlines()[-1] if msg else None) from None
        raise CheckpointError(path, f"the pickle is corrupt ({_first_line(msg)})", format=fmt, hint=_HINT_CORRUPT) from None
    except (RuntimeError, EOFError, ValueError, OSError, UnicodeDecodeError, AttributeError, IndexError, KeyError, TypeError, zipfile.BadZipFile) as e:
        raise CheckpointError(path, f"{type(e).__name__}: {_first_line(str(e))}", format=fmt, hint=_HINT_CORRUPT) from None


_HINT_CORRUPT = (
    "the file is truncated or damaged: download it again. If it is a TensorFlow or Flax checkpoint, "
    "convert it to PyTorch first (transformers: from_tf=True / from_flax=True)"
)


def _first_line(msg: str) -> str:
    return (msg.strip().splitlines() or ["no details"])[0][:300]


def _flatten(sd: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in sd.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and not hasattr(v, "shape"):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def open_torch(path: Path, *, container: str | None = None, allow_globals: Iterable[str | Any] | None = None, **_: Any) -> Source:
    """Open a ``.bin/.pt/.pth/.ckpt`` file: zip files memory-mapped, legacy pickles read once."""
    import torch

    fmt = torch_format(path)
    obj = safe_torch_load(path, mmap=fmt == "torch-zip", allow_globals=allow_globals)
    state_dict, chosen, candidates = find_state_dict(obj, container=container, path=str(path), format=fmt)
    entries: dict[str, TensorRef] = {}
    skipped: dict[str, str] = {}
    for key, value in _flatten(state_dict):
        if isinstance(value, torch.Tensor):
            entries[key] = TensorRef(key, tuple(value.shape), dtype_name(value.dtype), _const(value))
        else:
            skipped[key] = type(value).__name__
    meta = getattr(state_dict, "_metadata", None)
    return Source(
        entries,
        path=str(path),
        format=fmt,
        module_metadata=meta,
        container=chosen,
        containers=candidates,
        skipped=skipped,
    )


def _const(t: Any):
    return lambda: t
