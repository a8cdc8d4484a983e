"""docs/writing-a-plugin.md works as written: its example plugin is built, loaded and checked.

How the guide's code blocks are read:

* A fenced ``python`` or ``toml`` block whose first line is a comment ``# mtrun-example/<path>``
  is a file of the guide's example distribution. Every such file is written under a temporary
  folder, and its ``src`` folder is put on ``sys.path`` so ``mtrun_example`` imports as an
  installed plugin would.
* Every other ``python`` block is a snippet. All snippets run in the order they appear, in one
  namespace that starts empty, once the package is importable. A snippet that raises (say,
  an import of a name that no longer exists) fails the test, naming its line in the guide.
* The example's own ``tests/`` (its ``conftest.py`` and test module, which use mtrun.testing's
  fixtures and combine the plugin with ``mavil``, ``mert``, ``hf-text``, ``projectors`` and
  ``infonce`` in a recipe) run in a pytest subprocess, as a plugin author would run them.

Independently of the guide's tests, this module registers the example plugin with
``mtrun.testing.isolated_registry``, runs ``check_component`` on each component and resolves
recipes with ``mtrun.testing.resolve`` (which is ``mtrun.recipe.resolve_recipe``) whose other
slots are the testkit's toy components. What the page shows besides code is held to the code
too: its TOML recipe fragment resolves, the validation message it prints is the one
``mtrun validate`` gives, and the weight-loading function it defines loads a checkpoint.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import mtrun
import mtrun.testing
from mtrun.testing import check_component, config_converter, isolated_registry, resolve

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-a-plugin.md"
DIST = "mtrun-example"
PACKAGE = "mtrun_example"

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)
_FILE_HEADER = re.compile(rf"^# ({re.escape(DIST)}/\S+)\s*$")


def guide_blocks() -> list[tuple[int, str, str]]:
    """``(line, language, code)`` of every fenced block of the guide, in order."""
    text = GUIDE.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)) for m in _FENCE.finditer(text)]


def guide_files() -> dict[str, str]:
    """The example distribution's files, by path relative to the distribution folder."""
    files = {}
    for _, language, code in guide_blocks():
        header = _FILE_HEADER.match(code.splitlines()[0]) if code.strip() else None
        if language in ("python", "toml") and header:
            path = header.group(1)[len(DIST) + 1 :]
            assert path not in files, f"the guide writes {path} twice"
            files[path] = code
    return files


def guide_snippets() -> list[tuple[int, str]]:
    """``(line, code)`` of the Python blocks that are not files."""
    return [
        (line, code)
        for line, language, code in guide_blocks()
        if language == "python" and not _FILE_HEADER.match(code.splitlines()[0])
    ]


def _forget_example() -> None:
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def example_dist(tmp_path_factory):
    """The guide's distribution written to disk, its package importable; removed afterwards."""
    root = tmp_path_factory.mktemp("guide") / DIST
    for path, code in guide_files().items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(code, encoding="utf-8")
    src = str(root / "src")
    sys.path.insert(0, src)
    _forget_example()
    importlib.invalidate_caches()
    try:
        yield root
    finally:
        sys.path.remove(src)
        _forget_example()


@pytest.fixture(scope="module")
def example(example_dist):
    return importlib.import_module(PACKAGE)


@pytest.fixture
def registry(example):
    """Core's built-ins, the testkit's toy components and the guide's plugin, nothing installed."""
    import mtrun_testkit

    return isolated_registry(mtrun_testkit, example)


TOY = {
    "data": {"type": "toy-tones", "n_items": 8},
    "audio_encoder": {"type": "toy-audio", "width": 24},
    "text_encoder": {"type": "toy-text", "width": 20},
    "audio_projector": {"type": "toy-linear", "dim": 8},
    "text_projector": {"type": "toy-linear", "dim": 8},
    "objective": [{"type": "toy-contrastive"}],
    "trainer": {"max_steps": 1, "batch_size": 4},
}


# ------------------------------------------------------------------------- the page itself


def test_guide_mentions_no_removed_names():
    text = GUIDE.read_text(encoding="utf-8")
    for removed in ("mtrun.registry.KINDS", "recipe.slots", "mtrun.hookspecs import", "from mtrun.interfaces", "from mtrun.weights", "mtrun.nn."):
        assert removed not in text, f"the guide still mentions {removed!r}"


