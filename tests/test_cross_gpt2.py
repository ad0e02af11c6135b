"""Issue 14 "done when", GPT-2: transformers' GPT2LMHeadModel weights into a nanoGPT-style model, by alignment alone.

The checkpoint is written by transformers (``save_pretrained``: ``Conv1D`` weights stored ``[in, out]``);
the model is written here the way nanoGPT's ``model.py`` is (plain ``nn.Linear``, fused ``c_attn``,
``lm_head`` tied to ``wte``, causal attention by hand). The oracle is the transformers model itself.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

import torchgraft as tg
from torchgraft.transforms import reverse

transformers = pytest.importorskip("transformers")

N_LAYER, N_EMBD, N_HEAD, VOCAB, N_POS = 2, 32, 4, 128, 64


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_head: int, bias: bool = True):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d, bias=bias)
        self.c_proj = nn.Linear(d, d, bias=bias)
        self.n_head = n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return causal_attention(x, self.c_attn, self.c_proj, self.n_head)


def causal_attention(x: torch.Tensor, qkv: nn.Module, proj: nn.Module, n_head: int) -> torch.Tensor:
    b, t, c = x.shape
    q, k, v = qkv(x).split(c, dim=2)
    q, k, v = (z.view(b, t, n_head, c // n_head).transpose(1, 2) for z in (q, k, v))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
    mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
    y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
    return proj(y)


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, n_layer: int = N_LAYER, d: int = N_EMBD, n_head: int = N_HEAD, vocab: int = VOCAB):
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab, d),
                "wpe": nn.Embedding(N_POS, d),
                "h": nn.ModuleList(Block(d, n_head) for _ in range(n_layer)),
                "ln_f": nn.LayerNorm(d),
            }
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as nanoGPT does

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, vocab_size=VOCAB, n_positions=N_POS,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    return model, path


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))


CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
TRANSPOSED = [f"transformer.h.{i}.{m}.weight" for i in range(N_LAYER) for m in CONV1D]


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_hf_gpt2_into_nanogpt_by_alignment_alone_and_back(hf_gpt2, device, tmp_path):
    hf, path = hf_gpt2
    with torch.device(device):
        model = NanoGPT()
    plan = tg.plan(model, path, align=True)
    # every entry pairs; the Conv1D weights are transposed, the square c_proj by its sibling c_attn
    assert not plan.missing and not plan.unexpected and not plan.ambiguous, plan.problems()
    assert sorted(plan.transformed) == sorted(TRANSPOSED)
    assert plan.transformed["transformer.h.0.mlp.c_fc.weight"].startswith("transpose(transformer.h.0.mlp.c_fc.weight")
    why = plan.aligned["transformer.h.1.attn.c_proj.weight"]
    assert why["confidence"] == 0.85 and "transformer.h.1.attn.c_attn" in why["reason"]
    assert "transposed" in plan.aligned["transformer.h.0.attn.c_attn.weight"]["reason"]
    assert "transformer.h.0.attn.c_attn.bias" not in plan.transformed  # 1-D: as it is
    report = tg.load(model, path, plan=plan)
    assert sorted(report.transformed) == sorted(TRANSPOSED)
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    # back: the nanoGPT weights in the checkpoint's layout, bit-identical to what transformers saved
    saved = load_file(path / "model.safetensors")
    back = reverse(plan, model.state_dict())
    assert set(back) == set(saved)
    for k, v in saved.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    dest = tmp_path / "back.safetensors"
    tg.convert(model.state_dict(), dest, plan=plan, reverse=True)
    written = load_file(dest)
    assert set(written) == set(saved) and all(torch.equal(written[k], v) for k, v in saved.items())
    reloaded = transformers.GPT2LMHeadModel(hf.config).eval()
    reloaded.load_state_dict(written, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)


def test_aligned_transposes_export_as_rules_that_reproduce_the_plan(hf_gpt2):
    hf, path = hf_gpt2
    plan = tg.plan(NanoGPT(), path, align=True)
    rules = plan.aligned_rules()
    value = rules["transformer.h.{}.attn.c_attn.weight"]
    assert isinstance(value, tg.transforms.Expr)
    assert str(value) == str(tg.transpose("transformer.h.{}.attn.c_attn.weight"))
    again = tg.plan(NanoGPT(), path, rules=rules)
    assert again.transformed == plan.transformed
    assert {k: (e.action, e.source) for k, e in again.entries.items()} == {
        k: (e.action, e.source) for k, e in plan.entries.items()
    }
    model = NanoGPT()
    tg.load(model, path, rules=rules)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), hf(_ids()).logits, rtol=0, atol=1e-5)


def test_saved_plan_keeps_the_aligned_transforms(hf_gpt2, tmp_path):
    hf, path = hf_gpt2
    plan = tg.plan(NanoGPT(), path, align=True)
    plan.save(tmp_path / "plan.json")
    loaded = tg.Plan.load(tmp_path / "plan.json")
    assert loaded.transformed == plan.transformed and loaded.aligned == plan.aligned
    model = NanoGPT()
    report = tg.load(model, path, plan=loaded)
    assert sorted(report.transformed) == sorted(TRANSPOSED)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), hf(_ids()).logits, rtol=0, atol=1e-5)


def test_nanogpt_checkpoint_into_hf_gpt2_the_other_way(hf_gpt2, tmp_path):
    hf, path = hf_gpt2
    nano = NanoGPT()
    tg.load(nano, path, align=True)
    torch.save(nano.state_dict(), tmp_path / "ckpt.pt")  # nanoGPT's own layout: Linear [out, in]
    model = transformers.GPT2LMHeadModel(hf.config).eval()
    plan = tg.plan(model, tmp_path / "ckpt.pt", align=True)
    assert not plan.missing and not plan.ambiguous, plan.problems()
    assert sorted(plan.transformed) == sorted(TRANSPOSED)  # the model's Conv1D c_proj: by its sibling c_attn
    tg.load(model, tmp_path / "ckpt.pt", plan=plan)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, hf(_ids()).logits, rtol=0, atol=1e-5)


class OtherBlock(nn.Module):
    """The same block as nanoGPT's under timm-like names: ``norm1``, ``attn.qkv``, ``attn.proj``, ``mlp.fc1/fc2``."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d)})
        self.n_head = n_head
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(d, 4 * d), "fc2": nn.Linear(4 * d, d)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + causal_attention(self.norm1(x), self.attn.qkv, self.attn.proj, self.n_head)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x)), approximate="tanh"))


