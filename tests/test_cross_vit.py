"""Cross-codebase ViT (issue 14): a timm-style ViT (fused ``attn.qkv``) <-> transformers' ``ViTModel``.

The timm-style model is written here with timm's ``VisionTransformer`` structure and names (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.{i}.norm1`` / ``attn.qkv`` / ``attn.proj`` / ``norm2`` / ``mlp.fc1`` /
``mlp.fc2``, ``norm``, ``head``) and timm's attention (``qkv(x).reshape(B, N, 3, heads, head_dim)``). The oracle
is each model's own forward: outputs equal within 1e-5 both ways, through the recipe and its reversed plan.
"""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import torchgraft as tg
from torchgraft.transforms import reverse

transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")

DIM, DEPTH, HEADS, HIDDEN, IMAGE, PATCH, CLASSES, EPS = 32, 2, 4, 64, 32, 8, 10, 1e-6


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimmViT(nn.Module):
    """timm's VisionTransformer layout: class token, learned positions, pre-norm blocks, final norm, head."""

    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed(PATCH, DIM)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, (IMAGE // PATCH) ** 2 + 1, DIM))
        self.blocks = nn.Sequential(*(Block(DIM, HEADS, HIDDEN, EPS) for _ in range(DEPTH)))
        self.norm = nn.LayerNorm(DIM, eps=EPS)
        self.head = nn.Linear(DIM, CLASSES)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[:, 0])


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Every tensor random and far from its init (norms included), so any misplaced value shows in the output.

    The scale makes attention peaked: with near-uniform attention, q and k swapped would change little.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def hf_config(**kw) -> transformers.ViTConfig:
    return transformers.ViTConfig(
        hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=HIDDEN,
        image_size=IMAGE, patch_size=PATCH, layer_norm_eps=EPS, **kw,
    )  # fmt: skip


def hf_vit(seed: int | None = None) -> transformers.ViTModel:
    model = transformers.ViTModel(hf_config(), add_pooling_layer=False).eval()
    return randomized(model, seed) if seed is not None else model


@pytest.fixture
def timm_model() -> TimmViT:
    return randomized(TimmViT(), seed=0)


@pytest.fixture
def timm_file(timm_model, tmp_path) -> str:
    path = str(tmp_path / "vit_timm.safetensors")
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, path)
    return path


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, TimmViT):
            return model.forward_features(images)
        return model(pixel_values=images).last_hidden_state


QKV = [f"layers.{i}.attention.{p}_proj.{s}" for i in range(DEPTH) for p in "qkv" for s in ("weight", "bias")]


def test_timm_vit_into_hf_vit_with_the_recipe(timm_model, timm_file, images):
    model = hf_vit()
    plan = tg.plan(model, timm_file, rules=tg.recipe("timm-vit-to-hf-vit"))
    assert sorted(plan.transformed) == sorted(QKV)
    assert "blocks.0.attn.qkv.weight" in plan.transformed["layers.0.attention.k_proj.weight"]
    report = tg.load(model, timm_file, plan=plan)
    assert report.missing == [] and report.mismatched == []
    assert sorted(report.unexpected) == ["head.bias", "head.weight"]  # ViTModel has no classifier
    assert sorted(report.transformed) == sorted(QKV)
    # every value where the timm model computes with it: q, k, v are the thirds of qkv, in that order
    qkv = timm_model.blocks[1].attn.qkv.weight
    assert torch.equal(model.layers[1].attention.v_proj.weight, qkv[2 * DIM :])
    assert torch.equal(model.layers[1].attention.q_proj.weight, qkv[:DIM])
    torch.testing.assert_close(features(model, images), features(timm_model, images), rtol=0, atol=1e-5)


def test_timm_vit_into_hf_classifier_resolves_the_prefix_and_the_head(timm_model, timm_file, images):
    model = transformers.ViTForImageClassification(hf_config(num_labels=CLASSES)).eval()
    report = tg.load(model, timm_file, rules=tg.recipe("timm-vit-to-hf-vit"), strict=True)
    assert report.missing == [] and report.unexpected == []
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=images).logits, timm_model(images), rtol=0, atol=1e-5)


def test_hf_vit_back_into_timm_layout_by_the_reversed_plan(timm_model, timm_file, images, tmp_path):
    plan = tg.plan(hf_vit(), timm_file, rules=tg.recipe("timm-vit-to-hf-vit"))
    # timm -> transformers -> timm is bit-identical
    model = hf_vit()
    tg.load(model, timm_file, plan=plan)
    back = reverse(plan, model.state_dict())
    expected = {k: v for k, v in timm_model.state_dict().items() if not k.startswith("head.")}
    assert sorted(back) == sorted(expected)
    for k, v in expected.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # transformers -> timm: weights the timm model never saw, outputs equal the transformers model's
    other = hf_vit(seed=7)
    timm_sd = reverse(plan, other.state_dict())
    fresh = TimmViT().eval()
    result = fresh.load_state_dict(timm_sd, strict=False)
    assert result.missing_keys == ["head.weight", "head.bias"] and result.unexpected_keys == []
    torch.testing.assert_close(features(fresh, images), features(other, images), rtol=0, atol=1e-5)
    # the same through tg.convert(reverse=True): a file in timm's layout
    dest = tmp_path / "back.safetensors"
    tg.convert(other.state_dict(), dest, plan=plan, reverse=True)
    written = load_file(str(dest))
    assert sorted(written) == sorted(timm_sd)
    assert all(torch.equal(written[k], timm_sd[k]) for k in timm_sd)


