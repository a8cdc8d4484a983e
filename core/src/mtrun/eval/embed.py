"""The inference path: samples → one audio embedding per clip and one per caption.

Audio is decoded to mono at the encoder's rate, cut into deterministic sliding windows of
``clip_seconds`` (hop ``hop_seconds``), every window is encoded and projected, the projected
windows are **mean-pooled** and only then L2-normalised. Nothing random happens anywhere, and
the model runs in eval mode without gradients, so the same file always gives the same vector.

Several evaluation tasks of one round share the embeddings through an :class:`EvalCache`
(the trainer makes one per evaluation round; :func:`mtrun.eval.run.evaluate_run` one per call).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

import attrs
import numpy as np

if TYPE_CHECKING:
    import torch

    from mtrun.interfaces import Sample

__all__ = ["EmbedSettings", "EmbeddingTask", "Embeddings", "EvalCache", "embed_samples", "resolve_windows"]

log = logging.getLogger(__name__)

DEFAULT_CLIP_SECONDS = 10.0


@attrs.frozen
class EmbedSettings:
    """How audio is cut for inference; a base class of every eval task's ``Config``.

    ``0`` means "inherit": the clip length from the recipe's ``[loader].clip_seconds`` (the
    length the model was trained on), the hop equal to the clip (non-overlapping windows).
    """

    clip_seconds: float = attrs.field(
        default=0.0,
        validator=attrs.validators.ge(0.0),
        metadata={"help": "window length in seconds for inference; 0 = the recipe's [loader].clip_seconds"},
    )
    hop_seconds: float = attrs.field(
        default=0.0,
        validator=attrs.validators.ge(0.0),
        metadata={"help": "hop between windows in seconds; 0 = clip_seconds (no overlap)"},
    )
    batch_size: int = attrs.field(
        default=32, validator=attrs.validators.ge(1), metadata={"help": "windows (or texts) encoded per forward pass"}
    )


@attrs.define
class Embeddings:
    """Embeddings of one list of samples.

    Attributes:
        audio: ``[N, D]`` L2-normalised audio embeddings, one per decodable sample.
        texts: ``[M, D]`` L2-normalised caption embeddings.
        text_item: ``[M]`` row of ``audio`` that caption ``m`` belongs to.
        ids: ``[N]`` sample ids of the rows of ``audio``.
        items: ``[N]`` positions of those samples in the list that was embedded.
        captions: ``[M]`` the caption texts.
        audio_features: ``[N, E]`` the audio encoder's own pooled output, mean-pooled over
            windows (not projected, not normalised), for probes on the encoder.
        skipped: ``(id, reason)`` of every sample whose audio could not be decoded.
    """

    audio: np.ndarray
    texts: np.ndarray
    text_item: np.ndarray
    ids: list[str]
    items: np.ndarray
    captions: list[str]
    audio_features: np.ndarray
    skipped: list[tuple[str, str]] = attrs.field(factory=list)

    def samples(self, samples: Sequence[Sample]) -> list[Sample]:
        """The samples behind the rows of :attr:`audio`, in row order."""
        return [samples[i] for i in self.items]


# ----------------------------------------------------------------------------- audio I/O


def _audio_api():
    """``(load_waveform, sliding_windows, decode_errors)`` of :mod:`mtrun.data.audio`."""
    from mtrun.data import audio

    return audio.load_waveform, audio.sliding_windows, (audio.AudioDecodeError,)


# ------------------------------------------------------------------------------ embedding


def _device(system: Any):
    import torch

    try:
        return next(system.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def resolve_windows(settings: EmbedSettings, loader_clip_seconds: float | None) -> tuple[float, float]:
    """``(clip_seconds, hop_seconds)`` with the "0 = inherit" rules applied."""
    clip = settings.clip_seconds or loader_clip_seconds or DEFAULT_CLIP_SECONDS
    return float(clip), float(settings.hop_seconds or clip)


def embed_samples(
    system: Any,
    samples: Sequence[Sample],
    *,
    clip_seconds: float = DEFAULT_CLIP_SECONDS,
    hop_seconds: float | None = None,
    batch_size: int = 32,
) -> Embeddings:
    """Embed every sample's audio and every caption with ``system``.

    Args:
        system: A :class:`mtrun.system.System` (uses its encoders, projectors and
            ``project`` and ``embed_text``, so objectives' retrieval heads apply to both sides).
            Put in eval mode for the call and restored afterwards.
        samples: The samples; audio as a path or a tensor with ``sample_rate``.
        clip_seconds: Window length; audio shorter than one window is zero-padded.
        hop_seconds: Hop between windows; ``None`` = ``clip_seconds``.
        batch_size: Windows per encoder forward pass and texts per text forward pass.

    Returns:
        The :class:`Embeddings`. Samples whose audio fails to decode are left out (with
        their captions) and listed in ``skipped``.
    """
    import torch

    load_waveform, sliding_windows, decode_errors = _audio_api()
    encoder = system.audio_encoder
    rate = int(encoder.sample_rate)
    length = max(1, int(round(clip_seconds * rate)))
    hop = max(1, int(round((hop_seconds or clip_seconds) * rate)))
    device = _device(system)

    was_training = system.training
    system.eval()
    try:
        with torch.no_grad():
            windows: list[torch.Tensor] = []
            owner: list[int] = []
            items: list[int] = []
            skipped: list[tuple[str, str]] = []
            for i, sample in enumerate(samples):
                try:
                    wave = load_waveform(sample, rate)
                    cut = sliding_windows(wave, length, hop)
                except decode_errors as exc:
                    skipped.append((sample.id, str(exc)))
                    continue
                row = len(items)
                items.append(i)
                windows.extend(cut)
                owner.extend([row] * len(cut))
            projected, pooled = [], []
            for start in range(0, len(windows), batch_size):
                chunk = torch.stack(windows[start : start + batch_size]).to(device)
                encoded = encoder(encoder.preprocess(chunk))
                projected.append(system.project("audio", encoded).float().cpu())
                pooled.append(encoded.pooled.float().cpu())
            n = len(items)
            width = system.audio_projector.output_dim
            if n:
                index = torch.tensor(owner)
                counts = torch.bincount(index, minlength=n).clamp_min(1)[:, None].float()
                proj = torch.cat(projected)
                feat = torch.cat(pooled)
                audio = torch.zeros(n, proj.shape[1]).index_add_(0, index, proj) / counts
                features = torch.zeros(n, feat.shape[1]).index_add_(0, index, feat) / counts
                audio = torch.nn.functional.normalize(audio, dim=-1)
            else:
                audio = torch.zeros(0, width)
                features = torch.zeros(0, getattr(encoder, "output_dim", width))

            captions: list[str] = []
            text_item: list[int] = []
            for row, i in enumerate(items):
                for caption in samples[i].captions:
                    captions.append(caption)
                    text_item.append(row)
            texts = [system.embed_text(captions[s : s + batch_size]).float().cpu() for s in range(0, len(captions), batch_size)]
            text = torch.cat(texts) if texts else torch.zeros(0, audio.shape[1])
    finally:
        system.train(was_training)
    if skipped:
        log.warning("evaluation skipped %d sample(s) whose audio could not be decoded: %s", len(skipped), ", ".join(s for s, _ in skipped[:10]))
    return Embeddings(
        audio=audio.numpy(),
        texts=text.numpy(),
        text_item=np.asarray(text_item, dtype=np.int64),
        ids=[samples[i].id for i in items],
        items=np.asarray(items, dtype=np.int64),
        captions=captions,
        audio_features=features.numpy(),
        skipped=skipped,
    )


class EvalCache:
    """Embeddings memoised for one evaluation round, so several tasks embed the data once.

    Keyed by the identity of the system and of the samples list, and the window settings. A
    cache must not outlive the round: the model changes between rounds while the samples list
    stays the same object. It keeps a reference to each list it saw, so an id cannot be reused
    meanwhile.
    """

    def __init__(self) -> None:
        self._memo: dict[tuple, tuple[Sequence[Any], Embeddings]] = {}

    def embeddings(
        self,
        system: Any,
        samples: Sequence[Sample],
        *,
        clip_seconds: float = DEFAULT_CLIP_SECONDS,
        hop_seconds: float | None = None,
        batch_size: int = 32,
    ) -> Embeddings:
        """The embeddings of ``samples`` (see :func:`embed_samples`), computed on first use."""
        hop = hop_seconds or clip_seconds
        key = (id(system), id(samples), float(clip_seconds), float(hop), int(batch_size))
        hit = self._memo.get(key)
        if hit is None:
            emb = embed_samples(system, samples, clip_seconds=clip_seconds, hop_seconds=hop, batch_size=batch_size)
            hit = self._memo[key] = (samples, emb)
        return hit[1]

    def all(self) -> list[Embeddings]:
        """Every embedding set computed so far, oldest first (the report plots the first)."""
        return [emb for _, emb in self._memo.values()]

    def of(self, samples: Sequence[Sample]) -> list[Embeddings]:
        """The embedding sets computed for this very ``samples`` list, oldest first (an
        evaluation set that shares the training source's list reuses its embeddings)."""
        return [emb for seen, emb in self._memo.values() if seen is samples]


class EmbeddingTask:
    """Shared plumbing of the built-in eval tasks: settings → (cached) embeddings.

    Tasks are built with the run injected (when there is one) so that inference windows
    default to the clip length the model was trained on.
    """

    config: EmbedSettings

    def __init__(self, config: Any, *, run: Any = None) -> None:
        self.config = config
        self._loader_clip = getattr(getattr(run, "loader", None), "clip_seconds", None)

    def embeddings(self, system: Any, samples: Sequence[Sample], cache: EvalCache | None) -> Embeddings:
        """Embeddings of ``samples`` from ``cache`` (or computed afresh without one)."""
        clip, hop = resolve_windows(self.config, self._loader_clip)
        return (cache if cache is not None else EvalCache()).embeddings(
            system, samples, clip_seconds=clip, hop_seconds=hop, batch_size=self.config.batch_size
        )
