"""The ``torchgraft`` command: a thin layer over the library functions.

Exit codes: 0 ok, 1 problems found, 2 usage error or unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import CheckpointError, LoadError, PlanError

__all__ = ["main", "COMMANDS"]

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    example: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _console(args: argparse.Namespace):
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False)


# inspect -----------------------------------------------------------------


def _configure_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint file, *.index.json or model directory")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--depth", type=int, default=None, help="show the module tree down to this depth")
    p.add_argument("--container", default=None, help="where the state dict sits in a training checkpoint (e.g. state_dict_ema)")


def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def _run_inspect(args: argparse.Namespace) -> int:
    from . import open as open_source
    from .summary import module_tree, summarize

    src = open_source(args.path, container=args.container)
    info = summarize(src)
    if args.json:
        print(json.dumps(info))
        return EXIT_OK
    from rich.tree import Tree

    console = _console(args)
    console.print(f"[bold]{src.describe()}[/bold]")
    dtypes = ", ".join(f"{k} ({v:,})" for k, v in info["dtypes"].items())
    console.print(f"tensors: {info['tensors']:,}   parameters: {info['parameters']:,}   size: {_fmt_bytes(info['bytes'])}")
    console.print(f"dtypes: {dtypes}")
    if src.containers and len(src.containers) > 1:
        console.print(f"state dicts in the file: {', '.join(c or '<top level>' for c in src.containers)} (using {src.container or '<top level>'})")
    if src.metadata:
        console.print(f"metadata: {json.dumps(src.metadata)[:300]}")
    if src.skipped:
        console.print(f"non-tensor entries skipped: {len(src.skipped)}")
    root = module_tree(src)
    tree = Tree("[dim](root)[/dim]")

    def add(node, branch, depth: int) -> None:
        for child in node.children.values():
            if child.leaf is not None and not child.children:
                shape, dtype = child.leaf
                branch.add(f"{child.name}  {list(shape)} {dtype}")
                continue
            if args.depth is not None and depth >= args.depth:
                branch.add(f"{child.name}  [dim]({child.parameters:,} params)[/dim]")
                continue
            add(child, branch.add(f"{child.name}"), depth + 1)

    add(root, tree, 0)
    console.print(tree)
    return EXIT_OK


# demo --------------------------------------------------------------------


def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", nargs="?", default="all", help="which scenario to run (default: all)")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo.scenarios import run_demo

    return run_demo(args.scenario, console=_console(args))


COMMANDS: dict[str, Command] = {
    "inspect": Command(
        "inspect",
        "what is in a checkpoint: format, counts, dtypes, size, module tree",
        "torchgraft inspect all-MiniLM-L6-v2/model.safetensors --depth 2",
        _configure_inspect,
        _run_inspect,
    ),
    "demo": Command(
        "demo",
        "run the seed's scenarios on the real checkpoints (MiniLM -> BertForTokenClassification, ...)",
        "torchgraft demo",
        _configure_demo,
        _run_demo,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchgraft",
        description="Load pretrained weights from any common checkpoint into any PyTorch model.",
        epilog="exit codes: 0 ok, 1 problems found, 2 usage error or unreadable input",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, epilog=f"example: {cmd.example}")
        cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args._run(args)
    except (CheckpointError, PlanError, LoadError, FileExistsError) as e:
        if args.debug:
            raise
        first, *rest = str(e).splitlines()
        print(f"torchgraft: error: {first}", file=sys.stderr)
        for line in rest:
            print(f"  {line.strip()}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, (CheckpointError, FileExistsError)) else EXIT_PROBLEMS
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
