"""The swap dictionary: categories of concepts, each concept a set of synonymous surface forms.

A *concept* (``violin``) is what a swap changes; its *forms* (``violin``, ``fiddle``) are the
words a caption may use for it. Swapping replaces every form of one concept in a caption by a
form of another concept of the same category, so synonyms are never swapped for each other
(that would make a false negative). Two concepts are also *related*, and never swapped for each
other, when a form of one contains all the words of a form of the other (``guitar`` and
``acoustic guitar``, ``jig`` and ``slip jig``): one names a kind of the other.

Files are TOML or JSON (by suffix), one entry per category: a table of
``concept = [forms]``, or a plain list of terms (concepts without synonyms)::

    mood = ["happy", "sad"]                      # two concepts, one form each
    [genre]
    "hip hop" = ["hip hop", "hip-hop", "rap"]    # a concept and its synonyms
    shoegaze = ["shoegaze"]

Concept names and forms are matched case-insensitively on word boundaries; a multi-word form
matches any whitespace between its words.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from mtrun import MtrunError

__all__ = ["DEFAULT_DICTIONARY", "Match", "SwapDictionary", "load_dictionary_file"]

DEFAULT_DICTIONARY = "default_dictionary.toml"
"""Package-data file shipped with the plugin."""

_WORD = re.compile(r"[a-z0-9]+")


def _words(form: str) -> frozenset[str]:
    return frozenset(_WORD.findall(form.lower()))


def _normalise(form: str) -> str:
    return " ".join(form.lower().split())


class Match:
    """A keyword found in a caption: its span, category and concept."""

    __slots__ = ("start", "end", "category", "concept", "text")

    def __init__(self, start: int, end: int, category: str, concept: str, text: str):
        self.start, self.end, self.category, self.concept, self.text = start, end, category, concept, text

    def __repr__(self) -> str:
        return f"Match({self.text!r} {self.category}/{self.concept} @{self.start})"


def _read(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        return json.loads(text)
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads(text)


def load_dictionary_file(path: str | Path) -> dict[str, dict[str, list[str]]]:
    """Read a TOML or JSON dictionary into ``{category: {concept: [forms]}}``.

    Raises:
        MtrunError: The file is missing, unparsable, or not shaped as described in the module
            docstring; the message names the file and the offending entry.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MtrunError(f"textswap: dictionary file {str(path)!r} does not exist")
    try:
        raw = _read(path)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise MtrunError(f"textswap: cannot read dictionary {str(path)!r}: {type(exc).__name__}: {exc}") from None
    return _coerce(raw, str(path))


def _coerce(raw: Any, where: str) -> dict[str, dict[str, list[str]]]:
    if not isinstance(raw, Mapping):
        raise MtrunError(f"textswap: {where}: expected a table of categories")
    out: dict[str, dict[str, list[str]]] = {}
    for category, entries in raw.items():
        concepts: dict[str, list[str]] = {}
        if isinstance(entries, Mapping):
            items: Iterable[tuple[Any, Any]] = entries.items()
        elif isinstance(entries, list):
            items = ((e, [e]) for e in entries)
        else:
            raise MtrunError(f"textswap: {where}: [{category}] must be a table of concept = [forms] or a list of terms")
        for concept, forms in items:
            if isinstance(forms, str):
                forms = [forms]
            if not isinstance(concept, str) or not isinstance(forms, list) or not all(isinstance(f, str) and f.strip() for f in forms):
                raise MtrunError(f"textswap: {where}: [{category}].{concept!r} must be a list of non-empty strings")
            name = _normalise(concept)
            concepts[name] = list(dict.fromkeys([name, *(_normalise(f) for f in forms)]))
        out[str(category)] = concepts
    return out


def _merge(base: dict[str, dict[str, list[str]]], extra: dict[str, dict[str, list[str]]]) -> dict[str, dict[str, list[str]]]:
    merged = {c: {k: list(v) for k, v in concepts.items()} for c, concepts in base.items()}
    for category, concepts in extra.items():
        target = merged.setdefault(category, {})
        for concept, forms in concepts.items():
            target[concept] = list(dict.fromkeys([*target.get(concept, []), *forms]))
    return merged


