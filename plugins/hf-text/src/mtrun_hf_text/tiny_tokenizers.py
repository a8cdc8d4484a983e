"""Small tokenizers built offline and deterministically, for ``tiny`` presets and tests.

Tests and recipes' ``tiny`` profiles need tokenizers without the model hub. Each family's
vocabulary is derived from a fixed in-code corpus of music captions in several languages, with
the family's own normaliser, pre-tokeniser and special tokens (the real transformers tokenizer
class's pipeline runs on the corpus first), and is wrapped in that class:

=========  ===================  ===============================================================
family     class                vocabulary
=========  ===================  ===============================================================
roberta    ``RobertaTokenizer``  byte-level BPE, ``<s> <pad> </s> <unk>`` first, ``<mask>`` last
                                 (roberta-base's layout)
bert       ``BertTokenizer``     uncased WordPiece: specials, characters, ``##`` characters, words
t5, mt5    ``T5Tokenizer``       unigram: ``<pad> </s> <unk>`` = 0, 1, 2, ``▁``, characters,
                                 ``▁word`` by log-frequency; no sentinel ids
clip       ``CLIPTokenizer``     byte-level BPE with ``</w>`` word ends, ``<|startoftext|>`` and
                                 ``<|endoftext|>`` the last two ids (CLIP's layout)
=========  ===================  ===============================================================

In transformers 5 these are the tokenizers-backed fast classes (``*TokenizerFast`` are aliases).
Merges and word lists come from plain counting with explicit tie-breaks rather than a trainer,
so every vocabulary is identical in every process, on every machine. The corpora differ by
family (``mt5`` and ``clip`` cover more scripts); see :data:`CORPORA`.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from typing import Any, Callable

__all__ = ["CORPORA", "FAMILIES", "build_tiny_tokenizer", "tiny_vocab"]

_ENGLISH = (
    "a calm piano melody with soft strings and a slow tempo",
    "an upbeat rock song with distorted electric guitars and loud drums",
    "a jazz trio with upright bass, brushed drums and a warm saxophone solo",
    "ambient electronic music with synth pads and a deep bass line",
    "a folk ballad sung by a female voice with acoustic guitar and fiddle",
    "energetic dance track, four on the floor kick, bright synthesizer lead",
    "sad classical orchestra piece in a minor key with cello and violin",
    "happy pop song with catchy vocals, claps and a fast beat",
    "hip hop beat with vinyl crackle, sampled piano and heavy kick",
)
_REEL = "A reel played on fiddle and flute, traditional Irish music."
_MORE_ENGLISH = (
    "metal riff, double bass drums, aggressive screaming vocals",
    "relaxing lo-fi instrumental, mellow keys and gentle rain",
)
_EUROPEAN = (
    "música alegre con guitarra española y percusión",
    "canción triste de piano y voz, tempo lento",
    "musique calme au piano avec des cordes douces",
    "chanson pop joyeuse avec batterie et basse",
    "ruhige Musik mit Klavier und Streichern, langsames Tempo",
    "fröhlicher Rocksong mit E-Gitarre und Schlagzeug",
    "música brasileira com violão e samba",
    "musica italiana con mandolino e fisarmonica",
)
_OTHER_SCRIPTS = (
    "音楽 ピアノ ギター ドラム 静かな曲 明るい歌",
    "音乐 钢琴 吉他 鼓 安静的歌曲 快乐的旋律",
    "музыка спокойная мелодия на фортепиано и гитаре",
    "рок песня с электрогитарой и барабанами",
    "음악 피아노 기타 드럼 조용한 노래",
    "संगीत गिटार ढोल शांत गीत",
    "موسيقى هادئة بيانو جيتار طبول",
    "μουσική πιάνο κιθάρα τύμπανα",
)
_NUMBERS = "0 1 2 3 4 5 6 7 8 9 bpm 120 4/4 3/4"
_PUNCTUATION = " ! ? ' \" ( ) - : ;"

_SMALL = (
    *_ENGLISH,
    _REEL,
    *_MORE_ENGLISH,
    _EUROPEAN[0],
    _EUROPEAN[2],
    _EUROPEAN[4],
    "音楽 ピアノ ギター ドラム 静かな曲",
    "музыка спокойная мелодия на фортепиано",
    _NUMBERS + _PUNCTUATION,
)

#: The fixed text each family's vocabulary is derived from (the order does not matter).
CORPORA: dict[str, tuple[str, ...]] = {
    "roberta": _SMALL,
    "bert": _SMALL,
    "t5": _SMALL,
    "mt5": (*_ENGLISH, _REEL, *_EUROPEAN, *_OTHER_SCRIPTS, _NUMBERS + _PUNCTUATION),
    "clip": (*_ENGLISH, _REEL.lower().rstrip("."), *_MORE_ENGLISH, *_EUROPEAN, *_OTHER_SCRIPTS, _NUMBERS),
}

FAMILIES = tuple(CORPORA)

_NUM_MERGES = 300  # small enough that the embedding tables stay tiny
_CHAR_SCORE = -12.0  # unigram: far below any word, so characters are the fallback only


def _learn_merges(words: Counter[tuple[str, ...]], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: merge the most frequent adjacent pair; ties to the smallest pair, so the
    result never depends on hash order."""
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


