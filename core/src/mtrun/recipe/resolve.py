"""From the resolved plain recipe to typed component configs, collecting every problem.

Each slot's ``type`` picks a registered class; only then are the table's other keys
structured into that class's attrs ``Config`` (cattrs, extra keys forbidden). Nothing stops at
the first mistake: every problem in the recipe becomes one line of a single
:class:`~mtrun.errors.RecipeError`, so a user fixes a recipe in one round instead of many.
"""

from __future__ import annotations

import contextvars
import typing
from typing import Any, Iterable, Iterator, Sequence

import attrs

from mtrun import schema
from mtrun.errors import RecipeError
from mtrun.recipe.tables import PLAIN_TABLES, TOP_LEVEL_SCALARS, known_tables, plain_table_class
from mtrun.registry import Registry, suggest
from mtrun.run import LoaderConfig, RunConfig
from mtrun.schema import Slot
from mtrun.spec import COMPONENT_FIELD, ComponentSpec, component_fields

__all__ = ["ResolvedRecipe", "make_converter", "nested_specs", "resolve_recipe", "structure_config"]

_MISSING = object()
_ABSENT = object()  # a nested component's table that the recipe leaves out

_TABLE_PATH: contextvars.ContextVar[tuple] = contextvars.ContextVar("mtrun_table_path", default=())
"""Path of the table being structured, so a nested component's problems name their table."""
_SOURCE: contextvars.ContextVar[str] = contextvars.ContextVar("mtrun_recipe_source", default="<recipe>")
"""The recipe file being resolved; every spec keeps it for its build errors."""


@attrs.frozen
class ResolvedRecipe:
    """A valid recipe: everything the assembler needs, nothing built yet.

    Attributes:
        source: The recipe file, for messages.
        data: The resolved plain recipe (after extends, profile and overrides); what a run
            saves in its folder.
        run: The ``[run]`` table.
        loader: The ``[loader]`` table.
        components: Single-table slots by slot name (``data``, ``audio_encoder``, ...,
            ``trainer``); absent optional slots are missing from the dict.
        arrays: Array slots by slot name (``objective``: the ``[[objective]]`` tables in
            order); absent ones are empty.
    """

    source: str
    data: dict
    run: RunConfig
    loader: LoaderConfig
    components: dict[str, ComponentSpec]
    arrays: dict[str, tuple[ComponentSpec, ...]]

    @property
    def objectives(self) -> tuple[ComponentSpec, ...]:
        return self.arrays.get("objective", ())

    @property
    def augmenters(self) -> tuple[ComponentSpec, ...]:
        return self.arrays.get("augmenter", ())

    @property
    def evals(self) -> tuple[ComponentSpec, ...]:
        return self.arrays.get("eval", ())

    def specs(self, slot: Slot) -> tuple[ComponentSpec, ...]:
        """The slot's components: none, one, or an array's entries."""
        if slot.many:
            return self.arrays.get(slot.name, ())
        return (self.components[slot.name],) if slot.name in self.components else ()

    def all_specs(self) -> Iterator[ComponentSpec]:
        """Every component of the recipe, nested ones after their owner, in slot order."""
        for slot in schema.SLOTS:
            for spec in self.specs(slot):
                yield spec
                yield from nested_specs(spec.config)
                for value in spec.extras.values():  # slot-level tables: an [[eval]]'s [eval.data]
                    if isinstance(value, ComponentSpec):
                        yield value
                        yield from nested_specs(value.config)


def nested_specs(config: Any) -> Iterator[ComponentSpec]:
    """The nested components held by ``config``'s component fields, depth first."""
    for field in component_fields(type(config)):
        spec = getattr(config, field.name)
        if isinstance(spec, ComponentSpec):
            yield spec
            yield from nested_specs(spec.config)


# ----------------------------------------------------------------------------- converter


def _strict(expected: type, accept: tuple[type, ...], cast: Any = None):
    """A structure hook that refuses values of the wrong TOML type.

    cattrs' defaults call ``int(value)``, which would turn ``width = 3.7`` into 3 and
    ``dropout = "0.1"`` into 0.1 without a word; a recipe should say what it means.
    """

    def hook(value: Any, _type: Any) -> Any:
        if isinstance(value, bool) and expected is not bool:
            raise TypeError(f"expected {expected.__name__}, got a boolean")
        if not isinstance(value, accept):
            raise TypeError(f"expected {expected.__name__}, got {type(value).__name__}")
        return cast(value) if cast else value

    return hook


