"""Issue 4: structural alignment of differently named checkpoints (``align=True``), reviewable and reusable plans.

Acceptance on real checkpoints (torchvision MobileNetV2 <-> Hugging Face MobileNetV2, MiniLM into a BERT
with other names), then synthetic renamings that stand for other families (ResNet-style blocks, ViT,
Llama, Sequential indices vs names, wrappers), the refusals, and the plan round trip.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

import torchgraft as tg
from torchgraft.align import MIN_CONFIDENCE, align, export_rules, source_order_trusted
from torchgraft.demo.mobilenet_v2 import mobilenet_v2
from torchgraft.sources import Source, TensorRef

transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")


def save_st(sd: dict[str, torch.Tensor], path) -> str:
    """safetensors stores keys sorted: file order says nothing about network order."""
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def assert_pairs_explained(p: tg.Plan) -> None:
    for target, info in p.aligned.items():
        assert MIN_CONFIDENCE <= info["confidence"] <= 1.0, target
        assert info["reason"], target


# ---------------------------------------------------------------------------
# Acceptance 1 + 2: torchvision MobileNetV2 <-> Hugging Face MobileNetV2, no hand-written rules


@pytest.fixture(scope="module")
def tv_reference(mobilenet_path):
    model = mobilenet_v2().eval()
    tg.load(model, mobilenet_path, strict=True)
    return model


@pytest.fixture(scope="module")
def hf_mobilenet(mobilenet_path):
    config = transformers.MobileNetV2Config(num_labels=1000, tf_padding=False, layer_norm_eps=1e-5)
    model = transformers.MobileNetV2ForImageClassification(config).eval()
    report = tg.load(model, mobilenet_path, align=True)
    return model, report


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def test_torchvision_weights_into_hf_mobilenet_without_rules(hf_mobilenet, tv_reference, images):
    model, report = hf_mobilenet
    assert model.classifier.weight.shape == (1000, 1280)  # num_labels=1000 gives 1000 classes, not 1001
    assert report.missing == [] and report.unexpected == [] and report.mismatched == [] and report.ambiguous == []
    assert len(report.aligned) == 314
    # conv_stem holds what torchvision keeps in features.0 and features.1
    first = report.aligned["mobilenet_v2.conv_stem.first_conv.convolution.weight"]
    assert first["source"] == "features.0.0.weight"
    assert "only tensor of shape (32, 3, 3, 3)" in first["reason"]
    assert (
        report.aligned["mobilenet_v2.conv_stem.reduce_1x1.normalization.running_var"]["source"]
        == "features.1.conv.2.running_var"
    )
    assert (
        report.aligned["mobilenet_v2.layer.0.expand_1x1.convolution.weight"]["source"] == "features.2.conv.0.0.weight"
    )
    # layer.3 and layer.4 have identical shapes: only order tells them apart
    assert (
        report.aligned["mobilenet_v2.layer.4.conv_3x3.normalization.weight"]["source"] == "features.6.conv.1.1.weight"
    )
    with torch.no_grad():
        err = (model(pixel_values=images).logits - tv_reference(images)).abs().max().item()
    assert err < 1e-5


def test_hf_mobilenet_safetensors_back_into_torchvision_layout(hf_mobilenet, tv_reference, images, tmp_path):
    path = save_st(hf_mobilenet[0].state_dict(), tmp_path / "hf.safetensors")
    assert not source_order_trusted(tg.open(path))
    model = mobilenet_v2().eval()
    plan = tg.plan(model, path, align=True)
    assert plan.missing == [] and plan.unexpected == [] and plan.ambiguous == []
    assert plan.aligned["features.0.0.weight"]["source"] == "mobilenet_v2.conv_stem.first_conv.convolution.weight"
    assert plan.aligned["features.1.conv.1.weight"]["source"] == "mobilenet_v2.conv_stem.reduce_1x1.convolution.weight"
    assert plan.aligned["features.6.conv.0.0.weight"]["source"] == "mobilenet_v2.layer.4.expand_1x1.convolution.weight"
    assert_pairs_explained(plan)
    tg.load(model, path, plan=plan)
    with torch.no_grad():
        err = (model(images) - tv_reference(images)).abs().max().item()
    assert err < 1e-5


def test_renamed_and_adapted_first_conv(mobilenet_path, tv_reference):
    config = transformers.MobileNetV2Config(num_labels=10, num_channels=1, tf_padding=False, layer_norm_eps=1e-5)
    model = transformers.MobileNetV2ForImageClassification(config).eval()
    # the 1-channel first conv now has the depthwise conv's shape (32, 1, 3, 3): order keeps them apart
    plan = tg.plan(model, mobilenet_path, align=True)
    first = plan.entries["mobilenet_v2.conv_stem.first_conv.convolution.weight"]
    assert first.source == "features.0.0.weight" and first.mismatched and first.action == "init"
    assert plan.entries["mobilenet_v2.conv_stem.conv_3x3.convolution.weight"].source == "features.1.conv.0.0.weight"
    assert plan.missing == [] and plan.unexpected == []
    report = tg.load(model, mobilenet_path, align=True, adapt="auto")
    assert report.adapted["mobilenet_v2.conv_stem.first_conv.convolution.weight"]["name"] == "input_channels"
    assert report.aligned["mobilenet_v2.conv_stem.first_conv.convolution.weight"]["source"] == "features.0.0.weight"
    assert torch.equal(
        model.mobilenet_v2.conv_stem.conv_3x3.convolution.weight, tv_reference.features[1].conv[0][0].weight
    )
    expected = tv_reference.features[0][0].weight.sum(1, keepdim=True)  # input_channels(method="sum"): 3 -> 1
    assert torch.allclose(model.mobilenet_v2.conv_stem.first_conv.convolution.weight, expected)


# ---------------------------------------------------------------------------
# Acceptance 3: MiniLM into a BERT written here, with other names and nesting


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = (q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, hidden), "fc2": nn.Linear(hidden, dim)})
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp["fc2"](F.gelu(self.mlp["fc1"](x))))


class Embed(nn.Module):
    def __init__(self, vocab: int, dim: int, positions: int, types: int, eps: float):
        super().__init__()
        self.tok, self.pos, self.seg = nn.Embedding(vocab, dim), nn.Embedding(positions, dim), nn.Embedding(types, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = self.pos(torch.arange(ids.shape[1]))[None]
        return self.norm(self.tok(ids) + pos + self.seg(torch.zeros_like(ids)))


class OtherBert(nn.Module):
    """BERT as another repo would write it: embed.{tok,pos,seg,norm}, blocks.{i}.attn.{q,k,v,o}, norm1, mlp.{fc1,fc2}, norm2, pool."""

    def __init__(self, vocab=30522, dim=384, layers=6, heads=12, hidden=1536, positions=512, types=2, eps=1e-12):
        super().__init__()
        self.embed = Embed(vocab, dim, positions, types, eps)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, eps) for _ in range(layers))
        self.pool = nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return x, torch.tanh(self.pool(x[:, 0]))


def test_minilm_into_bert_with_other_names(minilm_dir):
    reference = transformers.BertModel.from_pretrained(minilm_dir).eval()
    model = OtherBert().eval()
    plan = tg.plan(model, minilm_dir, align=True)
    assert plan.missing == [] and plan.ambiguous == []
    assert plan.unexpected == ["embeddings.position_ids"]  # a buffer this model computes itself
    a = plan.aligned
    assert a["blocks.3.attn.q.weight"]["source"] == "encoder.layer.3.attention.self.query.weight"
    assert "q ~ query" in a["blocks.3.attn.q.weight"]["reason"]
    assert a["blocks.3.attn.o.bias"]["source"] == "encoder.layer.3.attention.output.dense.bias"
    assert a["blocks.3.norm1.weight"]["source"] == "encoder.layer.3.attention.output.LayerNorm.weight"
    assert a["blocks.3.norm2.weight"]["source"] == "encoder.layer.3.output.LayerNorm.weight"
    assert a["embed.seg.weight"]["source"] == "embeddings.token_type_embeddings.weight"
    assert a["pool.weight"]["source"] == "pooler.dense.weight"
    assert_pairs_explained(plan)
    tg.load(model, minilm_dir, plan=plan)
    ids = torch.tensor([[101, 7592, 1010, 2088, 999, 102]])
    with torch.no_grad():
        hidden, pooled = model(ids)
        out = reference(ids)
    assert (hidden - out.last_hidden_state).abs().max().item() < 1e-5
    assert (pooled - out.pooler_output).abs().max().item() < 1e-5
    # what was found, as rules to paste: {} stands for the layer number
    rules = plan.aligned_rules()
    assert rules["encoder.layer.{}.attention.self.query"] == "blocks.{}.attn.q"
    assert rules["embeddings.word_embeddings"] == "embed.tok"
    again = tg.plan(OtherBert(), minilm_dir, rules=rules)
    assert again.missing == [] and set(again.loaded) == set(plan.loaded)


# ---------------------------------------------------------------------------
# Acceptance 4: truly ambiguous -> reported, not guessed


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)


def test_two_same_shaped_modules_without_clues_are_reported_not_guessed(tmp_path):
    sd = {
        "x.weight": torch.randn(4, 4),
        "x.bias": torch.randn(4),
        "y.weight": torch.randn(4, 4),
        "y.bias": torch.randn(4),
    }
    path = save_st(sd, tmp_path / "xy.safetensors")
    model = TwoLinears()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = tg.load(model, path, align=True, init_missing=False)
    assert report.aligned == {}
    assert sorted(report.missing) == ["a.bias", "a.weight", "b.bias", "b.weight"]
    assert sorted(report.unexpected) == ["x.bias", "x.weight", "y.bias", "y.weight"]
    (amb,) = report.ambiguous
    assert sorted(amb["targets"]) == ["a.bias", "a.weight", "b.bias", "b.weight"]
    assert sorted(amb["candidates"]) == ["x.bias", "x.weight", "y.bias", "y.weight"]
    assert "not the network's" in amb["reason"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing was placed
    text = str(report)
    assert "ambiguous" in text and "x.{bias,weight}" in text
    with pytest.raises(
        tg.LoadError, match=r"(?s)missing: a.weight.*ambiguous: a.weight, a.bias, b.weight, b.bias could come from x"
    ):
        tg.load(TwoLinears(), path, align=True, strict=True)


def test_sorted_in_memory_dict_is_not_trusted_either():
    sd = dict(
        sorted(
            {
                "x.weight": torch.randn(4, 4),
                "x.bias": torch.randn(4),
                "y.weight": torch.randn(4, 4),
                "y.bias": torch.randn(4),
            }.items()
        )
    )
    p = tg.plan(TwoLinears(), sd, align=True)
    assert p.aligned == {} and len(p.ambiguous) == 1


def test_file_order_decides_only_where_it_is_trustworthy(tmp_path):
    # insertion order (a torch.save'd state dict) is network order: zeta came first
    sd = OrderedDict(
        [
            ("zeta.weight", torch.randn(4, 4)),
            ("zeta.bias", torch.randn(4)),
            ("eta.weight", torch.randn(4, 4)),
            ("eta.bias", torch.randn(4)),
        ]
    )
    torch.save(sd, tmp_path / "ordered.pt")
    p = tg.plan(TwoLinears(), tmp_path / "ordered.pt", align=True)
    assert p.aligned["a.weight"]["source"] == "zeta.weight" and p.aligned["b.weight"]["source"] == "eta.weight"
    assert "in model and file order" in p.aligned["a.weight"]["reason"]
    # the same tensors in safetensors: sorted keys, so the order is unknown
    p = tg.plan(TwoLinears(), save_st(sd, tmp_path / "sorted.safetensors"), align=True)
    assert p.aligned == {} and len(p.ambiguous) == 1


def test_order_and_names_disagree_nothing_is_paired():
    class QK(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(4, 4)
            self.k = nn.Linear(4, 4)

    # file order says q <- key (key came first); names say q <- query
    sd = OrderedDict(
        [
            ("key.weight", torch.randn(4, 4)),
            ("key.bias", torch.randn(4)),
            ("query.weight", torch.randn(4, 4)),
            ("query.bias", torch.randn(4)),
        ]
    )
    p = tg.plan(QK(), sd, align=True)
    assert p.aligned == {}
    assert "disagree" in p.ambiguous[0]["reason"]


# ---------------------------------------------------------------------------
# Identical siblings: order from natural-sorted numbers, not from the file


class Deep(nn.Module):
    def __init__(self, name: str = "blocks", n: int = 12):
        super().__init__()
        self.add_module(name, nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(n)))


def test_identical_blocks_follow_layer_numbers_not_alphabetical_order(tmp_path):
    torch.manual_seed(0)
    src = Deep("layers")
    path = save_st(src.state_dict(), tmp_path / "deep.safetensors")
    keys = list(tg.open(path))
    assert keys.index("layers.10.0.weight") < keys.index("layers.2.0.weight")  # the file is sorted as text
    model = Deep("blocks")
    report = tg.load(model, path, align=True, strict=True)
    assert len(report.aligned) == 48
    for i in range(12):  # layers.10 sorts before layers.2 in the file; each block still gets its own layer
        assert torch.equal(model.blocks[i][0].weight, src.layers[i][0].weight), i
        assert torch.equal(model.blocks[i][1].bias, src.layers[i][1].bias), i
    assert "by the numbers in their names" in report.aligned["blocks.2.0.weight"]["reason"]


# ---------------------------------------------------------------------------
# Other layouts: Sequential indices vs names, wrappers, regrouping (ResNet-style), ViT, Llama


def test_sequential_indices_vs_names():
    torch.manual_seed(0)
    src = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    src[1].running_mean.normal_()
    named = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 8, 3), bn=nn.BatchNorm2d(8), act=nn.ReLU(), flat=nn.Flatten(), fc=nn.Linear(8 * 6 * 6, 5)
        )
    )
    report = tg.load(named.eval(), src.state_dict(), align=True, strict=True)
    assert report.aligned["bn.num_batches_tracked"]["source"] == "1.num_batches_tracked"
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(named(x), src.eval()(x))
    # and back, from sorted safetensors-like order
    back = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    tg.load(back, dict(sorted(named.state_dict().items())), align=True, strict=True)
    assert torch.equal(back(x), src(x))


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(
            OrderedDict(convolution=nn.Conv2d(cin, cout, 3, stride, 1, bias=False), normalization=nn.BatchNorm2d(cout))
        )


class HFStyleBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(ConvBN(cin, cout, stride), ConvBN(cout, cout))

    def forward(self, x):
        return F.relu(self.layer[1](F.relu(self.layer[0](x))))


class HFStyleNet(nn.Module):
    """Hugging-Face-like names, an extra wrapper level, conv+BN grouped in one module."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.model = nn.Module()
        self.model.embedder = ConvBN(3, 8, 2)
        self.model.stages = nn.ModuleList(
            nn.ModuleDict(
                {"layers": nn.Sequential(HFStyleBlock(8 if s == 0 else 16, 16, 1 + s), HFStyleBlock(16, 16, 1))}
            )
            for s in range(2)
        )
        self.classifier = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.model.embedder(x))
        for stage in self.model.stages:
            x = stage["layers"](x)
        return self.classifier(x.mean((2, 3)))


class TVStyleBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TVStyleNet(nn.Module):
    """torchvision/timm-like names: flat conv1/bn1 at the root, layer1/layer2, fc."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(TVStyleBlock(8, 16, 1), TVStyleBlock(16, 16, 1))
        self.layer2 = nn.Sequential(TVStyleBlock(16, 16, 2), TVStyleBlock(16, 16, 1))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))


def _randomise_norms(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.normal_()


@pytest.mark.parametrize("direction", ["tv->hf", "hf->tv"])
@pytest.mark.parametrize("container", ["ordered", "safetensors"])
def test_resnet_style_regrouped_and_wrapped(direction, container, tmp_path):
    torch.manual_seed(0)
    src, model = (TVStyleNet(), HFStyleNet()) if direction == "tv->hf" else (HFStyleNet(), TVStyleNet())
    _randomise_norms(src)
    sd = src.state_dict() if container == "ordered" else save_st(src.state_dict(), tmp_path / "w.safetensors")
    report = tg.load(model.eval(), sd, align=True, strict=True)
    assert report.ambiguous == []
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (model(x) - src.eval()(x)).abs().max().item() < 1e-6


class TVBottleneck(nn.Module):
    """torchvision's Bottleneck: main path first, ``downsample`` registered last (named ``side`` to hide the role)."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, side: str = "downsample"):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.side_name = side
        self.add_module(side, nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + getattr(self, self.side_name)(x))


