"""Cost of the inert pre-pass bounds (issue 17: tuple depth/hash budget, refused calls) on a bert-large ``data.pkl``.

    PYTHONPATH=src python benchmarks/pickle_prepass.py [--repeat 50]

Builds bert-large's state dict on the meta device (transformers' BertModel, no weights), pickles
it as ``torch.save`` writes ``data.pkl`` (tensors of the same names and shapes; the pickle does not
depend on the values), then times :func:`torchgraft.sources.pickle_scan.storage_records` with the
tuple checks on and off (the same unpickler with the plain tuple opcodes). The refused-call check costs
nothing on such a pickle: only stand-ins of refused constructors check their arguments.
"""

from __future__ import annotations

import argparse
import io
import pickle
import statistics
import time
import zipfile


def _data_pkl() -> bytes:
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    with torch.device("meta"):
        model = BertModel(config)
    sd = {k: torch.zeros(1).expand(*v.shape).clone() if v.numel() < 2 else torch.zeros(v.shape[:1])
          for k, v in model.state_dict().items()}  # fmt: skip
    buf = io.BytesIO()
    torch.save(sd, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        return zf.read(name)


def _time(fn, data: bytes, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(data)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    from torchgraft.sources import pickle_scan as ps

    data = _data_pkl()
    checked = dict(ps._InertUnpickler.dispatch)
    plain = dict(pickle._Unpickler.dispatch)
    plain[pickle.BYTEARRAY8[0]] = checked[pickle.BYTEARRAY8[0]]
    on, off = [], []
    for _ in range(args.rounds):  # alternating: this machine's speed drifts by 2x between phases
        on.append(_time(ps.storage_records, data, args.repeat))
        ps._InertUnpickler.dispatch = plain
        try:
            off.append(_time(ps.storage_records, data, args.repeat))
        finally:
            ps._InertUnpickler.dispatch = checked
    print(
        f"data.pkl: {len(data)} bytes; storage_records, best of {args.rounds} medians of {args.repeat}: "
        f"{min(on):.2f} ms with the tuple checks, {min(off):.2f} ms without ({min(on) - min(off):+.2f} ms)"
    )


if __name__ == "__main__":
    main()
