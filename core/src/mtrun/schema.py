"""The component schema: every kind of component and every recipe slot, declared once.

Everything else is derived from these declarations: the registry's checks when a plugin
registers a class (:class:`Kind` methods and class attributes), ``mtrun.testing``'s contract
check (instance attributes), recipe resolution (which tables exist, which are required, their
default ``type``, slot-level keys), assembly (build order, what each slot is injected as and
with), the :class:`~mtrun.system.System`'s modules, and the kinds-and-slots part of
``docs/components.md``.

Adding an optional slot is one :class:`Slot` here plus its use: a model slot is built before
the system and handed to it by name (``system.fusion``), and any later component can ask for
it by that name in its constructor.

Contracts between components
----------------------------
A component class may declare what it *provides* to others (a set of capability names) and
what it *requires* of other slots (:class:`Need`). Either may be a plain class attribute or a
function of the component's config (``provides(config) -> Iterable[str]``), for capabilities
that a setting switches on. :func:`check_contracts` runs while a recipe is resolved, so
``mtrun validate`` reports an incompatible pairing, naming both tables, before anything is
built. :data:`CAPABILITIES` lists core's vocabulary; a plugin may use its own names (a
capability that no installed component provides is reported as such).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import attrs

from mtrun import interfaces

__all__ = [
    "CAPABILITIES",
    "KINDS",
    "SLOTS",
    "Attribute",
    "Kind",
    "Need",
    "Slot",
    "declared_provides",
    "declared_requires",
    "kind",
    "slot",
]


# ------------------------------------------------------------------------------ kinds


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _grid_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, tuple) and len(value) == 2 and all(_positive_int(v) for v in value))


@attrs.frozen
class Attribute:
    """An attribute every component of a kind has, and what its value must be.

    Attributes:
        name: The attribute.
        expected: What a valid value is, for messages (``a positive int``).
        check: True for a valid value.
        on_class: Declared on the class (an augmenter's ``stage``), so the registry checks it
            at registration; otherwise only built instances are checked (``mtrun.testing``).
    """

    name: str
    expected: str
    check: Callable[[Any], bool]
    on_class: bool = False


@attrs.frozen
class Kind:
    """A kind of component: its protocol, required methods and attributes.

    Attributes:
        name: The kind as the registry and ``mtrun components`` name it.
        protocol: The :mod:`mtrun.interfaces` protocol its classes satisfy.
        methods: Methods a registered class must define.
        attributes: Attributes its instances (or, with ``on_class``, its class) must have.
        help: One line for the reference.
    """

    name: str
    protocol: Any
    methods: tuple[str, ...]
    attributes: tuple[Attribute, ...] = ()
    help: str = ""


_OUTPUT_DIM = Attribute("output_dim", "a positive int", _positive_int)

KINDS: tuple[Kind, ...] = (
    Kind(
        "data",
        interfaces.DataSource,
        ("splits", "load"),
        help="a collection of samples in named splits",
    ),
    Kind(
        "audio_encoder",
        interfaces.AudioEncoder,
        ("preprocess", "forward"),
        (
            Attribute("sample_rate", "a positive int", _positive_int),
            _OUTPUT_DIM,
            Attribute("token_grid", "None or a (time, freq) tuple of positive ints", _grid_or_none),
        ),
        help="waveform -> features -> token sequence",
    ),
    Kind(
        "text_encoder",
        interfaces.TextEncoder,
        ("tokenize", "forward"),
        (_OUTPUT_DIM, Attribute("max_length", "a positive int", _positive_int)),
        help="tokenizer and model: text -> token sequence",
    ),
    Kind("projector", interfaces.Projector, ("forward",), (_OUTPUT_DIM,), help="encoder output -> joint embedding"),
    Kind(
        "fusion",
        interfaces.Fusion,
        ("forward",),
        (
            _OUTPUT_DIM,
            Attribute("audio_width", "a positive int", _positive_int),
            Attribute("text_width", "a positive int", _positive_int),
        ),
        help="joint layers over both token sequences (co-attention), for the objectives",
    ),
    Kind("objective", interfaces.Objective, ("forward",), help="a loss over the step's outputs"),
    Kind(
        "augmenter",
        interfaces.Augmenter,
        ("__call__",),
        (Attribute("stage", "one of " + ", ".join(interfaces.AUGMENT_STAGES), lambda v: v in interfaces.AUGMENT_STAGES, on_class=True),),
        help="changes the input of one pipeline stage",
    ),
    Kind("eval", interfaces.EvalTask, ("evaluate",), help="an evaluation over one split (an optional `check_samples(samples)` refuses settings at set-up)"),
    Kind("trainer", interfaces.Trainer, ("fit",), help="runs training"),
    Kind(
        "optimizer",
        interfaces.Optimizer,
        ("step", "zero_grad", "state_dict", "load_state_dict"),
        help="a torch optimizer over the system's parameters (nested in [trainer.optimizer])",
    ),
    Kind("schedule", interfaces.Schedule, ("factor",), help="learning-rate multiplier per step (nested in [trainer.schedule])"),
)
"""Every component kind."""


def kind(name: str) -> Kind | None:
    """The kind called ``name``, or ``None``."""
    return next((k for k in KINDS if k.name == name), None)


# ------------------------------------------------------------------------------ slots


@attrs.frozen
class Slot:
    """A recipe table that selects a registered component with ``type = "name"``.

    Slots are listed in build order: a component may be injected with anything built before it.

    Attributes:
        name: The table's name in the recipe (``audio_projector``).
        kind: The registry kind the ``type`` is looked up in (``projector``).
        many: True for arrays of tables (``[[objective]]``); False for a single table.
        required: Whether a training recipe must contain the slot (for ``many``: at least one).
        default_type: ``type`` used when the table omits it; a slot with a default type may
            also be absent from the recipe altogether.
        extra_keys: Slot-level keys that belong to the slot, not to the component's ``Config``
            (an objective's ``weight`` and ``name``).
        nested: Slot-level keys that hold a component table of their own, by kind: an
            ``[[eval]]`` entry's ``[eval.data]`` is a data source (``{"data": "data"}``). They
            are resolved like any slot and stand in for the slot of that name for this entry
            (an evaluation task's ``data`` need is met by its own ``[eval.data]``).
        model: Built before the system and held by it (its modules are trained and saved).
        inputs: Extra constructor keywords taken from earlier components:
            ``{"in_features": "audio_encoder.output_dim"}``.
        help: One line for ``mtrun validate`` and the recipe reference.
    """

    name: str
    kind: str
    many: bool = False
    required: bool = False
    default_type: str | None = None
    extra_keys: tuple[str, ...] = ()
    nested: Mapping[str, str] = attrs.field(factory=dict)
    model: bool = False
    inputs: Mapping[str, str] = attrs.field(factory=dict)
    help: str = ""

    @property
    def inject_as(self) -> str:
        """The keyword later components receive it under: the slot name, plural for arrays."""
        return self.name + "s" if self.many else self.name

    def table(self) -> str:
        """How the table is written in TOML, for messages: ``[data]`` or ``[[objective]]``."""
        return f"[[{self.name}]]" if self.many else f"[{self.name}]"


SLOTS: tuple[Slot, ...] = (
    Slot("data", "data", required=True, help="where samples come from"),
    Slot("audio_encoder", "audio_encoder", required=True, model=True, help="waveform -> token sequence"),
    Slot("text_encoder", "text_encoder", required=True, model=True, help="text -> token sequence"),
    Slot(
        "audio_projector",
        "projector",
        required=True,
        model=True,
        inputs={"in_features": "audio_encoder.output_dim"},
        help="audio encoding -> joint embedding",
    ),
    Slot(
        "text_projector",
        "projector",
        required=True,
        model=True,
        inputs={"in_features": "text_encoder.output_dim"},
        help="text encoding -> joint embedding",
    ),
    Slot(
        "fusion",
        "fusion",
        model=True,
        inputs={"audio_features": "audio_encoder.output_dim", "text_features": "text_encoder.output_dim"},
        help="optional joint layers over both encoders' tokens; their streams go to the objectives",
    ),
    Slot("augmenter", "augmenter", many=True, model=True, help="input augmentations, applied in stage order"),
    Slot(
        "objective",
        "objective",
        many=True,
        required=True,
        model=True,
        extra_keys=("weight", "name"),
        help="losses, summed by weight; `name` prefixes their metrics",
    ),
    Slot(
        "eval",
        "eval",
        many=True,
        extra_keys=("name", "data", "split"),
        nested={"data": "data"},
        help="evaluations run after training; with [eval.data], on that source's `split` as the evaluation set `name`",
    ),
    Slot("trainer", "trainer", default_type="default", help="the training loop"),
)
"""Every component slot, in build order."""

def slot(name: str) -> Slot | None:
    """The slot called ``name``, or ``None``."""
    return next((s for s in SLOTS if s.name == name), None)


# -------------------------------------------------------------------------- contracts

CAPABILITIES: Mapping[str, str] = {
    "keep_index": "an audio encoder that drops tokens before its transformer when given "
    "keep_index (it declares a token_grid and returns EncoderOutput.keep_index)",
    "hidden_states": "an encoder that returns per-layer sequences (EncoderOutput.hidden_states) "
    "when called with output_hidden_states=True",
    "hard_negatives": "an objective that uses batch.hard_negatives (mtrun.HardNegatives) "
    "written by a batch augmenter",
    "captions": "a data source whose items carry captions (Sample.captions), which text-to-music "
    "retrieval ranks; tag-only sources (MTG-Jamendo, MagnaTagATune) do not provide it",
}
"""Core's capability names and what a component that provides one promises."""


@attrs.frozen
class Need:
    """What a component requires of another slot.

    Attributes:
        slot: The slot that must provide it (``audio_encoder``); for an array slot
            (``objective``), at least one of its entries.
        capability: The capability's name (see :data:`CAPABILITIES`).
        why: What the requiring component does with it, for the message.
    """

    slot: str
    capability: str
    why: str = ""


def _declared(cls: type, config: Any, attribute: str) -> Any:
    value = getattr(cls, attribute, ())
    return value(config) if callable(value) else value


def declared_provides(cls: type, config: Any) -> frozenset[str]:
    """The capabilities a component of class ``cls`` with ``config`` provides."""
    return frozenset(_declared(cls, config, "provides") or ())


def declared_requires(cls: type, config: Any) -> tuple[Need, ...]:
    """What a component of class ``cls`` with ``config`` requires of other slots."""
    return tuple(_declared(cls, config, "requires") or ())


def providers(registry: Any, kind_name: str, capability: str) -> list[str]:
    """Names of the registered components of ``kind_name`` that provide ``capability`` with
    their default settings, for "these would do" hints."""
    names = []
    for name in registry.names(kind_name):
        cls = registry.get(kind_name, name).cls
        declared = getattr(cls, "provides", ())
        try:
            offered = declared_provides(cls, cls.Config()) if callable(declared) else frozenset(declared or ())
        except Exception:  # noqa: BLE001 - a config without defaults: no hint from it
            continue
        if capability in offered:
            names.append(name)
    return names


def check_contracts(specs: Iterable[Any], registry: Any) -> list[tuple[Any, str]]:
    """Every unmet :class:`Need` among ``specs`` (resolved :class:`~mtrun.spec.ComponentSpec`).

    Returns:
        ``(requiring spec, message)`` pairs; the message names the slot that falls short and
        the type it has.
    """
    specs = list(specs)
    by_slot: dict[str, list[Any]] = {}
    for spec in specs:
        if "." not in spec.slot:  # a slot's own components; nested ones serve their owner only
            by_slot.setdefault(spec.slot.split("[")[0], []).append(spec)
    problems = []
    for spec in specs:
        for need in declared_requires(spec.cls, spec.config):
            target = slot(need.slot)
            offered = by_slot.get(need.slot, [])
            table = target.table() if target is not None else f"[{need.slot}]"
            own = (getattr(spec, "extras", None) or {}).get(need.slot)
            if own is not None:  # its own slot-level table ([eval.data]) stands in for the slot
                offered, target = [own], None
                table = f"[{spec.slot.split('[')[0]}.{need.slot}]"
            if any(need.capability in declared_provides(o.cls, o.config) for o in offered):
                continue
            purpose = f" ({need.why})" if need.why else ""
            if own is not None:
                have = f"{table} type {own.name!r} does not"
            elif not offered:
                have = f"the recipe has no {table} table"
            elif len(offered) == 1 and not (target and target.many):
                have = f"{table} type {offered[0].name!r} does not"
            else:
                have = "none of " + ", ".join(f"{table}[{o.slot.split('[')[-1].rstrip(']')}] type {o.name!r}" for o in offered) + " does"
            kind_name = target.kind if target is not None else (own.kind if own is not None else need.slot)
            able = providers(registry, kind_name, need.capability) if target is not None or own is not None else []
            noun = "data sources" if kind_name == "data" else f"{kind_name}s"
            hint = f"; installed {noun} that do with default settings: {', '.join(able)}" if able else f"; no installed {kind_name} provides it"
            problems.append((spec, f"needs {table} to provide {need.capability!r}{purpose}; {have}{hint}"))
    return problems
