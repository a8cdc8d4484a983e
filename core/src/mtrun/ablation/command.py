"""``mtrun ablate RECIPE``: the command line of :mod:`mtrun.ablation`."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

__all__ = ["configure", "run"]

_EPILOG = """\
examples:
  # the recipe's [ablation] table
  mtrun ablate recipes/duet_mc.toml --profile tiny
  mtrun ablate recipes/quickstart.toml \\
      --grid trainer.optimizer.lr=1e-3,3e-3 --seeds 3
  mtrun ablate recipes/flap.toml --profile tiny \\
      --variant "no masking=~augmenter.1" --variant baseline=
  mtrun ablate recipes/quickstart.toml \\
      --grid audio_encoder.preset=tiny,base --emit > jobs.txt

Every variant is validated before any runs. Runs go to
OUTPUT_DIR/NAME/<variant>-s<seed>; the same command again skips finished
runs and resumes an interrupted one. The table (mean ± 95% CI over seeds,
paired differences against the baseline) is written to
OUTPUT_DIR/NAME/table.md, table.csv and table.png.
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "Run a recipe's variants over seeds and tabulate chosen metrics\n(see docs/ablations.md)."
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("recipe", help="the recipe TOML file (its [ablation] table, if any, gives the defaults)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE | ~KEY", help="overrides applied to every run")
    parser.add_argument("--profile", metavar="NAME", help="merge the recipe's [profile.NAME] table into every run")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="vary KEY over values; several grids multiply (replaces [ablation.grid])")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OVR;OVR", help="a named variant: overrides separated by ';' (NAME= is the recipe as it is)")
    parser.add_argument("--seeds", metavar="N|S,S,...", help="N seeds 0..N-1, or a comma list (default: [ablation].seeds, else 0)")
    parser.add_argument("--metric", action="append", default=[], metavar="NAME", help="metric of eval.json to tabulate (repeatable; default retrieval/t2a/R@10)")
    parser.add_argument("--baseline", metavar="VARIANT", help="the variant differences are taken against (default: 'baseline', else the first)")
    parser.add_argument("--split", metavar="SPLIT", help="evaluation split to read metrics from (default test)")
    parser.add_argument("--name", metavar="NAME", help="the sweep folder's name (default: RECIPE-STEM-ablation)")
    parser.add_argument("--output-dir", default="runs", metavar="DIR", help="parent of the sweep folder (default runs)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--emit", action="store_true", help="print one shell command per run (for a job array) and run nothing")
    what.add_argument("--table", action="store_true", help="only (re)write the table from the runs finished so far")


def _seeds(text: str | None) -> list[int] | None:
    from mtrun.errors import MtrunError

    if text is None:
        return None
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        return list(range(int(text)))
    except ValueError:
        raise MtrunError(f"--seeds {text!r}: expected a count (3) or a comma list of integers (0,1,2)") from None


def run(args: argparse.Namespace) -> int:
    from mtrun.ablation.plan import plan_ablation
    from mtrun.recipe import load_recipe

    table = load_recipe(args.recipe, profile=args.profile).ablation
    plan = plan_ablation(
        args.recipe,
        table=table,
        profile=args.profile,
        grid=args.grid,
        variants=args.variant,
        seeds=_seeds(args.seeds),
        metrics=args.metric,
        baseline=args.baseline,
        split=args.split,
        common=args.overrides,
    )
    name = args.name or f"{Path(args.recipe).stem}-ablation"
    output_dir = Path(args.output_dir)
    sweep_dir = output_dir / name
    try:
        return _run(args, plan, name, output_dir, sweep_dir)
    except BrokenPipeError:
        raise  # `--emit | head`: the command line's own quiet exit
    except OSError as exc:
        from mtrun.errors import MtrunError

        raise MtrunError(
            f"mtrun ablate: cannot write in {sweep_dir} ({exc.strerror or exc}: {exc.filename or ''}); "
            "finished runs and ablation.json are kept: free space or choose --output-dir, then run the same command again"
        ) from None


def _run(args: argparse.Namespace, plan, name: str, output_dir: Path, sweep_dir: Path) -> int:
    from mtrun import plugins
    from mtrun.ablation.sweep import command, read_state, sweep, validate_plan
    from mtrun.ablation.table import write_tables

    if args.table:
        state = read_state(sweep_dir)
    else:
        validate_plan(plan, plugins.get_plugins().registry)
        if args.emit:
            for r in plan.runs:
                print(shlex.join(["mtrun", *command(plan, r, name, output_dir)[3:]]))
            return 0
        print(f"ablation: {len(plan.variants)} variants × {len(plan.seeds)} seeds = {len(plan.runs)} runs, all valid; folder {sweep_dir}")
        state = sweep(plan, name, output_dir)
    text, paths = write_tables(sweep_dir, state, [v.name for v in plan.variants], plan.metrics, plan.baseline, plan.seeds)
    print(text, end="")
    for path in paths:
        print(f"table: {path}")
    return 0
