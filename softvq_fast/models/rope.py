"""2-D rotary position embeddings of the authors' tokenizer ViTs (`use_rope`, `rope_mixed`).

Only the image tokens are rotated: class/register tokens before them and latent tokens after them
keep their features. Channel pairs (2i, 2i+1) of each head are rotated by an angle that depends
on the patch's column x and row y (row-major patch order):
  axial: angle = x * f_j for the first head_dim/4 pairs and y * f_j for the last head_dim/4,
         f_j = theta^(-4j / head_dim), the same in every block and head;
  mixed: angle = x * fx[block, head, pair] + y * fy[block, head, pair], learned per block
         (parameter `freqs` of shape (2, depth, heads * head_dim / 2)).
Rotations are computed in float32 and cast back, as the authors do.
"""
from __future__ import annotations

import math

import torch


def grid_positions(grid_h: int, grid_w: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and row index (float32, shape (grid_h * grid_w,)) of each patch in row-major order."""
    t = torch.arange(grid_h * grid_w, dtype=torch.float32, device=device)
    return t % grid_w, torch.div(t, grid_w, rounding_mode="floor")


def _base_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float() / head_dim))


def axial_angles(head_dim: int, grid_h: int, grid_w: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Rotation angles (grid_h * grid_w, 1, head_dim / 2) shared by all heads and blocks."""
    t_x, t_y = grid_positions(grid_h, grid_w, device=device)
    f = _base_frequencies(head_dim, theta, device)
    return torch.cat([torch.outer(t_x, f), torch.outer(t_y, f)], dim=-1).unsqueeze(1)


def init_mixed_frequencies(head_dim: int, heads: int, depth: int, theta: float) -> torch.Tensor:
    """Random initial `freqs` (2, depth, heads * head_dim / 2): per block and head, the base
    frequencies along a random direction and the direction 90 degrees from it."""
    magnitude = _base_frequencies(head_dim, theta)
    per_block = []
    for _ in range(depth):
        angle = torch.rand(heads, 1) * 2 * math.pi
        fx = torch.cat([magnitude * torch.cos(angle), magnitude * torch.cos(angle + math.pi / 2)], dim=-1)
        fy = torch.cat([magnitude * torch.sin(angle), magnitude * torch.sin(angle + math.pi / 2)], dim=-1)
        per_block.append(torch.stack([fx, fy]))
    return torch.stack(per_block, dim=1).reshape(2, depth, -1)


def mixed_angles(freqs: torch.Tensor, grid_h: int, grid_w: int, heads: int) -> torch.Tensor:
    """Rotation angles (depth, grid_h * grid_w, heads, head_dim / 2) from learned `freqs`."""
    t_x, t_y = grid_positions(grid_h, grid_w, device=freqs.device)
    freqs = freqs.float()
    angles = t_x[None, :, None] * freqs[0][:, None, :] + t_y[None, :, None] * freqs[1][:, None, :]
    return angles.unflatten(-1, (heads, -1))


def rotate_image_tokens(x: torch.Tensor, angles: torch.Tensor, start: int) -> torch.Tensor:
    """Rotate tokens start .. start + N of x (B, S, H, D) by angles (N, H or 1, D / 2)."""
    count = angles.shape[0]
    image = x[:, start : start + count].float().unflatten(-1, (-1, 2))
    cos, sin = torch.cos(angles), torch.sin(angles)
    even, odd = image[..., 0], image[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    return torch.cat([x[:, :start], rotated.to(x.dtype), x[:, start + count :]], dim=1)
