"""What an ablation runs: variants (named override lists) × seeds, from the command line and
a recipe's ``[ablation]`` table.

A paper's ablation table is a list of rows, each the full system with one thing changed, run
over a few seeds. Both forms are offered: explicit variants (``[[ablation.variant]]``, or
``--variant NAME=OVERRIDE;OVERRIDE``) and grids (``[ablation.grid]``, or ``--grid KEY=V1,V2``),
whose Cartesian product becomes variants named after their settings. A grid value may be a
whole component (``audio_encoder.type=mert,htsat``); the recipe loader's retyping rule then
drops the old component's keys. Every (variant, seed) is a *run* with its own run folder.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import attrs

from mtrun.errors import RecipeError
from mtrun.recipe.toml_io import parse_value

__all__ = ["AblationPlan", "Run", "Variant", "parse_grid", "parse_variant", "plan_ablation"]

DEFAULT_METRICS = ("retrieval/t2a/R@10",)
"""The headline metric of text→music retrieval (design.md: R@10 is the headline)."""


@attrs.frozen
class Variant:
    """One row of the ablation table: a name and the overrides that make it."""

    name: str
    overrides: tuple[str, ...]


@attrs.frozen
class Run:
    """One (variant, seed): what to run and where its folder is."""

    variant: Variant
    seed: int

    @property
    def name(self) -> str:
        return f"{_slug(self.variant.name)}-s{self.seed}"

    def overrides(self, sweep: str, output_dir: Path) -> list[str]:
        """The variant's overrides, then the seed and the run folder (``OUTPUT/SWEEP/NAME``)."""
        return [*self.variant.overrides, f"run.seed={self.seed}", f"run.output_dir={output_dir / sweep}", f"run.name={self.name}"]


@attrs.frozen
class AblationPlan:
    """Everything an ablation runs and reports."""

    recipe: Path
    profile: str | None
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    metrics: tuple[str, ...]
    baseline: str
    split: str
    common: tuple[str, ...] = ()
    """Overrides applied to every run (the command line's plain ``KEY=VALUE`` arguments)."""

    @property
    def runs(self) -> list[Run]:
        """Every (variant, seed), variant-major: a half-done sweep has whole variants done."""
        return [Run(variant, seed) for variant in self.variants for seed in self.seeds]


def _split_values(text: str) -> list[str]:
    """``a,b,[1,2],"x,y"`` → ``["a", "b", "[1,2]", '"x,y"']``: commas inside brackets or quotes stay."""
    values, depth, quote, current = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += ch
    values.append(current.strip())
    return values


def parse_grid(text: str) -> tuple[str, list[str]]:
    """``KEY=V1,V2,...`` → ``(KEY, ["V1", "V2", ...])`` (values as typed, TOML-parsed later).

    Raises:
        ValueError: No ``=``, an empty key or an empty value; the message quotes the argument.
    """
    key, sep, rest = text.partition("=")
    values = _split_values(rest) if sep else []
    if not sep or not key.strip() or not values or any(v == "" for v in values):
        raise ValueError(f"--grid {text!r}: expected KEY=V1,V2,... (e.g. trainer.optimizer.lr=1e-4,3e-4)")
    return key.strip(), values


def parse_variant(text: str) -> Variant:
    """``NAME=OVERRIDE;OVERRIDE`` (``NAME=`` alone is the recipe unchanged).

    Raises:
        ValueError: No name; the message quotes the argument.
    """
    name, sep, rest = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--variant {text!r}: expected NAME=OVERRIDE;OVERRIDE (e.g. 'no masking=~augmenter.1')")
    return Variant(name.strip(), tuple(o.strip() for o in rest.split(";") if o.strip()))


def _render(value: Any) -> str:
    """A TOML value as override text (``"x"`` for strings, so ``parse_value`` gives it back)."""
    from mtrun.recipe.toml_io import dump_recipe

    text = dump_recipe({"v": value}).strip()
    return text.split("=", 1)[1].strip()


def _grid_variants(grid: Sequence[tuple[str, list[Any]]]) -> list[Variant]:
    """The Cartesian product of ``(key, values)``, each named ``key=value, key=value``."""
    if not grid:
        return []
    variants = []
    for combo in itertools.product(*(values for _, values in grid)):
        parts = [(key, value if isinstance(value, str) else _render(value)) for (key, _), value in zip(grid, combo)]
        name = ", ".join(f"{key.rsplit('.', 1)[-1] if _unique_tail(key, grid) else key}={text}" for key, text in parts)
        variants.append(Variant(name, tuple(f"{key}={text}" for key, text in parts)))
    return variants


