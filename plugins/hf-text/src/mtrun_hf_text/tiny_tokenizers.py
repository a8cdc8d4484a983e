"""Small RoBERTa, BERT and T5 tokenizers built offline and deterministically (``tiny-*`` presets).

Tests and recipes' ``tiny`` profiles need tokenizers without the model hub. Each builder derives
a vocabulary from a fixed in-code corpus of music words in several languages, with the family's
own normaliser, pre-tokeniser and special tokens (it runs the real transformers tokenizer class's
pipeline on the corpus first), and returns that class: ``RobertaTokenizer`` (byte-level BPE,
``<mask>`` last like roberta-base), ``BertTokenizer`` (uncased WordPiece) and ``T5Tokenizer``
(unigram). In transformers 5 these are the tokenizers-backed fast classes (``*TokenizerFast``
are aliases). Plain counting with explicit tie-breaks makes every vocabulary identical in every
process; each has a mask token where the family has one, for MLM.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from typing import Any

__all__ = ["CORPUS", "build_tiny_bert_tokenizer", "build_tiny_roberta_tokenizer", "build_tiny_t5_tokenizer", "build_tiny_tokenizer"]

#: The fixed text every tiny vocabulary is derived from.
CORPUS: tuple[str, ...] = (
    "a calm piano melody with soft strings and a slow tempo",
    "an upbeat rock song with distorted electric guitars and loud drums",
    "a jazz trio with upright bass, brushed drums and a warm saxophone solo",
    "ambient electronic music with synth pads and a deep bass line",
    "a folk ballad sung by a female voice with acoustic guitar and fiddle",
    "energetic dance track, four on the floor kick, bright synthesizer lead",
    "sad classical orchestra piece in a minor key with cello and violin",
    "happy pop song with catchy vocals, claps and a fast beat",
    "hip hop beat with vinyl crackle, sampled piano and heavy kick",
    "A reel played on fiddle and flute, traditional Irish music.",
    "metal riff, double bass drums, aggressive screaming vocals",
    "relaxing lo-fi instrumental, mellow keys and gentle rain",
    "música alegre con guitarra española y percusión",
    "musique calme au piano avec des cordes douces",
    "ruhige Musik mit Klavier und Streichern, langsames Tempo",
    "音楽 ピアノ ギター ドラム 静かな曲",
    "музыка спокойная мелодия на фортепиано",
    "0 1 2 3 4 5 6 7 8 9 bpm 120 4/4 3/4 ! ? ' \" ( ) - : ;",
)

_NUM_MERGES = 300


def _learn_merges(words: Counter[tuple[str, ...]], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: merge the most frequent adjacent pair; ties to the smallest pair."""
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def _pieces(backend: Any, text: str) -> list[str]:
    """Words as the tokenizer's own normaliser and pre-tokeniser cut them."""
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    return [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]


def _ordered(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


@functools.lru_cache(maxsize=1)
def roberta_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE in roberta-base's layout: ``<s> <pad> </s> <unk>``, bytes, merges, ``<mask>``."""
    from tokenizers import pre_tokenizers
    from transformers import RobertaTokenizer

    backend = RobertaTokenizer().backend_tokenizer
    words = Counter(tuple(piece) for line in CORPUS for piece in _pieces(backend, line))
    merges = _learn_merges(words, _NUM_MERGES)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = _ordered(["<s>", "<pad>", "</s>", "<unk>"] + alphabet + [a + b for a, b in merges] + ["<mask>"])
    return vocab, merges


@functools.lru_cache(maxsize=1)
def bert_vocab() -> dict[str, int]:
    """Uncased WordPiece: specials, every character alone and as ``##`` continuation, whole words."""
    from transformers import BertTokenizer

    backend = BertTokenizer().backend_tokenizer
    pieces = [p for line in CORPUS for p in _pieces(backend, line)]
    chars = sorted({c for p in pieces for c in p})
    words = Counter(p for p in pieces if len(p) > 1)
    ranked = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))]
    return _ordered(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + ranked)


@functools.lru_cache(maxsize=1)
def t5_vocab() -> tuple[tuple[str, float], ...]:
    """Unigram pieces: ``<pad> </s> <unk>``, ``▁``, characters (low score), ``▁word`` by log-frequency."""
    words: Counter[str] = Counter(w for line in CORPUS for w in line.split())
    total = sum(words.values())
    chars = sorted({c for line in CORPUS for c in line if not c.isspace()} | {c.upper() for line in CORPUS for c in line if c.isascii() and c.isalpha()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -12.0) for c in chars]
    pieces += [("▁" + w, math.log(n / total)) for w, n in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))]
    seen: set[str] = set()
    return tuple(p for p in pieces if not (p[0] in seen or seen.add(p[0])))


def build_tiny_roberta_tokenizer(**kwargs: Any) -> Any:
    """A fresh ``RobertaTokenizer`` over the tiny byte-level BPE vocabulary."""
    from transformers import RobertaTokenizer

    vocab, merges = roberta_vocab()
    kwargs.setdefault("model_max_length", 512)
    return RobertaTokenizer(vocab=dict(vocab), merges=list(merges), **kwargs)


def build_tiny_bert_tokenizer(**kwargs: Any) -> Any:
    """A fresh uncased ``BertTokenizer`` over the tiny WordPiece vocabulary."""
    from transformers import BertTokenizer

    kwargs.setdefault("model_max_length", 512)
    return BertTokenizer(vocab=dict(bert_vocab()), do_lower_case=True, **kwargs)


def build_tiny_t5_tokenizer(**kwargs: Any) -> Any:
    """A fresh ``T5Tokenizer`` over the tiny unigram vocabulary (no sentinel ids)."""
    from transformers import T5Tokenizer

    kwargs.setdefault("model_max_length", 512)
    return T5Tokenizer(vocab=list(t5_vocab()), extra_ids=0, **kwargs)


def build_tiny_tokenizer(family: str) -> Any:
    """The tiny tokenizer of ``family`` (``roberta``, ``bert`` or ``t5``)."""
    builders = {"roberta": build_tiny_roberta_tokenizer, "bert": build_tiny_bert_tokenizer, "t5": build_tiny_t5_tokenizer}
    return builders[family]()
