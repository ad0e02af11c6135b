"""atheris harness for the checkpoint readers (run by hand; not part of the test suite).

    pip install atheris
    python fuzz/fuzz_readers.py -atheris_runs=200000 -max_len=4096 fuzz/corpus/

Each input is written to a file and opened with ``tg.open`` (sniffed) and with every file
reader forced, then every tensor is loaded. The only acceptable outcomes are a successful load
whose tensors match what the source announced, or ``tg.CheckpointError``. Seed the corpus with
small valid files (``python fuzz/fuzz_readers.py --seed fuzz/corpus``) and with the hostile
corpus (``python tests/hostile/make_corpus.py fuzz/corpus``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

FORMATS = (None, "safetensors", "torch-zip", "torch-legacy")


def check(data: bytes, workdir: Path) -> None:
    import torchgraft as tg
    from torchgraft.sources.base import dtype_name

    path = workdir / "input.bin"
    path.write_bytes(data)
    for fmt in FORMATS:
        try:
            src = tg.open(path, format=fmt)
            for name in src:
                ref = src[name]
                t = ref.load()
                if tuple(t.shape) != ref.shape or dtype_name(t.dtype) != ref.dtype:
                    raise AssertionError(
                        f"{name}: announced {ref.shape} {ref.dtype}, loaded {tuple(t.shape)} {t.dtype}"
                    )
            src.close()
        except tg.CheckpointError:
            pass
    path.unlink()


def seed(directory: Path) -> None:
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    sd = {"w": torch.randn(2, 3), "b": torch.zeros(2, dtype=torch.float16), "n": torch.arange(3)}
    save_file(sd, directory / "seed.safetensors")
    torch.save(sd, directory / "seed.pt")
    torch.save({"state_dict": sd, "epoch": 1}, directory / "seed.ckpt")
    torch.save(sd, directory / "seed.pth", _use_new_zipfile_serialization=False)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--seed":
        seed(Path(sys.argv[2]))
        return
    import atheris

    with atheris.instrument_imports():
        import torchgraft
        import torchgraft.sources  # noqa: F401
    workdir = Path(tempfile.mkdtemp(prefix="tg-fuzz-"))
    os.chdir(workdir)  # a payload that somehow ran would write here, not into the repository
    atheris.Setup(sys.argv, lambda data: check(data, workdir))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
