"""Hugging Face transformers models, recognised by their attributes (transformers is not imported).

What the loader takes from them, as ``from_pretrained`` does:
``base_model_prefix`` (add/strip ``bert.``), ``_keys_to_ignore_on_load_missing`` /
``_keys_to_ignore_on_load_unexpected`` (regexes), and ``_init_weights(module)`` to initialise
only the modules whose weights are missing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used, so `import torchgraft` stays light
    from torch import nn


__all__ = ["base_model_prefix", "ignore_patterns", "init_weights_fn", "is_hf_model"]


def is_hf_model(model: nn.Module) -> bool:
    return (
        hasattr(model, "config")
        and callable(getattr(model, "_init_weights", None))
        and hasattr(model, "base_model_prefix")
    )


def base_model_prefix(model: nn.Module) -> str | None:
    """The attribute that holds the base model (``"bert"``), when the model declares one."""
    prefix = getattr(model, "base_model_prefix", None)
    return prefix if isinstance(prefix, str) and prefix else None


def ignore_patterns(model: nn.Module) -> tuple[list[str], list[str]]:
    """(missing, unexpected) regexes the model declares as expected to differ."""

    def patterns(name: str) -> list[str]:
        value = getattr(model, name, None) or ()
        return [str(p) for p in value]

    return patterns("_keys_to_ignore_on_load_missing"), patterns("_keys_to_ignore_on_load_unexpected")


def init_weights_fn(model: nn.Module) -> Callable[[nn.Module], None] | None:
    """``model._init_weights`` for Hugging Face models: initialises one module in place."""
    if not is_hf_model(model):
        return None
    return model._init_weights  # type: ignore[no-any-return]
