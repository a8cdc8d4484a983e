"""The co-attention fusion: shapes, a hand-written reference, padding in both streams, gradients."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import mtrun_mulap
import mulap_toys as toys
from mtrun import EncoderOutput
from mtrun.testing import check_component, config_converter, isolated_registry
from mtrun_mulap.coattention import CoAttention

SMALL = {
    "audio_width": 16,
    "audio_layers": 2,
    "audio_heads": 4,
    "co_width": 24,
    "co_heads": 4,
    "output_dim": 10,
    "text_heads": 4,
    "dropout": 0.0,
    "attn_dropout": 0.0,
}
AUDIO_FEATURES, TEXT_FEATURES = 12, 20


def fusion(**changes) -> CoAttention:
    torch.manual_seed(0)
    return CoAttention(
        CoAttention.Config(**{**SMALL, **changes}),
        audio_features=AUDIO_FEATURES,
        text_features=TEXT_FEATURES,
    ).eval()


def streams(seed=0, b=3, n_audio=6, n_text=9):
    gen = torch.Generator().manual_seed(seed)
    audio_mask = torch.ones(b, n_audio, dtype=torch.bool)
    audio_mask[0, 4:] = False
    audio_mask[2, 2:] = False
    text_mask = torch.ones(b, n_text, dtype=torch.bool)
    text_mask[1, 3:] = False
    text_mask[2, 6:] = False
    a = torch.randn(b, n_audio, AUDIO_FEATURES, generator=gen)
    t = torch.randn(b, n_text, TEXT_FEATURES, generator=gen)
    return EncoderOutput(a, a.mean(1), audio_mask), EncoderOutput(t, t[:, 0], text_mask)


def test_co_attention_honours_the_contract():
    registry = isolated_registry(mtrun_mulap, toys)
    config = config_converter(registry).structure(SMALL, CoAttention.Config)
    built = check_component(
        registry,
        "fusion",
        "co-attention",
        config=config,
        audio_features=AUDIO_FEATURES,
        text_features=TEXT_FEATURES,
    )
    assert (built.output_dim, built.audio_width, built.text_width) == (10, 16, TEXT_FEATURES)


def test_defaults_are_mulaps():
    cfg = CoAttention.Config()
    assert (
        cfg.audio_width,
        cfg.audio_layers,
        cfg.audio_heads,
        cfg.text_layers,
        cfg.co_layers,
        cfg.output_dim,
    ) == (256, 6, 8, 0, 2, 1024)


def test_streams_keep_their_widths_and_masks_and_pool_to_output_dim():
    audio, text = streams()
    fused_audio, fused_text = fusion()(audio, text)
    assert fused_audio.tokens.shape == (3, 6, 16) and fused_text.tokens.shape == (
        3,
        9,
        TEXT_FEATURES,
    )
    assert fused_audio.pooled.shape == (3, 10) and fused_text.pooled.shape == (3, 10)
    assert torch.equal(fused_audio.mask, audio.mask) and torch.equal(fused_text.mask, text.mask)
    assert fused_audio.pooled.abs().max() <= 1.0  # tanh pooler


def reference_co_layer(layer, a, a_mask, t, t_mask):
    """ViLBERT's connection layer written out in float64: explicit softmax with -inf on padding."""

    def lin(module, x):
        return x @ module.weight.double().T + module.bias.double()

    def norm(module, x):
        return F.layer_norm(
            x, x.shape[-1:], module.weight.double(), module.bias.double(), module.eps
        )

    def attend(q, k, v, key_mask, heads):
        b, nq, d = q.shape
        dh = d // heads
        q, k, v = (x.reshape(b, -1, heads, dh).transpose(1, 2) for x in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, nq, d)

    def ffn(module, x):
        return lin(module.fc2, F.gelu(lin(module.fc1, x)))

    sa, st = layer.audio, layer.text
    a_ctx = attend(lin(sa.query, a), lin(st.key, t), lin(st.value, t), t_mask, layer.heads)
    t_ctx = attend(lin(st.query, t), lin(sa.key, a), lin(sa.value, a), a_mask, layer.heads)
    a2 = norm(sa.norm1, a + lin(sa.out, a_ctx))
    t2 = norm(st.norm1, t + lin(st.out, t_ctx))
    return norm(sa.norm2, a2 + ffn(sa.mlp, a2)), norm(st.norm2, t2 + ffn(st.mlp, t2))


