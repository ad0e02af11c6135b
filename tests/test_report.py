"""Reports (report.py): grouping keys for people, JSON for programs, the footer's guidance, the alignment tables."""

from __future__ import annotations

import json
import logging

import torch
from torch import nn

import torchgraft as tg
from torchgraft.report import LoadReport, _group_pairs, _keys_cell, alignment_renderable, describe_adapter, render_text


class Stack(nn.Module):
    def __init__(self, n: int = 12, classes: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(n))
        self.head = nn.Linear(4, classes)


def _report(**fields) -> LoadReport:
    return LoadReport(model="M", source="ckpt.pt", format="torch-zip", **fields)


# Grouping ------------------------------------------------------------------------------------


def test_keys_cell_collapses_repeated_layers_and_sibling_leaves():
    keys = [f"layers.{i}.{leaf}" for i in range(12) for leaf in ("weight", "bias")]
    assert _keys_cell(keys) == "layers.{0..11}.{bias,weight}"
    assert _keys_cell(["a.0.w", "a.2.w", "b"]) == "a.{0,2}.w\nb"


def test_keys_cell_groups_long_lists_by_module_with_counts():
    keys = [f"blocks.{i}.part{j}.w" for i in range(20) for j in range(i)]  # no full product: many lines
    cell = _keys_cell(keys, limit=5).splitlines()
    assert len(cell) <= 5
    assert sum(int(line.rsplit("(", 1)[1].rstrip(")")) for line in cell if line.endswith(")")) == len(keys)
    many = [f"m{i}.w" for i in range(40)]
    lines = _keys_cell(many, limit=4).splitlines()
    assert lines[-1] == "... and 37 more groups" and len(lines) == 4


def test_describe_adapter():
    assert describe_adapter({"name": "reinit"}) == "reinit"
    assert describe_adapter({"name": "input_channels", "args": {"method": "sum"}}) == "input_channels(method='sum')"
    assert describe_adapter({"name": "select", "args": {"index": list(range(10))}}) == "select(index=[10 items])"


# JSON ----------------------------------------------------------------------------------------


def test_to_dict_is_json_and_matches_the_plan():
    model = Stack(n=2)
    sd = {k: v for k, v in Stack(n=2, classes=5).state_dict().items()}  # head: other shape
    sd["extra.w"] = torch.zeros(1)
    report = tg.load(model, sd)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["model"] == "Stack" and d["source"] == "state dict" and d["format"] == report.format
    assert d["loaded"] == [f"layers.{i}.{leaf}" for i in range(2) for leaf in ("weight", "bias")]
    assert d["unexpected"] == ["extra.w"] and d["missing"] == []
    assert d["mismatched"] == [
        {"key": "head.weight", "shape": [3, 4], "source": "head.weight", "source_shape": [5, 4]},
        {"key": "head.bias", "shape": [3], "source": "head.bias", "source_shape": [5]},
    ]
    assert d["initialised"] == {"head": "reset_parameters"}
    assert set(d) == set(LoadReport.__dataclass_fields__)  # every field, nothing else
    assert not report.ok


def test_from_plan_moves_ignored_missing_into_ignored():
    model = Stack(n=1)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    report = tg.load(Stack(n=1), sd, ignore_missing=["^head"])
    assert report.missing == [] and report.ok
    assert report.ignored == {k: "missing, ignored by pattern '^head'" for k in ("head.weight", "head.bias")}


# Text and footer -----------------------------------------------------------------------------


def test_footer_when_everything_fits():
    model = Stack(n=3)
    text = str(tg.load(Stack(n=3), model.state_dict()))
    assert "layers.{0..2}.{bias,weight}" in text
    assert "Every weight came from the checkpoint; all checkpoint weights were used." in text
    assert "Newly initialised" not in text and "Unused" not in text


def test_footer_names_each_problem_and_the_prefix():
    report = _report(
        loaded=["a.w"],
        missing=["b.w"],
        unexpected=["c.w"],
        mismatched=[{"key": "d.w", "shape": [2], "source": "d.w", "source_shape": [3]}],
        adapted={"e.w": {"name": "reinit"}},
        prefix={"mode": "add", "prefix": "bert."},
        renamed={"x": "bert.x"},
        nonfinite={"a.w": {"nan": 1, "inf": 0}},
    )
    text = str(report)
    for line in (
        "base-model prefix: added 'bert.' to checkpoint names",
        "renamed: 1 keys",
        "Newly initialised: train these",
        "Unused: expected when loading a checkpoint trained for another task",
        "Shape mismatches were initialised, not loaded: pass adapt=... to adapt them.",
        "Re-initialised by the adapt policy (reinit)",
        "NaN / Inf values were loaded",
    ):
        assert line in text, line
    assert "Every weight came from the checkpoint" not in text
    assert "removed 'm.' from checkpoint names" in str(_report(prefix={"mode": "strip", "prefix": "m."}))


def test_log_warns_once_per_problem(caplog):
    with caplog.at_level(logging.INFO, logger="t"):
        _report(missing=["b.w"], unexpected=["c.w"]).log(logging.getLogger("t"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].startswith("Some weights of the checkpoint at ckpt.pt were not used when initialising M: c.w.")
    assert warnings[1].startswith("Some weights of M were not in the checkpoint at ckpt.pt")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="t"):
        _report(loaded=["a.w"]).log(logging.getLogger("t"))
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "All weights of M were loaded from ckpt.pt" in caplog.records[0].getMessage()


# Alignment tables ----------------------------------------------------------------------------


def test_group_pairs_one_row_per_layer_pattern():
    aligned = {
        f"blocks.{i}.q.weight": {"source": f"layer.{i}.query.weight", "confidence": c, "reason": f"r{i}"}
        for i, c in enumerate([0.9, 0.75, 0.95])
    }
    aligned["head.weight"] = {"source": "classifier.weight", "confidence": 0.8, "reason": "only one"}
    rows = _group_pairs(aligned)
    assert rows == [
        ("blocks.{0..2}.q.weight", "layer.{0..2}.query.weight", 0.75, 0.95, "r0", 3),
        ("head.weight", "classifier.weight", 0.8, 0.8, "only one", 1),
    ]


def test_alignment_tables_in_text():
    aligned = {
        f"blocks.{i}.q.weight": {"source": f"layer.{i}.query.weight", "confidence": 0.8 + i / 100, "reason": "names"}
        for i in range(3)
    }
    ambiguous = [
        {"targets": [f"blocks.{i}.a.w"], "candidates": [f"layer.{i}.x.w", f"layer.{i}.y.w"], "reason": f"same {i}"}
        for i in range(2)
    ]
    text = render_text(alignment_renderable(aligned, ambiguous))
    assert "aligned by structure: 3 entries (plan.aligned; plan.aligned_rules() exports them)" in text
    assert "0.80-0.82" in text and "names (+2 like it)" in text
    assert "ambiguous: left missing, pass rules= to decide" in text
    assert "same 0 (and 1 more like it)" in text and "blocks.{0..1}.a.w" in text
    assert render_text(alignment_renderable({}, [])).strip() == ""


def test_plan_text_shows_alignment_only_when_there_is_some():
    class A(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(4, 8)
            self.second = nn.Linear(8, 2)

    class B(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Linear(4, 8)
            self.beta = nn.Linear(8, 2)

    plain = str(tg.plan(A(), B().state_dict()))
    assert "aligned by structure" not in plain and "unused (checkpoint names)" in plain
    aligned = str(tg.plan(A(), B().state_dict(), align=True))
    assert "aligned by structure: 4 entries" in aligned and "alpha.{bias,weight}" in aligned