def test_hf_vit_into_a_timm_model_with_no_timm_file(images):
    """transformers -> timm needs no timm file: a timm model on the meta device gives the layout to plan against."""
    with torch.device("meta"):
        layout = TimmViT()
    hf = hf_vit(seed=11)
    plan = tg.plan(hf_vit(), layout.state_dict(), rules=tg.recipe("timm-vit-to-hf-vit"))
    assert plan.missing == [] and sorted(plan.transformed) == sorted(QKV)
    timm_sd = reverse(plan, hf.state_dict())
    assert {k: tuple(v.shape) for k, v in timm_sd.items()} == {
        k: tuple(v.shape) for k, v in layout.state_dict().items() if not k.startswith("head.")
    }
    fresh = TimmViT().eval()
    fresh.load_state_dict(timm_sd, strict=False)
    torch.testing.assert_close(features(fresh, images), features(hf, images), rtol=0, atol=1e-5)


def test_a_wrong_recipe_q_and_k_swapped_loads_and_differs_largely(timm_model, timm_file, images):
    rules = tg.recipe("timm-vit-to-hf-vit")
    del rules["layers.{}.attention.{q,k,v}_proj.weight"]
    rules["layers.{}.attention.{k,q,v}_proj.weight"] = tg.split("blocks.{}.attn.qkv.weight", dim=0)
    model = hf_vit()
    report = tg.load(model, timm_file, rules=rules)
    assert report.missing == []  # shapes cannot tell: q and k are both [D, D]
    diff = (features(model, images) - features(timm_model, images)).abs().max().item()
    assert diff > 0.1, diff  # 1e5 times the tolerance of the right recipe


def test_align_alone_never_misplaces_a_tensor(timm_file):
    """What ``align=True`` does from a file without the recipe: whatever it pairs is what the recipe loads.

    From a safetensors file (sorted keys: its order is not trusted) and names and shapes alone, it pairs the patch
    embedding, class token, positions and the MLPs, splits each fused ``qkv`` into q, k, v, and lists the five
    LayerNorms as ambiguous (``norm1`` / ``layernorm_before``: no shared word, same shapes). Nothing is misplaced;
    execution order (the test below) or the recipe is the answer for the rest.
    """
    reference = hf_vit()
    tg.load(reference, timm_file, rules=tg.recipe("timm-vit-to-hf-vit"))
    model = hf_vit(seed=3)
    plan = tg.plan(model, timm_file, align=True)
    report = tg.load(model, timm_file, plan=plan)
    placed = [k for k, e in plan.entries.items() if e.loads]
    assert {"embeddings.patch_embeddings.projection.weight", "layers.1.mlp.fc2.bias"} <= set(placed)
    wrong = [k for k in placed if not torch.equal(model.state_dict()[k], reference.state_dict()[k])]
    assert wrong == []
    left = set(model.state_dict()) - set(placed)
    assert left == set(report.missing)
    norms = {f"layers.{i}.layernorm_{w}.{p}" for i in range(DEPTH) for w in ("before", "after") for p in ("weight", "bias")}
    assert left == norms | {"layernorm.weight", "layernorm.bias"}
    assert left == {t for a in plan.ambiguous for t in a["targets"]}  # each one named, with its candidates
    assert sorted(plan.transformed) == sorted(QKV)


def test_the_registry_describes_the_recipe():
    r = tg.recipes.RECIPES["timm-vit-to-hf-vit"]
    assert r.params == () and "qkv" in r.source and "ViTModel" in r.target
    with pytest.raises(tg.PlanError, match="recipe 'timm-vit-to-hf-vit' takes no parameters, not heads"):
        tg.recipe("timm-vit-to-hf-vit", heads=4)


def test_verify_tells_the_right_recipe_from_q_and_k_swapped(timm_model, timm_file, images):
    """``tg.verify`` against the timm model's own forward: ok for the recipe, a large difference for the swap."""
    wrong = tg.recipe("timm-vit-to-hf-vit")
    del wrong["layers.{}.attention.{q,k,v}_proj.weight"]
    wrong["layers.{}.attention.{k,q,v}_proj.weight"] = tg.split("blocks.{}.attn.qkv.weight", dim=0)
    results = []
    for rules in (tg.recipe("timm-vit-to-hf-vit"), wrong):
        model = transformers.ViTForImageClassification(hf_config(num_labels=CLASSES)).eval()
        tg.load(model, timm_file, rules=rules)
        results.append(tg.verify(model, timm_model, images))
    right, swapped = results
    assert right.ok and right.max_abs < 1e-5 and right.first_divergence is None
    assert not swapped.ok and swapped.max_abs > 0.1
    assert swapped.first_divergence.model.startswith("vit.layers.0.attention.")  # the first layer, where q and k are


def test_align_in_execution_order_pairs_everything_and_splits_qkv(timm_model, images):
    """Alignment alone, given the evidence it needs, loads the timm weights: outputs equal, and back bit-identical.

    The evidence: the timm model's own state dict (registration order, trusted) and transformers' model traced on
    example inputs (``layernorm_before`` runs before the attention although it is registered after it). Names and
    shapes pair the rest and the fused ``qkv`` is split into q, k, v.
    """
    model = hf_vit()
    source = timm_model.state_dict()
    plan = tg.plan(model, source, align=True, example_inputs={"pixel_values": images})
    assert plan.missing == [] and plan.ambiguous == []
    assert sorted(plan.transformed) == sorted(QKV)
    tg.load(model, source, plan=plan)
    torch.testing.assert_close(features(model, images), features(timm_model, images), rtol=0, atol=1e-5)
    back = reverse(plan, model.state_dict())
    assert all(torch.equal(back[k], source[k]) for k in source if not k.startswith("head."))
