"""Core's own components. They register through the same hook, and the same entry-point
group, as any third-party plugin."""

from __future__ import annotations

from mtrun.hookspecs import hookimpl


@hookimpl
def mtrun_register_components(registry) -> None:
    from mtrun.data import sources
    from mtrun.eval import register as register_evals
    from mtrun.train import optim, schedule
    from mtrun.train.trainer import DefaultTrainer

    registry.trainer("default", DefaultTrainer)
    registry.optimizer("adamw", optim.AdamW)
    registry.optimizer("adam", optim.Adam)
    registry.optimizer("sgd", optim.SGD)
    registry.schedule("cosine", schedule.Cosine)
    registry.schedule("linear", schedule.Linear)
    registry.schedule("constant", schedule.Constant)
    sources.register(registry)
    register_evals(registry)
