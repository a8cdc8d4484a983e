"""The MAViL / AudioMAE audio ViT: kaldi fbank -> 16x16 patches -> pre-norm transformer."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
from torch import nn

from mtrun import EncoderOutput, TransformerBlock, sincos_table
from mtrun_mavil.fbank import FBANK, kaldi_fbank, mel_banks, num_frames

__all__ = ["NORM_MEAN", "NORM_STD", "PATCH", "PRESETS", "FbankFrames", "MavilEncoder"]

NORM_MEAN = -4.2677393
NORM_STD = 4.5689974
"""AudioSet fbank statistics; AudioMAE normalises ``(x - mean) / (2 * std)``."""

PATCH = 16
"""Patch side (time frames and mel bins); the Conv2d stride equals it (no overlap)."""

PRESETS: dict[str, dict[str, int]] = {
    # ViT-B/16 as AudioMAE's vit_base_patch16 and MAViL's audio branch: 1024 frames -> 64 x 8 tokens
    "base": {"dim": 768, "depth": 12, "heads": 12, "mlp_ratio": 4, "target_length": 1024},
    # test / CPU profile size: 2.56 s of fbank -> 16 x 8 tokens, 2 blocks of width 64
    "tiny": {"dim": 64, "depth": 2, "heads": 2, "mlp_ratio": 4, "target_length": 256},
}


class FbankFrames:
    """MAViL's ``preprocess`` as frames on the 10 ms hop (mtrun's ``FrameFeatures`` contract).

    ``frames`` is the normalised kaldi fbank of a whole waveform ``[n, 128]``; ``assemble`` pads
    (with the normalised log-fbank zero AudioMAE pads with) or crops a clip's frames to
    ``target_length`` and adds the channel axis. Kaldi removes each frame's DC offset, which
    cancels ``preprocess``'s per-clip mean subtraction, so frame ``k + i`` of a whole file is
    frame ``i`` of the crop that starts at sample ``160 k``: ``[loader] cache = "features"``
    computes each file's fbank once and crops it in frame space.
    """

    VERSION = 1
    """Bumped when the frames' numbers change (a new fbank implementation); part of the cache key."""

    def __init__(self, target_length: int, sample_rate: int = FBANK["sample_rate"], num_mel_bins: int = FBANK["num_mel_bins"]):
        self.target_length = int(target_length)
        self.sample_rate = int(sample_rate)
        self.num_mel_bins = int(num_mel_bins)
        self.hop = int(self.sample_rate * FBANK["frame_shift_ms"] * 0.001)
        # target_length is left out: it decides assemble's padding, not a frame's numbers.
        self.settings = {
            "frames": "mtrun_mavil kaldi fbank, normalised",
            "version": self.VERSION,
            "fbank": dict(FBANK, sample_rate=self.sample_rate),
            "num_mel_bins": self.num_mel_bins,
            "window": "hann, symmetric",
            "norm": [NORM_MEAN, NORM_STD],
        }
        self._constants: tuple[torch.Tensor, torch.Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_constants": None}  # rebuilt where it runs

    def _banks_and_window(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._constants is None:
            window = int(self.sample_rate * FBANK["frame_length_ms"] * 0.001)
            self._constants = (mel_banks(self.num_mel_bins, self.sample_rate), torch.hann_window(window, periodic=False))
        return self._constants

    def normalise(self, fbank: torch.Tensor) -> torch.Tensor:
        return (fbank - NORM_MEAN) / (2 * NORM_STD)

    def frames(self, waveform: torch.Tensor) -> torch.Tensor:
        """Normalised fbank ``[n, 128]`` of one whole mono waveform ``[T]``."""
        x = waveform.float().reshape(1, -1)
        banks, window = self._banks_and_window()
        fbank = kaldi_fbank(x - x.mean(), banks, window, self.sample_rate)[0]
        return self.normalise(fbank)

    def num_frames(self, num_samples: int) -> int:
        return num_frames(int(num_samples), self.sample_rate)

    def assemble(self, frames: torch.Tensor) -> torch.Tensor:
        """Normalised frames ``[B, n, 128]`` -> ``[B, 1, target_length, 128]``."""
        n = frames.shape[1]
        if n < self.target_length:  # AudioMAE pads the log-fbank with zeros, then normalises
            pad = frames.new_full((frames.shape[0], self.target_length - n, frames.shape[2]), (0.0 - NORM_MEAN) / (2 * NORM_STD))
            frames = torch.cat([frames, pad], dim=1)
        else:
            frames = frames[:, : self.target_length]
        return frames.unsqueeze(1)


def _check_preset(instance: Any, attribute: Any, value: str) -> None:
    if value not in PRESETS:
        raise ValueError(f"must be one of {', '.join(PRESETS)} (got {value!r})")


def _check_target_length(instance: Any, attribute: Any, value: int) -> None:
    if value < 0 or value % PATCH:
        raise ValueError(f"must be 0 (the preset's length) or a positive multiple of {PATCH} (got {value})")


class MavilEncoder(nn.Module):
    """AudioMAE-style ViT (MAViL's audio branch, FLAP's audio encoder).

    ``preprocess``: 16 kHz ``[B, T]`` -> waveform mean removed per clip -> kaldi fbank (128
    bins) -> zero-padded / cropped to ``target_length`` frames -> ``(x + 4.2677393) /
    (2 * 4.5689974)`` -> ``[B, 1, target_length, 128]`` (time before frequency, AudioMAE's
    ``[B, 1, T, F]`` input layout).

    ``forward``: Conv2d 16x16/16 patches flattened time-major (token ``t * K + f`` for time
    group ``t`` and frequency position ``f``; ``token_grid = (M, K) = (64, 8)`` for 1024
    frames) + fixed sin-cos positions; when ``keep_index`` ``[B, N']`` is given only those
    tokens go on (FLAP masking: positions are added first, so a kept token remembers where it
    was); [CLS] (+ its position) is prepended; pre-norm blocks; final LayerNorm. Returns the
    patch tokens (not [CLS]), their mean as ``pooled``, an all-True mask and ``keep_index``.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"keep_index", "hidden_states"})
    preprocess_in_loader: ClassVar[bool] = True
    """The fbank is a fixed function of the waveform (constant mel banks and window), so the
    data loader's workers may compute it beside the training step."""
    frame_features: FbankFrames
    """``preprocess`` as frames on the 10 ms hop, for ``[loader] cache = "features"``."""

    @attrs.frozen
    class Config:
        preset: str = attrs.field(default="base", validator=_check_preset, metadata={"help": "model size: base (ViT-B/16, AudioMAE / MAViL) or tiny (tests and CPU profiles: width 64, 2 blocks, 256 frames)"})
        pretrained: str = attrs.field(default="", metadata={"help": "'' = random init; else a local AudioMAE/MAViL checkpoint file (.pth/.pt read with weights_only=True, or .safetensors) or a folder holding one"})
        frozen: bool = attrs.field(default=False, metadata={"help": "freeze the encoder: no gradients, always in eval mode"})
        target_length: int = attrs.field(default=0, validator=[attrs.validators.instance_of(int), _check_target_length], metadata={"help": "fbank frames the clip is padded/cropped to (multiple of 16); 0 = the preset's (1024 for base = 10.24 s, 256 for tiny)"})
        drop: float = attrs.field(default=0.0, validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)], metadata={"help": "dropout after attention and in the MLPs (AudioMAE pre-training uses 0)"})

    sample_rate = FBANK["sample_rate"]
    patch_size = PATCH

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        shape = PRESETS[config.preset]
        self.target_length = config.target_length or shape["target_length"]
        self.num_mel_bins = FBANK["num_mel_bins"]
        self.token_grid: tuple[int, int] = (self.target_length // PATCH, self.num_mel_bins // PATCH)
        self.num_tokens = self.token_grid[0] * self.token_grid[1]
        dim = shape["dim"]
        self.output_dim = dim

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(1, dim, kernel_size=PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed, never trained; persistent so a checkpoint's own table is what gets used.
        table = torch.cat([torch.zeros(1, dim), sincos_table(dim, self.token_grid)])
        self.register_buffer("pos_embed", table.unsqueeze(0))
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, shape["heads"], mlp_ratio=shape["mlp_ratio"], qkv_bias=True, eps=1e-6, drop=config.drop)
            for _ in range(shape["depth"])
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._init_weights()

        # Derived from constants: not saved in checkpoints.
        self.register_buffer("mel_banks", mel_banks(self.num_mel_bins, self.sample_rate), persistent=False)
        self.register_buffer("window", torch.hann_window(int(self.sample_rate * 0.025), periodic=False), persistent=False)
        self.frame_features = FbankFrames(self.target_length, self.sample_rate, self.num_mel_bins)

        self.load_report = None
        if config.pretrained:
            from mtrun_mavil.loading import load_checkpoint

            self.load_report = load_checkpoint(self, config.pretrained)
        if config.frozen:
            self.requires_grad_(False)
        self.train(self.training)

    def _init_weights(self) -> None:
        """MAE's initialisation: xavier-uniform linears and patch projection, std-0.02 [CLS]."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def train(self, mode: bool = True) -> MavilEncoder:
        """A frozen encoder stays in eval mode (no dropout) whatever the parent asks."""
        return super().train(False if self.config.frozen else mode)

    # ------------------------------------------------------------------ features

    def preprocess(self, waveforms: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` 16 kHz -> normalised fbank ``[B, 1, target_length, 128]`` (float32)."""
        x = waveforms.float()
        if x.ndim == 3:  # [B, C, T] -> mono
            x = x.mean(1)
        x = x - x.mean(dim=-1, keepdim=True)  # AudioMAE: waveform - waveform.mean()
        fbank = kaldi_fbank(x, self.mel_banks, self.window, self.sample_rate)  # [B, frames, 128]
        features = self.frame_features
        return features.assemble(features.normalise(fbank))  # one padding rule with the feature cache

    # ------------------------------------------------------------------ encoder

    def embed_patches(self, features: torch.Tensor) -> torch.Tensor:
        """Patch tokens with positions ``[B, N, D]`` in time-major order (before any dropping)."""
        if features.ndim == 3:
            features = features.unsqueeze(1)
        if features.ndim != 4 or tuple(features.shape[-2:]) != (self.target_length, self.num_mel_bins):
            raise ValueError(
                f"mavil expects features [B, 1, {self.target_length}, {self.num_mel_bins}] from its preprocess (got {tuple(features.shape)})"
            )
        x = self.patch_embed.proj(features.to(self.patch_embed.proj.weight.dtype))  # [B, D, M, K]
        x = x.flatten(2).transpose(1, 2)  # row-major over (M, K): token t*K + f
        return x + self.pos_embed[:, 1:].to(x.dtype)

    def _encode(self, features: torch.Tensor, keep_index: torch.Tensor | None, output_hidden_states: bool) -> EncoderOutput:
        x = self.embed_patches(features)
        batch, _, dim = x.shape
        if keep_index is not None:
            if keep_index.ndim != 2 or keep_index.shape[0] != batch:
                raise ValueError(f"keep_index must be [B={batch}, N'] (got {tuple(keep_index.shape)})")
            keep_index = keep_index.to(device=x.device, dtype=torch.long)
            x = torch.gather(x, 1, keep_index.unsqueeze(-1).expand(-1, -1, dim))
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(batch, -1, -1)
        x = torch.cat([cls, x], dim=1)
        hidden: list[torch.Tensor] = []
        for block in self.blocks:
            if output_hidden_states:
                hidden.append(x[:, 1:])
            x = block(x)
        x = self.norm(x)
        tokens = x[:, 1:]
        if output_hidden_states:
            hidden.append(tokens)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(
            tokens=tokens,
            pooled=tokens.mean(dim=1),
            mask=mask,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            keep_index=keep_index,
        )

    def forward(self, features: torch.Tensor, *, keep_index: torch.Tensor | None = None, output_hidden_states: bool = False) -> EncoderOutput:
        """Encode ``[B, 1, T, 128]`` features; ``keep_index`` ``[B, N']`` keeps only those grid tokens."""
        if self.config.frozen:
            with torch.no_grad():
                return self._encode(features, keep_index, output_hidden_states)
        return self._encode(features, keep_index, output_hidden_states)
