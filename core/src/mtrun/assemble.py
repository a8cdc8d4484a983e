"""Building a resolved recipe into live components by constructor injection.

Slots are built in the order :data:`mtrun.schema.SLOTS` declares. Each component is built as
``cls(config, **dependencies)`` (:func:`mtrun.spec.construct`); its keyword-only parameters are
filled by name from what has been built before it:

* ``run``: the :class:`mtrun.run.Run` (folder, seed, resolved recipe);
* every earlier slot under its :attr:`~mtrun.schema.Slot.inject_as` name (``data``,
  ``audio_encoder``, ..., ``augmenters``, ``objectives``, ``evals``);
* the slot's declared ``inputs`` (a projector's ``in_features``: its encoder's width);
* ``system``: the assembled :class:`mtrun.system.System`, once every model slot is built
  (eval tasks and the trainer).

Components never see the registry; a keyword-only parameter without a default that is none of
these is a plugin bug, reported with the component's recipe table.
"""

from __future__ import annotations

from typing import Any

import attrs

from mtrun import schema
from mtrun.recipe import ResolvedRecipe
from mtrun.run import Run
from mtrun.schema import Slot
from mtrun.spec import BuildError, construct

__all__ = ["Assembly", "BuildError", "assemble", "assemble_model", "construct"]


@attrs.frozen
class Assembly:
    """What :func:`assemble` built.

    ``data`` is the training source as the trainer sees it (without the evaluation sets'
    recordings); ``evals`` the tasks on it; ``eval_sets`` (:class:`mtrun.eval.sets.EvalSets`)
    every task with its labels, and the evaluation sets.
    """

    system: Any
    trainer: Any
    data: Any
    evals: tuple[Any, ...]
    eval_sets: Any = None


def _inputs(slot: Slot, available: dict[str, Any]) -> dict[str, Any]:
    """The slot's declared extra inputs: ``{"in_features": "audio_encoder.output_dim"}``."""
    values = {}
    for keyword, source in slot.inputs.items():
        owner, attribute = source.split(".", 1)
        values[keyword] = getattr(available[owner], attribute)
    return values


def _system(resolved: ResolvedRecipe, available: dict[str, Any], encoder_cache: Any = None) -> Any:
    """The System over every built model slot, each under its ``inject_as`` name."""
    from mtrun.system import System, WeightedObjective

    modules = {s.inject_as: available[s.inject_as] for s in schema.SLOTS if s.model and s.inject_as in available}
    # An objective's recipe weight and metric name belong to its slot entry, not its class.
    modules["objectives"] = [
        WeightedObjective(spec.label, spec.weight, built)
        for spec, built in zip(resolved.objectives, modules.get("objectives", ()))
    ]
    return System(**modules, encoder_cache=encoder_cache)


def assemble(resolved: ResolvedRecipe, run: Run, *, encoder_cache: Any = None) -> Assembly:
    """Build every slot in order, the system after the last model slot, and the trainer last.

    ``encoder_cache``: an :class:`mtrun.encoder_cache.EncoderCache` for the System's frozen
    encoder parts (``None``: none).
    """
    src = resolved.source
    available: dict[str, Any] = {"run": run}
    last_model = max(i for i, s in enumerate(schema.SLOTS) if s.model)
    for i, slot in enumerate(schema.SLOTS):
        if i == last_model + 1:
            available["system"] = _system(resolved, available, encoder_cache)
        built = [construct(spec, {**available, **_inputs(slot, available)}, src) for spec in resolved.specs(slot)]
        if slot.many:
            available[slot.inject_as] = tuple(built)
        elif built:
            available[slot.inject_as] = built[0]
        if slot.name == "eval":  # evaluation sets ([eval.data]); training leaves their recordings out
            from mtrun.eval.sets import bind_eval_sets

            sets = available["eval_sets"] = bind_eval_sets(resolved, available)
            available["data"], available["evals"] = sets.training_data, tuple(t for _, t in sets.training_tasks)
    return Assembly(
        system=available["system"],
        trainer=available["trainer"],
        data=available["data"],
        evals=available.get("evals", ()),
        eval_sets=available.get("eval_sets"),
    )


def assemble_model(resolved: ResolvedRecipe, run: Run, *, encoder_cache: Any = None) -> Any:
    """Build only the model slots ``resolved`` holds, in schema order, and the System over them.

    For inference (:func:`mtrun.load`): nothing else is built (no data source, evaluations or
    trainer), and a recipe resolved with ``slots=`` may leave model slots out too (augmenters,
    which act only in training and are not part of the saved weights).
    """
    src = resolved.source
    available: dict[str, Any] = {"run": run}
    for slot in schema.SLOTS:
        if not slot.model:
            continue
        built = [construct(spec, {**available, **_inputs(slot, available)}, src) for spec in resolved.specs(slot)]
        if slot.many:
            available[slot.inject_as] = tuple(built)
        elif built:
            available[slot.inject_as] = built[0]
    return _system(resolved, available, encoder_cache)
