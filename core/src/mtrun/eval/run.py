"""Run evaluation tasks on one split of a data source and write the report.

:func:`evaluate_run` is the one entry point shared by ``mtrun eval`` and the runner after
training, so a number in a run folder's report was computed the same way whichever started it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from mtrun.errors import MtrunError

__all__ = ["EvalError", "default_out_dir", "evaluate_run", "evaluate_trained"]

log = logging.getLogger(__name__)


class EvalError(MtrunError):
    """Evaluation cannot run as asked (no such split, no samples, no checkpoint to read)."""


def default_out_dir(run_dir: str | os.PathLike[str], split: str, step: int | None) -> Path:
    """``RUN/eval-SPLIT-STEP`` (``eval-SPLIT-untrained`` when no checkpoint was loaded)."""
    return Path(run_dir) / f"eval-{split}-{'untrained' if step is None else step}"


def unused_dir(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... if it exists: a later evaluation (other tasks,
    other overrides) never overwrites the report that training or an earlier one wrote."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _labelled(tasks: Sequence[Any] | Mapping[str, Any]) -> list[tuple[str, Any]]:
    if isinstance(tasks, Mapping):
        return list(tasks.items())
    out, seen = [], {}
    for task in tasks:
        name = getattr(task, "name", None) or type(task).__name__.lower()
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}-{seen[name]}", task))
    return out


def evaluate_run(
    system: Any,
    data: Any,
    tasks: Sequence[Any] | Mapping[str, Any] = (),
    split: str = "test",
    out_dir: str | os.PathLike[str] | None = None,
    *,
    run: Any = None,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``system`` on ``data.load(split)`` with every task; write the report.

    Args:
        system: The assembled :class:`mtrun.system.System` (on its device; left in the
            train/eval mode it was in).
        data: The data source.
        tasks: Built eval tasks (``Assembly.evals``), or ``{label: task}``. Empty = retrieval
            with default settings.
        split: The split to evaluate.
        out_dir: Where ``eval.json``, ``report.md`` and the PNGs go; ``None`` writes nothing.
        run: The :class:`mtrun.run.Run`, for the default task's inference window length.
        info: Extra JSON-able context stored in ``eval.json`` (checkpoint, step, source).

    Returns:
        ``{"split", "n_samples", "metrics": {name: float}, "tasks": {label: {...}},
        "skipped": [{"id", "reason"}], "out_dir"}`` plus ``info``.

    Raises:
        EvalError: The data source has no such split, or it is empty.
    """
    from mtrun.eval.embed import EvalCache

    splits = list(data.splits())
    if split not in splits:
        raise EvalError(f"the data source has no split {split!r} to evaluate (it has: {', '.join(splits) or 'none'})")
    samples = data.load(split)
    if len(samples) == 0:
        raise EvalError(f"split {split!r} of the data source is empty; nothing to evaluate")
    labelled = _labelled(tasks)
    if not labelled:
        from mtrun.eval.retrieval import Retrieval

        labelled = [("retrieval", Retrieval(Retrieval.Config(), run=run))]

    cache = EvalCache()
    metrics: dict[str, float] = {}
    per_task: dict[str, dict[str, float]] = {}
    for label, task in labelled:
        found = {k: float(v) for k, v in task.evaluate(system, samples, cache=cache).items()}
        per_task[label] = found
        metrics.update(found)
    embedded = cache.all()
    skipped: dict[str, str] = {}
    for emb in embedded:
        skipped.update(dict(emb.skipped))
    result: dict[str, Any] = {
        **dict(info or {}),
        "split": split,
        "n_samples": len(samples),
        "metrics": metrics,
        "tasks": per_task,
        "skipped": [{"id": i, "reason": r} for i, r in skipped.items()],
        "out_dir": str(out_dir) if out_dir is not None else None,
    }
    if embedded:
        result["n_items"] = len(embedded[0].audio)
        result["n_captions"] = len(embedded[0].texts)
    if out_dir is not None:
        from mtrun.eval.report import write_report

        write_report(out_dir, result, embedded[0] if embedded else None)
    return result


def evaluate_trained(assembly: Any, run: Any, *, split: str = "test", step: int | None = None) -> dict[str, Any] | None:
    """After training: evaluate the assembled system on ``split`` into ``RUN/eval-SPLIT-STEP``.

    Uses the recipe's ``[[eval]]`` tasks (retrieval when there are none). Returns ``None``, with
    a log line, when the data source has no such split, so a source without a test split does
    not fail a finished training run. Call it on rank 0 only.
    """
    if split not in list(assembly.data.splits()):
        log.warning("no %r split in the data source; skipping the evaluation after training", split)
        return None
    return evaluate_run(
        assembly.system,
        assembly.data,
        assembly.evals,
        split,
        default_out_dir(run.dir, split, step),
        run=run,
        info={"step": step, "source": run.recipe_path},
    )