def make_converter(registry: Registry | None = None):
    """The cattrs converter recipes are structured with: unknown keys and loose types refused.

    With a ``registry``, config fields declared with :func:`mtrun.component_field` structure
    from their own table (``type`` picks the class) into a :class:`~mtrun.ComponentSpec`, and
    unstructure back to that table; without one, such a table is refused.
    """
    import cattrs
    from cattrs.gen import make_dict_structure_fn, override

    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(int, _strict(int, (int,)))
    converter.register_structure_hook(float, _strict(float, (int, float), float))
    converter.register_structure_hook(str, _strict(str, (str,)))
    converter.register_structure_hook(bool, _strict(bool, (bool,)))
    converter.register_unstructure_hook(ComponentSpec, lambda spec: {"type": spec.name, **converter.unstructure(spec.config)})

    def nested_hook(field: attrs.Attribute):
        nested_slot = Slot(field.name, field.metadata[COMPONENT_FIELD], default_type=field.metadata.get("default_type"))

        def structure(value: Any, _type: Any) -> ComponentSpec:
            if value is None or isinstance(value, ComponentSpec):  # None: a config built in Python
                return value
            if value is _ABSENT:
                installed = ", ".join(registry.names(nested_slot.kind)) if registry is not None else "?"
                raise _NestedProblems(
                    [_Problem(_TABLE_PATH.get() + (field.name,), f'missing; a table with type = "NAME" is required (installed {nested_slot.kind}s: {installed or "none"})')]
                )
            if not isinstance(value, dict):
                raise TypeError(f"expected a table with type = \"NAME\" (a {nested_slot.kind}), got {type(value).__name__}")
            if registry is None:
                raise TypeError("nested components need a registry to be structured (make_converter(registry))")
            path = _TABLE_PATH.get() + (field.name,)
            spec, problems = _resolve_entry(nested_slot, value, path, registry, converter)
            if problems:
                raise _NestedProblems(problems)
            return spec

        return structure

    def structure_with_components(cls: type):
        fields = component_fields(cls)
        hook = make_dict_structure_fn(
            cls, converter, _cattrs_forbid_extra_keys=True, **{f.name: override(struct_hook=nested_hook(f)) for f in fields}
        )
        def structure(value: Any, cl: type) -> Any:
            if isinstance(value, dict):
                # An absent table means the default type with its default settings; without a
                # default type it is a missing table.
                absent = {f.name: {} if f.metadata.get("default_type") else _ABSENT for f in fields if f.name not in value}
                value = {**absent, **value}
            return hook(value, cl)

        return structure

    converter.register_structure_hook_factory(lambda cls: bool(component_fields(cls)), structure_with_components)
    return converter


class _NestedProblems(Exception):
    """A nested component's table had problems; they carry their full paths already."""

    def __init__(self, problems: list[_Problem]):
        # Readable on its own too, for code that structures configs with the converter directly.
        super().__init__("; ".join(".".join(map(str, p.path)) + f": {p.message}" for p in problems))
        self.problems = problems


# ------------------------------------------------------------------------------ problems


@attrs.frozen
class _Problem:
    path: tuple
    message: str
    value: Any = _MISSING  # shown as `path = value` before the message
    created: bool = False  # the key itself is the mistake (unknown key/table)
    table: bool = False  # the path names a component's table itself, not a key in it


def _type_name(tp: Any) -> str:
    if tp is None or tp is _MISSING:
        return "a valid value"
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type) and origin is None:
        if attrs.has(tp):
            return "a table"
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _note(exc: BaseException) -> Any:
    from cattrs.errors import AttributeValidationNote, IterableValidationNote

    for note in getattr(exc, "__notes__", ()):
        if isinstance(note, (AttributeValidationNote, IterableValidationNote)):
            return note
    return None


