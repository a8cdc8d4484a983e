"""``mtrun eval CHECKPOINT_OR_RECIPE [--tasks ...] [--split test] [--out DIR] [overrides]``.

The target is one of:

* a checkpoint folder (``RUN/checkpoints/step-N`` with ``model.safetensors`` and the resolved
  recipe): the system is rebuilt from that recipe and the weights loaded;
* a run folder (``RUN`` with ``recipe.toml`` and ``checkpoints/``): its best checkpoint, else
  its latest;
* a recipe file: built as for training; the best (else latest) checkpoint of its run folder
  is loaded when there is one, else the *untrained* system is evaluated, with a warning.

Tasks default to the recipe's ``[[eval]]`` tables, else retrieval: entries with their own
``[eval.data]`` evaluate that evaluation set (reported as ``NAME/...``), the others the
``--split`` of the training source. ``--tasks`` replaces them all by the named tasks with
default settings on the training source, which overrides can then adjust
(``eval.0.category="mood"``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from mtrun.eval.run import EvalError

__all__ = ["configure", "evaluate_target", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare ``mtrun eval``'s arguments."""
    parser.description = "Evaluate a checkpoint, a run folder or a recipe, and write eval.json + report.md."
    parser.add_argument("target", metavar="CHECKPOINT_OR_RECIPE", help="a checkpoint folder, a run folder or a recipe file")
    parser.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help="eval tasks to run (retrieval, zero-shot, probe, modality-gap, or a plugin's); "
        "default: the recipe's [[eval]] tables, else retrieval",
    )
    parser.add_argument("--split", default="test", help="data split to evaluate (default: test)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: RUN/eval-SPLIT-STEP, or RUN/eval-SPLIT-STEP-2, -3, ... if that exists)")
    parser.add_argument("--profile", metavar="NAME", help="merge the recipe's [profile.NAME] table (recipes only)")
    parser.add_argument("--device", help="'cpu', 'cuda', 'cuda:N' (default: the recipe's [run].device)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE | ~KEY", help="recipe overrides, e.g. eval.0.category=\"mood\""
    )


def run(args: argparse.Namespace) -> int:
    """Handle ``mtrun eval``; returns the exit status."""
    tasks, overrides = _split_task_args(args.tasks, args.overrides)
    result = evaluate_target(
        args.target,
        tasks=tasks,
        split=args.split,
        out=args.out,
        profile=args.profile,
        overrides=overrides,
        device=args.device,
    )
    shown = {k: v for k, v in result["metrics"].items() if ":" not in k and "/n_" not in k}
    for key, value in list(shown.items())[:24]:
        print(f"  {key:<40} {value:.4g}")
    if len(shown) > 24:
        print(f"  ... and {len(shown) - 24} more in eval.json")
    print(f"wrote {Path(result['out_dir']) / 'report.md'} and eval.json")
    return 0


def _split_task_args(tasks: Sequence[str] | None, overrides: Sequence[str]) -> tuple[list[str] | None, list[str]]:
    """``--tasks a b k=v`` swallows the overrides that follow it; give them back. Commas
    separate tasks too (``--tasks retrieval,zero-shot``)."""
    overrides = list(overrides or [])
    if not tasks:
        return None, overrides
    names: list[str] = []
    for item in tasks:
        if "=" in item or item.startswith("~"):
            overrides.append(item)
        else:
            names += [n for n in item.split(",") if n]
    return names or None, overrides


# ------------------------------------------------------------------------------- targets