class SwapDictionary:
    """Concepts by category, with a matcher for captions.

    Args:
        table: ``{category: {concept: [forms]}}``.
        categories: The categories to match and swap; others are ignored.
    """

    def __init__(self, table: Mapping[str, Mapping[str, list[str]]], categories: Iterable[str]):
        self.categories = tuple(categories)
        self.concepts: dict[str, dict[str, tuple[str, ...]]] = {
            c: {k: tuple(v) for k, v in table.get(c, {}).items()} for c in self.categories
        }
        self._lookup: dict[str, tuple[str, str]] = {}
        for category in self.categories:
            for concept, forms in self.concepts[category].items():
                for form in forms:
                    self._lookup.setdefault(form, (category, concept))
        forms = sorted(self._lookup, key=lambda f: (-len(f), f))
        # Longest form first, so "acoustic guitar" wins over "guitar" at the same position.
        pattern = "|".join(re.escape(f).replace(r"\ ", r"\s+") for f in forms) or r"(?!x)x"
        self._pattern = re.compile(rf"(?<!\w)(?:{pattern})(?!\w)", re.IGNORECASE)
        self._related = {c: self._relations(self.concepts[c]) for c in self.categories}

    @classmethod
    def load(cls, categories: Iterable[str], *, user_file: str = "", use_default: bool = True) -> SwapDictionary:
        """The shipped default dictionary, extended (or replaced) by a user file."""
        table: dict[str, dict[str, list[str]]] = {}
        if use_default:
            text = resources.files("mtrun_textswap").joinpath(DEFAULT_DICTIONARY).read_text(encoding="utf-8")
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            table = _coerce(tomllib.loads(text), DEFAULT_DICTIONARY)
        if user_file:
            table = _merge(table, load_dictionary_file(user_file))
        categories = tuple(categories)
        if not any(table.get(c) for c in categories):
            # Nothing to swap would make TextSwap a silent no-op for the whole run.
            raise MtrunError(
                f"textswap: no concepts for any of the categories {list(categories)} "
                f"(the dictionary has: {', '.join(sorted(table)) or 'nothing'}"
                f"{'' if use_default else '; use_default_dictionary = false'}"
                f"{f', dictionary = {user_file!r}' if user_file else ''})"
            )
        return cls(table, categories)

    @staticmethod
    def _relations(concepts: Mapping[str, tuple[str, ...]]) -> dict[str, frozenset[str]]:
        words = {k: [_words(f) for f in forms] for k, forms in concepts.items()}
        related: dict[str, set[str]] = {k: set() for k in concepts}
        names = list(concepts)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if any(x <= y or y <= x for x in words[a] for y in words[b]):
                    related[a].add(b)
                    related[b].add(a)
        return {k: frozenset(v) for k, v in related.items()}

    def concept_of(self, category: str, term: str) -> str | None:
        """The concept of ``term`` in ``category``, or None when the dictionary lacks it."""
        hit = self._lookup.get(_normalise(term))
        return hit[1] if hit is not None and hit[0] == category else None

    def find(self, text: str) -> list[Match]:
        """Non-overlapping keyword matches in ``text``, left to right."""
        out = []
        for m in self._pattern.finditer(text):
            category, concept = self._lookup[_normalise(m.group(0))]
            out.append(Match(m.start(), m.end(), category, concept, m.group(0)))
        return out

    def alternatives(self, category: str, concept: str, exclude: Iterable[str] = ()) -> list[str]:
        """Concepts ``concept`` may be swapped for: same category, neither ``concept`` nor one
        of ``exclude`` nor related to any of them (one a kind of the other); in dictionary order."""
        related = self._related[category]
        banned = {concept, *exclude}
        banned |= {r for k in tuple(banned) for r in related.get(k, ())}
        return [k for k in self.concepts[category] if k not in banned]

    def forms(self, category: str, concept: str) -> tuple[str, ...]:
        return self.concepts[category][concept]