def _nested_home(cls: type, key: str) -> str | None:
    """The nested component field of ``cls`` whose default type has the setting ``key``.

    Recipes written before a setting moved into a nested table (``[trainer] lr`` before
    ``[trainer.optimizer] lr``) then get told where it lives now.
    """
    for field in component_fields(cls):
        default = field.default
        spec = default.factory() if isinstance(default, attrs.Factory) and not default.takes_self else None  # type: ignore[arg-type]
        if isinstance(spec, ComponentSpec) and key in attrs.fields_dict(type(spec.config)):
            return field.name
    return None


def _walk(exc: BaseException, path: tuple, raw: Any, expected: Any, extra_known: Sequence[str]) -> list[_Problem]:
    """Turn a cattrs exception tree into one problem per leaf, with the user's value."""
    from cattrs.errors import AttributeValidationNote, ForbiddenExtraKeysError

    if isinstance(exc, _NestedProblems):
        return list(exc.problems)
    if isinstance(exc, ForbiddenExtraKeysError):
        known = sorted([f.name for f in attrs.fields(exc.cl)] + list(extra_known))
        out = []
        for key in sorted(exc.extra_fields):
            hint = suggest(key, known)
            nested = _nested_home(exc.cl, key)
            if nested:
                table = "[" + ".".join(p for p in path + (nested,) if isinstance(p, str)) + "]"
                hint_text = f" (it is a setting of the nested table {table}: write it there)"
            else:
                hint_text = f" (did you mean {hint!r}?)" if hint else ""
            out.append(
                _Problem(
                    path + (key,),
                    "unknown key"
                    + hint_text
                    + f"; known keys: {', '.join(known) or 'none (this component takes no settings)'}",
                    created=True,
                )
            )
        return out
    if hasattr(exc, "exceptions"):  # an exception group (the backport's on Python 3.10)
        out = []
        for sub in exc.exceptions:
            note = _note(sub)
            if note is None:
                out += _walk(sub, path, raw, expected, extra_known)
            elif isinstance(note, AttributeValidationNote):
                sub_raw = raw.get(note.name, _MISSING) if isinstance(raw, dict) else _MISSING
                out += _walk(sub, path + (note.name,), sub_raw, note.type, ())
            else:
                sub_raw = raw[note.index] if isinstance(raw, (list, tuple)) and note.index < len(raw) else _MISSING
                out += _walk(sub, path + (note.index,), sub_raw, note.type, ())
        return out
    if isinstance(exc, KeyError) and raw is _MISSING:
        return [_Problem(path, f"missing required key (expected {_type_name(expected)})")]
    return [_Problem(path, f"wrong type (got {raw!r}; expected {_type_name(expected)})")]


def _validate_fields(instance: Any, path: tuple) -> list[_Problem]:
    """Run every attrs validator, not just the first that fails, recursing into nested configs."""
    problems = []
    for field in attrs.fields(type(instance)):
        value = getattr(instance, field.name)
        if field.validator is not None:
            try:
                field.validator(instance, field, value)
            except Exception as exc:  # noqa: BLE001 - validators may raise anything
                msg = str(exc.args[0]) if exc.args else type(exc).__name__
                # attrs' in_() validator passes its options as the third argument.
                options = exc.args[2] if len(exc.args) >= 3 else None
                if isinstance(value, str) and isinstance(options, (tuple, list, set, frozenset)):
                    hint = suggest(value, [o for o in options if isinstance(o, str)])
                    if hint:
                        msg += f" (did you mean {hint!r}?)"
                problems.append(_Problem(path + (field.name,), f"invalid value (got {value!r}): {msg}"))
        if attrs.has(type(value)) and not isinstance(value, ComponentSpec):  # nested specs were checked
            problems += _validate_fields(value, path + (field.name,))
    return problems


