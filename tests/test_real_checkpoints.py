"""Issue 2's acceptance on the real checkpoints: MiniLM (safetensors) and torchvision MobileNetV2 (legacy pickle)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torchgraft as tg
from torchgraft.demo.mobilenet_v2 import mobilenet_v2

transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")
IDS = torch.tensor([[101, 7592, 1010, 2088, 999, 102]])


@pytest.fixture(scope="module")
def minilm_sd(minilm_dir):
    return {k: r.load() for k, r in tg.open(minilm_dir).items()}


@pytest.fixture(scope="module")
def reference_base(minilm_dir):
    return transformers.BertModel.from_pretrained(minilm_dir).eval()


def test_minilm_into_token_classification(minilm_dir):
    config = transformers.BertConfig.from_pretrained(minilm_dir, num_labels=2)
    model = transformers.BertForTokenClassification(config)
    report = tg.load(model, minilm_dir)
    assert report.missing == ["classifier.weight", "classifier.bias"]
    assert sorted(report.unexpected) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert report.prefix == {"mode": "add", "prefix": "bert."}
    assert report.initialised == {"classifier": "transformers _init_weights"}
    reference = transformers.BertForTokenClassification.from_pretrained(minilm_dir, num_labels=2)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        if not key.startswith("classifier."):
            assert torch.equal(ours[key], theirs[key]), key
    assert model.classifier.weight.std().item() == pytest.approx(config.initializer_range, rel=0.3)
    assert torch.count_nonzero(model.classifier.bias) == 0


def test_strict_on_real_checkpoint_lists_every_problem(minilm_dir, minilm_config):
    config = transformers.BertConfig.from_pretrained(minilm_dir, num_labels=2)
    model = transformers.BertForTokenClassification(config)
    with pytest.raises(
        tg.LoadError,
        match=r"(?s)missing: classifier.weight \[2, 384\].*missing: classifier.bias.*unexpected: pooler.dense",
    ):
        tg.load(model, minilm_dir, strict=True)


def test_legacy_names_prefix_and_pickle_into_base_model(tmp_path, minilm_sd, minilm_config):
    old = {}
    for k, v in minilm_sd.items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        old[f"bert.{k}"] = v
    old["cls.predictions.bias"] = torch.zeros(minilm_config.vocab_size)
    path = tmp_path / "pytorch_model.bin"
    torch.save(old, path, _use_new_zipfile_serialization=False)
    model = transformers.BertModel(minilm_config)
    report = tg.load(model, tmp_path)
    assert tg.open(path).format == "torch-legacy"
    assert report.prefix == {"mode": "strip", "prefix": "bert."}
    assert report.renamed["bert.embeddings.LayerNorm.gamma"] == "embeddings.LayerNorm.weight"
    assert report.missing == [] and report.unexpected == ["cls.predictions.bias"]
    sd = model.state_dict()
    assert sd.keys() <= minilm_sd.keys()
    for k in sd:
        assert torch.equal(sd[k], minilm_sd[k]), k


def test_layerscale_gamma_round_trips_untouched():
    class LayerScale(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.gamma = nn.Parameter(torch.randn(dim))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)
            self.ls1 = LayerScale(4)
            self.beta_proj = nn.Linear(4, 4)

    src = Block().state_dict()
    model = Block()
    report = tg.load(model, src, strict=True)
    assert report.renamed == {}
    assert torch.equal(model.ls1.gamma, src["ls1.gamma"]) and torch.equal(
        model.beta_proj.weight, src["beta_proj.weight"]
    )


def test_mobilenet_legacy_pickle_strict(mobilenet_path):
    model = mobilenet_v2()
    report = tg.load(model, mobilenet_path, strict=True)
    assert report.ok and len(report.loaded) == 314
    reference = mobilenet_v2()
    reference.load_state_dict(torch.load(mobilenet_path, map_location="cpu", weights_only=True))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference.eval()(x))


def test_mobilenet_on_meta(mobilenet_path):
    with torch.device("meta"):
        model = mobilenet_v2()
    tg.load(model, mobilenet_path, strict=True)
    reference = mobilenet_v2()
    reference.load_state_dict(torch.load(mobilenet_path, map_location="cpu", weights_only=True))
    # The guarantee is bit-identical tensors. Mapped tensors keep the file's alignment (4 bytes for
    # these float32 records, not the allocator's 64), so BLAS may take another kernel and sum in
    # another order: outputs agree to float32 rounding, not bit for bit (README, Zero-copy).
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: {f"module.{k}": v for k, v in sd.items()}, id="ddp-module-prefix"),
        pytest.param(lambda sd: {"state_dict": sd, "epoch": 2, "global_step": 10}, id="lightning"),
        pytest.param(lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}}, id="lightning-model-attr"),
    ],
)
def test_training_checkpoints(tmp_path, minilm_sd, minilm_config, wrap):
    path = tmp_path / "last.ckpt"
    torch.save(wrap(minilm_sd), path)
    model = transformers.BertModel(minilm_config)
    report = tg.load(model, path, strict=True)
    assert report.ok
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in minilm_sd.items() if k in sd)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_sharded_real_checkpoint(tmp_path, minilm_sd, minilm_config, fmt):
    keys = sorted(minilm_sd)
    parts = [keys[: len(keys) // 3], keys[len(keys) // 3 : 2 * len(keys) // 3], keys[2 * len(keys) // 3 :]]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        name = f"model-{i:05d}-of-00003.{'safetensors' if fmt == 'safetensors' else 'bin'}"
        shard = {k: minilm_sd[k].contiguous() for k in part}
        save_file(shard, tmp_path / name) if fmt == "safetensors" else torch.save(shard, tmp_path / name)
        weight_map.update(dict.fromkeys(part, name))
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (tmp_path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = transformers.BertConfig(**{**minilm_config.to_dict(), "num_labels": 2})
    with torch.device("meta"):
        model = transformers.BertForTokenClassification(config)
    report = tg.load(model, tmp_path)
    assert report.missing == ["classifier.weight", "classifier.bias"]
    sd = model.state_dict()
    assert all(torch.equal(sd[f"bert.{k}"], v) for k, v in minilm_sd.items() if f"bert.{k}" in sd)


def test_meta_model_forward_equals_from_pretrained(minilm_dir, minilm_config, reference_base):
    with torch.device("meta"):
        model = transformers.BertModel(minilm_config)
    report = tg.load(model, minilm_dir, strict=True)
    assert report.ok
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    with torch.no_grad():
        ours = model.eval()(IDS).last_hidden_state
        theirs = reference_base(IDS).last_hidden_state
    assert torch.equal(ours, theirs)


def test_dtype_bf16_on_meta(minilm_dir, minilm_config):
    with torch.device("meta"):
        model = transformers.BertModel(minilm_config)
    tg.load(model, minilm_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.embeddings.position_ids.dtype == torch.int64


def _mapped_files() -> dict[tuple[int, int], str]:
    """Address ranges of file-backed mappings of this process (Linux)."""
    ranges = {}
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith("/"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges[(lo, hi)] = parts[5]
    return ranges


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
@pytest.mark.parametrize("fmt", ["safetensors", "torch-zip"])
def test_meta_load_is_zero_copy_from_the_file(tmp_path, minilm_sd, minilm_config, fmt):
    """Loaded parameters live in the file's memory map: no private copy of the weights."""
    path = tmp_path / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    save_file(minilm_sd, path) if fmt == "safetensors" else torch.save(minilm_sd, path)
    with torch.device("meta"):
        model = transformers.BertModel(minilm_config)
    tg.load(model, path, check_finite=False)
    maps = _mapped_files()
    for name, p in model.named_parameters():
        ptr = p.data_ptr()
        owner = next((f for (lo, hi), f in maps.items() if lo <= ptr < hi), None)
        assert owner == str(path), f"{name} is not backed by {path} (found {owner})"


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
def test_legacy_pickle_with_aligned_records_is_mapped_not_read(mobilenet_path):
    """torchvision's legacy .pth has its float records aligned: the weights stay in the page cache."""
    reference = torch.load(mobilenet_path, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        model = mobilenet_v2()
    report = tg.load(model, mobilenet_path, strict=True, check_finite=False)
    assert report.ok
    maps = _mapped_files()
    for name, t in model.named_parameters():
        owner = next((f for (lo, hi), f in maps.items() if lo <= t.data_ptr() < hi), None)
        assert owner == str(mobilenet_path), f"{name} is not backed by the .pth (found {owner})"
    state = model.state_dict()
    assert all(torch.equal(t, reference[name]) for name, t in state.items())
