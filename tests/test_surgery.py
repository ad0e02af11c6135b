"""Surgery helpers, and issue 3's acceptance on the real checkpoints (MobileNetV2, MiniLM)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import torchgraft as tg
from torchgraft.adapters import embedding_rows, input_channels, select_layers
from torchgraft.demo.mobilenet_v2 import mobilenet_v2
from torchgraft.surgery import SurgeryError, find_head, find_input_conv, replace_head, replace_input_conv

# ---------------------------------------------------------------------------
# finding and replacing modules


def test_mobilenet_torchvision_names():
    model = mobilenet_v2()
    conv = replace_input_conv(model, 1)
    head = replace_head(model, 2)
    assert (conv.path, head.path) == ("features.0.0", "classifier.1")
    assert "name 'features.0.0'" in conv.found_by and "name 'classifier.1'" in head.found_by
    new = model.features[0][0]
    assert new is conv.new and (new.in_channels, new.out_channels, new.stride, new.padding, new.bias) == (
        1,
        32,
        (2, 2),
        (1, 1),
        None,
    )
    assert isinstance(model.classifier[1], nn.Linear) and model.classifier[1].weight.shape == (2, 1280)
    assert "features.0.0: Conv2d(3, 32" in str(conv) and "-> Conv2d(1, 32" in str(conv)
    model.eval()
    assert model(torch.rand(1, 1, 64, 64)).shape == (1, 2)


def test_surgery_on_meta_then_load_materialises_everything(mobilenet_path):
    with torch.device("meta"):
        model = mobilenet_v2()
    replace_input_conv(model, 1)
    replace_head(model, 2)
    assert model.features[0][0].weight.is_meta and model.classifier[1].weight.is_meta
    tg.load(model, mobilenet_path, adapt="auto")
    assert not any(t.is_meta for t in model.state_dict().values())


def test_replace_input_conv_can_adapt_the_current_weights():
    model = mobilenet_v2()
    old = model.features[0][0].weight.detach().clone()
    replace_input_conv(model, 1, method="luminance")
    assert torch.equal(model.features[0][0].weight.detach(), input_channels(old, 1, method="luminance"))


class TimmLike(nn.Module):
    """The first conv by registration order and the last Linear are not the ones pretrained_cfg names."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Conv2d(5, 5, 1)
        self.stem = nn.Conv2d(3, 8, 3, bias=True)
        self.fc = nn.Linear(8, 10)
        self.proj = nn.Linear(10, 10)
        self.num_classes = 10
        self.pretrained_cfg = {"first_conv": "stem", "classifier": "fc"}


def test_timm_pretrained_cfg_is_followed():
    model = TimmLike()
    conv, head = replace_input_conv(model, 1), replace_head(model, 4)
    assert (conv.path, head.path) == ("stem", "fc")
    assert "pretrained_cfg['first_conv']" in conv.found_by and "pretrained_cfg['classifier']" in head.found_by
    assert model.num_classes == 4 and head.updated == ("num_classes: 10 -> 4",)
    assert model.stem.bias is not None and model.aux.in_channels == 5


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU())
        self.b = nn.Conv1d(4, 4, 1)
        self.z1 = nn.Linear(4, 6)
        self.z2 = nn.Linear(6, 3)


def test_fallback_first_conv_and_last_linear():
    model = Odd().train()
    model.z2.weight.requires_grad_(False)
    conv, head = replace_input_conv(model, 1), replace_head(model, 5)
    assert (conv.path, conv.found_by) == ("a.0", "first convolution in registration order")
    assert (head.path, head.found_by) == ("z2", "last Linear in registration order")
    assert isinstance(model.a[0], nn.Conv1d) and model.a[0].in_channels == 1
    assert model.z2.training and not model.z2.weight.requires_grad


def test_explicit_path_and_conv_head():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 1000, 1))
    assert find_input_conv(model, path="1").path == "1"
    head = replace_head(model, 7, path="1")
    assert head.found_by == "path='1'" and isinstance(model[1], nn.Conv2d) and model[1].out_channels == 7


def test_replace_keeps_dtype():
    model = mobilenet_v2().to(torch.float64)
    replace_input_conv(model, 2)
    replace_head(model, 3)
    assert model.features[0][0].weight.dtype == torch.float64 and model.classifier[1].weight.dtype == torch.float64


