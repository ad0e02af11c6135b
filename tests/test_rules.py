"""Key renames: templates, regexes, drops, and careful built-in rules."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from torchgraft.keys import collapse_keys, format_ranges, layout_fingerprint, natural_key
from torchgraft.rules import BUILTIN_RULES, apply_rules, compile_rules, invert_rules, suffix_matcher


def rename(keys, rules=None, expected=None):
    is_expected = suffix_matcher(expected) if expected is not None else None
    return apply_rules(keys, compile_rules(rules), is_expected=is_expected).mapping


def test_templates_with_layer_numbers_and_drops():
    m = rename(
        ["old.3.fc.weight", "old.12.fc.bias", "aux_head.bias", "other"], {"old.{}.fc": "new.{}.proj", "aux_head": None}
    )
    assert m == {
        "old.3.fc.weight": "new.3.proj.weight",
        "old.12.fc.bias": "new.12.proj.bias",
        "aux_head.bias": None,
        "other": "other",
    }


def test_template_matches_whole_components_only():
    m = rename(["backbone.0.w", "backbone2.0.w"], {"backbone": "features"})
    assert m == {"backbone.0.w": "features.0.w", "backbone2.0.w": "backbone2.0.w"}


def test_two_placeholders_keep_their_order():
    m = rename(["blocks.1.heads.2.q"], {"blocks.{}.heads.{}.q": "layers.{}.attn.{}.query"})
    assert m == {"blocks.1.heads.2.q": "layers.1.attn.2.query"}


def test_regex_rules():
    m = rename(["enc.4.x", "dec.4.x"], {re.compile(r"^enc\.(\d+)\."): r"encoder.layer.\1."})
    assert m == {"enc.4.x": "encoder.layer.4.x", "dec.4.x": "dec.4.x"}


def test_rules_as_pairs_apply_in_order():
    m = rename(["a.w"], [("a", "b"), ("b", "c")])
    assert m == {"a.w": "c.w"}


def test_placeholder_count_must_agree():
    with pytest.raises(ValueError, match=r"same number of '\{\}' placeholders"):
        compile_rules({"a.{}.b": "c.d"})


def test_rule_key_type_checked():
    with pytest.raises(TypeError, match=r"rule keys must be str templates or re.Pattern, got int"):
        compile_rules({3: "x"})


def test_legacy_layernorm_names():
    m = rename(
        [
            "bert.embeddings.LayerNorm.gamma",
            "enc.ln_f.beta",
            "blk.norm1.gamma",
            "h.0.ln_1.gamma",
            "final_layer_norm.beta",
        ]
    )
    assert m == {
        "bert.embeddings.LayerNorm.gamma": "bert.embeddings.LayerNorm.weight",
        "enc.ln_f.beta": "enc.ln_f.bias",
        "blk.norm1.gamma": "blk.norm1.weight",
        "h.0.ln_1.gamma": "h.0.ln_1.weight",
        "final_layer_norm.beta": "final_layer_norm.bias",
    }


def test_gamma_that_is_not_a_layernorm_is_never_renamed():
    """transformers bug #29554: a LayerScale gamma and a beta_proj Linear were renamed."""
    keys = ["blocks.0.ls1.gamma", "beta_proj.weight", "gamma_net.bias", "x.gamma"]
    assert rename(keys) == {k: k for k in keys}


def test_builtin_rules_skip_keys_the_model_expects():
    # a model that really has a parameter called "norm.gamma" keeps it
    assert rename(["norm.gamma"], expected=["norm.gamma"]) == {"norm.gamma": "norm.gamma"}
    assert rename(["norm.gamma"], expected=["norm.weight"]) == {"norm.gamma": "norm.weight"}


def test_wrapper_prefixes_at_any_depth():
    m = rename(["module.enc.module.x", "_orig_mod.head.w", "module._orig_mod.a"])
    assert m == {"module.enc.module.x": "enc.x", "_orig_mod.head.w": "head.w", "module._orig_mod.a": "a"}


def test_wrapper_kept_when_model_has_a_submodule_called_module():
    assert rename(["wrap.module.w"], expected=["wrap.module.w"]) == {"wrap.module.w": "wrap.module.w"}


def test_weight_norm_layouts_both_ways():
    new = ["conv.parametrizations.weight.original0", "conv.parametrizations.weight.original1"]
    old = ["conv.weight_g", "conv.weight_v"]
    assert rename(old, expected=new) == dict(zip(old, new))
    assert rename(new, expected=old) == dict(zip(new, old))
    assert rename(old) == {k: k for k in old}  # without a target nothing to decide on


def test_reasons_are_recorded():
    res = apply_rules(["module.LayerNorm.gamma"], [])
    assert res.renamed == {"module.LayerNorm.gamma": "LayerNorm.weight"}
    assert res.reasons["module.LayerNorm.gamma"] == ["wrapper prefix", "legacy LayerNorm.gamma"]


def test_invert_rules():
    assert invert_rules({"a.{}.b": "c.{}.d", "x": None}) == {"c.{}.d": "a.{}.b"}
    with pytest.raises(ValueError, match=r"both map to 'z'"):
        invert_rules({"a": "z", "b": "z"})


def test_suffix_matcher_both_directions():
    m = suffix_matcher(["bert.embeddings.x", "pooler.w"])
    assert m("embeddings.x") and m("bert.embeddings.x") and m("model.pooler.w")
    assert not m("embeddings.y")


def test_collapse_and_ranges():
    assert format_ranges([0, 1, 2, 3, 5, 7, 8]) == "0..3,5,7..8"
    keys = [f"encoder.layer.{i}.attention.{p}" for i in range(12) for p in ("weight", "bias")]
    assert collapse_keys(keys) == ["encoder.layer.{0..11}.attention.{bias,weight}"]
    # an incomplete product is not collapsed into keys that do not exist
    assert collapse_keys(["x.2.y.3", "x.2.y.5", "x.4.y.3"]) == ["x.2.y.{3,5}", "x.4.y.3"]
    assert sorted(["l.10", "l.2"], key=natural_key) == ["l.2", "l.10"]


_FRAGMENTS = ["module", "_orig_mod", "LayerNorm", "norm1", "ln_f", "gamma", "beta", "weight_g", "weight_v",
              "parametrizations", "weight", "original0", "original1", "bias", "0", "ls1", "beta_proj"]  # fmt: skip


@given(st.lists(st.sampled_from(_FRAGMENTS), min_size=1, max_size=6))
def test_every_key_a_builtin_rule_matches_contains_one_of_its_hints(parts):
    key = ".".join(parts)
    for rule in BUILTIN_RULES:
        if rule.pattern.search(key):
            assert any(h in key for h in rule.hints), (rule.name, key)


@given(
    st.lists(
        st.tuples(
            st.text(max_size=12), st.lists(st.integers(0, 10**12), max_size=4), st.sampled_from(["float32", "int64"])
        ),
        max_size=8,
    )
)
def test_layout_fingerprint_is_the_hash_of_json_rows(rows):
    """Plans saved before the fast fingerprint stay valid: the bytes hashed are json.dumps' bytes."""
    import hashlib
    import json

    old = hashlib.sha256()
    for name, shape, dtype in rows:
        old.update(json.dumps([name, tuple(shape), dtype]).encode())
    assert layout_fingerprint(rows) == old.hexdigest()[:16]
