"""The name vocabulary: what the words in a module path say, and when two names agree.

Checkpoints of one network name the same module differently (``attention.self.query`` in
Hugging Face, ``attn.q`` in timm, ``self_attn.q_proj`` in Llama). These helpers read a path
as words (:func:`tokens`), find the words that say what a module *is* (:func:`role`), and
compare words (:func:`word_similarity`: equal, synonyms, a prefix, an abbreviation). The
aligner uses them to pair modules; :mod:`torchgraft.diff` uses :func:`path_similarity`
(built on the same words) to suggest renames.

Example:
    >>> role("encoder.layer.0.attention.self.query"), role("blocks.0.attn.q")
    (['query'], ['q'])
    >>> agree(["query"], ["q"])
    'query ~ q'
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

__all__ = [
    "GENERIC",
    "SYNONYMS",
    "agree",
    "conflict",
    "path_order",
    "path_similarity",
    "relative",
    "role",
    "tokens",
    "word_similarity",
    "words_agreement",
]

#: Words that name a kind of layer or a container, not a role: they never decide a pair by name.
GENERIC = frozenset({
    "weight", "bias", "layer", "layers", "block", "blocks", "module", "modules", "model", "net", "network",
    "dense", "linear", "fc", "conv", "convolution", "proj", "projection", "norm", "bn", "ln", "layernorm",
    "batchnorm", "groupnorm", "gn", "self", "op", "ops", "seq", "sequential", "main", "body", "features",
    "feature", "stage", "stages", "unit", "units", "sub", "wrapper", "inner", "base", "backbone", "param",
    "params", "parameter",
})  # fmt: skip
#: Words that mean the same role under different conventions (timm / torchvision / Hugging Face / original repos).
SYNONYMS: tuple[frozenset[str], ...] = tuple(
    frozenset(group.split())
    for group in (
        "head classifier cls logits",
        "mlp ffn ff feedforward intermediate",
        "embed embedding embeddings wte tok token word",
        "pos position positional wpe",
        "attn attention",
        "stem embedder",
        "pool pooler pooling",
        "downsample shortcut skip",
    )
)
_STEM_NUMBER = re.compile(r"^(.*?[A-Za-z_])(\d+)$")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def tokens(path: str) -> list[str]:
    """``"attention.self.LayerNorm_1"`` -> ``["attention", "self", "layer", "norm"]`` (numbers dropped)."""
    out: list[str] = []
    for part in re.split(r"[._\-]", path):
        for word in _CAMEL.split(part):
            word = word.lower().rstrip("0123456789")
            if word and word not in out:
                out.append(word)
    return out


def role(path: str) -> list[str]:
    """The words that say what a module is: its last name part with a non-generic word.

    ``attention.output.dense`` -> ``["output"]``, ``self_attn.q_proj`` -> ``["q", "proj"]``,
    ``post_attention_layernorm`` -> ``["post", "attention", "layernorm"]``. Containers above
    it (``attention.attention``) do not count: they differ between conventions.
    """
    for part in reversed(path.split(".") if path else []):
        words = tokens(part)
        if any(w not in GENERIC for w in words):
            return words
    return []


def _is_subsequence(short: str, long: str) -> bool:
    it = iter(long)
    return all(c in it for c in short)


def word_similarity(a: str, b: str) -> float:
    """How well two words agree: equal, prefix (``q``/``query``), abbreviation (``attn``/``attention``).

    ``1.0`` equal, ``0.9`` synonyms, ``0.8`` a prefix, ``0.7`` an abbreviation, ``0.5`` contained
    (``norm`` in ``layernorm``, ``q`` in ``wq``), ``0.0`` unrelated.
    """
    if a == b:
        return 1.0
    if any(a in group and b in group for group in SYNONYMS):
        return 0.9
    short, long = sorted((a, b), key=len)
    if long.startswith(short):
        return 0.8
    if len(short) >= 2 and short[0] == long[0] and _is_subsequence(short, long):
        return 0.7
    if (len(short) >= 3 and short in long) or (len(short) == 1 and len(long) == 2 and long.endswith(short)):
        return 0.5  # "norm" in "layernorm", "q" in "wq"
    return 0.0


def relative(path: str, root: str) -> str:
    """``path`` below ``root`` (``""`` for the root itself; ``path`` when it is not below it)."""
    return path[len(root) + 1 :] if root and path.startswith(root + ".") else ("" if path == root else path)


def conflict(a: list[str], b: list[str]) -> bool:
    """Both names say what they are, and no word of one agrees with any word of the other."""
    a = [w for w in a if w not in GENERIC]
    b = [w for w in b if w not in GENERIC]
    return bool(a and b) and all(word_similarity(x, y) == 0 for x in a for y in b)


def agree(a: list[str], b: list[str]) -> str | None:
    """Words that agree, when every non-generic word on each side has a partner on the other."""
    a = [w for w in a if w not in GENERIC]
    b = [w for w in b if w not in GENERIC]
    if not a or not b:
        return None
    if any(max(word_similarity(x, y) for y in b) == 0 for x in a) or any(
        max(word_similarity(x, y) for x in a) == 0 for y in b
    ):
        return None
    return ", ".join(f"{x} ~ {max(b, key=lambda y: word_similarity(x, y))}" for x in a)


def path_order(a: str, b: str) -> int | None:
    """Order two paths by the numbers in them where they part: -1, 1, or None when names decide."""
    for x, y in zip(a.split("."), b.split(".")):
        if x == y:
            continue
        if x.isdigit() and y.isdigit():
            return -1 if int(x) < int(y) else 1 if int(x) > int(y) else None
        mx, my = _STEM_NUMBER.match(x), _STEM_NUMBER.match(y)
        if mx and my and mx.group(1) == my.group(1) and int(mx.group(2)) != int(my.group(2)):
            return -1 if int(mx.group(2)) < int(my.group(2)) else 1
        return None
    return None


_NUMBERS = re.compile(r"\d+")
#: Leaf names that mean the same thing (legacy norm names).
_SAME_LEAF = {frozenset({"gamma", "weight"}), frozenset({"beta", "bias"})}


def words_agreement(a: list[str], b: list[str]) -> float:
    """How much two word lists agree, in 0..1: each word's best :func:`word_similarity` on the other side, averaged.

    Equal lists give 1.0, lists with no related word 0.0; synonyms and abbreviations count in between.
    """
    if not a or not b:
        return 1.0 if a == b else 0.0
    best_a = sum(max(word_similarity(x, y) for y in b) for x in a)
    best_b = sum(max(word_similarity(x, y) for x in a) for y in b)
    return (best_a + best_b) / (len(a) + len(b))


def path_similarity(a: str, b: str) -> float:
    """How alike two full tensor paths are, in 0..1: characters and words alike, layer numbers equal, same leaf.

    Words are compared as the aligner compares them (:func:`words_agreement`: ``q`` ~ ``query``,
    ``attn`` ~ ``attention``), so :func:`torchgraft.diff` and ``align=True`` agree on what names mean.

    Example:
        >>> round(path_similarity("enc.layer.0.attn.query.weight", "enc.layer.0.attn.q_proj.weight"), 2)
        0.88
    """
    ratio = SequenceMatcher(None, a, b, autojunk=False).ratio()
    score = 0.6 * ratio + 0.4 * words_agreement(tokens(a), tokens(b))
    if _NUMBERS.findall(a) != _NUMBERS.findall(b):
        score *= 0.6
    leaf_a, leaf_b = a.rpartition(".")[2], b.rpartition(".")[2]
    if leaf_a != leaf_b and frozenset({leaf_a, leaf_b}) not in _SAME_LEAF:
        score *= 0.5
    return score
