"""Audio decoding, checks, mono mixing, resampling, crops, padding and sliding windows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile
import torch

from mtrun.data.audio import AudioDecodeError, check_waveform, crop_or_pad, decode, load_waveform, open_span, open_stream, sliding_windows
from mtrun.interfaces import Sample
from audiofiles import refuse_reading, write_aac

FORMATS = [("wav", "WAV", "PCM_16", 1e-4), ("flac", "FLAC", "PCM_16", 1e-4), ("ogg", "OGG", "VORBIS", None), ("mp3", "MP3", "MPEG_LAYER_III", None)]


def tone(freq: float, rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.stack([0.5 * np.sin(2 * np.pi * freq * t + c) for c in range(channels)], axis=1).astype("float32")


def dominant_frequency(wave: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(wave * torch.hann_window(len(wave))).abs()
    return float(spectrum.argmax()) * rate / len(wave)


@pytest.mark.parametrize(("ext", "fmt", "subtype", "tolerance"), FORMATS)
def test_each_format_round_trips_with_its_rate_and_channels(tmp_path, ext, fmt, subtype, tolerance):
    if fmt not in soundfile.available_formats():
        pytest.skip(f"libsndfile here cannot write {fmt}")
    data = tone(440, 16000, 1.0, channels=2)
    path = tmp_path / f"a.{ext}"
    soundfile.write(path, data, 16000, format=fmt, subtype=subtype)
    wave, rate = decode(path)
    assert rate == 16000 and wave.dtype == torch.float32 and wave.shape[0] == 2
    if tolerance is not None:  # lossless formats give the samples back
        assert wave.shape[1] == 16000
        assert torch.allclose(wave, torch.from_numpy(data.T), atol=tolerance)
    else:  # lossy codecs pad a little and keep the pitch
        assert abs(wave.shape[1] - 16000) < 2500
        assert abs(dominant_frequency(wave[0], rate) - 440) < 5


def test_a_format_libsndfile_does_not_know_falls_back_to_ffmpeg(tmp_path):
    pytest.importorskip("av")
    path = tmp_path / "a.m4a"
    data = tone(440, 16000, 1.0)[:, 0]
    write_aac(path, data, 16000)
    wave, rate = decode(path)
    assert rate == 16000 and wave.shape[0] == 1
    assert abs(dominant_frequency(wave[0], rate) - 440) < 5


# The three ways to read a file, each of which must name a broken file's cause.
READERS = {"decode": decode, "open_span": open_span, "open_stream": lambda p: open_stream(p, block_frames=4000)}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize(
    ("make", "kind", "words"),
    [
        (lambda p: None, "missing", "missing"),
        (lambda p: p.write_bytes(b""), "zero-length", "zero-length"),
        (lambda p: p.mkdir(), "not-audio", "is a folder"),
        (lambda p: p.write_bytes(b"this is plain text, not audio " * 20), "not-audio", "not audio"),
    ],
)
def test_broken_files_raise_with_the_file_and_the_reason(tmp_path, make, kind, words, reader):
    """Each way in names the cause (checked only once a decoder failed: not on the hot path)."""
    read = READERS[reader]
    path = tmp_path / "bad.wav"
    make(path)
    with pytest.raises(AudioDecodeError, match="bad.wav") as info:
        read(path)
    assert info.value.kind == kind
    assert words in str(info.value)


@pytest.mark.parametrize("reader", sorted(READERS))
def test_an_unreadable_file_is_named_as_such_by_each_reader(tmp_path, monkeypatch, reader):
    """chmod 000; as root, where that stops no read, both opens of the path are refused as the
    kernel would refuse them for another user (Python's, and libsndfile's own in C)."""
    path = tmp_path / "locked.wav"
    soundfile.write(path, np.full(8000, 0.1, dtype="float32"), 16000)
    path.chmod(0)
    refuse_reading(monkeypatch, path)
    read = READERS[reader]
    with pytest.raises(AudioDecodeError, match=r"locked\.wav.*unreadable \(permission denied\)") as info:
        read(path)
    assert info.value.kind == "unreadable" and info.value.__suppress_context__


@pytest.mark.parametrize(("ext", "fmt", "subtype"), [("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_16"), ("mp3", "MP3", "MPEG_LAYER_III")])
def test_a_file_cut_in_half_is_reported_as_truncated(tmp_path, ext, fmt, subtype):
    full = tmp_path / f"full.{ext}"
    soundfile.write(full, tone(300, 8000, 2.0), 8000, format=fmt, subtype=subtype)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioDecodeError, match="cut") as info:
        decode(cut)
    assert info.value.kind == "truncated"


def test_silent_and_non_finite_waveforms_are_refused():
    check_waveform(torch.full((100,), 1e-4), "quiet but real")
    with pytest.raises(AudioDecodeError, match="silent") as info:
        check_waveform(torch.zeros(2, 100), "x")
    assert info.value.kind == "silent"
    wave = torch.ones(100)
    wave[5] = float("nan")
    with pytest.raises(AudioDecodeError, match="non-finite") as info:
        check_waveform(wave, "x")
    assert info.value.kind == "non-finite"


def test_load_waveform_mixes_channels_to_mono_and_names_the_sample(tmp_path):
    path = tmp_path / "stereo.wav"
    data = np.stack([np.full(800, 0.25), np.full(800, 0.75)], axis=1).astype("float32")
    soundfile.write(path, data, 8000, subtype="FLOAT")
    wave = load_waveform(Sample(id="st", audio=str(path)), 8000)
    assert wave.shape == (800,) and torch.allclose(wave, torch.full((800,), 0.5))
    from_tensor = load_waveform(Sample(id="t", audio=torch.from_numpy(data.T), sample_rate=8000), 8000)
    assert torch.equal(from_tensor, wave)
    with pytest.raises(AudioDecodeError, match=r"sample 'gone'.*missing"):
        load_waveform(Sample(id="gone", audio=str(tmp_path / "nope.wav")), 8000)


@pytest.mark.parametrize(("rate_in", "rate_out"), [(44100, 16000), (8000, 24000), (48000, 48000)])
def test_resampling_keeps_a_sines_frequency(tmp_path, rate_in, rate_out):
    path = tmp_path / "tone.flac"
    soundfile.write(path, tone(1000, rate_in, 1.0), rate_in, subtype="PCM_24")
    wave = load_waveform(Sample(id="t", audio=str(path)), rate_out)
    assert abs(len(wave) - rate_out) <= 1
    assert abs(dominant_frequency(wave, rate_out) - 1000) <= 2
    t = torch.arange(len(wave)) / rate_out
    expected = 0.5 * torch.sin(2 * math.pi * 1000 * t)
    assert torch.allclose(wave[500:-500], expected[500:-500], atol=5e-3)


def test_crop_policies_and_pad_policies():
    ramp = torch.arange(10.0)
    assert crop_or_pad(ramp, 4, "start").tolist() == [0, 1, 2, 3]
    assert crop_or_pad(ramp, 4, "center").tolist() == [3, 4, 5, 6]
    offsets = {int(crop_or_pad(ramp, 4, "random", torch.Generator().manual_seed(s))[0]) for s in range(60)}
    assert offsets == set(range(7))
    short = torch.tensor([1.0, 2.0, 3.0])
    assert crop_or_pad(short, 7, "random").tolist() == [1, 2, 3, 1, 2, 3, 1]  # repeat is the default
    assert crop_or_pad(short, 5, "start", pad="zero").tolist() == [1, 2, 3, 0, 0]
    assert crop_or_pad(torch.ones(2, 3), 5, "start").shape == (2, 5)
    with pytest.raises(ValueError, match="crop policy"):
        crop_or_pad(ramp, 4, "middle")


def test_sliding_windows_cover_the_file_end_aligned_and_are_deterministic():
    wave = torch.arange(25.0)
    windows = sliding_windows(wave, 10, 8)
    assert windows[:, 0].tolist() == [0, 8, 15]  # the last window ends exactly at the end
    assert windows[-1, -1] == 24
    covered = set().union(*(set(w.tolist()) for w in windows))
    assert covered == set(range(25))
    assert torch.equal(windows, sliding_windows(wave.clone(), 10, 8))
    assert sliding_windows(torch.arange(20.0), 10).shape == (2, 10)  # exact fit: no extra window
    short = sliding_windows(torch.tensor([1.0, 2.0, 3.0]), 7, 7)
    assert short.tolist() == [[1, 2, 3, 1, 2, 3, 1]]


def test_a_decode_error_is_led_by_its_sample_once_and_keeps_what_it_knew():
    error = AudioDecodeError("audio file 'a.flac': truncated", kind="truncated", path="a.flac", scope="part")
    named = error.of_sample("track-7")
    assert str(named) == "sample 'track-7': audio file 'a.flac': truncated"
    assert (named.kind, named.path, named.scope) == ("truncated", "a.flac", "part")
    assert str(named.of_sample("track-7")) == str(named)  # raised again higher up: not led twice
    assert AudioDecodeError("silent", kind="silent").of_sample("x", path="b.wav").path == "b.wav"
    assert named.of_sample("x", path="b.wav").path == "a.flac"  # its own path wins
