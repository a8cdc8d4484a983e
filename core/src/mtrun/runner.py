"""`mtrun RECIPE`: read and check the recipe, prepare the run folder, build, train."""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any, Sequence

from mtrun.errors import MtrunError

__all__ = ["prepare", "train"]

RECIPE_FILE = "recipe.toml"


def _has_checkpoints(run_dir: Path) -> bool:
    ckpts = run_dir / "checkpoints"
    return ckpts.is_dir() and any(p.name.startswith("step-") and ".tmp" not in p.name for p in ckpts.iterdir())


def _write_recipe(run_dir: Path, text: str) -> None:
    """Write the resolved recipe; a different one from an earlier start is kept, not overwritten."""
    path = run_dir / RECIPE_FILE
    if path.exists():
        if path.read_text() == text:
            return
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path.rename(run_dir / f"recipe.{stamp}.toml")
    tmp = run_dir / f".{RECIPE_FILE}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare(
    recipe_path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    profile: str | None = None,
    resume: bool = False,
    registry: Any = None,
):
    """Resolve the recipe and decide the run folder; returns ``(resolved, run)``.

    Refuses to start a fresh run in a folder that already holds checkpoints (that would mix
    two trajectories and overwrite the first); ``--resume`` or a new ``run.name`` is needed.
    """
    from mtrun.plugins import get_plugins
    from mtrun.recipe import load_recipe, resolve_recipe
    from mtrun.run import Run

    source = str(recipe_path)
    data = load_recipe(recipe_path, overrides=overrides, profile=profile)
    if resume:
        data.setdefault("run", {})["resume"] = "latest"
    resolved = resolve_recipe(data, registry if registry is not None else get_plugins().registry, source)
    run_dir = Path(resolved.run.output_dir) / resolved.run.name
    # The trainer starts fresh when "latest" finds nothing, so job scripts can always resume.
    if not resolved.run.resume and _has_checkpoints(run_dir):
        raise MtrunError(
            f"{source}: run folder {run_dir} already holds checkpoints of an earlier run. "
            f"Continue it with `mtrun {source} --resume`, or start another with run.name=NEW_NAME."
        )
    run = Run(dir=run_dir, config=resolved.run, loader=resolved.loader, recipe=resolved.data, recipe_path=source)
    return resolved, run


def train(
    recipe_path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    profile: str | None = None,
    resume: bool = False,
    registry: Any = None,
) -> dict[str, float]:
    """Train as the recipe says; returns the trainer's final metrics."""
    import torch

    from mtrun.assemble import assemble
    from mtrun.recipe import dump_recipe

    resolved, run = prepare(recipe_path, overrides, profile, resume, registry)
    if int(os.environ.get("RANK", "0")) == 0:
        run.dir.mkdir(parents=True, exist_ok=True)
        _write_recipe(run.dir, dump_recipe(resolved.data))
    if run.config.threads:
        # Tiny models on a 2-core machine shared with other jobs: with 2 OpenMP threads each
        # small operator waits at a barrier for a core someone else holds (measured 3x slower
        # training than 1 thread under load); the default stays PyTorch's.
        torch.set_num_threads(run.config.threads)
    torch.manual_seed(run.config.seed)  # parameter initialisation is part of the trajectory
    built = assemble(resolved, run)
    metrics = built.trainer.fit()
    if int(os.environ.get("RANK", "0")) == 0:
        report, checkpoint = _evaluate_best(built, run, int(metrics.get("step", 0)))
        if report is not None:
            metrics["report"] = str(Path(report["out_dir"]) / "report.md")
        if checkpoint is not None:
            metrics["checkpoint"] = str(checkpoint)
        run_report = _write_run_report(run.dir)
        if run_report is not None:
            metrics["run_report"] = str(run_report)
    return metrics


def _evaluate_best(built: Any, run: Any, final_step: int) -> tuple[dict[str, Any] | None, Path | None]:
    """Evaluate the best checkpoint (by the trainer's best metric; the final weights when no
    evaluation picked one) on the test split and write the report into the run folder.
    Returns the evaluation's result and the checkpoint it used."""
    from mtrun.eval.run import evaluate_trained
    from mtrun.train.checkpoint import find_best, find_latest, read_model_state

    root = run.dir / "checkpoints"
    best = find_best(root) if root.is_dir() else None
    step = final_step
    if best is not None:
        built.system.load_state_dict(read_model_state(best))
        step = int(best.name.split("-")[-1])
    checkpoint = best or (find_latest(root) if root.is_dir() else None)
    return evaluate_trained(built, run, split="test", step=step), checkpoint


def _write_run_report(run_dir: Path) -> Path | None:
    """``RUN/report.md`` with the training curves; a failure is a warning, not a failed run
    (the checkpoints and the evaluation are written; ``mtrun report RUN`` tries again)."""
    import sys

    from mtrun.run_report import write_run_report

    try:
        return write_run_report(run_dir)
    except (OSError, MtrunError, ValueError) as exc:
        print(f"WARNING: could not write {run_dir / 'report.md'}: {exc}. Try again with `mtrun report {run_dir}`.", file=sys.stderr)
        return None
