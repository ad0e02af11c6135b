"""Generate the hostile-checkpoint corpus: malicious pickles and broken files, from code, never shipped as blobs.

    python tests/hostile/make_corpus.py OUT_DIR        # writes the files and OUT_DIR/manifest.json

Every malicious payload would create a marker file ``OUT_DIR/PWNED-<case>`` if it ever ran
(``os.system("touch ...")``, ``eval``, ``exec``, ``subprocess.call``, ``runpy``, a
``getattr(__import__("os"), "system")`` chain, ...). The tests load each file through
torchgraft in a subprocess and require the right error and no marker; a control run loads
the same payloads with ``torch.load(weights_only=False)`` and requires every marker, which
proves the payloads are live.

Each :class:`Case` says which path to open, with which options, and what must happen:
``unsafe`` (an ``UnsafeCheckpointError`` naming ``globals``), ``error`` (a ``CheckpointError``
whose message matches ``match``), ``plan_error`` (a ``PlanError``), ``scan-safe`` / ``scan-unsafe``
(``tg.scan``'s verdict) or ``ok`` (opens, every tensor loads). ``mode`` says which entry point
runs it (``open``, ``load``, ``scan``, ``convert``, ``plan``; see ``run_cases.py``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import random
import runpy
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

MARKER_PREFIX = "PWNED-"


@dataclass
class Case:
    name: str
    kind: str  # "malicious" | "broken" | "ok"
    path: str  # what to open, relative to the corpus directory
    expect: str  # "unsafe" | "error" | "ok"
    match: str = ""  # regex the error message must match
    globals: list[str] = field(default_factory=list)  # must all be named by the UnsafeCheckpointError
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments for tg.open
    live: bool = False  # a payload that torch.load(weights_only=False) executes (checked by the control run)
    control: str = ""  # the file the control run loads unsafely, when not ``path``
    mode: str = "open"  # open | load | scan | convert | plan: what run_cases.py does with it


CASES: list[Case] = []
_BUILDERS: dict[str, Callable[[Path, Case], None]] = {}


def case(name: str, kind: str, path: str, expect: str, **kw: Any):
    def register(build: Callable[[Path, Case], None]) -> Callable[[Path, Case], None]:
        CASES.append(Case(name, kind, path, expect, **kw))
        _BUILDERS[name] = build
        return build

    return register


# Payloads ----------------------------------------------------------------------------------------


class Payload:
    """An object whose unpickling calls ``func(*args)``; pickling it runs nothing."""

    def __init__(self, func: Callable[..., Any], *args: Any):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def marker(root: Path, c: Case) -> str:
    return str(root / f"{MARKER_PREFIX}{c.name}")


def touch_code(root: Path, c: Case) -> str:
    return f"open({marker(root, c)!r}, 'w').close()"


def _sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"layer.weight": torch.randn(3, 4, generator=g), "layer.bias": torch.randn(3, generator=g)}


def _u(s: str) -> bytes:
    """BINUNICODE opcode."""
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def raw_zip(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None) -> None:
    """A torch zip archive with a hand-written data.pkl (torch's own writer, so the layout is torch's)."""
    w = torch._C.PyTorchFileWriter(str(path))
    w.write_record("data.pkl", data_pkl, len(data_pkl))
    w.write_record("byteorder", b"little", 6)
    for name, blob in (records or {}).items():
        w.write_record(f"data/{name}", blob, len(blob))
    w.write_end_of_file()
    del w


class _StorageRef:
    def __init__(self, key: str, tensor: torch.Tensor):
        self.key, self.tensor = key, tensor


class TensorPickler(pickle.Pickler):
    """Pickles tensors the way torch.save does, with hooks to plant objects in the tensor records."""

    def __init__(self, f, *, storage_type: Any = None, hooks: Any = None, numel: int | None = None):
        super().__init__(f, protocol=2)
        self.records: dict[str, bytes] = {}
        self.storage_type, self.hooks, self.numel = storage_type, hooks, numel

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            key = str(len(self.records))
            t = obj.detach().contiguous()
            self.records[key] = t.numpy().tobytes()
            hooks = collections.OrderedDict() if self.hooks is None else self.hooks
            return (torch._utils._rebuild_tensor_v2, (_StorageRef(key, t), 0, tuple(t.shape), t.stride(), False, hooks))
        return NotImplemented

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            stype = self.storage_type if self.storage_type is not None else torch.FloatStorage
            numel = obj.tensor.numel() if self.numel is None else self.numel
            return ("storage", stype, obj.key, "cpu", numel)
        return None


def crafted_zip(path: Path, obj: Any, **kw: Any) -> None:
    import io

    buf = io.BytesIO()
    p = TensorPickler(buf, **kw)
    p.dump(obj)
    raw_zip(path, buf.getvalue(), p.records)


# Malicious: every container format -----------------------------------------------------------------


@case("zip_os_system", "malicious", "os_system.pt", "unsafe", globals=["posix.system"], live=True)
def _(root: Path, c: Case) -> None:
    torch.save({**_sd(), "x": Payload(os.system, f"touch {marker(root, c)}")}, root / c.path)


@case("zip_eval", "malicious", "eval.pth", "unsafe", globals=["builtins.eval"], live=True)
def _(root: Path, c: Case) -> None:
    torch.save({**_sd(), "x": Payload(eval, touch_code(root, c))}, root / c.path)


@case("zip_exec_nested_in_list", "malicious", "exec.bin", "unsafe", globals=["builtins.exec"], live=True)
def _(root: Path, c: Case) -> None:
    torch.save({**_sd(), "extra": [1, {"deep": (Payload(exec, touch_code(root, c)),)}]}, root / c.path)


@case("zip_subprocess_nested", "malicious", "subprocess.pt", "unsafe", globals=["subprocess.call"], live=True)
def _(root: Path, c: Case) -> None:
    payload = Payload(subprocess.call, ["touch", marker(root, c)])
    torch.save({"model": {"module": {**_sd(), "cfg": collections.OrderedDict(a=[payload])}}}, root / c.path)


@case("zip_runpy", "malicious", "runpy.pt", "unsafe", globals=["runpy._run_code"], live=True)
def _(root: Path, c: Case) -> None:  # a global that deny-list scanners have missed
    torch.save({**_sd(), "x": Payload(runpy._run_code, touch_code(root, c), {})}, root / c.path)


@case("zip_storage_type_is_payload", "malicious", "storage_record.pt", "unsafe", globals=["posix.system"], live=True)
def _(root: Path, c: Case) -> None:  # the payload sits in the tensor's storage record (persistent id)
    crafted_zip(root / c.path, _sd(), storage_type=Payload(os.system, f"touch {marker(root, c)}"))


@case("zip_rebuild_args_payload", "malicious", "rebuild_args.pt", "unsafe", globals=["builtins.eval"], live=True)
def _(root: Path, c: Case) -> None:  # the payload is an argument of torch._utils._rebuild_tensor_v2
    crafted_zip(root / c.path, _sd(), hooks=Payload(eval, touch_code(root, c)))


@case(
    "zip_getattr_import_chain",
    "malicious",
    "getattr_chain.pt",
    "unsafe",
    globals=["builtins.getattr", "builtins.__import__"],
    live=True,
)
def _(root: Path, c: Case) -> None:  # getattr(__import__("os"), "system")("touch ...") by hand
    data = (
        b"\x80\x02c__builtin__\ngetattr\n(c__builtin__\n__import__\n(" + _u("os") + b"tR" + _u("system") + b"tR("
        + _u(f"touch {marker(root, c)}") + b"tR."
    )  # fmt: skip
    raw_zip(root / c.path, data)


@case("zip_memo_hidden_global", "malicious", "memo.pt", "unsafe", globals=["posix.system"], live=True)
def _(root: Path, c: Case) -> None:  # the global is memoised, popped, and fetched back later
    # GLOBAL posix.system, BINPUT 0, POP, BINGET 0, (args), REDUCE
    data = b"\x80\x02cposix\nsystem\nq\x000h\x00(" + _u(f"touch {marker(root, c)}") + b"tR."
    raw_zip(root / c.path, data)


@case("zip_inst_opcode", "malicious", "inst.pt", "unsafe", globals=["os.system"], live=True)
def _(root: Path, c: Case) -> None:  # a protocol-0 INST opcode inside a protocol-2 pickle
    raw_zip(root / c.path, b"\x80\x02(" + _u(f"touch {marker(root, c)}") + b"ios\nsystem\n.")


@case("legacy_os_system", "malicious", "legacy.pth", "unsafe", globals=["posix.system"], live=True)
def _(root: Path, c: Case) -> None:
    obj = {**_sd(), "x": Payload(os.system, f"touch {marker(root, c)}")}
    torch.save(obj, root / c.path, _use_new_zipfile_serialization=False)


@case("legacy_nested_exec", "malicious", "legacy_nested.bin", "unsafe", globals=["builtins.exec"], live=True)
def _(root: Path, c: Case) -> None:
    obj = collections.OrderedDict(state_dict=_sd(), meta=[{"x": Payload(exec, touch_code(root, c))}])
    torch.save(obj, root / c.path, _use_new_zipfile_serialization=False)


@case("plain_pickle_protocol2", "malicious", "plain.pkl", "unsafe", globals=["posix.system"], live=True)
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(pickle.dumps({"w": Payload(os.system, f"touch {marker(root, c)}")}, protocol=2))


@case("plain_pickle_protocol4_stack_global", "malicious", "plain4.pkl", "unsafe", globals=["posix.system"], live=True)
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(pickle.dumps({"w": Payload(os.system, f"touch {marker(root, c)}")}, protocol=4))


@case("lightning_ckpt_hparams_payload", "malicious", "lightning.ckpt", "unsafe", globals=["posix.system"], live=True)
def _(root: Path, c: Case) -> None:
    torch.save(
        {
            "epoch": 3, "global_step": 100, "pytorch-lightning_version": "2.4.0", "state_dict": _sd(),
            "optimizer_states": [], "lr_schedulers": [], "hparams_name": "kwargs",
            "hyper_parameters": {"lr": 0.1, "cb": Payload(os.system, f"touch {marker(root, c)}")},
        },
        root / c.path,
    )  # fmt: skip


@case(
    "sharded_index_malicious_shard", "malicious", "sharded/pytorch_model.bin.index.json", "unsafe",
    globals=["builtins.eval"], match=r"pytorch_model-00002-of-00002\.bin' \(read as torch-zip\)", live=True,
    control="sharded/pytorch_model-00002-of-00002.bin",
)  # fmt: skip
def _(root: Path, c: Case) -> None:
    d = root / "sharded"
    d.mkdir()
    sd = _sd()
    torch.save({"layer.weight": sd["layer.weight"]}, d / "pytorch_model-00001-of-00002.bin")
    torch.save(
        {"layer.bias": sd["layer.bias"], "x": Payload(eval, touch_code(root, c))},
        d / "pytorch_model-00002-of-00002.bin",
    )
    weight_map = {"layer.weight": "pytorch_model-00001-of-00002.bin", "layer.bias": "pytorch_model-00002-of-00002.bin"}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@case(
    "directory_malicious_weights",
    "malicious",
    "evil_dir",
    "unsafe",
    globals=["posix.system"],
    live=True,
    control="evil_dir/pytorch_model.bin",
)
def _(root: Path, c: Case) -> None:
    (root / "evil_dir").mkdir()
    (root / "evil_dir" / "config.json").write_text("{}")
    torch.save({**_sd(), "x": Payload(os.system, f"touch {marker(root, c)}")}, root / "evil_dir" / "pytorch_model.bin")


# Refused but harmless: the error says how to allow them -------------------------------------------


@case(
    "whole_model_pickle",
    "ok",
    "whole_model.pt",
    "unsafe",
    globals=["torch.nn.modules.linear.Linear"],
    match=r"allow_globals=\[\.\.\.\]",
)
def _(root: Path, c: Case) -> None:
    torch.save(torch.nn.Linear(2, 2), root / c.path)


@case(
    "lightning_namespace_refused",
    "ok",
    "namespace.ckpt",
    "unsafe",
    globals=["argparse.Namespace"],
    match=r"allow_globals",
)
def _(root: Path, c: Case) -> None:
    torch.save(
        {"epoch": 1, "state_dict": _sd(), "hyper_parameters": argparse.Namespace(lr=0.1, layers=[1, 2])}, root / c.path
    )


@case("lightning_namespace_allowed", "ok", "namespace.ckpt", "ok", options={"allow_globals": ["argparse.Namespace"]})
def _(root: Path, c: Case) -> None:
    pass  # same file as the case above


@case(
    "allow_globals_refuses_code",
    "ok",
    "namespace.ckpt",
    "invalid_option",
    match=r"refusing to allow os.system, posix.system: it runs code",
    options={"allow_globals": ["os.system"]},
)
def _(root: Path, c: Case) -> None:
    pass  # allow-listing something that runs code is refused before the file is read


# Broken safetensors ---------------------------------------------------------------------------------


def _st_bytes(header: Any, data: bytes, *, length: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def _f32(*shape: int, begin: int = 0) -> dict[str, Any]:
    n = 4
    for d in shape:
        n *= d
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + n]}


def _valid_st(root: Path) -> bytes:
    p = root / "_valid.safetensors"
    save_file(_sd(), p)
    return p.read_bytes()


def st_case(name: str, match: str, options: dict[str, Any] | None = None):
    return case(name, "broken", f"{name}.safetensors", "error", match=match, options=options or {})


@case("empty_file", "broken", "empty.safetensors", "error", match=r"the file is empty")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(b"")


@case("random_bytes", "broken", "random.bin", "error", match=r"not a checkpoint format torchgraft knows")
def _(root: Path, c: Case) -> None:
    data = bytearray(random.Random(7).randbytes(4096))
    data[0], data[8] = 0x01, 0x00  # neither a pickle, a zip nor a safetensors header
    (root / c.path).write_bytes(bytes(data))


@st_case("st_truncated", r"outside the \d+-byte data block \(truncated\?\)")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(_valid_st(root)[:-7])


@st_case("st_header_length_past_eof", r"the header claims \d+ bytes but the file holds only \d+")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(_st_bytes({"a": _f32(1)}, b"\0" * 4, length=10_000))


@st_case("st_header_length_absurd", r"the header claims 9223372036854775808 bytes, more than the 100000000")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(_st_bytes({"a": _f32(1)}, b"\0" * 4, length=1 << 63))


@st_case("st_header_not_object", r"the header is a JSON list, not an object", {"format": "safetensors"})
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(_st_bytes([1, 2, 3], b""))


@st_case("st_header_invalid_json", r"the header is not valid JSON \(Expecting")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(_st_bytes(b'{"a": {"dtype": "F32", ', b""))


@st_case("st_header_invalid_utf8", r"the header is not valid JSON")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(_st_bytes(b'{"\xff\xfe": 1}', b""))


@st_case("st_header_deep_nesting", r"the header is not valid JSON \(nested too deeply\)")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(_st_bytes(b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}", b""))


@st_case("st_header_huge_integer", r"the header is not valid JSON \(Exceeds the limit")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(
        _st_bytes(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 10_000 + b'], "data_offsets": [0, 4]}}', b"\0" * 4)
    )


@st_case("st_offsets_out_of_range", r"entry 'b' points at bytes 4\.\.1000004, outside the 8-byte data block")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(
        _st_bytes({"a": _f32(1), "b": {"dtype": "U8", "shape": [1_000_000], "data_offsets": [4, 1_000_004]}}, b"\0" * 8)
    )


@st_case("st_offsets_negative", r"entry 'a' points at bytes -4\.\.0, outside")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(_st_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4))


@st_case("st_offsets_overlap", r"entries 'a' and 'b' overlap in the data block")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(_st_bytes({"a": _f32(2), "b": _f32(2, begin=4)}, b"\0" * 12))


@st_case("st_offsets_gap", r"entry 'b' starts at byte 8 of the data block, but the previous entry ends at 4 \(a gap\)")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(_st_bytes({"a": _f32(1), "b": _f32(1, begin=8)}, b"\0" * 12))


@st_case("st_trailing_bytes", r"the entries cover 4 of the 20 bytes in the data block")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(_st_bytes({"a": _f32(1)}, b"\0" * 20))


@st_case("st_unknown_dtype", r"entry 'a' has unknown dtype 'F33'")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(_st_bytes({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4))


@st_case("st_dtype_not_a_string", r"entry 'a' has unknown dtype \['F32'\]")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(_st_bytes({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4))


@st_case("st_shape_size_disagree", r"entry 'a' has shape \[3, 3\] \(36 bytes as F32\) but spans 16 bytes")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(
        _st_bytes({"a": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 16]}}, b"\0" * 16)
    )


@st_case(
    "st_shape_huge", r"entry 'a' has shape \[1099511627776, 1099511627776\] \(\d+ bytes as F32\) but spans 4 bytes"
)
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(
        _st_bytes({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, b"\0" * 4)
    )


@st_case("st_shape_negative", r"entry 'a' has an invalid shape \[-1\]")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(_st_bytes({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4))


@st_case("st_duplicate_name", r"the header names 'a' twice")
def _(root: Path, c: Case) -> None:
    h = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    (root / c.path).write_bytes(_st_bytes(h, b"\0" * 4))


@st_case("st_metadata_not_strings", r"'__metadata__' must map strings to strings")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(_st_bytes({"__metadata__": {"epoch": 3}, "a": _f32(1)}, b"\0" * 4))


@st_case("st_entry_not_object", r"entry 'a' lacks dtype, shape or data_offsets")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(_st_bytes({"a": [0, 4]}, b"\0" * 4))


# Broken torch zips -----------------------------------------------------------------------------------


def _valid_zip(root: Path) -> bytes:
    p = root / "_valid.pt"
    torch.save(_sd(), p)
    return p.read_bytes()


_ZIP_HINT = r"(?s)\(read as torch-zip\).*Try: the file is truncated or damaged"


@case("zip_truncated", "broken", "zip_truncated.pt", "error", match=_ZIP_HINT)
def _(root: Path, c: Case) -> None:
    data = _valid_zip(root)
    (root / c.path).write_bytes(data[: len(data) // 2])


@case(
    "zip_central_directory_corrupt",
    "broken",
    "zip_cd.pt",
    "error",
    match=r"\(read as torch-zip\): the zip archive is truncated or damaged \(BadZipFile",
)
def _(root: Path, c: Case) -> None:
    data = bytearray(_valid_zip(root))
    cd = data.find(b"PK\x01\x02")  # first central directory entry: break its signature
    data[cd : cd + 4] = b"XXXX"
    (root / c.path).write_bytes(bytes(data))


@case("zip_record_past_eof", "broken", "zip_offset.pt", "error", match=r"record '.*' reaches past the end of the file")
def _(root: Path, c: Case) -> None:
    data = bytearray(_valid_zip(root))
    cd = data.rfind(b"PK\x01\x02")  # last central directory entry: its local header lies past the end
    data[cd + 42 : cd + 46] = struct.pack("<I", len(data) + 1000)
    (root / c.path).write_bytes(bytes(data))


@case(
    "zip_without_data_pkl",
    "broken",
    "zip_nopkl.pt",
    "error",
    match=r"has no archive/data\.pkl, so it is not a torch checkpoint",
)
def _(root: Path, c: Case) -> None:
    with zipfile.ZipFile(root / c.path, "w") as zf:
        zf.writestr("archive/readme.txt", "hello")


@case(
    "zip_storage_record_short",
    "broken",
    "zip_short.pt",
    "error",
    match=r"'data/0' holds 8 bytes, but data\.pkl declares 12 x torch\.FloatStorage = 48 bytes",
)
def _(root: Path, c: Case) -> None:  # with mmap, torch would read the next record's bytes as this tensor
    import io

    buf = io.BytesIO()
    p = TensorPickler(buf)
    p.dump(_sd())
    p.records["0"] = p.records["0"][:8]
    raw_zip(root / c.path, buf.getvalue(), p.records)


@case(
    "zip_storage_numel_huge",
    "broken",
    "zip_numel.pt",
    "error",
    match=r"declares 1152921504606846976 x torch\.FloatStorage",
)
def _(root: Path, c: Case) -> None:
    crafted_zip(root / c.path, {"w": torch.zeros(4)}, numel=1 << 60)


@case(
    "zip_storage_record_missing",
    "broken",
    "zip_norecord.pt",
    "error",
    match=r"names the tensor storage 'data/0', which the archive does not hold",
)
def _(root: Path, c: Case) -> None:
    import io

    buf = io.BytesIO()
    TensorPickler(buf).dump({"w": torch.zeros(4)})
    raw_zip(root / c.path, buf.getvalue(), {})


@case("zip_bomb", "broken", "zip_bomb.pt", "error", match=r"would inflate from \d+ to \d+ bytes \(a zip bomb\?\)")
def _(root: Path, c: Case) -> None:
    src = zipfile.ZipFile(_write_valid_zip(root))
    with zipfile.ZipFile(root / c.path, "w") as out:
        for info in src.infolist():
            if info.filename.endswith("data.pkl"):
                zi = zipfile.ZipInfo(info.filename)
                zi.compress_type = zipfile.ZIP_DEFLATED
                with out.open(zi, "w", force_zip64=True) as f:  # streamed: the 64 MiB never exist in memory
                    f.write(src.read(info))
                    zeros = b"\0" * (1 << 20)
                    for _ in range(64):
                        f.write(zeros)
            else:
                out.writestr(info, src.read(info))
    src.close()


def _write_valid_zip(root: Path) -> Path:
    _valid_zip(root)
    return root / "_valid.pt"


@case(
    "zip_duplicate_records",
    "broken",
    "zip_dup.pt",
    "error",
    match=r"the archive holds two records named 'zip_dup/data\.pkl'",
)
def _(root: Path, c: Case) -> None:
    import warnings

    src = zipfile.ZipFile(_write_valid_zip(root))
    with warnings.catch_warnings(), zipfile.ZipFile(root / c.path, "w") as out:
        warnings.simplefilter("ignore")  # "Duplicate name"
        for info in src.infolist():
            name = info.filename.replace("_valid/", "zip_dup/")
            out.writestr(name, src.read(info))
        out.writestr("zip_dup/data.pkl", pickle.dumps({"other": 1}, protocol=2))
    src.close()


@case(
    "zip_unsupported_compression",
    "broken",
    "zip_bzip2.pt",
    "error",
    match=r"uses compression method 12, which torch cannot read",
)
def _(root: Path, c: Case) -> None:
    src = zipfile.ZipFile(_write_valid_zip(root))
    with zipfile.ZipFile(root / c.path, "w") as out:
        for info in src.infolist():
            kind = zipfile.ZIP_BZIP2 if info.filename.endswith("data.pkl") else zipfile.ZIP_STORED
            out.writestr(info.filename, src.read(info), compress_type=kind)
    src.close()


@case("zip_tensor_view_out_of_bounds", "broken", "zip_view.pt", "error", match=r"\(read as torch-zip\): RuntimeError")
def _(root: Path, c: Case) -> None:  # size 1000x1000 over a 4-element storage
    data = (
        b"\x80\x02}" + _u("w") + b"ctorch._utils\n_rebuild_tensor_v2\n((" + _u("storage") + b"ctorch\nFloatStorage\n"
        + _u("0") + _u("cpu") + b"K\x04tQK\x00M\xe8\x03M\xe8\x03\x86M\xe8\x03K\x01\x86\x89ccollections\nOrderedDict\n)RtRs."
    )  # fmt: skip
    raw_zip(root / c.path, data, {"0": b"\0" * 16})


@case("zip_tensor_negative_stride", "broken", "zip_stride.pt", "error", match=r"\(read as torch-zip\): RuntimeError")
def _(root: Path, c: Case) -> None:
    data = (
        b"\x80\x02}" + _u("w") + b"ctorch._utils\n_rebuild_tensor_v2\n((" + _u("storage") + b"ctorch\nFloatStorage\n"
        + _u("0") + _u("cpu") + b"K\x04tQK\x00K\x04\x85J\xff\xff\xff\xff\x85\x89ccollections\nOrderedDict\n)RtRs."
    )  # fmt: skip
    raw_zip(root / c.path, data, {"0": b"\0" * 16})


@case("zip_cyclic_containers", "broken", "zip_cycle.pt", "ok")
def _(root: Path, c: Case) -> None:  # {"w": t, "model": <itself>}: the cycle is skipped, the tensor found
    d: dict[str, Any] = dict(_sd())
    d["model"] = d
    torch.save(d, root / c.path)


@case("zip_deep_nesting", "broken", "zip_deep.pt", "error", match=r"no state dict found; top-level keys are 'model'")
def _(root: Path, c: Case) -> None:
    obj: dict[str, Any] = dict(_sd())
    for _ in range(5000):
        obj = {"model": obj}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)
    try:
        torch.save(obj, root / c.path)
    finally:
        sys.setrecursionlimit(limit)


def _shared_dag(levels: int, fan_out: int) -> dict[str, Any]:
    """A dict tree whose levels all point at one child: tiny as a pickle, astronomically big as a tree."""
    node: dict[str, Any] = {"w": torch.zeros(2)}
    for _ in range(levels):
        node = {str(i): node for i in range(fan_out)}
    return node


@case(
    "zip_shared_reference_bomb_container",
    "broken",
    "zip_laughs.pt",
    "error",
    match=r"no state dict found; top-level keys are 'model', 'epoch'",
)
def _(root: Path, c: Case) -> None:  # 16**12 paths: walking them one by one would never end
    torch.save({"model": _shared_dag(12, 16), "epoch": 1}, root / c.path)


@case("zip_shared_reference_bomb_in_state_dict", "broken", "zip_laughs_sd.pt", "ok")
def _(root: Path, c: Case) -> None:  # flattened once per distinct dict, repeats skipped
    torch.save({"state_dict": {**_sd(), "extra": _shared_dag(12, 16)}}, root / c.path)


@case("zip_hostile_module_metadata", "broken", "zip_meta.pt", "ok")
def _(root: Path, c: Case) -> None:  # a _metadata that is not {module: {version: n}} is ignored, not trusted
    sd = collections.OrderedDict(_sd())
    sd._metadata = {"layer": 5}  # type: ignore[attr-defined]
    torch.save(sd, root / c.path)


# Broken legacy pickles -------------------------------------------------------------------------------


def _valid_legacy(root: Path) -> bytes:
    p = root / "_valid_legacy.pth"
    torch.save(_sd(), p, _use_new_zipfile_serialization=False)
    return p.read_bytes()


@case("legacy_truncated", "broken", "legacy_truncated.pth", "error", match=r"\(read as torch-legacy\)")
def _(root: Path, c: Case) -> None:
    data = _valid_legacy(root)
    (root / c.path).write_bytes(data[: len(data) - 20])


@case(
    "legacy_storage_numel_huge",
    "broken",
    "legacy_numel.pth",
    "error",
    match=r"the pickle declares \d+ bytes of tensor data, but the file holds only \d+ bytes",
)
def _(root: Path, c: Case) -> None:  # torch would allocate the declared size before reading
    data = _valid_legacy(root)
    i = data.index(b"cpu") + 3  # after the first storage's location string comes its numel
    j = data.index(b"K\x0c", i)  # 12 elements (layer.weight) as BININT1
    (root / c.path).write_bytes(data[:j] + b"\x8a\x08" + struct.pack("<q", 1 << 50) + data[j + 2 :])


@case(
    "legacy_storage_key_garbled",
    "broken",
    "legacy_keys.pth",
    "error",
    match=r"\(read as torch-legacy\): the storages \[.\d+.\] have no record in the file",
)
def _(root: Path, c: Case) -> None:
    import io
    import pickletools

    data = bytearray(_valid_legacy(root))
    stream = io.BytesIO(bytes(data))
    for _ in range(4):  # magic number, protocol, sys info, payload
        for op, _arg, _pos in pickletools.genops(stream):
            if op.name == "STOP":
                break
    # the fifth pickle lists the storage keys as decimal strings: change the first digit of the first one
    for op, _arg, pos in pickletools.genops(stream):
        if op.name == "BINUNICODE":
            first = pos + 5
            data[first] = ord("9") if data[first] != ord("9") else ord("8")
            break
    (root / c.path).write_bytes(bytes(data))


class _LegacyRef:
    """A storage reference in a crafted legacy payload: key, storage class, declared numel."""

    def __init__(self, key: str, storage_type: Any, numel: int):
        self.key, self.storage_type, self.numel = key, storage_type, numel


class _LegacyTensor:
    """Pickles as ``_rebuild_tensor_v2(storage, offset, size, stride, ...)`` with whatever size it is given."""

    def __init__(self, ref: _LegacyRef, size: tuple[int, ...], offset: int = 0):
        self.ref, self.size, self.offset = ref, size, offset

    def __reduce__(self):
        stride, step = [], 1
        for n in reversed(self.size):
            stride.insert(0, step)
            step *= n
        args = (self.ref, self.offset, self.size, tuple(stride), False, collections.OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args)


def crafted_legacy(obj: Any, records: dict[str, tuple[int, bytes]], *, misalign: int = 0) -> bytes:
    """A legacy (non-zip) torch file written by hand: ``records`` maps key -> (numel in the header, bytes).

    ``misalign`` > 0 pads the payload (a ``"pad"`` string in ``obj``) until the first record's data
    offset is ``misalign`` bytes past a multiple of 8, so the reader must copy it rather than map it.
    """
    import io

    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    class P(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _LegacyRef):
                return ("storage", o.storage_type, o.key, "cpu", o.numel, None)
            return None

    sys_info = {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}  # fmt: skip
    for pad in range(16):
        buf = io.BytesIO()
        for head in (MAGIC_NUMBER, PROTOCOL_VERSION, sys_info):
            pickle.dump(head, buf, protocol=2)
        payload = dict(obj, pad="x" * pad) if misalign else obj
        P(buf, protocol=2).dump(payload)
        pickle.dump(list(records), buf, protocol=2)
        if not misalign or (buf.tell() + 8) % 8 == misalign:
            break
    for numel, blob in records.values():
        buf.write(struct.pack("<q", numel) + blob)
    return buf.getvalue()


@case(
    "legacy_tensor_larger_than_copied_storage",
    "broken",
    "legacy_view_too_large.pth",
    "error",
    match=r"\(read as torch-legacy\): a tensor reaches past the end of its storage",
)
def _(root: Path, c: Case) -> None:  # torch would reallocate the storage its threaded read was queued for
    ref = _LegacyRef("0", torch.DoubleStorage, 2)
    obj = {"layer.weight": _LegacyTensor(ref, (1 << 16,))}
    (root / c.path).write_bytes(crafted_legacy(obj, {"0": (2, struct.pack("<2d", 1.0, 2.0))}, misalign=4))


@case(
    "legacy_tensor_offset_past_copied_storage",
    "broken",
    "legacy_view_offset.pth",
    "error",
    match=r"\(read as torch-legacy\): a tensor reaches past the end of its storage",
)
def _(root: Path, c: Case) -> None:
    ref = _LegacyRef("0", torch.DoubleStorage, 2)
    obj = {"layer.weight": _LegacyTensor(ref, (2,), offset=1000)}
    (root / c.path).write_bytes(crafted_legacy(obj, {"0": (2, struct.pack("<2d", 1.0, 2.0))}, misalign=4))


@case(
    "legacy_storage_two_dtypes",
    "broken",
    "legacy_two_dtypes.pth",
    "error",
    match=r"storage '0' is declared twice, as 2 x torch\.DoubleStorage and as 4 x torch\.FloatStorage",
)
def _(root: Path, c: Case) -> None:  # same bytes, two element types: torch keeps the first, a reader must not mix
    obj = {
        "layer.weight": _LegacyTensor(_LegacyRef("0", torch.DoubleStorage, 2), (2,)),
        "layer.bias": _LegacyTensor(_LegacyRef("0", torch.FloatStorage, 4), (4,)),
    }
    (root / c.path).write_bytes(crafted_legacy(obj, {"0": (2, struct.pack("<2d", 1.0, 2.0))}, misalign=4))


@case(
    "legacy_storage_two_sizes",
    "broken",
    "legacy_two_sizes.pth",
    "error",
    match=r"storage '0' is declared twice, as 2 x torch\.DoubleStorage and as 4096 x torch\.DoubleStorage",
)
def _(root: Path, c: Case) -> None:
    obj = {
        "layer.weight": _LegacyTensor(_LegacyRef("0", torch.DoubleStorage, 2), (2,)),
        "layer.bias": _LegacyTensor(_LegacyRef("0", torch.DoubleStorage, 4096), (4096,)),
    }
    (root / c.path).write_bytes(crafted_legacy(obj, {"0": (2, struct.pack("<2d", 1.0, 2.0))}, misalign=4))


@case("legacy_crafted_control_ok", "ok", "legacy_crafted_ok.pth", "ok")
def _(root: Path, c: Case) -> None:  # the same writer, valid: proves the cases above fail for their one defect
    w, b = _LegacyRef("0", torch.FloatStorage, 12), _LegacyRef("1", torch.FloatStorage, 3)
    obj = {"layer.weight": _LegacyTensor(w, (3, 4)), "layer.bias": _LegacyTensor(b, (3,))}
    records = {"0": (12, struct.pack("<12f", *range(12))), "1": (3, struct.pack("<3f", 1, 2, 3))}
    (root / c.path).write_bytes(crafted_legacy(obj, records, misalign=2))


@case(
    "plain_pickle_unsupported_opcodes",
    "broken",
    "plain_p4.pkl",
    "error",
    match=r"does not support \(Unsupported operand \d+\)",
    options={"format": "torch-legacy"},
)
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(pickle.dumps(collections.OrderedDict(a=1), protocol=4))


# Broken indexes --------------------------------------------------------------------------------------


def _index_dir(root: Path, name: str, weight_map: Any, *, raw: str | None = None) -> Path:
    d = root / name
    d.mkdir()
    save_file(_sd(), d / "model-00001-of-00001.safetensors")
    text = raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map})
    (d / "model.safetensors.index.json").write_text(text)
    return d


def index_case(name: str, match: str, expect: str = "error"):
    return case(name, "broken", f"{name}/model.safetensors.index.json", expect, match=match)


_OK_MAP = {"layer.weight": "model-00001-of-00001.safetensors", "layer.bias": "model-00001-of-00001.safetensors"}


@index_case("index_invalid_json", r"the index is not valid JSON")
def _(root: Path, c: Case) -> None:
    _index_dir(root, c.name, None, raw='{"weight_map": {"a": ')


@index_case("index_not_an_object", r"the index has no 'weight_map' object")
def _(root: Path, c: Case) -> None:
    _index_dir(root, c.name, None, raw="[1, 2, 3]")


@index_case("index_weight_map_wrong_types", r"the index has no 'weight_map' object")
def _(root: Path, c: Case) -> None:
    _index_dir(root, c.name, {"layer.weight": 3})


@index_case("index_deep_nesting", r"the index is not valid JSON \(nested too deeply\)")
def _(root: Path, c: Case) -> None:
    _index_dir(root, c.name, None, raw='{"weight_map": ' + "[" * 200_000 + "]" * 200_000 + "}")


@index_case("index_missing_shard", r"shard 'model-00002-of-00002\.safetensors' named by the index does not exist")
def _(root: Path, c: Case) -> None:
    _index_dir(root, c.name, {**_OK_MAP, "layer.bias": "model-00002-of-00002.safetensors"})


@index_case("index_shard_dotdot", r"shard '\.\./outside\.safetensors' lies outside")
def _(root: Path, c: Case) -> None:
    save_file(_sd(), root / "outside.safetensors")
    _index_dir(root, c.name, {"layer.weight": "../outside.safetensors"})


@index_case("index_shard_absolute", r"shard '/etc/passwd' lies outside")
def _(root: Path, c: Case) -> None:
    _index_dir(root, c.name, {"layer.weight": "/etc/passwd"})


@index_case("index_shard_symlink_out", r"shard 'linked\.safetensors' lies outside .* \(a symlink leads to")
def _(root: Path, c: Case) -> None:
    save_file(_sd(), root / "elsewhere.safetensors")
    d = _index_dir(root, c.name, {"layer.weight": "linked.safetensors"})
    (d / "linked.safetensors").symlink_to(root / "elsewhere.safetensors")


@index_case("index_shard_is_the_index", r"is itself an index; shards must be weight files")
def _(root: Path, c: Case) -> None:  # would recurse without end
    _index_dir(root, c.name, {"layer.weight": "model.safetensors.index.json"})


@index_case("index_shard_is_a_directory", r"shard 'subdir' named by the index is not a regular file")
def _(root: Path, c: Case) -> None:
    d = _index_dir(root, c.name, {"layer.weight": "subdir"})
    (d / "subdir").mkdir()


@index_case("index_shard_name_nul", r"is not a file name")
def _(root: Path, c: Case) -> None:
    _index_dir(root, c.name, {"layer.weight": "model\u0000.safetensors"})


@index_case(
    "index_shard_lacks_tensor",
    r"puts 'layer.extra' in 'model-00001-of-00001\.safetensors', but that shard does not hold it",
)
def _(root: Path, c: Case) -> None:
    _index_dir(root, c.name, {**_OK_MAP, "layer.extra": "model-00001-of-00001.safetensors"})


@index_case("index_shard_broken", r"model-00001-of-00001\.safetensors' \(read as safetensors\): the entries cover")
def _(root: Path, c: Case) -> None:  # the error names the shard, not only the index
    d = _index_dir(root, c.name, _OK_MAP)
    with (d / "model-00001-of-00001.safetensors").open("ab") as f:
        f.write(b"\0" * 8)


@index_case(
    "index_shard_not_weights", r"shard\.bin': not a safetensors file or a torch checkpoint \(first bytes: b'\{\"weight'"
)
def _(root: Path, c: Case) -> None:  # a shard that holds an index's JSON is not read as one
    d = _index_dir(root, c.name, {"layer.weight": "shard.bin"})
    (d / "shard.bin").write_text(json.dumps({"weight_map": {"layer.weight": "shard.bin"}}))


@index_case("index_shard_is_dcp_metadata", r"\.metadata': not a safetensors file or a torch checkpoint")
def _(root: Path, c: Case) -> None:  # a shard is never opened as a checkpoint directory
    d = _index_dir(root, c.name, {"layer.weight": ".metadata"})
    (d / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}, protocol=2)[2:])


@case("hf_cache_snapshot_symlinks", "ok", "hf/models--org--m/snapshots/abc123/model.safetensors.index.json", "ok")
def _(root: Path, c: Case) -> None:  # a Hugging Face cache: snapshot files are symlinks into ../../blobs
    repo = root / "hf" / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file(_sd(), repo / "blobs" / "1111")
    (repo / "blobs" / "2222").write_text(json.dumps({"weight_map": _OK_MAP}))
    (snap / "model-00001-of-00001.safetensors").symlink_to("../../blobs/1111")
    (snap / "model.safetensors.index.json").symlink_to("../../blobs/2222")


@case(
    "hf_cache_blobs_symlinked_out",
    "broken",
    "hf2/models--org--m/snapshots/abc123/model.safetensors.index.json",
    "error",
    match=r"lies outside .* \(a symlink leads to",
)
def _(root: Path, c: Case) -> None:  # a fake cache whose blobs/ leads elsewhere is not trusted
    repo = root / "hf2" / "models--org--m"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (root / "hf2_elsewhere").mkdir()
    save_file(_sd(), root / "hf2_elsewhere" / "1111")
    (repo / "blobs").symlink_to(root / "hf2_elsewhere")
    (snap / "model-00001-of-00001.safetensors").symlink_to("../../blobs/1111")
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": _OK_MAP}))


@case("fifo_instead_of_file", "broken", "pipe.safetensors", "error", match=r"not a regular file or directory")
def _(root: Path, c: Case) -> None:  # reading it would block for ever
    os.mkfifo(root / c.path)


# ONNX and TensorFlow checkpoints (issue 15) -----------------------------------------------------


def _onnx_model(path: Path, *, external: str | None = None) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    sd = _sd()  # torch-style names are kept: layer.weight (stored [in, out] for MatMul), layer.bias
    w = numpy_helper.from_array(sd["layer.weight"].T.contiguous().numpy(), name="layer.weight")
    b = numpy_helper.from_array(sd["layer.bias"].numpy(), name="layer.bias")
    nodes = [
        helper.make_node("MatMul", ["x", "layer.weight"], ["h"]),
        helper.make_node("Add", ["h", "layer.bias"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if external is None:
        onnx.save(model, str(path))
    else:
        onnx.save(model, str(path), save_as_external_data=True, location=external, size_threshold=0)


def _onnx_relocate(path: Path, **fields: str) -> None:
    """Rewrite the external data fields (location, offset, length) of every initializer."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key in fields:
                e.value = fields[e.key]
        for key in fields.keys() - {e.key for e in t.external_data}:
            t.external_data.add(key=key, value=fields[key])
    onnx.save(model, str(path))


