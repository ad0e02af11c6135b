"""Fast init: initialise only the modules whose weights are missing, by the model's own rules.

A registry of initialisers, tried in order for each module:

* ``transformers``: the model's ``_init_weights(module)`` (Hugging Face models);
* ``reset_parameters``: the module's own ``reset_parameters()`` (every torch layer);

A module neither knows how to initialise keeps its current values (reported as ``kept``);
tensors materialised from the meta device start at zero rather than uninitialised memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .integrations import hf

__all__ = ["INITIALIZERS", "Initializer", "initialise_module", "register_initializer"]


@dataclass(frozen=True)
class Initializer:
    """``applies(root, module)`` says whether ``run(root, module)`` can initialise ``module``."""

    name: str
    applies: Callable[[nn.Module, nn.Module], bool]
    run: Callable[[nn.Module, nn.Module], None]


INITIALIZERS: list[Initializer] = [
    Initializer(
        "transformers _init_weights",
        lambda root, m: hf.init_weights_fn(root) is not None,
        lambda root, m: root._init_weights(m),
    ),  # type: ignore[operator]
    Initializer(
        "reset_parameters",
        lambda root, m: callable(getattr(m, "reset_parameters", None)),
        lambda root, m: m.reset_parameters(),
    ),  # type: ignore[operator]
]


def register_initializer(init: Initializer, *, first: bool = True) -> None:
    """Teach torchgraft another model family's initialisation."""
    INITIALIZERS[:] = [i for i in INITIALIZERS if i.name != init.name]
    INITIALIZERS.insert(0 if first else len(INITIALIZERS), init)


def initialise_module(root: nn.Module, module: nn.Module) -> str:
    """Initialise ``module`` in place; returns the initialiser's name, or ``"kept"``."""
    for init in INITIALIZERS:
        if init.applies(root, module):
            init.run(root, module)
            return init.name
    return "kept"
