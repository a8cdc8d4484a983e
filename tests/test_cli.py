"""The `mtrun` command line: dispatch, validate, plugins, components, and error handling."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mtrun
import mtrun.plugins
from mtrun.cli import main
from mtrun.errors import MtrunError
from mtrun.recipe import load_recipe, read_toml

TESTS = Path(__file__).parent
CORE_SRC = Path(mtrun.__file__).parents[1]
TESTKIT_SRC = TESTS / "testkit" / "src"
if str(TESTKIT_SRC) not in sys.path:
    sys.path.insert(0, str(TESTKIT_SRC))

VALID = """
[data]
type = "toy-tones"
[audio_encoder]
type = "toy-audio"
[text_encoder]
type = "toy-text"
[audio_projector]
type = "toy-linear"
[text_projector]
type = "toy-linear"
[[objective]]
type = "toy-contrastive"
[profile.tiny.data]
n_items = 4
"""

# One mistake of each sort: unknown key, wrong type, unknown component, unknown table.
FOUR_MISTAKES = """
[data]
type = "toy-tones"
[audio_encoder]
type = "toy-audio"
sample_rte = 8000
[text_encoder]
type = "toy-text"
width = "wide"
[audio_projector]
type = "toy-linear"
[text_projector]
type = "toy-linear"
[[objective]]
type = "toy-contrastve"
[audio_encodr]
frame = 100
"""

EXPECTED_LINES = (
    "  - [audio_encoder].sample_rte: unknown key (did you mean 'sample_rate'?); known keys: frame, sample_rate, width",
    "  - [text_encoder].width: wrong type (got 'wide'; expected int)",
    "  - [[objective]][0].type = 'toy-contrastve': no objective of that name (did you mean 'toy-contrastive'?)",
    "  - [audio_encodr]: unknown table (did you mean [audio_encoder]?); known tables: data, audio_encoder",
)


def _isolated_plugins():
    sys.path.insert(0, str(TESTS))
    try:
        from test_recipe_validation import isolated_plugins
    finally:
        sys.path.remove(str(TESTS))
    return isolated_plugins()


@pytest.fixture(scope="module")
def plugin_set():
    return _isolated_plugins()


@pytest.fixture(autouse=True)
def isolated(monkeypatch, plugin_set):
    """Every command sees the testkit (and core's trainer) and nothing that happens to be installed."""
    monkeypatch.setattr(mtrun.plugins, "get_plugins", lambda: plugin_set)
    monkeypatch.setenv("COLUMNS", "200")  # rich tables: no wrapping in captured output
    monkeypatch.delenv("MTRUN_DEBUG", raising=False)


def write(tmp_path: Path, text: str, name: str = "recipe.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def fake_train(monkeypatch):
    calls = []

    def train(recipe_path, overrides=(), profile=None, resume=False):
        calls.append({"recipe": recipe_path, "overrides": list(overrides), "profile": profile, "resume": resume})
        return {"loss": 0.5, "step": 3}

    import mtrun.runner

    monkeypatch.setattr(mtrun.runner, "train", train)
    return calls


# ------------------------------------------------------------------------------ validate


def test_validate_reports_all_four_mistakes_and_exits_2_without_traceback(tmp_path, capsys):
    path = write(tmp_path, FOUR_MISTAKES)
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines[0] == f"{path}: recipe is invalid"
    assert len(lines) == 5
    for expected in EXPECTED_LINES:
        assert any(line.startswith(expected) for line in lines), expected


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(CORE_SRC), str(TESTKIT_SRC), env.get("PYTHONPATH", "")])
    env.pop("MTRUN_DEBUG", None)
    env.update(extra)
    return env


