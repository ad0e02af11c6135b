"""Model surgery: swap a model's first conv or its classifier for one with other sizes.

By hand that is ``model.features[0][0] = nn.Conv2d(1, 32, ...)``; these helpers find
the module from known conventions, build its replacement with the same settings, device and
dtype, keep the model's bookkeeping in step (Hugging Face ``config.num_channels`` /
``config.num_labels``, ``model.num_labels``, timm ``num_classes``), and say what they changed.
Then ``tg.load(model, checkpoint, adapt="auto")`` adapts the pretrained weights to it.

How the module is found, first match wins:

==============================  =====================================  ==================================
                                first conv                             classifier
==============================  =====================================  ==================================
``path=``                       that module                            that module
timm ``pretrained_cfg``         ``first_conv``                         ``classifier``
Hugging Face ``config``         first conv with ``num_channels`` in    last Linear with ``num_labels`` out
known names (torchvision, ...)  :data:`INPUT_CONV_NAMES`               :data:`HEAD_NAMES`
fallback                        first conv in registration order       last Linear in registration order
==============================  =====================================  ==================================

Example:
    >>> model = mobilenet_v2()                               # 3 channels, 1000 classes
    >>> print(tg.surgery.replace_input_conv(model, 1))
    features.0.0: Conv2d(3, 32, ...) -> Conv2d(1, 32, ...) (torchvision name 'features.0.0')
    >>> tg.surgery.replace_head(model, 2).path
    'classifier.1'
    >>> report = tg.load(model, "mobilenet_v2-b0353104.pth", adapt="auto")
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .adapters.channels import ChannelMethod, input_channels

__all__ = [
    "HEAD_NAMES",
    "INPUT_CONV_NAMES",
    "Found",
    "Replaced",
    "SurgeryError",
    "find_head",
    "find_input_conv",
    "replace_head",
    "replace_input_conv",
]

logger = logging.getLogger("torchgraft")

#: Paths of first convs in well-known model families (tried after timm / Hugging Face metadata).
INPUT_CONV_NAMES: dict[str, str] = {
    "features.0.0": "torchvision MobileNet/EfficientNet",
    "conv1": "torchvision ResNet",
    "features.conv0": "torchvision DenseNet",
    "conv_proj": "torchvision ViT",
    "stem.0": "torchvision RegNet / ConvNeXt",
    "features.0": "torchvision VGG/AlexNet/SqueezeNet",
    "conv_stem": "timm EfficientNet",
    "patch_embed.proj": "timm ViT",
    "stem.conv": "timm",
}

#: Paths of final classifiers in well-known model families.
HEAD_NAMES: dict[str, str] = {
    "classifier.1": "torchvision MobileNetV2/EfficientNet",
    "classifier.3": "torchvision MobileNetV3",
    "classifier.6": "torchvision VGG/AlexNet",
    "fc": "torchvision ResNet",
    "heads.head": "torchvision ViT",
    "classifier": "torchvision DenseNet / Hugging Face",
    "head.fc": "timm",
    "head": "timm",
}


class SurgeryError(ValueError):
    """The module to replace cannot be found, or cannot be replaced safely."""


@dataclass(frozen=True)
class Found:
    """A module located by :func:`find_input_conv` / :func:`find_head`, and how it was found."""

    path: str
    module: nn.Module
    found_by: str


@dataclass(frozen=True)
class Replaced:
    """What a surgery helper changed: ``model.get_submodule(path)`` is now ``new``.

    Attributes:
        path: the module's path in the model.
        old, new: the module before and after.
        found_by: how the module was located (``"torchvision name 'features.0.0'"``, ...).
        updated: other attributes kept in step (``"config.num_labels: 1000 -> 2"``).
    """

    path: str
    old: nn.Module
    new: nn.Module
    found_by: str
    updated: tuple[str, ...] = ()

    def __str__(self) -> str:
        extra = f"; also {', '.join(self.updated)}" if self.updated else ""
        return f"{self.path}: {self.old} -> {self.new} ({self.found_by}){extra}"


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, _ConvNd) and not m.transposed


def _is_head(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or _is_conv(m)


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _cfg_paths(model: nn.Module, key: str) -> list[str]:
    """timm's ``pretrained_cfg[key]`` (a name or a tuple of names)."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, Mapping) and cfg.get(key):
            value = cfg[key]
            return [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]
    return []


def _config_int(model: nn.Module, key: str) -> int | None:
    config = getattr(model, "config", None)
    value = getattr(config, key, None) if config is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _explicit(model: nn.Module, path: str, check, what: str) -> Found:
    module = _get(model, path)
    if module is None:
        raise SurgeryError(f"{type(model).__name__} has no module {path!r}")
    if not check(module):
        raise SurgeryError(f"{path!r} is a {type(module).__name__}, not a {what}")
    return Found(path, module, f"path={path!r}")


