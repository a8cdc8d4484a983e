"""[trainer.optimizer] and [trainer.schedule]: schedule shapes, parameter groups, exact resume
with every built-in optimizer, and recipe validation of the nested tables."""

from __future__ import annotations

import math
import os
import signal
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mtrun import ComponentSpec
from mtrun.errors import MtrunError
from mtrun.train.optim import SGD, Adam, AdamW, param_groups
from mtrun.train.schedule import Constant, Cosine, Linear, lambda_lr

# ----------------------------------------------------------------------------- schedules


def warmup(step: int, length: int) -> float | None:
    """The shared warm-up, from its definition: (step + 1) / length during the first steps."""
    return (step + 1) / length if step < length else None


def cosine(step: int, length: int, total: int, floor: float) -> float:
    if (w := warmup(step, length)) is not None:
        return w
    t = min(1.0, (step - length) / (total - length))
    return floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2


def linear(step: int, length: int, total: int, floor: float) -> float:
    if (w := warmup(step, length)) is not None:
        return w
    t = min(1.0, (step - length) / (total - length))
    return 1 - (1 - floor) * t


def constant(step: int, length: int, total: int, floor: float) -> float:
    w = warmup(step, length)
    return 1.0 if w is None else w


CASES = [
    # (warmup_steps, warmup_epochs, steps_per_epoch, warm-up length in steps, total, floor)
    (4, 0.0, 10, 4, 30, 0.1),
    (0, 1.5, 4, 6, 30, 0.0),  # 1.5 epochs of 4 steps
    (0, 0.0, 10, 0, 20, 0.2),
    (3, 2.0, 10, 3, 20, 0.0),  # warmup_steps wins over warmup_epochs
]


