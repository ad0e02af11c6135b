"""Transforms as plan data (issue 14 items 1-2): every op's shape rule and inverse, rules, plans, loads, reversal.

Oracles: torch itself (each op's result computed by hand with torch in the test) and
``load_state_dict`` of a state dict converted by hand.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import torchgraft as tg
from torchgraft import transforms as T
from torchgraft.errors import LoadError, PlanError
from torchgraft.plan import Entry, Plan

FAST = settings(max_examples=40, deadline=None)


def _plan_of(trees: dict[str, T.Expr], tensors: dict[str, torch.Tensor]) -> Plan:
    """A plan whose entries are these transforms of these tensors (as the planner writes them)."""
    entries = {}
    for name, expr in trees.items():
        tree = expr.map_sources(
            lambda leaf: T.Expr(source=leaf.source, shape=tuple(tensors[leaf.source].shape),
                                dtype=str(tensors[leaf.source].dtype).removeprefix("torch."))
        )  # fmt: skip
        shape = T.infer_shape(tree)
        first = tree.sources()[0]
        entries[name] = Entry(name, "transform", shape, "float32", first, tuple(tensors[first].shape), "float32",
                              transform=tree.to_dict())  # fmt: skip
    return Plan(entries=entries)


def _run(trees: dict[str, T.Expr], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cache: dict = {}
    return {name: T.evaluate(e, lambda leaf: tensors[leaf.source], cache) for name, e in trees.items()}


def _meta_shape(expr: T.Expr, tensors: dict[str, torch.Tensor]) -> tuple[int, ...]:
    return T.infer_shape(
        expr.map_sources(lambda leaf: T.Expr(source=leaf.source, shape=tuple(tensors[leaf.source].shape)))
    )


def _round_trip(trees: dict[str, T.Expr], tensors: dict[str, torch.Tensor]) -> None:
    """Forward gives torch's shapes (the meta rule agrees), backward gives the inputs bit for bit."""
    out = _run(trees, tensors)
    for name, expr in trees.items():
        assert _meta_shape(expr, tensors) == tuple(out[name].shape)
    back = T.reverse(_plan_of(trees, tensors), out)
    assert sorted(back) == sorted(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4)


# ---------------------------------------------------------------------------
# Every op: shape rule on meta == the real result's shape; inverse(op(x)) == x


@FAST
@given(shape=st.lists(st.integers(1, 5), min_size=2, max_size=4), data=st.data())
def test_transpose_and_permute(shape, data):
    x = torch.randn(shape)
    d0, d1 = data.draw(st.integers(0, len(shape) - 1)), data.draw(st.integers(0, len(shape) - 1))
    dims = data.draw(st.permutations(range(len(shape))))
    out = _run({"t": T.transpose("x", dim0=d0, dim1=d1), "p": T.permute("x", dims)}, {"x": x})
    assert torch.equal(out["t"], x.transpose(d0, d1)) and torch.equal(out["p"], x.permute(*dims))
    _round_trip({"t": T.transpose("x", dim0=d0, dim1=d1)}, {"x": x})
    _round_trip({"p": T.permute("x", dims)}, {"x": x})


