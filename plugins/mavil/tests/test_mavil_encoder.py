"""The mavil encoder: kaldi-exact features, time-major tokens, token dropping, checkpoint loading."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torchaudio

import mtrun_mavil
from mtrun import MtrunError, sincos_table
from mtrun.testing import check_component, isolated_registry
from mtrun_mavil.encoder import NORM_MEAN, NORM_STD, MavilEncoder
from mtrun_mavil.fbank import kaldi_fbank

TINY = MavilEncoder.Config(preset="tiny")


def _tiny(**kw) -> MavilEncoder:
    torch.manual_seed(0)
    return MavilEncoder(MavilEncoder.Config(preset="tiny", **kw)).eval()


def _clips(batch: int = 3, seconds: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    n = int(seconds * 16000)
    x = 0.1 * torch.randn(batch, n, generator=g)
    t = torch.arange(n) / 16000
    if batch > 1:
        x[1] = 0.5 * torch.sin(2 * torch.pi * 440 * t) + 0.05 * torch.sin(2 * torch.pi * 3000 * t)
    if batch > 2:
        x[2, : n // 2] = 0.0  # digital silence: exercises kaldi's epsilon floor
    return x


def _audiomae_reference(clip: torch.Tensor, target_length: int) -> torch.Tensor:
    """AudioMAE dataset.py's per-clip pipeline, written against torchaudio's own kaldi.fbank."""
    wav = clip[None] - clip.mean()
    fbank = torchaudio.compliance.kaldi.fbank(
        wav, htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10
    )
    p = target_length - fbank.shape[0]
    fbank = torch.nn.ZeroPad2d((0, 0, 0, p))(fbank) if p > 0 else fbank[:target_length]
    return (fbank - NORM_MEAN) / (NORM_STD * 2)


def test_mavil_honours_the_component_contract():
    registry = isolated_registry(mtrun_mavil)
    enc = check_component(registry, "audio_encoder", "mavil", config=TINY, input_seconds=1.0)
    assert enc.token_grid == (16, 8) and enc.sample_rate == 16000


def test_batched_fbank_matches_torchaudio_kaldi_per_clip():
    clips = _clips()
    ours = kaldi_fbank(clips)
    for i in range(len(clips)):
        ref = torchaudio.compliance.kaldi.fbank(
            clips[i : i + 1], htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10
        )
        assert ours[i].shape == ref.shape == (298, 128)
        assert (ours[i] - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("block_frames", "batch", "seconds"),
    [
        (0, 3, 3.0),  # one pass, as on a GPU
        (100, 3, 3.0),  # 298 frames a clip: each clip in 3 blocks, the last one short
        (700, 5, 3.0),  # two clips a block, the last block one clip
    ],
)
def test_fbank_blocks_do_not_change_the_numbers(block_frames, batch, seconds):
    clips = _clips(batch, seconds)
    clips[-1] += 0.3  # a DC offset: each frame's own mean must be removed inside its block
    ours = kaldi_fbank(clips, block_frames=block_frames)
    for i in range(batch):
        ref = torchaudio.compliance.kaldi.fbank(
            clips[i : i + 1], htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10
        )
        assert (ours[i] - ref).abs().max().item() < 1e-4
    # Blocks change nothing but the matmul's shape (a BLAS kernel may round differently).
    torch.testing.assert_close(ours, kaldi_fbank(clips, block_frames=0), atol=1e-6, rtol=0)


def test_fbank_is_float32_under_autocast_and_differentiable_where_asked():
    clips = _clips()
    plain = kaldi_fbank(clips)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(kaldi_fbank(clips), plain)
    wave = clips.clone().requires_grad_(True)
    out = kaldi_fbank(wave)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-6)
    out[0].sum().backward()
    assert torch.isfinite(wave.grad).all() and wave.grad[0].abs().sum() > 0 and wave.grad[1:].abs().sum() == 0
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        kaldi_fbank(clips[0])


@pytest.mark.parametrize("seconds", [1.3, 4.0])  # padded (130 < 256 frames) and cropped (398 > 256)
def test_preprocess_reproduces_audiomae_pipeline(seconds):
    enc = _tiny()
    clips = _clips(seconds=seconds)
    features = enc.preprocess(clips)
    assert features.shape == (3, 1, 256, 128)
    for i in range(3):
        assert (features[i, 0] - _audiomae_reference(clips[i], 256)).abs().max().item() < 1e-4


def test_preprocess_removes_the_waveform_mean():
    """A DC offset changes nothing but float round-off. Kaldi's lowest mel bins (~20 Hz, nearly
    emptied by DC removal and pre-emphasis) turn a 3e-8 waveform difference into ~1e-3, hence
    the loose maximum and the tight mean."""
    enc = _tiny()
    clips = _clips(2, 2.0)
    shifted = enc.preprocess(clips + 0.3)
    assert (shifted - enc.preprocess(clips)).abs().max().item() < 1e-2
    assert (shifted - enc.preprocess(clips)).abs().mean().item() < 5e-5


def test_frame_features_crop_like_preprocess_and_survive_pickling():
    import pickle

    enc = _tiny()
    wave = _clips(batch=2, seconds=3.5)[1]
    features = pickle.loads(pickle.dumps(enc.frame_features))  # the loader's worker gets a copy
    frames = features.frames(wave)
    n = features.num_frames(40_960)
    for k in (0, 33):
        expected = enc.preprocess(wave[None, 160 * k : 160 * k + 40_960])
        # Float rounding only; it shows most in the near-empty mel bins of this pure two-tone clip,
        # where the log magnifies it (about 1e-10 of the peak power there).
        torch.testing.assert_close(features.assemble(frames[None, k : k + n]), expected, atol=2e-3, rtol=0)


def test_sincos_table_matches_audiomae_formula():
    """Independent numpy transcription of get_2d_sincos_pos_embed_flexible (w first in meshgrid)."""
    dim, grid = 32, (64, 8)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid[1], dtype=np.float32), np.arange(grid[0], dtype=np.float32))
    ref = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
    assert np.abs(sincos_table(dim, grid).numpy() - ref).max() < 1e-6


def test_tokens_are_time_major():
    enc = _tiny()
    features = torch.zeros(1, 1, 256, 128)
    t, f = 5, 3
    features[0, 0, t * 16 : (t + 1) * 16, f * 16 : (f + 1) * 16] = 1.0
    with torch.no_grad():
        x = enc.embed_patches(features) - enc.pos_embed[:, 1:]
    changed = (x - enc.patch_embed.proj.bias).abs().sum(-1)[0] > 1e-5
    assert changed.nonzero().flatten().tolist() == [t * enc.token_grid[1] + f]


def test_dropping_happens_after_positions():
    """Attention is permutation-equivariant, so permuting keep_index permutes the outputs
    only if each kept token carries its own position (added before gathering)."""
    enc = _tiny()
    features = enc.preprocess(_clips(2, 2.6))
    keep = torch.tensor([[0, 5, 17, 40, 99, 127], [3, 8, 9, 60, 61, 100]])
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        a = enc(features, keep_index=keep)
        b = enc(features, keep_index=keep[:, perm])
        full = enc(features)
        same = enc(features, keep_index=torch.arange(128).expand(2, -1))
    assert a.tokens.shape == (2, 6, 64) and torch.equal(a.keep_index, keep)
    torch.testing.assert_close(b.tokens, a.tokens[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(same.tokens, full.tokens, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.pooled, a.tokens.mean(1))
    assert not torch.allclose(a.tokens, full.tokens[:, :6], atol=1e-3)


def test_gradients_and_frozen_mode():
    enc = _tiny().train()
    out = enc(enc.preprocess(_clips(4, 2.0)))
    out.pooled.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    assert not enc.pos_embed.requires_grad  # a buffer: fixed sin-cos
    frozen = _tiny(frozen=True)
    frozen.train()
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert not frozen(frozen.preprocess(_clips(1, 1.0))).pooled.requires_grad


# ------------------------------------------------------------------------------- loading


def _audiomae_style_file(enc: MavilEncoder, path, drop: str | None = None, extra: dict | None = None) -> dict:
    """What MAE pre-training saves: {"model": encoder + decoder (+ MAViL video) state, ...}."""
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    state["pos_embed"] = state["pos_embed"] + 0.25  # the file's table must win over the built one
    dim = enc.output_dim
    state.update(
        {
            "mask_token": torch.zeros(1, 1, 32),
            "decoder_embed.weight": torch.randn(32, dim),
            "decoder_blocks.0.attn.qkv.weight": torch.randn(96, 32),
            "decoder_pos_embed": torch.randn(1, 129, 32),
            "decoder_pred.weight": torch.randn(256, 32),
            "patch_embed_v.proj.weight": torch.randn(dim, 3, 2, 16, 16),
            "blocks_v.0.attn.qkv.weight": torch.randn(3 * dim, dim),
            "norm_v.weight": torch.ones(dim),
        }
    )
    state.update(extra or {})
    if drop:
        del state[drop]
    torch.save({"model": state, "epoch": 3, "args": "ignored"}, path)
    return state


def test_checkpoint_with_timm_keys_loads_and_reproduces_outputs(tmp_path):
    source = _tiny()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = _audiomae_style_file(source, tmp_path / "pretrained.pth")
    loaded = MavilEncoder(MavilEncoder.Config(preset="tiny", pretrained=str(tmp_path))).eval()
    report = loaded.load_report
    assert report.positions_from_file
    assert set(report.ignored) == {k for k in state if k.startswith(("decoder", "mask_token", "patch_embed_v", "blocks_v", "norm_v"))}
    assert torch.equal(loaded.pos_embed, state["pos_embed"])
    with torch.no_grad():
        source.pos_embed.copy_(state["pos_embed"])
        features = source.preprocess(_clips(2, 2.0))
        keep = torch.tensor([[1, 2, 3, 50], [0, 9, 70, 127]])
        for kw in ({}, {"keep_index": keep}):
            a, b = source(features, **kw), loaded(features, **kw)
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)


def test_safetensors_checkpoint_loads(tmp_path):
    from safetensors.torch import save_file

    source = _tiny()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "model.safetensors"))
    loaded = MavilEncoder(MavilEncoder.Config(preset="tiny", pretrained=str(tmp_path / "model.safetensors"))).eval()
    features = source.preprocess(_clips(1, 1.0))
    with torch.no_grad():
        assert torch.equal(source(features).tokens, loaded(features).tokens)


def test_missing_and_unexpected_keys_are_reported(tmp_path):
    source = _tiny()
    _audiomae_style_file(source, tmp_path / "a.pth", drop="blocks.1.mlp.fc2.weight")
    with pytest.raises(MtrunError, match=r"missing from the checkpoint \(1\):\s+blocks\.1\.mlp\.fc2\.weight"):
        MavilEncoder(MavilEncoder.Config(preset="tiny", pretrained=str(tmp_path / "a.pth")))
    _audiomae_style_file(source, tmp_path / "b.pth", extra={"blocks.7.norm1.weight": torch.ones(64)})
    with pytest.raises(MtrunError, match=r"unexpected in the checkpoint \(1\):\s+blocks\.7\.norm1\.weight"):
        MavilEncoder(MavilEncoder.Config(preset="tiny", pretrained=str(tmp_path / "b.pth")))
    with pytest.raises(MtrunError, match="shape mismatches"):
        MavilEncoder(MavilEncoder.Config(preset="tiny", target_length=128, pretrained=str(tmp_path / "a.pth").replace("a.pth", "b.pth")))


def test_unsafe_or_absent_checkpoints_are_refused(tmp_path):
    with pytest.raises(MtrunError, match="facebook/audiomae.*local"):
        MavilEncoder(MavilEncoder.Config(preset="tiny", pretrained="facebook/audiomae"))
    torch.save({"model": {"x": object()}}, tmp_path / "evil.pth")
    with pytest.raises(MtrunError, match="weights_only=True"):
        MavilEncoder(MavilEncoder.Config(preset="tiny", pretrained=str(tmp_path / "evil.pth")))
