"""The projectors: contract, padding invariance, gradients, shapes, DuET-MC parameter count."""

from __future__ import annotations

import pytest
import torch

import mtrun_projectors
from mtrun import EncoderOutput
from mtrun.testing import check_component, config_converter, isolated_registry
from mtrun_projectors.simple import LinearProjector, MlpProjector
from mtrun_projectors.transformer import TransformerProjector


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def encoded(batch: int = 3, tokens: int = 6, width: int = 16, *, seed: int = 0) -> EncoderOutput:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, width, generator=gen)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 1:] = False
    return EncoderOutput(tokens=x, pooled=x.mean(1), mask=mask)


@pytest.mark.parametrize("name", ["transformer", "linear", "mlp"])
def test_projectors_honour_the_contract(name):
    registry = isolated_registry(mtrun_projectors)
    check_component(registry, "projector", name, in_features=24, batch_size=3)


def test_mlp_projector_with_batch_norm_and_several_hidden_layers_honours_the_contract():
    registry = isolated_registry(mtrun_projectors)
    config = MlpProjector.Config(hidden_sizes=(32, 8), dim=4, activation="gelu", batch_norm=True, dropout=0.1)
    proj = check_component(registry, "projector", "mlp", config=config, in_features=24, batch_size=3)
    assert proj.output_dim == 4


def test_transformer_projector_output_ignores_padded_token_values():
    torch.manual_seed(0)
    proj = TransformerProjector(TransformerProjector.Config(width=32, heads=2), in_features=16).eval()
    enc = encoded()
    changed = enc.tokens.clone()
    changed[~enc.mask] = 1e3 * torch.randn(int((~enc.mask).sum()), 16)
    with torch.no_grad():
        a = proj(enc)
        b = proj(EncoderOutput(tokens=changed, pooled=enc.pooled, mask=enc.mask))
        # Control: changing a real token does change the output, so the check can fail.
        real = enc.tokens.clone()
        real[0, 0] += 1.0
        c = proj(EncoderOutput(tokens=real, pooled=enc.pooled, mask=enc.mask))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(a[0], c[0], atol=1e-4)
    torch.testing.assert_close(a[1:], c[1:], rtol=0, atol=1e-6)


def test_transformer_projector_handles_items_with_no_real_tokens():
    proj = TransformerProjector(TransformerProjector.Config(width=32), in_features=16).eval()
    enc = encoded()
    enc.mask[2] = False
    with torch.no_grad():
        out = proj(enc)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "cls, config",
    [
        (TransformerProjector, TransformerProjector.Config(width=32, heads=4, layers=2, dim=8)),
        (LinearProjector, LinearProjector.Config(dim=8)),
        (MlpProjector, MlpProjector.Config(hidden_sizes=(32, 32), dim=8, batch_norm=True)),
    ],
)
def test_gradient_reaches_every_parameter(cls, config):
    torch.manual_seed(0)
    proj = cls(config, in_features=16).train()
    out = proj(encoded(batch=4))
    assert out.shape == (4, 8) and proj.output_dim == 8
    (out * torch.randn_like(out)).sum().backward()
    for name, p in proj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_transformer_projector_shapes_follow_width_and_dim():
    enc = encoded(batch=2, tokens=7, width=16)
    plain = TransformerProjector(TransformerProjector.Config(width=32, heads=2), in_features=16)
    assert plain.output_dim == 32 and plain(enc).shape == (2, 32)
    headed = TransformerProjector(TransformerProjector.Config(width=32, heads=2, dim=12), in_features=16)
    assert headed.output_dim == 12 and headed(enc).shape == (2, 12)
    assert len(headed.blocks) == 2 and headed.blocks[0].attn.num_heads == 2


