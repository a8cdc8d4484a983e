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

__all__ = ["EvalError", "EvalSetupError", "check_evaluation", "check_tasks", "default_out_dir", "evaluate_run", "evaluate_trained"]

log = logging.getLogger(__name__)


class EvalError(MtrunError):
    """Evaluation cannot run as asked (no such split, no samples, no checkpoint to read)."""


class EvalSetupError(EvalError):
    """The recipe asks for an evaluation its data cannot serve, found before training: a
    problem of the recipe's, so it exits like one (status 2)."""

    exit_code = 2


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
    """``(label, task)`` pairs of tasks given as ``{label: task}``, as such pairs already (an
    evaluation set's), or as bare tasks (labelled by their ``name`` or class)."""
    if isinstance(tasks, Mapping):
        return list(tasks.items())
    tasks = list(tasks)
    if all(isinstance(t, tuple) and len(t) == 2 and isinstance(t[0], str) for t in tasks):
        return tasks
    out, seen = [], {}
    for task in tasks:
        name = getattr(task, "name", None) or type(task).__name__.lower()
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}-{seen[name]}", task))
    return out


def _samples(source: Any, split: str, where: str, table: str | None = None) -> Sequence[Any]:
    import contextlib

    from mtrun.eval.sets import set_errors

    with set_errors(table) if table else contextlib.nullcontext():
        splits = list(source.splits())
        if split not in splits:
            from mtrun.registry import suggest

            hint = suggest(split, splits)
            raise EvalError(f"{where} has no split {split!r} to evaluate ("
                            + (f"did you mean {hint!r}?; " if hint else "") + f"it has: {', '.join(splits) or 'none'})")
        samples = source.load(split)
    if len(samples) == 0:
        raise EvalError(f"split {split!r} of {where} is empty; nothing to evaluate")
    return samples


def _check_captions(labelled: Sequence[tuple[str, Any]], samples: Sequence[Any], split: str, where: str) -> None:
    """Refuse a task that ranks captions on a split without any: it would report item counts
    and no R@k (``mtrun validate`` catches the sources that declare it; this catches the rest,
    such as a manifest without a caption column)."""
    from mtrun.eval.sets import needs_captions

    if any(getattr(s, "captions", None) for s in samples):
        return
    for label, task in labelled:
        if needs_captions(task):
            raise EvalError(
                f"{label} on split {split!r} of {where}: its items have no captions, so there is nothing to rank. "
                "Evaluate retrieval on a captioned set: an [[eval]] entry with its own [eval.data] table (docs/evaluation.md)"
            )


def check_tasks(tasks: Sequence[Any] | Mapping[str, Any], samples: Sequence[Any], split: str, where: str) -> None:
    """Run each task's ``check_samples(samples)``, where it has one, on the samples it will evaluate.

    A setting that cannot work on them (a probe's category that labels no item) then fails
    before any embedding, and before training when the runner calls this at set-up, not after
    it. The message gains the split and the source.

    Raises:
        EvalError: A task's check refused the samples.
    """
    for _, task in _labelled(tasks):
        check = getattr(task, "check_samples", None)
        if check is None:
            continue
        try:
            check(samples)
        except MtrunError as exc:
            raise EvalError(f"{exc} (evaluating split {split!r} of {where})") from None


def check_evaluation(assembly: Any, *, split: str = "test", recipe: str | None = None) -> None:
    """Check the evaluation that follows training (:func:`evaluate_trained`) before it starts:
    the tasks on the training source's ``split`` (when it has one) and on each evaluation set,
    as :func:`evaluate_run` checks them. Messages start with the ``recipe`` file, when given.

    Raises:
        EvalError: As :func:`check_tasks`; a split without captions for a task that ranks
            them; an evaluation set's split missing or empty.
    """
    tasks, sets = _after_training(assembly, split)
    labelled = _labelled(tasks)
    try:
        if labelled:
            samples = assembly.data.load(split)
            _check_captions(labelled, samples, split, "the data source ([data])")
            check_tasks(labelled, samples, split, "the data source ([data])")
        _checked_sets(sets)
    except EvalError as exc:
        raise EvalSetupError(f"{recipe}: {exc}" if recipe else str(exc)) from None


