"""Alignment proposes transforms (issue 14.3), on names and shapes only: transposes and fused splits.

Square weights are decided by evidence (a non-square sibling, the layer pattern, the model's ``Conv1D``
modules), else reported ambiguous; fused tensors are split in the order the model's names say.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import torchgraft as tg
from torchgraft.align import align
from torchgraft.align.layouts import (
    Layout,
    fused_name,
    fused_order,
    is_transpose,
    layer_scope,
    orient,
    transposed_modules,
)
from torchgraft.rules import export_transform_rules
from torchgraft.transforms import reverse, source, transpose

D = 8


def _layer(prefix: str, i: int, *, fused: bool, kv: int = D, conv: bool = False, order=("query", "key", "value")):
    p = f"{prefix}.{i}"
    if fused:
        w = (D + 2 * kv, D)
        return [
            (f"{p}.attn.qkv.weight", w[::-1] if conv else w),
            (f"{p}.attn.qkv.bias", (D + 2 * kv,)),
            (f"{p}.attn.proj.weight", (D, D)),
            (f"{p}.attn.proj.bias", (D,)),
            (f"{p}.norm1.weight", (D,)),
            (f"{p}.mlp.fc1.weight", (4 * D, D)),
            (f"{p}.mlp.fc2.weight", (D, 4 * D)),
        ]
    rows = {"query": D, "key": kv, "value": kv}
    return [
        *(
            (f"{p}.attention.{part}.{attr}", (rows[part], D)[: 2 if attr == "weight" else 1])
            for part in order
            for attr in ("weight", "bias")
        ),
        (f"{p}.attention.out.weight", (D, D)),
        (f"{p}.attention.out.bias", (D,)),
        (f"{p}.ln_before.weight", (D,)),
        (f"{p}.intermediate.dense.weight", (4 * D, D)),
        (f"{p}.output.dense.weight", (D, 4 * D)),
    ]


def _align(model_rows, ckpt_rows):
    return align(
        [(k, s, "float32", True) for k, s in model_rows],
        [(k, k, s, "float32", True) for k, s in ckpt_rows],
        source_ordered=True,
    )


@pytest.mark.parametrize(("kv", "conv"), [(D, False), (4, False), (4, True)])
def test_fused_qkv_is_split_in_the_order_the_names_say(kv, conv):
    # the model registers value, query, key: the order in the fused tensor comes from the names, not registration
    model = [r for i in range(2) for r in _layer("layer", i, fused=False, kv=kv, order=("value", "query", "key"))]
    ckpt = [r for i in range(2) for r in _layer("blocks", i, fused=True, kv=kv, conv=conv)]
    a = _align(model, ckpt)
    pairs = {p.target: p for p in a.pairs}
    sizes = (D, kv, kv)
    for i in range(2):
        for index, part in enumerate(("query", "key", "value")):
            w = pairs[f"layer.{i}.attention.{part}.weight"]
            b = pairs[f"layer.{i}.attention.{part}.bias"]
            assert w.source == f"blocks.{i}.attn.qkv.weight" and b.source == f"blocks.{i}.attn.qkv.bias"
            assert w.layout == Layout(transpose=conv, sizes=sizes, index=index)
            assert b.layout == Layout(transpose=False, sizes=sizes, index=index)
            assert w.confidence >= 0.8 and w.exact
            assert f"{D + 2 * kv} rows = {' + '.join(map(str, sizes))}" in w.reason
            assert "order their names say" in w.reason
    # with the fused tensor taken out, the rest of each layer pairs by structure as before
    assert pairs["layer.1.attention.out.weight"].source == "blocks.1.attn.proj.weight"
    assert pairs["layer.1.intermediate.dense.weight"].source == "blocks.1.mlp.fc1.weight"
    assert pairs["layer.0.attention.out.weight"].layout is None
    assert not a.ambiguous


def test_fused_gate_up_is_split():
    model = [("mlp.gate_proj.weight", (16, D)), ("mlp.up_proj.weight", (16, D)), ("mlp.down_proj.weight", (D, 16))]
    ckpt = [("ffn.gate_up.weight", (32, D)), ("ffn.down.weight", (D, 16))]
    pairs = {p.target: p for p in _align(model, ckpt).pairs}
    assert pairs["mlp.gate_proj.weight"].layout == Layout(sizes=(16, 16), index=0)
    assert pairs["mlp.up_proj.weight"].layout == Layout(sizes=(16, 16), index=1)
    assert pairs["mlp.up_proj.weight"].source == "ffn.gate_up.weight"
    assert pairs["mlp.down_proj.weight"].source == "ffn.down.weight"


def test_siblings_whose_order_names_do_not_say_are_not_split_but_reported():
    model = [("attn.a.weight", (D, D)), ("attn.b.weight", (D, D)), ("attn.c.weight", (D, D))]
    ckpt = [("attn.abc.weight", (3 * D, D))]
    a = _align(model, ckpt)
    assert not a.pairs
    assert a.ambiguous == [
        {
            "targets": ["attn.a.weight", "attn.b.weight", "attn.c.weight"],
            "candidates": ["attn.abc.weight"],
            "reason": "attn.abc has the rows of a, b, c of attn stacked, but their names do not say in which order",
        }
    ]
    # the other way round too: a fused model tensor, unnamed pieces in the checkpoint
    b = _align(ckpt, model)
    assert not b.pairs and b.ambiguous[0]["targets"] == ["attn.abc.weight"]


def test_two_fused_candidates_in_one_layer_are_ambiguous():
    model = [("h.0.attn.q.weight", (D, D)), ("h.0.attn.k.weight", (D, D)), ("h.0.attn.v.weight", (D, D))]
    ckpt = [("blk.0.qkv_a.weight", (3 * D, D)), ("blk.0.qkv_b.weight", (3 * D, D))]
    a = _align(model, ckpt)
    assert not a.pairs
    assert a.ambiguous[0]["targets"] == ["h.0.attn.q.weight", "h.0.attn.k.weight", "h.0.attn.v.weight"]
    assert set(a.ambiguous[0]["candidates"]) == {"blk.0.qkv_a.weight", "blk.0.qkv_b.weight"}
    assert "nothing tells which" in a.ambiguous[0]["reason"]


def test_a_tensor_named_for_something_else_is_never_a_fused_one():
    # the only [3D, D] tensor in the layer, but an MLP's: not the attention's q, k, v whatever its shape
    model = [("h.0.attn.q.weight", (D, D)), ("h.0.attn.k.weight", (D, D)), ("h.0.attn.v.weight", (D, D))]
    ckpt = [("blk.0.mlp.gate_proj.weight", (3 * D, D))]
    assert not _align(model, ckpt).pairs
    assert fused_name("blk.0.mlp.gate_proj", "h.0.attn", ["q", "k", "v"]) is None
    why = fused_name("h.0.attn.c_attn", "layer.0.attention.attention", ["query", "key", "value"])
    assert why == "c_attn ~ attention"
    assert fused_name("x.query_key_value", "x", ["v", "k", "q"]) == "query_key_value names q, k, v"


def test_fused_order_and_helpers():
    assert fused_order(["v_proj", "q_proj", "k_proj"]) == [2, 0, 1]
    assert fused_order(["wq", "wk", "wv"]) == [0, 1, 2]
    assert fused_order(["up_proj", "gate_proj"]) == [1, 0]
    assert fused_order(["w3", "w1"]) == [1, 0]  # Meta's names: w1 gate, w3 up (w2 is the down projection)
    assert fused_order(["w1", "w2"]) is None
    assert fused_order(["q", "q"]) is None
    assert fused_order(["a", "b"]) is None
    assert is_transpose((96, 32), (32, 96)) and not is_transpose((32, 32), (32, 32)) and not is_transpose((3,), (3,))
    assert layer_scope("transformer.h.3.attn.c_proj.weight") == "transformer.h.{}"
    assert layer_scope("head.proj.weight") is None
    text = Layout(transpose=True, sizes=(4, 4), index=1).describe("x")
    assert text == "split(transpose(x), dim=0, sizes=[4, 4], index=1)"


# ---------------------------------------------------------------------------
# Transposes: seen in non-square shapes, decided by evidence for square ones


def _gpt2_pairs(n_layer: int = 2, d: int = 32):
    """(target, source, model shape, checkpoint shape): nanoGPT model (Linear), HF GPT-2 checkpoint (Conv1D)."""
    out = [("transformer.wte.weight", "transformer.wte.weight", (128, d), (128, d))]
    for i in range(n_layer):
        p = f"transformer.h.{i}"
        shapes = {"attn.c_attn": (3 * d, d), "attn.c_proj": (d, d), "mlp.c_fc": (4 * d, d), "mlp.c_proj": (d, 4 * d)}
        for name, (o, n) in shapes.items():
            out.append((f"{p}.{name}.weight", f"{p}.{name}.weight", (o, n), (n, o)))
    return out


def test_gpt2_conv1d_transposes_and_the_square_c_proj_by_its_sibling():
    o = orient(_gpt2_pairs())
    assert sorted(o.transposed) == sorted(k for k, *_ in _gpt2_pairs() if "wte" not in k)
    conf, why = o.transposed["transformer.h.1.attn.c_proj.weight"]
    assert conf == 0.85 and "siblings in transformer.h.1.attn" in why and "transformer.h.1.attn.c_attn" in why
    assert o.transposed["transformer.h.0.attn.c_attn.weight"][0] == 0.9
    assert "(96, 32) is the checkpoint's (32, 96) transposed" in o.transposed["transformer.h.0.attn.c_attn.weight"][1]
    assert not o.ambiguous


def test_square_weight_decided_by_the_layer_pattern():
    pairs = [
        ("h.0.attn.proj.weight", "h.0.attn.proj.weight", (D, D), (D, D)),  # alone in its module
        ("h.0.mlp.fc.weight", "h.0.mlp.fc.weight", (4 * D, D), (D, 4 * D)),
        ("h.1.attn.proj.weight", "h.1.attn.proj.weight", (D, D), (D, D)),
    ]
    o = orient(pairs)
    conf, why = o.transposed["h.1.attn.proj.weight"]
    assert conf == 0.8 and "the layers h.{}" in why


def test_square_weight_without_evidence_is_ambiguous_not_guessed():
    pairs = [
        ("blocks.0.fc.weight", "blocks.0.fc.weight", (4 * D, D), (D, 4 * D)),
        ("head.proj.weight", "head.proj.weight", (D, D), (D, D)),  # only square layers near it
    ]
    o = orient(pairs)
    assert "head.proj.weight" not in o.transposed
    assert o.ambiguous == [
        {
            "targets": ["head.proj.weight"],
            "candidates": ["head.proj.weight"],
            "reason": "square (8, 8): could be transposed or not; nothing near it (its module, its layer) has a "
            "non-square weight that says which way, and other weights of this checkpoint are transposed",
        }
    ]


def test_square_weights_with_nothing_transposed_anywhere_stay_as_they_are():
    pairs = [("a.weight", "a.weight", (D, D), (D, D)), ("b.weight", "b.weight", (4 * D, D), (4 * D, D))]
    o = orient(pairs)
    assert not o.transposed and not o.ambiguous


def test_siblings_that_disagree_leave_the_square_one_ambiguous():
    pairs = [
        ("m.fc1.weight", "m.fc1.weight", (4 * D, D), (D, 4 * D)),
        ("m.fc2.weight", "m.fc2.weight", (D, 4 * D), (D, 4 * D)),
        ("m.proj.weight", "m.proj.weight", (D, D), (D, D)),
    ]
    o = orient(pairs)
    assert list(o.transposed) == ["m.fc1.weight"]
    assert "transposed in some places and not in others" in o.ambiguous[0]["reason"]


def test_conv1d_module_type_is_evidence_for_its_own_kind_only():
    conv1d = "transformers.pytorch_utils.Conv1D"
    pairs = [
        ("enc.fc.weight", "enc.fc.weight", (D, 4 * D), (4 * D, D)),  # a Conv1D, transposed
        ("enc.emb.weight", "enc.emb.weight", (100, D), (100, D)),  # an Embedding next to it, straight
        ("head.proj.weight", "head.proj.weight", (D, D), (D, D)),  # a Conv1D alone in its module
        ("head.lin.weight", "head.lin.weight", (D, D), (D, D)),  # an nn.Linear alone: no evidence
    ]
    types = {"enc.fc": conv1d, "enc.emb": "torch.nn.modules.sparse.Embedding", "head.proj": conv1d,
             "head.lin": "torch.nn.modules.linear.Linear"}  # fmt: skip
    o = orient(pairs, module_types=types)
    assert o.transposed["head.proj.weight"][0] == 0.8 and "other Conv1D modules" in o.transposed["head.proj.weight"][1]
    assert [a["targets"] for a in o.ambiguous] == [["head.lin.weight"]]


def test_square_conv1d_pair_from_another_codebase_needs_evidence_even_with_nothing_transposed():
    conv1d = "transformers.pytorch_utils.Conv1D"
    pairs = [("h.0.c_proj.weight", "layers.0.out.weight", (D, D), (D, D))]
    types = {"h.0.c_proj": conv1d}
    assert not orient(pairs, module_types=types).ambiguous  # matched by name: the same codebase
    o = orient(pairs, module_types=types, foreign={"h.0.c_proj.weight"})
    assert not o.transposed and "Conv1D stores [in, out]" in o.ambiguous[0]["reason"]
    # a straight non-square sibling says the checkpoint stores [in, out] too: kept as it is
    sibling = ("h.0.c_fc.weight", "layers.0.fc.weight", (D, 4 * D), (D, 4 * D))
    o = orient([*pairs, sibling], module_types={**types, "h.0.c_fc": conv1d}, foreign={"h.0.c_proj.weight"})
    assert not o.transposed and not o.ambiguous


def test_pieces_of_a_transposed_fused_tensor_are_evidence():
    pairs = [
        ("l.0.attn.q.weight", "l.0.attn.qkv.weight", (D, D), (D, 3 * D)),
        ("l.0.attn.out.weight", "l.0.attn.proj.weight", (D, D), (D, D)),
    ]
    o = orient(pairs, flipped={"l.0.attn.q.weight": True})
    assert "l.0.attn.q.weight" not in o.transposed  # decided by the split, not again
    assert o.transposed["l.0.attn.out.weight"][0] == 0.85


def test_transposed_modules_by_shapes_and_by_their_layer_when_both_fit():
    f = "float32"
    model = [
        ("b.0.fc1.weight", (4 * D, D), f), ("b.0.fc2.weight", (D, 4 * D), f),  # no biases: both ways fit
        ("b.0.qkv.weight", (3 * D, D), f), ("b.0.qkv.bias", (3 * D,), f),
        ("emb.weight", (100, D), f),
    ]  # fmt: skip
    ckpt = [
        ("h.0.c_fc.weight", (D, 4 * D), f), ("h.0.c_proj.weight", (4 * D, D), f),
        ("h.0.c_attn.weight", (D, 3 * D), f), ("h.0.c_attn.bias", (3 * D,), f),
        ("wte.weight", (100, D), f),
    ]  # fmt: skip
    # c_attn only fits transposed; c_fc / c_proj fit both ways and follow it; the embedding fits as it is
    assert transposed_modules(model, ckpt) == {"h.0.c_attn", "h.0.c_fc", "h.0.c_proj"}
    # without c_attn nothing in the layer is sure: nothing is taken transposed
    assert transposed_modules(model[:2], ckpt[:2]) == frozenset()
    a = _align([(k, s) for k, s, _ in model], [(k, s) for k, s, _ in ckpt])
    pairs = {p.target: p for p in a.pairs}
    assert pairs["b.0.fc1.weight"].source == "h.0.c_fc.weight" and pairs["b.0.fc1.weight"].layout == Layout(True)
    assert pairs["emb.weight"].layout is None


# ---------------------------------------------------------------------------
# In a plan: real modules on both sides, outputs compared, and back


class FusedAttention(nn.Module):
    """timm-style: one ``qkv`` (``nn.Linear``, or transformers' ``Conv1D`` storing ``[in, out]``)."""

    def __init__(self, d: int, kv: int, conv: bool):
        super().__init__()
        self.d, self.kv = d, kv
        if conv:
            conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
            self.qkv, self.proj = conv1d(d + 2 * kv, d), conv1d(d, d)
        else:
            self.qkv, self.proj = nn.Linear(d, d + 2 * kv), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split([self.d, self.kv, self.kv], dim=-1)
        return self.proj(q + (torch.sigmoid(k) * v).repeat(1, self.d // self.kv))


class SplitAttention(nn.Module):
    """Hugging Face-style: ``query``, ``key``, ``value`` (registered in another order), ``out``."""

    def __init__(self, d: int, kv: int):
        super().__init__()
        self.d, self.kv = d, kv
        self.value = nn.Linear(d, kv)
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, kv)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(x), self.key(x), self.value(x)
        return self.out(q + (torch.sigmoid(k) * v).repeat(1, self.d // self.kv))


class Stack(nn.Module):
    def __init__(self, make, n: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(make() for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


@pytest.mark.parametrize(("kv", "conv"), [(D, False), (4, False), (4, True)])
def test_fused_qkv_checkpoint_into_separate_q_k_v_and_back(kv, conv, tmp_path):
    torch.manual_seed(0)
    fused = Stack(lambda: FusedAttention(D, kv, conv))
    path = tmp_path / "fused.safetensors"
    save_file({k: v.contiguous() for k, v in fused.state_dict().items()}, path)
    model = Stack(lambda: SplitAttention(D, kv))
    plan = tg.plan(model, path, align=True)
    assert not plan.missing and not plan.unexpected and not plan.ambiguous, plan.problems()
    t = "transpose(layers.1.qkv.weight)" if conv else "layers.1.qkv.weight"
    assert plan.transformed["layers.1.key.weight"] == f"split({t}, dim=0, sizes=[{D}, {kv}, {kv}], index=1)"
    bias = plan.transformed["layers.1.value.bias"]
    assert bias == f"split(layers.1.qkv.bias, dim=0, sizes=[{D}, {kv}, {kv}], index=2)"
    if conv:  # the square Conv1D proj: transposed because its siblings' pieces are
        assert plan.transformed["layers.0.out.weight"] == "transpose(layers.0.proj.weight)"
        assert "its siblings in layers.0" in plan.aligned["layers.0.out.weight"]["reason"]
    else:
        assert plan.entries["layers.0.out.weight"].action == "copy"
    tg.load(model, path, plan=plan)
    x = torch.randn(3, D)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fused(x), rtol=0, atol=1e-6)
    back = reverse(plan, model.state_dict())
    saved = load_file(path)
    assert set(back) == set(saved) and all(torch.equal(back[k], v) for k, v in saved.items())
    # the exported rules reproduce the plan without alignment
    rules = plan.aligned_rules()
    again = tg.plan(Stack(lambda: SplitAttention(D, kv)), path, rules=rules)
    assert again.transformed == plan.transformed


def test_fused_split_planned_for_a_model_on_meta():
    torch.manual_seed(0)
    fused = Stack(lambda: FusedAttention(D, D, False))
    with torch.device("meta"):
        model = Stack(lambda: SplitAttention(D, D))
    plan = tg.plan(model, dict(fused.state_dict()), align=True)
    assert len(plan.transformed) == 12 and all(v.startswith("split(") for v in plan.transformed.values())


@pytest.mark.parametrize(("kv", "conv"), [(D, False), (4, False), (4, True)])
def test_separate_q_k_v_checkpoint_into_fused_qkv_and_back(kv, conv, tmp_path):
    torch.manual_seed(0)
    split = Stack(lambda: SplitAttention(D, kv))
    path = tmp_path / "split.pt"
    torch.save(split.state_dict(), path)
    model = Stack(lambda: FusedAttention(D, kv, conv))
    plan = tg.plan(model, path, align=True)
    assert not plan.missing and not plan.unexpected and not plan.ambiguous, plan.problems()
    joined = "concat(layers.1.query.weight, layers.1.key.weight, layers.1.value.weight, dim=0)"
    assert plan.transformed["layers.1.qkv.weight"] == (f"transpose({joined})" if conv else joined)
    assert plan.transformed["layers.0.qkv.bias"].startswith("concat(layers.0.query.bias, layers.0.key.bias")
    assert plan.aligned["layers.0.qkv.weight"]["confidence"] == 0.8
    if conv:  # the model's square Conv1D proj: transposed, as its sibling qkv is
        assert plan.transformed["layers.0.proj.weight"] == "transpose(layers.0.out.weight)"
    tg.load(model, path, plan=plan)
    x = torch.randn(3, D)
    with torch.no_grad():
        torch.testing.assert_close(model(x), split(x), rtol=0, atol=1e-6)
    back = reverse(plan, model.state_dict())
    saved = torch.load(path)
    assert set(back) == set(saved) and all(torch.equal(back[k], v) for k, v in saved.items())
    again = tg.plan(Stack(lambda: FusedAttention(D, kv, conv)), path, rules=plan.aligned_rules())
    assert again.transformed == plan.transformed


def test_export_transform_rules_templates_only_what_every_layer_shares():
    trees = {f"h.{i}.fc.weight": transpose(source(f"h.{i}.c_fc.weight")).to_dict() for i in (0, 1)}
    got = export_transform_rules(trees, targets=["h.0.fc.weight", "h.1.fc.weight"])
    assert {k: str(v) for k, v in got.items()} == {"h.{}.fc.weight": "transpose(h.{}.c_fc.weight)"}
    # a third layer the transforms do not cover: a template would transform it too, so literals
    got = export_transform_rules(trees, targets=["h.0.fc.weight", "h.1.fc.weight", "h.2.fc.weight"])
    assert list(got) == ["h.0.fc.weight", "h.1.fc.weight"]
    # layers that take another layer's tensor: literals
    shifted = {f"h.{i}.fc.weight": transpose(source(f"h.{i + 1}.c_fc.weight")).to_dict() for i in (0, 1)}
    assert {k: str(v) for k, v in export_transform_rules(shifted).items()} == {
        "h.0.fc.weight": "transpose(h.1.c_fc.weight)",
        "h.1.fc.weight": "transpose(h.2.c_fc.weight)",
    }
