"""ONNX models: the graph's initializers, each with its role in the graph.

Exporters rename initializers (``const_fold_opt__738``, ``onnx::Conv_193``), fold BatchNorm into
the convolution before it, and store linear weights either way round (``Gemm`` with ``transB=0``,
``MatMul``). Names alone say little; the graph says the rest. For every initializer this reader
records which nodes consume it, in which input slot, the op type, its attributes and the node's
position in topological (= execution) order (:class:`GraphRole`, ``source.roles``), and names
each entry by that role:

* an initializer whose name already looks like a torch state-dict key (``features.0.weight``,
  as ``torch.onnx.export`` writes) keeps it;
* any other is named after its first consumer: ``conv_3.weight``, ``conv_3.bias``,
  ``linear_0.weight``, ``norm_1.running_var``, ``embedding_0.weight``, ``mul_2.b`` (``{kind}_{k}``,
  ``k`` counting nodes of that kind in execution order; the attribute is torch's name for the
  slot, else the slot's name in the ONNX operator schema). A bias added after a ``MatMul``
  joins that linear (``linear_0.bias``).

So entries come in execution order, grouped per layer the way a torch state dict is, and
``tg.plan(..., align=True)`` pairs them by op, slot, shape and order (the ONNX source's order
is trusted: it is not sorted by name). ``source.original_names`` maps back to the graph's names.

Layout: ``MatMul`` weights and ``Gemm`` ``B`` with ``transB=0`` are stored ``[in, out]``; they are
transposed to torch's ``[out, in]`` and the change is recorded in ``source.conversions``.

Folded BatchNorm: when the graph has convolutions and no ``BatchNormalization`` node although
its names show BatchNorm layers were there (tf2onnx keeps ``FusedBatchNormV3`` in them; PyTorch's
exporter folds in eval mode), ``source.folded_batchnorm`` lists the convolutions that absorbed one
and ``source.metadata["batchnorm"]`` says plainly what follows: a model's BatchNorm entries
(``weight``, ``bias``, ``running_mean``, ``running_var``) cannot come from this graph, and the
convolution weights are ``conv * gamma / sqrt(var + eps)``: load them into a model whose
BatchNorm was fused the same way (see :func:`batchnorm_entries`).

Integer constants that only feed shape inputs (``Reshape`` shapes, ``Slice`` bounds, ``Pad``
pads...) are graph structure, not weights: they are left out and listed in ``source.skipped``.
Graphs are never executed. External data files must lie inside the model's folder.
Needs the ``onnx`` package: ``pip install torchgraft[onnx]``.
"""

from __future__ import annotations

import re
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from .base import DTYPE_SIZES, Source, TensorRef

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ONNX_DTYPES",
    "GraphRole",
    "OnnxSource",
    "batchnorm_entries",
    "looks_like_onnx",
    "open_onnx",
]

FORMAT = "onnx"
EXTRA_HINT = "pip install 'torchgraft[onnx]'"

#: ONNX ``TensorProto.DataType`` -> torch dtype names. Others (strings, 4-bit, FNUZ floats) are skipped.
ONNX_DTYPES: dict[int, str] = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
    10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 14: "complex64", 15: "complex128",
    16: "bfloat16", 17: "float8_e4m3fn", 19: "float8_e5m2",
}  # fmt: skip

#: op type -> the kind of layer it is, as the entry's module name (words the aligner treats as roles).
OP_KINDS: dict[str, str] = {
    "Conv": "conv", "ConvTranspose": "conv_transpose", "Gemm": "linear", "MatMul": "linear",
    "BatchNormalization": "norm", "LayerNormalization": "norm", "InstanceNormalization": "norm",
    "GroupNormalization": "norm", "Gather": "embedding", "LSTM": "lstm", "GRU": "gru", "RNN": "rnn",
    "PRelu": "prelu",
}  # fmt: skip

