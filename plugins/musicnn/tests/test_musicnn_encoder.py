"""Specification of the ``musicnn`` audio encoder: the port reproduces TensorFlow musicnn.

The reference outputs in ``fixtures/musicnn_tf_reference.npz`` were computed by the original
musicnn code (``musicnn.models`` with its shipped checkpoints, TensorFlow 2.21 through
``tf.compat.v1``) and librosa 0.11; ``make_fixture.py`` (run only in a throwaway TensorFlow
environment, see its docstring) wrote them.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

import mtrun_musicnn
from mtrun import MtrunError
from mtrun.testing import check_component, isolated_registry
from mtrun_musicnn.encoder import MusicnnEncoder
from mtrun_musicnn.network import TF_LAYERS, MusicnnNet, is_excluded, tf_to_torch
from mtrun_musicnn.tf_checkpoint import read_index
from mtrun_musicnn.weights import MSD_TAGS, MTT_TAGS, musicnn_folder

torch.set_num_threads(2)
SR = 16_000
FIXTURE = Path(__file__).parent / "fixtures" / "musicnn_tf_reference.npz"
MODELS = {"mtt": "MTT_musicnn", "msd": "MSD_musicnn"}


@cache
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


@cache
def encoder(weights: str = "MTT_musicnn", preset: str = "musicnn", frozen: bool = True) -> MusicnnEncoder:
    return MusicnnEncoder(MusicnnEncoder.Config(weights=weights, preset=preset, frozen=frozen))


def _tiny(**kw) -> MusicnnEncoder:
    return MusicnnEncoder(MusicnnEncoder.Config(weights="", preset="tiny", **kw))


def _waves(batch: int, seconds: float, seed: int = 0) -> torch.Tensor:
    return 0.1 * torch.randn(batch, int(seconds * SR), generator=torch.Generator().manual_seed(seed))


def _extractor_patches(mel_power: np.ndarray) -> np.ndarray:
    """musicnn.extractor.batch_data on a mel spectrogram: float16 log10(10000 x + 1), 187-frame patches."""
    rep = np.log10(10000 * mel_power.astype(np.float16) + 1).astype(np.float32)
    return np.stack([rep[s : s + 187] for s in range(0, rep.shape[0] - 186, 187)])


def _fixture_wave() -> torch.Tensor:
    return torch.from_numpy(reference()["wave_int16"].astype(np.float32) / 32768.0)[None]


def test_fixture_is_small_and_was_made_by_tensorflow():
    assert FIXTURE.stat().st_size < 1_000_000
    meta = json.loads(str(reference()["meta"]))
    assert meta["tensorflow"].startswith("2.") and meta["musicnn"] == "0.1.0"
    # musicnn's own extractor agreed with the graph run the fixture stores.
    assert all(v < 1e-5 for model in meta["extractor_vs_graph_relative_max_diff"].values() for v in model.values())


def test_musicnn_encoder_honours_the_contract():
    registry = isolated_registry(mtrun_musicnn)
    enc = check_component(registry, "audio_encoder", "musicnn", batch_size=2, input_seconds=1.0)
    assert (enc.sample_rate, enc.output_dim, enc.token_grid) == (16_000, 1506, None)
    assert enc.load_report.matched == 64
    tiny = check_component(registry, "audio_encoder", "musicnn", config=MusicnnEncoder.Config(weights="", preset="tiny", frozen=False), batch_size=2, input_seconds=3.5)
    assert tiny.output_dim == 2 * (2 * 8 + 3 * 4 + 3 * 8)


@pytest.mark.parametrize("model", ["mtt", "msd"])
@pytest.mark.parametrize("inputs", ["random", "wave"])
def test_port_matches_tensorflow_musicnn(model, inputs):
    """Same input patches as TensorFlow got: taggram within 1e-4; the pooled features (values up
    to ~110) within 1e-4 relative to max(1, |value|), i.e. float32 round-off of 7x38 and
    7x561-tap convolutions summed in a different order."""
    ref = reference()
    patches = ref["random_patches"] if inputs == "random" else _extractor_patches(ref["mel_power"])
    enc = encoder(MODELS[model])
    x = torch.from_numpy(patches)[None]  # [1, n, 187, 96]
    taggram = enc.taggram(x)[0].numpy()
    with torch.no_grad():
        out = enc.net(x[0])
    features = torch.cat([out.max_pool, out.mean_pool], dim=1).numpy()  # what forward's tokens hold
    expected = np.concatenate([ref[f"{model}_max_pool_{inputs}"], ref[f"{model}_mean_pool_{inputs}"]], axis=1)
    assert features.shape == expected.shape == (patches.shape[0], 1506)
    assert np.abs(taggram - ref[f"{model}_taggram_{inputs}"]).max() < 1e-4
    assert (np.abs(features - expected) / np.maximum(1.0, np.abs(expected))).max() < 1e-4
    assert np.abs(out.penultimate.numpy() - ref[f"{model}_penultimate_{inputs}"]).max() < 1e-4


def test_mel_front_end_matches_librosa():
    """librosa.feature.melspectrogram (n_fft 512, hop 256, 96 slaney mels, reflect padding):
    mel power within 1e-5 absolute (values up to ~3; observed ~3e-6) and 1e-4 after
    log10(10000 x + 1). After the float16 compression at most 0.5 % of the values land one
    float16 step (<= 2**-8 below 8) from the extractor's: rounding of near-ties."""
    ref = reference()
    enc = encoder()
    mel = enc.mel_power(_fixture_wave())[0].numpy()
    assert mel.shape == ref["mel_power"].shape == (438, 96)
    assert np.abs(mel - ref["mel_power"]).max() < 1e-5
    assert np.abs(np.log10(10000 * mel + 1) - np.log10(10000 * ref["mel_power"] + 1)).max() < 1e-4
    chunks = enc.preprocess(_fixture_wave())[0].numpy()
    expected = _extractor_patches(ref["mel_power"])
    assert chunks.shape == expected.shape == (2, 187, 96)  # 7 s: two 3 s chunks, the tail dropped
    off = np.abs(chunks - expected)
    assert off.max() <= 2.0**-8 and (off > 0).mean() < 0.005