@case("onnx_control_ok", "ok", "onnx_ok/m.onnx", "ok")
def _(root: Path, c: Case) -> None:
    (root / "onnx_ok").mkdir()
    _onnx_model(root / c.path, external="m.data")


@case("onnx_external_data_escapes", "broken", "onnx_escape/m.onnx", "error", match=r"keeps its data in '\.\./")
def _(root: Path, c: Case) -> None:  # reading ../secret would leak any file next to the model's folder
    (root / "onnx_escape").mkdir()
    _onnx_model(root / c.path, external="m.data")
    (root / "secret").write_bytes(b"\0" * 48)
    _onnx_relocate(root / c.path, location="../secret")


@case("onnx_external_data_symlink_out", "broken", "onnx_link/m.onnx", "error", match=r"which leads to")
def _(root: Path, c: Case) -> None:
    (root / "onnx_link").mkdir()
    _onnx_model(root / c.path, external="m.data")
    (root / "onnx_link_target").write_bytes((root / "onnx_link" / "m.data").read_bytes())
    (root / "onnx_link" / "m.data").unlink()
    (root / "onnx_link" / "m.data").symlink_to(root / "onnx_link_target")


@case("onnx_external_data_past_end", "broken", "onnx_past/m.onnx", "error", match=r"spans bytes 4611686018427387904")
def _(root: Path, c: Case) -> None:
    (root / "onnx_past").mkdir()
    _onnx_model(root / c.path, external="m.data")
    _onnx_relocate(root / c.path, offset=str(1 << 62), length="48")


