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


def meta_split(full: dict[str, torch.Tensor], n_shards: int) -> dict[str, torch.Tensor]:
    """Meta's model-parallel pieces, keyed ``consolidated.NN/<key>`` as the shards' reader names them."""
    out = {}
    for key, w in full.items():
        split = SPLIT_DIM[key.split(".", 2)[-1] if key.startswith("layers.") else key]
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
