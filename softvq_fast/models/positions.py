"""Fixed sin-cos position tables of the generators (frozen `pos_embed` parameters).

Both are stored in the released checkpoints; these functions rebuild them for models made from
scratch (presets, benchmarks).
"""
from __future__ import annotations

import math

import torch


def sincos_1d(length: int, dim: int) -> torch.Tensor:
    """(length, dim) table for 1-D token sequences: sin at even and cos at odd channels, channel
    pair i at frequency 10000^(-2i/dim) (the tokenizer-generator convention)."""
    if dim % 2:
        raise ValueError(f"sin-cos positions need an even dim, got {dim}")
    position = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    freqs = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.empty(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * freqs)
    table[:, 1::2] = torch.cos(position * freqs)
    return table.float()


def _sincos_halves(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(M, dim): [sin | cos] of positions times 10000^(-k/(dim/2)), k < dim/2."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double().reshape(-1, 1) * omega
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(grid_size: int, dim: int) -> torch.Tensor:
    """(grid_size**2, dim) table for a square patch grid in row-major order: the first dim/2
    channels encode the column index, the last dim/2 the row index (the MAE/DiT convention)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.cat([_sincos_halves(cols, dim // 2), _sincos_halves(rows, dim // 2)], dim=1).float()