def test_every_mtrun_name_the_guide_mentions_is_public():
    """``mtrun.X`` anywhere in the page (code or prose) is in ``mtrun.__all__``; ``mtrun.testing.X`` in its API."""
    text = GUIDE.read_text(encoding="utf-8")
    testing_names = set(mtrun.testing.__all__) | {"mtrun_registry", "mtrun_plugin_modules"}
    unknown = sorted(
        {name for name in re.findall(r"(?<![\w.-])mtrun\.(\w+)", text) if name not in mtrun.__all__ and name not in ("testing", "__all__")}
        | {f"testing.{name}" for name in re.findall(r"(?<![\w.-])mtrun\.testing\.(\w+)", text) if name not in testing_names}
    )
    assert not unknown, f"the guide names mtrun attributes that are not public: {unknown}"


def test_guide_holds_a_whole_distribution():
    files = guide_files()
    assert {"pyproject.toml", f"src/{PACKAGE}/__init__.py", "tests/conftest.py", "tests/test_example.py"} <= set(files)
    project = tomllib.loads(files["pyproject.toml"])
    assert project["project"]["name"] == DIST
    assert project["project"]["entry-points"]["mtrun"] == {"example": PACKAGE}
    assert "mtrun" in project["project"]["dependencies"]


# ------------------------------------------------------------------------- running it


def run_snippets() -> dict:
    """Run every snippet in order in one fresh namespace; fail naming the first that raises."""
    namespace: dict = {"__name__": "guide"}
    for line, code in guide_snippets():
        try:
            exec(compile(code, f"{GUIDE.name}:{line}", "exec"), namespace)  # noqa: S102 - our own docs
        except Exception as exc:  # noqa: BLE001 - reported with the block's place in the guide
            pytest.fail(f"the snippet at {GUIDE.name} line {line} raised {type(exc).__name__}: {exc}")
    return namespace


def test_snippets_run_in_order(example):
    assert len(guide_snippets()) >= 4
    namespace = run_snippets()
    assert namespace["converter"] is not None and callable(namespace["load_pretrained"])


def test_the_guides_weight_loading_function_loads_a_checkpoint(example, tmp_path):
    """``load_pretrained`` as the guide writes it: prefixes stripped, decoder keys ignored,
    ``fc_norm`` renamed, a missing ``pos_embed`` kept; anything else missing is an error."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    load_pretrained = run_snippets()["load_pretrained"]

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
            self.proj = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)

    model = Tiny()
    state = {
        "module.proj.weight": torch.full((4, 4), 2.0),
        "module.proj.bias": torch.ones(4),
        "module.fc_norm.weight": torch.full((4,), 3.0),
        "module.norm.bias": torch.zeros(4),
        "module.decoder.head.weight": torch.ones(2, 2),
    }
    save_file(state, str(tmp_path / "vit.safetensors"))
    report = load_pretrained(model, tmp_path / "vit.safetensors")
    assert report.ignored == ("decoder.head.weight",) and report.kept == ("pos_embed",)
    assert torch.equal(model.norm.weight, torch.full((4,), 3.0)) and torch.equal(model.proj.bias, torch.ones(4))
    del state["module.proj.bias"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(mtrun.MtrunError, match="missing from the checkpoint"):
        load_pretrained(model, tmp_path / "broken.safetensors")


def _guide_block(language: str, first_line: str) -> str:
    """The guide's one ``language`` block (not a file) whose first non-empty line is ``first_line``."""
    found = [
        code
        for _, lang, code in guide_blocks()
        if lang == language and code.strip() and code.strip().splitlines()[0].strip() == first_line
    ]
    assert len(found) == 1, f"expected one {language or 'plain'} block starting {first_line!r} in the guide, found {len(found)}"
    return found[0]


def test_the_guides_nested_table_fragment_resolves(example):
    """The ``[[objective]]`` + ``[objective.inner]`` TOML the guide shows, in a recipe, through
    ``mtrun.recipe.resolve_recipe`` (what ``mtrun validate`` runs)."""
    pytest.importorskip("mtrun_infonce")
    import mtrun_testkit
    from mtrun.recipe import resolve_recipe

    fragment = tomllib.loads(_guide_block("toml", "[[objective]]"))
    registry = isolated_registry(mtrun_testkit, example, "mtrun_infonce")
    resolved = resolve_recipe({**TOY, **fragment}, registry, "guide.toml")
    (ramped,) = resolved.objectives
    assert (ramped.name, ramped.config.steps) == ("ramped", 2000)
    inner = ramped.config.inner
    assert (inner.slot, inner.name, inner.config.temperature) == ("objective[0].inner", "infonce", 0.03)


