"""The MERT-v1 audio encoder with DuET-MC's learnable aggregator over all hidden layers."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
from torch import nn

from mtrun import EncoderOutput

__all__ = ["PRESETS", "SAMPLE_RATE", "MertEncoder", "preset_config"]

SAMPLE_RATE = 24_000
"""MERT-v1 is trained on 24 kHz audio; its conv front end (total stride 320) gives 75 frames/s."""

_MERT_COMMON: dict[str, Any] = {
    # The 7-layer wav2vec2/HuBERT front end: strides multiply to 320 -> 24000 / 320 = 75 Hz.
    "conv_dim": [512] * 7,
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16,
    "feat_proj_layer_norm": True,
    "conv_pos_batch_norm": False,
    "layer_norm_eps": 1e-5,
}

PRESETS: dict[str, dict[str, Any]] = {
    # MERT-v1-95M: HuBERT-base shape, post-LN, group-norm front end without conv bias.
    "95m": {**_MERT_COMMON, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "do_stable_layer_norm": False, "feat_extract_norm": "group", "conv_bias": False},
    # MERT-v1-330M: HuBERT-large shape, stable (pre-)LN with a layer-norm front end.
    "330m": {**_MERT_COMMON, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096, "do_stable_layer_norm": True, "feat_extract_norm": "layer", "conv_bias": False},
    # Test size: MERT-95M's layout (group-norm front end, post-LN) and stride (75 Hz), a few
    # thousand parameters per layer. The 95M layout, not the 330M one: with random weights a
    # 16-channel LayerNorm front end erases most of the spectrum (a linear probe on the demo
    # corpus' instruments: 57% with it, 65-67% with this one, in 0.42x the time;
    # benchmarks/mert_tiny_probe.py).
    "tiny": {
        **_MERT_COMMON,
        "conv_dim": [16] * 7,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 2,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "do_stable_layer_norm": False,
        "feat_extract_norm": "group",
        "conv_bias": False,
    },
}


def preset_config(preset: str) -> Any:
    """The ``HubertConfig`` of a preset (random-init sizes; a checkpoint's config.json wins)."""
    from mtrun_mert.loading import hubert_config_from_dict

    return hubert_config_from_dict(PRESETS[preset])


class LayerAggregator(nn.Module):
    """A 1-D convolution across the layer axis: the ``L+1`` hidden states are the input
    channels, one output channel, kernel size 1, applied at every time step and feature.

    That is a learned weighted sum of the layers plus a bias (``Conv1d(L+1, 1, 1)`` on
    ``[B*T, L+1, D]``), the aggregator of MERT's own downstream recipe kept per frame so the
    projector sees the time sequence. Initialised to the plain mean of the layers, so an
    untrained aggregator is a sensible (not random) mix.
    """

    def __init__(self, num_layers: int):
        super().__init__()
        self.conv = nn.Conv1d(num_layers, 1, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / num_layers)
            self.conv.bias.zero_()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, L+1, T, D]`` -> ``[B, T, D]``; the same as the conv on ``[B*T, L+1, D]``."""
        weight = self.conv.weight.view(-1).to(hidden_states.dtype)
        return torch.einsum("bltd,l->btd", hidden_states, weight) + self.conv.bias.to(hidden_states.dtype)


def _check_preset(instance: Any, attribute: Any, value: str) -> None:
    if value not in PRESETS:
        raise ValueError(f"must be one of {', '.join(PRESETS)} (got {value!r})")


class MertEncoder(nn.Module):
    """MERT-v1 on ``transformers.HubertModel`` + a trainable aggregator over all its layers.

    ``preprocess`` normalises each waveform to zero mean and unit variance, as MERT's
    ``Wav2Vec2FeatureExtractor`` does (``do_normalize``). ``forward`` runs the backbone
    (under ``torch.no_grad()`` when frozen, so no activations are kept for it), mixes the
    ``L+1`` hidden states with :class:`LayerAggregator` and returns the 75 Hz sequence as
    ``tokens`` ``[B, T, D]``, its time mean as ``pooled`` and an all-True ``mask`` (every item
    of a batch has the same number of frames).

    ``frozen`` freezes the backbone only: the aggregator always trains (DuET-MC's trainable
    parameters are the aggregator and the projectors).
    """

    provides: ClassVar[frozenset[str]] = frozenset({"hidden_states"})

    @attrs.frozen
    class Config:
        preset: str = attrs.field(default="330m", validator=_check_preset, metadata={"help": "model size: 95m, 330m (MERT-v1 hub sizes) or tiny (tests, CPU profiles); ignored for the backbone's shape when `pretrained` is set"})
        pretrained: str = attrs.field(default="", metadata={"help": "'' = random init from the preset; else a hub name (m-a-p/MERT-v1-330M) or a local folder with config.json and pytorch_model.bin/model.safetensors"})
        frozen: bool = attrs.field(default=True, metadata={"help": "freeze the MERT backbone (eval mode, no gradients); the layer aggregator trains either way"})
        normalize: bool | None = attrs.field(default=None, metadata={"help": "zero-mean/unit-variance waveform normalisation; unset = the checkpoint's preprocessor_config.json do_normalize (true for MERT-v1), or true"})

    token_grid = None
    sample_rate = SAMPLE_RATE

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        preprocessor: dict[str, Any] = {}
        self.load_report = None
        if config.pretrained:
            from mtrun_mert.loading import load_backbone

            self.backbone, self.load_report, preprocessor = load_backbone(config.pretrained)
        else:
            from transformers import HubertModel

            self.backbone = HubertModel(preset_config(config.preset))
        hf = self.backbone.config
        self.sample_rate = int(preprocessor.get("sampling_rate", SAMPLE_RATE))
        self.normalize = bool(preprocessor.get("do_normalize", True)) if config.normalize is None else config.normalize
        self.output_dim = int(hf.hidden_size)
        self.num_layers = int(hf.num_hidden_layers) + 1
        self.aggregator = LayerAggregator(self.num_layers)
        if config.frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> MertEncoder:
        """Keep a frozen backbone in eval mode whatever the parent module asks."""
        super().train(mode)
        if self.config.frozen:
            self.backbone.eval()
        return self

    def preprocess(self, waveforms: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` at 24 kHz -> ``[B, T]`` float32, per-item zero mean / unit variance.

        Same formula as ``Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm``:
        ``(x - mean) / sqrt(var + 1e-7)`` with the population variance.
        """
        x = waveforms.float()
        if x.ndim == 3:  # [B, C, T] -> mono
            x = x.mean(1)
        if not self.normalize:
            return x
        centred = x - x.mean(-1, keepdim=True)
        # The population variance as the centred clip's squared norm over its length, not
        # torch.var: no temporary and no Welford loop (32 clips of 2.56 s: 2.3 ms against var's
        # 13), within 4e-6 of the torch.var formula after the division.
        var = torch.linalg.vector_norm(centred, dim=-1, keepdim=True).square() / x.shape[-1]
        scale = torch.sqrt(var + 1e-7)
        # In place only where autograd does not need the centred clip (a waveform augmenter's
        # gradient, an attack on the input) to differentiate the norm.
        return centred / scale if centred.requires_grad else centred.div_(scale)

    def _hidden_states(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.backbone(input_values=features, output_hidden_states=True).hidden_states

    def forward(self, features: torch.Tensor, *, keep_index: torch.Tensor | None = None, output_hidden_states: bool = False) -> EncoderOutput:
        """Encode preprocessed waveforms ``[B, T]``; ``keep_index`` is not supported (no grid)."""
        if keep_index is not None:
            raise ValueError("MERT has no token grid (token_grid is None); it cannot drop tokens with keep_index")
        if self.config.frozen:
            with torch.no_grad():
                hidden = self._hidden_states(features)
        else:
            hidden = self._hidden_states(features)
        tokens = self.aggregator(torch.stack(hidden, dim=1))
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(tokens=tokens, pooled=tokens.mean(1), mask=mask, hidden_states=tuple(hidden) if output_hidden_states else None)
