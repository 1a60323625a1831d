"""Transformer building blocks shared by the tokenizer ViTs and the SiT/DiT generators.

Parameter names follow timm (`qkv`, `proj`, `q_norm`, `k_norm`, `fc1`, `fc2`) so that the authors'
checkpoints load unchanged.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from softvq_fast.nn.linear import Linear
from softvq_fast.ops.attention import attention


class Attention(nn.Module):
    """Multi-head self-attention on (B, S, dim) through `softvq_fast.attention`.

    q, k and v are strided views of one qkv projection in the (B, S, H, head_dim) layout that
    `softvq_fast.attention` takes, so no copy is made before the kernel. `rope`, if given, maps a
    (B, S, H, head_dim) tensor to its rotated version (applied to q and k).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Attention: {name} must be a positive int, got {value!r}")
        if dim % num_heads:
            raise ValueError(f"Attention: dim={dim} must be divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, rope: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Attention: x must be a tensor of shape (B, S, {self.dim}), got {got}")
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        return self.proj(attention(q, k, v, backend=self.backend).flatten(2))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 on the last dimension. `approximate` is GELU's ("none" or "tanh"); the
    GELU is fc1's activation (`softvq_fast.ops.linear`: fused where the backend allows)."""

    def __init__(self, dim: int, hidden_dim: int, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.fc1 = Linear(dim, hidden_dim, activation="gelu_tanh" if approximate == "tanh" else "gelu")
        self.fc2 = Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))
