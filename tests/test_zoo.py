"""transformers' model zoo: tg.load against from_pretrained (the oracle, run in each test) on tiny configs.

For each architecture: a head model saved by transformers itself loads strictly into its own class
(tensors and outputs equal to from_pretrained's, CPU- and meta-built); head -> base and base -> head
give from_pretrained's missing and unexpected sets and the same loaded tensors; a legacy torch file
(``module.`` prefix, ``LayerNorm.gamma/beta``) loads strictly.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict

import pytest
import torch

import torchgraft as tg

T = pytest.importorskip("transformers")

_TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
_POS = dict(max_position_embeddings=64)
_SEQ2SEQ = dict(vocab_size=99, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37)  # fmt: skip

#: name -> (base class, head class, config factory, input kind)
ZOO = {
    "bert": ("BertModel", "BertForSequenceClassification", lambda: T.BertConfig(**_TEXT, **_POS), "text"),
    "roberta": ("RobertaModel", "RobertaForSequenceClassification", lambda: T.RobertaConfig(**_TEXT, **_POS), "text"),
    "distilbert": (
        "DistilBertModel",
        "DistilBertForSequenceClassification",
        lambda: T.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=2, hidden_dim=37, **_POS),
        "text",
    ),
    "albert": ("AlbertModel", "AlbertForSequenceClassification", lambda: T.AlbertConfig(**_TEXT, **_POS, embedding_size=16), "text"),
    "electra": ("ElectraModel", "ElectraForSequenceClassification", lambda: T.ElectraConfig(**_TEXT, **_POS, embedding_size=16), "text"),
    "gpt2": ("GPT2Model", "GPT2LMHeadModel", lambda: T.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64), "text"),
    "gpt_neox": ("GPTNeoXModel", "GPTNeoXForCausalLM", lambda: T.GPTNeoXConfig(**_TEXT, **_POS), "text"),
    "llama": ("LlamaModel", "LlamaForCausalLM", lambda: T.LlamaConfig(**_TEXT, **_POS, num_key_value_heads=1), "text"),
    "mistral": ("MistralModel", "MistralForCausalLM", lambda: T.MistralConfig(**_TEXT, **_POS, num_key_value_heads=1), "text"),
    "opt": (
        "OPTModel",
        "OPTForCausalLM",
        lambda: T.OPTConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=37, word_embed_proj_dim=32, **_POS),
        "text",
    ),
    "t5": ("T5Model", "T5ForConditionalGeneration", lambda: T.T5Config(vocab_size=99, d_model=32, d_kv=16, d_ff=37, num_layers=2, num_heads=2, decoder_start_token_id=0), "seq2seq"),
    "bart": ("BartModel", "BartForConditionalGeneration", lambda: T.BartConfig(**_SEQ2SEQ, **_POS), "seq2seq"),
    "vit": (
        "ViTModel",
        "ViTForImageClassification",
        lambda: T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8),
        "image",
    ),
    "swin": (
        "SwinModel",
        "SwinForImageClassification",
        lambda: T.SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=32, patch_size=4, window_size=2),
        "image",
    ),
    "wav2vec2": (
        "Wav2Vec2Model",
        "Wav2Vec2ForCTC",
        lambda: T.Wav2Vec2Config(
            vocab_size=20, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            conv_dim=(8, 8), conv_stride=(4, 4), conv_kernel=(8, 8), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
        ),  # fmt: skip
        "audio",
    ),
    "whisper": (
        "WhisperModel",
        "WhisperForConditionalGeneration",
        lambda: T.WhisperConfig(
            **_SEQ2SEQ, num_mel_bins=8, max_source_positions=16, max_target_positions=32,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        ),  # fmt: skip
        "speech",
    ),
}


def _inputs(kind: str, config) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (2, 7), generator=g)
    return {
        "text": lambda: {"input_ids": ids},
        "seq2seq": lambda: {"input_ids": ids, "decoder_input_ids": ids[:, :4]},
        "image": lambda: {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)},
        "audio": lambda: {"input_values": torch.randn(2, 400, generator=g)},
        "speech": lambda: {"input_features": torch.randn(2, 8, 32, generator=g), "decoder_input_ids": ids[:, :4]},
    }[kind]()


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logging.disable(logging.NOTSET)


def _build(cls_name: str, config, *, meta: bool = False):
    cls = getattr(T, cls_name)
    if meta:
        with torch.device("meta"):
            return cls(config)
    return cls(config)


def _outputs(model, kind: str, config) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(**_inputs(kind, config))
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (head dir, base dir), each written by transformers' own save_pretrained."""
    out = {}
    logging.disable(logging.WARNING)
    for name, (base, head, config, _) in ZOO.items():
        torch.manual_seed(0)
        root = tmp_path_factory.mktemp(name)
        _build(head, config()).save_pretrained(root / "head")
        _build(base, config()).save_pretrained(root / "base")
        out[name] = (root / "head", root / "base")
    logging.disable(logging.NOTSET)
    return out


def test_zoo_is_big_enough():
    kinds = {k for *_, k in ZOO.values()}
    assert len(ZOO) >= 15 and {"text", "seq2seq", "image", "audio"} <= kinds


@pytest.mark.parametrize("name", list(ZOO))
def test_saved_by_transformers_loads_strictly_into_its_own_class(name, saved):
    base, head, config, kind = ZOO[name]
    head_dir, _ = saved[name]
    cfg = T.AutoConfig.from_pretrained(head_dir)
    reference = getattr(T, head).from_pretrained(head_dir)
    expected = _outputs(reference, kind, cfg)
    for meta in (False, True):
        model = _build(head, cfg, meta=meta)
        tg.load(model, head_dir, strict=True)
        ours, theirs = model.state_dict(), reference.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), [k for k in theirs if not torch.equal(ours[k], theirs[k])]
        for a, b in zip(_outputs(model, kind, cfg), expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", ["head->base", "base->head"])
@pytest.mark.parametrize("name", list(ZOO))
def test_base_and_head_like_from_pretrained(name, direction, saved):
    base, head, config, kind = ZOO[name]
    head_dir, base_dir = saved[name]
    ckpt, cls = (head_dir, base) if direction == "head->base" else (base_dir, head)
    cfg = T.AutoConfig.from_pretrained(ckpt)
    torch.manual_seed(0)
    reference, info = getattr(T, cls).from_pretrained(ckpt, output_loading_info=True)
    model = _build(cls, cfg)
    report = tg.load(model, ckpt)
    assert set(report.missing) | {m["key"] for m in report.mismatched} == set(info["missing_keys"]) | {
        k for k, *_ in info["mismatched_keys"]
    }
    assert len(report.unexpected) == len(info["unexpected_keys"])
    ours, theirs = model.state_dict(), reference.state_dict()
    loaded = [k for k in theirs if k not in info["missing_keys"]]
    assert all(torch.equal(ours[k], theirs[k]) for k in loaded), [k for k in loaded if not torch.equal(ours[k], theirs[k])]


@pytest.mark.parametrize("name", ["bert", "roberta", "electra", "albert"])
def test_legacy_torch_file_with_module_prefix(name, tmp_path):
    """A DataParallel-era file: ``module.`` in front, ``LayerNorm.gamma/beta`` names, torch's legacy format."""
    base, head, config, kind = ZOO[name]
    torch.manual_seed(0)
    source = _build(head, config())
    state = OrderedDict()
    for k, v in source.state_dict().items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        state[f"module.{k}"] = v
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    model = _build(head, config(), meta=True)
    report = tg.load(model, path, strict=True)
    assert any("LayerNorm.gamma" in k for k in report.renamed)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
