"""``hf:org/name[@revision]`` paths, resolved from a Hugging Face cache laid out in a temporary folder (offline)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import torchgraft as tg
from torchgraft.hub import HubSpec, parse_hub_path, resolve_hub_path

huggingface_hub = pytest.importorskip(
    "huggingface_hub", reason="hf: paths need the hub extra: pip install 'torchgraft[hub]'"
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_cache(cache: Path, repo: str, files: dict[str, bytes], *, commit: str = COMMIT, ref: str = "main") -> Path:
    """The documented cache layout: models--org--name/{blobs/<hash>, refs/<ref>, snapshots/<commit>/<file> -> blob}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return snap


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def weights(tmp_path: Path) -> bytes:
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, tmp_path / "w.safetensors", metadata={"format": "pt"})
    return (tmp_path / "w.safetensors").read_bytes()


def test_parse_hub_path():
    assert parse_hub_path("hf:org/name") == HubSpec("org/name", None)
    assert parse_hub_path("hf:org/name@v1.0") == HubSpec("org/name", "v1.0")
    assert parse_hub_path("hf:gpt2") == HubSpec("gpt2", None)
    assert str(HubSpec("org/name", "main")) == "hf:org/name@main"
    for bad in ("hf:", "hf:org/name@", "hf:a/b/c", "hf:has space"):
        with pytest.raises(tg.CheckpointError, match="is not a Hugging Face repository id"):
            parse_hub_path(bad)


def test_open_resolves_branch_and_commit(hf_cache, tmp_path):
    snap = make_cache(hf_cache, "acme/tiny", {"model.safetensors": weights(tmp_path)})
    assert resolve_hub_path("hf:acme/tiny") == snap
    src = tg.open("hf:acme/tiny")
    assert src.format == "safetensors" and torch.equal(src["w"].load(), torch.arange(6.0).reshape(2, 3))
    assert tg.open(f"hf:acme/tiny@{COMMIT}").path == str(snap / "model.safetensors")


def test_open_resolves_a_tag(hf_cache, tmp_path):
    other = "f" * 40
    make_cache(hf_cache, "acme/tiny", {"model.safetensors": weights(tmp_path)}, commit=other, ref="v2")
    assert resolve_hub_path("hf:acme/tiny@v2").name == other


def test_missing_repo_or_revision_offline(hf_cache, tmp_path):
    make_cache(hf_cache, "acme/tiny", {"model.safetensors": weights(tmp_path)})
    with pytest.raises(
        tg.CheckpointError, match="acme/absent is not in the Hugging Face cache .* HF_HUB_OFFLINE is set"
    ):
        tg.open("hf:acme/absent")
    with pytest.raises(tg.CheckpointError, match="acme/tiny@nope is not in the Hugging Face cache"):
        tg.open("hf:acme/tiny@nope")


def test_scan_and_convert_accept_hf_paths(hf_cache, tmp_path):
    make_cache(hf_cache, "acme/tiny", {"model.safetensors": weights(tmp_path)})
    assert tg.scan("hf:acme/tiny").safe
    r = tg.convert("hf:acme/tiny", tmp_path / "out" / "model.safetensors", dtype="fp16")
    assert tg.open(r.files[0])["w"].dtype == "float16"


def test_without_huggingface_hub(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name.startswith("huggingface_hub"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(tg.CheckpointError, match=r"(?s)huggingface_hub is not installed.*torchgraft\[hub\]"):
        tg.open("hf:acme/tiny")
