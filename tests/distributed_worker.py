"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node N`` (gloo, CPU); not a test module.

    torchrun --nproc_per_node 2 tests/distributed_worker.py MINILM_DIR SHARDED_DIR DCP_DIR TORCH_FILE WORKDIR

Every rank runs the same scenarios; tensors are compared here (they cannot be sent back), and
rank 0 writes what pytest checks (bytes read per rank, expected per-rank bytes, reports) to
WORKDIR/result.json.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.tensor import DTensor, Partial
from torch.nn.parallel import DistributedDataParallel
from transformers import BertConfig, BertForTokenClassification, BertModel

import torchgraft as tg
import torchgraft.distributed as tgd
from torchgraft.sources import Source, TensorRef

SEED = 1234
MINILM = ""  # the MiniLM directory, set by main()
WORKDIR = ""  # where results and checkpoints are written, set by main()


def shard(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    """FSDP2 as usual: each transformer layer, then the root."""
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def on_meta(cls, config):
    with torch.device("meta"):
        return cls(config)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gathered (unsharded) state dict; a collective: every rank calls it."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.full_tensor() if isinstance(v, DTensor) else v
    return out


def local_bytes(model: nn.Module, report) -> int:
    """What this rank must read: its shard of every sharded entry, every replicated entry whole."""
    sd = model.state_dict()
    total = 0
    for name in report.loaded:
        t = sd[name] if name in sd else dict(model.named_buffers())[name]
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def same_on_every_rank(obj) -> bool:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return all(o == out[0] for o in out)


def assert_equal_state(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], what: str) -> None:
    assert ours.keys() == reference.keys(), (what, ours.keys() ^ reference.keys())
    differ = [k for k in ours if not torch.equal(ours[k], reference[k])]
    assert not differ, f"{what}: gathered state differs from single-process tg.load in {differ[:5]}"


def scenario(fn):
    def run(*args):
        started = time.perf_counter()
        result = fn(*args)
        result["seconds"] = round(time.perf_counter() - started, 2)
        return result

    run.__name__ = fn.__name__
    return run


@scenario
def fsdp_bert_model(minilm: str, config: BertConfig) -> dict:
    model = on_meta(BertModel, config)
    shard(model, model.encoder.layer)
    report = tgd.load(model, minilm)
    assert report.ok and report.world_size == dist.get_world_size(), report.to_dict()
    assert same_on_every_rank(report.to_dict()), "the report differs between ranks"
    assert same_on_every_rank(str(report))
    expected = local_bytes(model, report)
    ours = full_state(model)
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        hidden = model.eval()(ids).last_hidden_state  # FSDP2 gathers the loaded shards (gloo)
    if dist.get_rank() == 0:
        reference = BertModel(config)
        tg.load(reference, minilm, strict=True)
        assert_equal_state(ours, reference.state_dict(), "FSDP2 BertModel")
        with torch.no_grad():
            assert torch.allclose(hidden, reference.eval()(ids).last_hidden_state, atol=1e-5), "forward differs"
    return {"report": report.to_dict(), "expected": expected, "total": tg.open(minilm).nbytes}


@scenario
def fsdp_token_classification(sharded: str, config: BertConfig) -> dict:
    cfg = BertConfig.from_pretrained(MINILM, num_labels=3)
    model = on_meta(BertForTokenClassification, cfg)
    shard(model, model.bert.encoder.layer)
    torch.manual_seed(dist.get_rank())  # ranks differ: the shared state must not depend on it
    report = tgd.load(model, sharded, seed=SEED)
    assert report.format == "sharded-safetensors", report.format
    assert report.prefix == {"mode": "add", "prefix": "bert."}, report.prefix
    assert report.missing == ["classifier.weight", "classifier.bias"], report.missing
    assert sorted(report.unexpected) == ["pooler.dense.bias", "pooler.dense.weight"], report.unexpected
    # the head; the embeddings' non-persistent buffers are computed by the model, as on a CPU build
    assert report.initialised == {"classifier": "transformers _init_weights"}, report.initialised
    assert same_on_every_rank(report.to_dict())
    expected = local_bytes(model, report)
    ours = full_state(model)
    if dist.get_rank() == 0:
        reference = on_meta(BertForTokenClassification, cfg)
        torch.manual_seed(SEED)
        tg.load(reference, sharded)
        assert_equal_state(ours, reference.state_dict(), "FSDP2 BertForTokenClassification")
        assert ours["classifier.weight"].std() > 0.01 and torch.equal(ours["classifier.bias"], torch.zeros(3))
    return {"report": report.to_dict(), "expected": expected}


