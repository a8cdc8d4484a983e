"""`mtrun RECIPE`: read and check the recipe, prepare the run folder, build, train."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from mtrun.errors import MtrunError, ResumeError

__all__ = ["apply_threads", "choose_threads", "prepare", "train", "usable_cores"]

RECIPE_FILE = "recipe.toml"

_log = logging.getLogger("mtrun.run")


def _has_checkpoints(run_dir: Path) -> bool:
    ckpts = run_dir / "checkpoints"
    return ckpts.is_dir() and any(p.name.startswith("step-") and ".tmp" not in p.name for p in ckpts.iterdir())


def _write_recipe(run_dir: Path, text: str) -> Path | None:
    """Write the resolved recipe; a different one from an earlier start is kept, not
    overwritten: renamed ``recipe.<time>.toml``, and that name returned."""
    path = run_dir / RECIPE_FILE
    kept = None
    if path.exists():
        if path.read_text() == text:
            return None
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        kept = run_dir / f"recipe.{stamp}.toml"
        path.rename(kept)
    tmp = run_dir / f".{RECIPE_FILE}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)
    return kept


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
        import shlex

        again = shlex.join(["mtrun", source, *(["--profile", profile] if profile else []), *overrides, "--resume"])
        raise MtrunError(
            f"{source}: run folder {run_dir} already holds checkpoints of an earlier run. "
            f"Continue it with `{again}`, or start another with run.name=NEW_NAME."
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
    recipe_file, had_recipe, kept, made_dir = run.dir / RECIPE_FILE, False, None, False
    if int(os.environ.get("RANK", "0")) == 0:
        made_dir = not run.dir.exists()
        run.dir.mkdir(parents=True, exist_ok=True)
        had_recipe = recipe_file.exists()
        kept = _write_recipe(run.dir, dump_recipe(resolved.data))
    threads, why = apply_threads(run)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"threads: {threads} ({why}); loader workers: {run.loader.num_workers}", flush=True)
    torch.manual_seed(run.config.seed)  # parameter initialisation is part of the trajectory
    try:
        built = assemble(resolved, run, encoder_cache=make_encoder_cache(run))
        if int(os.environ.get("RANK", "0")) == 0 and built.system.cached_modules:
            print(f"encoder cache ({run.config.encoder_cache}): {', '.join(built.system.cached_modules)}", flush=True)
        from mtrun.eval.run import check_evaluation

        check_evaluation(built, recipe=run.recipe_path)  # the evaluation after training: fail before it, not after
    except MtrunError:
        # Refused while setting up: a folder this call made, holding only the recipe, is no run.
        if made_dir and sorted(p.name for p in run.dir.iterdir()) == [RECIPE_FILE]:
            shutil.rmtree(run.dir, ignore_errors=True)
        raise
    if int(os.environ.get("RANK", "0")) == 0 and built.eval_sets is not None and built.eval_sets.sets:
        print(built.eval_sets.describe_leakage(), flush=True)  # reads the training split's metadata: the trainer reuses it
    try:
        metrics = built.trainer.fit()
    except ResumeError:
        # Refused before any step: the folder's recipe stays the one its checkpoints were trained with.
        if kept is not None:
            os.replace(kept, recipe_file)
        elif not had_recipe and int(os.environ.get("RANK", "0")) == 0:
            recipe_file.unlink(missing_ok=True)
        raise
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


def make_encoder_cache(run: Any) -> Any:
    """The ``[run].encoder_cache`` the recipe asks for (``None`` when off)."""
    choice = run.config.encoder_cache
    if choice == "off":
        return None
    from mtrun.encoder_cache import EncoderCache

    if run.loader.crop == "random":
        _log.warning(
            "[run].encoder_cache = %r with [loader].crop = 'random': crops rarely repeat, so the cache will "
            "hardly ever hit (and the disk copy grows every epoch); use crop = 'start' or 'center'", choice
        )
    return EncoderCache(disk=choice == "disk")


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask (``taskset``, Slurm, ``docker
    --cpuset-cpus``), capped by a cgroup CPU quota (``docker --cpus``, Kubernetes limits)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_quota(root: str | os.PathLike[str] = "/sys/fs/cgroup") -> int | None:
    """Whole cores allowed by the cgroup's CPU quota (rounded up), or ``None`` without one."""
    import math

    root = Path(root)
    try:  # cgroup v2: "QUOTA PERIOD", or "max PERIOD" for none
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:  # cgroup v1: the quota (-1 for none) and its period in two files
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        q, t = int(quota), int(period)
    except ValueError:  # "max"
        return None
    return max(1, math.ceil(q / t)) if q > 0 and t > 0 else None


def choose_threads(
    requested: int,
    workers: int,
    *,
    cores: int,
    local_ranks: int = 1,
    omp_num_threads: str | None = None,
) -> tuple[int, str]:
    """PyTorch's thread count for a training process, and why (for the start-up line).

    ``requested`` (``[run].threads``) > 0 is taken as it is. Otherwise OMP_NUM_THREADS, when
    set to a positive integer, is the user's choice and wins. Otherwise (auto) the process's
    share of the usable ``cores`` (divided among the ``local_ranks`` torchrun starts on this
    machine) less one core per DataLoader worker, at least 1: each worker decodes on a core
    of its own (a worker runs one thread), and an OpenMP thread that has to share a core
    makes every operator wait for it at the barrier that ends it (docs/performance.md,
    "Threads and workers": 2 model threads beside 1 worker on 2 cores trained slower than 1).
    """
    if requested > 0:
        return requested, "[run].threads"
    if omp_num_threads is not None and omp_num_threads.strip().isdigit() and int(omp_num_threads) > 0:
        return int(omp_num_threads), "OMP_NUM_THREADS"
    share = max(1, cores // max(1, local_ranks))
    threads = max(1, share - max(0, workers))
    ranks = f" / {local_ranks} local ranks" if local_ranks > 1 else ""
    workers = max(0, workers)
    return threads, f"auto: {cores} usable cores{ranks} - {workers} loader worker{'' if workers == 1 else 's'}"


def apply_threads(run: Any) -> tuple[int, str]:
    """Set PyTorch's intra-op threads as :func:`choose_threads` decides for ``run`` (a
    :class:`mtrun.run.Run`) on this machine; returns the number and the reason."""
    import torch

    threads, why = choose_threads(
        run.config.threads,
        run.loader.num_workers,
        cores=usable_cores(),
        local_ranks=int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
    )
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads, why


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
