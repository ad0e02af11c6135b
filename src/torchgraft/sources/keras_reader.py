"""Keras weights: Keras 3 ``.keras`` archives and ``.weights.h5`` files, legacy Keras ``.h5`` files (via h5py).

Nothing is read at open but HDF5 metadata (group names, dataset shapes and dtypes); a dataset's
bytes are read when its tensor is loaded. Names become dotted torch-style names
(``layers/dense_1/vars/0`` -> ``dense_1.weight``) and kernels are converted to torch's layout on
load, each change recorded in ``Source.conversions``. Optimizer variables are listed in
``Source.skipped``, never loaded. A ``.keras`` archive's inner weights file is read in place,
without extracting it. Layers' Python code (``Lambda``) is never run: only weights are read.
"""

from __future__ import annotations

import io
import json
import re
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .base import Source, TensorRef
from .layouts import LAYOUTS

__all__ = [
    "HDF5_SIGNATURE",
    "KERNEL_KINDS",
    "VAR_ORDER",
    "VAR_RENAMES",
    "keras_lambda_layers",
    "keras_scan_note",
    "looks_like_hdf5",
    "looks_like_keras_zip",
    "open_keras",
]

FORMAT_ARCHIVE = "keras"  # Keras 3 .keras zip archive
FORMAT_WEIGHTS = "keras-weights-h5"  # Keras 3 .weights.h5
FORMAT_LEGACY = "keras-legacy-h5"  # legacy .h5 (Keras 2 / tf.keras, or Keras 3's model.save("x.h5"))

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_WEIGHTS_MEMBER = "model.weights.h5"
_CONFIG_MEMBER = "config.json"
_MAX_CONFIG_BYTES = 64 * 1024 * 1024
_MAX_MEMBERS = 10_000
# like Keras's own _reject_zip_bomb: a member above 4 GiB that expands more than 100x is a bomb
_BOMB_FLOOR_BYTES = 1 << 32
_BOMB_EXPANSION = 100
_MAX_DEPTH = 32
_NOT_KERAS = "an HDF5 file, but not in a Keras layout (no layers/ group, no layer_names attribute)"
_MAX_NODES = 1_000_000
# refused on load (a fill-value bomb): a dataset that stores nothing, or one above 1 GiB that declares more
# than 1000x what it stores (compression alone reaches about 1000x only on constant data)
_MAX_STORAGE_EXPANSION = 1000
_BOMB_READ_BYTES = 1 << 30

#: dtypes an HDF5 dataset may have to become a tensor (numpy names = torch names)
_TENSOR_DTYPES = frozenset(
    ["float16", "float32", "float64", "complex64", "complex128", "bool"]
    + [f"{s}int{b}" for s in ("", "u") for b in (8, 16, 32, 64)]
)

#: Keras layer class -> the layout of its ``kernel`` (a key of :data:`~torchgraft.sources.layouts.LAYOUTS`)
KERNEL_KINDS: dict[str, str] = {
    "Dense": "dense",
    "Conv1D": "conv", "Conv2D": "conv", "Conv3D": "conv",
    "DepthwiseConv1D": "depthwise", "DepthwiseConv2D": "depthwise",
}  # fmt: skip

#: Keras variable name -> torch's name for it
VAR_RENAMES: dict[str, str] = {
    "kernel": "weight", "depthwise_kernel": "weight", "bias": "bias",
    "gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var",
    "embeddings": "weight",
}  # fmt: skip


def _bias(names: list[str]) -> Callable[[dict[str, Any]], list[str]]:
    return lambda cfg: names + (["bias"] if cfg.get("use_bias", True) else [])


def _norm(*stats: str) -> Callable[[dict[str, Any]], list[str]]:
    def names(cfg: dict[str, Any]) -> list[str]:
        return (["gamma"] if cfg.get("scale", True) else []) + (["beta"] if cfg.get("center", True) else []) + [*stats]

    return names


#: Keras 3 stores a layer's variables by position only (``vars/0``, ``vars/1``): their names in
#: creation order, per layer class, from the layer's config (``use_bias``, ``scale``, ``center``).
VAR_ORDER: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    **dict.fromkeys(["Dense", "Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D", "DepthwiseConv2D"], _bias(["kernel"])),
    "BatchNormalization": _norm("moving_mean", "moving_variance"),
    "LayerNormalization": _norm(),
    "Embedding": lambda cfg: ["embeddings"],
}