@scenario
def fsdp_adapters(minilm: str, config: BertConfig) -> dict:
    """Adapted entries on sharded tensors: vocabulary rows added, positions interpolated."""
    cfg = BertConfig.from_pretrained(MINILM, num_labels=2, vocab_size=30528, max_position_embeddings=640)
    model = on_meta(BertForTokenClassification, cfg)
    shard(model, model.bert.encoder.layer)
    report = tgd.load(model, minilm, adapt="auto", seed=SEED)
    assert set(report.adapted) == {
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight",
    }
    assert "bert.embeddings.word_embeddings.weight" in report.sharded
    assert same_on_every_rank(report.to_dict())
    ours = full_state(model)
    if dist.get_rank() == 0:
        reference = on_meta(BertForTokenClassification, cfg)
        torch.manual_seed(SEED)
        tg.load(reference, minilm, adapt="auto")
        assert_equal_state(ours, reference.state_dict(), "adapted FSDP2 model")
    return {"adapted": sorted(report.adapted)}


@scenario
def dcp_source(dcp_dir: str, minilm: str, config: BertConfig) -> dict:
    model = on_meta(BertModel, config)
    shard(model, model.encoder.layer)
    report = tgd.load(model, dcp_dir)
    assert report.format == "dcp" and report.ok, report.to_dict()
    ours = full_state(model)
    if dist.get_rank() == 0:
        reference = BertModel(config)
        tg.load(reference, minilm)
        assert_equal_state(ours, reference.state_dict(), "FSDP2 BertModel from DCP")

    # a DCP checkpoint saved by every rank (one chunk per rank and tensor): each rank reads its own
    sharded_dcp = f"{WORKDIR}/dcp-saved-by-{dist.get_world_size()}-ranks"
    dcp.save(model.state_dict(), checkpoint_id=sharded_dcp)
    cfg = BertConfig.from_pretrained(MINILM, num_labels=2)
    head = on_meta(BertForTokenClassification, cfg)
    shard(head, head.bert.encoder.layer)
    second = tgd.load(head, sharded_dcp, seed=SEED)
    assert second.prefix == {"mode": "add", "prefix": "bert."} and second.missing == [
        "classifier.weight",
        "classifier.bias",
    ]
    gathered = full_state(head)
    if dist.get_rank() == 0:
        reference = on_meta(BertForTokenClassification, cfg)
        torch.manual_seed(SEED)
        tg.load(reference, minilm)
        assert_equal_state(
            gathered, reference.state_dict(), "FSDP2 BertForTokenClassification from a sharded DCP checkpoint"
        )
    return {"report": report.to_dict(), "sharded_report": second.to_dict()}


@scenario
def torch_zip(torch_file: str, minilm: str, config: BertConfig) -> dict:
    """A torch zip file (memory-mapped): each rank narrows its slices out of the mapping."""
    model = on_meta(BertModel, config)
    shard(model, model.encoder.layer)
    report = tgd.load(model, torch_file)
    assert report.format == "torch-zip" and report.ok, report.to_dict()
    ours = full_state(model)
    if dist.get_rank() == 0:
        reference = BertModel(config)
        tg.load(reference, minilm)
        assert_equal_state(ours, reference.state_dict(), "FSDP2 BertModel from a torch zip file")
    return {"report": report.to_dict(), "expected": local_bytes(model, report)}


@scenario
def replicated(sharded: str, config: BertConfig) -> dict:
    """A plain model on every rank: every rank reads everything and gets the same head."""
    cfg = BertConfig.from_pretrained(MINILM, num_labels=2)
    torch.manual_seed(dist.get_rank())
    model = BertForTokenClassification(cfg)  # materialised, different random values per rank
    report = tgd.load(DistributedDataParallel(model), sharded)  # the DDP wrapper is looked through
    head = model.classifier.weight.detach().clone()
    assert same_on_every_rank(head.tolist()), "the initialised head differs between ranks"
    assert same_on_every_rank(report.to_dict())
    return {"report": report.to_dict(), "expected": local_bytes(model, report)}


