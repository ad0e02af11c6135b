"""A load that fails at any point leaves the model bit-identical; NaN / Inf are reported or refused.

Failures are injected where they hurt most: a shard that breaks after the plan was made (half
the tensors already read), a module hook that raises after its neighbours were loaded, an
initialiser that raises after it changed weights, a meta-device model half assigned.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torchgraft as tg
from torchgraft.sources import Source, TensorRef


class Net(nn.Module):
    """Three stages, so a failure can sit in the middle of the commit."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.middle = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.last = nn.Linear(4, 2)


class Exploding(nn.Linear):
    """Loads its tensors, then raises: the neighbours loaded before it must be restored too."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        raise RuntimeError("hook exploded after copying")


class Complaining(nn.Linear):
    """Reports an error the way load_state_dict hooks do (through error_msgs)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs)
        error_msgs.append(f"{prefix}weight: refused by the module")


class BadInit(nn.Linear):
    def reset_parameters(self) -> None:
        if getattr(self, "armed", False):
            with torch.no_grad():
                self.weight.fill_(123.0)
            raise RuntimeError("initialiser exploded after writing")
        super().reset_parameters()


def snapshot(model: nn.Module) -> dict[str, tuple]:
    """Identity, type, dtype, shape, device, requires_grad and raw bytes of every tensor slot."""
    out = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for store in ("_parameters", "_buffers"):
            for key, t in getattr(module, store).items():
                raw = (
                    None
                    if t is None or t.is_meta
                    else t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()
                )
                meta = None if t is None else (type(t), t.dtype, tuple(t.shape), t.device.type, t.requires_grad)
                out[f"{path}.{key}"] = (id(t), meta, raw)
    return out


def assert_bit_identical(model: nn.Module, before: dict[str, tuple]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (ident, meta, raw) in before.items():
        a_ident, a_meta, a_raw = after[name]
        assert a_ident == ident, f"{name}: a different tensor object"
        assert a_meta == meta, f"{name}: {a_meta} != {meta}"
        assert (raw is None and a_raw is None) or torch.equal(a_raw, raw), f"{name}: bytes changed"


def checkpoint_for(model: nn.Module, *, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {
        k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
    }


def write_shards(directory: Path, sd: dict[str, torch.Tensor], n: int) -> Path:
    names = list(sd)
    weight_map = {}
    for i in range(n):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in names[i::n]}
        save_file(part, directory / fname)
        weight_map.update({k: fname for k in part})
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


# Failures in the middle of a load -----------------------------------------------------------------


def test_shard_that_breaks_after_planning_leaves_model_unchanged(tmp_path, net):
    index = write_shards(tmp_path, checkpoint_for(net), 3)
    src = tg.open(index)  # headers validated now; tensors are read at load time
    plan = tg.plan(net, src)
    shard = tmp_path / "model-00002-of-00003.safetensors"
    broken = tmp_path / "broken.tmp"
    broken.write_bytes(shard.read_bytes()[:-5])
    os.replace(broken, shard)  # the second shard is damaged between plan and load
    before = snapshot(net)
    with pytest.raises(tg.CheckpointError, match=r"model-00002-of-00003\.safetensors' \(read as safetensors\)"):
        tg.load(net, src, plan=plan)
    assert_bit_identical(net, before)


def test_tensor_read_failing_mid_load_leaves_model_unchanged(net):
    sd = checkpoint_for(net)
    calls = []

    def loader(name):
        def load():
            calls.append(name)
            if len(calls) == 5:
                raise tg.CheckpointError("/data/shard-2", f"reading {name!r} failed: I/O error", format="safetensors")
            return sd[name]

        return load

    src = Source(
        {k: TensorRef(k, tuple(v.shape), str(v.dtype).removeprefix("torch."), loader(k)) for k, v in sd.items()},
        path="/data/x",
        format="test",
    )
    before = snapshot(net)
    with pytest.raises(tg.CheckpointError, match=r"reading '.*' failed: I/O error"):
        tg.load(net, src)
    assert len(calls) == 5  # four tensors were read before the failure
    assert_bit_identical(net, before)


def test_module_hook_raising_after_neighbours_loaded(net):
    net.middle.__class__ = Exploding  # loaded after `first`, before `norm` and `last`
    sd = checkpoint_for(net)
    before = snapshot(net)
    with pytest.raises(RuntimeError, match="hook exploded after copying"):
        tg.load(net, sd)
    assert_bit_identical(net, before)
    assert not torch.equal(net.first.weight, sd["first.weight"])


def test_module_hook_reporting_an_error(net):
    net.middle.__class__ = Complaining
    before = snapshot(net)
    with pytest.raises(
        tg.LoadError, match=r"(?s)failed; the model is unchanged.*middle\.weight: refused by the module"
    ):
        tg.load(net, checkpoint_for(net))
    assert_bit_identical(net, before)


def test_sharded_load_with_failing_hook_in_the_middle(tmp_path, net):
    class ExplodingNorm(nn.BatchNorm1d):
        def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
            raise RuntimeError("hook exploded in the norm")

    net.norm.__class__ = ExplodingNorm
    index = write_shards(tmp_path, checkpoint_for(net), 3)
    before = snapshot(net)
    with pytest.raises(RuntimeError, match="hook exploded"):
        tg.load(net, index)
    assert_bit_identical(net, before)


def test_initialiser_raising_after_writing(net):
    net.last.__class__ = BadInit
    net.last.armed = True
    sd = {k: v for k, v in checkpoint_for(net).items() if not k.startswith("last.")}  # `last` is missing: initialised
    before = snapshot(net)
    with pytest.raises(RuntimeError, match="initialiser exploded after writing"):
        tg.load(net, sd)
    assert_bit_identical(net, before)


def test_meta_model_half_assigned_then_failing():
    with torch.device("meta"):
        net = Net()
    net.last.__class__ = Exploding
    sd = checkpoint_for(Net())
    before = snapshot(net)
    with pytest.raises(RuntimeError, match="hook exploded"):
        tg.load(net, sd)
    assert_bit_identical(net, before)
    assert net.first.weight.is_meta


def test_dtype_cast_load_failing_restores_parameters(net):
    net.last.__class__ = Exploding
    before = snapshot(net)
    with pytest.raises(RuntimeError, match="hook exploded"):
        tg.load(net, checkpoint_for(net), dtype=torch.float16)  # assigns new float16 parameters
    assert_bit_identical(net, before)
    assert net.first.weight.dtype == torch.float32


def test_tied_weights_stay_tied_after_failure():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.mid = Exploding(4, 4)
            self.head = nn.Linear(4, 5, bias=False)
            self.head.weight = self.embed.weight

    torch.manual_seed(0)
    model = Tied()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="hook exploded"):
        tg.load(model, checkpoint_for(model), dtype=torch.float64)
    assert_bit_identical(model, before)
    assert model.head.weight is model.embed.weight


