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
    add_allow_globals,
    add_json,
    console,
    fmt_bytes,
    print_json,
    progress,
    status,
)
from ..keys import grouped_keys
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
        "--rules",
        action="append",
        default=[],
        metavar="OLD=NEW|RULES.json",
        help="rename checkpoint names before matching: 'old.{}.name=new.{}.name' ({} = layer number), "
        "'drop.me=' to drop, or a JSON file with {old: new or null, or model template: transform object}; repeatable",
    )
    p.add_argument(
        "--recipe",
        default=None,
        metavar="NAME",
        help="a cross-codebase recipe (renames and transforms), e.g. gpt2-to-nanogpt; see torchgraft.recipes",
    )
    p.add_argument(
        "--recipe-param",
        action="append",
        default=[],
        metavar="KEY=INT",
        help="a number the recipe needs (n_layer=12); repeatable",
    )
    p.add_argument(
        "--container", default=None, help="where the state dict sits in a training checkpoint (e.g. state_dict_ema)"
    )
    add_allow_globals(p)
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
    p.add_argument(
        "--check-finite",
        choices=["warn", "error"],
        default=None,
        help="look for NaN / Inf in every loaded value (reads all of them): list them, or refuse the load (write nothing)",
    )
    p.add_argument("--force", action="store_true", help="replace DST (and its config.json) if it exists")


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


