"""A safety report for checkpoint files: which globals their pickles reference, which the safe loader refuses.

Nothing is executed and nothing is unpickled: pickles are streamed opcode by opcode, whatever their size
(:mod:`torchgraft.sources.pickle_scan`, built on :mod:`pickletools`), and each global is checked
against torch's own ``weights_only`` allow-list (plus anything registered with
``torch.serialization.add_safe_globals``). A file is ``unsafe`` when the safe loader would refuse
at least one of its globals; loading it any other way could run code.

Importing this module does not import torch; scanning a pickle does (for the allow-list).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .dangers import danger_of as _danger_of
from .errors import CheckpointError
from .sources.pickle_scan import refused_globals, scan_pickles
from .sources.safetensors_reader import looks_like_safetensors, read_header

__all__ = ["FileScan", "ScanReport", "danger_of", "scan"]

_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".safetensors", ".tar", ".onnx", ".index", ".gguf")
_WEIGHT_SUFFIXES += (".h5", ".keras", ".msgpack")  # Keras and Flax weights
_PICKLE_PROTO = b"\x80"
_PICKLE_V0_STARTS = b"(c]}"  # protocol 0/1 pickles start with MARK, GLOBAL, EMPTY_LIST or EMPTY_DICT
_MAX_INDEX_BYTES = 100_000_000


def danger_of(name: str) -> str:
    """What a global can do when unpickled, or ``""`` when nothing is known (a hint, not the verdict)."""
    return _danger_of(name)


@dataclass
class FileScan:
    """One scanned file.

    Attributes:
        path: the file.
        format: ``safetensors``, ``torch-zip``, ``torch-legacy`` or ``pickle``.
        globals: every ``module.name`` its pickles reference, in order of appearance.
        refused: those torch's ``weights_only`` unpickler would refuse.
        members: for zip archives: pickle member -> its globals.
        note: anything else worth knowing.
    """

    path: str
    format: str
    globals: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    members: dict[str, list[str]] = field(default_factory=dict)
    note: str = ""

    @property
    def safe(self) -> bool:
        return not self.refused


@dataclass
class ScanReport:
    """What :func:`scan` found. ``verdict`` is ``"safe"`` or ``"unsafe"``; ``str()`` is a readable report.

    Example:
        >>> report = tg.scan("downloaded.ckpt")
        >>> report.verdict, report.refused
        ('unsafe', ['posix.system'])
    """

    path: str
    files: list[FileScan]

    @property
    def globals(self) -> list[str]:
        return list(dict.fromkeys(g for f in self.files for g in f.globals))

    @property
    def refused(self) -> list[str]:
        return list(dict.fromkeys(g for f in self.files for g in f.refused))

    @property
    def safe(self) -> bool:
        return not self.refused

    @property
    def verdict(self) -> Literal["safe", "unsafe"]:
        return "safe" if self.safe else "unsafe"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "verdict": self.verdict,
            "globals": self.globals,
            "refused": self.refused,
            "dangerous": {g: danger_of(g) for g in self.refused if danger_of(g)},
            "files": [asdict(f) for f in self.files],
        }

    def __rich__(self):
        return _renderable(self)

    def __str__(self) -> str:
        from .report import render_text

        return render_text(self)


def scan(path: str | os.PathLike[str]) -> ScanReport:
    """Report which globals a checkpoint's pickles reference and whether the safe loader accepts them.

    Never unpickles anything. Safetensors files hold no code and are only checked for a valid header.

    Args:
        path: a file (``.bin .pt .pth .ckpt .pkl .safetensors``), a sharded checkpoint's
            ``*.index.json`` (every shard), a directory (every weight file in it, recursively),
            or ``hf:org/name[@revision]``.

    Returns:
        A :class:`ScanReport`.

    Raises:
        CheckpointError: the path does not exist, holds no weight files, or a file is neither a
            pickle, a torch zip nor a valid safetensors file.

    Example:
        >>> tg.scan("mobilenet_v2-b0353104.pth").verdict
        'safe'
    """
    from .hub import local_path

    root = local_path(path)
    try:
        return ScanReport(str(root), [_scan_file(f) for f in _files_to_scan(root)])
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a symlink loop, an unreadable file, a zip feature Python lacks...
        text = (str(e).strip().splitlines() or ["no details"])[0][:300]
        raise CheckpointError(
            root, f"cannot scan it ({type(e).__name__}: {text})", hint="scan only reads regular files it can parse"
        ) from None


def _files_to_scan(root: Path) -> list[Path]:
    """Every file a loader could read for ``root``: weight files, and every shard an index names."""
    if not root.exists():
        raise CheckpointError(root, "no such file or directory", hint="check the path")
    if root.is_dir():
        found = [p for p in root.rglob("*") if p.is_file()]
        files = {p: None for p in found if p.name.endswith(_WEIGHT_SUFFIXES)}
        for index in (p for p in found if p.name.endswith(".index.json")):
            files.update(dict.fromkeys(_index_shards(index)))  # shards need no weight suffix to be loaded
        if not files:
            raise CheckpointError(
                root,
                "no weight files found to scan",
                format="directory",
                hint=f"expected files ending in {', '.join(_WEIGHT_SUFFIXES)}",
            )
        return sorted(files)
    if not root.is_file():  # a FIFO or a device would block or never end
        raise CheckpointError(root, "not a regular file or directory", hint="pass the checkpoint file itself")
    if root.name.endswith(".index.json"):
        return _index_shards(root)
    return [root]


def _index_shards(index: Path) -> list[Path]:
    try:
        with index.open("rb") as f:
            text = f.read(_MAX_INDEX_BYTES + 1)
        if len(text) > _MAX_INDEX_BYTES:
            raise ValueError(f"more than {_MAX_INDEX_BYTES} bytes")
        weight_map = json.loads(text)["weight_map"]
        shards = list(dict.fromkeys(str(v) for v in weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise CheckpointError(
            index, f"not a valid index ({e})", format="index", hint="the index is damaged; download it again"
        ) from None
    root = index.parent.resolve()
    out = []
    for shard in shards:
        p = (index.parent / shard).resolve()
        if Path(shard).is_absolute() or not p.is_relative_to(root):
            raise CheckpointError(
                index,
                f"shard {shard!r} lies outside {root}",
                format="index",
                hint="refusing to read files outside the checkpoint directory",
            )
        if not p.is_file():
            raise CheckpointError(
                index,
                f"shard {shard!r} named by the index does not exist or is not a regular file",
                format="index",
                hint="download the missing shard",
            )
        out.append(p)
    return out


def _scan_file(path: Path) -> FileScan:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(16)
    if size == 0:
        raise CheckpointError(path, "the file is empty", hint="the download or save was interrupted: fetch it again")
    if (scan_format := next((f for sfx, f in _DATA_FORMATS.items() if path.name.endswith(sfx)), None)) is not None:
        return scan_format(path)
    if looks_like_safetensors(head, size):
        tensors, _meta, _ = read_header(path)
        return FileScan(str(path), "safetensors", note=f"{len(tensors)} tensors; safetensors holds no code")
    from .sources import flax_reader, keras_reader  # Keras and Flax files hold data; a Keras config may name code

    if keras_reader.looks_like_hdf5(head) or keras_reader.looks_like_keras_zip(path, head):
        fmt, note = keras_reader.keras_scan_note(path)
        return FileScan(str(path), fmt, note=note)
    if flax_reader.looks_like_flax_msgpack(path, head):
        fmt, note = flax_reader.flax_scan_note(path)
        return FileScan(str(path), fmt, note=note)
    if head[:4] == b"PK\x03\x04":
        return _scan_zip(path, size)
    if head[:1] == _PICKLE_PROTO or (head[:1] and head[:1] in _PICKLE_V0_STARTS):
        with path.open("rb") as f:
            scanned = scan_pickles(f)  # every pickle in the file, streamed; raw storage bytes end the scan
        found = scanned.globals
        fmt = "torch-legacy" if head[:1] == _PICKLE_PROTO and _is_torch_legacy_file(path) else "pickle"
        refused = refused_globals(found) if found else []
        return FileScan(str(path), fmt, found, refused, note="; ".join(scanned.problems))
    if head[:4] == b"GGUF":  # llama.cpp: tensors and key/values, nothing that runs
        from .sources.gguf_reader import scan_gguf

        return FileScan(str(path), "gguf", note=scan_gguf(path))
    raise CheckpointError(
        path,
        f"not a pickle, a torch zip or a safetensors file (first bytes: {head[:8]!r})",
        hint="scan checks .bin/.pt/.pth/.ckpt/.pkl and .safetensors files",
    )


def _scan_zip(path: Path, size: int) -> FileScan:
    from .sources.torch_reader import check_zip_directory

    def bad(reason: str) -> CheckpointError:
        return CheckpointError(path, reason, format="torch-zip", hint="download the file again")

    members: dict[str, list[str]] = {}
    notes: list[str] = []
    try:
        with zipfile.ZipFile(path) as zf:
            # the same limits as opening it (duplicate or case-colliding names, zip bombs, encryption)
            for info in check_zip_directory(zf, size, bad):
                if not info.filename.casefold().endswith(".pkl"):
                    continue
                with zf.open(info) as f:
                    scanned = scan_pickles(f, max_pickles=1)
                members[info.filename] = scanned.globals
                notes.extend(f"{info.filename}: {p}" for p in scanned.problems)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - BadZipFile, zlib.error, NotImplementedError (deflate64), ...
        text = (str(e).strip().splitlines() or ["no details"])[0][:300]
        raise bad(f"the zip archive is damaged or uses what torch cannot read ({type(e).__name__}: {text})") from None
    found = list(dict.fromkeys(g for gs in members.values() for g in gs))
    if not members:
        notes.append("no pickle inside the archive")
    refused = refused_globals(found) if found else []
    return FileScan(str(path), "torch-zip", found, refused, members, "; ".join(notes))


def _scan_onnx(path: Path) -> FileScan:  # opening checks every external data path (none may leave the folder)
    from .sources.onnx_reader import open_onnx

    with open_onnx(path) as src:
        external = len(src.files) - 1
    return FileScan(
        str(path),
        "onnx",
        note=f"{len(src)} initializers, {external} external data files (inside the "
        "model's folder); the graph is data to torchgraft, never executed (onnxruntime would run it)",
    )


def _scan_tf(path: Path) -> FileScan:
    from .sources.tf_reader import open_tf_checkpoint

    with open_tf_checkpoint(path) as src:
        pb = (
            "; the SavedModel's saved_model.pb holds TF graphs (they can call Python): never read"
            if (path.parent.parent / "saved_model.pb").is_file()
            else ""
        )
    return FileScan(str(path), "tf-checkpoint", note=f"{len(src)} tensors; a TF bundle holds tensors only, no code{pb}")


_DATA_FORMATS = {".onnx": _scan_onnx, ".index": _scan_tf}  # formats that hold no pickles: validated, never executed


def _is_torch_legacy_file(path: Path) -> bool:
    with path.open("rb") as f:
        return _is_torch_legacy(f.read(32))


def _is_torch_legacy(data: bytes) -> bool:
    # torch's legacy format starts with the pickled magic number 0x1950a86a20f9469cfc6c
    return b"\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19" in data[:32]


# ---------------------------------------------------------------------------


def _renderable(report: ScanReport):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = [Text(f"scan: {report.path}", style="bold")]
    for f in report.files:
        title = f"{f.path} ({f.format})" if len(report.files) > 1 or f.path != report.path else f"format: {f.format}"
        if f.format in ("safetensors", "onnx", "tf-checkpoint") or not f.globals:
            parts.append(Text(f"{title}: {f.note or 'no globals referenced'}"))
            continue
        t = Table(title=title, title_justify="left")
        t.add_column("global referenced", overflow="fold")
        t.add_column("safe loader", no_wrap=True)
        t.add_column("what it can do", overflow="fold")
        refused = set(f.refused)
        for g in f.globals:
            t.add_row(g, "[red]refuses[/red]" if g in refused else "allows", danger_of(g) if g in refused else "")
        parts.append(t)
        if f.note:
            parts.append(Text(f.note))
    if report.safe:
        parts.append(
            Text(
                "verdict: safe (every global is on torch's weights_only allow-list; nothing was executed)",
                style="bold green",
            )
        )
    else:
        danger = [g for g in report.refused if danger_of(g)]
        detail = "; dangerous: " + ", ".join(f"{g} ({danger_of(g)})" for g in danger) if danger else ""
        parts.append(
            Text(
                f"verdict: UNSAFE: the safe loader refuses {', '.join(report.refused)}{detail}. Nothing was executed. "
                "Do not load it with weights_only=False; if you trust the file and these are plain data classes, "
                "allow them explicitly (tg.open(path, allow_globals=[...]))",
                style="bold red",
            )
        )
    return Group(*parts)
