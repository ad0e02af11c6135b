"""Adapters: pure shape functions. Property tests for shape, dtype, identity and the exactness claims;
one test per error path, matched on the message."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from torchgraft import AdapterError
from torchgraft.adapters import (
    ADAPTERS,
    LUMINANCE,
    Adapter,
    embedding_rows,
    input_channels,
    label_rows,
    output_rows,
    positions_1d,
    positions_2d,
    register_adapter,
    resolve,
    run,
)
from torchgraft.rules import apply_rules, compile_rules, select_layers

FAST = settings(max_examples=40, deadline=None)
FLOATS = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])


def _rand(shape, dtype=torch.float64, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------
# input_channels


@FAST
@given(
    out=st.integers(1, 5),
    k=st.integers(1, 3),
    m=st.integers(1, 3),
    kernel=st.sampled_from([(), (1,), (3, 3), (2, 1, 2)]),
    dtype=FLOATS,
    method=st.sampled_from(["sum", "mean", "repeat"]),
)
def test_input_channels_shape_dtype_and_identity(out, k, m, kernel, dtype, method):
    n = k * m
    w = _rand((out, n, *kernel), dtype)
    for target in (m, n, n + 1):
        if method != "repeat" and target > n:
            continue
        adapted = input_channels(w, target, method=method)
        assert adapted.shape == (out, target, *kernel) and adapted.dtype == dtype
    assert input_channels(w, n, method=method) is w  # same count: unchanged
    assert input_channels(w, n, method="luminance") is w


@FAST
@given(out=st.integers(1, 4), k=st.integers(1, 4), m=st.integers(1, 3), seed=st.integers(0, 99))
def test_sum_is_exact_for_channels_repeated_k_times(out, k, m, seed):
    """The new conv on x equals the old conv on x with every channel repeated k = N / M times."""
    w = _rand((out, k * m, 3, 3), seed=seed)
    x = _rand((2, m, 6, 6), seed=seed + 1)
    new = input_channels(w, m, method="sum")
    expected = F.conv2d(x.repeat_interleave(k, dim=1), w)
    assert torch.allclose(F.conv2d(x, new), expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(input_channels(w, m, method="mean"), new / k, rtol=0, atol=1e-15)


def test_sum_grey_equals_rgb_on_repeated_grey_in_float32():
    w = _rand((16, 3, 3, 3), torch.float32)
    grey = _rand((1, 1, 9, 9), torch.float32, seed=3)
    out = F.conv2d(grey, input_channels(w, 1, method="sum"))
    assert (out - F.conv2d(grey.repeat(1, 3, 1, 1), w)).abs().max() < 1e-5


@FAST
@given(out=st.integers(1, 4), n=st.integers(1, 4), reps=st.integers(1, 3), seed=st.integers(0, 99))
def test_repeat_is_exact_when_new_count_is_a_multiple(out, n, reps, seed):
    """timm's rule: tile and scale by N/M; the new conv on x tiled M/N times equals the old conv on x."""
    w = _rand((out, n, 3), seed=seed)
    x = _rand((2, n, 7), seed=seed + 1)
    new = input_channels(w, n * reps, method="repeat")
    assert torch.allclose(F.conv1d(x.repeat(1, reps, 1), new), F.conv1d(x, w), rtol=1e-12, atol=1e-12)


