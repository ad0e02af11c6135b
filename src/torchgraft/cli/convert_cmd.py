"""``torchgraft convert SRC DST``: any readable checkpoint to safetensors, single or sharded, atomically."""

from __future__ import annotations

import argparse

from .common import EXIT_OK, Command, UsageError, add_allow_globals, add_json, console, fmt_bytes, print_json, progress


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src", metavar="SRC", help="checkpoint file, *.index.json, model directory or hf:org/name[@revision]"
    )
    p.add_argument("dst", metavar="DST", help="a .safetensors file, or a directory (model.safetensors in it)")
    p.add_argument(
        "--dtype", default=None, help="cast floating-point tensors: bf16, fp16, fp32, fp64 (integers keep theirs)"
    )
    p.add_argument(
        "--max-shard-size",
        default=None,
        metavar="SIZE",
        help="shards of at most this size (2GB, 500MB, 4GiB) plus model.safetensors.index.json",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace existing files (and the stale index or shards of an earlier conversion)",
    )
    p.add_argument(
        "--dedupe-tied", action="store_true", help="write a tensor stored under several names (tied weights) once"
    )
    p.add_argument(
        "--container", default=None, help="where the state dict sits in a training checkpoint (e.g. state_dict_ema)"
    )
    p.add_argument(
        "--plan",
        default=None,
        metavar="PLAN.json",
        help="with --reverse: the plan that loaded SRC's tensors (torchgraft plan --save)",
    )
    p.add_argument(
        "--reverse",
        action="store_true",
        help="SRC holds a model's weights; write them in the checkpoint's names and layout (the plan run backwards)",
    )
    add_allow_globals(p)
    add_json(p)


def run(args: argparse.Namespace) -> int:
    from ..convert import convert, destination_path, parse_dtype, parse_size

    try:  # usage problems first, before anything is read
        parse_dtype(args.dtype)
        parse_size(args.max_shard_size)
        destination_path(args.dst)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.reverse != (args.plan is not None):
        raise UsageError("--reverse and --plan PLAN.json go together: the plan that loaded SRC, run backwards")
    plan = None
    if args.plan is not None:
        from ..plan import Plan

        plan = Plan.load(args.plan)
    with progress(args, "converting") as bar:
        result = convert(
            args.src,
            args.dst,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            force=args.force,
            dedupe_tied=args.dedupe_tied,
            container=args.container,
            allow_globals=args.allow_globals or None,
            progress=bar,
            plan=plan,
            reverse=args.reverse,
        )
    if args.json:
        print_json(result.to_dict())
        return EXIT_OK
    con = console(args)
    cast = f" as {result.dtype}" if result.dtype else ""
    con.print(f"{result.source}: {result.tensors} tensors ({fmt_bytes(result.bytes)}){cast}", markup=False)
    if result.index:
        con.print(f"wrote {len(result.files)} shards and {result.index}", markup=False)
    else:
        con.print(f"wrote {result.files[0]}", markup=False)
    if result.shared:
        con.print(
            f"{len(result.shared)} tensors shared memory with another name; each was written as its own copy "
            "(--dedupe-tied writes tied weights once)",
            markup=False,
        )
    if result.aliases:
        con.print(
            f"tied names written once: {', '.join(f'{k} = {v}' for k, v in result.aliases.items())}", markup=False
        )
    if result.skipped:
        con.print(
            f"non-tensor entries left out (safetensors holds tensors only): {', '.join(result.skipped)}", markup=False
        )
    if result.removed:
        con.print(f"removed stale files of an earlier conversion: {', '.join(result.removed)}", markup=False)
    return EXIT_OK


COMMAND = Command(
    "convert",
    "write any readable checkpoint as safetensors (single file or shards + index), atomically",
    "torchgraft convert mobilenet_v2-b0353104.pth out/model.safetensors --dtype bf16 --max-shard-size 2GB\n"
    "  torchgraft convert grafted/model.safetensors back/ --plan plan.json --reverse",
    configure,
    run,
)
