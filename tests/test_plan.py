"""Plans as data (plan.py) and how they are built (planner.py): JSON round trip, stale plans, prefixes, ignore patterns.

Oracles: torch's own ``load_state_dict`` on the renamed state dict, and the plan's own JSON read back.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import torchgraft as tg
from torchgraft.keys import Prefix, resolve_prefix
from torchgraft.plan import PLAN_VERSION, Entry, Plan, build_plan, plan
from torchgraft.planner import PlanOptions
from torchgraft.target import TargetView


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)


class WithHead(nn.Module):
    """A base model under ``body`` plus a classifier, declaring ``body`` as its base-model prefix."""

    base_model_prefix = "body"

    def __init__(self, classes: int = 3):
        super().__init__()
        self.body = Body()
        self.head = nn.Linear(4, classes)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {k: torch.randn_like(v) for k, v in model.state_dict().items()}


def _assert_state_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# Public names ---------------------------------------------------------------------------------


def test_plan_names_resolve_to_the_planner():
    import importlib

    from torchgraft import planner

    assert tg.plan is plan is planner.plan and build_plan is planner.build_plan
    with pytest.raises(AttributeError, match="module 'torchgraft.plan' has no attribute 'no_such_name'"):
        importlib.import_module("torchgraft.plan").no_such_name  # noqa: B018


# JSON round trip ------------------------------------------------------------------------------


def test_json_round_trip_keeps_every_decision(tmp_path):
    model = WithHead()
    sd = {k[len("body.") :]: v for k, v in _weights(model).items() if k.startswith("body.")}
    sd["proj.weight"] = torch.zeros(5, 4)  # shape mismatch
    sd["extra.bias"] = torch.zeros(2)  # unused
    sd["skip.me"] = torch.zeros(1)  # ignored by pattern
    p = tg.plan(model, sd, ignore_unexpected=[r"^skip\."])
    assert p.prefix == {"mode": "add", "prefix": "body."}
    assert p.unexpected == ["extra.bias"] and "skip.me" in p.ignored
    assert [e.target for e in p.mismatched] == ["body.proj.weight"]

    path = tmp_path / "plan.json"
    p.save(path)
    raw = json.loads(path.read_text())
    assert raw["torchgraft_plan"] == PLAN_VERSION and raw["summary"] == p.summary()
    back = Plan.load(path)
    assert back.to_dict() == p.to_dict()
    assert back.entries == p.entries  # Entry equality: every field, shapes back as tuples
    assert back.entries["body.embed.weight"].source_shape == (10, 4)


def test_entry_dict_drops_defaults_and_comes_back():
    e = Entry("a.weight", "copy", (2, 3), "float32", "x.weight", (2, 3), "float16", note="rule")
    d = e.to_dict()
    assert d == {"target": "a.weight", "action": "copy", "shape": [2, 3], "dtype": "float32", "source": "x.weight",
                 "source_shape": [2, 3], "source_dtype": "float16", "note": "rule"}  # fmt: skip
    assert Entry.from_dict(d) == e
    assert Entry.from_dict(Entry("b", "init", (), "int64").to_dict()) == Entry("b", "init", (), "int64")


def test_saved_plan_loads_the_same_weights_as_torch(tmp_path):
    model = WithHead()
    sd = {k[len("body.") :]: v for k, v in _weights(model).items() if k.startswith("body.")}
    tg.plan(model, sd).save(tmp_path / "p.json")
    target = WithHead()
    report = tg.load(target, sd, plan=Plan.load(tmp_path / "p.json"))
    oracle = WithHead()
    oracle.load_state_dict({f"body.{k}": v for k, v in sd.items()}, strict=False)
    oracle.head.load_state_dict(target.head.state_dict())  # the head is initialised, not loaded
    _assert_state_equal(target, oracle)
    assert report.missing == ["head.weight", "head.bias"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[1, 2]", r"is not a torchgraft plan \(a JSON object is expected\)"),
        ('{"torchgraft_plan": 99, "entries": []}', r"not a torchgraft plan of version 1 \(found 99\)"),
        ('{"torchgraft_plan": 1}', r"not a valid torchgraft plan: the plan has no 'entries'"),
        ('{"torchgraft_plan": 1, "entries": [{"target": "a"}]}', r"not a valid torchgraft plan: entry 0 lacks 'action'"),
        ('{"torchgraft_plan": 1, "entries": [{"target": "a", "shape": [], "x": 1}]}', r"entry 0 has unknown fields \['x'\]"),
        ("{not json", r"cannot read plan"),
    ],
)
def test_damaged_plan_files_are_refused(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(tg.PlanError, match=match):
        Plan.load(path)


# Stale plans ----------------------------------------------------------------------------------


def test_stale_plan_for_another_model_is_refused():
    sd = _weights(nn.Linear(4, 3))
    p = tg.plan(nn.Linear(4, 3), sd)
    other = nn.Linear(4, 5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(tg.PlanError, match=r"stale plan: the model's names or shapes changed \(plan made for Linear\)"):
        tg.load(other, sd, plan=p)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # nothing touched


def test_stale_plan_for_another_checkpoint_is_refused():
    model = nn.Linear(4, 3)
    p = tg.plan(model, _weights(model))
    changed = {"weight": torch.zeros(3, 4, dtype=torch.float64), "bias": torch.zeros(3)}
    with pytest.raises(tg.PlanError, match=r"the checkpoint's names, shapes or dtypes changed"):
        tg.load(model, changed, plan=p)
    renamed = {"w": torch.zeros(3, 4), "bias": torch.zeros(3)}
    with pytest.raises(tg.PlanError, match="stale plan"):
        p.check_fits(TargetView.of(model), tg.open(renamed))
    p.check_fits(TargetView.of(model), tg.open(_weights(model)))  # same layout, other values: fits


def test_plan_without_fingerprints_is_refused():  # a stale plan could not be detected (hostile-inputs issue, 12)
    model = nn.Linear(4, 3)
    p = tg.plan(model, _weights(model))
    p.model_fingerprint = p.source_fingerprint = ""
    with pytest.raises(tg.PlanError, match="the plan has no fingerprints"):
        p.check_fits(TargetView.of(model), tg.open(_weights(model)))


# Prefixes -------------------------------------------------------------------------------------


def test_prefix_added_base_checkpoint_into_model_with_head():
    model = WithHead()
    full = _weights(model)
    base = {k[len("body.") :]: v for k, v in full.items() if k.startswith("body.")}
    p = tg.plan(model, base)
    assert p.prefix == {"mode": "add", "prefix": "body."}
    assert p.renamed == {k: f"body.{k}" for k in base}
    assert p.missing == ["head.weight", "head.bias"] and p.unexpected == []
    assert "prefix add 'body.'" in p.entries["body.proj.weight"].note


def test_prefix_stripped_full_checkpoint_into_base_model():
    full = _weights(WithHead())
    target = Body()
    p = tg.plan(target, full)
    assert p.prefix == {"mode": "strip", "prefix": "body."}
    assert p.unexpected == ["head.weight", "head.bias"] and p.missing == []
    tg.load(target, full)
    oracle = Body()
    oracle.load_state_dict({k[len("body.") :]: v for k, v in full.items() if k.startswith("body.")})
    _assert_state_equal(target, oracle)


def test_prefix_option_off_and_named():
    model = WithHead()
    base = {k[len("body.") :]: v for k, v in _weights(model).items() if k.startswith("body.")}
    off = tg.plan(model, base, prefix="")
    assert off.prefix == {} and sorted(off.unexpected) == sorted(base) and len(off.missing) == 5
    assert tg.plan(model, base, prefix="body.").prefix == {"mode": "add", "prefix": "body."}
    assert tg.plan(model, base, prefix="other").prefix == {}  # only that prefix: none applies


def test_one_coincidence_is_not_a_prefix_but_one_leftover_is():
    # two unmatched names, one explained by 'a.': a coincidence, no prefix
    assert resolve_prefix({"x.w", "y.w"}, {"a.x.w", "z.w"}) == Prefix()
    # the only unmatched name is explained: a prefix (and diff agrees, below)
    assert resolve_prefix({"x.w", "z.w"}, {"a.x.w", "z.w"}) == Prefix("add", "a.")
    # the model's declared prefix wins a tie with another explanation of the same count
    keys, expected = {"p.x.w", "q.y.w"}, {"x.w", "y.w"}
    assert resolve_prefix(keys, expected, declared="q") == Prefix("strip", "q.")
    assert resolve_prefix(keys, expected, declared="p") == Prefix("strip", "p.")


def test_diff_and_plan_read_a_prefix_the_same_way():
    base = {"enc.w": torch.zeros(2), "enc.b": torch.zeros(3)}
    prefixed = {f"bert.{k}": v for k, v in base.items()} | {"cls.w": torch.zeros(4)}
    d = tg.diff(base, prefixed)
    p = tg.plan(_Flat(prefixed), base)
    assert d.prefix["mode"] == p.prefix["mode"] == "add" and d.prefix["prefix"] == p.prefix["prefix"] == "bert."
    assert {(r.a, r.b) for r in d.renames} == set(p.renamed.items())


class _Flat(nn.Module):
    """A module whose state dict is exactly ``sd`` (parameters in nested ParameterDicts)."""

    def __init__(self, sd):
        super().__init__()
        for key, value in sd.items():
            parent: nn.Module = self
            *path, leaf = key.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.register_parameter(leaf, nn.Parameter(value.clone()))


def test_prefix_object_both_directions():
    add, strip = Prefix("add", "m."), Prefix("strip", "m.")
    assert add.to_target("x", {"m.x"}) == "m.x" and add.to_target("x", {"y"}) == "x"
    assert strip.to_target("m.x", {"x"}) == "x" and strip.to_target("m.x", {"m.x"}) == "m.x"
    assert add.to_source("m.x") == "x" and strip.to_source("x") == "m.x" and Prefix().to_source("x") == "x"
    assert Prefix().to_dict() == {} and add.to_dict() == {"mode": "add", "prefix": "m."}


# Ignore patterns and other decisions ----------------------------------------------------------


def test_ignore_patterns_as_strings_and_compiled_in_either_spelling():
    model = WithHead()
    base = {k[len("body.") :]: v for k, v in _weights(model).items() if k.startswith("body.")}
    base["aux.weight"] = torch.zeros(2)
    # model spelling, compiled; checkpoint spelling for unused keys
    p = tg.plan(model, base, ignore_missing=[re.compile(r"^head\.weight$"), "head.bias"], ignore_unexpected=["^aux"])
    assert p.missing == [] and p.missing_ignored == ["head.weight", "head.bias"]
    assert p.entries["head.bias"].note == "missing, ignored by pattern 'head.bias'"
    assert p.unexpected == [] and p.ignored == {"aux.weight": "unused, ignored by pattern '^aux'"}
    # a missing entry may be named the checkpoint's way (without the added prefix)
    q = tg.plan(model, {k: v for k, v in base.items() if k != "proj.bias"}, ignore_missing=["^proj"])
    assert q.missing_ignored == ["body.proj.bias"]


def test_model_declared_ignore_patterns_join_the_callers():
    class Declares(WithHead):
        _keys_to_ignore_on_load_missing = [r"^head\."]
        _keys_to_ignore_on_load_unexpected = [r"^pooler\."]

    model = Declares()
    base = {k[len("body.") :]: v for k, v in _weights(model).items() if k.startswith("body.")}
    p = tg.plan(model, base | {"pooler.w": torch.zeros(1), "other.w": torch.zeros(1)}, ignore_unexpected=["^other"])
    assert p.missing == [] and p.unexpected == [] and set(p.ignored) == {"pooler.w", "other.w"}


def test_invalid_ignore_pattern_is_a_plan_error():
    with pytest.raises(tg.PlanError, match=r"ignore pattern '\(' is not a valid regex"):
        tg.plan(nn.Linear(2, 2), {"weight": torch.zeros(2, 2)}, ignore_missing=["("])
    with pytest.raises(tg.PlanError, match=r"ignore pattern '\[' is not a valid regex"):
        tg.load(nn.Linear(2, 2), {"weight": torch.zeros(2, 2)}, ignore_unexpected=["["])


def test_two_checkpoint_names_for_one_model_name_the_exact_one_wins():
    model = nn.Linear(2, 2)
    sd = {"module.weight": torch.ones(2, 2), "weight": torch.zeros(2, 2), "bias": torch.zeros(2)}
    p = tg.plan(model, sd)
    assert p.entries["weight"].source == "weight" and p.unexpected == ["module.weight"]
    assert p.notes == ["'module.weight' and 'weight' both map to 'weight'; 'weight' is used"]


def test_tied_weights_load_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 5, bias=False)
            self.out.weight = self.emb.weight

    sd = {"emb.weight": torch.randn(5, 3), "out.weight": torch.randn(5, 3)}
    p = tg.plan(Tied(), sd)
    assert p.entries["out.weight"].action == "tied" and p.entries["emb.weight"].loads
    assert p.ignored == {"out.weight": "same tensor as 'emb.weight', which is loaded from 'emb.weight'"}
    # only the later name in the checkpoint: loaded through it, the owner follows
    q = tg.plan(Tied(), {"out.weight": sd["out.weight"]})
    assert q.entries["emb.weight"].action == "tied" and q.entries["out.weight"].source == "out.weight"


def test_options_object_reads_generators_once_and_checks_align():
    options = PlanOptions(ignore_missing=(p for p in ["^head"]))
    assert options.ignore_missing == ("^head",)
    model = WithHead()
    base = {k[len("body.") :]: v for k, v in _weights(model).items() if k.startswith("body.")}
    p = build_plan(model, TargetView.of(model), tg.open(base), options)
    assert p.missing_ignored == ["head.weight", "head.bias"]
    with pytest.raises(tg.PlanError, match=r"align must be True or False, not 1"):
        build_plan(model, TargetView.of(model), tg.open(base), PlanOptions(align=1))  # type: ignore[arg-type]


def test_aligned_rules_and_its_deprecated_name():
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

    p = tg.plan(A(), _weights(B()), align=True)
    assert p.aligned_rules() == {"alpha": "first", "beta": "second"}
    with pytest.warns(DeprecationWarning, match=r"Plan.rules\(\) is now Plan.aligned_rules\(\)"):
        assert p.rules() == p.aligned_rules()
    assert tg.plan(A(), _weights(A())).aligned_rules() == {}