#: (op type, input slot) -> torch's attribute name for that input.
SLOT_NAMES: dict[tuple[str, int], str] = {
    ("Conv", 1): "weight", ("Conv", 2): "bias", ("ConvTranspose", 1): "weight", ("ConvTranspose", 2): "bias",
    ("Gemm", 1): "weight", ("Gemm", 2): "bias", ("MatMul", 1): "weight",
    ("BatchNormalization", 1): "weight", ("BatchNormalization", 2): "bias",
    ("BatchNormalization", 3): "running_mean", ("BatchNormalization", 4): "running_var",
    ("LayerNormalization", 1): "weight", ("LayerNormalization", 2): "bias",
    ("InstanceNormalization", 1): "weight", ("InstanceNormalization", 2): "bias",
    ("GroupNormalization", 1): "weight", ("GroupNormalization", 2): "bias",
    ("Gather", 0): "weight", ("PRelu", 1): "weight",
}  # fmt: skip

#: (op type, input slot) that take shapes, axes, indices or bounds: constants there are structure, not weights.
SHAPE_SLOTS: frozenset[tuple[str, int]] = frozenset({
    ("Reshape", 1), ("Expand", 1), ("Tile", 1), ("Slice", 1), ("Slice", 2), ("Slice", 3), ("Slice", 4),
    ("Pad", 1), ("Pad", 2), ("Pad", 3), ("Unsqueeze", 1), ("Squeeze", 1), ("Split", 1), ("ConstantOfShape", 0),
    ("Range", 0), ("Range", 1), ("Range", 2), ("TopK", 1), ("Resize", 1), ("Resize", 2), ("Resize", 3),
    ("ReduceSum", 1), ("ReduceMean", 1), ("ReduceMax", 1), ("ReduceMin", 1), ("ReduceProd", 1),
    ("ReduceL2", 1), ("CumSum", 1), ("OneHot", 1), ("Upsample", 1), ("Concat", 0), ("Concat", 1),
})  # fmt: skip
_SHAPE_TYPES = frozenset({6, 7})  # int32, int64

_TORCH_KEY = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)+$")
_BATCHNORM_WORDS = re.compile(r"batch_?norm|fusedbatchnorm|/bn\d*/|\bbn\d*\b", re.IGNORECASE)


def looks_like_onnx(path: Path, head: bytes) -> bool:
    """An ``.onnx`` file (ONNX has no magic number; a ModelProto starts with field 1, ``ir_version``)."""
    return path.suffix.lower() == ".onnx" and path.is_file()


@dataclass(frozen=True)
class GraphRole:
    """One use of an initializer by a node: plain data.

    Attributes:
        node: the node's name (``""`` when the graph leaves it unnamed).
        op_type: ``"Conv"``, ``"Gemm"``, ``"MatMul"``, ...
        slot: the input position the initializer feeds (``1`` = a Conv's ``W``).
        input: that input's name in the operator schema (``"W"``, ``"B"``, ``"scale"``).
        position: the node's index in topological order (= execution order).
        attributes: the node's scalar and list attributes (``{"transB": 1, "group": 1}``).
    """

    node: str
    op_type: str
    slot: int
    input: str
    position: int
    attributes: Mapping[str, Any] = field(default_factory=dict)


class OnnxSource(Source):
    """An ONNX model's initializers, opened lazily, with their graph roles.

    Attributes (besides :class:`Source`'s):
        roles: entry name -> every use of it in the graph, in execution order (:class:`GraphRole`).
        original_names: entry name -> the initializer's name in the graph.
        folded_batchnorm: entry module names (``conv_2``) of convolutions that absorbed a BatchNorm.
        graph_constants: skipped initializers that only feed shape inputs, name -> what they feed.
    """

    roles: dict[str, list[GraphRole]]
    original_names: dict[str, str]
    folded_batchnorm: list[str]

    def plan_notes(self, missing: list[str]) -> list[str]:
        """What a plan should say about model entries left missing: BatchNorm state a folded graph lacks."""
        if not self.folded_batchnorm:
            return []
        norms = {k.rpartition(".")[0] for k in missing if k.endswith((".running_mean", ".running_var"))}
        lost = [k for k in missing if k.rpartition(".")[0] in norms]
        if not lost:
            return []
        shown = ", ".join(lost[:12]) + (f" and {len(lost) - 12} more" if len(lost) > 12 else "")
        note = (
            f"{shown} cannot come from this ONNX graph: its exporter folded BatchNorm into "
            f"{', '.join(self.folded_batchnorm[:6])} (their weights hold conv * gamma / sqrt(var + eps)). "
            "Load it into a model whose BatchNorms are fused into the convolutions before them "
            "(torch.nn.utils.fusion.fuse_conv_bn_eval), or take these weights from the framework's own checkpoint"
        )
        return [note]


