"""Cross-codebase MoE (issue 14): per-expert Mixtral weights <-> transformers 5's stacked experts.

The per-expert model is transformers' ``MixtralForCausalLM`` whose sparse MoE blocks are replaced by one written
here as the original Mixtral release wrote it (``block_sparse_moe.gate`` and one ``w1`` / ``w2`` / ``w3`` Linear per
expert); its state dict is the legacy per-expert checkpoint layout. Oracles: transformers' own
``from_pretrained`` of that checkpoint (transformers 5 still converts the legacy layout while loading), and the
per-expert model's own forward.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

import torchgraft as tg
from torchgraft.transforms import reverse

transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")
from transformers.models.mixtral import modeling_mixtral  # noqa: E402

EXPERTS, LAYERS = 4, 2
RECIPE = "mixtral-experts-to-stacked"


def config() -> transformers.MixtralConfig:
    return transformers.MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class PerExpertMoe(nn.Module):
    """Mixtral's sparse MoE block, one module per expert: top-k softmax routing, weights renormalised."""

    def __init__(self, c: transformers.MixtralConfig):
        super().__init__()
        self.top_k = c.num_experts_per_tok
        self.gate = nn.Linear(c.hidden_size, c.num_local_experts, bias=False)
        self.experts = nn.ModuleList(ExpertMLP(c.hidden_size, c.intermediate_size) for _ in range(c.num_local_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        x = x.reshape(-1, h)
        weights, chosen = torch.topk(F.softmax(self.gate(x).float(), dim=-1), self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.reshape(b, s, h)


class PerExpertLayer(modeling_mixtral.MixtralDecoderLayer):
    """transformers' decoder layer with the per-expert block under its original name ``block_sparse_moe``."""

    def __init__(self, c: transformers.MixtralConfig, layer_idx: int):
        super().__init__(c, layer_idx)
        del self.mlp
        self.block_sparse_moe = PerExpertMoe(c)

    @property
    def mlp(self) -> PerExpertMoe:  # the layer's forward calls self.mlp
        return self.block_sparse_moe


def randomized(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def per_expert_model(seed: int = 0) -> modeling_mixtral.MixtralForCausalLM:
    model = modeling_mixtral.MixtralForCausalLM(config())
    model.model.layers = nn.ModuleList(PerExpertLayer(model.config, i) for i in range(LAYERS))
    return randomized(model, seed)


def stacked_model(seed: int | None = None) -> modeling_mixtral.MixtralForCausalLM:
    model = modeling_mixtral.MixtralForCausalLM(config()).eval()
    return randomized(model, seed) if seed is not None else model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def per_expert() -> modeling_mixtral.MixtralForCausalLM:
    return per_expert_model()


@pytest.fixture
def per_expert_dir(per_expert, tmp_path):
    """A legacy per-expert checkpoint directory, as transformers reads it: config.json + model.safetensors."""
    per_expert.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in per_expert.state_dict().items()}, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))


def test_the_per_expert_model_is_mixtral(per_expert, per_expert_dir, ids):
    """The oracle checks itself: transformers' own loader reads the checkpoint into the same function."""
    reference = transformers.MixtralForCausalLM.from_pretrained(per_expert_dir).eval()
    assert any("block_sparse_moe.experts.3.w3" in k for k in per_expert.state_dict())
    torch.testing.assert_close(logits(reference, ids), logits(per_expert, ids), rtol=0, atol=1e-5)


def test_per_expert_checkpoint_into_stacked_mixtral(per_expert, per_expert_dir, ids):
    reference = transformers.MixtralForCausalLM.from_pretrained(per_expert_dir).eval()
    model = stacked_model()
    plan = tg.plan(model, per_expert_dir, rules=tg.recipe(RECIPE, num_experts=EXPERTS))
    stacked = [f"model.layers.{i}.mlp.experts.{p}" for i in range(LAYERS) for p in ("gate_up_proj", "down_proj")]
    assert sorted(plan.transformed) == sorted(stacked)
    assert "block_sparse_moe.experts.3.w3.weight" in plan.transformed["model.layers.1.mlp.experts.gate_up_proj"]
    assert not [n for n in plan.notes if "MergeModulelist" in n]  # the recipe runs what transformers' table would
    without = tg.plan(stacked_model(), per_expert_dir)
    assert [n for n in without.notes if "MergeModulelist" in n and "stay unused" in n]  # said when nothing runs it
    report = tg.load(model, per_expert_dir, plan=plan, strict=True)
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.transformed) == sorted(stacked)
    # bit-identical to what transformers' own conversion makes of the same file
    ours, theirs = model.state_dict(), reference.state_dict()
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    torch.testing.assert_close(logits(model, ids), logits(per_expert, ids), rtol=0, atol=1e-5)


