"""Recipes: TOML files that name registered components and configure them.

``load_recipe`` reads a file into the resolved plain recipe (``extends``, ``--profile``,
command-line overrides); ``resolve_recipe`` checks it against the registry and structures each
table into its component's attrs ``Config``, reporting every problem at once.
"""

from __future__ import annotations

from mtrun.recipe.loader import Override, RecipeData, deep_merge, load_recipe, parse_override
from mtrun.recipe.resolve import ResolvedRecipe, make_converter, resolve_recipe
from mtrun.recipe.tables import PLAIN_TABLES
from mtrun.recipe.toml_io import dump_recipe, parse_value, read_toml

__all__ = [
    "PLAIN_TABLES",
    "Override",
    "RecipeData",
    "ResolvedRecipe",
    "deep_merge",
    "dump_recipe",
    "load_recipe",
    "make_converter",
    "parse_override",
    "parse_value",
    "read_toml",
    "resolve_recipe",
]