def test_repeat_matches_timm_for_fewer_channels():
    w = _rand((4, 3, 3, 3))
    assert torch.allclose(input_channels(w, 2, method="repeat"), w[:, :2] * 3 / 2, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_luminance_is_the_seed_formula(dtype):
    w = _rand((32, 3, 3, 3), dtype)
    wd = w.double()
    exact = 0.299 * wd[:, 0:1] + 0.587 * wd[:, 1:2] + 0.114 * wd[:, 2:3]
    got = input_channels(w, 1, method="luminance")
    assert got.dtype == dtype and got.shape == (32, 1, 3, 3)
    if dtype == torch.float32:  # computed in float64, rounded once: the float32 of the exact value
        assert torch.equal(got, exact.float())
    else:  # within one rounding of the exact value
        assert (got.double() - exact).abs().max() <= torch.finfo(dtype).eps * exact.abs().max()
    assert LUMINANCE == (0.299, 0.587, 0.114)


@FAST
@given(out=st.integers(1, 4), n=st.integers(1, 4), m=st.integers(1, 4), seed=st.integers(0, 99))
def test_mixing_matrix_conv_equals_old_conv_on_mixed_input(out, n, m, seed):
    w = _rand((out, n, 3, 3), seed=seed)
    mat = _rand((m, n), seed=seed + 1)
    y = _rand((1, m, 5, 5), seed=seed + 2)
    new = input_channels(w, m, method=mat.tolist())
    mixed = torch.einsum("mn,bmhw->bnhw", mat, y)  # x = matrix.T @ y
    assert torch.allclose(F.conv2d(y, new), F.conv2d(mixed, w), rtol=1e-10, atol=1e-10)


def test_mixing_matrix_applies_even_when_counts_match():
    w = _rand((4, 3, 3, 3))
    bgr = input_channels(w, 3, method=[[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    assert torch.equal(bgr, w.flip(1))
    assert torch.equal(input_channels(w, 3, method=torch.eye(3)), w)


def test_input_channels_works_on_meta_and_does_not_modify_input():
    assert input_channels(torch.empty(8, 3, 3, 3, device="meta"), 1, method="sum").shape == (8, 1, 3, 3)
    w = _rand((4, 3, 3, 3), torch.float32)
    before = w.clone()
    input_channels(w, 1, method="luminance")
    assert torch.equal(w, before)


# ---------------------------------------------------------------------------
# output_rows


@FAST
@given(rows=st.integers(1, 12), extra=st.integers(0, 3), data=st.data(), dtype=FLOATS)
def test_output_rows_picks_the_named_rows(rows, extra, data, dtype):
    w = _rand((rows, 5), dtype)
    n = data.draw(st.integers(1, rows + extra))
    keep = data.draw(st.lists(st.one_of(st.none(), st.integers(0, rows - 1)), min_size=n, max_size=n))
    out = output_rows(w, n, keep=keep, fill="zeros")
    assert out.shape == (n, 5) and out.dtype == dtype
    for j, k in enumerate(keep):
        assert torch.equal(out[j], w[k] if k is not None else torch.zeros_like(w[0]))


@FAST
@given(rows=st.integers(1, 12), data=st.data())
def test_output_rows_first_n_and_identity(rows, data):
    b = _rand((rows,), torch.float32)
    n = data.draw(st.integers(1, rows))
    assert torch.equal(output_rows(b, n), b[:n])
    assert output_rows(b, rows) is b


def test_output_rows_fill_mean_and_growth():
    w = _rand((3, 4))
    out = output_rows(w, 5, fill="mean")
    assert torch.equal(out[:3], w)
    assert torch.allclose(out[3], w.mean(0)) and torch.allclose(out[4], w.mean(0))


def test_output_rows_by_label_name():
    w = torch.arange(4.0)[:, None].repeat(1, 2)
    src = {"0": "cat", "1": "dog", "2": "fox", "3": "owl"}  # config.json keys are strings
    out = output_rows(w, 3, keep=["owl", "cat", "emu"], labels=src, fill="zeros")
    assert out[:, 0].tolist() == [3.0, 0.0, 0.0]
    assert label_rows(src, ["owl", "cat", "emu"]) == [3, 0, None]
    assert label_rows(["a", "b"], {1: "a", 0: "b"}) == [1, 0]


# ---------------------------------------------------------------------------
# embedding_rows


@FAST
@given(
    rows=st.integers(1, 20),
    dim=st.integers(1, 6),
    grow=st.integers(-5, 8),
    dtype=FLOATS,
    init=st.sampled_from(["mean", "zeros"]),
)
def test_embedding_rows_keeps_old_rows_bit_identical(rows, dim, grow, dtype, init):
    w = _rand((rows, dim), dtype)
    n = max(1, rows + grow)
    out = embedding_rows(w, n, init=init)
    assert out.shape == (n, dim) and out.dtype == dtype
    keep = min(n, rows)
    assert torch.equal(out[:keep], w[:keep])
    if n > rows and init == "zeros":
        assert not out[rows:].any()
    assert embedding_rows(w, rows) is w


@FAST
@given(rows=st.integers(1, 30), dim=st.integers(1, 6), added=st.integers(1, 5), seed=st.integers(0, 99))
def test_embedding_rows_new_rows_sit_at_the_mean(rows, dim, added, seed):
    w = _rand((rows, dim), torch.float32, seed=seed)
    mean = w.double().mean(0)
    exact = embedding_rows(w, rows + added, covariance_scale=0)
    assert torch.equal(exact[rows:], mean.float().expand(added, dim))
    near = embedding_rows(w, rows + added)  # transformers' default: covariance * 1e-9
    spread = w.double().std(0, unbiased=False).max().item() if rows > 1 else 0.0
    assert (near[rows:].double() - mean).abs().max() <= 1e-3 * spread + 1e-6


def test_embedding_rows_draw_follows_the_covariance_and_is_seeded():
    torch.manual_seed(0)
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, -0.5, 2.0]], dtype=torch.float64)
    w = torch.randn(4000, 3, dtype=torch.float64) @ mix.T + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    out = embedding_rows(w, 4000 + 20000, covariance_scale=1.0, seed=1)
    new = out[4000:]
    old_cov = torch.cov(w.T, correction=0)
    assert torch.allclose(torch.cov(new.T), old_cov, atol=0.08 * old_cov.abs().max().item())
    assert torch.allclose(new.mean(0), w.mean(0), atol=0.05)
    assert torch.equal(
        embedding_rows(w, 4010, covariance_scale=1.0, seed=1), embedding_rows(w, 4010, covariance_scale=1.0, seed=1)
    )
    assert not torch.equal(
        embedding_rows(w, 4010, covariance_scale=1.0, seed=1), embedding_rows(w, 4010, covariance_scale=1.0, seed=2)
    )


def test_embedding_rows_singular_covariance_falls_back_to_the_mean():
    w = _rand((1, 4), torch.float32)  # one row: zero covariance
    out = embedding_rows(w, 3, covariance_scale=1.0)
    assert torch.equal(out[1:], w.expand(2, 4))


def test_embedding_rows_bias_vector():
    b = _rand((6,), torch.float32)
    out = embedding_rows(b, 8, covariance_scale=0)
    assert torch.equal(out[:6], b) and torch.equal(out[6:], b.double().mean().float().expand(2))


# ---------------------------------------------------------------------------
# positions_1d


def _linear_reference(table: torch.Tensor, n: int) -> torch.Tensor:
    """F.interpolate(linear, align_corners=False), written out: x = (i + 0.5) * P / n - 0.5, clamped."""
    p = table.shape[0]
    rows = []
    for i in range(n):
        x = max((i + 0.5) * p / n - 0.5, 0.0)
        i0 = min(math.floor(x), p - 1)
        i1 = min(i0 + 1, p - 1)
        lam = x - i0
        rows.append((1 - lam) * table[i0] + lam * table[i1])
    return torch.stack(rows)


@FAST
@given(
    p=st.integers(2, 20), n=st.integers(2, 40), dim=st.integers(1, 4), prefix=st.integers(0, 2), seed=st.integers(0, 99)
)
def test_positions_1d_interpolates_linearly_and_keeps_prefix(p, n, dim, prefix, seed):
    w = _rand((p + prefix, dim), seed=seed)
    out = positions_1d(w, n + prefix, num_prefix_tokens=prefix)
    assert out.shape == (n + prefix, dim) and out.dtype == w.dtype
    assert torch.equal(out[:prefix], w[:prefix])
    assert torch.allclose(out[prefix:], _linear_reference(w[prefix:], n), rtol=0, atol=1e-12)
    assert positions_1d(w, p + prefix) is w


@FAST
@given(p=st.integers(1, 10), n=st.integers(1, 30), dtype=FLOATS)
def test_positions_1d_tile_keeps_old_rows(p, n, dtype):
    w = _rand((1, p, 3), dtype)  # [1, P, D] layout too
    out = positions_1d(w, n, method="tile")
    assert out.shape == (1, n, 3) and out.dtype == dtype
    for i in range(n):
        assert torch.equal(out[0, i], w[0, i % p])


def test_positions_1d_keeps_dtype_for_half():
    w = _rand((512, 8), torch.bfloat16)
    assert positions_1d(w, 1024).dtype == torch.bfloat16


# ---------------------------------------------------------------------------
# positions_2d


@FAST
@given(side=st.integers(1, 6), new=st.integers(1, 9), prefix=st.integers(0, 2), dtype=FLOATS, batched=st.booleans())
def test_positions_2d_shape_dtype_prefix_identity(side, new, prefix, dtype, batched):
    w = _rand((prefix + side * side, 4), dtype)
    if batched:
        w = w[None]
    out = positions_2d(w, new, num_prefix_tokens=prefix)
    rows = prefix + new * new
    assert out.shape == ((1, rows, 4) if batched else (rows, 4)) and out.dtype == dtype
    assert torch.equal(out[..., :prefix, :], w[..., :prefix, :])
    assert positions_2d(w, side, num_prefix_tokens=prefix) is w


@FAST
@given(
    h=st.integers(1, 5),
    w_=st.integers(1, 5),
    nh=st.integers(1, 8),
    nw=st.integers(1, 8),
    mode=st.sampled_from(["bicubic", "bilinear"]),
)
def test_positions_2d_constant_grid_stays_constant(h, w_, nh, nw, mode):
    table = torch.full((1, 1 + h * w_, 3), 0.25, dtype=torch.float64)
    table[0, 0] = 7.0
    out = positions_2d(table, (nh, nw), source_grid=(h, w_), mode=mode)
    assert out[0, 0].eq(7.0).all()
    assert torch.allclose(out[0, 1:], torch.full_like(out[0, 1:], 0.25), atol=1e-12)


def test_positions_2d_keeps_rows_and_columns_apart():
    """A grid value = 10 * row + col, resampled (2, 3) -> (4, 6): rows still change by tens, columns by units."""
    rows, cols = torch.meshgrid(torch.arange(2.0), torch.arange(3.0), indexing="ij")
    table = torch.cat([torch.zeros(1, 1), (10 * rows + cols).reshape(-1, 1)])[None].double()
    out = positions_2d(table, (4, 6), source_grid=(2, 3), mode="bilinear", antialias=False)[0, 1:, 0].reshape(4, 6)
    across_cols = out - out[:, :1]
    across_rows = out - out[:1, :]
    assert torch.allclose(across_cols, across_cols[:1].expand(4, 6), atol=1e-12)  # separable: same in every row
    assert torch.allclose(across_rows, across_rows[:, :1].expand(4, 6), atol=1e-12)
    assert 0 < across_cols.max() <= 2 and 5 < across_rows.max() <= 10


def test_positions_2d_matches_timm_style_bicubic():
    pos = _rand((1, 1 + 4 * 4, 6), torch.float32)
    grid = pos[0, 1:].reshape(4, 4, 6).permute(2, 0, 1)[None]
    ref = (
        F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False, antialias=True)[0]
        .permute(1, 2, 0)
        .reshape(36, 6)
    )
    out = positions_2d(pos, 6)
    assert torch.allclose(out[0, 1:], ref, atol=1e-6) and torch.equal(out[0, :1], pos[0, :1])


