"""Recipe validation: every problem found at once, each pointing at the user's words."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import attrs
import pytest

from mtrun.errors import RecipeError
from mtrun.hookspecs import hookimpl
from mtrun.plugins import load_plugins
from mtrun.recipe import ResolvedRecipe, load_recipe, resolve_recipe
from mtrun.registry import PluginInfo
from mtrun.run import LoaderConfig, RunConfig

TESTKIT_SRC = Path(__file__).parent / "testkit" / "src"
if str(TESTKIT_SRC) not in sys.path:
    sys.path.insert(0, str(TESTKIT_SRC))


class StandInTrainer:
    """Stands in for core's default trainer until ``mtrun.train.trainer`` exists."""

    @attrs.frozen
    class Config:
        max_steps: int = attrs.field(default=10, metadata={"help": "optimizer steps"})

    def fit(self) -> dict:
        return {}


class StandInTrainerPlugin:
    @hookimpl
    def mtrun_register_components(self, registry) -> None:
        registry.trainer("default", StandInTrainer)


def isolated_plugins():
    """Testkit plus core's trainer: what these tests see, whatever else is installed."""
    import mtrun_testkit

    extra = [(PluginInfo("testkit"), mtrun_testkit)]
    if importlib.util.find_spec("mtrun.train.trainer") is not None:
        import mtrun.builtins

        extra.append((PluginInfo("builtins", "mtrun"), mtrun.builtins))
    else:
        extra.append((PluginInfo("stand-in"), StandInTrainerPlugin()))
    return load_plugins(extra=extra, entry_points=False)


@pytest.fixture(scope="module")
def registry():
    return isolated_plugins().registry


VALID = """
description = "toy recipe"
[data]
type = "toy-tones"
n_items = 8
[audio_encoder]
type = "toy-audio"
frame = 100
[text_encoder]
type = "toy-text"
[audio_projector]
type = "toy-linear"
dim = 8
[text_projector]
type = "toy-linear"
dim = 8
[[objective]]
type = "toy-contrastive"
temperature = 0.05
[[augmenter]]
type = "toy-gain"
[run]
seed = 3
[loader]
clip_seconds = 0.5
"""


def write(tmp_path: Path, text: str, name: str = "recipe.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(tmp_path, registry, text, overrides=()) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        resolve_recipe(load_recipe(path, overrides), registry, str(path))
    assert str(info.value).startswith(f"{path}: recipe is invalid")
    return info.value.problems


def test_valid_recipe_resolves_to_typed_configs(tmp_path, registry):
    path = write(tmp_path, VALID)
    resolved = resolve_recipe(load_recipe(path), registry, str(path))
    assert isinstance(resolved, ResolvedRecipe)
    assert resolved.source == str(path)
    assert resolved.run == RunConfig(seed=3)
    assert resolved.loader == LoaderConfig(clip_seconds=0.5)
    audio = resolved.components["audio_encoder"]
    assert (audio.slot, audio.kind, audio.name) == ("audio_encoder", "audio_encoder", "toy-audio")
    assert audio.config == audio.cls.Config(frame=100)
    assert resolved.components["audio_projector"].kind == "projector"
    assert resolved.components["trainer"].name == "default"  # absent table -> default trainer
    (objective,) = resolved.objectives
    assert (objective.slot, objective.weight, objective.label) == ("objective[0]", 1.0, "toy-contrastive")
    assert objective.config.temperature == 0.05
    assert [a.name for a in resolved.augmenters] == ["toy-gain"]
    assert resolved.evals == ()
    assert resolved.data["description"] == "toy recipe"


def test_objective_weight_and_name_are_slot_keys_not_config_keys(tmp_path, registry):
    text = VALID + '\n[[objective]]\ntype = "toy-contrastive"\nweight = 2\nname = "second"\n'
    path = write(tmp_path, text)
    first, second = resolve_recipe(load_recipe(path), registry, str(path)).objectives
    assert (second.weight, second.label, second.slot) == (2.0, "second", "objective[1]")
    assert isinstance(second.weight, float)
    assert second.config == second.cls.Config()


def test_two_objectives_with_one_name_are_rejected(tmp_path, registry):
    problems = problems_of(tmp_path, registry, VALID + '\n[[objective]]\ntype = "toy-contrastive"\n')
    assert problems == [
        "[[objective]][1]: objective name 'toy-contrastive' is used twice (also by [[objective]][0]); "
        'set name = "..." to tell them apart'
    ]


def test_unknown_key_suggests_the_closest_and_lists_known_keys(tmp_path, registry):
    problems = problems_of(tmp_path, registry, VALID.replace("frame = 100", "sample_rte = 8000"))
    assert problems == [
        "[audio_encoder].sample_rte: unknown key (did you mean 'sample_rate'?); "
        "known keys: frame, sample_rate, width"
    ]


def test_unknown_key_in_an_objective_may_be_a_slot_key(tmp_path, registry):
    problems = problems_of(tmp_path, registry, VALID.replace("temperature = 0.05", "wieght = 2"))
    assert problems == [
        "[[objective]][0].wieght: unknown key (did you mean 'weight'?); known keys: name, temperature, weight"
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('n_items = "many"', "[data].n_items: wrong type (got 'many'; expected int)"),
        ("n_items = 8.5", "[data].n_items: wrong type (got 8.5; expected int)"),  # no silent int()
        ("n_items = true", "[data].n_items: wrong type (got True; expected int)"),
        ('seconds = "0.5"', "[data].seconds: wrong type (got '0.5'; expected float)"),
    ],
)
def test_wrong_type_reports_the_value_and_the_expected_type(tmp_path, registry, line, expected):
    assert problems_of(tmp_path, registry, VALID.replace("n_items = 8", line)) == [expected]


