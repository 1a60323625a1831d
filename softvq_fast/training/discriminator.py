"""The authors' DINO discriminator: a frozen DINO ViT-S/16 read out at several depths, one
trainable head of 1-D convolutions per readout.

Images in [-1, 1] become ImageNet-normalised pixels at 224 px (above 224 a random 224 crop with
probability 0.5, else a resize: "area" when larger, "bicubic" otherwise). Each readout is the
patch tokens plus the class token, (B, 384, 196): the embedded tokens before the first block and
the outputs of the tapped blocks (2, 5, 8 and 11 by default). A head maps a readout to 196 logits:
spectral-norm conv (kernel 1) -> batch norm -> LeakyReLU(0.2), then a residual block of the same
with kernel 9 (circular padding) averaged with its input by 1/sqrt(2), then a spectral-norm conv to
one channel. The logits of all heads are concatenated: (B, 196 x heads).

Only the heads are the discriminator's parameters and state (`heads.*`, the authors' layout:
spectral norm as weight_orig / weight_u / weight_v); the DINO trunk moves with `.to()` but is
neither a parameter nor in the state dict. Batch norm is synchronised across the ranks of an
initialised process group in training mode (any device and backend, gloo included).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from softvq_fast.training.frozen import DinoViTS16, imagenet_pixels, load_dino_vits16

__all__ = ["SpectralNormConv1d", "SyncBatchNorm1d", "DinoDiscriminator", "zero_key_bias", "all_reduce_sum"]

DEFAULT_TAPS = (2, 5, 8, 11)


class SpectralNormConv1d(nn.Module):
    """Conv1d (circular padding, kernel // 2 each side) with its weight divided by its largest
    singular value sigma = uᵀ W v, W = weight_orig reshaped to (out, in x kernel). In training mode
    each forward first runs one power iteration on the stored vectors, v <- normalise(Wᵀu) then
    u <- normalise(W v), and keeps them (torch.nn.utils.spectral_norm's order and state layout);
    in eval mode u and v are used as stored. Gradients reach W through W / sigma, not through u, v.
    (B, in, L) -> (B, out, L)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, eps: float = 1e-12) -> None:
        super().__init__()
        conv = nn.Conv1d(in_channels, out_channels, kernel_size)  # nn.Conv1d's initialisation
        self.padding = kernel_size // 2
        self.eps = eps
        self.weight_orig = nn.Parameter(conv.weight.detach())
        self.bias = nn.Parameter(conv.bias.detach())
        self.register_buffer("weight_u", F.normalize(torch.randn(out_channels), dim=0, eps=eps))
        self.register_buffer("weight_v", F.normalize(torch.randn(in_channels * kernel_size), dim=0, eps=eps))

    def normalised_weight(self) -> torch.Tensor:
        matrix = self.weight_orig.flatten(1)
        u, v = self.weight_u, self.weight_v
        if self.training:
            with torch.no_grad():
                self.weight_v.copy_(F.normalize(matrix.t() @ self.weight_u, dim=0, eps=self.eps))
                self.weight_u.copy_(F.normalize(matrix @ self.weight_v, dim=0, eps=self.eps))
            # Copies for the graph: the next training forward (real and fake views are separate
            # calls before one backward) updates the buffers in place.
            u, v = self.weight_u.clone(), self.weight_v.clone()
        sigma = torch.dot(u, matrix @ v)
        return self.weight_orig / sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding:
            x = F.pad(x, (self.padding, self.padding), mode="circular")
        return F.conv1d(x, self.normalised_weight(), self.bias)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of `group`; the gradient of every rank's input is the sum of the ranks'
    output gradients (each rank's loss depends on every rank's input through the sum)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of `tensor` over the ranks of `group` (default: all), differentiable: each rank's
    input gets the sum of the ranks' output gradients."""
    return _AllReduceSum.apply(tensor, group or dist.group.WORLD)


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d on (B, C, L) whose training-mode statistics are those of the batch of all ranks
    when a process group of more than one rank is initialised (nn.SyncBatchNorm's semantics, also
    on the CPU with gloo, which nn.SyncBatchNorm refuses); gradients flow through the all-reduce.
    Single process or eval mode: exactly nn.BatchNorm1d. Do not convert it with
    nn.SyncBatchNorm.convert_sync_batchnorm (that would replace it by the CUDA-only module)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, process_group=None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.process_group = process_group

    def _world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self._world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        group = self.process_group or dist.group.WORLD
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        dist.all_reduce(count, group=group)
        # Two passes (mean, then centred squares) for the same accuracy as a local batch norm.
        mean = all_reduce_sum(x.sum(dim=(0, 2)), group) / count
        centred = x - mean[None, :, None]
        var = all_reduce_sum(centred.square().sum(dim=(0, 2)), group) / count
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1), self.momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return centred * scale[None, :, None] + self.bias[None, :, None]


