"""The adapt= policy in the plan: default stays conservative, "auto" picks by role and shape, explicit
glob patterns, reinit, plan JSON round trip, report.adapted, and every error path."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torchgraft as tg
from torchgraft import AdapterError, PlanError
from torchgraft.adapters import embedding_rows, input_channels, positions_1d, positions_2d


class Net(nn.Module):
    """stem conv -> inner conv -> vocabulary + position tables -> head."""

    def __init__(self, cin=3, inner=8, vocab=10, positions=6, classes=4):
        super().__init__()
        self.stem = nn.Conv2d(cin, 8, 3, padding=1)
        self.inner = nn.Conv2d(8, inner, 1)
        self.tokens = nn.Embedding(vocab, 8)
        self.position_embeddings = nn.Embedding(positions, 8)
        self.head = nn.Linear(inner, classes)

    def forward(self, x):
        return self.head(self.inner(self.stem(x)).mean((2, 3)))


class TinyViT(nn.Module):
    """timm layout: patch_embed.proj, cls token + pos_embed [1, 1 + H*W, D], num_prefix_tokens."""

    num_prefix_tokens = 1

    def __init__(self, grid=4, cin=3):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cin, 6, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 6))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, 6))
        self.head = nn.Linear(6, 3)


def _state(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def ckpt() -> dict[str, torch.Tensor]:
    return _state(Net())


def test_default_reports_mismatches_and_adapts_nothing(ckpt):
    model = Net(cin=1, classes=2, vocab=12)
    report = tg.load(model, ckpt)
    assert report.adapted == {}
    assert {m["key"] for m in report.mismatched} == {"stem.weight", "head.weight", "head.bias", "tokens.weight"}


def test_auto_adapts_by_role(ckpt):
    model = Net(cin=1, classes=2, vocab=12, positions=9)
    plan = tg.plan(model, ckpt, adapt="auto")
    assert plan.adapted == {
        "stem.weight": {"name": "input_channels", "args": {"method": "sum"}},
        "tokens.weight": {"name": "embedding_rows", "args": {}},
        "position_embeddings.weight": {"name": "positions_1d", "args": {}},
        "head.weight": {"name": "reinit", "args": {}},
        "head.bias": {"name": "reinit", "args": {}},
    }
    assert plan.mismatched == [] and plan.missing == []
    report = tg.load(model, ckpt, plan=plan)
    assert report.adapted == plan.adapted and report.reinitialised == ["head.weight", "head.bias"]
    assert report.initialised == {"head": "reset_parameters"}
    assert torch.equal(model.stem.weight, input_channels(ckpt["stem.weight"], 1, method="sum"))
    assert torch.equal(model.tokens.weight, embedding_rows(ckpt["tokens.weight"], 12))
    assert torch.equal(model.position_embeddings.weight, positions_1d(ckpt["position_embeddings.weight"], 9))
    assert torch.equal(model.stem.bias, ckpt["stem.bias"]) and torch.equal(model.inner.weight, ckpt["inner.weight"])
    assert not torch.equal(model.head.bias[:2], ckpt["head.bias"][:2])  # re-initialised, not copied


def test_auto_grows_input_channels_by_repeat_and_leaves_inner_layers_mismatched(ckpt):
    model = Net(cin=4, inner=5)
    plan = tg.plan(model, ckpt, adapt="auto")
    assert plan.adapted["stem.weight"] == {"name": "input_channels", "args": {"method": "repeat"}}
    assert [e.target for e in plan.mismatched] == ["inner.weight", "inner.bias", "head.weight"]
    assert any("inner.weight [8, 8, 1, 1] -> [5, 8, 1, 1] left as a mismatch" in n for n in plan.notes)


def test_auto_position_grid_keeps_the_class_token():
    src = _state(TinyViT(grid=4))
    model = TinyViT(grid=6, cin=1)
    report = tg.load(model, src, adapt="auto")
    assert report.adapted["pos_embed"] == {"name": "positions_2d", "args": {"num_prefix_tokens": 1}}
    assert report.adapted["patch_embed.proj.weight"]["args"] == {"method": "sum"}
    assert torch.equal(model.pos_embed.data, positions_2d(src["pos_embed"], 6, num_prefix_tokens=1))
    assert torch.equal(model.pos_embed.data[0, 0], src["pos_embed"][0, 0])


def test_auto_treats_an_embedding_beside_a_patch_conv_as_a_grid():
    """CLIP's vision embeddings: nn.Embedding(1 + H*W, D) next to the patch conv."""

    def clip_like(grid: int) -> nn.Module:
        m = nn.Module()
        m.embeddings = nn.Module()
        m.embeddings.patch_embedding = nn.Conv2d(3, 6, 4, 4, bias=False)
        m.embeddings.position_embedding = nn.Embedding(1 + grid * grid, 6)
        return m

    src = _state(clip_like(4))
    plan = tg.plan(clip_like(6), src, adapt="auto")
    assert plan.adapted == {
        "embeddings.position_embedding.weight": {"name": "positions_2d", "args": {"num_prefix_tokens": 1}}
    }


