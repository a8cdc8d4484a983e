"""Building a resolved recipe into live components by constructor injection.

Every component is built as ``cls(config, **dependencies)``. Dependencies are the
keyword-only parameters of ``cls.__init__``, filled by name from what has been built so far:

==================  =============================================================
``run``             the :class:`mtrun.run.Run` (folder, seed, resolved recipe)
``data``            the data source
``audio_encoder``   the audio encoder (projectors, objectives, augmenters)
``text_encoder``    the text encoder
``in_features``     the width of the encoder a projector sits on
``audio_projector`` / ``text_projector``  (objectives that copy the online arms, e.g. BYOL)
``system``          the assembled :class:`mtrun.system.System` (trainer, eval tasks)
``evals``           the eval tasks (trainer)
==================  =============================================================

Components never see the registry; a keyword-only parameter without a default that is not in
this table is a plugin bug, reported with the component's recipe slot.
"""

from __future__ import annotations

import inspect
from typing import Any

import attrs

from mtrun.errors import MtrunError
from mtrun.recipe import ComponentSpec, ResolvedRecipe
from mtrun.run import Run

__all__ = ["Assembly", "BuildError", "assemble", "construct"]


class BuildError(MtrunError):
    """A component could not be built from its (valid) configuration."""


@attrs.frozen
class Assembly:
    """What :func:`assemble` built."""

    system: Any
    trainer: Any
    data: Any
    evals: tuple[Any, ...]


def construct(spec: ComponentSpec, available: dict[str, Any], source: str = "<recipe>") -> Any:
    """Build one component, injecting the keyword-only dependencies it asks for by name."""
    where = f"{source}: [{spec.slot}] (type {spec.name!r})"
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
            raise BuildError(
                f"{where}: its constructor asks for {p.name!r}, which mtrun cannot inject; "
                f"injectable dependencies are: {', '.join(sorted(available))}"
            )
    try:
        return spec.cls(spec.config, **kwargs)
    except MtrunError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported with the recipe slot; MTRUN_DEBUG shows the trace
        raise BuildError(f"{where} failed to build: {type(exc).__name__}: {exc}") from exc


def assemble(resolved: ResolvedRecipe, run: Run) -> Assembly:
    """Build data, encoders, projectors, augmenters, objectives, the system, evals and trainer."""
    from mtrun.system import System, WeightedObjective

    src = resolved.source
    specs = resolved.components
    available: dict[str, Any] = {"run": run}
    available["data"] = construct(specs["data"], available, src)
    available["audio_encoder"] = construct(specs["audio_encoder"], available, src)
    available["text_encoder"] = construct(specs["text_encoder"], available, src)
    for arm in ("audio", "text"):
        width = {"in_features": available[f"{arm}_encoder"].output_dim}
        available[f"{arm}_projector"] = construct(specs[f"{arm}_projector"], {**available, **width}, src)
    augmenters = [construct(s, available, src) for s in resolved.augmenters]
    objectives = [WeightedObjective(s.label, s.weight, construct(s, available, src)) for s in resolved.objectives]
    system = System(
        audio_encoder=available["audio_encoder"],
        text_encoder=available["text_encoder"],
        audio_projector=available["audio_projector"],
        text_projector=available["text_projector"],
        objectives=objectives,
        augmenters=augmenters,
    )
    available["system"] = system
    evals = tuple(construct(s, available, src) for s in resolved.evals)
    available["evals"] = evals
    trainer = construct(specs["trainer"], available, src)
    return Assembly(system=system, trainer=trainer, data=available["data"], evals=evals)
