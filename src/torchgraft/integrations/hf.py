"""Hugging Face transformers models, recognised by their attributes (transformers is not imported).

What the loader takes from them, as ``from_pretrained`` does:
``base_model_prefix`` (add/strip ``bert.``), ``_keys_to_ignore_on_load_missing`` /
``_keys_to_ignore_on_load_unexpected`` (regexes), and ``_init_weights(module)`` to initialise
only the modules whose weights are missing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used, so `import torchgraft` stays light
    from torch import nn


__all__ = [
    "INITIALIZE_WEIGHTS",
    "ModelRenames",
    "base_model_prefix",
    "computes_buffers",
    "conversion_renames",
    "ignore_patterns",
    "init_weights_fn",
    "initialise_tensors",
    "is_hf_model",
]


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


@dataclass
class ModelRenames:
    """What a model's own checkpoint conversion table does to checkpoint names.

    Attributes:
        renamed: checkpoint name -> the name the model uses, for every name the table changed.
        reasons: checkpoint name -> why (``"transformers conversion mapping of ViTModel: ..."``).
        unsupported: checkpoint name -> the tensor operation transformers would run on it
            (``Chunk``, ``Concatenate``, ...), which a rename cannot express.
    """

    renamed: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)


def conversion_renames(model: nn.Module, names: Iterable[str], expected: set[str]) -> ModelRenames:
    """Checkpoint names renamed by the transformers model's own conversion table, as ``from_pretrained`` does.

    transformers 5 saves checkpoints in the original layout (``encoder.layer.0.attention.attention.query``)
    and renames them while loading through ``transformers.conversion_mapping`` (``layers.0.attention.q_proj``).
    That table is transformers' data: it is read through transformers' own functions
    (``get_model_conversion_mapping``, ``rename_source_key``), never copied. transformers 4.x models may
    declare ``_checkpoint_conversion_mapping`` (regex -> replacement, the first match wins), used the same way.

    A name is renamed only when the new name (with or without the base-model prefix) is one the model
    expects and the old one is not, so a checkpoint already in the model's layout is never touched.

    Example:
        >>> conversion_renames(vit_model, ["encoder.layer.0.attention.attention.query.weight"], expected).renamed
        {'encoder.layer.0.attention.attention.query.weight': 'layers.0.attention.q_proj.weight'}
    """
    out = ModelRenames()
    if not is_hf_model(model):
        return out
    prefix = base_model_prefix(model)

    def known(key: str) -> bool:
        if key in expected:
            return True
        if prefix is None:
            return False
        return f"{prefix}.{key}" in expected or (key.startswith(f"{prefix}.") and key[len(prefix) + 1 :] in expected)

    rename = _transformers_renamer(model)
    if rename is None:
        return out
    for name in names:
        if known(name):
            continue
        new, operation = rename(name)
        if operation is not None:
            out.unsupported[name] = operation
        elif new != name and known(new):
            out.renamed[name] = new
            out.reasons[name] = f"transformers conversion mapping of {type(model).__name__}"
    return out


def _transformers_renamer(model: nn.Module) -> Callable[[str], tuple[str, str | None]] | None:
    """``name -> (new name, tensor operation or None)`` from the model's conversion table, if it has one."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4.x
        table = getattr(model, "_checkpoint_conversion_mapping", None) or {}
        compiled = [(re.compile(k), v) for k, v in table.items()]
        if not compiled:
            return None

        def rename_v4(name: str) -> tuple[str, str | None]:
            for pattern, replacement in compiled:
                new, n = pattern.subn(replacement, name)
                if n:
                    return new, None
            return name, None

        return rename_v4

    try:
        transforms = get_model_conversion_mapping(model, add_legacy=False)  # torchgraft has its own legacy rules
    except Exception:  # noqa: BLE001 - a model transformers cannot map: load by names alone
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return None
    ops = {
        pattern: ", ".join(type(op).__name__ for op in getattr(c, "operations", ()) or ()) or type(c).__name__
        for c in converters
        for pattern in c.source_patterns
    }

    def rename_v5(name: str) -> tuple[str, str | None]:
        new, pattern = rename_source_key(name, renamings, converters)
        return new, (None if pattern is None else ops.get(pattern, "a tensor conversion"))

    return rename_v5


#: How :func:`initialise_tensors` reports its work in ``report.initialised``.
INITIALIZE_WEIGHTS = "transformers _init_weights"  # as module by module: the same rules, dispatched as transformers does


def computes_buffers(model: nn.Module) -> bool:
    """True for transformers 5 models, whose ``_init_weights`` recomputes non-persistent buffers (``position_ids``).

    For those, a meta-built model gets such buffers from the model's own rules (as on a CPU build),
    never from a checkpoint that happens to hold them.
    """
    if not is_hf_model(model) or not callable(getattr(model, "initialize_weights", None)):
        return False
    try:
        import transformers.initialization  # noqa: F401
    except ImportError:
        return False
    return True


def initialise_tensors(model: nn.Module, tensors: Iterable[object]) -> bool:
    """Initialise exactly ``tensors`` of a transformers model as ``from_pretrained`` initialises missing keys.

    transformers 5 marks every tensor it loaded with ``_is_hf_initialized`` and then runs
    ``model.initialize_weights()``: each module's ``_init_weights`` bottom-up, the parents' rules
    after their children's (CLIP sets its towers' projections and ``logit_scale`` in the parent's
    rule), sub-models with their own rules, non-persistent buffers recomputed (BERT's
    ``position_ids``), and every ``transformers.initialization`` function skipping marked tensors.
    This does the same with every tensor NOT in ``tensors`` marked, then removes the marks it added.

    Returns False (nothing done) for models that are not transformers 5 models; the caller then
    initialises module by module.

    Example:
        >>> initialise_tensors(clip, [clip.logit_scale])   # logit_scale = config.logit_scale_init_value
        True
    """
    if not computes_buffers(model):  # transformers 5 only: its init functions honour the marks
        return False
    import torch

    chosen = {id(t) for t in tensors}
    marked: list[object] = []
    everything = [*model.parameters(), *model.buffers()]
    modules_before = {id(m): hasattr(m, "_is_hf_initialized") for m in model.modules()}
    try:
        for t in everything:
            if id(t) not in chosen and not getattr(t, "_is_hf_initialized", False):
                t._is_hf_initialized = True  # type: ignore[attr-defined]
                marked.append(t)
        with torch.no_grad():
            model.initialize_weights()  # type: ignore[operator]
    finally:
        for t in marked:
            del t._is_hf_initialized  # type: ignore[attr-defined]
        for t in everything:  # tensors transformers marked itself while initialising them
            if id(t) in chosen and hasattr(t, "_is_hf_initialized"):
                del t._is_hf_initialized  # type: ignore[attr-defined]
        for m in model.modules():
            if not modules_before.get(id(m), True) and "_is_hf_initialized" in m.__dict__:
                del m._is_hf_initialized
    return True
