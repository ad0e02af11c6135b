"""``torchgraft inspect PATH``: format, counts, dtypes, size, metadata, and a collapsed module tree.

Reads names, shapes and dtypes only; a safetensors file is listed without importing torch.
"""

from __future__ import annotations

import argparse
import json
import sys

from .common import EXIT_OK, EXIT_PROBLEMS, Command, add_allow_globals, add_json, console, fmt_bytes, print_json


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint file, *.index.json, model directory or hf:org/name[@revision]")
    add_json(p)
    p.add_argument(
        "--depth",
        type=int,
        default=None,
        metavar="N",
        help="show N levels of the module tree (1: top-level modules only), deeper ones summed",
    )
    p.add_argument(
        "--filter",
        default=None,
        metavar="GLOB",
        help="only names matching the glob ('*.attention.*'); a plain prefix selects a subtree",
    )
    p.add_argument(
        "--container", default=None, help="where the state dict sits in a training checkpoint (e.g. state_dict_ema)"
    )
    add_allow_globals(p)


def run(args: argparse.Namespace) -> int:
    from .. import open as open_source
    from ..summary import module_tree, select, summarize

    src = open_source(args.path, container=args.container, allow_globals=args.allow_globals or None)
    if args.filter:
        src = select(src, args.filter)
    info = summarize(src)
    info["values"] = info["parameters"]  # every number in the file: parameters and buffers alike
    if args.filter:
        info["filter"] = args.filter
    if len(src.files) > 1:
        info["files"] = src.files
    code = EXIT_OK
    if args.filter and not len(src):
        print(f"torchgraft: no tensor name matches {args.filter!r}", file=sys.stderr)
        code = EXIT_PROBLEMS
    if args.json:
        print_json(info)
        return code

    from rich.tree import Tree

    out = console(args)
    out.print(f"[bold]{src.describe()}[/bold]")
    dtypes = ", ".join(f"{k} ({v:,})" for k, v in info["dtypes"].items())
    selected = f"  (names matching {args.filter!r})" if args.filter else ""
    out.print(
        f"tensors: {info['tensors']:,}   values: {info['values']:,} (parameters and buffers)   "
        f"size: {fmt_bytes(info['bytes'])}{selected}"
    )
    if dtypes:
        out.print(f"dtypes: {dtypes}")
    if len(src.files) > 1:
        out.print(f"files: {len(src.files)} shards")
    if src.containers and len(src.containers) > 1:
        out.print(
            f"state dicts in the file: {', '.join(c or '<top level>' for c in src.containers)} (using {src.container or '<top level>'})"
        )
    if src.metadata:
        out.print(f"metadata: {json.dumps(src.metadata)[:300]}", markup=False)
    if src.skipped:
        out.print(f"non-tensor entries skipped: {len(src.skipped)}")
    tree = Tree("[dim](root)[/dim]")

    def add(node, branch, level: int, inside_run: bool) -> None:
        for child in node.children.values():
            copies = _copies(child.name)
            each = " each" if inside_run or copies > 1 else ""
            if child.leaf is not None and not child.children:
                shape, dtype = child.leaf
                branch.add(f"{_esc(child.name)}  {list(shape)} {dtype}{each}")
                continue
            if args.depth is not None and level >= args.depth:
                values = _values(child)
                total = f", {values * copies:,} in all" if copies > 1 else ""
                branch.add(f"{_esc(child.name)}  [dim]({values:,} values{each}{total})[/dim]")
                continue
            label = _esc(child.name) + (f"  [dim]({copies} identical)[/dim]" if copies > 1 else "")
            add(child, branch.add(label), level + 1, inside_run or copies > 1)

    add(module_tree(src), tree, 1, False)
    out.print(tree)
    return code


def _copies(name: str) -> int:
    """How many layers a collapsed name stands for: ``{0..5}`` -> 6, ``{5..6,9}`` -> 3, ``conv`` -> 1."""
    if not (name.startswith("{") and name.endswith("}")):
        return 1
    count = 0
    for part in name[1:-1].split(","):
        low, sep, high = part.partition("..")
        count += int(high) - int(low) + 1 if sep else 1
    return count


def _values(node) -> int:
    """Numbers held under a tree node, counting every layer a collapsed child stands for."""
    own = 0
    if node.leaf is not None:
        own = 1
        for d in node.leaf[0]:
            own *= d
    return own + sum(_values(c) * _copies(c.name) for c in node.children.values())


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)


COMMAND = Command(
    "inspect",
    "what is in a checkpoint: format, counts, dtypes, size, metadata, module tree (repeated layers collapsed)",
    "torchgraft inspect all-MiniLM-L6-v2/model.safetensors --depth 2 --filter 'encoder.*'",
    configure,
    run,
)
