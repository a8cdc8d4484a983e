"""The public API: ``import mtrun`` (and ``mtrun.testing``) is all a plugin may use."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import mtrun
from mtrun.errors import PluginError
from mtrun.plugins import load_plugins
from mtrun.registry import PluginInfo

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = {"mtrun", "mtrun.testing"}


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every absolute import in a Python file, both forms, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names]
    return found


def mtrun_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of an ``mtrun`` module in a Python file."""
    return [(line, n) for line, n in imports(path) if n == "mtrun" or n.startswith("mtrun.")]


def test_every_public_name_resolves_and_is_listed_in_all():
    assert "API_VERSION" in mtrun.__all__ and len(set(mtrun.__all__)) == len(mtrun.__all__)
    for name in mtrun.__all__:
        assert getattr(mtrun, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        mtrun.not_a_name  # noqa: B018


def test_plugins_import_only_the_public_api():
    """Every plugin, source and tests, as a third party's would: a private import fails here."""
    files = sorted(ROOT.glob("plugins/*/src/**/*.py")) + sorted(ROOT.glob("plugins/*/tests/**/*.py"))
    assert len(files) > 20
    private = [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for path in files
        for line, module in mtrun_imports(path)
        if module not in PUBLIC_MODULES
    ]
    assert not private, "plugins reach into private mtrun modules:\n" + "\n".join(private)


def test_core_never_imports_a_plugin():
    """Core's modules import no ``mtrun_*`` package: not the plugins in ``plugins/`` (the demo
    corpus and the dataset adapters included), nor any other. Both import forms, at any depth
    (a function-level import counts too)."""
    files = sorted((ROOT / "core" / "src" / "mtrun").rglob("*.py"))
    assert len(files) > 20
    plugin_packages = {p.name for p in ROOT.glob("plugins/*/src/mtrun_*")}
    assert {"mtrun_demo", "mtrun_datasets"} <= plugin_packages
    found = [
        f"{path.relative_to(ROOT)}:{line}: imports {n}" for path in files for line, n in imports(path) if n.split(".")[0].startswith("mtrun_")
    ]
    assert not found, "core imports plugins:\n" + "\n".join(found)


def test_the_scan_sees_private_imports(tmp_path):
    """The check above can fail: it catches both import forms."""
    sample = tmp_path / "plugin.py"
    sample.write_text("import mtrun.registry\nfrom mtrun.errors import MtrunError\nfrom mtrun import hookimpl\n")
    assert mtrun_imports(sample) == [(1, "mtrun.registry"), (2, "mtrun.errors"), (3, "mtrun")]


def test_importing_mtrun_loads_no_torch():
    """Names load on first use, so `mtrun --help` and `mtrun validate` stay fast."""
    code = "import sys, mtrun; mtrun.hookimpl; mtrun.Need; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class _Plugin:
    """A plugin module stand-in declaring the API range it supports."""

    def __init__(self, declared):
        self.MTRUN_API = declared


def test_a_plugin_for_another_api_version_is_refused_by_name():
    info = PluginInfo("future-encoder", distribution="mtrun-future-encoder", version="3.1")
    with pytest.raises(PluginError) as caught:
        load_plugins(extra=[(info, _Plugin(">=2.0"))], entry_points=False)
    message = str(caught.value)
    assert "plugin 'future-encoder' (distribution mtrun-future-encoder 3.1)" in message
    assert ">=2.0" in message and f"API {mtrun.API_VERSION}" in message


def test_a_plugin_with_a_malformed_api_range_is_refused():
    with pytest.raises(PluginError, match="not a version range"):
        load_plugins(extra=[(PluginInfo("odd"), _Plugin("version one"))], entry_points=False)


def test_a_plugin_within_range_loads():
    major = mtrun.API_VERSION.split(".")[0]
    plugin_set = load_plugins(extra=[(PluginInfo("fits"), _Plugin(f">={major}.0,<{int(major) + 1}"))], entry_points=False)
    assert [p.info.name for p in plugin_set.plugins] == ["fits"]


def test_every_plugin_in_the_repository_declares_its_api_range():
    inits = sorted(ROOT.glob("plugins/*/src/mtrun_*/__init__.py"))
    assert inits
    missing = [str(p.relative_to(ROOT)) for p in inits if "MTRUN_API" not in p.read_text()]
    assert not missing
