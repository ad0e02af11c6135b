"""Recipe: a timm ``VisionTransformer`` checkpoint (fused ``attn.qkv``) into transformers' ``ViTModel``.

timm's ``Attention`` computes ``qkv(x).reshape(B, N, 3, heads, head_dim)``: the rows of the fused
``blocks.{i}.attn.qkv`` weight (``[3 * D, D]``) and bias (``[3 * D]``) are q, k, v in that order, ``D`` rows
each, every part heads-major like transformers' ``q_proj`` / ``k_proj`` / ``v_proj``. So equal thirds along
dim 0 are the three projections; everything else is a rename. The table is keyed by transformers 5's names
(``layers.{i}.attention.q_proj``, ``layers.{i}.layernorm_before``, ...); a ``ViTForImageClassification``'s
``vit.`` prefix is resolved by the loader, and timm's classifier ``head`` becomes its ``classifier``
(unused by a ``ViTModel``, and reported so).

The other direction, transformers -> timm, is the plan reversed:
``torchgraft.transforms.reverse(plan, model.state_dict())`` concatenates q, k, v back into ``qkv``
(bit-identical for timm -> transformers -> timm).

Set the same LayerNorm epsilon on both sides: timm's default is 1e-6, ``ViTConfig``'s 1e-12.

Example:
    >>> import torchgraft as tg
    >>> from transformers import ViTConfig, ViTModel
    >>> model = ViTModel(ViTConfig(layer_norm_eps=1e-6), add_pooling_layer=False)
    >>> plan = tg.plan(model, "vit_base_patch16_224.safetensors", rules=tg.recipe("timm-vit-to-hf-vit"))
    >>> plan.transformed["layers.0.attention.q_proj.weight"]
    'split(blocks.0.attn.qkv.weight, dim=0, parts=3, index=0)'
    >>> report = tg.load(model, "vit_base_patch16_224.safetensors", plan=plan)
"""

from __future__ import annotations

from typing import Any

from ..transforms import split
from . import Recipe

__all__ = ["RECIPE", "build"]


def build() -> dict[str, Any]:
    """The rules table: checkpoint template -> model name for renames; model template -> expression for q, k, v."""
    return {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj": "embeddings.patch_embeddings.projection",
        "blocks.{}.norm1": "layers.{}.layernorm_before",
        "blocks.{}.attn.proj": "layers.{}.attention.o_proj",
        "blocks.{}.norm2": "layers.{}.layernorm_after",
        "blocks.{}.mlp": "layers.{}.mlp",  # fc1, fc2: same names
        "norm": "layernorm",
        "head": "classifier",
        "layers.{}.attention.{q,k,v}_proj.weight": split("blocks.{}.attn.qkv.weight", dim=0),
        "layers.{}.attention.{q,k,v}_proj.bias": split("blocks.{}.attn.qkv.bias", dim=0),
    }


RECIPE = Recipe(
    name="timm-vit-to-hf-vit",
    source="timm VisionTransformer (fused attn.qkv, blocks.{i}.norm1/norm2, mlp.fc1/fc2)",
    target="transformers 5 ViTModel / ViTForImageClassification (separate q_proj, k_proj, v_proj)",
    params=(),
    build=build,
)
