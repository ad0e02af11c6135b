"""tg.scan: every global a pickle names, which the safe loader refuses, a verdict; nothing is executed."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

import torchgraft as tg
from torchgraft.scan import danger_of


class Payload:
    """Pickles as a call to os.system that would create ``marker``; unpickling it would run it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvalPayload:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_real_legacy_checkpoint_is_safe(mobilenet_path):
    r = tg.scan(mobilenet_path)
    assert r.verdict == "safe" and r.safe and r.refused == []
    assert r.files[0].format == "torch-legacy"
    assert set(r.globals) == {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch.FloatStorage",
        "torch.LongStorage",
    }
    assert "verdict: safe" in str(r)


def test_zip_with_system_call_is_unsafe_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "evil": Payload(marker)}, tmp_path / "evil.pt")
    r = tg.scan(tmp_path / "evil.pt")
    assert r.verdict == "unsafe"
    assert r.refused == [f"{os.name == 'nt' and 'nt' or 'posix'}.system"]
    assert list(r.files[0].members) == ["evil/data.pkl"]
    assert r.to_dict()["dangerous"] == {r.refused[0]: "runs commands / touches files"}
    text = " ".join(str(r).split())
    assert "UNSAFE" in text and "refuses" in text and "Nothing was executed" in text
    assert not marker.exists()


def test_plain_protocol_0_pickle_with_eval(tmp_path):
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"x": EvalPayload()}, protocol=0))
    r = tg.scan(path)
    assert r.files[0].format == "pickle" and r.refused == ["builtins.eval"]
    assert danger_of("builtins.eval") == "runs code"


def test_allowed_but_not_plain_classes_are_refused_without_danger(tmp_path):
    torch.save({"w": torch.zeros(1), "args": argparse.Namespace(lr=0.1)}, tmp_path / "train.ckpt")
    r = tg.scan(tmp_path / "train.ckpt")
    assert r.refused == ["argparse.Namespace"] and r.to_dict()["dangerous"] == {}


def test_safetensors_and_directories(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    r = tg.scan(tmp_path / "model.safetensors")
    assert r.safe and r.files[0].format == "safetensors" and r.globals == []
    (tmp_path / "sub").mkdir()
    torch.save({"e": Payload(tmp_path / "m")}, tmp_path / "sub" / "extra.bin")
    (tmp_path / "README.md").write_text("not scanned")
    r = tg.scan(tmp_path)
    assert [os.path.basename(f.path) for f in r.files] == ["model.safetensors", "extra.bin"]
    assert r.verdict == "unsafe"


def test_index_scans_every_shard(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(1), "e": Payload(tmp_path / "m")}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    r = tg.scan(tmp_path / "pytorch_model.bin.index.json")
    assert len(r.files) == 2 and [f.safe for f in r.files] == [True, False]


def test_errors(tmp_path):
    with pytest.raises(tg.CheckpointError, match="no such file or directory"):
        tg.scan(tmp_path / "absent.bin")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(tg.CheckpointError, match="the file is empty"):
        tg.scan(tmp_path / "empty.pt")
    (tmp_path / "x.bin").write_bytes(b"XYZW\x03\x00\x00\x00")  # no format of its own (GGUF is scanned now)
    with pytest.raises(tg.CheckpointError, match="not a pickle, a torch zip or a safetensors file"):
        tg.scan(tmp_path / "x.bin")
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    with pytest.raises(tg.CheckpointError, match="the zip archive is damaged"):
        tg.scan(tmp_path / "broken.pt")
    (tmp_path / "bad.index.json").write_text(json.dumps({"weight_map": {"a": "../outside.bin"}}))
    with pytest.raises(tg.CheckpointError, match="lies outside"):
        tg.scan(tmp_path / "bad.index.json")
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(tg.CheckpointError, match="no weight files found"):
        tg.scan(empty_dir)


def test_zip_without_pickle_members(tmp_path):
    with zipfile.ZipFile(tmp_path / "odd.pt", "w") as zf:
        zf.writestr("archive/version", "3")
    r = tg.scan(tmp_path / "odd.pt")
    assert r.safe and "no pickle inside the archive" in r.files[0].note