@case("onnx_truncated", "broken", "onnx_truncated.onnx", "error", match=r"\(read as onnx\): not a valid ONNX model")
def _(root: Path, c: Case) -> None:
    _onnx_model(root / c.path)
    data = (root / c.path).read_bytes()
    (root / c.path).write_bytes(data[: len(data) - 30])


@case("onnx_huge_shape", "broken", "onnx_huge.onnx", "error", match=r"has shape \[1099511627776, 1099511627776\]")
def _(root: Path, c: Case) -> None:  # 2**80 elements claimed over 48 bytes: refused before any allocation
    import onnx

    _onnx_model(root / c.path)
    model = onnx.load(str(root / c.path))
    model.graph.initializer[0].dims[:] = [1 << 40, 1 << 40]
    onnx.save(model, str(root / c.path))


@case("onnx_random_bytes", "broken", "onnx_random.onnx", "error", match=r"\(read as onnx\)")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(random.Random(15).randbytes(4096))


def _tf_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _tf_masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tf_entry(shape: list[int], offset: int, size: int, crc: int) -> bytes:
    """A BundleEntryProto (DT_FLOAT), encoded by hand from tensor_bundle.proto's field numbers."""
    dims = b"".join(b"\x12" + _tf_varint(len(d)) + d for d in (b"\x08" + _tf_varint(n) for n in shape))
    return (
        b"\x08\x01\x12" + _tf_varint(len(dims)) + dims
        + b"\x20" + _tf_varint(offset) + b"\x28" + _tf_varint(size) + b"\x35" + struct.pack("<I", crc)
    )  # fmt: skip


