"""Augmented view dropout (DuET-MC): a fixed set of partial tag views per item, one per step.

**The views of an item.** From the item's tag categories ``C`` (those named in ``categories``,
or all of its non-empty ones; ``c = |C|``) the augmenter draws ``n_views`` views, once, from a
generator seeded by ``(seed, run seed, item id)`` — so the views are a fixed set per item and
seed, the same in every epoch, worker and rank. View ``v``:

1. draws its number of categories ``k_v`` uniformly from ``[min_categories, max_categories]``
   (clipped to ``[1, c]``; ``max_categories = 0`` means ``c``);
2. keeps the ``k_v`` categories used least often by views ``0 .. v-1`` (ties broken at
   random). This is what *balanced* means, and it is exact: over an item's views every
   category is kept in either ``floor(T / c)`` or ``ceil(T / c)`` views, ``T = sum_v k_v``
   (each view takes the least-used categories, so counts never drift more than 1 apart);
3. keeps, of each kept category, a random non-empty subset of its tags (size uniform in
   ``1 .. min(#tags, max_tags_per_category or #tags)``, in the item's order). So every view
   holds at least one tag of each of its categories and nothing that is not the item's tag;
4. is redrawn (up to 8 times, keeping step 2's rule) when it equals an earlier view, so views
   are distinct whenever the item has enough tags to make them distinct. (The redraw makes
   ``k_v`` less than uniform where few distinct views of that size exist: an item with one
   tag per category has a single all-category view.)

**One view per step.** Each call picks one of the item's views uniformly with
``context.generator``, which the loader seeds per ``(run seed, epoch, item)``: the choice
changes with the epoch and is reproducible.

**Output.** ``output = "caption"`` renders the view (``render = "template"``: a short sentence
from per-category phrases, e.g. "A fast reel played on violin in D major."; ``"plain"``: the
tags joined with commas) and makes it the item's only caption. ``output = "tags"`` replaces
the item's tags with the view and clears its captions, for a later ``tag-to-caption``
augmenter to caption the partial view (its templates, or LLM captions precomputed for every
view with :meth:`ViewDropout.view_samples`); the full tags go to ``extra["full_tags"]``, which
tag-to-caption restores as the item's tags after writing its text. Items without tags in ``C``
pass unchanged.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, ClassVar, Sequence

import attrs

from mtrun import AugmentContext, Sample

__all__ = ["ViewDropout", "render_plain", "render_template"]


def _at_least(minimum: int):
    def check(_instance: object, attribute: attrs.Attribute, value: int) -> None:
        if value < minimum:
            raise ValueError(f"{attribute.name} must be >= {minimum} (got {value})")

    return check


def _join(words: Sequence[str]) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


_TEMPO_ADJECTIVES = {"medium": "medium-tempo", "moderate": "moderate-tempo"}


def render_plain(view: dict[str, list[str]], rng: random.Random, *, shuffle: bool = True) -> str:
    """The view's tags joined with commas (category order shuffled when ``shuffle``)."""
    tags = [t for values in view.values() for t in values]
    if shuffle:
        rng.shuffle(tags)
    return ", ".join(tags)


