"""MuLaP's fusion: a ViLBERT-style two-stream Transformer with co-attention layers.

Norm placement follows ViLBERT, which is BERT: post-norm everywhere (``LayerNorm(x + f(x))``),
LayerNorm eps 1e-12, GELU feed-forward of 4x the width, dropout 0.1. The text stream enters as
the text encoder's final hidden states, which a post-norm BERT has already normalised, so every
stream the co-attention layers read is normalised the same way.
"""

from __future__ import annotations

import math

import attrs
import mtrun
import torch
from mtrun import EncoderOutput
from torch import nn

__all__ = ["CoAttention", "CoAttentionLayer", "PostNormBlock"]


def _dropout(_instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"must be in [0, 1) (got {value})")


def _all_real(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return (
        torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if mask is None
        else mask.bool()
    )


def sincos_1d(length: int, width: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Transformer sin-cos positions ``[length, width]`` (no table, so no maximum length)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(
        torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width)
    )
    table = torch.zeros(length, width, device=device)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: width // 2])
    return table.to(dtype)


class FeedForward(nn.Module):
    """BERT's intermediate and output dense layers with GELU between."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class PostNormBlock(nn.Module):
    """A BERT layer: ``x = LN(x + attn(x))``, then ``x = LN(x + ffn(x))``; padding keys ignored."""

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        mlp_ratio: float,
        dropout: float,
        attn_dropout: float,
        eps: float,
    ):
        super().__init__()
        self.attn = mtrun.MultiHeadAttention(dim, heads, attn_drop=attn_dropout, proj_drop=dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, key_padding_mask=mask))
        return self.norm2(x + self.mlp(x))


class _Stream(nn.Module):
    """One stream's half of a co-attention layer: projections into and out of the common width."""

    def __init__(self, dim: int, co_width: int, *, mlp_ratio: float, dropout: float, eps: float):
        super().__init__()
        self.query = nn.Linear(dim, co_width)
        self.key = nn.Linear(dim, co_width)
        self.value = nn.Linear(dim, co_width)
        self.out = nn.Linear(co_width, dim)
        self.drop = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def finish(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.out(context)))
        return self.norm2(x + self.mlp(x))


