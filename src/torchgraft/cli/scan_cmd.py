"""``torchgraft scan PATH``: which globals a pickle-based checkpoint references, and whether it is safe to load.

Exit 0 when safe, 1 when the safe loader would refuse something. Nothing is unpickled.
"""

from __future__ import annotations

import argparse

from .common import EXIT_OK, EXIT_PROBLEMS, Command, add_json, console, print_json


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path", help="a .bin/.pt/.pth/.ckpt/.pkl/.safetensors file, *.index.json, a directory or hf:org/name"
    )
    add_json(p)


def run(args: argparse.Namespace) -> int:
    from ..scan import scan

    report = scan(args.path)
    if args.json:
        print_json(report.to_dict())
    else:
        console(args).print(report)
    return EXIT_OK if report.safe else EXIT_PROBLEMS


COMMAND = Command(
    "scan",
    "safety report for pickle-based checkpoints: every global referenced, which the safe loader refuses, a verdict",
    "torchgraft scan downloaded/pytorch_model.bin",
    configure,
    run,
)
