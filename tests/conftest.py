"""Shared fixtures: an isolated registry (builtins + testkit) and tiny systems.

The testkit is not installed; its source folder is put on ``sys.path`` here, and the registry
is built from in-process plugins only, so no installed plugin can change what the tests see.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
for _path in (TESTS / "testkit" / "src", TESTS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


@pytest.fixture
def registry():
    """The registry of core's builtins and the testkit, without entry-point discovery."""
    import mtrun.builtins
    import mtrun_testkit

    from mtrun.plugins import load_plugins
    from mtrun.registry import PluginInfo

    return load_plugins(
        extra=[(PluginInfo("builtins"), mtrun.builtins), (PluginInfo("testkit"), mtrun_testkit)],
        entry_points=False,
    ).registry


@pytest.fixture
def toy_system():
    """A factory: ``toy_system(seed=0, augment=False, extra_augmenters=())`` → a System of
    testkit components (ToyAudio, ToyText, ToyLinear projectors, ToyContrastive, ToyGain)."""
    from toyrun import build_system

    return build_system


@pytest.fixture
def toy_trainer():
    """A factory: ``toy_trainer(run_dir, **knobs)`` → a DefaultTrainer on ToyTones
    (see ``tests/toyrun.py`` for the knobs)."""
    from toyrun import build_trainer

    return build_trainer


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """An uninterrupted 20-step toy run (augmentation on, grad_accum 2, a checkpoint every
    step): the trajectory the kill-and-resume tests must reproduce exactly."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    from toyrun import run_toy

    run_toy(run_dir)
    return run_dir