def test_validate_in_a_real_process_reports_all_four_mistakes(tmp_path):
    # The testkit is not installed as an entry point, so this process swaps in the same
    # isolated plugin set the in-process tests use, then runs the real `main`.
    path = write(tmp_path, FOUR_MISTAKES)
    boot = (
        "import sys, mtrun.plugins\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from test_recipe_validation import isolated_plugins\n"
        "ps = isolated_plugins()\n"
        "mtrun.plugins.get_plugins = lambda: ps\n"
        "from mtrun.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", boot, "validate", str(path)],
        capture_output=True, text=True, env=_subprocess_env(), timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[0] == f"{path}: recipe is invalid"
    for expected in EXPECTED_LINES:
        assert expected in proc.stderr


def test_python_m_mtrun_cli_validate_exits_2_with_plugins_disabled(tmp_path):
    # No plugin at all: the core tables are still checked, and the missing components are
    # reported as such rather than crashing.
    path = write(tmp_path, '[run]\nsed = 1\n[loader]\nnum_workers = "two"\n[audio_encodr]\nframe = 1\n')
    proc = subprocess.run(
        [sys.executable, "-m", "mtrun.cli", "validate", str(path)],
        capture_output=True, text=True, timeout=120,
        env=_subprocess_env(MTRUN_LOAD_PLUGINS="", MTRUN_DISABLE_PLUGINS="builtins,testkit"),
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"{path}: recipe is invalid\n")
    assert "[run].sed: unknown key (did you mean 'seed'?)" in proc.stderr
    assert "[loader].num_workers: wrong type (got 'two'; expected int)" in proc.stderr
    assert "[audio_encodr]: unknown table (did you mean [audio_encoder]?)" in proc.stderr
    assert "[trainer].type = 'default': no trainer of that name; installed: none." in proc.stderr