def test_hugging_face_conventions_and_bookkeeping():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=16,
        patch_size=8,
        num_labels=5,
    )
    model = transformers.ViTForImageClassification(cfg).eval()
    conv, head = replace_input_conv(model, 1), replace_head(model, 3)
    assert conv.path == "vit.embeddings.patch_embeddings.projection" and "config.num_channels = 3" in conv.found_by
    assert "vit.embeddings.patch_embeddings.num_channels: 3 -> 1" in conv.updated
    assert head.path == "classifier" and "config.num_labels = 5" in head.found_by
    assert (model.config.num_channels, model.config.num_labels, model.num_labels) == (1, 3, 3)
    out = model(torch.rand(2, 1, 16, 16), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0


def test_find_returns_none_without_candidates():
    assert find_input_conv(nn.Linear(2, 2)) is None
    assert find_head(nn.Sequential(nn.ReLU())) is None


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight


SURGERY_ERRORS = [
    (lambda: replace_input_conv(mobilenet_v2(), 0), "in_channels must be a positive int"),
    (lambda: replace_input_conv(mobilenet_v2(), True), "in_channels must be a positive int"),
    (lambda: replace_head(mobilenet_v2(), -2), "num_classes must be a positive int"),
    (lambda: replace_input_conv(nn.Linear(2, 2), 1), "Linear has no convolution; pass path="),
    (lambda: replace_head(nn.Sequential(nn.ReLU()), 2), "Sequential has no Linear layer; pass path="),
    (lambda: replace_input_conv(mobilenet_v2(), 1, path="features.99"), "has no module 'features.99'"),
    (
        lambda: replace_input_conv(mobilenet_v2(), 1, path="features.0.1"),
        "'features.0.1' is a BatchNorm2d, not a convolution",
    ),
    (lambda: replace_head(mobilenet_v2(), 1, path="features.0.1"), "not a Linear or convolution"),
    (
        lambda: replace_input_conv(mobilenet_v2(), 1, path="features.1.conv.0.0"),
        r"is a grouped convolution \(groups=32\)",
    ),
    (lambda: replace_head(Tied(), 3, path="out"), "'out' shares its weights with 'emb.weight'"),
]


@pytest.mark.parametrize("call, message", SURGERY_ERRORS, ids=[m[:40] for _, m in SURGERY_ERRORS])
def test_surgery_errors(call, message):
    with pytest.raises(SurgeryError, match=message):
        call()


def test_failed_channel_adaptation_leaves_the_model_unchanged():
    model = mobilenet_v2()
    old = model.features[0][0]
    with pytest.raises(tg.AdapterError, match="this weight goes 3 -> 2"):
        replace_input_conv(model, 2, method="luminance")
    assert model.features[0][0] is old


# ---------------------------------------------------------------------------
# acceptance on the real checkpoints


@pytest.fixture(scope="module")
def mobilenet_sd(mobilenet_path):
    return torch.load(mobilenet_path, map_location="cpu", weights_only=True)


def test_acceptance_1_luminance_first_conv_new_head_rest_identical(mobilenet_path, mobilenet_sd):
    model = mobilenet_v2(num_classes=2, in_channels=1)
    report = tg.load(model, mobilenet_path, adapt={"features.0.0.weight": "luminance"})
    rgb = mobilenet_sd["features.0.0.weight"].double()
    formula = (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]).float()
    assert (model.features[0][0].weight - formula).abs().max().item() == 0.0
    assert report.adapted == {"features.0.0.weight": {"name": "input_channels", "args": {"method": "luminance"}}}
    assert model.classifier[1].weight.shape == (2, 1280)
    assert {m["key"] for m in report.mismatched} == {"classifier.1.weight", "classifier.1.bias"}
    assert report.initialised == {"classifier.1": "reset_parameters"}
    state = model.state_dict()
    others = [k for k in mobilenet_sd if k not in ("features.0.0.weight", "classifier.1.weight", "classifier.1.bias")]
    assert len(others) == 311 and all(torch.equal(state[k], mobilenet_sd[k]) for k in others)


