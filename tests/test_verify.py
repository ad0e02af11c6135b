"""tg.verify / report.verify: outputs and layers of two models compared (issue 14, item 6).

The oracle is in each test: the reference model's own forward pass, and torch's own comparison of
the outputs; the wrong weights are made here, by hand, in the checkpoint file.
"""

from __future__ import annotations

import copy
import gc
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import torchgraft as tg
from torchgraft.verify import DEFAULT_TOLERANCES, VerifyResult

transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")


# ---------------------------------------------------------------------------
# A nanoGPT-style GPT-2: plain nn.Linear, fused qkv, its own module names


class NanoAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class NanoMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class NanoBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = NanoAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = NanoMLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, positions: int, dim: int, heads: int, layers: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(positions, dim)
        self.blocks = nn.ModuleList(NanoBlock(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


GPT2_SIZE = {"vocab_size": 64, "n_positions": 16, "n_embd": 32, "n_head": 4, "n_layer": 2}
#: nanoGPT name (per layer ``{}``) -> (transformers GPT2LMHeadModel name, Conv1D weight to transpose)
NANO_FROM_HF = {
    "tok.weight": ("transformer.wte.weight", False),
    "pos.weight": ("transformer.wpe.weight", False),
    "ln_f.weight": ("transformer.ln_f.weight", False),
    "ln_f.bias": ("transformer.ln_f.bias", False),
    "head.weight": ("lm_head.weight", False),
    **{
        f"blocks.{{}}.{nano}.{p}": (f"transformer.h.{{}}.{hf}.{p}", p == "weight" and nano not in ("ln1", "ln2"))
        for nano, hf in [
            ("ln1", "ln_1"),
            ("attn.qkv", "attn.c_attn"),
            ("attn.proj", "attn.c_proj"),
            ("ln2", "ln_2"),
            ("mlp.fc", "mlp.c_fc"),
            ("mlp.proj", "mlp.c_proj"),
        ]
        for p in ("weight", "bias")
    },
}


@pytest.fixture
def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(**GPT2_SIZE, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def nano_checkpoint(hf: nn.Module, path, *, forget_transpose: str | None = None):
    """GPT-2 weights in the nanoGPT model's names and layout, written by hand; ``forget_transpose``: one entry not."""
    sd = hf.state_dict()
    out = {}
    for layer in range(GPT2_SIZE["n_layer"]):
        for nano, (name, transpose) in NANO_FROM_HF.items():
            nano_name = nano.format(layer)
            t = sd[name.format(layer)]
            out[nano_name] = (t.t() if transpose and nano_name != forget_transpose else t).contiguous().clone()
    save_file(out, str(path))
    return path


def nano_model() -> NanoGPT:
    return NanoGPT(GPT2_SIZE["vocab_size"], GPT2_SIZE["n_positions"], GPT2_SIZE["n_embd"], GPT2_SIZE["n_head"], 2)


def ids(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, GPT2_SIZE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------
# Identical models


def test_identical_models_agree_exactly_in_outputs_and_every_layer():
    torch.manual_seed(0)
    model = nano_model()
    result = tg.verify(model, copy.deepcopy(model), ids())
    assert isinstance(result, VerifyResult)
    assert result.ok and result.max_abs == 0.0 and result.max_rel == 0.0
    assert list(result.outputs) == ["output"] and result.outputs["output"].shape == [2, 7, 64]
    assert result.first_divergence is None
    # every module output that is not the same tensor as another one: 2 embeddings, then per block
    # ln1, qkv, proj, ln2, fc, act, proj, the block; then ln_f, head
    assert len(result.layers) == 2 + 2 * 8 + 2 == result.model_layers == result.reference_layers
    assert [(d.model, d.reference) for d in result.layers[:3]] == [
        ("tok", "tok"),
        ("pos", "pos"),
        ("blocks.0.ln1", "blocks.0.ln1"),
    ]
    assert all(d.ok and d.max_abs == 0 for d in result.layers)
    proj = next(d for d in result.layers if d.model == "blocks.0.attn.proj")
    assert proj.model_aliases == ["blocks.0.attn"]  # the attention returns its projection's very tensor
    assert tg.verify(model, model, ids()).max_abs == 0.0  # the same object twice: run twice
    assert "every paired layer within tolerance" in str(result) and "OK" in str(result)


def test_defaults_follow_the_least_precise_dtype_and_inputs_are_cast_per_model():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    model = copy.deepcopy(reference).to(torch.bfloat16)
    x = torch.randn(3, 8)
    result = tg.verify(model, reference, x)  # the bf16 model gets bf16 inputs, the reference float32 ones
    assert (result.atol, result.rtol) == DEFAULT_TOLERANCES["bfloat16"] and result.dtype == "bfloat16"
    expected = (model(x.bfloat16()).double() - reference(x).double()).abs().max().item()
    assert result.max_abs == pytest.approx(expected) and 0 < result.max_abs < 5e-2
    assert result.ok
    assert x.dtype == torch.float32  # the caller's inputs are not changed
    strict = tg.verify(model, reference, x, atol=0, rtol=0)
    assert not strict.ok and (strict.atol, strict.rtol) == (0.0, 0.0)
    assert "values beyond atol + rtol * |reference|" in strict.outputs["output"].reason
    assert tg.verify(reference, copy.deepcopy(reference), x).atol == DEFAULT_TOLERANCES["float32"][0]


# ---------------------------------------------------------------------------
# Across code bases: a nanoGPT-style model loaded with GPT-2 weights vs transformers' GPT2LMHeadModel


def test_nanogpt_loaded_from_gpt2_weights_agrees_with_transformers_layer_by_layer(gpt2, tmp_path):
    model = nano_model()
    report = tg.load(model, nano_checkpoint(gpt2, tmp_path / "nano.safetensors"), strict=True)
    x = ids()
    result = report.verify(gpt2, x)
    expected = (model(x) - gpt2(input_ids=x).logits).abs().max().item()
    assert result.max_abs == pytest.approx(expected, abs=1e-12) and result.max_abs < 1e-5
    assert result.ok, str(result)
    # a plain tensor against a ModelOutput: paired by position with logits, and said so
    assert result.outputs["output"].reference == "logits"
    assert any("paired by position ('output' ~ 'logits')" in n for n in result.notes)
    pairs = {(d.model, d.reference) for d in result.layers}
    assert {
        ("blocks.0.attn.qkv", "transformer.h.0.attn.c_attn"),
        ("blocks.1.attn.proj", "transformer.h.1.attn.c_proj"),
        ("blocks.1.mlp.act", "transformer.h.1.mlp.act"),
        ("blocks.1", "transformer.h.1"),
        ("head", "lm_head"),
    } <= pairs
    # nanoGPT's position table has no batch dimension and transformers' embedding sum is a dropout's
    # output: those two have no partner, every other module output pairs
    assert (len(result.layers), result.model_layers, result.reference_layers) == (19, 20, 21)
    assert "pos" not in {d.model for d in result.layers} and result.first_divergence is None


def test_a_square_weight_left_untransposed_is_caught_at_its_layer(gpt2, tmp_path):
    """The silent bug: attn.c_proj is square, so a forgotten Conv1D transpose loads without any shape error."""
    model = nano_model()
    path = nano_checkpoint(gpt2, tmp_path / "nano.safetensors", forget_transpose="blocks.1.attn.proj.weight")
    report = tg.load(model, path, strict=True)
    assert report.ok  # every shape fits: only running the model shows it
    x = ids()
    result = report.verify(gpt2, x)
    expected = (model(x) - gpt2(input_ids=x).logits).abs().max().item()
    assert result.max_abs == pytest.approx(expected) and result.max_abs > 1e-2
    assert not result.ok
    first = result.first_divergence
    assert (first.model, first.reference) == ("blocks.1.attn.proj", "transformer.h.1.attn.c_proj")
    assert first.max_abs > 1e-2 and not first.ok
    assert all(d.ok for d in result.layers[: result.layers.index(first)])  # layer 0 and block 1's qkv agree
    text = str(result)
    assert "DIFFERENT" in text
    assert "first divergence: model 'blocks.1.attn.proj' / reference 'transformer.h.1.attn.c_proj'" in text
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["first_divergence"]["model"] == "blocks.1.attn.proj" and d["ok"] is False


# ---------------------------------------------------------------------------
# transformers models against themselves, loaded by tg.load on the meta device


def test_gpt2_built_on_meta_and_loaded_by_tg_load_matches_the_original(gpt2, tmp_path):
    gpt2.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(gpt2.config)
    report = tg.load(model, tmp_path)
    result = report.verify(gpt2, {"input_ids": ids()})
    assert result.ok and result.max_abs == 0.0, str(result)
    assert list(result.outputs) == ["logits"]
    assert len(result.layers) == result.model_layers == 21 and result.first_divergence is None
    assert ("transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_attn") in {
        (d.model, d.reference) for d in result.layers
    }


def _meta_layout(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' half-split rotary rows -> Meta's interleaved ones (the inverse of convert_llama_weights_to_hf's permute)."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def test_llama_q_rows_in_the_wrong_rotary_layout_diverge_at_that_q_proj(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path / "hf")
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    sd[name] = _meta_layout(sd[name], config.num_attention_heads).contiguous()
    save_file(sd, str(tmp_path / "permuted.safetensors"))

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    report = tg.load(model, tmp_path / "permuted.safetensors", strict=True)
    x = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    result = report.verify(reference, {"input_ids": x})
    expected = (model(input_ids=x).logits - reference(input_ids=x).logits).abs().max().item()
    assert result.max_abs == pytest.approx(expected) and not result.ok
    first = result.first_divergence
    assert (first.model, first.reference) == ("model.layers.1.self_attn.q_proj",) * 2
    # and with the right layout, the same load agrees exactly
    assert tg.verify(reference, copy.deepcopy(reference), {"input_ids": x}).max_abs == 0.0


# ---------------------------------------------------------------------------
# Outputs: names, shapes, structures


class Pair(nn.Module):
    """Returns a dict whose keys are given: for comparing structures."""

    def __init__(self, keys: tuple[str, ...], vocab: int = 5):
        super().__init__()
        self.keys = keys
        self.lin = nn.Linear(4, vocab)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.lin(x)
        return {k: y * (i + 1) for i, k in enumerate(self.keys)}


def test_different_output_shapes_are_reported_not_ok_in_words():
    torch.manual_seed(0)
    model, reference = Pair(("logits",), vocab=5), Pair(("logits",), vocab=6)
    result = tg.verify(model, reference, torch.randn(2, 4))
    assert not result.ok and math.isinf(result.max_abs)
    d = result.outputs["logits"]
    assert d.reason == "shapes differ: model [2, 5], reference [2, 6]" and not d.ok
    assert "shapes differ: model [2, 5], reference [2, 6]" in str(result)
    assert json.loads(json.dumps(result.to_dict(), allow_nan=False))["max_abs"] == "inf"


def test_outputs_compared_by_the_names_both_have_and_the_others_named():
    torch.manual_seed(0)
    model = Pair(("logits", "hidden"))
    reference = copy.deepcopy(model)
    reference.keys = ("logits", "extra")
    result = tg.verify(model, reference, torch.randn(2, 4))
    assert list(result.outputs) == ["logits"] and result.ok
    assert "Not compared, only in the model's outputs: 'hidden'." in result.notes
    assert "Not compared, only in the reference's outputs: 'extra'." in result.notes


def test_tuples_and_nested_outputs_are_named_by_position():
    class Tupled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x, scale=1.0):
            y = self.lin(x)
            return y, (y * scale, None), {"z": y.sum()}

    torch.manual_seed(0)
    model = Tupled()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 4)
    result = tg.verify(model, reference, (x, 2.0))
    assert list(result.outputs) == ["0", "1.0", "2.z"] and result.ok
    result = tg.verify(model, reference, {"x": x, "scale": 3.0})
    assert result.ok and result.outputs["1.0"].max_abs == 0.0
    nothing = tg.verify(nn.Identity(), nn.Identity(), [[1, 2]])  # a list of ints back: no tensor
    assert not nothing.ok and any(n.startswith("Nothing compared") for n in nothing.notes)


def test_nan_on_both_sides_agrees_and_on_one_side_does_not():
    class Fill(nn.Module):
        def __init__(self, value: float):
            super().__init__()
            self.register_buffer("value", torch.tensor(value))

        def forward(self, x):
            return x * 0 + self.value

    x = torch.ones(3)
    assert tg.verify(Fill(math.nan), Fill(math.nan), x).ok
    one_sided = tg.verify(Fill(math.nan), Fill(1.0), x)
    assert not one_sided.ok and math.isinf(one_sided.max_abs)


# ---------------------------------------------------------------------------
# Layers: pairing by execution order, copies, honesty when nothing pairs


class Registered(nn.Module):
    """Registers its norm last, runs it first, returns through an in-place activation."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.act = nn.ReLU(inplace=inplace)
        self.norm = nn.LayerNorm(6)

    def forward(self, x):
        return self.act(self.fc(self.norm(x)))


def test_layers_pair_by_execution_order_and_outputs_are_copied_before_in_place_changes():
    torch.manual_seed(0)
    model = Registered(inplace=True)
    reference = Registered(inplace=False)
    reference.load_state_dict(model.state_dict())
    result = tg.verify(model, reference, torch.randn(4, 6))
    # fc's output, recorded before the in-place ReLU changed it, agrees with the out-of-place model's
    assert [(d.model, d.reference, d.ok) for d in result.layers] == [
        ("norm", "norm", True), ("fc", "fc", True), ("act", "act", True),
    ]  # fmt: skip
    assert result.ok


def test_a_module_only_one_model_has_is_skipped_not_shifting_later_pairs():
    class WithModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(6)
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return self.fc(self.norm(x))

    class Inline(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(6, 6)

        def forward(self, x):
            return self.dense(F.layer_norm(x, (6,)))

    torch.manual_seed(0)
    model, reference = WithModule(), Inline()
    reference.dense.load_state_dict(model.fc.state_dict())
    result = tg.verify(model, reference, torch.randn(4, 6))
    assert [(d.model, d.reference) for d in result.layers] == [("fc", "dense")]  # not norm ~ dense
    assert result.ok and result.first_divergence is None


def test_layers_that_cannot_be_paired_are_said_so_and_outputs_still_compared():
    torch.manual_seed(0)
    lin = nn.Linear(4, 2)
    result = tg.verify(lin, copy.deepcopy(lin), torch.randn(3, 4))  # no sub-modules: nothing to record
    assert result.ok and result.layers == []
    assert any(
        "Layers not compared: no module outputs were recorded in the model and the reference" in n for n in result.notes
    )

    wide = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    narrow = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    apart = tg.verify(wide, narrow, torch.randn(3, 4))
    assert [(d.model, d.reference) for d in apart.layers] == [("1", "1")]  # only the last shape is shared
    off = tg.verify(wide, narrow, torch.randn(3, 4), per_layer=False)
    assert off.layers == [] and off.model_layers == 0 and off.notes == []


def test_neither_model_is_changed_even_when_a_forward_fails():
    torch.manual_seed(0)
    model = nano_model()
    model.train()
    model.blocks[1].eval()  # mixed flags are restored module by module
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model)
    tg.verify(model, reference, ids())
    assert [m.training for m in model.modules()] == flags == [m.training for m in reference.modules()]
    assert all(not m._forward_hooks for m in (*model.modules(), *reference.modules()))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())

    with pytest.raises(IndexError) as err:  # token 99 is past the vocabulary of 64
        tg.verify(model, reference, torch.full((1, 3), 99))
    assert any("raised by the model (NanoGPT)" in n for n in err.value.__notes__)
    assert [m.training for m in model.modules()] == flags
    assert all(not m._forward_hooks for m in model.modules())


def test_each_model_gets_its_own_copy_of_the_inputs():
    class Doubles(nn.Module):
        def forward(self, x, extra):
            x.mul_(2)  # changes its input in place
            extra["t"].add_(1)
            return x + extra["t"]

    x, extra = torch.ones(3), {"t": torch.zeros(3)}
    result = tg.verify(Doubles(), Doubles(), (x, extra))
    assert result.ok and result.max_abs == 0.0  # the reference did not see the model's changes
    assert torch.equal(x, torch.ones(3)) and torch.equal(extra["t"], torch.zeros(3))  # nor did the caller


# ---------------------------------------------------------------------------
# Errors


def test_wrong_arguments_are_refused_with_the_fix():
    torch.manual_seed(0)
    lin = nn.Linear(4, 2)
    with pytest.raises(TypeError, match=r"inputs must be a tensor, a tuple or list .* not str"):
        tg.verify(lin, lin, "hello")
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match=r"not ndarray \(convert it with torch.from_numpy\)"):
        tg.verify(lin, lin, np.zeros((3, 4), dtype="float32"))
    with pytest.raises(TypeError, match=r"keys must be strings, not 0"):
        tg.verify(lin, lin, {0: torch.zeros(3, 4)})
    with pytest.raises(TypeError, match=r"reference_model must be a torch.nn.Module, not OrderedDict"):
        tg.verify(lin, lin.state_dict(), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"atol and rtol must be >= 0, not atol=-1.0"):
        tg.verify(lin, lin, torch.zeros(3, 4), atol=-1)
    with torch.device("meta"):
        meta = nn.Linear(4, 2)
    with pytest.raises(
        ValueError, match=r"the model \(Linear\) has 2 tensors on the meta device \(weight, bias\): load"
    ):
        tg.verify(meta, lin, torch.zeros(3, 4))


def test_report_verify_needs_the_model_it_loaded(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(4, 2)
    save_file(lin.state_dict(), str(tmp_path / "lin.safetensors"))
    report = tg.load(nn.Linear(4, 2), tmp_path / "lin.safetensors")  # the model is dropped right away
    gc.collect()
    with pytest.raises(
        ValueError, match=r"no longer knows its model \(Linear\).*call tg.verify\(model, reference_model"
    ):
        report.verify(lin, torch.zeros(3, 4))
    kept = nn.Linear(4, 2)
    report = tg.load(kept, tmp_path / "lin.safetensors")
    assert report.verify(lin, torch.randn(3, 4)).max_abs == 0.0
    assert copy.deepcopy(report).to_dict() == report.to_dict()  # a copy is plain data, without the model
    import pickle

    assert pickle.loads(pickle.dumps(report)).loaded == ["weight", "bias"]


# ---------------------------------------------------------------------------
# With transforms: the same GPT-2 file, as transformers saved it, into the nanoGPT-style model


def nano_rules(*, forget: str | None = None) -> dict:
    """Renames (checkpoint -> model) and transforms (model <- checkpoint) for NanoGPT from GPT2LMHeadModel's names."""
    rules: dict = {}
    for nano, (hf, transpose) in NANO_FROM_HF.items():
        if transpose and nano != forget:
            rules[nano] = tg.transpose(hf)
        elif transpose:  # the mistake: a square Conv1D weight renamed, not transposed (its shape fits)
            rules[nano] = tg.reshape(hf, [GPT2_SIZE["n_embd"]] * 2)
        elif hf != "lm_head.weight":
            rules[hf] = nano
    rules["head.weight"] = tg.same("transformer.wte.weight")  # transformers does not save the tied head
    return rules


def test_a_wrong_transform_in_the_rules_is_caught_by_verify(gpt2, tmp_path):
    gpt2.save_pretrained(tmp_path)
    x = ids()
    model = nano_model()
    report = tg.load(model, tmp_path, rules=nano_rules(), strict=True)
    assert report.transformed["blocks.1.attn.proj.weight"] == "transpose(transformer.h.1.attn.c_proj.weight)"
    right = report.verify(gpt2, x)
    assert right.ok and right.max_abs < 1e-5 and right.first_divergence is None

    wrong_model = nano_model()
    wrong = tg.load(wrong_model, tmp_path, rules=nano_rules(forget="blocks.{}.attn.proj.weight"), strict=True)
    assert wrong.ok  # every shape fits
    result = wrong.verify(gpt2, x)
    expected = (wrong_model(x) - gpt2(input_ids=x).logits).abs().max().item()
    assert not result.ok and result.max_abs == pytest.approx(expected) and result.max_abs > 1e-2
    first = result.first_divergence
    assert (first.model, first.reference) == ("blocks.0.attn.proj", "transformer.h.0.attn.c_proj")
