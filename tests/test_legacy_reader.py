"""The legacy (non-zip) torch reader: same result as torch.load, mapped where aligned, read in parallel otherwise."""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path

import pytest
import torch

import torchgraft as tg
from torchgraft.errors import CheckpointError
from torchgraft.sources import legacy_reader
from torchgraft.sources.legacy_reader import NOT_PLAIN, read_legacy
from torchgraft.sources.pickle_scan import storage_records


def _bad(path: Path):
    return lambda reason: CheckpointError(path, reason, format="torch-legacy")


def _floats(seed: int = 0) -> dict[str, torch.Tensor]:
    """Only float32 records: each is a multiple of 4 bytes, so all share one alignment."""
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 33, generator=g), "b": torch.randn(33, generator=g), "s": torch.tensor(2.0)}


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(64, 33, generator=g),
        "half": torch.randn(7, generator=g).half(),
        "steps": torch.tensor(12),
        "empty": torch.zeros(0),
        "view": torch.arange(10.0)[2:8],  # a view: its storage is saved whole
    }


def _save_legacy(obj, path: Path, pad: int = 0) -> Path:
    """torch.save in the legacy format; ``pad`` characters in a key shift where the records start."""
    if pad:
        obj = {**obj, "p" * pad: torch.zeros(1)}
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def _data_start(path: Path) -> int:
    """Offset of the first record header: after the five pickles."""
    with path.open("rb") as f:
        for _ in range(3):
            pickle.load(f)
        storage_records(f)  # the payload, with inert stand-ins for its globals
        pickle.load(f)
        return f.tell()


def _aligned_and_misaligned(tmp_path: Path, state=_floats) -> tuple[Path, Path]:
    """Two legacy files of the same tensors: records 4-aligned in one, not in the other."""
    found: dict[bool, Path] = {}
    for pad in range(1, 12):
        path = _save_legacy(state(), tmp_path / f"pad{pad}.pth", pad)
        found.setdefault((_data_start(path) + 8) % 4 == 0, path)
        if len(found) == 2:
            return found[True], found[False]
    raise AssertionError("no padding gave both alignments")


def _equal(a, b) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype and a[k].stride() == b[k].stride() for k in a)


@pytest.mark.parametrize("zero_copy", [True, False])
@pytest.mark.parametrize("state", [_floats, _state])
def test_same_tensors_as_torch_load_whatever_the_alignment(tmp_path, zero_copy, state):
    for path in _aligned_and_misaligned(tmp_path, state):
        ours = read_legacy(path, size=path.stat().st_size, bad=_bad(path), zero_copy=zero_copy)
        assert _equal(ours, torch.load(path, map_location="cpu", weights_only=True))
        assert all(t.data_ptr() % t.element_size() == 0 for t in ours.values())


def _backing_file(t: torch.Tensor) -> str | None:
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= t.data_ptr() < hi:
                return parts[5] if len(parts) >= 6 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_aligned_records_are_mapped_and_misaligned_ones_read(tmp_path):
    aligned, misaligned = _aligned_and_misaligned(tmp_path)
    mapped = read_legacy(aligned, size=aligned.stat().st_size, bad=_bad(aligned))
    read = read_legacy(misaligned, size=misaligned.stat().st_size, bad=_bad(misaligned))
    copied = read_legacy(aligned, size=aligned.stat().st_size, bad=_bad(aligned), zero_copy=False)
    assert {_backing_file(t) for t in mapped.values()} == {str(aligned)}
    assert str(misaligned) not in {_backing_file(t) for t in read.values()}
    assert str(aligned) not in {_backing_file(t) for t in copied.values()}


def test_ties_and_views_keep_sharing_one_storage(tmp_path):
    base = torch.randn(6, 4)
    path = _save_legacy({"a": base, "b": base, "row": base[2]}, tmp_path / "tied.pth")
    ours = read_legacy(path, size=path.stat().st_size, bad=_bad(path))
    assert ours["a"].data_ptr() == ours["b"].data_ptr()
    assert ours["row"].untyped_storage().data_ptr() == ours["a"].untyped_storage().data_ptr()
    assert torch.equal(ours["row"], base[2])


