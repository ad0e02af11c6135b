"""GGUF files (llama.cpp): names, shapes and types from the header; tensors dequantised on demand.

The header is parsed here, bounds-checked against the file size before anything is allocated
(``gguf.GGUFReader`` walks every array element in Python, which takes seconds on a real vocabulary
and loops for ever on a crafted array length). The format's constants, tensor-name tables and
dequantisation all come from the maintained ``gguf`` package (``pip install 'torchgraft[gguf]'``),
imported only when a GGUF file is opened.

llama.cpp's names (``blk.0.attn_q.weight``) become transformers' names for the architecture
(``model.layers.0.self_attn.q_proj.weight``), chosen from gguf-py's own tables
(:data:`gguf.TENSOR_NAMES`, :class:`gguf.TensorNameMap`). Where llama.cpp stores a tensor in
another layout than transformers, the difference is undone while reading (see
:data:`ARCHITECTURES`), and every entry says what was done in ``source.conversions``.
"""

from __future__ import annotations

import mmap
import re
import struct
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from .base import Source, TensorRef

if TYPE_CHECKING:
    import torch

__all__ = ["ARCHITECTURES", "GGUFArchitecture", "LayoutFix", "looks_like_gguf", "open_gguf", "read_header"]

FORMAT = "gguf"
MAGIC = b"GGUF"
INSTALL_HINT = "pip install 'torchgraft[gguf]'"

#: Header limits (real files hold tens of key/values and at most some thousands of tensors).
MAX_KV = 1 << 20
MAX_TENSORS = 1 << 20
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4

#: Stored types that load as themselves; every other (quantised) type loads as float32.
PLAIN_DTYPES: dict[str, str] = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
    "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
}  # fmt: skip

#: struct codes of GGUF's scalar value types (gguf.GGUFValueType names)
_SCALARS: dict[str, str] = {
    "UINT8": "<B", "INT8": "<b", "UINT16": "<H", "INT16": "<h", "UINT32": "<I", "INT32": "<i",
    "FLOAT32": "<f", "BOOL": "<?", "UINT64": "<Q", "INT64": "<q", "FLOAT64": "<d",
}  # fmt: skip


def looks_like_gguf(head: bytes) -> bool:
    """True when a file starts with GGUF's magic bytes."""
    return head[:4] == MAGIC


def _gguf(path: Path | None = None) -> Any:
    try:
        import gguf
    except ImportError:
        raise CheckpointError(
            path, "reading GGUF files needs the 'gguf' package", format=FORMAT, hint=INSTALL_HINT
        ) from None
    return gguf


# Layout differences ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutFix:
    """A difference between llama.cpp's layout and transformers', undone while reading.

    ``what`` is said in ``source.conversions`` (formatted with the file's hyperparameters);
    ``apply(tensor, hparams)`` is pure and keeps the dtype; ``needs`` names the hyperparameters
    it reads (``n_head``, ``n_head_kv``), checked when the file is opened.
    """

    what: str
    apply: Callable[[torch.Tensor, Mapping[str, int]], torch.Tensor]
    needs: tuple[str, ...] = ()