@FAST
@given(shape=shapes, data=st.data())
def test_reshape(shape, data):
    x = torch.randn(shape)
    n = x.numel()
    first = data.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
    _round_trip({"r": T.reshape("x", [first, n // first])}, {"x": x})
    with pytest.raises(PlanError, match="cannot reshape"):
        _meta_shape(T.reshape("x", [n + 1]), {"x": x})


@FAST
@given(sizes=st.lists(st.integers(0, 4), min_size=1, max_size=4), rest=st.lists(st.integers(1, 3), max_size=2),
       dim=st.integers(0, 1), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int64]))  # fmt: skip
def test_split_uneven_pieces_put_back_together(sizes, rest, dim, dtype):
    shape = [sum(sizes), *rest] if dim == 0 or not rest else [rest[0], sum(sizes), *rest[1:]]
    dim = dim if rest else 0
    x = torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.randint(0, 9, shape)
    trees = {f"p{i}": T.split("x", dim=dim, sizes=sizes, index=i) for i in range(len(sizes))}
    out = _run(trees, {"x": x})
    for i, piece in enumerate(torch.split(x, sizes, dim=dim)):
        assert torch.equal(out[f"p{i}"], piece)
    _round_trip(trees, {"x": x})


@FAST
@given(parts=st.lists(st.integers(1, 4), min_size=1, max_size=4), cols=st.integers(1, 4))
def test_concat_stack_same_and_their_pieces(parts, cols):
    xs = {f"x{i}": torch.randn(n, cols) for i, n in enumerate(parts)}
    _round_trip({"c": T.concat(*xs, dim=0)}, xs)
    _round_trip({"c1": T.concat(*xs, dim=1)} if len(set(parts)) == 1 else {"c": T.concat(*xs)}, xs)
    equal = {f"y{i}": torch.randn(2, cols) for i in range(len(parts))}
    _round_trip({"s": T.stack(*equal, dim=1)}, equal)
    stacked = torch.randn(len(parts), 3, cols)
    _round_trip({f"e{i}": T.unstack("w", index=i) for i in range(len(parts))}, {"w": stacked})
    rows = torch.cumsum(torch.tensor([0, *parts]), 0).tolist()
    x = torch.randn(rows[-1], cols)
    _round_trip({f"s{i}": T.slice("x", start=rows[i], stop=rows[i + 1]) for i in range(len(parts))}, {"x": x})


def _nested(draw, depth: int, shape: tuple[int, ...], dtypes, tensors: dict[str, torch.Tensor]):
    """A random concat / stack tree giving ``shape`` (leaves are fresh tensors) and torch's own result for it."""
    if depth == 0 or not shape or 0 in shape or draw(st.booleans()):
        name = f"x{len(tensors)}"
        tensors[name] = t = torch.randn(shape).to(draw(st.sampled_from(dtypes)))
        leaf = T.transpose(name, dim0=0, dim1=-1) if len(shape) > 1 and draw(st.booleans()) else T.source(name)
        if leaf.op:  # the leaf is stored transposed: the tree transposes it back
            tensors[name] = t.transpose(0, -1).contiguous()
        return leaf, t
    dim = draw(st.integers(0, len(shape) - 1))
    if draw(st.booleans()):  # stack along dim: children have shape without it
        inner = shape[:dim] + shape[dim + 1 :]
        kids = [_nested(draw, depth - 1, inner, dtypes, tensors) for _ in range(shape[dim])]
        return T.stack(*(k[0] for k in kids), dim=dim), torch.stack([k[1] for k in kids], dim=dim)
    cuts = sorted(draw(st.lists(st.integers(0, shape[dim]), min_size=1, max_size=3)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, shape[dim]], strict=True)]
    kids = [_nested(draw, depth - 1, shape[:dim] + (n,) + shape[dim + 1 :], dtypes, tensors) for n in sizes]
    return T.concat(*(k[0] for k in kids), dim=dim), torch.cat([k[1] for k in kids], dim=dim)


@FAST
@given(data=st.data(), shape=st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple),
       dtypes=st.sampled_from([(torch.float32,), (torch.float16, torch.float32), (torch.bfloat16, torch.int64)]))  # fmt: skip
def test_nested_concats_and_stacks_are_written_into_one_result_bit_identical(data, shape, dtypes):
    """A tree of concat / stack (per-expert weights into a fused gate_up) gives torch's result, dtype included."""
    tensors: dict[str, torch.Tensor] = {}
    expr, expected = _nested(data.draw, 3, shape, dtypes, tensors)
    got = T.evaluate(expr, lambda leaf: tensors[leaf.source])
    assert got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected)
    assert T.infer_shape(expr.map_sources(lambda leaf: T.Expr(
        source=leaf.source, shape=tuple(tensors[leaf.source].shape),
        dtype=str(tensors[leaf.source].dtype).removeprefix("torch.")))) == tuple(expected.shape)  # fmt: skip