# ---------------------------------------------------------------------------
# select_layers


def _layer_keys(n: int) -> list[str]:
    return [f"bert.encoder.layer.{i}.{leaf}" for i in range(n) for leaf in ("attn.weight", "out.bias")] + [
        "bert.pooler.weight"
    ]


def _has_cycle(moves: dict[int, int]) -> bool:
    for start in moves:
        seen, s = set(), start
        while s in moves and s not in seen:
            seen.add(s)
            s = moves[s]
        if s == start and moves.get(start) != start:
            return True
    return False


@FAST
@given(data=st.data())
def test_select_layers_renames_exactly_the_selection(data):
    source_n = data.draw(st.integers(1, 14))
    target_n = data.draw(st.integers(1, source_n))
    chosen = data.draw(st.lists(st.integers(0, source_n - 1), min_size=target_n, max_size=target_n, unique=True))
    mapping = dict(enumerate(chosen))
    moves = {s: t for t, s in mapping.items() if s != t}
    try:
        rules = select_layers(mapping, template="encoder.layer.{}", source_layers=source_n)
    except AdapterError as e:
        assert "cycle" in str(e) and _has_cycle(moves)
        return
    assert not _has_cycle(moves)
    result = apply_rules(_layer_keys(source_n), compile_rules(rules), builtin=False).mapping
    back = {s: t for t, s in mapping.items()}
    for key, new in result.items():
        if key == "bert.pooler.weight":
            assert new == key
            continue
        layer = int(key.split(".")[3])
        if layer in back:
            assert new == key.replace(f"layer.{layer}.", f"layer.{back[layer]}.")
        else:
            assert new is None


