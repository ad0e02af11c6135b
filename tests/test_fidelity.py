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


# --- transformers: initialisation of missing entries and non-persistent buffers -----------------------

transformers = pytest.importorskip("transformers")


def _tiny_clip():
    from transformers import CLIPConfig

    text = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    vision = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16)
    return CLIPConfig(
        text_config={**text, "max_position_embeddings": 16}, vision_config={**vision, "patch_size": 8}, projection_dim=64
    )


@pytest.mark.parametrize("meta", [False, True], ids=["cpu", "meta"])
def test_missing_entries_initialised_like_from_pretrained(tmp_path, meta, caplog):
    """CLIP's parent rules set its projections' scale: std 64**-0.5 = 0.125, not the 0.02 of a lone Linear."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPModel

    config = _tiny_clip()
    CLIPModel(config).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    dropped = ["text_projection.weight", "visual_projection.weight", "text_model.encoder.layers.0.self_attn.q_proj.weight"]
    for k in [*dropped, "logit_scale"]:
        del state[k]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    torch.manual_seed(0)
    reference, info = CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    if meta:
        with torch.device("meta"):
            model = CLIPModel(config)
    else:
        model = CLIPModel(config)
    with caplog.at_level(logging.WARNING, logger="torchgraft"):
        report = tg.load(model, tmp_path)
    assert set(report.missing) == set(info["missing_keys"]) == {*dropped, "logit_scale"}
    ours, theirs = model.state_dict(), reference.state_dict()
    for k in dropped:  # same rule, other random draws: the spread must agree
        ratio = float(ours[k].std() / theirs[k].std())
        assert 0.85 < ratio < 1.15, (k, ratio)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs if k not in report.missing)
    # logit_scale has no rule in CLIP's _init_weights: from_pretrained leaves torch.empty memory there
    # (the reference is undefined). torchgraft keeps the constructor's value, or says plainly it is zero.
    if meta:
        assert report.initialised[""] == "zeros" and model.logit_scale.item() == 0.0
        assert "logit_scale" in caplog.text and "NOT initialised" in caplog.text
    else:
        assert model.logit_scale.item() == pytest.approx(config.logit_scale_init_value)


def test_non_persistent_buffers_on_meta_report_like_cpu():
    from transformers import BertConfig, BertModel

    from torchgraft.demo.assets import AssetMissing, minilm_dir

    try:
        path = minilm_dir()
    except AssetMissing as e:
        pytest.skip(str(e))
    config = BertConfig.from_pretrained(path)
    assert "embeddings.position_ids" in tg.open(path)  # the checkpoint holds the buffer: it must not be loaded on meta only
    reports = []
    for meta in (False, True):
        if meta:
            with torch.device("meta"):
                model = BertModel(config)
        else:
            model = BertModel(config)
        report = tg.load(model, path).to_dict()
        report.pop("seconds")
        reports.append(report)
        assert torch.equal(model.embeddings.position_ids, torch.arange(config.max_position_embeddings)[None])
        assert not model.embeddings.token_type_ids.any()
    assert reports[0] == reports[1]


class _Pos(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("pos", torch.arange(4) * 0.5 + 1, persistent=False)


def test_non_persistent_buffer_nothing_can_compute_is_never_silent_zeros(caplog):
    torch.manual_seed(0)
    src = _Pos().state_dict()
    with torch.device("meta"):
        model = _Pos()
    with caplog.at_level(logging.WARNING, logger="torchgraft"):
        report = tg.load(model, src)
    assert report.initialised == {"": "zeros"} and not model.pos.any()
    assert "left as zeros in (root)" in caplog.text


# --- a checkpoint that does not belong to the model (issue 13.13) ---------------------------------------


def test_a_checkpoint_of_another_network_gets_one_loud_verdict(caplog):
    from torchgraft.demo.assets import AssetMissing, minilm_dir
    from torchgraft.demo.mobilenet_v2 import mobilenet_v2

    try:
        path = minilm_dir()
    except AssetMissing as e:
        pytest.skip(str(e))
    with pytest.raises(tg.LoadError) as e:
        tg.load(mobilenet_v2(), path, strict=True)
    text = str(e.value)
    assert text.startswith("The checkpoint ") and "does not belong to MobileNetV2" in text.splitlines()[0]
    assert "only 0 of the model's 262 entries and 0 of the checkpoint's 104 entries fit" in text
    assert "another architecture or task" in text
    # grouped like the report (not 366 lines), and no option is offered as a fix for another network
    assert len(e.value.problems) <= 4 and e.value.problems[0].startswith("missing (262): ")
    assert not any(p.startswith("fix:") for p in e.value.problems)
    model = mobilenet_v2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="torchgraft"):
        report = tg.load(model, path)
    assert caplog.records[0].getMessage() == report.verdict and "does not belong" in report.verdict
    assert report.to_dict()["verdict"] == report.verdict
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "running" in k)


def test_the_same_network_under_other_names_is_told_to_align():
    src = {f"blk_{k}": v for k, v in TinyNet().state_dict().items()}  # every name changed, every shape the same
    plan = tg.plan(TinyNet(), src)
    assert "does not belong to TinyNet" in plan.verdict and "Pass align=True" in plan.verdict
    assert any(f.startswith("align=True") for f in plan.fixes())
    assert tg.plan(TinyNet(), src, align=True).verdict == ""  # aligned, it fits


def test_a_checkpoint_that_mostly_fits_has_no_verdict():
    src = {k: v for k, v in TinyNet().state_dict().items() if not k.startswith("head.")}
    plan = tg.plan(TinyNet(), src)
    assert plan.missing == ["head.weight", "head.bias"] and plan.verdict == ""
    assert tg.Plan.from_dict(plan.to_dict()).verdict == ""
# ---------------------------------------------------------------------------
# Against torch's load_state_dict (issue 13, items 1-4 and 7): model built on CPU (copy) and on meta (assign)


def _built(cls, meta: bool, *args):
    if meta:
        with torch.device("meta"):
            return cls(*args)
    return cls(*args)


def _save(tmp_path, state_dict, fmt: str):
    """The state dict as a torch zip, legacy or safetensors file."""
    if fmt == "safetensors":
        from safetensors.torch import save_file

        f = tmp_path / "ckpt.safetensors"
        save_file({k: v.contiguous() for k, v in state_dict.items()}, f)
        return f
    f = tmp_path / "ckpt.pt"
    torch.save(state_dict, f, _use_new_zipfile_serialization=fmt == "zip")
    return f


def _torch_load(f):
    if str(f).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(f)
    return torch.load(f, weights_only=True)


class _Hooked(nn.Module):
    """Load hooks on the root, on a container without tensors of its own, and one with the module bound."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        self.log: list[tuple] = []
        self.register_load_state_dict_pre_hook(self._pre)
        self.register_load_state_dict_post_hook(self._post)
        self.inner.register_load_state_dict_pre_hook(self._pre)
        self.inner[1]._register_load_state_dict_pre_hook(self._pre_with_module, with_module=True)
        self.inner[2].register_load_state_dict_post_hook(self._post)

    def _pre(self, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        self.log.append(("pre", type(module).__name__, prefix, sorted(state_dict), local_metadata))

    def _pre_with_module(self, module, state_dict, prefix, *args):
        self.log.append(("pre-own", type(module).__name__, prefix, sorted(state_dict)))

    def _post(self, module, incompatible):
        loaded = module.inner[2].weight if module is self else module.weight
        self.log.append(
            ("post", sorted(incompatible.missing_keys), sorted(incompatible.unexpected_keys), loaded.sum().item())
        )


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
@pytest.mark.parametrize("meta", [False, True], ids=["cpu", "meta"])
def test_load_hooks_run_like_torch(tmp_path, meta, fmt):
    torch.manual_seed(0)
    sd = _Hooked().state_dict()
    del sd["inner.0.bias"]  # a missing entry, for the post-hooks' incompatible keys
    f = _save(tmp_path, sd, fmt)
    oracle = _Hooked()
    oracle.load_state_dict(_torch_load(f), strict=False, assign=meta)
    model = _built(_Hooked, meta)
    report = tg.load(model, f)
    assert len(oracle.log) == 5 and model.log == oracle.log  # 3 pre-hooks, 2 post-hooks
    assert report.missing == ["inner.0.bias"]


class _PostFails(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.lstm = nn.LSTM(3, 3)
        self.register_load_state_dict_post_hook(self._post)

    def _post(self, module, incompatible):
        raise RuntimeError("post-hook refused")


@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_a_failing_post_hook_leaves_the_model_unchanged(dtype):
    model = _PostFails()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="post-hook refused"):
        tg.load(model, _PostFails().state_dict(), dtype=dtype)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_stock_copies_no_hook_can_observe_are_not_backed_up(monkeypatch):
    """Only what runs before the last hook in torch's order is copied aside; the rest is copied last, as before."""
    from torchgraft import apply

    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].register_load_state_dict_pre_hook(lambda *args: None)
    cloned = []
    original = apply._Undo.values
    monkeypatch.setattr(apply._Undo, "values", lambda self, t: (cloned.append(t), original(self, t)))
    src = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)).state_dict()
    tg.load(model, src, strict=True)
    assert {id(t) for t in cloned} == {id(t) for t in [*model[0].parameters(), *model[1].parameters()]}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in src.items())


