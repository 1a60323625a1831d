"""The tokenizer's ViT encoder and decoder (DINOv2-style blocks on `softvq_fast.attention`).

Module and parameter names follow the authors' checkpoints: `encoder.model.*` / `decoder.model.*`
are timm VisionTransformer names (patch_embed.proj, cls_token, reg_token, pos_embed,
blocks.N.{norm1,attn,ls1,norm2,mlp,ls2}, norm); latent tokens, mask token, RoPE frequencies and
the pixel head sit beside `model`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from softvq_fast.models import rope
from softvq_fast.models.config import ViTSpec
from softvq_fast.nn.linear import Linear
from softvq_fast.nn.transformer import Attention, Mlp
from softvq_fast.ops.linear import linear

LAYER_NORM_EPS = 1e-6
LAYER_SCALE_INIT = 1e-5


class LayerScale(nn.Module):
    """Per-channel scale `gamma` of a residual branch (DINOv2); `Block` applies it fused with the
    residual add."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))


class SwiGLU(nn.Module):
    """timm's packed SwiGLU (ViT-giant): fc1 gives [gate, value], out = fc2(silu(gate) * value)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.fc2 = Linear(hidden_dim // 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        if gate.requires_grad:
            return self.fc2(F.silu(gate) * value)
        return self.fc2(F.silu(gate, inplace=True).mul_(value))  # no autograd: no new activations


@dataclass(frozen=True)
class DropPathDraws:
    """Where drop path's per-sample decisions come from: `generator` (torch's default generator
    when None). Each decision is drawn for all `total` rows of a global batch and the rows
    [first, first + rows) are kept (total None: this batch is the whole batch), so processes that
    hold parts of one batch and equal generator states drop the samples one process would."""

    generator: torch.Generator | None = None
    first: int = 0
    total: int | None = None

    def keep_scale(self, rows: int, keep: float, like: torch.Tensor) -> torch.Tensor:
        """(rows, 1, 1) of `like`'s dtype and device: 1 / keep for a kept sample (probability
        `keep`), 0 for a dropped one (timm's DropPath with scale_by_keep)."""
        total = rows if self.total is None else self.total
        if self.first < 0 or self.first + rows > total:
            raise ValueError(f"DropPathDraws: rows {self.first}..{self.first + rows - 1} do not fit in a batch of {total}")
        device = self.generator.device if self.generator is not None else like.device
        kept = torch.empty(total, device=device).bernoulli_(keep, generator=self.generator)[self.first:self.first + rows]
        scale = kept / keep if keep > 0 else kept
        return scale.to(device=like.device, dtype=like.dtype).view(rows, 1, 1)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """timm's stochastic-depth rule: block i of `depth` drops its residual branches with
    probability linspace(0, rate, depth)[i] (float32 steps, as timm computes them)."""
    # On the CPU explicitly: models are also built under torch.device("meta").
    return torch.linspace(0, rate, depth, device="cpu").tolist()


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches and, in training mode
    with `drop_path_rate` > 0, drop path (stochastic depth) on each branch: per sample, the
    branch is dropped with that probability, else scaled by 1 / (1 - rate).

    `checkpoint_activations`: in training mode with grad enabled, keep only the block's input
    and recompute its activations in the backward (torch.utils.checkpoint, non-reentrant); the
    same values and gradients for less memory and one more forward of the block."""

    def __init__(self, spec: ViTSpec, attention_backend: str, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        dim = spec.width
        self.drop_path_rate = drop_path_rate
        self.checkpoint_activations = False
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, spec.heads, qkv_bias=True, backend=attention_backend)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = SwiGLU(dim, spec.mlp_hidden) if spec.swiglu else Mlp(dim, spec.mlp_hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor, rotate: Callable | None = None, rows: slice | None = None,
                draws: DropPathDraws | None = None) -> torch.Tensor:
        """x (B, S, dim) -> (B, S, dim), or only the token rows `rows` of the output (every token
        still attends to all; the MLP then runs on those rows alone). `draws`: the source of the
        drop-path decisions (attention branch first, then the MLP's), used in training mode only."""
        scale1, scale2 = self.ls1.gamma, self.ls2.gamma
        if self.training and self.drop_path_rate > 0:
            draws, keep = draws or DropPathDraws(), 1.0 - self.drop_path_rate
            scale1 = scale1 * draws.keep_scale(x.shape[0], keep, scale1)
            scale2 = scale2 * draws.keep_scale(x.shape[0], keep, scale2)
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            # The drop-path decisions are drawn above, once: the recomputation reuses their scales
            # (checkpoint's RNG-state restore does not cover the draws' own generator).
            return checkpoint(self._branches, x, scale1, scale2, rotate, rows, use_reentrant=False)
        return self._branches(x, scale1, scale2, rotate, rows)

    def _branches(self, x: torch.Tensor, scale1: torch.Tensor, scale2: torch.Tensor, rotate: Callable | None,
                  rows: slice | None) -> torch.Tensor:
        x = torch.addcmul(x, self.attn(self.norm1(x), rotate), scale1)
        if rows is not None:
            x = x[:, rows]
        return torch.addcmul(x, self.mlp(self.norm2(x)), scale2)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens (B, (H/p) * (W/p), dim) in row-major patch order.

    `proj` is the checkpoint's Conv2d; it is applied as one matmul over the flattened patches
    (the same sums), which follows torch's matmul precision settings rather than cuDNN's TF32
    default for convolutions. `linear_backend` is that matmul's `softvq_fast.ops.linear` backend."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.linear_backend = "auto"
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, c, h, w = images.shape
        p = self.patch_size
        patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
        return linear(patches, self.proj.weight.flatten(1), self.proj.bias, backend=self.linear_backend)


class Backbone(nn.Module):
    """timm's VisionTransformer parts the tokenizer uses (the `model` submodule)."""

    def __init__(self, spec: ViTSpec, depth: int, num_patches: int, patch_size: int, class_token: bool, attention_backend: str,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        dim = spec.width
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 1e-6) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, spec.reg_tokens, dim)) if spec.reg_tokens else None
        self.num_prefix_tokens = int(class_token) + spec.reg_tokens
        # With registers (timm no_embed_class) the table covers the patches only.
        self.positions_cover_prefix = spec.reg_tokens == 0
        table = num_patches + (self.num_prefix_tokens if self.positions_cover_prefix else 0)
        self.pos_embed = nn.Parameter(torch.randn(1, table, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(spec, attention_backend, rate) for rate in drop_path_rates(drop_path_rate, depth))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def prefix_and_positions(self, patches: torch.Tensor, add_positions: bool) -> torch.Tensor:
        """(B, N, dim) patch tokens -> (B, prefix + N, dim): class and register tokens first,
        absolute positions added (to the prefix too unless the model has registers)."""
        batch = patches.shape[0]
        prefix = [t.expand(batch, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if add_positions and not self.positions_cover_prefix:
            patches = patches + self.pos_embed
        x = torch.cat(prefix + [patches], dim=1) if prefix else patches
        if add_positions and self.positions_cover_prefix:
            x = x + self.pos_embed
        return x

    def run_blocks(self, x: torch.Tensor, angles: torch.Tensor | None, output_rows: slice,
                   draws: DropPathDraws | None = None) -> torch.Tensor:
        """Blocks on (B, S, dim) -> the token rows `output_rows` of the last block's output (the
        last MLP runs on those alone). angles None (absolute positions), (N, 1, D/2) shared or
        (depth, N, heads, D/2) per block rotate the image tokens (after the prefix). `draws`: drop
        path's decisions, block by block (training mode)."""
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            rotate = None
            if angles is not None:
                table = angles[index] if angles.dim() == 4 else angles
                rotate = functools.partial(rope.rotate_image_tokens, angles=table, start=self.num_prefix_tokens)
            x = block(x, rotate, output_rows if index == last else None, draws)
        return x


class _RoPEHolder(nn.Module):
    """Owns the RoPE state that the authors keep on the encoder/decoder module itself."""

    def _init_rope(self, spec: ViTSpec, depth: int, grid: int, base_grid: int, use_rope: bool, mixed: bool, theta: float) -> None:
        self.rope_mode = None if not use_rope else ("mixed" if mixed else "axial")
        self.rope_theta = theta
        self.grid = grid
        self.num_heads = spec.heads
        self.head_dim = spec.width // spec.heads
        if self.rope_mode == "mixed":
            self.freqs = nn.Parameter(rope.init_mixed_frequencies(self.head_dim, spec.heads, depth, theta))
            t_x, t_y = rope.grid_positions(base_grid, base_grid)
            self.register_buffer("freqs_t_x", t_x)
            self.register_buffer("freqs_t_y", t_y)

    def rope_angles(self) -> torch.Tensor | None:
        if self.rope_mode == "mixed":
            return rope.mixed_angles(self.freqs, self.grid, self.grid, self.num_heads)
        if self.rope_mode == "axial":
            return rope.axial_angles(self.head_dim, self.grid, self.grid, self.rope_theta, self.model.pos_embed.device)
        return None


class LatentEncoder(_RoPEHolder):
    """Images (B, 3, H, W) -> latent tokens (B, T, width): learnable latent tokens with their own
    positions are appended after the class/register and image tokens; their final-norm outputs
    are the result."""

    def __init__(self, spec: ViTSpec, depth: int, image_size: int, patch_size: int, num_latent_tokens: int,
                 base_image_size: int, use_rope: bool, rope_mixed: bool, rope_theta: float, attention_backend: str,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        grid = image_size // patch_size
        self.num_latent_tokens = num_latent_tokens
        self.model = Backbone(spec, depth, grid * grid, patch_size, True, attention_backend, drop_path_rate)
        self.latent_tokens = nn.Parameter(torch.randn(1, num_latent_tokens, spec.width) * 0.02)
        self.latent_pos_embed = nn.Parameter(torch.randn(1, num_latent_tokens, spec.width) * 0.02)
        self._init_rope(spec, depth, grid, base_image_size // patch_size, use_rope, rope_mixed, rope_theta)

    def forward(self, images: torch.Tensor, draws: DropPathDraws | None = None) -> torch.Tensor:
        # The authors' encoder adds its absolute positions even when RoPE is on.
        x = self.model.prefix_and_positions(self.model.patch_embed(images), add_positions=True)
        latents = (self.latent_tokens + self.latent_pos_embed).expand(x.shape[0], -1, -1)
        # Only the latent tokens' outputs are used: the last MLP and the norm run on them alone.
        x = self.model.run_blocks(torch.cat([x, latents], dim=1), self.rope_angles(), slice(-self.num_latent_tokens, None),
                                  draws)
        return self.model.norm(x)


class ToPixel(nn.Module):
    """Linear patch head and unpatchify: (B, N, dim) -> (B, 3, H, W), channels fastest in a patch."""

    def __init__(self, dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.model = Linear(dim, 3 * patch_size * patch_size)

    def forward(self, x: torch.Tensor, grid: int) -> torch.Tensor:
        p = self.patch_size
        x = self.model(x).reshape(x.shape[0], grid, grid, p, p, 3)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], 3, grid * p, grid * p)


class LatentDecoder(_RoPEHolder):
    """Latent tokens (B, T, width) -> images (B, 3, H, W): a mask token at every patch (after the
    class/register tokens) with positions, the latent tokens with their positions appended; the
    image-token outputs go through the pixel head. `model.patch_embed` is unused (kept so the
    released checkpoints load unchanged)."""

    def __init__(self, spec: ViTSpec, depth: int, image_size: int, patch_size: int, num_latent_tokens: int,
                 base_image_size: int, class_token: bool, use_ape: bool, use_rope: bool, rope_mixed: bool,
                 rope_theta: float, attention_backend: str, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        grid = image_size // patch_size
        self.use_ape = use_ape and not use_rope
        self.model = Backbone(spec, depth, grid * grid, patch_size, class_token, attention_backend, drop_path_rate)
        self.mask_token = nn.Parameter(torch.randn(1, 1, spec.width) * 0.02)
        self.latent_pos_embed = nn.Parameter(torch.randn(1, num_latent_tokens, spec.width) * 0.02)
        self.to_pixel = ToPixel(spec.width, patch_size)
        self._init_rope(spec, depth, grid, base_image_size // patch_size, use_rope, rope_mixed, rope_theta)

    def forward(self, latents: torch.Tensor, draws: DropPathDraws | None = None) -> torch.Tensor:
        batch, patches = latents.shape[0], self.grid * self.grid
        # Mask tokens and their positions are the same for every image: build them once.
        queries = self.model.prefix_and_positions(self.mask_token.expand(1, patches, -1), self.use_ape)
        x = torch.cat([queries.expand(batch, -1, -1), latents + self.latent_pos_embed], dim=1)
        start = self.model.num_prefix_tokens
        x = self.model.run_blocks(x, self.rope_angles(), slice(start, start + patches), draws)
        return self.to_pixel(self.model.norm(x), self.grid)
