"""Specification of the ``mert`` audio encoder: shapes, freezing, preprocessing, loading."""

from __future__ import annotations

import json

import pytest
import torch

import mtrun_mert
from mtrun import MtrunError
from mtrun.testing import check_component, isolated_registry
from mtrun_mert import MertEncoder
from mtrun_mert.encoder import preset_config

torch.set_num_threads(2)


def _tiny(**kw) -> MertEncoder:
    return MertEncoder(MertEncoder.Config(preset="tiny", **kw))


def _waves(batch: int = 4, seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(batch, int(seconds * 24_000), generator=gen) + 0.05


def _source_model():
    from transformers import HubertModel

    torch.manual_seed(1)
    model = HubertModel(preset_config("tiny")).eval()
    with torch.no_grad():  # non-trivial weight-norm magnitudes so g/v mix-ups would show
        model.encoder.pos_conv_embed.conv.parametrizations.weight.original0.mul_(1.7)
    return model


def test_mert_encoder_honours_the_contract():
    registry = isolated_registry(mtrun_mert)
    enc = check_component(registry, "audio_encoder", "mert", config=MertEncoder.Config(preset="tiny"), batch_size=4, input_seconds=0.5)
    assert enc.sample_rate == 24_000


def test_tokens_are_a_75_hz_sequence_of_backbone_width():
    enc = _tiny().eval()
    out = enc(enc.preprocess(_waves(seconds=2.0)), output_hidden_states=True)
    # conv front end: 320x downsampling, receptive field 400 -> (48000 - 400) // 320 + 1 frames
    assert out.tokens.shape == (4, 149, 64)
    assert out.pooled.shape == (4, 64) and torch.allclose(out.pooled, out.tokens.mean(1))
    assert out.mask.dtype == torch.bool and out.mask.all() and out.mask.shape == (4, 149)
    assert len(out.hidden_states) == 3  # embeddings + 2 layers


def test_presets_have_the_published_mert_v1_shapes():
    small, large = preset_config("95m"), preset_config("330m")
    assert (small.hidden_size, small.num_hidden_layers, small.do_stable_layer_norm) == (768, 12, False)
    assert (large.hidden_size, large.num_hidden_layers, large.do_stable_layer_norm) == (1024, 24, True)
    for cfg in (small, large):
        stride = 1
        for s in cfg.conv_stride:
            stride *= s
        assert 24_000 / stride == 75 and cfg.conv_pos_batch_norm is False


def test_aggregator_is_a_conv_across_layers():
    enc = _tiny().eval()
    with torch.no_grad():
        enc.aggregator.conv.weight.normal_()
        enc.aggregator.conv.bias.fill_(0.25)
        out = enc(enc.preprocess(_waves(batch=2)), output_hidden_states=True)
        stacked = torch.stack(out.hidden_states, 1)  # [B, L+1, T, D]
        b, l, t, d = stacked.shape
        as_conv = enc.aggregator.conv(stacked.permute(0, 2, 1, 3).reshape(b * t, l, d)).reshape(b, t, d)
    torch.testing.assert_close(out.tokens, as_conv)


def test_frozen_backbone_only_the_aggregator_gets_gradients_and_stays_in_eval():
    enc = _tiny()
    enc.train()
    assert not enc.backbone.training and enc.aggregator.training
    out = enc(enc.preprocess(_waves()))
    # Not tokens**2: at init the post-LN layers' outputs sum to zero over features, so that loss gives
    # the aggregator's bias an exactly zero gradient.
    ((out.tokens - 1.0) ** 2).mean().backward()
    with_grad = {n for n, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {"aggregator.conv.weight", "aggregator.conv.bias"}
    assert all(not p.requires_grad for p in enc.backbone.parameters())


def test_unfrozen_backbone_trains():
    enc = _tiny(frozen=False).train()
    assert enc.backbone.training
    (enc(enc.preprocess(_waves(batch=2))).tokens ** 2).mean().backward()
    assert enc.backbone.encoder.layers[-1].feed_forward.output_dense.weight.grad is not None


def test_preprocess_matches_wav2vec2_feature_extractor_normalisation():
    from transformers import Wav2Vec2FeatureExtractor

    waves = _waves(batch=3, seconds=0.5)
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=24_000, do_normalize=True, padding_value=0.0, return_attention_mask=True)
    expected = fe([w.numpy() for w in waves], sampling_rate=24_000, return_tensors="pt").input_values
    torch.testing.assert_close(_tiny().preprocess(waves), expected.float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(_tiny(normalize=False).preprocess(waves), waves)


def test_preprocess_is_differentiable_as_the_variance_formula():
    """A waveform that needs gradients (a learned augmenter before the encoder) gets those of
    (x - mean) / sqrt(var + 1e-7), not an autograd error from an in-place write."""
    waves = _waves(batch=2, seconds=0.25).double().requires_grad_()
    weights = torch.randn(2, waves.shape[-1], dtype=torch.float64)
    (_tiny().preprocess(waves.float()).double() * weights).sum().backward()
    got = waves.grad
    reference = waves.detach().clone().requires_grad_()
    centred = reference - reference.mean(-1, keepdim=True)
    ((centred / torch.sqrt(centred.var(-1, unbiased=False, keepdim=True) + 1e-7)) * weights).sum().backward()
    torch.testing.assert_close(got, reference.grad, atol=1e-3, rtol=1e-3)


def _assert_same_outputs(enc: MertEncoder, source) -> None:
    waves = _waves(batch=2)
    features = enc.preprocess(waves)
    with torch.no_grad():
        expected = source(input_values=features, output_hidden_states=True).hidden_states
    got = enc.eval()(features, output_hidden_states=True)
    assert len(got.hidden_states) == len(expected)
    for g, e in zip(got.hidden_states, expected):
        assert torch.equal(g, e)
    assert torch.equal(got.tokens, enc.aggregator(torch.stack(expected, 1)))


def test_save_pretrained_round_trip_matches_every_key(tmp_path):
    source = _source_model()
    source.save_pretrained(tmp_path)
    enc = _tiny(pretrained=str(tmp_path))
    report = enc.load_report
    assert report.matched == len(source.state_dict()) and not report.kept and not report.ignored
    _assert_same_outputs(enc, source)


def _write_mert_style_checkpoint(folder, source) -> dict:
    """What m-a-p/MERT-v1-* hold: custom config (model_type mert_model) and a .bin whose
    positional conv uses old torch's weight_g / weight_v names."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in source.state_dict().items():
        key = key.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v")
        state[key] = value.clone()
    assert "encoder.pos_conv_embed.conv.weight_g" in state
    torch.save(state, folder / "pytorch_model.bin")
    cfg = {k: v for k, v in source.config.to_dict().items() if k not in ("conv_pos_batch_norm", "transformers_version")}
    cfg.update(
        model_type="mert_model",
        architectures=["MERTModel"],
        auto_map={"AutoConfig": "configuration_MERT.MERTConfig", "AutoModel": "modeling_MERT.MERTModel"},
        feature_extractor_cqt=False,
        feature_extractor_cqt_bins=336,
        deepnorm=False,
        attention_relax=-1.0,
        sample_rate=24000,
        layerdrop=0.1,
        apply_spec_augment=True,
    )
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "padding_side": "right", "padding_value": 0, "return_attention_mask": True, "sampling_rate": 24000}))
    return state


def test_mert_style_state_dict_with_weight_norm_g_v_names_loads_exactly(tmp_path):
    source = _source_model()
    state = _write_mert_style_checkpoint(tmp_path / "mert", source)
    enc = _tiny(pretrained=str(tmp_path / "mert"))
    report = enc.load_report
    assert report.matched == len(state) and not report.kept and not report.ignored
    assert ("encoder.pos_conv_embed.conv.weight_g", "encoder.pos_conv_embed.conv.parametrizations.weight.original0") in report.renamed
    assert ("encoder.pos_conv_embed.conv.weight_v", "encoder.pos_conv_embed.conv.parametrizations.weight.original1") in report.renamed
    assert enc.backbone.config.layerdrop == 0.0 and enc.backbone.config.apply_spec_augment is False
    assert enc.normalize is True and enc.sample_rate == 24_000
    _assert_same_outputs(enc, source)


def test_prefixed_keys_are_stripped(tmp_path):
    source = _source_model()
    source.save_pretrained(tmp_path / "plain")
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "plain" / "model.safetensors"))
    (tmp_path / "prefixed").mkdir()
    save_file({"module.mert_model." + k: v.contiguous() for k, v in state.items()}, str(tmp_path / "prefixed" / "model.safetensors"))
    (tmp_path / "prefixed" / "config.json").write_text((tmp_path / "plain" / "config.json").read_text())
    _assert_same_outputs(_tiny(pretrained=str(tmp_path / "prefixed")), source)


def test_unmatched_keys_are_reported_by_name(tmp_path):
    source = _source_model()
    _write_mert_style_checkpoint(tmp_path / "mert", source)
    state = torch.load(tmp_path / "mert" / "pytorch_model.bin", weights_only=True)
    del state["encoder.layers.1.final_layer_norm.bias"]
    state["quantizer.codevectors"] = torch.zeros(3)
    torch.save(state, tmp_path / "mert" / "pytorch_model.bin")
    with pytest.raises(MtrunError) as err:
        _tiny(pretrained=str(tmp_path / "mert"))
    message = str(err.value)
    assert "missing from the checkpoint (1)" in message and "encoder.layers.1.final_layer_norm.bias" in message
    assert "unexpected in the checkpoint (1)" in message and "quantizer.codevectors" in message


def test_cqt_checkpoints_are_refused(tmp_path):
    _write_mert_style_checkpoint(tmp_path / "mert", _source_model())
    cfg = json.loads((tmp_path / "mert" / "config.json").read_text())
    (tmp_path / "mert" / "config.json").write_text(json.dumps({**cfg, "feature_extractor_cqt": True}))
    with pytest.raises(MtrunError, match="feature_extractor_cqt"):
        _tiny(pretrained=str(tmp_path / "mert"))


def test_unreachable_hub_name_asks_for_a_local_folder(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(MtrunError, match=r"pretrained='m-a-p/MERT-v1-330M'.*local folder"):
        _tiny(pretrained="m-a-p/MERT-v1-330M")


def test_a_damaged_config_json_is_a_clear_error(tmp_path):
    import pytest

    from mtrun import MtrunError

    _source_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 32,')  # cut short
    with pytest.raises(MtrunError, match="config.json is not a readable JSON file"):
        _tiny(pretrained=str(tmp_path))
