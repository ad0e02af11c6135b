"""messages.py: the helpers every error message uses to quote values."""

from __future__ import annotations

import pytest

from torchgraft.messages import describe_adapter, first_line, short_repr, shorten


@pytest.mark.parametrize("limit", [5, 10, 80])
def test_shorten_cuts_to_the_limit_and_marks_the_cut(limit):
    assert shorten("a" * limit, limit) == "a" * limit  # exactly the limit: unchanged
    cut = shorten("a" * (limit + 1), limit)
    assert len(cut) == limit and cut.endswith("...") and cut[:-3] == "a" * (limit - 3)


def test_short_repr_quotes_and_cuts_a_hostile_name():
    assert short_repr("w") == "'w'"
    long = short_repr("x" * 10_000)
    assert len(long) == 80 and long.startswith("'xxx") and long.endswith("...")
    assert short_repr([1, 2], limit=4) == "[..."


def test_first_line_of_errors_and_messages():
    assert first_line(ValueError("  bad header\n  at byte 8")) == "bad header"
    assert first_line(KeyError()) == "KeyError"  # no text: the type names it
    assert first_line("") == "no details"
    assert first_line("\n\nsecond") == "second"  # leading blank lines are stripped
    assert first_line(OSError("x" * 500)) == "x" * 300
    assert first_line(OSError("x" * 500), 200) == "x" * 200


def test_describe_adapter():
    assert describe_adapter({"name": "positions_1d", "args": {}}) == "positions_1d"
    assert describe_adapter({"name": "reinit"}) == "reinit"
    assert describe_adapter({"name": "input_channels", "args": {"method": "sum"}}) == "input_channels(method='sum')"
    spec = {"name": "output_rows", "args": {"keep": list(range(7)), "fill": "zeros"}}
    assert describe_adapter(spec) == "output_rows(keep=[7 items], fill='zeros')"
    assert describe_adapter({"name": "output_rows", "args": {"keep": [2, 0]}}) == "output_rows(keep=[2, 0])"