@pytest.mark.parametrize(
    ("cls", "reference"), [(Cosine, cosine), (Linear, linear), (Constant, constant)], ids=["cosine", "linear", "constant"]
)
@pytest.mark.parametrize(("steps", "epochs", "per_epoch", "length", "total", "floor"), CASES)
def test_schedule_factor_matches_its_closed_form(cls, reference, steps, epochs, per_epoch, length, total, floor):
    fields = {"warmup_steps": steps, "warmup_epochs": epochs}
    if cls is not Constant:
        fields["min_lr_ratio"] = floor
    schedule = cls(cls.Config(**fields), total_steps=total, steps_per_epoch=per_epoch)
    got = [schedule.factor(s) for s in range(total + 5)]
    expected = [reference(s, length, total, floor) for s in range(total + 5)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_linear_schedule_reaches_its_floor_at_the_last_step_and_holds_it():
    schedule = Linear(Linear.Config(warmup_steps=2, min_lr_ratio=0.25), total_steps=10, steps_per_epoch=5)
    assert [schedule.factor(s) for s in (0, 1, 2, 6)] == pytest.approx([0.5, 1.0, 1.0, 0.625])
    assert [schedule.factor(s) for s in (10, 11, 50)] == pytest.approx([0.25] * 3)


# ----------------------------------------------------------------------------- parameter groups


class Tiny(nn.Module):
    """Top-level components named like a System's, with weights, biases, a norm and a scalar."""

    def __init__(self):
        super().__init__()
        self.audio_encoder = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.text_projector = nn.Linear(4, 2)
        self.objectives = nn.ModuleList([nn.Module()])
        self.objectives[0].temperature = nn.Parameter(torch.tensor(0.07))


def group_of(groups: list[dict], param: torch.Tensor) -> dict:
    (group,) = [g for g in groups if any(p is param for p in g["params"])]
    return group


def test_no_weight_decay_on_norms_biases_and_scalars():
    model = Tiny()
    groups = param_groups(model, AdamW.Config(lr=1e-3, weight_decay=0.1))
    assert len(groups) == 2  # one decayed, one undecayed group, as before lr_scale existed
    for name, param in model.named_parameters():
        decays = name in ("audio_encoder.0.weight", "text_projector.weight")
        assert group_of(groups, param)["weight_decay"] == (0.1 if decays else 0.0), name


def test_lr_scale_multiplies_the_lr_of_exactly_that_components_parameters():
    model = Tiny()
    groups = param_groups(model, AdamW.Config(lr=2e-3, weight_decay=0.1, lr_scale={"audio_encoder": 0.1}))
    for name, param in model.named_parameters():
        group = group_of(groups, param)
        assert group["lr"] == pytest.approx(2e-4 if name.startswith("audio_encoder.") else 2e-3), name
    # Decay still follows the parameter's shape inside the scaled component.
    assert group_of(groups, model.audio_encoder[1].weight)["weight_decay"] == 0.0
    assert group_of(groups, model.audio_encoder[0].weight)["weight_decay"] == 0.1


def test_the_schedule_multiplies_each_groups_own_lr_so_the_scale_persists():
    model = Tiny()
    optimizer = SGD(SGD.Config(lr=1.0, momentum=0.0, lr_scale={"text_projector": 0.5}), model=model)
    schedule = Linear(Linear.Config(warmup_steps=2), total_steps=6, steps_per_epoch=3)
    scheduler = lambda_lr(optimizer, schedule)
    scaled = group_of(optimizer.param_groups, model.text_projector.weight)
    plain = group_of(optimizer.param_groups, model.audio_encoder[0].weight)
    for step in range(8):
        assert plain["lr"] == pytest.approx(schedule.factor(step))
        assert scaled["lr"] == pytest.approx(0.5 * schedule.factor(step))
        optimizer.step()
        scheduler.step()


def test_lr_scale_for_a_component_the_model_lacks_names_the_table_and_the_components():
    """A System component the schema knows (text_encoder) that this model does not have."""
    with pytest.raises(MtrunError) as info:
        AdamW(AdamW.Config(lr_scale={"text_encoder": 0.1}), model=Tiny())
    message = str(info.value)
    assert "[trainer.optimizer].lr_scale" in message and "'text_encoder'" in message
    assert "audio_encoder, text_projector, objectives" in message


# ----------------------------------------------------------------------------- exact resume

OPTIMIZERS = {
    "adamw": ComponentSpec.of("optimizer", "adamw", AdamW, AdamW.Config(lr=1e-2, lr_scale={"audio_encoder": 0.5})),
    "adam": ComponentSpec.of("optimizer", "adam", Adam, Adam.Config(lr=1e-2, weight_decay=0.01)),
    "sgd": ComponentSpec.of("optimizer", "sgd", SGD, SGD.Config(lr=0.1, momentum=0.9, nesterov=True)),
}


class StopAfter:
    """``system.on_step_end`` that sends this process SIGINT after step ``k``, as Ctrl-C would."""

    def __init__(self, hook, k: int):
        self.hook, self.k = hook, k

    def __call__(self, step: int, total: int) -> None:
        self.hook(step, total)
        if step == self.k:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_interrupted_and_resumed_run_ends_bit_identical(tmp_path, toy_trainer, name):
    optimizer, steps, k = OPTIMIZERS[name], 7, 3  # 5 steps an epoch: the resume crosses an epoch
    toy_trainer(tmp_path / "full", steps=steps, checkpoint_every=0, optimizer=optimizer).fit()

    interrupted = toy_trainer(tmp_path / "run", steps=steps, checkpoint_every=0, optimizer=optimizer)
    interrupted.system.on_step_end = StopAfter(interrupted.system.on_step_end, k)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == [f"step-{k:06d}"]
    toy_trainer(tmp_path / "run", steps=steps, checkpoint_every=0, optimizer=optimizer, resume="latest").fit()

    last = f"checkpoints/step-{steps:06d}"
    for part in ("model", "optimizer"):
        full = load_file(str(tmp_path / "full" / last / f"{part}.safetensors"))
        resumed = load_file(str(tmp_path / "run" / last / f"{part}.safetensors"))
        assert full.keys() == resumed.keys() and full
        for key in full:
            assert torch.equal(full[key], resumed[key]), f"{name}: {part} {key} differs"


# ----------------------------------------------------------------------------- recipes

RECIPE = """
[data]
type = "toy-tones"
[audio_encoder]
type = "toy-audio"
[text_encoder]
type = "toy-text"
[audio_projector]
type = "toy-linear"
[text_projector]
type = "toy-linear"
[[objective]]
type = "toy-contrastive"
"""


def resolve(tmp_path, registry, extra: str):
    from mtrun.recipe import load_recipe, resolve_recipe

    path = tmp_path / "r.toml"
    path.write_text(RECIPE + textwrap.dedent(extra))
    return resolve_recipe(load_recipe(path), registry, str(path))


def test_optimizer_and_schedule_tables_resolve_to_their_components(tmp_path, registry):
    resolved = resolve(tmp_path, registry, """
        [trainer.optimizer]
        type = "sgd"
        lr = 0.1
        nesterov = true
        lr_scale = { audio_encoder = 0.1 }
        [trainer.schedule]
        type = "linear"
        warmup_epochs = 0.5
        """)
    config = resolved.components["trainer"].config
    assert (config.optimizer.cls, config.schedule.cls) == (SGD, Linear)
    assert config.optimizer.config == SGD.Config(lr=0.1, nesterov=True, lr_scale={"audio_encoder": 0.1})
    assert config.schedule.config == Linear.Config(warmup_epochs=0.5)


def test_without_the_tables_the_trainer_gets_adamw_and_cosine(tmp_path, registry):
    config = resolve(tmp_path, registry, "").components["trainer"].config
    assert (config.optimizer.name, config.schedule.name) == ("adamw", "cosine")
    assert config.optimizer.config == AdamW.Config() and config.schedule.config == Cosine.Config()


def test_typo_in_the_optimizer_table_fails_validation_naming_it(tmp_path, registry):
    from mtrun.errors import RecipeError

    with pytest.raises(RecipeError) as info:
        resolve(tmp_path, registry, """
            [trainer.optimizer]
            type = "sgd"
            momentun = 0.5
            """)
    (problem,) = info.value.problems
    assert "[trainer.optimizer].momentun" in problem and "did you mean 'momentum'?" in problem


def test_lr_scale_typo_fails_validation_with_the_closest_component(tmp_path, registry):
    from mtrun.errors import RecipeError

    with pytest.raises(RecipeError) as info:
        resolve(tmp_path, registry, """
            [trainer.optimizer]
            lr_scale = { audio_encodr = 0.1 }
            """)
    (problem,) = info.value.problems
    assert problem.startswith("[trainer.optimizer].lr_scale: invalid value"), problem
    assert "'audio_encodr' (did you mean 'audio_encoder'?)" in problem