def _locate(target: Path) -> tuple[Path, Path | None, Path | None, bool]:
    """``(recipe_file, checkpoint, run_dir, is_recipe)``; run_dir is None for a recipe until
    it is resolved."""
    from mtrun.train.checkpoint import complete

    if not target.exists():
        raise EvalError(f"mtrun eval: {target} does not exist (expected a checkpoint folder, a run folder or a recipe file)")
    if target.is_file():
        return target, None, None, True
    # A checkpoint folder is known by its marker or trainer state too, so one whose weights are
    # gone is refused, not taken for a run folder and evaluated untrained.
    looks_like_checkpoint = any((target / n).exists() for n in ("COMPLETE", "trainer_state.json"))
    if looks_like_checkpoint and not (target / "model.safetensors").is_file():
        raise EvalError(f"mtrun eval: checkpoint {target} has no model.safetensors (its weights are gone); pick another checkpoint")
    if (target / "model.safetensors").is_file():
        if not complete(target):
            raise EvalError(f"mtrun eval: {target} is an incomplete checkpoint (no COMPLETE marker); pick another")
        recipe = next((target / n for n in ("recipe.toml", "recipe.json") if (target / n).is_file()), None)
        if recipe is None:
            raise EvalError(f"mtrun eval: checkpoint {target} holds no recipe.toml or recipe.json to rebuild the model from")
        run_dir = target.parent.parent if target.parent.name == "checkpoints" else target.parent
        return recipe, target, run_dir, False
    if (target / "recipe.toml").is_file():
        return target / "recipe.toml", _best_or_latest(target), target, False
    raise EvalError(
        f"mtrun eval: {target} is neither a checkpoint folder (model.safetensors) nor a run folder (recipe.toml)"
    )


def _best_or_latest(run_dir: Path) -> Path | None:
    from mtrun.train.checkpoint import find_best, find_latest

    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    return find_best(root) or find_latest(root)


def _verify(checkpoint: Path, names: list[str]) -> None:
    """Refuse a checkpoint whose files differ from the checksums recorded when it was written."""
    from mtrun.train.checkpoint import CorruptCheckpointError, verify_checkpoint

    try:
        verify_checkpoint(checkpoint, names)
    except CorruptCheckpointError as exc:
        raise EvalError(
            f"mtrun eval: checkpoint {checkpoint} cannot be loaded into the model: {exc.problem}. "
            "The file changed after it was written (disk or copy damage); evaluate another checkpoint."
        ) from None


def _load_recipe(path: Path, overrides: Sequence[str], profile: str | None, tasks: Sequence[str] | None) -> Any:
    """The plain recipe with ``--tasks`` and the overrides applied (in that order)."""
    from mtrun.errors import RecipeError
    from mtrun.recipe import load_recipe
    from mtrun.recipe.loader import RecipeData, apply_overrides, parse_override

    if path.suffix == ".json":
        if profile:
            raise EvalError(f"mtrun eval: {path} is a resolved recipe; --profile applies to recipe files only")
        data = json.loads(path.read_text(encoding="utf-8"))
    else:
        data = dict(load_recipe(path, profile=profile))
    if tasks:
        data["eval"] = [{"type": name} for name in tasks]
    parsed, problems = [], []
    for text in overrides:
        try:
            parsed.append(parse_override(text))
        except ValueError as exc:
            problems.append(str(exc))
    created: dict = {}
    problems += apply_overrides(data, parsed, created)
    if problems:
        raise RecipeError(str(path), problems)
    result = RecipeData(data)
    result.overrides = tuple(parsed)
    result.created = created
    return result


def _checkpoint_step(folder: Path) -> int:
    state = folder / "trainer_state.json"
    if state.is_file():
        step = json.loads(state.read_text(encoding="utf-8")).get("step")
        if isinstance(step, int):
            return step
    return int(folder.name.split("-")[-1])


