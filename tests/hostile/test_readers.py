"""Unit tests of the hardened readers: the pickle scan, the zip and legacy checks, sub-byte safetensors dtypes."""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import pytest
import torch
from make_corpus import Payload, TensorPickler, raw_zip
from safetensors.torch import save_file

import torchgraft as tg
from torchgraft.sources.pickle_scan import (
    UNRESOLVED_STACK_GLOBAL,
    StorageRecord,
    checkpoint_globals,
    dangerous_globals,
    pickle_globals,
    refused_globals,
    scan_pickles,
    storage_records,
)
from torchgraft.sources.safetensors_reader import looks_like_safetensors
from torchgraft.sources.torch_reader import torch_format


def test_scan_finds_storages_of_a_torch_zip(tmp_path):
    torch.save({"w": torch.zeros(3, 4), "b": torch.zeros(2, dtype=torch.float16)}, tmp_path / "m.pt")
    with zipfile.ZipFile(tmp_path / "m.pt") as zf:
        data = zf.read("m/data.pkl")
    scan = scan_pickles(data, max_pickles=1)
    assert scan.resolved and scan.pickles == 1
    assert scan.storages == [
        StorageRecord("0", "torch.FloatStorage", 12, "cpu"),
        StorageRecord("1", "torch.HalfStorage", 2, "cpu"),
    ]
    assert scan.globals == [
        "torch._utils._rebuild_tensor_v2",
        "torch.FloatStorage",
        "collections.OrderedDict",
        "torch.HalfStorage",
    ]


def test_storage_records_match_the_opcode_scan_and_run_nothing(tmp_path):
    torch.save(
        {"w": torch.zeros(3, 4), "b": torch.zeros(2, dtype=torch.float16), "t": torch.zeros(1)}, tmp_path / "m.pt"
    )
    with zipfile.ZipFile(tmp_path / "m.pt") as zf:
        data = zf.read("m/data.pkl")
    assert storage_records(data) == scan_pickles(data, max_pickles=1).storages
    assert [r.numel for r in storage_records(data) or []] == [12, 2, 1]
    marker = tmp_path / "ran"
    hostile = pickle.dumps([Payload(eval, f"open({str(marker)!r}, 'w')"), Payload(os.system, f"touch {marker}")])
    assert storage_records(hostile) == []  # the globals are inert stand-ins: nothing was called
    assert not marker.exists()


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x02\xff\xfe garbage",  # not a pickle
        pickle.dumps({"a": [1, 2]}, protocol=2)[:-4],  # truncated
    ],
)
def test_storage_records_give_up_instead_of_guessing(data):
    assert storage_records(data) is None


def test_storage_records_play_along_with_objects_they_do_not_know():
    import argparse

    buf = io.BytesIO()
    TensorPickler(buf).dump({"hparams": argparse.Namespace(lr=0.1), "w": torch.zeros(2)})  # NEWOBJ + BUILD
    assert [(r.key, r.type, r.numel) for r in storage_records(buf.getvalue()) or []] == [("0", "torch.FloatStorage", 2)]


def test_storage_records_stay_inert_when_extension_codes_are_registered(tmp_path):
    import copyreg

    marker = tmp_path / "ran"
    copyreg.add_extension(os.system.__module__, "system", 240)
    try:
        data = pickle.dumps(Payload(os.system, f"touch {marker}"), protocol=2)  # EXT1 240, then REDUCE
        assert b"\x82\xf0" in data
        assert storage_records(data) is None  # the extension would bypass find_class: refuse to run it
    finally:
        copyreg.remove_extension(os.system.__module__, "system", 240)
    assert not marker.exists()


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x02]r\x00\x00\x00\x40.",  # LONG_BINPUT 2**30: the C unpickler would zero a 16 GiB memo array
        b"\x80\x05\x96" + (1 << 34).to_bytes(8, "little") + b"x.",  # BYTEARRAY8 declaring 16 GiB
    ],
)
def test_storage_records_memory_stays_bounded_by_the_pickle(data):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    storage_records(data)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB: well under 100 MiB


