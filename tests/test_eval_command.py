"""`mtrun eval` on a toy run: rebuild from a checkpoint or a recipe, evaluate, write the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtrun.errors import MtrunError
from toyrecipes import TOY_MODEL

RECIPE = """
[run]
name = "toy"
seed = 3
device = "cpu"

[loader]
clip_seconds = 0.25

[data]
type = "toy-tones"
n_items = 24
""" + TOY_MODEL + """
[[eval]]
type = "retrieval"
bootstrap = 100

[[eval]]
type = "zero-shot"
category = "pitch"

[trainer]
max_steps = 4
batch_size = 8
checkpoint_every = 2
eval_every = 2
precision = "fp32"
"""


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A trained toy run: ``(recipe_path, run_dir, overrides)``; its trainer ran the recipe's
    eval tasks on the val split (through the shared cache) every two steps. Trained once per
    module; the tests only read it."""
    import mtrun.builtins
    import mtrun_testkit

    from mtrun.plugins import load_plugins
    from mtrun.registry import PluginInfo
    from mtrun.runner import train

    registry = load_plugins(
        extra=[(PluginInfo("builtins"), mtrun.builtins), (PluginInfo("testkit"), mtrun_testkit)], entry_points=False
    ).registry
    tmp_path = tmp_path_factory.mktemp("evalrun")
    recipe = tmp_path / "toy.toml"
    recipe.write_text(RECIPE)
    overrides = [f'run.output_dir="{tmp_path / "runs"}"']
    metrics = train(recipe, overrides, registry=registry)
    assert "val/retrieval/t2a/R@10" in metrics and "val/zero-shot/pitch/accuracy" in metrics
    return recipe, tmp_path / "runs" / "toy", overrides