def structure_config(
    cls: type, table: dict[str, Any], path: tuple = (), extra_known: Sequence[str] = (), converter: Any = None
) -> tuple[Any, list[_Problem]]:
    """Structure ``table`` into the attrs class ``cls``; return ``(instance or None, problems)``.

    Validators are switched off while cattrs builds the instance and run one by one afterwards,
    because attrs stops at the first failing validator and we want them all.
    """
    import contextlib

    converter = converter or make_converter()
    token = _TABLE_PATH.set(path)
    # A nested component's table is structured inside its owner's: leave validators off then.
    switch = contextlib.nullcontext() if attrs.validators.get_disabled() else attrs.validators.disabled()
    try:
        with switch:
            instance, problems = _structure(converter, cls, table, path, extra_known)
    finally:
        _TABLE_PATH.reset(token)
    if instance is None:
        return None, problems
    reported = {p.path for p in problems}
    problems += [p for p in _validate_fields(instance, path) if p.path not in reported]
    return (None if problems else instance), problems


def _structure(converter: Any, cls: type, table: dict[str, Any], path: tuple, extra_known: Sequence[str]) -> tuple[Any, list[_Problem]]:
    """cattrs' part of :func:`structure_config`: the instance (validators off) and type problems."""
    from cattrs.errors import ClassValidationError

    try:
        return converter.structure(table, cls), []
    except ClassValidationError as exc:
        problems = _walk(exc, path, table, cls, extra_known)
    except Exception as exc:  # noqa: BLE001 - __attrs_post_init__ or converters
        return None, [_Problem(path, f"invalid settings: {type(exc).__name__}: {exc}")]
    # Retry without the keys already reported so the validators of the remaining keys still
    # run: a user should see `crop` is invalid even when `num_workers` is too.
    bad = {p.path[len(path)] for p in problems if len(p.path) > len(path)}
    try:
        return converter.structure({k: v for k, v in table.items() if k not in bad}, cls), problems
    except Exception:  # noqa: BLE001 - nothing more to learn from this class
        return None, problems


# ------------------------------------------------------------------------------ rendering


def _render_path(path: tuple, data: dict[str, Any], table_itself: bool = False) -> str:
    top = path[0]
    slot = next((s for s in schema.SLOTS if s.name == top), None)
    rest = list(path[1:])
    if slot is not None and not slot.many:
        # A nested component's table is written [trainer.optimizer]; name it so.
        names, table = [top], data.get(top)
        while (len(rest) > 1 or table_itself) and rest and isinstance(rest[0], str) and isinstance(table, dict) and isinstance(table.get(rest[0]), dict):
            table = table[rest[0]]
            names.append(rest.pop(0))
        text = "[" + ".".join(names) + "]"
    elif slot is not None:
        text = slot.table()
        if rest and isinstance(rest[0], int):
            text += f"[{rest.pop(0)}]"
    elif isinstance(data.get(top), dict) or top in PLAIN_TABLES:
        text = f"[{top}]"
    elif isinstance(data.get(top), list) and data[top] and all(isinstance(x, dict) for x in data[top]):
        text = f"[[{top}]]"
    else:
        text = str(top)
    for part in rest:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _render(problem: _Problem, data: dict[str, Any], overrides: Sequence[Any], created: dict,
            origins: dict | None = None, source: str = "") -> str:
    text = _render_path(problem.path, data, problem.table)
    if problem.value is not _MISSING:
        text += f" = {problem.value!r}"
    text += f": {problem.message}"
    # The last override that set this key (or a table holding it) is the one to blame; an
    # unknown key is blamed on an override only if the override brought it into existence.
    blame = None
    for ov in overrides:
        if problem.path[: len(ov.path)] == tuple(ov.path) and not ov.delete:
            blame = ov.text
    if problem.created:
        blame = created.get(problem.path, blame if problem.path in created else None)
    elif blame is None:  # a table an override brought into existence (eval.1.name=x appends [[eval]][1])
        blame = created.get(problem.path)
    if blame is not None:
        return text + f" (from override {blame})"
    # Written elsewhere than the recipe file named in the message: say where.
    path = tuple(problem.path)
    written = {where for key, where in (origins or {}).items() if key[: len(path)] == path or path[: len(key)] == key}
    if len(written) == 1 and (where := written.pop()) != source:
        text += f" (in {where})"
    return text