class _Extra(nn.Module):
    """Non-tensor extra state (a dict), saved by torch.save and given back to set_extra_state."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.state = {"step": 0}

    def get_extra_state(self):
        return dict(self.state)

    def set_extra_state(self, state):
        self.state = dict(state)


class _ExtraHolder(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Extra()
        self.head = nn.Linear(2, 2)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("meta", [False, True], ids=["cpu", "meta"])
def test_extra_state_goes_to_set_extra_state_like_torch(tmp_path, meta, fmt):
    saved = _ExtraHolder()
    saved.block.state = {"step": 7, "name": "x"}
    f = _save(tmp_path, saved.state_dict(), fmt)
    oracle = _ExtraHolder()
    oracle.load_state_dict(_torch_load(f), assign=meta)
    model = _built(_ExtraHolder, meta)
    report = tg.load(model, f, strict=True)
    assert model.block.state == oracle.block.state == {"step": 7, "name": "x"}
    assert torch.equal(model.block.lin.weight, oracle.block.lin.weight)
    assert "extra state given to set_extra_state: block._extra_state" in report.notes
    assert tg.open(f).extra_state == {"block._extra_state": {"step": 7, "name": "x"}}


def test_strict_refuses_missing_extra_state_like_torch():
    sd = {k: v for k, v in _ExtraHolder().state_dict().items() if k != "block._extra_state"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"block\._extra_state\""):
        _ExtraHolder().load_state_dict(sd, strict=True)
    model = _ExtraHolder()
    with pytest.raises(tg.LoadError, match=r"missing: block\._extra_state \(set_extra_state\)"):
        tg.load(model, sd, strict=True)
    report = tg.load(model, sd)
    assert "no extra state in the checkpoint for (set_extra_state not called): block._extra_state" in report.notes


def test_extra_state_set_before_a_failure_is_undone():
    class Failing(nn.Linear):
        def _load_from_state_dict(self, *args):
            raise RuntimeError("refused after the extra state was set")

    model = _ExtraHolder()
    model.head = Failing(2, 2)
    saved = _ExtraHolder()
    saved.block.state = {"step": 7}
    with pytest.raises(RuntimeError, match="refused after the extra state"):
        tg.load(model, saved.state_dict())
    assert model.block.state == {"step": 0}


class _Renamed(nn.Module):
    """Version 2 renamed the child ``fc`` to ``proj``; its own loading code converts version-1 checkpoints."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 3)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        if (local_metadata.get("version") or 1) < 2:
            for k in [k for k in state_dict if k.startswith(prefix + "fc.")]:
                state_dict[prefix + "proj." + k[len(prefix) + 3 :]] = state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


