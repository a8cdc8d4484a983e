"""A component a recipe asked for, not built yet, and how it is built by constructor injection.

Every component is built as ``cls(config, **dependencies)``. Dependencies are the keyword-only
parameters of ``cls.__init__``, filled by name from what the builder offers; a component never
sees the registry. The same :class:`ComponentSpec` describes a recipe slot (``[audio_encoder]``)
and a *nested* component: a config field declared with :func:`component_field` holds a spec,
resolved from its own table (``[trainer.optimizer] type = "sgd"``) with the same validation
and did-you-mean messages, and the owning component builds it when it is ready to, offering
what only it knows::

    @attrs.frozen
    class Config:
        base: mtrun.ComponentSpec = mtrun.component_field("data", help="the source to enrich")

    def __init__(self, config, *, run):
        self.base = config.base.build(run=run)
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import attrs

from mtrun.errors import MtrunError

__all__ = ["COMPONENT_FIELD", "BuildError", "ComponentSpec", "component_field", "component_fields", "construct", "label"]

COMPONENT_FIELD = "mtrun_component"
"""The attrs field-metadata key that marks a nested component: its value is the kind."""


class BuildError(MtrunError):
    """A component could not be built from its (valid) configuration."""


@attrs.frozen
class ComponentSpec:
    """One component the recipe asks for, with its config already structured and checked.

    Attributes:
        slot: Where it was declared: ``audio_encoder``, ``objective[0]``, ``trainer.optimizer``.
        kind: The registry kind.
        name: The registered type name.
        cls: The component class.
        config: An instance of ``cls.Config``.
        weight: An objective's weight in the summed loss (1.0 for other kinds).
        label: Metric prefix: the slot-level ``name`` or, by default, the type name.
        source: The recipe file, named in build errors.
        extras: The other slot-level keys the entry set (an ``[[eval]]`` entry's ``split``,
            and its ``data``: the :class:`ComponentSpec` of its own ``[eval.data]`` table).
    """

    slot: str = attrs.field(eq=False)  # where it was declared is not what it is
    kind: str
    name: str
    cls: type
    config: Any
    weight: float = 1.0
    label: str = ""
    source: str = attrs.field(default="<recipe>", eq=False)
    extras: dict[str, Any] = attrs.field(factory=dict, hash=False)  # compared, not hashed (a dict)

    @classmethod
    def of(cls, kind: str, name: str, component: type, config: Any = None, *, slot: str = "") -> ComponentSpec:
        """A spec for a class at hand (``config`` defaults to ``component.Config()``)."""
        return cls(
            slot=slot or kind,
            kind=kind,
            name=name,
            cls=component,
            config=component.Config() if config is None else config,
            label=name,
        )

    def build(self, **dependencies: Any) -> Any:
        """Build the component, injecting those of ``dependencies`` its constructor asks for."""
        return construct(self, dependencies, self.source)


def component_field(kind: str, *, default: str | tuple[str, type] | None = None, help: str) -> Any:
    """A config field whose value is another component, chosen with ``type`` in its own table.

    Args:
        kind: The component kind the table's ``type`` is looked up in (``data``, ``optimizer``).
        default: The type used when the recipe has no such table (or a table without
            ``type``). A name (``"manifest"``) is resolved through the registry when a recipe
            is read, so a config built in Python holds ``None`` there; a ``(name, class)``
            pair also gives configs built in Python a working default.
        help: One line for ``mtrun components`` and the component reference.

    Returns:
        An ``attrs.field`` holding a :class:`ComponentSpec` (``None`` when there is no default).
    """
    metadata = {"help": help, COMPONENT_FIELD: kind, "default_type": default[0] if isinstance(default, tuple) else default}
    if isinstance(default, tuple):
        name, component = default
        return attrs.field(factory=lambda: ComponentSpec.of(kind, name, component), metadata=metadata)
    return attrs.field(default=None, metadata=metadata)


def component_fields(config_class: type) -> list[attrs.Attribute]:
    """The fields of an attrs config class that hold nested components."""
    if not attrs.has(config_class):
        return []
    return [f for f in attrs.fields(config_class) if f.metadata.get(COMPONENT_FIELD)]


def construct(spec: ComponentSpec, available: dict[str, Any], source: str = "<recipe>") -> Any:
    """Build one component, injecting the keyword-only dependencies it asks for by name.

    Raises:
        BuildError: The constructor asks for something not in ``available``, or raised; the
            message names the recipe file and table.
    """
    where = f"{source}: {table_name(spec.slot)} (type {spec.name!r})"
    try:
        params = inspect.signature(spec.cls.__init__).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature take the config alone
        params = ()
    kwargs: dict[str, Any] = {}
    for p in params:
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        if p.name in available:
            kwargs[p.name] = available[p.name]
        elif p.default is inspect.Parameter.empty:
            from mtrun.schema import slot as slot_named

            missing_slot = slot_named(p.name)
            raise BuildError(
                f"{where}: its constructor asks for {p.name!r}, which mtrun cannot inject here"
                + (f" (the recipe has no {missing_slot.table()} table: add one)" if missing_slot is not None else "")
                + f"; injectable dependencies are: {', '.join(sorted(available)) or 'none'}"
            )
    try:
        built = spec.cls(spec.config, **kwargs)
    except MtrunError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported with the recipe slot; MTRUN_DEBUG shows the trace
        raise BuildError(f"{where} failed to build: {type(exc).__name__}: {exc}") from exc
    try:  # so that a wrong output met later names the recipe table it came from
        built.mtrun_label = f"{table_name(spec.slot)} type {spec.name!r}"
    except (AttributeError, TypeError):  # a class with __slots__ or a read-only attribute
        pass
    return built


def table_name(slot: str) -> str:
    """A spec's slot as recipes write its table: ``objective[1].inner`` -> ``[[objective]][1].inner``,
    ``trainer.optimizer`` -> ``[trainer.optimizer]`` (as ``mtrun validate`` names them)."""
    match = re.match(r"^(\w+)\[(\d+)\](.*)$", slot)
    return f"[[{match[1]}]][{match[2]}]{match[3]}" if match else f"[{slot}]"


def label(component: Any, fallback: str) -> str:
    """How messages name a built component: its recipe table and type (set by :func:`construct`)."""
    return getattr(component, "mtrun_label", None) or fallback
