"""Triton kernels of soft_vq (the `triton` backend of softvq_fast.ops.soft_vq).

Layout: z (C, M, D) and codebook (C, K, D), contiguous; codebook c serves the M rows of z[c].
No kernel materialises an M x K tensor:
  _forward_kernel       one program per (row block, codebook) walks the K codes in blocks with an
                        online softmax (running max logit m, sums at tau and at the entropy
                        temperature, the entropy accumulator, argmax) and accumulates z_q.
  _column_sum_kernel    one program per (code block, codebook) walks the rows and sums
                        softmax(logits / T) per code from the saved row statistics.
  _grad_z_kernel        one program per (row block, codebook) recomputes logits per code block
                        (FlashAttention style) and accumulates dlogits @ codebook.
  _grad_codebook_kernel one program per (code block, codebook) walks the rows: sum_r p_rk g_r.
Every dot product has at least 16 rows and columns (code dims below 16 are padded by masks), as
tl.dot needs on GPUs. Logit-domain statistics keep the max logit apart from the log-sums so that
exp((s - m) / t) is exact even when logits / t is large.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK_M = 64  # rows per program (row-major kernels), rows per step (code-major kernels)
BLOCK_K = 64  # codes per step (row-major kernels), codes per program (code-major kernels)
# 8 warps: with 4, each thread's share of the gradient kernels' tiles outgrows its registers and
# the compiled kernels keep them on the stack (local memory). _grad_z_config narrows grad_z's code
# blocks where 8 warps are not enough; tests/test_triton_compile.py checks every kernel's stack.
NUM_WARPS = 8


@triton.jit
def _tile(c, first, count, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Items [first, first + BLOCK) x dims [0, BLOCK_D) of slice c of a contiguous (C, count, D)
    tensor: (offsets, mask, item indices, item mask)."""
    items = first + tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    item_ok = items < count
    return c * count * D + items[:, None] * D + dims[None, :], item_ok[:, None] & (dims < D)[None, :], items, item_ok


