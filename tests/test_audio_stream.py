"""Streaming audio for inference: block decoding, block resampling, windows of any-length files.

The streamed path must give what the whole-file path (``load_waveform`` + ``sliding_windows``,
the evaluation's) gives, while holding only a block and a window.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

from mtrun.data.audio import AudioDecodeError, StreamResampler, as_waveform, load_waveform, open_stream, resample, sliding_windows, stream_windows
from mtrun.interfaces import Sample
from audiofiles import write_aac


@pytest.mark.parametrize(("orig", "new"), [(44100, 16000), (48000, 24000), (22050, 48000), (16000, 8000), (8000, 8000)])
@pytest.mark.parametrize("block", [311, 100_000])  # shorter and longer than the sinc kernel
def test_block_resampling_equals_resampling_the_whole_signal(orig, new, block):
    x = torch.randn(20_011, generator=torch.Generator().manual_seed(orig + block)) * 0.3
    whole = resample(x, orig, new)
    stream = StreamResampler(orig, new)
    parts = [stream.push(x[i : i + block]) for i in range(0, len(x), block)] + [stream.flush()]
    streamed = torch.cat(parts)
    assert streamed.shape == whole.shape
    assert torch.allclose(streamed, whole, atol=2e-6, rtol=0)


def _stereo_file(tmp_path, seconds: float, rate: int = 44100, fmt: str = "FLAC"):
    g = np.random.default_rng(int(seconds * 10))
    data = (0.2 * g.standard_normal((int(seconds * rate), 2))).astype("float32")
    path = tmp_path / f"a{seconds}.{fmt.lower()}"
    soundfile.write(path, data, rate, format=fmt, subtype="PCM_16")
    return path


@pytest.mark.parametrize(("seconds", "window", "hop"), [(7.3, 2.0, 1.0), (7.3, 2.0, None), (2.0, 2.0, 0.5), (1.2, 2.0, None), (9.0, 4.0, 3.0)])
def test_streamed_windows_are_the_whole_files_sliding_windows(tmp_path, seconds, window, hop):
    path = _stereo_file(tmp_path, seconds)
    rate = 16000
    length, step = int(window * rate), int((hop or window) * rate)
    expected = sliding_windows(load_waveform(Sample(id="a", audio=str(path)), rate), length, step)
    stats: dict = {}
    got = list(stream_windows(path, rate, length, step, block_frames=5000, stats=stats))
    starts = [s for s, _ in got]
    assert torch.allclose(torch.stack([w for _, w in got]), expected, atol=1e-6, rtol=0)
    assert stats["samples"] == int(np.ceil(seconds * 44100 * rate / 44100))
    if seconds > window:
        assert starts[-1] == stats["samples"] - length  # the last window ends with the file
    assert starts == sorted(set(starts))


def test_a_waveform_streams_like_a_file_and_needs_its_rate(tmp_path):
    path = _stereo_file(tmp_path, 3.0, fmt="WAV")
    data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    from_file = [w for _, w in stream_windows(path, 8000, 8000, 4000)]
    from_wave = [w for _, w in stream_windows(torch.from_numpy(data.T.copy()), 8000, 8000, 4000, source_rate=rate)]
    assert all(torch.equal(a, b) for a, b in zip(from_file, from_wave)) and len(from_file) == len(from_wave) == 5
    with pytest.raises(AudioDecodeError, match="sample rate"):
        list(stream_windows(torch.zeros(100), 8000, 800))


def test_integer_pcm_is_scaled_as_a_decoder_scales_it(tmp_path):
    """int16/int32 arrays (soundfile.read(dtype=...), scipy) give the windows the file gives."""
    path = _stereo_file(tmp_path, 2.0, fmt="WAV")
    from_file = torch.stack([w for _, w in stream_windows(path, 8000, 8000, 4000)])
    for dtype in ("int16", "int32"):
        data, rate = soundfile.read(path, dtype=dtype, always_2d=True)
        got = torch.stack([w for _, w in stream_windows(data.T.copy(), 8000, 8000, 4000, source_rate=rate)])
        assert torch.allclose(got, from_file, atol=1e-6, rtol=0), dtype
    as_uint8 = (np.array([[0, 128, 255]], dtype=np.uint8), 3)
    wave, _ = as_waveform(*as_uint8, "w")
    assert wave.tolist() == [[-1.0, 0.0, 127 / 128]]


@pytest.mark.parametrize(
    ("wave", "rate", "message"),
    [
        (np.zeros((44100, 2), np.float32), 44100, r"shape \(44100, 2\) has more channels than samples.*wave\.T"),
        (np.zeros(100, np.int64), 8000, "samples of type int64 have no agreed full scale"),
        (np.zeros(100, bool), 8000, "samples of type bool"),
        (np.ones(100, np.float32), 0, r"sample rate must be a positive whole number .*got 0\)"),
        (np.ones(100, np.float32), -5, "got -5"),
        (np.ones(100, np.float32), 22050.5, "got 22050.5"),
        (np.ones(100, np.float32), "44100", "got '44100'"),
        (np.ones(100, np.float32), None, "needs its sample rate"),
    ],
)
def test_a_waveform_in_the_wrong_layout_dtype_or_rate_is_refused(wave, rate, message):
    with pytest.raises(AudioDecodeError, match=message):
        list(stream_windows(wave, 8000, 800, source_rate=rate))
    with pytest.raises(AudioDecodeError, match=message):
        load_waveform(Sample(id="w", audio=wave, sample_rate=rate), 8000)


def test_silent_nan_broken_and_truncated_audio_raise_naming_the_file(tmp_path):
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros(16000, "float32"), 16000)
    with pytest.raises(AudioDecodeError, match="silent.wav.*silent") as info:
        list(stream_windows(silent, 16000, 8000))
    assert info.value.kind == "silent"
    wave = torch.ones(16000)
    wave[9000] = float("nan")
    with pytest.raises(AudioDecodeError, match="non-finite") as info:
        list(stream_windows(wave, 16000, 8000, source_rate=16000))
    (tmp_path / "text.mp3").write_bytes(b"plain text, not audio " * 50)
    with pytest.raises(AudioDecodeError, match="text.mp3") as info:
        list(stream_windows(tmp_path / "text.mp3", 16000, 8000))
    assert info.value.kind in ("not-audio", "empty")
    full = tmp_path / "full.wav"
    soundfile.write(full, np.full(32000, 0.1, "float32"), 16000, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[:30000])
    with pytest.raises(AudioDecodeError, match="cut.wav") as info:
        list(stream_windows(cut, 16000, 8000))
    assert info.value.kind == "truncated"


def test_ffmpeg_formats_stream_in_blocks_too(tmp_path):
    pytest.importorskip("av")
    path = tmp_path / "a.m4a"
    data = (0.5 * np.sin(2 * np.pi * 440 * np.arange(48000) / 16000)).astype("float32")
    write_aac(path, data, 16000)
    rate, blocks = open_stream(path, block_frames=4000)
    sizes = [b.shape for b in blocks]
    assert rate == 16000 and len(sizes) > 5 and all(s[0] == 1 for s in sizes)
    whole = sliding_windows(load_waveform(Sample(id="a", audio=str(path)), 16000), 16000, 8000)
    streamed = torch.stack([w for _, w in stream_windows(path, 16000, 16000, 8000)])
    assert torch.equal(streamed, whole)
