"""TensorFlow object-graph checkpoints: ``variables.index`` + ``variables.data-NNNNN-of-NNNNN``.

What TF 2 writes with ``tf.train.Checkpoint`` / ``model.save(...)`` (a SavedModel's ``variables/``
folder) and Keras 2's ``save_weights`` in TF format. Read without TensorFlow:

* the ``.index`` file is a LevelDB-style SSTable (sorted keys, blocks of prefix-compressed
  entries, block CRC32C checksums, a 48-byte footer ending in a magic number), parsed here
  with every offset, length and checksum checked before it is used;
* each value is a ``BundleEntryProto`` (dtype, shape, shard, offset, size, CRC32C of the
  bytes), decoded by the ``protobuf`` library from a schema declared below (field numbers
  copied from TensorFlow's ``tensor_bundle.proto``);
* the bytes of a tensor are read from its data shard only when it is loaded, and checked
  against the entry's CRC32C (``google-crc32c``).

Why not a maintained reader: TensorFlow's own (``tf.train.load_checkpoint``) needs the full
``tensorflow`` package; ``tensorboard`` ships some of TF's protos but neither the bundle
proto nor a table reader. Both dependencies here (``protobuf``, ``google-crc32c``) are
the ``tf`` extra: ``pip install torchgraft[tf]``.

Names: ``layer_with_weights-1/kernel/.ATTRIBUTES/VARIABLE_VALUE`` becomes ``conv2d_1.weight``
when the folder is a SavedModel (the Keras layer names come from the object list in
``saved_model.pb``; its graphs are never read or run), else ``layer_with_weights.1.weight``;
``source.metadata["names"]`` says which. Entries come in the order Keras lists its layers.
Optimizer slots (``.OPTIMIZER_SLOT``), the optimizer's own variables, Keras metrics and
``save_counter`` are left out and listed in ``source.skipped``.
Keras kernels are converted to torch's layout and each change is recorded in
``source.conversions`` (see :data:`ATTRIBUTE_NAMES`).
"""

from __future__ import annotations

import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..keys import natural_key
from .base import DTYPE_SIZES, Source, TensorRef

__all__ = [
    "ATTRIBUTE_NAMES",
    "TF_DTYPES",
    "TFSource",
    "looks_like_tf_checkpoint",
    "open_tf_checkpoint",
    "read_table",
    "torch_name",
]

FORMAT = "tf-checkpoint"
EXTRA_HINT = "pip install 'torchgraft[tf]' (protobuf and google-crc32c; TensorFlow itself is not needed)"

#: TensorFlow ``DataType`` enum values -> torch dtype names (``types.proto``). Others are refused.
TF_DTYPES: dict[int, str] = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 8: "complex64",
    9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 18: "complex128", 19: "float16",
    22: "uint32", 23: "uint64",
}  # fmt: skip
_TF_STRING = 7
_TF_DTYPE_NAMES = {7: "string", 11: "qint8", 12: "quint8", 13: "qint32", 15: "qint16", 16: "quint16",
                   20: "resource", 21: "variant"}  # fmt: skip

#: Keras attribute name -> (torch attribute name, what it means). Layout changes are by rank (see ``_PERMUTES``).
ATTRIBUTE_NAMES: dict[str, tuple[str, str]] = {
    "kernel": ("weight", "kernel"),
    "depthwise_kernel": ("depthwise.weight", "depthwise kernel"),
    "pointwise_kernel": ("pointwise.weight", "pointwise kernel"),
    "gamma": ("weight", "BatchNorm/LayerNorm gamma"),
    "beta": ("bias", "BatchNorm/LayerNorm beta"),
    "moving_mean": ("running_mean", "BatchNorm moving_mean"),
    "moving_variance": ("running_var", "BatchNorm moving_variance"),
    "embeddings": ("weight", "Embedding embeddings"),
}

