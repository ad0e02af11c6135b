"""Fidelity with the reference loaders (issue 13): the oracle (torch's load_state_dict) runs in each test."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import torchgraft as tg
from tests.conftest import TinyNet


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_empty_state_dict_loads_like_torch(tmp_path, legacy):
    f = tmp_path / "relu.pt"
    torch.save(nn.ReLU().state_dict(), f, _use_new_zipfile_serialization=not legacy)
    oracle = nn.ReLU().load_state_dict(torch.load(f, weights_only=True), strict=True)
    report = tg.load(nn.ReLU(), f, strict=True)
    assert (report.missing, report.unexpected) == (oracle.missing_keys, oracle.unexpected_keys) == ([], [])
    assert len(tg.open(f)) == 0


def _counts_add_up(plan: tg.Plan, report: tg.LoadReport) -> None:
    s = plan.summary()
    reinit = len(report.reinitialised)
    defaults = sum(e.action == "default" for e in plan.entries.values())
    ignored_model = len(plan.missing_ignored)
    parts = s["loaded"] + (s["adapted"] - reinit) + reinit + s["missing"] + s["mismatched"] + s["tied"]
    assert parts + defaults + ignored_model == len(plan.entries)
    assert (len(report.loaded), len(report.adapted), len(report.missing)) == (s["loaded"], s["adapted"], s["missing"])
    d = report.to_dict()
    assert (len(d["loaded"]), len(d["adapted"])) == (s["loaded"], s["adapted"])
    assert set(report.loaded).isdisjoint(report.adapted)


def test_an_adapted_entry_is_counted_once():
    src = TinyNet().state_dict()
    model = TinyNet(in_channels=1)
    plan = tg.plan(model, src, adapt="auto")
    report = tg.load(model, src, adapt="auto")
    assert list(report.adapted) == ["conv.weight"] and "conv.weight" not in report.loaded
    _counts_add_up(plan, report)
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in str(report).splitlines() if line.count("│") >= 3}
    assert rows["loaded"] == str(len(report.loaded)) and rows["adapted"] == "1"


def test_report_never_claims_every_checkpoint_weight_was_used_when_some_were_dropped(caplog):
    src = {**TinyNet().state_dict(), "aux.weight": torch.ones(2)}
    model = TinyNet()
    with caplog.at_level(logging.INFO, logger="torchgraft"):
        report = tg.load(model, src, rules={"aux.weight": None}, strict=True)
    assert report.ok and report.dropped == ["aux.weight"]
    assert "every checkpoint weight was used" not in str(report)
    assert "all checkpoint weights were used" not in caplog.text
    assert "1 checkpoint weights were left out on purpose" in str(report).replace("\n", " ")
    # and the plain case still says it
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="torchgraft"):
        report = tg.load(TinyNet(), TinyNet().state_dict(), strict=True)
    assert report.dropped == [] and "all checkpoint weights were used" in caplog.text
