"""Building a model from a command-line spec: ``package.module:factory`` or ``transformers:ClassName``.

* ``package.module:factory`` with ``--arg key=value``: imports the module (the current directory
  is importable) and calls ``factory(**args)``; a class or any callable returning an ``nn.Module``.
* ``transformers:ClassName`` with ``--config DIR``: reads ``DIR/config.json`` (no download),
  applies ``--arg`` values to the config (``num_labels=2``) and builds the model.
  ``transformers:AutoModelFor...`` classes are built with ``from_config``.

Models are built on the meta device (no memory, no random init) when they allow it: a plan needs
only names and shapes, and :func:`torchgraft.load` materialises what it loads and initialises.
"""

from __future__ import annotations

import ast
import importlib
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import UsageError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ModelSpecError", "build_model", "config_dir", "example_specs", "looks_like_model_spec", "parse_kv"]

logger = logging.getLogger("torchgraft")

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
TRANSFORMERS = "transformers"


class ModelSpecError(UsageError):
    """The model spec cannot be imported, called or configured; the message says what to write."""


def looks_like_model_spec(text: str) -> bool:
    """``pkg.mod:factory`` or ``transformers:Class``, and not an existing path or an ``hf:`` repo."""
    return bool(_SPEC.match(text)) and not text.startswith("hf:") and not Path(text).exists()


def parse_kv(pairs: Iterable[str]) -> dict[str, Any]:
    """``["num_labels=2", "name=tiny", "dims=[1,2]"]`` -> ``{"num_labels": 2, "name": "tiny", "dims": [1, 2]}``.

    Values are Python literals when they parse as one, strings otherwise.

    Raises:
        ModelSpecError: an item without ``=`` or with an empty key.
    """
    out: dict[str, Any] = {}
    for item in pairs:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ModelSpecError(f"--arg {item!r} is not key=value (for example --arg num_classes=2)")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def config_dir(config: str | os.PathLike[str]) -> Path:
    """``--config`` as a local directory (``hf:org/name`` resolved from the cache; a config.json file's folder)."""
    from ..hub import local_path

    path = local_path(config)
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    if not (path / "config.json").is_file():
        raise ModelSpecError(
            f"--config {os.fspath(config)!r}: no config.json there; pass the model directory that holds it"
        )
    return path


def example_specs() -> str:
    """Example ``--model`` specs that work here: only packages that are installed are named."""
    import importlib.util

    examples = []
    if importlib.util.find_spec("torchvision") is not None:
        examples.append("--model torchvision.models:mobilenet_v2")
    else:  # torchgraft's own copy of torchvision's layout: always importable
        examples.append("--model torchgraft.demo.mobilenet_v2:mobilenet_v2")
    if importlib.util.find_spec("transformers") is not None:
        examples.append("--model transformers:BertModel --config DIR")
    examples.append("--model mymodule:make_model (a file mymodule.py in the current folder)")
    return " or ".join(examples)


def build_model(
    spec: str,
    *,
    args: Mapping[str, Any] | None = None,
    config: str | os.PathLike[str] | None = None,
    meta: bool = True,
) -> nn.Module:
    """Build the model a spec names.

    Args:
        spec: ``package.module:factory`` or ``transformers:ClassName``.
        args: keyword arguments for the factory, or config overrides for ``transformers:``.
        config: for ``transformers:``: the directory with ``config.json`` (or ``hf:org/name``).
        meta: build on the meta device when the model allows it (else on the CPU).

    Returns:
        The ``nn.Module``.

    Raises:
        ModelSpecError: a malformed spec, a module or attribute that does not exist, a factory
            that fails or returns something else than an ``nn.Module``, a missing ``--config``.

    Example:
        >>> build_model("transformers:BertForTokenClassification", args={"num_labels": 2}, config="all-MiniLM-L6-v2/")
        >>> build_model("tests.conftest:TinyNet", args={"num_classes": 2})
    """
    if not _SPEC.match(spec):
        raise ModelSpecError(
            f"model spec {spec!r} is not package.module:factory or transformers:ClassName "
            f"(for example {example_specs()})"
        )
    kwargs = dict(args or {})
    module_name, _, attr = spec.partition(":")
    if module_name == TRANSFORMERS:
        factory = _transformers_factory(spec, attr, kwargs, config)
        kwargs = {}
    else:
        if config is not None:
            raise ModelSpecError(
                f"--config is for transformers: specs; pass the factory's arguments with --arg key=value ({spec})"
            )
        factory = _import_factory(spec, module_name, attr)
    return _build(spec, factory, kwargs, meta)


def _import_factory(spec: str, module_name: str, attr: str) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # like `python -m`: modules in the current directory can be named
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelSpecError(
            f"cannot import {module_name!r} for --model {spec}: {e}; check the module path (run from the folder that holds it)"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelSpecError(f"{module_name!r} has no attribute {attr!r} (--model {spec})") from None
    if not callable(obj):
        raise ModelSpecError(f"{spec} is a {type(obj).__name__}, not a class or function that returns a model")
    return obj


def _transformers_factory(
    spec: str, name: str, overrides: dict[str, Any], config: str | os.PathLike[str] | None
) -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelSpecError(f"--model {spec} needs transformers: pip install 'torchgraft[hf]'") from None
    if config is None:
        raise ModelSpecError(
            f"--model {spec} needs --config DIR, the directory that holds config.json (nothing is downloaded)"
        )
    cls = getattr(transformers, name, None)
    if cls is None or not isinstance(cls, type):
        raise ModelSpecError(
            f"transformers has no model class {name!r} (--model {spec}); check the spelling, e.g. BertForTokenClassification"
        )
    directory = config_dir(config)
    auto = name.startswith("Auto")
    config_cls = transformers.AutoConfig if auto else (getattr(cls, "config_class", None) or transformers.AutoConfig)
    try:
        cfg = config_cls.from_pretrained(str(directory), local_files_only=True, **overrides)
    except (OSError, ValueError, TypeError) as e:
        raise ModelSpecError(
            f"cannot read {directory / 'config.json'} as {config_cls.__name__}: {str(e).splitlines()[0]}"
        ) from None
    if auto:
        return lambda: cls.from_config(cfg)
    return lambda: cls(cfg)


def _build(spec: str, factory: Any, kwargs: Mapping[str, Any], meta: bool) -> nn.Module:
    import torch
    from torch import nn

    def call() -> Any:
        try:
            return factory(**kwargs)
        except TypeError as e:
            raise ModelSpecError(f"{spec}({_kw(kwargs)}) failed: {e}; check the --arg names") from None

    model: Any = None
    if meta:
        try:
            with torch.device("meta"):
                model = call()
        except ModelSpecError:
            raise
        except Exception as e:  # noqa: BLE001 - some models compute with real values in __init__
            logger.info("%s cannot be built on the meta device (%s); building it on the CPU", spec, e)
            model = None
    if model is None:
        try:
            model = call()
        except ModelSpecError:
            raise
        except Exception as e:  # noqa: BLE001 - user code: any error becomes one line naming the spec
            raise ModelSpecError(
                f"{spec}({_kw(kwargs)}) failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _kw(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
