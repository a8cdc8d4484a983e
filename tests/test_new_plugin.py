"""`mtrun new-plugin`: every kind's distribution passes its own tests as generated, installs
with pip outside this repository, and is found through its entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtrun.errors import MtrunError
from mtrun.scaffold import KINDS, names_for, write_plugin


def test_names_are_spelled_for_each_place_they_appear():
    assert names_for("my-loss") == {"name": "my-loss", "dist": "mtrun-my-loss", "package": "mtrun_my_loss", "Class": "MyLoss"}
    for bad in ("My-Loss", "my_loss", "-loss", "loss-", "2loss", "my--loss"):
        with pytest.raises(MtrunError, match="is not a plugin name"):
            names_for(bad)


def test_nothing_is_ever_overwritten(tmp_path):
    target = tmp_path / "mtrun-my-loss"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(MtrunError, match="exists and is not empty"):
        write_plugin("my-loss", "objective", tmp_path)
    assert (target / "notes.txt").read_text() == "mine" and sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    with pytest.raises(MtrunError, match="unknown kind 'trainer'; choose one of objective"):
        write_plugin("my-loss", "trainer", tmp_path / "other")


def test_a_name_this_environment_uses_is_refused_before_anything_is_written(tmp_path):
    # The whole plugin (distribution, package, entry point, component) is installed here.
    with pytest.raises(MtrunError, match=r"'infonce' is taken here: the distribution mtrun-infonce .* is installed; "
                       r"the package mtrun_infonce is importable; a plugin registers the mtrun entry point 'infonce'; "
                       r"an installed plugin provides the objective 'infonce'.*choose another name \(e\.g\. my-infonce\)"):
        write_plugin("infonce", "objective", tmp_path)
    # Only the component name: the projectors plugin provides 'linear'.
    with pytest.raises(MtrunError, match=r"'linear' is taken here: an installed plugin provides the projector 'linear'\. "):
        write_plugin("linear", "projector", tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert write_plugin("linear", "objective", tmp_path).name == "mtrun-linear"  # another kind's name is free


@pytest.mark.slow
def test_every_kind_passes_its_own_tests_as_generated(tmp_path):
    folders = [write_plugin(f"my-{kind.replace('_', '-')}", kind, tmp_path) for kind in KINDS]
    for folder in folders:
        text = (folder / "README.md").read_text()
        assert "$" not in text and "type = \"my-" in text  # every placeholder filled, usage shown
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(f / "src") for f in folders), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *[str(f / "tests") for f in folders]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    import re

    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 2 * len(KINDS) and "failed" not in result.stdout, result.stdout[-2000:]


@pytest.mark.slow
def test_a_generated_plugin_installs_with_pip_and_mtrun_finds_its_component(tmp_path):
    folder = write_plugin("cosine-pull", "objective", tmp_path / "src")
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet", "--target", str(target), str(folder)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    env = {**os.environ, "PYTHONPATH": str(target), "MTRUN_LOAD_PLUGINS": "cosine-pull"}
    listed = subprocess.run([sys.executable, "-m", "mtrun.cli", "plugins", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    plugin = next(p for p in json.loads(listed.stdout)["plugins"] if p["name"] == "cosine-pull")
    assert plugin["distribution"] == "mtrun-cosine-pull"
    shown = subprocess.run([sys.executable, "-m", "mtrun.cli", "components", "objective", "cosine-pull"], env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "multiplies the loss" in shown.stdout, shown.stdout + shown.stderr


def test_a_folder_that_cannot_be_written_is_a_message_not_a_traceback(tmp_path, capsys):
    from mtrun.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    status = main(["new-plugin", "my-loss", "--kind", "objective", "--dir", str(blocker)])
    err = capsys.readouterr().err
    assert status != 0 and "Traceback" not in err
    assert f"new-plugin: cannot write {blocker / 'mtrun-my-loss'}" in err and "--dir" in err
