"""From a recipe file to the resolved plain recipe: ``extends``, ``--profile``, overrides.

The steps run in a fixed order, each on plain dicts, so that what a run saves in its folder is
exactly what was trained (no hidden defaults added later by the loader):

1. read the file; follow ``extends = "parent.toml"`` (relative to the extending file,
   recursively) and deep-merge the child over its parent;
2. take the ``[profile.NAME]`` table chosen with ``--profile NAME`` and deep-merge it on top;
   the ``profile`` table itself is dropped;
3. apply command-line overrides ``a.b=value`` (a TOML value) and deletions ``~a.b``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import attrs

from mtrun.errors import RecipeError
from mtrun.recipe.toml_io import parse_value, read_toml
from mtrun.registry import suggest

__all__ = ["Override", "RecipeData", "apply_overrides", "deep_merge", "load_recipe", "parse_override"]


class RecipeData(dict):
    """A resolved recipe: a plain ``dict`` that remembers the overrides applied to it.

    It is a ``dict`` in every respect (it compares equal to one and dumps to TOML as one);
    :func:`mtrun.recipe.resolve_recipe` reads :attr:`overrides` to say which problems came from
    the command line rather than the file.
    """

    overrides: tuple[Override, ...] = ()
    created: dict[tuple[str | int, ...], str] = {}
    """Key paths that did not exist before an override added them, to the override's text."""
    origins: dict[tuple[str | int, ...], str] = {}
    """Key paths to where they were written, when not the recipe file itself: a parent named by
    ``extends`` or the chosen profile (see :func:`load_recipe`)."""
    ablation: dict[str, Any] | None = None
    """The recipe's ``[ablation]`` table (after profile and overrides), read by ``mtrun ablate``
    and left out of the recipe itself: a run never sees it."""


@attrs.frozen
class Override:
    """One command-line override.

    Attributes:
        text: As the user typed it, for messages.
        path: Key path; integers index arrays of tables (``objective.0.weight``).
        value: The parsed TOML value; unused for deletions.
        delete: True for ``~a.b``.
    """

    text: str
    path: tuple[str | int, ...]
    value: Any = None
    delete: bool = False


def parse_override(text: str) -> Override:
    """Parse ``a.b=value`` or ``~a.b``.

    Raises:
        ValueError: The text has neither form, or an empty key segment. The message is one
            problem line.
    """
    delete = text.startswith("~")
    if delete:
        key, raw = text[1:], None
        if "=" in key:
            raise ValueError(f"override {text!r}: a deletion ~KEY takes no value")
    else:
        if "=" not in text:
            raise ValueError(f"override {text!r}: expected KEY=VALUE (e.g. trainer.optimizer.lr=3e-4) or ~KEY to delete")
        key, raw = text.split("=", 1)
    key = key.strip()
    segments = key.split(".")
    if not key or any(not s.strip() for s in segments):
        raise ValueError(f"override {text!r}: the key {key!r} has an empty part")
    path = tuple(int(s) if s.strip().isdigit() else s.strip() for s in segments)
    value = None if delete else parse_value(raw.strip())
    return Override(text=text, path=path, value=value, delete=delete)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: tables merge key by key; everything else, arrays of tables
    included, is replaced wholesale (merging ``[[objective]]`` element-wise would silently
    combine unrelated objectives). A table whose ``type`` differs from the base table's
    replaces it wholesale too: the keys of another component's config do not carry over
    (a ``tiny`` profile switching ``[data]`` from a public dataset to ``demo``)."""
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and not _retyped(merged[key], value):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _retyped(base: dict[str, Any], top: dict[str, Any]) -> bool:
    return "type" in top and "type" in base and top["type"] != base["type"]


def _describe(path: Sequence[str | int]) -> str:
    return ".".join(str(p) for p in path)


def apply_overrides(
    data: dict[str, Any], overrides: Iterable[Override], created: dict[tuple[str | int, ...], str] | None = None
) -> list[str]:
    """Apply overrides to ``data`` in place, in order; return a problem line per failed one.

    Missing intermediate tables are created (``trainer.optimizer.lr=1e-3`` works on a recipe without a
    ``[trainer]`` table); index ``len(array)`` appends a new table to an array of tables.
    Each key path an override creates is recorded in ``created`` when given.
    """
    problems: list[str] = []
    assigned: set[tuple[str | int, ...]] = set()  # what earlier overrides set: a retyping keeps it
    for ov in overrides:
        try:
            new_paths: list[tuple[str | int, ...]] = []
            _apply_one(data, ov, new_paths, assigned)
            assigned.add(ov.path)
            if created is not None:
                for path in new_paths:
                    created.setdefault(path, ov.text)
        except _OverrideProblem as exc:
            problems.append(f"override {ov.text!r}: {exc}")
    return problems


class _OverrideProblem(Exception):
    pass


def _step(
    node: Any, seg: str | int, where: tuple[str | int, ...], create: bool, next_seg: str | int, new: list
) -> Any:
    """Descend from ``node`` by ``seg``, creating a table (or, when the next segment is an
    index, an array) when ``create`` allows it."""
    if isinstance(node, dict):
        key = str(seg)
        if key not in node:
            if not create:
                hint = suggest(key, node)
                raise _OverrideProblem(
                    f"there is no key {_describe(where + (seg,))!r}"
                    + (f" (did you mean {_describe(where + (hint,))!r}?)" if hint else "")
                )
            node[key] = [] if isinstance(next_seg, int) else {}
            new.append(where + (key,))
        return node[key]
    if isinstance(node, list):
        if not isinstance(seg, int):
            raise _OverrideProblem(
                f"{_describe(where)!r} is an array; address its elements by index ({_describe(where)}.0...)"
            )
        if seg == len(node) and create:
            node.append({})
            new.append(where + (seg,))
        if seg >= len(node):
            raise _OverrideProblem(
                f"index {seg} is out of range: {_describe(where)!r} has {len(node)} element(s)"
            )
        return node[seg]
    raise _OverrideProblem(f"{_describe(where)!r} is a value ({node!r}), not a table")


def _slot_keys(where: tuple[str | int, ...]) -> frozenset[str]:
    """Keys of the table at ``where`` that belong to its slot, not to the component: an
    objective's ``weight``, an ``[[eval]]`` entry's ``name``, ``split`` and ``[eval.data]``."""
    from mtrun.schema import slot

    found = slot(str(where[0])) if where else None
    if found is None or len(where) != (2 if found.many else 1):
        return frozenset()
    return frozenset(found.extra_keys) | frozenset(found.nested)


def _retype(node: dict[str, Any], where: tuple[str | int, ...], assigned: set[tuple[str | int, ...]]) -> None:
    """``type`` is changing: drop the old component's keys, as a profile or child recipe that
    retypes a table does; the slot's own keys and what earlier overrides set stay."""
    keep = _slot_keys(where) | {"type"}
    for key in [k for k in node if k not in keep and where + (k,) not in assigned]:
        del node[key]