def _tf_bundle(prefix: Path, rows: list[tuple[bytes, bytes]], data: bytes, *, index_at: int | None = None) -> None:
    """PREFIX.index (an SSTable: one data block, an empty metaindex, an index block, the footer) + PREFIX.data-*."""
    prefix.with_name(prefix.name + ".data-00000-of-00001").write_bytes(data)

    def block(entries: list[tuple[bytes, bytes]]) -> bytes:
        body = b"".join(_tf_varint(0) + _tf_varint(len(k)) + _tf_varint(len(v)) + k + v for k, v in entries)
        return body + struct.pack("<II", 0, 1)

    out = bytearray()

    def put(contents: bytes) -> bytes:
        handle = _tf_varint(len(out)) + _tf_varint(len(contents))
        out.extend(contents + b"\x00" + struct.pack("<I", _tf_masked_crc(contents + b"\x00")))
        return handle

    data_handle = put(block(rows))
    if index_at is not None:
        data_handle = _tf_varint(index_at) + _tf_varint(64)
    meta = put(block([]))
    index = put(block([(rows[-1][0], data_handle)]))
    footer = (meta + index).ljust(40, b"\x00") + struct.pack("<Q", 0xDB4775248B80FB57)
    prefix.with_name(prefix.name + ".index").write_bytes(bytes(out) + footer)


_TF_KEY = b"layer/kernel/.ATTRIBUTES/VARIABLE_VALUE"
_TF_BIAS = b"layer/bias/.ATTRIBUTES/VARIABLE_VALUE"
_TF_HEADER = (b"", b"\x08\x01")  # BundleHeaderProto{num_shards: 1}


