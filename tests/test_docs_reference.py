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


# --------------------------------------------------------------------------- every hook, every component

ROOT = DOCS.parent


def _hookspecs() -> dict[str, object]:
    import mtrun.hookspecs as hookspecs

    return {
        name: fn
        for name, fn in vars(hookspecs).items()
        if callable(fn) and getattr(fn, f"{hookspecs.PROJECT}_spec", None) is not None
    }


def test_every_hook_has_a_contract_and_a_place_in_the_docs():
    """A hook's docstring is its contract (when it is called, what it gets, what it returns),
    and the plugin guide and the architecture page name it."""
    specs = _hookspecs()
    assert "mtrun_register_components" in specs
    guide = (DOCS / "writing-a-plugin.md").read_text()
    architecture = (DOCS / "architecture.md").read_text()
    problems = []
    for name, fn in specs.items():
        doc = (fn.__doc__ or "").strip()
        if len(doc.split()) < 20 or "Called" not in doc:
            problems.append(f"{name}: its docstring must say when it is called, what it receives and what to return")
        for page, text in (("writing-a-plugin.md", guide), ("architecture.md", architecture)):
            if name not in text:
                problems.append(f"{name}: not named in docs/{page}")
    assert not problems, "\n".join(problems)


def _distribution_dir(module) -> Path | None:
    """The folder of the distribution that holds ``module``: the first parent with a pyproject.toml."""
    file = getattr(module, "__file__", None)
    if not file:
        return None
    for parent in Path(file).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    return None


def _datasets_sections() -> dict[str, str]:
    """docs/datasets.md's sections by the data source ``type`` their heading names."""
    import re

    sections: dict[str, str] = {}
    current = None
    for line in (DOCS / "datasets.md").read_text().splitlines():
        heading = re.match(r"^#+ .*\(`([\w-]+)`", line)
        if line.startswith("#"):
            current = heading.group(1) if heading else None
        if current:
            sections[current] = sections.get(current, "") + line + "\n"
    return sections


def test_every_installed_component_is_documented():
    """Core's built-ins are in docs/components.md (regenerated above); a plugin's components
    are named, with every one of their recipe keys, in the README.md of the plugin's
    distribution (a data source's may be in its docs/datasets.md section instead), and every
    setting of every component has help text, which `mtrun components KIND NAME` prints."""
    import re

    from mtrun.plugins import get_plugins

    plugin_set = get_plugins()
    reference = (DOCS / "components.md").read_text()
    datasets = _datasets_sections()
    problems = []
    for plugin in plugin_set.plugins:
        folder = _distribution_dir(plugin.module)
        readme = folder / "README.md" if folder else None
        readme_text = readme.read_text() if readme and readme.is_file() else ""
        for kind, name in plugin_set.components_of(plugin.info.name):
            comp = plugin_set.registry.get(kind, name)
            fields = [f.name for f in attrs.fields(comp.config_class)]
            problems += [f"{kind} {name}: setting {f.name!r} has no help" for f in attrs.fields(comp.config_class) if not f.metadata.get("help")]
            if plugin.info.name == "builtins":
                if f"### `{name}`" not in reference:
                    problems.append(f"{kind} {name} (built in): not in docs/components.md")
                continue
            texts = [readme_text] + ([datasets[name]] if kind == "data" and name in datasets else [])
            text = "\n".join(texts)
            where = (readme.relative_to(ROOT) if readme and readme.is_relative_to(ROOT) else readme) or "its distribution"
            if f"`{name}`" not in text:
                problems.append(f"{kind} {name} (plugin {plugin.info.name}): not named in {where}")
                continue
            missing = [f for f in fields if not re.search(rf"\b{re.escape(f)}\b", text)]
            if missing:
                problems.append(f"{kind} {name} (plugin {plugin.info.name}): {where} does not mention its keys {missing}")
    assert not problems, "undocumented:\n  " + "\n  ".join(problems)


def test_recipe_tables_reference_matches_the_code():
    from mtrun.reference import render_tables_markdown

    assert (DOCS / "recipe-tables.md").read_text() == render_tables_markdown(), (
        "docs/recipe-tables.md is out of date; regenerate it with "
        "`.venv/bin/python -m mtrun.reference tables > docs/recipe-tables.md`"
    )


def test_every_plain_table_setting_and_slot_key_has_help():
    from mtrun import schema
    from mtrun.recipe.tables import PLAIN_TABLES, plain_table_class
    from mtrun.reference import SLOT_KEY_HELP

    missing = [f"[{t}].{f.name}" for t in PLAIN_TABLES for f in attrs.fields(plain_table_class(t)) if not f.metadata.get("help")]
    missing += [f"{s.table()}.{k}" for s in schema.SLOTS for k in s.extra_keys if not SLOT_KEY_HELP.get((s.name, k))]
    assert not missing, f"recipe keys without help text (add it to the attrs field, or to mtrun.reference.SLOT_KEY_HELP): {missing}"
