"""Compute once: a persistent cache of an audio encoder's features of whole files.

Where an audio encoder computes its input frame by frame on a fixed hop (its ``frame_features``,
:class:`mtrun.interfaces.FrameFeatures`; MAViL's kaldi fbank), the features of a crop are a
slice of the features of the whole file, provided the crop starts on a frame boundary.
``[loader] cache = "features"`` therefore decodes, checks, mixes and resamples every file once,
computes its frames ``[n, ...]`` and stores them as one float32 ``.npy`` under
``mtrun.cache_root() / "features"``; a training step reads just the crop's rows, so neither the
decoding nor the features are computed again, in any epoch or any later run.

Crops are drawn in frame space: the offset is a whole number of frames (a multiple of the hop,
10 ms for MAViL) from the same per-(seed, epoch, item) generator as every other crop, so the
cropped frames equal what ``preprocess`` computes on the waveform cropped at that offset, and
resume stays exact. Files shorter than a clip's frames are padded in waveform space (as without
the cache) and their frames computed on the padded clip.

An entry's key adds the encoder's ``frame_features.settings`` to the waveform cache's parts
(file identity, sample rate, decoding and resampling settings) and :data:`FORMAT_VERSION`, so
changing any of them computes new entries. Building, bad-file markers, atomic writes and
concurrency are the waveform cache's (:class:`~mtrun.data.waveform_cache.WaveformCache`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from mtrun.data.waveform_cache import WaveformCache
from mtrun.errors import MtrunError
from mtrun.interfaces import FrameFeatures

__all__ = ["FOLDER", "FORMAT_VERSION", "FeatureCache", "frame_features_for"]

FORMAT_VERSION = 1
"""Bumped when what an entry holds changes; old entries are then ignored."""

FOLDER = "features"
"""The cache's folder under :func:`mtrun.cache.cache_root`."""

_KEY = '[loader].cache = "features"'


def frame_features_for(encoder: Any, augmenters: Sequence[Any] = (), *, encoder_label: str = "the audio encoder") -> FrameFeatures:
    """The encoder's :class:`~mtrun.interfaces.FrameFeatures`, when ``[loader] cache =
    "features"`` may use them.

    Raises:
        MtrunError: The encoder declares no ``frame_features``, or a ``waveform`` augmenter
            must act on the waveform before the features are computed; the message names the
            recipe key and what to set instead.
    """
    features = getattr(encoder, "frame_features", None)
    if features is None or not isinstance(features, FrameFeatures):
        raise MtrunError(
            f"{_KEY} needs an audio encoder whose preprocess works frame by frame on a fixed hop "
            f"(it declares frame_features); {encoder_label} does not. Set [loader].cache = \"waveforms\" "
            "(decode once, compute features every step) or \"off\"."
        )
    waveform = [type(a).__name__ for a in augmenters if getattr(a, "stage", None) == "waveform"]
    if waveform:
        raise MtrunError(
            f"{_KEY} computes the features before any augmenter runs, but {', '.join(waveform)} acts on the "
            "waveform first; set [loader].cache = \"waveforms\" for this recipe."
        )
    return features


class FeatureCache(WaveformCache):
    """The whole-file frames of one encoder's ``frame_features`` at one sample rate.

    Args:
        sample_rate: The encoder's rate (files are resampled to it first).
        features: The encoder's ``frame_features``.
        folder: Where entries live; default ``cache_root() / "features"``.
    """

    KIND = "features"
    FOLDER = FOLDER
    NAME = "feature cache"
    WHAT = "feature cache: decoding {n} files{split} and computing their features once"

    def __init__(self, sample_rate: int, features: FrameFeatures, *, folder: str | Path | None = None):
        super().__init__(sample_rate, folder=folder)
        self.features = features
        self.settings = {**self.settings, "features": features.settings, "hop": int(features.hop)}

    def format_version(self) -> int:
        return FORMAT_VERSION

    def compute(self, waveform: Any) -> Any:
        """The frames ``[n, ...]`` of a checked mono waveform at ``sample_rate``."""
        import numpy as np
        import torch

        with torch.no_grad():
            frames = self.features.frames(waveform)
        return np.ascontiguousarray(frames.numpy(), dtype=np.float32)
