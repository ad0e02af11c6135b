"""tg.plan / tg.load on tiny modules: prefixes, ignore patterns, ties, buffers, fast init, transactions."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

import torchgraft as tg
from tests.conftest import TinyNet


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.enc = nn.Linear(4, 4)
        self.register_buffer("pos", torch.arange(5), persistent=False)


class WithHead(nn.Module):
    base_model_prefix = "base"

    def __init__(self, n=2):
        super().__init__()
        self.base = Base()
        self.head = nn.Linear(4, n)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


# Prefixes ----------------------------------------------------------------------


def test_base_checkpoint_into_model_with_head():
    torch.manual_seed(0)
    base = Base()
    model = WithHead()
    head_before = snapshot(model.head)
    report = tg.load(model, base.state_dict())
    assert report.prefix == {"mode": "add", "prefix": "base."}
    assert report.missing == ["head.weight", "head.bias"]
    assert report.unexpected == []
    assert torch.equal(model.base.enc.weight, base.enc.weight)
    assert report.initialised == {"head": "reset_parameters"}
    assert not torch.equal(model.head.weight, head_before["weight"])  # re-initialised


def test_checkpoint_with_head_into_base_model():
    torch.manual_seed(0)
    full = WithHead()
    base = Base()
    report = tg.load(base, full.state_dict())
    assert report.prefix == {"mode": "strip", "prefix": "base."}
    assert report.unexpected == ["head.weight", "head.bias"]
    assert report.missing == []
    assert torch.equal(base.embed.weight, full.base.embed.weight)


def test_prefix_inferred_without_base_model_prefix():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = TinyNet()

    net = TinyNet()
    w = Wrapper()
    report = tg.load(w, net.state_dict(), strict=True)
    assert report.prefix == {"mode": "add", "prefix": "backbone."}
    assert torch.equal(w.backbone.conv.weight, net.conv.weight)
    report = tg.load(TinyNet(), w.state_dict(), strict=True)
    assert report.prefix == {"mode": "strip", "prefix": "backbone."}


def test_prefix_off():
    model = WithHead()
    p = tg.plan(model, Base().state_dict(), prefix="")
    assert p.prefix == {} and len(p.unexpected) == 3


def test_explicit_prefix_restricts_choice():
    p = tg.plan(WithHead(), Base().state_dict(), prefix="nope")
    assert p.prefix == {}
    p = tg.plan(WithHead(), Base().state_dict(), prefix="base")
    assert p.prefix == {"mode": "add", "prefix": "base."}


# Ignore patterns ---------------------------------------------------------------


def test_ignore_patterns_from_options_and_model(caplog):
    class Ignoring(WithHead):
        _keys_to_ignore_on_load_missing = (r"^head\.",)

    full = WithHead().state_dict()
    full["extra.thing"] = torch.zeros(1)
    model = Ignoring()
    report = tg.load(model, full | {}, ignore_unexpected=[r"^extra\."])
    assert report.missing == [] and report.unexpected == []
    assert set(report.ignored) == {"extra.thing"}
    # ignored-missing keys are still initialised and visible in the plan
    p = tg.plan(Ignoring(), Base().state_dict())
    assert p.missing == [] and p.missing_ignored == ["head.weight", "head.bias"]


def test_invalid_ignore_pattern():
    with pytest.raises(tg.PlanError, match=r"ignore pattern '\(' is not a valid regex"):
        tg.plan(TinyNet(), TinyNet().state_dict(), ignore_missing=["("])


# Fast init, strict, warnings ---------------------------------------------------


def test_only_missing_modules_are_initialised():
    torch.manual_seed(1)
    src = TinyNet().state_dict()
    del src["head.weight"], src["head.bias"]
    model = TinyNet()
    conv_before = model.conv.weight.detach().clone()
    report = tg.load(model, src)
    assert report.initialised == {"head": "reset_parameters"}
    assert torch.equal(model.conv.weight, src["conv.weight"])
    assert not torch.equal(model.conv.weight, conv_before)


def test_init_missing_false_keeps_values():
    src = TinyNet().state_dict()
    del src["head.weight"]
    model = TinyNet()
    before = model.head.weight.detach().clone()
    report = tg.load(model, src, init_missing=False)
    assert report.initialised == {"head": "kept"}
    assert report.not_initialised == {"kept": ["head.weight"]}
    text = str(report)
    assert "missing (NOT initialised: kept their values)" in text and "missing (initialised)" not in text
    assert "were NOT initialised" in report.missing_message() and "newly initialised" not in report.missing_message()
    assert torch.equal(model.head.weight, before)
    assert torch.equal(model.head.bias, src["head.bias"])


def test_strict_lists_every_problem_and_changes_nothing():
    src = TinyNet(num_classes=7).state_dict()
    del src["conv.weight"]
    src["stray.weight"] = torch.zeros(1)
    model = TinyNet()
    before = snapshot(model)
    with pytest.raises(
        tg.LoadError,
        match=r"(?s)strict=True.*missing: conv.weight \[8, 3, 3, 3\].*unexpected: stray.weight.*"
        r"shape mismatch: head.weight expects \[4, 8\], checkpoint 'head.weight' has \[7, 8\]",
    ) as info:
        tg.load(model, src, strict=True)
    problems = [p for p in info.value.problems if not p.startswith("fix: ")]
    assert len(problems) == 4  # conv.weight, stray, head.weight, head.bias
    assert "fix: adapt='auto' (or adapt={name: adapter}) adapts the shape mismatches" in info.value.problems
    assert_unchanged(model, before)


def test_mismatched_shapes_are_initialised_and_reported(caplog):
    src = TinyNet(num_classes=7).state_dict()
    model = TinyNet()
    with caplog.at_level(logging.WARNING, logger="torchgraft"):
        report = tg.load(model, src)
    assert [m["key"] for m in report.mismatched] == ["head.weight", "head.bias"]
    assert report.mismatched[0] == {
        "key": "head.weight",
        "shape": [4, 8],
        "source": "head.weight",
        "source_shape": [7, 8],
    }
    assert report.initialised == {"head": "reset_parameters"}
    assert "newly initialised because their shapes differ" in caplog.text


def test_warnings_in_plain_words(caplog):
    with caplog.at_level(logging.WARNING, logger="torchgraft"):
        tg.load(WithHead(), {**Base().state_dict(), "cls.x": torch.zeros(1)})
    assert "were not used when initialising WithHead: cls.x" in caplog.text
    assert "This IS expected if you are initialising WithHead from a checkpoint trained on another task" in caplog.text
    assert "newly initialised: head.{bias,weight}" in caplog.text
    assert "You should probably TRAIN this model on a downstream task" in caplog.text


def test_all_good_logs_info(caplog):
    with caplog.at_level(logging.INFO, logger="torchgraft"):
        report = tg.load(TinyNet(), TinyNet().state_dict())
    assert report.ok
    assert "All weights of TinyNet were loaded" in caplog.text


# Modules' own loading hooks ------------------------------------------------------


def test_batchnorm_version_hook_fills_num_batches_tracked():
    src = dict(TinyNet().state_dict())  # a plain dict: no _metadata, as in checkpoints from before torch 0.4.1
    del src["bn.num_batches_tracked"]
    model, reference = TinyNet(), TinyNet()
    for m in (model, reference):
        m.bn.num_batches_tracked.fill_(5)
    report = tg.load(model, src, strict=True)
    reference.load_state_dict(src, strict=True)  # torch accepts it too, keeping the current count
    assert report.missing == []
    assert model.bn.num_batches_tracked.item() == reference.bn.num_batches_tracked.item() == 5
    with torch.device("meta"):
        fresh = TinyNet()
    tg.load(fresh, src, strict=True)
    assert fresh.bn.num_batches_tracked.item() == 0


def test_num_batches_tracked_missing_from_a_new_checkpoint_is_missing():
    sd = TinyNet().state_dict()  # has _metadata with version 2
    del sd["bn.num_batches_tracked"]
    p = tg.plan(TinyNet(), sd)
    assert p.missing == ["bn.num_batches_tracked"]


def test_load_from_state_dict_gets_the_checkpoints_metadata():
    seen = {}

    class Versioned(nn.Linear):
        _version = 3

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
            seen["version"] = local_metadata.get("version")
            if local_metadata.get("version", 0) < 3:  # old layout stored the weight transposed
                state_dict[prefix + "weight"] = state_dict[prefix + "weight"].t()
            super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = Versioned(2, 3, bias=False)

    old = {"fc.weight": torch.arange(6.0).reshape(3, 2)}
    old_sd = type("SD", (dict,), {})(old)
    old_sd._metadata = {"fc": {"version": 2}}
    net = Net()
    # shapes agree by design here (3x2 -> transposed 2x3 would not), so use a square layer
    net.fc = Versioned(3, 3, bias=False)
    old_sd["fc.weight"] = torch.arange(9.0).reshape(3, 3)
    tg.load(net, old_sd)
    assert seen["version"] == 2
    assert torch.equal(net.fc.weight, torch.arange(9.0).reshape(3, 3).t())


def test_scalar_from_one_element_tensor_like_load_state_dict():
    model = TinyNet()
    src = model.state_dict()
    src["bn.num_batches_tracked"] = torch.tensor([3])
    tg.load(model, src, strict=True)
    assert model.bn.num_batches_tracked.item() == 3 and model.bn.num_batches_tracked.dim() == 0


# Ties, buffers, meta, dtype --------------------------------------------------------


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.decoder = nn.Linear(4, 6, bias=False)
        self.decoder.weight = self.embed.weight


def test_tied_decoder_is_not_missing():
    src = {"embed.weight": torch.randn(6, 4)}
    model = Tied()
    report = tg.load(model, src, strict=True)
    assert report.tied == {"decoder.weight": "tied to embed.weight"}
    assert model.decoder.weight is model.embed.weight
    assert torch.equal(model.decoder.weight, src["embed.weight"])


def test_tied_weights_stay_tied_on_meta():
    src = {"embed.weight": torch.randn(6, 4), "decoder.weight": torch.randn(6, 4)}
    with torch.device("meta"):
        model = Tied()
    report = tg.load(model, src)
    assert model.decoder.weight is model.embed.weight
    assert torch.equal(model.embed.weight, src["embed.weight"])
    assert "decoder.weight" in report.ignored  # the checkpoint's copy of a tied tensor is not used


def test_tie_loaded_through_the_second_name():
    src = {"decoder.weight": torch.randn(6, 4)}
    model = Tied()
    tg.load(model, src, strict=True)
    assert model.decoder.weight is model.embed.weight
    assert torch.equal(model.embed.weight, src["decoder.weight"])


def test_tie_loaded_through_the_second_name_on_meta():
    src = {"decoder.weight": torch.randn(6, 4)}
    with torch.device("meta"):
        model = Tied()
    tg.load(model, src, strict=True)
    assert model.decoder.weight is model.embed.weight
    assert torch.equal(model.embed.weight, src["decoder.weight"])


def test_in_place_copy_into_stock_modules_keeps_no_backup(monkeypatch):
    """Memory stays at model + staged tensors: nothing is cloned for torch's own layers."""
    from torchgraft import apply

    cloned = []
    original = apply._Undo.values
    monkeypatch.setattr(apply._Undo, "values", lambda self, t: (cloned.append(t), original(self, t)))
    tg.load(TinyNet(), TinyNet().state_dict(), strict=True)
    assert cloned == []


