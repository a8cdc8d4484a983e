"""Zero-shot classification: tags become prompts, audio is scored against each prompt."""

from __future__ import annotations

from typing import Any, Sequence

import attrs
import numpy as np

from mtrun.eval import metrics
from mtrun.eval.embed import EmbeddingTask, EmbedSettings, EvalCache

__all__ = ["DEFAULT_TEMPLATES", "SONG_TEMPLATES", "ZeroShot", "class_embeddings", "label_matrix", "zero_shot_scores"]

SONG_TEMPLATES: tuple[str, ...] = (
    "This is a {} song.",
    "A {} track.",
    "A song of {} music.",
    "{} music.",
)
"""Four generic music prompt templates of our own (``{}`` is replaced by the tag), averaged
per class. They are *not* SLAP's: SLAP's exact templates and aggregation could not be found in
its public code or pages, so reproducing a published zero-shot table needs its wordings set in
``templates`` by hand (docs/evaluation.md)."""

DEFAULT_TEMPLATES: tuple[str, ...] = SONG_TEMPLATES
"""The ``templates`` default: :data:`SONG_TEMPLATES`."""


def _templates_ok(instance: Any, attribute: Any, value: Sequence[str]) -> None:
    if not value:
        raise ValueError("templates must not be empty")
    bad = [t for t in value if "{}" not in t]
    if bad:
        raise ValueError(f"every template needs a '{{}}' where the tag goes (got {bad!r})")


def label_matrix(tag_lists: Sequence[Sequence[str]], classes: Sequence[str]) -> np.ndarray:
    """Boolean ``[N, C]``: item n carries class c."""
    index = {c: i for i, c in enumerate(classes)}
    out = np.zeros((len(tag_lists), len(classes)), dtype=bool)
    for n, tags in enumerate(tag_lists):
        for tag in tags:
            if tag in index:
                out[n, index[tag]] = True
    return out


def class_embeddings(system: Any, classes: Sequence[str], templates: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """One normalised text embedding per class: the mean of its normalised prompt embeddings,
    normalised again (CLIP's prompt ensembling), so no single wording decides a class."""
    prompts = [t.format(c) for c in classes for t in templates]
    import torch

    rows = [system.embed_text(prompts[s : s + batch_size]).float().cpu() for s in range(0, len(prompts), batch_size)]
    emb = torch.cat(rows).reshape(len(classes), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(emb, dim=-1).numpy()


def zero_shot_scores(audio: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """Cosine similarity ``[N, C]`` of normalised audio embeddings to class embeddings."""
    return np.asarray(audio, dtype=np.float64) @ np.asarray(class_emb, dtype=np.float64).T


class ZeroShot(EmbeddingTask):
    """Zero-shot tagging of one tag category by prompt templates (accuracy or ROC/PR-AUC, mAR)."""

    @attrs.frozen
    class Config(EmbedSettings):
        category: str = attrs.field(default="genre", metadata={"help": "tag category to classify (Sample.tags key)"})
        templates: tuple[str, ...] = attrs.field(
            default=DEFAULT_TEMPLATES,
            converter=tuple,
            validator=_templates_ok,
            metadata={"help": "prompt templates; '{}' is replaced by the tag and the prompts of a class averaged"},
        )
        classes: tuple[str, ...] = attrs.field(
            default=(), converter=tuple, metadata={"help": "class names; empty = every tag of the category in the split"}
        )
        mode: str = attrs.field(
            default="auto",
            validator=attrs.validators.in_(("auto", "single", "multi")),
            metadata={"help": "single-label (accuracy), multi-label (ROC-AUC, PR-AUC, mAR), or auto from the data"},
        )

    def evaluate(self, system: Any, samples: Sequence[Any], *, cache: EvalCache | None = None) -> dict[str, float]:
        """Score every clip against every class prompt; items without a tag of the category are
        left out."""
        cfg = self.config
        prefix = f"zero-shot/{cfg.category}"
        emb = self.embeddings(system, samples, cache)
        tags = [list(s.tags.get(cfg.category, [])) for s in emb.samples(samples)]
        classes = list(cfg.classes) or sorted({t for ts in tags for t in ts})
        labels = label_matrix(tags, classes)
        keep = labels.any(1)
        out = {f"{prefix}/n_items": float(keep.sum()), f"{prefix}/n_classes": float(len(classes))}
        if len(classes) < 2 or not keep.any():
            return out
        scores = zero_shot_scores(emb.audio[keep], class_embeddings(system, classes, cfg.templates))
        labels = labels[keep]
        # "auto" looks at the data as tagged (not only at the classes scored): an item with two
        # tags of the category makes it a multi-label task.
        multi = cfg.mode == "multi" or (cfg.mode == "auto" and any(len(set(ts)) > 1 for ts in tags))
        if multi:
            out[f"{prefix}/roc_auc"] = metrics.roc_auc_macro(scores, labels)
            out[f"{prefix}/pr_auc"] = metrics.pr_auc_macro(scores, labels)
            out[f"{prefix}/mAR"] = metrics.mean_average_recall(scores, labels)
        else:
            single = labels.sum(1) == 1  # forced single-label: items with several tags are left out
            out[f"{prefix}/n_items"] = float(single.sum())
            if single.any():
                out[f"{prefix}/accuracy"] = metrics.accuracy(scores[single], labels[single].argmax(1))
        return out
