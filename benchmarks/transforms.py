"""Transforms on the load path: a per-expert Mixtral checkpoint into transformers 5's stacked experts.

    .venv/bin/python benchmarks/transforms.py [--layers 8] [--experts 8] [--hidden 512] [--intermediate 1792]
                                              [--repeats 3]

The checkpoint (random weights, one ``w1`` / ``w2`` / ``w3`` per expert, as the original Mixtral release
stores them; about 0.8 GB at the defaults) is generated once under ``$TORCHGRAFT_BENCH_DIR``. Each
measurement runs in a fresh process (imports done before the clock starts); contenders alternate within
each repeat; the table shows medians, ratios to the hand-written converter, and peak private-memory and
RSS growth. Every contender ends with the same stacked model.

Contenders:
  copy-floor       safe_open + get_tensor + clone of every tensor: each byte copied once into new memory,
                   the least any load that stacks experts must do (no stacking, no model)
  hand             model on meta; safetensors load_file, torch.stack / torch.cat by a hand list,
                   load_state_dict(assign=True): what a user writes today (the floor for a load that must
                   copy every expert into new stacked tensors)
  from_pretrained  transformers' MixtralForCausalLM.from_pretrained(dir) (its own conversion table:
                   MergeModulelist + Concatenate)
  torchgraft       model on meta + tg.load(model, dir, rules=tg.recipe("mixtral-experts-to-stacked", ...))
  plan             tg.plan only (names, shapes and the transform trees on meta)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import run as bench

CONTENDERS = ("copy-floor", "hand", "from_pretrained", "torchgraft", "plan")
BASELINE = "hand"


def config(args: argparse.Namespace):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=1024,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=args.experts,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )


def checkpoint(args: argparse.Namespace) -> Path:
    """A per-expert checkpoint directory (config.json + model.safetensors), generated once."""
    d = bench.bench_dir() / f"mixtral-per-expert-{args.layers}x{args.experts}-{args.hidden}-{args.intermediate}"
    weights = d / "model.safetensors"
    if weights.exists():
        return d
    import torch
    from safetensors.torch import save_file

    c = config(args)
    gen = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    sd["model.embed_tokens.weight"] = rand(c.vocab_size, h)
    sd["lm_head.weight"] = rand(c.vocab_size, h)
    sd["model.norm.weight"] = torch.ones(h)
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}"
        sd[f"{p}.input_layernorm.weight"] = torch.ones(h)
        sd[f"{p}.post_attention_layernorm.weight"] = torch.ones(h)
        for proj, rows in (("q", h), ("k", kv), ("v", kv)):
            sd[f"{p}.self_attn.{proj}_proj.weight"] = rand(rows, h)
        sd[f"{p}.self_attn.o_proj.weight"] = rand(h, h)
        sd[f"{p}.block_sparse_moe.gate.weight"] = rand(c.num_local_experts, h)
        for e in range(c.num_local_experts):
            sd[f"{p}.block_sparse_moe.experts.{e}.w1.weight"] = rand(i, h)
            sd[f"{p}.block_sparse_moe.experts.{e}.w2.weight"] = rand(h, i)
            sd[f"{p}.block_sparse_moe.experts.{e}.w3.weight"] = rand(i, h)
    d.mkdir(parents=True, exist_ok=True)
    c.save_pretrained(d)
    tmp = d / "model.safetensors.tmp"
    save_file(sd, str(tmp))
    tmp.rename(weights)
    return d


def worker(contender: str, args: argparse.Namespace) -> dict:
    import logging
    import os

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import MixtralForCausalLM
    from transformers.utils import logging as hf_logging

    import torchgraft as tg

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("torchgraft").setLevel(logging.ERROR)
    torch.set_num_threads(os.cpu_count() or 1)
    d = checkpoint(args)
    path = d / "model.safetensors"
    c = config(args)
    rules = tg.recipe("mixtral-experts-to-stacked", num_experts=c.num_local_experts)
    anon0, rss0 = bench._status("RssAnon:"), bench._status("VmRSS:")
    sampler = bench._PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    model = None
    if contender == "copy-floor":
        with safe_open(str(path), "pt") as f:
            sd = {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    elif contender == "hand":
        with torch.device("meta"):
            model = MixtralForCausalLM(c)
        sd = load_file(str(path))
        for n in range(c.num_hidden_layers):
            p, experts = f"model.layers.{n}", range(c.num_local_experts)
            w = {
                k: [sd.pop(f"{p}.block_sparse_moe.experts.{e}.{k}.weight") for e in experts] for k in ("w1", "w2", "w3")
            }
            sd[f"{p}.mlp.experts.gate_up_proj"] = torch.cat([torch.stack(w["w1"]), torch.stack(w["w3"])], dim=1)
            sd[f"{p}.mlp.experts.down_proj"] = torch.stack(w["w2"])
            sd[f"{p}.mlp.gate.weight"] = sd.pop(f"{p}.block_sparse_moe.gate.weight")
        model.load_state_dict(sd, strict=True, assign=True)
    elif contender == "from_pretrained":
        model = MixtralForCausalLM.from_pretrained(d)
    elif contender == "torchgraft":
        with torch.device("meta"):
            model = MixtralForCausalLM(c)
        tg.load(model, d, rules=rules, strict=True)
    elif contender == "plan":
        with torch.device("meta"):
            model = MixtralForCausalLM(c)
        tg.plan(model, d, rules=rules)
    else:
        raise SystemExit(f"unknown contender {contender}")
    seconds = time.perf_counter() - t0
    sampler.stop = True
    sampler.join()
    result = {
        "seconds": seconds,
        "anon_growth": max(sampler.peak_anon, bench._status("RssAnon:")) - anon0,
        "rss_growth": max(sampler.peak_rss, bench._status("VmRSS:")) - rss0,
        "file_bytes": path.stat().st_size,
    }
    if model is not None and contender != "plan":  # every loader ends with the same stacked model
        got = model.model.layers[c.num_hidden_layers - 1].mlp.experts.gate_up_proj
        with safe_open(str(path), "pt") as f:
            last = f"model.layers.{c.num_hidden_layers - 1}.block_sparse_moe.experts.{c.num_local_experts - 1}"
            want = torch.cat([f.get_tensor(f"{last}.w1.weight"), f.get_tensor(f"{last}.w3.weight")])
        result["same"] = bool(torch.equal(got[-1], want))
    return result


def measure(contender: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", contender, *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1792)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    contenders = [c for c in args.contenders.split(",") if c]
    argv = [f"--{k}={getattr(args, k)}" for k in ("layers", "experts", "hidden", "intermediate")]
    d = checkpoint(args)
    size = (d / "model.safetensors").stat().st_size
    console.print(f"[dim]checkpoint: {d} ({size / 2**20:.0f} MiB)[/dim]")
    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    for r in range(args.repeats):
        for c in contenders:
            res = measure(c, argv)
            runs[c].append(res)
            shown = f"{res['seconds']:.3f} s" if "seconds" in res else res["error"]
            console.print(f"[dim]repeat {r + 1}/{args.repeats} {c}: {shown}[/dim]")
    med = {c: statistics.median(x["seconds"] for x in v) for c, v in runs.items() if all("seconds" in x for x in v)}
    table = Table(title=f"per-expert Mixtral -> stacked experts ({size / 2**20:.0f} MiB, median of {args.repeats})")
    for col in ("contender", "seconds", f"x {BASELINE}", "GB/s", "peak anon growth", "peak RSS growth", "same"):
        table.add_column(col, justify="left" if col == "contender" else "right")
    for c, v in runs.items():
        if c not in med:
            table.add_row(c, "error", "", "", "", "", next(x["error"] for x in v if "error" in x))
            continue
        ratio = f"{med[c] / med[BASELINE]:.2f}" if BASELINE in med else ""
        anon = max(x["anon_growth"] for x in v) / 2**20
        rss = max(x["rss_growth"] for x in v) / 2**20
        same = "" if "same" not in v[0] else ("yes" if all(x["same"] for x in v) else "NO")
        table.add_row(
            c, f"{med[c]:.3f}", ratio, f"{size / med[c] / 1e9:.2f}", f"{anon:.0f} MiB", f"{rss:.0f} MiB", same
        )
    console.print(table)


if __name__ == "__main__":
    main()
