"""Data: turning a data source's samples into batches for training and evaluation."""

from __future__ import annotations

from mtrun.data.loader import AudioDecodeError, BatchLoader, load_audio, prepare_waveform, sample_text

__all__ = ["AudioDecodeError", "BatchLoader", "load_audio", "prepare_waveform", "sample_text"]