def test_validate_ok_prints_a_summary_of_the_components(tmp_path, capsys):
    path = write(tmp_path, VALID)
    assert main(["validate", str(path), "--profile", "tiny"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{path}: recipe OK (profile tiny)"
    # Columns are as wide as the longest slot name; the trainer's nested tables are listed too.
    for line in ("audio_encoder toy-audio", "audio_projector toy-linear", "objective[0] toy-contrastive (weight 1)",
                 "trainer default", "trainer.optimizer adamw", "trainer.schedule cosine"):
        assert re.search(r"^  " + r" +".join(map(re.escape, line.split(" ", 1))) + "$", out, re.MULTILINE), line


def test_validate_print_shows_the_resolved_recipe_after_profile_and_overrides(tmp_path, capsys):
    path = write(tmp_path, VALID)
    assert main(["validate", str(path), "data.seconds=0.25", "--print", "--profile", "tiny", "objective.0.weight=2"]) == 0
    printed = read_toml(write(tmp_path, capsys.readouterr().out, name="printed.toml"))
    assert printed == load_recipe(path, ["data.seconds=0.25", "objective.0.weight=2"], profile="tiny")
    assert printed["data"] == {"type": "toy-tones", "n_items": 4, "seconds": 0.25}
    assert "profile" not in printed


def test_validate_unknown_profile_exits_2(tmp_path, capsys):
    path = write(tmp_path, VALID)
    assert main(["validate", str(path), "--profile", "tiyn"]) == 2
    assert "did you mean 'tiny'?" in capsys.readouterr().err


def test_usage_error_exits_2(capsys):
    assert main(["validate"]) == 2
    assert "recipe" in capsys.readouterr().err


# --------------------------------------------------------------------------------- train


def test_bare_recipe_path_trains_with_overrides_profile_and_resume(fake_train, capsys):
    argv = ["recipes/x.toml", "trainer.optimizer.lr=1e-3", "--profile", "tiny", "~augmenter", "--resume"]
    assert main(argv) == 0
    assert fake_train == [
        {"recipe": "recipes/x.toml", "overrides": ["trainer.optimizer.lr=1e-3", "~augmenter"], "profile": "tiny", "resume": True}
    ]
    assert "loss=0.5" in capsys.readouterr().out


def test_train_is_an_explicit_alias(fake_train):
    assert main(["train", "r.toml", "run.name=x"]) == 0
    assert fake_train == [{"recipe": "r.toml", "overrides": ["run.name=x"], "profile": None, "resume": False}]


def test_user_errors_print_without_traceback_and_use_their_exit_code(monkeypatch, capsys):
    import mtrun.runner

    def train(*args, **kwargs):
        raise MtrunError("run folder already holds checkpoints")

    monkeypatch.setattr(mtrun.runner, "train", train)
    assert main(["r.toml"]) == 1
    err = capsys.readouterr().err
    assert err == "run folder already holds checkpoints\n"
    monkeypatch.setenv("MTRUN_DEBUG", "1")
    with pytest.raises(MtrunError):
        main(["r.toml"])


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    import mtrun.runner

    def train(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mtrun.runner, "train", train)
    assert main(["r.toml"]) == 130
    assert capsys.readouterr().err == "mtrun: interrupted; checkpoints already written are kept. Continue with: mtrun r.toml --resume\n"
    monkeypatch.setattr(mtrun.runner, "train", train)
    assert main(["train", "r.toml", "--profile", "tiny"]) == 130
    assert "Continue with: mtrun r.toml --profile tiny --resume" in capsys.readouterr().err


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys\nfrom mtrun.cli import main\nrc = main(['--help'])\nprint(rc, 'torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_subprocess_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "0 False"
    assert "mtrun validate RECIPE" in proc.stdout


# ------------------------------------------------------------------- plugins, components


def test_plugins_json_lists_each_plugin_with_its_components(capsys):
    assert main(["plugins", "--json"]) == 0
    plugins = {p["name"]: p for p in json.loads(capsys.readouterr().out)["plugins"]}
    kit = plugins["testkit"]
    assert set(kit) == {"name", "distribution", "version", "components"}
    assert {"kind": "audio_encoder", "name": "toy-audio"} in kit["components"]
    assert {"kind": "augmenter", "name": "toy-gain"} in kit["components"]
    assert len(kit["components"]) == 6


def test_plugins_table_names_components(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "testkit" in out and "objective: toy-contrastive" in out


def test_components_lists_every_kind_with_summaries(capsys):
    assert main(["components"]) == 0
    out = capsys.readouterr().out
    assert "toy-audio" in out and "toy-contrastive" in out
    assert "Frames the waveform into non-overlapping windows" in out


def test_a_component_summary_is_its_whole_first_paragraph_in_plain_text():
    from mtrun.registry import Component

    class Documented:
        """Trains a :class:`~mtrun.system.System` with the optimizer of its
        ``[trainer.optimizer]`` table and :func:`mtrun.distributed.init` ranks.

        Details that are not the summary.
        """

    summary = Component(kind="trainer", name="x", cls=Documented, plugin=None).summary
    assert summary == "Trains a System with the optimizer of its [trainer.optimizer] table and mtrun.distributed.init ranks."


def test_a_plugin_name_in_the_selection_variables_that_is_not_installed_is_reported(monkeypatch, capsys):
    from mtrun.plugins import _selected_entry_points

    monkeypatch.setenv("MTRUN_DISABLE_PLUGINS", "infonc")
    monkeypatch.delenv("MTRUN_LOAD_PLUGINS", raising=False)
    names = {ep.name for ep in _selected_entry_points()}
    assert "infonce" in names  # nothing disabled: the name matched no plugin
    err = capsys.readouterr().err
    assert "mtrun: MTRUN_DISABLE_PLUGINS names 'infonc', which is not an installed plugin (did you mean 'infonce'?)" in err
    monkeypatch.setenv("MTRUN_LOAD_PLUGINS", "nonexistent")
    monkeypatch.delenv("MTRUN_DISABLE_PLUGINS")
    _selected_entry_points()
    assert "MTRUN_LOAD_PLUGINS names 'nonexistent', which is not an installed plugin; installed: builtins" in capsys.readouterr().err


def test_components_plugin_option_is_checked(capsys):
    assert main(["components", "--markdown", "--plugin", "nonexist"]) == 2
    assert "no plugin with components 'nonexist'" in capsys.readouterr().err
    assert main(["components", "--plugin", "toy"]) == 2
    assert "--plugin selects what --markdown writes" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["validate"], ["ablate"], ["eval"], ["embed"], ["search"], ["export"], ["report"],
                                     ["data", "shard"], ["data", "demo"], ["new-plugin"], ["components"], ["plugins"]])
def test_help_fits_80_columns_without_a_terminal(command, capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    assert main([*command, "--help"]) == 0
    wide = [line for line in capsys.readouterr().out.splitlines() if len(line) > 80]
    assert not wide, wide


@pytest.mark.parametrize(("argv", "message"), [
    (["trian", "recipes/quickstart.toml"], "mtrun: 'trian' is neither a command nor a file (did you mean `mtrun train`?)"),
    (["-x"], "mtrun: unknown option -x; the first argument is a recipe file or a command"),
    (["validate", "recipes/quickstart.toml", "--prin"], "unrecognized arguments: --prin"),  # no prefix matching
])
def test_a_mistyped_command_or_option_is_named(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["validate", "train", "ablate"])
def test_a_missing_recipe_is_the_only_missing_argument_named(command, capsys):
    assert main([command]) == 2
    assert capsys.readouterr().err.rstrip().endswith("error: the following arguments are required: recipe")


def test_tables_for_a_pipe_are_aligned_text_with_the_last_column_unpadded(capsys):
    assert main(["components", "audio_projector", "toy-linear"]) == 0
    lines = capsys.readouterr().out.splitlines()
    title = lines.index('settings: [audio_projector] type = "toy-linear"')  # the slot asked for, not [projector]
    header, rows = lines[title + 1], lines[title + 2 :]
    assert header.split() == ["key", "type", "default", "help"] and rows
    starts = {header.index("help")} | {len(r) - len(r.split("  ")[-1].lstrip()) for r in rows}
    assert len(starts) == 1  # every help starts in one column
    assert not any(line != line.rstrip() for line in lines)


def test_print_table_on_a_terminal_is_a_rich_table():
    import io

    from rich.console import Console

    from mtrun.console import print_table

    out = io.StringIO()
    print_table(Console(file=out, force_terminal=True, width=60), "t", ("a", "b"), [("[x]", "y\nz")])
    text = out.getvalue()
    assert "┃" in text and "[x]" in text  # a table, and brackets are text, not markup


def test_components_of_one_kind_lists_only_that_kind(capsys):
    assert main(["components", "projector"]) == 0
    out = capsys.readouterr().out
    assert "toy-linear" in out and "toy-audio" not in out


def test_components_kind_name_shows_config_fields_with_type_default_and_help(capsys):
    assert main(["components", "audio_encoder", "toy-audio"]) == 0
    out = capsys.readouterr().out
    for fragment in ("frame", "samples per token", "200", "sample_rate", "input sample rate", "8000", "int"):
        assert fragment in out


def test_components_accepts_a_slot_name_for_its_kind(capsys):
    assert main(["components", "audio_projector", "toy-linear"]) == 0
    assert "embedding width" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["components", "audio_encodr"], "no component kind 'audio_encodr' (did you mean 'audio_encoder'?)"),
        (["components", "objective", "toy-contrastve"], "no objective 'toy-contrastve' (did you mean 'toy-contrastive'?); installed: toy-contrastive"),
    ],
)
def test_components_unknown_kind_or_name_suggests_and_exits_2(capsys, argv, fragment):
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`mtrun validate RECIPE --print | true`: no traceback when the reader has gone (`true`
    exits before mtrun has started, so every write meets a closed pipe)."""
    import subprocess
    import sys
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "slap.toml"
    proc = subprocess.run(
        f"'{sys.executable}' -m mtrun.cli validate '{recipe}' --print | true",
        shell=True, capture_output=True, text=True, timeout=120,
    )
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