def test_a_concat_of_stacks_holds_no_inner_stack(monkeypatch):
    """Mixtral's gate_up = concat(stack(w1 of each expert), stack(w3 of each expert), dim=1): one copy of each."""
    w1 = {f"e{i}.w1": torch.randn(5, 3) for i in range(4)}
    w3 = {f"e{i}.w3": torch.randn(5, 3) for i in range(4)}
    expr = T.concat(T.stack(*w1), T.stack(*w3), dim=1)
    expected = torch.cat([torch.stack(list(w1.values())), torch.stack(list(w3.values()))], dim=1)
    run, made = T.OPS["stack"].run, []

    def counted(inputs, **kwargs):
        out = run(inputs, **kwargs)
        if not out.is_meta:  # the result's shape is worked out on meta; a real stack is an intermediate
            made.append(out.shape)
        return out

    monkeypatch.setitem(T.OPS, "stack", T.Op("stack", "merge", counted, T.OPS["stack"].args, T.OPS["stack"].invert))
    got = T.evaluate(expr, lambda leaf: {**w1, **w3}[leaf.source])
    assert torch.equal(got, expected) and made == []
    assert torch.equal(T.evaluate(T.stack(*w1), lambda leaf: w1[leaf.source]), expected[:, :5]) and len(made) == 1


def test_concat_skips_a_legacy_empty_input_like_torch():
    xs = {"a": torch.randn(2, 3), "e": torch.empty(0), "b": torch.randn(1, 3)}
    expr = T.concat(T.stack("a", dim=0), "e", T.stack("b", dim=0), dim=0)  # [1, 2, 3] + [0] + [1, 1, 3]?
    with pytest.raises(PlanError, match="concat cannot apply to shapes"):
        T.evaluate(expr, lambda leaf: xs[leaf.source])  # [1, 2, 3] and [1, 1, 3] differ in dim 1: torch says so
    expr = T.concat(T.stack("a", "a"), "e", T.stack("a"), dim=0)
    expected = torch.cat([torch.stack([xs["a"], xs["a"]]), xs["e"], torch.stack([xs["a"]])])
    assert torch.equal(T.evaluate(expr, lambda leaf: xs[leaf.source]), expected)


@FAST
@given(heads=st.integers(1, 4), half=st.integers(1, 4), cols=st.sampled_from([(), (3,), (2, 2)]))
def test_rope_permute_is_metas_permutation_and_inverts(heads, half, cols):
    rows = heads * half * 2
    x = torch.randn(rows, *cols)
    # Meta's layout interleaves the two rotary halves of each head: rows (x0, y0, x1, y1, ...)
    expected = torch.cat([torch.cat([h[0::2], h[1::2]]) for h in x.split(2 * half)])
    out = _run({"q": T.rope_permute("x", heads=heads)}, {"x": x})["q"]
    assert torch.equal(out, expected)
    assert torch.equal(_run({"b": T.rope_permute("y", heads=heads, to="interleaved")}, {"y": out})["b"], x)
    _round_trip({"q": T.rope_permute("x", heads=heads)}, {"x": x})


def test_shape_rules_fail_on_meta_with_the_op_named():
    x = torch.randn(6, 4)
    for expr, message in [
        (T.split("x", sizes=[2, 2]), "do not add up to 6"),
        (T.split("x", parts=4, index=0), "cannot split 6 rows of dim 0 into 4"),
        (T.split("x", parts=3), "needs index="),
        (T.split("x", parts=3, index=3), "index 3 is out of range"),
        (T.rope_permute("x", heads=4), "not 4 heads of an even size"),
        (T.slice("x", start=4, stop=9), "outside dim 0"),
        (T.concat("x", T.transpose("x")), "concat cannot apply to shapes \\[6, 4\\], \\[4, 6\\]"),
    ]:
        with pytest.raises(PlanError, match=message):
            _meta_shape(expr, {"x": x})