def _checked_sets(sets: Sequence[Any]) -> list[Sequence[Any]]:
    """Each evaluation set's samples, loaded and checked (:func:`_check_captions`, :func:`check_tasks`)."""
    loaded = []
    for s in sets:
        samples = _samples(s.source, s.split, f"evaluation set {s.name!r} ({s.where}, type {s.type!r})", s.where)
        _check_captions(s.tasks, samples, s.split, f"evaluation set {s.name!r} ({s.where})")
        check_tasks(s.tasks, samples, s.split, f"evaluation set {s.name!r} ({s.where})")
        loaded.append(samples)
    return loaded


def _run_tasks(
    system: Any, labelled: Sequence[tuple[str, Any]], samples: Sequence[Any], cache: Any, prefix: str = ""
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    metrics: dict[str, float] = {}
    per_task: dict[str, dict[str, float]] = {}
    for label, task in labelled:
        found = {f"{prefix}{k}": float(v) for k, v in task.evaluate(system, samples, cache=cache).items()}
        per_task[f"{prefix}{label}"] = found
        metrics.update(found)
    return metrics, per_task


def evaluate_run(
    system: Any,
    data: Any,
    tasks: Sequence[Any] | Mapping[str, Any] = (),
    split: str = "test",
    out_dir: str | os.PathLike[str] | None = None,
    *,
    run: Any = None,
    info: Mapping[str, Any] | None = None,
    sets: Sequence[Any] = (),
) -> dict[str, Any]:
    """Evaluate ``system`` on ``data.load(split)`` and on each evaluation set; write the report.

    Args:
        system: The assembled :class:`mtrun.system.System` (on its device; left in the
            train/eval mode it was in).
        data: The training data source.
        tasks: Built eval tasks on ``data`` (``EvalSets.training_tasks``), or ``{label: task}``.
            Empty, and no ``sets``: retrieval with default settings (when the split has captions).
        split: The split of ``data`` to evaluate.
        out_dir: Where ``eval.json``, ``report.md`` and the PNGs go; ``None`` writes nothing.
        run: The :class:`mtrun.run.Run`, for the default task's inference window length.
        info: Extra JSON-able context stored in ``eval.json`` (checkpoint, step, source).
        sets: Evaluation sets (:class:`mtrun.eval.sets.EvalSet`): each split evaluated with its
            tasks, metrics prefixed with the set's name (``musiccaps/retrieval/t2a/R@10``).

    Returns:
        ``{"split", "n_samples", "metrics": {name: float}, "tasks": {label: {...}},
        "skipped": [{"id", "reason"}], "out_dir"}`` plus ``info``; with sets, ``"sets": {name:
        {"type", "split", "n_samples", "n_items", "n_captions", "tasks"}}``. ``split`` and
        ``n_samples`` describe the training source's part (absent when no task evaluates it).

    Raises:
        EvalError: A source has no such split, it is empty, or a task that ranks captions
            meets a split without any.
    """
    from mtrun.eval.embed import EvalCache

    labelled = _labelled(tasks)
    cache = EvalCache()
    metrics: dict[str, float] = {}
    per_task: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    result: dict[str, Any] = {**dict(info or {})}
    first_embedded: Any = None
    own = bool(labelled) or not sets  # whether the training source's split is evaluated
    if own:
        samples = _samples(data, split, "the data source")
        if not labelled:
            from mtrun.eval.retrieval import Retrieval

            if any(s.captions for s in samples):
                labelled = [("retrieval", Retrieval(Retrieval.Config(), run=run))]
            else:
                log.warning("split %r of the data source has no captions: no retrieval to evaluate", split)
        _check_captions(labelled, samples, split, "the data source ([data])")
        check_tasks(labelled, samples, split, "the data source ([data])")
    set_samples = _checked_sets(sets)  # every set loaded and checked before anything is embedded
    if own:
        metrics, per_task = _run_tasks(system, labelled, samples, cache)
        embedded = cache.all()
        for emb in embedded:
            skipped.update(dict(emb.skipped))
        result.update({"split": split, "n_samples": len(samples)})
        if embedded:
            result["n_items"] = len(embedded[0].audio)
            result["n_captions"] = len(embedded[0].texts)
            first_embedded = embedded[0]
    described: dict[str, Any] = {}
    for s, samples in zip(sets, set_samples):
        before = len(cache.all())
        found, found_tasks = _run_tasks(system, s.tasks, samples, cache, prefix=f"{s.name}/")
        metrics.update(found)
        per_task.update(found_tasks)
        entry: dict[str, Any] = {"type": s.type, "split": s.split, "n_samples": len(samples), "tasks": [label for label, _ in s.tasks]}
        mine = cache.all()[before:] or cache.of(samples)
        for emb in mine:
            skipped.update({f"{s.name}/{i}": r for i, r in emb.skipped})
        if mine:
            entry["n_items"] = len(mine[0].audio)
            entry["n_captions"] = len(mine[0].texts)
            if first_embedded is None or not len(first_embedded.texts):
                first_embedded = mine[0]
        described[s.name] = entry
    result.update(
        {
            "metrics": metrics,
            "tasks": per_task,
            "skipped": [{"id": i, "reason": r} for i, r in skipped.items()],
            "out_dir": str(out_dir) if out_dir is not None else None,
        }
    )
    if described:
        result["sets"] = described
    if out_dir is not None:
        from mtrun.eval.report import write_report

        write_report(out_dir, result, first_embedded)
    return result


def _after_training(assembly: Any, split: str) -> tuple[Any, Sequence[Any]]:
    """What :func:`evaluate_trained` evaluates: the tasks on the training source's ``split``
    (none when the source lacks it) and the evaluation sets. :func:`check_evaluation` checks
    the same."""
    bound = getattr(assembly, "eval_sets", None)
    tasks = dict(bound.training_tasks) if bound is not None else assembly.evals
    if split not in list(assembly.data.splits()):
        tasks = {}
    return tasks, (bound.sets if bound is not None else ())


def evaluate_trained(assembly: Any, run: Any, *, split: str = "test", step: int | None = None) -> dict[str, Any] | None:
    """After training: evaluate the assembled system on ``split`` and on the evaluation sets,
    into ``RUN/eval-SPLIT-STEP``.

    Uses the recipe's ``[[eval]]`` tasks (retrieval when there are none). The training source's
    part is left out, with a log line, when it has no such split, so a source without a test
    split does not fail a finished training run (the evaluation sets are still evaluated).
    Returns ``None`` when nothing is left to evaluate. Call it on rank 0 only.
    """
    tasks, sets = _after_training(assembly, split)
    if split not in list(assembly.data.splits()):
        log.warning("no %r split in the data source; skipping its evaluation after training", split)
        if not sets:
            return None
    # With sets and no task on the training source, evaluate_run leaves its split alone.
    bound = getattr(assembly, "eval_sets", None)
    from mtrun.train.checkpoint import step_dir_name

    checkpoint = run.dir / "checkpoints" / step_dir_name(step)  # written before this evaluation
    info: dict[str, Any] = {"step": step, "source": run.recipe_path, "checkpoint": str(checkpoint) if checkpoint.is_dir() else None}
    leakage = bound.leakage() if bound is not None else None
    if leakage is not None:
        info["leakage"] = leakage
    return evaluate_run(
        assembly.system,
        assembly.data,
        tasks,
        split,
        default_out_dir(run.dir, split, step),
        run=run,
        info=info,
        sets=sets,
    )
