"""Recipe: per-expert Mixtral MoE weights (``block_sparse_moe.experts.{e}.w1/w2/w3``) into stacked experts.

The original Mixtral checkpoints hold one ``nn.Linear`` per expert: ``w1`` (gate, ``[I, H]``), ``w3`` (up,
``[I, H]``) and ``w2`` (down, ``[H, I]``), plus the router ``block_sparse_moe.gate`` (``[E, H]``).
transformers 5's ``MixtralExperts`` keeps all experts of a layer in two tensors:
``mlp.experts.gate_up_proj`` ``[E, 2 * I, H]`` (per expert, the gate rows then the up rows: its forward
splits the projection in two halves, gate then up) and ``mlp.experts.down_proj`` ``[E, H, I]``. So
``gate_up_proj = concat(stack(w1 of every expert), stack(w3 of every expert), dim=1)`` and
``down_proj = stack(w2 of every expert)``, the router is a rename; this is what transformers' own
conversion table for ``mixtral`` does while loading (``MergeModulelist(dim=0)`` then ``Concatenate(dim=1)``).

The other direction, stacked -> per-expert, is the plan reversed: ``torchgraft.transforms.reverse(plan,
model.state_dict())`` unstacks and splits back into ``experts.{e}.w1/w2/w3`` (bit-identical both ways).

Example:
    >>> import torchgraft as tg
    >>> from transformers import MixtralConfig, MixtralForCausalLM
    >>> model = MixtralForCausalLM(config)            # config.num_local_experts == 8
    >>> rules = tg.recipe("mixtral-experts-to-stacked", num_experts=8)
    >>> plan = tg.plan(model, "mixtral-per-expert/", rules=rules)
    >>> plan.transformed["model.layers.0.mlp.experts.down_proj"]   # abridged: experts 0 to 7
    'stack(model.layers.0.block_sparse_moe.experts.0.w2.weight, ..., dim=0)'
    >>> report = tg.load(model, "mixtral-per-expert/", plan=plan)
    >>> per_expert = torchgraft.transforms.reverse(plan, model.state_dict())   # back to w1/w2/w3
"""

from __future__ import annotations

from typing import Any

from ..transforms import concat, stack
from . import Recipe

__all__ = ["RECIPE", "build"]


def build(*, num_experts: int) -> dict[str, Any]:
    """The rules table for ``num_experts`` experts per layer (``config.num_local_experts``)."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int (config.num_local_experts), got {num_experts!r}")
    experts = "model.layers.{}.block_sparse_moe.experts"
    w1 = [f"{experts}.{e}.w1.weight" for e in range(num_experts)]
    w2 = [f"{experts}.{e}.w2.weight" for e in range(num_experts)]
    w3 = [f"{experts}.{e}.w3.weight" for e in range(num_experts)]
    return {
        "model.layers.{}.block_sparse_moe.gate": "model.layers.{}.mlp.gate",
        "model.layers.{}.mlp.experts.gate_up_proj": concat(stack(*w1, dim=0), stack(*w3, dim=0), dim=1),
        "model.layers.{}.mlp.experts.down_proj": stack(*w2, dim=0),
    }


RECIPE = Recipe(
    name="mixtral-experts-to-stacked",
    source="Mixtral per-expert checkpoint (block_sparse_moe.experts.{e}.w1/w2/w3, one nn.Linear each)",
    target="transformers 5 MixtralForCausalLM (mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I])",
    params=("num_experts",),
    build=build,
)