def test_the_validation_message_the_guide_shows_is_the_real_one(example):
    """The guide prints what ``mtrun validate`` says when ``span-mask`` meets ``mert``; same words."""
    needed = ("mtrun_mavil", "mtrun_mert", "mtrun_hf_text", "mtrun_projectors", "mtrun_infonce", "mtrun_demo")
    for name in needed:
        pytest.importorskip(name)
    shown = _guide_block("", "recipe.toml: recipe is invalid").strip().splitlines()[1:]
    shown_text = " ".join(" ".join(shown).split()).removeprefix("- ")
    registry = isolated_registry(example, *needed)
    recipe = {
        "data": {"type": "demo"},
        "audio_encoder": {"type": "mert"},
        "text_encoder": {"type": "hf-text"},
        "audio_projector": {"type": "linear"},
        "text_projector": {"type": "linear"},
        "augmenter": [{"type": "gain"}, {"type": "span-mask"}],
        "objective": [{"type": "infonce"}],
    }
    with pytest.raises(mtrun.RecipeError) as caught:
        resolve(recipe, registry)
    assert [" ".join(p.split()) for p in caught.value.problems] == [shown_text]


def test_example_plugin_declares_a_supported_api_range(example):
    from packaging.specifiers import SpecifierSet

    assert mtrun.API_VERSION in SpecifierSet(example.MTRUN_API)


def test_example_plugin_registers_its_components(registry):
    mine = sorted((c.kind, c.name) for c in registry if c.plugin.name == "example")
    assert mine == [("augmenter", "gain"), ("augmenter", "span-mask"), ("objective", "ramped")]


def test_example_components_pass_the_contract_check(registry):
    gain = check_component(registry, "augmenter", "gain")
    assert gain.stage == "waveform"
    mask = check_component(registry, "augmenter", "span-mask")
    assert [need.capability for need in mask.requires] == ["keep_index"]
    config = config_converter(registry).structure({"inner": {"type": "toy-contrastive"}, "steps": 2}, registry.get("objective", "ramped").cls.Config)
    ramped = check_component(registry, "objective", "ramped", config=config)
    assert type(ramped.inner).__name__ == "ToyContrastive"


def test_a_recipe_using_the_example_plugin_resolves(registry):
    recipe = {
        **TOY,
        "augmenter": [{"type": "gain", "p": 0.25}],
        "objective": [{"type": "ramped", "steps": 10, "inner": {"type": "toy-contrastive", "temperature": 0.5}}],
    }
    resolved = resolve(recipe, registry)
    assert resolved.augmenters[0].config.p == 0.25
    inner = resolved.objectives[0].config.inner
    assert (inner.slot, inner.name, inner.config.temperature) == ("objective[0].inner", "toy-contrastive", 0.5)


def test_the_example_contract_and_nesting_are_checked_by_resolve(registry):
    recipe = {**TOY, "augmenter": [{"type": "span-mask"}], "objective": [{"type": "ramped"}]}
    with pytest.raises(mtrun.RecipeError) as caught:
        resolve(recipe, registry)
    (problem,) = caught.value.problems
    assert problem.startswith("[[objective]][0].inner: missing"), problem
    recipe["objective"] = [{"type": "ramped", "inner": {"type": "toy-contrastive"}}]
    with pytest.raises(mtrun.RecipeError) as caught:
        resolve(recipe, registry)
    (problem,) = caught.value.problems
    assert problem.startswith("[[augmenter]][0].type = 'span-mask': needs [audio_encoder] to provide 'keep_index'"), problem


def test_ramped_passes_on_what_its_inner_objective_provides(example):
    from mtrun_example.ramped import Ramped

    class Provider:
        provides = frozenset({"hard_negatives"})

        class Config:
            pass

    spec = mtrun.ComponentSpec.of("objective", "provider", Provider)
    assert Ramped.provides(Ramped.Config(inner=spec)) == {"hard_negatives"}


def test_the_guides_own_tests_pass(example_dist):
    """The example's tests/ run as a plugin author runs them (they need the real plugins they name)."""
    for needed in ("mtrun_mavil", "mtrun_mert", "mtrun_hf_text", "mtrun_projectors", "mtrun_infonce", "mtrun_demo"):
        pytest.importorskip(needed)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(example_dist / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(example_dist), "tests"],
        cwd=example_dist,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"\b5 passed\b", result.stdout), result.stdout[-2000:]