def test_acceptance_2_auto_grey_features_equal_rgb_on_repeated_grey(mobilenet_path, mobilenet_sd):
    model = mobilenet_v2()
    replace_input_conv(model, 1)
    replace_head(model, 2)
    report = tg.load(model, mobilenet_path, adapt="auto")
    assert report.adapted["features.0.0.weight"] == {"name": "input_channels", "args": {"method": "sum"}}
    assert report.reinitialised == ["classifier.1.weight", "classifier.1.bias"] and not report.mismatched
    reference = mobilenet_v2()
    reference.load_state_dict(mobilenet_sd)
    model.eval(), reference.eval()
    grey = torch.rand(2, 1, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (model.forward_features(grey) - reference.forward_features(grey.repeat(1, 3, 1, 1))).abs().max().item()
    print(f"acceptance 2: max |features(grey) - features_rgb(grey x3)| = {err:.3g}")
    assert err < 1e-4


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return tg.open(minilm_dir)


def test_acceptance_3_minilm_longer_positions_and_bigger_vocabulary(minilm_dir, minilm_config, minilm):
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(
        minilm_dir, max_position_embeddings=1024, vocab_size=minilm_config.vocab_size + 100
    )
    with torch.device("meta"):
        model = BertModel(config)
    report = tg.load(model, minilm_dir, adapt="auto")
    assert report.adapted == {
        "embeddings.word_embeddings.weight": {"name": "embedding_rows", "args": {}},
        "embeddings.position_embeddings.weight": {"name": "positions_1d", "args": {}},
    }
    assert not report.missing and not report.mismatched and not report.unexpected
    words, old_words = (
        model.embeddings.word_embeddings.weight.detach(),
        minilm["embeddings.word_embeddings.weight"].load(),
    )
    assert words.shape == (30622, 384) and torch.equal(words[:30522], old_words)
    assert torch.equal(words[30522:], embedding_rows(old_words, 30622)[30522:])  # seeded: the same rows every load
    mean_dev = (words[30522:].double() - old_words.double().mean(0)).abs().max().item()
    assert mean_dev < 1e-3 * old_words.double().std().item()
    # 512 -> 1024 is an exact 2x stretch: new 2i+1 = 3/4 old i + 1/4 old i+1, new 2i = 1/4 old i-1 + 3/4 old i
    pos, old = (
        model.embeddings.position_embeddings.weight.detach().double(),
        minilm["embeddings.position_embeddings.weight"].load().double(),
    )
    assert pos.shape == (1024, 384)
    odd_err = (pos[1:-1:2] - (0.75 * old[:-1] + 0.25 * old[1:])).abs().max().item()
    even_err = (pos[2::2] - (0.25 * old[:-1] + 0.75 * old[1:])).abs().max().item()
    assert max(odd_err, even_err) < 1e-6 and torch.equal(pos[0], old[0]) and torch.equal(pos[-1], old[-1])
    state = model.state_dict()
    same = [k for k in minilm if k in state and k not in report.adapted and k != "embeddings.position_ids"]
    assert len(same) == 101 and all(torch.equal(state[k], minilm[k].load()) for k in same)
    print(
        f"acceptance 3: new vocab rows max |row - mean| = {mean_dev:.3g}; positions vs 2x stretch formula {max(odd_err, even_err):.3g}"
    )
    model.eval()
    with torch.no_grad():
        hidden = model(torch.randint(0, 30622, (1, 700))).last_hidden_state
    assert hidden.shape == (1, 700, 384) and torch.isfinite(hidden).all()


@pytest.mark.parametrize("layers", [{0: 0, 1: 2, 2: 4}, "every_other"])
def test_acceptance_3_minilm_into_three_layers(minilm_dir, minilm_config, minilm, layers):
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        model = BertModel(BertConfig.from_pretrained(minilm_dir, num_hidden_layers=3))
    rules = select_layers(
        layers, template="encoder.layer.{}", num_layers=3, source_layers=minilm_config.num_hidden_layers
    )
    report = tg.load(model, minilm_dir, rules=rules)
    assert not report.missing and not report.unexpected and not report.mismatched
    state = model.state_dict()
    for new, old in ((0, 0), (1, 2), (2, 4)):
        keys = [k for k in minilm if k.startswith(f"encoder.layer.{old}.")]
        assert len(keys) == 16
        assert all(torch.equal(state[k.replace(f"layer.{old}.", f"layer.{new}.", 1)], minilm[k].load()) for k in keys)
    dropped = [k for k, why in report.ignored.items() if why == "dropped by a rule"]
    assert len(dropped) == 48 and {k.split(".")[2] for k in dropped} == {"1", "3", "5"}
    assert report.renamed["encoder.layer.4.output.dense.weight"] == "encoder.layer.2.output.dense.weight"


def test_acceptance_5_demo_shows_the_surgery(mobilenet_path):
    from rich.console import Console

    from torchgraft.demo.scenarios import SCENARIOS, run_demo

    assert "surgery" in SCENARIOS
    out = io.StringIO()
    assert run_demo("surgery", console=Console(file=out, width=200)) == 0
    text = out.getvalue()
    assert "surgery: features.0.0: Conv2d(3, 32" in text and "0.299 R + 0.587 G + 0.114 B: max |diff| = 0" in text
    assert "check passed" in text