def test_a_co_attention_layer_matches_a_hand_written_reference():
    layer = fusion().co_blocks[0].double()
    gen = torch.Generator().manual_seed(3)
    a, t = (
        torch.randn(3, 6, 16, generator=gen, dtype=torch.float64),
        torch.randn(3, 9, TEXT_FEATURES, generator=gen, dtype=torch.float64),
    )
    audio, text = streams()
    got_a, got_t = layer(a, audio.mask, t, text.mask)
    want_a, want_t = reference_co_layer(layer, a, audio.mask, t, text.mask)
    torch.testing.assert_close(got_a, want_a, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_t, want_t, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("text_layers", [0, 1])
def test_padding_never_reaches_real_positions_in_either_stream(text_layers):
    fuse = fusion(text_layers=text_layers)
    audio, text = streams()
    base_a, base_t = fuse(audio, text)
    gen = torch.Generator().manual_seed(9)
    junk_a = torch.where(
        audio.mask[..., None], audio.tokens, 100 * torch.randn(audio.tokens.shape, generator=gen)
    )
    junk_t = torch.where(
        text.mask[..., None], text.tokens, 100 * torch.randn(text.tokens.shape, generator=gen)
    )
    new_a, new_t = fuse(
        EncoderOutput(junk_a, audio.pooled, audio.mask),
        EncoderOutput(junk_t, text.pooled, text.mask),
    )
    torch.testing.assert_close(
        new_a.tokens[audio.mask], base_a.tokens[audio.mask], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        new_t.tokens[text.mask], base_t.tokens[text.mask], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(new_a.pooled, base_a.pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_t.pooled, base_t.pooled, rtol=1e-5, atol=1e-5)
    # The check can fail: a real token changed does change the other stream.
    changed = text.tokens.clone()
    changed[0, 1] += 1.0
    moved_a, _ = fuse(audio, EncoderOutput(changed, text.pooled, text.mask))
    assert not torch.allclose(moved_a.tokens[0, 0], base_a.tokens[0, 0], atol=1e-4)


def test_each_stream_reads_the_other():
    fuse = fusion()
    audio, text = streams()
    _, base_t = fuse(audio, text)
    other_audio, _ = streams(seed=1)
    _, new_t = fuse(EncoderOutput(other_audio.tokens, other_audio.pooled, audio.mask), text)
    assert not torch.allclose(new_t.pooled, base_t.pooled, atol=1e-4)


def test_gradients_reach_every_parameter_and_both_encoders():
    fuse = fusion(text_layers=1).train()
    audio, text = streams()
    audio_tokens = audio.tokens.requires_grad_(True)
    text_tokens = text.tokens.requires_grad_(True)
    fused_a, fused_t = fuse(
        EncoderOutput(audio_tokens, audio.pooled, audio.mask),
        EncoderOutput(text_tokens, text.pooled, text.mask),
    )
    real_a, real_t = fused_a.tokens[audio.mask], fused_t.tokens[text.mask]  # what a loss may read
    (
        fused_a.pooled.square().sum() + fused_t.pooled.square().sum() + real_a.sum() + real_t.sum()
    ).backward()
    for name, parameter in fuse.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert (
        audio_tokens.grad[audio.mask].abs().sum() > 0
        and text_tokens.grad[text.mask].abs().sum() > 0
    )
    # Padded inputs reach nothing real, so they get no gradient.
    assert (
        audio_tokens.grad[~audio.mask].abs().max() < 1e-12
        and text_tokens.grad[~text.mask].abs().max() < 1e-12
    )


def test_bad_head_counts_are_refused():
    with pytest.raises(ValueError, match="audio_heads"):
        CoAttention.Config(audio_width=20, audio_heads=8)
    with pytest.raises(ValueError, match="co_heads"):
        CoAttention.Config(co_width=30, co_heads=8)
    with pytest.raises(ValueError, match="text encoder's width"):
        CoAttention(
            CoAttention.Config(**{**SMALL, "text_layers": 1, "text_heads": 3}),
            audio_features=4,
            text_features=20,
        )