def test_auto_leaves_a_rank_change_mismatched():
    src = {"pos_embed": torch.randn(17, 6), **{k: v for k, v in _state(TinyViT()).items() if k != "pos_embed"}}
    plan = tg.plan(TinyViT(), src, adapt="auto")
    assert [e.target for e in plan.mismatched] == ["pos_embed"]
    assert any("ranks differ" in n for n in plan.notes)


def test_explicit_patterns_first_match_wins_and_apply_to_equal_shapes(ckpt):
    model = Net()
    bgr = [[0, 0, 1], [0, 1, 0], [1, 0, 0]]
    adapt = {
        "stem.weight": {"name": "input_channels", "args": {"method": bgr}},
        "head.*": "reinit",
        "*": "auto",
    }
    plan = tg.plan(model, ckpt, adapt=adapt)
    assert plan.adapted["stem.weight"] == {"name": "input_channels", "args": {"method": bgr}}
    assert set(plan.adapted) == {"stem.weight", "head.weight", "head.bias"}
    assert "re-initialised by adapt['head.*']" in plan.entries["head.bias"].note
    tg.load(model, ckpt, plan=plan)
    assert torch.equal(model.stem.weight, ckpt["stem.weight"].flip(1))


def test_plan_with_adapters_round_trips_through_json(ckpt, tmp_path):
    model = Net(cin=1, classes=2, vocab=12)
    adapt = {
        "stem.weight": "luminance",
        "head.weight": {"name": "output_rows", "args": {"keep": [3, 1]}},
        "head.bias": {"name": "output_rows", "args": {"keep": [3, 1]}},
        "tokens.*": "embedding_rows",
    }
    plan = tg.plan(model, ckpt, adapt=adapt)
    plan.save(tmp_path / "plan.json")
    again = tg.Plan.load(tmp_path / "plan.json")
    assert again.to_dict() == plan.to_dict()
    assert json.loads((tmp_path / "plan.json").read_text())["summary"]["adapted"] == 4
    report = tg.load(model, ckpt, plan=again)
    assert torch.equal(model.head.weight, ckpt["head.weight"][[3, 1]])
    assert torch.equal(model.stem.weight, input_channels(ckpt["stem.weight"], 1, method="luminance"))
    json.dumps(report.to_dict())
    assert report.to_dict()["adapted"]["head.bias"] == {"name": "output_rows", "args": {"keep": [3, 1]}}