def test_non_persistent_buffer_in_checkpoint_is_ignored_not_unexpected():
    src = {**Base().state_dict(), "pos": torch.arange(5) * 0}
    model = Base()
    report = tg.load(model, src)
    assert report.unexpected == [] and "pos" in report.ignored
    assert torch.equal(model.pos, torch.arange(5))  # computed by the model, not overwritten


def test_meta_model_is_materialised_completely():
    torch.manual_seed(0)
    ref = TinyNet()
    with torch.device("meta"):
        model = TinyNet()
    report = tg.load(model, ref.state_dict(), strict=True)
    assert report.ok
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model.eval()(x), ref.eval()(x))


def test_meta_model_assigns_zero_copy():
    ref = TinyNet()
    sd = ref.state_dict()
    with torch.device("meta"):
        model = TinyNet()
    tg.load(model, sd)
    assert model.conv.weight.data_ptr() == sd["conv.weight"].data_ptr()
    assert isinstance(model.conv.weight, nn.Parameter) and model.conv.weight.requires_grad


def test_meta_model_missing_head_is_initialised_on_cpu():
    src = TinyNet().state_dict()
    del src["head.weight"], src["head.bias"]
    with torch.device("meta"):
        model = TinyNet()
    report = tg.load(model, src)
    assert report.initialised == {"head": "reset_parameters"}
    assert model.head.weight.device.type == "cpu" and model.head.weight.abs().sum() > 0