def test_integer_is_accepted_where_a_float_is_expected(tmp_path, registry):
    path = write(tmp_path, VALID.replace("temperature = 0.05", "temperature = 1"))
    (objective,) = resolve_recipe(load_recipe(path), registry, str(path)).objectives
    assert objective.config.temperature == 1.0 and isinstance(objective.config.temperature, float)


def test_unknown_component_suggests_the_closest_name(tmp_path, registry):
    problems = problems_of(tmp_path, registry, VALID.replace('type = "toy-contrastive"', 'type = "toy-contrastve"'))
    assert problems == [
        "[[objective]][0].type = 'toy-contrastve': no objective of that name (did you mean 'toy-contrastive'?); "
        "installed: toy-contrastive. Is its plugin installed? See `mtrun plugins`."
    ]


def test_unknown_table_suggests_the_closest_table(tmp_path, registry):
    problems = problems_of(tmp_path, registry, VALID + "\n[audio_encodr]\nframe = 2\n[[augmentr]]\ntype = 'x'\n")
    assert len(problems) == 2
    assert problems[0].startswith("[audio_encodr]: unknown table (did you mean [audio_encoder]?); known tables: data, ")
    assert problems[1].startswith("[[augmentr]]: unknown table (did you mean [[augmenter]]?)")
    assert "audio_projector" in problems[0] and "loader" in problems[0]


def test_every_problem_in_the_recipe_is_reported_at_once(tmp_path, registry):
    text = (
        VALID.replace("frame = 100", "sample_rte = 8000")
        .replace("dim = 8\n[text_projector]", "dim = 'eight'\n[text_projector]")
        .replace('"toy-contrastive"', '"toy-contrastve"')
        .replace("clip_seconds = 0.5", "clip_seconds = 0.5\ncrop = 'middle'\nnum_workers = 1.5")
        + "\n[audio_encodr]\nframe = 2\n"
    )
    problems = problems_of(tmp_path, registry, text)
    assert len(problems) == 6
    joined = "\n".join(problems)
    for fragment in (
        "[audio_encodr]: unknown table",
        "[audio_encoder].sample_rte: unknown key",
        "[audio_projector].dim: wrong type (got 'eight'; expected int)",
        "[[objective]][0].type = 'toy-contrastve'",
        # A type error in one key does not hide a validator error in another.
        "[loader].num_workers: wrong type (got 1.5; expected int)",
        "[loader].crop: invalid value (got 'middle'): 'crop' must be in ('random', 'center', 'start')",
    ):
        assert fragment in joined


def test_invalid_choice_suggests_the_closest_option(tmp_path, registry):
    problems = problems_of(tmp_path, registry, VALID.replace("clip_seconds = 0.5", "crop = 'centre'"))
    assert problems == [
        "[loader].crop: invalid value (got 'centre'): 'crop' must be in ('random', 'center', 'start') "
        "(got 'centre') (did you mean 'center'?)"
    ]


