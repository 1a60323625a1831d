"""Triton kernels for LayerNorm (no affine) fused with the adaLN modulation of DiT/SiT blocks.

    y[b, s, :] = (x[b, s, :] - mean) * rstd * (1 + scale[b, :]) + shift[b, :]

x is (B, S, D) with a contiguous last dimension; scale and shift are (B, D) rows that may be
strided views (e.g. chunks of the adaLN projection), broadcast over the S tokens of a sample.
Statistics and arithmetic are in float32 whatever the storage dtype.

Forward: one program per token row; it also stores the row's mean and rstd for the backward.
Backward: one program per (sample, chunk of tokens); it writes dx rows and per-chunk partial
sums of dscale and dshift (summed over chunks on the host side, so the result is deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _forward_kernel(
    x_ptr,  # (B, S, D)
    scale_ptr,  # (B, D), row stride mod_stride
    shift_ptr,  # (B, D), row stride mod_stride
    y_ptr,  # (B, S, D) out
    mean_ptr,  # (B * S,) float32 out
    rstd_ptr,  # (B * S,) float32 out
    S, D, mod_stride, eps,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * D overflows int32 beyond 2**31 elements
    batch = row // S
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / D + eps)
    scale = tl.load(scale_ptr + batch * mod_stride + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + batch * mod_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = centered * rstd * (1.0 + scale) + shift
    tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _backward_kernel(
    grad_y_ptr,  # (B, S, D)
    x_ptr,  # (B, S, D)
    scale_ptr,  # (B, D), row stride mod_stride
    mean_ptr,  # (B * S,) float32
    rstd_ptr,  # (B * S,) float32
    grad_x_ptr,  # (B, S, D) out
    grad_scale_part_ptr,  # (B, chunks, D) float32 out: per-chunk partial sums
    grad_shift_part_ptr,  # (B, chunks, D) float32 out
    S, D, mod_stride, ROWS_PER_PROGRAM,
    BLOCK_D: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    one_plus_scale = 1.0 + tl.load(scale_ptr + batch * mod_stride + cols, mask=mask, other=0.0).to(tl.float32)
    dscale_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dshift_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = chunk * ROWS_PER_PROGRAM
    for offset in range(0, ROWS_PER_PROGRAM):
        token = first + offset
        if token < S:
            row = batch * S + token
            x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(grad_y_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + row)
            rstd = tl.load(rstd_ptr + row)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            dshift_acc += dy
            dscale_acc += dy * xhat
            # gradient through the normalisation: rstd * (g - mean(g) - xhat * mean(g * xhat))
            g = dy * one_plus_scale
            g_mean = tl.sum(g, axis=0) / D
            gx_mean = tl.sum(g * xhat, axis=0) / D
            dx = rstd * (g - g_mean - xhat * gx_mean)
            tl.store(grad_x_ptr + row * D + cols, dx.to(grad_x_ptr.dtype.element_ty), mask=mask)
    part = (batch * num_chunks + chunk) * D
    tl.store(grad_scale_part_ptr + part + cols, dscale_acc, mask=mask)
    tl.store(grad_shift_part_ptr + part + cols, dshift_acc, mask=mask)


def _block_d(D: int) -> int:
    return triton.next_power_of_2(D)


def _num_warps(block_d: int) -> int:
    return max(1, min(16, block_d // 256))


def layernorm_modulate_forward(x, scale, shift, eps: float):
    """x (B, S, D) contiguous; scale, shift (B, D) with unit last stride and equal row strides.
    Returns y (B, S, D) in x's dtype and float32 mean, rstd of shape (B * S,)."""
    B, S, D = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(B * S, device=x.device, dtype=torch.float32)
    rstd = torch.empty(B * S, device=x.device, dtype=torch.float32)
    block_d = _block_d(D)
    with torch.cuda.device_of(x):  # Triton launches on the current device, which may be another
        _forward_kernel[(B * S,)](
            x, scale, shift, y, mean, rstd, S, D, scale.stride(0), eps,
            BLOCK_D=block_d, num_warps=_num_warps(block_d),
        )
    return y, mean, rstd


def layernorm_modulate_backward(dy, x, scale, mean, rstd, rows_per_program: int = 64):
    """Gradients (dx (B, S, D) in x's dtype, dscale and dshift (B, D) in float32)."""
    B, S, D = x.shape
    num_chunks = triton.cdiv(S, rows_per_program)
    dx = torch.empty_like(x)
    dscale_part = torch.empty(B, num_chunks, D, device=x.device, dtype=torch.float32)
    dshift_part = torch.empty_like(dscale_part)
    block_d = _block_d(D)
    with torch.cuda.device_of(x):
        _backward_kernel[(B, num_chunks)](
            dy, x, scale, mean, rstd, dx, dscale_part, dshift_part, S, D, scale.stride(0), rows_per_program,
            BLOCK_D=block_d, num_warps=_num_warps(block_d),
        )
    return dx, dscale_part.sum(1), dshift_part.sum(1)
