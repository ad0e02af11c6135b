"""tg.diff: only-in-A/B, shape and dtype changes, rename suggestions, value statistics, plots."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchgraft as tg
from tests.conftest import TinyNet
from torchgraft.diff import layer_of


def sd(**tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k.replace("__", "."): v for k, v in tensors.items()}


def test_structural_changes():
    a = sd(x__weight=torch.zeros(2, 3), x__bias=torch.zeros(2), gone=torch.zeros(5, 7, 9))
    b = sd(x__weight=torch.zeros(2, 4), x__bias=torch.zeros(2, dtype=torch.float16), new=torch.zeros(11))
    d = tg.diff(a, b)
    assert d.common == ["x.weight", "x.bias"]
    assert d.only_a == ["gone"] and d.only_b == ["new"] and d.renames == []  # different shapes: no rename
    assert d.shape_changed == [{"name": "x.weight", "a": [2, 3], "b": [2, 4]}]
    assert d.dtype_changed == [{"name": "x.bias", "a": "float32", "b": "float16"}]
    assert d.changed and d.values is None
    text = str(d)
    assert "shape changes" in text and "dtype changes" in text and "gone" in text and "new" in text


def test_identical_is_unchanged():
    a = sd(w=torch.ones(3))
    d = tg.diff(a, dict(a), values=True)
    assert not d.changed and d.values == [{"name": "w", "b": "w", "max_abs": 0.0, "rel": 0.0, "identical": True}]
    assert "no differences" in str(d)


def test_rename_suggestions_prefer_similar_paths_and_layer_numbers():
    shape = (4, 4)
    a = {f"enc.layer.{i}.attn.query.weight": torch.randn(shape) for i in range(3)}
    b = {f"enc.layer.{i}.attn.q_proj.weight": a[f"enc.layer.{i}.attn.query.weight"].clone() for i in range(3)}
    a["enc.norm.gamma"] = torch.ones(4)
    b["enc.norm.weight"] = torch.ones(4)
    a["dec.out.bias"] = torch.zeros(4)  # same shape as the norm, but another kind of leaf and path
    d = tg.diff(a, b, values=True)
    pairs = {(r.a, r.b) for r in d.renames}
    assert pairs == {(f"enc.layer.{i}.attn.query.weight", f"enc.layer.{i}.attn.q_proj.weight") for i in range(3)} | {
        ("enc.norm.gamma", "enc.norm.weight")
    }
    assert all(r.kind == "similar" and "values identical" in r.reason for r in d.renames)
    assert "dec.out.bias" in d.only_a


def test_no_rename_between_unrelated_names():
    d = tg.diff({"encoder.block.0.mlp.fc1.weight": torch.zeros(3, 3), "x": torch.zeros(1)},
                {"decoder.head.classifier.bias": torch.zeros(3, 3), "x": torch.zeros(1)})  # fmt: skip
    assert d.renames == []


def test_prefix_added_and_removed():
    base = {
        "embeddings.weight": torch.zeros(5, 2),
        "layer.0.weight": torch.zeros(2, 2),
        "layer.1.weight": torch.zeros(2, 2),
    }
    prefixed = {f"bert.{k}": v for k, v in base.items()} | {"classifier.weight": torch.zeros(3, 2)}
    d = tg.diff(base, prefixed)
    assert d.prefix == {"mode": "add", "prefix": "bert.", "count": 3}
    assert {(r.a, r.b) for r in d.renames} == {(k, f"bert.{k}") for k in base}
    assert all(r.kind == "prefix" and r.score == 1.0 for r in d.renames)
    assert "base-model prefix 'bert.' added in B: 3 names" in str(d)
    d = tg.diff(prefixed, base)
    assert d.prefix["mode"] == "strip" and d.prefix["prefix"] == "bert."


def test_value_statistics_and_layers():
    torch.manual_seed(0)
    a = {
        "features.0.weight": torch.randn(8, 3),
        "features.1.weight": torch.randn(8),
        "head.weight": torch.randn(2, 8),
        "zero": torch.zeros(3),
    }
    b = {k: v.clone() for k, v in a.items()}
    b["features.1.weight"] += 0.5
    b["zero"][0] = 1.0
    d = tg.diff(a, b, values=True)
    row = next(v for v in d.values if v["name"] == "features.1.weight")
    assert row["max_abs"] == pytest.approx(0.5)
    assert row["rel"] == pytest.approx((0.5 * math.sqrt(8)) / a["features.1.weight"].double().norm().item())
    assert next(v for v in d.values if v["name"] == "zero")["rel"] is None  # relative to an all-zero tensor
    layers = {row["layer"]: row for row in d.layers}
    assert list(layers) == ["features.0", "features.1", "head", "zero"]
    assert layers["features.0"]["rel"] == 0.0 and layers["features.1"]["changed"] == 1
    assert d.summary()["values_changed"] == 2


def test_against_a_model_on_meta_compares_names_not_values():
    with torch.device("meta"):
        model = TinyNet(num_classes=5)
    torch.manual_seed(0)
    d = tg.diff(TinyNet().state_dict(), model, values=True)
    assert [x["name"] for x in d.shape_changed] == ["head.weight", "head.bias"]
    assert d.values == [] and set(d.skipped_values) >= {"conv.weight"}
    assert d.b == "model TinyNet (state-dict)"


def test_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need the plot extra: pip install 'torchgraft[plot]'")
    a = {f"blocks.{i}.w": torch.ones(4) for i in range(4)}
    b = {k: v * (1 + i / 10) for i, (k, v) in enumerate(a.items())}
    d = tg.diff(a, b, values=True)
    assert [round(row["rel"], 6) for row in d.layers] == [0.0, 0.1, 0.2, 0.3]
    out = d.plot(tmp_path / "change.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="compare them first with diff\\(a, b, values=True\\)"):
        tg.diff(a, b).plot(tmp_path / "nothing.png")
    assert not (tmp_path / "nothing.png").exists()


def test_to_dict_is_json_ready():
    import json

    d = tg.diff({"enc.q.weight": torch.zeros(2)}, {"enc.query.weight": torch.zeros(2)}, values=True)
    out = json.loads(json.dumps(d.to_dict()))
    assert out["renames"][0]["shape_a"] == [2] and out["changed"] is True and out["summary"]["renames"] == 1


def test_unreadable_side_raises(tmp_path):
    with pytest.raises(tg.CheckpointError, match="no such file"):
        tg.diff(tmp_path / "a.safetensors", {"x": torch.zeros(1)})


def test_layer_of():
    assert layer_of("encoder.layer.3.attention.self.query.weight") == "encoder.layer.3"
    assert layer_of("features.17.conv.0.0.weight") == "features.17"
    assert layer_of("embeddings.word_embeddings.weight") == "embeddings.word_embeddings"
    assert layer_of("bert.embeddings.LayerNorm.bias") == "bert.embeddings"
    assert layer_of("classifier.weight") == "classifier"
    assert layer_of("scale") == "scale"


def test_module_input_is_its_state_dict():
    m = nn.Linear(2, 2)
    d = tg.diff(m, m.state_dict(), values=True)
    assert not d.changed


def test_nan_values_stay_json_safe():
    import json

    d = tg.diff({"w": torch.ones(3)}, {"w": torch.tensor([1.0, float("nan"), 1.0])}, values=True)
    out = json.loads(json.dumps(d.to_dict(), allow_nan=False))
    assert out["values"] == [{"name": "w", "b": "w", "max_abs": None, "rel": None, "identical": False}]
    assert d.changed and d.layers[0]["rel"] is None
