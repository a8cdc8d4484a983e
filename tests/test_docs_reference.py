"""The docs keep up with the code: the component reference is regenerated and compared."""

from __future__ import annotations

from pathlib import Path

import attrs

import mtrun.builtins
from mtrun.plugins import load_plugins
from mtrun.reference import render_markdown
from mtrun.registry import PluginInfo

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _builtins():
    return load_plugins(extra=[(PluginInfo("builtins"), mtrun.builtins)], entry_points=False).registry


def test_component_reference_matches_the_code():
    expected = render_markdown(_builtins())
    actual = (DOCS / "components.md").read_text()
    assert actual == expected, (
        "docs/components.md is out of date; regenerate it with "
        "`MTRUN_LOAD_PLUGINS= mtrun components --markdown --plugin builtins > docs/components.md`"
    )


def test_every_builtin_setting_has_help():
    missing = [
        f"{c.kind} {c.name}: {f.name}"
        for c in _builtins()
        for f in attrs.fields(c.config_class)
        if not f.metadata.get("help")
    ]
    assert not missing, f"settings without help text: {missing}"