def _tf_ok(prefix: Path, **entry: Any) -> None:
    """A Dense layer: kernel [4, 3] (read as layer.weight [3, 4]) and bias [3]; ``entry`` overrides the kernel's fields."""
    sd = _sd()
    kernel, bias = sd["layer.weight"].T.contiguous().numpy().tobytes(), sd["layer.bias"].numpy().tobytes()
    fields = {"shape": [4, 3], "offset": 0, "size": len(kernel), "crc": _tf_masked_crc(kernel)} | entry
    rows = [
        _TF_HEADER,
        (_TF_BIAS, _tf_entry([3], len(kernel), len(bias), _tf_masked_crc(bias))),
        (_TF_KEY, _tf_entry(**fields)),
    ]
    _tf_bundle(prefix, rows, kernel + bias)


@case("tf_control_ok", "ok", "tf_ok.index", "ok")
def _(root: Path, c: Case) -> None:
    _tf_ok(root / "tf_ok")


@case("tf_index_truncated", "broken", "tf_cut.index", "error", match=r"does not end with the table magic number")
def _(root: Path, c: Case) -> None:
    _tf_ok(root / "tf_cut")
    data = (root / c.path).read_bytes()
    (root / c.path).write_bytes(data[:-5])


@case("tf_index_block_damaged", "broken", "tf_flip.index", "error", match=r"fails its CRC32C checksum")
def _(root: Path, c: Case) -> None:
    _tf_ok(root / "tf_flip")
    data = bytearray((root / c.path).read_bytes())
    data[9] ^= 0x10
    (root / c.path).write_bytes(bytes(data))


@case("tf_block_handle_outside", "broken", "tf_handle.index", "error", match=r"lies outside the index file")
def _(root: Path, c: Case) -> None:
    raw = b"\0" * 64
    _tf_bundle(root / "tf_handle", [_TF_HEADER, (_TF_KEY, _tf_entry([4, 4], 0, 64, 0))], raw, index_at=1 << 40)


@case("tf_huge_shape", "broken", "tf_huge.index", "error", match=r"has shape \[1099511627776, 1099511627776\]")
def _(root: Path, c: Case) -> None:  # 2**80 elements claimed over 64 bytes: refused before any allocation
    _tf_ok(root / "tf_huge", shape=[1 << 40, 1 << 40])


@case("tf_offset_past_shard", "broken", "tf_past.index", "error", match=r"outside its 60-byte data shard")
def _(root: Path, c: Case) -> None:
    _tf_ok(root / "tf_past", offset=1 << 62)


@case("tf_many_shards", "broken", "tf_shards.index", "error", match=r"claims 2147483647 data shards")
def _(root: Path, c: Case) -> None:  # two billion data files would be looked for
    _tf_bundle(root / "tf_shards", [(b"", b"\x08" + _tf_varint(2**31 - 1))], b"")


@case("tf_entry_not_protobuf", "broken", "tf_proto.index", "error", match=r"is not a valid protobuf message")
def _(root: Path, c: Case) -> None:  # a length-delimited field that claims 4 GB
    _tf_bundle(root / "tf_proto", [_TF_HEADER, (_TF_KEY, b"\x12\xff\xff\xff\xff\x0f")], b"")


@case("tf_data_damaged", "broken", "tf_rot.index", "error", match=r"fail their CRC32C checksum")
def _(root: Path, c: Case) -> None:  # the index is intact; the tensor's bytes are checked when it is loaded
    _tf_ok(root / "tf_rot", crc=0)
# GGUF (llama.cpp): written byte by byte, so that every field can lie --------------------------------

_GGUF_STRING, _GGUF_ARRAY, _GGUF_U32, _GGUF_F32 = 8, 9, 4, 0


def _gguf_str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def raw_gguf(
    kv: list[tuple[str, int, bytes]],
    tensors: list[tuple[str, list[int], int, int]],
    data: bytes = b"",
    *,
    version: int = 3,
    counts: tuple[int, int] | None = None,
) -> bytes:
    """A GGUF file. ``kv``: (key, value type, encoded value); ``tensors``: (name, dims innermost first, type,
    offset in the data block)."""
    n_tensors, n_kv = counts or (len(tensors), len(kv))
    out = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)
    out += b"".join(_gguf_str(key) + struct.pack("<I", vtype) + value for key, vtype, value in kv)
    for name, dims, ttype, offset in tensors:
        out += _gguf_str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)
    return out + b"\0" * (-len(out) % 32) + data


_GGUF_ARCH = ("general.architecture", _GGUF_STRING, _gguf_str("llama"))
_GGUF_NORM = ("blk.0.attn_norm.weight", [4], _GGUF_F32, 0)


@case("gguf_control_ok", "ok", "ok.gguf", "ok")
def _(root: Path, c: Case) -> None:  # an architecture without a mapping keeps its names
    arch = ("general.architecture", _GGUF_STRING, _gguf_str("mystery"))
    tensors = [("layer.weight", [4], _GGUF_F32, 0), ("layer.bias", [2], _GGUF_F32, 32)]
    (root / c.path).write_bytes(raw_gguf([arch], tensors, struct.pack("<4f", 1, 2, 3, 4).ljust(32, b"\0") + b"\0" * 8))


@case("gguf_truncated_header", "broken", "gguf_cut.gguf", "error", match=r"\(read as gguf\): .* past the end of the")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(raw_gguf([_GGUF_ARCH], [_GGUF_NORM], struct.pack("<4f", 1, 2, 3, 4))[:45])


@case("gguf_bad_version", "broken", "gguf_v99.gguf", "error", match=r"GGUF version 99; versions 2 and 3 are supported")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(raw_gguf([_GGUF_ARCH], [], version=99))


@case(
    "gguf_huge_counts", "broken", "gguf_counts.gguf", "error", match=r"the header claims \d+ tensors and \d+ key/values"
)
def _(root: Path, c: Case) -> None:  # a reader that trusts the counts allocates or loops for ever
    (root / c.path).write_bytes(raw_gguf([_GGUF_ARCH], [], counts=(2**64 - 1, 2**63)))


@case(
    "gguf_huge_string_array",
    "broken",
    "gguf_vocab.gguf",
    "error",
    match=r"'tokenizer.ggml.tokens' claims \d+ strings, more than the rest of the file can hold",
)
def _(root: Path, c: Case) -> None:  # gguf.GGUFReader walks such an array element by element
    tokens = ("tokenizer.ggml.tokens", _GGUF_ARRAY, struct.pack("<IQ", _GGUF_STRING, 2**62) + _gguf_str("a"))
    (root / c.path).write_bytes(raw_gguf([_GGUF_ARCH, tokens], []))


@case("gguf_nested_arrays", "broken", "gguf_nested.gguf", "error", match=r"nests arrays more than \d+ deep")
def _(root: Path, c: Case) -> None:
    value = struct.pack("<IQ", _GGUF_U32, 1) + struct.pack("<I", 7)
    for _ in range(10_000):
        value = struct.pack("<IQ", _GGUF_ARRAY, 1) + value
    (root / c.path).write_bytes(raw_gguf([_GGUF_ARCH, ("deep", _GGUF_ARRAY, value)], []))


@case(
    "gguf_tensor_past_eof",
    "broken",
    "gguf_eof.gguf",
    "error",
    match=r"tensor 'blk.0.attn_norm.weight' \(\[1048576, 1048576\] F32, \d+ bytes at byte \d+\) reaches past the end",
)
def _(root: Path, c: Case) -> None:
    huge = ("blk.0.attn_norm.weight", [1 << 20, 1 << 20], _GGUF_F32, 0)
    (root / c.path).write_bytes(raw_gguf([_GGUF_ARCH], [huge], b"\0" * 64))


@case("gguf_unknown_tensor_type", "broken", "gguf_type.gguf", "error", match=r"has unknown type 12345")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(raw_gguf([_GGUF_ARCH], [("blk.0.attn_norm.weight", [4], 12345, 0)], b"\0" * 64))
# Keras (HDF5, .keras zip) and Flax msgpack -----------------------------------------------------------


def _keras_h5(path: Path, extra: Callable[[Any], None] | None = None) -> None:
    """A Keras 3 ``.weights.h5`` layout written with h5py: a Dense layer, an optimizer slot."""
    import h5py
    import numpy as np

    with h5py.File(path, "w") as f:
        f.create_dataset("layers/dense/vars/0", data=np.arange(64 * 32, dtype="float32").reshape(64, 32))
        f.create_dataset("layers/dense/vars/1", data=np.ones(32, "float32"))
        f.create_dataset("optimizer/vars/0", data=np.int64(3))
        if extra is not None:
            extra(f)


@case("keras_legacy_h5_ok", "ok", "ok.h5", "ok")
def _(root: Path, c: Case) -> None:  # tf.keras 2's save_weights layout, one Dense layer named "layer"
    import h5py
    import numpy as np

    with h5py.File(root / c.path, "w") as f:
        f.attrs["layer_names"] = np.array([b"layer"])
        g = f.create_group("layer")
        g.attrs["weight_names"] = np.array([b"layer/kernel:0", b"layer/bias:0"])
        g.create_dataset("layer/kernel:0", data=np.ones((4, 3), "float32"))
        g.create_dataset("layer/bias:0", data=np.ones(3, "float32"))