def _unique_tail(key: str, grid: Sequence[tuple[str, list[Any]]]) -> bool:
    tail = key.rsplit(".", 1)[-1]
    return sum(1 for k, _ in grid if k.rsplit(".", 1)[-1] == tail) == 1 and tail != "type"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "variant"


def _table_problems(table: Any, source: str) -> list[str]:
    known = {"seeds", "metrics", "baseline", "split", "grid", "variant"}
    if not isinstance(table, dict):
        return [f"[ablation] must be a table (got {type(table).__name__})"]
    from mtrun.registry import suggest

    problems = [f"[ablation].{key}: unknown key" + (f" (did you mean {hint!r}?)" if (hint := suggest(key, known)) else "")
                + f"; known keys: {', '.join(sorted(known))}" for key in table if key not in known]
    for key in ("seeds", "metrics"):
        if key in table and not isinstance(table[key], list):
            problems.append(f"[ablation].{key} must be a list (got {table[key]!r})")
    grid = table.get("grid", {})
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        problems.append("[ablation.grid] maps each recipe key to a non-empty list of values")
    for i, row in enumerate(table.get("variant", [])):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str) or not isinstance(row.get("overrides", []), list):
            problems.append(f"[[ablation.variant]] #{i + 1} needs name = \"...\" and overrides = [\"KEY=VALUE\", ...]")
    return problems


def plan_ablation(
    recipe: str | Path,
    *,
    table: dict[str, Any] | None = None,
    profile: str | None = None,
    grid: Iterable[str] = (),
    variants: Iterable[str] = (),
    seeds: Sequence[int] | None = None,
    metrics: Sequence[str] = (),
    baseline: str | None = None,
    split: str | None = None,
    common: Sequence[str] = (),
) -> AblationPlan:
    """Combine the recipe's ``[ablation]`` table with the command line (which wins).

    Variants: the explicit ones (table, then command line), then the grid's product (command
    line grids replace the table's); with neither, the recipe as it is. The baseline is the
    named variant, else a variant called ``baseline``, else the first.

    Raises:
        RecipeError: Every problem at once, naming the recipe and the key or argument.
    """
    source = str(recipe)
    table = dict(table or {})
    problems = _table_problems(table, source)
    explicit = [Variant(r["name"], tuple(r.get("overrides", []))) for r in table.get("variant", []) if isinstance(r, dict) and "name" in r]
    for text in variants:
        try:
            explicit.append(parse_variant(text))
        except ValueError as exc:
            problems.append(str(exc))
    grid_items: list[tuple[str, list[Any]]] = []
    cli_grid = list(grid)
    if cli_grid:
        for text in cli_grid:
            try:
                key, values = parse_grid(text)
                grid_items.append((key, [parse_value(v) for v in values]))
            except ValueError as exc:
                problems.append(str(exc))
    elif isinstance(table.get("grid"), dict):
        grid_items = [(k, list(v)) for k, v in table["grid"].items() if isinstance(v, list)]
    all_variants = explicit + _grid_variants(grid_items)
    if not all_variants:
        all_variants = [Variant("recipe", ())]
    names = [v.name for v in all_variants]
    slugs = [_slug(n) for n in names]
    for name in sorted({n for n, s in zip(names, slugs) if slugs.count(s) > 1}):
        problems.append(f"variant name {name!r} is used twice (or two names differ only in punctuation)")
    seed_list = tuple(seeds if seeds is not None else table.get("seeds", [0]))
    if not seed_list or not all(isinstance(s, int) for s in seed_list):
        problems.append(f"seeds must be integers (got {list(seed_list)!r})")
    chosen = baseline or table.get("baseline") or ("baseline" if "baseline" in names else names[0])
    if chosen not in names:
        problems.append(f"baseline {chosen!r} is not a variant (variants: {', '.join(names)})")
    if problems:
        raise RecipeError(source, problems)
    return AblationPlan(
        recipe=Path(recipe),
        profile=profile,
        variants=tuple(all_variants),
        seeds=tuple(int(s) for s in seed_list),
        metrics=tuple(metrics or table.get("metrics") or DEFAULT_METRICS),
        baseline=chosen,
        split=split or table.get("split", "test"),
        common=tuple(common),
    )