#: Kernel rank -> (permutation to torch's layout, what it is).
_PERMUTES: dict[int, tuple[tuple[int, ...], str]] = {
    2: ((1, 0), "Dense kernel [in, out] transposed to torch's [out, in]"),
    3: ((2, 1, 0), "Conv1D kernel [W, in, out] permuted to torch's [out, in, W]"),
    4: ((3, 2, 0, 1), "Conv2D kernel HWIO permuted to torch's OIHW"),
    5: ((4, 3, 0, 1, 2), "Conv3D kernel DHWIO permuted to torch's OIDHW"),
}

_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_SKIP_PREFIXES: dict[str, str] = {
    "optimizer/": "optimizer state",
    "keras_api/metrics/": "Keras metric state",
    "save_counter/": "checkpoint save counter",
}
_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"

#: Limits for hostile files: a bundle index holds names and small protos only.
MAX_INDEX_BYTES = 256 * 1024 * 1024
MAX_BLOCK_BYTES = 64 * 1024 * 1024
MAX_SHARDS = 100_000
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_BYTES = 48
_DATA_NAME = re.compile(r"^(?P<prefix>.+)\.data-(?P<shard>\d{5})-of-(?P<num>\d{5})$")


def looks_like_tf_checkpoint(path: Path) -> bool:
    """A SavedModel folder (``variables/variables.index``), a ``*.index`` file, or one of its ``*.data-*`` shards."""
    if path.is_dir():
        return (path / "variables" / "variables.index").is_file()
    name = path.name
    if name.endswith(".index") and not name.endswith(".index.json"):
        return True
    m = _DATA_NAME.match(name)
    return bool(m) and (path.parent / f"{m['prefix']}.index").is_file()


# ---------------------------------------------------------------------------
# Protobuf schema (subset of tensorflow/core/protobuf/tensor_bundle.proto)


_messages: dict[str, Any] = {}
_messages_lock = threading.Lock()


def _proto_classes(where: Path) -> dict[str, Any]:
    """``BundleEntryProto`` and ``BundleHeaderProto`` classes, built once in a private descriptor pool."""
    with _messages_lock:
        if _messages:
            return _messages
        try:
            from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
        except ImportError:
            raise CheckpointError(
                where, "reading TensorFlow checkpoints needs the 'protobuf' package", format=FORMAT, hint=EXTRA_HINT
            ) from None
        F = descriptor_pb2.FieldDescriptorProto
        fdp = descriptor_pb2.FileDescriptorProto(name="torchgraft_tf_bundle.proto", package="torchgraft.tf")
        fdp.syntax = "proto3"

        def message(name: str, fields: list[tuple[str, int, int, int, str]]) -> None:
            m = fdp.message_type.add(name=name)
            for fname, number, ftype, label, type_name in fields:
                f = m.field.add(name=fname, number=number, type=ftype, label=label)
                if type_name:
                    f.type_name = type_name

        opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
        message("Dim", [("size", 1, F.TYPE_INT64, opt, ""), ("name", 2, F.TYPE_STRING, opt, "")])
        message(
            "TensorShapeProto",
            [("dim", 2, F.TYPE_MESSAGE, rep, ".torchgraft.tf.Dim"), ("unknown_rank", 3, F.TYPE_BOOL, opt, "")],
        )
        message(
            "BundleEntryProto",
            [
                ("dtype", 1, F.TYPE_INT32, opt, ""),
                ("shape", 2, F.TYPE_MESSAGE, opt, ".torchgraft.tf.TensorShapeProto"),
                ("shard_id", 3, F.TYPE_INT32, opt, ""),
                ("offset", 4, F.TYPE_INT64, opt, ""),
                ("size", 5, F.TYPE_INT64, opt, ""),
                ("crc32c", 6, F.TYPE_FIXED32, opt, ""),
                ("slices", 7, F.TYPE_BYTES, rep, ""),  # TensorSliceProto: only counted (partitioned variables)
            ],
        )
        message(
            "BundleHeaderProto",
            [("num_shards", 1, F.TYPE_INT32, opt, ""), ("endianness", 2, F.TYPE_INT32, opt, "")],
        )
        pool = descriptor_pool.DescriptorPool()
        pool.Add(fdp)
        for name in ("BundleEntryProto", "BundleHeaderProto"):
            _messages[name] = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"torchgraft.tf.{name}"))
        return _messages


