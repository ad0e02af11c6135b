"""How values read in error messages and notes: cut reprs, first lines of errors, adapter specs.

Torch-free and free of torchgraft imports, so every stage (readers, policy, report) can use it.

Example:
    >>> short_repr("x" * 100, limit=10)
    "'xxxxxx..."
    >>> first_line(ValueError("bad header\\n  at byte 8"))
    'bad header'
    >>> describe_adapter({"name": "input_channels", "args": {"method": "sum"}})
    "input_channels(method='sum')"
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["describe_adapter", "first_line", "short_repr", "shorten"]


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters (the last three are ``...`` when cut)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value: object, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: names and shapes in a hostile header can be megabytes long."""
    return shorten(repr(value), limit)


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """The first line of an error (or a message), at most ``limit`` characters.

    An error without text gives its type's name; an empty message gives ``"no details"``.
    """
    fallback = type(error).__name__ if isinstance(error, BaseException) else "no details"
    return (str(error).strip().splitlines() or [fallback])[0][:limit]


def describe_adapter(spec: Mapping[str, Any]) -> str:
    """``{"name": "input_channels", "args": {"method": "sum"}}`` -> ``input_channels(method='sum')``."""
    args = ", ".join(
        f"{k}=[{len(v)} items]" if isinstance(v, list) and len(v) > 6 else f"{k}={v!r}"
        for k, v in spec.get("args", {}).items()
    )
    return f"{spec.get('name')}({args})" if args else str(spec.get("name"))