def _snake(name: str) -> str:
    """Keras's ``naming.to_snake_case``: ``DepthwiseConv2D`` -> ``depthwise_conv2d``."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


#: the HDF5 group names Keras 3 gives layers (``conv2d``, ``conv2d_1``: class, then a count) -> class,
#: for files without a config (``.weights.h5``)
_AUTO_NAMES: dict[str, str] = {_snake(c): c for c in VAR_ORDER}


def looks_like_hdf5(head: bytes) -> bool:
    """True when the first bytes are HDF5's signature (Keras ``.h5`` / ``.weights.h5``)."""
    return head[:8] == HDF5_SIGNATURE


def looks_like_keras_zip(path: Path, head: bytes) -> bool:
    """True for a zip archive that holds ``model.weights.h5`` and ``config.json`` (a Keras 3 ``.keras`` file)."""
    if head[:4] != b"PK\x03\x04":
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False
    return _CONFIG_MEMBER in names and (_WEIGHTS_MEMBER in names or "model.weights.json" in names)


def _h5py(path: Path, fmt: str) -> Any:
    try:
        import h5py
    except ImportError:
        raise CheckpointError(
            path,
            "reading Keras files needs the h5py package, which is not installed",
            format=fmt,
            hint="pip install 'torchgraft[keras]'",
        ) from None
    return h5py


def _bad(path: Path, fmt: str, reason: str, hint: str | None = None) -> CheckpointError:
    return CheckpointError(path, reason, format=fmt, hint=hint or "the file is damaged or not a Keras weights file")


