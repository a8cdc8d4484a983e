"""`mtrun ablate`: planning variants × seeds, validating before running, resuming, the table."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from mtrun.ablation import command, parse_grid, plan_ablation, rows, sweep, validate_plan, write_tables
from mtrun.errors import MtrunError, RecipeError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.toml"


def test_grid_values_keep_commas_inside_brackets_and_quotes():
    assert parse_grid('audio_projector.hidden_sizes=[128,64],[256], "a,b"') == (
        "audio_projector.hidden_sizes", ["[128,64]", "[256]", '"a,b"'],
    )
    with pytest.raises(ValueError, match="expected KEY=V1,V2"):
        parse_grid("trainer.optimizer.lr")


def test_grids_multiply_into_named_variants_after_the_explicit_ones():
    plan = plan_ablation(
        QUICKSTART,
        grid=["audio_encoder.type=mavil,htsat", "trainer.optimizer.lr=1e-3,3e-3"],
        variants=["baseline="],
        seeds=[0, 1],
    )
    names = [v.name for v in plan.variants]
    assert names[0] == "baseline" and plan.baseline == "baseline"
    assert len(names) == 5 and "audio_encoder.type=htsat, lr=0.003" in names
    assert plan.variants[-1].overrides == ("audio_encoder.type=htsat", "trainer.optimizer.lr=0.003")
    assert [r.name for r in plan.runs][:3] == ["baseline-s0", "baseline-s1", "audio_encoder.type_mavil_lr_0.001-s0"]
    run = plan.runs[-1]
    cmd = command(plan, run, "sweep", Path("out"))
    assert cmd[-4:] == ["run.seed=1", f"run.output_dir={Path('out') / 'sweep'}", f"run.name={run.name}", "run.resume=latest"]


def test_the_recipe_table_gives_defaults_and_the_command_line_wins():
    table = {
        "seeds": [3, 4],
        "metrics": ["retrieval/t2a/R@1"],
        "grid": {"trainer.optimizer.lr": [1e-3, 2e-3]},
        "variant": [{"name": "no specaugment", "overrides": ["~augmenter.0"]}],
    }
    plan = plan_ablation(QUICKSTART, table=table)
    assert plan.seeds == (3, 4) and plan.metrics == ("retrieval/t2a/R@1",)
    assert [v.name for v in plan.variants] == ["no specaugment", "lr=0.001", "lr=0.002"]
    plan = plan_ablation(QUICKSTART, table=table, grid=["trainer.batch_size=16,32"], seeds=[0])
    assert [v.name for v in plan.variants] == ["no specaugment", "batch_size=16", "batch_size=32"] and plan.seeds == (0,)


def test_plan_problems_are_listed_together_naming_the_recipe_and_key():
    table = {"seed": [0], "variant": [{"name": "a"}, {"name": "a"}]}
    with pytest.raises(RecipeError) as err:
        plan_ablation(QUICKSTART, table=table, baseline="nope")
    text = str(err.value)
    assert str(QUICKSTART) in text and "[ablation].seed: unknown key (did you mean 'seeds'?)" in text
    assert "variant name 'a' is used twice" in text and "baseline 'nope' is not a variant" in text


def test_validate_checks_the_ablation_table_too(capsys):
    from mtrun.cli import main

    assert main(["validate", str(QUICKSTART), 'ablation.baseline="nope"', "ablation.metrcs=[]"]) == 2
    err = capsys.readouterr().err
    assert "[ablation].metrcs: unknown key (did you mean 'metrics'?)" in err and "baseline 'nope' is not a variant" in err
    assert main(["validate", str(QUICKSTART)]) == 0


def test_every_variant_is_validated_before_anything_runs():
    from mtrun import plugins

    plan = plan_ablation(QUICKSTART, variants=["ok=", "typo=trainer.optimizer.lrr=1e-3", "bad type=audio_encoder.type=no-such-encoder"])
    with pytest.raises(MtrunError) as err:
        validate_plan(plan, plugins.get_plugins().registry)
    text = str(err.value)
    assert "2 of 3 ablation variants do not validate; nothing was run" in text
    assert "variant 'typo'" in text and "lrr" in text and "variant 'bad type'" in text and "no-such-encoder" in text
    assert "variant 'ok'" not in text


def _fake_runner(results: dict[tuple[str, int], float], calls: list[str], fail: str | None = None):
    """Stands in for one `mtrun` run: writes what a finished run leaves (report.md and an
    evaluation of the test split) with a metric chosen per (variant overrides, seed)."""

    def run(cmd):
        args = dict(a.split("=", 1) for a in cmd if "=" in a and a.startswith("run."))
        folder = Path(args["run.output_dir"]) / args["run.name"]
        calls.append(args["run.name"])
        if args["run.name"] == fail:
            return 3
        key = (next((a for a in cmd if a.startswith("trainer.optimizer.lr=")), "base"), int(args["run.seed"]))
        evaluation = folder / "eval-test-10"
        evaluation.mkdir(parents=True)
        (evaluation / "eval.json").write_text(json.dumps({"step": 10, "split": "test", "metrics": {"retrieval/t2a/R@10": results[key], "retrieval/n_items": 50}}))
        (evaluation / "report.md").write_text("done")
        (folder / "report.md").write_text("done")
        return 0

    return run


def test_a_sweep_resumes_after_a_failed_run_and_the_table_matches_an_independent_computation(tmp_path):
    values = {
        ("base", 0): 20.0, ("base", 1): 24.0, ("base", 2): 22.0,
        ("trainer.optimizer.lr=1e-3", 0): 25.0, ("trainer.optimizer.lr=1e-3", 1): 26.0, ("trainer.optimizer.lr=1e-3", 2): 30.0,
    }
    plan = plan_ablation(QUICKSTART, variants=["baseline=", "low lr=trainer.optimizer.lr=1e-3"], seeds=[0, 1, 2])
    calls: list[str] = []
    with pytest.raises(MtrunError, match=r"low_lr-s1 \(low lr, seed 1\) exited with status 3.*run the same command again"):
        sweep(plan, "sw", tmp_path, runner=_fake_runner(values, calls, fail="low_lr-s1"), say=lambda _: None)
    state = json.loads((tmp_path / "sw" / "ablation.json").read_text())
    assert sorted(state["runs"]) == ["baseline-s0", "baseline-s1", "baseline-s2", "low_lr-s0"]

    calls.clear()
    state = sweep(plan, "sw", tmp_path, runner=_fake_runner(values, calls), say=lambda _: None)
    assert calls == ["low_lr-s1", "low_lr-s2"]  # finished runs are not started again
    table = rows(state, ["baseline", "low lr"], ["retrieval/t2a/R@10"], "baseline")
    base, low = table
    t2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom
    assert base["mean"] == pytest.approx(22.0) and base["ci"] == pytest.approx(t2 * 2.0 / math.sqrt(3))
    diffs = [5.0, 2.0, 8.0]
    assert low["diff"] == pytest.approx(5.0)
    assert low["diff_ci"] == pytest.approx(t2 * statistics.stdev(diffs) / math.sqrt(3))
    assert base["diff"] is None and low["paired_seeds"] == 3

    text, paths = write_tables(tmp_path / "sw", state, ["baseline", "low lr"], ["retrieval/t2a/R@10"], "baseline", [0, 1, 2])
    assert "| low lr | 27.00 ± " in text and "+5.00 ± " in text
    assert [p.name for p in paths] == ["table.md", "table.csv", "table.png"] and all(p.is_file() for p in paths)
    csv_lines = (tmp_path / "sw" / "table.csv").read_text().splitlines()
    assert csv_lines[0] == "variant,metric,n,mean,ci,diff,diff_ci,paired_seeds" and len(csv_lines) == 3
    assert (tmp_path / "sw" / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_throughput_is_all_steps_over_all_time_from_the_run_log(tmp_path):
    """Windows of 50, 50 and 20 steps at 100, 50 and 40 samples/s (per step: 1 s, 2 s, 2.5 s
    of batch-1 time), an evaluation record and a line cut by a crash in between."""
    from mtrun.ablation.sweep import TRAIN_THROUGHPUT, run_metrics, training_throughput

    run = tmp_path / "run"
    (run / "eval-test-120").mkdir(parents=True)
    records = [
        {"step": 50, "samples_per_s": 100.0}, {"step": 50, "val/loss": 1.0}, {"step": 100, "samples_per_s": 50.0},
    ]
    lines = [json.dumps(r) for r in records] + ['{"step": 120, "samp', json.dumps({"step": 120, "samples_per_s": 40.0})]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    seconds = 50 / 100 + 50 / 50 + 20 / 40
    assert training_throughput(run) == pytest.approx(120 / seconds)
    assert training_throughput(tmp_path / "nothing") is None
    (run / "eval-test-120" / "eval.json").write_text(json.dumps({"step": 120, "metrics": {"retrieval/t2a/R@10": 30.0}}))
    (run / "eval-test-120" / "report.md").write_text("done")
    assert run_metrics(run, "test") == {"retrieval/t2a/R@10": 30.0, TRAIN_THROUGHPUT: pytest.approx(120 / seconds)}


@pytest.mark.slow
def test_mtrun_ablate_runs_a_tiny_profile_then_finds_it_done(tmp_path):
    """The real thing, once: 3 steps of FLAP's tiny profile through `mtrun ablate`, its table,
    and a rerun that starts nothing."""
    import subprocess
    import sys

    from demodata import data_overrides

    args = [  # flap.toml has no [ablation] table of its own: only the variant given here runs
        sys.executable, "-m", "mtrun.cli", "ablate", str(ROOT / "recipes" / "flap.toml"), "--profile", "tiny", "--variant", "baseline=", "--seeds", "1",
        "--output-dir", str(tmp_path / "runs"), "trainer.max_steps=3", "trainer.batch_size=8", "trainer.log_every=1",
        *data_overrides(tmp_path),  # the synthetic stand-in has 16 training items
    ]
    first = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    sweep_dir = tmp_path / "runs" / "flap-ablation"
    assert "| baseline | " in first.stdout and f"table: {sweep_dir / 'table.md'}" in first.stdout
    state = json.loads((sweep_dir / "ablation.json").read_text())
    metrics = state["runs"]["baseline-s0"]["metrics"]
    assert "retrieval/t2a/R@10" in metrics and metrics["train/samples_per_s"] > 0
    again = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0 and "baseline, seed 0: done already" in again.stdout, again.stdout + again.stderr


@pytest.mark.parametrize("recipe, profile, rows", [("quickstart.toml", None, 2), ("duet_mc.toml", "tiny", 4)])
def test_the_ablation_tables_shipped_in_recipes_validate_every_variant(recipe, profile, rows):
    """The quickstart's masking table and DuET-MC's augmentation ladder (the paper's Table 4)."""
    from mtrun import plugins
    from mtrun.recipe import load_recipe

    path = ROOT / "recipes" / recipe
    table = load_recipe(path, profile=profile).ablation
    plan = plan_ablation(path, table=table, profile=profile)
    assert len(plan.variants) == rows and plan.baseline == plan.variants[0].name
    validate_plan(plan, plugins.get_plugins().registry)



def test_an_output_folder_that_cannot_be_written_is_a_message_not_a_traceback(tmp_path, capsys):
    from mtrun.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    status = main(["ablate", str(QUICKSTART), "--table", "--output-dir", str(blocker)])
    err = capsys.readouterr().err
    assert status != 0 and "Traceback" not in err
    assert f"mtrun ablate: cannot write in {blocker / 'quickstart-ablation'}" in err and "--output-dir" in err


def test_metrics_with_a_damaged_line_are_read_and_an_unreadable_file_is_named(tmp_path, monkeypatch):
    """A line of non-UTF-8 bytes (a disk error) is skipped like a line cut short; a file that
    cannot be read at all is an MtrunError naming it, and leaves its ablation cell empty."""
    from pathlib import Path

    from mtrun.ablation.sweep import training_throughput
    from mtrun.errors import MtrunError
    from mtrun.run_report import read_metrics

    good = '{"step": 10, "samples_per_s": 100.0}\n'
    (tmp_path / "metrics.jsonl").write_bytes(good.encode() + b"\xff\xfe{broken\n" + good.replace("10", "20").encode())
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20]
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "metrics.jsonl").write_text(good + good.replace("10", "20"))
    assert training_throughput(tmp_path) == training_throughput(clean) is not None  # the damaged line changes nothing

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(MtrunError, match=r"cannot read .*metrics\.jsonl \(Permission denied\)"):
        read_metrics(tmp_path)
    assert training_throughput(tmp_path) is None