def _crc32c(where: Path) -> Callable[[bytes], int]:
    try:
        import google_crc32c
    except ImportError:
        raise CheckpointError(
            where,
            "checking a TensorFlow checkpoint's checksums needs the 'google-crc32c' package",
            format=FORMAT,
            hint=EXTRA_HINT,
        ) from None
    return google_crc32c.value


def _unmask(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ---------------------------------------------------------------------------
# The SSTable


def _varint(buf: bytes, pos: int, end: int, bad: Callable[[str], CheckpointError], what: str) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise bad(f"a {what} in the index runs past its block (truncated or damaged)")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _block(data: bytes, offset: int, size: int, crc, bad, what: str) -> bytes:
    """The contents of a block, its trailer (compression byte, masked CRC32C) checked."""
    if size > MAX_BLOCK_BYTES:
        raise bad(f"the {what} claims {size} bytes, more than the {MAX_BLOCK_BYTES} allowed")
    if offset < 0 or offset + size + 5 > len(data) - _FOOTER_BYTES:
        raise bad(f"the {what} at bytes {offset}..{offset + size} lies outside the index file (truncated?)")
    contents = data[offset : offset + size]
    kind = data[offset + size]
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    if crc(contents + bytes([kind])) != _unmask(stored):
        raise bad(f"the {what} at byte {offset} fails its CRC32C checksum (the index is damaged)")
    if kind != 0:
        raise bad(
            f"the {what} is compressed (type {kind}); TensorFlow writes bundle indexes uncompressed",
            hint="re-save the checkpoint with TensorFlow",
        )
    return contents


def _entries(block: bytes, bad, what: str) -> list[tuple[bytes, bytes]]:
    """Every ``(key, value)`` of a block, with the shared key prefixes expanded."""
    if len(block) < 4:
        raise bad(f"the {what} is {len(block)} bytes, too short for its restart count")
    (restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    if restarts == 0 or restarts * 4 + 4 > len(block):
        raise bad(f"the {what} claims {restarts} restart points, which do not fit in its {len(block)} bytes")
    end = len(block) - 4 - 4 * restarts
    out: list[tuple[bytes, bytes]] = []
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos, end, bad, "key length")
        unshared, pos = _varint(block, pos, end, bad, "key length")
        vlen, pos = _varint(block, pos, end, bad, "value length")
        if shared > len(key) or pos + unshared + vlen > end:
            raise bad(f"an entry of the {what} points past its end (the index is damaged)")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        out.append((key, block[pos : pos + vlen]))
        pos += vlen
    return out


def read_table(path: Path) -> list[tuple[bytes, bytes]]:
    """Every ``(key, value)`` of an SSTable file, in key order, with all checksums verified.

    Raises:
        CheckpointError: not a table, truncated, a checksum mismatch, keys out of order.
    """

    def bad(reason: str, hint: str = "the index file is damaged or not a TensorFlow checkpoint") -> CheckpointError:
        return CheckpointError(path, reason, format=FORMAT, hint=hint)

    try:
        size = path.stat().st_size
        if size > MAX_INDEX_BYTES:
            raise bad(f"the index is {size} bytes, more than the {MAX_INDEX_BYTES} a bundle index needs")
        data = path.read_bytes()
    except CheckpointError:
        raise
    except OSError as e:
        raise bad(f"cannot read the file ({e.strerror or e})", hint="check that the path is a readable file") from None
    if len(data) < _FOOTER_BYTES:
        raise bad(f"the file is {len(data)} bytes, shorter than a table footer ({_FOOTER_BYTES} bytes)")
    (magic,) = struct.unpack_from("<Q", data, len(data) - 8)
    if magic != _TABLE_MAGIC:
        raise bad("the file does not end with the table magic number (not a TensorFlow checkpoint index, or truncated)")
    crc = _crc32c(path)
    footer_start = len(data) - _FOOTER_BYTES
    pos = footer_start
    _meta_off, pos = _varint(data, pos, footer_start + 40, bad, "footer field")
    _meta_size, pos = _varint(data, pos, footer_start + 40, bad, "footer field")
    index_off, pos = _varint(data, pos, footer_start + 40, bad, "footer field")
    index_size, pos = _varint(data, pos, footer_start + 40, bad, "footer field")
    index = _block(data, index_off, index_size, crc, bad, "index block")
    out: list[tuple[bytes, bytes]] = []
    seen_blocks: set[int] = set()
    for _sep, handle in _entries(index, bad, "index block"):
        off, p = _varint(handle, 0, len(handle), bad, "block handle")
        n, p = _varint(handle, p, len(handle), bad, "block handle")
        if off in seen_blocks:
            raise bad(f"the index block names the data block at byte {off} twice")
        seen_blocks.add(off)
        for key, value in _entries(_block(data, off, n, crc, bad, "data block"), bad, "data block"):
            if out and key <= out[-1][0]:
                raise bad(f"the keys are not in order at {key[:80]!r} (the index is damaged)")
            out.append((key, value))
    return out


# ---------------------------------------------------------------------------
# Names


def torch_name(key: str, layer_names: Callable[[list[str]], list[str]] | None = None) -> tuple[str, str | None] | None:
    """``"layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE"`` -> ``("layer_with_weights.0.weight", "kernel")``.

    ``layer_names`` turns the object-graph path (``["layer_with_weights-0"]``) into module
    names (``["conv2d_1"]``: the Keras layer names a SavedModel records). Returns ``None`` for
    keys that are not variable values (the object graph itself); the second item is the Keras
    attribute name when it is renamed.
    """
    if not key.endswith(_VALUE_SUFFIX):
        return None
    parts = [p for p in key[: -len(_VALUE_SUFFIX)].split("/") if p]
    if not parts:
        return None
    attr = parts[-1]
    module = layer_names(parts[:-1]) if layer_names else [_object_name(p) for p in parts[:-1]]
    renamed = ATTRIBUTE_NAMES.get(attr)
    leaf = renamed[0] if renamed else attr
    return ".".join([*module, leaf]), (attr if renamed else None)


def _object_name(local_name: str) -> str:
    """``layer_with_weights-3`` -> ``layer_with_weights.3`` (a numbered list, as torch writes them)."""
    return re.sub(r"-(\d+)$", r".\1", local_name)


# ---------------------------------------------------------------------------
# Keras layer names, from a SavedModel's saved_model.pb (subset of saved_model.proto, saved_object_graph.proto)

MAX_SAVED_MODEL_BYTES = 1 << 30


def _saved_model_class(where: Path) -> Any:
    with _messages_lock:
        if "SavedModel" in _messages:
            return _messages["SavedModel"]
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="torchgraft_tf_saved_model.proto", package="torchgraft.tfsm")
    fdp.syntax = "proto3"
    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    for name, fields in (
        ("ObjectReference", [("node_id", 1, F.TYPE_INT32, opt, ""), ("local_name", 2, F.TYPE_STRING, opt, "")]),
        ("SavedUserObject", [("identifier", 1, F.TYPE_STRING, opt, ""), ("metadata", 3, F.TYPE_STRING, opt, "")]),
        (
            "SavedObject",
            [
                ("children", 1, F.TYPE_MESSAGE, rep, ".torchgraft.tfsm.ObjectReference"),
                ("user_object", 4, F.TYPE_MESSAGE, opt, ".torchgraft.tfsm.SavedUserObject"),
            ],
        ),
        ("SavedObjectGraph", [("nodes", 1, F.TYPE_MESSAGE, rep, ".torchgraft.tfsm.SavedObject")]),
        ("MetaGraphDef", [("object_graph_def", 7, F.TYPE_MESSAGE, opt, ".torchgraft.tfsm.SavedObjectGraph")]),
        ("SavedModel", [("meta_graphs", 2, F.TYPE_MESSAGE, rep, ".torchgraft.tfsm.MetaGraphDef")]),
    ):
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("torchgraft.tfsm.SavedModel"))
    with _messages_lock:
        _messages["SavedModel"] = cls
    return cls