@scenario
def nonfinite() -> dict:
    """NaN / Inf counted on each rank's own shard, summed: the same totals and report everywhere."""
    torch.manual_seed(0)
    source = {"weight": torch.randn(7, 3), "bias": torch.randn(7)}
    source["weight"][:, 0] = float("nan")  # one per row: every shard holds some
    source["bias"][-1] = float("inf")
    model = nn.Linear(3, 7)
    fully_shard(model)
    report = tgd.load(model, source, check_finite="warn")
    assert report.nonfinite == {"weight": {"nan": 7, "inf": 0}, "bias": {"nan": 0, "inf": 1}}, report.nonfinite
    assert same_on_every_rank(report.to_dict())
    with pytest.raises(tg.LoadError, match="check_finite='error'"):
        tgd.load(model, source, check_finite="error")
    return {"nonfinite": report.nonfinite}


@scenario
def errors(minilm: str, config: BertConfig) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()

    # ranks holding different models (pipeline stages) are refused on every rank
    cfg = BertConfig.from_pretrained(MINILM, num_hidden_layers=2 if rank == world - 1 else 6)
    with pytest.raises(tg.LoadError, match="ranks hold different models"):
        tgd.load(on_meta(BertModel, cfg), minilm)

    # a layout only the last rank has: every rank raises, before anything is read
    model = BertModel(config)
    before = model.pooler.dense.weight.detach().clone()
    mesh = init_device_mesh("cpu", (world,))
    if rank == world - 1:
        bias = model.pooler.dense.bias
        model.pooler.dense.bias = nn.Parameter(
            DTensor.from_local(bias.detach().clone(), mesh, [Partial()], run_check=False)
        )
    with pytest.raises(tg.LoadError, match="Partial placement"):
        tgd.load(model, minilm)
    assert torch.equal(model.pooler.dense.weight, before)

    # a read that fails on one rank only: DCP stops every rank, the model stays as it was
    src = tg.open(minilm)

    def broken():
        raise tg.CheckpointError("bad-disk", "simulated read failure", hint="none")

    entries = {n: TensorRef(n, r.shape, r.dtype, broken if rank == world - 1 else r.load) for n, r in src.items()}
    flaky = Source(entries, path="flaky", format="state-dict")
    model = on_meta(BertModel, config)
    shard(model, model.encoder.layer)
    with pytest.raises(tg.CheckpointError, match="simulated read failure"):
        tgd.load(model, flaky)
    assert all(p.is_meta for p in model.parameters()), "a failed load changed the model"

    # FSDP1 keeps flat parameters: refused with what to use instead
    flat = FullyShardedDataParallel(nn.Sequential(nn.Linear(4, 4)), device_id=torch.device("cpu"))
    with pytest.raises(tg.LoadError, match="FSDP1 FullyShardedDataParallel"):
        tgd.load(flat, {"0.weight": torch.zeros(4, 4), "0.bias": torch.zeros(4)})

    # ranks that see different checkpoints
    sd = {"weight": torch.zeros(4 + rank, 2)}
    with pytest.raises(tg.CheckpointError, match="different checkpoints"):
        tgd.load(nn.Linear(2, 4), sd)
    return {"errors": 5}


def main() -> int:
    global MINILM, WORKDIR
    minilm, sharded, dcp_dir, torch_file, WORKDIR = sys.argv[1:6]
    MINILM = minilm
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    logging.getLogger("torchgraft").setLevel(logging.ERROR)  # keep stderr for real errors
    config = BertConfig.from_pretrained(minilm)
    results = {"world_size": dist.get_world_size(), "rank_results": {}}
    for name, run in [
        ("fsdp_bert_model", lambda: fsdp_bert_model(minilm, config)),
        ("fsdp_token_classification", lambda: fsdp_token_classification(sharded, config)),
        ("fsdp_adapters", lambda: fsdp_adapters(minilm, config)),
        ("dcp_source", lambda: dcp_source(dcp_dir, minilm, config)),
        ("torch_zip", lambda: torch_zip(torch_file, minilm, config)),
        ("replicated", lambda: replicated(sharded, config)),
        ("nonfinite", nonfinite),
        ("errors", lambda: errors(minilm, config)),
    ]:
        result = run()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        results["rank_results"][name] = gathered
    if dist.get_rank() == 0:
        with open(f"{WORKDIR}/result.json", "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
