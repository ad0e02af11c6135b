"""Meta Llama tensor-parallel shards <-> transformers' Llama (GQA) (issue 14.4).

Oracles, each written in this file: transformers' ``LlamaForCausalLM`` (its logits and its own
half-split rotary layout), a Meta-style Llama written here the way Meta's ``llama/model.py`` computes
(rotary on interleaved pairs as complex numbers, fairscale's column/row-parallel pieces), and a
hand-written Meta-style split (per-head interleave by an explicit row order, then ``chunk``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import torchgraft as tg
from torchgraft.transforms import concat, reverse, rope_permute

transformers = pytest.importorskip("transformers")

N_LAYERS, DIM, N_HEADS, N_KV_HEADS, FFN, VOCAB, N_SHARDS, EPS = 2, 64, 4, 2, 128, 128, 2, 1e-5
HEAD_DIM = DIM // N_HEADS
TOKENS = torch.tensor([[1, 5, 9, 77, 3, 100, 42, 0, 127, 8]])


def hf_config():
    return transformers.LlamaConfig(
        hidden_size=DIM,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        intermediate_size=FFN,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        rms_norm_eps=EPS,
        attn_implementation="eager",
    )


def hf_llama(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config()).eval()
    with torch.no_grad():  # the default init leaves norms at 1: make every tensor distinct
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(TOKENS)
    return out.logits if hasattr(out, "logits") else out


# The hand-written Meta layout ------------------------------------------------------------------


def interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' q/k rows (per head: first halves, then second halves of the rotary pairs) in Meta's
    order (per head: pair i at rows 2i and 2i+1), by an explicit row list."""
    head_dim = w.shape[0] // heads
    half = head_dim // 2
    order = [h * head_dim + j for h in range(heads) for i in range(half) for j in (i, i + half)]
    return w[order]