class OtherNamesGPT(nn.Module):
    def __init__(self, d: int = N_EMBD):
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, d)
        self.pos_emb = nn.Embedding(N_POS, d)
        self.blocks = nn.ModuleList(OtherBlock(d, N_HEAD) for _ in range(N_LAYER))
        self.norm = nn.LayerNorm(d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.tok_emb.weight.t()


def test_hf_gpt2_into_a_linear_model_with_other_names(hf_gpt2):
    hf, path = hf_gpt2
    model = OtherNamesGPT()
    plan = tg.plan(model, path, align=True)
    assert not plan.missing and not plan.unexpected and not plan.ambiguous, plan.problems()
    assert plan.transformed["blocks.1.mlp.fc2.weight"] == "transpose(transformer.h.1.mlp.c_proj.weight)"
    assert plan.transformed["blocks.0.attn.proj.weight"] == "transpose(transformer.h.0.attn.c_proj.weight)"
    assert len(plan.transformed) == 4 * N_LAYER
    assert "stored transposed" in plan.aligned["blocks.0.attn.qkv.weight"]["reason"]
    tg.load(model, path, plan=plan)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), hf(_ids()).logits, rtol=0, atol=1e-5)


class SquareOnly(nn.Module):
    """nanoGPT's MLP shapes plus a square projection alone in its own module: nothing says its layout."""

    def __init__(self, d: int = N_EMBD):
        super().__init__()
        self.h = nn.ModuleList(nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d)}) for _ in range(2))
        self.head = nn.ModuleDict({"c_proj": nn.Linear(d, d)})