@case("keras_h5_truncated", "broken", "truncated.weights.h5", "error", match=r"read as keras-weights-h5")
def _(root: Path, c: Case) -> None:
    _keras_h5(root / c.path)
    data = (root / c.path).read_bytes()
    (root / c.path).write_bytes(data[: len(data) * 2 // 3])


@case("keras_h5_garbage_after_signature", "broken", "garbage.h5", "error", match=r"not a readable HDF5 file")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(b"\x89HDF\r\n\x1a\n" + random.Random(15).randbytes(4096))


@case(
    "keras_h5_huge_unwritten_dataset",
    "broken",
    "huge.weights.h5",
    "error",
    match=r"declares 4398046511104 bytes but stores only 0",
)
def _(root: Path, c: Case) -> None:  # shape (2**40,) float32, never written: reading it would allocate 4 TiB
    _keras_h5(root / c.path, lambda f: f.create_dataset("layers/dense_1/vars/0", shape=(1 << 40,), dtype="float32"))


@case("keras_h5_external_link", "broken", "extlink.weights.h5", "error", match=r"is an HDF5 ExternalLink")
def _(root: Path, c: Case) -> None:  # a link into another file (here: the corpus manifest's neighbour)
    import h5py

    _keras_h5(root / "keras_link_target.h5")
    _keras_h5(root / c.path, lambda f: f.__setitem__("layers/dense_1", h5py.ExternalLink("keras_link_target.h5", "/")))


@case("keras_h5_external_storage", "broken", "extstore.weights.h5", "error", match=r"keeps its data in other files")
def _(root: Path, c: Case) -> None:  # raw storage in /etc/passwd: a read would leak another file
    _keras_h5(
        root / c.path,
        lambda f: f.create_dataset(
            "layers/dense_1/vars/0", shape=(16,), dtype="uint8", external=[("/etc/passwd", 0, 16)]
        ),
    )


@case("keras_h5_hard_link_cycle", "broken", "cycle.weights.h5", "error", match=r"nests more than 32 groups deep")
def _(root: Path, c: Case) -> None:  # a group that contains itself: a naive walk never ends
    def loop(f: Any) -> None:
        g = f.create_group("layers/dense_1")
        g["again"] = g

    _keras_h5(root / c.path, loop)


@case("keras_archive_path_traversal", "broken", "traversal.keras", "error", match=r"unsafe path '\.\./\.\./evil'")
def _(root: Path, c: Case) -> None:
    _keras_h5(root / "keras_traversal_inner.h5")
    with zipfile.ZipFile(root / c.path, "w") as zf:
        zf.writestr("config.json", "{}")
        zf.write(root / "keras_traversal_inner.h5", "model.weights.h5")
        zf.writestr("../../evil", "x")


def _flax_array(shape: list[int], dtype: str, data: bytes) -> Any:
    import msgpack

    return msgpack.ExtType(1, msgpack.packb((shape, dtype, data), use_bin_type=True))


def _flax_file(path: Path, tree: Any) -> None:
    import msgpack

    path.write_bytes(msgpack.packb(tree, use_bin_type=True))


@case("flax_msgpack_ok", "ok", "ok.msgpack", "ok")
def _(root: Path, c: Case) -> None:
    layer = {"kernel": _flax_array([4, 3], "float32", bytes(48)), "bias": _flax_array([3], "float32", bytes(12))}
    _flax_file(root / c.path, {"params": {"layer": layer}})


@case("flax_msgpack_truncated", "broken", "truncated.msgpack", "error", match=r"not a valid msgpack file")
def _(root: Path, c: Case) -> None:
    _flax_file(root / c.path, {"params": {"Dense_0": {"kernel": _flax_array([64, 64], "float32", bytes(16384))}}})
    data = (root / c.path).read_bytes()
    (root / c.path).write_bytes(data[: len(data) // 2])


@case("flax_msgpack_huge_declared_array", "broken", "hugearray.msgpack", "error", match=r"not a valid msgpack file")
def _(root: Path, c: Case) -> None:  # an array32 of 2**32-1 elements in a 9-byte file: no 32 GiB list may be made
    (root / c.path).write_bytes(b"\x81\xa1a\xdd\xff\xff\xff\xff")


@case("flax_msgpack_huge_declared_map", "broken", "hugemap.msgpack", "error", match=r"not a valid msgpack file")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(b"\xdf\xff\xff\xff\xff\xa1a\x01")


@case("flax_msgpack_deep_nesting", "broken", "deep.msgpack", "error", match=r"nested too deeply")
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(b"\x81\xa1a" * 100_000 + b"\xc0")


@case("flax_msgpack_shape_lies", "broken", "shape.msgpack", "error", match=r"needs 4398046511104 bytes but holds 4")
def _(root: Path, c: Case) -> None:  # a 2**40-element shape over 4 bytes of data
    _flax_file(root / c.path, {"params": {"w": _flax_array([1 << 40], "float32", bytes(4))}})


@case("flax_msgpack_unknown_ext", "broken", "ext.msgpack", "error", match=r"unknown msgpack extension type 42")
def _(root: Path, c: Case) -> None:
    import msgpack

    _flax_file(root / c.path, {"params": {"w": msgpack.ExtType(42, b"\x00" * 8)}})


@case("flax_msgpack_object_dtype", "broken", "object.msgpack", "error", match=r"unsupported dtype 'object'")
def _(root: Path, c: Case) -> None:  # numpy would need pickle to read an object array
    _flax_file(root / c.path, {"params": {"w": _flax_array([1], "object", bytes(8))}})
# Issue 17: second round ------------------------------------------------------------------------------
# Each class below failed the promise before its fix (see the issue); the cases are generated here.


def _dcp_dir(root: Path, name: str) -> Path:
    """A real DCP checkpoint of ``_sd()`` (one process, no process group)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    d = root / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(_sd(), storage_writer=dcp.FileSystemWriter(str(d)), no_dist=True)
    return d


def _edit_dcp_metadata(d: Path, edit: Callable[[Any], Any]) -> None:
    """Unpickle our own ``.metadata`` (trusted: written just above), change it, pickle it again."""
    md = pickle.loads((d / ".metadata").read_bytes())
    md = edit(md) or md
    (d / ".metadata").write_bytes(pickle.dumps(md, protocol=2))


def _dcp_case(name: str, match: str, expect: str = "error", mode: str = "open"):
    return case(name, "broken", name, expect, match=match, mode=mode)


def _deep_tuple(depth: int) -> bytes:
    """EMPTY_TUPLE, then TUPLE1 ``depth`` times: ((((),),),) ... in a few bytes per level."""
    return b")" + b"\x85" * depth


def _shared_tuple(levels: int) -> bytes:
    """t = (); t = (t, t) ``levels`` times, by DUP: hashing it visits 2**levels elements."""
    return b")" + b"2\x86" * levels


def _dict_keyed_by(key: bytes) -> bytes:
    """A protocol-2 pickle of ``{key: 1}``."""
    return b"\x80\x02}" + key + b"K\x01s."


# 2: a DCP .metadata that sets attributes on a class (pathlib.PurePath.is_relative_to) ---------------


@_dcp_case("dcp_build_sets_class_attribute", r"sets attributes on the class pathlib\.PurePath itself")
def _(root: Path, c: Case) -> None:  # would switch off the folder check for every later checkpoint
    d = _dcp_dir(root, c.name)
    # BUILD(PurePath, (None, {"is_relative_to": OrderedDict})): slot state is set with setattr, on the class
    patch = b"\x80\x02cpathlib\nPurePath\nN}" + _u("is_relative_to") + b"ccollections\nOrderedDict\ns\x86b."
    (d / ".metadata").write_bytes(patch)


@_dcp_case("dcp_build_sets_class_attribute_via_memo", r"sets attributes on the class pathlib\.PurePosixPath")
def _(root: Path, c: Case) -> None:  # the class fetched back from the memo, then patched
    d = _dcp_dir(root, c.name)
    patch = b"\x80\x02cpathlib\nPurePosixPath\nq\x000h\x00N}" + _u("__truediv__") + b"K\x01s\x86b."
    (d / ".metadata").write_bytes(patch)


@_dcp_case("dcp_build_on_a_dtype", r"sets state on a dtype, not on a DCP metadata object")
def _(root: Path, c: Case) -> None:
    d = _dcp_dir(root, c.name)
    patch = b"\x80\x02ctorch\nfloat32\nN}" + _u("is_floating_point") + b"K\x01s\x86b."
    (d / ".metadata").write_bytes(patch)


@_dcp_case("dcp_build_dunder_slotstate", r"sets state other than plain attributes")
def _(root: Path, c: Case) -> None:  # __class__ through slot state would turn an allowed object into another class
    d = _dcp_dir(root, c.name)
    patch = (
        b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadataIndex\n" + _u("x") + b"\x85RN}" + _u("__class__")
        + b"cpathlib\nPurePath\ns\x86b."
    )  # fmt: skip
    (d / ".metadata").write_bytes(patch)


# 3 and 10: tuples nested too deep to hash, or shared so that hashing never ends ----------------------

_TOO_DEEP = r"nests tuples more than 100 deep"
_HASH_BOMB = r"builds a tuple whose hash would visit more than 10000000 elements"


@case("zip_deep_tuple_key", "broken", "deep_tuple.pt", "error", match=_TOO_DEEP)
def _(root: Path, c: Case) -> None:  # a 100 KB data.pkl: hashing the key recursed in C until it crashed
    raw_zip(root / c.path, _dict_keyed_by(_deep_tuple(100_000)))


@case("zip_shared_tuple_key", "broken", "shared_tuple.pt", "error", match=_HASH_BOMB)
def _(root: Path, c: Case) -> None:  # 300 bytes; hashing the key would visit 2**100 elements
    raw_zip(root / c.path, _dict_keyed_by(_shared_tuple(100)))


@case("zip_deep_tuple_after_unresolved_pid", "broken", "deep_tuple_pid.pt", "error", match=_TOO_DEEP)
def _(root: Path, c: Case) -> None:  # the fast inert pass gives up at the persistent id; the opcode scan goes on
    pid = b"(" + _u("storage") + b"N" + _u("0") + _u("cpu") + b"K\x01tQ0"  # a non-literal storage type: unresolved
    raw_zip(root / c.path, b"\x80\x02" + pid + _dict_keyed_by(_deep_tuple(5000))[2:])


@case("legacy_deep_tuple_in_sys_info", "broken", "legacy_deep.pth", "error", match=_TOO_DEEP)
def _(root: Path, c: Case) -> None:  # the third of the five pickles (system info), read before the payload
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    head = pickle.dumps(MAGIC_NUMBER, protocol=2) + pickle.dumps(PROTOCOL_VERSION, protocol=2)
    (root / c.path).write_bytes(head + _dict_keyed_by(_deep_tuple(100_000)))


@case("plain_pickle_shared_tuple", "broken", "shared_tuple.pkl", "error", match=_HASH_BOMB)
def _(root: Path, c: Case) -> None:
    (root / c.path).write_bytes(_dict_keyed_by(_shared_tuple(64)))


@_dcp_case("dcp_deep_tuple_key", _TOO_DEEP)
def _(root: Path, c: Case) -> None:
    d = _dcp_dir(root, c.name)
    (d / ".metadata").write_bytes(_dict_keyed_by(_deep_tuple(100_000)))


@_dcp_case("dcp_shared_tuple_key", _HASH_BOMB)
def _(root: Path, c: Case) -> None:
    d = _dcp_dir(root, c.name)
    (d / ".metadata").write_bytes(_dict_keyed_by(_shared_tuple(100)))


@case("scan_shared_tuple_does_not_hang", "broken", "shared_tuple_scan.pt", "scan-safe", mode="scan")
def _(root: Path, c: Case) -> None:  # scan models the stack, hashes nothing: a verdict, quickly
    raw_zip(root / c.path, _dict_keyed_by(_shared_tuple(100)))


# 4 and 7: sparse, meta and quantized tensors: refused when opened, before the model is touched ---------


def _bad_sparse() -> torch.Tensor:
    i = torch.tensor([[0, 1000000], [0, 2]])  # row 1000000 of a 3 x 4 tensor
    return torch.sparse_coo_tensor(i, torch.ones(2), (3, 4), check_invariants=False)


def _file_case(name: str, path: str, match: str, modes: tuple[str, ...], expect: str = "error"):
    """One builder, one case per mode (the file is written once, for the first)."""

    def register(build: Callable[[Path, Case], None]) -> Callable[[Path, Case], None]:
        for i, mode in enumerate(modes):
            suffix = "" if mode == "open" else f"_{mode}"
            CASES.append(Case(name + suffix, "broken", path, expect, match=match, mode=mode))
            _BUILDERS[name + suffix] = build if i == 0 else (lambda root, c: None)
        return build

    return register


@_file_case("zip_sparse_out_of_range", "sparse.pt", r"'layer\.weight' \(sparse_coo layout\)",
            ("open", "load", "convert"))  # fmt: skip
def _(root: Path, c: Case) -> None:  # densifying it crashed; tg.load failed half way; convert leaked an error
    torch.save({"layer.weight": _bad_sparse(), "layer.bias": torch.ones(3)}, root / c.path)


@_file_case("legacy_sparse_out_of_range", "sparse_legacy.pth", r"sparse_coo layout", ("open", "load"))
def _(root: Path, c: Case) -> None:
    torch.save({"layer.weight": _bad_sparse(), "layer.bias": torch.ones(3)}, root / c.path,
               _use_new_zipfile_serialization=False)  # fmt: skip


@_file_case("zip_meta_tensor", "meta.pt", r"'layer\.weight' \(a meta tensor: the file holds no values",
            ("open", "load", "convert"))  # fmt: skip
def _(root: Path, c: Case) -> None:  # _rebuild_meta_tensor_no_storage: a shape without values
    torch.save({"layer.weight": torch.empty(3, 4, device="meta"), "layer.bias": torch.ones(3)}, root / c.path)


@_file_case("zip_quantized_tensor", "quantized.pt", r"'layer\.weight' \(quantized\)", ("open", "load"))
def _(root: Path, c: Case) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized dtypes are deprecated: that is the point of refusing them
        q = torch.quantize_per_tensor(torch.ones(3, 4), 0.1, 0, torch.qint8)
    torch.save({"layer.weight": q, "layer.bias": torch.ones(3)}, root / c.path)


@case("zip_metadata_version_not_int", "broken", "meta_version.pt", "ok", mode="load", options={"model": "bn"})
def _(root: Path, c: Case) -> None:  # BatchNorm's version hook compared 'x' < 2 mid-commit (TypeError)
    torch.manual_seed(2)
    sd = collections.OrderedDict((k, torch.randn_like(v.float()).to(v.dtype))
                                 for k, v in __import__("torch").nn.BatchNorm1d(3).state_dict().items())  # fmt: skip
    full = collections.OrderedDict({**{f"bn.{k}": v for k, v in sd.items()}, **_sd()})
    full._metadata = {"bn": {"version": "x"}, "layer": {"version": 1}}  # type: ignore[attr-defined]
    torch.save(full, root / c.path)


# 5 and 8: duplicate or case-colliding members: torch could load another member than the one checked ---


def _zip_members(path: Path, members: list[tuple[str, bytes]]) -> None:
    import warnings

    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as zf:
        warnings.simplefilter("ignore")  # "Duplicate name": on purpose
        for name, data in members:
            zf.writestr(name, data)


def _evil_pickle(root: Path, c: Case) -> bytes:
    return pickle.dumps({"w": Payload(os.system, f"touch {marker(root, c)}")}, protocol=2)


def _checked_and_loaded(root: Path, c: Case, second: str) -> None:
    ok = _valid_zip(root)
    with zipfile.ZipFile(__import__("io").BytesIO(ok)) as zf:
        members = [(i.filename, zf.read(i)) for i in zf.infolist()]
    root_name = members[0][0].split("/", 1)[0]
    _zip_members(root / c.path, [*members, (f"{root_name}/{second}", _evil_pickle(root, c))])


@_file_case("zip_case_colliding_data_pkl", "case_collide.pt", r"differ only in case", ("open", "scan"))
def _(root: Path, c: Case) -> None:
    _checked_and_loaded(root, c, "DATA.PKL")


@_file_case("zip_duplicate_data_pkl", "duplicate_pkl.pt", r"holds two records named '[^']*/data\.pkl'",
            ("open", "scan"))  # fmt: skip
def _(root: Path, c: Case) -> None:
    _checked_and_loaded(root, c, "data.pkl")


@_file_case("zip_case_colliding_storage", "case_collide_storage.pt", r"differ only in case", ("open",))
def _(root: Path, c: Case) -> None:  # a storage record and its case twin (64 floats vs 4)
    ok = _valid_zip(root)
    with zipfile.ZipFile(__import__("io").BytesIO(ok)) as zf:
        members = [(i.filename, zf.read(i)) for i in zf.infolist()]
    root_name = members[0][0].split("/", 1)[0]
    _zip_members(root / c.path, [*members, (f"{root_name}/DATA/0", b"\0" * 256)])


# 6: values not from the file ------------------------------------------------------------------------


@case("zip_torch_tensor_uninitialised", "broken", "uninit.pt", "error", match=r"calls torch\.Tensor, which allocates")
def _(root: Path, c: Case) -> None:  # torch.Tensor(2, 2): whatever the heap held, as weights
    raw_zip(root / c.path, b"\x80\x02}" + _u("layer.weight") + b"ctorch\nTensor\nK\x02K\x02\x86Rs.")


@case("zip_torch_tensor_1gib", "broken", "uninit_big.pt", "error", match=r"calls torch\.FloatTensor, which allocates")
def _(root: Path, c: Case) -> None:  # 852 bytes asking for 1 GiB
    raw_zip(root / c.path, b"\x80\x02}" + _u("w") + b"ctorch\nFloatTensor\nJ\x00\x00\x00\x10\x85Rs.")


@case("zip_storage_constructor", "broken", "storage_ctor.pt", "error", match=r"calls torch\.FloatStorage")
def _(root: Path, c: Case) -> None:
    raw_zip(root / c.path, b"\x80\x02}" + _u("w") + b"ctorch\nFloatStorage\nJ\x00\x00\x00\x10\x85Rs.")


@case("legacy_torch_tensor_uninitialised", "broken", "uninit_legacy.pth", "error", match=r"calls torch\.Tensor")
def _(root: Path, c: Case) -> None:
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    head = b"".join(pickle.dumps(x, protocol=2) for x in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}))
    payload = b"\x80\x02}" + _u("layer.weight") + b"ctorch\nTensor\nK\x02K\x02\x86Rs."
    (root / c.path).write_bytes(head + payload + pickle.dumps([], protocol=2))


@_dcp_case("dcp_tensor_without_chunks", r"chunks that hold only 0 values: the rest would not come from the file")
def _(root: Path, c: Case) -> None:
    d = _dcp_dir(root, c.name)
    _edit_dcp_metadata(d, lambda md: setattr(md.state_dict_metadata["layer.weight"], "chunks", []))


@_dcp_case("dcp_size_larger_than_chunks", r"'layer\.bias' \(size \[6\], 6 values\) chunks that hold only 3 values")
def _(root: Path, c: Case) -> None:
    d = _dcp_dir(root, c.name)
    _edit_dcp_metadata(d, lambda md: setattr(md.state_dict_metadata["layer.bias"], "size", torch.Size([6])))


@_dcp_case("dcp_chunks_overlap", r"two chunks that overlap")
def _(root: Path, c: Case) -> None:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    d = _dcp_dir(root, c.name)

    def edit(md: Any) -> None:  # [0:2] twice instead of [0:2] + [2:3]: the sum of sizes still matches
        info = md.state_dict_metadata["layer.bias"]
        info.size = torch.Size([4])
        one = info.chunks[0]
        info.chunks = [ChunkStorageMetadata(torch.Size([o]), torch.Size([2])) for o in (0, 1)]
        from torch.distributed.checkpoint.metadata import MetadataIndex

        store = md.storage_data[MetadataIndex("layer.bias", one.offsets)]
        md.storage_data[MetadataIndex("layer.bias", torch.Size([1]))] = store

    _edit_dcp_metadata(d, edit)


@_dcp_case("dcp_chunk_shorter_than_values", r"4 bytes in '__0_0\.distcp'")
def _(root: Path, c: Case) -> None:
    from torch.distributed.checkpoint.metadata import MetadataIndex

    d = _dcp_dir(root, c.name)

    def edit(md: Any) -> None:
        md.storage_data[MetadataIndex("layer.weight", torch.Size([0, 0]))].length = 4

    _edit_dcp_metadata(d, edit)


# 9: memory blow-ups from tiny inputs ---------------------------------------------------------------


@case("zip_bytearray_1_5_gib", "broken", "bytearray.pt", "error", match=r"calls builtins\.bytearray with a size")
def _(root: Path, c: Case) -> None:  # bytearray(1.5 GiB) from a 1.5 KB file
    raw_zip(root / c.path, b"\x80\x02}" + _u("w") + b"c__builtin__\nbytearray\nJ\x00\x00\x00\x60\x85Rs.")


@_dcp_case("dcp_memo_index_huge", r"holds a NoneType, not DCP Metadata")
def _(root: Path, c: Case) -> None:  # 9 bytes: the C unpickler would size its memo for 2**27 entries (1 GiB)
    d = _dcp_dir(root, c.name)
    (d / ".metadata").write_bytes(b"\x80\x02Nr\x00\x00\x00\x08.")


@_dcp_case("dcp_size_4_tib", r"gives the chunk of 'layer\.weight' at \[0, 0\] 4398046511104 bytes of values")
def _(root: Path, c: Case) -> None:  # torch.empty(4 TiB) when the tensor was read
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    d = _dcp_dir(root, c.name)

    def edit(md: Any) -> None:
        info = md.state_dict_metadata["layer.weight"]
        info.size = torch.Size([1 << 20, 1 << 20])
        info.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([1 << 20, 1 << 20]))]

    _edit_dcp_metadata(d, edit)


def _plan_case(name: str, edit: Callable[[dict[str, Any]], None], match: str):
    def build(root: Path, c: Case) -> None:
        import torchgraft as tg

        save_file(_sd(), root / f"{name}.safetensors")
        net = torch.nn.Module()
        net.layer = torch.nn.Linear(4, 3)
        d = tg.plan(net, root / f"{name}.safetensors").to_dict()
        edit(d)
        (root / f"{name}.json").write_text(json.dumps(d))

    CASES.append(Case(name, "broken", f"{name}.safetensors", "plan_error", match=match, mode="plan",
                      options={"plan": f"{name}.json"}))  # fmt: skip
    _BUILDERS[name] = build


def _entry(d: dict[str, Any], target: str) -> dict[str, Any]:
    return next(e for e in d["entries"] if e["target"] == target)


_plan_case("plan_entry_shape_huge", lambda d: _entry(d, "layer.weight").update(shape=[10**6, 400]),
           r"'layer\.weight' \(the model has another shape\)")  # fmt: skip
_plan_case("plan_entry_rows_10_12", lambda d: _entry(d, "layer.weight").update(shape=[10**12, 4]),
           r"'layer\.weight' \(the model has another shape\)")  # fmt: skip
_plan_case("plan_entry_rows_10_15", lambda d: _entry(d, "layer.weight").update(shape=[10**15, 4]),
           r"'shape' is not a list of at most 64 integers in 0\.\.2\*\*40")  # fmt: skip
_plan_case("plan_entry_shape_not_int", lambda d: _entry(d, "layer.weight").update(shape=[3.5, 4]),
           r"'shape' is not a list")  # fmt: skip
_plan_case("plan_copy_without_source", lambda d: _entry(d, "layer.weight").pop("source"),
           r"has action 'copy' but no source")  # fmt: skip
_plan_case("plan_unknown_target", lambda d: _entry(d, "layer.weight").update(target="nowhere.weight"),
           r"'nowhere\.weight' \(the model has no such entry\)")  # fmt: skip
_plan_case("plan_empty_fingerprints", lambda d: d.update(model_fingerprint="", source_fingerprint=""),
           r"'model_fingerprint' is missing or empty")  # fmt: skip
_plan_case("plan_source_shape_forged", lambda d: _entry(d, "layer.weight").update(source_shape=[300, 4]),
           r"its source 'layer\.weight' is not in the checkpoint with that shape")  # fmt: skip
_plan_case("plan_unknown_action", lambda d: _entry(d, "layer.weight").update(action="exec"),
           r"unknown action 'exec'")  # fmt: skip
_plan_case("plan_entries_not_a_list", lambda d: d.update(entries={"a": 1}), r"'entries' must be a list")


def _transformed(d: dict[str, Any], tree: dict[str, Any]) -> None:
    _entry(d, "layer.weight").update(action="transform", transform=tree)


_LEAF = {"source": "layer.weight", "shape": [3, 4], "dtype": "float32"}
# 100,000 copies of one tensor, then a slice of the model's shape: refused on meta before allocating
_plan_case("plan_transform_blowup", lambda d: _transformed(d, {"op": "slice", "args": {"dim": 0, "stop": 3}, "inputs": [
    {"op": "concat", "args": {"dim": 0}, "inputs": [_LEAF] * 99_990}]}), r"concat makes 1199880 elements from 12")  # fmt: skip
_plan_case("plan_transform_leaf_forged", lambda d: _transformed(d, {"op": "transpose", "args": {}, "inputs": [
    {**_LEAF, "shape": [4, 3]}]}), r"its transform input 'layer\.weight' is not in the checkpoint with that shape")  # fmt: skip
_plan_case("plan_transform_wrong_shape", lambda d: _transformed(d, {"op": "transpose", "args": {}, "inputs": [_LEAF]}),
           r"'layer\.weight' \(its transform gives \[4, 3\]\)")  # fmt: skip
_plan_case("plan_transform_unknown_op", lambda d: _transformed(d, {"op": "system", "args": {}, "inputs": [_LEAF]}),
           r"not a valid transform: unknown op")  # fmt: skip
_plan_case("plan_transform_deep", lambda d: _transformed(d, _deep(_LEAF, 200)), r"nested deeper than 64 levels")


def _deep(tree: dict[str, Any], n: int) -> dict[str, Any]:
    for _ in range(n):
        tree = {"op": "transpose", "args": {}, "inputs": [tree]}
    return tree


@case("plan_control_ok", "ok", "plan_ok.safetensors", "ok", mode="plan", options={"plan": "plan_ok.json"})
def _(root: Path, c: Case) -> None:  # the same writer, unedited: proves the cases above fail for their one edit
    import torchgraft as tg

    save_file(_sd(), root / c.path)
    net = torch.nn.Module()
    net.layer = torch.nn.Linear(4, 3)
    (root / "plan_ok.json").write_text(json.dumps(tg.plan(net, root / c.path).to_dict()))


# 8 and 10: scan reads what a loader would read, with open's limits -----------------------------------


@case("scan_global_after_64_mib", "broken", "late_global.pkl", "scan-unsafe", globals=["posix.system"], mode="scan")
def _(root: Path, c: Case) -> None:  # scan read only the first 64 MiB of a plain pickle
    obj = {"pad": b"\0" * (65 << 20), "x": Payload(os.system, f"touch {marker(root, c)}")}
    (root / c.path).write_bytes(pickle.dumps(obj, protocol=4))


@case("scan_index_shard_without_suffix", "broken", "scan_dir", "scan-unsafe", globals=["posix.system"], mode="scan")
def _(root: Path, c: Case) -> None:  # the index's shard has no weight suffix; open would still load it
    d = root / c.path
    d.mkdir()
    save_file({"layer.bias": _sd()["layer.bias"]}, d / "model.safetensors")
    torch.save({"layer.weight": _sd()["layer.weight"], "x": Payload(os.system, f"touch {marker(root, c)}")},
               d / "weights.dat")  # fmt: skip
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"layer.weight": "weights.dat"}}))


@_file_case("zip_pkl_inflates_100_mb", "bomb.pt", r"would inflate from \d+ to 104857\d+ bytes \(a zip bomb\?\)",
            ("open", "scan"))  # fmt: skip
def _(root: Path, c: Case) -> None:  # open refused it quickly; scan inflated and scanned 100 MB for 30 s
    with zipfile.ZipFile(root / c.path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02B" + struct.pack("<I", 100 << 20) + b"\0" * (100 << 20) + b".")


@case("scan_fifo", "broken", "scan_pipe.pt", "error", match=r"not a regular file or directory", mode="scan")
def _(root: Path, c: Case) -> None:
    os.mkfifo(root / c.path)


def _patched_zip(root: Path, path: Path, *, flags: int = 0, method: int | None = None) -> None:
    """A valid torch zip with every entry's general-purpose flags OR-ed / compression method replaced."""
    data = bytearray(_valid_zip(root))
    for sig, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        i = data.find(sig)
        while i >= 0:
            data[i + flag_at] |= flags
            if method is not None:
                data[i + method_at : i + method_at + 2] = struct.pack("<H", method)
            i = data.find(sig, i + 4)
    path.write_bytes(bytes(data))


@_file_case("zip_encrypted", "encrypted.pt", r"is encrypted, which torch cannot read", ("open", "scan"))
def _(root: Path, c: Case) -> None:  # scan raised RuntimeError
    _patched_zip(root, root / c.path, flags=0x1)


@_file_case("zip_deflate64", "deflate64.pt", r"uses compression method 9, which torch cannot read", ("scan",))
def _(root: Path, c: Case) -> None:  # scan raised NotImplementedError
    _patched_zip(root, root / c.path, method=9)


@case("scan_index_symlink_loop", "broken", "loop_dir/model.safetensors.index.json", "error",
      match=r"cannot scan it \(RuntimeError|lies outside|does not exist", mode="scan")  # fmt: skip
def _(root: Path, c: Case) -> None:  # resolve() raised RuntimeError
    d = root / "loop_dir"
    d.mkdir()
    (d / "loop.bin").symlink_to("loop.bin")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "loop.bin"}}))


