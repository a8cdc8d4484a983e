"""Template captions from tags: several sentence frames, a random subset of the categories, and
synonyms, so templated text does not collapse to one fixed pattern a model could match.

Everything a template says comes from the item's tags (or a synonym of one of them): no
category is invented. Categories without a phrase of their own appear as "<category> <tags>".
"""

from __future__ import annotations

import random
from typing import Callable

__all__ = ["SYNONYMS", "TEMPO_WORDS", "render_caption"]

SYNONYMS: dict[str, tuple[str, ...]] = {
    # demo corpus instruments (the words its own captions use) and common ones
    "piano": ("grand piano", "acoustic piano"),
    "harpsichord": ("cembalo",),
    "vibraphone": ("vibes",),
    "organ": ("church organ", "pipe organ"),
    "accordion": ("squeezebox",),
    "acoustic guitar": ("nylon-string guitar", "classical guitar"),
    "harp": ("concert harp",),
    "strings": ("string ensemble", "string section"),
    "choir": ("chorus", "vocal ensemble"),
    "violin": ("fiddle",),
    "cello": ("violoncello",),
    "flute": ("concert flute",),
    "drums": ("drum kit", "drum set"),
    "synthesizer": ("synth",),
    "saxophone": ("sax",),
    "electric guitar": ("electric guitars",),
    "bass": ("bass guitar",),
    "vocals": ("singing", "voice"),
    # genres
    "jig": ("double jig",),
    "folk song": ("folk melody", "traditional song"),
    "children's song": ("nursery song",),
    "chorale": ("four-part chorale",),
    "madrigal": ("Renaissance madrigal",),
    "hip hop": ("hip-hop",),
    "electronic": ("electronica",),
    "classical": ("classical music",),
    # moods
    "happy": ("cheerful", "joyful"),
    "sad": ("melancholic", "sorrowful"),
    "calm": ("peaceful", "relaxing", "serene"),
    "energetic": ("lively", "driving"),
    "dark": ("ominous", "gloomy"),
}
"""Other words for a tag value (lower-case keys); a template uses one of them half the time."""

TEMPO_WORDS: dict[str, tuple[str, ...]] = {
    "slow": ("slow", "unhurried", "leisurely"),
    "medium": ("moderate", "medium-tempo", "steady"),
    "fast": ("fast", "quick", "brisk", "up-tempo"),
}
"""Adjectives for the demo corpus's tempo buckets."""


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _a(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def render_caption(tags: dict[str, list[str]], rng: random.Random, *, keep: float = 0.8, synonyms: bool = True) -> str:
    """One caption for ``tags``.

    Args:
        tags: Tags by category.
        rng: Every choice (categories kept, words, frame).
        keep: Probability that each category is mentioned (at least one always is), so
            captions describe partial tag sets.
        synonyms: Use :data:`SYNONYMS` / :data:`TEMPO_WORDS` half the time.

    Returns:
        A caption naming only the kept tags (or their synonyms); ``""`` for no tags.
    """
    cats = [c for c, v in tags.items() if v]
    if not cats:
        return ""
    kept = [c for c in cats if rng.random() < keep] or [rng.choice(cats)]
    view = {c: list(dict.fromkeys(str(t) for t in tags[c])) for c in kept}

    def word(value: str) -> str:
        options = SYNONYMS.get(value.lower(), ())
        return rng.choice(options) if synonyms and options and rng.random() < 0.5 else value

    adjectives = [word(m) for m in view.get("mood", [])]
    extra: list[str] = []
    for value in view.get("tempo", []):
        if any(ch.isdigit() for ch in value):
            extra.append(f"at {value}")
        elif value.lower() in TEMPO_WORDS:
            adjectives.append(rng.choice(TEMPO_WORDS[value.lower()]) if synonyms else value)
        else:
            adjectives.append(value)
    genres = [word(g) for g in view.get("genre", [])]
    instruments = [word(i) for i in view.get("instrument", [])]
    phrases: list[str] = []
    if view.get("key"):
        phrases.append(rng.choice(("in {}", "in the key of {}")).format(_join(view["key"])))
    if view.get("mode"):
        modes = view["mode"]
        phrases.append(f"in a {_join(modes)} key" if set(m.lower() for m in modes) <= {"major", "minor"} else f"in the {_join(modes)} mode")
    if view.get("metre"):
        phrases.append(f"in {_join(view['metre'])} time")
    phrases += extra
    for category, prefix in (("region", "from"), ("composer", "by"), ("collection", "from")):
        if view.get(category):
            phrases.append(f"{prefix} {_join(view[category])}")
    known = {"mood", "tempo", "genre", "instrument", "key", "mode", "metre", "region", "composer", "collection"}
    phrases += [f"{c} {_join(v)}" for c, v in view.items() if c not in known]
    rng.shuffle(phrases)

    noun = _join(genres) if genres else rng.choice(("piece", "track", "tune", "recording"))
    head = " ".join([*adjectives, noun])
    tail = (" " + ", ".join(phrases)) if phrases else ""
    on = f" {rng.choice(('played on', 'performed on', 'featuring', 'with'))} {_join(instruments)}" if instruments else ""

    frames: list[Callable[[], str]] = [
        lambda: f"{_cap(_a(head))}{on}{tail}.",
        lambda: f"This is {_a(head)}{on}{tail}.",
        lambda: f"{_cap(' '.join([*adjectives, *([_join(genres)] if genres else []), 'music']))}{on}{',' + tail if tail else ''}",
    ]
    if instruments:
        frames.append(lambda: f"{_cap(_join(instruments))} playing {_a(head)}{tail}.")
    return " ".join(rng.choice(frames)().split())