def test_meta_tensor_that_cannot_be_initialised_is_an_error_and_nothing_changes():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(3))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.ls = Scale()

    with torch.device("meta"):
        model = Net()
    src = {"fc.weight": torch.ones(3, 3), "fc.bias": torch.ones(3)}
    report = tg.load(model, src)  # Scale has no initialiser: starts at zero, reported as zeros
    assert report.initialised == {"ls": "zeros"} and torch.equal(model.ls.gamma, torch.zeros(3))
    assert report.not_initialised == {"zeros": ["ls.gamma"]}
    assert "missing (NOT initialised: zeros" in str(report) and "NOT initialised" in report.missing_message()


def test_meta_non_persistent_buffer_without_initialiser_is_warned(caplog):
    class Buf(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.register_buffer("table", torch.arange(4.0), persistent=False)

    with torch.device("meta"):
        model = Buf()
    # materialised at zero and reported: there is no initialiser for a plain module's buffer
    with caplog.at_level(logging.WARNING, logger="torchgraft"):
        report = tg.load(model, {"fc.weight": torch.ones(2, 2), "fc.bias": torch.ones(2)})
    assert report.initialised == {"": "zeros"}
    assert not model.table.is_meta
    assert "left as zeros in (root)" in caplog.text  # loud, never silent zeros


def test_dtype_cast_while_loading():
    src = {k: v.double() if v.is_floating_point() else v for k, v in TinyNet().state_dict().items()}
    model = TinyNet()
    tg.load(model, src)
    assert model.conv.weight.dtype == torch.float32
    assert torch.equal(model.conv.weight, src["conv.weight"].float())
    report = tg.load(model, src, dtype=torch.bfloat16)
    assert report.dtype == "bfloat16"
    assert model.conv.weight.dtype == torch.bfloat16 and model.bn.num_batches_tracked.dtype == torch.int64
    assert torch.equal(model.conv.weight, src["conv.weight"].to(torch.bfloat16))


def test_copy_in_place_keeps_parameter_objects():
    model = TinyNet()
    param = model.conv.weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tg.load(model, TinyNet().state_dict())
    assert model.conv.weight is param and opt.param_groups[0]["params"][0] is param


# Transactions --------------------------------------------------------------------


def test_failing_module_hook_rolls_everything_back():
    class Boom(nn.Linear):
        def _load_from_state_dict(self, *args):
            raise RuntimeError("hook exploded")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)
            self.z = Boom(3, 3)

    src = Net().state_dict()
    del src["head.weight"]  # forces an init too
    model = Net()
    before = snapshot(model)
    params = {k: id(v) for k, v in model.named_parameters()}
    with pytest.raises(RuntimeError, match="hook exploded"):
        tg.load(model, src)
    assert_unchanged(model, before)
    assert {k: id(v) for k, v in model.named_parameters()} == params


