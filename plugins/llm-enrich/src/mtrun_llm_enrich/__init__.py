"""The ``llm-enriched`` data source for mtrun: FLAP's LLM caption enrichment.

Registered through the ``llm-enrich`` entry point in the ``mtrun`` group.
"""

from __future__ import annotations

from mtrun import hookimpl

__all__ = ["mtrun_register_components"]

MTRUN_API = ">=1.0,<2"
"""The mtrun public API versions this plugin is written for."""


@hookimpl
def mtrun_register_components(registry) -> None:
    from mtrun_llm_enrich.source import LLMEnriched

    registry.data("llm-enriched", LLMEnriched)
