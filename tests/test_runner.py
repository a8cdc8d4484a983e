"""`mtrun RECIPE` end to end in process: the run folder, the saved recipe, and refusals."""

from __future__ import annotations

import tomllib

import pytest

from mtrun.errors import MtrunError
from mtrun.runner import train
from toyrecipes import TOY_MODEL

RECIPE = """
[run]
name = "toy"
seed = 3

[loader]
clip_seconds = 0.25

[data]
type = "toy-tones"
n_items = 16
""" + TOY_MODEL + """
[trainer]
max_steps = 3
batch_size = 8
checkpoint_every = 2
eval_every = 0
precision = "fp32"

[profile.longer.trainer]
max_steps = 4
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text(RECIPE)
    return path


def test_run_folder_holds_resolved_recipe_with_profile_and_overrides(recipe, tmp_path, registry):
    out = tmp_path / "runs"
    train(recipe, overrides=[f'run.output_dir="{out}"', "trainer.optimizer.lr=0.01"], profile="longer", registry=registry)
    saved = tomllib.loads((out / "toy" / "recipe.toml").read_text())
    assert saved["trainer"]["max_steps"] == 4 and saved["trainer"]["optimizer"]["lr"] == 0.01
    assert "profile" not in saved
    assert (out / "toy" / "metrics.jsonl").exists()
    assert (out / "toy" / "checkpoints").is_dir()


def test_fresh_run_refuses_folder_with_checkpoints_and_resume_continues(recipe, tmp_path, registry):
    out = f'run.output_dir="{tmp_path / "runs"}"'
    train(recipe, overrides=[out], registry=registry)
    with pytest.raises(MtrunError, match=r"already holds checkpoints.*--resume"):
        train(recipe, overrides=[out], registry=registry)
    metrics = train(recipe, overrides=[out, "trainer.max_steps=5"], resume=True, registry=registry)
    assert metrics["step"] == 5
    # The changed recipe is saved; the first one is kept beside it, not overwritten.
    kept = sorted(p.name for p in (tmp_path / "runs" / "toy").glob("recipe.*.toml"))
    assert len(kept) == 1
    first = tomllib.loads((tmp_path / "runs" / "toy" / kept[0]).read_text())
    assert first["trainer"]["max_steps"] == 3


@pytest.mark.parametrize(("override", "message"), [
    ('run.name=""', r"\[run\]\.name: invalid value \(got ''\): '' is not a run name: it must name a folder under output_dir"),
    ('run.name="../up"', r"'\.\./up' is not a run name"),
    ("loader.num_workers=-1", r"\[loader\]\.num_workers: invalid value \(got -1\)"),
])
def test_a_run_name_or_worker_count_that_cannot_be_is_refused(recipe, registry, override, message):
    with pytest.raises(MtrunError, match=message):
        train(recipe, overrides=[override], registry=registry)


def test_a_misspelt_resume_is_refused_naming_the_key_and_suggesting_latest(recipe, tmp_path, registry):
    from mtrun.errors import ResumeError

    with pytest.raises(ResumeError, match=rf"^{recipe}: \[run\]\.resume = 'latst': no such folder; did you mean 'latest'\?"):
        train(recipe, overrides=[f'run.output_dir="{tmp_path / "runs"}"', 'run.resume="latst"'], registry=registry)
    assert not (tmp_path / "runs" / "toy" / "recipe.toml").exists()  # refused: nothing left claiming a run


def test_the_resume_hint_repeats_the_profile_and_overrides(recipe, tmp_path, registry):
    out = f'run.output_dir="{tmp_path / "runs"}"'
    train(recipe, overrides=[out], profile="longer", registry=registry)
    with pytest.raises(MtrunError) as info:
        train(recipe, overrides=[out, "trainer.optimizer.lr=0.01"], profile="longer", registry=registry)
    assert f"Continue it with `mtrun {recipe} --profile longer '{out}' trainer.optimizer.lr=0.01 --resume`" in str(info.value)


def test_a_refused_resume_leaves_the_run_folder_recipe_as_it_was(recipe, tmp_path, registry):
    from mtrun.errors import ResumeError

    out = f'run.output_dir="{tmp_path / "runs"}"'
    train(recipe, overrides=[out], registry=registry)
    folder = tmp_path / "runs" / "toy"
    before = (folder / "recipe.toml").read_text()
    with pytest.raises(ResumeError, match="trained with batch_size 8, the recipe now says 4"):
        train(recipe, overrides=[out, "trainer.batch_size=4"], resume=True, registry=registry)
    assert (folder / "recipe.toml").read_text() == before and not list(folder.glob("recipe.*.toml"))


@pytest.mark.parametrize("entry", ['type = "probe"\ncategory = "mood"', 'type = "zero-shot"\ncategory = "mood"'])
def test_an_evaluation_setting_the_data_cannot_serve_fails_before_training(tmp_path, registry, entry):
    """Found at set-up, naming the recipe, the key and the split; nothing is trained first
    (before, a probe found it at the first validation and a zero-shot task reported counts only)."""
    from mtrun.eval.run import EvalError

    path = tmp_path / "toy.toml"
    path.write_text(RECIPE + "\n[[eval]]\n" + entry + "\n")
    out = tmp_path / "runs"
    with pytest.raises(EvalError) as info:
        train(path, overrides=[f'run.output_dir="{out}"'], registry=registry)
    message = str(info.value)
    assert message.startswith(f"{path}: [eval] ") and "category = 'mood' labels none of the" in message
    assert info.value.exit_code == 2  # the recipe's problem, as a recipe error is
    assert not (out / "toy").exists()  # the folder this call made held only the recipe: removed
    assert message.endswith("(evaluating split 'test' of the data source ([data]))")  # the runner checks the test split first
    assert not (out / "toy" / "checkpoints").exists() or not any((out / "toy" / "checkpoints").iterdir())
