"""Meta's Llama checkpoints (``consolidated.NN.pth`` tensor-parallel shards) -> transformers' Llama (GQA).

Meta's code (fairscale model parallelism) splits each weight across the model-parallel ranks: the
column-parallel ones (``wq wk wv w1 w3 output``) by rows (dim 0), the row-parallel ones (``wo w2``)
and the ``ParallelEmbedding`` (``tok_embeddings``, Llama 1/2) by columns (dim 1); Llama 3's
``VocabParallelEmbedding`` by rows. 1-D norms are replicated in every shard. Meta also lays out each
head's q and k rows for rotary embeddings as interleaved pairs (2i, 2i+1), transformers as halves
(i, i + head_dim/2). The merge rule is the one Meta's own converter
(transformers' ``convert_llama_weights_to_hf.py``) and tinygrad use; replicated tensors are
checked equal and taken once (``same``), and q and k are un-permuted per head, k with its own
(key/value) head count under grouped-query attention.

The shards open as one source whose keys are qualified by the file's stem
(``consolidated.00/layers.0.attention.wq.weight``, see ``torchgraft.sources.meta_shards``); one
unsharded ``consolidated.00.pth`` opened as a file has plain keys (``n_shards=1``).

Example:
    >>> rules = tg.recipe("meta-llama-to-hf-llama", n_heads=32, n_kv_heads=8, n_shards=1, embedding_split=0)
    >>> report = tg.load(LlamaForCausalLM(config), "Meta-Llama-3-8B/consolidated.00.pth", rules=rules, strict=True)
    >>> rules = tg.recipe("meta-llama-to-hf-llama", n_heads=40, n_kv_heads=40, n_shards=2)
    >>> plan = tg.plan(model, "llama-2-13b/", rules=rules)       # consolidated.00.pth, consolidated.01.pth
"""

from __future__ import annotations

from typing import Any

from ..errors import PlanError
from ..transforms import Expr, concat, rope_permute, same, source
from . import Recipe

__all__ = ["RECIPE", "build"]


def _check(n_heads: int, n_kv_heads: int, n_shards: int, embedding_split: int, optional: dict[str, Any]) -> None:
    numbers = {"n_heads": n_heads, "n_kv_heads": n_kv_heads, "n_shards": n_shards, **optional}
    bad = [f"{k}={v!r}" for k, v in numbers.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise PlanError(f"recipe 'meta-llama-to-hf-llama': {', '.join(bad)}: each must be a positive integer")
    dim = optional.get("dim")
    if dim is not None and (dim % n_heads or (dim // n_heads) % 2):
        raise PlanError(
            f"recipe 'meta-llama-to-hf-llama': dim={dim} is not n_heads={n_heads} heads of an even size (rotary pairs)"
        )
    if n_heads % n_kv_heads:
        raise PlanError(
            f"recipe 'meta-llama-to-hf-llama': n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}"
        )
    if n_heads % n_shards or n_kv_heads % n_shards:
        raise PlanError(
            f"recipe 'meta-llama-to-hf-llama': n_shards={n_shards} does not divide n_heads={n_heads} and "
            f"n_kv_heads={n_kv_heads} (Meta's model parallelism gives each shard whole heads)"
        )
    if embedding_split not in (0, 1):
        raise PlanError(f"recipe 'meta-llama-to-hf-llama': embedding_split={embedding_split!r} is not 0 (Llama 3) or 1")


def build(
    n_heads: int,
    n_kv_heads: int,
    n_shards: int,
    *,
    n_layers: int | None = None,
    dim: int | None = None,
    embedding_split: int = 1,
) -> dict[str, Expr | None]:
    """The rules that load Meta's Llama checkpoint into ``transformers.LlamaForCausalLM``.

    Args:
        n_heads, n_kv_heads: attention heads and key/value heads, as in Meta's ``params.json``
            (where ``n_kv_heads`` is absent, it equals ``n_heads``: pass it so). Required: the two
            rotary layouts have the same shapes, so a wrong head count would go unnoticed by the plan.
        n_shards: how many ``consolidated.NN.pth`` files (model-parallel ranks); 1 for one file opened directly.
        n_layers, dim: optional, checked when given (``params.json``'s numbers can be passed as they are).
        embedding_split: the dim ``tok_embeddings`` was split on: 1 (Llama 1/2, ``ParallelEmbedding``),
            0 (Llama 3, ``VocabParallelEmbedding``).

    Returns:
        A rules table for ``tg.load(..., rules=)``: model key -> expression over the shards' keys
        (``{}`` = the layer number); Llama 1's precomputed ``rope.freqs`` dropped.

    Raises:
        PlanError: numbers that no Llama checkpoint has (heads that do not divide ``dim`` or the shards).
    """
    optional = {k: v for k, v in (("n_layers", n_layers), ("dim", dim)) if v is not None}
    _check(n_heads, n_kv_heads, n_shards, embedding_split, optional)

    def pieces(key: str) -> list[str]:
        return [key] if n_shards == 1 else [f"consolidated.{rank:02d}/{key}" for rank in range(n_shards)]

    def cat(key: str, dim: int) -> Expr:  # split across the ranks on ``dim``
        return source(key) if n_shards == 1 else concat(*pieces(key), dim=dim)

    def once(key: str) -> Expr:  # replicated in every rank: checked equal, taken once
        return source(key) if n_shards == 1 else same(*pieces(key))

    return {
        "model.embed_tokens.weight": cat("tok_embeddings.weight", dim=embedding_split),
        "model.layers.{}.self_attn.q_proj.weight": rope_permute(
            cat("layers.{}.attention.wq.weight", dim=0), heads=n_heads, to="half"
        ),
        "model.layers.{}.self_attn.k_proj.weight": rope_permute(
            cat("layers.{}.attention.wk.weight", dim=0), heads=n_kv_heads, to="half"
        ),
        "model.layers.{}.self_attn.v_proj.weight": cat("layers.{}.attention.wv.weight", dim=0),
        "model.layers.{}.self_attn.o_proj.weight": cat("layers.{}.attention.wo.weight", dim=1),
        "model.layers.{}.mlp.gate_proj.weight": cat("layers.{}.feed_forward.w1.weight", dim=0),
        "model.layers.{}.mlp.down_proj.weight": cat("layers.{}.feed_forward.w2.weight", dim=1),
        "model.layers.{}.mlp.up_proj.weight": cat("layers.{}.feed_forward.w3.weight", dim=0),
        "model.layers.{}.input_layernorm.weight": once("layers.{}.attention_norm.weight"),
        "model.layers.{}.post_attention_layernorm.weight": once("layers.{}.ffn_norm.weight"),
        "model.norm.weight": once("norm.weight"),
        "lm_head.weight": cat("output.weight", dim=0),
        **dict.fromkeys(pieces("rope.freqs")),  # Llama 1's rotary table: transformers computes its own
    }


RECIPE = Recipe(
    name="meta-llama-to-hf-llama",
    source="Meta's Llama checkpoints (consolidated.NN.pth tensor-parallel shards, interleaved rotary q/k)",
    target="transformers' Llama (LlamaForCausalLM; grouped-query attention, half-split rotary q/k)",
    params=("n_heads", "n_kv_heads", "n_shards"),
    build=build,
)
