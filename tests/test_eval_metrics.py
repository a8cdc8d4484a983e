"""Evaluation metrics agree with independent, deliberately naive computations."""

from __future__ import annotations

import numpy as np
import pytest

from mtrun.eval import metrics


# ------------------------------------------------------------------ brute-force references


def brute_force_query(scores, relevant, ks=(1, 5, 10), ap_at=10):
    """One query, by explicit comparisons: an item's position is 1 + the items that beat it,
    where an irrelevant item with an equal score beats a relevant one (pessimistic ties) and
    relevant items with equal scores are ordered by index."""
    n = len(scores)
    positions = {}
    for j in range(n):
        ahead = 0
        for k in range(n):
            if k == j:
                continue
            if scores[k] > scores[j]:
                ahead += 1
            elif scores[k] == scores[j]:
                if relevant[j] and not relevant[k]:
                    ahead += 1
                elif relevant[j] == relevant[k] and k < j:
                    ahead += 1
        positions[j] = ahead + 1
    rel_positions = sorted(positions[j] for j in range(n) if relevant[j])
    rank = rel_positions[0]
    hits_at = {k: float(rank <= k) for k in ks}
    n_rel = len(rel_positions)
    ap = 0.0
    for p in rel_positions:
        if p <= ap_at:
            found_so_far = sum(1 for q in rel_positions if q <= p)
            ap += found_so_far / p
    ap /= min(n_rel, ap_at)
    return rank, hits_at, ap


def random_multi_caption_case(rng, n_items, captions_per_item, levels):
    """Similarities quantised to ``levels`` values, so ties are everywhere."""
    text_item = np.repeat(np.arange(n_items), captions_per_item)
    rng.shuffle(text_item)
    sim = rng.integers(0, levels, size=(len(text_item), n_items)).astype(float) / levels
    return sim, text_item


@pytest.mark.parametrize("levels", [3, 7, 1000])
@pytest.mark.parametrize("direction", ["t2a", "a2t"])
def test_retrieval_matches_brute_force_with_ties_and_multiple_captions(levels, direction):
    rng = np.random.default_rng(levels)
    sim, text_item = random_multi_caption_case(rng, n_items=23, captions_per_item=5, levels=levels)
    t2a, a2t = metrics.retrieval_relevance(text_item, 23)
    s, rel = (sim, t2a) if direction == "t2a" else (sim.T, a2t)
    got = metrics.per_query_retrieval(s, rel)
    for q in range(s.shape[0]):
        rank, hits, ap = brute_force_query(list(s[q]), list(rel[q]))
        assert got["rank"][q] == rank
        for k, hit in hits.items():
            assert got[f"R@{k}"][q] == hit
        assert got["AP@10"][q] == pytest.approx(ap)
    summary = metrics.retrieval_metrics(s, rel)
    assert summary["R@10"] == pytest.approx(100 * np.mean(got["R@10"]))
    assert summary["median_rank"] == np.median(got["rank"])


def test_ties_are_pessimistic_so_a_collapsed_model_gets_the_worst_rank():
    sim = np.zeros((4, 10))  # every score equal
    rel = np.zeros((4, 10), dtype=bool)
    rel[np.arange(4), np.arange(4)] = True
    out = metrics.retrieval_metrics(sim, rel)
    assert out["median_rank"] == 10 and out["R@1"] == 0 and out["R@5"] == 0
    # With 5 relevant captions tied with 5 others, the best relevant one sits at position 6.
    rel5 = np.zeros((1, 10), dtype=bool)
    rel5[0, :5] = True
    assert metrics.per_query_retrieval(np.zeros((1, 10)), rel5)["rank"][0] == 6


def test_audio_to_text_counts_a_hit_when_any_caption_is_in_top_k():
    # One clip, captions 0..4 belong to it; caption 3 is the only one ranked first.
    sim = np.array([[0.1, 0.2, 0.3, 0.9, 0.0, 0.5, 0.4]])
    rel = np.array([[True, True, True, True, True, False, False]])
    out = metrics.per_query_retrieval(sim, rel)
    assert out["rank"][0] == 1 and out["R@1"][0] == 1
    # AP@10: relevant at positions 1, 4, 5, 6, 7 -> (1/1 + 2/4 + 3/5 + 4/6 + 5/7) / 5
    assert out["AP@10"][0] == pytest.approx((1 + 2 / 4 + 3 / 5 + 4 / 6 + 5 / 7) / 5)


def test_subset_protocol_is_seeded_and_equals_full_set_when_small():
    rng = np.random.default_rng(0)
    sim, text_item = random_multi_caption_case(rng, n_items=40, captions_per_item=2, levels=1000)
    t2a, a2t = metrics.retrieval_relevance(text_item, 40)
    full = metrics.retrieval_metrics(sim, t2a)
    small = metrics.subset_protocol(sim, text_item, subset_size=500, repeats=5, seed=1)
    assert small["t2a"] == pytest.approx(full)
    a = metrics.subset_protocol(sim, text_item, subset_size=10, repeats=4, seed=1)
    b = metrics.subset_protocol(sim, text_item, subset_size=10, repeats=4, seed=1)
    c = metrics.subset_protocol(sim, text_item, subset_size=10, repeats=4, seed=2)
    assert a == b and a != c
    # Smaller candidate sets are easier: random scores give better recall within 10 items.
    assert a["t2a"]["R@5"] > full["R@5"]