# 11 and 9/10: hf: revisions are names, and the snapshot lies in the repository's cache folder -----------

_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hf_repo(root: Path) -> Path:
    repo = root / "hfcache" / "models--org--m"
    if not repo.exists():
        (repo / "refs").mkdir(parents=True)
        (repo / "snapshots" / _COMMIT).mkdir(parents=True)
        (repo / "blobs").mkdir()
        save_file(_sd(), repo / "snapshots" / _COMMIT / "model.safetensors")
        (repo / "refs" / "main").write_text(_COMMIT)
        outside = root / "hf_outside"
        outside.mkdir()
        save_file(_sd(), outside / "model.safetensors")
    return repo


def _hf_case(name: str, revision: str, match: str, expect: str = "error"):
    return case(name, "broken", f"hf:org/m@{revision}" if revision else "hf:org/m", expect, match=match)


@_hf_case("hf_control_ok", "", "", expect="ok")
def _(root: Path, c: Case) -> None:
    _hf_repo(root)


@_hf_case("hf_revision_absolute_path", "/dev/zero", r"the revision '/dev/zero' is not a branch, tag or commit name")
def _(root: Path, c: Case) -> None:  # huggingface_hub read /dev/zero as the commit hash: +1.6 GiB
    _hf_repo(root)


@_hf_case("hf_revision_dotdot", "../../../hf_outside", r"is not a branch, tag or commit name")
def _(root: Path, c: Case) -> None:  # loaded a folder outside the cache
    _hf_repo(root)


