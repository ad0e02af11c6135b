"""Property-based: mutated safetensors, zip and legacy checkpoints either load correctly or raise CheckpointError.

"Correctly" means every name the source lists loads, with exactly the shape and dtype it
announced. Anything else (another exception type, a crash, an entry that lies about itself)
is a defect. Bit flips inside tensor bytes must not make a file unreadable.
"""

from __future__ import annotations

import io
import itertools
import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from make_corpus import TensorPickler, raw_zip
from safetensors.torch import save_file

import torchgraft as tg
from torchgraft.sources.base import dtype_name

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_counter = itertools.count()


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "enc.weight": torch.randn(3, 4, generator=g),
        "enc.bias": torch.randn(3, generator=g).to(torch.float16),
        "norm.weight": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "steps": torch.arange(3, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mutations")


class _Bases(dict):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example: keep it short
        return "<valid base checkpoints>"


@pytest.fixture(scope="module")
def bases(work) -> dict[str, bytes]:
    sd = _state_dict()
    save_file(sd, work / "base.safetensors")
    torch.save(sd, work / "base.pt")
    torch.save({"state_dict": sd, "epoch": 1}, work / "base.ckpt")
    torch.save(sd, work / "base.pth", _use_new_zipfile_serialization=False)
    kinds = [("safetensors", "safetensors"), ("zip", "pt"), ("ckpt", "ckpt"), ("legacy", "pth")]
    return _Bases({kind: (work / f"base.{ext}").read_bytes() for kind, ext in kinds})


def _write(work: Path, data: bytes, suffix: str) -> Path:
    path = work / f"m{next(_counter)}{suffix}"  # a new file each time: earlier sources may still map theirs
    path.write_bytes(data)
    return path


def _open_all(path: Path) -> dict[str, torch.Tensor] | None:
    """Every tensor of the file, or ``None`` after a CheckpointError; any other outcome fails the test."""
    try:
        src = tg.open(path)
        out = {}
        for name in src:
            ref = src[name]
            t = ref.load()
            assert tuple(t.shape) == ref.shape, (name, t.shape, ref.shape)
            assert dtype_name(t.dtype) == ref.dtype, (name, t.dtype, ref.dtype)
            out[name] = t
        return out
    except tg.CheckpointError:
        return None


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# Byte-level mutations ------------------------------------------------------------------------------

_POS = st.one_of(st.integers(0, 512), st.integers(0, 1 << 20))  # biased towards headers
MUTATION = st.one_of(
    st.tuples(st.just("flip"), _POS, st.integers(0, 7)),
    st.tuples(st.just("byte"), _POS, st.integers(0, 255)),
    st.tuples(st.just("truncate"), _POS),
    st.tuples(st.just("insert"), _POS, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), _POS, st.integers(1, 16)),
)


def mutate(data: bytes, mutations: list[tuple]) -> bytes:
    b = bytearray(data)
    for m in mutations:
        if not b:
            break
        pos = m[1] % len(b)
        if m[0] == "flip":
            b[pos] ^= 1 << m[2]
        elif m[0] == "byte":
            b[pos] = m[2]
        elif m[0] == "truncate":
            del b[pos:]
        elif m[0] == "insert":
            b[pos:pos] = m[2]
        else:
            del b[pos : pos + m[2]]
    return bytes(b)


@SETTINGS
@given(
    kind=st.sampled_from(["safetensors", "zip", "ckpt", "legacy"]), mutations=st.lists(MUTATION, min_size=1, max_size=4)
)
def test_byte_mutations_load_or_raise_checkpoint_error(work, bases, kind, mutations):
    data = mutate(bases[kind], mutations)
    suffix = {"safetensors": ".safetensors", "zip": ".pt", "ckpt": ".ckpt", "legacy": ".pth"}[kind]
    result = _open_all(_write(work, data, suffix))
    if data == bases[kind]:
        assert result is not None and _same(result, _state_dict())


def _data_start(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


@SETTINGS
@given(pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_flips_in_tensor_bytes_keep_safetensors_readable(work, bases, pos, bit):
    data = bytearray(bases["safetensors"])
    start = _data_start(data)
    data[start + pos % (len(data) - start)] ^= 1 << bit
    result = _open_all(_write(work, bytes(data), ".safetensors"))
    assert result is not None
    assert {k: (v.shape, v.dtype) for k, v in result.items()} == {
        k: (v.shape, v.dtype) for k, v in _state_dict().items()
    }


@SETTINGS
@given(which=st.integers(0, 4), pos=st.integers(0, 100), bit=st.integers(0, 7))
def test_flips_in_zip_tensor_records_keep_it_readable(work, which, pos, bit):
    buf = io.BytesIO()
    pickler = TensorPickler(buf)
    pickler.dump({k: v.float() if v.dtype != torch.float32 else v for k, v in _state_dict().items()})
    key = sorted(pickler.records)[which % len(pickler.records)]
    record = bytearray(pickler.records[key])
    record[pos % len(record)] ^= 1 << bit
    pickler.records[key] = bytes(record)
    path = work / f"m{next(_counter)}.pt"
    raw_zip(path, buf.getvalue(), pickler.records)
    result = _open_all(path)
    assert result is not None and set(result) == set(_state_dict())


# Structure-aware mutations ---------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
FIELD_VALUE = st.one_of(
    st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "F4", "F64", "X", ""]),
    st.lists(st.integers(-2, 20), max_size=3),
    st.lists(st.integers(-8, 120), min_size=2, max_size=2),
    JSON,
)


@SETTINGS
@given(
    entry=st.integers(0, 10),
    field=st.sampled_from(["dtype", "shape", "data_offsets", "__delete__", "__rename__", "__metadata__", "__extra__"]),
    value=FIELD_VALUE,
    length_delta=st.sampled_from([0, 0, 0, 1, -1, 7, 1 << 40]),
)
def test_safetensors_header_edits_load_or_raise(work, bases, entry, field, value, length_delta):
    data = bases["safetensors"]
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    names = [k for k in header if k != "__metadata__"]
    name = names[entry % len(names)]
    if field == "__delete__":
        del header[name]
    elif field == "__rename__":
        header[str(value)[:12]] = header.pop(name)
    elif field == "__metadata__":
        header["__metadata__"] = value
    elif field == "__extra__":
        header[name] = {**header[name], "extra": value}
    else:
        header[name] = {**header[name], field: value}
    raw = json.dumps(header).encode()
    out = struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + data[8 + n :]
    _open_all(_write(work, out, ".safetensors"))


@SETTINGS
@given(kind=st.sampled_from(["zip", "ckpt"]), mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_zip_pickle_edits_load_or_raise(work, bases, kind, mutations):
    """Mutate data.pkl inside a well-formed archive (valid CRCs), so the pickle layer itself is attacked."""
    import zipfile

    src = _write(work, bases[kind], ".pt")
    with zipfile.ZipFile(src) as zf:
        root = zf.infolist()[0].filename.split("/", 1)[0]
        pkl = zf.read(f"{root}/data.pkl")
        records = {i.filename.split("/data/", 1)[1]: zf.read(i) for i in zf.infolist() if "/data/" in i.filename}
    path = work / f"m{next(_counter)}.pt"
    raw_zip(path, mutate(pkl, mutations), records)
    _open_all(path)
