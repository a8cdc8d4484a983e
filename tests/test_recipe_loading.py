"""Recipe loading: extends, profiles, command-line overrides, TOML errors, dumping."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mtrun.errors import RecipeError
from mtrun.recipe import dump_recipe, load_recipe, parse_override, read_toml


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ extends


def test_child_overrides_parent_and_inherits_the_rest(tmp_path):
    write(
        tmp_path / "base" / "parent.toml",
        """
        description = "parent"
        [audio_encoder]
        type = "toy-audio"
        width = 32
        frame = 200
        [run]
        seed = 1
        """,
    )
    child = write(
        tmp_path / "child.toml",
        """
        extends = "base/parent.toml"
        [audio_encoder]
        width = 64
        [run]
        name = "child"
        """,
    )
    data = load_recipe(child)
    assert data == {
        "description": "parent",
        "audio_encoder": {"type": "toy-audio", "width": 64, "frame": 200},
        "run": {"seed": 1, "name": "child"},
    }
    assert "extends" not in data


def test_extends_is_recursive_and_relative_to_each_extending_file(tmp_path):
    write(tmp_path / "a" / "b" / "grand.toml", "[data]\ntype = 'toy-tones'\nn_items = 3\n")
    write(tmp_path / "a" / "mid.toml", "extends = 'b/grand.toml'\n[data]\nn_classes = 2\n")
    leaf = write(tmp_path / "leaf.toml", "extends = 'a/mid.toml'\n[data]\nn_items = 9\n")
    assert load_recipe(leaf) == {"data": {"type": "toy-tones", "n_items": 9, "n_classes": 2}}


def test_child_array_of_tables_replaces_the_parents_wholesale(tmp_path):
    write(
        tmp_path / "parent.toml",
        """
        [[objective]]
        type = "a"
        [[objective]]
        type = "b"
        weight = 2.0
        """,
    )
    child = write(tmp_path / "child.toml", "extends = 'parent.toml'\n[[objective]]\ntype = 'c'\n")
    assert load_recipe(child)["objective"] == [{"type": "c"}]


def test_extends_cycle_is_an_error_naming_the_chain(tmp_path):
    write(tmp_path / "a.toml", "extends = 'b.toml'\n")
    write(tmp_path / "b.toml", "extends = 'a.toml'\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "a.toml")
    (problem,) = info.value.problems
    assert "cycle" in problem
    assert "a.toml" in problem and "b.toml" in problem


def test_missing_parent_is_reported_with_the_resolved_path(tmp_path):
    child = write(tmp_path / "sub" / "child.toml", "extends = 'nope.toml'\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(child)
    assert info.value.source == str(child)
    assert "'nope.toml': no such file" in info.value.problems[0]
    assert str(tmp_path / "sub" / "nope.toml") in info.value.problems[0]


# ------------------------------------------------------------------------------ profiles

PROFILED = """
[trainer]
max_steps = 1000
batch_size = 64
[[objective]]
type = "infonce"
[profile.tiny.trainer]
max_steps = 2
[profile.tiny.run]
device = "cpu"
[profile.large.trainer]
batch_size = 1024
"""


def test_profile_merges_over_the_recipe_and_the_profile_table_is_dropped(tmp_path):
    recipe = write(tmp_path / "r.toml", PROFILED)
    data = load_recipe(recipe, profile="tiny")
    assert data == {
        "trainer": {"max_steps": 2, "batch_size": 64},
        "objective": [{"type": "infonce"}],
        "run": {"device": "cpu"},
    }
    assert "profile" not in load_recipe(recipe)
    assert load_recipe(recipe)["trainer"]["max_steps"] == 1000


def test_unknown_profile_suggests_the_closest_and_lists_the_available(tmp_path):
    recipe = write(tmp_path / "r.toml", PROFILED)
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, profile="tiyn")
    (problem,) = info.value.problems
    assert "did you mean 'tiny'?" in problem
    assert "available profiles: large, tiny" in problem


def test_overrides_apply_after_the_profile(tmp_path):
    recipe = write(tmp_path / "r.toml", PROFILED)
    data = load_recipe(recipe, overrides=["trainer.max_steps=5"], profile="tiny")
    assert data["trainer"]["max_steps"] == 5


def test_profiles_are_inherited_through_extends(tmp_path):
    write(tmp_path / "parent.toml", PROFILED)
    child = write(tmp_path / "child.toml", "extends = 'parent.toml'\n[profile.tiny.trainer]\nbatch_size = 4\n")
    assert load_recipe(child, profile="tiny")["trainer"] == {"max_steps": 2, "batch_size": 4}


def test_a_table_of_another_type_replaces_the_parents_table_wholesale(tmp_path):
    """A profile (or child) switching a component's type must not inherit the old type's keys."""
    write(
        tmp_path / "parent.toml",
        """
        [data]
        type = "clotho"
        metadata_dir = "~/clotho"
        audio_root = "~/clotho/audio"
        [audio_encoder]
        type = "toy-audio"
        width = 32
        [profile.tiny.data]
        type = "toy-tones"
        n_items = 8
        [profile.tiny.audio_encoder]
        type = "toy-audio"
        frame = 100
        """,
    )
    tiny = load_recipe(tmp_path / "parent.toml", profile="tiny")
    assert tiny["data"] == {"type": "toy-tones", "n_items": 8}
    assert tiny["audio_encoder"] == {"type": "toy-audio", "width": 32, "frame": 100}
    child = write(tmp_path / "child.toml", "extends = 'parent.toml'\n[audio_encoder]\ntype = 'other'\nsize = 2\n")
    assert load_recipe(child)["audio_encoder"] == {"type": "other", "size": 2}
    # The parent's profile edits were for the parent's encoder; the child's own choice stands.
    assert load_recipe(child, profile="tiny")["audio_encoder"] == {"type": "other", "size": 2}


# ----------------------------------------------------------------------------- overrides


@pytest.fixture
def base(tmp_path):
    return write(
        tmp_path / "r.toml",
        """
        [trainer.optimizer]
        lr = 1e-3
        [run]
        name = "base"
        [[objective]]
        type = "infonce"
        [[objective]]
        type = "byol"
        weight = 0.5
        """,
    )


def test_override_values_are_parsed_as_toml(base):
    data = load_recipe(
        base,
        overrides=[
            "trainer.optimizer.lr=3e-4",
            "trainer.epochs=7",
            "trainer.amp=true",
            'run.name="quoted"',
            "trainer.optimizer.betas=[0.9, 0.98]",
            "trainer.schedule={type = 'linear', warmup_steps = 5}",
        ],
    )
    trainer = data["trainer"]
    assert trainer["optimizer"]["lr"] == 3e-4 and isinstance(trainer["optimizer"]["lr"], float)
    assert trainer["epochs"] == 7 and isinstance(trainer["epochs"], int)
    assert trainer["amp"] is True
    assert trainer["optimizer"]["betas"] == [0.9, 0.98]
    assert trainer["schedule"] == {"type": "linear", "warmup_steps": 5}
    assert data["run"]["name"] == "quoted"


def test_override_value_that_is_not_toml_is_a_bare_string(base):
    data = load_recipe(base, overrides=["run.name=my-run", "run.output_dir=/tmp/x y"])
    assert data["run"] == {"name": "my-run", "output_dir": "/tmp/x y"}


def test_override_creates_missing_tables(base):
    data = load_recipe(base, overrides=["loader.num_workers=2", "audio_encoder.type=toy-audio"])
    assert data["loader"] == {"num_workers": 2}
    assert data["audio_encoder"] == {"type": "toy-audio"}


def test_retyping_a_table_by_override_drops_the_old_components_keys_but_not_the_slots(tmp_path):
    path = write(
        tmp_path / "r.toml",
        """
        [trainer.optimizer]
        type = "adamw"
        lr = 1e-3
        betas = [0.9, 0.98]
        [audio_encoder]
        type = "mert"
        preset = "95m"
        [[objective]]
        type = "infonce"
        weight = 0.5
        name = "clip"
        temperature = 0.03
        [[eval]]
        type = "retrieval"
        name = "mc"
        subset_size = 500
        [eval.data]
        type = "musiccaps"
        """,
    )
    data = load_recipe(path, overrides=[
        "audio_encoder.preset=tiny", "audio_encoder.type=mavil",  # set before the type: kept
        "trainer.optimizer.type=sgd", "trainer.optimizer.momentum=0.9",
        "objective.0.type=byol", "eval.0.type=zero-shot", "eval.0.category=genre",
    ])
    assert data["trainer"]["optimizer"] == {"type": "sgd", "momentum": 0.9}
    assert data["audio_encoder"] == {"type": "mavil", "preset": "tiny"}
    assert data["objective"] == [{"type": "byol", "weight": 0.5, "name": "clip"}]
    assert data["eval"] == [{"type": "zero-shot", "name": "mc", "data": {"type": "musiccaps"}, "category": "genre"}]
    same = load_recipe(path, overrides=["trainer.optimizer.type=adamw"])  # the same type: nothing dropped
    assert same["trainer"]["optimizer"]["betas"] == [0.9, 0.98]


def test_override_indexes_arrays_of_tables(base):
    data = load_recipe(base, overrides=["objective.1.weight=2", "objective.0.name=clip"])
    assert data["objective"] == [{"type": "infonce", "name": "clip"}, {"type": "byol", "weight": 2}]


def test_override_at_the_arrays_length_appends_a_table(base):
    data = load_recipe(base, overrides=["objective.2.type=mae", "augmenter.0.type=gain"])
    assert data["objective"][2] == {"type": "mae"}
    assert data["augmenter"] == [{"type": "gain"}]


def test_tilde_deletes_keys_tables_and_array_elements(base):
    data = load_recipe(base, overrides=["~trainer.optimizer.lr", "~run", "~objective.0"])
    assert data["trainer"] == {"optimizer": {}}
    assert "run" not in data
    assert data["objective"] == [{"type": "byol", "weight": 0.5}]


def test_deleting_a_missing_key_suggests_the_closest(base):
    with pytest.raises(RecipeError) as info:
        load_recipe(base, overrides=["~run.nam"])
    (problem,) = info.value.problems
    assert "'~run.nam'" in problem and "did you mean 'run.name'?" in problem


def test_bad_overrides_are_all_reported_at_once(base):
    with pytest.raises(RecipeError) as info:
        load_recipe(base, overrides=["trainer.optimizer.lr", "objective.5.weight=1", "run.name.first=x", "a..b=1"])
    problems = "\n".join(info.value.problems)
    assert len(info.value.problems) == 4
    assert "'trainer.optimizer.lr': expected KEY=VALUE" in problems
    assert "'objective.5.weight=1': index 5 is out of range: 'objective' has 2 element(s)" in problems
    assert "'run.name.first=x': 'run.name' is a value ('base'), not a table" in problems
    assert "'a..b=1': the key 'a..b' has an empty part" in problems


def test_parse_override_turns_digits_into_indexes():
    ov = parse_override("objective.0.weight=2.5")
    assert ov.path == ("objective", 0, "weight") and ov.value == 2.5 and not ov.delete
    assert parse_override("~augmenter").delete


# ----------------------------------------------------------------------------- TOML I/O


def test_toml_syntax_error_names_the_file_line_and_column(tmp_path):
    recipe = write(tmp_path / "broken.toml", "[data]\ntype = 'toy-tones'\nn_items = = 3\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    message = str(info.value)
    assert message.startswith(f"{recipe}: recipe is invalid")
    assert "TOML syntax error" in message and "line 3" in message and "column" in message


def test_syntax_error_in_a_parent_names_the_parent(tmp_path):
    parent = write(tmp_path / "parent.toml", "[data\n")
    child = write(tmp_path / "child.toml", "extends = 'parent.toml'\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(child)
    assert info.value.source == str(parent)


def test_missing_recipe_file_is_a_clear_error(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "absent.toml")
    assert info.value.problems == [f"no such file: {tmp_path / 'absent.toml'}"]
    assert info.value.exit_code == 2


def test_dump_recipe_round_trips_through_load(tmp_path, base):
    data = load_recipe(base, overrides=["trainer.optimizer.betas=[0.9, 0.98]", "description=hello"], profile=None)
    dumped = write(tmp_path / "dumped.toml", dump_recipe(data))
    assert load_recipe(dumped) == data
    assert read_toml(dumped) == dict(data)


def test_a_childs_retyped_table_drops_the_parents_profile_edits_of_it(tmp_path):
    """The parent's [profile.tiny.audio_encoder] tuned the parent's encoder; once the child
    swaps in another type those keys belong to nothing, while the parent's other profile edits
    and the child's own profile tables still apply."""
    write(
        tmp_path / "parent.toml",
        """
        [audio_encoder]
        type = "mert"
        pretrained = "m-a-p/MERT"
        [trainer]
        max_steps = 100
        [profile.tiny.audio_encoder]
        preset = "tiny"
        pretrained = ""
        [profile.tiny.trainer]
        max_steps = 2
        """,
    )
    child = write(
        tmp_path / "child.toml",
        "extends = 'parent.toml'\n[audio_encoder]\ntype = 'musicnn'\nweights = 'MTT'\n[profile.tiny.audio_encoder]\nmax_seconds = 6.0\n",
    )
    tiny = load_recipe(child, profile="tiny")
    assert tiny["audio_encoder"] == {"type": "musicnn", "weights": "MTT", "max_seconds": 6.0}
    assert tiny["trainer"] == {"max_steps": 2}
    same_type = write(tmp_path / "same.toml", "extends = 'parent.toml'\n[audio_encoder]\npretrained = 'other'\n")
    assert load_recipe(same_type, profile="tiny")["audio_encoder"] == {"type": "mert", "pretrained": "", "preset": "tiny"}
