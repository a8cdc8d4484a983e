"""docs/datasets.md covers every data source and its examples work as written.

* every registered ``data`` component (core's, the ``mtrun-datasets`` adapters, the demo corpus,
  any plugin's) has a section whose heading names its ``type`` in backticks;
* every ``toml`` block of the page is a ``[data]`` table that resolves against the registry
  (keys, types and values; nothing is read from disk);
* the page's ``check_data.py`` snippet, run on each public dataset's documented table with its
  paths pointed at the adapter's test fixtures (the published column layouts), reads every split
  and counts the audio as missing (the fixtures carry no audio).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from mtrun.plugins import get_plugins
from mtrun.recipe import dump_recipe, resolve_recipe

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "datasets.md"
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)
# Where the adapters' fixtures may live (they move with the adapters' distribution).
FIXTURE_DIRS = [ROOT / "plugins" / "datasets" / "tests" / "fixtures" / "datasets", ROOT / "tests" / "fixtures" / "datasets"]
# Per public dataset: the documented table's path keys, pointed into its fixture folder.
FIXTURE_PATHS = {
    "musiccaps": {"csv": "musiccaps/musiccaps-public.csv"},
    "song-describer": {"csv": "song-describer/song_describer.csv", "tags_tsv": "song-describer/song_describer.mtg-jamendo.tsv"},
    "lp-musiccaps": {"files": ["lp-musiccaps/mtt"]},
    "audiocaps": {"metadata_dir": "audiocaps"},
    "clotho": {"metadata_dir": "clotho"},
    "mtg-jamendo": {"data_dir": "mtg-jamendo/data"},
    "magnatagatune": {"annotations": "magnatagatune/annotations_final.csv"},
}


def blocks(language: str) -> list[tuple[int, str]]:
    text = PAGE.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in _FENCE.finditer(text) if m.group(1) == language]


def data_tables() -> dict[str, tuple[int, dict]]:
    """The first documented ``[data]`` table of each type, by type, with its line."""
    tables: dict[str, tuple[int, dict]] = {}
    for line, code in blocks("toml"):
        table = tomllib.loads(code)
        assert set(table) == {"data"}, f"docs/datasets.md:{line}: a block with other tables than [data]"
        tables.setdefault(table["data"]["type"], (line, table))
    return tables


def test_every_data_source_has_a_section():
    headings = "\n".join(line for line in PAGE.read_text(encoding="utf-8").splitlines() if line.startswith("#"))
    registered = get_plugins().registry.names("data")
    missing = [name for name in registered if f"`{name}`" not in headings]
    assert not missing, f"docs/datasets.md has no section for the data source(s) {missing}"
    assert {"musiccaps", "song-describer", "lp-musiccaps", "audiocaps", "clotho", "mtg-jamendo", "magnatagatune"} <= set(registered)


@pytest.mark.parametrize("line, code", blocks("toml"), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_documented_data_table_resolves(line, code):
    data = tomllib.loads(code)
    resolve_recipe(data, get_plugins().registry, f"docs/datasets.md:{line}", slots=["data"])


def _fixture_root() -> Path:
    for folder in FIXTURE_DIRS:
        if (folder / "musiccaps").is_dir():
            return folder
    pytest.fail(f"no dataset fixtures in {', '.join(str(f.relative_to(ROOT)) for f in FIXTURE_DIRS)}")


def _check_function():
    (_, code), = [(line, c) for line, c in blocks("python") if c.startswith("# check_data.py")]
    namespace: dict = {"__name__": "check_data"}
    exec(compile(code, str(PAGE), "exec"), namespace)
    return namespace["check"]


@pytest.mark.parametrize("dataset", sorted(FIXTURE_PATHS))
def test_the_check_snippet_reads_the_documented_table(dataset, tmp_path, capsys):
    fixtures = _fixture_root()
    line, table = data_tables()[dataset]
    data = dict(table["data"])
    for key, rel in FIXTURE_PATHS[dataset].items():
        assert key in data, f"docs/datasets.md:{line}: the {dataset} table no longer sets {key}"
        data[key] = [str(fixtures / r) for r in rel] if isinstance(rel, list) else str(fixtures / rel)
    data["audio_root"] = str(tmp_path / "no-audio")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(dump_recipe({"data": data}))
    counts = _check_function()(str(recipe))
    assert counts and all(n > 0 and missing == n for n, missing in counts.values()), counts
    assert "items," in capsys.readouterr().out
