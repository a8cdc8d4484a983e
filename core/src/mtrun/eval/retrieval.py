"""Text↔music retrieval: full set, the 500-item subset protocol, and bootstrap intervals."""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import attrs
import numpy as np

from mtrun.eval import metrics
from mtrun.eval.embed import EmbeddingTask, EmbedSettings, EvalCache, Embeddings
from mtrun.schema import Need

__all__ = ["Retrieval", "retrieval_results"]


def retrieval_results(
    emb: Embeddings,
    *,
    subset_size: int = 500,
    subset_repeats: int = 10,
    bootstrap: int = 1000,
    seed: int = 0,
    prefix: str = "retrieval",
) -> dict[str, float]:
    """Every retrieval number for one set of embeddings, as flat metric names.

    Keys: ``{prefix}/{t2a|a2t}/{metric}`` on the full set, ``.../{metric}:ci_low`` and
    ``:ci_high`` (bootstrap 95% interval, resampling audio items with all their captions),
    ``{prefix}/{t2a|a2t}/subset/{metric}`` for the subset protocol, and item counts.
    """
    out: dict[str, float] = {f"{prefix}/n_items": float(len(emb.audio)), f"{prefix}/n_captions": float(len(emb.texts))}
    if len(emb.texts) == 0 or len(emb.audio) == 0:
        return out
    sim = emb.texts @ emb.audio.T  # cosine: both sides are L2-normalised
    t2a, a2t = metrics.retrieval_relevance(emb.text_item, len(emb.audio))
    has_caption = a2t.any(1)
    directions = {
        "t2a": (metrics.per_query_retrieval(sim, t2a), emb.text_item),
        "a2t": (metrics.per_query_retrieval(sim.T[has_caption], a2t[has_caption]), np.flatnonzero(has_caption)),
    }
    for direction, (per_query, groups) in directions.items():
        for key, value in metrics.summarise_retrieval(per_query).items():
            out[f"{prefix}/{direction}/{key}"] = value
        if bootstrap > 0:
            ci = metrics.bootstrap_ci(per_query, groups=groups, n_boot=bootstrap, seed=seed)
            for key, (low, high) in ci.items():
                out[f"{prefix}/{direction}/{key}:ci_low"] = low
                out[f"{prefix}/{direction}/{key}:ci_high"] = high
    if subset_size > 0 and subset_repeats > 0:
        subset = metrics.subset_protocol(sim, emb.text_item, subset_size=subset_size, repeats=subset_repeats, seed=seed)
        for direction, values in subset.items():
            for key, value in values.items():
                out[f"{prefix}/{direction}/subset/{key}"] = value
    return out


class Retrieval(EmbeddingTask):
    """Text→audio and audio→text retrieval: R@1/5/10, median/mean rank, mAP@10, with CIs.

    It ranks captions, so its source must provide them: ``mtrun validate`` refuses it on a
    tag-only source ([data] or its own [eval.data]), rather than reporting item counts alone.
    """

    requires: ClassVar[tuple[Need, ...]] = (Need("data", "captions", "it ranks captions against recordings: evaluate it on a captioned source, its own [eval.data]"),)

    @attrs.frozen
    class Config(EmbedSettings):
        subset_size: int = attrs.field(
            default=500,
            validator=attrs.validators.ge(0),
            metadata={"help": "items per random subset of the paper protocol (0 = full set only)"},
        )
        subset_repeats: int = attrs.field(
            default=10, validator=attrs.validators.ge(0), metadata={"help": "random subsets averaged"}
        )
        bootstrap: int = attrs.field(
            default=1000,
            validator=attrs.validators.ge(0),
            metadata={"help": "bootstrap resamples for the 95% intervals (0 = no intervals)"},
        )
        seed: int = attrs.field(default=0, metadata={"help": "seed of the subsets and the bootstrap"})

    @staticmethod
    def reports(config: Any) -> tuple[str, ...]:
        """The headline metric names it will report, for ``mtrun validate --print``."""
        names = [f"retrieval/{d}/{m}" for d in ("t2a", "a2t") for m in ("R@1", "R@5", "R@10", "median_rank")]
        if config.subset_size > 0 and config.subset_repeats > 0:
            names += [f"retrieval/t2a/subset/{m}" for m in ("R@10", "median_rank")]
        return tuple(names)

    def evaluate(self, system: Any, samples: Sequence[Any], *, cache: EvalCache | None = None) -> dict[str, float]:
        """Embed (or reuse) the split and rank every caption against every clip and back."""
        cfg = self.config
        return retrieval_results(
            self.embeddings(system, samples, cache),
            subset_size=cfg.subset_size,
            subset_repeats=cfg.subset_repeats,
            bootstrap=cfg.bootstrap,
            seed=cfg.seed,
        )
