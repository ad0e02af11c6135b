"""What a model expects: its state-dict entries, tied groups, non-persistent buffers, module types.

Computed once from ``model.state_dict(keep_vars=True)`` (cheap: references, no copies; works on
the meta device).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .keys import layout_fingerprint, split_key
from .sources.base import dtype_name

if TYPE_CHECKING:  # torch is imported where it is used, so `import torchgraft` stays light
    import torch
    from torch import nn

__all__ = ["TargetInfo", "TargetView", "runs_own_loading_code"]


def runs_own_loading_code(module: nn.Module) -> bool:
    """True when ``load_state_dict`` runs code of the module's own on it: a custom ``_load_from_state_dict``
    (not torch's, nor BatchNorm's version hook) or a load pre-hook (lazy modules, old ``spectral_norm``)."""
    from torch import nn
    from torch.nn.modules.batchnorm import _NormBase

    stock = (nn.Module._load_from_state_dict, _NormBase._load_from_state_dict)
    return type(module)._load_from_state_dict not in stock or bool(module._load_state_dict_pre_hooks)


@dataclass(frozen=True)
class TargetInfo:
    """One model entry: its shape (``()`` and ``lazy`` when a lazy module was never run), dtype, on meta or not."""

    shape: tuple[int, ...]
    dtype: str
    meta: bool
    lazy: bool = False


@dataclass
class TargetView:
    """The model's side of a plan.

    Attributes:
        entries: state-dict names in model order -> shape, dtype, on meta or not; the
            uninitialised parameters of lazy modules (``nn.LazyLinear`` never run) have no shape
            yet: ``lazy``, and the plan takes the checkpoint's shape, as torch's lazy load hook does.
        tied: name -> the first name holding the same tensor (only for the later names).
        nonpersistent: buffers the model computes itself and does not save (``position_ids``).
        modules: module path -> module, for hooks and initialisation.
        tensors: name -> the model's tensor now (entries and non-persistent buffers), by reference.
    """

    entries: dict[str, TargetInfo]
    tied: dict[str, str]
    nonpersistent: dict[str, TargetInfo]
    modules: dict[str, nn.Module] = field(repr=False)
    tensors: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module) -> TargetView:
        import torch
        from torch.nn.parameter import is_lazy

        modules = dict(model.named_modules(remove_duplicate=False))
        state = model.state_dict(keep_vars=True)
        entries: dict[str, TargetInfo] = {}
        tensors: dict[str, torch.Tensor] = {}
        first_by_id: dict[int, str] = {}
        tied: dict[str, str] = {}
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):  # _extra_state objects
                continue
            tensors[name] = t
            if is_lazy(t):
                entries[name] = TargetInfo((), dtype_name(t.dtype), t.device.type == "meta", lazy=True)
                continue
            entries[name] = TargetInfo(tuple(t.shape), dtype_name(t.dtype), t.device.type == "meta")
            owner = first_by_id.setdefault(id(t), name)
            if owner != name:
                tied[name] = owner
        nonpersistent: dict[str, TargetInfo] = {}
        for path, module in modules.items():
            for bname in getattr(module, "_non_persistent_buffers_set", ()):
                b = module._buffers.get(bname)
                if b is not None and not is_lazy(b):
                    key = f"{path}.{bname}" if path else bname
                    nonpersistent[key] = TargetInfo(tuple(b.shape), dtype_name(b.dtype), b.device.type == "meta")
                    tensors[key] = b
        return cls(entries, tied, nonpersistent, modules, tensors)

    def module_of(self, key: str) -> nn.Module:
        return self.modules[split_key(key)[0]]

    def fingerprint(self) -> str:
        """Hash of names and shapes (not dtypes, not values)."""
        return layout_fingerprint((name, info.shape) for name, info in self.entries.items())
