"""Captions written from an item's tags, in varied wording.

If every caption followed one template, text-to-music retrieval would reduce to matching that
template's slots. Instead each item gets several captions that differ in sentence form (full
sentences, noun phrases, comma-separated tag lists), in which tags they mention (a random
subset, so a caption may say only "a fast reel" or only "solo flute"), and in the words used
(fiddle/violin, quick/brisk/up-tempo, "in D major"/"D major key"). Everything said is true of
the clip: no mood words are invented, since nothing in the scores or the rendering settles
whether a tune is "sad" or "joyful".

The generator is a pure function of the tags and a seed, so captions are reproducible.
"""

from __future__ import annotations

import random
from typing import Any, Callable

__all__ = ["GENRE_WORDS", "TEMPO_WORDS", "make_captions"]

TEMPO_WORDS = {
    "slow": ("slow", "unhurried", "leisurely", "gentle-paced"),
    "medium": ("moderate", "medium-tempo", "steady", "moderately paced"),
    "fast": ("fast", "quick", "brisk", "up-tempo", "lively"),
}
"""Adjectives per tempo bucket. "Lively" describes speed here, nothing else."""

GENRE_WORDS = {
    "reel": ("reel", "reel", "fiddle reel"),
    "jig": ("jig", "double jig", "jig in six-eight"),
    "hornpipe": ("hornpipe",),
    "slip jig": ("slip jig", "slip jig in nine-eight"),
    "strathspey": ("strathspey", "Scottish strathspey"),
    "clog": ("clog", "clog dance"),
    "highland fling": ("highland fling", "fling"),
    "air": ("air", "slow air", "song air"),
    "folk song": ("folk song", "folk melody", "traditional song"),
    "ballad": ("ballad", "narrative folk ballad"),
    "children's song": ("children's song", "nursery song"),
    "chorale": ("chorale", "four-part chorale", "hymn harmonisation"),
    "mass": ("mass movement", "Renaissance mass", "polyphonic mass setting"),
    "madrigal": ("madrigal", "Italian madrigal", "Renaissance madrigal"),
}
"""Ways to name each genre; "slow air" is an established name of the form, not a tempo claim
(airs are rendered at every tempo like everything else)."""

REGION_ADJ = {
    "Ireland": "Irish",
    "Germany": "German",
    "China": "Chinese",
    "Italy": "Italian",
    "Luxembourg": "Luxembourgish",
    "Lorraine": "Lorraine",
    "Austria": "Austrian",
    "Netherlands": "Dutch",
    "Switzerland": "Swiss",
    "Yugoslavia": "Yugoslav",
    "Poland": "Polish",
    "France": "French",
}

_METRE_WORDS = {
    "2/4": ("2/4", "two-four time", "duple time"),
    "2/2": ("2/2", "cut time", "alla breve"),
    "4/4": ("4/4", "common time", "four-four time"),
    "3/4": ("3/4", "three-four time", "triple time"),
    "6/8": ("6/8", "six-eight time", "compound duple time"),
    "9/8": ("9/8", "nine-eight time", "compound triple time"),
    "3/2": ("3/2", "three-two time"),
    "4/2": ("4/2", "four-two time"),
}


def _one(rng: random.Random, options) -> str:
    return options[rng.randrange(len(options))]


def _cap(text: str) -> str:
    """Upper-case the first letter only (``str.capitalize`` would lower "Palestrina")."""
    return text[:1].upper() + text[1:]


def _a(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def make_captions(tags: dict[str, list[str]], extra: dict[str, Any], *, seed: int, count: int) -> list[str]:
    """``count`` distinct captions for one item.

    Args:
        tags: The item's tags (``genre``, ``instrument``, ``tempo``, ``key``, ``mode``,
            ``metre``, ``region``, ``composer``), one value per category.
        extra: Needs ``bpm`` and ``instrument_synonyms`` (other names of the instrument) and
            ``solo`` (whether one melodic line is played, which makes "solo" true).
        seed: Seeds every choice.
        count: How many captions (3-5 in the corpus).
    """
    rng = random.Random(seed)
    one = {k: v[0] for k, v in tags.items() if v}
    genre_key = one["genre"]
    instrument = one["instrument"]
    bucket = one["tempo"]
    bpm = int(extra["bpm"])
    inst_words = (instrument, *extra.get("instrument_synonyms", ()))
    solo = bool(extra.get("solo"))

    def g() -> str:
        return _one(rng, GENRE_WORDS.get(genre_key, (genre_key,)))

    def ins() -> str:
        return _one(rng, inst_words)

    def tempo() -> str:
        return _one(rng, TEMPO_WORDS[bucket])

    def key() -> str:
        return _one(rng, (f"in {one['key']}", f"in the key of {one['key']}"))

    def key_tag() -> str:
        return _one(rng, (one["key"], f"key of {one['key']}", f"{one['key']} key"))

    sung = instrument == "choir"

    def on() -> str:
        return f"sung by {_one(rng, ('a choir', 'voices', 'a vocal ensemble'))}" if sung else f"played on {ins()}"

    def playing() -> str:
        return "singing" if sung else "playing"

    def bpm_words() -> str:
        return _one(rng, (f"{bpm} bpm", f"at {bpm} beats per minute", f"around {bpm} BPM", f"tempo {bpm}"))

    def origin() -> str:
        if "region" in one and rng.random() < 0.7:
            return REGION_ADJ.get(one["region"], one["region"]) + " "
        return ""

    def by() -> str:
        return f" by {one['composer']}" if "composer" in one and rng.random() < 0.7 else ""

    def metre() -> str:
        return _one(rng, _METRE_WORDS.get(one.get("metre", ""), (one.get("metre", "4/4"),)))

    forms: list[Callable[[], str]] = [
        lambda: f"{_cap(_a(tempo()))} {origin()}{g()}{by()} {on()} {key()}.",
        lambda: f"{_cap(ins())} {playing()} {_a(tempo())} {g()}.",
        lambda: ", ".join(rng.sample([g(), ins(), bpm_words().replace('at ', ''), key_tag(), tempo()], k=rng.randint(2, 4))),
        lambda: _cap(f"{origin()}{g()}{by()}, {'sung by' if sung else 'performed on'} {ins()}, {bpm_words()}."),
        lambda: _cap(_a(one['mode'] + ("-key" if one["mode"] in ("major", "minor") else "-mode")))
        + f" {g()} for {ins()}" + (f" in {metre()}" if rng.random() < 0.5 else ""),
        lambda: f"{'Solo ' + ins() if solo else _cap(ins())} {_one(rng, ('sings', 'performs') if sung else ('plays', 'performs', 'renders'))} {_a(g())}{by()} {bpm_words()}.",
        lambda: f"{_cap(tempo())} {ins()} music" + (f" {key()}" if rng.random() < 0.6 else ""),
        lambda: f"This is {_a(g())} in {metre()}, {key()}, {'sung' if sung else 'played'} at {_a(tempo())} tempo {'by' if sung else 'on'} {ins()}.",
        lambda: _cap(f"{_a(origin() + g())}{by()} {key()}."),
        lambda: f"{_cap(ins())}, {tempo()} tempo" + (f", {bpm} bpm" if rng.random() < 0.5 else ""),
    ]
    captions: list[str] = []
    order = rng.sample(range(len(forms)), len(forms))
    for index in order:
        text = " ".join(forms[index]().split())
        if text not in captions:
            captions.append(text)
        if len(captions) == count:
            break
    return captions
