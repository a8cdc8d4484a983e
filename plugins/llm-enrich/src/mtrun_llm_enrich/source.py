"""``llm-enriched``: any data source's items plus LLM-rewritten captions as extra pairs.

FLAP enriches its training text with an LLM: the model sees a clip's original caption and the
labels detected in its audio and writes a richer caption, and each rewrite is *added* as a new
training pair next to the original one. Here the labels are the item's tags (the demo corpus'
genre/instrument/tempo/..., a dataset's tag columns, or the output of an audio tagger written
into a manifest).

The items come from another data source, chosen and configured in the nested table
``[data.base]`` (``type = "manifest"`` with its ``path``, ``type = "audiocaps"``, ...; the demo
corpus when the table is left out). This source builds it through the public
:class:`~mtrun.DataSource` protocol (``splits()``, ``load(split)``) and returns its items
unchanged, with the extra pairs appended to the enriched splits (``train`` only by default;
evaluation splits are refused).

Generation runs once, on first use, in the process that builds the source: every distinct
(caption, tags) prompt missing from the disk cache is generated in batches and appended to the
cache, so a rerun (or a later run with the same model and prompt) generates nothing. The cache
is tag-to-caption's JSONL cache (``flock``-ed appends, keys covering the model's identity, the
prompt and generation settings, the tags and the caption).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, ClassVar, Sequence

import attrs

from mtrun import component_field, ComponentSpec, MtrunError, positive, Run, Sample, SplitSource, unit_interval
from mtrun_tag_to_caption.settings import generation_settings

__all__ = ["DEFAULT_PROMPT", "LLMEnriched", "default_cache_dir", "enrichment_key"]

_log = logging.getLogger("mtrun.llm_enrich")

DEFAULT_PROMPT = (
    "Rewrite the description of a piece of music into one richer, fluent sentence. "
    "Use the detected labels; do not invent anything else.\n"
    "Description: {caption}\nLabels: {tags}\nRicher description:"
)
"""``{caption}`` is the original caption, ``{tags}`` the labels as ``category: tag, tag; ...``."""

EVAL_SPLITS = ("val", "test")


def default_cache_dir() -> Path:
    """``$MTRUN_CACHE/enriched-captions``, else ``~/.cache/mtrun/enriched-captions``."""
    from mtrun import cache_root

    return cache_root() / "enriched-captions"


def enrichment_key(identity: str, generation: dict[str, Any], caption: str, tags: dict[str, list[str]]) -> str:
    """Cache key of one rewrite: model identity, prompt + generation settings, caption, tags."""
    from mtrun_tag_to_caption.cache import canonical_tags

    payload = json.dumps([identity, generation, caption, canonical_tags(tags)], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def _has_caption_slot(_instance: object, _attribute: attrs.Attribute, value: str) -> None:
    if "{caption}" not in value:
        raise ValueError("the prompt must contain '{caption}' (the original caption); '{tags}' adds the labels")


def _training_splits(_instance: object, _attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    if not value:
        raise ValueError("name at least one split to enrich (normally 'train')")
    bad = [s for s in value if s in EVAL_SPLITS]
    if bad:
        raise ValueError(
            f"extra pairs go into training splits only (got {', '.join(bad)}): in an evaluation split the "
            "duplicated clips would be distractors and the LLM's captions extra queries"
        )


class LLMEnriched(SplitSource):
    """Base items plus, in the training split, one extra pair per rewritten caption.

    An extra pair is a new :class:`~mtrun.interfaces.Sample` with id ``ORIGINAL~llmJ`` (``J``:
    the index of the rewritten caption), the same audio and tags, the LLM's caption as its only
    caption, and ``extra["enriched_from"]``/``extra["original_caption"]``. It shares its group
    with the original (an original without a group gets its id as group), so InfoNCE with
    ``mask_same_group = true`` never treats the two copies of a clip as negatives.

    Args:
        config: The recipe settings; ``config.base`` is the ``[data.base]`` source.
        run: The run, passed on to the base source when it is built (the assembler injects it).
    """

    provides: ClassVar[frozenset[str]] = frozenset({"captions"})  # text-to-music retrieval needs them

    @attrs.frozen
    class Config:
        lm_path: str = attrs.field(default="", metadata={"help": "local causal-LM folder (save_pretrained layout, tokenizer included); required"})
        base: ComponentSpec = component_field("data", default="demo", help="the data source whose items are enriched, configured in [data.base]")
        splits: tuple[str, ...] = attrs.field(default=("train",), converter=tuple, validator=_training_splits, metadata={"help": "splits that get the extra pairs (never val/test)"})
        captions_per_item: int = attrs.field(default=1, validator=attrs.validators.ge(0), metadata={"help": "rewrite the first N captions of each item (0 = all; an item without captions is rewritten from its tags once)"})
        prompt: str = attrs.field(default=DEFAULT_PROMPT, validator=_has_caption_slot, metadata={"help": "LLM prompt; {caption} = the original caption, {tags} = 'category: tag, tag; ...'"})
        use_chat_template: bool = attrs.field(default=True, metadata={"help": "wrap the prompt in the tokenizer's chat template when it has one"})
        cache_dir: str = attrs.field(default="", metadata={"help": "cache folder; '' = $MTRUN_CACHE/enriched-captions or ~/.cache/mtrun/enriched-captions"})
        max_new_tokens: int = attrs.field(default=77, validator=positive, metadata={"help": "LLM tokens generated per caption"})
        do_sample: bool = attrs.field(default=False, metadata={"help": "sample (temperature, top_p) instead of greedy decoding"})
        temperature: float = attrs.field(default=0.7, validator=positive, metadata={"help": "sampling temperature"})
        top_p: float = attrs.field(default=0.9, validator=unit_interval, metadata={"help": "nucleus sampling mass"})
        seed: int = attrs.field(default=0, metadata={"help": "seed of sampled generation"})
        batch_size: int = attrs.field(default=8, validator=positive, metadata={"help": "prompts per generate call"})
        device: str = attrs.field(default="", metadata={"help": "device of the LM ('' = cuda when available, else cpu)"})

    def __init__(self, config: Config, *, run: Run | None = None):
        self.config = config
        self.run = run
        self.stats: dict[str, int] = {}

    # ------------------------------------------------------------------ pieces

    def base_splits(self) -> dict[str, list[Sample]]:
        """The items before enrichment: every split of the ``[data.base]`` source, in order."""
        if self.config.base is None:
            raise MtrunError(
                "llm-enriched: [data.base] must name a data source to enrich (type = \"manifest\", path = ...); "
                "this Config was built without one. Structure it from a recipe table, where the default is the demo corpus"
            )
        source = self.config.base.build(run=self.run)
        return {split: list(source.load(split)) for split in source.splits()}

    def generation_settings(self) -> dict[str, Any]:
        """What, besides the model, decides a rewrite (part of every cache key)."""
        return generation_settings(self.config)

    def prompt_for(self, caption: str, tags: dict[str, list[str]]) -> str:
        from mtrun_tag_to_caption.augmenter import format_tags

        return self.config.prompt.replace("{caption}", caption).replace("{tags}", format_tags(tags) or "none")

    def _lm_folder(self) -> Path:
        if not self.config.lm_path:
            raise MtrunError("[data].lm_path is empty: llm-enriched needs a local causal-LM folder to write captions with")
        path = Path(self.config.lm_path).expanduser()
        if not (path / "config.json").is_file():
            raise MtrunError(
                f"[data].lm_path = {self.config.lm_path!r} is not a local model folder (no config.json); "
                "pass a folder saved with save_pretrained, tokenizer included"
            )
        return path

    def _jobs(self, items: Sequence[Sample]) -> list[tuple[Sample, int, str]]:
        k = self.config.captions_per_item
        jobs = []
        for sample in items:
            captions = list(sample.captions) or ([""] if sample.tags else [])
            for j, caption in enumerate(captions if k == 0 else captions[:k]):
                jobs.append((sample, j, caption))
        return jobs

    # ------------------------------------------------------------------ build

    def build(self) -> dict[str, list[Sample]]:
        from mtrun_tag_to_caption.cache import CaptionCache, lm_identity

        cfg = self.config
        splits = self.base_splits()
        folder = self._lm_folder()
        identity, settings = lm_identity(folder), self.generation_settings()
        cache = CaptionCache(cfg.cache_dir or default_cache_dir())
        targets = [name for name in cfg.splits if name in splits]
        jobs = {name: self._jobs(splits[name]) for name in targets}
        keyed = {name: [(enrichment_key(identity, settings, c, s.tags), s, j, c) for s, j, c in js] for name, js in jobs.items()}

        todo: dict[str, tuple[str, dict[str, list[str]]]] = {}
        for entries in keyed.values():
            for key, sample, _, caption in entries:
                if key not in todo and cache.get(key, refresh=False) is None:
                    todo[key] = (caption, sample.tags)
        stats = {"pairs": sum(len(v) for v in keyed.values()), "cached": 0, "generated": len(todo), "added": 0, "empty": 0}
        stats["cached"] = len({k for v in keyed.values() for k, *_ in v}) - len(todo)
        if todo:
            self._generate(folder, cache, todo)

        for name, entries in keyed.items():
            extras: list[Sample] = []
            originals = splits[name]
            grouped = {id(s): (s if s.group is not None else attrs.evolve(s, group=s.id)) for s in originals}
            for key, sample, j, caption in entries:
                text = cache.get(key) or ""
                if not text or text == caption:
                    stats["empty"] += 1
                    continue
                base = grouped[id(sample)]
                extras.append(
                    attrs.evolve(
                        base,
                        id=f"{sample.id}~llm{j}",
                        captions=[text],
                        extra={**sample.extra, "enriched_from": sample.id, "original_caption": caption},
                    )
                )
            splits[name] = [grouped[id(s)] for s in originals] + extras
            stats["added"] += len(extras)
        self.stats = stats
        _log.info(
            "llm-enriched: %d extra pairs added to %s (%d rewrites generated, %d read from %s, %d empty or unchanged)",
            stats["added"], ", ".join(targets) or "no split", stats["generated"], stats["cached"], cache.path, stats["empty"],
        )
        return splits

    def _generate(self, folder: Path, cache: Any, todo: dict[str, tuple[str, dict[str, list[str]]]]) -> None:
        from mtrun_tag_to_caption.augmenter import clean_caption
        from mtrun_tag_to_caption.generate import CaptionWriter

        cfg = self.config
        writer = CaptionWriter(folder, cfg, device=cfg.device or None)
        items = list(todo.items())
        _log.info("llm-enriched: generating %d captions with %s", len(items), folder)
        for start in range(0, len(items), cfg.batch_size):
            chunk = items[start : start + cfg.batch_size]
            prompts = [self.prompt_for(caption, tags) for _, (caption, tags) in chunk]
            outputs = [clean_caption(text) for text in writer.generate(prompts)]
            # Appended batch by batch: an interrupted build keeps what it generated.
            cache.add(
                {"key": key, "caption": text, "original": caption, "tags": tags, "lm": str(folder)}
                for (key, (caption, tags)), text in zip(chunk, outputs)
            )
