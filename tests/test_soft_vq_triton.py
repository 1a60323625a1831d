"""soft_vq's Triton kernels: under the interpreter on the CPU (tiny shapes, small blocks so that
every loop and mask runs), compiled on CUDA at real shapes (the GPU check)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from support.numerics import rel_err  # noqa: E402
from support.soft_vq_cases import SHAPES, TAU, assert_matches_float64, make_problem  # noqa: E402

from softvq_fast import soft_vq  # noqa: E402
from softvq_fast.kernels import soft_vq as kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def small_blocks(monkeypatch):
    """16 x 16 blocks: the tiny test shapes span several row and code blocks with ragged ends."""
    monkeypatch.setattr(kernels, "BLOCK_M", 16)
    monkeypatch.setattr(kernels, "BLOCK_K", 16)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}S{}C{}K{}D{}{}".format(*s[:5], "-l2" if s[5] else ""))
def test_triton_float32_matches_float64(small_blocks, shape):
    assert_matches_float64(make_problem(*shape, device=DEVICE), "triton", torch.float32)


def test_tf32_setting_read_through_the_new_api(small_blocks):
    """allow_tf32=None follows torch's setting; torch >= 2.9 raises on reading the legacy
    allow_tf32 flag once the new fp32_precision API has set TF32."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision")
    z, codebook = torch.randn(2, 8, 16, device=DEVICE), torch.randn(2, 32, 16, device=DEVICE)
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        out = soft_vq(z, codebook, tau=TAU, backend="triton")
    finally:
        matmul.fp32_precision = before
    assert rel_err(out, soft_vq(z.double(), codebook.double(), tau=TAU, backend="reference")) <= 1e-2


def test_triton_entropy_gradient_where_the_regulariser_is_soft(small_blocks):
    problem = make_problem(2, 12, 2, 29, 16, True, device=DEVICE, scale=0.02)
    assert_matches_float64(problem, "triton", torch.float32, entropy_weight=50.0)


INTERPRETER_BF16_DOT = pytest.mark.skipif(
    DEVICE == "cpu", reason="the Triton interpreter's tl.dot reads bfloat16 operands wrongly (bf16 runs in the CUDA tests)"
)


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=INTERPRETER_BF16_DOT), torch.float16])
def test_triton_half_precision(small_blocks, dtype):
    assert_matches_float64(make_problem(2, 8, 2, 50, 16, False, device=DEVICE), "triton", dtype)


def test_triton_without_stats_and_nan_rows(small_blocks):
    z, codebook = torch.randn(2, 6, 8, device=DEVICE), torch.randn(2, 20, 8, device=DEVICE)
    z[1, 4, 3] = float("nan")
    z_q = soft_vq(z, codebook, TAU, backend="triton")
    # (argmax of a NaN row is left to the GPU: the interpreter's numpy argmax refuses it)
    _, light = soft_vq(z[:1], codebook, TAU, return_stats=True, entropy=False, backend="triton")
    _, full = soft_vq(z[:1], codebook, TAU, return_stats=True, backend="reference")
    assert light.entropy_loss is None and torch.equal(light.indices, full.indices)
    want = soft_vq(z.double(), codebook.double(), TAU, backend="reference")
    assert torch.equal(torch.isnan(z_q), torch.isnan(want))
    assert rel_err(z_q[0], want[0]) <= 1e-5


def _poison_cuda_allocator() -> None:
    """Fill the caching allocator's free blocks with NaN so that unwritten outputs show up."""
    torch.full((1 << 27,), float("nan"), device="cuda")
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("l2_norm", [False, True])
def test_triton_cuda_at_training_shape(dtype, l2_norm):
    """The authors' shape family (C=4, K=8192, D=32) at batch 8, against float64 on the GPU."""
    _poison_cuda_allocator()
    assert_matches_float64(make_problem(8, 64, 4, 8192, 32, l2_norm, device="cuda"), "triton", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("D", [8, 256])  # padded to the 16-wide dot minimum; the largest supported
def test_triton_cuda_code_dims(D):
    _poison_cuda_allocator()
    assert_matches_float64(make_problem(3, 40, 2, 1000, D, False, device="cuda"), "triton", torch.float32)


@pytest.mark.cuda
def test_triton_cuda_tf32_and_compile():
    problem = make_problem(8, 64, 4, 8192, 32, True, device="cuda")
    z, codebook = problem.z.float(), problem.codebook.float()
    want = soft_vq(problem.z, problem.codebook, TAU, l2_norm=True, backend="reference")
    z_q = soft_vq(z, codebook, TAU, l2_norm=True, backend="triton", allow_tf32=True)
    assert rel_err(z_q, want) <= 1e-2  # tf32: ~3e-4 on the logits, amplified by 1 / tau
    compiled = torch.compile(lambda z, c: soft_vq(z, c, TAU, l2_norm=True, backend="triton"), fullgraph=True)
    assert rel_err(compiled(z, codebook), want) <= 1e-5


def test_triton_custom_op_passes_opcheck(small_blocks):
    from softvq_fast.ops.soft_vq import soft_vq_forward

    z = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)
    codebook = torch.randn(2, 21, 16, device=DEVICE, requires_grad=True)
    torch.library.opcheck(soft_vq_forward, (z, codebook, TAU, 0.01, True, True, "triton", False))


def test_block_sizes_fit_the_shared_memory_of_the_device(monkeypatch):
    """float32 code blocks halve again where the device allows less than FP32_SHARED_BYTES: an
    A100 (166,912 bytes opt-in) with TF32 at D = 128 and 256, not an H100/H200 (232,448)."""
    blocks = {}
    for gpu, shared in (("a100", 166_912), ("h200", 232_448)):
        monkeypatch.setattr(kernels, "_shared_memory_per_block", lambda device, shared=shared: shared)
        blocks[gpu] = {(str(dtype)[6:], dim, tf32): kernels._config(torch.zeros(1, 64, dim, dtype=dtype), tf32)["BLOCK_K"]
                       for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False))
                       for dim in (128, 256)}
    common = {("float32", 128, False): 32, ("float32", 256, False): 16, ("bfloat16", 128, False): 64,
              ("bfloat16", 256, False): 32}
    assert blocks == {"a100": {**common, ("float32", 128, True): 32, ("float32", 256, True): 16},
                      "h200": {**common, ("float32", 128, True): 64, ("float32", 256, True): 32}}
