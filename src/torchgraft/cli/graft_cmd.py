"""``torchgraft plan`` (dry run) and ``torchgraft load`` (graft, then save the model's weights).

Both build the model from a spec (:mod:`torchgraft.cli.model_spec`), on the meta device when it
allows, and pass ``--align`` / ``--adapt`` through to :func:`torchgraft.plan`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    Command,
    UsageError,
    add_json,
    console,
    fmt_bytes,
    print_json,
    progress,
    status,
)
from .diff_cmd import add_model_options
from .model_spec import TRANSFORMERS, build_model, parse_kv


def _configure_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src", metavar="SRC", help="checkpoint file, *.index.json, model directory or hf:org/name[@revision]"
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="SPEC",
        help="package.module:factory, or transformers:ClassName with --config DIR",
    )
    add_model_options(p)
    p.add_argument(
        "--align", action="store_true", help="pair differently named leftovers structurally (tg.plan(align=True))"
    )
    p.add_argument(
        "--adapt",
        action="append",
        default=[],
        metavar="auto|PATTERN=ADAPTER",
        help="adapt shape mismatches: 'auto', or a glob and an adapter name or JSON spec "
        "('features.0.0.weight=luminance', 'classifier.*=reinit'); repeatable",
    )
    p.add_argument(
        "--prefix",
        default=None,
        help="base-model prefix handling: a prefix ('bert'), or '' for none (default: automatic)",
    )
    p.add_argument(
        "--ignore-missing",
        action="append",
        default=[],
        metavar="REGEX",
        help="model entries whose absence is expected (repeatable)",
    )
    p.add_argument(
        "--ignore-unexpected",
        action="append",
        default=[],
        metavar="REGEX",
        help="checkpoint entries that may go unused (repeatable)",
    )
    p.add_argument(
        "--container", default=None, help="where the state dict sits in a training checkpoint (e.g. state_dict_ema)"
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 (and for load: write nothing) when anything is missing, unexpected or mismatched",
    )
    add_json(p)


def configure_plan(p: argparse.ArgumentParser) -> None:
    _configure_common(p)
    p.add_argument(
        "--save", default=None, metavar="PLAN.json", help="write the plan as JSON, for review and for `load --plan`"
    )


def configure_load(p: argparse.ArgumentParser) -> None:
    _configure_common(p)
    p.add_argument(
        "--plan",
        default=None,
        metavar="PLAN.json",
        help="execute this saved plan (checked against the model and checkpoint first)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DST.safetensors",
        help="where the grafted model's weights are written (a file or a directory)",
    )
    p.add_argument("--dtype", default=None, help="cast floating-point weights while loading (bf16, fp16, fp32)")
    p.add_argument(
        "--max-shard-size",
        default=None,
        metavar="SIZE",
        help="write shards of at most this size (2GB, 500MB) plus an index",
    )
    p.add_argument(
        "--dedupe-tied",
        action="store_true",
        help="write tied weights once (the other names are re-tied by the model on load)",
    )
    p.add_argument("--force", action="store_true", help="replace DST if it exists")


def adapt_option(items: list[str]) -> Any:
    """``["auto"]`` -> ``"auto"``; ``["a.*=luminance", "auto"]`` -> ``{"a.*": "luminance", "*": "auto"}``.

    Raises:
        UsageError: an item that is neither ``auto`` nor ``PATTERN=SPEC`` or with invalid JSON.
    """
    if not items:
        return None
    explicit: dict[str, Any] = {}
    auto = False
    for item in items:
        if item.strip() == "auto":
            auto = True
            continue
        pattern, sep, spec = item.partition("=")
        if not sep or not pattern.strip() or not spec.strip():
            raise UsageError(
                f"--adapt {item!r}: write 'auto' or PATTERN=ADAPTER (for example --adapt 'features.0.0.weight=luminance')"
            )
        spec = spec.strip()
        if spec.startswith("{"):
            try:
                explicit[pattern.strip()] = json.loads(spec)
            except json.JSONDecodeError as e:
                raise UsageError(f"--adapt {item!r}: the adapter spec is not valid JSON ({e})") from None
        else:
            explicit[pattern.strip()] = spec
    if auto and not explicit:
        return "auto"
    if auto:
        explicit["*"] = "auto"  # first match wins: the explicit patterns come first
    return explicit


def _plan_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {
        "prefix": args.prefix,
        "ignore_missing": args.ignore_missing,
        "ignore_unexpected": args.ignore_unexpected,
    }
    if args.align:
        options["align"] = True
    adapt = adapt_option(args.adapt)
    if adapt is not None:
        options["adapt"] = adapt
    return options


def _model(args: argparse.Namespace):
    config = args.config
    if args.model.startswith(TRANSFORMERS + ":") and config is None:
        config = _config_next_to(args.src)
    return build_model(args.model, args=parse_kv(args.arg), config=config)


def _config_next_to(src: str) -> str | None:
    """``--config`` defaults to SRC itself when it is a model directory with a config.json."""
    from ..hub import is_hub_path, local_path

    path = local_path(src) if is_hub_path(src) else Path(src).expanduser()
    folder = path if path.is_dir() else path.parent
    return str(folder) if (folder / "config.json").is_file() else None


def _open(args: argparse.Namespace):
    from .. import open as open_source

    return open_source(args.src, container=args.container)


def run_plan(args: argparse.Namespace) -> int:
    import torchgraft as tg

    options = _plan_options(args)
    src = _open(args)
    with status(args, "building the model and planning"):
        model = _model(args)
        plan = tg.plan(model, src, **options)
    if args.save:
        plan.save(args.save)
    if args.json:
        out = plan.to_dict()
        if args.save:
            out["saved_to"] = args.save
        print_json(out)
    else:
        con = console(args)
        con.print(plan)
        if args.save:
            con.print(
                f"plan saved to {args.save} (use it with: torchgraft load {args.src} --model {args.model} --plan {args.save} --out ...)",
                markup=False,
            )
    return EXIT_PROBLEMS if args.strict and plan.problems() else EXIT_OK


def run_load(args: argparse.Namespace) -> int:
    import torchgraft as tg

    from ..convert import convert, destination_path, parse_dtype, parse_size

    try:
        dtype_name = parse_dtype(args.dtype)
        parse_size(args.max_shard_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.plan and (args.align or args.adapt):
        raise UsageError("--plan already decides every tensor; drop --align/--adapt (or make a new plan with them)")
    try:
        out_path = destination_path(args.out)  # a directory means model.safetensors in it
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not args.force and out_path.exists():  # before the model is built and loaded
        raise FileExistsError(f"{out_path} exists; pass --force to replace it")
    src = _open(args)
    with status(args, "building the model and planning"):
        model = _model(args)
        plan = tg.Plan.load(args.plan) if args.plan else tg.plan(model, src, **_plan_options(args))
    if args.strict and plan.problems():
        if args.json:
            print_json({"plan": plan.to_dict(), "written": None})
        else:
            console(args).print(plan)
        print(
            f"torchgraft: --strict: the checkpoint does not fit ({len(plan.problems())} problems); nothing written",
            file=sys.stderr,
        )
        return EXIT_PROBLEMS
    import torch

    with status(args, f"loading {len(plan.loaded)} tensors"):
        report = tg.load(model, src, plan=plan, dtype=getattr(torch, dtype_name) if dtype_name else None)
    with progress(args, f"writing {args.out}") as bar, torch.no_grad():
        written = convert(
            model.state_dict(),
            args.out,
            max_shard_size=args.max_shard_size,
            force=args.force,
            dedupe_tied=args.dedupe_tied,
            progress=bar,
        )
    if args.json:
        print_json({"report": report.to_dict(), "written": written.to_dict()})
        return EXIT_OK
    con = console(args)
    con.print(report)
    where = written.index or written.files[0]
    con.print(f"wrote {written.tensors} tensors ({fmt_bytes(written.bytes)}) to {where}", markup=False)
    return EXIT_OK


PLAN = Command(
    "plan",
    "dry run: what loading SRC into a model would do (loaded, renamed, adapted, initialised, unused), nothing loaded",
    "torchgraft plan all-MiniLM-L6-v2/ --model transformers:BertForTokenClassification --arg num_labels=2 --save plan.json",
    configure_plan,
    run_plan,
)

LOAD = Command(
    "load",
    "graft SRC into a model built from a spec and save the model's weights as safetensors",
    "torchgraft load all-MiniLM-L6-v2/ --model transformers:BertForTokenClassification --arg num_labels=2 --out tokcls.safetensors",
    configure_load,
    run_load,
)