def test_storage_records_give_up_on_a_computed_persistent_id():
    buf = io.BytesIO()
    TensorPickler(buf, storage_type=Payload(os.system, "true")).dump({"w": torch.zeros(2)})
    assert storage_records(buf.getvalue()) is None  # the opcode scan decides then (and says unresolved)


class _SharedKeyPickler(TensorPickler):
    """Every tensor names storage record "0"; the first reference declares 6 floats, later ones 3."""

    def persistent_id(self, obj):
        pid = super().persistent_id(obj)
        if pid is None:
            return None
        first = not getattr(self, "_named", False)
        self._named = True
        return ("storage", torch.FloatStorage, "0", "cpu", 6 if first else 3)


def test_a_storage_declared_twice_is_checked_at_every_reference(tmp_path):
    # torch sizes a storage by its first reference: a matching second one must not hide a larger first
    buf = io.BytesIO()
    _SharedKeyPickler(buf).dump({"a": torch.zeros(3), "b": torch.zeros(3)})
    raw_zip(tmp_path / "twice.pt", buf.getvalue(), {"0": torch.zeros(3).numpy().tobytes()})
    with pytest.raises(tg.CheckpointError, match=r"'data/0' holds 12 bytes, but data\.pkl declares 6 x"):
        tg.open(tmp_path / "twice.pt")


def test_scan_reads_the_five_pickles_of_a_legacy_file(tmp_path):
    torch.save({"w": torch.zeros(5)}, tmp_path / "m.pth", _use_new_zipfile_serialization=False)
    scan = scan_pickles((tmp_path / "m.pth").read_bytes(), max_pickles=5)
    assert scan.pickles == 5 and scan.resolved
    assert [(s.type, s.numel) for s in scan.storages] == [("torch.FloatStorage", 5)]


def test_scan_never_executes_and_maps_python2_names(tmp_path):
    marker = tmp_path / "ran"
    data = pickle.dumps([Payload(eval, f"open({str(marker)!r}, 'w')"), {1, 2}], protocol=2)
    found = pickle_globals(data)
    assert found == ["builtins.eval", "builtins.set"]  # the pickle says __builtin__.eval
    assert refused_globals(found) == ["builtins.eval"]  # builtins.set is on torch's allow-list
    assert dangerous_globals(found) == ["builtins.eval"]
    assert not marker.exists()


def test_scan_resolves_stack_global_through_the_memo():
    data = pickle.dumps({"a": Payload(os.system, "true"), "b": Payload(os.system, "true")}, protocol=4)
    assert pickle_globals(data) == ["posix.system"]


def test_scan_reports_a_stack_global_it_cannot_resolve():
    # STACK_GLOBAL whose module and name come from a call result, not from literals
    data = b"\x80\x04" + b"\x8c\x08builtins\x8c\x03str\x93)R" + b"\x8c\x06system\x93."
    assert UNRESOLVED_STACK_GLOBAL in pickle_globals(data)
    assert dangerous_globals([UNRESOLVED_STACK_GLOBAL]) == [UNRESOLVED_STACK_GLOBAL]


def test_scan_marks_non_literal_persistent_ids_unresolved():
    buf = io.BytesIO()
    TensorPickler(buf, storage_type=Payload(os.system, "true")).dump({"w": torch.zeros(2)})
    scan = scan_pickles(buf.getvalue(), max_pickles=1)
    assert not scan.resolved and scan.storages == []
    assert "posix.system" in scan.globals


def test_scan_stops_quietly_on_garbage():
    scan = scan_pickles(b"\x80\x02\xff\xfe garbage", max_pickles=3)
    assert scan.pickles == 0 and not scan.resolved and scan.globals == []


