"""TextSwap (DuET-MC): hard-negative captions made by swapping one genre/mood/instrument word.

For every positive pair ``(audio_i, text_i)`` of a training batch, with probability ``p`` (the
schedule below) the augmenter writes swapped versions of ``text_i`` — each differs from
``text_i`` in exactly one keyword concept of one category (``"a calm piano piece"`` ->
``"a calm harp piece"``) — and each replaces, in audio ``i``'s audio->text row only, one of
the batch's other captions, chosen at random without repetition. How many, ``swaps``:

* ``"per-category"`` (the paper: TextSwap applied once per descriptor category): one swapped
  caption for each category with a swappable keyword in ``text_i``, so at most
  ``len(categories)`` (3) per pair. At DuET-MC's p = 0.15 that is about 0.3 extra captions per
  pair for the text encoder (benchmarks/textswap_cost.py measures it).
* ``"fraction"`` (not in the paper): ``k = max(1, round(fraction * (B - 1)))`` swaps per pair
  (capped by ``max_per_pair``), cycling through the caption's categories in a random order —
  at B = 1024 about a hundred extra text-encoder inputs per swapped pair.

Within a category the swapped keyword and its replacement are drawn uniformly.

The output is an :class:`mtrun.HardNegatives` in ``batch.hard_negatives`` (its docstring is the
contract): ``anchor`` = ``i``, ``replaces`` = the ``j != i`` it replaces in row ``i`` (never
``-1``), ``texts`` = the swapped captions, untokenized (the objective tokenizes them). ``H = 0``
(empty tensors, no texts) when nothing was swapped, so the objective always finds the field in
training. Hard negatives an earlier ``batch`` augmenter wrote (as ``texts``) are kept, this
step's appended after them.

Probability schedule (``context.epoch_float`` = step / steps_per_epoch)::

    p(e) = p_start                                              e <  warmup_epochs
    p(e) = p_start + (p_max - p_start) * (e - warmup) / ramp    warmup <= e < warmup + ramp
    p(e) = p_max                                                afterwards

DuET-MC: 0 -> 15 % over 20 epochs after a 5-epoch warm-up (the defaults).

A swap never introduces a synonym of the replaced word (concepts group synonyms), a concept
the caption already mentions, one of the item's own tags of that category (``batch.tags[i]``),
or a concept related to any of these (``guitar`` / ``acoustic guitar``: one a kind of the
other) — each would make a caption that may still be true of the audio, a false negative. A preceding ``a``/``an`` is corrected
so the swap leaves no grammatical cue. Captions without a dictionary keyword get no hard
negatives.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Sequence

import attrs

from mtrun import AugmentContext, Batch, HardNegatives, Need, non_negative
from mtrun_textswap.dictionary import Match, SwapDictionary

__all__ = ["TextSwap", "swap_probability"]


def _unit_interval(_instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1] (got {value})")


def _fraction(_instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{attribute.name} must be in (0, 1] (got {value})")


def _categories(_instance: object, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    if not value or not all(isinstance(c, str) and c for c in value):
        raise ValueError(f"{attribute.name} must name at least one category")


def swap_probability(epoch: float, *, p_start: float, p_max: float, warmup_epochs: float, ramp_epochs: float) -> float:
    """The per-pair swap probability at fractional ``epoch`` (see the module docstring)."""
    if epoch < warmup_epochs:
        return p_start
    if ramp_epochs <= 0 or epoch >= warmup_epochs + ramp_epochs:
        return p_max
    return p_start + (p_max - p_start) * (epoch - warmup_epochs) / ramp_epochs


_ARTICLE = re.compile(r"(?<!\w)(an?)(\s+)$", re.IGNORECASE)
_CONSONANT_SOUND = ("uk", "uni", "upr", "eu", "one", "use")


def _article_for(word: str) -> str:
    w = word.lower()
    if w[:1].isdigit():
        return "an" if w.startswith(("8", "11", "18")) else "a"
    return "an" if w[:1] in "aeiou" and not w.startswith(_CONSONANT_SOUND) else "a"


def _match_case(template: str, word: str) -> str:
    if len(template) > 1 and template.isupper():
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _merged(previous: Any, hard: HardNegatives) -> HardNegatives:
    """``previous`` (an earlier augmenter's, this step) followed by ``hard``."""
    import torch

    if not isinstance(previous, HardNegatives):
        raise TypeError(f"textswap: batch.hard_negatives must be mtrun.HardNegatives (got {type(previous).__name__})")
    if len(previous) == 0:
        return hard
    if previous.text_inputs is not None or len(previous.texts) != len(previous):
        raise ValueError(
            "textswap: the batch already has tokenized hard_negatives (text_inputs, not texts); "
            "put textswap first among batch augmenters"
        )
    return HardNegatives(
        anchor=torch.cat([previous.anchor.to(torch.long), hard.anchor]),
        replaces=torch.cat([previous.replaces.to(torch.long), hard.replaces]),
        texts=[*previous.texts, *hard.texts],
    )


def _randint(high: int, generator: Any) -> int:
    import torch

    return int(torch.randint(0, high, (), generator=generator))


class TextSwap:
    """``batch``-stage augmenter writing ``batch.hard_negatives`` (see the module docstring).

    Args:
        config: The recipe settings.
    """

    @attrs.frozen
    class Config:
        categories: tuple[str, ...] = attrs.field(
            default=("genre", "mood", "instrument"),
            converter=tuple,
            validator=_categories,
            metadata={"help": "dictionary categories whose keywords are swapped (DuET-MC: genre, mood, instrument)"},
        )
        dictionary: str = attrs.field(
            default="",
            metadata={"help": "optional user dictionary (TOML or JSON): {category: {concept: [synonyms]}} or {category: [terms]}"},
        )
        use_default_dictionary: bool = attrs.field(
            default=True,
            metadata={"help": "start from the shipped dictionary (the user file extends it); false: the user file alone"},
        )
        p_start: float = attrs.field(default=0.0, validator=_unit_interval, metadata={"help": "swap probability per pair during warm-up"})
        p_max: float = attrs.field(default=0.15, validator=_unit_interval, metadata={"help": "swap probability per pair after the ramp (DuET-MC: 0.15)"})
        warmup_epochs: float = attrs.field(default=5.0, validator=non_negative, metadata={"help": "epochs at p_start before the ramp (DuET-MC: 5)"})
        ramp_epochs: float = attrs.field(default=20.0, validator=non_negative, metadata={"help": "epochs of the linear ramp p_start -> p_max (DuET-MC: 20)"})
        swaps: str = attrs.field(
            default="per-category",
            validator=attrs.validators.in_(("per-category", "fraction")),
            metadata={"help": "swapped captions per chosen pair: per-category (the paper: one per descriptor category in the caption) or fraction (fraction x (B-1), not in the paper)"},
        )
        fraction: float = attrs.field(
            default=0.1,
            validator=_fraction,
            metadata={"help": "with swaps = 'fraction': share of a swapped pair's B-1 in-batch negatives replaced by swapped captions (at least one)"},
        )
        max_per_pair: int = attrs.field(
            default=0,
            validator=non_negative,
            metadata={"help": "with swaps = 'fraction': cap on swapped captions per pair (0 = no cap); each costs a text-encoder forward"},
        )

    stage: ClassVar[str] = "batch"
    applies_in_eval: ClassVar[bool] = False
    requires: ClassVar[tuple[Need, ...]] = (
        Need("objective", "hard_negatives", "its swapped captions are negatives that only a hard-negative-aware objective uses"),
    )

    def __init__(self, config: Config):
        self.config = config
        self.dictionary = SwapDictionary.load(
            config.categories, user_file=config.dictionary, use_default=config.use_default_dictionary
        )
        self.last_stats: dict[str, float] = {}

    # ------------------------------------------------------------------ schedule

    def probability(self, epoch: float) -> float:
        """The per-pair swap probability at fractional ``epoch``."""
        c = self.config
        return swap_probability(epoch, p_start=c.p_start, p_max=c.p_max, warmup_epochs=c.warmup_epochs, ramp_epochs=c.ramp_epochs)

    # ------------------------------------------------------------------ swapping

    def swappable(self, text: str, tags: dict[str, list[str]] | None = None) -> dict[str, list[tuple[str, list[str]]]]:
        """Per category: ``(concept in text, its admissible replacements)`` pairs, non-empty only."""
        matches = self.dictionary.find(text)
        present: dict[str, set[str]] = {}
        for m in matches:
            present.setdefault(m.category, set()).add(m.concept)
        out: dict[str, list[tuple[str, list[str]]]] = {}
        for category in self.config.categories:
            own = {
                concept
                for value in (tags or {}).get(category, [])
                if (concept := self.dictionary.concept_of(category, str(value))) is not None
            }
            options = []
            for concept in sorted(present.get(category, ())):
                alternatives = self.dictionary.alternatives(category, concept, exclude=present[category] | own)
                if alternatives:
                    options.append((concept, alternatives))
            if options:
                out[category] = options
        return out

    def swap(self, text: str, category: str, concept: str, replacement_form: str) -> str:
        """``text`` with every form of ``concept`` replaced by ``replacement_form``, keeping
        each occurrence's capitalisation and fixing a preceding ``a``/``an``."""
        spans: list[Match] = [m for m in self.dictionary.find(text) if m.category == category and m.concept == concept]
        for m in reversed(spans):
            word = _match_case(m.text, replacement_form)
            head = text[: m.start]
            article = _ARTICLE.search(head)
            if article is not None:
                fixed = _match_case(article.group(1), _article_for(replacement_form))
                head = head[: article.start(1)] + fixed + article.group(2)
            text = head + word + text[m.end :]
        return text

    def _swaps_for(self, text: str, tags: dict[str, list[str]] | None, k: int | None, generator: Any) -> list[str]:
        """Up to ``k`` distinct swapped captions; ``k = None``: one per swappable category."""
        import torch

        options = self.swappable(text, tags)
        if not options:
            return []
        categories = list(options)
        if k is None:
            k = len(categories)
        categories = [categories[i] for i in torch.randperm(len(categories), generator=generator).tolist()]
        made: list[str] = []
        for t in range(k):
            category = categories[t % len(categories)]
            for _attempt in range(4):  # a few redraws when the swap repeats one already made
                concept, alternatives = options[category][_randint(len(options[category]), generator)]
                # The concept's name, not a random form: forms include plurals and variants
                # ("jigs", "folk music") that would read oddly in place of a singular word.
                new = alternatives[_randint(len(alternatives), generator)]
                swapped = self.swap(text, category, concept, new)
                if swapped not in made and swapped != text:
                    made.append(swapped)
                    break
        return made

    # ------------------------------------------------------------------ the stage

    def __call__(self, batch: Batch, context: AugmentContext) -> Batch:
        """Add this step's hard negatives to ``batch`` (in place; returned for chaining)."""
        import torch

        texts: Sequence[str] = batch["texts"]
        tags = batch.get("tags") or [None] * len(texts)
        n = len(texts)
        p = self.probability(context.epoch_float)
        generator = context.generator
        if generator is None:  # the trainer always passes one; a bare call stays reproducible
            generator = torch.Generator().manual_seed(int(context.step))
        k: int | None = None  # per-category: decided per caption by its categories
        if self.config.swaps == "fraction":
            k = max(1, round(self.config.fraction * (n - 1)))
            if self.config.max_per_pair:
                k = min(k, self.config.max_per_pair)
            k = min(k, n - 1)

        anchors: list[int] = []
        replaces: list[int] = []
        captions: list[str] = []
        swapped_pairs = 0
        if p > 0 and n > 1:
            # All decisions are drawn before any swap consumes numbers: which pairs are swapped
            # depends only on the seed and p, and a larger p only adds pairs.
            chosen = (torch.rand(n, generator=generator) < p).tolist()
            for i in range(n):
                if not chosen[i]:
                    continue
                made = self._swaps_for(texts[i], tags[i], k, generator)[: n - 1]
                if not made:
                    continue
                swapped_pairs += 1
                others = [j for j in range(n) if j != i]
                order = torch.randperm(len(others), generator=generator)[: len(made)].tolist()
                anchors += [i] * len(made)
                replaces += [others[o] for o in order]
                captions += made

        hard = HardNegatives(
            anchor=torch.tensor(anchors, dtype=torch.long),
            replaces=torch.tensor(replaces, dtype=torch.long),
            texts=captions,
        )
        previous = batch.get("hard_negatives")
        if previous is not None:
            hard = _merged(previous, hard)
        batch.hard_negatives = hard
        self.last_stats = {"p": p, "pairs_swapped": float(swapped_pairs), "hard_negatives": float(len(captions))}
        return batch