def _keras_layer_names(pb: Path) -> tuple[Callable[[list[str]], list[str]] | None, str]:
    """A function from object-graph paths to Keras layer names, or ``None`` and why not.

    The SavedModel's object graph (``saved_model.pb``) records each Keras layer's ``name`` in its
    metadata; the checkpoint's keys are paths through the same graph (``layer_with_weights-1``).
    Graphs in the file are never executed: only this object list is read.
    """
    import json

    from google.protobuf.message import DecodeError

    try:
        if pb.stat().st_size > MAX_SAVED_MODEL_BYTES:
            return None, f"saved_model.pb is larger than {MAX_SAVED_MODEL_BYTES} bytes"
        model = _saved_model_class(pb)()
        model.ParseFromString(pb.read_bytes())
    except (OSError, DecodeError, RecursionError) as e:
        return None, f"saved_model.pb could not be read ({str(e)[:120] or type(e).__name__})"
    graphs = [m.object_graph_def for m in model.meta_graphs if m.object_graph_def.nodes]
    if not graphs:
        return None, "saved_model.pb has no object graph"
    nodes = graphs[0].nodes

    def layer_name(node_id: int) -> str | None:
        if not 0 <= node_id < len(nodes) or not nodes[node_id].user_object.metadata:
            return None
        try:
            meta = json.loads(nodes[node_id].user_object.metadata)
        except (ValueError, RecursionError):
            return None
        name = meta.get("name") if isinstance(meta, dict) else None
        return name.replace(".", "_").replace("/", "_") if isinstance(name, str) and name else None

    def names(path: list[str]) -> list[str]:
        out, node = [], 0
        for part in path:
            child = (
                next((c.node_id for c in nodes[node].children if c.local_name == part), None)
                if node is not None
                else None
            )
            name = layer_name(child) if child is not None else None
            out.append(name or _object_name(part))
            node = child if child is not None and 0 <= child < len(nodes) else None
        return out

    return names, ""


