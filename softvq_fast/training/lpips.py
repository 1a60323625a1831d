"""LPIPS with VGG16 (Zhang et al., 2018; the `lpips` package's v0.1 linear heads).

For images x, y in [-1, 1]: both go through the scaling layer ((x - shift) / scale, per channel)
and VGG16; at each of relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 the features are divided by
their L2 norm over channels (+1e-10), the squared difference is weighted per channel by that
layer's linear head (a bias-free 1x1 convolution to one channel) and averaged over space; the five
layers are summed. Each layer's arithmetic is the fused op softvq_fast.ops.lpips_distance (one
pass over the features instead of a dozen eager ones). The heads are read from the installed `lpips` package (its wheel carries
weights/v0.1/vgg.pth) or from a file in that layout; VGG16 from a torchvision `vgg16` state dict.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from softvq_fast.ops.lpips_distance import lpips_distance
from softvq_fast.training.frozen import (
    FrozenModule,
    FrozenWeightsError,
    VGG16Features,
    check_layout,
    load_vgg16,
    locate_weights,
    read_weights,
)

__all__ = ["LPIPS", "lpips_heads_file", "load_lpips_heads"]

VGG16_CHANNELS = (64, 128, 256, 512, 512)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10  # the lpips package's normalize_tensor
_HEADS_LAYOUT = "the lpips v0.1 VGG linear heads (lin0..lin4.model.1.weight, (1, C, 1, 1))"


def lpips_heads_file() -> Path:
    """weights/v0.1/vgg.pth inside the installed `lpips` package (found without importing it);
    FrozenWeightsError when the package is not installed."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        raise FrozenWeightsError(
            "lpips heads: the `lpips` package is not installed (pip install lpips) and no heads file was given"
        )
    return Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"


def load_lpips_heads(source: str | os.PathLike | None = None) -> list[torch.Tensor]:
    """The five linear heads (1, C, 1, 1) from `source` or from the installed package."""
    path = locate_weights(source if source is not None else lpips_heads_file(), "LPIPS VGG heads")
    state = read_weights(path, _HEADS_LAYOUT)
    expected = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(VGG16_CHANNELS)}
    check_layout(expected, state, path, _HEADS_LAYOUT)
    return [state[key] for key in expected]


class LPIPS(FrozenModule):
    """Frozen LPIPS-VGG: forward(x, y) with images (B, 3, H, W) in [-1, 1] -> the distance per
    image (B,). Differentiable in both images (the authors' loss is its mean)."""

    def __init__(self, vgg: VGG16Features, heads: list[torch.Tensor]) -> None:
        super().__init__()
        if [tuple(h.shape) for h in heads] != [(1, c, 1, 1) for c in VGG16_CHANNELS]:
            raise ValueError(f"heads must be 5 tensors (1, C, 1, 1) with C = {VGG16_CHANNELS}")
        self.vgg = vgg
        self.heads = nn.ParameterList(nn.Parameter(h.reshape(-1).clone()) for h in heads)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.freeze()

    @classmethod
    def from_files(cls, vgg_weights: str | os.PathLike, heads_weights: str | os.PathLike | None = None) -> "LPIPS":
        """VGG16 from a torchvision-layout file; heads from `heads_weights` or the lpips package."""
        return cls(load_vgg16(vgg_weights), load_lpips_heads(heads_weights))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x and y must both be (B, 3, H, W), got {tuple(x.shape)} and {tuple(y.shape)}")
        distance = x.new_zeros(x.shape[0])
        for fx, fy, head in zip(self._features(x), self._features(y), self.heads):
            # under autocast the features are in the autocast dtype; the op takes one dtype
            distance = distance + lpips_distance(fx, fy, head.to(fx.dtype), eps=_EPS)
        return distance

    def _features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """VGG16's five feature maps of `image`, each image on its own: autograd records the pass
        only for an image that needs a gradient (in training the real one does not), so the
        backward runs through the reconstructions' pass alone."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and image.requires_grad):
            return self.vgg((image - self.shift) / self.scale)