@_hf_case("hf_revision_is_a_fifo", "pipe", r"the cache's refs/pipe is not a small regular file")
def _(root: Path, c: Case) -> None:  # reading the ref blocked for ever
    os.mkfifo(_hf_repo(root) / "refs" / "pipe")


@_hf_case("hf_ref_points_outside", "evil", r"the cache's refs/evil holds '\.\./\.\./\.\./hf_outside', not a commit")
def _(root: Path, c: Case) -> None:
    (_hf_repo(root) / "refs" / "evil").write_text("../../../hf_outside")


@_hf_case("hf_snapshot_symlinked_out", "fedcba9876543210fedcba9876543210fedcba98", r"not a snapshot folder of org/m")
def _(root: Path, c: Case) -> None:
    repo = _hf_repo(root)
    (repo / "snapshots" / "fedcba9876543210fedcba9876543210fedcba98").symlink_to(root / "hf_outside")


# 12: every failure is one CheckpointError ----------------------------------------------------------------


@_dcp_case("dcp_negative_size", r"gives 'layer\.bias' an invalid size")
def _(root: Path, c: Case) -> None:
    d = _dcp_dir(root, c.name)
    _edit_dcp_metadata(d, lambda md: setattr(md.state_dict_metadata["layer.bias"], "size", (-3,)))


@_dcp_case("dcp_dtype_is_a_string", r"gives 'layer\.bias' an invalid dtype 'float32'")
def _(root: Path, c: Case) -> None:
    d = _dcp_dir(root, c.name)
    _edit_dcp_metadata(d, lambda md: setattr(md.state_dict_metadata["layer.bias"].properties, "dtype", "float32"))


@_dcp_case("dcp_storage_data_is_a_list", r"holds storage_data as a list, not a mapping")
def _(root: Path, c: Case) -> None:
    d = _dcp_dir(root, c.name)
    _edit_dcp_metadata(d, lambda md: setattr(md, "storage_data", list(md.storage_data.values())))


@_dcp_case("dcp_distcp_not_a_pickle", r"reading 'layer\.(weight|bias)' from its chunks failed")
def _(root: Path, c: Case) -> None:  # DCP's reader raised UnpicklingError
    d = _dcp_dir(root, c.name)
    size = (d / "__0_0.distcp").stat().st_size
    (d / "__0_0.distcp").write_bytes(b"\x07" * size)


@_dcp_case("dcp_distcp_deep_tuple", r"a chunk of 'layer\.(weight|bias)' that cannot be read safely: the pickle " + _TOO_DEEP)
def _(root: Path, c: Case) -> None:  # the chunk's data.pkl went straight to torch's unpickler (a segfault)
    d = _dcp_dir(root, c.name)
    files = {}

    def edit(md: Any) -> None:
        raw = root / f"{c.name}_chunk.pt"
        raw_zip(raw, _dict_keyed_by(_deep_tuple(100_000)) + b"\0" * 64)
        blob = raw.read_bytes()
        raw.unlink()
        files["__0_0.distcp"] = blob
        for info in md.storage_data.values():
            info.offset, info.length = 0, len(blob)

    _edit_dcp_metadata(d, edit)
    (d / "__0_0.distcp").write_bytes(files["__0_0.distcp"])


@_dcp_case("dcp_chunk_range_past_file", r"which holds \d+")
def _(root: Path, c: Case) -> None:
    d = _dcp_dir(root, c.name)

    def edit(md: Any) -> None:
        for info in md.storage_data.values():
            info.offset += 1 << 30

    _edit_dcp_metadata(d, edit)


# 13: allow_globals judged by the object a name resolves to --------------------------------------------


@case("allow_globals_io_open_alias", "ok", "namespace.ckpt", "invalid_option",
      match=r"refusing to allow .*builtins\.open", options={"allow_globals": ["io.open"]})  # fmt: skip
def _(root: Path, c: Case) -> None:
    pass  # io.open is builtins.open


@case("allow_globals_underscore_io_alias", "ok", "namespace.ckpt", "invalid_option", match=r"refusing to allow",
      options={"allow_globals": ["_io.open"]})  # fmt: skip
def _(root: Path, c: Case) -> None:
    pass


# 14: convert cleans what an interrupted convert left ---------------------------------------------------


@case("convert_removes_stale_temp", "ok", "convert_src.safetensors", "ok", mode="convert")
def _(root: Path, c: Case) -> None:  # a SIGKILLed run left its hidden .tmp beside the destination
    save_file(_sd(), root / c.path)
    out = root / f"converted-{c.name}"
    out.mkdir()
    for name in (".model.safetensors.abcd1234.tmp", ".model-00001-of-00002.safetensors.zz_9ab12.tmp"):
        (out / name).write_bytes(b"\0" * 1024)
        os.utime(out / name, (1_000_000_000, 1_000_000_000))


# Also: a safetensors header with too many entries is refused before it is parsed ------------------------


@st_case("st_too_many_entries", r"the header describes 200001 tensors, more than the 200000")
def _(root: Path, c: Case) -> None:
    n = 200_001
    header = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)}
    (root / c.path).write_bytes(_st_bytes(header, b"\0" * n))


# ----------------------------------------------------------------------------------------------------


def build(root: Path, names: list[str] | None = None) -> list[Case]:
    """Write the corpus into ``root`` (which must exist and be empty); return its cases."""
    root = Path(root).resolve()
    chosen = [c for c in CASES if names is None or c.name in names]
    for c in chosen:
        _BUILDERS[c.name](root, c)
    (root / "manifest.json").write_text(json.dumps([asdict(c) for c in chosen], indent=1))
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="an empty or new directory")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cases = build(args.out)
    print(f"{len(cases)} cases written to {args.out} (manifest.json lists them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
