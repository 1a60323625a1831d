"""Triton kernels for the per-layer distance of LPIPS (softvq_fast.ops.lpips_distance).

fx, fy are contiguous (B, C, P) features (P = H * W pixels), weight (C,) float32. With
n = sqrt(sum_c fx_c^2), a = fx / (n + eps) and b likewise from fy, d = a - b:

    out[b] = mean over pixels of sum_c weight_c d_c^2

Each program owns a block of pixels of one sample and walks the channels twice: forward, the norms
then the weighted squared difference; backward, the channel sums sum_c G_c fx_c (G_c = 2 w_c d_c g)
then the gradients (formulas in csrc/cpu/lpips_distance_kernel.h). Programs write per-block partial
sums (the distance, and for the weight's gradient the sum of d_c^2 per channel), which the host adds
up with torch.sum: no atomics, so results are deterministic. Arithmetic is in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reciprocal_norms(norm, mask, eps):
    # 0 outside the pixels: with eps = 0 the padding's 1 / 0 would turn their zero differences into NaN
    return tl.where(mask, 1.0 / tl.where(mask, norm + eps, 1.0), 0.0)


@triton.jit
def _projection_scale(g, norm, r):
    # sum_c G_c x_c / (s^2 n) from g = sum_c G_c x_c; 0 where n = 0 (every x_c is 0 there, so is the
    # term it scales). The inner where keeps 0 / 0 out of the branch not taken.
    return tl.where(norm > 0.0, g * r * r / tl.where(norm > 0.0, norm, 1.0), 0.0)


@triton.jit
def _load(ptr, offsets, mask):
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _channel(fx_ptr, fy_ptr, offsets, mask, rx, ry):
    """One channel of fx and fy at `offsets` in float32, and their normalised difference."""
    x = _load(fx_ptr, offsets, mask)
    y = _load(fy_ptr, offsets, mask)
    return x, y, x * rx - y * ry


@triton.jit
def _forward_kernel(
    fx_ptr,  # (B, C, P) float32 / bfloat16 / float16
    fy_ptr,  # (B, C, P) like fx
    weight_ptr,  # (C,) float32
    norm_x_ptr,  # (B, P) float32 out: sqrt(sum_c fx^2)
    norm_y_ptr,  # (B, P) float32 out
    block_sums_ptr,  # (B, blocks) float32 out: per block, sum over its pixels of sum_c w_c d_c^2
    C, P, eps,
    BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # b * C * P overflows int32 for large batches
    block = tl.program_id(1)
    pixels = block * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = pixels < P
    offsets = b * C * P + pixels
    sum_x = tl.zeros([BLOCK_P], dtype=tl.float32)
    sum_y = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c in range(0, C):
        x = _load(fx_ptr, offsets + c * P, mask)
        y = _load(fy_ptr, offsets + c * P, mask)
        sum_x += x * x
        sum_y += y * y
    norm_x = tl.sqrt(sum_x)
    norm_y = tl.sqrt(sum_y)
    tl.store(norm_x_ptr + b * P + pixels, norm_x, mask=mask)
    tl.store(norm_y_ptr + b * P + pixels, norm_y, mask=mask)
    rx = _reciprocal_norms(norm_x, mask, eps)
    ry = _reciprocal_norms(norm_y, mask, eps)
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c in range(0, C):
        _, _, d = _channel(fx_ptr, fy_ptr, offsets + c * P, mask, rx, ry)
        acc += tl.load(weight_ptr + c) * d * d
    tl.store(block_sums_ptr + b * tl.num_programs(1) + block, tl.sum(acc, axis=0))


@triton.jit
def _backward_kernel(
    fx_ptr,  # (B, C, P) float32 / bfloat16 / float16
    fy_ptr,  # (B, C, P) like fx
    weight_ptr,  # (C,) float32
    norm_x_ptr,  # (B, P) float32
    norm_y_ptr,  # (B, P) float32
    grad_out_ptr,  # (B,) float32: d loss / d out[b] divided by P
    grad_fx_ptr,  # (B, C, P) like fx, out (written with NEED_FX)
    grad_fy_ptr,  # (B, C, P) like fx, out (written with NEED_FY)
    block_squares_ptr,  # (B, blocks, C) float32 out (written with NEED_WEIGHT): sum over the block of d_c^2
    C, P, eps,
    BLOCK_P: tl.constexpr,
    NEED_FX: tl.constexpr,
    NEED_FY: tl.constexpr,
    NEED_WEIGHT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    pixels = block * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = pixels < P
    offsets = b * C * P + pixels
    norm_x = tl.load(norm_x_ptr + b * P + pixels, mask=mask, other=0.0)
    norm_y = tl.load(norm_y_ptr + b * P + pixels, mask=mask, other=0.0)
    rx = _reciprocal_norms(norm_x, mask, eps)
    ry = _reciprocal_norms(norm_y, mask, eps)
    g2 = 2.0 * tl.load(grad_out_ptr + b)
    squares_ptr = block_squares_ptr + (b * tl.num_programs(1) + block) * C
    # first walk: sum_c G_c x_c and sum_c G_c y_c per pixel, and the block's sums of d_c^2
    gx = tl.zeros([BLOCK_P], dtype=tl.float32)
    gy = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c in range(0, C):
        x, y, d = _channel(fx_ptr, fy_ptr, offsets + c * P, mask, rx, ry)
        coef = g2 * tl.load(weight_ptr + c)
        if NEED_FX:
            gx += coef * d * x
        if NEED_FY:
            gy += coef * d * y
        if NEED_WEIGHT:
            tl.store(squares_ptr + c, tl.sum(d * d, axis=0))
    if NEED_FX or NEED_FY:
        qx = _projection_scale(gx, norm_x, rx)
        qy = _projection_scale(gy, norm_y, ry)
        for c in range(0, C):
            x, y, d = _channel(fx_ptr, fy_ptr, offsets + c * P, mask, rx, ry)
            coef = g2 * tl.load(weight_ptr + c)
            if NEED_FX:
                grad_x = coef * d * rx - x * qx
                tl.store(grad_fx_ptr + offsets + c * P, grad_x.to(grad_fx_ptr.dtype.element_ty), mask=mask)
            if NEED_FY:
                grad_y = y * qy - coef * d * ry
                tl.store(grad_fy_ptr + offsets + c * P, grad_y.to(grad_fy_ptr.dtype.element_ty), mask=mask)


def _block_pixels(P: int) -> int:
    return max(16, min(256, triton.next_power_of_2(P)))


def _num_warps(block_p: int) -> int:
    return max(1, block_p // 128)


def lpips_distance_forward(fx: torch.Tensor, fy: torch.Tensor, weight: torch.Tensor, eps: float):
    """fx, fy (B, C, H, W) contiguous, weight (C,). Returns the distance (B,) in float32 and the
    norms over channels of fx and fy, (B, H, W) float32."""
    B, C, H, W = fx.shape
    weight = weight.to(torch.float32).contiguous()
    P = H * W
    block_p = _block_pixels(P)
    blocks = triton.cdiv(P, block_p)
    norm_x = torch.empty(B, H, W, device=fx.device, dtype=torch.float32)
    norm_y = torch.empty_like(norm_x)
    block_sums = torch.empty(B, blocks, device=fx.device, dtype=torch.float32)
    if B > 0:
        with torch.cuda.device_of(fx):  # Triton launches on the current device, which may be another
            _forward_kernel[(B, blocks)](
                fx, fy, weight, norm_x, norm_y, block_sums, C, P, eps,
                BLOCK_P=block_p, num_warps=_num_warps(block_p),
            )
    return block_sums.sum(1) / P, norm_x, norm_y


def lpips_distance_backward(
    grad_out: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor, weight: torch.Tensor, norm_x: torch.Tensor,
    norm_y: torch.Tensor, eps: float, need_fx: bool, need_fy: bool, need_weight: bool,
):
    """Gradients (fx, fy in fx's dtype, weight (C,) float32) of the distance for grad_out (B,);
    an empty tensor for each one not needed."""
    B, C, H, W = fx.shape
    weight = weight.to(torch.float32).contiguous()
    P = H * W
    block_p = _block_pixels(P)
    blocks = triton.cdiv(P, block_p)
    g = (grad_out.to(torch.float32) / P).contiguous()
    grad_fx = torch.empty_like(fx) if need_fx else fx.new_empty(0)
    grad_fy = torch.empty_like(fy) if need_fy else fy.new_empty(0)
    squares = torch.empty(B if need_weight else 0, blocks, C, device=fx.device, dtype=torch.float32)
    if B > 0 and (need_fx or need_fy or need_weight):
        with torch.cuda.device_of(fx):
            _backward_kernel[(B, blocks)](
                fx, fy, weight, norm_x, norm_y, g,
                grad_fx if need_fx else fx, grad_fy if need_fy else fy, squares if need_weight else norm_x,
                C, P, eps,
                BLOCK_P=block_p, NEED_FX=need_fx, NEED_FY=need_fy, NEED_WEIGHT=need_weight,
                num_warps=_num_warps(block_p),
            )
    grad_weight = (squares.sum(1) * g[:, None]).sum(0) if need_weight else weight.new_empty(0)
    return grad_fx, grad_fy, grad_weight