def _skip_reason(key: str) -> str | None:
    if ".OPTIMIZER_SLOT/" in key:
        return "optimizer slot"
    return next((why for prefix, why in _SKIP_PREFIXES.items() if key.startswith(prefix)), None)


# ---------------------------------------------------------------------------
# The source


@dataclass(frozen=True)
class _Entry:
    key: str
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int


class TFSource(Source):
    """A TensorFlow checkpoint opened lazily.

    Attributes (besides :class:`Source`'s):
        original_names: torch-style name -> the checkpoint's own key
            (``"layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE"``).
    """

    original_names: dict[str, str]


class _Shards:
    """Data files opened on first use; each read checked against the entry's CRC32C."""

    def __init__(self, files: list[Path], index: Path):
        self.files = files
        self.index = index
        self._handles: dict[int, Any] = {}
        self._lock = threading.Lock()

    def read(self, e: _Entry) -> bytes:
        with self._lock:
            f = self._handles.get(e.shard)
            if f is None:
                try:
                    f = self._handles[e.shard] = open(self.files[e.shard], "rb")  # noqa: SIM115 - closed in close()
                except OSError as err:
                    raise CheckpointError(
                        self.files[e.shard], f"cannot read the data shard ({err.strerror or err})", format=FORMAT
                    ) from None
            f.seek(e.offset)
            raw = f.read(e.size)
        if len(raw) != e.size:
            raise CheckpointError(
                self.files[e.shard],
                f"{e.key!r} needs bytes {e.offset}..{e.offset + e.size}, but the shard ends sooner (truncated?)",
                format=FORMAT,
                hint="copy the checkpoint again",
            )
        if _crc32c(self.index)(raw) != _unmask(e.crc32c):
            raise CheckpointError(
                self.files[e.shard],
                f"the bytes of {e.key!r} fail their CRC32C checksum (the data file is damaged)",
                format=FORMAT,
                hint="copy the checkpoint again",
            )
        return raw

    def close(self) -> None:
        with self._lock:
            for f in self._handles.values():
                f.close()
            self._handles.clear()


def _index_path(path: Path) -> Path:
    if path.is_dir():
        return path / "variables" / "variables.index"
    m = _DATA_NAME.match(path.name)
    if m:
        return path.parent / f"{m['prefix']}.index"
    return path