def _apply_one(data: dict[str, Any], ov: Override, new: list, assigned: set[tuple[str | int, ...]] | None = None) -> None:
    node: Any = data
    for i, seg in enumerate(ov.path[:-1]):
        node = _step(node, seg, ov.path[:i], not ov.delete, ov.path[i + 1], new)
    last = ov.path[-1]
    where = ov.path[:-1]
    if isinstance(node, dict):
        key = str(last)
        if ov.delete:
            if key not in node:
                hint = suggest(key, node)
                raise _OverrideProblem(
                    "there is no such key to delete"
                    + (f" (did you mean {_describe(where + (hint,))!r}?)" if hint else "")
                )
            del node[key]
        else:
            if key not in node:
                new.append(where + (key,))
            elif key == "type" and node[key] != ov.value and isinstance(ov.value, str):
                _retype(node, where, assigned or set())
            node[key] = ov.value
    elif isinstance(node, list):
        if not isinstance(last, int):
            raise _OverrideProblem(f"{_describe(where)!r} is an array; address its elements by index")
        if ov.delete:
            if last >= len(node):
                raise _OverrideProblem(f"index {last} is out of range: {_describe(where)!r} has {len(node)} element(s)")
            del node[last]
        elif last < len(node):
            node[last] = ov.value
        elif last == len(node):
            new.append(where + (last,))
            node.append(ov.value)
        else:
            raise _OverrideProblem(f"index {last} is out of range: {_describe(where)!r} has {len(node)} element(s)")
    else:
        raise _OverrideProblem(f"{_describe(where)!r} is a value ({node!r}), not a table")


def _load_with_extends(path: Path, chain: tuple[Path, ...], files: list[tuple[Path, dict[str, Any]]] | None = None) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in chain[chain.index(resolved):] + (resolved,))
        raise RecipeError(str(chain[0]), [f"extends: cycle {cycle}"])
    data = read_toml(path)
    if files is not None:
        files.append((path, data))  # child first: where each key was written (see _origins)
    parent_ref = data.pop("extends", None)
    if parent_ref is None:
        return data
    if not isinstance(parent_ref, str) or not parent_ref:
        raise RecipeError(str(path), [f"extends: wrong type (got {parent_ref!r}; expected a file name string)"])
    parent = path.parent / parent_ref
    if not parent.is_file():
        raise RecipeError(
            str(path), [f"extends = {parent_ref!r}: no such file ({parent}; relative to {path.parent})"]
        )
    base = _load_with_extends(parent, chain + (resolved,), files)
    return deep_merge(_drop_retyped_profile_tables(base, data), data)