def test_builders_check_their_arguments():
    with pytest.raises(PlanError, match="split takes sizes= or parts=, not both"):
        T.split("x", sizes=[1], parts=1)
    with pytest.raises(PlanError, match="permute: dims="):
        T.node("permute", ["x"], dims=[0, "1"])
    with pytest.raises(PlanError, match="unknown transform op 'rotate'"):
        T.node("rotate", ["x"])
    with pytest.raises(PlanError, match="transpose takes one input, got 2"):
        T.node("transpose", ["x", "y"])
    with pytest.raises(PlanError, match="rope_permute needs heads="):
        T.node("rope_permute", ["x"])
    with pytest.raises(PlanError, match="a checkpoint entry name or a transform"):
        T.transpose(3)  # type: ignore[arg-type]


def test_expressions_print_and_round_trip_through_json():
    e = T.split(T.transpose("h.0.attn.c_attn.weight"), dim=0, parts=3, index=1)
    assert str(e) == "split(transpose(h.0.attn.c_attn.weight), dim=0, parts=3, index=1)"
    assert T.Expr.from_dict(json.loads(json.dumps(e.to_dict()))) == e
    assert str(T.rope_permute(T.concat("a/wq", "b/wq"), heads=4)) == "rope_permute(concat(a/wq, b/wq, dim=0), heads=4)"


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"op": "eval", "args": {}, "inputs": [{"source": "x"}]}, "unknown op"),
        ({"op": "transpose", "args": {"dim0": "0"}, "inputs": [{"source": "x"}]}, "dim0='0'"),
        ({"op": "transpose", "args": {}, "inputs": []}, "without inputs"),
        ({"source": "x", "shape": [-1]}, "not a valid transform leaf"),
        ({"source": "x", "code": "rm -rf"}, "not a valid transform leaf"),
        (["x"], "list where an object"),
    ],
)
def test_hostile_trees_are_refused(tree, message):
    with pytest.raises(PlanError, match=message):
        T.Expr.from_dict(tree)


def test_deep_or_huge_trees_are_refused_before_recursing_far():
    tree: dict = {"source": "x"}
    for _ in range(200):
        tree = {"op": "transpose", "args": {}, "inputs": [tree]}
    with pytest.raises(PlanError, match="deeper than 64 levels"):
        T.Expr.from_dict(tree)
    wide = {"op": "concat", "args": {}, "inputs": [{"source": "x"}] * 200_000}
    with pytest.raises(PlanError, match="100,000 nodes"):
        T.Expr.from_dict(wide)


# ---------------------------------------------------------------------------
# Rules, plans and loads


