"""The CUDA attention kernels against float64 at every supported shape (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

from support.attention_cases import CUDA_SHORT, CUDA_TILED, CUDA_TOL, poison, qkv, reference
from support.numerics import rel_err
from softvq_fast._extension import extension_has_cuda
from softvq_fast.ops.attention import attention

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not extension_has_cuda(), reason="softvq_fast._C was built without CUDA kernels"),
]



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", CUDA_SHORT + CUDA_TILED, ids=lambda s: "x".join(map(str, s)))
def test_cuda_kernel_matches_float64(shape, dtype):
    q, k, v = qkv(*shape, dtype, device="cuda")
    poison(q.shape, dtype, "cuda")
    out, lse = torch.ops.softvq_fast.attention_fwd(q, k, v, shape[-1] ** -0.5)
    torch.cuda.synchronize()
    ref, ref_lse = reference(q, k, v)
    assert out.shape == q.shape and out.is_contiguous()
    assert rel_err(out, ref) <= CUDA_TOL[dtype], f"rel err {rel_err(out, ref):.3g}"
    assert rel_err(lse, ref_lse) <= 1e-3, f"lse rel err {rel_err(lse, ref_lse):.3g}"


def test_cuda_kernel_unaligned_views():
    """Rows that are not 16-byte aligned (strided, or contiguous at an odd offset) are copied
    first, not read wrongly."""
    base = torch.randn(2, 40, 3 * 4 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    q, k, v = base[..., 1:].unflatten(-1, (3, 4, 64)).unbind(2)
    flat = torch.randn(2 * 40 * 4 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    shifted = flat[1:].view(2, 40, 4, 64)
    for args in ((q, k, v), (shifted, k, v)):
        out, _ = torch.ops.softvq_fast.attention_fwd(*args, 0.125)
        ref, _ = reference(*args, 0.125)
        assert rel_err(out, ref) <= 1e-2


def test_cuda_unsupported_head_dim_is_refused():
    q, k, v = qkv(1, 200, 200, 2, 72, torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="head_dim must be 64, 72 or 128"):
        torch.ops.softvq_fast.attention_fwd(q, k, v, 1.0)


@pytest.mark.parametrize("backend", ["softvq", "sdpa", "math", "flash_attn", "xformers"])
def test_cuda_gradients_through_every_backend(backend):
    q, k, v = qkv(2, 77, 77, 4, 64, torch.bfloat16, device="cuda")
    qkv = torch.stack([q, k, v], 2).requires_grad_()
    try:
        out = attention(*qkv.unbind(2), backend=backend)
    except Exception as exc:  # a backend whose package is missing or broken says so; skip it
        if "not installed" in str(exc) or "fails to import" in str(exc):
            pytest.skip(str(exc))
        raise
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, qkv, grad)
    ref_in = qkv.detach().double().requires_grad_()
    ref_out, _ = reference(*ref_in.unbind(2))
    (want,) = torch.autograd.grad(ref_out, ref_in, grad.double())
    assert rel_err(out, ref_out) <= 1e-2
    assert rel_err(got, want) <= 2e-2, f"grad rel err {rel_err(got, want):.3g}"


def test_cuda_opcheck_and_compile():
    q, k, v = qkv(2, 40, 40, 2, 64, torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.softvq_fast.attention_fwd.default, (q, k, v, 0.125))
    # with gradients: the autograd registration and the recomputing backward under aot_dispatch
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.softvq_fast.attention_fwd.default, (*leaves, 0.125))
    qkv = torch.stack([q, k, v], 2)

    def block(x):
        return attention(*x.unbind(2), backend="softvq").flatten(2).float().sum()

    with torch.no_grad():
        assert rel_err(torch.compile(block, fullgraph=True)(qkv), block(qkv)) <= 1e-3


def test_cuda_double_backward_is_refused():
    q, k, v = qkv(1, 6, 6, 1, 64, torch.bfloat16, device="cuda")
    qkv = torch.stack([q, k, v], 2).requires_grad_()
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(attention(*qkv.unbind(2), backend="softvq").float().sum(), qkv, create_graph=True)
