"""Atomic file writes: a temporary file (or folder) in the destination folder, then a rename.

A temporary file is named ``.<dest name>.<8 random characters>.tmp`` and is locked (``flock``)
while it is written. A process killed with SIGKILL cannot remove its own: the next write to
the same folder removes every such file that is unlocked and older than itself
(:func:`remove_stale_temps`). SIGTERM is handled like Ctrl-C where :func:`sigterm_as_interrupt` is used.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "remove_stale_temps", "replace_dir", "sigterm_as_interrupt"]

_TEMP_TAIL = r"\.[A-Za-z0-9_]{8}\.tmp"


def remove_stale_temps(folder: Path, name: str | re.Pattern[str], *, before: float) -> list[Path]:
    """Remove temporary files of earlier, interrupted writes of ``name`` in ``folder``; return them.

    Only files named as :func:`atomic_path` names its temporaries for ``name`` (a file name, or
    a pattern for several), last modified before ``before`` (a ``time.time()``), and not locked
    by a writer still running, are removed.
    """
    pattern = name.pattern if isinstance(name, re.Pattern) else re.escape(name)
    temp = re.compile(rf"\.(?:{pattern}){_TEMP_TAIL}")
    removed: list[Path] = []
    try:
        candidates = [p for p in folder.iterdir() if temp.fullmatch(p.name)]
    except OSError:
        return removed
    for path in candidates:
        with contextlib.suppress(OSError):
            info = path.lstat()
            if not path.is_file() or path.is_symlink() or info.st_mtime >= before:
                continue
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its writer still runs
                path.unlink()
                removed.append(path)
            finally:
                os.close(fd)
    return removed


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises ``KeyboardInterrupt`` while the block runs (main thread only): cleanup runs as for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it replaces ``dest`` in one rename.

    On any error the temporary file is removed and ``dest`` is untouched.

    Raises:
        FileExistsError: ``dest`` exists and ``overwrite`` is false.
    """
    dest = Path(dest)
    if not overwrite and dest.exists():
        raise FileExistsError(f"{dest} exists; pass force/overwrite to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest.parent, dest.name, before=time.time())
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    with contextlib.suppress(OSError, ImportError):
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)  # tells remove_stale_temps in other processes that this one is alive
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, _final_mode(dest))  # mkstemp makes 0600; give the file the mode a plain write would
        if not overwrite and dest.exists():
            raise FileExistsError(f"{dest} appeared while writing; refusing to replace it")
        os.replace(tmp_path, dest)
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def _final_mode(dest: Path) -> int:
    """The replaced file's mode, or 0666 minus the umask for a new file."""
    with contextlib.suppress(OSError):
        return dest.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(dest: str | os.PathLike[str], text: str, *, overwrite: bool = True) -> None:
    """Write ``text`` to ``dest`` atomically (UTF-8)."""
    with atomic_path(dest, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")


def replace_dir(new: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Move the finished folder ``new`` to ``dest``, replacing what is there; ``dest`` is never left missing.

    ``new`` must lie in ``dest``'s folder (one file system). An existing ``dest`` (a folder or a
    file) is renamed aside first, put back if the rename of ``new`` fails, and removed after.

    Example:
        >>> tmp = Path(tempfile.mkdtemp(prefix=".out.", dir="."))   # written completely...
        >>> replace_dir(tmp, "out")                                  # ...then swapped in
    """
    new, dest = Path(new), Path(dest)
    if not dest.exists():
        new.rename(dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    old.rmdir()
    dest.rename(old)
    try:
        new.rename(dest)
    except BaseException:
        old.rename(dest)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