@pytest.mark.parametrize("model", ["mtt", "msd"])
def test_waveform_to_taggram_and_features_match_tensorflow_end_to_end(model):
    """Our preprocess + network vs librosa + TensorFlow: the few float16 steps of the input
    move tag probabilities by < 1e-3 and features by < 2e-3 relative (observed 1e-5 / 5e-4)."""
    ref = reference()
    enc = encoder(MODELS[model])
    chunks = enc.preprocess(_fixture_wave())
    assert np.abs(enc.taggram(chunks)[0].numpy() - ref[f"{model}_taggram_wave"]).max() < 1e-3
    expected = np.concatenate([ref[f"{model}_max_pool_wave"], ref[f"{model}_mean_pool_wave"]], axis=1)
    out = enc(chunks)
    got = out.tokens[0, 1:].numpy()
    assert (np.abs(got - expected) / np.maximum(1.0, np.abs(expected))).max() < 2e-3


def _musicnn_labels() -> dict[str, list[str]]:
    source = (musicnn_folder() / "configuration.py").read_text()
    return {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and node.targets[0].id.endswith("_LABELS")
    }


def test_tag_names_are_the_musicnn_packages():
    labels = _musicnn_labels()
    assert list(MTT_TAGS) == labels["MTT_LABELS"] and list(MSD_TAGS) == labels["MSD_LABELS"]
    assert encoder("MTT_musicnn").tags == MTT_TAGS and encoder("MSD_musicnn").tags == MSD_TAGS
    assert _tiny().tags[:2] == ("tag_0", "tag_1")