def test_duet_mc_projectors_have_the_stated_parameter_count():
    """MERT-330M (1024) and CLIP ViT-B text (512) branches: the numbers the README states."""
    width, mlp = 256, 1024
    block = (width * 3 * width + 3 * width) + (width * width + width) + (width * mlp + mlp) + (mlp * width + width) + 4 * width
    audio = TransformerProjector(TransformerProjector.Config(), in_features=1024)
    text = TransformerProjector(TransformerProjector.Config(), in_features=512)
    expected_audio = (1024 * width + width) + width + 2 * block + 2 * width
    expected_text = (512 * width + width) + width + 2 * block + 2 * width
    assert n_params(audio) == expected_audio == 1_842_688
    assert n_params(text) == expected_text == 1_711_616
    assert n_params(audio) + n_params(text) == 3_554_304
    assert audio.output_dim == text.output_dim == 256


def test_mlp_projector_builds_slaps_text_arm():
    proj = MlpProjector(MlpProjector.Config(hidden_sizes=(512,), dim=512, batch_norm=True), in_features=768)
    kinds = [type(m).__name__ for m in proj.layers]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert n_params(proj) == 768 * 512 + 2 * 512 + 512 * 512 + 512


def test_configs_reject_bad_values_and_structure_from_recipe_values():
    with pytest.raises(ValueError, match="divide"):
        TransformerProjector.Config(width=30, heads=4)
    with pytest.raises(ValueError):
        MlpProjector.Config(hidden_sizes=(0,))
    with pytest.raises(ValueError):
        MlpProjector.Config(activation="swish")
    converter = config_converter()
    config = converter.structure({"hidden_sizes": [256, 128], "batch_norm": True}, MlpProjector.Config)
    assert config.hidden_sizes == (256, 128)


def test_input_standardisation_uses_real_tokens_only_and_running_stats_at_eval():
    from mtrun_projectors.transformer import MaskedStandardize

    norm = MaskedStandardize(16, momentum=1.0)  # momentum 1: the running stats are the last batch's
    enc = encoded(seed=1)
    offset = enc.tokens + 50.0  # a shared offset far larger than the differences between items
    padded = offset.clone()
    padded[~enc.mask] = 1e4  # padding must not move the statistics
    out = norm(padded, enc.mask)
    real = offset[enc.mask].double()
    expected = (real - real.mean(0)) / torch.sqrt(real.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(out[enc.mask].double(), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(norm.running_mean.double(), real.mean(0), rtol=0, atol=1e-4)
    torch.testing.assert_close(norm.running_var.double(), real.var(0, unbiased=True), rtol=1e-4, atol=1e-4)
    # Evaluation: a single item is standardised with the running statistics, not its own.
    norm.eval()
    one = offset[:1]
    torch.testing.assert_close(norm(one, None).double(), (one.double() - real.mean(0)) / torch.sqrt(norm.running_var.double() + 1e-5), rtol=0, atol=1e-4)


def test_transformer_projector_with_input_norm_ignores_padding_and_a_shared_offset():
    torch.manual_seed(0)
    proj = TransformerProjector(TransformerProjector.Config(width=32, heads=2, input_norm="batch"), in_features=16)
    enc = encoded()
    shifted = EncoderOutput(tokens=enc.tokens + 100.0, pooled=enc.pooled, mask=enc.mask)
    changed = shifted.tokens.clone()
    changed[~enc.mask] = 1e3
    with torch.no_grad():
        a = proj(shifted)
        b = proj(EncoderOutput(tokens=changed, pooled=enc.pooled, mask=enc.mask))
        c = proj(enc)  # training mode: batch statistics remove the offset
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-3)
    registry = isolated_registry(mtrun_projectors)
    check_component(registry, "projector", "transformer", config=TransformerProjector.Config(width=32, input_norm="batch"), in_features=24, batch_size=3)


def test_input_standardisation_keeps_its_running_stats_through_a_batch_without_real_tokens():
    from mtrun_projectors.transformer import MaskedStandardize

    norm = MaskedStandardize(16)
    enc = encoded(seed=2)
    norm(enc.tokens, enc.mask)
    mean, var = norm.running_mean.clone(), norm.running_var.clone()
    norm(enc.tokens, torch.zeros_like(enc.mask))
    assert torch.equal(norm.running_mean, mean) and torch.equal(norm.running_var, var)
    assert torch.isfinite(mean).all() and not torch.equal(mean, torch.zeros(16))