def _pieces(family: str, tokenizer_class: str) -> list[str]:
    """The corpus's words as the tokenizer's own normaliser and pre-tokeniser cut them (an empty
    tokenizer of the class carries exactly those)."""
    import transformers

    backend = getattr(transformers, tokenizer_class)().backend_tokenizer
    pieces: list[str] = []
    for text in CORPORA[family]:
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        pieces += [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    return pieces


def _ordered(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _roberta_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    merges = _learn_merges(Counter(tuple(p) for p in _pieces("roberta", "RobertaTokenizer")), _NUM_MERGES)
    vocab = _ordered(["<s>", "<pad>", "</s>", "<unk>"] + _byte_alphabet() + [a + b for a, b in merges] + ["<mask>"])
    return vocab, merges


def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    words = Counter((*p[:-1], p[-1] + "</w>") for p in _pieces("clip", "CLIPTokenizer"))
    merges = _learn_merges(words, _NUM_MERGES)
    # End-of-text is the largest id, what transformers' legacy argmax pooling assumes.
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    return _ordered(tokens + ["<|startoftext|>", "<|endoftext|>"]), merges


def _bert_vocab() -> dict[str, int]:
    pieces = _pieces("bert", "BertTokenizer")
    chars = sorted({c for p in pieces for c in p})
    words = Counter(p for p in pieces if len(p) > 1)
    ranked = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))]
    return _ordered(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + ranked)


def _unigram_vocab(corpus: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    words: Counter[str] = Counter(w for line in corpus for w in line.split())
    total = sum(words.values())
    chars = sorted({c for line in corpus for c in line if not c.isspace()} | {c.upper() for line in corpus for c in line if c.isascii() and c.isalpha()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, _CHAR_SCORE) for c in chars]
    # Most frequent words first; ties alphabetical, so the order never depends on hashing.
    pieces += [("▁" + w, math.log(n / total)) for w, n in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))]
    seen: set[str] = set()
    return tuple(p for p in pieces if not (p[0] in seen or seen.add(p[0])))


_VOCABS: dict[str, Callable[[], Any]] = {
    "roberta": _roberta_vocab,
    "bert": _bert_vocab,
    "t5": lambda: _unigram_vocab(CORPORA["t5"]),
    "mt5": lambda: _unigram_vocab(CORPORA["mt5"]),
    "clip": _clip_vocab,
}


@functools.lru_cache(maxsize=None)
def tiny_vocab(family: str) -> Any:
    """The vocabulary of ``family``: ``(vocab, merges)`` for BPE (roberta, clip), ``{token: id}``
    for WordPiece (bert), ``((piece, score), ...)`` for unigram (t5, mt5). Cached; treat as read-only."""
    if family not in _VOCABS:
        raise ValueError(f"no tiny tokenizer for family {family!r}; one of {', '.join(FAMILIES)}")
    return _VOCABS[family]()


def build_tiny_tokenizer(family: str, **kwargs: Any) -> Any:
    """A fresh tiny tokenizer of ``family`` (one of :data:`FAMILIES`).

    Args:
        family: ``roberta``, ``bert``, ``t5``, ``mt5`` or ``clip``.
        **kwargs: Passed to the tokenizer class (default ``model_max_length``: 77 for clip, else 512).
    """
    import transformers

    vocab = tiny_vocab(family)
    kwargs.setdefault("model_max_length", 77 if family == "clip" else 512)
    if family in ("roberta", "clip"):
        cls = transformers.RobertaTokenizer if family == "roberta" else transformers.CLIPTokenizer
        return cls(vocab=dict(vocab[0]), merges=list(vocab[1]), **kwargs)
    if family == "bert":
        return transformers.BertTokenizer(vocab=dict(vocab), do_lower_case=True, **kwargs)
    return transformers.T5Tokenizer(vocab=list(vocab), extra_ids=0, **kwargs)
