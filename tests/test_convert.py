"""tg.convert: safetensors single files and shards, dtype casts, shared tensors, atomic and non-destructive writes."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import torchgraft as tg
from torchgraft.convert import parse_dtype, parse_size


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32),
        "a.bias": torch.randn(64),
        "b.weight": torch.randn(128, 64),
        "steps": torch.tensor(7),
        "mask": torch.tensor([True, False]),
    }


def assert_same(back: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert back.keys() == expected.keys()
    for k, v in expected.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_single_file_round_trip_keeps_metadata(tmp_path, state):
    src = tmp_path / "src.safetensors"
    save_file(state, src, metadata={"note": "kept"})
    r = tg.convert(src, tmp_path / "out.safetensors")
    assert r.files == [str(tmp_path / "out.safetensors")] and r.index is None and r.tensors == 5
    assert_same(load_file(tmp_path / "out.safetensors"), state)
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        assert f.metadata() == {"note": "kept", "format": "pt"}
    mode = stat.S_IMODE((tmp_path / "out.safetensors").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not the 0600 of a temporary file


def test_from_torch_zip_with_container(tmp_path, state):
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "train.ckpt")
    r = tg.convert(tmp_path / "train.ckpt", tmp_path)  # a directory: model.safetensors in it
    assert r.files == [str(tmp_path / "model.safetensors")] and r.skipped == {}
    assert_same(load_file(tmp_path / "model.safetensors"), state)


def test_dtype_casts_floats_only(tmp_path, state):
    r = tg.convert(state, tmp_path / "bf16.safetensors", dtype="bf16")
    back = load_file(tmp_path / "bf16.safetensors")
    assert r.dtype == "bfloat16"
    assert back["a.weight"].dtype == torch.bfloat16 and torch.equal(back["a.weight"], state["a.weight"].bfloat16())
    assert back["steps"].dtype == torch.int64 and back["mask"].dtype == torch.bool
    assert r.bytes == sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in state.values())


def test_shards_and_index(tmp_path, state):
    out = tmp_path / "m" / "model.safetensors"
    r = tg.convert(state, out, max_shard_size=40_000)  # a.weight 8 KB, b.weight 32 KB
    names = [os.path.basename(f) for f in r.files]
    assert (
        names == [f"model-{i:05d}-of-{len(names):05d}.safetensors" for i in range(1, len(names) + 1)]
        and len(names) >= 2
    )
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == r.bytes
    assert set(index["weight_map"]) == set(state)
    assert_same({k: v.load() for k, v in tg.open(tmp_path / "m").items()}, state)
    for f in r.files:  # every shard carries the metadata
        with safe_open(f, "pt") as h:
            assert h.metadata() == {"format": "pt"}


def test_one_shard_is_a_single_file(tmp_path, state):
    r = tg.convert(state, tmp_path / "model.safetensors", max_shard_size="1GB")
    assert r.index is None and r.files == [str(tmp_path / "model.safetensors")]


def test_refuses_to_overwrite_and_force_replaces_stale_forms(tmp_path, state):
    out = tmp_path / "model.safetensors"
    tg.convert(state, out, max_shard_size=40_000)
    shards = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FileExistsError, match=r"model\.safetensors\.index\.json exists; pass --force"):
        tg.convert(state, out)  # a single file next to an index would be shadowed by it
    assert sorted(p.name for p in tmp_path.iterdir()) == shards
    r = tg.convert(state, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert len(r.removed) == len(shards)
    with pytest.raises(FileExistsError, match="model.safetensors exists"):
        tg.convert(state, out, max_shard_size=40_000)
    tg.convert(state, out, max_shard_size=40_000, force=True)
    assert "model.safetensors" not in {p.name for p in tmp_path.iterdir()}
    assert tg.open(tmp_path).format == "sharded-safetensors"


def test_failure_leaves_nothing_behind(tmp_path, state):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"original")

    def fail(done: int, total: int) -> None:
        if done == total:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        tg.convert(state, out, force=True, max_shard_size=40_000, progress=fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert out.read_bytes() == b"original"


def test_tied_and_shared_tensors(tmp_path):
    emb = torch.randn(10, 4)
    sd = {"embed.weight": emb, "lm_head.weight": emb, "half": emb[5:], "t": emb.t()}
    r = tg.convert(sd, tmp_path / "copies.safetensors")
    assert (
        r.shared == {"lm_head.weight": "embed.weight", "half": "embed.weight", "t": "embed.weight"} and r.aliases == {}
    )
    back = load_file(tmp_path / "copies.safetensors")
    assert_same(back, {k: v.contiguous() for k, v in sd.items()})

    r = tg.convert(sd, tmp_path / "dedupe.safetensors", dedupe_tied=True)
    assert r.aliases == {"lm_head.weight": "embed.weight"} and r.tensors == 3
    back = load_file(tmp_path / "dedupe.safetensors")
    assert set(back) == {"embed.weight", "half", "t"}
    with safe_open(tmp_path / "dedupe.safetensors", "pt") as f:
        assert json.loads(f.metadata()["torchgraft_aliases"]) == {"lm_head.weight": "embed.weight"}


def test_tied_model_weights_round_trip_through_load(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    torch.manual_seed(1)
    src = Tied()
    tg.convert(src.state_dict(), tmp_path / "tied.safetensors", dedupe_tied=True)
    dst = Tied()
    report = tg.load(dst, tmp_path / "tied.safetensors")
    assert report.missing == [] and dst.head.weight is dst.embed.weight
    assert torch.equal(dst.embed.weight, src.embed.weight)


def test_argument_errors(tmp_path, state):
    with pytest.raises(ValueError, match="must be a directory or a file name ending in .safetensors"):
        tg.convert(state, tmp_path / "model.bin")
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        tg.convert(state, tmp_path / "x.safetensors", dtype="int4")
    with pytest.raises(ValueError, match="cannot read the size '2 potatoes'"):
        tg.convert(state, tmp_path / "x.safetensors", max_shard_size="2 potatoes")
    with pytest.raises(tg.CheckpointError, match="no such file"):
        tg.convert(tmp_path / "absent.pt", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_parse_helpers():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1.5kb") == 1500
    assert parse_size(1024) == 1024
    assert parse_size(None) is None
    with pytest.raises(ValueError, match="must be positive"):
        parse_size("0MB")
    assert parse_dtype("bf16") == parse_dtype(torch.bfloat16) == "bfloat16"
    assert parse_dtype("HALF") == "float16"
    assert parse_dtype(None) is None
