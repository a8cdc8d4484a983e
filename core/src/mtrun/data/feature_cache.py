"""Compute once: a persistent cache of an audio encoder's features of whole files.

Where an audio encoder computes its input frame by frame on a fixed hop (its ``frame_features``,
:class:`mtrun.interfaces.FrameFeatures`; MAViL's kaldi fbank), the features of a crop are a
slice of the features of the whole file, provided the crop starts on a frame boundary.
``[loader] cache = "features"`` therefore decodes, checks, mixes and resamples every file once,
computes its frames ``[n, ...]`` and stores them as one float32 ``.npy`` under
``mtrun.cache_root() / "features"``; a training step reads just the crop's rows, so neither the
decoding nor the features are computed again, in any epoch or any later run.

A crop's frames are exact only where the crop starts on the hop (10 ms for MAViL), and crops
that start only there cost the quickstart 8.6 points of test R@10 on average against crops that
start on any sample (the waveform path's own crops rounded to the 10 ms grid lost as much;
rounded to 2.5 ms they lost nothing: docs/performance.md). So an entry holds the frames of ``phases``
copies of the file, each started ``hop / phases`` samples later than the one before (4 phases:
every 2.5 ms for MAViL), stacked phase after phase as rows ``[phases * n, ...]``. Crops are drawn
on that finer grid, in units of ``hop / phases`` samples, from the same per-(seed, epoch, item)
generator as every other crop; the cropped frames equal what ``preprocess`` computes on the
waveform cropped at that offset, and resume stays exact. Files shorter than a clip's frames are
padded in waveform space (as without the cache) and their frames computed on the padded clip.

An entry's key adds the encoder's ``frame_features.settings`` and ``phases`` to the waveform cache's parts
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

__all__ = ["FOLDER", "FORMAT_VERSION", "FeatureCache", "check_phases", "frame_features_for"]

FORMAT_VERSION = 2
"""Bumped when what an entry holds changes; old entries are then ignored (2: phases stacked)."""

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


def check_phases(phases: int, features: FrameFeatures) -> None:
    """Raises :class:`MtrunError` unless ``1 <= phases <= hop`` (a phase per sample at most)."""
    if not 1 <= int(phases) <= int(features.hop):
        raise MtrunError(f"[loader].feature_phases = {phases} must be between 1 and the features' hop ({int(features.hop)} samples)")


class FeatureCache(WaveformCache):
    """The whole-file frames of one encoder's ``frame_features`` at one sample rate.

    Args:
        sample_rate: The encoder's rate (files are resampled to it first).
        features: The encoder's ``frame_features``.
        phases: Starting points per hop whose frames each entry holds (``[loader].feature_phases``).
        folder: Where entries live; default ``cache_root() / "features"``.
    """

    KIND = "features"
    FOLDER = FOLDER
    NAME = "feature cache"
    WHAT = "feature cache: decoding {n} files{split} and computing their features once"

    def __init__(self, sample_rate: int, features: FrameFeatures, *, phases: int = 1, folder: str | Path | None = None):
        super().__init__(sample_rate, folder=folder)
        hop = int(features.hop)
        check_phases(phases, features)
        self.features = features
        self.phases = int(phases)
        self.shifts = [round(p * hop / self.phases) for p in range(self.phases)]
        """Samples by which each phase's copy of a file starts later."""
        self.settings = {**self.settings, "features": features.settings, "hop": hop, "phases": self.phases}

    def format_version(self) -> int:
        return FORMAT_VERSION

    def compute(self, waveform: Any) -> Any:
        """The frames of a checked mono waveform at ``sample_rate``, each phase's ``[n, ...]``
        (cut to the shortest phase's ``n``) one after the other: ``[phases * n, ...]``."""
        import numpy as np
        import torch

        with torch.no_grad():
            per_phase = [self.features.frames(waveform[shift:]) for shift in self.shifts]
        n = min(f.shape[0] for f in per_phase)
        return np.ascontiguousarray(torch.cat([f[:n] for f in per_phase]).numpy(), dtype=np.float32)

    def frames_per_phase(self, entry: Any) -> int:
        """``n``: frames of each phase in ``entry``."""
        return entry.length // self.phases

    def read_crop(self, entry: Any, position: int, count: int) -> Any:
        """``count`` frames starting ``position`` units of ``hop / phases`` samples into the file
        (frame ``position // phases`` of phase ``position % phases``)."""
        frame, phase = divmod(int(position), self.phases)
        return entry.read(phase * self.frames_per_phase(entry) + frame, count)
