"""The ablation table, in the form of the papers' tables: each variant's metrics as mean ± 95%
confidence interval over seeds, and its difference from the baseline paired by seed (the same
seed gives both runs the same data order and initialisation, so the paired interval is the
honest one for "did this change help").

Written as Markdown (``table.md``), CSV (``table.csv``, one row per variant and metric) and a
PNG chart (``table.png``) into the sweep folder.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from mtrun.cache import write_atomic

__all__ = ["mean_ci", "rows", "write_tables"]


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95% Student-t interval (NaN for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    from scipy.stats import t

    return mean, float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def rows(state: dict[str, Any], variants: Sequence[str], metrics: Sequence[str], baseline: str) -> list[dict[str, Any]]:
    """One row per (variant, metric): ``n``, ``mean``, ``ci``, and ``diff``/``diff_ci`` against
    the baseline over the seeds both have (``None`` for the baseline itself or with no shared seed).

    Variants with no finished run are left out; a metric a run did not report is skipped for it.
    """
    by_variant: dict[str, dict[int, dict[str, float]]] = {}
    for run in state.get("runs", {}).values():
        if run.get("metrics") is not None:
            by_variant.setdefault(run["variant"], {})[int(run["seed"])] = run["metrics"]
    base = by_variant.get(baseline, {})
    out = []
    for variant in variants:
        runs = by_variant.get(variant)
        if not runs:
            continue
        for metric in metrics:
            seeds = sorted(s for s, m in runs.items() if metric in m)
            if not seeds:
                continue
            mean, ci = mean_ci([runs[s][metric] for s in seeds])
            shared = [s for s in seeds if metric in base.get(s, {})]
            diff = diff_ci = None
            if variant != baseline and shared:
                diff, diff_ci = mean_ci([runs[s][metric] - base[s][metric] for s in shared])
            out.append({"variant": variant, "metric": metric, "n": len(seeds), "mean": mean, "ci": ci, "diff": diff, "diff_ci": diff_ci, "paired_seeds": len(shared)})
    return out


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    if math.isnan(value):
        return "n/a"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def markdown(table: list[dict[str, Any]], metrics: Sequence[str], baseline: str, seeds: Sequence[int]) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in table))
    cell = {(r["variant"], r["metric"]): r for r in table}
    head = ["variant", *[f"{m}" for m in metrics], *[f"Δ {m} vs {baseline}" for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        values = []
        for m in metrics:
            r = cell.get((v, m))
            values.append("—" if r is None else f"{_fmt(r['mean'])} ± {_fmt(r['ci'])} (n={r['n']})")
        for m in metrics:
            r = cell.get((v, m))
            values.append("—" if r is None or r["diff"] is None else f"{_fmt(r['diff'], True)} ± {_fmt(r['diff_ci'])}")
        lines.append(f"| {v} | " + " | ".join(values) + " |")
    lines += [
        "",
        f"Mean ± half-width of the 95% Student-t interval over seeds {list(seeds)} (n = finished runs); "
        f"Δ: the difference from {baseline!r} paired by seed, with its own interval. An interval "
        "that excludes 0 is a difference these seeds resolve.",
    ]
    return "\n".join(lines) + "\n"


def _csv(table: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    fields = ["variant", "metric", "n", "mean", "ci", "diff", "diff_ci", "paired_seeds"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in table:
        writer.writerow({k: ("" if r[k] is None else r[k]) for k in fields})
    return buffer.getvalue()


def _png(table: list[dict[str, Any]], metrics: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in table))
    cell = {(r["variant"], r["metric"]): r for r in table}
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.0, 1.1 * len(variants) + 2) * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        means = [cell[(v, metric)]["mean"] if (v, metric) in cell else float("nan") for v in variants]
        errs = [cell[(v, metric)]["ci"] if (v, metric) in cell and not math.isnan(cell[(v, metric)]["ci"]) else 0.0 for v in variants]
        ax.bar(range(len(variants)), means, yerr=errs, capsize=4, color="#4c72b0")
        ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


def write_tables(sweep_dir: Path, state: dict[str, Any], variants: Sequence[str], metrics: Sequence[str], baseline: str, seeds: Sequence[int]) -> tuple[str, list[Path]]:
    """Write ``table.md``, ``table.csv`` and ``table.png``; return the Markdown and the paths."""
    table = rows(state, variants, metrics, baseline)
    text = markdown(table, metrics, baseline, seeds)
    paths = [sweep_dir / "table.md", sweep_dir / "table.csv", sweep_dir / "table.png"]
    write_atomic(paths[0], lambda f: f.write(text.encode("utf-8")))
    write_atomic(paths[1], lambda f: f.write(_csv(table).encode("utf-8")))
    if table:
        _png(table, metrics, paths[2])
    else:
        paths.pop()
    return text, paths
