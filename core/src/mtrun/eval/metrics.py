"""Evaluation metrics in plain NumPy: retrieval from a similarity matrix, and classification.

Conventions (see ``docs/evaluation.md`` for the reasoning):

* **Ranks are 1-based.** A rank of 1 means the first item returned is relevant.
* **Several relevant items** (a clip with five captions, queried audio→text): the query's rank
  is the *best* rank among its relevant items, so R@k counts a hit when *any* relevant caption
  is in the top k. This is the convention of the AudioCaps/Clotho literature and of SLAP's and
  CLAP's evaluation code (the rank of the first relevant item in the sorted list).
* **Ties are counted pessimistically**: an irrelevant item with exactly the same score as a
  relevant one is ranked before it. A metric computed this way is a lower bound of every
  tie-breaking order, and a collapsed model (all scores equal) scores the worst possible rank
  instead of a lucky one; an implementation that sorts with ``argsort`` would instead depend on
  the items' storage order.
* **mAP@10**: per query, ``AP@10 = sum_{k<=10} P@k * rel_k / min(R, 10)`` with ``R`` relevant
  items; with one relevant item this is ``1/rank`` when ``rank <= 10`` (DCASE's definition).

Nothing here imports torch, so the metrics are usable on embeddings from anywhere.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "RECALL_KS",
    "accuracy",
    "average_precision",
    "bootstrap_ci",
    "mean_average_recall",
    "per_query_retrieval",
    "pr_auc_macro",
    "r2_score",
    "relevance_matrix",
    "retrieval_metrics",
    "retrieval_relevance",
    "roc_auc",
    "roc_auc_macro",
    "subset_protocol",
    "summarise_retrieval",
]

RECALL_KS: tuple[int, ...] = (1, 5, 10)
"""The recall cut-offs every retrieval table reports."""


# --------------------------------------------------------------------------- relevance


def relevance_matrix(relevant: Any, n_queries: int, n_items: int) -> np.ndarray:
    """A boolean ``[n_queries, n_items]`` relevance matrix.

    Args:
        relevant: Either such a matrix already, or one iterable of relevant item indices per
            query (``relevant[q] = [3]`` or ``[10, 11, 12, 13, 14]``), or one int per query.
        n_queries, n_items: The similarity matrix's shape.
    """
    if isinstance(relevant, np.ndarray) and relevant.ndim == 2:
        if relevant.shape != (n_queries, n_items):
            raise ValueError(f"relevance matrix has shape {relevant.shape}; expected {(n_queries, n_items)}")
        return relevant.astype(bool)
    if len(relevant) != n_queries:
        raise ValueError(f"{len(relevant)} relevance entries for {n_queries} queries")
    out = np.zeros((n_queries, n_items), dtype=bool)
    for q, rel in enumerate(relevant):
        idx = np.atleast_1d(np.asarray(rel, dtype=np.int64))
        out[q, idx] = True
    return out


def retrieval_relevance(text_item: Sequence[int], n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Relevance for both directions from the caption → item mapping.

    Args:
        text_item: ``text_item[m]`` is the audio item caption ``m`` belongs to.
        n_items: Number of audio items.

    Returns:
        ``(t2a, a2t)``: ``t2a`` is ``[M, N]`` (each caption has exactly one relevant clip) and
        ``a2t`` is ``[N, M]`` (each clip has all of its captions relevant).
    """
    text_item = np.asarray(text_item, dtype=np.int64)
    t2a = np.zeros((len(text_item), n_items), dtype=bool)
    t2a[np.arange(len(text_item)), text_item] = True
    return t2a, t2a.T.copy()


# ------------------------------------------------------------------------------ ranking


