"""Tag-to-caption (DuET-MC): for each pair, a caption (``p_cap``) or the tags as the text.

Per call (one item, in a DataLoader worker, with the loader's per-``(seed, epoch, item)``
generator), with probability ``p_cap`` the item's text is a *caption*: its own caption when it
has one and ``use_original`` is on, otherwise a caption written from its tags; with
probability ``1 - p_cap`` it is its *tags*, joined with commas. The result is the item's only
caption, so the loader pairs it with the audio.

**Where captions come from.** With ``lm_path`` empty: templates (:mod:`.templates`: several
frames, a random subset of the categories, synonyms), drawn afresh each epoch. With
``lm_path`` set to a local causal-LM folder: the LLM caption of the item's tags, read from the
disk cache (:mod:`.cache`). Generating with a large LM inside DataLoader workers would load it
once per worker and stall training, so generation is a separate, explicit step:

1. ``TagToCaption(config).prepare(samples)`` (or ``prepare_captions(config, samples)``) loads
   the model once, generates in batches with a progress bar for every distinct tag set of
   ``samples`` that is not cached yet, and appends each batch to the cache (an interrupted run
   keeps its progress; a second run generates nothing and never loads the model). With view
   dropout upstream (``output = "tags"``), pass every view:
   ``[v for s in samples for v in view_dropout.view_samples(s)]``.
2. Training reads the cache (each worker loads the JSONL once, and re-reads it when it grew).
   An item whose caption is missing gets a template caption instead and is counted; a warning
   with the count is logged at the 1st, 10th, 100th, ... miss of each process, naming the
   cache and the fix (run ``prepare``). Empty LM outputs are cached (so they are not
   regenerated) and treated like misses.

**After view dropout.** A view-dropout stage with ``output = "tags"`` narrows ``sample.tags``
to a partial view and keeps the full set in ``sample.extra["full_tags"]``; this stage writes
the text from the view and then restores the full tags, so ``batch.tags`` lists everything the
audio has.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Sequence

import attrs

from mtrun import AugmentContext, MtrunError, positive, Sample, unit_interval
from mtrun_tag_to_caption.cache import CaptionCache, caption_key, canonical_tags, default_cache_dir, lm_identity
from mtrun_tag_to_caption.settings import generation_settings
from mtrun_tag_to_caption.templates import render_caption

__all__ = ["DEFAULT_PROMPT", "TagToCaption", "clean_caption", "format_tags"]

_log = logging.getLogger("mtrun.tag_to_caption")

DEFAULT_PROMPT = (
    "Write a one-sentence description of a piece of music that has these tags. "
    "Mention only what the tags say.\nTags: {tags}\nDescription:"
)


def format_tags(tags: dict[str, list[str]]) -> str:
    """``genre: reel; instrument: fiddle, flute`` (categories and values in canonical order)."""
    return "; ".join(f"{c}: {', '.join(v)}" for c, v in canonical_tags(tags).items())


def _has_tags_slot(_instance: object, attribute: attrs.Attribute, value: str) -> None:
    if "{tags}" not in value:
        raise ValueError(f"{attribute.name} must contain the placeholder {{tags}}")


def clean_caption(text: str) -> str:
    """The caption in an LLM's raw output: its first non-empty line, whitespace collapsed,
    surrounding quotes and backticks stripped ("" when there is none)."""
    for line in text.splitlines():
        line = " ".join(line.split()).strip("\"'` ")
        if line:
            return line
    return ""


class TagToCaption:
    """``sample``-stage augmenter: caption (template or cached LLM) vs tags, per pair.

    Args:
        config: The recipe settings.
    """

    @attrs.frozen
    class Config:
        p_cap: float = attrs.field(
            default=0.5,
            validator=unit_interval,
            metadata={"help": "probability that a pair's text is a caption rather than its joined tags (DuET-MC's p_cap)"},
        )
        use_original: bool = attrs.field(
            default=True, metadata={"help": "when a caption is chosen and the item has its own caption(s), use them"}
        )
        lm_path: str = attrs.field(
            default="",
            metadata={"help": "local folder of a causal LM (save_pretrained layout) for LLM captions; empty = templates"},
        )
        prompt: str = attrs.field(
            default=DEFAULT_PROMPT,
            validator=_has_tags_slot,
            metadata={"help": "LLM prompt; {tags} becomes 'category: tag, tag; ...'"},
        )
        use_chat_template: bool = attrs.field(
            default=True, metadata={"help": "wrap the prompt in the tokenizer's chat template when it has one"}
        )
        cache_dir: str = attrs.field(
            default="", metadata={"help": "caption cache folder; empty = $MTRUN_CACHE/captions or ~/.cache/mtrun/captions"}
        )
        max_new_tokens: int = attrs.field(default=60, validator=positive, metadata={"help": "LLM tokens generated per caption"})
        do_sample: bool = attrs.field(default=False, metadata={"help": "sample (temperature, top_p) instead of greedy decoding"})
        temperature: float = attrs.field(default=0.7, validator=positive, metadata={"help": "sampling temperature"})
        top_p: float = attrs.field(default=0.9, validator=unit_interval, metadata={"help": "nucleus sampling mass"})
        seed: int = attrs.field(default=0, metadata={"help": "seed of sampled generation"})
        batch_size: int = attrs.field(default=8, validator=positive, metadata={"help": "prompts per generate() call in prepare"})
        template_keep: float = attrs.field(
            default=0.8,
            validator=unit_interval,
            metadata={"help": "templates: probability each tag category is mentioned (one always is)"},
        )
        synonyms: bool = attrs.field(default=True, metadata={"help": "templates: use synonyms of tag words half the time"})
        shuffle_tags: bool = attrs.field(default=False, metadata={"help": "tags text: shuffle the tags' order per pair"})

    stage: ClassVar[str] = "sample"
    applies_in_eval: ClassVar[bool] = False

    def __init__(self, config: Config):
        self.config = config
        self.lm_path: Path | None = None
        if config.lm_path:
            path = Path(config.lm_path).expanduser()
            if not path.is_dir() or not (path / "config.json").is_file():
                raise MtrunError(
                    f"tag-to-caption: lm_path {config.lm_path!r} is not a local model folder (no config.json there); "
                    "pass a folder holding a causal LM saved with save_pretrained — hub names are not downloaded"
                )
            self.lm_path = path.resolve()
        self.cache = CaptionCache(Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir())
        self._identity: str | None = None
        self.counts: Counter[str] = Counter()

    # ------------------------------------------------------------------ keys

    def generation_settings(self) -> dict[str, Any]:
        """What besides the model and the tags decides an LLM caption (part of the cache key)."""
        return generation_settings(self.config)

    def key(self, tags: dict[str, list[str]]) -> str:
        """The cache key of the LLM caption of ``tags`` for this model and these settings."""
        if self.lm_path is None:
            raise MtrunError("tag-to-caption: no lm_path configured, so there are no LLM captions")
        if self._identity is None:
            self._identity = lm_identity(self.lm_path)
        return caption_key(self._identity, self.generation_settings(), tags)

    def cached_caption(self, tags: dict[str, list[str]]) -> str | None:
        """The LLM caption of ``tags`` from the cache (None when missing or empty)."""
        return self.cache.get(self.key(tags)) or None

    # ------------------------------------------------------------------ the stage

    def __call__(self, sample: Sample, context: AugmentContext) -> Sample:
        """The sample with its text for this step as its only caption (a new Sample)."""
        import torch

        seed = int(torch.randint(0, 2**62, (), generator=context.generator))
        rng = random.Random(seed)
        tags = {c: [str(t) for t in v] for c, v in sample.tags.items() if v}
        if rng.random() < self.config.p_cap:
            if self.config.use_original and sample.captions:
                self.counts["original"] += 1
                return _restore_full_tags(sample)  # the loader picks one of its captions
            if not tags:
                return _restore_full_tags(sample)
            text = self._caption(tags, rng)
        else:
            if not tags:
                self.counts["original"] += 1
                return _restore_full_tags(sample)  # no tags to use: keep what the item has
            words = [t for values in tags.values() for t in values]
            if self.config.shuffle_tags:
                rng.shuffle(words)
            text = ", ".join(words)
            self.counts["tags"] += 1
        return _restore_full_tags(attrs.evolve(sample, captions=[text]))

    def _caption(self, tags: dict[str, list[str]], rng: random.Random) -> str:
        if self.lm_path is not None:
            hit = self.cached_caption(tags)
            if hit is not None:
                self.counts["lm"] += 1
                return hit
            self.counts["missing"] += 1
            missing = self.counts["missing"]
            if str(missing).rstrip("0") == "1":  # the 1st, 10th, 100th, ... miss: counted, not flooding
                _log.warning(
                    "tag-to-caption: %d item(s) in this process had no LLM caption in %s; used templates instead. "
                    "Run TagToCaption.prepare(samples) (mtrun_tag_to_caption.prepare_captions) before training.",
                    missing,
                    self.cache.path,
                )
        self.counts["template"] += 1
        return render_caption(tags, rng, keep=self.config.template_keep, synonyms=self.config.synonyms)

    # ------------------------------------------------------------------ generation

    def prepare(self, samples: Sequence[Sample], *, progress: bool = True, device: str | None = None) -> dict[str, int]:
        """Generate and cache the LLM captions of every distinct tag set in ``samples``.

        Loads the model only when something is missing. Safe to run again (and from several
        processes): cached tag sets are skipped.

        Args:
            samples: Items (or views of items) whose tags need captions.
            progress: Show a progress bar.
            device: Where to run the model; default CUDA when available, else CPU.

        Returns:
            Counts: ``items``, ``unique`` tag sets, ``cached`` (already there), ``generated``,
            ``empty`` (generated but empty after cleaning).
        """
        if self.lm_path is None:
            raise MtrunError("tag-to-caption: prepare() needs lm_path (a local causal LM folder)")
        todo: dict[str, dict[str, list[str]]] = {}
        unique: set[str] = set()
        n_items = 0
        for sample in samples:
            tags = canonical_tags(sample.tags)
            if not tags:
                continue
            n_items += 1
            key = self.key(tags)
            unique.add(key)
            if key not in todo and key not in self.cache:
                todo[key] = tags
        stats = {"items": n_items, "unique": len(unique), "cached": len(unique) - len(todo), "generated": 0, "empty": 0}
        if not todo:
            return stats

        from mtrun_tag_to_caption.generate import CaptionWriter

        writer = CaptionWriter(self.lm_path, self.config, device=device)
        items = list(todo.items())
        bar = _progress(len(items), progress)
        try:
            for start in range(0, len(items), self.config.batch_size):
                chunk = items[start : start + self.config.batch_size]
                prompts = [self.config.prompt.replace("{tags}", format_tags(tags)) for _, tags in chunk]
                outputs = [clean_caption(text) for text in writer.generate(prompts)]
                self.cache.add(
                    {"key": key, "caption": caption, "tags": tags, "lm": str(self.lm_path)}
                    for (key, tags), caption in zip(chunk, outputs)
                )
                stats["generated"] += len(chunk)
                stats["empty"] += sum(1 for caption in outputs if not caption)
                bar.update(len(chunk))
        finally:
            bar.close()
        return stats


def _restore_full_tags(sample: Sample) -> Sample:
    """Put back the tags an upstream view dropout (``output = "tags"``) narrowed to a view.

    The text is written from the view; everything after this stage (``batch.tags``, TextSwap's
    guard against swapping in a tag the audio has) should see all of the item's tags.
    """
    if "full_tags" not in sample.extra:
        return sample
    extra = dict(sample.extra)
    return attrs.evolve(sample, tags=extra.pop("full_tags"), extra=extra)


def _progress(total: int, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers

        class _Silent:
            def update(self, n: int) -> None: ...

            def close(self) -> None: ...

        return _Silent()
    return tqdm(total=total, disable=not enabled, desc="tag-to-caption", unit="caption")