# ------------------------------------------------------------------------------- resolve


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _resolve_entry(
    slot: Slot, table: dict[str, Any], path: tuple, registry: Registry, converter: Any
) -> tuple[ComponentSpec | None, list[_Problem]]:
    problems: list[_Problem] = []
    table = dict(table)
    type_name = table.pop("type", slot.default_type)
    slot_keys = {k: table.pop(k) for k in slot.extra_keys if k in table}
    installed = registry.names(slot.kind)
    # As TOML writes the table: [[objective]], [data], or a nested one's [data.base].
    where = f"[[{slot.name}]]" if slot.many else "[" + ".".join(p for p in path if isinstance(p, str)) + "]"

    weight = slot_keys.get("weight", 1.0)
    if not _is_number(weight):
        problems.append(_Problem(path + ("weight",), f"wrong type (got {weight!r}; expected float)"))
    label = slot_keys.get("name", type_name)
    if "name" in slot_keys and (not isinstance(label, str) or not label):
        problems.append(_Problem(path + ("name",), f"wrong type (got {label!r}; expected a non-empty string)"))
    extras: dict[str, Any] = {}
    for key, kind in slot.nested.items():  # slot-level component tables ([eval.data])
        if key not in slot_keys:
            continue
        value = slot_keys[key]
        if not isinstance(value, dict):
            problems.append(_Problem(path + (key,), f'wrong type (got {value!r}; expected a table with type = "NAME" (a {kind}))'))
            continue
        nested, found = _resolve_entry(Slot(key, kind), value, path + (key,), registry, converter)
        problems += found
        if nested is not None:
            extras[key] = nested
    if "split" in slot_keys:
        split = slot_keys["split"]
        if not isinstance(split, str) or not split:
            problems.append(_Problem(path + ("split",), f"wrong type (got {split!r}; expected a non-empty string)"))
        elif "data" in slot.nested and "data" not in slot_keys:
            problems.append(
                _Problem(
                    path + ("split",),
                    f"split applies to the entry's own [{slot.name}.data] table; this entry evaluates the training "
                    "source ([data]), whose split `mtrun eval --split` chooses (test after training)",
                    value=split,
                )
            )
        else:
            extras["split"] = split
    if "data" in extras:  # the evaluation set it reports under: its name, else the data type
        extras["set"] = label if "name" in slot_keys and isinstance(label, str) and label else extras["data"].name

    if type_name is None:
        problems.append(
            _Problem(
                path,
                f'missing key \'type\' (the {slot.kind} to use); {where} needs type = "NAME" with one of: '
                + (", ".join(installed) or "none installed"),
                table=True,
            )
        )
        return None, problems
    if not isinstance(type_name, str):
        problems.append(_Problem(path + ("type",), f"wrong type (got {type_name!r}; expected a string naming the {slot.kind})"))
        return None, problems
    if (slot.kind, type_name) not in registry:
        hint = suggest(type_name, installed)
        problems.append(
            _Problem(
                path + ("type",),
                f"no {slot.kind} of that name"
                + (f" (did you mean {hint!r}?)" if hint else "")
                + f"; installed: {', '.join(installed) or 'none'}. Is its plugin installed? See `mtrun plugins`.",
                value=type_name,
            )
        )
        return None, problems
    cls = registry.get(slot.kind, type_name).cls
    config, config_problems = structure_config(cls.Config, table, path, slot.extra_keys, converter)
    problems += config_problems
    if problems:
        return None, problems
    slot_label = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)[1:]
    return (
        ComponentSpec(
            slot=slot_label,
            kind=slot.kind,
            name=type_name,
            cls=cls,
            config=config,
            weight=float(weight),
            label=label if isinstance(label, str) else type_name,
            source=_SOURCE.get(),
            extras=extras,
        ),
        problems,
    )


