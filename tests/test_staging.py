"""torchgraft.staging (what tg.load and torchgraft.distributed.load share) and the tensor's path through a load.

The oracle for values is torch's own: ``load_state_dict`` on a twin model, ``torch.isnan`` /
``torch.isinf`` counts, the file's own bytes (read back with the safetensors library).
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import torchgraft as tg
from tests.conftest import TinyNet
from torchgraft.sources import Source
from torchgraft.staging import (
    ModuleGroups,
    count_nonfinite,
    live,
    nonfinite_error,
    retie,
    slot,
    stage_entry,
    strict_error,
)
from torchgraft.target import TargetView

# ---------------------------------------------------------------------------
# ModuleGroups


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.decoder = nn.Linear(4, 6, bias=False)
        self.decoder.weight = self.embed.weight
        self.register_buffer("pos", torch.arange(3), persistent=False)


def test_module_groups_follow_the_plan():
    model = TinyNet(num_classes=2)
    checkpoint = {k: v for k, v in TinyNet().state_dict().items() if not k.startswith("head.")}
    del checkpoint["bn.num_batches_tracked"]  # a checkpoint that predates it: "default"
    view = TargetView.of(model)
    plan = tg.plan(model, Source.from_state_dict(checkpoint))
    groups = ModuleGroups.of(view, plan)
    assert groups.module["bn.running_mean"] == "bn" and groups.module["conv.weight"] == "conv"
    # loaded entries by module, in plan order; "bn" keeps its loaded entries (num_batches_tracked is filled by its hook)
    assert groups.loads == {
        "conv": ["conv.weight"],
        "bn": ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"],
    }
    assert groups.to_initialise == {"head": ["head.weight", "head.bias"]}


def test_module_groups_list_meta_nonpersistent_buffers_and_ties_to_initialise():
    with torch.device("meta"):
        model = Tied()
    view = TargetView.of(model)
    plan = tg.plan(model, Source.from_state_dict({}))
    groups = ModuleGroups.of(view, plan)
    assert groups.loads == {}
    assert groups.to_initialise == {"embed": ["embed.weight"], "decoder": ["decoder.weight"], "": ["pos"]}


# ---------------------------------------------------------------------------
# stage_entry, count_nonfinite, the error builders


def _entry(model: nn.Module, checkpoint: dict[str, torch.Tensor], name: str):
    src = Source.from_state_dict(checkpoint, name="ckpt")
    return tg.plan(model, src).entries[name], src


def test_stage_entry_makes_a_one_element_tensor_a_scalar_like_load_state_dict():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1.0))

    model = Scale()
    entry, src = _entry(model, {"scale": torch.tensor([3.0])}, "scale")
    staged = stage_entry("scale", entry, torch.tensor([3.0]), shape=(), source=src)
    twin = Scale()
    twin.load_state_dict({"scale": torch.tensor([3.0])})
    assert staged.shape == twin.scale.shape and torch.equal(staged, twin.scale.detach())


def test_stage_entry_refuses_a_checkpoint_that_changed_since_planning():
    model = nn.Linear(3, 2)
    entry, src = _entry(model, nn.Linear(3, 2).state_dict(), "weight")
    with pytest.raises(tg.LoadError, match=r"(?s)ckpt .* changed since it was planned.*'weight' has shape \[4, 3\]"):
        stage_entry("weight", entry, torch.zeros(4, 3), shape=(2, 3), source=src)


def test_stage_entry_runs_the_planned_adapter():
    model = nn.Linear(3, 4)
    checkpoint = nn.Linear(3, 2).state_dict()
    src = Source.from_state_dict(checkpoint)
    adapt = {"weight": {"name": "output_rows", "args": {"fill": "zeros"}}}
    entry = tg.plan(model, src, adapt=adapt).entries["weight"]
    assert entry.action == "adapt"
    staged = stage_entry("weight", entry, checkpoint["weight"], shape=(4, 3), source=src)
    assert staged.shape == (4, 3)
    assert torch.equal(staged[:2], checkpoint["weight"])  # output_rows keeps the rows the checkpoint has...
    assert torch.equal(staged[2:], torch.zeros(2, 3))  # ...and fills the new ones as asked


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64])
def test_count_nonfinite_matches_torch(dtype):
    t = torch.zeros(64, dtype=dtype)
    t[3] = float("nan")
    t[5] = float("inf")
    t[7] = float("-inf")
    t[9] = float("nan")
    assert count_nonfinite(t) == {"nan": int(torch.isnan(t).sum()), "inf": int(torch.isinf(t).sum())} == {
        "nan": 2,
        "inf": 2,
    }
    assert count_nonfinite(torch.ones(8, dtype=dtype)) is None


def test_count_nonfinite_counts_exactly_when_only_the_sum_overflows():
    t = torch.full((4,), 60000.0, dtype=torch.float16)  # finite values whose float16 sum would not be
    assert count_nonfinite(t) is None
    big = torch.full((4,), 3e38, dtype=torch.float32)  # the float32 sum overflows, every value is finite
    assert count_nonfinite(big) is None


def test_count_nonfinite_float8():
    t = torch.tensor([1.0, float("nan"), 2.0]).to(torch.float8_e4m3fn)
    assert count_nonfinite(t) == {"nan": 1, "inf": 0}


def test_error_builders_name_the_checkpoint_and_every_tensor():
    src = Source.from_state_dict({}, name="ckpt.pt")
    plan = tg.plan(nn.Linear(2, 2), src)
    with pytest.raises(tg.LoadError, match=r"ckpt.pt \(state-dict\) does not fit Net \(strict=True\)") as e:
        raise strict_error(src, "Net", plan)
    assert "missing: weight [2, 2]" in str(e.value) and "fix: ignore_missing=" in str(e.value)
    with pytest.raises(tg.LoadError, match=r"holds NaN or Inf values \(check_finite='error'\)") as e:
        raise nonfinite_error(src, {"w": {"nan": 2, "inf": 1}})
    assert "w: 2 NaN, 1 Inf" in str(e.value)


# ---------------------------------------------------------------------------
# slot, live, retie


def test_slot_and_live_find_parameters_and_buffers():
    model = TinyNet()
    view = TargetView.of(model)
    assert slot(model.bn, "running_mean") is model.bn.running_mean
    assert slot(model.head, "weight") is model.head.weight
    assert slot(model.head, "nothing") is None
    assert live(view, "bn.running_var") is model.bn.running_var
    with pytest.raises(KeyError, match="head.nothing"):
        live(view, "head.nothing")


def test_retie_restores_ties_keeping_the_loaded_tensor():
    model = Tied()
    view = TargetView.of(model)
    checkpoint = {"decoder.weight": torch.randn(6, 4)}  # the tie saved under its second name
    plan = tg.plan(model, Source.from_state_dict(checkpoint))
    loaded = nn.Parameter(checkpoint["decoder.weight"].clone())
    model.decoder._parameters["weight"] = loaded  # an assignment broke the tie
    changed: list[nn.Module] = []
    retie(view, plan, before_change=changed.append)
    assert model.embed.weight is loaded and model.decoder.weight is loaded
    assert changed == [model.embed]
    model.decoder._parameters["weight"] = nn.Parameter(torch.zeros(6, 4))
    retie(view)  # without a plan: the first name's tensor is kept
    assert model.decoder.weight is model.embed.weight is loaded


# ---------------------------------------------------------------------------
# The tensor's path: a source opened from a path is closed; zero-copy tensors stay valid


def _mapping_of(tensor: torch.Tensor) -> str | None:
    """The /proc/self/maps line of the memory ``tensor`` lives in."""
    ptr = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        low, high = (int(x, 16) for x in line.split()[0].split("-"))
        if low <= ptr < high:
            return line
    return None


@pytest.fixture
def closes(monkeypatch) -> list[Source]:
    """Every Source closed during the test."""
    closed: list[Source] = []
    original = Source.close

    def close(self: Source) -> None:
        closed.append(self)
        original(self)

    monkeypatch.setattr(Source, "close", close)
    return closed


def test_load_closes_a_source_it_opened_and_zero_copy_tensors_stay_valid(tmp_path, closes):
    torch.manual_seed(0)
    file = tmp_path / "net.safetensors"
    save_file(TinyNet().state_dict(), file)
    with torch.device("meta"):
        model = TinyNet()
    report = tg.load(model, file, strict=True)
    assert report.ok
    assert [s.path for s in closes] == [str(file)]
    gc.collect()  # nothing but the model holds the library's handle now
    if Path("/proc/self/maps").exists():  # Linux: the weights are the file's pages, not copies
        mapping = _mapping_of(model.conv.weight)
        assert mapping is not None and mapping.endswith(str(file.resolve())), mapping
    twin = TinyNet()
    twin.load_state_dict(load_file(file))
    for name, value in twin.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model.eval()(x), twin.eval()(x))


def test_load_closes_a_sharded_source_it_opened(tmp_path, closes):
    import json

    state = TinyNet().state_dict()
    names = list(state)
    save_file({n: state[n] for n in names[:3]}, tmp_path / "a.safetensors")
    save_file({n: state[n] for n in names[3:]}, tmp_path / "b.safetensors")
    weight_map = {n: "a.safetensors" if i < 3 else "b.safetensors" for i, n in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = TinyNet()
    tg.load(model, tmp_path, strict=True)
    assert str(tmp_path / "model.safetensors.index.json") in [s.path for s in closes]
    for name, value in state.items():
        assert torch.equal(model.state_dict()[name], value), name


def test_load_closes_the_source_it_opened_when_it_fails(tmp_path, closes):
    file = tmp_path / "net.safetensors"
    save_file(TinyNet().state_dict(), file)
    with pytest.raises(tg.LoadError, match="does not fit"):
        tg.load(TinyNet(num_classes=2), file, strict=True)
    assert [s.path for s in closes] == [str(file)]


def test_load_leaves_a_source_it_was_given_open(tmp_path, closes):
    file = tmp_path / "net.safetensors"
    save_file(TinyNet().state_dict(), file)
    src = tg.open(file)
    tg.load(TinyNet(), src)
    assert closes == []
    assert torch.equal(src["head.bias"].load(), load_file(file)["head.bias"])  # still usable
    src.close()


def test_safetensors_refs_know_their_file(tmp_path):
    file = tmp_path / "net.safetensors"
    save_file(TinyNet().state_dict(), file)
    with tg.open(file) as src:
        assert {ref.file for ref in src.values()} == {str(file)}
    assert tg.open(TinyNet().state_dict())["conv.weight"].file is None


def test_distributed_load_reads_no_safetensors_header_again(tmp_path, monkeypatch):
    """The storage reader finds each tensor's file on its ref: the header is parsed once, when opening."""
    tgd = pytest.importorskip("torchgraft.distributed")

    file = tmp_path / "net.safetensors"
    state = TinyNet().state_dict()
    save_file(state, file)
    src = tg.open(file)
    original = Path.open

    def no_second_read(self: Path, *args, **kwargs):
        if self == file:
            raise AssertionError("the safetensors header was read again")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", no_second_read)  # the tensor bytes come through safetensors' own reader
    model = TinyNet()
    report = tgd.load(model, src, strict=True)
    assert report.bytes_read == [sum(t.numel() * t.element_size() for t in state.values())]
    for name, value in state.items():
        assert torch.equal(model.state_dict()[name], value), name
    src.close()
