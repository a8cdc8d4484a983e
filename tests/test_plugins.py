"""The plugin system: discovery through entry points, loud failures, filters, registration rules.

Throwaway distributions are written straight into ``tmp_path`` as a package plus a
``*.dist-info`` folder (METADATA and entry_points.txt), which is all ``importlib.metadata``
needs to find them once the folder is on ``sys.path``. The acceptance tests at the end install
the real testkit distribution with pip into a target folder and drive the ``mtrun`` CLI in a
subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import attrs
import pytest

from mtrun.errors import PluginError, RegistrationError
from mtrun.hookspecs import hookimpl
from mtrun.plugins import load_plugins
from mtrun.registry import PluginInfo, Registry

REPO = Path(__file__).resolve().parents[1]
TESTKIT = REPO / "tests" / "testkit"

OK_PLUGIN = """
import attrs
from mtrun.hookspecs import hookimpl


class {cls}:
    \"\"\"A projector that does nothing, from {dist}.\"\"\"

    @attrs.frozen
    class Config:
        pass

    def __init__(self, config, *, in_features):
        self.output_dim = in_features

    def forward(self, encoded):
        return encoded.pooled


@hookimpl
def mtrun_register_components(registry):
    registry.projector({component!r}, {cls})
"""


def make_distribution(
    site: Path, dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]
) -> None:
    """Write an installed-looking distribution into ``site`` without pip.

    Args:
        site: A folder that will be put on ``sys.path``.
        dist: Distribution name (``mtrun-boom``).
        version: Its version.
        entry_points: ``mtrun`` entry-point name -> module.
        modules: Top-level module name -> source.
    """
    site.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = ["[mtrun]"] + [f"{name} = {module}" for name, module in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """An empty site folder on ``sys.path``; modules imported from it are forgotten afterwards."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        if name.startswith("mtrun_fake"):
            del sys.modules[name]