def test_failing_read_leaves_meta_model_untouched():
    from torchgraft.sources import Source, TensorRef

    def boom():
        raise tg.CheckpointError("x.safetensors", "reading 'head.bias' failed", format="safetensors")

    sd = TinyNet().state_dict()
    entries = {k: TensorRef(k, tuple(v.shape), str(v.dtype)[6:], (lambda v=v: v)) for k, v in sd.items()}
    entries["head.bias"] = TensorRef("head.bias", (4,), "float32", boom)
    with torch.device("meta"):
        model = TinyNet()
    with pytest.raises(tg.CheckpointError, match=r"reading 'head.bias' failed"):
        tg.load(model, Source(entries, path="x.safetensors", format="safetensors"))
    assert all(p.is_meta for p in model.parameters())


def test_error_messages_from_hooks_roll_back():
    class Picky(nn.Linear):
        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
            errors.append(f"{prefix}weight: refused by Picky")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.p = Picky(2, 2)

    model = Net()
    before = snapshot(model)
    with pytest.raises(
        tg.LoadError, match=r"(?s)Loading into Net failed; the model is unchanged.*p.weight: refused by Picky"
    ):
        tg.load(model, Net().state_dict())
    assert_unchanged(model, before)


# Plans -----------------------------------------------------------------------------


