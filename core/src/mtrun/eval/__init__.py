"""Evaluation: retrieval, zero-shot classification, probes, modality gap, and the report."""

from __future__ import annotations

__all__ = ["register"]


def register(registry) -> None:
    """Register every built-in evaluation task (called from :mod:`mtrun.builtins`)."""
