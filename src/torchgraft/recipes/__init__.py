"""Recipes: rules tables for loading one codebase's checkpoints into another's models.

A recipe is data: one table of renames and transforms (:mod:`torchgraft.transforms`) for a pair of
codebases, filled from a few numbers of the model (layers, heads). Pass it as ``rules=``; the
other direction is the same plan run backwards (:func:`torchgraft.transforms.reverse`,
``tg.convert(..., plan=plan, reverse=True)``), not a second table.

Example:
    >>> import torchgraft as tg
    >>> rules = tg.recipe("gpt2-to-nanogpt", n_layer=12)
    >>> report = tg.load(nanogpt_model, "gpt2/model.safetensors", rules=rules, strict=True)
    >>> tg.recipes.RECIPES["gpt2-to-nanogpt"].source
    'transformers GPT-2 (GPT2LMHeadModel, Conv1D)'

Each recipe is a module of this package with a module-level ``RECIPE``; adding one is a module
and a line in :data:`_MODULES`, and a test loading real module code on both sides.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import PlanError

__all__ = ["RECIPES", "Recipe", "recipe"]


@dataclass(frozen=True)
class Recipe:
    """A rules table for one pair of codebases, built from the model's numbers.

    Attributes:
        name: what :func:`recipe` takes (``"gpt2-to-nanogpt"``).
        source: the checkpoints it reads, in words.
        target: the models it fills, in words.
        params: the numbers :attr:`build` needs (``("n_layer",)``).
        build: ``build(**params)`` -> a ``rules=`` table (renames and transforms).
    """

    name: str
    source: str
    target: str
    params: tuple[str, ...]
    build: Callable[..., dict[str, Any]]


#: Recipe modules of this package, one line each.
_MODULES: tuple[str, ...] = (
    "meta_llama_hf",
    "timm_vit_hf",
    "moe_experts",
)


def _load_all() -> dict[str, Recipe]:
    found: dict[str, Recipe] = {}
    for module in _MODULES:
        r: Recipe = importlib.import_module(f".{module}", __name__).RECIPE
        found[r.name] = r
    return found


class _Registry(Mapping[str, Recipe]):
    """Name -> :class:`Recipe`, the modules imported on first look."""

    _found: dict[str, Recipe] | None = None

    def _all(self) -> dict[str, Recipe]:
        if self._found is None:
            self._found = _load_all()
        return self._found

    def __getitem__(self, name: str) -> Recipe:
        return self._all()[name]

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


RECIPES: Mapping[str, Recipe] = _Registry()


def recipe(name: str, /, **params: Any) -> dict[str, Any]:
    """The rules table of recipe ``name`` for a model with these numbers.

    Raises:
        PlanError: an unknown recipe (the known ones are listed) or missing / unknown parameters.

    Example:
        >>> rules = tg.recipe("meta-llama-to-hf-llama", n_layers=32, n_heads=32, n_kv_heads=8, n_shards=2)
    """
    if name not in RECIPES:
        raise PlanError(f"no recipe {name!r}; known: {', '.join(sorted(RECIPES)) or 'none'}")
    r = RECIPES[name]
    if missing := [p for p in r.params if p not in params]:
        raise PlanError(f"recipe {name!r} needs {', '.join(missing)} (it takes {', '.join(r.params)})")
    accepted = inspect.signature(r.build).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()) and (unknown := sorted(set(params) - set(accepted))):
        raise PlanError(f"recipe {name!r} takes {', '.join(accepted) or 'no parameters'}, not {', '.join(unknown)}")
    return r.build(**params)
