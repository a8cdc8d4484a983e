"""Every audio encoder × text encoder × objective the plugins offer, at tiny sizes: each
combination either builds and takes a training step (finite loss, gradients in the model), or
`mtrun validate` rejects it with the reason. Nothing in between: no combination may pass
validation and then fail to build or to run — the promise that lets people mix components."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from mtrun.errors import RecipeError

AUDIO = {
    "mavil": {"type": "mavil", "preset": "tiny"},
    "mert": {"type": "mert", "preset": "tiny"},
    "htsat": {"type": "htsat", "preset": "tiny"},
    "musicnn": {"type": "musicnn", "preset": "tiny", "weights": ""},
}
TEXT = {
    "roberta": {"type": "hf-text", "preset": "tiny-roberta", "pretrained": ""},
    "bert": {"type": "hf-text", "preset": "tiny-bert", "pretrained": ""},
    "t5": {"type": "hf-text", "preset": "tiny-t5", "pretrained": ""},
    "clip": {"type": "clip-text", "preset": "tiny", "pretrained": ""},
    "mt5": {"type": "mt5", "preset": "tiny", "pretrained": ""},
}
_PREDICTOR = {"type": "mlp", "hidden_sizes": [32], "dim": 16}
OBJECTIVES = {
    # objective tables, and the augmenters they need (what a recipe would pair them with)
    "infonce": ([{"type": "infonce"}], []),
    "byol": ([{"type": "byol", "audio_predictor": _PREDICTOR, "text_predictor": _PREDICTOR}], []),
    "mae-recon": ([{"type": "mae-recon"}], [{"type": "token-mask"}]),
    "atm": ([{"type": "atm"}], []),
    "mlm": ([{"type": "mlm"}], [{"type": "mlm-mask"}]),
    "mam": ([{"type": "mam"}], [{"type": "mam-mask"}]),
}
# Rejections that are right, and the reason validation must give for each.
EXPECTED_REJECTIONS = {
    ("mae-recon", "audio"): "needs [audio_encoder] to provide 'keep_index'",
    ("mlm", "text"): "to provide 'masked_lm_vocabulary'",
}
TEXTS = ["a calm piano piece", "an upbeat rock song with electric guitar", "a sad folk tune on the fiddle", "fast techno"]


def _recipe(audio: dict, text: dict, objective: str) -> dict:
    objectives, augmenters = OBJECTIVES[objective]
    return {
        "data": {"type": "demo"},
        "audio_encoder": audio,
        "text_encoder": text,
        "audio_projector": {"type": "mlp", "hidden_sizes": [32], "dim": 16},
        "text_projector": {"type": "mlp", "hidden_sizes": [32], "dim": 16},
        "objective": objectives,
        "augmenter": augmenters,
        "trainer": {"max_steps": 1, "batch_size": 4},
    }


@pytest.mark.slow
@pytest.mark.parametrize("audio_name", list(AUDIO))
def test_every_combination_takes_a_step_or_is_rejected_with_its_reason(audio_name, tmp_path):
    from mtrun import plugins
    from mtrun.assemble import assemble_model
    from mtrun.interfaces import AugmentContext, Batch
    from mtrun.recipe import resolve_recipe
    from mtrun.run import LoaderConfig, Run, RunConfig

    outcomes = {}
    for (text_name, text), objective in itertools.product(TEXT.items(), OBJECTIVES):
        label = f"{audio_name} + {text_name} + {objective}"
        try:
            resolved = resolve_recipe(_recipe(AUDIO[audio_name], text, objective), plugins.get_plugins().registry, "combination.toml")
        except RecipeError as exc:
            outcomes[label] = f"rejected: {exc}"
            continue
        torch.manual_seed(0)
        run = Run(dir=Path(tmp_path), config=RunConfig(), loader=LoaderConfig(), recipe=resolved.data)
        system = assemble_model(resolved, run).train()
        rate = system.audio_encoder.sample_rate
        batch = Batch(
            ids=[f"item-{i}" for i in range(4)],
            waveforms=0.1 * torch.randn(4, 2 * rate),
            texts=TEXTS,
            tags=[{"genre": ["folk"]}] * 4,
            groups=[None] * 4,
            text_inputs=system.text_encoder.tokenize(TEXTS),
            skipped=[],
        )
        context = AugmentContext(step=0, epoch=0, steps_per_epoch=10, total_steps=10, training=True, generator=torch.Generator().manual_seed(0))
        loss, _ = system(batch, context)
        loss.backward()
        grads = [p.grad for p in system.parameters() if p.grad is not None]
        assert torch.isfinite(loss) and grads and sum(float(g.abs().sum()) for g in grads) > 0, label
        outcomes[label] = "step"

    for label, outcome in outcomes.items():
        if outcome == "step":
            continue
        objective = label.rsplit(" + ", 1)[-1]
        reasons = [reason for (obj, _), reason in EXPECTED_REJECTIONS.items() if obj == objective]
        assert reasons and any(r in outcome for r in reasons), f"{label} was {outcome}"
    # Each expected rejection is exercised, and most combinations do run.
    assert sum(o == "step" for o in outcomes.values()) >= len(outcomes) * 2 // 3, outcomes