def _bad(path: Path, reason: str, hint: str = "the file is damaged or not an ONNX model") -> CheckpointError:
    return CheckpointError(path, reason, format=FORMAT, hint=hint)


def _import_onnx(path: Path):
    try:
        import onnx
    except ImportError:
        raise CheckpointError(
            path, "reading ONNX models needs the 'onnx' package", format=FORMAT, hint=EXTRA_HINT
        ) from None
    return onnx


def _attributes(onnx: Any, node: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    A = onnx.AttributeProto
    for a in node.attribute:
        if a.type in (A.INT, A.FLOAT, A.STRING, A.INTS, A.FLOATS, A.STRINGS):
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode("utf-8", "replace")
            elif isinstance(v, list):
                v = [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in v]
            out[a.name] = v
    return out


def _topological(nodes: list[Any], known: set[str]) -> list[int]:
    """Node indices in execution order (Kahn's algorithm, stable); nodes that never become ready keep file order."""
    producers: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if o:
                producers.setdefault(o, i)
    waiting = [sum(1 for x in set(n.input) if x and x not in known and x in producers) for n in nodes]
    consumers: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes):
        for x in set(n.input):
            if x and x not in known and x in producers:
                consumers[producers[x]].append(i)
    import heapq

    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in consumers[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) < len(nodes):  # a cycle or a dangling input: keep the rest in file order
        seen = set(order)
        order += [i for i in range(len(nodes)) if i not in seen]
    return order


def _schema_input(onnx: Any, op: str, domain: str, opset: int, slot: int) -> str:
    try:
        schema = onnx.defs.get_schema(op, opset, domain)
    except Exception:  # noqa: BLE001 - SchemaError for custom ops; its class moves between onnx versions
        return f"input{slot}"
    inputs = schema.inputs
    if not inputs:
        return f"input{slot}"
    return inputs[min(slot, len(inputs) - 1)].name