def render_template(view: dict[str, list[str]], rng: random.Random) -> str:
    """A short sentence naming exactly the view's tags.

    Genre is the noun, mood and tempo adjectives, the other categories phrases ("played on",
    "in", "from", "by"); categories without a phrase of their own appear as "<category> <tags>".
    """
    adjectives: list[str] = []
    for value in view.get("mood", []):
        adjectives.append(value)
    tempo_phrase = ""
    for value in view.get("tempo", []):
        if any(ch.isdigit() for ch in value):
            tempo_phrase = f"at {value}"
        else:
            adjectives.append(_TEMPO_ADJECTIVES.get(value, value))
    genre = view.get("genre", [])
    phrases: list[str] = []
    if view.get("instrument"):
        phrases.append(rng.choice(("played on", "featuring", "with")) + " " + _join(view["instrument"]))
    if view.get("key"):
        phrases.append("in " + _join(view["key"]))
    if view.get("mode"):
        modes = view["mode"]
        phrases.append(f"in a {_join(modes)} key" if set(modes) <= {"major", "minor"} else f"in the {_join(modes)} mode")
    if view.get("metre"):
        phrases.append(f"in {_join(view['metre'])} time")
    if tempo_phrase:
        phrases.append(tempo_phrase)
    for category, prefix in (("region", "from"), ("composer", "by"), ("collection", "from")):
        if view.get(category):
            phrases.append(f"{prefix} {_join(view[category])}")
    known = {"mood", "tempo", "genre", "instrument", "key", "mode", "metre", "region", "composer", "collection"}
    for category, values in view.items():
        if category not in known and values:
            phrases.append(f"{category} {_join(values)}")
    if rng.random() < 0.5:  # "A fast reel played on violin, in D major."
        head = " ".join([*adjectives, _join(genre) if genre else rng.choice(("piece", "track", "tune"))])
        text = _article(head) + (" " + ", ".join(phrases) if phrases else "") + "."
    else:  # "Fast reel music, played on violin, in D major"
        head = " ".join([*adjectives, *([_join(genre)] if genre else []), "music"])
        text = head + (", " + ", ".join(phrases) if phrases else "")
    return text[:1].upper() + text[1:]


