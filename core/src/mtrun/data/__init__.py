"""Data: decoding audio, data sources, and turning a source's samples into batches."""

from __future__ import annotations

from mtrun.data.audio import AudioDecodeError, crop_or_pad, decode, load_waveform, sliding_windows
from mtrun.data.loader import BatchLoader, load_audio, prepare_waveform, sample_text

__all__ = [
    "AudioDecodeError",
    "BatchLoader",
    "crop_or_pad",
    "decode",
    "load_audio",
    "load_waveform",
    "prepare_waveform",
    "sample_text",
    "sliding_windows",
]