def _unpermute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    # the inverse of convert_hf_to_gguf.py's LlamaModel.permute: llama.cpp interleaves the two
    # rotary halves of each head's rows (reshape(n, 2, d, ...).swapaxes(1, 2)); transformers keeps them apart
    return t.reshape(n_head, t.shape[0] // n_head // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _minus_one(t: torch.Tensor, hp: Mapping[str, int]) -> torch.Tensor:
    return (t.float() - 1).to(t.dtype)


UNPERMUTE_Q = LayoutFix(
    "rows un-permuted for rotary embeddings (llama.cpp interleaves each head's halves; {n_head} heads)",
    lambda t, hp: _unpermute_rows(t, hp["n_head"]),
    needs=("n_head",),
)
UNPERMUTE_K = LayoutFix(
    "rows un-permuted for rotary embeddings (llama.cpp interleaves each head's halves; {n_head_kv} kv heads)",
    lambda t, hp: _unpermute_rows(t, hp["n_head_kv"]),
    needs=("n_head_kv",),
)
NORM_OFFSET = LayoutFix(
    "1 subtracted (llama.cpp stores 1 + w; transformers' norm computes x * (1 + w))", _minus_one
)


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one ``general.architecture`` maps onto a transformers class.

    Attributes:
        transformers_class: the class whose state dict the names are for (``"LlamaForCausalLM"``).
        prefixes: a llama.cpp tensor takes the first of gguf-py's candidate names (for this
            architecture, in gguf-py's order) that starts with one of these.
        names: llama.cpp template -> transformers template, where that first candidate is not
            transformers' name (``"blk.{bid}.attn_q_norm": "model.layers.{bid}.self_attn.q_norm"``).
        fixes: glob on the transformers name -> the :class:`LayoutFix` undone while reading.
    """

    transformers_class: str
    prefixes: tuple[str, ...] = ("model.", "lm_head")
    names: Mapping[str, str] = field(default_factory=dict)
    fixes: Mapping[str, LayoutFix] = field(default_factory=dict)


_QK_NORM = {
    "blk.{bid}.attn_q_norm": "model.layers.{bid}.self_attn.q_norm",
    "blk.{bid}.attn_k_norm": "model.layers.{bid}.self_attn.k_norm",
}
_GEMMA2_NORMS = {
    "blk.{bid}.ffn_norm": "model.layers.{bid}.pre_feedforward_layernorm",
    "blk.{bid}.post_attention_norm": "model.layers.{bid}.post_attention_layernorm",
    "blk.{bid}.post_ffw_norm": "model.layers.{bid}.post_feedforward_layernorm",
}
# convert_hf_to_gguf.py adds 1 to every Gemma tensor whose transformers name ends in "norm.weight"
_GEMMA_NORMS = {"*norm.weight": NORM_OFFSET}

#: ``general.architecture`` -> how its tensors map onto transformers. Files of other
#: architectures open with llama.cpp's names, unchanged. Add an entry to support one more.
ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture(
        "LlamaForCausalLM", fixes={"*.self_attn.q_proj.*": UNPERMUTE_Q, "*.self_attn.k_proj.*": UNPERMUTE_K}
    ),
    "qwen2": GGUFArchitecture("Qwen2ForCausalLM"),
    "qwen3": GGUFArchitecture("Qwen3ForCausalLM", names=_QK_NORM),
    "gemma": GGUFArchitecture("GemmaForCausalLM", fixes=_GEMMA_NORMS),
    "gemma2": GGUFArchitecture("Gemma2ForCausalLM", names=_GEMMA2_NORMS, fixes=_GEMMA_NORMS),
    "gemma3": GGUFArchitecture("Gemma3ForCausalLM", names={**_QK_NORM, **_GEMMA2_NORMS}, fixes=_GEMMA_NORMS),
}

_BLOCK = re.compile(r"^blk\.(\d+)\.")


def _name_table(gguf: Any, arch_name: str, spec: GGUFArchitecture) -> dict[str, str]:
    """llama.cpp template (``blk.{bid}.attn_q``) -> transformers template, from gguf-py's tables."""
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        return dict(spec.names)
    tnm = gguf.TensorNameMap
    candidates = {
        **tnm.mappings_cfg,
        **tnm.block_mappings_cfg,
        **getattr(tnm, "arch_block_mappings_cfg", {}).get(arch, {}),
    }
    table: dict[str, str] = {}
    for tensor in gguf.MODEL_TENSORS.get(arch, ()):
        template = gguf.TENSOR_NAMES[tensor]
        hf = spec.names.get(template) or next(
            (c for c in candidates.get(tensor, ()) if c.startswith(spec.prefixes)), None
        )
        if hf is not None:
            table[template] = hf
    return table


# Header -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF stores the innermost dimension first)
    type_name: str  # gguf.GGMLQuantizationType name
    start: int  # absolute byte offset
    nbytes: int


class _Cursor:
    """Reads little-endian values from a buffer; every read is checked against its end first."""

    def __init__(self, buf: Any, path: Path):
        self.buf, self.pos, self.end, self.path = buf, 0, len(buf), path

    def bad(self, reason: str) -> CheckpointError:
        return CheckpointError(
            self.path, reason, format=FORMAT, hint="the file is damaged or truncated; download or convert it again"
        )

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n > self.end - start:
            raise self.bad(
                f"{what} at byte {start} needs {n} bytes, past the end of the {self.end}-byte file (truncated?)"
            )
        self.pos = start + n
        return start

    def scalar(self, code: str, what: str) -> Any:
        return struct.unpack_from(code, self.buf, self.take(struct.calcsize(code), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", f"the length of {what}")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.bad(f"{what} at byte {start} is not valid UTF-8") from None



_U64 = struct.Struct("<Q").unpack_from


def _skip_strings(cur: _Cursor, count: int, key: str) -> None:
    # a vocabulary holds some 10^5 strings: this loop is the header's hot path, so it is kept bare;
    # lengths are unsigned, so ``pos`` only grows, and a read past the end raises struct.error
    buf, pos = cur.buf, cur.pos
    try:
        for _ in range(count):
            pos += 8 + _U64(buf, pos)[0]
    except (struct.error, OverflowError):  # past the end, or so far past it that the offset overflows
        pos = cur.end + 1
    if pos > cur.end:
        raise cur.bad(f"the strings of {key!r} run past the end of the {cur.end}-byte file (truncated?)")
    cur.pos = pos


def _read_value(cur: _Cursor, vtype: Any, gguf: Any, key: str, depth: int = 0) -> Any:
    """A key's value: scalars and strings as Python values; arrays are skipped (``None``)."""
    try:
        kind = gguf.GGUFValueType(vtype).name
    except ValueError:
        raise cur.bad(f"key {key!r} has unknown value type {vtype}") from None
    if kind == "STRING":
        return cur.string(f"the value of {key!r}")
    if kind in _SCALARS:
        return cur.scalar(_SCALARS[kind], f"the value of {key!r}")
    # ARRAY: item type, count, items
    if depth >= MAX_ARRAY_DEPTH:
        raise cur.bad(f"key {key!r} nests arrays more than {MAX_ARRAY_DEPTH} deep")
    itype = cur.scalar("<I", f"the item type of {key!r}")
    count = cur.scalar("<Q", f"the length of {key!r}")
    try:
        ikind = gguf.GGUFValueType(itype).name
    except ValueError:
        raise cur.bad(f"key {key!r} is an array of unknown value type {itype}") from None
    if ikind in _SCALARS:
        cur.take(count * struct.calcsize(_SCALARS[ikind]), f"the {count} items of {key!r}")
    elif ikind == "STRING":
        if count * 8 > cur.end - cur.pos:
            raise cur.bad(f"key {key!r} claims {count} strings, more than the rest of the file can hold (truncated?)")
        _skip_strings(cur, count, key)
    else:  # arrays of arrays: each item is at least 12 bytes (type + length)
        if count * 12 > cur.end - cur.pos:
            raise cur.bad(f"key {key!r} claims {count} arrays, more than the rest of the file can hold (truncated?)")
        for _ in range(count):
            _read_value(cur, itype, gguf, key, depth + 1)
    return None


def read_header(path: str | Path) -> tuple[dict[str, Any], list[_TensorInfo]]:
    """Parse a GGUF header: its scalar/string key-values and its tensors' names, shapes, types and spans.

    Returns:
        ``(metadata, tensors)``; array values (the vocabulary) are checked and skipped.

    Raises:
        CheckpointError: not GGUF, an unsupported version, big-endian, truncated, counts or shapes
            the file cannot hold, unknown types, a tensor reaching past the end of the file, or the
            ``gguf`` package is missing.
    """
    path = Path(path)
    gguf = _gguf(path)
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Cursor(buf, path), gguf)
    except (OSError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(path, f"cannot read the file ({e})", format=FORMAT) from None


def _parse(cur: _Cursor, gguf: Any) -> tuple[dict[str, Any], list[_TensorInfo]]:
    cur.take(4, "the magic")
    magic = bytes(cur.buf[:4])
    if magic != MAGIC:
        raise cur.bad(f"not a GGUF file (first bytes: {magic!r})")
    version = cur.scalar("<I", "the version")
    if version not in (2, 3):
        if version & 0xFFFF == 0 and struct.unpack(">I", struct.pack("<I", version))[0] in (2, 3):
            raise CheckpointError(
                cur.path,
                "a big-endian GGUF file",
                format=FORMAT,
                hint="convert it to little-endian (gguf-convert-endian)",
            )
        raise CheckpointError(
            cur.path,
            f"GGUF version {version}; versions 2 and 3 are supported",
            format=FORMAT,
            hint="convert it with a current llama.cpp",
        )
    n_tensors = cur.scalar("<Q", "the tensor count")
    n_kv = cur.scalar("<Q", "the key/value count")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise cur.bad(f"the header claims {n_tensors} tensors and {n_kv} key/values (at most {MAX_TENSORS} each)")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("a key")
        if key in metadata:
            raise cur.bad(f"key {key!r} appears twice")
        metadata[key] = _read_value(cur, cur.scalar("<I", f"the type of {key!r}"), gguf, key)
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.bad(f"general.alignment is {alignment!r}, not a power of two")
    raw: list[tuple[str, tuple[int, ...], str, int]] = []
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        n_dims = cur.scalar("<I", f"the dimension count of {name!r}")
        if n_dims > MAX_DIMS:
            raise cur.bad(f"tensor {name!r} has {n_dims} dimensions; GGUF allows at most {MAX_DIMS}")
        dims = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.take(8 * n_dims, f"the shape of {name!r}"))
        if any(d >= 1 << 63 for d in dims):
            raise cur.bad(f"tensor {name!r} has a dimension of 2**63 or more: {list(dims)}")
        code = cur.scalar("<I", f"the type of {name!r}")
        try:
            type_name = gguf.GGMLQuantizationType(code).name
        except ValueError:
            raise CheckpointError(
                cur.path,
                f"tensor {name!r} has unknown type {code}",
                format=FORMAT,
                hint="upgrade the gguf package (pip install -U gguf)",
            ) from None
        raw.append((name, tuple(reversed(dims)), type_name, cur.scalar("<Q", f"the data offset of {name!r}")))
    data_start = -(-cur.pos // alignment) * alignment
    tensors: list[_TensorInfo] = []
    seen: set[str] = set()
    for name, shape, type_name, offset in raw:
        if name in seen:
            raise cur.bad(f"tensor {name!r} appears twice")
        seen.add(name)
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
        numel = 1
        for d in shape:
            numel *= d
        if shape and shape[-1] % block:
            raise cur.bad(f"tensor {name!r} has rows of {shape[-1]} values, not a multiple of {type_name}'s {block}")
        nbytes = numel // block * type_size
        if offset % alignment:
            raise cur.bad(
                f"tensor {name!r} starts at data offset {offset}, not a multiple of the alignment {alignment}"
            )
        start = data_start + offset
        if start + nbytes > cur.end:
            raise cur.bad(
                f"tensor {name!r} ({list(shape)} {type_name}, {nbytes} bytes at byte {start}) "
                f"reaches past the end of the {cur.end}-byte file (truncated?)"
            )
        tensors.append(_TensorInfo(name, shape, type_name, start, nbytes))
    return metadata, tensors


# Tensors ------------------------------------------------------------------------------------------


class _Data:
    """The file's bytes: mapped once for plain float tensors, read per tensor for quantised ones."""

    def __init__(self, path: Path):
        self.path = path
        self._storage: Any = None
        self._mapped = True
        self._lock = threading.Lock()

    def bad(self, reason: str) -> CheckpointError:
        return CheckpointError(self.path, reason, format=FORMAT, hint="re-download the file; it changed or is damaged")

    def plain(self, info: _TensorInfo, dtype: torch.dtype) -> torch.Tensor:
        import torch

        itemsize = torch.empty((), dtype=dtype).element_size()
        with self._lock:
            if self._storage is None and self._mapped:
                try:
                    size = self.path.stat().st_size
                    self._storage = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=size)
                except (RuntimeError, OSError):  # a file system without mmap: read each tensor instead
                    self._mapped = False
            storage = self._storage
        if storage is not None and info.start % itemsize == 0 and info.start + info.nbytes <= storage.nbytes():
            return torch.empty(0, dtype=dtype).set_(storage, info.start // itemsize, info.shape)
        data = bytearray(self.read(info))
        return torch.frombuffer(data, dtype=dtype).reshape(info.shape) if data else torch.empty(info.shape, dtype=dtype)

    def read(self, info: _TensorInfo) -> bytes:
        try:
            with self.path.open("rb") as f:
                f.seek(info.start)
                data = f.read(info.nbytes)
        except OSError as e:
            raise self.bad(f"reading {info.name!r} failed ({e.strerror or e})") from None
        if len(data) != info.nbytes:
            raise self.bad(f"{info.name!r} needs {info.nbytes} bytes at byte {info.start}; the file ends sooner")
        return data

    def close(self) -> None:
        self._storage = None


def _load(data: _Data, info: _TensorInfo, fixes: list[LayoutFix], hparams: Mapping[str, int]) -> torch.Tensor:
    import torch

    if info.nbytes == 0:  # no elements: nothing to read or dequantise
        tensor = torch.empty(info.shape, dtype=getattr(torch, PLAIN_DTYPES.get(info.type_name, "float32")))
    elif info.type_name in PLAIN_DTYPES:
        tensor = data.plain(info, getattr(torch, PLAIN_DTYPES[info.type_name]))
    else:
        import numpy as np

        gguf = _gguf(data.path)
        qtype = gguf.GGMLQuantizationType[info.type_name]
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        raw = np.frombuffer(data.read(info), dtype=np.uint8)
        rows = raw.reshape(*info.shape[:-1], info.shape[-1] // block * type_size) if info.shape else raw
        try:
            values = gguf.quants.dequantize(rows, qtype)
        except NotImplementedError:
            raise CheckpointError(
                data.path,
                f"the gguf package cannot dequantise {info.type_name} (tensor {info.name!r})",
                format=FORMAT,
                hint="upgrade it: pip install -U gguf",
            ) from None
        tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(info.shape)
    for fix in fixes:
        tensor = fix.apply(tensor, hparams)
    return tensor


def _getter(data: _Data, info: _TensorInfo, fixes: list[LayoutFix], hparams: Mapping[str, int]):
    return lambda: _load(data, info, fixes, hparams)


def _hparams(metadata: Mapping[str, Any], arch: str) -> dict[str, int]:
    out: dict[str, int] = {}
    n_head = metadata.get(f"{arch}.attention.head_count")
    if isinstance(n_head, int) and not isinstance(n_head, bool) and n_head > 0:
        out["n_head"] = n_head
        n_kv = metadata.get(f"{arch}.attention.head_count_kv", n_head)
        if isinstance(n_kv, int) and not isinstance(n_kv, bool) and n_kv > 0:
            out["n_head_kv"] = n_kv
    return out


def _check_fix(path: Path, fix: LayoutFix, hparams: Mapping[str, int], name: str, shape: tuple[int, ...]) -> None:
    """The header must give what a fix needs, and the head counts must split the tensor's rows."""
    for key in fix.needs:
        if key not in hparams:
            raise CheckpointError(
                path,
                f"{name!r} is stored in llama.cpp's layout, and undoing that needs {key} from the header "
                "(attention.head_count / head_count_kv), which has no valid value",
                format=FORMAT,
                hint="the file's metadata is incomplete; convert it again with llama.cpp",
            )
        if not shape or shape[0] % (2 * hparams[key]):
            raise CheckpointError(
                path,
                f"{name!r} has {shape[0] if shape else 0} rows, which do not split into {hparams[key]} heads "
                f"of rotary pairs ({key}={hparams[key]})",
                format=FORMAT,
                hint="the head counts in the header disagree with the tensor; the file is damaged",
            )


def open_gguf(path: Path, **_: Any) -> Source:
    """Open a GGUF file lazily, with transformers' names for the architectures in :data:`ARCHITECTURES`.

    Reached through :func:`torchgraft.open` (sniffed by the ``GGUF`` magic, or ``format="gguf"``).

    Returns:
        A :class:`Source` whose entries load as float32 (quantised types) or as stored
        (F32/F16/BF16, memory-mapped); ``conversions`` says per entry what was done,
        ``metadata`` holds the header's strings and numbers and ``gguf.tensor_types``.

    Raises:
        CheckpointError: see :func:`read_header`; also head counts that a layout fix needs but the
            header lacks or that do not split the tensor's rows.

    Example:
        >>> src = tg.open("gemma-3-270m-q4_k_m.gguf")
        >>> src["model.layers.0.mlp.down_proj.weight"].shape, src.conversions["model.layers.0.mlp.down_proj.weight"]
        ((640, 2048), "llama.cpp's 'blk.0.ffn_down.weight'; dequantised from Q6_K")
    """
    path = Path(path)
    metadata, tensors = read_header(path)
    gguf = _gguf(path)
    arch = metadata.get("general.architecture")
    spec = ARCHITECTURES.get(arch) if isinstance(arch, str) else None
    table = _name_table(gguf, arch, spec) if spec is not None else {}
    hparams = _hparams(metadata, arch) if isinstance(arch, str) else {}
    data = _Data(path)
    entries: dict[str, TensorRef] = {}
    conversions: dict[str, str] = {}
    for info in tensors:
        name = _transformers_name(info.name, table)
        if name in entries:
            raise CheckpointError(
                path, f"two tensors map to {name!r} (one is {info.name!r})", format=FORMAT, hint="the file is damaged"
            )
        fixes = [fix for glob, fix in (spec.fixes.items() if spec else ()) if fnmatchcase(name, glob)]
        for fix in fixes:
            _check_fix(path, fix, hparams, info.name, info.shape)
        dtype = PLAIN_DTYPES.get(info.type_name, "float32")
        entries[name] = TensorRef(name, info.shape, dtype, _getter(data, info, fixes, hparams))
        said = [f"llama.cpp's {info.name!r}"] if name != info.name else []
        if info.type_name not in PLAIN_DTYPES:
            said.append(f"dequantised from {info.type_name}")
        said += [fix.what.format(**hparams) for fix in fixes]
        if said:
            conversions[name] = "; ".join(said)
    types = Counter(t.type_name for t in tensors).most_common()
    shown = {"gguf.tensor_types": ", ".join(f"{t} ({n})" for t, n in types)}
    if spec is None:
        shown["gguf.names"] = f"llama.cpp's, unchanged (no mapping to transformers for architecture {arch!r})"
    shown.update({k: str(v) for k, v in metadata.items() if v is not None})
    return Source(entries, path=str(path), format=FORMAT, metadata=shown, closer=data.close, conversions=conversions)


def _transformers_name(name: str, table: Mapping[str, str]) -> str:
    if not table:
        return name
    m = _BLOCK.match(name)
    base, _, suffix = name.rpartition(".")
    template = base if m is None else "blk.{bid}." + base[m.end() :]
    hf = table.get(template)
    if hf is None:
        return name
    return (hf.format(bid=m.group(1)) if m else hf) + "." + suffix


def scan_gguf(path: Path) -> str:
    """For ``torchgraft scan``: what in a GGUF file could execute (nothing), after checking its header."""
    metadata, tensors = read_header(path)
    template = any(k.startswith("tokenizer.chat_template") for k in metadata)
    said = " (its chat template is a Jinja string: data that torchgraft never renders)" if template else ""
    return f"{len(tensors)} tensors; GGUF holds data only, nothing in it is executed{said}"