def test_classifier_rows_by_label_names_from_config_json(tmp_path):
    src = _state(Net(classes=4))
    save_file(src, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "cat", "1": "dog", "2": "fox", "3": "owl"}}))
    model = Net(classes=3)
    model.config = SimpleNamespace(id2label={0: "owl", 1: "emu", 2: "cat"})
    spec = {"name": "output_rows", "args": {"keep": "labels", "fill": "zeros"}}
    plan = tg.plan(model, tmp_path, adapt={"head.*": spec})
    assert plan.adapted["head.weight"]["args"] == {"keep": [3, None, 0], "fill": "zeros"}
    assert "rows by label: owl<-3, emu<-new, cat<-0" in plan.entries["head.weight"].note
    tg.load(model, tmp_path, plan=plan)
    assert torch.equal(model.head.bias, torch.stack([src["head.bias"][3], torch.tensor(0.0), src["head.bias"][0]]))


def test_a_pattern_on_names_the_checkpoint_lacks_is_noted(ckpt):
    partial = {k: v for k, v in ckpt.items() if not k.startswith("head.")}
    plan = tg.plan(Net(), partial, adapt={"head.*": "reinit"})
    assert plan.adapted == {} and plan.missing == ["head.weight", "head.bias"]
    assert (
        "adapt['head.*']: its names get no checkpoint tensor (missing, or tied to another entry); nothing adapted"
        in plan.notes
    )


def test_strict_load_accepts_a_fully_adapted_model(ckpt):
    report = tg.load(Net(cin=1, classes=2), ckpt, adapt="auto", strict=True)
    assert report.ok and report.reinitialised == ["head.weight", "head.bias"]


def test_report_text_shows_adapters_and_reinit(ckpt):
    report = tg.load(Net(cin=1, classes=2), ckpt, adapt="auto")
    text = str(report)
    assert "by input_channels(method='sum') (1), reinit (2)" in text
    assert "Re-initialised by the adapt policy" in text and "Every weight came from the checkpoint" not in text
    plan_text = str(tg.plan(Net(cin=1, classes=2), ckpt, adapt="auto"))
    assert "initialise (adapt: reinit)" in plan_text


def test_reinit_warns_in_the_log(ckpt, caplog):
    tg.load(Net(classes=2), ckpt, adapt={"head.*": "reinit"})
    assert "re-initialised by the adapt policy although the checkpoint has them: head.{bias,weight}" in caplog.text


# ---------------------------------------------------------------------------
# errors: the plan refuses before anything is read or changed


def test_explicit_adapter_that_cannot_fit_fails_at_plan_time_and_leaves_the_model(ckpt):
    model = Net(cin=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        AdapterError,
        match="'luminance' turns 3 RGB channels into 1 grey channel; this weight goes 3 -> 2.* for 'stem.weight'",
    ):
        tg.load(model, ckpt, adapt={"stem.weight": "luminance"})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "adapt, error, message",
    [
        ("automatic", PlanError, "adapt='automatic': use 'auto' or a dict"),
        (["stem.weight"], PlanError, "adapt must be 'auto' or a dict"),
        ({"": "sum"}, PlanError, "non-empty glob strings"),
        ({"stem.weights": "sum"}, PlanError, "'stem.weights' matches none of Net's names; did you mean 'stem.weight'"),
        ({"stem.weight": "blur"}, AdapterError, "unknown adapter 'blur'"),
        (
            {"stem.weight": {"name": "input_channels", "args": {"method": "sum", "oops": 1}}},
            AdapterError,
            "bad arguments",
        ),
        (
            {"head.weight": {"name": "output_rows", "args": {"keep": "labels"}}},
            AdapterError,
            r"needs the checkpoint's labels: .*\(for 'head.weight'\)",
        ),
    ],
)
def test_policy_errors(ckpt, adapt, error, message):
    with pytest.raises(error, match=message):
        tg.plan(Net(cin=1, classes=2), ckpt, adapt=adapt)


def test_labels_need_the_models_labels_too(tmp_path):
    save_file(_state(Net()), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b", "2": "c", "3": "d"}}))
    with pytest.raises(AdapterError, match="needs the model's labels: model.config.id2label"):
        tg.plan(Net(classes=2), tmp_path, adapt={"head.*": {"name": "output_rows", "args": {"keep": "labels"}}})