#: Meta's model-parallel layers: which dim each weight was split on (fairscale ColumnParallelLinear: 0,
#: RowParallelLinear: 1, ParallelEmbedding: 1), None for replicated tensors.
SPLIT_DIM = {
    "tok_embeddings.weight": 1,
    "norm.weight": None,
    "output.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}
HF_NAME = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


GLOBAL = ("tok_embeddings.weight", "norm.weight", "output.weight")


def meta_full(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One unsharded Meta state dict (as ``llama/model.py``'s ``Transformer`` names it) from transformers' weights."""
    out = {}
    for meta, name in HF_NAME.items():
        layers = [None] if meta in GLOBAL else range(N_LAYERS)
        for i in layers:
            key = meta if i is None else f"layers.{i}.{meta}"
            w = hf[name if i is None else f"model.layers.{i}.{name}"]
            if meta == "attention.wq.weight":
                w = interleave(w, N_HEADS)
            elif meta == "attention.wk.weight":
                w = interleave(w, N_KV_HEADS)
            out[key] = w
    return out


def meta_split(full: dict[str, torch.Tensor], n_shards: int, *, embedding_split: int = 1) -> dict[str, torch.Tensor]:
    """Meta's model-parallel pieces, keyed ``consolidated.NN/<key>`` as the shards' reader names them.

    ``embedding_split=0``: Llama 3's ``VocabParallelEmbedding`` (rows), instead of Llama 1/2's columns.
    """
    out = {}
    for key, w in full.items():
        split = SPLIT_DIM[key.split(".", 2)[-1] if key.startswith("layers.") else key]
        split = embedding_split if key == "tok_embeddings.weight" else split
        pieces = [w] * n_shards if split is None else w.chunk(n_shards, dim=split)
        for rank, piece in enumerate(pieces):
            out[f"consolidated.{rank:02d}/{key}"] = piece.clone()
    return out


def save_shards(qualified: dict[str, torch.Tensor], folder: Path, params: dict | None = None) -> Path:
    """One ``consolidated.NN.pth`` per stem, as Meta's code saves them (``torch.save`` of a plain dict)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for key, w in qualified.items():
        stem, name = key.split("/", 1)
        shards.setdefault(stem, {})[name] = w.contiguous()
    for stem, sd in shards.items():
        torch.save(sd, folder / f"{stem}.pth")
    if params is not None:
        (folder / "params.json").write_text(json.dumps(params))
    return folder


PARAMS = {"dim": DIM, "n_layers": N_LAYERS, "n_heads": N_HEADS, "n_kv_heads": N_KV_HEADS, "vocab_size": VOCAB,
          "multiple_of": 32, "norm_eps": EPS, "rope_theta": 10000.0}  # fmt: skip


# A Meta-style Llama (as llama/model.py computes; written here) ----------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).type_as(x) * self.weight


def rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Meta's apply_rotary_emb: consecutive pairs (2i, 2i+1) of each head as one complex number."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq = nn.Linear(DIM, N_HEADS * HEAD_DIM, bias=False)
        self.wk = nn.Linear(DIM, N_KV_HEADS * HEAD_DIM, bias=False)
        self.wv = nn.Linear(DIM, N_KV_HEADS * HEAD_DIM, bias=False)
        self.wo = nn.Linear(N_HEADS * HEAD_DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = rotary(self.wq(x).view(b, s, N_HEADS, HEAD_DIM), freqs_cis)
        k = rotary(self.wk(x).view(b, s, N_KV_HEADS, HEAD_DIM), freqs_cis)
        v = self.wv(x).view(b, s, N_KV_HEADS, HEAD_DIM)
        rep = N_HEADS // N_KV_HEADS  # repeat_kv
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = q @ k.transpose(2, 3) / math.sqrt(HEAD_DIM) + mask
        out = torch.softmax(scores.float(), dim=-1).type_as(q) @ v
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(DIM, FFN, bias=False)
        self.w2 = nn.Linear(FFN, DIM, bias=False)
        self.w3 = nn.Linear(DIM, FFN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention, self.feed_forward = Attention(), FeedForward()
        self.attention_norm, self.ffn_norm = RMSNorm(DIM), RMSNorm(DIM)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class MetaLlama(nn.Module):
    """Meta's ``Transformer`` (llama/model.py), unsharded, names as in its checkpoints."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(N_LAYERS))
        self.norm = RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        s = tokens.shape[1]
        freqs = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2)[: HEAD_DIM // 2].float() / HEAD_DIM))
        freqs_cis = torch.polar(torch.ones(s, HEAD_DIM // 2), torch.outer(torch.arange(s).float(), freqs))
        mask = torch.full((s, s), float("-inf")).triu(1)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, freqs_cis, mask)
        return self.output(self.norm(h)).float()


# The oracles agree with each other ---------------------------------------------------------------


def test_hand_written_meta_layout_computes_what_transformers_computes():
    """The interleave above is Meta's layout: Meta's rotary on it gives transformers' logits."""
    hf = hf_llama(0)
    meta = MetaLlama().eval()
    meta.load_state_dict(meta_full(hf.state_dict()), strict=True)
    torch.testing.assert_close(logits(meta), logits(hf), atol=1e-5, rtol=0)
    wrong = MetaLlama().eval()  # without the interleave the rotary pairs are wrong: the check can fail
    full = meta_full(hf.state_dict())
    full.update({f"layers.{i}.attention.{w}.weight": hf.state_dict()[f"model.layers.{i}.self_attn.{w[1]}_proj.weight"]
                 for i in range(N_LAYERS) for w in ("wq", "wk")})  # fmt: skip
    wrong.load_state_dict(full)
    assert (logits(wrong) - logits(hf)).abs().max() > 1e-2


def test_hand_written_split_has_meta_shapes():
    sd = meta_split(meta_full(hf_llama(0).state_dict()), N_SHARDS)
    assert sd["consolidated.01/layers.0.attention.wq.weight"].shape == (N_HEADS * HEAD_DIM // N_SHARDS, DIM)
    assert sd["consolidated.01/layers.0.attention.wk.weight"].shape == (N_KV_HEADS * HEAD_DIM // N_SHARDS, DIM)
    assert sd["consolidated.00/layers.1.attention.wo.weight"].shape == (DIM, DIM // N_SHARDS)
    assert sd["consolidated.00/tok_embeddings.weight"].shape == (VOCAB, DIM // N_SHARDS)
    assert sd["consolidated.01/output.weight"].shape == (VOCAB // N_SHARDS, DIM)
    assert torch.equal(sd["consolidated.00/norm.weight"], sd["consolidated.01/norm.weight"])


# The shards' reader ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def original() -> nn.Module:
    return hf_llama(0)


@pytest.fixture(scope="module")
def shards(original, tmp_path_factory) -> Path:
    """The hand-written split of ``original``, saved as Meta saves it."""
    folder = tmp_path_factory.mktemp("llama") / "llama-tiny"
    return save_shards(meta_split(meta_full(original.state_dict()), N_SHARDS), folder, PARAMS)


def test_shards_open_as_one_source_with_qualified_keys(shards):
    with tg.open(shards) as src:
        assert src.format == "meta-shards"
        assert [Path(f).name for f in src.files] == ["consolidated.00.pth", "consolidated.01.pth"]
        one = torch.load(shards / "consolidated.01.pth", weights_only=True)
        assert len(src) == 2 * len(one)
        for key, w in one.items():
            ref = src[f"consolidated.01/{key}"]
            assert (ref.shape, ref.dtype) == (tuple(w.shape), "float32")
            assert torch.equal(ref.load(), w)
        assert json.loads(src.metadata["n_kv_heads"]) == N_KV_HEADS and src.metadata["rope_theta"] == "10000.0"
        assert src.conversions == {}  # the reader qualifies names; it changes no tensor


def test_one_shard_opens_as_the_plain_file_unless_asked(tmp_path):
    sd = {"layers.0.attention.wq.weight": torch.randn(4, 4)}
    torch.save(sd, tmp_path / "consolidated.00.pth")
    with tg.open(tmp_path) as src:  # Meta's single-file models load into Meta's own code as before
        assert list(src) == ["layers.0.attention.wq.weight"]
    with tg.open(tmp_path, format="meta-shards") as src:
        assert list(src) == ["consolidated.00/layers.0.attention.wq.weight"]


def test_shards_with_different_keys_are_refused(tmp_path):
    one = torch.ones(2)
    keys = ["consolidated.00/a", "consolidated.00/b", "consolidated.01/a", "consolidated.01/c"]
    save_shards(dict.fromkeys(keys, one), tmp_path)
    with pytest.raises(
        tg.CheckpointError,
        match=r"shards do not match: 1 key\(s\) in consolidated\.00 but not in consolidated\.01: 'b'; "
        r"1 key\(s\) in consolidated\.01 but not in consolidated\.00: 'c'",
    ):
        tg.open(tmp_path)


def test_shards_with_a_gap_or_a_damaged_params_json_are_refused(tmp_path):
    save_shards({"consolidated.00/a": torch.ones(2), "consolidated.02/a": torch.ones(2)}, tmp_path)
    with pytest.raises(tg.CheckpointError, match=r"ranks \[0, 2\], but consolidated\.01\.pth is missing"):
        tg.open(tmp_path)
    (tmp_path / "consolidated.02.pth").rename(tmp_path / "consolidated.01.pth")
    (tmp_path / "params.json").write_text("[1, 2]")
    with pytest.raises(tg.CheckpointError, match=r"params\.json' \(read as meta-shards\): a JSON list, not an object"):
        tg.open(tmp_path)


# The recipe: Meta's shards -> transformers' Llama, and back ----------------------------------------

RECIPE = "meta-llama-to-hf-llama"


def rules(**changes) -> dict:
    return tg.recipe(RECIPE, **{"n_heads": N_HEADS, "n_kv_heads": N_KV_HEADS, "n_shards": N_SHARDS, **changes})


def meta_shapes(n_shards: int = N_SHARDS) -> dict[str, torch.Tensor]:
    """Meta-device tensors with the shards' shapes (written from Meta's layer types, not from any file)."""
    q, kv, out = N_HEADS * HEAD_DIM, N_KV_HEADS * HEAD_DIM, {}
    per_layer = {"attention.wq.weight": (q // n_shards, DIM), "attention.wk.weight": (kv // n_shards, DIM),
                 "attention.wv.weight": (kv // n_shards, DIM), "attention.wo.weight": (DIM, q // n_shards),
                 "feed_forward.w1.weight": (FFN // n_shards, DIM), "feed_forward.w2.weight": (DIM, FFN // n_shards),
                 "feed_forward.w3.weight": (FFN // n_shards, DIM), "attention_norm.weight": (DIM,),
                 "ffn_norm.weight": (DIM,)}  # fmt: skip
    for rank in range(n_shards):
        shapes = {"tok_embeddings.weight": (VOCAB, DIM // n_shards), "norm.weight": (DIM,),
                  "output.weight": (VOCAB // n_shards, DIM)}  # fmt: skip
        shapes.update({f"layers.{i}.{k}": v for i in range(N_LAYERS) for k, v in per_layer.items()})
        out.update({f"consolidated.{rank:02d}/{k}": torch.empty(v, device="meta") for k, v in shapes.items()})
    return out


def test_shards_made_by_the_inverse_transforms_are_metas_split(original, shards):
    """HF -> Meta through the recipe's plan run backwards equals the hand-written split, bit for bit."""
    plan = tg.plan(hf_llama(1), meta_shapes(), rules=rules())
    assert {e.action for e in plan.entries.values()} == {"transform"} and not plan.unexpected
    made = reverse(plan, original.state_dict())
    hand = meta_split(meta_full(original.state_dict()), N_SHARDS)
    assert made.keys() == hand.keys()
    for key, w in hand.items():
        assert made[key].dtype == w.dtype and torch.equal(made[key], w), key
    for stem in ("consolidated.00", "consolidated.01"):  # and as saved: the files in `shards` hold the same
        saved = torch.load(shards / f"{stem}.pth", weights_only=True)
        assert saved.keys() == {k.split("/", 1)[1] for k in made if k.startswith(stem + "/")}
        assert all(torch.equal(saved[k], made[f"{stem}/{k}"]) for k in saved)


def test_shards_load_into_transformers_llama(original, shards):
    model = hf_llama(1)
    report = tg.load(model, shards, rules=rules(), strict=True)
    torch.testing.assert_close(logits(model), logits(original), atol=1e-5, rtol=0)
    for key, w in original.state_dict().items():  # index moves and concatenations only: bit-identical
        assert torch.equal(model.state_dict()[key], w), key
    assert len(report.transformed) == len(original.state_dict())
    assert report.transformed["model.layers.1.self_attn.k_proj.weight"] == (
        "rope_permute(concat(consolidated.00/layers.1.attention.wk.weight, "
        "consolidated.01/layers.1.attention.wk.weight, dim=0), heads=2)"
    )
    assert report.transformed["model.norm.weight"] == "same(consolidated.00/norm.weight, consolidated.01/norm.weight)"


def test_shards_load_into_a_meta_built_llama(original, shards):
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_config()).eval()
    tg.load(model, shards, rules=rules(), strict=True)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    torch.testing.assert_close(logits(model), logits(original), atol=1e-5, rtol=0)


def test_transformers_llama_back_to_metas_shards_bit_identical(shards, tmp_path):
    model = hf_llama(1)
    plan = tg.plan(model, shards, rules=rules())
    tg.load(model, shards, plan=plan)
    back = reverse(plan, model.state_dict())
    save_shards(back, tmp_path / "back")
    for stem in ("consolidated.00", "consolidated.01"):
        a = torch.load(shards / f"{stem}.pth", weights_only=True)
        b = torch.load(tmp_path / "back" / f"{stem}.pth", weights_only=True)
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    out = tg.convert(model.state_dict(), tmp_path / "back.safetensors", plan=plan, reverse=True)
    assert out is not None
    from safetensors.torch import load_file

    written = load_file(tmp_path / "back.safetensors")
    assert written.keys() == back.keys() and all(torch.equal(written[k], back[k]) for k in back)


def test_a_saved_plan_loads_the_shards(original, shards, tmp_path):
    tg.plan(hf_llama(1), shards, rules=rules()).save(tmp_path / "plan.json")
    model = hf_llama(2)
    tg.load(model, shards, plan=tg.Plan.load(tmp_path / "plan.json"))
    torch.testing.assert_close(logits(model), logits(original), atol=1e-5, rtol=0)


def test_one_unsharded_file_and_llama3_embedding_split(original, tmp_path):
    full = meta_full(original.state_dict())
    torch.save({**full, "rope.freqs": torch.randn(HEAD_DIM // 2)}, tmp_path / "consolidated.00.pth")  # Llama 1's
    model = hf_llama(1)
    tg.load(model, tmp_path / "consolidated.00.pth", rules=rules(n_shards=1), strict=True)
    torch.testing.assert_close(logits(model), logits(original), atol=1e-5, rtol=0)
    llama3 = save_shards(meta_split(full, N_SHARDS, embedding_split=0), tmp_path / "llama3")
    model = hf_llama(1)
    with pytest.raises(tg.PlanError, match=r"model\.embed_tokens\.weight"):  # the split dim is data, checked
        tg.load(model, llama3, rules=rules(), strict=True)
    tg.load(model, llama3, rules=rules(embedding_split=0), strict=True)
    torch.testing.assert_close(logits(model), logits(original), atol=1e-5, rtol=0)


def test_the_plan_names_the_recipe_when_shards_are_loaded_without_it(shards):
    plan = tg.plan(hf_llama(1), shards)
    hint = "tg.recipe('meta-llama-to-hf-llama', n_heads=4, n_kv_heads=2, n_shards=2)"  # from params.json
    assert any("Meta's tensor-parallel shards" in n and hint in n for n in plan.notes), plan.notes


@pytest.mark.parametrize(
    ("wrong", "k_rule"),
    [
        ("k permuted with n_heads", lambda k: rope_permute(k, heads=N_HEADS)),
        ("no rope_permute on k", lambda k: k),
        ("k permuted with 3 heads", lambda k: rope_permute(k, heads=3)),
    ],
)
def test_a_wrong_rotary_rule_is_a_plan_error_or_a_large_difference(wrong, k_rule, original, shards):
    table = rules()
    k = concat("consolidated.00/layers.{}.attention.wk.weight", "consolidated.01/layers.{}.attention.wk.weight", dim=0)
    table["model.layers.{}.self_attn.k_proj.weight"] = k_rule(k)
    model = hf_llama(1)
    if wrong == "k permuted with 3 heads":  # 32 rows are not 3 heads: the shapes say so before any read
        with pytest.raises(tg.PlanError, match=r"32 rows are not 3 heads of an even size"):
            tg.plan(model, shards, rules=table)
        return
    tg.load(model, shards, rules=table, strict=True)  # the shapes fit: only the outputs can tell
    assert (logits(model) - logits(original)).abs().max() > 1e-2


def test_no_rope_permute_at_all_is_a_large_difference(original, shards):
    table = rules()
    for w, name in (("wq", "q_proj"), ("wk", "k_proj")):
        table[f"model.layers.{{}}.self_attn.{name}.weight"] = concat(
            *(f"consolidated.{r:02d}/layers.{{}}.attention.{w}.weight" for r in range(N_SHARDS)), dim=0
        )
    model = hf_llama(1)
    tg.load(model, shards, rules=table, strict=True)
    assert (logits(model) - logits(original)).abs().max() > 1e-2


def test_replicated_norms_that_differ_are_a_load_error_naming_them(original, tmp_path):
    sd = meta_split(meta_full(original.state_dict()), N_SHARDS)
    sd["consolidated.01/layers.1.ffn_norm.weight"] = sd["consolidated.01/layers.1.ffn_norm.weight"] + 1e-3
    folder = save_shards(sd, tmp_path / "differ")
    model = hf_llama(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        tg.LoadError,
        match=r"consolidated\.01/layers\.1\.ffn_norm\.weight is not equal to "
        r"consolidated\.00/layers\.1\.ffn_norm\.weight",
    ):
        tg.load(model, folder, rules=rules(), strict=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed


def test_recipe_numbers_are_checked():
    assert tg.recipes.RECIPES[RECIPE].params == ("n_heads", "n_kv_heads", "n_shards")
    with pytest.raises(tg.PlanError, match=r"needs n_kv_heads"):
        tg.recipe(RECIPE, n_heads=4, n_shards=2)
    with pytest.raises(tg.PlanError, match=r"n_shards=3 does not divide n_heads=4 and n_kv_heads=2"):
        rules(n_shards=3)
    with pytest.raises(tg.PlanError, match=r"n_heads=4 is not a multiple of n_kv_heads=3"):
        rules(n_kv_heads=3)
    with pytest.raises(tg.PlanError, match=r"dim=60 is not n_heads=4 heads of an even size"):
        rules(dim=60)
    assert rules(n_layers=N_LAYERS, dim=DIM) == rules()  # params.json's numbers may be passed as they are


def test_command_line_loads_the_shards_with_the_recipe(original, shards, tmp_path, capsys):
    from safetensors.torch import load_file

    from torchgraft.cli import main

    original.config.save_pretrained(tmp_path / "config")
    params = [f"--recipe-param={k}={v}" for k, v in (("n_heads", N_HEADS), ("n_kv_heads", N_KV_HEADS), ("n_shards", 2))]
    code = main(["load", str(shards), "--model", "transformers:LlamaForCausalLM", "--config", str(tmp_path / "config"),
                 "--recipe", RECIPE, *params, "--strict", "--out", str(tmp_path / "hf.safetensors")])  # fmt: skip
    assert code == 0, capsys.readouterr()
    written = load_file(tmp_path / "hf.safetensors")
    assert written.keys() == original.state_dict().keys()
    assert all(torch.equal(written[k], w) for k, w in original.state_dict().items())


def test_alignment_alone_never_pairs_pieces_of_shards(shards):
    """Each shard holds a piece of a tensor: alignment must not take a piece for a whole (it once paired
    k_proj with shard 0's wq); it leaves them to the recipe, which the plan names."""
    plan = tg.plan(hf_llama(1), shards, align=True)
    assert plan.aligned == {} and plan.transformed == {}
    assert "model.layers.0.self_attn.k_proj.weight" in plan.missing
    assert any("meta-llama-to-hf-llama" in n for n in plan.notes)