def test_missing_required_tables_are_reported(tmp_path, registry):
    problems = problems_of(tmp_path, registry, "[data]\ntype = 'toy-tones'\n")
    assert [p.split(":")[0] for p in problems] == [
        "[audio_encoder]",
        "[text_encoder]",
        "[audio_projector]",
        "[text_projector]",
        "[[objective]]",
    ]
    assert "installed projectors: toy-linear" in problems[2]


def test_missing_type_lists_what_is_installed(tmp_path, registry):
    problems = problems_of(tmp_path, registry, VALID.replace('type = "toy-text"\n', ""))
    assert problems == [
        "[text_encoder]: missing key 'type' (the text_encoder to use); "
        '[text_encoder] needs type = "NAME" with one of: toy-text'
    ]


def test_single_table_where_an_array_is_expected_is_explained(tmp_path, registry):
    text = VALID.replace('[[objective]]\ntype = "toy-contrastive"\ntemperature = 0.05', '[objective]\ntype = "toy-contrastive"')
    assert problems_of(tmp_path, registry, text) == [
        "[[objective]]: expected an array of tables: write [[objective]], not [objective]"
    ]


def test_problems_from_overrides_say_so(tmp_path, registry):
    problems = problems_of(
        tmp_path, registry, VALID, overrides=["data.n_items=many", "audio_encoder.frme=3", "objective.0.weight=[1]"]
    )
    assert problems == [
        "[data].n_items: wrong type (got 'many'; expected int) (from override data.n_items=many)",
        "[audio_encoder].frme: unknown key (did you mean 'frame'?); known keys: frame, sample_rate, width "
        "(from override audio_encoder.frme=3)",
        "[[objective]][0].weight: wrong type (got [1]; expected float) (from override objective.0.weight=[1])",
    ]


def test_a_table_an_override_appended_is_blamed_on_it(tmp_path, registry):
    problems = problems_of(tmp_path, registry, VALID, overrides=["objective.1.name=extra"])
    assert len(problems) == 1 and problems[0].startswith("[[objective]][1]: missing key 'type'")
    assert problems[0].endswith("(from override objective.1.name=extra)")


def test_a_problem_written_in_a_parent_or_a_profile_says_where(tmp_path, registry):
    (tmp_path / "parent.toml").write_text(VALID.replace("seed = 3", "sed = 3"))
    child = tmp_path / "child.toml"
    child.write_text('extends = "parent.toml"\n[profile.small.trainer]\nbatch_sise = 2\n')
    with pytest.raises(RecipeError) as info:
        resolve_recipe(load_recipe(child, profile="small"), registry, str(child))
    problems = info.value.problems
    assert problems[0].startswith("[run].sed: unknown key") and problems[0].endswith(f"(in {tmp_path / 'parent.toml'})")
    assert problems[1].startswith("[trainer].batch_sise: unknown key") and problems[1].endswith("(in [profile.small])")
    # written in the file the message names: nothing added
    assert not problems_of(tmp_path, registry, VALID.replace("seed = 3", "sed = 3"))[0].endswith(")")


def test_problems_in_the_file_are_not_blamed_on_overrides(tmp_path, registry):
    text = VALID + "\n[audio_encodr]\nframe = 2\n"
    (problem,) = problems_of(tmp_path, registry, text, overrides=["audio_encodr.width=3"])
    assert problem.startswith("[audio_encodr]: unknown table") and "from override" not in problem


def test_run_and_loader_tables_are_checked_like_components(tmp_path, registry):
    text = VALID.replace("seed = 3", "sed = 3")
    assert problems_of(tmp_path, registry, text) == [
        "[run].sed: unknown key (did you mean 'seed'?); known keys: device, encoder_cache, name, output_dir, resume, seed, threads"
    ]


def test_an_evaluation_set_whose_type_is_not_a_name_is_a_recipe_problem_not_a_crash(tmp_path):
    """Found by tests/reliability/test_recipe_mutation.py: a list as an evaluation set's type
    used to crash the duplicate-task check (unhashable) before the type check could report it."""
    from mtrun.runner import prepare

    recipe = tmp_path / "r.toml"
    quickstart = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml"
    recipe.write_text(f'extends = "{quickstart}"\n[[eval]]\ntype = []\nname = "x"\n[eval.data]\ntype = "manifest"\npath = "m.csv"\n')
    with pytest.raises(RecipeError) as caught:
        prepare(recipe, overrides=[f'run.output_dir="{tmp_path}"'])
    assert "[[eval]][0].type: wrong type (got []; expected a string naming the eval)" in str(caught.value)
