"""torchgraft.distributed: DCP sources, conversion, single-process runs, and torchrun on 2 and 3 CPU ranks.

The ``distributed``-marked tests start ``torchrun --nproc_per_node N`` (gloo backend, CPU) on
tests/distributed_worker.py, which compares tensors on the ranks; here we check what it reports:
bytes read per rank, identical reports. They run in CI; ``-m "not distributed"`` skips them.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn

import torchgraft as tg
import torchgraft.distributed as tgd
from tests.conftest import TinyNet

transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")

WORKER = Path(__file__).with_name("distributed_worker.py")


def _dcp_save(state: dict, path: Path) -> None:
    tgd._dcp_call(dcp.save, state, storage_writer=dcp.FileSystemWriter(path), no_dist=True)


@pytest.fixture(scope="module")
def minilm_dcp(minilm_dir, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("dcp") / "minilm"
    tgd.convert_to_dcp(minilm_dir, dest)
    return dest


# DCP checkpoints as sources ------------------------------------------------------------


def test_open_dcp_lists_names_from_metadata_without_reading_bytes(minilm_dir, minilm_dcp, tmp_path):
    original = tg.open(minilm_dir)
    src = tg.open(minilm_dcp)
    assert src.format == "dcp" and src.container == ""
    assert {k: (r.shape, r.dtype) for k, r in src.items()} == {k: (r.shape, r.dtype) for k, r in original.items()}
    assert torch.equal(src["pooler.dense.weight"].load(), original["pooler.dense.weight"].load())
    # the data file is not needed to list the checkpoint; reading a tensor then says what is wrong
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / ".metadata").write_bytes((minilm_dcp / ".metadata").read_bytes())
    listed = tg.open(bare / ".metadata")
    assert len(listed) == len(original)
    with pytest.raises(tg.CheckpointError, match="__0_0.distcp"):
        listed["pooler.dense.bias"].load()


def test_dcp_training_checkpoint_finds_the_model_container(tmp_path):
    model = TinyNet()
    _dcp_save({"model": model.state_dict(), "optim": {"lr": torch.tensor(0.1)}, "step": 7}, tmp_path / "ckpt")
    src = tg.open(tmp_path / "ckpt")
    assert src.container == "model"
    assert sorted(src) == sorted(model.state_dict())
    assert "step" in src.skipped
    fresh = TinyNet()
    report = tg.load(fresh, tmp_path / "ckpt", strict=True)
    assert report.ok and torch.equal(fresh.head.weight, model.head.weight)
    assert tg.open(tmp_path / "ckpt", container="optim").container == "optim"
    with pytest.raises(tg.CheckpointError, match="container 'ema' is not in the file"):
        tg.open(tmp_path / "ckpt", container="ema")
    with pytest.raises(tg.CheckpointError, match="'step' is not a tensor of this DCP checkpoint"):
        tgd.read_dcp_tensor(tmp_path / "ckpt", "step")


def test_dcp_metadata_is_never_unpickled_freely(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    ckpt = tmp_path / "evil"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(tg.UnsafeCheckpointError, match=r"posix\.system|nt\.system"):
        tg.open(ckpt)
    assert not (tmp_path / "pwned").exists()


def test_dcp_data_files_must_stay_inside_the_checkpoint(tmp_path):
    from torch.distributed.checkpoint.metadata import MetadataIndex

    _dcp_save({"w": torch.ones(2)}, tmp_path / "ckpt")
    metadata = pickle.loads((tmp_path / "ckpt" / ".metadata").read_bytes())
    info = metadata.storage_data[MetadataIndex("w", torch.Size([0]))]
    info.relative_path = "../../etc/passwd"
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(tg.CheckpointError, match=r"points 'w' at '../../etc/passwd', outside the checkpoint"):
        tg.open(tmp_path / "ckpt")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (pickle.dumps({"not": "metadata"}), "holds a dict, not DCP Metadata"),
        (b"\x80\x04\x95", "not a readable DCP metadata pickle"),
    ],
)
def test_dcp_metadata_that_is_not_dcp(tmp_path, content, message):
    (tmp_path / ".metadata").write_bytes(content)
    with pytest.raises(tg.CheckpointError, match=message):
        tg.open(tmp_path)


def test_dcp_with_only_bytes_is_refused(tmp_path):
    _dcp_save({"step": 3}, tmp_path / "ckpt")
    with pytest.raises(tg.CheckpointError, match="holds no tensors"):
        tg.open(tmp_path / "ckpt")


# Conversion -----------------------------------------------------------------------------


def test_convert_to_dcp_and_back_round_trips(minilm_dir, minilm_dcp, tmp_path):
    result = tgd.convert_from_dcp(minilm_dcp, f"{tmp_path / 'back'}/")
    assert result.tensors == 104
    back, original = tg.open(tmp_path / "back"), tg.open(minilm_dir)
    assert back.format == "safetensors" and sorted(back) == sorted(original)
    assert all(torch.equal(back[k].load(), original[k].load()) for k in original)


def test_convert_to_dcp_refuses_to_overwrite_unless_forced(tmp_path):
    dest = tmp_path / "out"
    first = tgd.convert_to_dcp({"w": torch.ones(2)}, dest)
    assert first.files == [".metadata", "__0_0.distcp"] and first.tensors == 1 and first.bytes == 8
    with pytest.raises(FileExistsError, match="pass force=True"):
        tgd.convert_to_dcp({"w": torch.zeros(3)}, dest)
    assert tg.open(dest)["w"].shape == (2,)
    tgd.convert_to_dcp({"w": torch.zeros(3)}, dest, force=True)
    assert tg.open(dest)["w"].shape == (3,)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directories left


def test_convert_to_dcp_leaves_nothing_when_the_source_fails(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(tg.CheckpointError, match="not valid JSON"):
        tgd.convert_to_dcp(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# load() in one process (no process group) --------------------------------------------------


def test_single_process_equals_tg_load(minilm_dir):
    config = transformers.BertConfig.from_pretrained(minilm_dir, num_labels=2)
    with torch.device("meta"):
        ours, reference = (
            transformers.BertForTokenClassification(config),
            transformers.BertForTokenClassification(config),
        )
    report = tgd.load(ours, minilm_dir, seed=5)
    torch.manual_seed(5)
    expected = tg.load(reference, minilm_dir)
    src = tg.open(minilm_dir)
    assert report.world_size == 1 and report.bytes_read == [
        src.nbytes - (384 * 384 + 384) * 4 - src["embeddings.position_ids"].nbytes
    ]  # all but the pooler, and position_ids, which the model computes (on meta as on CPU)
    assert report.missing == expected.missing and report.initialised == expected.initialised
    a, b = ours.state_dict(), reference.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_default_seed_is_rank0_state_and_leaves_it_untouched():
    torch.manual_seed(11)
    net, reference = TinyNet(), TinyNet()
    base = {k: v for k, v in TinyNet().state_dict().items() if not k.startswith("head.")}
    state = torch.get_rng_state()
    tgd.load(net, base)
    assert torch.equal(torch.get_rng_state(), state)  # not advanced
    tg.load(reference, base)  # a single-process load from the same random state
    assert torch.equal(net.head.weight, reference.head.weight)
    assert not torch.equal(torch.get_rng_state(), state)


def test_tied_weights_of_a_meta_model_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

    source = {"emb.weight": torch.randn(10, 4)}
    with torch.device("meta"):
        model = Tied()
    report = tgd.load(model, source, strict=True)
    assert report.tied == {"out.weight": "tied to emb.weight"}
    assert model.out.weight is model.emb.weight and torch.equal(model.emb.weight, source["emb.weight"])


def test_read_failure_leaves_the_model_unchanged():
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = TinyNet().state_dict()

    def broken():
        raise tg.CheckpointError("disk", "simulated read failure")

    entries = {
        k: tg.TensorRef(
            k, tuple(v.shape), str(v.dtype).removeprefix("torch."), (lambda v=v: v) if k != "head.bias" else broken
        )
        for k, v in good.items()
    }
    with pytest.raises(tg.CheckpointError, match="simulated read failure"):
        tgd.load(model, tg.Source(entries, path="flaky", format="state-dict"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_torch_zip_and_adapters_in_one_process(tmp_path):
    src = TinyNet(num_classes=6)
    torch.save(src.state_dict(), tmp_path / "net.pt")
    model, reference = TinyNet(num_classes=4), TinyNet(num_classes=4)
    report = tgd.load(model, tmp_path / "net.pt", adapt={"head.*": "output_rows"})
    tg.load(reference, tmp_path / "net.pt", adapt={"head.*": "output_rows"})
    assert report.format == "torch-zip" and set(report.adapted) == {"head.weight", "head.bias"}
    assert torch.equal(model.head.weight, reference.head.weight) and torch.equal(model.conv.weight, src.conv.weight)


def test_bytes_read_counts_what_each_format_reads(tmp_path):
    src = TinyNet()
    torch.save(src.state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    report = tgd.load(TinyNet(num_classes=2), tmp_path / "legacy.pth")  # head mismatched: not read
    assert report.format == "torch-legacy"
    assert report.bytes_read == [
        sum(v.numel() * v.element_size() for k, v in src.state_dict().items() if not k.startswith("head."))
    ]


def test_nonfinite_values_are_reported_or_refused():
    source = TinyNet().state_dict()
    source["head.weight"][0, :3] = float("nan")
    source["conv.weight"][0, 0, 0, 0] = float("inf")
    report = tgd.load(TinyNet(), source, check_finite="warn")
    assert report.nonfinite == {"conv.weight": {"nan": 0, "inf": 1}, "head.weight": {"nan": 3, "inf": 0}}
    model = TinyNet()
    before = model.head.weight.detach().clone()
    with pytest.raises(tg.LoadError, match=r"NaN or Inf values \(check_finite='error'\)"):
        tgd.load(model, source, check_finite="error")
    assert torch.equal(model.head.weight, before)
    with pytest.raises(ValueError, match="check_finite must be"):
        tgd.load(model, source, check_finite="yes")  # type: ignore[arg-type]


def test_strict_and_stale_plans_are_refused(minilm_dir):
    model = TinyNet()
    with pytest.raises(tg.LoadError, match=r"does not fit TinyNet \(strict=True\)"):
        tgd.load(model, {"conv.weight": model.conv.weight.detach().clone()}, strict=True)
    plan = tg.plan(TinyNet(num_classes=3), TinyNet(num_classes=3).state_dict())
    with pytest.raises(tg.PlanError, match="stale plan"):
        tgd.load(model, model.state_dict(), plan=plan)


def test_layouts_it_cannot_load_into_fail_before_reading():
    model = TinyNet()
    model.head.weight.ds_id = 3  # what DeepSpeed ZeRO-3 puts on a partitioned parameter
    with pytest.raises(tg.LoadError, match=r"head\.weight: a DeepSpeed ZeRO-3 partition"):
        tgd.load(model, TinyNet().state_dict())


def test_process_group_without_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(tg.LoadError, match="torch.distributed is not initialised"):
        tgd.load(TinyNet(), TinyNet().state_dict(), process_group=object())  # type: ignore[arg-type]


def test_source_storage_reader_reads_only_the_requested_slice(minilm_dir):
    reader = tgd.SourceStorageReader(tg.open(minilm_dir))
    bias = torch.empty(384)
    tgd._dcp_call(dcp.load, {"pooler.dense.bias": bias}, storage_reader=reader, no_dist=True)
    assert reader.bytes_read == 384 * 4
    assert torch.equal(bias, tg.open(minilm_dir)["pooler.dense.bias"].load())


# torchrun: 2 and 3 ranks on the CPU -----------------------------------------------------------


@pytest.fixture(scope="module")
def torchrun_inputs(minilm_dir, minilm_dcp, tmp_path_factory) -> dict[str, Path]:
    """The real checkpoint as 3 safetensors shards with an index, as DCP, and as a torch zip file."""
    root = tmp_path_factory.mktemp("torchrun")
    src = tg.open(minilm_dir)
    keys = list(src)
    sharded = root / "sharded"
    sharded.mkdir()
    weight_map = {}
    for i, part in enumerate([keys[:40], keys[40:80], keys[80:]], 1):
        name = f"model-{i:05d}-of-00003.safetensors"
        save_file({k: src[k].load().contiguous() for k in part}, sharded / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    torch.save({k: r.load() for k, r in src.items()}, root / "pytorch_model.bin")
    return {"minilm": minilm_dir, "sharded": sharded, "dcp": minilm_dcp, "torch": root / "pytorch_model.bin"}


@pytest.mark.distributed
@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is needed"
)
@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_fsdp2_cpu(nproc, torchrun_inputs, tmp_path):
    inputs = torchrun_inputs
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(WORKER),
        str(inputs["minilm"]),
        str(inputs["sharded"]),
        str(inputs["dcp"]),
        str(inputs["torch"]),
        str(tmp_path),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(WORKER.parent.parent), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, env=env)
    for _ in range(2):
        if done.returncode == 0 or "Signal 6 (SIGABRT)" not in done.stderr or "[rank" in done.stderr:
            break
        # A rank killed by SIGABRT with no Python error from any rank: seen in 3 of ~10 full-suite runs on
        # 2026-12-06 (also before that day's changes), never when this test ran alone. Run again, saying so,
        # with the lines that may name the cause; a worker's own assertion or exception is never retried.
        clues = [ln for ln in done.stderr.splitlines() if any(w in ln for w in ("terminate", "what()", "gloo", "abort"))]
        warnings.warn(f"torchrun aborted without a Python error, run again; clues: {clues[:8]}", stacklevel=1)
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, (
        f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[:3000]}\n...\n{done.stderr[-6000:]}"
    )
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == nproc
    runs = result["rank_results"]
    total = tg.open(inputs["minilm"]).nbytes

    for name in ("fsdp_bert_model", "fsdp_token_classification", "torch_zip"):
        reports = [r["report"] for r in runs[name]]
        assert all(r == reports[0] for r in reports), f"{name}: reports differ between ranks"
        read = reports[0]["bytes_read"]
        # each rank read exactly its own shards (plus the small replicated buffers), about 1/N of the bytes
        assert read == [r["expected"] for r in runs[name]], name
        assert max(read) <= total / nproc * 1.01, (name, read, total)
        assert sum(read) >= 0.95 * total, (name, read, total)

    # a plain replicated model: every rank reads everything
    replicated = runs["replicated"][0]["report"]
    assert replicated["bytes_read"] == [runs["replicated"][0]["expected"]] * nproc

    # DCP: a checkpoint saved by one process is read whole per chunk; one saved by N ranks, 1/N per rank
    dcp_saved_by_one = runs["dcp_source"][0]["report"]["bytes_read"]
    assert min(dcp_saved_by_one) > 0.99 * total
    by_n = runs["dcp_source"][0]["sharded_report"]["bytes_read"]
    assert max(by_n) <= total / nproc * 1.02, by_n

    assert runs["fsdp_adapters"][0]["adapted"] == [
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.word_embeddings.weight",
    ]
    assert runs["errors"][0]["errors"] == 5
    assert runs["nonfinite"][0]["nonfinite"] == {"weight": {"nan": 7, "inf": 0}, "bias": {"nan": 0, "inf": 1}}


def test_distributed_path_checks_dcp_chunks_before_torch_unpickles_them(tmp_path):
    """tgd.load reads DCP chunks through the same reader as tg.open: a hostile chunk is refused, not unpickled.

    In a child process: without the check, torch's unpickler segfaults on this chunk.
    """
    script = f"""
