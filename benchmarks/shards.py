"""Sharded checkpoints: open + load with 1 against 2 shard workers, in fresh processes, alternating.

    .venv/bin/python benchmarks/shards.py [--size bert-large] [--shards 4] [--repeats 3]

Writes bert-large (random weights) as 4 shards in each format (safetensors, torch zip, legacy
torch pickle) under $TORCHGRAFT_BENCH_DIR, then times ``tg.load`` of a meta-device model from
the index with ``torchgraft.sources.directory.SHARD_WORKERS`` = 1 and = 2 (threads are only used
for legacy-pickle shards, which are read whole when opened; the others are always opened in turn).
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

FORMATS = {"safetensors": ".safetensors", "torch-zip": ".bin", "torch-legacy": ".bin"}


def sharded_dir(size: str, fmt: str, n: int) -> Path:
    d = bench.bench_dir() / f"{size}-{fmt}-{n}shards"
    index = d / ("model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json")
    if index.exists():
        return d
    import torch
    from safetensors.torch import save_file

    import torchgraft as tg

    src = tg.open(bench.generate(size, "safetensors"))
    names = list(src)
    d.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i in range(n):
        part = names[i * len(names) // n : (i + 1) * len(names) // n]
        fname = f"model-{i + 1:05d}-of-{n:05d}{FORMATS[fmt]}"
        shard = {k: src[k].load().clone() for k in part}
        if fmt == "safetensors":
            save_file(shard, d / fname)
        else:
            torch.save(shard, d / fname, _use_new_zipfile_serialization=fmt == "torch-zip")
        weight_map.update(dict.fromkeys(part, fname))
    bench.config_for(size).save_pretrained(d)
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def worker(path: str, size: str, workers: int) -> float:
    import logging

    import torch
    from transformers import BertModel

    import torchgraft as tg
    from torchgraft.sources import directory

    logging.getLogger("torchgraft").setLevel(logging.ERROR)
    directory.SHARD_WORKERS = workers
    with torch.device("meta"):
        model = BertModel(bench.config_for(size))
    t0 = time.perf_counter()
    tg.load(model, path, check_finite=False)
    with torch.no_grad():  # touch every byte once, so mapped formats pay their reads too
        for p in model.parameters():
            p.sum()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="bert-large")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(worker(args.worker[0], args.size, int(args.worker[1])))
        return
    rows = []
    for fmt in args.formats.split(","):
        d = sharded_dir(args.size, fmt, args.shards)
        times: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.repeats):
            for w in (1, 2):
                out = subprocess.run(
                    [sys.executable, __file__, "--size", args.size, "--worker", str(d), str(w)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                times[w].append(float(out.stdout.strip().splitlines()[-1]))
        m1, m2 = statistics.median(times[1]), statistics.median(times[2])
        rows.append((fmt, m1, m2, m1 / m2))
    print(f"{args.size}, {args.shards} shards, median of {args.repeats} (seconds: load + touch every byte)")
    print(f"{'format':14} {'1 worker':>9} {'2 workers':>10} {'speedup':>8}")
    for fmt, m1, m2, ratio in rows:
        print(f"{fmt:14} {m1:9.3f} {m2:10.3f} {ratio:8.2f}x")


if __name__ == "__main__":
    main()