def test_plan_is_a_dry_run(tmp_path):
    model = TinyNet()
    before = snapshot(model)
    p = tg.plan(model, TinyNet(num_classes=9).state_dict())
    assert_unchanged(model, before)
    assert p.summary()["mismatched"] == 2
    text = str(p)
    assert "initialise (shape mismatch)" in text and "head.{bias,weight}" in text


def test_plan_json_round_trip_and_reuse(tmp_path):
    src = {**Base().state_dict(), "cls.x": torch.zeros(1)}
    model = WithHead()
    p = tg.plan(model, src)
    path = tmp_path / "plan.json"
    p.save(path)
    data = json.loads(path.read_text())
    assert data["torchgraft_plan"] == 1 and data["prefix"] == {"mode": "add", "prefix": "base."}
    p2 = tg.Plan.load(path)
    assert p2.to_dict() == p.to_dict()
    report = tg.load(model, src, plan=p2)
    assert report.missing == ["head.weight", "head.bias"] and report.unexpected == ["cls.x"]


def test_stale_plan_is_refused():
    p = tg.plan(TinyNet(), TinyNet().state_dict())
    with pytest.raises(tg.PlanError, match=r"stale plan: the model's names or shapes changed"):
        tg.load(TinyNet(num_classes=5), TinyNet().state_dict(), plan=p)
    with pytest.raises(tg.PlanError, match=r"stale plan: the checkpoint's names, shapes or dtypes changed"):
        tg.load(TinyNet(), {**TinyNet().state_dict(), "x": torch.zeros(1)}, plan=p)


def test_plan_load_errors(tmp_path):
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(tg.PlanError, match=r"is not a torchgraft plan"):
        tg.Plan.load(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"torchgraft_plan": 99}))
    with pytest.raises(tg.PlanError, match=r"not a torchgraft plan of version 1 \(found 99\)"):
        tg.Plan.load(tmp_path / "old.json")
    with pytest.raises(tg.PlanError, match=r"cannot read plan"):
        tg.Plan.load(tmp_path / "missing.json")


def test_user_rules_in_load():
    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.norm = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 4)

    src = TinyNet().state_dict()
    model = Renamed()
    report = tg.load(model, src, rules={"conv": "stem", "bn": "norm", "head": "fc"}, strict=True)
    assert report.renamed["conv.weight"] == "stem.weight"
    assert torch.equal(model.stem.weight, src["conv.weight"])


def test_duplicate_names_after_renaming_are_reported():
    src = {**TinyNet().state_dict()}
    src["module.conv.weight"] = torch.zeros(8, 3, 3, 3)
    model = TinyNet()
    p = tg.plan(model, src)
    assert p.entries["conv.weight"].source == "conv.weight"
    assert p.unexpected == ["module.conv.weight"]
    assert "both map to 'conv.weight'" in p.notes[0]


def test_report_to_dict_is_json():
    report = tg.load(WithHead(), Base().state_dict())
    data = json.loads(json.dumps(report.to_dict()))
    assert data["missing"] == ["head.weight", "head.bias"] and data["initialised"] == {"head": "reset_parameters"}
    text = str(report)
    assert "missing (initialised)" in text and "base-model prefix: added 'base.'" in text


def test_one_coincidence_is_not_a_prefix():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 4))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = Inner()
            self.fc = nn.Linear(4, 2)

    src = {"cls_token": torch.ones(1, 4), "proj.weight": torch.ones(2, 4)}
    assert tg.plan(Net(), src).prefix == {}  # one name that happens to fit is not a base-model prefix
    assert tg.plan(Net(), src, prefix="enc").prefix == {"mode": "add", "prefix": "enc."}  # unless asked for
