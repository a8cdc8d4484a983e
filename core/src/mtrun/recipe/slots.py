"""The recipe schema: which top-level tables a recipe may have and what each one holds.

Kept in one place so that the loader, the validator, the CLI and the documentation agree on
the same list of tables.
"""

from __future__ import annotations

import attrs

__all__ = [
    "PLAIN_TABLES",
    "SLOTS",
    "TOP_LEVEL_SCALARS",
    "Slot",
    "known_tables",
    "plain_table_class",
    "slot_by_name",
]


@attrs.frozen
class Slot:
    """A recipe table that selects a registered component with ``type = "name"``.

    Attributes:
        name: The table's name in the recipe (``audio_projector``).
        kind: The registry kind the ``type`` is looked up in (``projector``).
        many: True for arrays of tables (``[[objective]]``); False for a single table.
        required: Whether a training recipe must contain the slot (for ``many``: at least one).
        default_type: ``type`` used when the table omits it; ``None`` makes ``type`` required.
            A slot with a default type may also be absent from the recipe altogether.
        extra_keys: Slot-level keys with their defaults that belong to the slot, not to the
            component's ``Config`` (an objective's ``weight`` and ``name``).
        help: One line for ``mtrun validate`` and the recipe reference.
    """

    name: str
    kind: str
    many: bool = False
    required: bool = False
    default_type: str | None = None
    extra_keys: tuple[str, ...] = ()
    help: str = ""

    def table(self) -> str:
        """How the table is written in TOML, for messages: ``[data]`` or ``[[objective]]``."""
        return f"[[{self.name}]]" if self.many else f"[{self.name}]"


SLOTS: tuple[Slot, ...] = (
    Slot("data", "data", required=True, help="where samples come from"),
    Slot("audio_encoder", "audio_encoder", required=True, help="waveform -> token sequence"),
    Slot("text_encoder", "text_encoder", required=True, help="text -> token sequence"),
    Slot("audio_projector", "projector", required=True, help="audio encoding -> joint embedding"),
    Slot("text_projector", "projector", required=True, help="text encoding -> joint embedding"),
    Slot("trainer", "trainer", default_type="default", help="the training loop"),
    Slot(
        "objective",
        "objective",
        many=True,
        required=True,
        extra_keys=("weight", "name"),
        help="losses, summed by weight; `name` prefixes their metrics",
    ),
    Slot("augmenter", "augmenter", many=True, help="input augmentations, applied in stage order"),
    Slot("eval", "eval", many=True, extra_keys=("name",), help="evaluations run after training"),
)
"""Every component slot, in the order components are reported and built."""


def _plain_tables() -> dict[str, type]:
    # Imported lazily only to keep the import graph one-directional (run.py knows nothing of
    # recipes); run.py is light, so this costs nothing.
    from mtrun.run import LoaderConfig, RunConfig

    return {"run": RunConfig, "loader": LoaderConfig}


PLAIN_TABLES: tuple[str, ...] = ("run", "loader")
"""Tables that structure straight into a core config class (no ``type`` key)."""

TOP_LEVEL_SCALARS: dict[str, type] = {"description": str}
"""Top-level keys that are plain values (``extends`` and ``profile`` are consumed by loading)."""


def plain_table_class(name: str) -> type:
    """The core attrs class the plain table ``name`` structures into."""
    return _plain_tables()[name]


def slot_by_name(name: str) -> Slot | None:
    """The slot called ``name``, or ``None``."""
    for slot in SLOTS:
        if slot.name == name:
            return slot
    return None


def known_tables() -> list[str]:
    """Every table name a resolved recipe may contain, for did-you-mean hints."""
    return [s.name for s in SLOTS] + list(PLAIN_TABLES)

