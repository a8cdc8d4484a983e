"""A MuLaP recipe: its contracts are checked before anything is built, and one step trains."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import mtrun_mulap
import mulap_toys as toys
from mtrun import Batch, RecipeError, System, WeightedObjective
from mtrun.testing import isolated_registry, resolve

RECIPE = {
    "data": {"type": "demo"},
    "audio_encoder": {"type": "toy-chunks"},
    "text_encoder": {"type": "toy-bert"},
    "audio_projector": {"type": "toy-pooled"},
    "text_projector": {"type": "toy-pooled"},
    "fusion": {
        "type": "co-attention",
        "audio_width": 16,
        "audio_layers": 1,
        "audio_heads": 4,
        "co_width": 16,
        "co_heads": 4,
        "output_dim": 8,
    },
    "augmenter": [{"type": "caption-swap"}, {"type": "mlm-mask"}, {"type": "mam-mask"}],
    "objective": [
        {"type": "atm", "weight": 2.0},
        {"type": "mlm", "weight": 0.1},
        {"type": "mam", "weight": 4.0},
    ],
}


@pytest.fixture(scope="module")
def registry():
    return isolated_registry(mtrun_mulap, toys, "mtrun_demo")  # [data] type = "demo"


def problems(recipe, registry) -> str:
    with pytest.raises(RecipeError) as caught:
        resolve(recipe, registry)
    return "\n".join(caught.value.problems)


def test_the_mulap_recipe_validates(registry):
    resolved = resolve(RECIPE, registry)
    assert [spec.name for spec in resolved.augmenters] == ["caption-swap", "mlm-mask", "mam-mask"]
    assert [(spec.name, spec.weight) for spec in resolved.objectives] == [
        ("atm", 2.0),
        ("mlm", 0.1),
        ("mam", 4.0),
    ]


def test_mlm_without_mlm_mask_is_refused_naming_both_tables(registry):
    found = problems(
        {**RECIPE, "augmenter": [{"type": "caption-swap"}, {"type": "mam-mask"}]}, registry
    )
    assert "[[objective]][1].type = 'mlm': needs [[augmenter]] to provide 'mlm_labels'" in found
    assert "mlm-mask" in found  # the hint names the augmenter that would do


def test_mam_without_mam_mask_is_refused_naming_both_tables(registry):
    found = problems({**RECIPE, "augmenter": [{"type": "mlm-mask"}]}, registry)
    assert (
        "[[objective]][2].type = 'mam': needs [[augmenter]] to provide 'masked_audio_features'"
        in found
    )
    assert "mam-mask" in found and "mlm_labels" not in found


def test_a_typo_in_a_mulap_table_is_reported_with_a_suggestion(registry):
    found = problems({**RECIPE, "fusion": {"type": "co-attention", "co_layer": 2}}, registry)
    assert "[fusion]" in found and "co_layers" in found


def build_system(registry) -> System:
    """What the assembler does, with the resolved specs: build in slot order, inject by name."""
    resolved = resolve(RECIPE, registry)
    spec = resolved.components
    torch.manual_seed(0)
    audio_encoder, text_encoder = spec["audio_encoder"].build(), spec["text_encoder"].build()
    audio_projector = spec["audio_projector"].build(in_features=audio_encoder.output_dim)
    text_projector = spec["text_projector"].build(in_features=text_encoder.output_dim)
    fusion = spec["fusion"].build(
        audio_features=audio_encoder.output_dim, text_features=text_encoder.output_dim
    )
    offered = {
        "audio_encoder": audio_encoder,
        "text_encoder": text_encoder,
        "audio_projector": audio_projector,
        "text_projector": text_projector,
        "fusion": fusion,
    }
    augmenters = [s.build(**offered) for s in resolved.augmenters]
    objectives = [
        WeightedObjective(s.label, s.weight, s.build(**offered, augmenters=tuple(augmenters)))
        for s in resolved.objectives
    ]
    return System(
        audio_encoder=audio_encoder,
        text_encoder=text_encoder,
        audio_projector=audio_projector,
        text_projector=text_projector,
        objectives=objectives,
        augmenters=augmenters,
        fusion=fusion,
    )


def mulap_batch(system) -> Batch:
    texts = [*toys.CAPTIONS, toys.CAPTIONS[0]]  # a duplicate caption too
    return Batch(
        waveforms=torch.randn(len(texts), 2400, generator=torch.Generator().manual_seed(1)),
        texts=texts,
        text_inputs=system.text_encoder.tokenize(texts),
    )


def test_one_mulap_training_step_reaches_every_parameter(registry):
    system = build_system(registry)
    loss, metrics = system(mulap_batch(system), toys.context(seed=4))
    assert torch.isfinite(loss)
    expected = 2.0 * metrics["atm/loss"] + 0.1 * metrics["mlm/loss"] + 4.0 * metrics["mam/loss"]
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    assert metrics["mlm/masked_tokens"] > 0 and float(metrics["mam/masked_chunks"]) > 0
    loss.backward()
    # The objectives hold the fusion and encoders by reference: saved once, under the system.
    assert not [
        k
        for k in system.state_dict()
        if k.startswith("objectives.") and ("fusion" in k or "encoder" in k)
    ]
    assert any(k.startswith("fusion.co_blocks.") for k in system.state_dict())
    # The projectors take no part in MuLaP's losses; everything else learns.
    silent = [
        n
        for n, p in system.named_parameters()
        if p.grad is None and not n.startswith(("audio_projector", "text_projector"))
    ]
    assert not silent


def test_an_evaluation_step_without_caption_swap_still_measures_all_three(registry):
    system = build_system(registry).eval()
    with torch.no_grad():
        loss, metrics = system(mulap_batch(system), toys.context(seed=4, training=False))
    assert torch.isfinite(loss)
    # caption-swap is training-only: atm fused its own negatives; the maskers run in evaluation.
    assert metrics["mlm/masked_tokens"] > 0 and float(metrics["mam/masked_chunks"]) > 0