class ViewDropout:
    """``sample``-stage augmenter: one of the item's ``n_views`` fixed partial views per step.

    Args:
        config: The recipe settings.
        run: The run (injected); its seed joins ``config.seed`` in the views' seed, so another
            run seed gives other views. Optional: without it the run seed counts as 0.
    """

    @attrs.frozen
    class Config:
        n_views: int = attrs.field(default=10, validator=_at_least(1), metadata={"help": "partial views per item (DuET-MC: 10)"})
        categories: tuple[str, ...] = attrs.field(
            default=(),
            converter=tuple,
            metadata={"help": "tag categories views draw from (DuET-MC: genre, mood, instrument); empty = all of the item's categories"},
        )
        min_categories: int = attrs.field(default=1, validator=_at_least(1), metadata={"help": "fewest categories a view keeps"})
        max_categories: int = attrs.field(
            default=0, validator=_at_least(0), metadata={"help": "most categories a view keeps (0 = all of the item's)"}
        )
        max_tags_per_category: int = attrs.field(
            default=0, validator=_at_least(0), metadata={"help": "most tags a view keeps per category (0 = no limit)"}
        )
        output: str = attrs.field(
            default="caption",
            validator=attrs.validators.in_(("caption", "tags")),
            metadata={"help": "caption: the rendered view becomes the item's caption; tags: the view replaces the item's tags (for tag-to-caption)"},
        )
        render: str = attrs.field(
            default="template",
            validator=attrs.validators.in_(("template", "plain")),
            metadata={"help": "how output=caption renders a view: template sentences or plain comma-joined tags"},
        )
        shuffle: bool = attrs.field(default=True, metadata={"help": "plain rendering: shuffle the tags' order (fixed per view)"})
        seed: int = attrs.field(default=0, metadata={"help": "seed of the views (with the run seed and the item id)"})

        def __attrs_post_init__(self) -> None:
            if self.max_categories and self.max_categories < self.min_categories:
                raise ValueError(f"max_categories ({self.max_categories}) < min_categories ({self.min_categories})")

    stage: ClassVar[str] = "sample"
    applies_in_eval: ClassVar[bool] = False

    def __init__(self, config: Config, *, run: Any = None):
        self.config = config
        # Only the integer travels to DataLoader workers, not the run object.
        self.run_seed = int(getattr(getattr(run, "config", None), "seed", 0) or 0)
        # The views depend only on the seeds, the id and the tags: draw them once per item
        # rather than at every step (per process; a worker fills its own).
        self._drawn: dict[tuple, list[tuple[dict[str, list[str]], str]]] = {}

    # ------------------------------------------------------------------ views

    def _rng(self, item_id: str, purpose: str) -> random.Random:
        key = repr(("view-dropout", purpose, self.config.seed, self.run_seed, str(item_id)))
        return random.Random(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little"))

    def _categories(self, tags: dict[str, list[str]]) -> list[str]:
        wanted = self.config.categories or tuple(tags)
        return [c for c in wanted if tags.get(c)]

    def views(self, sample: Sample) -> list[dict[str, list[str]]]:
        """The item's views in order (see the module docstring); ``[]`` when it has no tags in scope."""
        return [{c: list(v) for c, v in view.items()} for view, _ in self._draw(sample)]

    def captions(self, sample: Sample) -> list[str]:
        """The rendered caption of each view (what ``output = "caption"`` uses)."""
        return [caption for _, caption in self._draw(sample)]

    def _draw(self, sample: Sample) -> list[tuple[dict[str, list[str]], str]]:
        key = (str(sample.id), tuple((c, tuple(map(str, v))) for c, v in sample.tags.items()))
        drawn = self._drawn.get(key)
        if drawn is None:
            drawn = self._drawn[key] = self._draw_views(sample)
        return drawn

    def _draw_views(self, sample: Sample) -> list[tuple[dict[str, list[str]], str]]:
        cfg = self.config
        tags = {c: list(dict.fromkeys(str(t) for t in v)) for c, v in sample.tags.items() if v}
        cats = self._categories(tags)
        if not cats:
            return []
        # Separate streams, so the rendering settings cannot change which views are drawn.
        rng, render_rng = self._rng(sample.id, "views"), self._rng(sample.id, "render")
        c = len(cats)
        low = min(cfg.min_categories, c)
        high = max(low, min(cfg.max_categories or c, c))
        usage = {cat: 0 for cat in cats}
        out: list[tuple[dict[str, list[str]], str]] = []
        seen: list[dict[str, list[str]]] = []
        for _ in range(cfg.n_views):
            for _attempt in range(8):
                k = rng.randint(low, high)
                ranked = sorted(cats, key=lambda cat: (usage[cat], rng.random()))
                chosen = set(ranked[:k])
                view = {}
                for cat in cats:
                    if cat not in chosen:
                        continue
                    values = tags[cat]
                    cap = min(len(values), cfg.max_tags_per_category or len(values))
                    keep = set(rng.sample(range(len(values)), rng.randint(1, cap)))
                    view[cat] = [v for i, v in enumerate(values) if i in keep]
                if view not in seen:
                    break
            for cat in view:
                usage[cat] += 1
            seen.append(view)
            if cfg.render == "template":
                caption = render_template(view, render_rng)
            else:
                caption = render_plain(view, render_rng, shuffle=cfg.shuffle)
            out.append((view, caption))
        return out

    def view_samples(self, sample: Sample) -> list[Sample]:
        """One sample per view, as this augmenter would emit it: for precomputing LLM captions
        of every view with tag-to-caption's ``prepare``."""
        return [self._emit(sample, view, caption) for view, caption in self._draw(sample)] or [sample]

    def _emit(self, sample: Sample, view: dict[str, list[str]], caption: str) -> Sample:
        # A new Sample: the dataset's own object must stay intact for later epochs.
        if self.config.output == "tags":
            # The item's full tags travel in extra["full_tags"]; tag-to-caption puts them back
            # once it has written the view's text, so batch.tags (TextSwap's guard against
            # false negatives) still lists everything the audio has.
            extra = {**sample.extra, "full_tags": sample.extra.get("full_tags", sample.tags)}
            return attrs.evolve(sample, tags={c: list(v) for c, v in view.items()}, captions=[], extra=extra)
        return attrs.evolve(sample, captions=[caption])

    # ------------------------------------------------------------------ the stage

    def __call__(self, sample: Sample, context: AugmentContext) -> Sample:
        """The sample with one of its views (chosen with ``context.generator``) as its text."""
        import torch

        drawn = self._draw(sample)
        if not drawn:
            return sample
        pick = int(torch.randint(0, len(drawn), (), generator=context.generator))
        view, caption = drawn[pick]
        return self._emit(sample, view, caption)