def test_select_layers_every_other_and_list_forms():
    keys = _layer_keys(12)
    every = apply_rules(
        keys, compile_rules(select_layers("every_other", template="encoder.layer.{}", num_layers=6)), builtin=False
    )
    as_list = apply_rules(
        keys, compile_rules(select_layers([0, 2, 4, 6, 8, 10], template="encoder.layer.{}")), builtin=False
    )
    assert every.mapping == as_list.mapping
    assert every.mapping["bert.encoder.layer.10.out.bias"] == "bert.encoder.layer.5.out.bias"
    assert every.mapping["bert.encoder.layer.11.out.bias"] is None
    assert every.mapping["bert.encoder.layer.1.out.bias"] is None


# ---------------------------------------------------------------------------
# registry, resolve, run


def test_resolve_shorthands_and_json():
    assert resolve("luminance") == {"name": "input_channels", "args": {"method": "luminance"}}
    assert resolve("reinit") == {"name": "reinit", "args": {}}
    assert resolve({"name": "positions_2d", "args": {"grid": (24, 24)}}) == {
        "name": "positions_2d",
        "args": {"grid": [24, 24]},
    }
    assert resolve({"name": "sum"}) == {"name": "input_channels", "args": {"method": "sum"}}
    assert resolve({"name": "input_channels", "args": {"method": torch.eye(2)}})["args"]["method"] == [
        [1.0, 0.0],
        [0.0, 1.0],
    ]


