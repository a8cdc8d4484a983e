"""A small multilingual mT5-style tokenizer built offline and deterministically (``tiny``).

The real mT5 tokenizer is a 250,112-piece SentencePiece unigram model covering mC4's 101
languages; tests cannot download it. This module writes a unigram vocabulary of the same kind by
plain counting over a fixed in-code corpus of music words in several languages and scripts:
every character of the corpus (so any text made of them never needs ``<unk>``), the word-start
marker ``▁``, and each whole word ``▁word`` scored by its log-frequency, so Viterbi segmentation
prefers whole words. It is wrapped in transformers' ``T5Tokenizer`` (the tokenizers-backed
class that mT5 checkpoints use; ``T5TokenizerFast`` is an alias of it in transformers 5) with
mT5's special tokens: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, and no sentinel ids.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from typing import Any

__all__ = ["CORPUS", "build_tiny_mt5_tokenizer"]

#: The fixed text the vocabulary is counted from: music captions in several languages.
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
    "0 1 2 3 4 5 6 7 8 9 bpm 120 4/4 3/4 ! ? ' \" ( ) - : ;",
)

SPECIALS = ("<pad>", "</s>", "<unk>")
_CHAR_SCORE = -12.0  # far below any word, so characters are the fallback only


@functools.lru_cache(maxsize=1)
def tiny_vocab() -> tuple[tuple[str, float], ...]:
    """The ``(piece, log-probability)`` list, specials first, in a fixed order."""
    words: Counter[str] = Counter(w for line in CORPUS for w in line.split())
    total = sum(words.values())
    chars = sorted({c for line in CORPUS for c in line if not c.isspace()} | {c.upper() for line in CORPUS for c in line if c.isascii() and c.isalpha()})
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in SPECIALS] + [("▁", -2.0)]
    pieces += [(c, _CHAR_SCORE) for c in chars]
    # Most frequent words first; ties alphabetical, so the order never depends on hashing.
    pieces += [("▁" + w, math.log(n / total)) for w, n in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))]
    seen: set[str] = set()
    return tuple(p for p in pieces if not (p[0] in seen or seen.add(p[0])))


def build_tiny_mt5_tokenizer(**kwargs: Any) -> Any:
    """A fresh ``T5Tokenizer`` over the tiny multilingual vocabulary.

    Args:
        **kwargs: Passed to ``T5Tokenizer`` (e.g. ``model_max_length``).
    """
    from transformers import T5Tokenizer

    kwargs.setdefault("model_max_length", 512)
    return T5Tokenizer(vocab=list(tiny_vocab()), extra_ids=0, **kwargs)
