"""Specification of the ``htsat`` audio encoder: features, shapes, freezing, loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mtrun_htsat
from mtrun import MtrunError
from mtrun.testing import check_component, isolated_registry
from mtrun_htsat import HtsatEncoder
from mtrun_htsat.encoder import preset_config

torch.set_num_threads(2)
SR = 48_000


def _tiny(**kw) -> HtsatEncoder:
    return HtsatEncoder(HtsatEncoder.Config(preset="tiny", **kw))


def _waves(batch: int = 2, seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    return 0.1 * torch.randn(batch, int(seconds * SR), generator=torch.Generator().manual_seed(seed))


def _source_model():
    from transformers import ClapAudioModel

    torch.manual_seed(3)
    model = ClapAudioModel(preset_config("tiny")).eval()
    with torch.no_grad():  # non-default BatchNorm statistics, so a missed bn0 mapping shows
        model.audio_encoder.batch_norm.running_mean.normal_(-20, 5)
        model.audio_encoder.batch_norm.running_var.uniform_(50, 150)
    return model


def test_htsat_encoder_honours_the_contract():
    registry = isolated_registry(mtrun_htsat)
    enc = check_component(registry, "audio_encoder", "htsat", config=HtsatEncoder.Config(preset="tiny"), batch_size=2, input_seconds=0.5)
    assert enc.sample_rate == 48_000


@pytest.mark.parametrize("seconds", [10.0, 2.3])
def test_preprocess_matches_clap_feature_extractor(seconds):
    """Reference: transformers' numpy ClapFeatureExtractor (float64) with the
    laion/clap-htsat-unfused settings, "rand_trunc" truncation and "repeatpad" padding.

    Tolerance 1e-3 dB: float32 STFT/matmul rounding is ~1e-6 relative, i.e. ~1e-5 dB after
    10*log10; a wrong window, padding mode, mel scale or filter norm moves values by > 0.1 dB.
    """
    from transformers import ClapFeatureExtractor

    fe = ClapFeatureExtractor(feature_size=64, sampling_rate=SR, hop_length=480, max_length_s=10, fft_window_size=1024, frequency_min=50, frequency_max=14_000, truncation="rand_trunc", padding="repeatpad")
    waves = _waves(seconds=seconds)
    expected = fe([w.numpy().astype(np.float64) for w in waves], sampling_rate=SR, return_tensors="pt").input_features
    got = _tiny().eval().preprocess(waves)
    assert got.shape == expected.shape == (2, 1, 1001, 64)
    assert (got.double() - expected.double()).abs().max() < 1e-3


def test_long_clips_are_cropped_to_ten_seconds_from_the_start_in_eval():
    enc = _tiny().eval()
    waves = _waves(batch=1, seconds=10.5)
    torch.testing.assert_close(enc.preprocess(waves), enc.preprocess(waves[:, : 10 * SR]))


def test_tokens_are_time_major_final_swin_tokens():
    enc = _tiny().eval()
    out = enc(enc.preprocess(_waves()), output_hidden_states=True)
    assert enc.output_dim == 64
    assert out.tokens.shape == (2, 64, 64)  # 32 time steps x 2 frequency groups
    assert out.mask.all() and out.mask.dtype == torch.bool
    torch.testing.assert_close(out.pooled, out.tokens.mean(1), atol=1e-5, rtol=1e-5)
    assert out.hidden_states is not None and all(h.ndim == 3 for h in out.hidden_states)


def test_presets_have_the_published_sizes():
    small, base = preset_config("htsat-tiny"), preset_config("htsat-base")
    assert (small.patch_embeds_hidden_size, small.depths, small.hidden_size) == (96, [2, 2, 6, 2], 768)
    assert (base.patch_embeds_hidden_size, base.depths, base.hidden_size) == (128, [2, 2, 12, 2], 1024)
    assert all(c.spec_size == 256 and c.num_mel_bins == 64 and not c.enable_fusion for c in (small, base))


def test_trainable_by_default_and_frozen_on_request():
    enc = _tiny().train()
    (enc(enc.preprocess(_waves())).tokens ** 2).mean().backward()
    assert enc.model.audio_encoder.patch_embed.proj.weight.grad is not None
    frozen = _tiny(frozen=True).train()
    assert not frozen.model.training and all(not p.requires_grad for p in frozen.parameters())
    assert not frozen(frozen.preprocess(_waves())).tokens.requires_grad


def _assert_same_outputs(enc: HtsatEncoder, source) -> None:
    features = enc.preprocess(_waves())
    with torch.no_grad():
        expected = source(input_features=features)
    got = enc.eval()(features)
    assert torch.equal(got.pooled, expected.pooler_output)
    last = expected.last_hidden_state
    assert torch.equal(got.tokens, last.permute(0, 3, 2, 1).reshape(2, -1, last.shape[1]))


def test_save_pretrained_round_trip_matches_every_key(tmp_path):
    source = _source_model()
    source.save_pretrained(tmp_path)
    enc = _tiny(pretrained=str(tmp_path))
    assert enc.load_report.matched == len(source.state_dict()) and not enc.load_report.ignored
    _assert_same_outputs(enc, source)


def test_clap_model_folder_loads_the_audio_tower_and_ignores_the_rest(tmp_path):
    from transformers import ClapConfig, ClapModel

    config = ClapConfig(
        audio_config=preset_config("tiny").to_dict(),
        text_config={"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 40},
        projection_dim=8,
    )
    full = ClapModel(config).eval()
    full.save_pretrained(tmp_path)
    enc = _tiny(pretrained=str(tmp_path))
    assert enc.load_report.matched == len(full.audio_model.state_dict())
    assert any(k.startswith("text_model.") for k in enc.load_report.ignored)
    assert any(k.startswith("audio_projection.") for k in enc.load_report.ignored)
    _assert_same_outputs(enc, full.audio_model)


def _to_laion(state: dict) -> dict:
    """The inverse of the documented mapping, written out independently of the loader."""
    out = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        k = key.replace("audio_encoder.", "audio_branch.", 1).replace("batch_norm.", "bn0.")
        k = k.replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
        k = k.replace("attention.output.dense", "attn.proj").replace("intermediate.dense", "mlp.fc1")
        k = k.replace(".output.dense", ".mlp.fc2")
        for part in ("query", "key", "value"):
            tag = f"attention.self.{part}."
            if tag in k:
                base, suffix = k.split(tag)
                pending.setdefault(f"{base}attn.qkv.{suffix}", {})[part] = value
                break
        else:
            out["module." + k.replace("attention.self.", "attn.")] = value.clone()
    for k, parts in pending.items():
        out["module." + k] = torch.cat([parts["query"], parts["key"], parts["value"]], 0).clone()
    # Things a real LAION checkpoint also holds that are not the audio tower.
    out["module.audio_branch.spectrogram_extractor.stft.conv_real.weight"] = torch.zeros(513, 1, 1024)
    out["module.audio_branch.logmel_extractor.melW"] = torch.zeros(513, 64)
    out["module.audio_branch.layers.0.blocks.0.attn_mask"] = torch.zeros(4, 64, 64)
    out["module.audio_branch.head.weight"] = torch.zeros(527, 64)
    out["module.text_branch.embeddings.word_embeddings.weight"] = torch.zeros(5, 4)
    out["module.audio_projection.0.weight"] = torch.zeros(8, 64)
    out["module.logit_scale_a"] = torch.zeros(())
    return out


def test_laion_clap_checkpoint_loads_through_the_key_mapping(tmp_path):
    source = _source_model()
    laion = _to_laion(source.state_dict())
    assert "module.audio_branch.layers.0.blocks.0.attn.qkv.weight" in laion
    assert "module.audio_branch.bn0.running_mean" in laion
    torch.save({"epoch": 45, "state_dict": laion}, tmp_path / "630k-audioset-best.pt")
    enc = _tiny(pretrained=str(tmp_path / "630k-audioset-best.pt"))
    assert enc.load_report.matched == len(source.state_dict())
    assert len(enc.load_report.ignored) == 7
    _assert_same_outputs(enc, source)


def test_laion_checkpoint_of_another_size_reports_the_mismatch(tmp_path):
    laion = _to_laion(_source_model().state_dict())
    del laion["module.audio_branch.norm.bias"]
    laion["module.audio_branch.mystery.weight"] = torch.zeros(2)
    torch.save({"state_dict": laion}, tmp_path / "x.pt")
    with pytest.raises(MtrunError) as err:
        _tiny(pretrained=str(tmp_path / "x.pt"))
    assert "audio_encoder.norm.bias" in str(err.value) and "audio_encoder.mystery.weight" in str(err.value)


def test_unreachable_hub_name_asks_for_a_local_folder(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(MtrunError, match=r"pretrained='laion/larger_clap_music'.*local folder"):
        _tiny(pretrained="laion/larger_clap_music")


def _to_htsat_classifier(state: dict) -> dict:
    """An HTS-AT AudioSet classifier checkpoint's tensors: HTS-AT's network under ``sed_model.``
    (no DDP prefix, no text side), with its front end and 527-class head."""
    laion = _to_laion(state)
    out = {
        "sed_model." + k.removeprefix("module.audio_branch."): v
        for k, v in laion.items()
        if k.startswith("module.audio_branch.")
    }
    out["sed_model.tscam_conv.weight"] = torch.zeros(527, 64, 2, 3)
    out["sed_model.head.bias"] = torch.zeros(527)
    return out


def test_htsat_audioset_classifier_checkpoint_loads_with_its_own_front_end(tmp_path):
    source = _source_model()
    classifier = _to_htsat_classifier(source.state_dict())
    assert "sed_model.layers.0.blocks.0.attn.qkv.weight" in classifier
    # A PyTorch Lightning file: the tensors under state_dict, training state beside them.
    torch.save({"epoch": 30, "global_step": 12345, "state_dict": classifier}, tmp_path / "HTSAT_AudioSet_Saved_1.ckpt")
    enc = _tiny(pretrained=str(tmp_path / "HTSAT_AudioSet_Saved_1.ckpt"), front_end="audioset")
    assert enc.sample_rate == 32_000
    assert enc.load_report.matched == len(source.state_dict())
    assert "sed_model.head.bias" in enc.load_report.ignored and "sed_model.tscam_conv.weight" in enc.load_report.ignored
    _assert_same_outputs(enc, source)


def test_checkpoints_are_refused_with_the_other_kinds_front_end(tmp_path):
    source = _source_model()
    torch.save({"state_dict": _to_htsat_classifier(source.state_dict())}, tmp_path / "classifier.ckpt")
    with pytest.raises(MtrunError, match=r"HTS-AT AudioSet classifier.*32 kHz.*audio_encoder\.front_end = 'audioset'"):
        _tiny(pretrained=str(tmp_path / "classifier.ckpt"))
    torch.save({"state_dict": _to_laion(source.state_dict())}, tmp_path / "clap.pt")
    with pytest.raises(MtrunError, match=r"LAION-CLAP audio tower.*48 kHz.*audio_encoder\.front_end = 'clap'"):
        _tiny(pretrained=str(tmp_path / "clap.pt"), front_end="audioset")


def test_audioset_front_end_matches_the_feature_extractor_at_htsat_settings():
    """HTS-AT's AudioSet front end (torchlibrosa: power STFT, slaney mels, 10*log10 with
    amin 1e-10) is CLAP's computation at 32 kHz and hop 320; the numpy extractor at those
    settings is the independent reference."""
    from transformers import ClapFeatureExtractor

    sr = 32_000
    fe = ClapFeatureExtractor(feature_size=64, sampling_rate=sr, hop_length=320, max_length_s=10, fft_window_size=1024, frequency_min=50, frequency_max=14_000, truncation="rand_trunc", padding="repeatpad")
    waves = 0.1 * torch.randn(2, int(3.7 * sr), generator=torch.Generator().manual_seed(5))
    expected = fe([w.numpy().astype(np.float64) for w in waves], sampling_rate=sr, return_tensors="pt").input_features
    got = _tiny(front_end="audioset").eval().preprocess(waves)
    assert got.shape == expected.shape == (2, 1, 1001, 64)
    assert (got.double() - expected.double()).abs().max() < 1e-3