# NaN / Inf --------------------------------------------------------------------------------------


def _poisoned(net: Net) -> dict[str, torch.Tensor]:
    sd = checkpoint_for(net)
    sd["middle.weight"][0, 0] = float("nan")
    sd["middle.weight"][1, 1] = float("nan")
    sd["last.bias"][0] = float("-inf")
    return sd


def test_nonfinite_values_are_reported_and_warned(net, caplog):
    report = tg.load(net, _poisoned(net), check_finite="warn")
    assert report.nonfinite == {"middle.weight": {"nan": 2, "inf": 0}, "last.bias": {"nan": 0, "inf": 1}}
    assert report.to_dict()["nonfinite"] == report.nonfinite
    assert "NaN / Inf values" in str(report)
    assert any(
        "hold NaN or Inf values: middle.weight (2 NaN, 0 Inf), last.bias (0 NaN, 1 Inf)" in r.message
        for r in caplog.records
    )
    assert not any("ready for predictions" in r.message for r in caplog.records)
    assert torch.isnan(net.middle.weight[0, 0])  # "warn" loads them


def test_check_finite_error_refuses_and_leaves_model_unchanged(tmp_path, net):
    index = write_shards(tmp_path, _poisoned(net), 2)
    before = snapshot(net)
    with pytest.raises(
        tg.LoadError,
        match=r"(?s)NaN or Inf values \(check_finite='error'\); the model is unchanged.*middle\.weight: 2 NaN, 0 Inf.*last\.bias: 0 NaN, 1 Inf",
    ):
        tg.load(net, index, check_finite="error")
    assert_bit_identical(net, before)


def test_overflowing_cast_counts_as_inf(net):
    sd = checkpoint_for(net)
    sd["first.weight"][0, 0] = 1e6  # finite in float32, +Inf in float16
    net.first.half()
    report = tg.load(net, sd, check_finite="warn")
    assert report.nonfinite == {"first.weight": {"nan": 0, "inf": 1}}
    assert tg.load(net, sd, dtype=torch.float16, check_finite="warn").nonfinite["first.weight"] == {"nan": 0, "inf": 1}


