"""Side-by-side load benchmarks: torchgraft against the alternatives, measured in one run.

    make bench                                   # bert-base and bert-large, safetensors and torch zip (< 10 min, 2 cores)
    .venv/bin/python benchmarks/run.py --large   # also the 1.3B size (4.8 GiB per format; generated once)
    .venv/bin/python benchmarks/run.py --sizes bert-base --formats torch-legacy,torch-legacy-aligned \
        --contenders raw-read,read-fresh,floor,torchgraft
    .venv/bin/python benchmarks/run.py --contenders all   # every contender below

Formats: safetensors, torch zip, legacy torch pickle (torch.load cannot memory-map it: its
floor is torch.load + assign), and a legacy file whose float records happen to start 4-byte
aligned (torchgraft maps those instead of reading them; the plain one is misaligned). Checkpoints (random weights, BERT layout) are generated once into ``$TORCHGRAFT_BENCH_DIR``
(default ``~/.cache/torchgraft-bench``), outside the repository. Every measurement runs in a
fresh process (imports are done before the clock starts); contenders alternate within each
repeat, and the table shows medians, ratios to the bare floor, peak anonymous (private) memory
growth and peak RSS growth (which also counts page-cache pages mapped from the file). Each
measurement prints a progress line with the time left (estimated from the runs so far).

Contenders:
  raw-read        read the file's bytes into one reused buffer (the I/O floor, page cache warm)
  read-fresh      read the file into freshly allocated memory by torchgraft's reader threads: the
                  floor for any load that must copy (legacy records that cannot be mapped)
  torch           torch.load / safetensors.load_file, then load_state_dict into a model built on CPU
  floor           model on meta + memory map + load_state_dict(assign=True)  (the zero-copy floor)
  from_pretrained transformers' BertModel.from_pretrained(dir)
  torchgraft      model on meta + tg.load(model, path)  (the default: zero-copy, no value read)
  tg-check        the same with check_finite="warn" (reads every value once for NaN/Inf)
  tg-copy         tg.load into a model already built on CPU (copy in place) -- compare with "torch"
  tg-bf16         model on meta + tg.load(..., dtype=bfloat16)  (streaming cast)
  plan            tg.plan only (names and shapes)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

SIZES = {
    # name: (hidden, layers, intermediate, heads)
    "bert-base": (768, 12, 3072, 12),
    "bert-large": (1024, 24, 4096, 16),
    "bert-1.3b": (2048, 24, 8192, 16),
}
DEFAULT_SIZES = ("bert-base", "bert-large")  # --large adds bert-1.3b
FORMATS = ("safetensors", "torch-zip", "torch-legacy", "torch-legacy-aligned")
DEFAULT_FORMATS = ("safetensors", "torch-zip")
CONTENDERS = (
    "raw-read",
    "read-fresh",
    "torch",
    "floor",
    "from_pretrained",
    "torchgraft",
    "tg-check",
    "tg-copy",
    "tg-bf16",
    "plan",
)
#: The default: the default load side by side with what it is compared against (README's table).
DEFAULT_CONTENDERS = ("floor", "from_pretrained", "torchgraft", "tg-check")


def bench_dir() -> Path:
    return Path(os.environ.get("TORCHGRAFT_BENCH_DIR", Path.home() / ".cache" / "torchgraft-bench"))


def config_for(size: str):
    from transformers import BertConfig

    hidden, layers, inter, heads = SIZES[size]
    return BertConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, num_attention_heads=heads)


def checkpoint_dir(size: str, fmt: str) -> Path:
    return bench_dir() / f"{size}-{fmt}"


def weights_file(size: str, fmt: str) -> Path:
    return checkpoint_dir(size, fmt) / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")


def generate(size: str, fmt: str) -> Path:
    """Write a random-weight BertModel checkpoint once (with config.json, so from_pretrained can read it)."""
    path = weights_file(size, fmt)
    if path.exists():
        return path
    import torch
    from safetensors.torch import save_file
    from transformers import BertModel

    config = config_for(size)
    with torch.device("meta"):
        model = BertModel(config)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, t in model.state_dict().items():
        if t.dtype.is_floating_point:
            sd[name] = torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.02
        else:
            sd[name] = torch.zeros(t.shape, dtype=t.dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    if fmt == "safetensors":
        save_file(sd, tmp, metadata={"format": "pt"})
    elif fmt == "torch-legacy-aligned":  # padded until the float records start 4-byte aligned
        from collections import OrderedDict

        for pad in range(16):
            padded = OrderedDict(sd)
            padded._metadata = {"": {"version": 1}, "pad": {"x": "x" * pad}}  # type: ignore[attr-defined]
            torch.save(padded, tmp, _use_new_zipfile_serialization=False)
            if (_legacy_data_start(tmp) + 8) % 4 == 0:
                break
    else:
        torch.save(sd, tmp, _use_new_zipfile_serialization=fmt == "torch-zip")
    tmp.rename(path)
    config.save_pretrained(path.parent)
    return path


def _legacy_data_start(path: Path) -> int:
    """Offset of the first storage record of a legacy torch file (after its five pickles)."""
    import pickle

    from torchgraft.sources.pickle_scan import storage_records

    with open(path, "rb") as f:
        for _ in range(3):
            pickle.load(f)  # our own file, written just above
        storage_records(f)
        pickle.load(f)
        return f.tell()


# Worker ----------------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


class _PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_anon = self.peak_rss = 0
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            self.peak_anon = max(self.peak_anon, _status("RssAnon:"))
            self.peak_rss = max(self.peak_rss, _status("VmRSS:"))
            time.sleep(0.002)


def worker(contender: str, size: str, fmt: str) -> dict:
    import logging

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    import torchgraft as tg
    import torchgraft.apply
    import torchgraft.policy
    import torchgraft.report

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("torchgraft").setLevel(logging.ERROR)
    torch.set_num_threads(os.cpu_count() or 1)
    path = weights_file(size, fmt)
    config = config_for(size)
    prebuilt = None
    if contender in ("torch", "tg-copy"):
        with torch.device("meta"):
            prebuilt = BertModel(config)
        prebuilt.to_empty(device="cpu")  # a model already on CPU (values do not matter here)
        with torch.no_grad():
            for t in [*prebuilt.parameters(), *prebuilt.buffers()]:
                t.zero_()  # touch the pages, so the baseline holds the whole model
    anon0, rss0 = _status("RssAnon:"), _status("VmRSS:")
    sampler = _PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    if contender == "raw-read":
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(64 << 20)
            view = memoryview(buf)
            while f.readinto(view):
                pass
    elif contender == "read-fresh":
        _read_fresh(path)
    elif contender == "torch":
        sd = load_file(path) if fmt == "safetensors" else torch.load(path, map_location="cpu", weights_only=True)
        prebuilt.load_state_dict(sd, strict=False)
    elif contender == "floor":
        with torch.device("meta"):
            model = BertModel(config)
        if fmt == "safetensors":
            with safe_open(path, "pt") as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=fmt == "torch-zip")  # legacy: no mmap
        model.load_state_dict(sd, strict=False, assign=True)
    elif contender == "from_pretrained":
        model = BertModel.from_pretrained(path.parent)
    elif contender == "torchgraft":
        with torch.device("meta"):
            model = BertModel(config)
        tg.load(model, path)
    elif contender == "tg-check":
        with torch.device("meta"):
            model = BertModel(config)
        tg.load(model, path, check_finite="warn")
    elif contender == "tg-copy":
        tg.load(prebuilt, path)
    elif contender == "tg-bf16":
        with torch.device("meta"):
            model = BertModel(config)
        tg.load(model, path, dtype=torch.bfloat16)
    elif contender == "plan":
        with torch.device("meta"):
            model = BertModel(config)
        tg.plan(model, path)
    else:
        raise SystemExit(f"unknown contender {contender}")
    seconds = time.perf_counter() - t0
    sampler.stop = True
    sampler.join()
    return {
        "seconds": seconds,
        "anon_growth": max(sampler.peak_anon, _status("RssAnon:")) - anon0,
        "rss_growth": max(sampler.peak_rss, _status("VmRSS:")) - rss0,
        "file_bytes": path.stat().st_size,
    }


def _read_fresh(path: Path) -> None:
    """The whole file into new memory, read exactly as legacy_reader reads records it cannot map."""
    import torch

    from torchgraft.sources import legacy_reader as lr

    size = path.stat().st_size
    out = torch.empty(size, dtype=torch.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        lr._read(fd, lr._pieces(lr._Record(0, size, 1), out.data_ptr()), RuntimeError, workers=lr.READ_WORKERS)
    finally:
        os.close(fd)


# Driver ----------------------------------------------------------------------------


def measure(contender: str, size: str, fmt: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", contender, "--sizes", size, "--formats", fmt],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _in_process(contender: str, size: str, fmt: str) -> dict:
    import gc

    try:
        result = worker(contender, size, fmt)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return {"error": f"{type(e).__name__}: {e}"}
    gc.collect()  # the model of this run is gone before the next starts
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sizes", default=None, help=f"comma-separated, of {', '.join(SIZES)} (default: bert-base,bert-large)"
    )
    ap.add_argument("--large", action="store_true", help="add bert-1.3b to the default sizes (4.8 GiB per format)")
    ap.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    ap.add_argument(
        "--contenders", default=",".join(DEFAULT_CONTENDERS), help=f"comma-separated, or 'all': {', '.join(CONTENDERS)}"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="time every contender inside this one process (warm: imports, allocator and caches reused; "
        "one untimed call of each first) instead of a fresh process per measurement",
    )
    args = ap.parse_args()
    sizes = args.sizes.split(",") if args.sizes else [*DEFAULT_SIZES, *(["bert-1.3b"] if args.large else [])]
    formats = args.formats.split(",")
    contenders = list(CONTENDERS) if args.contenders == "all" else args.contenders.split(",")
    if args.worker:
        print(json.dumps(worker(args.worker, sizes[0], formats[0])))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=170)
    results: dict[tuple[str, str, str], list[dict]] = {}
    run_one = _in_process if args.in_process else measure
    total = len(sizes) * len(formats) * len(contenders) * (args.repeats + (1 if args.in_process else 0))
    progress = _Progress(console, total)
    for size in sizes:
        for fmt in formats:
            with progress.paused():  # generating a checkpoint (once) is not part of the estimate
                console.print(f"[dim]checkpoint {size} {fmt}: {generate(size, fmt)}[/dim]")
                measure("raw-read", size, fmt)  # warm the page cache
            if args.in_process:
                for c in contenders:
                    progress.done(f"{size} {fmt} {c} (warm-up)", run_one(c, size, fmt))
            for repeat in range(args.repeats):
                for c in contenders:  # alternate contenders within each repeat
                    result = run_one(c, size, fmt)
                    results.setdefault((size, fmt, c), []).append(result)
                    progress.done(f"{size} {fmt} {c} (run {repeat + 1}/{args.repeats})", result)
    mode = "in one warm process" if args.in_process else "fresh process each"
    table = Table(
        title=f"torchgraft benchmarks ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, torch {_torch_version()}, {mode})"
    )
    for col in (
        "checkpoint",
        "format",
        "contender",
        "median s",
        "x floor",
        "x from_pretrained",
        "anon growth",
        "peak RSS growth",
    ):
        table.add_column(col, justify="right" if col not in ("checkpoint", "format", "contender") else "left")
    for size in sizes:
        for fmt in formats:
            med = {}
            for c in contenders:
                runs = [r for r in results[(size, fmt, c)] if "error" not in r]
                med[c] = statistics.median(r["seconds"] for r in runs) if runs else None
            for c in contenders:
                runs = [r for r in results[(size, fmt, c)] if "error" not in r]
                if not runs:
                    table.add_row(size, fmt, c, "error: " + results[(size, fmt, c)][0]["error"][:60], "", "", "", "")
                    continue
                file_bytes = runs[0]["file_bytes"]
                anon = statistics.median(r["anon_growth"] for r in runs)
                rss = statistics.median(r["rss_growth"] for r in runs)
                table.add_row(
                    size,
                    fmt,
                    c,
                    f"{med[c]:.3f}",
                    f"{med[c] / med['floor']:.2f}" if med.get("floor") else "",
                    f"{med[c] / med['from_pretrained']:.2f}" if med.get("from_pretrained") else "",
                    f"{anon / 2**20:,.0f} MiB ({anon / file_bytes:.0%})",
                    f"{rss / 2**20:,.0f} MiB ({rss / file_bytes:.0%})",
                )
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"|".join(k): v for k, v in results.items()}, indent=1))


class _Progress:
    """One line per measurement: what ran, its time, and the time left (from the mean so far)."""

    def __init__(self, console, total: int) -> None:
        self.console, self.total, self.count, self.started = console, total, 0, time.perf_counter()
        self.excluded = 0.0

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t0

    def done(self, what: str, result: dict) -> None:
        self.count += 1
        elapsed = time.perf_counter() - self.started
        left = (elapsed - self.excluded) / self.count * (self.total - self.count)
        took = f"error: {result['error'][:60]}" if "error" in result else f"{result['seconds']:.3f} s"
        self.console.print(
            f"[dim][{self.count}/{self.total}] {what}: {took}   elapsed {_clock(elapsed)}, about {_clock(left)} left[/dim]"
        )


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
