"""keys.py: dotted names. Each helper is checked against an oracle written here: a brace expander
for the collapsed labels, json.dumps + hashlib for the fingerprint, a brute-force count for the
prefix gains, integer order for the natural sort."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchgraft.keys import (
    collapse_groups,
    collapse_keys,
    format_ranges,
    layout_fingerprint,
    natural_key,
    prefix_gains,
    split_key,
)

FAST = settings(max_examples=60, deadline=None)


# ---------------------------------------------------------------------------
# oracles


def expand_ranges(text: str) -> list[int]:
    """``"0..3,5"`` -> ``[0, 1, 2, 3, 5]``: the inverse of format_ranges, written independently."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("..")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def expand_label(label: str) -> set[str]:
    """Every key a collapsed label stands for: ``a.{0..2}.{b,w}`` is the product of its braces."""
    pieces = re.split(r"(\{[^}]*\})", label)
    choices = []
    for piece in pieces:
        if piece.startswith("{"):
            body = piece[1:-1]
            if re.fullmatch(r"[\d.,]+", body):
                choices.append([str(n) for n in expand_ranges(body)])
            else:
                choices.append(body.split(","))
        else:
            choices.append([piece])
    return {"".join(c) for c in itertools.product(*choices)}


def json_fingerprint(rows) -> str:
    """What layout_fingerprint promises: SHA-256 over ``json.dumps([name, list(shape), *rest])`` per row."""
    h = hashlib.sha256()
    for name, shape, *rest in rows:
        h.update(json.dumps([name, [int(d) for d in shape], *rest]).encode())
    return h.hexdigest()[:16]


def brute_prefix_gains(source: set[str], target: set[str], max_depth: int) -> Counter:
    """Try every leading module path of every name, by string slicing."""
    gains: Counter = Counter()
    for names, other, mode in ((target, source, "add"), (source, target, "strip")):
        for name in names:
            parts = name.split(".")
            for depth in range(1, min(max_depth, len(parts) - 1) + 1):
                prefix = ".".join(parts[:depth]) + "."
                if name[len(prefix) :] in other:
                    gains[mode, prefix] += 1
    return gains


# ---------------------------------------------------------------------------
# split_key


@pytest.mark.parametrize(
    "key, expected",
    [
        ("encoder.layer.0.dense.weight", ("encoder.layer.0.dense", "weight")),
        ("weight", ("", "weight")),  # a root-level parameter has the empty module path
        ("a.b", ("a", "b")),
        ("a.b.", ("a.b", "")),
    ],
)
def test_split_key_examples(key, expected):
    assert split_key(key) == expected


@FAST
@given(st.lists(st.text("abc0_", min_size=1, max_size=4), min_size=1, max_size=5))
def test_split_key_takes_the_last_component(parts):
    key = ".".join(parts)
    module, attr = split_key(key)
    assert attr == parts[-1]
    assert module == ".".join(parts[:-1])
    assert (f"{module}.{attr}" if module else attr) == key


# ---------------------------------------------------------------------------
# natural_key


def test_natural_key_sorts_numbers_as_numbers():
    keys = ["layer.10.w", "layer.2.w", "layer.1.w", "layer.2.b", "emb.w"]
    assert sorted(keys, key=natural_key) == ["emb.w", "layer.1.w", "layer.2.b", "layer.2.w", "layer.10.w"]
    assert sorted(keys) != sorted(keys, key=natural_key)  # plain string order puts 10 before 2


def test_natural_key_puts_numbered_children_before_named_ones():
    assert sorted(["blocks.norm.w", "blocks.3.w", "blocks.0.w"], key=natural_key) == [
        "blocks.0.w",
        "blocks.3.w",
        "blocks.norm.w",
    ]


@FAST
@given(st.lists(st.integers(0, 10_000), unique=True, min_size=2, max_size=20))
def test_natural_key_agrees_with_integer_order(numbers):
    keys = [f"model.layers.{n}.mlp.weight" for n in numbers]
    assert sorted(keys, key=natural_key) == [f"model.layers.{n}.mlp.weight" for n in sorted(numbers)]


# ---------------------------------------------------------------------------
# format_ranges


@pytest.mark.parametrize(
    "numbers, expected",
    [
        ([0, 1, 2, 3, 5, 7, 8], "0..3,5,7..8"),
        ([], ""),
        ([4], "4"),
        ([3, 1, 2, 2, 1], "1..3"),  # unsorted and repeated
        ([0, 2, 4], "0,2,4"),
        (iter([9, 10]), "9..10"),  # any iterable
    ],
)
def test_format_ranges_examples(numbers, expected):
    assert format_ranges(numbers) == expected


@FAST
@given(st.lists(st.integers(0, 200), min_size=1, max_size=40))
def test_format_ranges_round_trips_and_is_minimal(numbers):
    text = format_ranges(numbers)
    assert expand_ranges(text) == sorted(set(numbers))
    runs = text.split(",")
    # minimal: two runs never touch (otherwise they would have been one run)
    ends = [(int(r.partition("..")[0]), int(r.partition("..")[2] or r)) for r in runs]
    assert all(b[0] > a[1] + 1 for a, b in itertools.pairwise(ends))


# ---------------------------------------------------------------------------
# collapse_keys / collapse_groups


