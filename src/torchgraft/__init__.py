"""torchgraft: load pretrained weights from any common checkpoint into any PyTorch model.

    >>> import torchgraft as tg
    >>> src = tg.open("all-MiniLM-L6-v2/")          # lazy: names, shapes, dtypes
    >>> plan = tg.plan(model, src)                   # dry run, nothing loaded
    >>> report = tg.load(model, src)                 # one pass, transactional
    >>> print(report)

The public names are re-exported here; torch is imported only when a function needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .convert import convert  # torch-free at import, like diff and scan; bound here for the same reason
from .diff import diff
from .errors import AdapterError, CheckpointError, LoadError, PlanError, UnsafeCheckpointError
from .plan import Entry, Plan, plan  # torch-free at import; binding the names here keeps `tg.plan` the function
from .recipes import recipe
from .transforms import concat, permute, reshape, rope_permute, same, slice, split, stack, transpose, unstack
from .scan import scan
from .sources import Source, TensorRef
from .sources import open as open

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "CheckpointError",
    "Entry",
    "LoadError",
    "LoadReport",
    "Plan",
    "PlanError",
    "Source",
    "TensorRef",
    "UnsafeCheckpointError",
    "concat",
    "permute",
    "recipe",
    "recipes",
    "reshape",
    "rope_permute",
    "same",
    "slice",
    "split",
    "stack",
    "transforms",
    "transpose",
    "unstack",
    "__version__",
    "adapters",
    "convert",
    "diff",
    "load",
    "open",
    "plan",
    "scan",
    "surgery",
]

from . import recipes, transforms  # torch-free at import

if TYPE_CHECKING:
    from . import adapters, surgery
    from .apply import load
    from .report import LoadReport

_LAZY = {
    "load": ("apply", "load"),
    "LoadReport": ("report", "LoadReport"),
    "surgery": ("surgery", ""),  # "" = the module itself
    "adapters": ("adapters", ""),
}


def __getattr__(name: str) -> Any:
    """Import torch-heavy parts on first use, so ``import torchgraft`` stays fast."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        imported = importlib.import_module(f".{module}", __name__)
        value = getattr(imported, attr) if attr else imported
        globals()[name] = value
        return value
    raise AttributeError(f"module 'torchgraft' has no attribute {name!r}")
