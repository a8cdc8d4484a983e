"""Evaluation: retrieval, zero-shot classification, probes, modality gap, and the report.

The built-in tasks are ``eval`` components registered through the same hook as any plugin's.
Each implements ``evaluate(system, samples, *, cache=None) -> dict[str, float]``; the
``cache`` (an :class:`~mtrun.eval.embed.EvalCache`) lets the tasks of one evaluation round
share one embedding pass. :func:`mtrun.eval.run.evaluate_run` runs tasks on a split and writes
``eval.json`` and ``report.md``; ``mtrun eval`` (:mod:`mtrun.eval.commands`) drives it from a
checkpoint or a recipe.

Heavy modules (torch, matplotlib) are imported only inside the functions that need them.
"""

from __future__ import annotations

__all__ = ["register"]


def register(registry) -> None:
    """Register every built-in evaluation task (called from :mod:`mtrun.builtins`)."""
    from mtrun.eval.modality_gap import ModalityGap
    from mtrun.eval.probe import Probe
    from mtrun.eval.retrieval import Retrieval
    from mtrun.eval.zeroshot import ZeroShot

    registry.eval("retrieval", Retrieval)
    registry.eval("zero-shot", ZeroShot)
    registry.eval("probe", Probe)
    registry.eval("modality-gap", ModalityGap)
