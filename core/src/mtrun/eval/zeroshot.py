"""Zero-shot classification: tags become prompts, audio is scored against each prompt.

Two named prompt protocols (``template_set``), or your own wordings (``templates``):

* ``"song"`` — four generic music templates of our own, whose prompt embeddings are averaged per
  class (CLIP's prompt ensembling) and scored once.
* ``"slap"`` — SLAP's four templates and aggregation, from the paper's text (Guinot et al., ISMIR
  2025, §"Zero-shot performance"; its LaTeX source is ``readme_/paper.tex`` in github.com/Pliploop/SLAP):
  each template is scored on its own and the best of the four scores is reported, per metric.
"""

from __future__ import annotations

from typing import Any, Sequence

import attrs
import numpy as np

from mtrun.errors import MtrunError
from mtrun.eval import metrics
from mtrun.eval.embed import EmbeddingTask, EmbedSettings, EvalCache

__all__ = [
    "AGGREGATIONS",
    "DEFAULT_TEMPLATES",
    "SLAP_TEMPLATES",
    "SONG_TEMPLATES",
    "TEMPLATE_SETS",
    "ZeroShot",
    "class_embeddings",
    "label_matrix",
    "zero_shot_scores",
]

SONG_TEMPLATES: tuple[str, ...] = (
    "This is a {} song.",
    "A {} track.",
    "A song of {} music.",
    "{} music.",
)
"""Four generic music prompt templates of our own (``{}`` is replaced by the tag), averaged
per class (``template_set = "song"``, the default). Not SLAP's: see :data:`SLAP_TEMPLATES`."""

SLAP_TEMPLATES: tuple[str, ...] = (
    "{}",
    "{} music",
    "this sounds like {}",
    "A {} track",
)
"""SLAP's four prompts, word for word as its paper's text gives them ("we evaluate across four
prompts with which we wrap the target class ``{}``, ``{} music``, ``this sounds like {}``, and
``A {} track``"). SLAP reports the best of the four scores (``template_set = "slap"``). A draft
table left commented out in the same LaTeX source capitalises two of them ("This sounds like {}",
"A {} Track"); we follow the published sentence."""

DEFAULT_TEMPLATES: tuple[str, ...] = SONG_TEMPLATES
"""The wordings used when neither ``templates`` nor ``template_set`` is set: :data:`SONG_TEMPLATES`."""

TEMPLATE_SETS: dict[str, tuple[tuple[str, ...], str]] = {
    "song": (SONG_TEMPLATES, "ensemble"),
    "slap": (SLAP_TEMPLATES, "best-of"),
}
"""Named prompt protocols: name → (templates, their aggregation)."""

AGGREGATIONS: tuple[str, ...] = ("auto", "ensemble", "best-of")
"""``ensemble``: average a class's normalised prompt embeddings, score once. ``best-of``: score
every template alone and report, for each metric, the best template's value (SLAP)."""


