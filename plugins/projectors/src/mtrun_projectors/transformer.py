"""The DuET-MC projector: a small pre-norm Transformer over the encoder's tokens, read at [CLS]."""

from __future__ import annotations

import attrs
import torch
from torch import nn

from mtrun import EncoderOutput, TransformerBlock, positive

__all__ = ["MaskedStandardize", "TransformerProjector"]


def _probability(_instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1) (got {value})")


class MaskedStandardize(nn.Module):
    """Per-feature standardisation of token sequences over the real tokens of a batch.

    BatchNorm without the affine part, with padding excluded from the statistics: training uses
    the batch's mean and variance and updates running estimates (momentum 0.1), evaluation uses
    the running ones. It removes what every clip shares. Random or frozen features can carry a
    shared offset far larger than what tells clips apart. A pre-norm stack's LayerNorms keep that
    offset, so the contrastive loss stalls at ln(batch) (docs/duet_mc_ablation.md).
    """

    def __init__(self, features: int, *, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``tokens [B, N, D]``, ``mask [B, N]`` (True = real) -> standardised tokens."""
        if self.training:
            x = tokens.float()
            # Masked sums rather than boolean indexing: no host-device sync on a GPU.
            weight = torch.ones_like(x[..., :1]) if mask is None else mask[..., None].to(x.dtype)
            n = weight.sum()
            mean = (x * weight).sum((0, 1)) / n.clamp_min(1.0)
            var = ((x - mean).square() * weight).sum((0, 1)) / n.clamp_min(1.0)
            with torch.no_grad():
                # A batch without real tokens has no statistics to learn from: keep the old ones.
                keep = (n > 0).to(x.dtype) * self.momentum
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean.detach(), keep)
                self.running_var.lerp_(unbiased.detach(), keep)
        else:
            mean, var = self.running_mean, self.running_var
        return ((tokens.float() - mean) * torch.rsqrt(var + self.eps)).to(tokens.dtype)


class TransformerProjector(nn.Module):
    """Transformer projector with a learned [CLS] token (DuET-MC's per-branch projector).

    ``tokens [B, N, in_features]`` -> ``Linear(in_features, width)`` -> prepend [CLS] ->
    ``layers`` pre-norm :class:`mtrun.nn.TransformerBlock` s (core's attention function, the
    encoder's padding mask as ``key_padding_mask``) -> final LayerNorm -> the [CLS] position,
    optionally through ``Linear(width, dim)``.

    Padded tokens are never attended to, so the output does not depend on what the encoder
    left in padded positions. No position embedding is added: the encoders' tokens already
    carry position (MERT's conv positions, CLIP's learned table), and a sequence-length-free
    projector works for any clip length.

    Args:
        config: The recipe settings.
        in_features: Width of the encoder's tokens (injected by the assembler).
    """

    @attrs.frozen
    class Config:
        width: int = attrs.field(default=256, validator=positive, metadata={"help": "Transformer width (DuET-MC: 256)"})
        layers: int = attrs.field(default=2, validator=positive, metadata={"help": "number of Transformer layers (DuET-MC: 2)"})
        heads: int = attrs.field(default=2, validator=positive, metadata={"help": "attention heads; must divide width (DuET-MC: 2)"})
        mlp_ratio: float = attrs.field(
            default=4.0, metadata={"help": "hidden width of each block's MLP as a multiple of width"}
        )
        dropout: float = attrs.field(default=0.0, validator=_probability, metadata={"help": "dropout after attention/MLP projections"})
        attn_dropout: float = attrs.field(default=0.0, validator=_probability, metadata={"help": "dropout on attention weights"})
        final_norm: bool = attrs.field(default=True, metadata={"help": "LayerNorm on the [CLS] output (pre-norm stacks end with one)"})
        input_norm: str = attrs.field(
            default="none",
            validator=attrs.validators.in_(("none", "batch")),
            metadata={"help": "none (DuET-MC), or batch: standardise each input feature over the batch's real tokens (running stats at eval) — for random-init or badly scaled frozen encoders"},
        )
        dim: int = attrs.field(
            default=0,
            validator=attrs.validators.ge(0),
            metadata={"help": "if > 0, a final Linear(width, dim) maps [CLS] to this width; 0 = output the [CLS] vector (width)"},
        )

        def __attrs_post_init__(self) -> None:
            if self.width % self.heads:
                raise ValueError(f"heads ({self.heads}) must divide width ({self.width})")
            if self.mlp_ratio <= 0:
                raise ValueError(f"mlp_ratio must be positive (got {self.mlp_ratio})")

    def __init__(self, config: Config, *, in_features: int):
        super().__init__()
        self.config = config
        self.output_dim = config.dim or config.width
        self.input_norm = MaskedStandardize(in_features) if config.input_norm == "batch" else None
        self.input = nn.Linear(in_features, config.width)
        # 1-D so the trainer's "1-D parameters get no weight decay" rule covers it, like norms.
        self.cls_token = nn.Parameter(torch.zeros(config.width))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                config.width,
                config.heads,
                mlp_ratio=config.mlp_ratio,
                eps=1e-5,
                drop=config.dropout,
                attn_drop=config.attn_dropout,
            )
            for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(config.width) if config.final_norm else nn.Identity()
        self.head = nn.Linear(config.width, config.dim) if config.dim else nn.Identity()

    def forward(self, encoded: EncoderOutput) -> torch.Tensor:
        """``encoded.tokens [B, N, in_features]`` and ``encoded.mask [B, N]`` -> ``[B, output_dim]``."""
        tokens = encoded.tokens
        if self.input_norm is not None:
            tokens = self.input_norm(tokens, encoded.mask)
        x = self.input(tokens)
        b = x.shape[0]
        cls = self.cls_token.to(x.dtype).expand(b, 1, -1)
        x = torch.cat([cls, x], dim=1)
        mask = encoded.mask
        if mask is not None:
            mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask.bool()], dim=1)
        for block in self.blocks:
            x = block(x, key_padding_mask=mask)
        return self.head(self.norm(x[:, 0]))