def _numel(dims: Iterable[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _confined(model: Path, location: str, name: str) -> Path:
    """The external data file ``location`` names, refusing anything outside the model's folder."""
    root = model.parent.resolve()
    hint = "refusing to read files outside the model's folder; move the data next to the .onnx file"
    if not location or "\0" in location:
        raise _bad(model, f"initializer {name[:80]!r} names an empty external data location")
    pure = PurePosixPath(location.replace("\\", "/"))
    if pure.is_absolute() or Path(location).is_absolute() or ".." in pure.parts:
        raise _bad(model, f"initializer {name[:80]!r} keeps its data in {location[:120]!r}, outside {root}", hint=hint)
    try:
        target = (model.parent / location).resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise _bad(model, f"external data {location[:120]!r} cannot be resolved ({e})") from None
    if not target.is_relative_to(root):
        raise _bad(
            model, f"initializer {name[:80]!r} keeps its data in {location[:120]!r}, which leads to {target}", hint=hint
        )
    if not target.is_file():
        raise _bad(
            model,
            f"the external data file {location[:120]!r} of {name[:80]!r} does not exist",
            hint="copy the model's data files next to it",
        )
    return target


@dataclass
class _Init:
    name: str
    dtype: int
    shape: tuple[int, ...]
    proto: Any
    external: tuple[Path, int, int] | None  # file, offset, length


def _check_initializer(path: Path, t: Any, onnx: Any) -> _Init:
    name = t.name
    dims = tuple(int(d) for d in t.dims)
    if any(d < 0 for d in dims) or len(dims) > 64:
        raise _bad(path, f"initializer {name[:80]!r} has an invalid shape {list(dims)[:10]}")
    dtype = int(t.data_type)
    if t.segment.begin or t.segment.end:
        raise _bad(path, f"initializer {name[:80]!r} is split into segments, which ONNX no longer supports")
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        target = _confined(path, info.get("location", ""), name)
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else target.stat().st_size - offset
        except ValueError:
            raise _bad(path, f"initializer {name[:80]!r} has a non-numeric external data offset or length") from None
        size = target.stat().st_size
        if offset < 0 or length < 0 or offset + length > size:
            raise _bad(
                path,
                f"initializer {name[:80]!r} spans bytes {offset}..{offset + length} of "
                f"{target.name}, which holds {size} (truncated?)",
            )
        if dtype in ONNX_DTYPES and length != _numel(dims) * int(DTYPE_SIZES[ONNX_DTYPES[dtype]]):
            raise _bad(path, f"initializer {name[:80]!r} has shape {list(dims)} but {length} bytes of external data")
        return _Init(name, dtype, dims, t, (target, offset, length))
    if dtype in ONNX_DTYPES:
        numel = _numel(dims)
        if t.HasField("raw_data"):
            have = len(t.raw_data)
            need = numel * int(DTYPE_SIZES[ONNX_DTYPES[dtype]])
            if have != need:
                raise _bad(path, f"initializer {name[:80]!r} has shape {list(dims)} ({need} bytes) but holds {have}")
        else:
            have = max(len(t.float_data), len(t.int32_data), len(t.int64_data), len(t.double_data), len(t.uint64_data))
            per = 2 if dtype in (14, 15) else 1  # complex numbers: two floats each
            if have != numel * per:
                raise _bad(path, f"initializer {name[:80]!r} has shape {list(dims)} but holds {have} values")
    return _Init(name, dtype, dims, t, None)


def _to_torch(init: _Init, permute: bool):
    import numpy as np
    import torch

    dtype = getattr(torch, ONNX_DTYPES[init.dtype])
    if init.external is not None:
        target, offset, length = init.external
        with open(target, "rb") as f:
            f.seek(offset)
            raw = f.read(length)
        if len(raw) != length:
            raise _bad(target, f"external data of {init.name[:80]!r} ends early (the file changed?)")
        t = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    elif init.proto.HasField("raw_data"):  # little-endian bytes, as torch stores them
        raw = init.proto.raw_data
        t = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    else:  # typed fields (float_data, int32_data, ...): onnx's own converter
        from onnx import numpy_helper

        arr = np.array(numpy_helper.to_array(init.proto), copy=True, order="C").reshape(-1)
        if arr.dtype.kind in "cb":
            t = torch.from_numpy(arr)
        else:  # same width, maybe an ml_dtypes type torch cannot take directly (bfloat16, float8)
            width = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}[arr.dtype.itemsize]
            t = torch.from_numpy(arr.view(f"u{arr.dtype.itemsize}")).view(width).view(dtype)
    t = t.reshape(init.shape)
    return t.t().contiguous() if permute else t


def open_onnx(path: Path, **_: Any) -> OnnxSource:
    """Open an ``.onnx`` model's initializers lazily, named and ordered by their role in the graph.

    Example:
        >>> src = tg.open("resnet18.onnx")
        >>> src.roles["conv_0.weight"][0].op_type, src.conversions.get("linear_0.weight")
        ('Conv', None)
        >>> tg.load(model, src, align=True).aligned     # pairs by op, slot, shape and execution order
    """
    onnx = _import_onnx(path)
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, TypeError, RecursionError) as e:
        raise _bad(
            path, f"not a valid ONNX model ({str(e).strip().splitlines()[0][:200] if str(e) else type(e).__name__})"
        ) from None
    except OSError as e:
        raise _bad(path, f"cannot read the file ({e.strerror or e})", hint="check the file's permissions") from None
    graph = model.graph
    opsets = {o.domain or "": int(o.version) for o in model.opset_import}
    inits: dict[str, _Init] = {}
    for t in graph.initializer:
        if t.name in inits:
            raise _bad(path, f"the graph defines initializer {t.name[:80]!r} twice")
        inits[t.name] = _check_initializer(path, t, onnx)

    nodes = list(graph.node)
    known = set(inits) | {i.name for i in graph.input}
    order = _topological(nodes, known)
    roles: dict[str, list[GraphRole]] = defaultdict(list)
    producers: dict[str, int] = {}
    for pos, i in enumerate(order):
        n = nodes[i]
        for o in n.output:
            producers.setdefault(o, pos)
        attrs = None
        for slot, x in enumerate(n.input):
            if x in inits:
                if attrs is None:
                    attrs = _attributes(onnx, n)
                schema_name = _schema_input(onnx, n.op_type, n.domain or "", opsets.get(n.domain or "", 1), slot)
                roles[x].append(GraphRole(n.name, n.op_type, slot, schema_name, pos, attrs))
    ordered_nodes = [nodes[i] for i in order]

    entries: dict[str, TensorRef] = {}
    originals: dict[str, str] = {}
    conversions: dict[str, str] = {}
    skipped: dict[str, str] = {}
    named_roles: dict[str, list[GraphRole]] = {}
    unit_of_node: dict[int, str] = {}
    kind_count: dict[str, int] = defaultdict(int)
    first_use = sorted(
        inits, key=lambda k: (roles[k][0].position, roles[k][0].slot) if roles.get(k) else (len(nodes), 0)
    )
    taken = {k for k in inits if _TORCH_KEY.match(k)}
    for name in first_use:
        init, uses = inits[name], roles.get(name, [])
        if init.dtype not in ONNX_DTYPES:
            skipped[name] = f"ONNX data type {init.dtype} has no torch equivalent"
            continue
        if uses and init.dtype in _SHAPE_TYPES and all((u.op_type, u.slot) in SHAPE_SLOTS for u in uses):
            skipped[name] = f"graph constant: {uses[0].op_type} {uses[0].input}"
            continue
        if not uses:
            skipped[name] = "not used by any node"
            continue
        first = uses[0]
        permute = _is_in_out(first, init)
        if _TORCH_KEY.match(name):
            entry = name
        else:
            entry = _role_name(first, init, ordered_nodes, producers, unit_of_node, kind_count, inits, taken)
        taken.add(entry)
        originals[entry] = name
        named_roles[entry] = uses
        if permute:
            conversions[entry] = f"ONNX {first.op_type} weight [in, out] transposed to torch's [out, in]" + (
                " (Gemm transB=0)" if first.op_type == "Gemm" else ""
            )
        shape = (init.shape[1], init.shape[0]) if permute else init.shape
        entries[entry] = TensorRef(entry, shape, ONNX_DTYPES[init.dtype], _loader(init, permute))

    src = OnnxSource(
        entries,
        path=str(path),
        format=FORMAT,
        metadata=_metadata(model),
        skipped=skipped,
        files=[str(path), *sorted({str(i.external[0]) for i in inits.values() if i.external})],
        conversions=conversions,
    )
    src.roles = named_roles
    src.original_names = originals
    bodies = sum(
        1 for n in nodes for a in n.attribute if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    )
    if bodies or graph.sparse_initializer:
        src.metadata["not read"] = (
            f"{bodies} subgraph(s) of If/Loop/Scan nodes and {len(graph.sparse_initializer)} sparse initializer(s): "
            "only the main graph's dense initializers are entries"
        )
    src.folded_batchnorm = _folded_batchnorm(ordered_nodes, named_roles, originals)
    if src.folded_batchnorm:
        src.metadata["batchnorm"] = (
            f"folded into {len(src.folded_batchnorm)} convolution(s) by the exporter "
            f"({', '.join(src.folded_batchnorm[:6])}{', ...' if len(src.folded_batchnorm) > 6 else ''}): "
            "a model's BatchNorm weight, bias, running_mean and running_var cannot come from this graph, "
            "and those convolutions hold conv * gamma / sqrt(var + eps) with the shift in their bias"
        )
    return src