class CoAttentionLayer(nn.Module):
    """ViLBERT's connection layer: each stream's queries attend to the other stream's keys and
    values, all computed from the layer's inputs (so both directions see the same states), in a
    common width ``co_width``; then per stream a post-norm residual and feed-forward."""

    def __init__(
        self,
        audio_dim: int,
        text_dim: int,
        *,
        co_width: int,
        heads: int,
        mlp_ratio: float,
        dropout: float,
        attn_dropout: float,
        eps: float,
    ):
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.audio = _Stream(audio_dim, co_width, mlp_ratio=mlp_ratio, dropout=dropout, eps=eps)
        self.text = _Stream(text_dim, co_width, mlp_ratio=mlp_ratio, dropout=dropout, eps=eps)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        out = mtrun.attention(
            self._split(q),
            self._split(k),
            self._split(v),
            key_padding_mask=key_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)

    def forward(
        self,
        audio: torch.Tensor,
        audio_mask: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a, t = self.audio, self.text
        audio_ctx = self._attend(
            a.query(audio), t.key(text), t.value(text), text_mask
        )  # audio asks the text
        text_ctx = self._attend(
            t.query(text), a.key(audio), a.value(audio), audio_mask
        )  # text asks the audio
        return a.finish(audio, audio_ctx), t.finish(text, text_ctx)


class CoAttention(nn.Module):
    """ViLBERT-style co-attention over the audio and text encoders' tokens (``[fusion]``).

    Audio stream: ``Linear(audio_features, audio_width)`` + fixed sin-cos positions, LayerNorm,
    dropout (BERT's embedding layer), then ``audio_layers`` post-norm self-attention blocks.
    Text stream: the text encoder's tokens as they come (in MuLaP the text encoder is BERT's
    first 6 layers), then ``text_layers`` further blocks (0 by default). Then ``co_layers``
    :class:`CoAttentionLayer` s. Poolers read each stream's first token (musicnn's mean-of-chunks
    token, BERT's [CLS]): ``act(Linear(width, output_dim))``.

    Returns the fused ``(audio, text)`` streams: tokens in each stream's width (``audio_width``,
    ``text_width`` = the text encoder's), pooled ``[B, output_dim]``, the input masks. Padding
    (mask False) is never attended to in either direction, so nothing written at padded
    positions reaches a real position.

    Attributes:
        output_dim: Width of both pooled vectors (``atm``'s classifier input).
        audio_width: Width of the fused audio tokens (``mam``'s head input).
        text_width: Width of the fused text tokens (``mlm``'s head input).
    """

    @attrs.frozen
    class Config:
        audio_width: int = attrs.field(
            default=256,
            validator=mtrun.positive,
            metadata={"help": "width of the audio stream (MuLaP: 256)"},
        )
        audio_layers: int = attrs.field(
            default=6,
            validator=mtrun.non_negative,
            metadata={
                "help": "self-attention blocks of the audio stream before co-attention (MuLaP: 6)"
            },
        )
        audio_heads: int = attrs.field(
            default=8,
            validator=mtrun.positive,
            metadata={
                "help": "attention heads of the audio blocks; must divide audio_width (MuLaP: 8)"
            },
        )
        audio_positions: bool = attrs.field(
            default=True,
            metadata={
                "help": "add fixed sin-cos positions to the audio chunk tokens (they are ordered in time)"
            },
        )
        text_layers: int = attrs.field(
            default=0,
            validator=mtrun.non_negative,
            metadata={
                "help": "extra self-attention blocks on the text stream; MuLaP: 0 (its text stream is the 6-layer text encoder itself)"
            },
        )
        text_heads: int = attrs.field(
            default=12,
            validator=mtrun.positive,
            metadata={
                "help": "heads of the extra text blocks; must divide the text encoder's width (BERT-base: 12)"
            },
        )
        co_layers: int = attrs.field(
            default=2, validator=mtrun.positive, metadata={"help": "co-attention layers (MuLaP: 2)"}
        )
        co_width: int = attrs.field(
            default=1024,
            validator=mtrun.positive,
            metadata={
                "help": "common width co-attention queries, keys and values are projected to (ViLBERT's bi_hidden_size 1024; MuLaP does not state it)"
            },
        )
        co_heads: int = attrs.field(
            default=8,
            validator=mtrun.positive,
            metadata={"help": "co-attention heads; must divide co_width (ViLBERT: 8)"},
        )
        output_dim: int = attrs.field(
            default=1024,
            validator=mtrun.positive,
            metadata={"help": "width of both pooled vectors (ViLBERT: 1024)"},
        )
        pooler_activation: str = attrs.field(
            default="tanh",
            validator=attrs.validators.in_(("tanh", "relu")),
            metadata={
                "help": "activation of the poolers: tanh (BERT's pooler) or relu (ViLBERT's co-attention poolers)"
            },
        )
        mlp_ratio: float = attrs.field(
            default=4.0,
            validator=mtrun.positive,
            metadata={
                "help": "feed-forward hidden width as a multiple of each stream's width (BERT: 4)"
            },
        )
        dropout: float = attrs.field(
            default=0.1,
            validator=_dropout,
            metadata={
                "help": "dropout on embeddings, residual branches and feed-forwards (BERT: 0.1)"
            },
        )
        attn_dropout: float = attrs.field(
            default=0.1,
            validator=_dropout,
            metadata={"help": "dropout on attention weights (BERT: 0.1)"},
        )
        eps: float = attrs.field(
            default=1e-12,
            validator=mtrun.positive,
            metadata={"help": "LayerNorm epsilon (BERT: 1e-12)"},
        )

        def __attrs_post_init__(self) -> None:
            if self.audio_width % self.audio_heads:
                raise ValueError(
                    f"audio_heads ({self.audio_heads}) must divide audio_width ({self.audio_width})"
                )
            if self.co_width % self.co_heads:
                raise ValueError(
                    f"co_heads ({self.co_heads}) must divide co_width ({self.co_width})"
                )
            if self.audio_positions and self.audio_width % 2:
                raise ValueError(
                    f"audio_width must be even for sin-cos positions (got {self.audio_width})"
                )

    def __init__(self, config: Config, *, audio_features: int, text_features: int):
        super().__init__()
        cfg = config
        if cfg.text_layers and text_features % cfg.text_heads:
            raise ValueError(
                f"co-attention: text_heads ({cfg.text_heads}) must divide the text encoder's width ({text_features})"
            )
        self.config = config
        self.output_dim = cfg.output_dim
        self.audio_width = cfg.audio_width
        self.text_width = int(text_features)
        common = {"mlp_ratio": cfg.mlp_ratio, "dropout": cfg.dropout, "eps": cfg.eps}
        self.audio_in = nn.Linear(audio_features, cfg.audio_width)
        self.audio_in_norm = nn.LayerNorm(cfg.audio_width, eps=cfg.eps)
        self.audio_in_drop = nn.Dropout(cfg.dropout)
        self.audio_blocks = nn.ModuleList(
            PostNormBlock(cfg.audio_width, cfg.audio_heads, attn_dropout=cfg.attn_dropout, **common)
            for _ in range(cfg.audio_layers)
        )
        self.text_blocks = nn.ModuleList(
            PostNormBlock(self.text_width, cfg.text_heads, attn_dropout=cfg.attn_dropout, **common)
            for _ in range(cfg.text_layers)
        )
        self.co_blocks = nn.ModuleList(
            CoAttentionLayer(
                cfg.audio_width,
                self.text_width,
                co_width=cfg.co_width,
                heads=cfg.co_heads,
                attn_dropout=cfg.attn_dropout,
                **common,
            )
            for _ in range(cfg.co_layers)
        )
        self.audio_pool = nn.Linear(cfg.audio_width, cfg.output_dim)
        self.text_pool = nn.Linear(self.text_width, cfg.output_dim)
        self.pool_act = nn.Tanh() if cfg.pooler_activation == "tanh" else nn.ReLU()

    def forward(
        self, audio: EncoderOutput, text: EncoderOutput
    ) -> tuple[EncoderOutput, EncoderOutput]:
        """Fuse the encoders' outputs; see the class docstring for what comes back."""
        a_mask, t_mask = _all_real(audio.tokens, audio.mask), _all_real(text.tokens, text.mask)
        a = self.audio_in(audio.tokens)
        if self.config.audio_positions:
            a = a + sincos_1d(a.shape[1], a.shape[2], device=a.device, dtype=a.dtype)
        a = self.audio_in_drop(self.audio_in_norm(a))
        for block in self.audio_blocks:
            a = block(a, a_mask)
        t = text.tokens
        for block in self.text_blocks:
            t = block(t, t_mask)
        for layer in self.co_blocks:
            a, t = layer(a, a_mask, t, t_mask)
        return (
            EncoderOutput(tokens=a, pooled=self.pool_act(self.audio_pool(a[:, 0])), mask=a_mask),
            EncoderOutput(tokens=t, pooled=self.pool_act(self.text_pool(t[:, 0])), mask=t_mask),
        )
