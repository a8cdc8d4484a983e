"""Writing evaluation results: ``eval.json`` for machines, ``report.md`` + PNGs for people.

Each file is written to a temporary name and renamed into place, ``eval.json`` first (the
numbers) and ``report.md`` last, so a ``report.md`` that exists belongs to a complete report. A
write that fails (a full disk, a read-only or vanished folder) removes its temporary file and
raises :class:`~mtrun.eval.run.EvalError` naming the folder, the file and the reason: at the
end of a training run the checkpoints are already written, and the user needs to know the
report is missing rather than find an empty folder later.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["CURVE_PNG", "EVAL_JSON", "PROJECTION_PNG", "REPORT_MD", "recall_curve", "write_report"]

EVAL_JSON = "eval.json"
REPORT_MD = "report.md"
CURVE_PNG = "retrieval_curves.png"
PROJECTION_PNG = "projection.png"


def recall_curve(emb: Any, max_k: int = 50) -> dict[str, np.ndarray]:
    """R@k (%) for k = 1..max_k in both directions on the full set (pessimistic ties)."""
    from mtrun.eval import metrics

    sim = emb.texts @ emb.audio.T
    t2a, a2t = metrics.retrieval_relevance(emb.text_item, len(emb.audio))
    has = a2t.any(1)
    curves = {}
    for name, (s, rel) in {"text → audio": (sim, t2a), "audio → text": (sim.T[has], a2t[has])}.items():
        ranks = metrics.per_query_retrieval(s, rel, ks=())["rank"]
        ks = np.arange(1, min(max_k, s.shape[1]) + 1)
        curves[name] = (ks, np.array([(ranks <= k).mean() * 100.0 for k in ks]))
    return curves


def _pca_2d(x: np.ndarray) -> np.ndarray:
    """Project onto the first two principal axes (SVD of the centred data)."""
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def _plot_curves(emb: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, (ks, values) in recall_curve(emb).items():
        ax.plot(ks, values, label=name)
    ax.set_xlabel("k")
    ax.set_ylabel("R@k (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Retrieval: recall at k (full set)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        _write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    finally:
        plt.close(fig)


def _plot_projection(emb: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    points = _pca_2d(np.concatenate([emb.audio, emb.texts]).astype(np.float64))
    n = len(emb.audio)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(points[n:, 0], points[n:, 1], s=8, alpha=0.6, label=f"text ({len(emb.texts)})", c="tab:orange")
    ax.scatter(points[:n, 0], points[:n, 1], s=8, alpha=0.6, label=f"audio ({n})", c="tab:blue")
    ax.set_title("Audio and text embeddings (PCA, 2-D)")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend()
    fig.tight_layout()
    try:
        _write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    finally:
        plt.close(fig)


def _write_atomic(path: Path, write: Any, *, binary: bool = False) -> None:
    """Call ``write(file)`` on ``path``'s temporary sibling, then rename it into place; on
    failure the temporary file is removed and the ``OSError`` propagates."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"


def _tables(metrics: Mapping[str, float]) -> list[str]:
    """One Markdown table per metric group (the name up to its last ``/``)."""
    groups: dict[str, list[str]] = {}
    for key in metrics:
        if ":" in key:
            continue
        group, _, name = key.rpartition("/")
        groups.setdefault(group or "metrics", []).append(key)
    lines: list[str] = []
    for group, keys in groups.items():
        lines += [f"### {group}", "", "| metric | value | 95% CI |", "|---|---:|---|"]
        for key in keys:
            low, high = metrics.get(f"{key}:ci_low"), metrics.get(f"{key}:ci_high")
            std = metrics.get(f"{key}:std")
            ci = f"[{_fmt(low)}, {_fmt(high)}]" if low is not None else (f"± {_fmt(std)} (sd over seeds)" if std is not None else "")
            lines.append(f"| {key.rpartition('/')[2]} | {_fmt(metrics[key])} | {ci} |")
        lines.append("")
    return lines