class _RenamedHolder(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Renamed()
        self.head = nn.Linear(3, 2)


def _version_1_file(tmp_path, fmt, extra=()):
    from collections import OrderedDict

    torch.manual_seed(1)
    new = _RenamedHolder().state_dict()
    sd = OrderedDict((k.replace("block.proj.", "block.fc."), v) for k, v in new.items())
    sd.update((k, torch.ones(1)) for k in extra)
    sd._metadata = {"": {"version": 1}, "block": {"version": 1}, "block.fc": {"version": 1}, "head": {"version": 1}}
    f = tmp_path / "old.pt"
    torch.save(sd, f, _use_new_zipfile_serialization=fmt == "zip")
    return f, new


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("meta", [False, True], ids=["cpu", "meta"])
def test_a_module_that_renames_keys_by_version_gets_its_subtree_like_torch(tmp_path, meta, fmt):
    f, new = _version_1_file(tmp_path, fmt)
    oracle = _RenamedHolder()
    result = oracle.load_state_dict(torch.load(f, weights_only=True), strict=True, assign=meta)
    model = _built(_RenamedHolder, meta)
    report = tg.load(model, f, strict=True)
    assert (report.missing, report.unexpected) == (result.missing_keys, result.unexpected_keys) == ([], [])
    assert all(torch.equal(model.state_dict()[k], oracle.state_dict()[k]) for k in new)
    assert torch.equal(model.block.proj.weight, new["block.proj.weight"])
    assert "block.proj.weight" in report.loaded and report.initialised == {}
    planned = tg.plan(_RenamedHolder(), f)  # the plan says who gets the old names
    assert planned.handed == {"block.fc.weight": "block.fc.weight", "block.fc.bias": "block.fc.bias"}
    assert "handed to the loading code of _Renamed at 'block'" in str(planned)
    assert "it may fill block.proj.{bias,weight}" in " ".join(planned.notes)


def test_what_a_module_s_own_code_leaves_unused_is_reported_unexpected(tmp_path):
    f, _ = _version_1_file(tmp_path, "zip", extra=["block.stale"])
    result = _RenamedHolder().load_state_dict(torch.load(f, weights_only=True), strict=False)
    report = tg.load(_RenamedHolder(), f)
    assert report.unexpected == result.unexpected_keys == ["block.stale"]
    with pytest.raises(tg.LoadError, match=r"unexpected: block\.stale \(left unused by the module's own"):
        tg.load(_RenamedHolder(), f, strict=True)


def test_the_distributed_executor_reports_handed_entries_unexpected(tmp_path):
    """torchgraft.distributed runs no module's own loading code: what the plan hands to it is said unused."""
    import torchgraft.distributed as tgd

    f, _ = _version_1_file(tmp_path, "zip")
    report = tgd.load(_RenamedHolder(), f)
    assert report.unexpected == ["block.fc.weight", "block.fc.bias"]
    with pytest.raises(tg.LoadError, match=r"unexpected: block\.fc\.weight"):
        tgd.load(_RenamedHolder(), f, strict=True)


def _old_spectral_norm_file(tmp_path, fmt):
    """A checkpoint of torch's spectral_norm before version 1: ``weight`` saved, no ``weight_v``."""
    torch.manual_seed(2)
    saved = nn.utils.spectral_norm(nn.Linear(4, 3))
    saved(torch.randn(2, 4))  # one power iteration, so u, v and weight are consistent
    sd = saved.state_dict()
    sd["weight"] = saved.weight.detach().clone()
    del sd["weight_v"]
    sd._metadata = {"": {"version": 1}}  # no "spectral_norm" version: the old layout
    if fmt == "safetensors":
        return _save(tmp_path, dict(sd), fmt)
    f = tmp_path / "sn.pt"
    torch.save(sd, f, _use_new_zipfile_serialization=fmt == "zip")
    return f


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
@pytest.mark.parametrize("meta", [False, True], ids=["cpu", "meta"])
def test_old_spectral_norm_checkpoint_converted_by_torch_s_hook(tmp_path, meta, fmt):
    f = _old_spectral_norm_file(tmp_path, fmt)
    oracle = nn.utils.spectral_norm(nn.Linear(4, 3))
    result = oracle.load_state_dict(_torch_load(f), assign=meta)
    model = nn.utils.spectral_norm(_built(nn.Linear, meta, 4, 3))
    report = tg.load(model, f)
    assert (report.missing, report.unexpected) == (result.missing_keys, result.unexpected_keys) == ([], [])
    ref = oracle.state_dict()
    assert ref.keys() == model.state_dict().keys()
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)
    oracle64 = nn.utils.spectral_norm(nn.Linear(4, 3).double())  # dtype=: the hook computes in float64
    oracle64.load_state_dict({k: v.double() for k, v in _torch_load(f).items()}, assign=meta)
    cast = nn.utils.spectral_norm(_built(nn.Linear, meta, 4, 3))
    tg.load(cast, f, dtype=torch.float64)
    assert all(torch.equal(cast.state_dict()[k], v) for k, v in oracle64.state_dict().items())


