"""Exceptions raised by torchgraft.

Every error names the file or key it is about and says what to try next.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from .dangers import dangerous_globals

__all__ = [
    "AdapterError",
    "CheckpointError",
    "LoadError",
    "PlanError",
    "UnsafeCheckpointError",
]


class CheckpointError(OSError):
    """A checkpoint could not be read: missing, corrupt, unsupported or unsafe.

    A subclass of :class:`OSError`, like the error ``from_pretrained`` raises, so
    existing ``except OSError`` handlers keep working.

    Attributes:
        path: the file or directory the error is about.
        format: the format it was read as (``"safetensors"``, ``"torch-zip"``, ...), or ``None``.
        reason: what went wrong, in one sentence.
        hint: what to try next.
    """

    def __init__(
        self,
        path: str | Path | None,
        reason: str,
        *,
        format: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.format = format
        self.reason = reason
        self.hint = hint
        where = f"'{self.path}'" if self.path else "checkpoint"
        as_fmt = f" (read as {format})" if format else ""
        msg = f"Cannot load {where}{as_fmt}: {reason}"
        if hint:
            msg += f"\n  Try: {hint}"
        super().__init__(msg)

    def __reduce__(self):  # keep pickling (multiprocessing) working with keyword args
        return (_rebuild_checkpoint_error, (type(self), self.path, self.reason, self.format, self.hint))


def _rebuild_checkpoint_error(cls, path, reason, format, hint):
    return cls(path, reason, format=format, hint=hint)


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based checkpoint references globals the safe loader refuses.

    Nothing from the file was executed. ``globals`` lists what it wanted
    (``"posix.system"``, ``"argparse.Namespace"``, ...).
    """

    def __init__(
        self,
        path: str | Path | None,
        globals: Sequence[str],
        *,
        format: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.globals = list(globals)
        #: those of ``globals`` that run code or commands: the file is hostile, never allow-list them
        self.dangerous = dangerous_globals(self.globals)
        names = ", ".join(self.globals) if self.globals else "unknown globals"
        reason = f"the file is a pickle that references globals the safe loader refuses: {names}"
        if detail and not self.globals:
            reason += f" ({detail})"
        if self.dangerous:
            hint = (
                f"nothing in it was executed. {', '.join(self.dangerous)} would run code or commands: treat the file "
                "as malicious and do not load it any other way (never allow-list these)"
            )
        else:
            hint = (
                "nothing in it was executed. If you trust the file and these are plain data classes, "
                "pass them in allow_globals=[...]; otherwise convert it to safetensors with a trusted tool"
            )
        super().__init__(path, reason, format=format, hint=hint)

    def __reduce__(self):
        return (_rebuild_unsafe_error, (type(self), self.path, self.globals, self.format))


def _rebuild_unsafe_error(cls, path, globals, format):
    return cls(path, globals, format=format)


class LoadError(RuntimeError):
    """Loading into a model failed; the model is left exactly as it was.

    ``problems`` holds one line per problem (a missing key, an unexpected key, a
    shape mismatch, an error from a module's own loading hook).
    """

    def __init__(self, title: str, problems: Iterable[str]) -> None:
        self.title = title
        self.problems = list(problems)
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{title}\n{body}" if body else title)

    def __reduce__(self):  # picklable across processes (torch.distributed sends errors between ranks)
        return (type(self), (self.title, self.problems))


class PlanError(ValueError):
    """A plan cannot be built or does not fit the model and checkpoint it is used with."""


class AdapterError(ValueError):
    """An adapter cannot turn the source tensor into the target's shape."""