def _is_in_out(role: GraphRole, init: _Init) -> bool:
    """Is this a 2-D linear weight stored ``[in, out]`` (``MatMul`` B, ``Gemm`` B with ``transB=0``)?"""
    if len(init.shape) != 2 or role.slot != 1:
        return False
    if role.op_type == "MatMul":
        return True
    return role.op_type == "Gemm" and not role.attributes.get("transB", 0)


def _role_name(
    role: GraphRole,
    init: _Init,
    nodes: list[Any],
    producers: dict[str, int],
    unit_of_node: dict[int, str],
    kind_count: dict[str, int],
    inits: Mapping[str, _Init],
    taken: set[str],
) -> str:
    pos, op = role.position, role.op_type
    attr = SLOT_NAMES.get((op, role.slot)) or re.sub(r"\W", "_", role.input).lower() or f"input{role.slot}"
    unit = unit_of_node.get(pos)
    if unit is None and op == "Add" and len(init.shape) == 1:  # MatMul + Add: the bias of that linear
        other = [x for x in nodes[pos].input if x not in inits]
        src = producers.get(other[0]) if len(other) == 1 else None
        if src is not None and nodes[src].op_type == "MatMul" and src in unit_of_node:
            candidate = f"{unit_of_node[src]}.bias"
            if candidate not in taken:
                return candidate
    if unit is None:
        kind = OP_KINDS.get(op) or re.sub(r"\W", "_", op).lower()
        while True:
            unit = f"{kind}_{kind_count[kind]}"
            kind_count[kind] += 1
            if not any(t == unit or t.startswith(unit + ".") for t in taken):
                break
        unit_of_node[pos] = unit
    name = f"{unit}.{attr}"
    k = 1
    while name in taken:  # the same slot name twice in one node (variadic inputs)
        name = f"{unit}.{attr}_{k}"
        k += 1
    return name


