"""A component that returns the wrong thing is named by its recipe table and type, at once."""

from __future__ import annotations

import pytest
import torch

import mtrun_testkit as tk
from mtrun import Batch, ComponentSpec
from mtrun.errors import ComponentOutputError
from mtrun.spec import construct
from mtrun.system import System, WeightedObjective


class Narrow(tk.ToyLinear):
    """Declares output_dim 16 but returns 3 columns."""

    def forward(self, encoded):
        return super().forward(encoded)[:, :3]


class PooledTwice(tk.ToyAudio):
    """Returns pooled vectors of the wrong width."""

    def forward(self, features, **kwargs):
        out = super().forward(features, **kwargs)
        out.pooled = torch.cat([out.pooled, out.pooled], dim=-1)
        return out


class VectorLoss(tk.ToyContrastive):
    """Returns a per-item loss instead of a scalar."""

    def forward(self, outputs):
        result = super().forward(outputs)
        result.loss = outputs.audio_embedding.sum(-1)
        return result


def system(audio=tk.ToyAudio, projector=tk.ToyLinear, objective=tk.ToyContrastive, augmenters=()) -> System:
    audio_encoder = construct(ComponentSpec.of("audio_encoder", "toy-audio", audio, tk.ToyAudio.Config()), {})
    text_encoder = tk.ToyText(tk.ToyText.Config())
    spec = ComponentSpec.of("projector", "narrow" if projector is Narrow else "toy-linear", projector, tk.ToyLinear.Config(), slot="audio_projector")
    audio_projector = construct(spec, {"in_features": audio_encoder.output_dim})
    obj = construct(ComponentSpec.of("objective", "vector-loss", objective, tk.ToyContrastive.Config(), slot="objective[0]"), {})
    return System(
        audio_encoder=audio_encoder,
        text_encoder=text_encoder,
        audio_projector=audio_projector,
        text_projector=tk.ToyLinear(tk.ToyLinear.Config(), in_features=text_encoder.output_dim),
        objectives=[WeightedObjective("contrastive", 1.0, obj)],
        augmenters=augmenters,
    )


def batch(model: System) -> Batch:
    texts = ["a tone", "a high tone", "low"]
    return Batch(waveforms=torch.randn(3, 1600), texts=texts, text_inputs=model.text_encoder.tokenize(texts))


@pytest.mark.parametrize(
    "parts, expected",
    [
        ({"projector": Narrow}, r"\[audio_projector\] type 'narrow' returned \[3, 3\]; expected \[B, output_dim\] = \[3, 16\]"),
        ({"audio": PooledTwice}, r"\[audio_encoder\] type 'toy-audio' returned pooled of shape \[3, 64\]; expected \[B, output_dim\] = \[3, 32\]"),
        ({"objective": VectorLoss}, r"\[\[objective\]\]\[0\] type 'vector-loss' returned loss of shape \[3\]; an objective returns"),
    ],
    ids=["projector-width", "encoder-pooled", "objective-loss"],
)
def test_a_wrong_output_names_the_component(parts, expected):
    model = system(**parts)
    with pytest.raises(ComponentOutputError, match=expected):
        model(batch(model))


def test_correct_outputs_pass():
    model = system()
    loss, _ = model(batch(model))
    assert loss.ndim == 0


class Cropper:
    """A waveform augmenter that crops (a new length would reach the encoder unnoticed)."""

    stage = "waveform"

    def __call__(self, waveforms, context):
        return waveforms[:, :-100]


def test_an_augmenter_that_changes_its_input_shape_is_named():
    from mtrun.interfaces import AugmentContext

    aug = Cropper()
    aug.mtrun_label = "[[augmenter]][0] type 'cropper'"  # what construct() sets
    model = system(augmenters=[aug])
    context = AugmentContext(step=0, epoch=0, steps_per_epoch=1, total_steps=1, training=True, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ComponentOutputError, match=r"\[\[augmenter\]\]\[0\] type 'cropper' \(waveform stage\) returned \[3, 1500\]; "
                       r"it must keep the shape of what it received, \[3, 1600\]"):
        model(batch(model), context)


def test_table_names_are_spelled_as_recipes_write_them():
    from mtrun.spec import table_name

    assert table_name("objective[1]") == "[[objective]][1]"
    assert table_name("objective[0].inner") == "[[objective]][0].inner"
    assert table_name("trainer.optimizer") == "[trainer.optimizer]"
    assert table_name("audio_encoder") == "[audio_encoder]"