def test_check_finite_false_skips_the_check(net):
    assert tg.load(net, _poisoned(net), check_finite=False).nonfinite == {}


def test_check_finite_is_off_by_default(net, caplog):
    """The default path is the fast one (issue 16.2): no scan, no warning, the values loaded as they are."""
    report = tg.load(net, _poisoned(net))
    assert report.nonfinite == {}
    assert not any("NaN" in r.message for r in caplog.records)
    assert torch.isnan(net.middle.weight[0, 0])


def test_finite_checkpoint_reports_nothing(net):
    assert tg.load(net, checkpoint_for(net), check_finite="error").nonfinite == {}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn])
def test_nonfinite_in_narrow_and_wide_dtypes(dtype):
    model = nn.Linear(3, 2).to(dtype)
    sd = {"weight": torch.zeros(2, 3).to(dtype), "bias": torch.tensor([float("nan"), 0.0]).to(dtype)}
    assert tg.load(model, sd, check_finite="warn").nonfinite == {"bias": {"nan": 1, "inf": 0}}


def test_check_finite_rejects_unknown_values(net):
    with pytest.raises(ValueError, match=r"check_finite must be 'warn', 'error' or False, not 'yes'"):
        tg.load(net, checkpoint_for(net), check_finite="yes")


# allow_globals through tg.plan / tg.load -------------------------------------------------------------


@pytest.fixture
def lightning_ckpt(tmp_path, net) -> Path:
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"epoch": 3, "state_dict": checkpoint_for(net), "hyper_parameters": argparse.Namespace(lr=0.1)}, path)
    return path


def test_load_refuses_namespace_without_allow_globals(net, lightning_ckpt):
    before = snapshot(net)
    with pytest.raises(tg.UnsafeCheckpointError, match=r"(?s)refuses: argparse\.Namespace.*allow_globals=\[\.\.\.\]"):
        tg.load(net, lightning_ckpt)
    assert_bit_identical(net, before)


@pytest.mark.parametrize("allowed", [["argparse.Namespace"], [argparse.Namespace]])
def test_allow_globals_through_plan_and_load(net, lightning_ckpt, allowed):
    plan = tg.plan(net, lightning_ckpt, allow_globals=allowed)
    assert plan.missing == [] and plan.unexpected == []
    report = tg.load(net, lightning_ckpt, allow_globals=allowed, plan=plan)
    assert report.container == "state_dict" and report.missing == []


@pytest.mark.parametrize(
    ("allowed", "error", "match"),
    [
        (["no_such_module.Thing"], ValueError, r"allow_globals: cannot import 'no_such_module\.Thing'"),
        (["Namespace"], ValueError, r"allow_globals: 'Namespace' is not a dotted 'module\.Name'"),
        (["builtins.eval"], ValueError, r"refusing to allow builtins\.eval: it runs code"),
        ([os.system], ValueError, r"refusing to allow posix\.system"),
        ("argparse.Namespace", TypeError, r"allow_globals must be a list"),
    ],
)
def test_allow_globals_mistakes_are_refused_before_reading(net, lightning_ckpt, allowed, error, match):
    with pytest.raises(error, match=match):
        tg.open(lightning_ckpt, allow_globals=allowed)


def test_log_records_reach_the_torchgraft_logger(net, caplog):
    caplog.set_level(logging.WARNING, logger="torchgraft")
    tg.load(net, _poisoned(net), check_finite="warn")
    assert [r.name for r in caplog.records if "NaN" in r.message] == ["torchgraft"]


def test_in_memory_sparse_or_meta_tensor_is_refused_before_the_model_changes():
    """A state dict given in memory is not checked at open: staging refuses it, before the commit (issue 17.4/7)."""
    model = torch.nn.Linear(4, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad in (torch.ones(3, 4).to_sparse(), torch.empty(3, 4, device="meta")):
        with pytest.raises(tg.LoadError, match=r"(?s)the model is unchanged:.*weight: (sparse_coo layout|a meta)"):
            tg.load(model, {"weight": bad, "bias": torch.ones(3)})
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_in_memory_metadata_with_a_string_version_is_dropped():
    model = torch.nn.BatchNorm1d(3)
    sd = collections.OrderedDict((k, v.clone()) for k, v in torch.nn.BatchNorm1d(3).state_dict().items())
    sd["running_mean"] += 1
    sd._metadata = {"": {"version": "x"}}  # type: ignore[attr-defined]
    tg.load(model, sd)
    assert torch.equal(model.running_mean, sd["running_mean"])