def test_parallel_reads_fill_every_piece(tmp_path, monkeypatch):
    monkeypatch.setattr(legacy_reader, "PIECE_BYTES", 1000)  # many pieces per tensor
    monkeypatch.setattr(legacy_reader, "PARALLEL_FROM_BYTES", 0)
    _, path = _aligned_and_misaligned(tmp_path)
    ours = read_legacy(path, size=path.stat().st_size, bad=_bad(path), workers=3)
    assert _equal(ours, torch.load(path, map_location="cpu", weights_only=True))


def test_through_tg_open_with_a_lightning_style_container(tmp_path):
    import argparse

    path = tmp_path / "last.ckpt"
    torch.save(
        {"state_dict": _state(), "hparams": argparse.Namespace(lr=0.1)}, path, _use_new_zipfile_serialization=False
    )
    src = tg.open(path, allow_globals=["argparse.Namespace"])
    assert src.format == "torch-legacy" and src.container == "state_dict"
    assert torch.equal(src["w"].load(), _state()["w"])


def test_not_plain_files_go_to_torch_load(tmp_path):
    path = tmp_path / "not_torch.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    assert read_legacy(path, size=path.stat().st_size, bad=_bad(path)) is NOT_PLAIN
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert read_legacy(empty, size=0, bad=_bad(empty)) is NOT_PLAIN


def test_refused_globals_raise_before_any_tensor_is_read(tmp_path):
    import argparse

    path = _save_legacy({"w": torch.zeros(3), "hp": argparse.Namespace(lr=1)}, tmp_path / "ns.pth")
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        read_legacy(path, size=path.stat().st_size, bad=_bad(path))


def test_a_record_header_that_disagrees_is_refused(tmp_path):
    _, path = _aligned_and_misaligned(tmp_path)
    data = bytearray(path.read_bytes())
    start = _data_start(path)
    data[start : start + 8] = (999).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=r"the record of storage '\d+' holds 999 elements, but the pickle declares"
    ):
        read_legacy(path, size=path.stat().st_size, bad=_bad(path))


def test_a_file_cut_inside_the_records_is_refused_before_reading(tmp_path):
    _, path = _aligned_and_misaligned(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) - 20])
    with pytest.raises(CheckpointError, match=r"reaches past the end of the file|ends before the record"):
        read_legacy(cut, size=cut.stat().st_size, bad=_bad(cut))
    with pytest.raises(tg.CheckpointError, match=r"read as torch-legacy"):
        tg.open(cut)


def test_a_file_truncated_while_loading_is_an_error_not_garbage(tmp_path, monkeypatch):
    _, path = _aligned_and_misaligned(tmp_path)
    real_size = path.stat().st_size
    original = legacy_reader._read

    def truncate_then_read(fd, pieces, bad, *, workers):
        with path.open("r+b") as f:
            f.truncate(real_size - 100)
        original(fd, pieces, bad, workers=workers)

    monkeypatch.setattr(legacy_reader, "_read", truncate_then_read)
    with pytest.raises(CheckpointError, match="the file ended while its tensor bytes were read"):
        read_legacy(path, size=real_size, bad=_bad(path), zero_copy=False)


class _OldPickler(pickle.Pickler):
    """Pickles a tensor the way torch < 1.0 did when it was a view of a larger storage."""

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            return (
                torch._utils._rebuild_tensor_v2,
                (obj.untyped_storage(), 0, (2,), (1,), False, collections.OrderedDict()),
            )
        return NotImplemented

    def persistent_id(self, obj):
        if isinstance(obj, torch.UntypedStorage):
            return ("storage", torch.FloatStorage, "0", "cpu", 4, ("1", 0, 2))
        return None


def test_storage_views_of_very_old_files_fall_back_to_torch_load(tmp_path):
    buf = io.BytesIO()
    for header in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION, {"little_endian": True}):
        pickle.dump(header, buf, protocol=2)
    _OldPickler(buf, protocol=2).dump({"w": torch.zeros(4)})
    pickle.dump(["0"], buf, protocol=2)
    buf.write((4).to_bytes(8, "little") + torch.arange(4.0).numpy().tobytes())
    path = tmp_path / "old.pth"
    path.write_bytes(buf.getvalue())
    assert read_legacy(path, size=path.stat().st_size, bad=_bad(path)) is NOT_PLAIN
    assert torch.equal(tg.open(path)["w"].load(), torch.arange(2.0))  # torch.load reads the view