def test_eval_of_a_checkpoint_writes_json_report_and_figures(toy_run, registry, tmp_path):
    from mtrun.eval.commands import evaluate_target

    _, run_dir, _ = toy_run
    checkpoint = run_dir / "checkpoints" / "step-000004"
    result = evaluate_target(checkpoint, registry=registry, tasks=["retrieval", "modality-gap"], overrides=["eval.0.bootstrap=50"])
    out = Path(result["out_dir"])
    assert out.parent == run_dir and out.name.startswith("eval-test-4") and result["step"] == 4
    saved = json.loads((out / "eval.json").read_text())
    assert saved["split"] == "test" and saved["checkpoint"] == str(checkpoint)
    assert 0 <= saved["metrics"]["retrieval/t2a/R@10"] <= 100
    assert "retrieval/t2a/R@10:ci_low" in saved["metrics"]
    assert "modality-gap/logreg_accuracy" in saved["metrics"]
    assert "zero-shot/pitch/accuracy" not in saved["metrics"]  # --tasks replaced the recipe's list
    report = (out / "report.md").read_text()
    assert "retrieval_curves.png" in report and "projection.png" in report and "R@10" in report
    for png in ("retrieval_curves.png", "projection.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_checkpoint_evaluated_twice_gives_the_same_numbers(toy_run, registry, tmp_path):
    from mtrun.eval.commands import evaluate_target

    _, run_dir, _ = toy_run
    checkpoint = run_dir / "checkpoints" / "step-000004"
    a = evaluate_target(checkpoint, registry=registry, out=tmp_path / "a")
    b = evaluate_target(checkpoint, registry=registry, out=tmp_path / "b")
    assert a["metrics"] == b["metrics"]
    assert "zero-shot/pitch/accuracy" in a["metrics"]  # the recipe's [[eval]] tables by default


def test_a_second_eval_writes_beside_the_first_report_not_over_it(toy_run, registry):
    from mtrun.eval.commands import evaluate_target

    _, run_dir, _ = toy_run
    checkpoint = run_dir / "checkpoints" / "step-000004"
    first = Path(evaluate_target(checkpoint, registry=registry, tasks=["retrieval"])["out_dir"])
    report = (first / "report.md").read_text()
    second = Path(evaluate_target(checkpoint, registry=registry, tasks=["modality-gap"])["out_dir"])
    assert second != first and second.parent == run_dir
    assert second.name.startswith("eval-test-4-") and second.name.rsplit("-", 1)[1].isdigit()
    assert (first / "report.md").read_text() == report
    assert "modality-gap" in (second / "report.md").read_text() and "modality-gap" not in report


def test_eval_of_a_recipe_loads_its_latest_checkpoint(toy_run, registry, tmp_path):
    from mtrun.eval.commands import evaluate_target

    recipe, run_dir, overrides = toy_run
    from_recipe = evaluate_target(recipe, registry=registry, overrides=overrides, out=tmp_path / "r")
    from_ckpt = evaluate_target(run_dir / "checkpoints" / "step-000004", registry=registry, out=tmp_path / "c")
    assert from_recipe["checkpoint"].endswith("step-000004")
    assert from_recipe["metrics"] == from_ckpt["metrics"]


def test_eval_of_a_recipe_without_checkpoints_warns_loudly(tmp_path, registry, capsys):
    from mtrun.eval.commands import evaluate_target

    recipe = tmp_path / "toy.toml"
    recipe.write_text(RECIPE)
    result = evaluate_target(recipe, registry=registry, overrides=[f'run.output_dir="{tmp_path / "none"}"'], tasks=["retrieval"])
    assert "UNTRAINED" in capsys.readouterr().err
    assert result["out_dir"].endswith("eval-test-untrained")
    assert "UNTRAINED" in (tmp_path / "none" / "toy" / "eval-test-untrained" / "report.md").read_text()


def test_eval_errors_are_clear(tmp_path, registry, toy_run):
    from mtrun.eval.commands import evaluate_target

    with pytest.raises(MtrunError, match="does not exist"):
        evaluate_target(tmp_path / "nowhere", registry=registry)
    _, run_dir, _ = toy_run
    with pytest.raises(MtrunError, match="no split 'holdout'"):
        evaluate_target(run_dir, registry=registry, split="holdout")
    with pytest.raises(MtrunError, match=r"^mtrun eval: --tasks: no evaluation task 'retreival' \(did you mean 'retrieval'\?\); installed: "):
        evaluate_target(run_dir, registry=registry, tasks=["retreival"])
    with pytest.raises(MtrunError, match=r"no split 'tset' to evaluate \(did you mean 'test'\?; it has: "):
        evaluate_target(run_dir, registry=registry, split="tset")


def test_a_damaged_checkpoint_is_a_clear_error_not_a_traceback(tmp_path, registry, toy_run):
    import shutil

    from mtrun.eval.commands import evaluate_target

    _, run_dir, _ = toy_run
    damaged = tmp_path / "step-000004"
    shutil.copytree(run_dir / "checkpoints" / "step-000004", damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short, as by a full disk
    with pytest.raises(MtrunError, match="cannot be loaded into the model"):
        evaluate_target(damaged, registry=registry, tasks=["retrieval"], out=tmp_path / "out")


def test_cli_dispatches_mtrun_eval(toy_run, registry, tmp_path, monkeypatch, capsys):
    import mtrun.plugins
    from mtrun.cli import main
    from mtrun.plugins import load_plugins
    from mtrun.registry import PluginInfo

    import mtrun.builtins
    import mtrun_testkit

    plugin_set = load_plugins(
        extra=[(PluginInfo("builtins"), mtrun.builtins), (PluginInfo("testkit"), mtrun_testkit)], entry_points=False
    )
    monkeypatch.setattr(mtrun.plugins, "get_plugins", lambda: plugin_set)
    _, run_dir, _ = toy_run
    code = main(["eval", str(run_dir), "--tasks", "retrieval", "eval.0.bootstrap=0", "--out", str(tmp_path / "cli")])
    assert code == 0, capsys.readouterr().err
    assert "report.md" in capsys.readouterr().out
    assert (tmp_path / "cli" / "eval.json").is_file()
