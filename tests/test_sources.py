"""tg.open: every format, containers, shards, and every error path."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import torchgraft as tg
from torchgraft.sources.containers import find_state_dict


@pytest.fixture
def sd():
    torch.manual_seed(0)
    return {
        "a.weight": torch.randn(3, 4),
        "a.bias": torch.randn(3),
        "b.running_mean": torch.zeros(3, dtype=torch.float16),
    }


def _same(src: tg.Source, sd: dict) -> None:
    assert set(src) == set(sd)
    for k, v in sd.items():
        assert src[k].shape == tuple(v.shape)
        assert src[k].dtype == str(v.dtype).removeprefix("torch.")
        assert torch.equal(src[k].load(), v)


def test_safetensors_file(tmp_path, sd):
    path = tmp_path / "m.safetensors"
    save_file(sd, path, metadata={"format": "pt"})
    src = tg.open(path)
    assert src.format == "safetensors"
    assert src.metadata == {"format": "pt"}
    assert src.parameters == 12 + 3 + 3
    assert src.nbytes == 15 * 4 + 3 * 2
    _same(src, sd)


def test_torch_zip_is_memory_mapped(tmp_path, sd):
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    src = tg.open(path)
    assert src.format == "torch-zip"
    _same(src, sd)


def test_torch_legacy_keeps_module_metadata(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    path = tmp_path / "legacy.pth"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    src = tg.open(path)
    assert src.format == "torch-legacy"
    assert src.module_metadata["1"]["version"] == 2
    _same(src, model.state_dict())


def test_in_memory_state_dict_and_source_passthrough(sd):
    src = tg.open(sd)
    assert src.format == "state-dict"
    assert tg.open(src) is src
    _same(src, sd)


@pytest.mark.parametrize(
    ("wrapped", "container"),
    [
        (lambda sd: {"state_dict": sd, "epoch": 3, "optimizer_states": []}, "state_dict"),  # Lightning
        (lambda sd: {"meta": {"epoch": 1}, "state_dict": sd}, "state_dict"),  # mmengine
        (lambda sd: {"model": sd, "optimizer": {"lr": torch.tensor(0.1)}}, "model"),  # many repos
        (lambda sd: {"model": {"module": sd}}, "model.module"),
        (lambda sd: {"state_dict_ema": sd}, "state_dict_ema"),  # only an EMA copy
    ],
)
def test_containers_found_by_rule(tmp_path, sd, wrapped, container):
    path = tmp_path / "c.ckpt"
    torch.save(wrapped(sd), path)
    src = tg.open(path)
    assert src.container == container
    _same(src, sd)


def test_container_option_picks_ema(tmp_path, sd):
    ema = {k: v + 1 for k, v in sd.items()}
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": sd, "state_dict_ema": ema}, path)
    assert tg.open(path).container == "state_dict"
    src = tg.open(path, container="state_dict_ema")
    assert set(src.containers) == {"state_dict", "state_dict_ema"}
    _same(src, ema)


def test_container_option_unknown_lists_choices(tmp_path, sd):
    path = tmp_path / "c.pt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(
        tg.CheckpointError, match=r"(?s)container 'model_ema' is not in the file.*Try: choose one of \['state_dict'\]"
    ):
        tg.open(path, container="model_ema")


def test_nested_non_tensor_entries_are_skipped(tmp_path, sd):
    path = tmp_path / "c.pt"
    torch.save({**sd, "step": 7}, path)
    src = tg.open(path)
    assert src.skipped == {"step": "int"}
    _same(src, sd)


def test_no_state_dict_in_file(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"epoch": 1, "config": {"lr": 0.1}}, path)
    with pytest.raises(tg.CheckpointError, match=r"no state dict found; top-level keys are 'epoch', 'config'"):
        tg.open(path)


def test_non_mapping_payload(tmp_path):
    path = tmp_path / "c.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(tg.CheckpointError, match=r"holds a list, not a state dict"):
        tg.open(path)


def test_find_state_dict_plain():
    sd = {"w": torch.zeros(1)}
    assert find_state_dict(sd, container=None, path="x", format="f")[:2] == (sd, "")


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "legacy"])
def test_sharded_checkpoint(tmp_path, sd, fmt):
    keys = list(sd)
    shards = {"s1": {k: sd[k] for k in keys[:2]}, "s2": {k: sd[k] for k in keys[2:]}}
    weight_map = {}
    for i, (name, part) in enumerate(shards.items(), 1):
        fname = f"model-0000{i}-of-00002.{'safetensors' if fmt == 'safetensors' else 'bin'}"
        if fmt == "safetensors":
            save_file(part, tmp_path / fname)
        else:  # legacy shards are read whole, so they are opened by two threads
            torch.save(part, tmp_path / fname, _use_new_zipfile_serialization=fmt == "torch")
        weight_map.update({k: fname for k in part})
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (tmp_path / index).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    src = tg.open(tmp_path)  # the directory finds the index
    assert src.format == ("sharded-safetensors" if fmt == "safetensors" else "sharded-torch")
    assert len(src.files) == 2
    _same(src, sd)


def test_directory_prefers_safetensors(tmp_path, sd):
    save_file(sd, tmp_path / "model.safetensors")
    torch.save({k: v + 1 for k, v in sd.items()}, tmp_path / "pytorch_model.bin")
    src = tg.open(tmp_path)
    assert src.format == "safetensors"


def test_directory_single_loose_file(tmp_path, sd):
    torch.save(sd, tmp_path / "weights.pth")
    assert tg.open(tmp_path).format == "torch-zip"


# Errors ----------------------------------------------------------------------


def test_missing_file():
    with pytest.raises(
        tg.CheckpointError, match=r"'/nonexistent/model.bin': no such file or directory\n  Try: check the path"
    ):
        tg.open("/nonexistent/model.bin")


def test_checkpoint_error_is_oserror():
    with pytest.raises(OSError):
        tg.open("/nonexistent")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        tg.CheckpointError, match=r"\(read as directory\): no weights found; the directory holds config.json"
    ):
        tg.open(tmp_path)


def test_directory_with_several_loose_files(tmp_path, sd):
    torch.save(sd, tmp_path / "a.pt")
    torch.save(sd, tmp_path / "b.pt")
    with pytest.raises(tg.CheckpointError, match=r"several weight files \(a.pt, b.pt\) and no index"):
        tg.open(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "m.bin").write_bytes(b"")
    with pytest.raises(tg.CheckpointError, match=r"m.bin': the file is empty"):
        tg.open(tmp_path / "m.bin")


def test_empty_shard_is_sniffed_like_a_file(tmp_path):
    """A shard is refused by the same check ``tg.open`` runs on a file: empty, then named."""
    (tmp_path / "model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "part.bin"}}))
    (tmp_path / "part.bin").write_bytes(b"")
    with pytest.raises(tg.CheckpointError, match=r"part.bin': the file is empty"):
        tg.open(tmp_path / "model.bin.index.json")


def test_unknown_format_lists_the_supported_ones(tmp_path):
    (tmp_path / "model.weights").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(tg.CheckpointError, match=r"(?s)not a checkpoint format torchgraft knows.*GGUF, ONNX, TensorFlow.*Keras .keras/.weights.h5/.h5 and Flax"):
        tg.open(tmp_path / "model.weights")


def test_hdf5_files_are_read_as_keras(tmp_path):  # HDF5 once was "convert it first"; now the Keras reader says why
    (tmp_path / "tf_model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(tg.CheckpointError, match=r"read as keras-weights-h5\): not a readable HDF5 file"):
        tg.open(tmp_path / "tf_model.h5")


def test_corrupt_zip(tmp_path, sd):
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(
        tg.CheckpointError, match=r"(?s)m.pt' \(read as torch-zip\).*Try: the file is truncated or damaged"
    ):
        tg.open(path)


def test_truncated_safetensors(tmp_path, sd):
    path = tmp_path / "m.safetensors"
    save_file(sd, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(tg.CheckpointError, match=r"\(read as safetensors\): entry .* outside the .*-byte data block"):
        tg.open(path)


def test_corrupt_legacy_pickle(tmp_path, sd):
    path = tmp_path / "m.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[:60]))
    with pytest.raises(tg.CheckpointError, match=r"read as torch-legacy"):
        tg.open(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_unsafe_pickle_names_the_global(tmp_path, zip_format):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": _Evil()}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(
        tg.UnsafeCheckpointError, match=r"(?s)refuses: posix.system.*nothing in it was executed"
    ) as info:
        tg.open(path)
    assert info.value.globals == ["posix.system"]


def test_allow_globals_for_trusted_data_classes(tmp_path, sd):
    import argparse

    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": sd, "hyper_parameters": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(tg.UnsafeCheckpointError, match=r"argparse.Namespace"):
        tg.open(path)
    _same(tg.open(path, allow_globals=["argparse.Namespace"]), sd)


def test_index_errors(tmp_path, sd):
    save_file(sd, tmp_path / "shard.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{not json")
    with pytest.raises(tg.CheckpointError, match=r"index is not valid JSON"):
        tg.open(index)
    index.write_text(json.dumps({"weight_map": {"a.weight": "missing.safetensors"}}))
    with pytest.raises(tg.CheckpointError, match=r"shard 'missing.safetensors' named by the index does not exist"):
        tg.open(index)
    index.write_text(json.dumps({"weight_map": {"a.weight": "../outside.safetensors"}}))
    with pytest.raises(tg.CheckpointError, match=r"shard '../outside.safetensors' lies outside"):
        tg.open(index)
    index.write_text(json.dumps({"weight_map": {"not.there": "shard.safetensors"}}))
    with pytest.raises(
        tg.CheckpointError, match=r"puts 'not.there' in 'shard.safetensors', but that shard does not hold it"
    ):
        tg.open(index)


def test_unknown_format_name(tmp_path, sd):
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(tg.CheckpointError, match=r"unknown format 'tflite'"):
        tg.open(tmp_path / "m.safetensors", format="tflite")


def test_missing_key_message(tmp_path, sd):
    src = tg.open(sd)
    with pytest.raises(KeyError, match=r"'nope' is not in in-memory state dict"):
        src["nope"]


def test_fingerprint_depends_on_layout_only(sd):
    a = tg.open(sd).fingerprint()
    assert a == tg.open({k: v + 1 for k, v in sd.items()}).fingerprint()
    assert a != tg.open({**sd, "extra": torch.zeros(1)}).fingerprint()


def test_checkpoint_error_pickles():
    e = tg.CheckpointError("/x", "bad", format="f", hint="h")
    e2 = pickle.loads(pickle.dumps(e))
    assert str(e2) == str(e) and isinstance(e2, tg.CheckpointError)
    u = pickle.loads(pickle.dumps(tg.UnsafeCheckpointError("/x", ["posix.system"])))
    assert u.globals == ["posix.system"]


def test_load_error_pickles():
    e = pickle.loads(pickle.dumps(tg.LoadError("title", ["a", "b"])))
    assert isinstance(e, tg.LoadError) and e.problems == ["a", "b"] and str(e) == "title\n  - a\n  - b"


def test_parallel_legacy_shards_report_the_broken_one(tmp_path, sd):
    keys = list(sd)
    weight_map = {}
    for i, part in enumerate([keys[:1], keys[1:2], keys[2:]]):
        name = f"pytorch_model-{i}.bin"
        torch.save({k: sd[k] for k in part}, tmp_path / name, _use_new_zipfile_serialization=False)
        weight_map.update(dict.fromkeys(part, name))
    bad = tmp_path / "pytorch_model-1.bin"
    bad.write_bytes(bad.read_bytes()[:40])
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(tg.CheckpointError, match=r"pytorch_model-1.bin' \(read as torch-legacy\)"):
        tg.open(tmp_path)