def rules_option(items: list[str]) -> dict[str, Any] | None:
    """``["a.{}.x=b.{}.y", "drop.me=", "rules.json"]`` -> ``{"a.{}.x": "b.{}.y", "drop.me": None, ...}``.

    A JSON file may also hold transforms: ``{"blocks.{}.attn.{q,k,v}.weight": {"op": "split", "args":
    {"dim": 0}, "inputs": [{"source": "h.{}.attn.c_attn.weight"}]}}`` (the form ``Expr.to_dict()`` writes).

    Raises:
        UsageError: an item that is neither ``OLD=NEW`` nor a readable JSON object of ``{old: new or null}``.
    """
    if not items:
        return None
    rules: dict[str, str | None] = {}
    for item in items:
        old, sep, new = item.partition("=")
        if sep and old.strip():
            rules[old.strip()] = new.strip() or None
            continue
        try:
            data = json.loads(Path(item).expanduser().read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UsageError(
                f"--rules {item!r}: write OLD=NEW ('encoder.{{}}.attn=layer.{{}}.attention', 'drop.me=') "
                f"or name a JSON file of {{old: new or null}} ({e})"
            ) from None
        if not isinstance(data, dict) or not all(isinstance(v, (str, type(None), dict)) for v in data.values()):
            raise UsageError(f"--rules {item!r}: the JSON file must hold one object of {{old: new or null}}")
        from ..errors import PlanError
        from ..transforms import Expr

        for key, value in data.items():
            try:
                rules[key] = Expr.from_dict(value) if isinstance(value, dict) else value
            except PlanError as e:
                raise UsageError(f"--rules {item!r}: {key!r}: {e}") from None
    return rules


def recipe_option(name: str | None, params: list[str]) -> dict[str, Any] | None:
    """``--recipe NAME --recipe-param n_layer=12`` -> the recipe's rules table.

    Raises:
        UsageError: a parameter that is not ``KEY=INT``, an unknown recipe or missing parameters.
    """
    if name is None:
        if params:
            raise UsageError("--recipe-param needs --recipe NAME")
        return None
    values: dict[str, int] = {}
    for item in params:
        key, sep, value = item.partition("=")
        try:
            values[key.strip()] = int(value)
        except ValueError:
            raise UsageError(f"--recipe-param {item!r}: write KEY=INT (n_layer=12)") from None
        if not sep or not key.strip():
            raise UsageError(f"--recipe-param {item!r}: write KEY=INT (n_layer=12)")
    from ..errors import PlanError
    from ..recipes import recipe

    try:
        return recipe(name, **values)
    except PlanError as e:
        raise UsageError(f"--recipe {name}: {e}") from None


def _plan_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {
        "prefix": args.prefix,
        "ignore_missing": args.ignore_missing,
        "ignore_unexpected": args.ignore_unexpected,
    }
    recipe = recipe_option(getattr(args, "recipe", None), getattr(args, "recipe_param", []))
    rules = {**(recipe or {}), **(rules_option(getattr(args, "rules", [])) or {})}
    if rules:
        options["rules"] = rules
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

    return open_source(args.src, container=args.container, allow_globals=args.allow_globals or None)


def _model_options(args: argparse.Namespace) -> list[str]:
    """The options that build the model and open SRC, as command-line words (what ``load --plan`` needs again)."""
    words = ["--model", args.model]
    if args.config is not None:
        words += ["--config", args.config]
    for item in args.arg:
        words += ["--arg", item]
    if args.container is not None:
        words += ["--container", args.container]
    for name in args.allow_globals:
        words += ["--allow-globals", name]
    return words


def _command(*words: str) -> str:
    import shlex

    return "torchgraft " + " ".join(shlex.quote(w) for w in words)


def _strict_failure(plan: Any, action: str) -> str:
    lines = [f"--strict: the checkpoint does not fit the model ({len(plan.problems())} problems); {action}"]
    lines += plan.grouped_problems()
    fixes = plan.fixes(cli=True)
    if fixes:
        lines.append("to fix, pass:")
        lines += [f"  {fix}" for fix in fixes]
    return "\n  ".join(lines)


def _does_not_belong(plan: Any, model: Any, args: argparse.Namespace) -> str | None:
    """A verdict when the checkpoint is not this model's: its names matched only through a guessed prefix.

    ``--model torch.nn:Linear`` on a BERT checkpoint "matches" ``pooler.dense.{weight,bias}`` once the
    prefix ``pooler.dense.`` is removed; using 2 of 104 tensors that way is a coincidence, not a load.
    """
    if args.prefix is not None or not plan.prefix:
        return None
    declared = getattr(model, "base_model_prefix", "") or ""
    guessed = plan.prefix["prefix"]
    if declared and guessed == declared + ".":
        return None
    used = len(plan.loaded)
    total = used + len(plan.unexpected)
    if total == 0 or used * 2 > total:
        return None
    verb = "removing" if plan.prefix["mode"] == "strip" else "adding"
    return (
        f"the checkpoint does not belong to this model: only {used} of its {total} tensors match, and only after "
        f"{verb} the prefix {guessed!r} that torchgraft guessed (not the model's base-model prefix). "
        f"Check --model and SRC; to load those {used} tensors anyway, pass --prefix {guessed.rstrip('.')}"
    )


def _stale_plan_error(
    plan: Any, made_with: list[str] | None, model: Any, src: Any, args: argparse.Namespace
) -> str | None:
    """Why a saved plan does not fit (names and shapes that changed), with the command that fixes it."""
    from ..target import TargetView

    view = TargetView.of(model)
    reasons = []
    if plan.model_fingerprint and plan.model_fingerprint != view.fingerprint():
        now = {name: tuple(info.shape) for name, info in view.entries.items()}
        then = {name: tuple(e.shape) for name, e in plan.entries.items()}
        changed = [f"{n} {list(then[n])} -> {list(now[n])}" for n in then if n in now and then[n] != now[n]]
        buffers = {name for name, _ in model.named_buffers()}  # non-persistent ones are planned, not fingerprinted
        gone = [n for n in then if n not in now and n not in buffers]
        new = [n for n in now if n not in then]
        parts = []
        if changed:
            parts.append(f"shapes changed: {', '.join(changed[:6])}" + (" ..." if len(changed) > 6 else ""))
        if gone:
            parts.append(f"names no longer in the model: {grouped_keys(gone, 4)}")
        if new:
            parts.append(f"names new in the model: {grouped_keys(new, 4)}")
        reasons.append(f"the model differs from the one the plan was made for ({plan.model}): " + "; ".join(parts))
    if plan.source_fingerprint and plan.source_fingerprint != src.fingerprint():
        names = set(src.keys())
        gone = sorted({e.source for e in plan.entries.values() if e.source and e.source not in names})
        detail = f": entries no longer there: {grouped_keys(gone, 4)}" if gone else " (names, shapes or dtypes)"
        reasons.append(f"the checkpoint differs from the one the plan was made for ({plan.source}){detail}")
    if not reasons:
        return None
    lines = ["stale plan: " + reasons[0], *reasons[1:]]
    if made_with and made_with != _model_options(args):
        lines.append(
            f"the plan was made with {' '.join(made_with)}; run: "
            + _command("load", args.src, *made_with, "--plan", args.plan, "--out", args.out)
        )
    lines.append(
        "or make a new plan for this model: "
        + _command("plan", args.src, *_model_options(args), "--save", args.plan)
    )
    return "\n".join(lines)


def _save_plan(plan: Any, path: str, args: argparse.Namespace) -> None:
    """``plan.save`` plus the command-line options that built the model, so a stale plan can say them."""
    from ..fileio import atomic_write_text

    data = plan.to_dict()
    data["made_with"] = _model_options(args)
    atomic_write_text(Path(path), json.dumps(data, indent=1) + "\n")


def _load_saved_plan(path: str) -> tuple[Any, list[str] | None]:
    """The plan and the model options it was made with (``None`` for a plan saved by ``Plan.save``)."""
    import torchgraft as tg

    plan = tg.Plan.load(path)
    try:
        made_with = json.loads(Path(path).read_text(encoding="utf-8")).get("made_with")
    except (OSError, ValueError, AttributeError):
        made_with = None
    if not (isinstance(made_with, list) and all(isinstance(w, str) for w in made_with)):
        made_with = None
    return plan, made_with


def run_plan(args: argparse.Namespace) -> int:
    import torchgraft as tg

    options = _plan_options(args)
    src = _open(args)
    with status(args, "building the model and planning"):
        model = _model(args)
        plan = tg.plan(model, src, **options)
    verdict = _does_not_belong(plan, model, args)
    if args.save:
        _save_plan(plan, args.save, args)
    if args.json:
        out = plan.to_dict()
        if args.save:
            out["saved_to"] = args.save
        if verdict:
            out["verdict"] = verdict
        print_json(out)
    else:
        con = console(args)
        con.print(plan)
        if args.save:
            load = _command("load", args.src, *_model_options(args), "--plan", args.save, "--out", "OUT_DIR/")
            con.print(f"plan saved to {args.save}; execute it with:\n  {load}", markup=False)
    if verdict:
        print(f"torchgraft: {verdict}", file=sys.stderr)
        return EXIT_PROBLEMS
    if args.strict and plan.problems():
        print(f"torchgraft: {_strict_failure(plan, 'nothing to do')}", file=sys.stderr)
        return EXIT_PROBLEMS
    return EXIT_OK


def _config_to_write(model: Any, out_path: Path) -> tuple[Any, Path] | None:
    """A transformers model written as ``DIR/model.safetensors`` gets ``DIR/config.json`` too.

    So that ``from_pretrained(DIR)`` reads the result (with ``--arg`` changes such as ``num_labels``).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string") or out_path.name != "model.safetensors":
        return None
    import copy

    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]  # what save_pretrained records: AutoModel picks this class
    return config, out_path.parent / "config.json"


def run_load(args: argparse.Namespace) -> int:
    import torchgraft as tg

    from ..convert import convert, destination_path, parse_dtype, parse_size

    try:
        dtype_name = parse_dtype(args.dtype)
        parse_size(args.max_shard_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.plan and (args.align or args.adapt or args.rules):
        raise UsageError(
            "--plan already decides every tensor; drop --align/--adapt/--rules (or make a new plan with them)"
        )
    try:
        out_path = destination_path(args.out)  # a directory means model.safetensors in it
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not args.force and out_path.exists():  # before the model is built and loaded
        raise FileExistsError(f"{out_path} exists; pass --force to replace it")
    src = _open(args)
    with status(args, "building the model and planning"):
        model = _model(args)
        if args.plan:
            plan, made_with = _load_saved_plan(args.plan)
            stale = _stale_plan_error(plan, made_with, model, src, args)
            if stale:
                raise tg.PlanError(stale)
        else:
            plan = tg.plan(model, src, **_plan_options(args))
    config_out = _config_to_write(model, out_path)
    if config_out and not args.force and config_out[1].exists():
        raise FileExistsError(f"{config_out[1]} exists; pass --force to replace it (with the model's config)")
    verdict = None if args.plan else _does_not_belong(plan, model, args)
    failure = f"{verdict}; nothing written" if verdict else None
    if not failure and args.strict and plan.problems():
        failure = _strict_failure(plan, "nothing written")
    if failure:
        if args.json:
            print_json({"plan": plan.to_dict(), "written": None, "error": failure})
        else:
            console(args).print(plan)
        print(f"torchgraft: {failure}", file=sys.stderr)
        return EXIT_PROBLEMS
    import torch

    with status(args, f"loading {len(plan.loaded)} tensors"):
        report = tg.load(
            model,
            src,
            plan=plan,
            dtype=getattr(torch, dtype_name) if dtype_name else None,
            check_finite=args.check_finite or False,
        )
    with progress(args, f"writing {args.out}") as bar, torch.no_grad():
        written = convert(
            model.state_dict(),
            args.out,
            max_shard_size=args.max_shard_size,
            force=args.force,
            dedupe_tied=args.dedupe_tied,
            progress=bar,
        )
    config_written = None
    if config_out:
        from ..fileio import atomic_write_text

        config, config_path = config_out
        atomic_write_text(config_path, config.to_json_string(use_diff=True))
        config_written = str(config_path)
    if args.json:
        print_json({"report": report.to_dict(), "written": {**written.to_dict(), "config": config_written}})
        return EXIT_OK
    con = console(args)
    con.print(report)
    where = written.index or written.files[0]
    con.print(f"wrote {written.tensors} tensors ({fmt_bytes(written.bytes)}) to {where}", markup=False)
    if config_written:
        con.print(
            f"wrote {config_written}: transformers' from_pretrained({str(out_path.parent)!r}) loads the result",
            markup=False,
        )
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
    "torchgraft load all-MiniLM-L6-v2/ --model transformers:BertForTokenClassification --arg num_labels=2 --out tokcls/",
    configure_load,
    run_load,
)