@pytest.mark.parametrize("model", ["MTT_musicnn", "MSD_musicnn"])
def test_weight_mapping_covers_every_checkpoint_variable(model):
    names = set(read_index(musicnn_folder() / model))
    excluded = {n for n in names if is_excluded(n)}
    mapped = [tf_to_torch(n, torch.zeros(1, 1, 1, 1))[0] for n in sorted(names - excluded)]
    net_keys = {k for k in MusicnnNet().state_dict() if not k.endswith("num_batches_tracked")}
    assert len(mapped) == len(set(mapped)) == 64 and set(mapped) == net_keys  # nothing unmapped, nothing missing
    trainable = {n for n in names - excluded if not n.split("/")[-1].startswith("moving_")}
    # Exactly the optimizer's state is excluded: Adam's two slots per trainable variable and its beta powers.
    assert excluded == {f"{n}/{slot}" for n in trainable for slot in ("Adam", "Adam_1")} | {"beta1_power", "beta2_power"}
    assert {n.rpartition("/")[0] for n in names - excluded} == set(TF_LAYERS)
    report = encoder(model).load_report
    assert report.matched == 64 and set(report.ignored) == excluded
    assert set(report.kept) == {k for k in MusicnnNet().state_dict() if k.endswith("num_batches_tracked")}


def test_published_weights_are_loaded_not_initialised():
    mtt, msd, scratch = encoder("MTT_musicnn"), encoder("MSD_musicnn"), encoder("", frozen=True)
    assert scratch.load_report is None
    first = {k: v for k, v in mtt.net.state_dict().items() if "num_batches" not in k}
    assert not torch.equal(first["timbral.0.conv.weight"], msd.net.state_dict()["timbral.0.conv.weight"])
    assert not torch.equal(first["midend.0.conv.weight"], scratch.net.state_dict()["midend.0.conv.weight"])
    assert float(first["input_norm.running_var"]) != 1.0  # moving statistics came from the checkpoint


@pytest.mark.parametrize(("seconds", "chunks"), [(1.0, 1), (5.0, 1), (6.2, 2), (20.0, 6), (25.0, 6)])
def test_tokens_are_the_mean_then_one_feature_per_3_second_chunk(seconds, chunks):
    enc = _tiny()
    features = enc.preprocess(_waves(2, seconds))
    assert features.shape == (2, chunks, 187, 96)
    out = enc(features)
    assert out.tokens.shape == (2, 1 + chunks, enc.output_dim) and out.pooled.shape == (2, enc.output_dim)
    assert out.mask.shape == (2, 1 + chunks) and out.mask.dtype == torch.bool and out.mask.all()
    torch.testing.assert_close(out.tokens[:, 0], out.pooled)
    torch.testing.assert_close(out.pooled, out.tokens[:, 1:].mean(1))


def test_published_model_gives_1506_d_tokens_for_a_20_second_clip():
    out = encoder()(encoder().preprocess(_waves(1, 20.0)))
    assert out.tokens.shape == (1, 7, 1506) and torch.isfinite(out.tokens).all()


def test_long_clips_are_cut_at_max_seconds_and_short_ones_repeated():
    enc = _tiny(max_seconds=6.0)
    waves = _waves(1, 9.0)
    torch.testing.assert_close(enc.preprocess(waves), enc.preprocess(waves[:, : 6 * SR]))
    assert enc.preprocess(waves).shape[1] == 2
    short = enc.preprocess(_waves(1, 1.0))[0, 0]  # 63 frames, tiled to 187
    torch.testing.assert_close(short[63:126], short[:63])


def test_chunks_are_consecutive_stretches_of_one_spectrogram():
    enc = _tiny()
    waves = _waves(1, 12.5)
    whole = enc.preprocess(waves)[0]
    assert whole.shape[0] == 4
    # Chunk k starts at frame 187 k, i.e. sample 187 k * 256 of the clip.
    later = enc.preprocess(waves[:, 187 * 256 :])[0]
    off = (later[0, 2:] - whole[1, 2:]).abs()  # away from the clip's first frames (padding)
    assert off.max() <= 2.0**-8 and (off > 0).float().mean() < 0.005  # float16 near-ties at most


