"""Running an ablation: validate every run first, then run them one at a time, resumably.

Each run is its own ``mtrun`` process (a crash or a leak in one variant cannot touch the
next), always started with ``run.resume=latest``: a run killed half-way continues from its last
checkpoint, and one that finished is not started again. The sweep folder
(``OUTPUT_DIR/SWEEP/``) holds one run folder per (variant, seed) and ``ablation.json``, the
plan and each finished run's metrics, rewritten atomically after every run, so the table can be
made at any point and a rerun of the same command picks up where the last one stopped.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from mtrun.ablation.plan import AblationPlan, Run
from mtrun.cache import write_atomic
from mtrun.errors import MtrunError, RecipeError

__all__ = ["STATE_FILE", "TRAIN_THROUGHPUT", "command", "is_done", "read_state", "run_metrics", "sweep", "training_throughput", "validate_plan"]

STATE_FILE = "ablation.json"


def command(plan: AblationPlan, run: Run, sweep_name: str, output_dir: Path) -> list[str]:
    """The ``mtrun`` command line of one run (resumable: ``run.resume=latest``)."""
    profile = ["--profile", plan.profile] if plan.profile else []
    return [
        sys.executable, "-m", "mtrun.cli", str(plan.recipe), *profile, *plan.common,
        *run.overrides(sweep_name, output_dir), "run.resume=latest",
    ]


def validate_plan(plan: AblationPlan, registry: Any) -> None:
    """Load and resolve every variant's recipe before anything runs.

    Raises:
        MtrunError: Naming every variant that does not validate, with its problems.
    """
    from mtrun.recipe import load_recipe, resolve_recipe

    failures = []
    for variant in plan.variants:
        try:
            data = load_recipe(plan.recipe, overrides=[*plan.common, *variant.overrides], profile=plan.profile)
            resolve_recipe(data, registry, str(plan.recipe))
        except RecipeError as exc:
            failures.append(f"variant {variant.name!r} ({'; '.join(variant.overrides) or 'the recipe as it is'}):\n    {exc}")
        except MtrunError as exc:
            failures.append(f"variant {variant.name!r}: {exc}")
    if failures:
        raise MtrunError(f"{plan.recipe}: {len(failures)} of {len(plan.variants)} ablation variants do not validate; nothing was run.\n" + "\n".join(failures))


TRAIN_THROUGHPUT = "train/samples_per_s"


def training_throughput(run_dir: Path) -> float | None:
    """Samples per second over the whole training run, from ``metrics.jsonl``'s log records:
    all steps over all time (each window's steps over its rate, summed), so a slow window counts
    for the time it took. ``None`` without records (a run that logged nothing)."""
    from mtrun.errors import MtrunError
    from mtrun.run_report import read_metrics

    try:
        records = read_metrics(run_dir)  # lines cut by a crash, and non-records, are skipped
    except MtrunError:
        return None  # an unreadable file: that cell of the table stays empty, the others are kept
    steps = seconds = 0.0
    previous = 0
    for record in records:
        rate, step = record.get("samples_per_s"), record.get("step")
        if not (isinstance(rate, (int, float)) and isinstance(step, int) and rate > 0 and step > previous):
            continue  # evaluation records carry no rate
        steps += step - previous
        seconds += (step - previous) / rate
        previous = step
    return steps / seconds if seconds else None


def run_metrics(run_dir: Path, split: str) -> dict[str, float] | None:
    """The finished run's metrics on ``split``: its newest complete evaluation of that split
    (``eval-SPLIT-STEP/eval.json`` with ``report.md`` beside it), ``None`` when there is none;
    with :data:`TRAIN_THROUGHPUT`, the training's samples/s, beside them."""
    best: tuple[int, dict[str, float]] | None = None
    for path in run_dir.glob(f"eval-{split}*/eval.json"):
        if not (path.parent / "report.md").is_file():
            continue  # written last: without it the evaluation did not finish
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        step = result.get("step") if isinstance(result.get("step"), int) else -1
        metrics = {k: float(v) for k, v in result.get("metrics", {}).items() if isinstance(v, (int, float))}
        if best is None or step > best[0]:
            best = (step, metrics)
    if best is None:
        return None
    throughput = training_throughput(run_dir)
    if throughput is not None:
        best[1][TRAIN_THROUGHPUT] = throughput
    return best[1]


def is_done(run_dir: Path, split: str) -> bool:
    """The run wrote its run report (its last act) and an evaluation of ``split``."""
    return (run_dir / "report.md").is_file() and run_metrics(run_dir, split) is not None


def read_state(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):  # nothing run yet (or no such folder)
        return {"runs": {}}
    except (OSError, ValueError) as exc:
        raise MtrunError(f"{path} is unreadable ({exc}); delete it to rebuild it from the run folders") from None


def _write_state(sweep_dir: Path, plan: AblationPlan, runs: dict[str, Any]) -> None:
    state = {
        "recipe": str(plan.recipe),
        "profile": plan.profile,
        "seeds": list(plan.seeds),
        "metrics": list(plan.metrics),
        "baseline": plan.baseline,
        "split": plan.split,
        "variants": [{"name": v.name, "overrides": list(v.overrides)} for v in plan.variants],
        "runs": runs,
    }
    write_atomic(sweep_dir / STATE_FILE, lambda f: f.write((json.dumps(state, indent=1) + "\n").encode("utf-8")))


def sweep(
    plan: AblationPlan,
    sweep_name: str,
    output_dir: Path,
    *,
    say: Callable[[str], None] = print,
    runner: Callable[[Sequence[str]], int] | None = None,
) -> dict[str, Any]:
    """Run every run that is not done, in order; record each finished run's metrics.

    Args:
        runner: Runs one command and returns its exit status (default: a subprocess, its
            output passed through).

    Returns:
        The state: ``runs`` maps run name to ``{"variant", "seed", "metrics", "folder"}``.

    Raises:
        MtrunError: A run failed; the runs before it are recorded and a rerun resumes.
    """
    sweep_dir = output_dir / sweep_name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = dict(read_state(sweep_dir).get("runs", {}))
    todo = plan.runs
    for i, run in enumerate(todo, 1):
        folder = sweep_dir / run.name
        label = f"[{i}/{len(todo)}] {run.variant.name}, seed {run.seed}"
        if is_done(folder, plan.split):
            say(f"{label}: done already ({folder})")
        else:
            cmd = command(plan, run, sweep_name, output_dir)
            say(f"{label}: {shlex.join(cmd[2:])}")
            started = time.perf_counter()
            status = (runner or _subprocess)(cmd)
            if status != 0 or not is_done(folder, plan.split):
                _write_state(sweep_dir, plan, runs)
                why = f"exited with status {status}" if status != 0 else f"finished without an evaluation of the {plan.split!r} split"
                raise MtrunError(
                    f"ablation run {run.name} ({run.variant.name}, seed {run.seed}) {why}; its folder is {folder}. "
                    "Fix the cause and run the same command again: finished runs are kept and this one resumes."
                )
            say(f"{label}: finished in {time.perf_counter() - started:.0f} s")
        runs[run.name] = {"variant": run.variant.name, "seed": run.seed, "folder": str(folder), "metrics": run_metrics(folder, plan.split)}
        _write_state(sweep_dir, plan, runs)
    return {"runs": runs}


def _subprocess(cmd: Sequence[str]) -> int:
    return subprocess.run(list(cmd), check=False).returncode
