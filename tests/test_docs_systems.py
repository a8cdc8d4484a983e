"""The system pages (docs/systems/*.md) state what the recipes really set.

Each page maps a paper recipe to the paper, one table per recipe, under a heading that names it
(``## `recipes/flap.toml` ``). A table row is ``| `key.path` | `TOML value` | paper | deviation |``,
keys written as on the command line (``objective.0.temperature``). For every table:

* every key it lists exists in the recipe as ``mtrun`` loads it (``extends`` applied, no
  profile, no overrides) and has the value the page states, compared as TOML values;
* every key the recipe file itself sets (its ``[profile.*]`` and ``[ablation]`` tables, and
  ``description``/``extends``, aside) has a row: a key added to a recipe needs a line saying
  where it comes from.

So changing a paper recipe without its page fails here, naming the page, the key and both values.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from mtrun.recipe import load_recipe, read_toml

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ROOT / "docs" / "systems"
# The paper recipes each page must cover.
EXPECTED = {
    "flap.md": {"flap.toml", "flap_recon.toml"},
    "slap.md": {"slap.toml"},
    "clap.md": {"clap.toml"},
    "duet_mc.md": {"duet_mc.toml"},
    "mulap.md": {"mulap.toml"},
}
NOT_MAPPED = {"description", "extends"}  # prose and plumbing, not settings
_HEADING = re.compile(r"^#+\s+`(recipes/[\w.-]+\.toml)`\s*$")
_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*`([^`]*)`\s*\|")


def flatten(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(key.path, value)`` of every leaf, arrays of tables indexed as overrides index them."""
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten(value, path + ".")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                yield from flatten(item, f"{path}.{i}.")
        else:
            yield path, value


def recipe_keys(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flatten({k: v for k, v in data.items() if k not in ("profile", "ablation")}) if k not in NOT_MAPPED}


def page_tables(page: Path) -> dict[str, list[tuple[int, str, str]]]:
    """``{recipe: [(line, key, value text), ...]}`` of a system page's key tables."""
    tables: dict[str, list[tuple[int, str, str]]] = {}
    recipe = None
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        heading = _HEADING.match(line)
        if heading:
            recipe = heading.group(1)
            tables.setdefault(recipe, [])
            continue
        if line.startswith("#"):
            recipe = None
        row = _ROW.match(line)
        if row and recipe:
            tables[recipe].append((number, row.group(1), row.group(2)))
    return tables


def _value(text: str) -> Any:
    return tomllib.loads(f"x = {text}")["x"]


def _same(a: Any, b: Any) -> bool:
    """Equal as TOML values: ``1`` is not ``true``, ``1`` and ``1.0`` are equal numbers."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b and isinstance(a, bool) == isinstance(b, bool)


CASES = [(page.name, recipe) for page in sorted(SYSTEMS.glob("*.md")) for recipe in page_tables(page)]


def test_every_system_has_a_page_with_its_recipes():
    found = {page.name: set(Path(r).name for r in page_tables(page)) for page in SYSTEMS.glob("*.md")}
    for page, recipes in EXPECTED.items():
        assert page in found, f"docs/systems/{page} is missing"
        assert recipes <= found[page], f"docs/systems/{page} has no table for {sorted(recipes - found[page])}"


@pytest.mark.parametrize("page, recipe", CASES)
def test_the_page_states_what_the_recipe_sets(page, recipe):
    rows = page_tables(SYSTEMS / page)[recipe]
    resolved = recipe_keys(load_recipe(ROOT / recipe))
    where = f"docs/systems/{page}"
    wrong = []
    for line, key, text in rows:
        try:
            stated = _value(text)
        except tomllib.TOMLDecodeError as exc:
            wrong.append(f"{where}:{line}: `{key}`: `{text}` is not a TOML value ({exc})")
            continue
        if key not in resolved:
            wrong.append(f"{where}:{line}: `{key}`: {recipe} does not set it (the page says {text})")
        elif not _same(resolved[key], stated):
            wrong.append(f"{where}:{line}: `{key}`: the page says {text}, {recipe} has {resolved[key]!r}")
    assert not wrong, "the page and the recipe disagree:\n" + "\n".join(wrong)


@pytest.mark.parametrize("page, recipe", CASES)
def test_every_key_of_the_recipe_has_a_row(page, recipe):
    listed = {key for _, key, _ in page_tables(SYSTEMS / page)[recipe]}
    own = recipe_keys(read_toml(ROOT / recipe))
    missing = [k for k in own if k not in listed]
    assert not missing, f"docs/systems/{page}: no row for these keys of {recipe}: {', '.join(missing)}"


def test_a_changed_recipe_fails_its_page(tmp_path):
    """The check itself works: the same table against a recipe with one value changed."""
    rows = page_tables(SYSTEMS / "flap.md")["recipes/flap.toml"]
    recipe = tmp_path / "flap.toml"
    recipe.write_text((ROOT / "recipes" / "flap.toml").read_text().replace("lr = 1e-4", "lr = 3e-4"))
    resolved = recipe_keys(load_recipe(recipe))
    disagree = [key for _, key, text in rows if not _same(resolved.get(key), _value(text))]
    assert disagree == ["trainer.optimizer.lr"]
