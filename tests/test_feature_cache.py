"""Compute once: the feature cache gives exactly the features `preprocess` computes on the cropped
waveform, is rebuilt when what decides them changes, trains through the trainer, resumes exactly,
and is refused with a clear message where it cannot be used."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

pytest.importorskip("mtrun_mavil", reason="the feature cache's encoder here is MAViL's (./scripts/install.sh)")
pytest.importorskip("mtrun_hf_text")

from mtrun.data.audio import crop_offset, crop_or_pad, decode, resample, to_mono  # noqa: E402
import mtrun.data.feature_cache as feature_cache  # noqa: E402
from mtrun.data.feature_cache import FeatureCache, frame_features_for  # noqa: E402
from mtrun.data.loader import BatchLoader  # noqa: E402
from mtrun.data.waveform_cache import WaveformCache  # noqa: E402
from mtrun.errors import MtrunError  # noqa: E402
from mtrun.interfaces import FrameFeatures, Sample  # noqa: E402
from mtrun.run import LoaderConfig  # noqa: E402
from mtrun.train.rng import derive_seed  # noqa: E402
from mtrun_mavil.encoder import MavilEncoder  # noqa: E402

CLIP = 40_960  # 2.56 s at 16 kHz: the tiny preset's clip (254 fbank frames, padded to 256)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("MTRUN_CACHE", str(folder))
    return folder


def tiny(**kw) -> MavilEncoder:
    torch.manual_seed(0)
    return MavilEncoder(MavilEncoder.Config(preset="tiny", **kw)).eval()


def music(seconds: float, rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """Tones, noise and a DC offset (which kaldi's per-frame DC removal must cancel)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t) * (1 + np.sin(2 * np.pi * 0.7 * t)) + 0.02 * rng.standard_normal(len(t))
    return (wave + 0.05).astype("float32")


def tokenize(texts):
    ids = torch.tensor([[len(t)] for t in texts], dtype=torch.long).reshape(len(texts), 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ------------------------------------------------------------------ the contract, on MAViL


@pytest.mark.parametrize("target_length", [256, 240])  # padded (254 real frames) and cropped
def test_cropped_frames_equal_preprocess_of_the_waveform_cropped_on_the_hop(target_length):
    encoder = tiny(target_length=target_length)
    features = encoder.frame_features
    assert isinstance(features, FrameFeatures) and features.hop == 160
    wave = torch.from_numpy(music(4.0))
    frames = features.frames(wave)
    n = features.num_frames(CLIP)
    assert n == 254 and frames.shape == (1 + (len(wave) - 400) // 160, 128)
    last = frames.shape[0] - n
    for k in (0, 1, 57, last):
        expected = encoder.preprocess(wave[None, k * 160 : k * 160 + CLIP])
        got = features.assemble(frames[None, k : k + n])
        assert got.shape == expected.shape == (1, 1, target_length, 128)
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)
    if target_length == 256:  # AudioMAE's padding: two rows of the normalised log-fbank zero
        assert torch.equal(got[0, 0, 254:], expected[0, 0, 254:])


def test_a_clip_padded_to_length_is_its_own_whole_waveform():
    encoder = tiny()
    short = crop_or_pad(torch.from_numpy(music(1.5)), CLIP, "random", pad="zero")
    frames = encoder.frame_features.frames(short)[: encoder.frame_features.num_frames(CLIP)]
    torch.testing.assert_close(encoder.frame_features.assemble(frames[None]), encoder.preprocess(short[None]), atol=2e-4, rtol=0)


# ------------------------------------------------------------------ through the loader


def write_files(folder: Path) -> list[Sample]:
    """Long files at 16 kHz and 22.05 kHz (resampled), one shorter than a clip, one silent."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = [("a", 3.7, 16_000), ("b", 5.0, 22_050), ("c", 2.9, 16_000), ("short", 1.2, 16_000), ("d", 4.1, 16_000)]
    samples = []
    for i, (name, seconds, rate) in enumerate(specs):
        path = folder / f"{name}.wav"
        soundfile.write(path, music(seconds, rate, seed=i), rate)
        samples.append(Sample(id=name, audio=str(path), captions=[f"piece {name}"]))
    silent = folder / "silent.wav"
    soundfile.write(silent, np.zeros(48_000, dtype="float32"), 16_000)
    samples.append(Sample(id="silent", audio=str(silent), captions=["nothing"]))
    return samples


def whole_waveform(sample: Sample) -> torch.Tensor:
    """What the waveform cache stores: decoded, mono, resampled as a whole."""
    wave, rate = decode(sample.audio)
    return resample(to_mono(wave), rate, 16_000)


@pytest.mark.parametrize("phases", [1, 4])
def test_loader_batches_from_the_feature_cache_equal_preprocess_of_the_cropped_waveforms(tmp_path, cache_dir, phases):
    encoder = tiny()
    samples = write_files(tmp_path / "audio")
    config = LoaderConfig(clip_seconds=2.56, cache="features", feature_phases=phases, probe_items=0, pad="zero", max_bad_fraction=0.5)
    loader = BatchLoader(samples, config=config, sample_rate=16_000, tokenize=tokenize, batch_size=5, seed=3,
                         frame_features=encoder.frame_features, run_dir=tmp_path / "run")
    assert loader.feature_cache is not None and loader.waveform_cache is None
    entries = sorted((cache_dir / "features").rglob("*.npy"))
    assert len(entries) == 5 and len(list((cache_dir / "features").rglob("*.bad.json"))) == 1  # the silent file
    assert "silent" in loader.skipped

    good = [i for i, s in enumerate(samples) if s.id != "silent"]
    batch = loader.make_batch(good, epoch=2, batch_index=0)
    assert batch.waveforms.shape == (5, 0) and batch.clean_features.shape == (5, 1, 256, 128)
    offsets = []
    shifts = [p * 160 // phases for p in range(phases)]  # each phase's copy starts this much later
    for row, i in enumerate(good):
        wave = whole_waveform(samples[i])
        n_frames = min(1 + (len(wave) - shift - 400) // 160 for shift in shifts)  # every phase has them
        if len(wave) >= CLIP:  # cropped on the hop / phases grid, with the loader's own generator
            generator = torch.Generator().manual_seed(derive_seed(3, "crop", 2, i))
            k, p = divmod(crop_offset(n_frames * phases, 254 * phases, "random", generator), phases)
            start = k * 160 + shifts[p]
            clip = wave[start : start + CLIP]
            offsets.append(start)
        else:  # fewer frames than a clip: padded as a waveform, as without the cache
            clip = crop_or_pad(wave, CLIP, "random", pad="zero")
        expected = encoder.preprocess(clip[None])
        torch.testing.assert_close(batch.clean_features[row : row + 1], expected, atol=2e-4, rtol=0, msg=samples[i].id)
    assert any(offsets), "every crop started at frame 0: the random offsets were not exercised"
    if phases > 1:
        assert any(o % 160 for o in offsets), "no crop started between frames: the phases were not exercised"
        # Over many epochs the loader itself reads every phase, and only those.
        read = []
        original = loader.feature_cache.read_crop
        loader.feature_cache.read_crop = lambda entry, position, count: read.append(position % phases) or original(entry, position, count)
        for epoch in range(40):
            loader.make_batch(good, epoch=epoch, batch_index=0)
        assert set(read) == set(range(phases)), read


def test_the_feature_cache_is_keyed_by_file_rate_and_feature_settings(tmp_path, cache_dir, monkeypatch):
    encoder = tiny()
    path = tmp_path / "x.wav"
    soundfile.write(path, music(3.0), 16_000)
    cache = FeatureCache(16_000, encoder.frame_features)
    report = cache.build([str(path)])
    assert report.built == 1 and cache.build([str(path)]).present == 1  # built once
    key = cache.key(str(path))
    entry = cache.lookup(str(path))
    expected = encoder.frame_features.frames(whole_waveform(Sample(id="x", audio=str(path))))
    torch.testing.assert_close(torch.from_numpy(entry.read(0, entry.length)), expected, atol=1e-5, rtol=0)
    # Not the waveform cache's key; another rate, other feature settings, a changed file: new keys.
    assert key != WaveformCache(16_000).key(str(path))
    assert key != FeatureCache(22_050, encoder.frame_features).key(str(path))
    changed = tiny().frame_features
    changed.settings = {**changed.settings, "version": changed.settings["version"] + 1}
    assert key != FeatureCache(16_000, changed).key(str(path))
    assert FeatureCache(16_000, tiny(target_length=128).frame_features).key(str(path)) == key  # padding is not a frame's value
    # Four phases: another key, and each phase's frames are those of the file started 40 samples later.
    phased = FeatureCache(16_000, encoder.frame_features, phases=4)
    assert phased.key(str(path)) != key and phased.shifts == [0, 40, 80, 120]
    phased.build([str(path)])
    entry4 = phased.lookup(str(path))
    n = phased.frames_per_phase(entry4)
    wave = whole_waveform(Sample(id="x", audio=str(path)))
    assert entry4.length == 4 * n and n == 1 + (len(wave) - 120 - 400) // 160
    for p, shift in enumerate(phased.shifts):
        torch.testing.assert_close(
            torch.from_numpy(phased.read_crop(entry4, 7 * 4 + p, 5)), encoder.frame_features.frames(wave[shift:])[7:12], atol=1e-5, rtol=0
        )
    with pytest.raises(MtrunError, match="feature_phases = 161 must be between 1 and the features' hop"):
        FeatureCache(16_000, encoder.frame_features, phases=161)
    version = feature_cache.FORMAT_VERSION
    monkeypatch.setattr(feature_cache, "FORMAT_VERSION", version + 1)
    assert FeatureCache(16_000, encoder.frame_features).key(str(path)) != key
    monkeypatch.setattr(feature_cache, "FORMAT_VERSION", version)
    soundfile.write(path, music(3.0, seed=5), 16_000)
    os.utime(path, ns=(1, 10**18))
    fresh = FeatureCache(16_000, encoder.frame_features)
    assert fresh.key(str(path)) != key and fresh.lookup(str(path)) is None
    assert fresh.build([str(path)]).built == 1
    rebuilt = fresh.lookup(str(path))
    expected = encoder.frame_features.frames(whole_waveform(Sample(id="x", audio=str(path))))
    assert not torch.allclose(torch.from_numpy(rebuilt.read(0, rebuilt.length)), torch.from_numpy(entry.read(0, entry.length)))
    torch.testing.assert_close(torch.from_numpy(rebuilt.read(0, rebuilt.length)), expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ refusals


class Gain(torch.nn.Module):
    stage = "waveform"


def test_an_encoder_without_frame_features_is_refused_naming_the_recipe_key():
    class RawEncoder:
        sample_rate = 16_000

    expected = r'\[loader\]\.cache = "features" needs an audio encoder .* \[audio_encoder\] \(raw\) does not\. Set \[loader\]\.cache = "waveforms"'
    with pytest.raises(MtrunError, match=expected):
        frame_features_for(RawEncoder(), encoder_label="[audio_encoder] (raw)")
    with pytest.raises(MtrunError, match=r"Gain acts on the waveform first; set \[loader\]\.cache = \"waveforms\""):
        frame_features_for(tiny(), [Gain()])
    with pytest.raises(MtrunError, match=r'\[loader\]\.cache = "features" needs the audio encoder\'s frame_features'):
        BatchLoader([], config=LoaderConfig(cache="features"), sample_rate=16_000, tokenize=tokenize, batch_size=1)


# ------------------------------------------------------------------ through the trainer

RECIPE = """
[run]
name = "{name}"
output_dir = "{out}"
seed = 5
resume = "{resume}"

[loader]
clip_seconds = 2.56
num_workers = 0
probe_items = 0
cache = "{cache}"
crop = "{crop}"

[data]
type = "manifest"
path = "{manifest}"

[audio_encoder]
type = "mavil"
preset = "tiny"

[text_encoder]
type = "hf-text"
preset = "tiny-roberta"
pretrained = ""

[audio_projector]
type = "mlp"
hidden_sizes = [32]
dim = 16

[text_projector]
type = "mlp"
hidden_sizes = [32]
dim = 16

[[objective]]
type = "infonce"

[[augmenter]]
type = "specaugment"
time_mask_width = 16
freq_mask_width = 16

[trainer]
batch_size = 4
max_steps = 4
log_every = 1
checkpoint_every = 2
val_split = "none"
"""


def manifest(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(8):
        seconds = 1.8 if i == 6 else 3.0 + 0.4 * i  # one shorter than a clip
        soundfile.write(folder / f"m{i}.flac", music(seconds, seed=i), 16_000)
        rows.append({"id": f"m{i}", "audio": f"m{i}.flac", "captions": [f"piece number {i}"], "split": "train"})
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(tmp_path: Path, name: str, *, cache: str = "features", crop: str = "random", resume: str = "") -> tuple[dict, Path]:
    from mtrun.assemble import assemble
    from mtrun.runner import prepare

    data = tmp_path / "data" / "manifest.jsonl"
    if not data.exists():
        manifest(data.parent)
    recipe = tmp_path / f"{name}.toml"
    recipe.write_text(RECIPE.format(name=name, out=tmp_path / "runs", resume=resume, cache=cache, crop=crop, manifest=data))
    resolved, run = prepare(recipe)
    torch.manual_seed(run.config.seed)
    built = assemble(resolved, run)
    return built.trainer.fit(), run.dir


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def test_training_on_cached_features_matches_the_waveform_path_and_resumes_exactly(tmp_path, cache_dir):
    # crop = "start": both paths cut the same samples, so the steps must agree.
    _, waves = train(tmp_path, "waves", cache="waveforms", crop="start")
    _, feats = train(tmp_path, "feats", crop="start")
    assert len(list((cache_dir / "features").rglob("*.npy"))) == 8
    assert len(losses(feats)) == 4
    np.testing.assert_allclose(losses(feats), losses(waves), rtol=1e-4)

    # Random crops in frame space: killed after step 2 and resumed, the run ends where an
    # uninterrupted one does, bit for bit.
    _, whole = train(tmp_path, "whole")
    _, resumed = train(tmp_path, "resumed", resume=str(whole / "checkpoints" / "step-000002"))
    assert losses(resumed) == losses(whole)[2:]
    reference, final = weights(whole, 4), weights(resumed, 4)
    assert reference.keys() == final.keys()
    for key in reference:
        assert torch.equal(reference[key], final[key]), key


def test_the_trainer_uses_the_feature_cache_only_when_asked_and_refuses_it_before_a_waveform_augmenter():
    from mtrun.errors import TrainingError
    from mtrun.train.trainer import loader_frame_features

    encoder = tiny()
    gained = type("System", (), {"audio_encoder": encoder, "augmenters": [Gain()]})()
    with pytest.raises(TrainingError, match=r"Gain acts on the waveform first"):
        loader_frame_features(gained, LoaderConfig(cache="features"))
    assert loader_frame_features(gained, LoaderConfig(cache="waveforms")) is None
    clean = type("System", (), {"audio_encoder": encoder, "augmenters": []})()
    assert loader_frame_features(clean, LoaderConfig(cache="features")) is encoder.frame_features


def test_a_feature_phases_value_beyond_the_hop_is_refused_before_any_file_is_read(tmp_path, cache_dir):
    samples = [Sample(id="x", audio=str(tmp_path / "never-read.wav"), captions=["x"])]  # does not exist
    config = LoaderConfig(clip_seconds=2.56, cache="features", feature_phases=161, probe_items=1)
    with pytest.raises(MtrunError, match=r"\[loader\].feature_phases = 161 must be between 1 and the features' hop \(160 samples\)"):
        BatchLoader(samples, config=config, sample_rate=16_000, tokenize=tokenize, batch_size=1, seed=0,
                    frame_features=tiny().frame_features, run_dir=tmp_path / "run")