@triton.jit
def _forward_kernel(
    z_ptr,  # (C, M, D)
    codebook_ptr,  # (C, K, D)
    z_q_ptr,  # (C, M, D) out
    row_stats_ptr,  # (4, C, M) float32 out: ROW_STATS
    indices_ptr,  # (C, M) int64 out
    M, K, D, inv_tau, inv_t,
    WITH_STATS: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    c = tl.program_id(1)
    tile, tile_ok, rows, row_ok = _tile(c, tl.program_id(0) * BLOCK_M, M, D, BLOCK_M, BLOCK_D)
    z = tl.load(z_ptr + tile, mask=tile_ok, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    l_t = tl.zeros((BLOCK_M,), tl.float32)
    ent = tl.zeros((BLOCK_M,), tl.float32)  # sum_j w_j (s_j - m) / T with w_j = exp((s_j - m) / T)
    best = tl.zeros((BLOCK_M,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        e_tile, e_ok, codes, code_ok = _tile(c, k0, K, D, BLOCK_K, BLOCK_D)
        e = tl.load(codebook_ptr + e_tile, mask=e_ok, other=0.0)
        s = tl.dot(z, tl.trans(e), input_precision=PRECISION)
        s = tl.where(code_ok[None, :], s, float("-inf"))
        block_max = tl.max(s, axis=1)
        m_new = tl.maximum(m_i, block_max)
        if WITH_STATS:
            block_arg = tl.argmax(s, axis=1).to(tl.int32) + k0
            best = tl.where(block_max > m_i, block_arg, best)
        if WITH_ENTROPY:
            alpha_t = tl.exp((m_i - m_new) * inv_t)
            shift_t = tl.where(l_t > 0, (m_i - m_new) * inv_t, 0.0)
            x = (s - m_new[:, None]) * inv_t
            w = tl.exp(x)
            ent = alpha_t * (ent + l_t * shift_t) + tl.sum(w * tl.where(code_ok[None, :], x, 0.0), axis=1)
            l_t = l_t * alpha_t + tl.sum(w, axis=1)
        alpha = tl.exp((m_i - m_new) * inv_tau)
        p = tl.exp((s - m_new[:, None]) * inv_tau)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(e.dtype), e, input_precision=PRECISION)
        m_i = m_new
    z_q = acc / l_i[:, None]
    tl.store(z_q_ptr + tile, z_q.to(z_q_ptr.dtype.element_ty), mask=tile_ok)
    stat = row_stats_ptr + c * M + rows
    rows_total = tl.num_programs(1) * M
    tl.store(stat, m_i, mask=row_ok)
    tl.store(stat + rows_total, tl.log(l_i), mask=row_ok)
    if WITH_STATS:
        tl.store(indices_ptr + c * M + rows, best.to(tl.int64), mask=row_ok)
    if WITH_ENTROPY:
        log_t = tl.log(l_t)
        tl.store(stat + 2 * rows_total, log_t, mask=row_ok)
        tl.store(stat + 3 * rows_total, log_t - ent / l_t, mask=row_ok)


@triton.jit
def _column_sum_kernel(
    z_ptr,  # (C, M, D)
    codebook_ptr,  # (C, K, D)
    row_stats_ptr,  # (4, C, M) float32
    column_sum_ptr,  # (C, K) float32 out
    M, K, D, inv_t,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    c = tl.program_id(1)
    e_tile, e_ok, codes, code_ok = _tile(c, tl.program_id(0) * BLOCK_K, K, D, BLOCK_K, BLOCK_D)
    e = tl.load(codebook_ptr + e_tile, mask=e_ok, other=0.0)
    rows_total = tl.num_programs(1) * M
    total = tl.zeros((BLOCK_K,), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        tile, tile_ok, rows, row_ok = _tile(c, m0, M, D, BLOCK_M, BLOCK_D)
        z = tl.load(z_ptr + tile, mask=tile_ok, other=0.0)
        m = tl.load(row_stats_ptr + c * M + rows, mask=row_ok, other=0.0)
        log_t = tl.load(row_stats_ptr + 2 * rows_total + c * M + rows, mask=row_ok, other=0.0)
        s = tl.dot(e, tl.trans(z), input_precision=PRECISION)
        q = tl.exp((s - m[None, :]) * inv_t - log_t[None, :])
        total += tl.sum(tl.where(row_ok[None, :], q, 0.0), axis=1)
    tl.store(column_sum_ptr + c * K + codes, total, mask=code_ok)


@triton.jit
def _grad_z_kernel(
    grad_z_q_ptr,  # (C, M, D)
    grad_row_entropy_ptr,  # (C, M) float32
    grad_column_sum_ptr,  # (C, K) float32
    z_ptr,  # (C, M, D)
    codebook_ptr,  # (C, K, D)
    z_q_ptr,  # (C, M, D)
    row_stats_ptr,  # (4, C, M) float32
    grad_z_ptr,  # (C, M, D) out
    M, K, D, inv_tau, inv_t,
    WITH_ENTROPY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    c = tl.program_id(1)
    tile, tile_ok, rows, row_ok = _tile(c, tl.program_id(0) * BLOCK_M, M, D, BLOCK_M, BLOCK_D)
    z = tl.load(z_ptr + tile, mask=tile_ok, other=0.0)
    g = tl.load(grad_z_q_ptr + tile, mask=tile_ok, other=0.0)
    g_dot_zq = tl.sum(g.to(tl.float32) * tl.load(z_q_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32), axis=1)
    rows_total = tl.num_programs(1) * M
    stat = row_stats_ptr + c * M + rows
    m = tl.load(stat, mask=row_ok, other=0.0)
    log_l = tl.load(stat + rows_total, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    if WITH_ENTROPY:
        log_t = tl.load(stat + 2 * rows_total, mask=row_ok, other=0.0)
        h = tl.load(stat + 3 * rows_total, mask=row_ok, other=0.0)
        g_h = tl.load(grad_row_entropy_ptr + c * M + rows, mask=row_ok, other=0.0)
        q_acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)  # sum_j q_j E_j
        q_dot_gc = tl.zeros((BLOCK_M,), tl.float32)  # sum_j q_j G_j
    for k0 in range(0, K, BLOCK_K):
        e_tile, e_ok, codes, code_ok = _tile(c, k0, K, D, BLOCK_K, BLOCK_D)
        e = tl.load(codebook_ptr + e_tile, mask=e_ok, other=0.0)
        # dlogits sum to ~0 over codes (softmax): their products with E cancel, so they meet E in
        # float32, never rounded to half precision (TF32, where the caller allowed it)
        e32 = e.to(tl.float32)
        s = tl.dot(z, tl.trans(e), input_precision=PRECISION) - m[:, None]
        p = tl.exp(s * inv_tau - log_l[:, None])
        g_e = tl.dot(g, tl.trans(e), input_precision=PRECISION)
        d_s = p * (g_e - g_dot_zq[:, None]) * inv_tau
        if WITH_ENTROPY:
            gc = tl.load(grad_column_sum_ptr + c * K + codes, mask=code_ok, other=0.0)
            log_q = s * inv_t - log_t[:, None]
            q = tl.exp(log_q)
            d_s += q * (gc[None, :] - g_h[:, None] * (log_q + h[:, None])) * inv_t
            q = tl.where(code_ok[None, :], q, 0.0)
            q_dot_gc += tl.sum(q * gc[None, :], axis=1)
            q_acc += tl.dot(q, e32, input_precision=PRECISION)
        d_s = tl.where(code_ok[None, :], d_s, 0.0)
        acc += tl.dot(d_s, e32, input_precision=PRECISION)
    if WITH_ENTROPY:
        acc -= (q_dot_gc * inv_t)[:, None] * q_acc
    tl.store(grad_z_ptr + tile, acc.to(grad_z_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _grad_codebook_kernel(
    grad_z_q_ptr,  # (C, M, D)
    z_ptr,  # (C, M, D)
    codebook_ptr,  # (C, K, D)
    row_stats_ptr,  # (4, C, M) float32
    grad_codebook_ptr,  # (C, K, D) out
    M, K, D, inv_tau,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    c = tl.program_id(1)
    e_tile, e_ok, codes, code_ok = _tile(c, tl.program_id(0) * BLOCK_K, K, D, BLOCK_K, BLOCK_D)
    e = tl.load(codebook_ptr + e_tile, mask=e_ok, other=0.0)
    rows_total = tl.num_programs(1) * M
    acc = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        tile, tile_ok, rows, row_ok = _tile(c, m0, M, D, BLOCK_M, BLOCK_D)
        z = tl.load(z_ptr + tile, mask=tile_ok, other=0.0)
        g = tl.load(grad_z_q_ptr + tile, mask=tile_ok, other=0.0)
        m = tl.load(row_stats_ptr + c * M + rows, mask=row_ok, other=0.0)
        log_l = tl.load(row_stats_ptr + rows_total + c * M + rows, mask=row_ok, other=0.0)
        s = tl.dot(e, tl.trans(z), input_precision=PRECISION)
        p = tl.exp((s - m[None, :]) * inv_tau - log_l[None, :])
        p = tl.where(row_ok[None, :], p, 0.0)
        acc += tl.dot(p.to(g.dtype), g, input_precision=PRECISION)
    tl.store(grad_codebook_ptr + e_tile, acc.to(grad_codebook_ptr.dtype.element_ty), mask=e_ok)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


# Shared memory the grad-codebook kernel (the largest) needs in float32 with the blocks chosen
# before any shrinking for the device, compiled with 8 warps for sm_80 and sm_90, the larger of
# the two: {(BLOCK_D, precision): bytes}. Where a device allows less, the blocks halve again.
# tests/support/triton_aot.py compiles these configurations; tests/test_triton_compile.py fails
# where one needs more than an A100 or H100/H200 allows.
FP32_SHARED_BYTES = {(128, "ieee"): 156_672, (128, "tf32"): 230_400, (256, "ieee"): 150_016, (256, "tf32"): 168_448}


@functools.lru_cache(maxsize=None)
def _shared_memory_per_block(device: torch.device) -> int:
    """Shared memory a program may use on `device` (opt-in limit); unlimited for the interpreter."""
    if device.type != "cuda":
        return 1 << 30
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _config(z: torch.Tensor, allow_tf32: bool) -> dict:
    C, M, D = z.shape
    precision = "tf32" if allow_tf32 and z.dtype == torch.float32 else "ieee"
    block_d = max(16, triton.next_power_of_2(D))
    # float32 without TF32 multiplies on the CUDA cores, each thread holding its share of the
    # operand tiles in registers: 32-code blocks fit them there, 64-code blocks spill grad_z's.
    block_k = BLOCK_K // 2 if z.dtype == torch.float32 and precision == "ieee" else BLOCK_K
    # D = 256 at 64 x 64 blocks needs more shared memory in the grad-codebook kernel than an
    # H100/H200 has (227 KB a block): halve the row and code blocks there, and again in float32
    # where the device allows less than FP32_SHARED_BYTES (an A100: 163 KB).
    shrink = 2 if block_d > 128 else 1
    if z.dtype == torch.float32 and FP32_SHARED_BYTES.get((block_d, precision), 0) > _shared_memory_per_block(z.device):
        shrink *= 2
    block_m = max(16, BLOCK_M // shrink)
    # row-major kernels run one program per row block: keep at least two per multiprocessor
    while block_m > 16 and C * triton.cdiv(M, block_m) < 2 * _multiprocessors(z.device):
        block_m //= 2
    return dict(BLOCK_M=block_m, BLOCK_K=max(16, block_k // shrink), BLOCK_D=block_d, PRECISION=precision,
                num_warps=NUM_WARPS)


def _grad_z_config(config: dict, with_entropy: bool) -> dict:
    """The grad-z kernel's blocks: `config` but at most 32 codes a block where its entropy terms
    meet E on the CUDA cores (PRECISION "ieee", float32 products whatever the input dtype): with
    64-code blocks the compiled kernel keeps those tiles on the stack in half precision, with 32
    they stay in registers (tests/test_triton_compile.py checks the stack)."""
    if with_entropy and config["PRECISION"] == "ieee":
        return dict(config, BLOCK_K=max(16, min(config["BLOCK_K"], BLOCK_K // 2)))
    return config


def forward(
    z: torch.Tensor, codebook: torch.Tensor, tau: float, entropy_temperature: float, with_stats: bool,
    with_entropy: bool, allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """z (C, M, D), codebook (C, K, D) contiguous -> z_q (C, M, D), row_stats (4, C, M) float32
    (softvq_fast.ops.soft_vq.ROW_STATS), column_sum (C, K) float32, indices (C, M) int64.
    Indices are written with `with_stats`, the entropy statistics and column sums with
    `with_entropy`; what is not written is zero."""
    C, M, D = z.shape
    K = codebook.shape[1]
    z_q = torch.empty_like(z)
    row_stats = torch.zeros(4, C, M, device=z.device, dtype=torch.float32)
    column_sum = torch.zeros(C, K, device=z.device, dtype=torch.float32)
    indices = torch.zeros(C, M, device=z.device, dtype=torch.long)
    config = _config(z, allow_tf32)
    with torch.cuda.device_of(z):  # Triton launches on the current device, which may be another
        _forward_kernel[(triton.cdiv(M, config["BLOCK_M"]), C)](
            z, codebook, z_q, row_stats, indices, M, K, D, 1.0 / tau, 1.0 / entropy_temperature,
            WITH_STATS=with_stats, WITH_ENTROPY=with_entropy, **config,
        )
        if with_entropy:
            _column_sum_kernel[(triton.cdiv(K, config["BLOCK_K"]), C)](
                z, codebook, row_stats, column_sum, M, K, D, 1.0 / entropy_temperature, **config
            )
    return z_q, row_stats, column_sum, indices


def backward(
    grad_z_q: torch.Tensor,
    grad_row_entropy: torch.Tensor,
    grad_column_sum: torch.Tensor,
    z: torch.Tensor,
    codebook: torch.Tensor,
    z_q: torch.Tensor,
    row_stats: torch.Tensor,
    tau: float,
    entropy_temperature: float,
    with_entropy: bool,
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (z (C, M, D), codebook (C, K, D)); see softvq_fast.ops.soft_vq.soft_vq_backward."""
    C, M, D = z.shape
    K = codebook.shape[1]
    grad_z_q = grad_z_q.to(z.dtype)
    grad_z = torch.empty_like(z)
    grad_codebook = torch.empty_like(codebook)
    config = _config(z, allow_tf32)
    with torch.cuda.device_of(z):
        _grad_z_kernel[(triton.cdiv(M, config["BLOCK_M"]), C)](
            grad_z_q, grad_row_entropy, grad_column_sum, z, codebook, z_q, row_stats, grad_z, M, K, D,
            1.0 / tau, 1.0 / entropy_temperature, WITH_ENTROPY=with_entropy, **_grad_z_config(config, with_entropy),
        )
        _grad_codebook_kernel[(triton.cdiv(K, config["BLOCK_K"]), C)](
            grad_z_q, z, codebook, row_stats, grad_codebook, M, K, D, 1.0 / tau, **config
        )
    return grad_z, grad_codebook