def test_subset_protocol_matches_a_hand_built_subset():
    rng = np.random.default_rng(3)
    sim, text_item = random_multi_caption_case(rng, n_items=30, captions_per_item=3, levels=1000)
    got = metrics.subset_protocol(sim, text_item, subset_size=8, repeats=1, seed=5)
    items = np.sort(np.random.default_rng(5).choice(30, size=8, replace=False))
    caps = [m for m in range(len(text_item)) if text_item[m] in set(items)]
    sub = sim[np.ix_(caps, items)]
    rel = np.array([[text_item[m] == i for i in items] for m in caps])
    assert got["t2a"] == pytest.approx(metrics.retrieval_metrics(sub, rel))
    assert got["a2t"] == pytest.approx(metrics.retrieval_metrics(sub.T, rel.T))


def test_bootstrap_interval_is_seeded_and_contains_the_full_set_value():
    rng = np.random.default_rng(0)
    n = 400
    sim = rng.normal(size=(n, n)) + 2.0 * np.eye(n)
    per_query = metrics.per_query_retrieval(sim, np.arange(n))
    full = metrics.summarise_retrieval(per_query)
    ci = metrics.bootstrap_ci(per_query, n_boot=300, seed=1)
    assert ci == metrics.bootstrap_ci(per_query, n_boot=300, seed=1)
    for key in ("R@1", "R@10", "mean_rank", "mAP@10"):
        low, high = ci[key]
        assert low <= full[key] <= high and low < high
    # Grouped (cluster) resampling is wider than treating correlated queries as independent.
    groups = np.repeat(np.arange(n // 8), 8)
    clustered = {k: np.repeat(v[: n // 8], 8) for k, v in per_query.items()}
    naive = metrics.bootstrap_ci(clustered, n_boot=300, seed=1)["R@10"]
    grouped = metrics.bootstrap_ci(clustered, groups=groups, n_boot=300, seed=1)["R@10"]
    assert grouped[1] - grouped[0] > naive[1] - naive[0]


# ------------------------------------------------------------------------- classification


def brute_force_auc(scores, targets):
    pos = [s for s, t in zip(scores, targets) if t]
    neg = [s for s, t in zip(scores, targets) if not t]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def brute_force_ap(scores, targets):
    total_pos = sum(targets)
    ap, prev_recall = 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        chosen = [t for s, t in zip(scores, targets) if s >= threshold]
        recall = sum(chosen) / total_pos
        ap += (recall - prev_recall) * sum(chosen) / len(chosen)
        prev_recall = recall
    return ap


def test_auc_and_average_precision_match_brute_force_with_ties():
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 5, size=(60, 6)).astype(float)
    targets = rng.random((60, 6)) < 0.3
    for c in range(6):
        assert metrics.roc_auc(scores[:, c], targets[:, c]) == pytest.approx(brute_force_auc(scores[:, c], targets[:, c]))
        assert metrics.average_precision(scores[:, c], targets[:, c]) == pytest.approx(
            brute_force_ap(list(scores[:, c]), list(targets[:, c]))
        )
    macro = np.mean([brute_force_auc(scores[:, c], targets[:, c]) for c in range(6)]) * 100
    assert metrics.roc_auc_macro(scores, targets) == pytest.approx(macro)


def test_macro_metrics_skip_classes_without_positives():
    scores = np.array([[0.9, 0.1], [0.2, 0.3], [0.4, 0.8]])
    targets = np.array([[1, 0], [0, 0], [0, 0]], dtype=bool)
    assert metrics.roc_auc_macro(scores, targets) == pytest.approx(100.0)
    assert metrics.pr_auc_macro(scores, targets) == pytest.approx(100.0)


def test_accuracy_counts_a_tied_maximum_as_wrong():
    scores = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    assert metrics.accuracy(scores, [0, 0, 1]) == pytest.approx(200 / 3)


def test_mean_average_recall_matches_its_definition():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(20, 7))
    targets = rng.random((20, 7)) < 0.3
    targets[0] = False  # a clip without tags is skipped
    values = []
    for n in range(20):
        if not targets[n].any():
            continue
        order = sorted(range(7), key=lambda c: -scores[n, c])
        found, curve = 0, []
        for c in order:
            found += targets[n, c]
            curve.append(found / targets[n].sum())
        values.append(np.mean(curve))
    assert metrics.mean_average_recall(scores, targets) == pytest.approx(100 * np.mean(values))
    perfect = targets.astype(float)
    assert metrics.mean_average_recall(perfect, targets) > metrics.mean_average_recall(-perfect, targets)


def test_r2_of_perfect_and_mean_predictions():
    y = np.array([1.0, 2.0, 4.0, 8.0])
    assert metrics.r2_score(y, y) == pytest.approx(1.0)
    assert metrics.r2_score(np.full(4, y.mean()), y) == pytest.approx(0.0)