class HFBottleneck(nn.Module):
    """Hugging Face's ResNetBottleNeckLayer: ``shortcut`` registered *before* the main path."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.shortcut = ConvBN(cin, cout, stride)
        self.shortcut[0] = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.layer = nn.Sequential(ConvBN(cin, mid), ConvBN(mid, mid, stride), ConvBN(mid, cout))
        self.layer[0][0] = nn.Conv2d(cin, mid, 1, bias=False)
        self.layer[2][0] = nn.Conv2d(mid, cout, 1, bias=False)

    def forward(self, x):
        y = F.relu(self.layer[0](x))
        y = F.relu(self.layer[1](y))
        return F.relu(self.layer[2](y) + self.shortcut(x))


@pytest.mark.parametrize("side", ["downsample", "side"])
@pytest.mark.parametrize("container", ["ordered", "safetensors"])
def test_bottleneck_shortcut_with_the_main_path_conv_shape_is_never_swapped(side, container, tmp_path):
    # ResNet-50's layer1.0: conv3 and the downsample conv are both (256, 64, 1, 1); the two
    # implementations register the branches in opposite orders, so file order would swap them
    torch.manual_seed(0)
    src = HFBottleneck(8, 8, 32, 1)
    _randomise_norms(src)
    model = TVBottleneck(8, 8, 32, 1, side=side).eval()
    sd = src.state_dict() if container == "ordered" else save_st(src.state_dict(), tmp_path / "b.safetensors")
    report = tg.load(model, sd, align=True)
    conv3 = report.aligned.get("conv3.weight")
    assert conv3 is None or conv3["source"] == "layer.2.convolution.weight"
    if side == "downsample" or container == "ordered":  # downsample ~ shortcut, or conv3 follows bn2 in both orders
        assert report.missing == [] and conv3["source"] == "layer.2.convolution.weight"
        x = torch.randn(2, 8, 8, 8)
        with torch.no_grad():
            assert (model(x) - src.eval()(x)).abs().max().item() < 1e-6
    else:  # no name says which branch is which: reported, not guessed
        assert "conv3.weight" in report.missing and f"{side}.0.weight" in report.missing
        amb = next(a for a in report.ambiguous if "conv3.weight" in a["targets"])
        assert set(amb["candidates"]) >= {"layer.2.convolution.weight", "shortcut.convolution.weight"}


def test_new_head_is_a_reported_shape_mismatch_not_a_load(tmp_path):
    torch.manual_seed(0)
    src = TVStyleNet(classes=1000)
    model = HFStyleNet(classes=10)
    report = tg.load(model, src.state_dict(), align=True)
    assert report.missing == [] and report.unexpected == []
    assert [m["key"] for m in report.mismatched] == ["classifier.weight", "classifier.bias"]
    assert report.mismatched[0]["source"] == "fc.weight"  # found, but other shapes: initialised, not loaded
    assert torch.equal(model.model.embedder.convolution.weight, src.conv1.weight)


class TimmBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.ModuleDict(
            {"q": nn.Linear(d, d), "k": nn.Linear(d, d), "v": nn.Linear(d, d), "proj": nn.Linear(d, d)}
        )
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(d, 4 * d), "fc2": nn.Linear(4 * d, d)})


class TimmViT(nn.Module):
    def __init__(self, d: int = 16, n: int = 3):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, d))
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, d, 4, 4)})
        self.blocks = nn.ModuleList(TimmBlock(d) for _ in range(n))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)


class HFViTLayer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.attention = nn.Module()
        self.attention.attention = nn.ModuleDict(
            {"query": nn.Linear(d, d), "key": nn.Linear(d, d), "value": nn.Linear(d, d)}
        )
        self.attention.output = nn.ModuleDict({"dense": nn.Linear(d, d)})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(d, 4 * d)})
        self.output = nn.ModuleDict({"dense": nn.Linear(4 * d, d)})
        self.layernorm_before = nn.LayerNorm(d)
        self.layernorm_after = nn.LayerNorm(d)


class HFViT(nn.Module):
    def __init__(self, d: int = 16, n: int = 3):
        super().__init__()
        self.vit = nn.Module()
        self.vit.embeddings = nn.Module()
        self.vit.embeddings.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.vit.embeddings.position_embeddings = nn.Parameter(torch.randn(1, 5, d))
        self.vit.embeddings.patch_embeddings = nn.ModuleDict({"projection": nn.Conv2d(3, d, 4, 4)})
        self.vit.encoder = nn.ModuleDict({"layer": nn.ModuleList(HFViTLayer(d) for _ in range(n))})
        self.vit.layernorm = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, 10)


@pytest.mark.parametrize("container", ["ordered", "safetensors"])
def test_hf_vit_into_timm_vit(container, tmp_path):
    torch.manual_seed(0)
    src = HFViT()
    sd = dict(src.state_dict()) if container == "ordered" else save_st(src.state_dict(), tmp_path / "vit.safetensors")
    p = tg.plan(TimmViT(), sd, align=True)
    a = p.aligned
    assert a["blocks.1.attn.k.weight"]["source"] == "vit.encoder.layer.1.attention.attention.key.weight"
    assert a["blocks.1.attn.proj.weight"]["source"] == "vit.encoder.layer.1.attention.output.dense.weight"
    assert a["blocks.1.mlp.fc1.weight"]["source"] == "vit.encoder.layer.1.intermediate.dense.weight"
    assert a["pos_embed"]["source"] == "vit.embeddings.position_embeddings"
    assert a["head.weight"]["source"] == "classifier.weight"
    assert a["norm.weight"]["source"] == "vit.layernorm.weight"
    # which of layernorm_before / layernorm_after is norm1? Sorted keys say nothing, and Hugging Face
    # registers both norms after the attention and the MLP (file order crosses the pairs already
    # made), and no name says it: refused, not guessed
    assert "blocks.1.norm1.weight" in p.missing and "blocks.1.norm1.weight" not in a
    amb = next(x for x in p.ambiguous if "blocks.1.norm1.weight" in x["targets"])
    assert set(amb["candidates"]) >= {
        "vit.encoder.layer.1.layernorm_before.weight",
        "vit.encoder.layer.1.layernorm_after.weight",
    }
    if container == "ordered":
        assert "crosses pairs already made" in amb["reason"]


class MetaLlama(nn.Module):
    def __init__(self, d: int = 16, n: int = 2):
        super().__init__()
        self.tok_embeddings = nn.Embedding(50, d)
        self.layers = nn.ModuleList()
        for _ in range(n):
            layer = nn.Module()
            layer.attention = nn.ModuleDict({w: nn.Linear(d, d, bias=False) for w in ("wq", "wk", "wv", "wo")})
            layer.feed_forward = nn.ModuleDict(
                {
                    "w1": nn.Linear(d, 3 * d, bias=False),
                    "w2": nn.Linear(3 * d, d, bias=False),
                    "w3": nn.Linear(d, 3 * d, bias=False),
                }
            )
            layer.attention_norm, layer.ffn_norm = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
            self.layers.append(layer)
        self.norm = nn.LayerNorm(d, bias=False)
        self.output = nn.Linear(d, 50, bias=False)


class HFLlama(nn.Module):
    def __init__(self, d: int = 16, n: int = 2):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(50, d)
        self.model.layers = nn.ModuleList()
        for _ in range(n):
            layer = nn.Module()
            layer.self_attn = nn.ModuleDict({f"{w}_proj": nn.Linear(d, d, bias=False) for w in "qkvo"})
            layer.mlp = nn.ModuleDict(
                {
                    "gate_proj": nn.Linear(d, 3 * d, bias=False),
                    "up_proj": nn.Linear(d, 3 * d, bias=False),
                    "down_proj": nn.Linear(3 * d, d, bias=False),
                }
            )
            layer.input_layernorm, layer.post_attention_layernorm = (
                nn.LayerNorm(d, bias=False),
                nn.LayerNorm(d, bias=False),
            )
            self.model.layers.append(layer)
        self.model.norm = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, 50, bias=False)


def test_original_llama_names_into_hf_names(tmp_path):
    torch.manual_seed(0)
    src = MetaLlama()
    p = tg.plan(HFLlama(), save_st(src.state_dict(), tmp_path / "meta.safetensors"), align=True)
    a = p.aligned
    assert a["model.layers.1.self_attn.q_proj.weight"]["source"] == "layers.1.attention.wq.weight"
    assert a["model.layers.1.self_attn.o_proj.weight"]["source"] == "layers.1.attention.wo.weight"
    assert a["model.layers.1.mlp.down_proj.weight"]["source"] == "layers.1.feed_forward.w2.weight"
    assert a["lm_head.weight"]["source"] == "output.weight"
    # "attention_norm" is the norm *before* attention, "post_attention_layernorm" the one after:
    # the names mislead, the file order is sorted: refused, not guessed
    assert "model.layers.1.input_layernorm.weight" in p.missing
    assert any("model.layers.1.post_attention_layernorm.weight" in x["targets"] for x in p.ambiguous)
    # w1 / w3 (gate / up) are parallel branches; w2 (down) sits between them by number but after
    # them in the model, so numbers are no network order here: refused
    amb = next(x for x in p.ambiguous if "model.layers.1.mlp.gate_proj.weight" in x["targets"])
    assert "crosses pairs already made" in amb["reason"]
    # with the original file order (a torch.save'd state dict), order decides the norms
    torch.save(src.state_dict(), tmp_path / "consolidated.pth")
    p = tg.plan(HFLlama(), tmp_path / "consolidated.pth", align=True)
    assert p.aligned["model.layers.1.input_layernorm.weight"]["source"] == "layers.1.attention_norm.weight"
    assert p.aligned["model.layers.1.post_attention_layernorm.weight"]["source"] == "layers.1.ffn_norm.weight"
    assert sorted(p.missing) == sorted(f"model.layers.{i}.mlp.{w}_proj.weight" for i in (0, 1) for w in ("gate", "up"))


def test_mlm_head_never_fills_the_pooler(tmp_path):
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    path = save_st(transformers.BertForMaskedLM(config).state_dict(), tmp_path / "mlm.safetensors")
    p = tg.plan(transformers.BertModel(config), path, align=True)
    assert p.aligned == {}
    assert p.missing == ["pooler.dense.weight", "pooler.dense.bias"]
    (amb,) = p.ambiguous
    assert set(amb["candidates"]) == {"cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias"}
    assert "nothing else links them" in amb["reason"]


def test_align_is_off_by_default_and_checked():
    sd = {"x.weight": torch.randn(3, 4)}
    assert tg.plan(nn.Sequential(OrderedDict(a=nn.Linear(4, 3, bias=False))), sd).missing == ["a.weight"]
    with pytest.raises(tg.PlanError, match=r"align must be True or False, not 'yes'"):
        tg.plan(nn.Linear(4, 3), sd, align="yes")


# ---------------------------------------------------------------------------
# Lazy and sharded sources: no tensor bytes are read while aligning


def _refusing_source(sd: dict[str, torch.Tensor]) -> Source:
    def refuse():
        raise AssertionError("alignment read tensor bytes")

    refs = {k: TensorRef(k, tuple(v.shape), str(v.dtype).removeprefix("torch."), refuse) for k, v in sd.items()}
    return Source(refs, path=None, format="safetensors")


def test_alignment_reads_no_bytes_and_works_on_shards(tmp_path):
    torch.manual_seed(0)
    src = TVStyleNet()
    p = tg.plan(HFStyleNet(), _refusing_source(src.state_dict()), align=True)
    assert p.missing == [] and len(p.aligned) == len(src.state_dict())
    keys = sorted(src.state_dict())
    half = len(keys) // 2
    for i, part in enumerate((keys[:half], keys[half:])):
        save_st({k: src.state_dict()[k] for k in part}, tmp_path / f"model-0000{i + 1}-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {k: f"model-0000{1 if j < half else 2}-of-00002.safetensors" for j, k in enumerate(keys)},
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = HFStyleNet().eval()
    tg.load(model, tmp_path / "model.safetensors.index.json", align=True, strict=True)
    x = torch.randn(1, 3, 16, 16)
    assert torch.allclose(model(x), src.eval()(x), atol=1e-6)


# ---------------------------------------------------------------------------
# Plans you can review and reuse


def test_saved_plan_keeps_the_alignment_and_refuses_stale_use(tmp_path):
    torch.manual_seed(0)
    src = TVStyleNet()
    path = save_st(src.state_dict(), tmp_path / "w.safetensors")
    plan = tg.plan(HFStyleNet(), path, align=True)
    plan.save(tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["summary"]["aligned"] == len(plan.aligned)
    loaded = tg.Plan.load(tmp_path / "plan.json")
    assert loaded.aligned == plan.aligned and loaded.aligned_rules() == plan.aligned_rules()
    model = HFStyleNet().eval()
    report = tg.load(model, path, plan=loaded)  # no align=True needed: the plan carries it
    assert report.aligned == plan.aligned and report.missing == []
    assert torch.equal(
        model.model.stages[1]["layers"][1].layer[1].normalization.running_var, src.layer2[1].bn2.running_var
    )
    with pytest.raises(tg.PlanError, match=r"stale plan: the model's names or shapes changed"):
        tg.load(HFStyleNet(classes=3), path, plan=loaded)
    torch.save({k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}, tmp_path / "other.pt")
    with pytest.raises(tg.PlanError, match=r"stale plan: the checkpoint's names, shapes or dtypes changed"):
        tg.load(HFStyleNet(), tmp_path / "other.pt", plan=loaded)


def test_plan_text_lists_pairs_with_confidence_and_reason(tmp_path):
    torch.manual_seed(0)
    text = str(tg.plan(HFStyleNet(), save_st(TVStyleNet().state_dict(), tmp_path / "w.safetensors"), align=True))
    assert "aligned by structure" in text and "model (aligned)" in text and "checkpoint" in text
    assert "model.embedder.convolution.weight" in text and "conv1.weight" in text
    assert "only tensor of shape (8, 3, 3, 3)" in text


def test_rules_export_templates_numbers_and_reproduces_the_alignment(tmp_path):
    torch.manual_seed(0)
    src = Deep("layers", n=4)
    plan = tg.plan(Deep("blocks", n=4), save_st(src.state_dict(), tmp_path / "d.safetensors"), align=True)
    assert plan.aligned_rules() == {"layers.{}.{}": "blocks.{}.{}"}
    model = Deep("blocks", n=4)
    tg.load(model, tmp_path / "d.safetensors", rules=plan.aligned_rules(), strict=True)
    assert torch.equal(model.blocks[3][0].weight, src.layers[3][0].weight)


def test_export_rules_falls_back_to_literals_when_numbers_shift():
    # features.{k+2} -> layer.{k}: no {} template can say that
    pairs = {"features.2.conv.weight": "layer.0.conv.weight", "features.3.conv.weight": "layer.1.conv.weight"}
    rules = export_rules(pairs, [*pairs, "head.weight"], loaded_by_name=["head.weight"])
    assert rules == {"features.2.conv": "layer.0.conv", "features.3.conv": "layer.1.conv"}
    # a template that would also rename a key matched by name is not used
    pairs = {"a.0.w": "b.0.w"}
    assert export_rules(pairs, ["a.0.w", "a.1.w"], loaded_by_name=["a.1.w"], targets=["b.0.w", "a.1.w"]) == {
        "a.0": "b.0"
    }


def test_align_function_on_names_and_shapes_only():
    result = align(
        [("a.weight", (4, 3), "float32", True), ("b.weight", (5, 3), "float32", True)],
        [("x.weight", "x.weight", (5, 3), "float32", True), ("y.weight", "y.weight", (4, 3), "float32", True)],
        source_ordered=False,
    )
    assert {(p.target, p.source) for p in result.pairs} == {("a.weight", "y.weight"), ("b.weight", "x.weight")}
    assert all(p.confidence == 0.95 and "only tensor of shape" in p.reason for p in result.pairs)
    # integers never pair with floats
    result = align(
        [("a.ids", (1, 8), "int64", True)], [("x.ids", "x.ids", (1, 8), "float32", True)], source_ordered=False
    )
    assert result.pairs == [] and result.ambiguous == []