def test_checkpoint_globals_does_not_inflate_a_zip_bomb(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w") as zf, zf.open(zipfile.ZipInfo("bomb/data.pkl"), "w", force_zip64=True) as f:
        f.write(pickle.dumps({"x": Payload(os.system, "true")}, protocol=2))
        for _ in range(64):
            f.write(b"\0" * (1 << 20))
    assert checkpoint_globals(path, limit=1 << 16) == ["posix.system"]  # read 64 KiB, not 64 MiB


@pytest.mark.parametrize(
    ("names", "dangerous"),
    [
        (["argparse.Namespace", "collections.OrderedDict"], []),
        (
            ["posix.system", "subprocess.Popen", "runpy._run_code", "os.path.join"],
            ["posix.system", "subprocess.Popen", "runpy._run_code", "os.path.join"],
        ),
        (
            ["builtins.getattr", "builtins.set", "functools.partial", "torch.hub.load"],
            ["builtins.getattr", "functools.partial", "torch.hub.load"],
        ),
    ],
)
def test_dangerous_globals(names, dangerous):
    assert dangerous_globals(names) == dangerous


def test_truncated_zip_is_still_read_as_a_zip(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "m.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:300])
    assert torch_format(tmp_path / "cut.pt") == "torch-zip"
    with pytest.raises(
        tg.CheckpointError, match=r"\(read as torch-zip\): the zip archive is truncated or damaged \(BadZipFile"
    ):
        tg.open(tmp_path / "cut.pt")


def test_header_length_is_judged_by_the_reader_not_the_sniffer():
    assert looks_like_safetensors(b"\xff" * 8 + b"{", 20)
    assert not looks_like_safetensors(b"PK\x03\x04" + b"\0" * 12, 20)
    assert not looks_like_safetensors(b"\x80\x02" + b"\0" * 14, 20)


def test_compressed_tensor_records_are_read_without_mmap(tmp_path):
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(sd, tmp_path / "m.pt")
    with zipfile.ZipFile(tmp_path / "m.pt") as src, zipfile.ZipFile(tmp_path / "deflated.pt", "w") as out:
        for info in src.infolist():  # re-zipped by a generic tool: every record deflated
            out.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    assert torch.equal(tg.open(tmp_path / "deflated.pt")["w"].load(), sd["w"])


def test_packed_float4_safetensors_shapes_agree(tmp_path):
    if not hasattr(torch, "float4_e2m1fn_x2"):
        pytest.skip("this torch has no float4")
    save_file({"q": torch.zeros(4, 2, dtype=torch.float4_e2m1fn_x2)}, tmp_path / "q.safetensors")
    ref = tg.open(tmp_path / "q.safetensors")["q"]
    assert ref.shape == (4, 2) and tuple(ref.load().shape) == (4, 2)


def test_valid_zip_with_crafted_records_loads(tmp_path):
    buf = io.BytesIO()
    pickler = TensorPickler(buf)
    pickler.dump({"w": torch.arange(4.0)})
    raw_zip(tmp_path / "ok.pt", buf.getvalue(), pickler.records)
    assert torch.equal(tg.open(tmp_path / "ok.pt")["w"].load(), torch.arange(4.0))


@pytest.mark.parametrize("protocol", [2, 4])
def test_bytearrays_as_pickle_writes_them_still_load(tmp_path, protocol):
    """bytearray() and bytearray(data) are refused by nothing; only bytearray(n) allocates (issue 17.9)."""
    import pickle

    from torchgraft.sources.pickle_scan import refused_call, scan_pickles, storage_records

    data = pickle.dumps({"a": bytearray(), "b": bytearray(b"xy")}, protocol=protocol)
    assert storage_records(data) == [] and not scan_pickles(data).problems
    assert refused_call("builtins.bytearray", (1 << 30,)) and refused_call("builtins.bytearray", None)
    torch.save({"w": torch.ones(2), "extra": bytearray(b"xy"), "empty": bytearray()}, tmp_path / "b.pt")
    assert torch.equal(tg.open(tmp_path / "b.pt")["w"].load(), torch.ones(2))
    with zipfile.ZipFile(tmp_path / "b.pt") as zf:  # torch writes bytearray(_codecs.encode(text, "latin1"))
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    assert not scan_pickles(pkl).problems
