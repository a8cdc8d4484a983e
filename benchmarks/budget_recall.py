"""What the quickstart's training budget buys: held-out R@10 of mtrun vs a plain loop, same wall time.

Trains the quickstart's model (``recipes/quickstart.toml``) twice in this process:

* **mtrun**: the recipe as ``mtrun recipes/quickstart.toml`` trains it (its steps, loader,
  caches, precision), with the validation pass switched off; the wall time of
  ``Trainer.fit`` is the budget;
* **plain**: the hand-written loop of ``benchmarks/plain_loop.py`` (same modules, same seed,
  log-mels precomputed once — that precompute is printed, not counted, as mtrun's cache build
  is not: a short mtrun run fills the caches before anything is timed), given the steps that fit
  in the same budget at its own speed, measured on a short probe run just before.

Both trained models are then evaluated by the same code, mtrun's retrieval evaluation on the
demo corpus's test split (pieces never heard in training), and the script prints text→music
R@10 with its bootstrap 95% interval for each, and the ratio mtrun / plain (the issue's target:
within 10%, i.e. >= 0.9). One seed each: the intervals say how much one run can tell.

    python benchmarks/budget_recall.py                    # the quickstart as it is
    python benchmarks/budget_recall.py --steps 600        # a shorter budget
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import plain_loop  # noqa: E402  (the plain loop, its data and the CPU report live there)

METRIC = "retrieval/t2a/R@10"


def quickstart(out: Path, name: str, steps: int | None, precision: str):
    """The quickstart resolved for a timed training: no validation pass, one checkpoint."""
    from mtrun.runner import prepare

    overrides = [f'run.output_dir="{out}"', f'run.name="{name}"', f'trainer.precision="{precision}"', 'trainer.val_split="none"']
    if steps is not None:
        overrides.append(f"trainer.max_steps={steps}")
    return prepare(plain_loop.RECIPE, overrides=overrides)


def assembled(resolved, run):
    import torch

    from mtrun.assemble import assemble
    from mtrun.runner import apply_threads, make_encoder_cache

    apply_threads(run)
    torch.manual_seed(run.config.seed)  # as mtrun.runner.train does
    return assemble(resolved, run, encoder_cache=make_encoder_cache(run))


def recall(built, run, step: int) -> tuple[float, float, float]:
    from mtrun.eval.run import evaluate_trained

    metrics = evaluate_trained(built, run, step=step)["metrics"]
    return metrics[METRIC], metrics[f"{METRIC}:ci_low"], metrics[f"{METRIC}:ci_high"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="mtrun's steps (default: the recipe's)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="auto", help="both loops (auto: as the recipe's auto decides here)")
    parser.add_argument("--probe-steps", type=int, default=40, help="plain-loop steps timed to size its budget")
    parser.add_argument("--keep-logmels", type=Path, default=None, help="reuse the plain loop's log-mels across reruns")
    args = parser.parse_args(argv)

    import torch

    precision = args.precision  # "auto" is settled by mtrun's trainer; the plain loop then takes its choice
    out = Path(tempfile.mkdtemp(prefix="mtrun-budget-recall-"))
    print(plain_loop.cpu_report())

    # Caches first (waveforms / features under $MTRUN_CACHE), outside every timed span.
    resolved, run = quickstart(out, "warm", 2, precision)
    warm = assembled(resolved, run).trainer
    warm.fit()
    precision = warm.precision  # "auto" settled here, so its timing is not charged to the budget

    resolved, run = quickstart(out, "mtrun", args.steps, precision)
    built = assembled(resolved, run)
    steps = built.trainer.config.max_steps
    start = time.perf_counter()
    built.trainer.fit()
    budget = time.perf_counter() - start
    threads = torch.get_num_threads()
    print(f"mtrun: {steps} steps in {budget:.1f} s ({steps * built.trainer.config.batch_size / budget:.1f} samples/s, {precision}, {threads} thread(s))", flush=True)
    m_r10 = recall(built, run, steps)

    samples = built.data.load("train")
    data = plain_loop.PlainData(samples, built.system, args.keep_logmels)
    print(f"plain loop's precompute (not counted): log-mels of {data.n} clips {data.feature_s:.1f} s", flush=True)
    plain_args = argparse.Namespace(steps=args.probe_steps, warmup=min(10, args.probe_steps // 2), precision=precision)
    torch.set_num_threads(threads)
    probe = plain_loop.run_plain(data, resolved, run, plain_args)
    plain_steps = max(plain_args.warmup + 1, int(budget / probe["step_s"]))
    plain_args.steps = plain_steps
    start = time.perf_counter()
    plain = plain_loop.run_plain(data, resolved, run, plain_args)
    plain_s = time.perf_counter() - start
    print(f"plain: {plain_steps} steps in {plain_s:.1f} s ({plain_steps * built.trainer.config.batch_size / plain_s:.1f} samples/s; sized by a "
          f"{args.probe_steps}-step probe at {probe['step_s'] * 1e3:.0f} ms/step)", flush=True)
    built.system.load_state_dict(plain["system"].state_dict())
    p_r10 = recall(built, run, plain_steps)

    print(f"\ntext→music R@10 on the test split, same wall-clock budget ({budget:.0f} s of training):")
    print(f"  mtrun  {m_r10[0]:5.1f}%  [{m_r10[1]:.1f}, {m_r10[2]:.1f}]  ({steps} steps)")  # metrics are in percent
    print(f"  plain  {p_r10[0]:5.1f}%  [{p_r10[1]:.1f}, {p_r10[2]:.1f}]  ({plain_steps} steps, {plain_s:.0f} s)")
    print(f"  ratio mtrun / plain: {m_r10[0] / p_r10[0]:.3f} (target >= 0.9)")
    print(f"runs and their eval reports: {out}")


if __name__ == "__main__":
    main()
