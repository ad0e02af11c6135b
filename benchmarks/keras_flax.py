"""Open and load times of Keras and Flax files (run by hand; nothing here is a test).

    .venv/bin/python benchmarks/keras_flax.py [--mb 176] [--repeats 3]

Writes, once, into ``$TORCHGRAFT_BENCH_DIR`` (default ``~/.cache/torchgraft-bench``) a Keras 3
``.weights.h5``, the same weights in a ``.keras`` archive (stored, as Keras writes it) and a Flax
msgpack file, each of Dense layers holding about ``--mb`` MB of random float32 (written with
h5py / msgpack in the formats' layouts: neither Keras nor flax is needed). Each measurement runs
in a fresh process, imports done before the clock starts; the table shows medians of
``tg.open`` (names, shapes, dtypes: what ``torchgraft inspect`` needs), of loading every tensor,
and the growth of the process's peak RSS over its imports (it counts page-cache pages of
mapped files; the loaded tensors, about the file's size, are kept until the end).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import zipfile
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
import numpy, torch, h5py, msgpack
import torchgraft as tg
import torchgraft.sources.flax_reader, torchgraft.sources.keras_reader
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
src = tg.open(sys.argv[1])
t1 = time.perf_counter()
n = sum(ref.load().numel() for ref in src.values())
t2 = time.perf_counter()
print(json.dumps({"open": t1 - t0, "load": t2 - t1, "numel": n,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0}))
"""


def _layers(mb: int):
    import numpy as np

    rng = np.random.default_rng(0)
    n = max(1, mb * 1024 * 1024 // (2048 * 2048 * 4))
    return [rng.standard_normal((2048, 2048), dtype=np.float32) for _ in range(n)]


def generate(root: Path, mb: int) -> dict[str, Path]:
    import h5py
    import msgpack

    root.mkdir(parents=True, exist_ok=True)
    files = {
        "keras-weights-h5": root / f"dense{mb}.weights.h5",
        "keras": root / f"dense{mb}.keras",
        "flax-msgpack": root / f"dense{mb}.msgpack",
    }
    if all(p.exists() for p in files.values()):
        return files
    layers = _layers(mb)
    with h5py.File(files["keras-weights-h5"], "w") as f:
        for i, kernel in enumerate(layers):
            name = "dense" if i == 0 else f"dense_{i}"
            f.create_dataset(f"layers/{name}/vars/0", data=kernel)
            f.create_dataset(f"layers/{name}/vars/1", data=kernel[0])
    with zipfile.ZipFile(files["keras"], "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("config.json", "{}")
        zf.write(files["keras-weights-h5"], "model.weights.h5")

    def ext(a):
        return msgpack.ExtType(1, msgpack.packb((list(a.shape), a.dtype.name, a.tobytes()), use_bin_type=True))

    params = {f"Dense_{i}": {"kernel": ext(k), "bias": ext(k[0])} for i, k in enumerate(layers)}
    files["flax-msgpack"].write_bytes(msgpack.packb({"params": params}, use_bin_type=True))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=176)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    root = Path(os.environ.get("TORCHGRAFT_BENCH_DIR", Path.home() / ".cache" / "torchgraft-bench"))
    files = generate(root, args.mb)
    print(f"{'format':18} {'MB':>6} {'open s':>8} {'load-all s':>11} {'RSS growth MB':>14}")
    for fmt, path in files.items():
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.splitlines()[-1]))
        med = {k: statistics.median(r[k] for r in runs) for k in ("open", "load", "rss_mb")}
        size = path.stat().st_size / 1e6
        print(f"{fmt:18} {size:6.0f} {med['open']:8.3f} {med['load']:11.3f} {med['rss_mb']:14.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
