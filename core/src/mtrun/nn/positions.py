"""Fixed position tables shared by encoders and their reconstruction decoders."""

from __future__ import annotations

import torch

__all__ = ["sincos_table"]


def sincos_table(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """AudioMAE's fixed 2-D sin-cos positions ``[M*K, dim]`` for a time-major ``(M, K)`` grid.

    As ``get_2d_sincos_pos_embed_flexible`` builds it: ``meshgrid(freq, time)`` puts the
    frequency coordinate first, so the first ``dim/2`` channels encode the position within the
    group (frequency) and the last ``dim/2`` the time group; each half is
    ``[sin(p·ω), cos(p·ω)]`` with ``ω_i = 10000^(-i / (dim/4))``. An encoder and the decoder
    that reconstructs its patches must use the same table, hence one function.
    """
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4 (got {dim})")
    m, k = grid
    time = torch.arange(m, dtype=torch.float64).repeat_interleave(k)  # time-major token order
    freq = torch.arange(k, dtype=torch.float64).repeat(m)
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def half(pos: torch.Tensor) -> torch.Tensor:
        angles = pos[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([half(freq), half(time)], dim=1).float()