def test_loud_audio_stays_finite():
    """musicnn's float16 compression overflows above mel power ~6.55; we fall back to float32."""
    enc = _tiny()
    t = torch.arange(3 * SR) / SR
    loud = torch.sin(2 * torch.pi * 440 * t)[None] * 0.99
    features = enc.preprocess(loud)
    assert torch.isfinite(features).all() and features.max() > np.log10(10000 * 6.55)


def test_frozen_by_default_means_eval_mode_and_no_gradients():
    enc = _tiny(frozen=True).train()
    assert enc.training and not enc.net.training and not enc.net.dropout.training
    assert all(not p.requires_grad for p in enc.parameters())
    out = enc(enc.preprocess(_waves(2, 3.5)))
    assert not out.tokens.requires_grad
    assert MusicnnEncoder.Config().frozen is True


def test_a_frozen_network_ignores_bf16_autocast():
    """bf16 would move the features by ~10 %: a frozen musicnn always computes in float32."""
    enc = _tiny(frozen=True)
    waves = _waves(2, 3.5)
    exact = enc(enc.preprocess(waves))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = enc.preprocess(waves)
        out = enc(features)
    assert features.dtype == out.tokens.dtype == torch.float32
    assert torch.equal(out.tokens, exact.tokens)
    trainable = _tiny(frozen=False).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert trainable(features).tokens.dtype == torch.bfloat16  # follows the trainer's precision


def test_unfrozen_network_trains():
    enc = _tiny(frozen=False).train()
    assert enc.net.training
    (enc(enc.preprocess(_waves(2, 3.5))).pooled ** 2).mean().backward()
    assert enc.net.midend[0].conv.weight.grad is not None and enc.net.timbral[1].conv.weight.grad.abs().sum() > 0


def test_keep_index_is_refused():
    enc = _tiny()
    with pytest.raises(ValueError, match="no token grid"):
        enc(enc.preprocess(_waves(1, 3.5)), keep_index=torch.zeros(1, 1, dtype=torch.long))


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="weights='MSD_musicnn' is a preset='musicnn' network"):
        MusicnnEncoder.Config(weights="MSD_musicnn", preset="tiny")
    with pytest.raises(ValueError, match="must be one of musicnn, musicnn-big, tiny"):
        MusicnnEncoder.Config(preset="huge")
    with pytest.raises(MtrunError, match="neither MTT_musicnn, MSD_musicnn nor an existing checkpoint"):
        MusicnnEncoder(MusicnnEncoder.Config(weights="MTT_vggish"))


def test_a_checkpoint_of_another_size_is_reported(tmp_path):
    with pytest.raises(MtrunError, match=r"check the preset[\s\S]*midend.0.conv.weight: checkpoint \(64, 561, 7\) vs model \(512, 561, 7\)"):
        MusicnnEncoder(MusicnnEncoder.Config(weights=str(musicnn_folder() / "MTT_musicnn"), preset="musicnn-big"))
    with pytest.raises(MtrunError, match="unexpected in the checkpoint[\\s\\S]*1CNN/kernel"):
        MusicnnEncoder(MusicnnEncoder.Config(weights=str(musicnn_folder() / "MTT_vgg")))


def test_a_checkpoint_path_loads_like_the_published_name():
    by_path = MusicnnEncoder(MusicnnEncoder.Config(weights=str(musicnn_folder() / "MSD_musicnn") + "/.index"))
    assert by_path.tags == MSD_TAGS
    x = torch.from_numpy(reference()["random_patches"])[None]
    torch.testing.assert_close(by_path.taggram(x), encoder("MSD_musicnn").taggram(x), rtol=0, atol=0)


def test_without_the_musicnn_package_the_error_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "musicnn" else real(name, *a))
    with pytest.raises(MtrunError, match=r"pip install --no-deps musicnn==0.1.0"):
        MusicnnEncoder(MusicnnEncoder.Config())
