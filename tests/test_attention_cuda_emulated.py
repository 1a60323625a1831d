"""The CUDA attention forward (csrc/cuda/attention_kernel.cuh) without a GPU: compiled for the CPU
against tests/support/cuda_emulation/simt.h, which runs every CUDA thread as a fiber and emulates the warp
collectives (__shfl_xor_sync, mma.sync) and __syncthreads, with shuffled thread order and poisoned
shared memory. Checks the kernel's logic (launch plan, fragment layouts, masking, online softmax,
synchronisation) against float64 at the shapes of test_attention_cuda.py. Not its speed, and not
what only hardware shows (alignment faults, races between blocks, the real mma's summation
order)."""
from __future__ import annotations

import re

import pytest
import torch
from torch.utils import cpp_extension

from support.attention_cases import CUDA_SHORT, CUDA_TILED, CUDA_TOL, qkv, reference
from support.numerics import rel_err
from support.paths import ROOT



@pytest.fixture(scope="module")
def emulated():
    """The emulation, built on first use (about 30 s on the CI CPU; cached after that, per torch
    version: a build against another torch beside it must not be reused)."""
    return cpp_extension.load(
        name="softvq_fast_cuda_emulation_" + re.sub(r"\W", "_", torch.__version__),
        sources=[str(ROOT / "tests" / "support" / "cuda_emulation" / "attention_emulated.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "csrc" / "cuda")],
        # nvcc keeps the kernel's type-punned loads and stores (16-byte chunks, packed pairs) in
        # order; g++ may not, unless told so.
        extra_cflags=["-O2", "-fno-strict-aliasing"],
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", CUDA_SHORT + CUDA_TILED, ids=lambda s: "x".join(map(str, s)))
def test_emulated_kernel_matches_float64(emulated, shape, dtype, seed):
    q, k, v = qkv(*shape, dtype)
    out, lse = emulated.attention_fwd(q, k, v, shape[-1] ** -0.5, seed)
    ref, ref_lse = reference(q, k, v)
    assert out.shape == q.shape and out.is_contiguous()
    assert rel_err(out, ref) <= CUDA_TOL[dtype], f"rel err {rel_err(out, ref):.3g}"
    assert rel_err(lse, ref_lse) <= 1e-3, f"lse rel err {rel_err(lse, ref_lse):.3g}"


def test_emulated_kernel_unaligned_views(emulated):
    """Rows that are not 16-byte aligned are copied before the kernel reads them in 16-byte chunks."""
    base = torch.randn(1, 20, 3 * 2 * 64 + 1, dtype=torch.bfloat16)
    q, k, v = base[..., 1:].unflatten(-1, (3, 2, 64)).unbind(2)
    shifted = torch.randn(20 * 2 * 64 + 1, dtype=torch.bfloat16)[1:].view(1, 20, 2, 64)
    for args in ((q, k, v), (shifted, k, v)):
        out, _ = emulated.attention_fwd(*args, 0.125, 0)
        ref, _ = reference(*args, 0.125)
        assert rel_err(out, ref) <= 1e-2


def test_emulated_kernel_refuses_what_it_lacks(emulated):
    q, k, v = qkv(1, 200, 200, 1, 72, torch.bfloat16)
    with pytest.raises(RuntimeError, match="head_dim must be 64, 72 or 128"):
        emulated.attention_fwd(q, k, v, 1.0, 0)
    with pytest.raises(RuntimeError, match="dtype must be bfloat16 or float16"):
        emulated.attention_fwd(q.float(), k.float(), v.float(), 1.0, 0)


def test_emulated_mma_is_a_matrix_product(emulated):
    a = torch.randn(16, 16).bfloat16()
    b = torch.randn(16, 8).bfloat16()
    assert rel_err(emulated.mma(a, b), a.double() @ b.double()) <= 1e-6


def test_emulation_exposes_a_missing_syncthreads(emulated):
    """Without __syncthreads, some thread order reads shared memory before it is written."""
    unsynced = [emulated.probe("unsynced", 64, seed) for seed in range(4)]
    assert any(out.isnan().any() for out in unsynced)
    for seed in range(4):
        assert torch.equal(emulated.probe("synced", 64, seed), torch.ones(64))


def test_emulation_refuses_a_divergent_warp_collective(emulated):
    with pytest.raises(RuntimeError, match="deadlock"):
        emulated.probe("divergent_shuffle", 32, 0)


def test_emulation_catches_a_write_past_the_launch_shared_memory(emulated):
    with pytest.raises(RuntimeError, match="wrote past the 0 bytes of shared memory"):
        emulated.probe("overflowing", 32, 0)


def _padded_row(n: int) -> int:
    return n + (8 if n % 16 == 0 else 16)


@pytest.mark.parametrize("kv_len, head_dim", [(kv, d) for kv in (1, 17, 32, 64, 65, 100, 128) for d in (64, 72, 128)]
                         + [(129, 64), (321, 64)])
def test_launch_takes_the_shared_memory_its_keys_need(emulated, kv_len, head_dim):
    """Up to 64 keys take shared memory for 64, not for the short kernel's 128 (21 KB instead of
    41 KB at head dim 72: more blocks fit an SM); the tiled kernel takes 64-key tiles."""
    q, k, v = qkv(2, 40, kv_len, 3, head_dim, torch.bfloat16)
    grid, threads, smem = emulated.launch_plan(q, k, v)
    keys = 64 if kv_len <= 64 or kv_len > 128 else 128
    assert smem == 2 * (keys * _padded_row(head_dim) + head_dim * _padded_row(keys))
    assert grid == [-(-40 // (threads // 2)), 3, 2]