class Conv1D(nn.Module):
    """transformers' GPT-2 layout: weight [in, out], x @ W + b."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class Fused(nn.Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.c_attn = Conv1D(d, 3 * d)
        self.c_fc = Conv1D(d, 2 * d)

    def forward(self, x):
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=-1)
        return torch.cat([q * k + v, self.c_fc(x)], dim=-1)


class Separate(nn.Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.fc = nn.Linear(d, 2 * d)

    def forward(self, x):
        return torch.cat([self.q(x) * self.k(x) + self.v(x), self.fc(x)], dim=-1)


RULES = {
    "{q,k,v}.weight": tg.split(tg.transpose("c_attn.weight"), dim=0),
    "{q,k,v}.bias": tg.split("c_attn.bias"),
    "fc.weight": tg.transpose("c_fc.weight"),
    "fc.bias": T.source("c_fc.bias"),
}


def _by_hand(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    w, b = sd["c_attn.weight"].T, sd["c_attn.bias"]
    out = {f"{n}.weight": w[i * 4 : (i + 1) * 4] for i, n in enumerate("qkv")}
    out |= {f"{n}.bias": b[i * 4 : (i + 1) * 4] for i, n in enumerate("qkv")}
    return out | {"fc.weight": sd["c_fc.weight"].T, "fc.bias": sd["c_fc.bias"]}


@pytest.fixture
def fused_file(tmp_path):
    torch.manual_seed(0)
    source = Fused()
    path = tmp_path / "fused.safetensors"
    save_file(source.state_dict(), str(path))
    return source, path


@pytest.mark.parametrize("build", ["cpu", "meta"])
def test_rules_with_transforms_load_like_load_state_dict_of_a_hand_conversion(fused_file, build):
    source, path = fused_file
    with torch.device(build):
        model = Separate()
    reference = Separate()
    reference.load_state_dict(_by_hand(source.state_dict()))
    report = tg.load(model, path, rules=RULES, strict=True)
    a, b = model.state_dict(), reference.state_dict()
    assert [k for k in b if not torch.equal(a[k], b[k])] == []
    x = torch.randn(3, 4)
    assert torch.allclose(model(x), source(x), atol=1e-5, rtol=1e-5)
    assert report.loaded == ["fc.bias"] and report.unexpected == [] and report.missing == []
    assert report.transformed["k.weight"] == "split(transpose(c_attn.weight), dim=0, parts=3, index=1)"
    assert report.to_dict()["transformed"] == report.transformed
    assert "v.weight = split(transpose(c_attn.weight), dim=0, parts=3, index=2)" in str(report)


def test_a_fused_tensor_is_read_once_and_transformed_once(fused_file, monkeypatch):
    _, path = fused_file
    reads: list[str] = []
    original = tg.TensorRef.load

    def counted(self):
        reads.append(self.name)
        return original(self)

    plan = tg.plan(Separate(), path, rules=RULES)  # shapes checked on meta here, nothing read
    monkeypatch.setattr(tg.TensorRef, "load", counted)
    transposes = []
    run = T.OPS["transpose"].run

    def counted_transpose(inputs, **kwargs):
        if not inputs[0].is_meta:  # shapes are checked on meta when a plan is made or reused: not counted
            transposes.append(1)
        return run(inputs, **kwargs)

    spec = T.OPS["transpose"]
    monkeypatch.setitem(T.OPS, "transpose", T.Op("transpose", "unary", counted_transpose, spec.args, spec.invert))
    tg.load(Separate(), path, plan=plan, strict=True)
    assert sorted(reads) == ["c_attn.bias", "c_attn.weight", "c_fc.bias", "c_fc.weight"]
    assert len(transposes) == 2  # c_attn once for q, k, v; c_fc once


def test_a_shared_result_is_held_only_until_its_last_piece_is_read(fused_file):
    """The reader keeps transpose(c_attn.weight) for q, k and v, then lets it go; unshared results are never kept."""
    from torchgraft.staging import EntryReader

    _, path = fused_file
    plan = tg.plan(Separate(), path, rules=RULES)
    with tg.open(path) as src:
        reader = EntryReader(plan.entries.values(), src)
        held = []
        for name in ("q.weight", "k.weight", "fc.weight", "v.weight"):
            piece = reader.read(plan.entries[name])
            alone = T.evaluate(T.Expr.from_dict(plan.entries[name].transform), lambda leaf: src[leaf.source].load())
            assert torch.equal(piece, alone) and piece.is_contiguous()
            held.append(sorted(str(x) for x in reader._cache))
    shared = ["c_attn.weight", "transpose(c_attn.weight)"]
    assert held == [shared, shared, shared, []]  # fc's transpose is read by fc alone: never held


def test_plan_shows_transforms_round_trips_and_reverses(fused_file, tmp_path):
    source, path = fused_file
    model = Separate()
    plan = tg.plan(model, path, rules=RULES)
    assert plan.summary()["transformed"] == 7 and plan.summary()["loaded"] == 1
    assert "k.weight = split(transpose(c_attn.weight), dim=0, parts=3, index=1)" in str(plan)
    plan.save(tmp_path / "plan.json")
    again = tg.Plan.load(tmp_path / "plan.json")
    assert again.transformed == plan.transformed
    tg.load(model, path, plan=again, strict=True)
    back = T.reverse(again, model.state_dict())
    original = source.state_dict()
    assert sorted(back) == sorted(original) and all(torch.equal(back[k], original[k]) for k in original)
    result = tg.convert(model.state_dict(), tmp_path / "back.safetensors", plan=again, reverse=True)
    written = load_file(result.files[0])
    assert all(torch.equal(written[k], original[k]) for k in original) and sorted(written) == sorted(original)


def test_convert_reverse_does_not_call_the_pieces_of_one_tensor_shared(tmp_path, capsys):
    """Unstacked experts are views of the model's stacked tensor, replicated copies one tensor: the plan's doing."""
    from torchgraft.cli import main

    model = nn.Module()
    model.experts = nn.Parameter(torch.zeros(3, 2, 2))
    model.norm = nn.Parameter(torch.zeros(2))
    norm = torch.randn(2)
    checkpoint = {f"e{i}": torch.randn(2, 2) for i in range(3)} | {"s0.norm": norm, "s1.norm": norm.clone()}
    plan = tg.plan(model, checkpoint, rules={"experts": tg.stack("e0", "e1", "e2"), "norm": tg.same("s0.norm", "s1.norm")})
    tg.load(model, checkpoint, plan=plan, strict=True)
    views = T.reverse(plan, model.state_dict())
    assert views["e1"].untyped_storage().data_ptr() == model.experts.untyped_storage().data_ptr()  # shared indeed
    result = tg.convert(model.state_dict(), tmp_path / "back.safetensors", plan=plan, reverse=True)
    assert result.shared == {}
    written = load_file(result.files[0])
    assert sorted(written) == sorted(checkpoint) and all(torch.equal(written[k], v) for k, v in checkpoint.items())
    plan.save(tmp_path / "plan.json")
    save_file(dict(model.state_dict()), str(tmp_path / "model.safetensors"))
    capsys.readouterr()
    args = ["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "cli.safetensors"), "--plan", str(tmp_path / "plan.json")]
    assert main([*args, "--reverse"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "shared memory" not in out
    assert torch.equal(load_file(str(tmp_path / "cli.safetensors"))["e2"], checkpoint["e2"])


def test_shape_errors_come_at_plan_time_before_any_read(fused_file, monkeypatch):
    _, path = fused_file
    monkeypatch.setattr(tg.TensorRef, "load", lambda self: pytest.fail(f"read {self.name}"))
    with pytest.raises(PlanError, match=r"gives shape \[12, 4\], the model's 'fc.weight' is \[8, 4\]"):
        tg.plan(Separate(), path, rules={"fc.weight": tg.transpose("c_attn.weight")})
    with pytest.raises(PlanError, match=r"transform rule 'fc.weight' for 'fc.weight': .*do not add up"):
        tg.plan(Separate(), path, rules={"fc.weight": tg.split("c_fc.weight", sizes=[1, 1], index=0)})


def test_a_transform_overrides_a_name_match_and_frees_its_source(tmp_path):
    sd = {"fc.weight": torch.randn(8, 4), "fc.bias": torch.randn(8), "w_t": torch.randn(4, 8)}
    model = nn.Module()
    model.fc = nn.Linear(4, 8)
    plan = tg.plan(model, sd, rules={"fc.weight": tg.transpose("w_t")})
    assert plan.transformed == {"fc.weight": "transpose(w_t)"} and plan.unexpected == ["fc.weight"]


def test_rules_that_match_nothing_or_miss_inputs_say_so(fused_file):
    _, path = fused_file
    plan = tg.plan(Separate(), path, rules={"nothing.{}.weight": tg.transpose("c_fc.weight"),
                                            "fc.weight": tg.transpose("absent.weight")})  # fmt: skip
    assert any("matches no entry of the model" in n for n in plan.notes)
    assert any("leaves 'fc.weight' unfilled: the checkpoint has no 'absent.weight'" in n for n in plan.notes)
    assert "fc.weight" in plan.missing
    with pytest.raises(PlanError, match="a brace set needs a split or unstack"):
        tg.plan(Separate(), path, rules={"{q,k}.weight": tg.transpose("c_fc.weight")})


def test_layer_numbers_fill_inputs_in_order():
    sd = {f"h.{i}.w": torch.randn(3, 2) + i for i in range(2)}
    model = nn.Sequential(*[nn.Linear(3, 2, bias=False) for _ in range(2)])
    report = tg.load(model, sd, rules={"{}.weight": tg.transpose("h.{}.w")}, strict=True)
    assert report.transformed == {"0.weight": "transpose(h.0.w)", "1.weight": "transpose(h.1.w)"}
    assert torch.equal(model[1].weight, sd["h.1.w"].T)


def test_replicated_copies_must_be_equal_and_a_failed_load_changes_nothing():
    model = nn.LayerNorm(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {"a/w": torch.ones(4), "b/w": torch.ones(4), "a/b": torch.zeros(4), "b/b": torch.full((4,), 0.5)}
    rules = {"weight": tg.same("a/w", "b/w"), "bias": tg.same("a/b", "b/b")}
    with pytest.raises(LoadError, match=r"b/b is not equal to a/b"):
        tg.load(model, sd, rules=rules)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    sd["b/b"] = torch.zeros(4)
    tg.load(model, sd, rules=rules, strict=True)
    back = T.reverse(tg.plan(model, sd, rules=rules), model.state_dict())
    assert sorted(back) == sorted(sd)  # written to every shard again


def test_reverse_refuses_what_has_no_inverse():
    sd = {"x": torch.randn(6, 4)}
    model = nn.Linear(4, 4)
    plan = tg.plan(model, sd, rules={"weight": tg.slice("x", start=0, stop=4), "bias": tg.reshape(tg.split(T.slice("x", start=4), parts=2, index=0), [4])})
    with pytest.raises(PlanError, match="the state dict has no 'weight'"):
        T.reverse(plan, {})
    tg.load(model, sd, plan=plan)
    with pytest.raises(PlanError, match=r"pieces \[1\] of slice\(x, dim=0, start=4\) are not in the model"):
        T.reverse(plan, model.state_dict())
    only_first = tg.plan(nn.Linear(4, 4, bias=False), sd, rules={"weight": tg.slice("x", start=0, stop=4)})
    with pytest.raises(PlanError, match=r"cover rows 0:4 of 6 along dim 0"):
        T.reverse(only_first, {"weight": sd["x"][:4]})
    with pytest.raises(ValueError, match="pass plan= together with reverse=True"):
        tg.convert(sd, "/nonexistent/x.safetensors", reverse=True)


def test_adapted_entries_cannot_be_reversed():
    sd = {"weight": torch.randn(8, 3, 3, 3), "bias": torch.randn(8)}
    plan = tg.plan(nn.Conv2d(1, 8, 3), sd, adapt="auto")
    assert plan.adapted
    with pytest.raises(PlanError, match="'weight' was adapted .* which has no inverse"):
        T.reverse(plan, {"weight": torch.zeros(8, 1, 3, 3), "bias": torch.zeros(8)})


def test_stale_or_edited_plans_with_transforms_are_refused(fused_file, tmp_path):
    _, path = fused_file
    plan = tg.plan(Separate(), path, rules=RULES)
    d = plan.to_dict()
    entry = next(e for e in d["entries"] if e["target"] == "q.weight")
    entry["transform"]["op"] = "exec"
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match="unknown op"):
        tg.Plan.load(tmp_path / "bad.json")
    d = plan.to_dict()
    entry = next(e for e in d["entries"] if e["target"] == "q.weight")
    entry.pop("transform")
    with pytest.raises(PlanError, match="without a transform"):
        tg.Plan.from_dict(d)
    d = plan.to_dict()
    entry = next(e for e in d["entries"] if e["target"] == "q.weight")
    entry["transform"]["inputs"][0]["inputs"][0]["source"] = "c_fc.weight"
    entry["source"], entry["source_shape"] = "c_fc.weight", [4, 8]
    edited = tg.Plan.from_dict(d)
    with pytest.raises(PlanError, match="its transform input 'c_fc.weight' is not in the checkpoint with that shape"):
        tg.load(Separate(), path, plan=edited)


def test_distributed_load_refuses_transforms_before_reading(fused_file):
    tgd = pytest.importorskip("torchgraft.distributed")
    _, path = fused_file
    with pytest.raises(PlanError, match="does not run transforms yet .* tg.convert"):
        tgd.load(Separate(), path, rules=RULES)


def test_recipes_registry_names_what_it_knows():
    with pytest.raises(PlanError, match="no recipe 'nope'; known: "):
        tg.recipe("nope")
