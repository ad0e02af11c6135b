"""List the globals a pickle refers to, by reading its opcodes (never executing it)."""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path

__all__ = ["pickle_globals", "checkpoint_globals", "refused_globals"]

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_MEMO_PUT = {"BINPUT", "LONG_BINPUT", "PUT"}
_MEMO_GET = {"BINGET", "LONG_BINGET", "GET"}


def pickle_globals(data: bytes, *, max_pickles: int = 8) -> list[str]:
    """Every ``module.name`` referenced by GLOBAL / STACK_GLOBAL / INST opcodes.

    Reads up to ``max_pickles`` consecutive pickles (legacy torch files hold several).
    Stops quietly at the first byte sequence that is not a pickle.
    """
    found: dict[str, None] = {}
    stream = io.BytesIO(data)
    for _ in range(max_pickles):
        if stream.tell() >= len(data):
            break
        memo: dict[int, object] = {}
        recent: list[object] = []  # values pushed, enough to resolve STACK_GLOBAL
        memo_idx = 0
        try:
            for op, arg, _pos in pickletools.genops(stream):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    module, _, attr = str(arg).partition(" ")
                    found[f"{module}.{attr}"] = None
                    recent.append(None)
                elif name == "STACK_GLOBAL":
                    if len(recent) >= 2 and isinstance(recent[-1], str) and isinstance(recent[-2], str):
                        found[f"{recent[-2]}.{recent[-1]}"] = None
                    else:
                        found["<unresolved STACK_GLOBAL>"] = None
                    recent.append(None)
                elif name in _STRING_OPS:
                    recent.append(arg if isinstance(arg, str) else str(arg))
                elif name in _MEMO_PUT:
                    memo[int(arg)] = recent[-1] if recent else None
                elif name == "MEMOIZE":
                    memo[memo_idx] = recent[-1] if recent else None
                    memo_idx += 1
                elif name in _MEMO_GET:
                    recent.append(memo.get(int(arg)))
                elif name == "STOP":
                    break
                else:
                    recent.append(None)
                del recent[:-4]
        except Exception:  # not (or no longer) a pickle: raw storage bytes follow in legacy files
            break
    return list(found)


def checkpoint_globals(path: str | Path) -> list[str]:
    """Globals referenced by a torch checkpoint: every ``*.pkl`` in a zip, or a legacy pickle stream."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        names: dict[str, None] = {}
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".pkl"):
                    for g in pickle_globals(zf.read(info)):
                        names[g] = None
        return list(names)
    with path.open("rb") as f:
        # the pickled part of a legacy file comes first; storages follow as raw bytes
        return pickle_globals(f.read(64 * 1024 * 1024))


def refused_globals(names: list[str]) -> list[str]:
    """The subset of ``names`` that torch's ``weights_only`` unpickler would refuse."""
    try:
        from torch import _weights_only_unpickler as w
        import torch.serialization as s

        allowed = set(w._get_allowed_globals())
        for obj in s.get_safe_globals():
            if isinstance(obj, tuple):
                allowed.add(obj[1])
            else:
                allowed.add(f"{obj.__module__}.{obj.__qualname__}")
    except Exception:  # private API moved: report everything, which errs on the safe side
        return list(names)
    return [n for n in names if n not in allowed]
