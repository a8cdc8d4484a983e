"""Validators for component configs, so plugins check their settings the same way.

Use them as ``attrs.field(default=..., validator=mtrun.positive, metadata={"help": ...})``. The
recipe loader runs every validator of a table and reports each failure as
``file: [table].key: invalid value (got X): <message>``, so a message says what is expected.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["non_negative", "positive", "unit_interval"]


def positive(_instance: Any, _attribute: attrs.Attribute, value: Any) -> None:
    """The value must be greater than zero."""
    if not value > 0:
        raise ValueError(f"must be positive (got {value})")


def non_negative(_instance: Any, _attribute: attrs.Attribute, value: Any) -> None:
    """The value must be zero or greater."""
    if not value >= 0:
        raise ValueError(f"must be zero or positive (got {value})")


def unit_interval(_instance: Any, _attribute: attrs.Attribute, value: Any) -> None:
    """The value must lie in [0, 1] (a probability or a fraction)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be between 0 and 1 (got {value})")
