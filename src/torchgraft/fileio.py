"""Atomic file writes: a temporary file (or folder) in the destination folder, then a rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "replace_dir"]


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
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
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
