"""Every recipe in recipes/ — and every profile it carries — validates with the installed plugins."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtrun.cli import main
from mtrun.recipe.loader import _load_with_extends  # profiles as seen after `extends`

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _cases() -> list[tuple[str, str | None]]:
    cases: list[tuple[str, str | None]] = []
    for path in sorted(RECIPES.glob("*.toml")):
        cases.append((path.name, None))
        for name in sorted(_load_with_extends(path, ()).get("profile", {})):
            cases.append((path.name, name))
    return cases


def test_there_are_recipes():
    assert {"duet_mc.toml", "duet_mc_htsat.toml", "duet_mc_mt5.toml"} <= {p.name for p in RECIPES.glob("*.toml")}


@pytest.mark.parametrize("recipe, profile", _cases(), ids=lambda v: str(v))
def test_recipe_validates(recipe, profile, capsys):
    args = ["validate", str(RECIPES / recipe)] + (["--profile", profile] if profile else [])
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, f"mtrun {' '.join(args)} exited {code}:\n{captured.out}\n{captured.err}"


def test_paper_recipes_have_a_tiny_profile():
    for path in sorted(RECIPES.glob("*.toml")):
        if path.stem.startswith("duet_mc"):
            assert "tiny" in _load_with_extends(path, ()).get("profile", {}), path.name
