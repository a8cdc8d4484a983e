"""Every recipe in recipes/, mutated at random: the outcome is a valid plan or a message that
names the file and the key, never another exception and never a traceback.

Mutations are what a hand-edited recipe or a command-line override can do: delete a key or a
table, replace a value with one of another TOML type, misspell a key, nest a table where a value
was and a value where a table was. Each mutated recipe goes through the same loader and resolver
as ``mtrun validate`` (``load_recipe`` reads TOML, so the mutation is written back as TOML).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mtrun.errors import RecipeError  # noqa: E402
from mtrun.plugins import get_plugins  # noqa: E402
from mtrun.recipe import dump_recipe, load_recipe, resolve_recipe  # noqa: E402

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.toml"))
TOML_VALUES = st.one_of(
    st.integers(-3, 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.text(max_size=12),
    st.lists(st.integers(0, 9), max_size=3),
    st.just({}),
    st.just({"type": "no-such-component"}),
)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a resolved recipe: tables, their keys, array elements."""
    found = []
    if isinstance(value, dict):
        for key, sub in value.items():
            found.append(prefix + (key,))
            found += paths(sub, prefix + (key,))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            if isinstance(sub, dict):
                found.append(prefix + (i,))
                found += paths(sub, prefix + (i,))
    return found


def mutate(data: dict, path: tuple, kind: str, value: Any) -> None:
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if kind == "delete":
        del parent[last]
    elif kind == "replace":
        parent[last] = value
    elif kind == "misspell" and isinstance(last, str):
        parent[last[:-1] + "x" + last[-1:]] = parent.pop(last)


def plain(data: Any) -> Any:
    """The recipe as builtin dicts and lists, as TOML would write it (no loader attributes)."""
    if isinstance(data, dict):
        return {k: plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [plain(v) for v in data]
    return data


@pytest.fixture(scope="module")
def registry():
    return get_plugins().registry


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_recipe_is_valid_or_reported_by_file_and_key(recipe, registry, tmp_path, data):
    original = plain(load_recipe(recipe))
    candidates = paths(original)
    path = data.draw(st.sampled_from(candidates), label="path")
    kind = data.draw(st.sampled_from(["delete", "replace", "misspell"]), label="mutation")
    value = data.draw(TOML_VALUES, label="value")
    mutate(original, path, kind, value)
    try:
        text = dump_recipe(original)
    except Exception:  # noqa: BLE001 - not expressible in TOML (e.g. an empty key): nothing to test
        return
    target = tmp_path / f"mutated-{recipe.name}"
    target.write_text(text, encoding="utf-8")
    try:
        resolve_recipe(load_recipe(target), registry, str(target))
    except RecipeError as error:
        message = str(error)
        assert message.startswith(f"{target}: recipe is invalid"), message
        for problem in error.problems:
            # Each problem points at the user's words: a table, a key or a top-level name.
            assert re.match(r"^(\[|override |extends|profile|[A-Za-z_~])", problem), problem
            assert "Traceback" not in problem
