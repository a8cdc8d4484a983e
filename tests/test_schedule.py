"""The cosine schedule through torch's LambdaLR: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math

import pytest
import torch

from mtrun.train.schedule import Cosine, lambda_lr


def warmup_cosine(optimizer, *, warmup_steps, total_steps, min_lr_ratio):
    """The ``[trainer.schedule]`` default as the trainer wraps it."""
    config = Cosine.Config(warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
    return lambda_lr(optimizer, Cosine(config, total_steps=total_steps, steps_per_epoch=1))


def independent_lr(step: int, peak: float, warmup: int, total: int, floor: float) -> float:
    """The schedule written out from its definition, not from the implementation."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / (total - warmup))
    return peak * floor + (peak - peak * floor) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize(("warmup", "total", "floor"), [(5, 50, 0.0), (10, 40, 0.1), (0, 20, 0.05)])
def test_lambda_lr_matches_independent_warmup_cosine_formula(warmup, total, floor):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.3)
    scheduler = warmup_cosine(optimizer, warmup_steps=warmup, total_steps=total, min_lr_ratio=floor)
    seen = []
    for _ in range(total + 5):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [independent_lr(s, 0.3, warmup, total, floor) for s in range(total + 5)]
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_warmup_rises_linearly_to_peak_then_decays_to_floor():
    cosine = Cosine(Cosine.Config(warmup_steps=4, min_lr_ratio=0.2), total_steps=20, steps_per_epoch=1)
    factors = [cosine.factor(s) for s in range(25)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[3:20], factors[4:21]))
    assert factors[12] == pytest.approx(0.2 + 0.8 * 0.5)  # half-way through the decay
    assert factors[20:] == pytest.approx([0.2] * 5)  # held at the floor past the end


def test_scheduler_state_is_json_and_restores_the_same_lr():
    import json

    def make():
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        return opt, warmup_cosine(opt, warmup_steps=3, total_steps=10, min_lr_ratio=0.0)

    opt, sched = make()
    for _ in range(6):
        opt.step()
        sched.step()
    assert sched.state_dict()["lr_lambdas"] == [None]  # only counters: the shape comes from the recipe
    state = json.loads(json.dumps(sched.state_dict()))
    opt2, sched2 = make()
    sched2.load_state_dict(state)
    for group in opt2.param_groups:
        group["lr"] = sched2.get_last_lr()[0]
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
