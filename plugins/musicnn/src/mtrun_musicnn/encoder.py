"""The ``musicnn`` audio encoder: 3 s chunks of 16 kHz audio -> one 1506-d feature each."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import attrs
import torch
from torch import nn

from mtrun import EncoderOutput, positive
from mtrun_musicnn.network import N_FRAMES, N_MELS, SHAPES, MusicnnNet
from mtrun_musicnn.weights import PUBLISHED, load_tf_weights, tags_for

__all__ = ["FEATURES", "MusicnnEncoder", "exact_float32"]

FEATURES: dict[str, Any] = {
    # musicnn/configuration.py and the checkpoints' config.json ("audio_rep")
    "sample_rate": 16_000,
    "n_fft": 512,
    "hop": 256,
    "n_mels": N_MELS,
    "frames": N_FRAMES,  # 3 s: librosa.time_to_frames(3, sr=16000, n_fft=512, hop_length=256) + 1
}
"""16 kHz, 512/256 STFT, 96 slaney mel bands over 0-8 kHz, 187-frame (3 s) chunks."""


def _check_preset(instance: Any, attribute: Any, value: str) -> None:
    if value not in SHAPES:
        raise ValueError(f"must be one of {', '.join(SHAPES)} (got {value!r})")
    if instance.weights in PUBLISHED and value != "musicnn":
        raise ValueError(f"weights={instance.weights!r} is a preset='musicnn' network (got preset={value!r})")


def _log_compress(mel: torch.Tensor) -> torch.Tensor:
    """``log10(10000 x + 1)`` in float16 arithmetic, as musicnn's extractor computes it.

    The extractor casts the mel spectrogram to float16 and numpy then does the whole compression
    in float16 (each operation rounded to float16), so the network saw inputs on a float16 grid.
    Where float16 overflows (mel power above ~6.55, very loud audio) the extractor would feed the
    network ``inf``; there the float32 value is used instead.
    """
    half = torch.log10(mel.clamp(max=65504.0).half() * 10000.0 + 1.0).float()
    return torch.where(torch.isfinite(half), half, torch.log10(mel * 10000.0 + 1.0))


@contextlib.contextmanager
def exact_float32(device_type: str) -> Iterator[None]:
    """Run float32 as on a CPU: autocast off, and no TF32 in cuDNN convolutions or cuBLAS matmuls.

    PyTorch lets cuDNN use TF32 for float32 convolutions by default, which moves musicnn's
    features by ~1 % on an H200; bf16 autocast moves them by ~10 %. The switches are global,
    so they are set for the duration and restored; with PyTorch's newer per-backend
    ``fp32_precision`` API when it has one (mixing it with the legacy ``allow_tf32`` flags is
    an error in recent releases).
    """
    with torch.autocast(device_type, enabled=False):
        if device_type != "cuda":
            yield
            return
        conv = getattr(torch.backends.cudnn, "conv", None)
        if conv is not None and hasattr(conv, "fp32_precision"):
            switches = [(conv, "fp32_precision", "ieee"), (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
        else:
            switches = [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]
        saved = [getattr(owner, name) for owner, name, _ in switches]
        try:
            for owner, name, value in switches:
                setattr(owner, name, value)
            yield
        finally:
            for (owner, name, _), value in zip(switches, saved):
                setattr(owner, name, value)


class MusicnnEncoder(nn.Module):
    """musicnn (Pons & Serra) over 3 s chunks, as MuLaP's audio encoder.

    ``preprocess`` computes musicnn's input on the device: the clip is cut to ``max_seconds``;
    a 512-point periodic-Hann STFT, hop 256, centred with reflect padding (librosa < 0.10's
    default, with which the published models were trained and released); power; 96 slaney mel
    bands (slaney area norm, 0-8 kHz, as ``librosa.filters.mel``); ``log10(10000 x + 1)`` in
    float16 arithmetic, as ``musicnn.extractor`` computes it. The frames are split into
    non-overlapping 187-frame (3 s) chunks as the extractor does; a tail shorter than a chunk is
    dropped, and a clip shorter than one chunk is repeated to fill it (musicnn's training
    "repeat-pad"). Output: ``[B, n_chunks, 187, 96]``.

    ``forward`` runs each chunk through the network and returns ``tokens`` ``[B, 1 + n, D]``:
    the mean of the chunk features, then each chunk's; ``pooled`` the mean (``tokens[:, 0]``);
    ``mask`` all True (the data loader gives every clip of a batch the same length, so every
    chunk is audio). A chunk's feature is musicnn's ``max_pool`` then ``mean_pool`` (each
    ``[753]``: the front end's 561 and the mid end's 3 x 64 channels, pooled over time), the
    1506 values the back end classifies. :meth:`taggram` gives the tag probabilities.

    Precision: ``preprocess`` always runs in exact float32 (no autocast, no TF32), and so does a
    frozen network, so bf16 training still gets the published model's features; an unfrozen
    network follows the surrounding autocast and TF32 settings like any trained module.
    """

    @attrs.frozen
    class Config:
        weights: str = attrs.field(default="MTT_musicnn", metadata={"help": "MTT_musicnn (MagnaTagATune) or MSD_musicnn (Million Song Dataset): the published weights in the musicnn wheel (pip install --no-deps musicnn==0.1.0); '' = random init; or the path (prefix, .index file or folder) of another TensorFlow checkpoint of this network"})
        preset: str = attrs.field(default="musicnn", validator=_check_preset, metadata={"help": "network size: musicnn (the published models, 1506-d features), musicnn-big (MSD_musicnn_big: 512 mid-end filters, 500 dense units) or tiny (tests, random init only)"})
        frozen: bool = attrs.field(default=True, metadata={"help": "freeze the network: no gradients, eval mode (batch-norm moving statistics) even under .train(), run under torch.no_grad(); MuLaP regresses these features, so they stay fixed"})
        max_seconds: float = attrs.field(default=20.0, validator=positive, metadata={"help": "longest audio used, in seconds (cut from the start); 20 s gives 6 chunks of 3 s"})

    sample_rate = FEATURES["sample_rate"]
    token_grid = None

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.net = MusicnnNet(SHAPES[config.preset])
        self.load_report = load_tf_weights(self.net, config.weights) if config.weights else None
        self.tags: tuple[str, ...] = tags_for(config.weights, self.net.shape.classes)
        """Names of the :meth:`taggram` columns (MTT's or MSD's 50 tags for the published weights)."""
        self.output_dim = 2 * self.net.feature_dim
        self.max_chunks = max(1, (1 + round(config.max_seconds * self.sample_rate) // FEATURES["hop"]) // N_FRAMES)
        import torchaudio

        fb = torchaudio.functional.melscale_fbanks(
            n_freqs=FEATURES["n_fft"] // 2 + 1,
            f_min=0.0,
            f_max=self.sample_rate / 2,
            n_mels=FEATURES["n_mels"],
            sample_rate=self.sample_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        # Not persistent: derived from constants, so checkpoints hold only learned weights.
        self.register_buffer("mel_fb", fb, persistent=False)
        self.register_buffer("window", torch.hann_window(FEATURES["n_fft"], periodic=True), persistent=False)
        if config.frozen:
            self.net.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> MusicnnEncoder:
        """Keep a frozen network in eval mode (batch norm uses the moving statistics)."""
        super().train(mode)
        if self.config.frozen:
            self.net.eval()
        return self

    def mel_power(self, waveforms: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` at 16 kHz -> mel power ``[B, frames, 96]`` (``librosa.feature.melspectrogram``'s)."""
        x = waveforms.float()
        if x.ndim == 3:
            x = x.mean(1)
        if x.shape[-1] <= FEATURES["n_fft"] // 2:  # reflect padding needs more samples than it pads
            x = nn.functional.pad(x, (0, FEATURES["n_fft"] // 2 + 1 - x.shape[-1]))
        spec = torch.stft(x, n_fft=FEATURES["n_fft"], hop_length=FEATURES["hop"], window=self.window, center=True, pad_mode="reflect", return_complex=True)
        power = spec.real.square() + spec.imag.square()  # [B, 257, frames]
        return torch.matmul(power.transpose(1, 2), self.mel_fb)

    def preprocess(self, waveforms: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` at 16 kHz -> log-mel chunks ``[B, n_chunks, 187, 96]`` (float32, never autocast)."""
        limit = round(self.config.max_seconds * self.sample_rate)
        with exact_float32(waveforms.device.type):
            mel = self.mel_power(waveforms[..., :limit])
            logmel = _log_compress(mel)
        frames = logmel.shape[1]
        if frames < N_FRAMES:
            logmel = logmel.repeat(1, -(-N_FRAMES // frames), 1)[:, :N_FRAMES]
        n = min(self.max_chunks, logmel.shape[1] // N_FRAMES)
        return logmel[:, : n * N_FRAMES].reshape(logmel.shape[0], n, N_FRAMES, logmel.shape[2])

    def _chunks(self, features: torch.Tensor):
        b, n = features.shape[:2]
        if self.config.frozen:
            # A frozen musicnn is a fixed feature extractor: give the published model's numbers
            # whatever the trainer's precision (it costs little: ~1.4 GFLOP per chunk).
            with torch.no_grad(), exact_float32(features.device.type):
                out = self.net(features.flatten(0, 1).float())
        else:
            out = self.net(features.flatten(0, 1))
        return b, n, out

    def chunk_features(self, features: torch.Tensor) -> torch.Tensor:
        """Per-chunk features ``[B, n, 1506]``: ``max_pool`` then ``mean_pool``."""
        b, n, out = self._chunks(features)
        return torch.cat([out.max_pool, out.mean_pool], dim=1).reshape(b, n, -1)

    def taggram(self, features: torch.Tensor) -> torch.Tensor:
        """Tag probabilities per chunk ``[B, n, 50]`` (sigmoid; columns named by :attr:`tags`)."""
        b, n, out = self._chunks(features)
        return torch.sigmoid(out.logits).reshape(b, n, -1)

    def forward(self, features: torch.Tensor, *, keep_index: torch.Tensor | None = None, output_hidden_states: bool = False) -> EncoderOutput:
        """Encode chunks ``[B, n, 187, 96]`` into ``[mean, chunk_1..n]`` tokens ``[B, 1 + n, 1506]``.

        ``keep_index`` is not supported (no token grid); ``output_hidden_states`` is accepted
        and ignored (this encoder does not provide the ``hidden_states`` capability).
        """
        if keep_index is not None:
            raise ValueError("musicnn has no token grid (token_grid is None); it cannot drop tokens with keep_index")
        chunks = self.chunk_features(features)
        pooled = chunks.mean(dim=1)
        tokens = torch.cat([pooled.unsqueeze(1), chunks], dim=1)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(tokens=tokens, pooled=pooled, mask=mask)