def resolve_recipe(
    data: dict[str, Any],
    registry: Registry,
    source: str,
    overrides: Iterable[Any] | None = None,
    *,
    slots: Iterable[str] | None = None,
) -> ResolvedRecipe:
    """Check a resolved plain recipe against the registry and structure every config.

    Args:
        data: The output of :func:`mtrun.recipe.load_recipe` (any plain dict works).
        registry: Where ``type`` names are looked up.
        source: The recipe file, named in the error header.
        overrides: Parsed overrides, to mark problems that came from the command line;
            defaults to those :func:`load_recipe` attached to ``data``.
        slots: Resolve only these slots (by name); the recipe's other slot tables are left
            unread, whether required or not, so their plugins need not be installed, and
            contracts are not checked (inference rebuilds the model slots of a recipe that
            passed them when it was trained). ``None``: every slot, as for training.

    Raises:
        RecipeError: With one line per problem found anywhere in the recipe.
    """
    if overrides is None:
        overrides = getattr(data, "overrides", ())
    overrides = tuple(overrides)
    created = getattr(data, "created", {})
    only = None if slots is None else frozenset(slots)
    token = _SOURCE.set(source)
    try:
        problems, resolved = _resolve(data, registry, source, only)
    finally:
        _SOURCE.reset(token)
    if resolved is not None and only is None:
        for spec, message in schema.check_contracts(resolved.all_specs(), registry):
            problems.append(_Problem(_spec_path(spec.slot) + ("type",), message, value=spec.name))
    if problems:
        origins = getattr(data, "origins", {})
        raise RecipeError(source, [_render(p, data, overrides, created, origins, source) for p in problems])
    return resolved


def _spec_path(label: str) -> tuple:
    """``objective[0].predictor`` -> ``("objective", 0, "predictor")``."""
    path: list[Any] = []
    for part in label.split("."):
        name, *indices = part.replace("]", "").split("[")
        path.append(name)
        path.extend(int(i) for i in indices)
    return tuple(path)


def _resolve(
    data: dict[str, Any], registry: Registry, source: str, only: frozenset[str] | None = None
) -> tuple[list[_Problem], ResolvedRecipe | None]:
    converter = make_converter(registry)
    problems: list[_Problem] = []
    components: dict[str, ComponentSpec] = {}
    lists: dict[str, list[ComponentSpec]] = {s.name: [] for s in schema.SLOTS if s.many}

    tables = known_tables()
    for key, value in data.items():
        if key in tables or key in TOP_LEVEL_SCALARS:
            continue
        hint = suggest(key, tables + list(TOP_LEVEL_SCALARS))
        is_table = isinstance(value, dict) or (isinstance(value, list) and value and all(isinstance(v, dict) for v in value))
        if is_table:
            shown = f"[[{hint}]]" if hint and (slot := schema.slot(hint)) and slot.many else f"[{hint}]"
            msg = "unknown table" + (f" (did you mean {shown}?)" if hint else "")
        else:
            msg = "unknown top-level key" + (f" (did you mean {hint!r}?)" if hint else "")
        problems.append(_Problem((key,), f"{msg}; known tables: {', '.join(tables)}", created=True))

    for key, expected in TOP_LEVEL_SCALARS.items():
        if key in data and not isinstance(data[key], expected):
            problems.append(_Problem((key,), f"wrong type (got {data[key]!r}; expected {expected.__name__})"))

    plain: dict[str, Any] = {}
    for name in PLAIN_TABLES:
        cls = plain_table_class(name)
        table = data.get(name, {})
        if not isinstance(table, dict):
            problems.append(_Problem((name,), f"wrong type (got {table!r}; expected a table [{name}])"))
            continue
        plain[name], found = structure_config(cls, table, (name,), (), converter)
        problems += found

    for slot in schema.SLOTS:
        if only is not None and slot.name not in only:
            continue
        value = data.get(slot.name, _MISSING)
        if value is _MISSING:
            if slot.required:
                installed = ", ".join(registry.names(slot.kind)) or "none"
                need = "at least one table" if slot.many else "this table"
                problems.append(
                    _Problem((slot.name,), f"missing; a training recipe needs {need} (installed {slot.kind}s: {installed})")
                )
            elif slot.default_type is not None:
                spec, found = _resolve_entry(slot, {}, (slot.name,), registry, converter)
                problems += found
                if spec is not None:
                    components[slot.name] = spec
            continue
        if slot.many:
            if isinstance(value, dict):
                problems.append(
                    _Problem((slot.name,), f"expected an array of tables: write [[{slot.name}]], not [{slot.name}]")
                )
                continue
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                problems.append(_Problem((slot.name,), f"wrong type (got {value!r}; expected [[{slot.name}]] tables)"))
                continue
            if slot.required and not value:
                problems.append(_Problem((slot.name,), "empty; a training recipe needs at least one table"))
            for i, entry in enumerate(value):
                spec, found = _resolve_entry(slot, entry, (slot.name, i), registry, converter)
                problems += found
                if spec is not None:
                    lists[slot.name].append(spec)
            problems += _set_problems(slot, value) if "data" in slot.nested else _duplicate_labels(slot, value)
        else:
            if not isinstance(value, dict):
                problems.append(_Problem((slot.name,), f"wrong type (got {value!r}; expected a table [{slot.name}])"))
                continue
            spec, found = _resolve_entry(slot, value, (slot.name,), registry, converter)
            problems += found
            if spec is not None:
                components[slot.name] = spec

    if problems:
        return problems, None
    return problems, ResolvedRecipe(
        source=source,
        data=data,
        run=plain["run"],
        loader=plain["loader"],
        components=components,
        arrays={name: tuple(specs) for name, specs in lists.items()},
    )