def _keras3_classes(config: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    """Keras 3 HDF5 group name -> (class name, layer config), from a model config (any nesting).

    Keras 3 names a container's layers by class, not by the layer's own name: the first ``Dense``
    is ``dense``, the next ``dense_1`` (``saving_lib._get_unique_name``), in the config's order.
    """
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for node in _dicts(config):
        layers = node.get("layers")
        if not isinstance(layers, list):
            continue
        used: dict[str, int] = {}
        for layer in layers:
            if isinstance(layer, dict) and isinstance(layer.get("class_name"), str):
                key = _snake(layer["class_name"])
                used[key] = used[key] + 1 if key in used else 0
                cfg = layer.get("config")
                out.setdefault(
                    f"{key}_{used[key]}" if used[key] else key,
                    (layer["class_name"], cfg if isinstance(cfg, dict) else {}),
                )
    return out


def _config_classes(config: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    """Layer name -> (class name, layer config), from a Keras model config (any nesting)."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for node in _dicts(config):
        cfg = node.get("config")
        if isinstance(node.get("class_name"), str) and isinstance(cfg, dict) and isinstance(cfg.get("name"), str):
            out.setdefault(cfg["name"], (node["class_name"], cfg))
    return out


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            yield v
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def keras_lambda_layers(config: Any) -> list[str]:
    """Names of the ``Lambda`` layers in a Keras model config: they hold Python code (torchgraft never runs it)."""
    return sorted(
        str((node.get("config") or {}).get("name", "?")) if isinstance(node.get("config"), dict) else "?"
        for node in _dicts(config)
        if node.get("class_name") == "Lambda"
    )


def _layer_class(name: str, classes: dict[str, tuple[str, dict[str, Any]]]) -> tuple[str | None, dict[str, Any], bool]:
    """(class, config, guessed): from the model config, else from Keras's automatic naming (``dense_3``)."""
    if name in classes:
        cls, cfg = classes[name]
        return cls, cfg, False
    guess = _AUTO_NAMES.get(re.sub(r"_\d+$", "", name))
    return guess, {}, guess is not None


def _kind(cls: str | None, var: str, ndim: int) -> str | None:
    """Which layout change a variable needs (``None``: none)."""
    if var == "depthwise_kernel":
        return "depthwise"
    if var != "kernel":
        return None
    if cls in KERNEL_KINDS:
        return KERNEL_KINDS[cls]
    return "dense" if ndim == 2 else "conv" if ndim in (3, 4, 5) else None


class _Reader:
    """Builds the entries of one Keras HDF5 file (shared by the three layouts)."""

    def __init__(self, path: Path, fmt: str, h5py: Any, classes: dict[str, tuple[str, dict[str, Any]]]):
        self.path, self.fmt, self.h5py, self.classes = path, fmt, h5py, classes
        self.by_name: dict[str, tuple[str, dict[str, Any]]] = {}  # Keras 3: layer name -> class, config
        self.entries: dict[str, TensorRef] = {}
        self.sources: dict[str, str] = {}  # torch name -> HDF5 path, to name both sides of a collision
        self.conversions: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.lock = threading.Lock()
        self.nodes = 0

    def bad(self, reason: str, hint: str | None = None) -> CheckpointError:
        return _bad(self.path, self.fmt, reason, hint)

    def child(self, group: Any, key: str) -> Any:
        """``group[key]``, refusing soft and external links (they could point into other files)."""
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            raise self.bad(f"more than {_MAX_NODES} HDF5 objects (a cycle of hard links?)")
        link = group.get(key, getlink=True)
        if link is None:
            raise self.bad(f"{_cut(group.name)}/{key[:80]} is named but missing")
        if not isinstance(link, self.h5py.HardLink):
            raise self.bad(
                f"{_cut(group.name)}/{key[:80]} is an HDF5 {type(link).__name__}",
                hint="links can point into other files; re-save the model with Keras",
            )
        return group[key]

    def add(self, segs: list[str], var: str, cls: str | None, guessed: bool, ds: Any) -> None:
        h5name = ds.name.lstrip("/")
        if not isinstance(ds, self.h5py.Dataset):
            raise self.bad(f"{_cut(h5name)} is a group where a weight was expected")
        if ds.external or ds.is_virtual:
            raise self.bad(
                f"{_cut(h5name)} keeps its data in other files (external or virtual dataset)",
                hint="refusing to read files outside the checkpoint; re-save the model with Keras",
            )
        shape, dtype = ds.shape, ds.dtype
        if shape is None or dtype.name not in _TENSOR_DTYPES:
            self.skipped[h5name] = f"HDF5 dataset of type {dtype} (not a tensor)"
            return
        shape = tuple(int(d) for d in shape)
        name = ".".join([*segs, VAR_RENAMES.get(var, var)])
        if name in self.entries:
            raise self.bad(f"{_cut(h5name)} and {_cut(self.sources[name])} both become {_cut(repr(name))}")
        what = f"Keras {cls or 'layer'} {var!r} ({h5name}{', class guessed from the layer name' if guessed else ''})"
        kind = _kind(cls, var, len(shape))
        layout = LAYOUTS[kind] if kind else None
        if layout is not None and len(shape) not in layout.ndims:
            self.conversions[name] = f"{what}: left as stored, a {len(shape)}-D {kind} kernel has no torch layout rule"
            layout = None
        elif layout is not None:
            self.conversions[name] = f"{what}: {layout.describe(shape)}"
            shape = layout.shape(shape)
        elif VAR_RENAMES.get(var, var) != var:
            self.conversions[name] = f"{what}: renamed to {VAR_RENAMES[var]!r}"
        self.entries[name] = TensorRef(name, shape, dtype.name, self.loader(ds, h5name, layout))
        self.sources[name] = h5name

    def loader(self, ds: Any, h5name: str, layout: Any) -> Callable[[], Any]:
        def load() -> Any:
            import numpy as np
            import torch

            with self.lock:
                try:
                    nbytes = ds.size * ds.dtype.itemsize
                    stored = ds.id.get_storage_size()
                    if nbytes and (
                        stored == 0 or (nbytes > _BOMB_READ_BYTES and stored * _MAX_STORAGE_EXPANSION < nbytes)
                    ):
                        raise self.bad(f"{_cut(h5name)} declares {nbytes} bytes but stores only {stored}")
                    array = np.ascontiguousarray(ds[()], dtype=ds.dtype.newbyteorder("="))  # big-endian: swapped
                except CheckpointError:
                    raise
                except Exception as e:  # noqa: BLE001 - h5py raises OSError, KeyError, ValueError, RuntimeError
                    raise self.bad(
                        f"reading {_cut(h5name)} failed ({_cut(str(e))})", hint="the file is damaged or truncated"
                    ) from None
            tensor = torch.from_numpy(array)
            return layout.apply(tensor) if layout is not None else tensor

        return load

    def skip_all(self, group: Any, why: str, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            raise self.bad(f"{_cut(group.name)} nests more than {_MAX_DEPTH} groups deep")
        for key in group:
            item = self.child(group, key)
            if isinstance(item, self.h5py.Group):
                self.skip_all(item, why, depth + 1)
            else:
                self.skipped[item.name.lstrip("/")] = why

    # Keras 3: layers/<name>/vars/<i>, nested models under layers/<name>/layers/..., sublayers by attribute
    def keras3(self, root: Any) -> None:
        for key in root:
            item = self.child(root, key)
            if key in ("layers", "vars") and isinstance(item, self.h5py.Group):
                self.walk3(item, [], depth=0) if key == "layers" else self.vars3(item, [])
            elif isinstance(item, self.h5py.Group):
                self.skip_all(item, f"Keras {key} variable (not a model weight)")
            else:
                self.skipped[key] = "dataset outside the Keras layout"

    def walk3(self, group: Any, segs: list[str], depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise self.bad(f"{_cut(group.name)} nests more than {_MAX_DEPTH} groups deep")
        for key in group:
            item = self.child(group, key)
            if not isinstance(item, self.h5py.Group):
                self.skipped[item.name.lstrip("/")] = "dataset outside a layer's vars"
            elif key == "vars":
                self.vars3(item, segs)
            else:
                self.walk3(item, segs if key == "layers" else [*segs, key], depth + 1)

    def vars3(self, group: Any, segs: list[str]) -> None:
        keys = list(group)
        if not keys:
            return
        if not all(k.isdigit() and len(k) < 10 for k in keys):
            raise self.bad(f"{_cut(group.name)} holds {_cut(repr(keys[:5]))}, not numbered variables")
        keys.sort(key=int)
        cls, cfg, guessed = _layer_class(segs[-1], self.classes) if segs else (None, {}, False)
        own = group.attrs.get("name")  # Keras 3 keeps the layer's own name here: the surest key into the config
        own = own.decode("utf-8", "replace") if isinstance(own, bytes) else own
        if isinstance(own, str) and own in self.by_name:
            cls, cfg = self.by_name[own]
            guessed = False
        names = VAR_ORDER[cls](cfg) if cls in VAR_ORDER else []
        if len(names) != len(keys):  # unknown class, or a config that does not fit: keep positions
            names = [f"vars.{k}" for k in keys]
            cls, guessed = None, False
        for key, var in zip(keys, names):
            self.add(segs, var, cls, guessed, self.child(group, key))

    # legacy: [model_weights/]<layer>/<weight_name> for each name in the layer group's weight_names
    def legacy(self, root: Any, layer_names: list[str]) -> None:
        for lname in layer_names:
            group = self.child(root, lname)
            if not isinstance(group, self.h5py.Group):
                raise self.bad(f"layer {_cut(repr(lname))} is not an HDF5 group")
            for wname in _strings(group.attrs.get("weight_names", []), self, f"{lname}'s weight_names"):
                parts = wname.split("/")
                if wname.startswith("/") or any(p in ("", ".", "..") for p in parts):
                    raise self.bad(f"layer {_cut(repr(lname))} names a weight {_cut(repr(wname))} outside its group")
                ds = group
                for p in parts:
                    ds = self.child(ds, p)
                parts = [re.sub(r":\d+$", "", p) for p in parts]
                # weight names are variable paths: "dense/kernel" (Keras 2), "sequential/dense/kernel" (Keras 3
                # in a Sequential), "block/inner/kernel" (a nested model): keep what follows the layer's own name
                inside = [i for i, p in enumerate(parts[:-1]) if p == lname]
                segs = [lname, *parts[inside[-1] + 1 if inside else 0 : -1]]
                cls, _cfg, guessed = _layer_class(parts[-2] if len(parts) > 1 else lname, self.classes)
                self.add(segs, parts[-1], cls, guessed, ds)


def _cut(text: str, limit: int = 160) -> str:
    """Names in a hostile file can be megabytes long (or a cycle of links 32 deep): keep messages short."""
    return text if len(text) <= limit else text[: limit // 2 - 2] + " ... " + text[-(limit // 2 - 3) :]


def _strings(value: Any, reader: _Reader, what: str) -> list[str]:
    import numpy as np

    items = list(np.asarray(value).reshape(-1)) if value is not None else []
    out = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in items]
    if not all(isinstance(v, str) for v in out):
        if not out or all(isinstance(v, float) for v in out):  # h5py reads an empty list as float64[0]
            return []
        raise reader.bad(f"{what} is not a list of strings")
    return out


def _read_json(data: bytes | str, path: Path, fmt: str, what: str) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        raise _bad(path, fmt, f"{what} is not valid JSON (nested too deeply)") from None
    except ValueError as e:
        raise _bad(path, fmt, f"{what} is not valid JSON ({str(e)[:200]})") from None


class _Window(io.RawIOBase):
    """Bytes ``[start, start + size)`` of a file, seekable: a stored zip member read in place.

    ``ZipFile.open`` would do, but its backward seeks re-read the member from its start (on
    Python < 3.12), which h5py's random access turns into seconds for a large archive.
    """

    def __init__(self, path: Path, start: int, size: int):
        self._f = path.open("rb")
        self._start, self._size, self._pos = start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(view[:n]) if n else 0
        self._pos += got
        return got

    def close(self) -> None:
        self._f.close()
        super().close()


def _member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    """A seekable reader of one member: a window on the file when stored (as Keras writes it), else ZipFile's."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return zf.open(info)
    with path.open("rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        size = f.seek(0, io.SEEK_END)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise _bad(path, FORMAT_ARCHIVE, f"the local header of {info.filename!r} is damaged")
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    if start + info.file_size > size:
        raise _bad(path, FORMAT_ARCHIVE, f"{info.filename!r} runs past the end of the file (truncated?)")
    return _Window(path, start, info.file_size)


def _open_archive(path: Path) -> tuple[zipfile.ZipFile, Any, dict[str, Any], dict[str, str]]:
    """The zip, its open weights member and the parsed config.json, with zip sanity checks."""
    fmt = FORMAT_ARCHIVE
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise _bad(path, fmt, f"the zip archive is damaged ({e})") from None
    try:
        infos = zf.infolist()
        if len(infos) > _MAX_MEMBERS:
            raise _bad(path, fmt, f"the archive holds {len(infos)} members, more than the {_MAX_MEMBERS} allowed")
        seen: set[str] = set()
        for info in infos:
            name = info.filename
            if name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", name) or ":" in name or "\x00" in name:
                raise _bad(path, fmt, f"the archive holds a member with an unsafe path {name[:80]!r}")
            if name in seen:
                raise _bad(path, fmt, f"the archive holds {name[:80]!r} twice")
            seen.add(name)
            if info.file_size > _BOMB_FLOOR_BYTES and info.file_size > _BOMB_EXPANSION * max(info.compress_size, 1):
                raise _bad(
                    path, fmt, f"{name[:80]!r} expands {info.file_size} bytes from {info.compress_size} (a zip bomb)"
                )
        if _WEIGHTS_MEMBER not in seen:
            raise _bad(
                path,
                fmt,
                "the archive holds no model.weights.h5 (sharded .keras archives are not supported)",
                hint="re-save the model without max_shard_size, or pass the .weights.h5 files",
            )
        if _CONFIG_MEMBER not in seen:
            raise _bad(path, fmt, "the archive holds no config.json")
        meta: dict[str, str] = {}
        for member, limit in ((_CONFIG_MEMBER, _MAX_CONFIG_BYTES), ("metadata.json", 1 << 20)):
            if member not in seen:
                continue
            if zf.getinfo(member).file_size > limit:
                raise _bad(path, fmt, f"{member} is larger than {limit} bytes")
            with zf.open(member) as f:
                data = f.read(limit + 1)
            if len(data) > limit:
                raise _bad(path, fmt, f"{member} is larger than {limit} bytes")
            parsed = _read_json(data, path, fmt, member)
            if member == _CONFIG_MEMBER:
                config = parsed
            elif isinstance(parsed, dict):
                meta = {str(k): str(v) for k, v in parsed.items() if isinstance(v, (str, int, float))}
        inner = _member(path, zf, zf.getinfo(_WEIGHTS_MEMBER))
    except CheckpointError:
        zf.close()
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as e:
        zf.close()
        raise _bad(path, fmt, f"the zip archive is damaged ({e})") from None
    return zf, inner, config, meta


def open_keras(path: Path, **_: Any) -> Source:
    """Open a Keras weights file lazily: ``.keras`` archive, Keras 3 ``.weights.h5`` or legacy ``.h5``.

    Args:
        path: the file.

    Returns:
        A :class:`Source` with torch-style names (``dense_1.weight``), kernels in torch's layout
        (``conversions`` says what changed for each entry), optimizer variables in ``skipped``.

    Raises:
        CheckpointError: h5py missing, a damaged or hostile file (links into other files, a zip
            bomb, unsafe member paths), or an HDF5 file that is not in a Keras layout.

    Example:
        >>> src = tg.open("model.keras")
        >>> src.format, src["dense.weight"].shape, src.conversions["dense.weight"][:20]
        ('keras', (5, 256), 'Keras Dense \\'kernel\\'')
    """
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(8)
    is_zip = head[:4] == b"PK\x03\x04"
    fmt = FORMAT_ARCHIVE if is_zip else FORMAT_WEIGHTS
    h5py = _h5py(path, fmt)
    zf = inner = None
    config: Any = None
    metadata: dict[str, str] = {}
    if is_zip:
        zf, inner, config, metadata = _open_archive(path)
    try:
        try:
            h5 = h5py.File(inner if inner is not None else path, "r")
        except Exception as e:  # noqa: BLE001 - h5py raises OSError, and ValueError/RuntimeError on odd files
            raise _bad(path, fmt, f"not a readable HDF5 file ({str(e)[:200]})") from None
        try:
            source = _read_h5(path, fmt, h5py, h5, config, metadata)
        except CheckpointError:
            h5.close()
            raise
        except Exception as e:  # noqa: BLE001 - h5py's errors on damaged metadata vary (OSError, KeyError, ...)
            h5.close()
            raise _bad(path, _source_fmt(fmt, h5), f"reading the HDF5 structure failed ({str(e)[:200]})") from None
    except CheckpointError:
        if zf is not None:
            zf.close()
        raise

    def close() -> None:
        h5.close()
        if inner is not None:
            inner.close()
        if zf is not None:
            zf.close()

    source._closer = close
    return source


def _source_fmt(fmt: str, h5: Any) -> str:
    if fmt == FORMAT_ARCHIVE:
        return fmt
    try:
        return FORMAT_LEGACY if "layer_names" in h5.attrs or "model_weights" in h5 else FORMAT_WEIGHTS
    except Exception:  # noqa: BLE001
        return fmt


def _read_h5(path: Path, fmt: str, h5py: Any, h5: Any, config: Any, metadata: dict[str, str]) -> Source:
    legacy_root = h5.get("model_weights", h5)
    if fmt != FORMAT_ARCHIVE and "layer_names" in legacy_root.attrs:
        fmt = FORMAT_LEGACY
        raw = h5.attrs.get("model_config")
        if raw is not None:
            config = _read_json(raw.decode() if isinstance(raw, bytes) else str(raw), path, fmt, "model_config")
        for key in ("keras_version", "backend"):
            if key in legacy_root.attrs:
                value = legacy_root.attrs[key]
                metadata[key] = value.decode() if isinstance(value, bytes) else str(value)
        reader = _Reader(path, fmt, h5py, _config_classes(config))
        reader.legacy(legacy_root, _strings(legacy_root.attrs["layer_names"], reader, "layer_names"))
        if "optimizer_weights" in h5:
            reader.skip_all(reader.child(h5, "optimizer_weights"), "Keras optimizer variable (not a model weight)")
    elif "layers" in h5 or "vars" in h5:
        reader = _Reader(path, fmt, h5py, _keras3_classes(config))
        reader.by_name = _config_classes(config)
        reader.keras3(h5)
    else:
        raise _bad(
            path,
            fmt,
            _NOT_KERAS,
            hint="torchgraft reads Keras .keras, .weights.h5 and legacy .h5 weight files",
        )
    return Source(
        reader.entries,
        path=str(path),
        format=fmt,
        metadata=metadata,
        skipped=reader.skipped,
        conversions=reader.conversions,
    )


def keras_scan_note(path: Path) -> tuple[str, str]:
    """``(format, note)`` for ``torchgraft scan``: Keras files hold data, but ``Lambda`` layers hold code.

    Raises:
        CheckpointError: the file is damaged or hostile (an HDF5 file of another kind gets a note).
    """
    path = Path(path)
    try:
        with open_keras(path) as src:
            fmt, count = src.format, len(src)
    except CheckpointError as e:
        if e.reason != _NOT_KERAS:
            raise
        return "hdf5", "an HDF5 file not in a Keras layout: HDF5 holds data only, and torchgraft does not load it"
    config: Any = None
    if fmt == FORMAT_ARCHIVE:
        zf, inner, config, _meta = _open_archive(path)
        inner.close()
        zf.close()
    elif fmt == FORMAT_LEGACY:
        with _h5py(path, fmt).File(path, "r") as h5:
            raw = h5.attrs.get("model_config")
        if raw is not None:
            config = _read_json(raw.decode() if isinstance(raw, bytes) else str(raw), path, fmt, "model_config")
    note = f"{count} tensors; Keras weights are data, torchgraft reads them with h5py and runs no layer code"
    lambdas = keras_lambda_layers(config)
    if lambdas:
        shown = ", ".join(lambdas[:10]) + (", ..." if len(lambdas) > 10 else "")
        note += (
            f". config has {len(lambdas)} Lambda layer(s) ({shown}): they hold Python code that Keras runs "
            "when it loads the model with safe_mode=False; torchgraft never runs it"
        )
    return fmt, note