def write_report(out_dir: str | os.PathLike[str], results: Mapping[str, Any], embeddings: Any = None) -> Path:
    """Write ``eval.json``, ``report.md`` and (with ``embeddings``) the two PNGs.

    Args:
        out_dir: Folder to write into (created).
        results: ``{"metrics": {name: float}, ...}`` plus any JSON-able context
            (``split``, ``checkpoint``, ``skipped``, ...); a flat ``{name: float}`` is accepted.
        embeddings: The :class:`~mtrun.eval.embed.Embeddings` the metrics came from; the
            retrieval curves and the 2-D projection are drawn from them.

    Returns:
        The path of ``report.md``.

    Raises:
        EvalError: A file could not be written (full disk, read-only or vanished folder); the
            message names the folder, the file, the reason and the files already written.
    """
    out = Path(out_dir)
    step = ["the folder"]  # what is being written when a write fails
    written: list[str] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        return _write_files(out, results, embeddings, step, written)
    except OSError as exc:
        from mtrun.eval.run import EvalError

        done = f"; written before it: {', '.join(written)}" if written else "; nothing was written"
        again = results.get("checkpoint")
        if not again and (out.parent / "recipe.toml").is_file():
            again = out.parent  # the run folder (the report after training)
        how = f"`mtrun eval {again}`" if again else "`mtrun eval`"
        raise EvalError(
            f"could not write the evaluation report into {out}: {_reason(exc)} (while writing {step[0]}){done}. "
            f"Checkpoints are not affected; make room (or fix the folder) and evaluate again with {how}."
        ) from exc


def _write_files(out: Path, results: Mapping[str, Any], embeddings: Any, step: list[str], written: list[str]) -> Path:
    results = dict(results)
    if "metrics" not in results:
        results = {"metrics": {k: v for k, v in results.items() if isinstance(v, (int, float))}}
    metrics = {k: float(v) for k, v in results["metrics"].items()}

    figures: list[tuple[str, str]] = []
    if embeddings is not None and len(embeddings.audio) and len(embeddings.texts):
        figures = [("Retrieval curves", CURVE_PNG), ("Audio vs text embeddings", PROJECTION_PNG)]
    results["figures"] = [name for _, name in figures]

    def _json_safe(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    # The numbers first: on a disk that fills up they are what a researcher needs most.
    data = {**results, "metrics": {k: _json_safe(v) for k, v in metrics.items()}}
    step[0] = EVAL_JSON
    _write_atomic(out / EVAL_JSON, lambda f: f.write(json.dumps(data, indent=1, default=str) + "\n"))
    written.append(EVAL_JSON)
    for (_, name), plot in zip(figures, (_plot_curves, _plot_projection)):
        step[0] = name
        plot(embeddings, out / name)
        written.append(name)

    lines = ["# Evaluation report", ""]
    for key in ("source", "checkpoint", "step", "split", "n_samples", "n_items", "n_captions"):
        if key in results and results[key] is not None:
            lines.append(f"- **{key}**: {results[key]}")
    for name, entry in (results.get("sets") or {}).items():
        lines.append(
            f"- **evaluation set {name}**: {entry.get('type')}, split {entry.get('split')}, {entry.get('n_samples')} samples, "
            f"{entry.get('n_items', '?')} recordings, {entry.get('n_captions', '?')} captions; metrics `{name}/...`"
        )
    from mtrun.run_report import leakage_line

    leaked = leakage_line(results)
    if leaked:
        lines.append(f"- **leakage filter**: {leaked.removeprefix('Leakage filter: ')}")
    if results.get("warning"):
        lines.append(f"- **warning**: {results['warning']}")
    lines += [
        "",
        "Retrieval: R@k and mAP@10 in %, ranks 1-based; ties counted pessimistically; a clip with "
        "several captions counts as found at the best rank of its captions; intervals are 95% "
        "bootstrap intervals over audio items; `subset` rows average random subsets (see "
        "docs/evaluation.md).",
        "",
    ]
    lines += _tables(metrics)
    for title, name in figures:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    skipped = results.get("skipped") or []
    if skipped:
        lines += [f"## Skipped samples ({len(skipped)})", "", "| id | reason |", "|---|---|"]
        lines += [f"| {s['id']} | {str(s['reason']).replace('|', '/')} |" for s in skipped]
        lines.append("")
    path = out / REPORT_MD
    step[0] = REPORT_MD
    _write_atomic(path, lambda f: f.write("\n".join(lines)))
    return path