def test_run_every_registered_adapter_hits_the_target_shape():
    cases = {
        "input_channels": ({"method": "sum"}, (8, 3, 3, 3), (8, 1, 3, 3)),
        "output_rows": ({}, (10, 4), (3, 4)),
        "embedding_rows": ({}, (10, 4), (13, 4)),
        "positions_1d": ({}, (16, 4), (24, 4)),
        "positions_2d": ({"num_prefix_tokens": 1}, (1, 17, 4), (1, 37, 4)),
    }
    assert set(cases) <= set(ADAPTERS)
    for name, (args, src, dst) in cases.items():
        out = run({"name": name, "args": args}, _rand(src, torch.float16), target_shape=dst, target="x")
        assert out.shape == dst and out.dtype == torch.float16
        meta = run({"name": name, "args": args}, torch.empty(src, device="meta"), target_shape=dst)
        assert meta.shape == dst


def test_register_adapter_is_used_by_run():
    register_adapter(Adapter("test_negate", lambda t, target_shape: -t, "flip the sign"), replace=True)
    try:
        assert torch.equal(run({"name": "test_negate", "args": {}}, torch.ones(2), target_shape=(2,)), -torch.ones(2))
        with pytest.raises(AdapterError, match="already exists"):
            register_adapter(Adapter("test_negate", lambda t, target_shape: t, "again"))
    finally:
        ADAPTERS.pop("test_negate", None)


# ---------------------------------------------------------------------------
# every error path, by message

W = torch.ones(4, 3, 3, 3)

