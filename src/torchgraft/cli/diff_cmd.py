"""``torchgraft diff A B``: two checkpoints, or a checkpoint and a model, by names, shapes, dtypes and values.

Exit 0 when nothing differs, 1 when something does.
"""

from __future__ import annotations

import argparse
from typing import Any

from .common import EXIT_OK, EXIT_PROBLEMS, Command, UsageError, add_json, console, print_json, progress, status
from .model_spec import build_model, looks_like_model_spec, parse_kv


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="argument for the model factory, or a config override for transformers: specs (repeatable)",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="DIR",
        help="for transformers:ClassName: the directory (or hf:org/name) with config.json",
    )


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A", help="checkpoint (file, *.index.json, directory, hf:org/name) or model spec")
    p.add_argument("b", metavar="B", help="checkpoint or model spec (package.module:factory, transformers:ClassName)")
    p.add_argument(
        "--values", action="store_true", help="read the tensors: max abs and relative change per tensor and per layer"
    )
    p.add_argument(
        "--plot",
        default=None,
        metavar="OUT.png",
        help="draw the relative change per layer as a PNG (implies --values; needs matplotlib)",
    )
    add_model_options(p)
    add_json(p)


def _side(text: str, args: argparse.Namespace) -> Any:
    if looks_like_model_spec(text):
        return build_model(text, args=parse_kv(args.arg), config=args.config)
    return text


def run(args: argparse.Namespace) -> int:
    from ..diff import diff

    if (args.arg or args.config) and not (looks_like_model_spec(args.a) or looks_like_model_spec(args.b)):
        raise UsageError(
            "--arg and --config describe a model spec; neither A nor B is one (package.module:factory or transformers:ClassName)"
        )
    if args.plot and not args.plot.lower().endswith(".png"):
        raise UsageError(f"--plot {args.plot!r}: the plot is a PNG file; name it *.png")
    if args.plot:
        _check_matplotlib()
    a, b = _side(args.a, args), _side(args.b, args)
    values = args.values or bool(args.plot)
    if values:
        with progress(args, "comparing values", unit_bytes=False) as bar:
            result = diff(a, b, values=True, progress=bar)
    else:
        with status(args, "reading names and shapes"):
            result = diff(a, b)
    if args.plot:
        result.plot(args.plot)
    if args.json:
        out = result.to_dict()
        if args.plot:
            out["plot"] = args.plot
        print_json(out)
    else:
        con = console(args)
        con.print(result)
        if args.plot:
            con.print(f"plot written to {args.plot}", markup=False)
    return EXIT_PROBLEMS if result.changed else EXIT_OK


def _check_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'torchgraft[plot]'")


COMMAND = Command(
    "diff",
    "compare two checkpoints, or a checkpoint and a model: only-in-A/B, shape and dtype changes, likely renames, value changes",
    "torchgraft diff base/model.safetensors finetuned/model.safetensors --values --plot change.png",
    configure,
    run,
)