import sys, torch
from torch import nn
sys.path.insert(0, {str(Path(__file__).parent / "hostile")!r})
import make_corpus
import torchgraft as tg, torchgraft.distributed as tgd
root = __import__("pathlib").Path({str(tmp_path)!r})
make_corpus.build(root, ["dcp_distcp_deep_tuple"])
case = next(c for c in make_corpus.CASES if c.name == "dcp_distcp_deep_tuple")
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 3)
try:
    tgd.load(Net(), root / case.path)
except tg.CheckpointError as e:
    print("REFUSED", e)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "REFUSED" in done.stdout and "cannot be read safely" in done.stdout, done.stdout[-2000:]


def test_loading_code_the_distributed_path_does_not_run_is_said_not_silently_skipped(caplog):
    """tg.load runs modules' own loading code and set_extra_state; tgd.load does not, and says so."""
    import logging

    class Extra(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.state = {"step": 0}

        def get_extra_state(self):
            return dict(self.state)

        def set_extra_state(self, state):
            self.state = dict(state)

    src = Extra()
    src.state = {"step": 7}
    model = Extra()
    with caplog.at_level(logging.WARNING, logger="torchgraft"):
        report = tgd.load(model, src.state_dict())
    assert model.state == {"step": 0}  # not set by this executor ...
    assert any("it does not call set_extra_state with the checkpoint's extra state (_extra_state)" in n for n in report.notes)
    assert "Load the model with torchgraft.load before sharding it" in caplog.text  # ... and said loudly
    plain = tgd.load(TinyNet(), TinyNet().state_dict())
    assert not any("it does not" in n for n in plain.notes)
