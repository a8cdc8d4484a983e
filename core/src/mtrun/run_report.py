"""The run report: ``RUN/report.md`` with training curves beside the evaluation, and the
console summary a training run ends with.

``write_run_report(RUN)`` reads ``RUN/metrics.jsonl`` and draws four figures into
``RUN/curves/``: the training loss (with the validation loss where it was computed), the
learning rate, the objectives' temperatures (InfoNCE's learnable or fixed one, where logged)
and the validation metrics (R@k, accuracies, AUCs, R², ...) over steps. Each PNG carries the
numbers it plots in its ``mtrun:series`` text chunk and ``curves/curves.json`` holds them all,
so what a figure shows can be checked against the log. The report then gives the newest
evaluation's headline table with its 95% intervals and links that evaluation's own report and
figures. The runner writes it at the end of training; ``mtrun report RUN`` writes it again.
Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "CURVES_DIR",
    "RUN_REPORT",
    "configure",
    "curve_series",
    "headline_rows",
    "leakage_line",
    "print_summary",
    "read_metrics",
    "run",
    "write_run_report",
]

RUN_REPORT = "report.md"
CURVES_DIR = "curves"

_HEADLINE = [
    (re.compile(r"^retrieval/t2a/(R@1)$"), "text→music {0}"),
    (re.compile(r"^retrieval/t2a/(R@10)$"), "text→music {0}"),
    (re.compile(r"^retrieval/t2a/(median_rank)$"), "text→music {0}"),
    (re.compile(r"^retrieval/a2t/(R@1)$"), "music→text {0}"),
    (re.compile(r"^retrieval/a2t/(R@10)$"), "music→text {0}"),
    (re.compile(r"^retrieval/a2t/(median_rank)$"), "music→text {0}"),
    (re.compile(r"^zero-shot/([^/]+)/(accuracy|roc_auc|pr_auc|mAR)$"), "zero-shot {0} {1}"),
    (re.compile(r"^probe/([^/]+)/(accuracy|roc_auc|pr_auc|r2)$"), "probe {0} {1}"),
    (re.compile(r"^modality-gap/(centroid_distance|logreg_accuracy)$"), "modality gap: {0}"),
]
_VALIDATION = re.compile(r"^val/(?!.*(/subset/|:|/n_)).*/(R@\d+|accuracy|roc_auc|pr_auc|mAR|r2|logreg_accuracy)$")
_MAX_VALIDATION_LINES = 8


# ------------------------------------------------------------------------------ numbers


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``RUN/metrics.jsonl`` (a line cut short by a kill is skipped).

    Raises:
        MtrunError: The file exists but cannot be read (permissions, I/O error), naming it.
    """
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    if not path.is_file():
        return records
    from mtrun.errors import MtrunError

    try:
        text = path.read_text(encoding="utf-8", errors="replace")  # a damaged line is skipped below
    except OSError as exc:
        raise MtrunError(f"cannot read {path} ({exc.strerror or exc})") from None
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def _points(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(int(r["step"]))
            ys.append(float(value))
    return xs, ys


def curve_series(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The series each figure plots: ``{figure: {"title", "ylabel", "lines": {label: {"step": [...],
    "value": [...]}}}}``; figures with nothing logged, and validation metrics logged at one step
    only, are left out."""
    keys = {k for r in records for k in r}
    figures: dict[str, dict[str, Any]] = {
        "loss": {"title": "Loss", "ylabel": "loss", "lines": {}},
        "learning_rate": {"title": "Learning rate", "ylabel": "learning rate", "lines": {}},
        "temperature": {"title": "Temperature", "ylabel": "temperature", "lines": {}},
        "validation": {"title": "Validation metrics", "ylabel": "value", "lines": {}},
    }
    plan = [("loss", "loss", "training loss"), ("loss", "val/loss", "validation loss"), ("learning_rate", "lr", "learning rate")]
    plan += [("temperature", k, k) for k in sorted(keys) if k.endswith("/temperature") and not k.startswith("val/")]
    plan += [("validation", k, k[len("val/"):]) for k in sorted(keys, key=_validation_order) if _VALIDATION.match(k)][:_MAX_VALIDATION_LINES]
    for figure, key, label in plan:
        xs, ys = _points(records, key)
        if xs:
            figures[figure]["lines"][label] = {"step": xs, "value": ys}
    # One validation round (eval_every = 0: only the final one) makes a figure of single dots:
    # its numbers are in the evaluation's section instead.
    if all(len(line["step"]) < 2 for line in figures["validation"]["lines"].values()):
        figures["validation"]["lines"] = {}
    return {name: fig for name, fig in figures.items() if fig["lines"]}


def _validation_order(key: str) -> tuple[int, str]:
    return (0 if "/retrieval/" in key else 1, key)


def headline_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(label, value, interval)`` of the headline metrics among ``metrics``, in a fixed order.

    An evaluation set's metrics (``musiccaps/retrieval/t2a/R@10``) come after the training
    source's, set by set, labelled with the set's name (``musiccaps: text→music R@10``).
    """
    by_prefix: dict[str, list[tuple[int, str, str, tuple[str, ...]]]] = {"": []}
    for key in metrics:
        if not isinstance(metrics[key], (int, float)):
            continue
        for order, (pattern, label) in enumerate(_HEADLINE):
            prefix, match = "", pattern.match(key)
            if not match and "/" in key:
                prefix, rest = key.split("/", 1)
                match = pattern.match(rest)
            if match:
                words = tuple(g.replace("_", " ") for g in match.groups())
                by_prefix.setdefault(prefix, []).append((order, key, label, words))
                break
    rows = []
    for prefix, found in by_prefix.items():
        for _, key, label, words in sorted(found, key=lambda f: f[0]):
            unit = " (%)" if re.search(r"R@\d+$|accuracy$|roc_auc$|pr_auc$|mAR$", key) and "modality-gap/" not in key else ""
            low, high, std = metrics.get(f"{key}:ci_low"), metrics.get(f"{key}:ci_high"), metrics.get(f"{key}:std")
            value = metrics[key]
            if low is not None and high is not None:
                value_text, low_text, high_text = _fmt_together(value, low, high)
                interval = f"[{low_text}, {high_text}]"
            elif std is not None:
                value_text, std_text = _fmt_together(value, std)
                interval = f"sd {std_text} over seeds (not a CI)"
            else:
                value_text, interval = _fmt(value), ""
            text = label.format(*words) + unit
            rows.append((f"{prefix}: {text}" if prefix else text, value_text, interval))
    return rows


def leakage_line(result: Mapping[str, Any]) -> str | None:
    """What the leakage filter left out of training, from an ``eval.json``'s ``leakage``."""
    leakage = result.get("leakage")
    if not isinstance(leakage, Mapping) or "splits" not in leakage:
        return None
    by_set: dict[str, int] = {}
    for entry in leakage["splits"].values():
        for name, n in (entry.get("by_set") or {}).items():
            by_set[name] = by_set.get(name, 0) + int(n)
    shared = ", ".join(f"{name} {n}" for name, n in by_set.items()) or "none"
    splits = ", ".join(f"{entry.get('removed', 0)} of {entry.get('total', '?')} {split!r}" for split, entry in leakage["splits"].items())
    return (
        f"Leakage filter: {leakage.get('removed', 0)} training item(s) share a recording with an evaluation set "
        f"and were left out of training ({splits}; by set: {shared})."
    )


def _fmt(value: Any) -> str:
    return _fmt_together(value)[0]


def _fmt_together(*values: Any) -> tuple[str, ...]:
    """A value and its interval bounds (or spread) with one number of decimals, set by the
    first: whole numbers stay whole (a median rank ``9 [8, 10]``), from 10 up one decimal
    (``55.7 [51.4, 59.9]``), below it three significant digits (``7.14 [4.14, 10.20]``)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if finite and all(v.is_integer() for v in finite):
        decimals = 0
    else:
        lead = abs(float(values[0])) if finite and values[0] is not None and math.isfinite(float(values[0])) else 0.0
        decimals = 1 if lead >= 10 else (3 if lead == 0 else max(0, 2 - math.floor(math.log10(lead))))
    return tuple("–" if v is None or not math.isfinite(float(v)) else f"{float(v):.{decimals}f}" for v in values)


# ------------------------------------------------------------------------------ figures


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _plot(name: str, figure: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, line in figure["lines"].items():
        marker = "o" if len(line["step"]) < 30 else None
        ax.plot(line["step"], line["value"], label=label, marker=marker, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(figure["ylabel"])
    ax.set_title(figure["title"])
    if name == "learning_rate":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(alpha=0.3)
    if len(figure["lines"]) > 1 or name in ("temperature", "validation"):
        ax.legend(fontsize=7)
    fig.tight_layout()
    series = json.dumps({"figure": name, "lines": figure["lines"]})
    try:
        _write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110, metadata={"mtrun:series": series}))
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------- report


def _latest_eval(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete evaluation in the run folder: test before other splits, then the
    largest step, then the newest folder."""
    found = []
    for path in run_dir.glob("eval-*/eval.json"):
        if not (path.parent / "report.md").is_file():
            continue  # report.md is written last: without it the evaluation is incomplete
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        step = result.get("step") if isinstance(result.get("step"), int) else -1
        found.append(((result.get("split") == "test", step, path.stat().st_mtime), path.parent, result))
    if not found:
        return None
    _, folder, result = max(found, key=lambda f: f[0])
    return folder, result


def write_run_report(run_dir: str | os.PathLike[str]) -> Path:
    """Write ``RUN/report.md`` and ``RUN/curves/*.png`` from the run's log and evaluations.

    Raises:
        MtrunError: ``run_dir`` is not a run folder (no ``metrics.jsonl`` or ``recipe.toml``).
    """
    from mtrun.errors import MtrunError

    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not ((run_dir / "metrics.jsonl").is_file() or (run_dir / "recipe.toml").is_file()):
        raise MtrunError(f"mtrun report: {run_dir} is not a run folder (it holds no metrics.jsonl or recipe.toml)")
    records = read_metrics(run_dir)
    series = curve_series(records)
    curves = run_dir / CURVES_DIR
    curves.mkdir(exist_ok=True)
    for stale in curves.glob("*.png"):
        if stale.stem not in series:
            stale.unlink(missing_ok=True)
    for name, figure in series.items():
        _plot(name, figure, curves / f"{name}.png")
    _write_atomic(curves / "curves.json", lambda f: f.write((json.dumps(series, indent=1) + "\n").encode("utf-8")))

    train_steps = [int(r["step"]) for r in records if "loss" in r]
    lines = [f"# Run report: {run_dir.name}", ""]
    if train_steps:
        lines.append(f"- **steps logged**: {train_steps[0]} to {train_steps[-1]} ({len(train_steps)} training records)")
    if (run_dir / "recipe.toml").is_file():
        lines.append("- **recipe**: [recipe.toml](recipe.toml) (resolved: extends, profile and overrides applied)")
    from mtrun.train.checkpoint import find_best, find_latest

    root = run_dir / "checkpoints"
    best = find_best(root) if root.is_dir() else None
    latest = find_latest(root) if root.is_dir() else None
    if best is not None:
        lines.append(f"- **best checkpoint**: `checkpoints/{best.name}`")
    if latest is not None and latest != best:
        lines.append(f"- **latest checkpoint**: `checkpoints/{latest.name}`")
    lines.append("")

    evaluation = _latest_eval(run_dir)
    lines += ["## Evaluation", ""]
    if evaluation is None:
        lines += ["No evaluation has been written in this run folder yet (`mtrun eval RUN` writes one).", ""]
    else:
        folder, result = evaluation
        what = []
        if result.get("split") is not None:
            what.append(f"Split `{result.get('split')}`, step {result.get('step')}: {result.get('n_items', '?')} recordings, {result.get('n_captions', '?')} captions")
        for name, entry in (result.get("sets") or {}).items():
            what.append(
                f"evaluation set `{name}` ({entry.get('type')}, split `{entry.get('split')}`): "
                f"{entry.get('n_items', '?')} recordings, {entry.get('n_captions', '?')} captions"
            )
        leaked = leakage_line(result)
        lines += [
            ("; ".join(what) if result.get("split") is not None else f"Step {result.get('step')}: " + "; ".join(what)) + ". 95% bootstrap intervals over recordings. "
            f"Every metric, with its interval: [{folder.name}/report.md]({folder.name}/report.md).",
            "",
            *([leaked, ""] if leaked else []),
            "| metric | value | 95% CI |",
            "|---|---:|---|",
        ]
        lines += [f"| {label} | {value} | {ci} |" for label, value, ci in headline_rows(result.get("metrics") or {})]
        lines.append("")
        for figure in result.get("figures") or []:
            lines += [f"![{figure}]({folder.name}/{figure})", ""]

    lines += ["## Training curves", ""]
    if not series:
        lines += ["Nothing was logged yet (`metrics.jsonl` is empty or missing).", ""]
    for name, figure in series.items():
        shown = ", ".join(figure["lines"])
        lines += [f"### {figure['title']}", "", f"![{figure['title']}]({CURVES_DIR}/{name}.png)", "", f"Lines: {shown}.", ""]
    if "temperature" not in series:
        lines += ["No objective logged a temperature.", ""]
    lines.append(f"The numbers behind the figures: [{CURVES_DIR}/curves.json]({CURVES_DIR}/curves.json).")
    path = run_dir / RUN_REPORT
    _write_atomic(path, lambda f: f.write(("\n".join(lines) + "\n").encode("utf-8")))
    return path


# ------------------------------------------------------------------------------ summary


def print_summary(result: Mapping[str, Any], file: Any = None) -> None:
    """The end of a training run on the console: headline test metrics with their intervals,
    then where the reports and the checkpoint are (``report:``, ``run report:``, ``checkpoint:``)."""
    from rich.markup import escape
    from rich.table import Table

    from mtrun.console import make_console

    console = make_console(file=file)
    report = result.get("report")
    evaluation = None
    if report:
        try:
            evaluation = json.loads((Path(report).parent / "eval.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            evaluation = None
    if evaluation is not None and headline_rows(evaluation.get("metrics") or {}):
        title = f"{evaluation.get('split')} split, step {evaluation.get('step')}: {evaluation.get('n_items', '?')} recordings, {evaluation.get('n_captions', '?')} captions"
        if evaluation.get("sets"):  # evaluation sets: each with its own counts
            parts = [f"{evaluation.get('split')} split: {evaluation.get('n_items', '?')} recordings"] if evaluation.get("split") is not None else []
            parts += [
                f"{name}: {entry.get('n_items', '?')} recordings, {entry.get('n_captions', '?')} captions"
                for name, entry in evaluation["sets"].items()
            ]
            title = f"step {evaluation.get('step')}; " + "; ".join(parts)
        table = Table(
            title=escape(title),
            title_justify="left",
        )
        for column, justify in (("metric", "left"), ("value", "right"), ("95% CI", "left")):
            table.add_column(column, justify=justify)
        for label, value, ci in headline_rows(evaluation["metrics"]):
            table.add_row(escape(label), value, ci)
        console.print(table)
        leaked = leakage_line(evaluation)
        if leaked:
            console.print(escape(leaked), highlight=False)
    else:
        shown = "  ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in result.items()
            if k in ("step", "loss", "val/loss") and isinstance(v, (int, float))
        )
        console.print(f"trained: {shown}" if shown else "trained")
    for label, key in (("report:", "report"), ("run report:", "run_report"), ("checkpoint:", "checkpoint")):
        if result.get(key):
            console.print(f"{label:<11} {escape(str(result[key]))}", highlight=False)


# ------------------------------------------------------------------------------------ CLI


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare ``mtrun report``'s arguments."""
    parser.description = "Write RUN/report.md again: training curves (PNG) beside the newest evaluation's tables and figures."
    parser.add_argument("run_dir", metavar="RUN", help="a run folder")


def run(args: argparse.Namespace) -> int:
    """Handle ``mtrun report``."""
    path = write_run_report(args.run_dir)
    print(f"wrote {path}")
    return 0
