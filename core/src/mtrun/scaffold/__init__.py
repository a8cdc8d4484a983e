"""``mtrun new-plugin NAME --kind KIND``: a ready plugin distribution to start from.

The distribution is what a third party publishes: a ``pyproject.toml`` registering the package
in the ``mtrun`` entry-point group, the package (a hook registering one working component of
the chosen kind, written against ``import mtrun`` only), a README with the recipe table that
uses it, and tests built on :mod:`mtrun.testing` that pass as generated. The templates live in
``mtrun/scaffold/templates/KIND/`` as ordinary files with ``$placeholders``.
"""

from __future__ import annotations

import argparse
import re
import string
from importlib import resources
from pathlib import Path

from mtrun.errors import MtrunError

__all__ = ["KINDS", "configure", "names_for", "run", "write_plugin"]

KINDS = ("objective", "audio_encoder", "text_encoder", "projector", "augmenter", "data")
"""The kinds a plugin can be generated for."""

_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def names_for(name: str) -> dict[str, str]:
    """The spellings of a plugin name: component ``my-loss``, distribution ``mtrun-my-loss``,
    package ``mtrun_my_loss``, class ``MyLoss``.

    Raises:
        MtrunError: The name is not lowercase words joined by hyphens.
    """
    if not _NAME.match(name):
        raise MtrunError(f"new-plugin: {name!r} is not a plugin name; use lowercase letters and digits in words joined by '-' (e.g. my-loss)")
    return {
        "name": name,
        "dist": f"mtrun-{name}",
        "package": "mtrun_" + name.replace("-", "_"),
        "Class": "".join(part.capitalize() for part in name.split("-")),
    }


def write_plugin(name: str, kind: str, parent: str | Path) -> Path:
    """Write the distribution into ``parent/mtrun-NAME``; return that folder.

    Raises:
        MtrunError: Unknown kind, bad name, or the folder exists and is not empty (nothing is
            ever overwritten).
    """
    if kind not in KINDS:
        raise MtrunError(f"new-plugin: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    names = {**names_for(name), "kind": kind}
    _refuse_installed_names(names, kind)
    target = Path(parent) / names["dist"]
    if target.exists() and any(target.iterdir()):
        raise MtrunError(f"new-plugin: {target} exists and is not empty; choose another name or folder")
    templates = resources.files("mtrun.scaffold") / "templates"
    files = {
        "pyproject.toml": templates / "pyproject.toml",
        "README.md": templates / "README.md",
        f"src/{names['package']}/__init__.py": templates / "__init__.py.txt",
        f"src/{names['package']}/component.py": templates / kind / "component.py.txt",
        f"tests/test_{names['package']}.py": templates / kind / "test_component.py.txt",
    }
    readme_usage = (templates / kind / "usage.md").read_text(encoding="utf-8")
    for relative, source in files.items():
        text = string.Template(source.read_text(encoding="utf-8")).substitute(names, usage=string.Template(readme_usage).substitute(names))
        path = target / relative
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise MtrunError(f"new-plugin: cannot write {path} ({exc.strerror or exc}); choose another folder with --dir") from None
    return target


def _refuse_installed_names(names: dict[str, str], kind: str) -> None:
    """Refuse a name this environment already uses: installed, the new distribution would
    replace that one (same distribution or import package), or stop every mtrun command (the
    same entry point or component name twice is a plugin error)."""
    import importlib.util
    from importlib import metadata

    from mtrun.plugins import ENTRY_POINT_GROUP, PluginError, get_plugins

    taken = []
    try:
        dist = metadata.distribution(names["dist"])
        taken.append(f"the distribution {names['dist']} {dist.version} is installed")
    except metadata.PackageNotFoundError:
        pass
    if importlib.util.find_spec(names["package"]) is not None:
        taken.append(f"the package {names['package']} is importable")
    if any(ep.name == names["name"] for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)):
        taken.append(f"a plugin registers the mtrun entry point {names['name']!r}")
    try:
        if (kind, names["name"]) in get_plugins().registry:
            taken.append(f"an installed plugin provides the {kind} {names['name']!r}")
    except PluginError:
        pass  # a broken plugin elsewhere: the checks above still hold
    if taken:
        raise MtrunError(
            f"new-plugin: {names['name']!r} is taken here: {'; '.join(taken)}. Installed beside it, the new plugin would "
            f"replace it or stop mtrun from loading its plugins; choose another name (e.g. my-{names['name']})"
        )


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write a new plugin distribution: pyproject (entry point), package, README and tests "
        "that pass as generated. Then: cd mtrun-NAME && pip install -e '.[test]' && pytest"
    )
    parser.add_argument("name", help="the component's name in recipes, e.g. my-loss (distribution mtrun-my-loss)")
    parser.add_argument("--kind", required=True, choices=KINDS, metavar="KIND", help=f"what the plugin provides: {', '.join(KINDS)}")
    parser.add_argument("--dir", default=".", metavar="PARENT", help="where to create the mtrun-NAME folder (default: here)")


def run(args: argparse.Namespace) -> int:
    target = write_plugin(args.name, args.kind, args.dir)
    print(f"wrote {target}")
    print(f"next: cd {target} && pip install -e '.[test]' && python -m pytest")
    return 0