def _templates_ok(instance: Any, attribute: Any, value: Sequence[str]) -> None:
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
    normalised again (CLIP's prompt ensembling), so no single wording decides a class. With one
    template this is that prompt's normalised embedding."""
    prompts = [t.format(c) for c in classes for t in templates]
    import torch

    rows = [system.embed_text(prompts[s : s + batch_size]).float().cpu() for s in range(0, len(prompts), batch_size)]
    emb = torch.cat(rows).reshape(len(classes), len(templates), -1)
    emb = torch.nn.functional.normalize(emb, dim=-1).mean(1)
    return torch.nn.functional.normalize(emb, dim=-1).numpy()


def zero_shot_scores(audio: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """Cosine similarity ``[N, C]`` of normalised audio embeddings to class embeddings."""
    return np.asarray(audio, dtype=np.float64) @ np.asarray(class_emb, dtype=np.float64).T


def _classification_metrics(scores: np.ndarray, labels: np.ndarray, multi: bool) -> tuple[dict[str, float], int]:
    """The task's metrics for one score matrix, and how many items they were computed on."""
    if multi:
        return {
            "roc_auc": metrics.roc_auc_macro(scores, labels),
            "pr_auc": metrics.pr_auc_macro(scores, labels),
            "mAR": metrics.mean_average_recall(scores, labels),
        }, len(labels)
    single = labels.sum(1) == 1  # forced single-label: items with several tags are left out
    if not single.any():
        return {}, 0
    return {"accuracy": metrics.accuracy(scores[single], labels[single].argmax(1))}, int(single.sum())


class ZeroShot(EmbeddingTask):
    """Zero-shot tagging of one tag category by prompt templates (accuracy or ROC/PR-AUC, mAR)."""

    @attrs.frozen
    class Config(EmbedSettings):
        category: str = attrs.field(default="genre", metadata={"help": "tag category to classify (Sample.tags key)"})
        template_set: str = attrs.field(
            default="song",
            validator=attrs.validators.in_(tuple(TEMPLATE_SETS)),
            metadata={
                "help": "named prompt protocol: 'song' (our four templates, prompt-ensembled) or 'slap' "
                "(SLAP's four templates, each scored alone, best of four reported)"
            },
        )
        templates: tuple[str, ...] = attrs.field(
            default=(),
            converter=tuple,
            validator=_templates_ok,
            metadata={"help": "your own prompt templates ('{}' is replaced by the tag); empty = template_set's"},
        )
        aggregate: str = attrs.field(
            default="auto",
            validator=attrs.validators.in_(AGGREGATIONS),
            metadata={
                "help": "'ensemble' (average a class's prompt embeddings), 'best-of' (score each template, "
                "report the best per metric), or 'auto' (template_set's own)"
            },
        )
        classes: tuple[str, ...] = attrs.field(
            default=(), converter=tuple, metadata={"help": "class names; empty = every tag of the category in the split"}
        )
        mode: str = attrs.field(
            default="auto",
            validator=attrs.validators.in_(("auto", "single", "multi")),
            metadata={"help": "single-label (accuracy), multi-label (ROC-AUC, PR-AUC, mAR), or auto from the data"},
        )

        @property
        def wordings(self) -> tuple[str, ...]:
            """The templates scored: ``templates`` if given, else ``template_set``'s."""
            return self.templates or TEMPLATE_SETS[self.template_set][0]

        @property
        def aggregation(self) -> str:
            """``"ensemble"`` or ``"best-of"``: ``aggregate``, or ``template_set``'s when ``"auto"``."""
            return TEMPLATE_SETS[self.template_set][1] if self.aggregate == "auto" else self.aggregate

    def check_samples(self, samples: Sequence[Any]) -> None:
        """Raise now, before training or embedding, when no item has a tag of ``category`` (or,
        with ``classes``, none of those): evaluation would report only counts."""
        cfg = self.config
        found = {t for s in samples for t in s.tags.get(cfg.category, [])}
        if not found:
            present = sorted({key for s in samples for key in s.tags})
            raise MtrunError(
                f"[eval] zero-shot: category = {cfg.category!r} labels none of the {len(samples)} items; their tag "
                f"categories are: {', '.join(present) or 'none'}"
            )
        if cfg.classes and not found & set(cfg.classes):
            raise MtrunError(
                f"[eval] zero-shot: none of the {len(samples)} items has any of classes = {list(cfg.classes)!r} "
                f"in category {cfg.category!r}; its tags there include: {', '.join(sorted(found)[:12])}"
            )

    def evaluate(self, system: Any, samples: Sequence[Any], *, cache: EvalCache | None = None) -> dict[str, float]:
        """Score every clip against every class prompt; items without a tag of the category are
        left out. With ``best-of`` aggregation each template's metrics are also reported, as
        ``zero-shot/<category>/template<i>/<metric>`` (i counts from 1 in template order)."""
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
        audio, labels = emb.audio[keep], labels[keep]
        # "auto" looks at the data as tagged (not only at the classes scored): an item with two
        # tags of the category makes it a multi-label task.
        multi = cfg.mode == "multi" or (cfg.mode == "auto" and any(len(set(ts)) > 1 for ts in tags))
        if cfg.aggregation == "ensemble":
            scores = zero_shot_scores(audio, class_embeddings(system, classes, cfg.wordings))
            found, n_scored = _classification_metrics(scores, labels, multi)
        else:
            per_template = []
            for i, template in enumerate(cfg.wordings, 1):
                scores = zero_shot_scores(audio, class_embeddings(system, classes, (template,)))
                values, n_scored = _classification_metrics(scores, labels, multi)
                per_template.append(values)
                out.update({f"{prefix}/template{i}/{k}": v for k, v in values.items()})
            # Best of the templates, chosen per metric on the evaluated data itself, as SLAP
            # reports it: an optimistic choice, so compare such numbers only with best-of numbers.
            found = {
                k: max((m[k] for m in per_template if m[k] == m[k]), default=float("nan"))  # NaN: undefined
                for k in per_template[0]
            }
        out[f"{prefix}/n_items"] = float(n_scored)
        out.update({f"{prefix}/{k}": v for k, v in found.items()})
        return out