def test_per_expert_checkpoint_into_the_base_model_strips_the_prefix(per_expert, per_expert_dir):
    """The recipe names ``model.layers.{}``; a ``MixtralModel`` (no ``model.`` prefix) takes it all the same."""
    model = transformers.MixtralModel(config()).eval()
    report = tg.load(model, per_expert_dir, rules=tg.recipe(RECIPE, num_experts=EXPERTS))
    assert report.missing == [] and report.unexpected == ["lm_head.weight"]
    assert sorted(report.transformed) == sorted(f"layers.{i}.mlp.experts.{p}" for i in range(LAYERS)
                                                for p in ("gate_up_proj", "down_proj"))  # fmt: skip
    w2 = [per_expert.model.layers[1].block_sparse_moe.experts[e].w2.weight for e in range(EXPERTS)]
    assert torch.equal(model.layers[1].mlp.experts.down_proj, torch.stack(w2))


def test_stacked_back_to_per_expert_bit_identical(per_expert, per_expert_dir, ids, tmp_path):
    plan = tg.plan(stacked_model(), per_expert_dir, rules=tg.recipe(RECIPE, num_experts=EXPERTS))
    # per-expert -> stacked -> per-expert: the same tensors, bit for bit
    model = stacked_model()
    tg.load(model, per_expert_dir, plan=plan)
    back = reverse(plan, model.state_dict())
    original = per_expert.state_dict()
    assert sorted(back) == sorted(original)
    for k, v in original.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # stacked weights the per-expert model never saw: unstacked, it computes what the stacked model computes
    other = stacked_model(seed=5)
    unstacked = reverse(plan, other.state_dict())
    fresh = per_expert_model(seed=9)
    fresh.load_state_dict(unstacked, strict=True)
    e2 = other.model.layers[1].mlp.experts
    assert torch.equal(fresh.model.layers[1].block_sparse_moe.experts[2].w3.weight, e2.gate_up_proj[2, 64:])
    assert torch.equal(fresh.model.layers[1].block_sparse_moe.experts[2].w2.weight, e2.down_proj[2])
    torch.testing.assert_close(logits(fresh, ids), logits(other, ids), rtol=0, atol=1e-5)


def test_stacked_weights_to_per_expert_with_no_per_expert_file(ids):
    """The layout to reverse into can come from a per-expert model on the meta device: no checkpoint needed."""
    with torch.device("meta"):
        layout = per_expert_model()
    other = stacked_model(seed=4)
    plan = tg.plan(stacked_model(), layout.state_dict(), rules=tg.recipe(RECIPE, num_experts=EXPERTS))
    fresh = per_expert_model(seed=8)
    fresh.load_state_dict(reverse(plan, other.state_dict()), strict=True)
    torch.testing.assert_close(logits(fresh, ids), logits(other, ids), rtol=0, atol=1e-5)


def test_bfloat16_per_expert_checkpoint_round_trips_in_its_dtype(per_expert, tmp_path):
    path = str(tmp_path / "bf16.safetensors")
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in per_expert.state_dict().items()}
    save_file(sd, path)
    plan = tg.plan(stacked_model(), path, rules=tg.recipe(RECIPE, num_experts=EXPERTS))
    model = stacked_model()  # float32: bfloat16 widens exactly, and narrows back exactly
    tg.load(model, path, plan=plan)
    back = reverse(plan, model.state_dict())
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], v), k


def test_a_wrong_recipe_gate_and_up_swapped_differs_largely(per_expert, per_expert_dir, ids):
    rules = tg.recipe(RECIPE, num_experts=EXPERTS)
    up = [f"model.layers.{{}}.block_sparse_moe.experts.{e}.w3.weight" for e in range(EXPERTS)]
    gate = [f"model.layers.{{}}.block_sparse_moe.experts.{e}.w1.weight" for e in range(EXPERTS)]
    rules["model.layers.{}.mlp.experts.gate_up_proj"] = tg.concat(tg.stack(*up), tg.stack(*gate), dim=1)
    model = stacked_model()
    report = tg.load(model, per_expert_dir, rules=rules)
    assert report.missing == []  # shapes cannot tell gate from up
    diff = (logits(model, ids) - logits(per_expert, ids)).abs().max().item()
    assert diff > 0.03, diff  # thousands of times the tolerance of the right recipe (logits are about 1)