ERRORS = [
    (lambda: input_channels(torch.ones(3), 1, method="sum"), r"expects a weight \[out, in, \*kernel\]"),
    (lambda: input_channels(W.long(), 1, method="sum"), "needs a floating-point tensor, got int64"),
    (lambda: input_channels(W, 0, method="sum"), "in_channels must be a positive int"),
    (lambda: input_channels(W, 1, method="avg"), "unknown method 'avg'"),
    (lambda: input_channels(W, 2, method="sum"), "3 -> 2 does not"),
    (lambda: input_channels(W, 4, method="mean"), "3 -> 4 does not. Use method='repeat'"),
    (lambda: input_channels(torch.ones(4, 4, 3, 3), 1, method="luminance"), "this weight goes 4 -> 1"),
    (lambda: input_channels(W, 2, method=[[1, 0, 0]]), r"needs \[2, 3\]"),
    (lambda: input_channels(W, 1, method=[["a", "b", "c"]]), "a \\[M, N\\] matrix of numbers"),
    (lambda: input_channels(W, 1, method=[[float("nan"), 0, 0]]), "inf or nan"),
    (lambda: output_rows(torch.tensor(1.0), 1), "got a 0-d tensor"),
    (lambda: output_rows(torch.ones(3), 2, fill="random"), "unknown fill 'random'"),
    (lambda: output_rows(torch.ones(3), 2, keep="ab"), "keep must be a list"),
    (lambda: output_rows(torch.ones(3), 2, keep=[0]), "keep lists 1 rows but the new head has 2"),
    (lambda: output_rows(torch.ones(3), 1, keep=["cat"]), "no labels were given"),
    (lambda: output_rows(torch.ones(3), 1, keep=[3]), r"keep\[0\] = 3 is not a row .* rows 0..2"),
    (lambda: output_rows(torch.ones(3), 1, keep=[1.5]), r"keep\[0\] must be a row index"),
    (lambda: output_rows(torch.ones(3), 4), r"new rows \[3\] have no checkpoint row"),
    (lambda: output_rows(torch.ones(3, dtype=torch.long), 4, fill="mean"), "fill='mean': needs a floating-point"),
    (lambda: output_rows(torch.ones(2), 1, keep=["a"], labels={"x": "a"}), "must map row numbers to names"),
    (lambda: output_rows(torch.ones(2), 1, keep=["a"], labels={0: "a", 2: "b"}), "without gaps"),
    (lambda: output_rows(torch.ones(2), 1, keep=["a"], labels="ab"), "an id2label mapping or a list"),
    (lambda: embedding_rows(torch.ones(2, 2, 2), 3), r"expects a table \[vocab, dim\]"),
    (lambda: embedding_rows(torch.ones(2, 2), 3, init="normal"), "unknown init 'normal'"),
    (lambda: embedding_rows(torch.ones(2, 2), 3, covariance_scale=-1), "covariance_scale must be a number >= 0"),
    (lambda: embedding_rows(torch.ones(0, 2), 3), "the table is empty"),
    (lambda: embedding_rows(torch.ones(2, 2), True), "n must be a positive int"),
    (lambda: positions_1d(torch.ones(2, 4, 4), 3), r"expects a table \[positions, dim\]"),
    (lambda: positions_1d(torch.ones(4, 4), 3, method="cubic"), "unknown method 'cubic'"),
    (lambda: positions_1d(torch.ones(4, 4), 3, num_prefix_tokens=-1), "num_prefix_tokens must be an int >= 0"),
    (lambda: positions_1d(torch.ones(4, 4), 6, num_prefix_tokens=4), "leave no positions"),
    (lambda: positions_2d(torch.ones(2, 5, 4), 2), r"expects a table \[1, tokens, dim\]"),
    (lambda: positions_2d(torch.ones(5, 4), 2, mode="area"), "unknown mode 'area'"),
    (lambda: positions_2d(torch.ones(5, 4), 2, num_prefix_tokens=1.0), "num_prefix_tokens must be an int >= 0"),
    (lambda: positions_2d(torch.ones(5, 4), "2"), r"grid must be an int or \(height, width\)"),
    (lambda: positions_2d(torch.ones(7, 4), 2), "6 grid positions .* are not a square"),
    (
        lambda: positions_2d(torch.ones(7, 4), 2, source_grid=(2, 2)),
        "source_grid 2x2 = 4 positions, but the table has 6",
    ),
    (lambda: select_layers([0, 2], template="encoder.layer"), "exactly one '{}'"),
    (lambda: select_layers({0: -1}, template="l.{}"), "checkpoint layer numbers must be ints >= 0"),
    (lambda: select_layers({0: 7}, template="l.{}", source_layers=6), "checkpoint has layers 0..5"),
    (lambda: select_layers({0: 2, 1: 2}, template="l.{}"), "checkpoint layer 2 is selected for model layers 0 and 1"),
    (lambda: select_layers({0: 1, 1: 0}, template="l.{}"), r"checkpoint layers \[0, 1\] swap places in a cycle"),
    (lambda: select_layers("odd", template="l.{}"), "unknown selection 'odd'"),
    (lambda: select_layers("every_other", template="l.{}"), "'every_other' needs num_layers="),
    (lambda: select_layers(3, template="l.{}"), "layers must be a"),
    (
        lambda: run({"name": "reinit"}, W, target_shape=W.shape, target="head.weight"),
        "'reinit' for 'head.weight' is a plan action",
    ),
    (lambda: run({"name": "nope"}, W, target_shape=W.shape), "unknown adapter 'nope'; choose from .*input_channels"),
    (lambda: run({"name": "input_channels", "args": {}}, W, target_shape=(4, 1, 3, 3)), "needs args {'method'"),
    (
        lambda: run({"name": "input_channels", "args": {"method": "sum"}}, W, target_shape=(4,)),
        r"the target \[4\] is not a weight",
    ),
    (
        lambda: run(
            {"name": "input_channels", "args": {"method": "sum", "x": 1}}, W, target_shape=(4, 1, 3, 3), target="c"
        ),
        "adapter 'input_channels' for 'c': bad arguments",
    ),
    (
        lambda: run({"name": "input_channels", "args": {"method": "sum"}}, W, target_shape=(5, 1, 3, 3)),
        r"turned \[4, 3, 3, 3\] into \[4, 1, 3, 3\], but the model needs \[5, 1, 3, 3\]",
    ),
    (lambda: run({"name": "positions_1d", "args": {}}, torch.ones(4, 2), target_shape=(4,)), "is not a table"),
    (lambda: run({"name": "positions_2d", "args": {}}, torch.ones(5, 2), target_shape=(4,)), "is not a table"),
    (
        lambda: run({"name": "positions_2d", "args": {}}, torch.ones(5, 2), target_shape=(7, 2)),
        "are not a square grid; pass args {'grid'",
    ),
    (lambda: resolve("blur"), "unknown adapter 'blur'"),
    (lambda: resolve({"adapter": "sum"}), "an adapter spec is {'name'"),
    (lambda: resolve({"name": "sum", "args": [1]}), "args must be a dict"),
    (lambda: resolve(lambda t: t), "register_adapter"),
    (lambda: resolve({"name": "sum", "args": {"w": object()}}), "is not JSON data"),
    (lambda: resolve({"name": "sum", "args": {1: 2}}), "argument names must be strings"),
]


@pytest.mark.parametrize("call, message", ERRORS, ids=[m[:40] for _, m in ERRORS])
def test_adapter_errors(call, message):
    with pytest.raises(AdapterError, match=message):
        call()


def test_run_refuses_an_adapter_that_changes_dtype():
    register_adapter(Adapter("test_double", lambda t, target_shape: t.double(), "bad"), replace=True)
    try:
        with pytest.raises(AdapterError, match="changed the dtype torch.float32 -> torch.float64"):
            run({"name": "test_double", "args": {}}, torch.ones(2), target_shape=(2,))
    finally:
        ADAPTERS.pop("test_double", None)


def test_adapter_error_is_a_value_error():
    assert issubclass(AdapterError, ValueError)
