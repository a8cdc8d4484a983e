"""The optional ``[fusion]`` slot and the ``encoded`` augmentation stage (MuLaP's co-attention
and masked audio modelling): resolved, built with the encoders' widths, run beside the towers."""

from __future__ import annotations

from typing import ClassVar

import attrs
import pytest
import torch
from torch import nn

from mtrun import EncoderOutput, ObjectiveOutput, StepOutputs, positive
from mtrun.assemble import assemble
from mtrun.recipe import resolve_recipe
from mtrun.run import LoaderConfig, Run, RunConfig

TOY = {
    "data": {"type": "toy-tones", "n_items": 8},
    "audio_encoder": {"type": "toy-audio", "width": 24},
    "text_encoder": {"type": "toy-text", "width": 20},
    "audio_projector": {"type": "toy-linear", "dim": 8},
    "text_projector": {"type": "toy-linear", "dim": 8},
    "trainer": {"max_steps": 1, "batch_size": 4},
}


class SumFusion(nn.Module):
    """Each stream gets the other's mean token added, after a Linear to a common width."""

    @attrs.frozen
    class Config:
        dim: int = attrs.field(default=6, validator=positive, metadata={"help": "common width"})

    def __init__(self, config: Config, *, audio_features: int, text_features: int):
        super().__init__()
        self.output_dim = self.audio_width = self.text_width = config.dim
        self.audio_in, self.text_in = nn.Linear(audio_features, config.dim), nn.Linear(text_features, config.dim)

    def forward(self, audio: EncoderOutput, text: EncoderOutput):
        a, t = self.audio_in(audio.tokens), self.text_in(text.tokens)
        a2 = a + t.mean(1, keepdim=True)
        t2 = t + a.mean(1, keepdim=True)
        return EncoderOutput(a2, a2[:, 0], audio.mask), EncoderOutput(t2, t2[:, 0], text.mask)


class ZeroFirstToken:
    """An ``encoded`` augmenter: zeroes the first audio token, keeping the original for a loss."""

    stage: ClassVar[str] = "encoded"

    @attrs.frozen
    class Config:
        pass

    def __init__(self, config: Config):
        self.config = config

    def __call__(self, batch, context):
        encoded = batch.audio_encoded
        batch.original_first = encoded.tokens[:, 0].detach()
        tokens = encoded.tokens.clone()
        tokens[:, 0] = 0
        batch.audio_encoded = attrs.evolve(encoded, tokens=tokens, pooled=tokens.mean(1))
        return batch


class Recorder(nn.Module):
    """An objective that keeps the step's outputs for the test to look at."""

    @attrs.frozen
    class Config:
        pass

    seen: ClassVar[list[StepOutputs]] = []

    def __init__(self, config: Config, *, fusion: nn.Module | None = None):
        super().__init__()
        self.fusion_given = fusion

    def forward(self, outputs: StepOutputs) -> ObjectiveOutput:
        Recorder.seen.append(outputs)
        loss = outputs.fused_audio.pooled.square().mean() + outputs.audio_embedding.square().mean()
        return ObjectiveOutput(loss=loss)


@pytest.fixture
def fusion_registry(registry):
    registry.fusion("sum", SumFusion)
    registry.augmenter("zero-first", ZeroFirstToken)
    registry.objective("recorder", Recorder)
    return registry


def build(registry, tmp_path, **changes):
    resolved = resolve_recipe({**TOY, "objective": [{"type": "recorder"}], **changes}, registry, "r.toml")
    run = Run(dir=tmp_path, config=RunConfig(), loader=LoaderConfig(), recipe=resolved.data)
    return assemble(resolved, run).system


def toy_batch(system, n=3):
    from mtrun import Batch

    texts = ["a low tone", "a high tone here", "tone"][:n]
    return Batch(waveforms=torch.randn(n, 1600), texts=texts, text_inputs=system.text_encoder.tokenize(texts))


def test_fusion_is_built_with_both_widths_and_runs_beside_the_towers(fusion_registry, tmp_path):
    system = build(fusion_registry, tmp_path, fusion={"type": "sum", "dim": 5})
    assert system.fusion.audio_in.in_features == 24 and system.fusion.text_in.in_features == 20
    assert system.objectives[0].objective.fusion_given is system.fusion  # injected by name
    assert any(k.startswith("fusion.") for k in system.state_dict())
    Recorder.seen.clear()
    loss, _ = system(toy_batch(system))
    out = Recorder.seen[-1]
    assert out.fused_audio.pooled.shape == (3, 5) and out.fused_text.tokens.shape[-1] == 5
    # The towers are untouched by the fusion: the projectors embed each encoder's own output.
    torch.testing.assert_close(out.audio_embedding, system.audio_projector(out.audio))
    loss.backward()
    assert system.fusion.audio_in.weight.grad is not None
    # Retrieval embeds one modality at a time, without the fusion.
    waves = torch.randn(2, 1600)
    with torch.no_grad():
        expected = nn.functional.normalize(system.audio_projector(system.audio_encoder(system.audio_encoder.preprocess(waves))), dim=-1)
    torch.testing.assert_close(system.embed_audio(waves), expected)


def test_without_a_fusion_table_there_is_no_fusion_and_no_fused_streams(fusion_registry, tmp_path):
    class Plain(Recorder):
        def forward(self, outputs):
            Recorder.seen.append(outputs)
            return ObjectiveOutput(loss=outputs.audio_embedding.square().mean())

    fusion_registry.objective("plain", Plain)
    system = build(fusion_registry, tmp_path, objective=[{"type": "plain"}])
    assert system.fusion is None and system.objectives[0].objective.fusion_given is None
    Recorder.seen.clear()
    system(toy_batch(system))
    assert Recorder.seen[-1].fused_audio is None and Recorder.seen[-1].fused_text is None


def test_encoded_augmenters_change_what_projectors_and_fusion_read_in_training_only(fusion_registry, tmp_path):
    from mtrun import AugmentContext

    system = build(fusion_registry, tmp_path, fusion={"type": "sum"}, augmenter=[{"type": "zero-first"}])
    context = AugmentContext(step=0, epoch=0, steps_per_epoch=1, total_steps=1, training=True)
    Recorder.seen.clear()
    system(toy_batch(system), context)
    out = Recorder.seen[-1]
    assert torch.equal(out.audio.tokens[:, 0], torch.zeros_like(out.audio.tokens[:, 0]))
    assert out.batch.original_first.abs().sum() > 0
    torch.testing.assert_close(out.audio_embedding, system.audio_projector(out.audio))
    evaluation = AugmentContext(step=0, epoch=0, steps_per_epoch=1, total_steps=1, training=False)
    system(toy_batch(system), evaluation)
    assert Recorder.seen[-1].audio.tokens[:, 0].abs().sum() > 0


def test_a_fusion_type_typo_is_a_recipe_error_with_a_suggestion(fusion_registry):
    from mtrun import RecipeError

    with pytest.raises(RecipeError) as caught:
        resolve_recipe({**TOY, "objective": [{"type": "recorder"}], "fusion": {"type": "summ"}}, fusion_registry, "r.toml")
    assert "[fusion].type = 'summ'" in caught.value.problems[0] and "sum" in caught.value.problems[0]