def test_the_recipe_for_fewer_experts_fails_at_plan_time(per_expert_dir):
    wrong = r"gives shape \[3, 128, 32\], the model's 'model.layers.0.mlp.experts.gate_up_proj' is \[4, 128, 32\]"
    with pytest.raises(tg.PlanError, match=wrong):
        tg.plan(stacked_model(), per_expert_dir, rules=tg.recipe(RECIPE, num_experts=EXPERTS - 1))


def test_the_recipe_for_more_experts_than_the_checkpoint_has_names_the_absent_expert(per_expert_dir):
    model = stacked_model(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    absent = r"the checkpoint has no 'model.layers.1.block_sparse_moe.experts.4.w2.weight'"
    with pytest.raises(tg.LoadError, match=absent):
        tg.load(model, per_expert_dir, rules=tg.recipe(RECIPE, num_experts=EXPERTS + 1), strict=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing changed


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "4"])
def test_the_recipe_wants_a_positive_number_of_experts(bad):
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        tg.recipe(RECIPE, num_experts=bad)


def test_a_saved_plan_loads_and_reverses_like_the_recipe(per_expert, per_expert_dir, tmp_path):
    plan = tg.plan(stacked_model(), per_expert_dir, rules=tg.recipe(RECIPE, num_experts=EXPERTS))
    plan.save(tmp_path / "plan.json")
    saved = tg.Plan.load(tmp_path / "plan.json")
    assert saved.transformed == plan.transformed
    model = stacked_model()
    tg.load(model, per_expert_dir, plan=saved, strict=True)
    back = reverse(saved, model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in per_expert.state_dict().items())


def test_the_registry_describes_the_recipe_and_asks_for_its_number():
    r = tg.recipes.RECIPES[RECIPE]
    assert r.params == ("num_experts",) and "w1/w2/w3" in r.source and "gate_up_proj" in r.target
    with pytest.raises(tg.PlanError, match="recipe 'mixtral-experts-to-stacked' needs num_experts"):
        tg.recipe(RECIPE)


def test_command_line_round_trip_is_bit_identical(per_expert_dir, tmp_path):
    """plan --recipe --save, load --out (a transformers directory), convert --reverse: the original file back."""
    from safetensors.torch import load_file

    from torchgraft.cli import main

    plan, out, back = tmp_path / "plan.json", tmp_path / "stacked", tmp_path / "back"
    out.mkdir()
    back.mkdir()
    recipe = ["--recipe", RECIPE, "--recipe-param", f"num_experts={EXPERTS}"]
    model = ["--model", "transformers:MixtralForCausalLM"]
    assert main(["plan", str(per_expert_dir), *model, *recipe, "--save", str(plan)]) == 0
    assert main(["load", str(per_expert_dir), *model, "--plan", str(plan), "--out", str(out), "--strict"]) == 0
    reference = transformers.MixtralForCausalLM.from_pretrained(per_expert_dir)
    stacked = load_file(str(out / "model.safetensors"))
    assert torch.equal(stacked["model.layers.1.mlp.experts.gate_up_proj"],
                       reference.model.layers[1].mlp.experts.gate_up_proj)  # fmt: skip
    assert main(["convert", str(out / "model.safetensors"), str(back), "--plan", str(plan), "--reverse"]) == 0
    original, written = load_file(str(per_expert_dir / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert sorted(written) == sorted(original)
    assert all(torch.equal(written[k], v) for k, v in original.items())


def test_verify_names_the_experts_of_the_first_layer_when_gate_and_up_are_swapped(per_expert, per_expert_dir, ids):
    right = stacked_model()
    tg.load(right, per_expert_dir, rules=tg.recipe(RECIPE, num_experts=EXPERTS))
    assert tg.verify(right, per_expert, ids).ok
    rules = tg.recipe(RECIPE, num_experts=EXPERTS)
    up = [f"model.layers.{{}}.block_sparse_moe.experts.{e}.w3.weight" for e in range(EXPERTS)]
    gate = [f"model.layers.{{}}.block_sparse_moe.experts.{e}.w1.weight" for e in range(EXPERTS)]
    rules["model.layers.{}.mlp.experts.gate_up_proj"] = tg.concat(tg.stack(*up), tg.stack(*gate), dim=1)
    model = stacked_model()
    tg.load(model, per_expert_dir, rules=rules)
    result = tg.verify(model, per_expert, ids)
    assert not result.ok and result.max_abs > 0.03
    first = result.first_divergence
    assert (first.model, first.reference) == ("model.layers.0.mlp", "model.layers.0.block_sparse_moe")
