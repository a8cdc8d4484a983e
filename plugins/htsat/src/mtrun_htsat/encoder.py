"""The HTS-AT audio encoder on ``transformers.ClapAudioModel``."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
from torch import nn

from mtrun import EncoderOutput

__all__ = ["FEATURES", "FRONT_ENDS", "PRESETS", "HtsatEncoder", "preset_config"]

FRONT_ENDS: dict[str, dict[str, Any]] = {
    # CLAP's feature extractor (laion/clap-htsat-unfused preprocessor_config, "rand_trunc" path):
    # what LAION-CLAP's audio towers were trained on.
    "clap": {"sample_rate": 48_000, "n_mels": 64, "n_fft": 1024, "hop": 480, "f_min": 50.0, "f_max": 14_000.0, "seconds": 10},
    # HTS-AT's own AudioSet classifier training (its config.py: 32 kHz, 1024/320, 64 mels over
    # 50-14000 Hz via torchlibrosa): the same 100 frames/s and mel range at another rate.
    "audioset": {"sample_rate": 32_000, "n_mels": 64, "n_fft": 1024, "hop": 320, "f_min": 50.0, "f_max": 14_000.0, "seconds": 10},
}
"""Each front end: 64 slaney mels over 50-14000 Hz, a 1024-point STFT, 10 s -> 1001 frames."""

FEATURES: dict[str, Any] = FRONT_ENDS["clap"]
"""The default (``clap``) front end."""

_COMMON = {"spec_size": 256, "num_mel_bins": 64, "window_size": 8, "patch_size": 4, "patch_stride": [4, 4], "enable_fusion": False}

PRESETS: dict[str, dict[str, Any]] = {
    # laion/clap-htsat-unfused audio tower (HTS-AT "tiny", Swin-T widths)
    "htsat-tiny": {**_COMMON, "patch_embeds_hidden_size": 96, "hidden_size": 768, "depths": [2, 2, 6, 2], "num_attention_heads": [4, 8, 16, 32]},
    # laion/larger_clap_music audio tower (HTS-AT "base": 128 -> 1024, 12 blocks in stage 3)
    "htsat-base": {**_COMMON, "patch_embeds_hidden_size": 128, "hidden_size": 1024, "depths": [2, 2, 12, 2], "num_attention_heads": [4, 8, 16, 32]},
    # test size: the same 1001x64 input and 4 stages, 8 -> 64 wide, one block per stage
    "tiny": {**_COMMON, "patch_embeds_hidden_size": 8, "hidden_size": 64, "depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 2, 2]},
}


def preset_config(preset: str) -> Any:
    """The ``ClapAudioConfig`` of a preset."""
    from transformers import ClapAudioConfig

    return ClapAudioConfig(**PRESETS[preset])


def _check_preset(instance: Any, attribute: Any, value: str) -> None:
    if value not in PRESETS:
        raise ValueError(f"must be one of {', '.join(PRESETS)} (got {value!r})")


class HtsatEncoder(nn.Module):
    """HTS-AT (``transformers.ClapAudioModel``) with CLAP's log-mel front end on the device.

    ``preprocess`` reproduces ``ClapFeatureExtractor``'s non-fusion ("rand_trunc") path (with
    ``front_end = "audioset"``, the same at HTS-AT's AudioSet settings, 32 kHz and hop 320):
    clips longer than 10 s are cropped to 10 s (at random while training with
    ``crop="random"``, else from the start), shorter ones are repeated whole and zero-padded
    ("repeatpad"), then a 1024/480 Hann STFT (centred, reflect padding), power, 64 slaney
    mel bands over 50-14000 Hz, ``10*log10(max(x, 1e-10))``: ``[B, 1, 1001, 64]``.

    ``forward`` returns the audio tower's final Swin tokens: ``tokens`` ``[B, N, D]`` ordered
    time-major (for 10 s, 32 time steps x 2 frequency groups = 64 tokens), ``pooled`` the
    tower's average-pooled output (``pooler_output``, the mean of the tokens) and an all-True
    mask. The CLAP audio projection is deliberately not part of the encoder: mtrun's
    projectors take its place.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"hidden_states"})

    @attrs.frozen
    class Config:
        preset: str = attrs.field(default="htsat-tiny", validator=_check_preset, metadata={"help": "model size: htsat-tiny (laion/clap-htsat-unfused), htsat-base (laion/larger_clap_music) or tiny (tests, CPU profiles); the shape built for LAION .pt files (HF folders carry their own config)"})
        pretrained: str = attrs.field(default="", metadata={"help": "'' = train from scratch; a hub name or folder saved by ClapModel/ClapAudioModel(WithProjection), or a LAION-CLAP .pt checkpoint (unfused)"})
        frozen: bool = attrs.field(default=False, metadata={"help": "freeze the audio tower (eval mode, no gradients)"})
        crop: str = attrs.field(default="random", validator=attrs.validators.in_(("random", "start")), metadata={"help": "how clips over 10 s are cut to 10 s: random offset while training (CLAP's rand_trunc) or always from the start"})
        front_end: str = attrs.field(default="clap", validator=attrs.validators.in_(tuple(FRONT_ENDS)), metadata={"help": "log-mel front end the weights were trained with: clap (48 kHz, hop 480; LAION-CLAP audio towers) or audioset (32 kHz, hop 320; HTS-AT's AudioSet classifier checkpoints)"})

    token_grid = None

    def __init__(self, config: Config):
        super().__init__()
        import torchaudio

        self.config = config
        self.features = FRONT_ENDS[config.front_end]
        self.sample_rate = self.features["sample_rate"]
        self.load_report = None
        if config.pretrained:
            from mtrun_htsat.loading import load_audio_tower

            self.model, self.load_report = load_audio_tower(config.pretrained, preset_config(config.preset), front_end=config.front_end)
        else:
            from transformers import ClapAudioModel

            self.model = ClapAudioModel(preset_config(config.preset))
        hf = self.model.config
        features = self.features
        if hf.num_mel_bins != features["n_mels"]:
            raise ValueError(f"this encoder's front end makes {features['n_mels']} mel bands; the checkpoint expects {hf.num_mel_bins}")
        self.output_dim = int(hf.patch_embeds_hidden_size * 2 ** (len(hf.depths) - 1))
        fb = torchaudio.functional.melscale_fbanks(
            n_freqs=features["n_fft"] // 2 + 1,
            f_min=features["f_min"],
            f_max=features["f_max"],
            n_mels=features["n_mels"],
            sample_rate=features["sample_rate"],
            norm="slaney",
            mel_scale="slaney",
        )
        # Not persistent: derived from constants, so checkpoints hold only learned weights.
        self.register_buffer("mel_fb", fb, persistent=False)
        self.register_buffer("window", torch.hann_window(features["n_fft"], periodic=True), persistent=False)
        self._augmenting = False
        if config.frozen:
            self.model.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> HtsatEncoder:
        """Keep a frozen tower in eval mode (its BatchNorm statistics too)."""
        super().train(mode)
        self._augmenting = mode
        if self.config.frozen:
            self.model.eval()
        return self

    def _fit_length(self, x: torch.Tensor) -> torch.Tensor:
        target = self.features["seconds"] * self.sample_rate
        n = x.shape[-1]
        if n > target:
            start = 0
            if self.config.crop == "random" and self._augmenting:
                start = int(torch.randint(0, n - target + 1, ()).item())
            return x[:, start : start + target]
        if n < target:
            x = x.repeat(1, target // n)  # "repeatpad": whole repeats, then zeros
            x = nn.functional.pad(x, (0, target - x.shape[-1]))
        return x

    def preprocess(self, waveforms: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` at the front end's rate -> log-mel ``[B, 1, 1001, 64]`` in dB (float32)."""
        x = waveforms.float()
        if x.ndim == 3:
            x = x.mean(1)
        x = self._fit_length(x)
        spec = torch.stft(x, n_fft=self.features["n_fft"], hop_length=self.features["hop"], window=self.window, center=True, pad_mode="reflect", return_complex=True)
        power = spec.real.square() + spec.imag.square()  # [B, 513, frames]
        mel = torch.matmul(power.transpose(1, 2), self.mel_fb)  # [B, frames, 64]
        return (10.0 * torch.log10(mel.clamp_min(1e-10))).unsqueeze(1)

    def _run(self, features: torch.Tensor, output_hidden_states: bool) -> Any:
        return self.model(input_features=features, output_hidden_states=output_hidden_states)

    def forward(self, features: torch.Tensor, *, keep_index: torch.Tensor | None = None, output_hidden_states: bool = False) -> EncoderOutput:
        """Encode log-mels ``[B, 1, frames, 64]``; ``keep_index`` is not supported (no grid)."""
        if keep_index is not None:
            raise ValueError("HTS-AT has no token grid here (token_grid is None); it cannot drop tokens with keep_index")
        if self.config.frozen:
            with torch.no_grad():
                out = self._run(features, output_hidden_states)
        else:
            out = self._run(features, output_hidden_states)
        last = out.last_hidden_state  # [B, D, freq groups, time]
        tokens = last.permute(0, 3, 2, 1).reshape(last.shape[0], -1, last.shape[1])
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        hidden = None
        if output_hidden_states and out.hidden_states is not None:
            hidden = tuple(h.flatten(2).transpose(1, 2) if h.ndim == 4 else h for h in out.hidden_states)
        return EncoderOutput(tokens=tokens, pooled=out.pooler_output, mask=mask, hidden_states=hidden)
