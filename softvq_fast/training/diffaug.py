"""DiffAugment (Zhao et al., 2020) as the authors apply it before their discriminator.

A policy is a comma-separated list of augmentations, applied in order:
  color        brightness x + (r - 0.5); saturation (x - m_c) * 2r + m_c with m_c the mean over
               channels; contrast (x - m) * (r + 0.5) + m with m the mean over channels and pixels;
               one r ~ U[0, 1) per sample for each of the three
  translation  shift by (dy, dx), each uniform in [-s, s] per sample, s = int(size / 8 + 0.5);
               pixels shifted in from outside are 0
  cutout_R     zero a rectangle of int(H R + 0.5) x int(W R + 0.5) (R a ratio, e.g. cutout_0.2)
               centred per sample at (cy, cx) uniform in [0, H - (h mod 2)] x [0, W - (w mod 2)],
               clipped to the image
Each augmentation of the policy is applied to the whole batch or skipped: one draw u ~ U[0, 1) per
augmentation and call, skipped when u > probability (the authors' per-batch rule, not per sample).

Randomness comes from `generator` (torch's default generator when None), drawn in this order for
each augmentation: u; then, if applied, brightness, saturation, contrast r (color), dy then dx
(translation), cy then cx (cutout). Per-sample draws are made for the whole global batch
(`global_batch`) and sliced, so that ranks holding parts of one batch with the same generator state
augment it as one process would.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.nn import functional as F

__all__ = ["diff_augment", "parse_policy", "Augmentation"]

TRANSLATION_RATIO = 0.125


class _Draws:
    """Per-sample draws of a global batch, sliced to this process's rows."""

    def __init__(self, x: torch.Tensor, generator: torch.Generator | None, global_batch: tuple[int, int] | None) -> None:
        self.generator = generator
        self.device = generator.device if generator is not None else x.device
        self.target = x.device
        self.start, self.total = global_batch if global_batch is not None else (0, x.shape[0])
        self.rows = x.shape[0]
        if self.start < 0 or self.start + self.rows > self.total:
            raise ValueError(
                f"global_batch={global_batch}: rows {self.start}..{self.start + self.rows - 1} of x "
                f"(batch {self.rows}) do not fit in a global batch of {self.total}"
            )

    def coin(self) -> float:
        return float(torch.rand((), generator=self.generator, device=self.device))

    def uniform(self, dtype: torch.dtype) -> torch.Tensor:
        """(rows, 1, 1, 1) uniform in [0, 1)."""
        r = torch.rand(self.total, generator=self.generator, device=self.device, dtype=dtype)
        return r[self.start:self.start + self.rows].to(self.target).view(-1, 1, 1, 1)

    def integers(self, low: int, high: int) -> torch.Tensor:
        """(rows,) int64 uniform in [low, high)."""
        r = torch.randint(low, high, (self.total,), generator=self.generator, device=self.device)
        return r[self.start:self.start + self.rows].to(self.target)


def _color(x: torch.Tensor, draws: _Draws) -> torch.Tensor:
    x = x + (draws.uniform(x.dtype) - 0.5)
    channel_mean = x.mean(dim=1, keepdim=True)
    x = (x - channel_mean) * (draws.uniform(x.dtype) * 2) + channel_mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (draws.uniform(x.dtype) + 0.5) + mean


def _translation(x: torch.Tensor, draws: _Draws) -> torch.Tensor:
    b, _, h, w = x.shape
    shift_h, shift_w = int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)
    dy = draws.integers(-shift_h, shift_h + 1)
    dx = draws.integers(-shift_w, shift_w + 1)
    # out[b, :, i, j] = x[b, :, i + dy_b, j + dx_b], zero outside: read from x padded by one zero
    # row/column on each side, with source indices clamped onto that padding.
    rows = (torch.arange(h, device=x.device)[None] + dy[:, None] + 1).clamp(0, h + 1)
    cols = (torch.arange(w, device=x.device)[None] + dx[:, None] + 1).clamp(0, w + 1)
    padded = F.pad(x, (1, 1, 1, 1))
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, draws: _Draws, ratio: float) -> torch.Tensor:
    _, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    centre_y = draws.integers(0, h + (1 - size_h % 2))
    centre_x = draws.integers(0, w + (1 - size_w % 2))
    top, left = centre_y - size_h // 2, centre_x - size_w // 2
    i = torch.arange(h, device=x.device)[None]
    j = torch.arange(w, device=x.device)[None]
    inside_rows = (i >= top[:, None]) & (i < (top + size_h)[:, None])
    inside_cols = (j >= left[:, None]) & (j < (left + size_w)[:, None])
    keep = ~(inside_rows[:, :, None] & inside_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


class Augmentation(NamedTuple):
    name: str
    apply: Callable[[torch.Tensor, _Draws], torch.Tensor]


def parse_policy(policy: str) -> list[Augmentation]:
    """"color,translation,cutout_0.2" -> the augmentations in order ("" -> none). Raises
    ValueError naming the policy and the accepted names."""
    augmentations = []
    for name in filter(None, (part.strip() for part in policy.split(","))):
        if name == "color":
            augmentations.append(Augmentation(name, _color))
        elif name == "translation":
            augmentations.append(Augmentation(name, _translation))
        elif name.startswith("cutout_"):
            try:
                ratio = float(name[len("cutout_"):])
            except ValueError:
                ratio = -1.0
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"policy {policy!r}: {name!r} needs a ratio in [0, 1], e.g. cutout_0.2")
            augmentations.append(Augmentation(name, lambda x, draws, ratio=ratio: _cutout(x, draws, ratio)))
        else:
            raise ValueError(
                f"policy {policy!r}: unknown augmentation {name!r}; expected color, translation or cutout_<ratio>"
            )
    return augmentations


def diff_augment(
    x: torch.Tensor,
    policy: str = "color,translation,cutout_0.2",
    probability: float = 0.5,
    generator: torch.Generator | None = None,
    global_batch: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Augment images x (B, C, H, W) by `policy`, each augmentation applied to the whole batch
    with `probability` (see the module docstring for the definitions and the draw order).
    Differentiable in x. `global_batch` = (first row, global batch size) when x is a slice of a
    larger batch that other processes augment with the same generator state."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability={probability} must be in [0, 1]")
    augmentations = parse_policy(policy)
    draws = _Draws(x, generator, global_batch)
    for augmentation in augmentations:
        if draws.coin() > probability:
            continue
        x = augmentation.apply(x, draws)
    return x.contiguous()