def test_collapse_keys_examples():
    assert collapse_keys(["a.0.w", "a.1.w", "a.0.b", "a.1.b", "c"]) == ["a.{0..1}.{b,w}", "c"]
    # an incomplete product: only the last number collapses, nothing is invented
    assert collapse_keys(["x.2.y.3", "x.2.y.5", "x.4.y.3"]) == ["x.2.y.{3,5}", "x.4.y.3"]
    # a gap in the layers is written as two ranges
    assert collapse_keys([f"h.{i}.w" for i in (0, 1, 2, 5, 6)]) == ["h.{0..2,5..6}.w"]
    # duplicates count once; a lone key stays as it is
    assert collapse_keys(["only.key", "only.key"]) == ["only.key"]
    assert collapse_keys([]) == []


def test_collapse_groups_lists_the_keys_of_each_label():
    groups = collapse_groups(["enc.1.w", "enc.0.w", "head.b", "head.w"])
    assert [label for label, _ in groups] == ["enc.{0..1}.w", "head.{b,w}"]
    assert sorted(groups[0][1]) == ["enc.0.w", "enc.1.w"]
    assert sorted(groups[1][1]) == ["head.b", "head.w"]


def test_collapse_keys_orders_labels_naturally():
    keys = [f"blocks.{i}.w" for i in (10, 11)] + ["blocks.2.x.w", "a.w"]
    assert collapse_keys(keys) == ["a.w", "blocks.2.x.w", "blocks.{10..11}.w"]


_KEY = st.builds(
    lambda stem, i, j, leaf: f"{stem}.{i}.sub.{j}.{leaf}" if j is not None else f"{stem}.{i}.{leaf}",
    st.sampled_from(["encoder.layer", "decoder.block", "blocks"]),
    st.integers(0, 12),
    st.none() | st.integers(0, 3),
    st.sampled_from(["weight", "bias", "running_mean"]),
)


@FAST
@given(st.lists(_KEY | st.sampled_from(["embeddings.word.weight", "head.weight", "head.bias"]), max_size=40))
def test_collapse_groups_partition_the_keys_and_invent_none(keys):
    groups = collapse_groups(keys)
    members = [k for _, group in groups for k in group]
    assert sorted(members) == sorted(set(keys))  # every key once
    for label, group in groups:
        assert expand_label(label) == set(group)  # a label stands for exactly its keys
    assert collapse_keys(keys) == [label for label, _ in groups]


# ---------------------------------------------------------------------------
# layout_fingerprint


def test_layout_fingerprint_is_sixteen_hex_digits_of_the_json_rows():
    rows = [("encoder.weight", (4, 3), "float32"), ("encoder.bias", [4], "float32")]
    fp = layout_fingerprint(rows)
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert fp == json_fingerprint(rows)


def test_layout_fingerprint_sees_names_shapes_dtypes_and_order():
    base = [("a", (2, 3), "float32"), ("b", (3,), "float32")]
    fp = layout_fingerprint(base)
    assert layout_fingerprint([("a", [2, 3], "float32"), ("b", [3], "float32")]) == fp  # tuple or list
    assert layout_fingerprint([("a", (3, 2), "float32"), ("b", (3,), "float32")]) != fp
    assert layout_fingerprint([("a", (2, 3), "float16"), ("b", (3,), "float32")]) != fp
    assert layout_fingerprint([("A", (2, 3), "float32"), ("b", (3,), "float32")]) != fp
    assert layout_fingerprint(list(reversed(base))) != fp
    assert layout_fingerprint([("a", (2, 3)), ("b", (3,))]) != fp  # rows without a dtype are other rows
    assert layout_fingerprint([]) == hashlib.sha256(b"").hexdigest()[:16]


@FAST
@given(
    st.lists(
        st.tuples(
            st.text(min_size=0, max_size=12),  # quotes, backslashes, control and non-ASCII characters
            st.lists(st.integers(0, 2**40), max_size=4),
            st.sampled_from(["float32", "bfloat16", 'we"ird', "ü"]),
        ),
        max_size=6,
    )
)
def test_layout_fingerprint_matches_json_dumps_for_any_name(rows):
    assert layout_fingerprint(rows) == json_fingerprint(rows)
    assert layout_fingerprint([r[:2] for r in rows]) == json_fingerprint([r[:2] for r in rows])


# ---------------------------------------------------------------------------
# prefix_gains


def test_prefix_gains_counts_added_and_stripped_prefixes():
    source = {"embeddings.w", "encoder.0.w", "pooler.w"}
    assert prefix_gains(source, {"bert.embeddings.w", "bert.encoder.0.w", "cls.w"}) == Counter({("add", "bert."): 2})
    assert prefix_gains({"module.fc.w", "module.fc.b", "x"}, {"fc.w", "fc.b"}) == Counter({("strip", "module."): 2})
    assert prefix_gains({"a.w"}, {"b.w"}) == Counter()


def test_prefix_gains_looks_max_depth_components_deep():
    source = {"fc.w"}
    target = {"model.backbone.fc.w"}
    assert prefix_gains(source, target) == Counter({("add", "model.backbone."): 1})
    assert prefix_gains(source, target, max_depth=1) == Counter()
    assert prefix_gains({"fc.w"}, {"a.b.c.fc.w"}, max_depth=3) == Counter({("add", "a.b.c."): 1})


_NAME = st.lists(st.sampled_from(["model", "bert", "fc", "w", "0", "b"]), min_size=1, max_size=4).map(".".join)


@FAST
@given(st.sets(_NAME, max_size=10), st.sets(_NAME, max_size=10), st.integers(1, 3))
def test_prefix_gains_agrees_with_brute_force(source, target, depth):
    assert prefix_gains(source, target, max_depth=depth) == brute_prefix_gains(source, target, depth)