def test_square_c_proj_without_sibling_evidence_is_ambiguous_not_guessed():
    torch.manual_seed(0)
    src = SquareOnly()
    ckpt = {k: (v.t().contiguous() if v.dim() == 2 else v) for k, v in src.state_dict().items()}  # Conv1D layout
    model = SquareOnly()
    plan = tg.plan(model, ckpt, align=True)
    assert sorted(plan.transformed) == ["h.0.c_fc.weight", "h.1.c_fc.weight"]
    assert "head.c_proj.weight" in plan.missing and "head.c_proj.weight" not in plan.aligned
    assert "head.c_proj.weight" in plan.unexpected  # the checkpoint's tensor: not loaded, reported
    amb = next(a for a in plan.ambiguous if a["targets"] == ["head.c_proj.weight"])
    assert amb["candidates"] == ["head.c_proj.weight"] and "could be transposed or not" in amb["reason"]
    assert any("head.c_proj.weight" in p and "ambiguous" in p for p in plan.problems())
    # without align=True, names decide as before: a plain copy (the caller did not ask for layouts)
    assert tg.plan(SquareOnly(), ckpt).entries["head.c_proj.weight"].action == "copy"


def test_model_with_only_square_layers_and_no_transposes_loads_as_before():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    plan = tg.plan(model, dict(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).state_dict()), align=True)
    assert not plan.transformed and not plan.ambiguous and not plan.missing


class Conv1DOnly(nn.Module):
    """transformers' Conv1D layers, all square: no shape anywhere says which way a checkpoint stores them."""

    def __init__(self, d: int = N_EMBD):
        super().__init__()
        conv1d = transformers.pytorch_utils.Conv1D
        self.h = nn.ModuleList(nn.ModuleDict({"c_proj": conv1d(d, d)}) for _ in range(2))


class LinearOnly(nn.Module):
    def __init__(self, d: int = N_EMBD):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"out": nn.Linear(d, d)}) for _ in range(2))


def test_model_with_only_square_conv1d_layers_aligned_to_another_codebase_is_ambiguous():
    torch.manual_seed(0)
    ckpt = dict(LinearOnly().state_dict())  # another codebase's names; Linear [out, in] or not: unknowable
    plan = tg.plan(Conv1DOnly(), ckpt, align=True)
    assert not plan.transformed
    assert sorted(a["targets"][0] for a in plan.ambiguous) == ["h.0.c_proj.weight", "h.1.c_proj.weight"]
    amb = plan.ambiguous[0]
    assert amb["candidates"] == ["layers.0.out.weight"] and "Conv1D stores [in, out]" in amb["reason"]
    assert {"h.0.c_proj.weight", "h.1.c_proj.weight"} <= set(plan.missing)
    assert {"layers.0.out.weight", "layers.1.out.weight"} <= set(plan.unexpected)  # not loaded, still reported
    assert "layers.0.out.weight" not in plan.renamed
    assert plan.entries["h.0.c_proj.bias"].action == "copy"  # 1-D: no layout question
    # its own checkpoint, same names: nothing is suspected, a plain copy
    own = tg.plan(Conv1DOnly(), dict(Conv1DOnly().state_dict()), align=True)
    assert not own.ambiguous and not own.missing


def test_the_caller_decides_an_ambiguous_square_with_a_rule():
    torch.manual_seed(0)
    src = SquareOnly()
    ckpt = {k: (v.t().contiguous() if v.dim() == 2 else v) for k, v in src.state_dict().items()}
    plan = tg.plan(SquareOnly(), ckpt, align=True)
    reason = next(a["reason"] for a in plan.ambiguous if a["targets"] == ["head.c_proj.weight"])
    assert "rules={'head.c_proj.weight': tg.transpose('head.c_proj.weight')}" in reason
    for rule, expected in ((tg.transpose("head.c_proj.weight"), ckpt["head.c_proj.weight"].t()),
                           (tg.transforms.source("head.c_proj.weight"), ckpt["head.c_proj.weight"])):  # fmt: skip
        model = SquareOnly()
        plan = tg.plan(model, ckpt, align=True, rules={"head.c_proj.weight": rule})
        assert not plan.ambiguous and not plan.missing, plan.problems()
        tg.load(model, ckpt, plan=plan)
        assert torch.equal(model.head.c_proj.weight, expected)
        assert torch.equal(model.h[1].c_fc.weight, ckpt["h.1.c_fc.weight"].t())
