"""Shared fixtures: the real checkpoints (skipped with a clear reason when not installed), tiny models."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from torchgraft.demo import assets


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2: model.safetensors + config.json (BERT, hidden 384, no 'bert.' prefix)."""
    try:
        return assets.minilm_dir()
    except assets.AssetMissing as e:
        pytest.skip(f"real checkpoint not installed: {e}")


@pytest.fixture(scope="session")
def mobilenet_path() -> Path:
    """torchvision's mobilenet_v2-b0353104.pth (legacy, non-zip torch pickle)."""
    try:
        return assets.mobilenet_v2_path()
    except assets.AssetMissing as e:
        pytest.skip(f"real checkpoint not installed: {e}")


@pytest.fixture(scope="session")
def minilm_config(minilm_dir):
    transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")
    return transformers.BertConfig.from_pretrained(minilm_dir)


class TinyNet(nn.Module):
    """conv -> bn -> linear head; small enough for every test."""

    def __init__(self, in_channels: int = 3, num_classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean((2, 3)))


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture(autouse=True)
def _quiet_torchgraft_logs(caplog):
    caplog.set_level(logging.INFO, logger="torchgraft")
    yield
