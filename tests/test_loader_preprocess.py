"""The audio encoder's preprocess in the loader's workers: same features, same loss, and only
when nothing has to act on the waveform first."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtrun.interfaces import AugmentContext, Batch

TEXTS = ["a calm piano piece", "an upbeat reel on the fiddle", "a slow air", "a jig"]


def _system(tmp_path: Path, augmenters: list[dict]):
    from mtrun import plugins
    from mtrun.assemble import assemble_model
    from mtrun.recipe import resolve_recipe
    from mtrun.run import LoaderConfig, Run, RunConfig

    recipe = {
        "data": {"type": "demo"},
        "audio_encoder": {"type": "mavil", "preset": "tiny"},
        "text_encoder": {"type": "hf-text", "preset": "tiny-roberta", "pretrained": ""},
        "audio_projector": {"type": "mlp", "hidden_sizes": [32], "dim": 16},
        "text_projector": {"type": "mlp", "hidden_sizes": [32], "dim": 16},
        "objective": [{"type": "infonce"}],
        "augmenter": augmenters,
    }
    resolved = resolve_recipe(recipe, plugins.get_plugins().registry, "preprocess.toml")
    torch.manual_seed(0)
    run = Run(dir=tmp_path, config=RunConfig(), loader=LoaderConfig(), recipe=resolved.data)
    return assemble_model(resolved, run)


def _batch(system) -> Batch:
    waves = 0.1 * torch.randn(4, 40_960, generator=torch.Generator().manual_seed(1))
    return Batch(ids=[f"i{k}" for k in range(4)], waveforms=waves, texts=TEXTS, tags=[{}] * 4, groups=[None] * 4,
                 text_inputs=system.text_encoder.tokenize(TEXTS), skipped=[])


def _context() -> AugmentContext:
    return AugmentContext(step=0, epoch=0, steps_per_epoch=10, total_steps=10, training=True,
                          generator=torch.Generator().manual_seed(0), item_seeds=[1, 2, 3, 4], batch_seed=5)


def test_the_trainer_hands_preprocess_to_the_loader_only_on_the_cpu_and_when_nothing_acts_on_the_waveform(tmp_path):
    from mtrun.train.trainer import loader_preprocess

    with_features_augmenter = _system(tmp_path, [{"type": "specaugment"}])
    assert loader_preprocess(with_features_augmenter, "cpu") == with_features_augmenter.audio_encoder.preprocess
    # On a GPU the step makes the features there: a loader worker cannot use the encoder's CUDA
    # constants (seen on an H200: "Expected all tensors to be on the same device").
    assert loader_preprocess(with_features_augmenter, torch.device("cuda", 0)) is None
    # A waveform augmenter (the testkit's gain) must see the waveform before the features are made.
    from mtrun.train.trainer import System

    with_gain = with_features_augmenter
    gain = type("Gain", (), {"stage": "waveform", "__call__": lambda self, x, c: x})()
    gained = System(
        audio_encoder=with_gain.audio_encoder, text_encoder=with_gain.text_encoder,
        audio_projector=with_gain.audio_projector, text_projector=with_gain.text_projector,
        objectives=list(with_gain.objectives), augmenters=[gain],
    )
    assert loader_preprocess(gained, "cpu") is None
    with pytest.raises(RuntimeError, match="waveform augmenter must act before them"):
        batch = _batch(gained)
        batch.clean_features = gained.audio_encoder.preprocess(batch.waveforms)
        gained(batch, _context())


def test_features_made_in_the_loader_give_the_same_loss_as_the_step_making_them(tmp_path):
    system = _system(tmp_path, [{"type": "specaugment"}]).train()
    plain = _batch(system)
    torch.manual_seed(3)  # the text encoder's dropout draws from the global generator
    loss_plain, _ = system(plain, _context())
    early = _batch(system)
    with torch.no_grad():
        early.clean_features = system.audio_encoder.preprocess(early.waveforms)
    torch.manual_seed(3)
    loss_early, _ = system(early, _context())
    assert torch.equal(plain.clean_features, early.clean_features)
    assert torch.equal(loss_plain, loss_early)


def test_the_loader_fills_clean_features_with_the_preprocess_of_its_waveforms(tmp_path):
    from mtrun.data.loader import BatchLoader
    from mtrun.interfaces import Sample
    from mtrun.run import LoaderConfig

    samples = [Sample(id=f"s{k}", audio=0.1 * torch.randn(16_000), sample_rate=16_000, captions=["x"]) for k in range(4)]
    calls = []

    def preprocess(waves: torch.Tensor) -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        return waves[:, None, :100] * 2.0

    loader = BatchLoader(samples, config=LoaderConfig(clip_seconds=0.5, probe_items=0), sample_rate=16_000,
                         tokenize=lambda texts: {"input_ids": torch.zeros(len(texts), 2, dtype=torch.long), "attention_mask": torch.ones(len(texts), 2, dtype=torch.long)},
                         batch_size=4, preprocess=preprocess)
    (batch,) = list(loader)
    assert torch.equal(batch.clean_features, batch.waveforms[:, None, :100] * 2.0)
    assert calls == [False]  # no graph is built in the workers