def _metadata(model: Any) -> dict[str, str]:
    meta = {
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "ir_version": str(model.ir_version),
        "opsets": ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import),
    }
    for p in model.metadata_props:
        meta.setdefault(p.key, p.value)
    return {k: v for k, v in meta.items() if v}


def _folded_batchnorm(
    nodes: list[Any], roles: Mapping[str, list[GraphRole]], originals: Mapping[str, str]
) -> list[str]:
    """Entry modules of convolutions whose names show a BatchNorm that the graph no longer has."""
    if any(n.op_type == "BatchNormalization" for n in nodes):
        return []
    by_pos: dict[int, list[str]] = defaultdict(list)
    for entry, uses in roles.items():
        for u in uses:
            by_pos[u.position].append(entry)
    out: list[str] = []
    for pos, n in enumerate(nodes):
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm"):
            continue
        names = [n.name, *(originals.get(e, e) for e in by_pos.get(pos, []))]
        if any(_BATCHNORM_WORDS.search(x) for x in names):
            modules = [e.rpartition(".")[0] for e in by_pos.get(pos, []) if e.endswith(".weight")]
            out += [m for m in modules if m not in out]
    return out


def batchnorm_entries(model: nn.Module) -> list[str]:
    """The model's entries that a graph with folded BatchNorm cannot provide (every BatchNorm's state).

    Example:
        >>> src = tg.open("exported.onnx")
        >>> if src.folded_batchnorm: print(batchnorm_entries(model))
        ['bn1.weight', 'bn1.bias', 'bn1.running_mean', 'bn1.running_var', 'bn1.num_batches_tracked']
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    out: list[str] = []
    for prefix, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            dot = f"{prefix}." if prefix else ""
            out += [f"{dot}{k}" for k, _ in module.state_dict().items()]
    return out


def _loader(init: _Init, permute: bool):
    lock = threading.Lock()

    def load():
        with lock:
            return _to_torch(init, permute)

    return load