class Residual(nn.Module):
    """(fn(x) + x) / sqrt(2)."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) * math.sqrt(0.5)


def _conv_norm_act(channels: int, kernel_size: int, norm_eps: float) -> nn.Sequential:
    return nn.Sequential(
        SpectralNormConv1d(channels, channels, kernel_size),
        SyncBatchNorm1d(channels, eps=norm_eps),
        nn.LeakyReLU(0.2),
    )


def _head(channels: int, kernel_size: int, norm_eps: float) -> nn.Sequential:
    return nn.Sequential(
        _conv_norm_act(channels, 1, norm_eps),
        Residual(_conv_norm_act(channels, kernel_size, norm_eps)),
        SpectralNormConv1d(channels, 1, 1),
    )


def zero_key_bias(dino: DinoViTS16) -> None:
    """Zero the key third of every qkv bias, as the authors do when they load the DINO weights
    (softmax over keys ignores it; it only adds rounding)."""
    with torch.no_grad():
        for block in dino.blocks:
            bias = block.attn.qkv.bias
            width = bias.numel() // 3
            bias[width:2 * width].zero_()


def _random_device(generator: torch.Generator | None, tensor: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else tensor.device


class DinoDiscriminator(nn.Module):
    """The authors' DINO discriminator (`DinoDisc`, norm "sbn"). `dino` is the frozen trunk with
    at least max(taps) + 1 blocks; heads: one per readout (before the blocks, then each tap)."""

    def __init__(self, dino: DinoViTS16, taps: Sequence[int] = DEFAULT_TAPS, kernel_size: int = 9,
                 norm_eps: float = 1e-6, crop_probability: float = 0.5) -> None:
        super().__init__()
        self.taps = tuple(sorted(set(taps)))
        if not self.taps or self.taps[0] < 0 or self.taps[-1] >= len(dino.blocks):
            raise ValueError(f"taps={tuple(taps)}: need block indices in 0..{len(dino.blocks) - 1}")
        if not 0.0 <= crop_probability <= 1.0:
            raise ValueError(f"crop_probability={crop_probability} must be in [0, 1]")
        self.crop_probability = crop_probability
        # A tuple hides the frozen trunk from parameters(), state_dict() and DDP; _apply moves it.
        self._dino = (dino,)
        self.heads = nn.ModuleList(_head(dino.width, kernel_size, norm_eps) for _ in range(len(self.taps) + 1))

    @classmethod
    def from_file(cls, dino_weights: str | os.PathLike, taps: Sequence[int] = DEFAULT_TAPS, *,
                  kernel_size: int = 9, norm_eps: float = 1e-6, crop_probability: float = 0.5,
                  attention_backend: str = "auto") -> "DinoDiscriminator":
        """Heads freshly initialised on the DINO ViT-S/16 weights file (official layout), its key
        biases zeroed and its MLPs on tanh GELU, as the authors run it."""
        dino = load_dino_vits16(dino_weights, depth=max(taps) + 1, gelu="tanh", attention_backend=attention_backend)
        zero_key_bias(dino)
        return cls(dino, taps, kernel_size, norm_eps, crop_probability)

    @property
    def dino(self) -> DinoViTS16:
        return self._dino[0]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.dino._apply(fn, recurse)
        return self

    def pixels_224(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> ImageNet-normalised (B, 3, 224, 224) float32: when
        H and W exceed 224, with probability `crop_probability` one random 224 window for the
        whole batch (draws from `generator`: the decision, then the row and column offsets);
        otherwise a resize, "area" if H > 224 else "bicubic"."""
        size = self.dino.image_size
        x = imagenet_pixels(images.float())
        h, w = x.shape[-2:]
        if h > size and w > size:
            device = _random_device(generator, x)
            if torch.rand((), generator=generator, device=device) < self.crop_probability:
                top = int(torch.randint(0, h - size + 1, (), generator=generator, device=device))
                left = int(torch.randint(0, w - size + 1, (), generator=generator, device=device))
                return x[..., top:top + size, left:left + size]
        if (h, w) == (size, size):
            return x
        return F.interpolate(x, size=(size, size), mode="area" if h > size else "bicubic")

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> logits (B, 196 x (len(taps) + 1))."""
        states = self.dino.hidden_states(self.pixels_224(images, generator), self.taps)
        logits = []
        for head, state in zip(self.heads, states):
            readout = (state[:, 1:].float() + state[:, :1].float()).transpose(1, 2)
            logits.append(head(readout).flatten(1))
        return torch.cat(logits, dim=1)
