"""Attention in plain PyTorch: the `sdpa` and `math` backends, and what the CUDA `softvq`
backward differentiates. q (B, Sq, H, D), k and v (B, Sk, H, D) -> (B, Sq, H, D) contiguous."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference: softmax in float32 (float64 for float64 inputs). With no keys the output is
    the empty sum, zeros."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.to(acc)).to(q.dtype).contiguous()


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention in the (B, S, H, D) layout."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2).contiguous()
