"""A small CLIP tokenizer built offline and deterministically, for the ``tiny`` preset.

Tests and recipes' ``tiny`` profiles need a tokenizer without the model hub. This module
learns a byte-level BPE with CLIP's conventions (lower-casing, CLIP's word-splitting regex,
``</w>`` end-of-word suffix, ``<|startoftext|>``/``<|endoftext|>`` as the last two ids) from a
fixed in-code corpus of music words in several languages, and wraps it in transformers'
``CLIPTokenizer`` (in transformers 5 that class *is* the tokenizers-backed fast tokenizer;
``CLIPTokenizerFast`` is an alias of it).

The merges are learned by a few lines of plain Python with an explicit tie-break rather than by
``tokenizers``' trainer, so the vocabulary is identical in every process, on every machine.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

__all__ = ["CORPUS", "build_tiny_clip_tokenizer"]

#: The fixed training text: music captions and words in several languages and scripts.
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
    "a reel played on fiddle and flute, traditional irish music",
    "metal riff, double bass drums, aggressive screaming vocals",
    "relaxing lo-fi instrumental, mellow keys and gentle rain",
    "música alegre con guitarra española y percusión",
    "canción triste de piano y voz, tempo lento",
    "musique calme au piano avec des cordes douces",
    "chanson pop joyeuse avec batterie et basse",
    "ruhige Musik mit Klavier und Streichern, langsames Tempo",
    "fröhlicher Rocksong mit E-Gitarre und Schlagzeug",
    "música brasileira com violão e samba",
    "musica italiana con mandolino e fisarmonica",
    "音楽 ピアノ ギター ドラム 静かな曲 明るい歌",
    "音乐 钢琴 吉他 鼓 安静的歌曲 快乐的旋律",
    "музыка спокойная мелодия на фортепиано и гитаре",
    "рок песня с электрогитарой и барабанами",
    "음악 피아노 기타 드럼 조용한 노래",
    "संगीत गिटार ढोल शांत गीत",
    "موسيقى هادئة بيانو جيتار طبول",
    "μουσική πιάνο κιθάρα τύμπανα",
    "0 1 2 3 4 5 6 7 8 9 bpm 120 4/4 3/4",
)

#: How many merges to learn; small enough that the embedding table stays tiny.
NUM_MERGES = 300

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def _learn_merges(words: Counter[tuple[str, ...]], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair.

    Ties go to the lexicographically smallest pair, so the result never depends on hash order.
    """
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


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    # An empty CLIPTokenizer carries exactly CLIP's normaliser and pre-tokeniser; learning on
    # their output makes the merges fit what the real tokenizer will feed the BPE model.
    backend = CLIPTokenizer().backend_tokenizer
    words: Counter[tuple[str, ...]] = Counter()
    for line in CORPUS:
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line)):
            symbols = list(piece)
            symbols[-1] += "</w>"
            words[tuple(symbols)] += 1
    merges = _learn_merges(words, NUM_MERGES)
    # CLIP's layout: the 256 byte symbols, the same with ``</w>``, the merges, then BOS and EOS
    # last, so the end-of-text id is the largest id (what the legacy argmax pooling assumes).
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    vocab: dict[str, int] = {}
    for token in tokens + [BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def build_tiny_clip_tokenizer(**kwargs: Any) -> Any:
    """A fresh ``CLIPTokenizer`` over the tiny vocabulary (a few hundred ids).

    Args:
        **kwargs: Passed to ``CLIPTokenizer`` (e.g. ``model_max_length``).
    """
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    kwargs.setdefault("model_max_length", 77)
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), **kwargs)