def open_tf_checkpoint(path: Path, **_: Any) -> TFSource:
    """Open a TensorFlow checkpoint: a SavedModel folder, a ``*.index`` file or one of its data shards.

    Example:
        >>> src = tg.open("saved_model/")            # reads saved_model/variables/variables.index
        >>> src.conversions["conv2d_1.weight"]
        "Conv2D kernel HWIO permuted to torch's OIHW"
        >>> src.skipped["layer_with_weights-1/kernel/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE"]
        'optimizer slot'
    """
    index = _index_path(path)

    def bad(reason: str, hint: str = "the index file is damaged or not a TensorFlow checkpoint") -> CheckpointError:
        return CheckpointError(index, reason, format=FORMAT, hint=hint)

    if not index.is_file():
        raise bad("the checkpoint's index file does not exist", hint="a TF checkpoint is PREFIX.index + PREFIX.data-*")
    classes = _proto_classes(index)
    from google.protobuf.message import DecodeError

    rows = read_table(index)
    if not rows or rows[0][0] != b"":
        raise bad("the table has no bundle header (its first key must be empty)")
    header = classes["BundleHeaderProto"]()
    entry_cls = classes["BundleEntryProto"]
    try:
        header.ParseFromString(rows[0][1])
    except DecodeError as e:
        raise bad(f"the bundle header is not a valid protobuf message ({e})") from None
    num_shards = header.num_shards
    if not 1 <= num_shards <= MAX_SHARDS:
        raise bad(f"the bundle header claims {num_shards} data shards")
    if header.endianness != 0:
        raise bad("the checkpoint was written on a big-endian machine", hint="re-save it on a little-endian machine")
    prefix = index.name[: -len(".index")]
    files = [index.parent / f"{prefix}.data-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]
    sizes: list[int] = []
    for f in files:
        if not f.is_file():
            raise bad(f"the data shard {f.name} named by the index does not exist", hint="copy the missing shard")
        sizes.append(f.stat().st_size)

    names = {raw.decode("utf-8", "replace"): torch_name(raw.decode("utf-8", "replace")) for raw, _ in rows[1:]}
    graph_order = {k: natural_key(n[0]) for k, n in names.items() if n is not None}
    metadata = {"names": "object-graph paths"}
    pb = index.parent.parent / "saved_model.pb"
    if index.parent.name == "variables" and pb.is_file():
        layer_names, why_not = _keras_layer_names(pb)
        if layer_names is not None:
            keras = {k: torch_name(k, layer_names) for k in names}
            taken = [n[0] for k, n in keras.items() if n is not None and _skip_reason(k) is None]
            if len(taken) == len(set(taken)):
                names, metadata["names"] = keras, "Keras layer names from saved_model.pb"
            else:
                metadata["names"] = "object-graph paths (two Keras layers in saved_model.pb share a name)"
        else:
            metadata["names"] = f"object-graph paths ({why_not})"
    shards = _Shards(files, index)
    entries: dict[str, TensorRef] = {}
    originals: dict[str, str] = {}
    conversions: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for raw_key, value in rows[1:]:
        if raw_key.startswith(b"\x00"):  # TF's encoding of "name + slice": one piece of a partitioned variable
            skipped[raw_key.decode("utf-8", "backslashreplace")] = "slice of a partitioned variable (not supported)"
            continue
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            raise bad(f"a key is not UTF-8 text ({raw_key[:80]!r})") from None
        msg = entry_cls()
        try:
            msg.ParseFromString(value)
        except DecodeError as e:
            raise bad(f"the entry of {key[:80]!r} is not a valid protobuf message ({e})") from None
        e = _check_entry(key, msg, sizes, bad)
        if key == _GRAPH_KEY:
            skipped[key] = "TensorFlow object graph (structure, not a tensor)"
            continue
        if msg.slices:
            skipped[key] = "partitioned variable (slices are not supported)"
            continue
        if (why := _skip_reason(key)) is not None:
            skipped[key] = why
            continue
        named = names[key]
        if e.dtype not in TF_DTYPES or named is None:
            kind = _TF_DTYPE_NAMES.get(e.dtype, f"dtype {e.dtype}")
            skipped[key] = f"{kind} tensor" if named is not None or e.dtype == _TF_STRING else "not a variable value"
            continue
        name, keras_attr = named
        if name in entries:
            raise bad(f"{key[:80]!r} and {originals[name][:80]!r} both become {name!r}")
        permute, note = _layout(keras_attr, e.shape)
        shape = _torch_shape(keras_attr, e.shape, permute)
        if keras_attr is not None and note is None:
            note = f"TF {ATTRIBUTE_NAMES[keras_attr][1]} renamed to {name.rpartition('.')[2]}"
        if note:
            conversions[name] = note
        originals[name] = key
        entries[name] = TensorRef(name, shape, TF_DTYPES[e.dtype], _loader(shards, e, permute, shape))
    # the table sorts keys as bytes (layer-10 before layer-2); Keras numbers its layers in network order
    entries = dict(sorted(entries.items(), key=lambda kv: graph_order[originals[kv[0]]]))
    src = TFSource(
        entries,
        path=str(path),
        format=FORMAT,
        metadata=metadata,
        skipped=skipped,
        files=[str(index), *map(str, files)],
        closer=shards.close,
        conversions=conversions,
    )
    src.original_names = originals
    return src


def _check_entry(key: str, msg: Any, sizes: list[int], bad) -> _Entry:
    if msg.shape.unknown_rank:
        raise bad(f"{key[:80]!r} has an unknown rank")
    shape = tuple(int(d.size) for d in msg.shape.dim)
    if any(d < 0 for d in shape) or len(shape) > 64:
        raise bad(f"{key[:80]!r} has an invalid shape {list(shape)[:10]}")
    if not 0 <= msg.shard_id < len(sizes):
        raise bad(f"{key[:80]!r} lives in shard {msg.shard_id}, but the checkpoint has {len(sizes)}")
    offset, size = int(msg.offset), int(msg.size)
    if offset < 0 or size < 0 or offset + size > sizes[msg.shard_id]:
        raise bad(
            f"{key[:80]!r} spans bytes {offset}..{offset + size}, outside its {sizes[msg.shard_id]}-byte data shard "
            "(truncated?)"
        )
    if msg.dtype in TF_DTYPES and not msg.slices:
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * int(DTYPE_SIZES[TF_DTYPES[msg.dtype]])
        if expected != size:
            raise bad(
                f"{key[:80]!r} has shape {list(shape)} ({expected} bytes as {TF_DTYPES[msg.dtype]}) but spans {size} bytes"
            )
    return _Entry(key, int(msg.dtype), shape, int(msg.shard_id), offset, size, int(msg.crc32c))


def _layout(keras_attr: str | None, shape: tuple[int, ...]) -> tuple[tuple[int, ...] | None, str | None]:
    """The permutation to torch's layout for a kernel, and what it does in words."""
    if keras_attr == "depthwise_kernel" and len(shape) == 4:  # [H, W, C_in, mult] -> [C_in * mult, 1, H, W]
        return (2, 3, 0, 1), "DepthwiseConv2D kernel [H, W, in, mult] permuted to torch's [in * mult, 1, H, W]"
    if keras_attr in ("kernel", "pointwise_kernel") and len(shape) in _PERMUTES:
        return _PERMUTES[len(shape)]
    return None, None


def _torch_shape(keras_attr: str | None, shape: tuple[int, ...], permute: tuple[int, ...] | None) -> tuple[int, ...]:
    if permute is None:
        return shape
    if keras_attr == "depthwise_kernel":
        h, w, c, m = shape
        return (c * m, 1, h, w)
    return tuple(shape[i] for i in permute)


def _loader(shards: _Shards, e: _Entry, permute: tuple[int, ...] | None, shape: tuple[int, ...]):
    def load():
        import torch

        raw = bytearray(shards.read(e))
        dtype = getattr(torch, TF_DTYPES[e.dtype])
        t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        t = t.reshape(e.shape)
        if permute is None:
            return t
        return t.permute(*permute).reshape(shape).contiguous()

    return load
