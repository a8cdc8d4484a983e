"""Constructor injection: what the assembler hands each component, and how it fails."""

from __future__ import annotations

import attrs
import pytest
import torch

from mtrun.assemble import BuildError, assemble, construct
from mtrun import ComponentSpec
from mtrun.recipe import resolve_recipe
from mtrun.run import LoaderConfig, Run, RunConfig

TOY = {
    "data": {"type": "toy-tones", "n_items": 8},
    "audio_encoder": {"type": "toy-audio", "width": 24},
    "text_encoder": {"type": "toy-text", "width": 20},
    "audio_projector": {"type": "toy-linear", "dim": 8},
    "text_projector": {"type": "toy-linear", "dim": 8},
    "objective": [{"type": "toy-contrastive", "weight": 0.5, "name": "nce"}],
    "augmenter": [{"type": "toy-gain"}],
    "trainer": {"max_steps": 1, "batch_size": 4},
}


def _run(tmp_path, recipe):
    return Run(dir=tmp_path, config=RunConfig(), loader=LoaderConfig(), recipe=recipe)


def test_projectors_receive_their_encoders_width(registry, tmp_path):
    resolved = resolve_recipe(dict(TOY), registry, "toy.toml")
    built = assemble(resolved, _run(tmp_path, resolved.data))
    assert built.system.audio_projector.linear.in_features == 24
    assert built.system.text_projector.linear.in_features == 20
    assert [(o.name, o.weight) for o in built.system.objectives] == [("nce", 0.5)]


def test_weighted_objectives_sum_by_weight(registry, tmp_path):
    recipe = dict(TOY, objective=[{"type": "toy-contrastive", "weight": 0.5, "name": "a"},
                                  {"type": "toy-contrastive", "weight": 2.0, "name": "b"}])
    resolved = resolve_recipe(recipe, registry, "toy.toml")
    system = assemble(resolved, _run(tmp_path, resolved.data)).system
    from mtrun.interfaces import Batch

    batch = Batch(
        waveforms=torch.randn(4, 1600),
        text_inputs=system.text_encoder.tokenize(["a b", "c", "d e f", "g"]),
    )
    loss, metrics = system(batch)
    expected = 0.5 * metrics["a/loss"] + 2.0 * metrics["b/loss"]
    assert torch.allclose(loss, expected)
    assert torch.allclose(metrics["a/loss"], metrics["b/loss"])


class NeedsSomethingOdd:
    @attrs.frozen
    class Config:
        pass

    def __init__(self, config, *, database):
        pass


class Explodes:
    @attrs.frozen
    class Config:
        pass

    def __init__(self, config):
        raise RuntimeError("weights file not found: /nope")


def test_unknown_dependency_names_slot_and_injectables():
    spec = ComponentSpec(slot="audio_encoder", kind="audio_encoder", name="odd", cls=NeedsSomethingOdd, config=NeedsSomethingOdd.Config())
    with pytest.raises(BuildError, match=r"r.toml: \[audio_encoder\] \(type 'odd'\).*'database'.*injectable.*run"):
        construct(spec, {"run": None}, "r.toml")


def test_constructor_failure_is_reported_with_slot_and_cause():
    spec = ComponentSpec(slot="objective[1]", kind="objective", name="boom", cls=Explodes, config=Explodes.Config())
    with pytest.raises(BuildError, match=r"\[\[objective\]\]\[1\] \(type 'boom'\) failed to build: RuntimeError: weights file not found"):
        construct(spec, {}, "r.toml")
