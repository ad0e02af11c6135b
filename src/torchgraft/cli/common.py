"""What every command shares: exit codes, the command record, consoles, progress, argument helpers.

Nothing here imports torch; rich is imported when a command prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "EXIT_OK",
    "EXIT_PROBLEMS",
    "EXIT_USAGE",
    "Command",
    "UsageError",
    "add_allow_globals",
    "add_json",
    "console",
    "fmt_bytes",
    "print_json",
    "progress",
    "status",
]

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """A command line that cannot work as written; the message says what to write instead (exit 2)."""


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, an example, how to configure its parser, and what it runs."""

    name: str
    help: str
    example: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def console(args: argparse.Namespace | None = None, *, stderr: bool = False):
    """A rich console: colours and live output on a terminal only, 120 columns when piped."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    tty = _is_terminal(stream)
    return Console(
        file=stream,
        highlight=False,
        soft_wrap=not tty,  # piped output: never break a line of text (paths are long)
        width=None if tty else 120,
        force_terminal=tty,
        color_system="auto" if tty else None,
    )


def fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def print_json(obj: Any) -> None:
    print(json.dumps(obj, default=str))


def _live(args: argparse.Namespace) -> bool:
    return not getattr(args, "json", False) and _is_terminal(sys.stderr)


@contextlib.contextmanager
def progress(
    args: argparse.Namespace, description: str, *, unit_bytes: bool = True
) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr when it is a terminal (never with ``--json``); yields the callback or ``None``."""
    if not _live(args):
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    amount = DownloadColumn(binary_units=True) if unit_bytes else MofNCompleteColumn()  # MiB, like every size printed
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        amount,
        TimeRemainingColumn(),
        console=console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@contextlib.contextmanager
def status(args: argparse.Namespace, message: str) -> Iterator[None]:
    """A spinner on stderr while something without a known length runs (terminal only)."""
    if not _live(args):
        yield
        return
    with console(stderr=True).status(message):
        yield


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables (no progress output)")


def add_allow_globals(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-globals",
        action="append",
        default=[],
        metavar="MODULE.NAME",
        help="a plain data class a pickle you trust may hold (argparse.Namespace); repeatable. "
        "Globals that run code are never accepted",
    )