def _leaves(node: Any, prefix: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """Key paths to the values of nested tables (an array counts as one value)."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, prefix + (key,))
    elif prefix:
        yield prefix


def _holds(data: Any, path: tuple[str | int, ...]) -> bool:
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _origins(data: dict[str, Any], files: list[tuple[Path, dict[str, Any]]], profile: str | None) -> dict[tuple[str | int, ...], str]:
    """Each key path of the merged recipe -> where it was written: the nearest file of the
    ``extends`` chain that holds it, or ``[profile.NAME] of FILE`` when the profile set it."""
    origins = {}
    for path in _leaves(data):
        written = None
        if profile is not None:
            written = next((f"[profile.{profile}]" + (f" of {file}" if i else "")
                            for i, (file, raw) in enumerate(files) if _holds(raw, ("profile", profile) + path)), None)
        if written is None:
            written = next((str(file) for file, raw in files if _holds(raw, path)), None)
        if written is not None:
            origins[path] = written
    return origins


def _drop_retyped_profile_tables(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """The parent recipe without its profiles' edits of tables the child gives another ``type``.

    A parent's ``[profile.tiny.audio_encoder]`` adjusts the parent's audio encoder (``preset =
    "tiny"`` for MERT); once the child swaps in another component, those keys belong to no
    config of it. The child's own profile tables still apply.
    """
    retyped = [key for key, table in child.items() if isinstance(table, dict) and isinstance(base.get(key), dict) and _retyped(base[key], table)]
    profiles = base.get("profile")
    if not retyped or not isinstance(profiles, dict):
        return base
    base = copy.deepcopy(base)
    for profile in base["profile"].values():
        if isinstance(profile, dict):
            for key in retyped:
                profile.pop(key, None)
    return base


def _apply_profile(data: dict[str, Any], profile: str | None, source: str) -> dict[str, Any]:
    profiles = data.pop("profile", None)
    if profiles is None:
        profiles = {}
    if not isinstance(profiles, dict):
        raise RecipeError(source, [f"[profile]: wrong type (got {profiles!r}; expected tables [profile.NAME])"])
    if profile is None:
        return data
    if profile not in profiles:
        available = ", ".join(sorted(profiles)) or "none"
        hint = suggest(profile, profiles)
        raise RecipeError(
            source,
            [
                f"--profile {profile}: no [profile.{profile}] table"
                + (f" (did you mean {hint!r}?)" if hint else "")
                + f"; available profiles: {available}"
            ],
        )
    chosen = profiles[profile]
    if not isinstance(chosen, dict):
        raise RecipeError(source, [f"[profile.{profile}]: wrong type (got {chosen!r}; expected a table)"])
    stray = [k for k in ("extends", "profile") if k in chosen]
    if stray:
        raise RecipeError(source, [f"[profile.{profile}].{stray[0]}: not allowed inside a profile"])
    return deep_merge(data, chosen)


def load_recipe(
    path: str | Path, overrides: Iterable[str] = (), profile: str | None = None
) -> RecipeData:
    """Read a recipe and produce the resolved plain recipe.

    Args:
        path: The recipe file.
        overrides: Command-line ``a.b=value`` / ``~a.b`` strings, applied last, in order.
        profile: Name of a ``[profile.NAME]`` table to merge in, or ``None``.

    Returns:
        A :class:`RecipeData` (a ``dict``) without ``extends`` and ``profile``.

    Raises:
        RecipeError: Missing files, TOML syntax errors, ``extends`` cycles, an unknown
            profile, or overrides that cannot be applied (all override problems at once).
    """
    path = Path(path)
    source = str(path)
    parsed: list[Override] = []
    problems: list[str] = []
    for text in overrides:
        try:
            parsed.append(parse_override(text))
        except ValueError as exc:
            problems.append(str(exc))
    if not path.is_file():
        read_toml(path)  # raises the right "no such file" / "is a directory" error
    files: list[tuple[Path, dict[str, Any]]] = []
    data = _load_with_extends(path, (), files)
    data = _apply_profile(data, profile, source)
    origins = _origins(data, files, profile)
    created: dict[tuple[str | int, ...], str] = {}
    problems += apply_overrides(data, parsed, created)
    if problems:
        raise RecipeError(source, problems)
    ablation = data.pop("ablation", None)  # `mtrun ablate`'s table: not part of any one run
    result = RecipeData(data)
    result.overrides = tuple(parsed)
    result.created = created
    result.origins = origins
    result.ablation = ablation
    return result