class _LazyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
@pytest.mark.parametrize("meta", [False, True], ids=["cpu", "meta"])
def test_lazy_module_materialised_in_the_checkpoint_s_shape_like_torch(tmp_path, meta, fmt):
    torch.manual_seed(3)
    saved = _LazyNet()
    saved(torch.randn(2, 4))  # runs the lazy head: (3, 5)
    f = _save(tmp_path, saved.state_dict(), fmt)
    oracle = _LazyNet()
    result = oracle.load_state_dict(_torch_load(f), assign=meta)
    model = _built(_LazyNet, meta)
    report = tg.load(model, f, strict=True)
    assert (report.missing, report.unexpected) == (result.missing_keys, result.unexpected_keys) == ([], [])
    assert model.head.weight.shape == (3, 5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in oracle.state_dict().items())
    x = torch.randn(2, 4)
    assert torch.equal(model(x), oracle(x))


def test_a_failed_load_leaves_a_lazy_module_lazy():
    saved = _LazyNet()
    saved(torch.randn(2, 4))
    model = _LazyNet()
    with pytest.raises(tg.LoadError, match="NaN"):
        tg.load(model, {**saved.state_dict(), "body.bias": torch.full((5,), float("nan"))}, check_finite="error")
    assert model.head.has_uninitialized_params()
    model.head.register_load_state_dict_post_hook(lambda module, keys: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        tg.load(model, saved.state_dict())
    assert model.head.has_uninitialized_params() and isinstance(model.head, nn.LazyLinear)
    model(torch.randn(2, 4))  # still infers its shape on the first run
    assert model.head.weight.shape == (3, 5)


def test_lazy_module_the_checkpoint_does_not_fill_stays_lazy_like_torch():
    sd = {k: v for k, v in _LazyNet().state_dict().items() if k.startswith("body.")}
    oracle = _LazyNet()
    result = oracle.load_state_dict(sd, strict=False)
    model = _LazyNet()
    report = tg.load(model, sd)
    assert report.missing == result.missing_keys == ["head.weight", "head.bias"]
    assert model.head.has_uninitialized_params() and report.initialised == {}


class _Recurrent(nn.Module):
    """RNNs cache their weights (``_flat_weights``); a module after them fails on demand."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, num_layers=2)
        self.gru = nn.GRU(3, 4)
        self.rnn = nn.RNN(3, 4)
        self.last = nn.Linear(4, 2)
        if fail:
            self.last.register_load_state_dict_post_hook(self._refuse)

    @staticmethod
    def _refuse(module, incompatible):
        raise RuntimeError("refused after the RNNs were loaded")

    def forward(self, x):
        return [m(x)[0] for m in (self.lstm, self.gru, self.rnn)]


def _flat_weights_follow_parameters(model: _Recurrent) -> bool:
    return all(
        all(w is getattr(m, n) for w, n in zip(m._flat_weights, m._flat_weights_names, strict=True))
        for m in (model.lstm, model.gru, model.rnn)
    )


@pytest.mark.parametrize("dtype", [None, torch.float64])
@pytest.mark.parametrize("drop", [False, True], ids=["all-loaded", "gru-initialised"])
def test_rnns_work_exactly_as_before_after_a_failed_load(dtype, drop):
    torch.manual_seed(4)
    model = _Recurrent(fail=True)
    x = torch.randn(2, 1, 3)
    before = [y.clone() for y in model(x)]
    sd = _Recurrent().state_dict()
    if drop:  # the GRU is initialised (and cast) before the failure
        sd = {k: v for k, v in sd.items() if not k.startswith("gru.")}
    with pytest.raises(RuntimeError, match="refused after the RNNs"):
        tg.load(model, sd, dtype=dtype)
    assert _flat_weights_follow_parameters(model)
    after = model(x)
    assert all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize("dtype", [None, torch.float64])
@pytest.mark.parametrize("meta", [False, True], ids=["cpu", "meta"])
def test_rnns_run_on_what_was_loaded_like_torch(meta, dtype):
    torch.manual_seed(5)
    sd = {k: v for k, v in _Recurrent().state_dict().items() if not k.startswith("gru.")}
    oracle = _Recurrent()
    cast = {k: v.to(dtype or v.dtype) for k, v in sd.items()}
    oracle.load_state_dict(cast, strict=False, assign=meta or dtype is not None)
    model = _built(_Recurrent, meta)
    tg.load(model, sd, dtype=dtype)
    assert _flat_weights_follow_parameters(model)
    x = torch.randn(2, 1, 3, dtype=dtype or torch.float32)
    assert torch.equal(model.lstm(x)[0], oracle.lstm(x)[0]) and torch.equal(model.rnn(x)[0], oracle.rnn(x)[0])
    assert model.gru(x)[0].dtype == x.dtype  # the initialised GRU was cast too, its cached weights with it


def test_rollback_puts_back_a_plain_tensor_held_among_parameters():
    """Some code stores plain tensors in ``_parameters``; ``__setattr__`` would refuse them, the undo must not."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    plain = torch.ones(3, 3)
    model[0]._parameters["weight"] = plain
    model[1].register_load_state_dict_post_hook(lambda module, keys: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        tg.load(model, nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)).state_dict(), dtype=torch.float64)
    assert model[0]._parameters["weight"] is plain and torch.equal(plain, torch.ones(3, 3))
