"""FLAP's masked reconstruction objective: an MAE decoder over the audio encoder's kept tokens."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
from torch import nn

from mtrun import MtrunError, Need, ObjectiveOutput, StepOutputs, TransformerBlock, sincos_table

__all__ = ["MaeReconstruction", "patchify", "restore_order"]


def patchify(features: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, 1, T, F]`` (or ``[B, T, F]``) -> ``[B, (T/p)*(F/p), p*p]``, time-major like the encoder.

    Patch ``t*K + f`` holds frames ``t*p .. t*p+p-1`` and bins ``f*p .. f*p+p-1``, flattened
    frame by frame (AudioMAE's ``nchpwq -> nhwpqc`` patchify with one channel).
    """
    if features.ndim == 4:
        if features.shape[1] != 1:
            raise ValueError(f"patchify expects one channel (got {tuple(features.shape)})")
        features = features[:, 0]
    b, t, f = features.shape
    m, k = t // patch, f // patch
    x = features[:, : m * patch, : k * patch].reshape(b, m, patch, k, patch)
    return x.permute(0, 1, 3, 2, 4).reshape(b, m * k, patch * patch)


def restore_order(kept: torch.Tensor, keep_index: torch.Tensor, fill: torch.Tensor, total: int) -> torch.Tensor:
    """Place ``kept`` ``[B, N', D]`` at ``keep_index`` in a ``[B, total, D]`` grid filled with ``fill`` ``[D]``.

    Differentiable in ``kept`` and ``fill`` (the [MASK] token learns).
    """
    b, _, d = kept.shape
    grid = fill.to(kept.dtype).expand(b, total, d)
    return grid.scatter(1, keep_index.unsqueeze(-1).expand(-1, -1, d), kept)


class MaeReconstruction(nn.Module):
    """Reconstruct the dropped fbank patches from the kept tokens (FLAP's auxiliary loss).

    Encoder tokens ``[B, N', D]`` (patch tokens in ``keep_index`` order, no [CLS]) -> Linear to
    the decoder width -> scattered back into the full ``M x K`` grid with a learned [MASK]
    token at the dropped places -> fixed sin-cos positions -> ``depth`` pre-norm blocks ->
    LayerNorm -> Linear to the ``p*p`` values of each patch. The loss is the MSE against the
    patches of ``batch.clean_features`` (the normalised fbank *before* any ``features``
    augmenter such as SpecAugment, patchified in the encoder's time-major order; a batch built
    without the system, which has no ``clean_features``, falls back to ``batch.features``),
    averaged over the **dropped** patches only. Rebuilding the augmented features instead would
    teach the decoder to reproduce SpecAugment's zeroed bands.

    Needs the audio encoder (injected) for its ``token_grid``, ``output_dim`` and
    ``patch_size``. When nothing was dropped (evaluation, or no masking augmenter) the loss is
    zero (still connected to the decoder's parameters, so DDP sees every parameter used) and
    ``metrics["skipped"]`` is 1.
    """

    requires: ClassVar[tuple[Need, ...]] = (Need("audio_encoder", "keep_index", "mae-recon reconstructs the tokens the encoder dropped"),)

    @attrs.frozen
    class Config:
        decoder_dim: int = attrs.field(default=512, validator=attrs.validators.gt(0), metadata={"help": "decoder width (FLAP / AudioMAE: 512); divisible by 4 and by heads"})
        depth: int = attrs.field(default=4, validator=attrs.validators.gt(0), metadata={"help": "decoder transformer layers (FLAP: 4)"})
        heads: int = attrs.field(default=4, validator=attrs.validators.gt(0), metadata={"help": "decoder attention heads (FLAP: 4)"})
        mlp_ratio: float = attrs.field(default=4.0, validator=attrs.validators.gt(0), metadata={"help": "decoder MLP hidden width as a multiple of decoder_dim"})
        norm_pix_loss: bool = attrs.field(default=False, metadata={"help": "normalise each target patch to zero mean / unit variance before the MSE (MAE's norm_pix_loss)"})

    def __init__(self, config: Config, *, audio_encoder: Any):
        super().__init__()
        grid = getattr(audio_encoder, "token_grid", None)
        if grid is None:
            raise MtrunError(
                "objective mae-recon needs an audio encoder with a token grid (e.g. mavil); "
                f"{type(audio_encoder).__name__} has token_grid = None"
            )
        if config.decoder_dim % 4 or config.decoder_dim % config.heads:
            raise MtrunError(f"mae-recon: decoder_dim {config.decoder_dim} must be divisible by 4 and by heads {config.heads}")
        self.config = config
        self.grid: tuple[int, int] = (int(grid[0]), int(grid[1]))
        self.num_tokens = self.grid[0] * self.grid[1]
        self.patch = int(getattr(audio_encoder, "patch_size", 16))
        dim = config.decoder_dim
        self.decoder_embed = nn.Linear(int(audio_encoder.output_dim), dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("decoder_pos_embed", sincos_table(dim, self.grid).unsqueeze(0), persistent=False)
        self.decoder_blocks = nn.ModuleList(TransformerBlock(dim, config.heads, mlp_ratio=config.mlp_ratio, eps=1e-6) for _ in range(config.depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, self.patch * self.patch)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def decode(self, tokens: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
        """Predicted patch values ``[B, M*K, p*p]`` for every grid place."""
        x = self.decoder_embed(tokens)
        x = restore_order(x, keep_index, self.mask_token[0, 0], self.num_tokens)
        x = x + self.decoder_pos_embed.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    def loss_from(self, tokens: torch.Tensor, keep_index: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked-patch MSE and the ``[B, M*K]`` float mask of dropped places (1 = dropped)."""
        target = patchify(features, self.patch)
        if target.shape[1] != self.num_tokens:
            raise MtrunError(f"mae-recon: features make {target.shape[1]} patches but the encoder's grid {self.grid} has {self.num_tokens}")
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        pred = self.decode(tokens, keep_index).float()
        dropped = torch.ones(target.shape[:2], device=target.device)
        dropped.scatter_(1, keep_index, 0.0)
        per_patch = (pred - target.float()).pow(2).mean(dim=-1)
        return (per_patch * dropped).sum() / dropped.sum().clamp_min(1.0), dropped

    def forward(self, outputs: StepOutputs) -> ObjectiveOutput:
        keep_index = outputs.audio.keep_index
        tokens = outputs.audio.tokens
        if keep_index is None or keep_index.shape[1] >= self.num_tokens:
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return ObjectiveOutput(loss=zero, metrics={"skipped": 1.0, "masked_fraction": 0.0})
        keep_index = keep_index.to(device=tokens.device, dtype=torch.long)
        target = outputs.batch.get("clean_features")
        if target is None:
            target = outputs.batch.features
        loss, dropped = self.loss_from(tokens, keep_index, target)
        return ObjectiveOutput(loss=loss, metrics={"mse_masked": loss.detach(), "masked_fraction": dropped.mean().detach(), "skipped": 0.0})