def evaluate_target(
    target: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    split: str = "test",
    out: str | Path | None = None,
    profile: str | None = None,
    overrides: Sequence[str] = (),
    device: str | None = None,
    registry: Any = None,
) -> dict[str, Any]:
    """Rebuild the system a target names, load its weights, evaluate, write the report.

    Args:
        target: A checkpoint folder, a run folder or a recipe file.
        tasks: Eval task names replacing the recipe's ``[[eval]]`` tables.
        split: Data split to evaluate.
        out: Output folder; default ``RUN/eval-SPLIT-STEP``, with ``-2``, ``-3``, ... added while it exists.
        profile: A ``[profile.NAME]`` of a recipe file.
        overrides: ``KEY=VALUE`` / ``~KEY`` recipe overrides.
        device: Overrides the recipe's ``[run].device``.
        registry: The component registry; default: the installed plugins' (tests pass an
            isolated one).

    Returns:
        :func:`mtrun.eval.run.evaluate_run`'s result (``out_dir`` says where it was written).

    Raises:
        EvalError, RecipeError: With a message saying what to fix.
    """
    import torch

    from mtrun.assemble import assemble
    from mtrun.eval.run import default_out_dir, evaluate_run, unused_dir
    from mtrun.recipe import resolve_recipe
    from mtrun.run import Run
    from mtrun.devices import pick_device
    from mtrun.train.checkpoint import read_model_state

    if registry is None:
        from mtrun import plugins

        registry = plugins.get_plugins().registry
    recipe_path, checkpoint, run_dir, is_recipe = _locate(Path(target))
    if checkpoint is not None and not is_recipe:
        _verify(checkpoint, ["model.safetensors", recipe_path.name])  # before its recipe is read
    if profile and not is_recipe:
        raise EvalError(f"mtrun eval: --profile applies to recipe files; {target} already holds a resolved recipe")
    for name in tasks or ():  # a typo on the command line is not the recipe's problem
        if ("eval", name) not in registry:
            from mtrun.registry import suggest

            known = registry.names("eval")
            hint = suggest(name, known)
            raise EvalError(f"mtrun eval: --tasks: no evaluation task {name!r}" + (f" (did you mean {hint!r}?)" if hint else "")
                            + f"; installed: {', '.join(known)}")
    data = _load_recipe(recipe_path, overrides, profile, tasks)
    resolved = resolve_recipe(data, registry, str(recipe_path))
    if is_recipe:
        run_dir = Path(resolved.run.output_dir) / resolved.run.name
        checkpoint = _best_or_latest(run_dir)
        if checkpoint is not None:
            _verify(checkpoint, ["model.safetensors"])
    run = Run(dir=run_dir, config=resolved.run, loader=resolved.loader, recipe=dict(resolved.data), recipe_path=str(recipe_path))
    torch.manual_seed(resolved.run.seed)
    built = assemble(resolved, run)
    system = built.system
    warning = None
    step = None
    if checkpoint is not None:
        from safetensors import SafetensorError

        try:
            state = read_model_state(checkpoint, verify=False)  # _verify checked it
            missing, unexpected = system.load_state_dict(state, strict=False)
        except (OSError, RuntimeError, ValueError, SafetensorError) as exc:  # unreadable file, or tensors of other shapes
            raise EvalError(
                f"mtrun eval: checkpoint {checkpoint} cannot be loaded into the model its recipe builds: {exc}. "
                "Was the recipe changed by an override or a plugin upgrade, or is the file damaged?"
            ) from None
        if missing or unexpected:
            raise EvalError(
                f"mtrun eval: checkpoint {checkpoint} does not fit the model its recipe builds "
                f"(missing: {', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'}). "
                "Was the recipe changed by an override or a plugin upgrade?"
            )
        step = _checkpoint_step(checkpoint)
    else:
        warning = (
            f"no checkpoint found in {run_dir / 'checkpoints'}: evaluating the UNTRAINED system "
            "(randomly initialised weights; the numbers are a chance baseline)"
        )
        print(f"WARNING: {warning}", file=sys.stderr)
    system.to(pick_device(device or resolved.run.device, key="--device" if device else f"{recipe_path}: [run].device"))
    out_dir = Path(out) if out is not None else unused_dir(default_out_dir(run_dir, split, step))
    info = {
        "source": str(target),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "step": step,
        "warning": warning,
    }
    bound = built.eval_sets
    tasks = dict(bound.training_tasks)
    if bound.sets:  # what training left out; informative only, so a missing training source is no error here
        from mtrun.errors import MtrunError

        try:
            info["leakage"] = bound.leakage()
        except (MtrunError, OSError, KeyError) as exc:
            info["leakage"] = {"error": f"not counted: {exc}"}
    return evaluate_run(system, built.data, tasks, split, out_dir, run=run, info=info, sets=bound.sets)