def find_input_conv(model: nn.Module, *, path: str | None = None) -> Found | None:
    """Locate the first convolution (the one that sees the input image).

    Args:
        model: any ``nn.Module`` (may live on the meta device).
        path: use this module (checked to be a convolution).

    Returns:
        A :class:`Found`, or ``None`` when the model has no convolution.

    Raises:
        SurgeryError: ``path`` does not exist or is not a convolution.

    Example:
        >>> find_input_conv(mobilenet_v2()).path
        'features.0.0'
    """
    if path is not None:
        return _explicit(model, path, _is_conv, "convolution")
    for p in _cfg_paths(model, "first_conv"):
        m = _get(model, p)
        if m is not None and _is_conv(m):
            return Found(p, m, f"timm pretrained_cfg['first_conv'] = {p!r}")
    channels = _config_int(model, "num_channels")
    if channels is not None:
        for p, m in model.named_modules():
            if _is_conv(m) and m.in_channels == channels:
                return Found(p, m, f"Hugging Face config.num_channels = {channels}")
    for p, family in INPUT_CONV_NAMES.items():
        m = _get(model, p)
        if m is not None and _is_conv(m):
            return Found(p, m, f"{family} name {p!r}")
    for p, m in model.named_modules():
        if _is_conv(m):
            return Found(p, m, "first convolution in registration order")
    return None


def find_head(model: nn.Module, *, path: str | None = None) -> Found | None:
    """Locate the final classifier (a Linear, or a 1x1 convolution).

    Args:
        model: any ``nn.Module`` (may live on the meta device).
        path: use this module (checked to be a Linear or a convolution).

    Returns:
        A :class:`Found`, or ``None`` when the model has no Linear layer.

    Raises:
        SurgeryError: ``path`` does not exist or is neither a Linear nor a convolution.

    Example:
        >>> find_head(mobilenet_v2()).path
        'classifier.1'
    """
    if path is not None:
        return _explicit(model, path, _is_head, "Linear or convolution")
    for p in _cfg_paths(model, "classifier"):
        m = _get(model, p)
        if m is not None and _is_head(m):
            return Found(p, m, f"timm pretrained_cfg['classifier'] = {p!r}")
    labels = _config_int(model, "num_labels")
    if labels is not None:
        last = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == labels]
        if last:
            p, m = last[-1]
            return Found(p, m, f"Hugging Face config.num_labels = {labels}")
    for p, family in HEAD_NAMES.items():
        m = _get(model, p)
        if m is not None and _is_head(m):
            return Found(p, m, f"{family} name {p!r}")
    linears = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        p, m = linears[-1]
        return Found(p, m, "last Linear in registration order")
    return None


def _factory(old: nn.Module) -> dict[str, object]:
    weight = old.weight
    return {"device": weight.device, "dtype": weight.dtype}


def _check_not_shared(model: nn.Module, path: str, module: nn.Module) -> None:
    own = {id(p) for p in module.parameters(recurse=False)}
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = name.rpartition(".")[0]
        if id(p) in own and owner != path:
            raise SurgeryError(
                f"{path!r} shares its weights with {name!r} (tied); replacing it would untie them. "
                "Untie them first (config.tie_word_embeddings=False) or replace both"
            )


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def _new_conv(old: _ConvNd, *, in_channels: int | None = None, out_channels: int | None = None) -> _ConvNd:
    return type(old)(
        in_channels if in_channels is not None else old.in_channels,
        out_channels if out_channels is not None else old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        **_factory(old),
    )


def _retrain(new: nn.Module, old: nn.Module) -> None:
    new.train(old.training)
    for p_new, p_old in zip(new.parameters(), old.parameters()):
        p_new.requires_grad_(p_old.requires_grad)


def _update_int(obj: object, attr: str, old: int, new: int, label: str, log: list[str]) -> None:
    value = getattr(obj, attr, None)
    if isinstance(value, int) and not isinstance(value, bool) and value == old and value != new:
        setattr(obj, attr, new)
        log.append(f"{label}: {old} -> {new}")


def _ancestors(model: nn.Module, path: str) -> Iterable[tuple[str, nn.Module]]:
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        p = ".".join(parts[:i])
        yield p, model.get_submodule(p) if p else model


