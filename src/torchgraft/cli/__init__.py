"""The ``torchgraft`` command: a thin layer over the library functions.

Every subcommand lives in its own module and is listed in :data:`COMMANDS`; each prints a readable
table by default and one JSON object with ``--json``. Nothing here imports torch: commands import
what they need when they run (``inspect``, ``diff`` and ``scan`` of safetensors files never do).

Exit codes: 0 ok, 1 problems found, 2 usage error or unreadable input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..errors import AdapterError, CheckpointError, LoadError, PlanError, UnsafeCheckpointError
from . import convert_cmd, demo_cmd, diff_cmd, graft_cmd, inspect_cmd, scan_cmd
from .common import EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, Command, UsageError

__all__ = ["COMMANDS", "EXIT_OK", "EXIT_PROBLEMS", "EXIT_USAGE", "Command", "build_parser", "main"]

COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        inspect_cmd.COMMAND,
        diff_cmd.COMMAND,
        graft_cmd.PLAN,
        graft_cmd.LOAD,
        convert_cmd.COMMAND,
        scan_cmd.COMMAND,
        demo_cmd.COMMAND,
    )
}

_EPILOG = """\
exit codes: 0 ok, 1 problems found (differences, an unsafe file, --strict misfits), 2 usage error or unreadable input.
PATH may be a file, a sharded checkpoint's *.index.json, a model directory, or hf:org/name[@revision]
(from the Hugging Face cache; needs huggingface_hub). Add --debug to see tracebacks.

examples:
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchgraft",
        description="Load pretrained weights from any common checkpoint into any PyTorch model.",
        epilog=_EPILOG + "\n".join(f"  {c.example}" for c in COMMANDS.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(
            cmd.name,
            help=cmd.help,
            description=cmd.help,
            epilog=f"example:\n  {cmd.example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
        )
        cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _version() -> str:
    """``torchgraft 0.1.0 (torch 2.13.0, Python 3.12.3)``, without importing torch."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"torchgraft {__version__} (torch {torch_version}, Python {platform.python_version()})"


def _one_line(e: BaseException) -> str:
    """The message on one line: ``Cannot load 'x': reason. Try: hint``."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    out = lines[0]
    for line in lines[1:]:
        out += ("" if out.endswith((".", ":")) else ".") + " " + line
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_USAGE
    # the tables already say what the logger would warn about; --debug shows both
    logging.getLogger("torchgraft").setLevel(logging.INFO if args.debug else logging.ERROR)
    try:
        return args._run(args)
    except KeyboardInterrupt:
        return 130
    except (LoadError, PlanError, AdapterError) as e:
        if args.debug:
            raise
        first, *rest = str(e).splitlines() or [type(e).__name__]
        print(f"torchgraft: error: {first}", file=sys.stderr)
        for line in rest:  # a LoadError lists one problem per line
            print(f"  {line.strip()}", file=sys.stderr)
        return EXIT_PROBLEMS
    except (CheckpointError, FileExistsError, UsageError) as e:
        if args.debug:
            raise
        print(f"torchgraft: error: {_one_line(e)}", file=sys.stderr)
        if isinstance(e, UnsafeCheckpointError) and e.globals and not e.dangerous:
            flags = " ".join(f"--allow-globals {name}" for name in e.globals)
            print(f"  on the command line, if you trust the file: {flags}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as e:  # an optional extra that is not installed
        if args.debug:
            raise
        print(f"torchgraft: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if args.debug:
            raise
        print(
            f"torchgraft: error: {type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_PROBLEMS


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