def _pessimistic_order(sim: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """Per row, item indices by decreasing score; among equal scores irrelevant items first.

    ``np.lexsort`` sorts by its last key first: score descending, then relevant after
    irrelevant, then index (stable) — so the order is fully determined.
    """
    return np.lexsort((rel.astype(np.int8), -sim), axis=-1)


def per_query_retrieval(sim: Any, relevant: Any, ks: Iterable[int] = RECALL_KS, ap_at: int = 10) -> dict[str, np.ndarray]:
    """Per-query rank, hits at each k, and AP@``ap_at``, under pessimistic ties.

    Args:
        sim: Similarity matrix ``[n_queries, n_items]`` (higher = more similar).
        relevant: See :func:`relevance_matrix`. Every query needs at least one relevant item.
        ks: Recall cut-offs.
        ap_at: Cut-off of the average precision.

    Returns:
        ``{"rank": [Q] float, "R@k": [Q] 0/1 for each k, "AP@10": [Q]}``.
    """
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be 2-D [queries, items]; got shape {sim.shape}")
    n_q, n_i = sim.shape
    rel = relevance_matrix(relevant, n_q, n_i)
    n_rel = rel.sum(1)
    if (n_rel == 0).any():
        bad = np.flatnonzero(n_rel == 0)[:5].tolist()
        raise ValueError(f"queries without any relevant item (e.g. {bad}); drop them before ranking")
    order = _pessimistic_order(sim, rel)
    hits = np.take_along_axis(rel, order, axis=1)  # hits[q, p]: item at position p+1 relevant
    rank = hits.argmax(1).astype(np.float64) + 1.0
    out: dict[str, np.ndarray] = {"rank": rank}
    for k in ks:
        out[f"R@{k}"] = (rank <= k).astype(np.float64)
    top = hits[:, :ap_at].astype(np.float64)
    precision_at = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    out[f"AP@{ap_at}"] = (precision_at * top).sum(1) / np.minimum(n_rel, ap_at)
    return out


def summarise_retrieval(per_query: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Aggregate per-query values: recall and mAP as means (in %), ranks as median and mean."""
    out: dict[str, float] = {}
    for key, values in per_query.items():
        if key == "rank":
            out["median_rank"] = float(np.median(values))
            out["mean_rank"] = float(np.mean(values))
        elif key.startswith("AP@"):
            out["m" + key] = float(np.mean(values) * 100.0)
        else:
            out[key] = float(np.mean(values) * 100.0)
    return out


def retrieval_metrics(sim: Any, relevant: Any, ks: Iterable[int] = RECALL_KS) -> dict[str, float]:
    """R@k (%), median and mean rank, and mAP@10 (%) over all queries.

    See the module docstring for the multi-caption and tie conventions.
    """
    return summarise_retrieval(per_query_retrieval(sim, relevant, ks))


# ------------------------------------------------------------------------- protocols


def subset_protocol(
    sim: Any,
    text_item: Sequence[int],
    *,
    subset_size: int = 500,
    repeats: int = 10,
    seed: int = 0,
    ks: Iterable[int] = RECALL_KS,
) -> dict[str, dict[str, float]]:
    """The papers' protocol: metrics within random ``subset_size``-item subsets, averaged.

    Each repeat draws ``subset_size`` audio items without replacement (seeded) and keeps all of
    their captions; text→audio ranks those captions among the subset's clips and audio→text
    ranks the clips' captions. When the set has no more than ``subset_size`` items every subset
    is the full set, so one repeat is computed.

    Args:
        sim: Text→audio similarities ``[M captions, N items]``.
        text_item: Caption → item index ``[M]``.

    Returns:
        ``{"t2a": {...}, "a2t": {...}}``, each metric the mean over repeats.
    """
    sim = np.asarray(sim, dtype=np.float64)
    text_item = np.asarray(text_item, dtype=np.int64)
    n_items = sim.shape[1]
    ks = tuple(ks)
    if n_items <= subset_size:
        repeats = 1
    rng = np.random.default_rng(seed)
    sums: dict[str, dict[str, float]] = {"t2a": {}, "a2t": {}}
    for _ in range(repeats):
        items = np.sort(rng.choice(n_items, size=min(subset_size, n_items), replace=False))
        local = np.full(n_items, -1, dtype=np.int64)
        local[items] = np.arange(len(items))
        captions = np.flatnonzero(local[text_item] >= 0)
        sub = sim[np.ix_(captions, items)]
        sub_item = local[text_item[captions]]
        t2a, a2t = retrieval_relevance(sub_item, len(items))
        has_caption = a2t.any(1)
        results = {
            "t2a": retrieval_metrics(sub, t2a, ks),
            "a2t": retrieval_metrics(sub.T[has_caption], a2t[has_caption], ks),
        }
        for direction, values in results.items():
            for key, value in values.items():
                sums[direction][key] = sums[direction].get(key, 0.0) + value
    return {d: {k: v / repeats for k, v in values.items()} for d, values in sums.items()}


def bootstrap_ci(
    per_query: Mapping[str, np.ndarray],
    *,
    groups: Sequence[int] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    summarise: Callable[[Mapping[str, np.ndarray]], dict[str, float]] = summarise_retrieval,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of every summarised metric.

    Resamples with replacement, seeded. With ``groups`` the resampling unit is the group (the
    audio item a caption belongs to): the five captions of one clip are not independent
    queries, and resampling them one by one would make the interval too narrow.

    Args:
        per_query: Output of :func:`per_query_retrieval` (arrays of one value per query).
        groups: Optional group id per query.
        n_boot: Bootstrap samples.
        level: Coverage of the interval.
        summarise: Turns a resampled ``per_query`` into metrics.

    Returns:
        ``{metric: (low, high)}``.
    """
    keys = list(per_query)
    n = len(per_query[keys[0]])
    rng = np.random.default_rng(seed)
    if groups is None:
        groups = np.arange(n)
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    # Queries sorted by group; group g occupies order[starts[g] : starts[g] + counts[g]].
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        picked = rng.integers(0, len(counts), size=len(counts))
        lens = counts[picked]
        within = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        idx = order[np.repeat(starts[picked], lens) + within]
        for key, value in summarise({k: per_query[k][idx] for k in keys}).items():
            draws.setdefault(key, []).append(value)
    alpha = (1.0 - level) / 2.0
    return {k: (float(np.quantile(v, alpha)), float(np.quantile(v, 1.0 - alpha))) for k, v in draws.items()}


# ---------------------------------------------------------------------- classification


def accuracy(scores: Any, labels: Any) -> float:
    """Top-1 accuracy (%) of ``scores [N, C]`` against integer ``labels [N]``.

    A row whose maximum is shared by several classes counts as wrong unless the true class is
    the *only* maximum — pessimistic, as for retrieval ties.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    true = scores[np.arange(len(labels)), labels]
    beaten_or_tied = (scores >= true[:, None]).sum(1)  # includes the true class itself
    return float(np.mean(beaten_or_tied == 1) * 100.0)


def roc_auc(scores: Any, targets: Any) -> float:
    """ROC-AUC of one binary problem: P(score of a positive > score of a negative), ties ½.

    Computed with mid-ranks (the Mann–Whitney U statistic); NaN when a class is absent.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=bool)
    n_pos = int(targets.sum())
    n_neg = len(targets) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Mid-rank of each run of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return float((ranks[targets].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(scores: Any, targets: Any) -> float:
    """Average precision ``sum_t (R_t - R_{t-1}) P_t`` over distinct score thresholds.

    Items with equal scores enter at the same threshold (scikit-learn's definition), so the
    value does not depend on their storage order. NaN when there is no positive.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=bool)
    n_pos = int(targets.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], targets[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(t)[last_of_run].astype(np.float64)
    seen = (last_of_run + 1).astype(np.float64)
    precision = tp / seen
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _macro(metric: Callable[[Any, Any], float], scores: Any, targets: Any) -> float:
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=bool)
    values = [metric(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values) * 100.0) if values else float("nan")


def roc_auc_macro(scores: Any, targets: Any) -> float:
    """Mean ROC-AUC (%) over classes; classes without positives or negatives are skipped."""
    return _macro(roc_auc, scores, targets)


def pr_auc_macro(scores: Any, targets: Any) -> float:
    """Mean average precision (PR-AUC, %) over classes; classes without positives skipped."""
    return _macro(average_precision, scores, targets)


def mean_average_recall(scores: Any, targets: Any) -> float:
    """mAR (%): per clip, the mean of recall@k over k = 1..C of its ranked tags; then the mean.

    For each clip the C classes are ranked by score (pessimistic ties); recall@k is the share of
    the clip's true tags among the top k, and its average over k is the normalised area under
    the clip's recall curve — the quantity SLAP's evaluation code reports as the AUC of the R@K
    curve, here per clip over its tags. 100 means every true tag outranks every other tag.
    Clips without a true tag are skipped.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=bool)
    keep = targets.any(1)
    if not keep.any():
        return float("nan")
    scores, targets = scores[keep], targets[keep]
    hits = np.take_along_axis(targets, _pessimistic_order(scores, targets), axis=1).astype(np.float64)
    recall_at_k = np.cumsum(hits, axis=1) / targets.sum(1, keepdims=True)
    return float(recall_at_k.mean() * 100.0)


def r2_score(predicted: Any, target: Any) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` (averaged over output columns)."""
    predicted = np.asarray(predicted, dtype=np.float64).reshape(len(predicted), -1)
    target = np.asarray(target, dtype=np.float64).reshape(len(target), -1)
    ss_res = ((target - predicted) ** 2).sum(0)
    ss_tot = ((target - target.mean(0)) ** 2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, np.nan)
    return float(np.nanmean(r2)) if np.isfinite(r2).any() else float("nan")