def replace_input_conv(
    model: nn.Module,
    in_channels: int,
    *,
    path: str | None = None,
    method: ChannelMethod | None = None,
) -> Replaced:
    """Give the model's first convolution ``in_channels`` input channels (e.g. 1 for grey images).

    The new convolution has the old one's class, out channels, kernel, stride, padding,
    dilation, bias, padding mode, device (meta included) and dtype. Hugging Face models get
    ``config.num_channels`` and any ``num_channels`` attribute on the conv's parents (ViT's
    patch embedding checks it) updated.

    Args:
        model: the model, changed in place.
        in_channels: the new number of input channels.
        path: the module to replace, instead of finding it.
        method: ``None``: the new conv is freshly initialised (its weights usually come next
            from ``tg.load(..., adapt="auto")``); or ``"sum"``, ``"mean"``, ``"luminance"``,
            ``"repeat"``: compute its weight from the current one with
            :func:`torchgraft.adapters.input_channels` (for a model that already holds
            pretrained weights).

    Returns:
        :class:`Replaced`: the path, old and new module, how it was found. Also logged at
        INFO level on the ``torchgraft`` logger.

    Raises:
        SurgeryError: no convolution found, ``path`` invalid, a grouped convolution, or
            weights shared with another module.
        AdapterError: ``method`` cannot map the old channels to ``in_channels``.

    Example:
        >>> model = mobilenet_v2()
        >>> replace_input_conv(model, 1).path
        'features.0.0'
        >>> model.features[0][0].in_channels
        1
    """
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise SurgeryError(f"in_channels must be a positive int, got {in_channels!r}")
    found = find_input_conv(model, path=path)
    if found is None:
        raise SurgeryError(f"{type(model).__name__} has no convolution; pass path= to name the input layer")
    old = found.module
    assert isinstance(old, _ConvNd)
    if old.groups != 1:
        raise SurgeryError(
            f"{found.path!r} is a grouped convolution (groups={old.groups}); changing its input channels would change "
            "the grouping. Pass path= to choose another module"
        )
    _check_not_shared(model, found.path, old)
    new = _new_conv(old, in_channels=in_channels)
    _retrain(new, old)
    if method is not None:  # before anything changes: an AdapterError leaves the model as it was
        adapted = input_channels(old.weight.detach(), in_channels, method=method)
        if not new.weight.is_meta:
            with torch.no_grad():
                new.weight.copy_(adapted)
                if old.bias is not None:
                    new.bias.copy_(old.bias)
    _set(model, found.path, new)
    updated: list[str] = []
    config = getattr(model, "config", None)
    if config is not None:
        _update_int(config, "num_channels", old.in_channels, in_channels, "config.num_channels", updated)
    for p, m in _ancestors(model, found.path):
        _update_int(
            m, "num_channels", old.in_channels, in_channels, f"{p or type(model).__name__}.num_channels", updated
        )
    result = Replaced(found.path, old, new, found.found_by, tuple(updated))
    logger.info("replaced the input convolution %s", result)
    return result


def replace_head(
    model: nn.Module,
    num_classes: int,
    *,
    path: str | None = None,
) -> Replaced:
    """Give the model's final classifier ``num_classes`` outputs.

    The new layer has the old one's class, input features, bias, device (meta included) and
    dtype, and is initialised by the model's own rules when it has them (Hugging Face
    ``_init_weights``), by the layer's ``reset_parameters()`` otherwise. Bookkeeping kept in
    step: Hugging Face ``config.num_labels`` and ``model.num_labels``, timm ``num_classes``.

    Args:
        model: the model, changed in place.
        num_classes: the new number of outputs.
        path: the module to replace, instead of finding it.

    Returns:
        :class:`Replaced`: the path, old and new module, how it was found. Also logged at
        INFO level on the ``torchgraft`` logger.

    Raises:
        SurgeryError: no classifier found, ``path`` invalid, or weights shared with another
            module (a tied language-model head).

    Example:
        >>> model = mobilenet_v2()
        >>> replace_head(model, 2).new
        Linear(in_features=1280, out_features=2, bias=True)
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise SurgeryError(f"num_classes must be a positive int, got {num_classes!r}")
    found = find_head(model, path=path)
    if found is None:
        raise SurgeryError(f"{type(model).__name__} has no Linear layer; pass path= to name the classifier")
    old = found.module
    _check_not_shared(model, found.path, old)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None, **_factory(old))  # type: ignore[arg-type]
        old_n = old.out_features
    else:
        assert isinstance(old, _ConvNd)
        new = _new_conv(old, out_channels=num_classes)
        old_n = old.out_channels
    _retrain(new, old)
    init = getattr(model, "_init_weights", None)
    if callable(init) and getattr(model, "config", None) is not None and not new.weight.is_meta:
        with torch.no_grad():
            init(new)
    _set(model, found.path, new)
    updated: list[str] = []
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_labels", None) == old_n and old_n != num_classes:
        config.num_labels = num_classes
        updated.append(f"config.num_labels: {old_n} -> {num_classes}")
    _update_int(model, "num_labels", old_n, num_classes, "num_labels", updated)
    _update_int(model, "num_classes", old_n, num_classes, "num_classes", updated)
    result = Replaced(found.path, old, new, found.found_by, tuple(updated))
    logger.info("replaced the classifier %s", result)
    return result