def _set_problems(slot: Slot, entries: list[dict[str, Any]]) -> list[_Problem]:
    """Evaluation sets: an entry with its own ``[eval.data]`` reports under its ``name`` (default:
    the data type), so one name must mean one source and split; entries sharing a set are its
    tasks (one embedding pass), and the same task twice on one set would mix its numbers. Entries
    on the training source keep the labels rule of :func:`_duplicate_labels`."""
    import re

    plain = [(i, e) for i, e in enumerate(entries) if not isinstance(e.get("data"), dict)]
    problems = []
    seen: dict[str, int] = {}
    for i, entry in plain:
        label = entry.get("name", entry.get("type"))
        if isinstance(label, str):
            if label in seen:
                problems.append(
                    _Problem((slot.name, i), f"{slot.kind} name {label!r} is used twice (also by [[{slot.name}]][{seen[label]}]); set name = \"...\" to tell them apart")
                )
            else:
                seen[label] = i
    sets: dict[str, tuple[int, Any]] = {}
    tasks: dict[tuple[str, Any], int] = {}
    for i, entry in enumerate(entries):
        data = entry.get("data")
        if not isinstance(data, dict):
            continue
        name = entry.get("name", data.get("type"))
        if not isinstance(name, str) or not name:
            continue  # reported as a wrong type (name) or a missing type ([eval.data])
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            problems.append(
                _Problem((slot.name, i, "name"), "an evaluation set's name prefixes its metrics (NAME/retrieval/...): use letters, digits, '_', '-' or '.'", value=name)
            )
            continue
        source = (data, entry.get("split", "test"))
        if name in sets and sets[name][1] != source:
            problems.append(
                _Problem(
                    (slot.name, i, "name"),
                    f"evaluation set {name!r} is also [[{slot.name}]][{sets[name][0]}]'s, with another [{slot.name}.data] "
                    "table or split; one name is one set (give this one another name, or the same table)",
                    value=name,
                )
            )
            continue
        sets.setdefault(name, (i, source))
        if not isinstance(entry.get("type"), str):
            continue  # a type that is not a name is reported where types are checked
        key = (name, entry["type"])
        if key in tasks:
            problems.append(
                _Problem((slot.name, i), f"{slot.kind} {entry.get('type')!r} on evaluation set {name!r} twice (also [[{slot.name}]][{tasks[key]}]); their numbers would mix")
            )
        else:
            tasks[key] = i
        if name in seen:
            problems.append(
                _Problem((slot.name, i, "name"), f"{name!r} also labels [[{slot.name}]][{seen[name]}], a task on the training source", value=name)
            )
    return problems


def _duplicate_labels(slot: Slot, entries: list[dict[str, Any]]) -> list[_Problem]:
    """Objectives (and evals) log metrics under their label; two with one label would mix."""
    if "name" not in slot.extra_keys:
        return []
    seen: dict[str, int] = {}
    problems = []
    for i, entry in enumerate(entries):
        label = entry.get("name", entry.get("type"))
        if not isinstance(label, str):
            continue
        if label in seen:
            problems.append(
                _Problem(
                    (slot.name, i),
                    f"{slot.kind} name {label!r} is used twice (also by [[{slot.name}]][{seen[label]}]); "
                    f'set name = "..." to tell them apart',
                )
            )
        else:
            seen[label] = i
    return problems