def only(monkeypatch, *names: str, builtins: bool = False) -> None:
    """Load exactly these entry points, so the tests do not depend on what else is installed."""
    monkeypatch.setenv("MTRUN_LOAD_PLUGINS", ",".join(names))
    if builtins:
        monkeypatch.delenv("MTRUN_DISABLE_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("MTRUN_DISABLE_PLUGINS", "builtins")


def broken_import(site: Path) -> None:
    make_distribution(
        site,
        "mtrun-fake-boom",
        "1.2.3",
        {"boom": "mtrun_fake_boom"},
        {"mtrun_fake_boom": "raise RuntimeError('the boom plugin cannot find its weights')\n"},
    )


def good_plugin(site: Path, entry: str, dist: str, component: str = "noop", version: str = "0.3.0") -> None:
    module = f"mtrun_fake_{entry}"
    source = OK_PLUGIN.format(cls="Noop", dist=dist, component=component)
    make_distribution(site, dist, version, {entry: module}, {module: source})


# ------------------------------------------------------------------- loud import failures


def test_plugin_failing_to_import_names_entry_point_and_distribution(site, monkeypatch):
    broken_import(site)
    only(monkeypatch, "boom")
    with pytest.raises(PluginError) as info:
        load_plugins()
    message = str(info.value)
    assert 'Error importing plugin "boom"' in message
    assert "mtrun_fake_boom" in message  # the entry point's target
    assert "mtrun-fake-boom 1.2.3" in message  # the distribution and its version
    assert "RuntimeError: the boom plugin cannot find its weights" in message
    assert isinstance(info.value.__cause__, RuntimeError)


def test_plugin_importing_a_missing_dependency_is_an_error_not_a_warning(site, monkeypatch):
    make_distribution(
        site, "mtrun-fake-needy", "0.1.0", {"needy": "mtrun_fake_needy"}, {"mtrun_fake_needy": "import not_installed_anywhere_xyz\n"}
    )
    only(monkeypatch, "needy")
    with pytest.raises(PluginError, match=r"needy.*mtrun-fake-needy.*ModuleNotFoundError.*not_installed_anywhere_xyz"):
        load_plugins()


# ------------------------------------------------------------------------- env filters


def test_disable_plugins_skips_a_broken_plugin(site, monkeypatch):
    broken_import(site)
    good_plugin(site, "fine", "mtrun-fake-fine")
    monkeypatch.setenv("MTRUN_LOAD_PLUGINS", "boom,fine")
    monkeypatch.setenv("MTRUN_DISABLE_PLUGINS", "builtins, boom")  # spaces are tolerated
    loaded = load_plugins()
    assert [p.info.name for p in loaded.plugins] == ["fine"]
    assert loaded.components_of("fine") == [("projector", "noop")]


def test_load_plugins_selects_only_the_named_entry_points(site, monkeypatch):
    broken_import(site)  # would fail if it were loaded
    good_plugin(site, "fine", "mtrun-fake-fine")
    only(monkeypatch, "fine")
    loaded = load_plugins()
    assert [p.info.name for p in loaded.plugins] == ["fine"]
    plugin = loaded.plugins[0].info
    assert (plugin.distribution, plugin.version) == ("mtrun-fake-fine", "0.3.0")


def test_empty_load_plugins_loads_core_alone(site, monkeypatch):
    broken_import(site)
    good_plugin(site, "fine", "mtrun-fake-fine")
    monkeypatch.setenv("MTRUN_LOAD_PLUGINS", "")
    monkeypatch.delenv("MTRUN_DISABLE_PLUGINS", raising=False)
    loaded = load_plugins()
    assert [p.info.name for p in loaded.plugins] == ["builtins"]
    assert {c.plugin.name for c in loaded.registry} == {"builtins"}
    assert ("trainer", "default") in loaded.registry


def test_without_filters_a_broken_installed_plugin_stops_start_up(site, monkeypatch):
    broken_import(site)
    monkeypatch.delenv("MTRUN_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("MTRUN_DISABLE_PLUGINS", raising=False)
    with pytest.raises(PluginError, match='Error importing plugin "boom"'):
        load_plugins()


# ---------------------------------------------------------------------- name clashes


def test_component_name_clash_names_both_plugins(site, monkeypatch):
    good_plugin(site, "alpha", "mtrun-fake-alpha", component="shared", version="1.0")
    good_plugin(site, "beta", "mtrun-fake-beta", component="shared", version="2.0")
    only(monkeypatch, "alpha", "beta")
    with pytest.raises(RegistrationError) as info:
        load_plugins()
    message = str(info.value)
    assert "projector 'shared' is registered twice" in message
    assert "plugin 'alpha' (distribution mtrun-fake-alpha 1.0)" in message
    assert "plugin 'beta' (distribution mtrun-fake-beta 2.0)" in message
    assert "MTRUN_DISABLE_PLUGINS" in message


def test_clash_is_resolved_by_disabling_one_plugin(site, monkeypatch):
    good_plugin(site, "alpha", "mtrun-fake-alpha", component="shared")
    good_plugin(site, "beta", "mtrun-fake-beta", component="shared")
    monkeypatch.setenv("MTRUN_LOAD_PLUGINS", "alpha,beta")
    monkeypatch.setenv("MTRUN_DISABLE_PLUGINS", "builtins,beta")
    assert load_plugins().registry.get("projector", "shared").plugin.name == "alpha"


def test_two_distributions_claiming_one_entry_point_name_are_both_named(tmp_path, monkeypatch):
    for sub, dist in (("a", "mtrun-fake-one"), ("b", "mtrun-fake-two")):
        folder = tmp_path / sub
        module = f"mtrun_fake_{sub}"
        make_distribution(folder, dist, "0.1", {"same": module}, {module: OK_PLUGIN.format(cls="N", dist=dist, component=sub)})
        monkeypatch.syspath_prepend(str(folder))
    only(monkeypatch, "same")
    with pytest.raises(PluginError, match=r"mtrun-fake-(one|two).*mtrun-fake-(one|two)"):
        load_plugins()


# ------------------------------------------------------------------ registration checks


def register_with(*registrations) -> Registry:
    """Load an in-process plugin (as distribution mtrun-fake-reg) that makes these calls."""

    class Plugin:
        @staticmethod
        @hookimpl
        def mtrun_register_components(registry) -> None:
            for kind, name, cls in registrations:
                registry.add(kind, name, cls)

    info = PluginInfo(name="reg", distribution="mtrun-fake-reg", version="0.0.1")
    return load_plugins(extra=[(info, Plugin)], entry_points=False).registry


class GoodProjector:
    @attrs.frozen
    class Config:
        pass

    def forward(self, encoded):
        return encoded.pooled


class NoConfigProjector:
    def forward(self, encoded):
        return encoded.pooled


class PlainConfigProjector:
    class Config:  # not an attrs class: recipes could not be structured into it
        width = 3

    def forward(self, encoded):
        return encoded.pooled


class NoTokenizeTextEncoder:
    @attrs.frozen
    class Config:
        pass

    def forward(self, input_ids, attention_mask):
        return None


class BadStageAugmenter:
    @attrs.frozen
    class Config:
        pass

    stage: ClassVar[str] = "spectrogram"

    def __call__(self, value, context):
        return value


def test_well_formed_component_registers_with_its_plugin():
    registry = register_with(("projector", "good", GoodProjector))
    component = registry.get("projector", "good")
    assert component.cls is GoodProjector
    assert component.plugin == PluginInfo(name="reg", distribution="mtrun-fake-reg", version="0.0.1")


def test_component_without_config_is_rejected_naming_plugin_and_class():
    with pytest.raises(RegistrationError, match=r"plugin 'reg' \(distribution mtrun-fake-reg 0.0.1\).*'bare'.*NoConfigProjector.*no attrs `Config`"):
        register_with(("projector", "bare", NoConfigProjector))


def test_non_attrs_config_is_rejected():
    with pytest.raises(RegistrationError, match="no attrs `Config`"):
        register_with(("projector", "plain", PlainConfigProjector))


def test_component_missing_an_interface_method_is_rejected():
    with pytest.raises(RegistrationError, match=r"text_encoder 'half'.*lacks the interface method\(s\) tokenize"):
        register_with(("text_encoder", "half", NoTokenizeTextEncoder))


def test_augmenter_with_unknown_stage_is_rejected_listing_the_stages():
    with pytest.raises(RegistrationError, match=r"stage 'spectrogram'; expected one of sample, waveform, features"):
        register_with(("augmenter", "odd", BadStageAugmenter))


def test_unknown_kind_suggests_the_closest_kind():
    with pytest.raises(RegistrationError, match=r"unknown kind 'projecter' \(did you mean 'projector'\?\)"):
        register_with(("projecter", "good", GoodProjector))


def test_registering_the_same_class_twice_under_one_name_is_harmless():
    registry = register_with(("projector", "good", GoodProjector), ("projector", "good", GoodProjector))
    assert registry.names("projector") == ["good"]


def test_misspelled_hook_fails_at_start_up(site, monkeypatch):
    source = """
    from mtrun.hookspecs import hookimpl

    @hookimpl
    def mtrun_register_component(registry):  # the final "s" is missing
        pass
    """
    make_distribution(site, "mtrun-fake-typo", "0.1.0", {"typo": "mtrun_fake_typo"}, {"mtrun_fake_typo": source})
    only(monkeypatch, "typo")
    with pytest.raises(PluginError, match=r"plugin 'typo' \(distribution mtrun-fake-typo 0\.1\.0\) defines mtrun_register_component "
                       r"marked @mtrun\.hookimpl, which is no mtrun hook: the one hook is mtrun_register_components\(registry\) "
                       r"\(a misspelling\?\).*MTRUN_DISABLE_PLUGINS=typo"):
        load_plugins()


def test_a_hook_without_the_decorator_is_an_error_not_an_empty_plugin():
    class Unmarked:
        @staticmethod
        def mtrun_register_components(registry) -> None:  # no @mtrun.hookimpl: pluggy passes over it
            registry.add("projector", "good", GoodProjector)

    info = PluginInfo(name="unmarked", distribution="mtrun-unmarked", version="0.1.0")
    with pytest.raises(PluginError, match=r"plugin 'unmarked' \(distribution mtrun-unmarked 0\.1\.0\) defines "
                       r"mtrun_register_components without @mtrun\.hookimpl, so it would register nothing"):
        load_plugins(extra=[(info, Unmarked)], entry_points=False)
    loaded = load_plugins(extra=[(info, Unmarked)], entry_points=False, strict=False)
    assert [b.info.name for b in loaded.broken] == ["unmarked"] and not loaded.plugins


def test_another_plugin_registering_the_same_class_under_a_taken_name_is_a_clash():
    def plugin(name):
        class Plugin:
            @staticmethod
            @hookimpl
            def mtrun_register_components(registry) -> None:
                registry.add("projector", "good", GoodProjector)

        return PluginInfo(name=name, distribution=f"mtrun-{name}", version="0.1.0"), Plugin

    with pytest.raises(RegistrationError, match=r"projector 'good' is registered twice: by plugin '(first|second)'.*and by plugin '(first|second)'"):
        load_plugins(extra=[plugin("first"), plugin("second")], entry_points=False)


def test_hook_that_raises_is_reported_with_its_plugin():
    class Crashes:
        @staticmethod
        @hookimpl
        def mtrun_register_components(registry) -> None:
            raise KeyError("oops")

    info = PluginInfo(name="crashy", distribution="mtrun-fake-crashy", version="9")
    with pytest.raises(PluginError, match=r"plugin 'crashy' \(distribution mtrun-fake-crashy 9\) failed while registering"):
        load_plugins(extra=[(info, Crashes)], entry_points=False)


# ------------------------------------------------------------- acceptance: the real CLI


def _cli_env(extra_path: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTRUN_") and k != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return env


def _mtrun(*args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mtrun.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _plugins_json(env: dict[str, str]) -> list[dict]:
    result = _mtrun("plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["plugins"]


@pytest.fixture(scope="module")
def testkit_target(tmp_path_factory) -> Path:
    """tests/testkit installed by pip into a private folder, as a user would install a plugin."""
    # Build from a copy: setuptools builds in the source tree and would leave an egg-info in
    # tests/testkit/src, making the testkit look installed to any process with it on sys.path.
    source = tmp_path_factory.mktemp("testkit-source") / "testkit"
    shutil.copytree(TESTKIT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("testkit-target")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet", "--target", str(target), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return target


TESTKIT_COMPONENTS = [
    {"kind": "audio_encoder", "name": "toy-audio"},
    {"kind": "augmenter", "name": "toy-gain"},
    {"kind": "data", "name": "toy-tones"},
    {"kind": "objective", "name": "toy-contrastive"},
    {"kind": "projector", "name": "toy-linear"},
    {"kind": "text_encoder", "name": "toy-text"},
]


@pytest.mark.slow
def test_plugins_json_lists_testkit_only_after_it_is_installed(testkit_target):
    before = _plugins_json(_cli_env())
    assert "testkit" not in {p["name"] for p in before}
    assert "mtrun-testkit" not in {p["distribution"] for p in before}
    assert "builtins" in {p["name"] for p in before}

    after = _plugins_json(_cli_env(testkit_target))
    entry = next(p for p in after if p["name"] == "testkit")
    assert entry["distribution"] == "mtrun-testkit"
    assert entry["version"] == "0.1.0"
    components = sorted(({"kind": c["kind"], "name": c["name"]} for c in entry["components"]), key=lambda c: (c["kind"], c["name"]))
    assert components == TESTKIT_COMPONENTS


TINY_RECIPE = """\
# A tiny recipe built from the testkit plugin's components only.
description = "testkit end-to-end"

[run]
name = "e2e"
seed = 0

[loader]
clip_seconds = 0.5
crop = "start"

[data]
type = "toy-tones"
n_items = 16

[audio_encoder]
type = "toy-audio"

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
weight = 1.0

[trainer]
max_steps = 4
batch_size = 8
"""


@pytest.mark.slow
def test_recipe_of_installed_plugin_components_trains_end_to_end(testkit_target, tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    out = tmp_path / "runs"
    result = _mtrun(str(recipe), f"run.output_dir={out}", env=_cli_env(testkit_target), cwd=tmp_path)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    run_dir = out / "e2e"
    assert (run_dir / "recipe.toml").is_file()
    saved = (run_dir / "recipe.toml").read_text()
    assert "toy-contrastive" in saved and str(out) in saved  # the override is in the saved recipe
    checkpoints = [p for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert checkpoints, f"no checkpoint in {run_dir / 'checkpoints'}"


# ------------------------------------------------------------------------ meta-tests


def test_every_hook_is_documented_for_plugin_authors():
    from mtrun import hookspecs

    guide = (REPO / "docs" / "writing-a-plugin.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("mtrun_")]
    assert hooks, "hookspecs defines no hooks"
    for name in hooks:
        assert getattr(hookspecs, name).__doc__, f"hook {name} has no docstring (its contract)"
        assert f"`{name}" in guide or f"def {name}(" in guide, f"hook {name} is missing from docs/writing-a-plugin.md"


# ------------------------------------------------------------- a lenient listing for humans


def test_mtrun_plugins_lists_the_working_plugins_and_names_the_broken_ones(site, monkeypatch, capsys):
    from mtrun.cli import main

    broken_import(site)
    good_plugin(site, "fine", "mtrun-fake-fine")
    good_plugin(site, "alpha", "mtrun-fake-alpha", component="fine-noop-clash")
    make_distribution(
        site, "mtrun-fake-zclash", "0.1.0", {"zclash": "mtrun_fake_zclash"},
        {"mtrun_fake_zclash": OK_PLUGIN.format(cls="Noop", dist="mtrun-fake-zclash", component="noop")},
    )
    only(monkeypatch, "boom", "fine", "alpha", "zclash")
    monkeypatch.setattr("mtrun.plugins.get_plugins", load_plugins)
    assert main(["plugins", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    listed = sorted(p["name"] for p in report["plugins"])
    errors = {b["name"]: b["error"] for b in report["broken"]}
    # Of the two plugins claiming projector 'noop', the one that registers second is left out.
    (clashing,) = set(errors) - {"boom"}
    (kept,) = {"fine", "zclash"} - {clashing}
    assert listed == sorted(["alpha", kept])
    assert "the boom plugin cannot find its weights" in errors["boom"]
    assert "registered twice" in errors[clashing] and f"plugin '{kept}'" in errors[clashing]
    with pytest.raises(PluginError):  # training and validation stay strict
        load_plugins()
    assert main(["plugins"]) == 1
    err = capsys.readouterr().err
    assert 'broken, left out: Error importing plugin "boom"' in err and f"MTRUN_DISABLE_PLUGINS=boom,{clashing}" in err


def test_a_plugin_that_fails_part_way_through_registering_leaves_nothing_behind():
    class HalfDone:
        @hookimpl
        def mtrun_register_components(self, registry):
            registry.projector("first", GoodProjector)
            raise RuntimeError("second component's weights missing")

    loaded = load_plugins(extra=[(PluginInfo("half"), HalfDone())], entry_points=False, strict=False)
    assert [b.info.name for b in loaded.broken] == ["half"]
    assert ("projector", "first") not in loaded.registry


def test_mtrun_trace_says_what_each_plugin_registered_and_why_one_was_skipped(monkeypatch, capsys):
    """MTRUN_TRACE=1 is the first thing to read when an install misbehaves."""
    from mtrun import plugins

    monkeypatch.setenv("MTRUN_TRACE", "1")
    monkeypatch.setenv("MTRUN_DISABLE_PLUGINS", "mert")
    monkeypatch.delenv("MTRUN_LOAD_PLUGINS", raising=False)
    loaded = plugins.load_plugins()
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("mtrun trace: entry point mert = 'mtrun_mert'") and "MTRUN_DISABLE_PLUGINS" in line for line in err)
    assert any("plugin 'infonce'" in line and "imported 'mtrun_infonce' from " in line and line.endswith(" ms") for line in err)
    registered = [line for line in err if " registered " in line]
    assert any("registered objective 'infonce' -> mtrun_infonce.objective.InfoNCE" in line for line in registered)
    assert len(registered) == len(list(loaded.registry))  # one line per component, no more


def test_without_mtrun_trace_loading_plugins_prints_nothing(monkeypatch, capsys):
    from mtrun import plugins

    monkeypatch.delenv("MTRUN_TRACE", raising=False)
    plugins.load_plugins()
    assert capsys.readouterr().err == ""
