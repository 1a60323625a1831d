"""Attention test inputs, the float64 reference and the CUDA kernels' test shapes."""
from __future__ import annotations

import torch

# (batch, q_len, kv_len, heads, head_dim) of the CUDA kernels (also run by their CPU emulation):
# the short kernel (kv <= 128; head dims 64, 72, 128) and the tiled kernel (longer, head dim 64),
# odd lengths and cross lengths included.
CUDA_SHORT = [(b, s, s, h, d) for d in (64, 72, 128)
              for (b, s, h) in ((3, 1, 2), (2, 17, 3), (4, 32, 16), (2, 64, 5), (2, 100, 3), (2, 128, 16))]
CUDA_SHORT += [(2, 200, 77, 2, 72), (1, 33, 128, 2, 128)]
CUDA_TILED = [(2, 129, 129, 3, 64), (2, 321, 321, 4, 64), (1, 1089, 1089, 2, 64), (1, 50, 700, 2, 64)]
CUDA_TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3}


def qkv(batch, q_len, kv_len, heads, head_dim, dtype, device="cpu"):
    """q as a strided view of one (B, S, 3, H, D) qkv tensor (as the models produce); k, v likewise
    when q_len == kv_len, else separate tensors. Drawn from torch's generator (seeded per test)."""
    packed = torch.randn(batch, q_len, 3, heads, head_dim, device=device, dtype=torch.float64)
    q, k, v = packed.to(dtype).unbind(2)
    if kv_len != q_len:
        kv = torch.randn(batch, kv_len, 2, heads, head_dim, device=device, dtype=torch.float64)
        k, v = kv.to(dtype).unbind(2)
    return q, k, v


def reference(q, k, v, scale=None):
    """float64 attention of the (already rounded) inputs, and the log-sum-exp (B, H, Sq)."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * scale
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v64)
    return out, torch.logsumexp(scores, dim=-1)


def reference_grads(q, k, v, scale, grad):
    """float64 gradients of reference(q, k, v, scale)[0] against `grad`."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, _ = reference(*leaves, scale)
    return torch.autograd.grad(out, leaves, grad.double())


def poison(shape, dtype, device):
    """Leave NaNs in memory the allocator may hand to the kernel's output (unwritten elements show)."""
    filled = torch.full(shape, float("nan"), dtype=dtype, device=device)
    del filled
