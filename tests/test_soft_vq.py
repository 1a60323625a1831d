"""soft_vq: the reference and cpu backends against float64, stats, gradients, custom-op
registration, torch.compile, bad inputs, NaN semantics and the fused path's memory bound."""
from __future__ import annotations

import re

import pytest
import torch
from support.numerics import rel_err
from support.soft_vq_cases import SHAPES, TAU, assert_matches_float64, make_problem

from softvq_fast import SoftVQStats, soft_vq
from softvq_fast.dispatch import NoBackendError
from softvq_fast.ops.soft_vq import (
    BACKENDS,
    TEMPERATURE_RANGE,
    SoftVQInputs,
    soft_vq_backward,
    soft_vq_forward,
)

CPU_BACKENDS = ("reference", "cpu")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}S{}C{}K{}D{}{}".format(*s[:5], "-l2" if s[5] else ""))
def test_float32_matches_float64(backend, shape):
    assert_matches_float64(make_problem(*shape), backend, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("l2_norm", [False, True])
def test_entropy_gradient_where_the_regulariser_is_soft(backend, l2_norm):
    """Small logits keep softmax(logits / 0.01) spread out, so its gradient is far from zero."""
    problem = make_problem(2, 12, 2, 29, 16, l2_norm, scale=0.02)
    assert_matches_float64(problem, backend, torch.float32, entropy_weight=50.0)


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_every_cpu_kernel_build(monkeypatch, isa):
    """csrc/cpu compiles the kernels per instruction set; SOFTVQ_FAST_CPU_ISA forces one."""
    monkeypatch.setenv("SOFTVQ_FAST_CPU_ISA", isa)
    problem = make_problem(2, 12, 2, 150, 24, False)
    try:
        soft_vq(problem.z[:1, :2].float(), problem.codebook.float(), TAU, backend="cpu")
    except RuntimeError as exc:
        if "does not support it" in str(exc):
            pytest.skip(f"this CPU cannot run the {isa} build")
        raise
    assert_matches_float64(problem, "cpu", torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cpu(dtype):
    assert_matches_float64(make_problem(2, 8, 2, 50, 16, False), "cpu", dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stats_without_the_regulariser(backend):
    z, codebook = torch.randn(3, 8, 16), torch.randn(2, 40, 16)
    z_q, full = soft_vq(z, codebook, TAU, return_stats=True, backend=backend)
    z_q_light, light = soft_vq(z, codebook, TAU, return_stats=True, entropy=False, backend=backend)
    assert light.entropy_loss is None and full.entropy_loss is not None
    assert torch.equal(z_q_light, z_q) and torch.equal(light.indices, full.indices)
    assert torch.equal(light.usage, full.usage) and torch.equal(light.max_prob, full.max_prob)


def test_two_dim_inputs_and_single_codebook():
    z, codebook = torch.randn(9, 8), torch.randn(21, 8)
    z_q, stats = soft_vq(z, codebook, TAU, return_stats=True, backend="cpu")
    assert isinstance(stats, SoftVQStats)
    assert z_q.shape == (9, 8) and stats.indices.shape == (9,) and stats.usage.shape == (1, 21)
    want = torch.softmax(z.double() @ codebook.double().T / TAU, dim=-1) @ codebook.double()
    assert torch.allclose(z_q.double(), want, rtol=1e-5, atol=1e-6)


def test_segments_use_their_codebooks():
    """Token s of a sample uses codebook s // (S // C): swapping codebooks swaps the segments."""
    z, codebook = torch.randn(2, 6, 4), torch.randn(3, 10, 4)
    z_q = soft_vq(z, codebook, TAU, backend="cpu")
    swapped = soft_vq(z[:, [2, 3, 0, 1, 4, 5]], codebook[[1, 0, 2]], TAU, backend="cpu")
    assert torch.allclose(swapped[:, [2, 3, 0, 1, 4, 5]], z_q, atol=1e-6)


def test_codebook_gets_no_gradient_through_the_logits():
    z, codebook = torch.randn(2, 4, 8), torch.randn(1, 16, 8, requires_grad=True)
    _, stats = soft_vq(z, codebook, TAU, return_stats=True, backend="cpu")
    stats.entropy_loss.backward()
    assert torch.count_nonzero(codebook.grad) == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_rows_propagate_like_the_reference(backend, bad):
    z, codebook = torch.randn(2, 6, 8), torch.randn(2, 20, 8)
    z[1, 4, 3] = bad
    z_q = soft_vq(z, codebook, TAU, backend=backend)
    nan_rows = torch.isnan(z_q).any(dim=-1)
    assert nan_rows[1, 4] and nan_rows.sum() == 1
    clean = soft_vq(z[:1], codebook, TAU, backend="reference")
    assert torch.allclose(z_q[:1], clean, atol=1e-6)


@pytest.mark.parametrize(
    "z, codebook, message",
    [
        (torch.randn(2, 3, 4, 5), torch.randn(7, 5), "z must be a tensor of shape"),
        (torch.randn(2, 6, 4), torch.randn(2, 2, 7, 4), "codebook must be a tensor of shape"),
        (torch.randn(2, 6, 4), torch.randn(7, 5), "codebook code dimension 5 != z dimension D=4"),
        (torch.randn(2, 5, 4), torch.randn(2, 7, 4), "not divisible by the 2 codebooks"),
        (torch.randn(2, 6, 4).int(), torch.randn(7, 4), "z must be float32"),
        (torch.randn(2, 6, 4), torch.randn(7, 4).half(), "codebook dtype torch.float16 differs"),
    ],
)
def test_bad_inputs_name_the_argument(z, codebook, message):
    with pytest.raises((ValueError, TypeError), match=message):
        soft_vq(z, codebook, TAU)


def test_unavailable_backend_lists_reasons():
    with pytest.raises(NoBackendError, match="cpu"):
        soft_vq(torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64), TAU, backend="cpu")
    with pytest.raises(ValueError, match=r"tau must be a finite number in \[1.18e-38, 8.51e\+37\].*got 0.0"):
        soft_vq(torch.randn(2, 4, 8), torch.randn(5, 8), 0.0)


ALL_BACKENDS = ("auto", "reference", "cpu", "triton")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name", ["tau", "entropy_temperature"])
@pytest.mark.parametrize("value", [float("inf"), 1e38, float("nan"), 0.0, -0.5, 1e-39])
def test_temperatures_outside_the_float32_range_are_refused(backend, name, value):
    """1/t must be a normal float32 (the fused kernels scale by it): inf and 1e38 gave NaN on the
    cpu backend where the reference gave uniform weights."""
    z, codebook = torch.randn(2, 4, 8), torch.randn(2, 5, 8)
    kwargs = {"tau": TAU, name: value}
    with pytest.raises(ValueError, match=rf"soft_vq: {name} must be a finite number in .*got {re.escape(str(value))}$"):
        soft_vq(z, codebook, return_stats=True, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_temperatures_at_the_ends_of_the_range(backend):
    """The largest tau gives uniform weights (z_q = its codebook's mean), the smallest the argmax
    code, on every backend: no NaN at either end. (Small logits: the reference divides them by
    tau before the softmax, which overflows for |logit| > 4 at the smallest tau.)"""
    low, high = TEMPERATURE_RANGE
    z, codebook = torch.randn(2, 6, 8), 0.1 * torch.randn(2, 5, 8)
    segment = torch.arange(6) // 3  # the codebook of each token
    z_q = soft_vq(z, codebook, high, backend=backend)
    assert rel_err(z_q, codebook.double().mean(1)[segment].expand(2, 6, 8)) <= 1e-6
    z_q, stats = soft_vq(z, codebook, low, return_stats=True, entropy_temperature=high, backend=backend)
    assert torch.equal(z_q, codebook[segment, stats.indices])
    assert torch.isfinite(stats.entropy_loss) and torch.isfinite(stats.max_prob)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "codebook, what",
    [(torch.randn(2, 0, 8), "K >= 1"), (torch.randn(0, 8), "K >= 1"), (torch.randn(0, 5, 8), "C >= 1")],
    ids=["K0", "K0-2d", "C0"],
)
def test_empty_codebooks_are_refused(backend, codebook, what):
    """K = 0 gave NaN (cpu), zeros (reference) or an IndexError with stats; C = 0 a ZeroDivisionError."""
    for return_stats in (False, True):
        with pytest.raises(ValueError, match=rf"soft_vq: codebook needs {what} \(.*\), got shape"):
            soft_vq(torch.randn(2, 4, 8), codebook, TAU, return_stats=return_stats, backend=backend)


def test_zero_code_dimension_is_refused():
    with pytest.raises(ValueError, match=r"codebook needs D >= 1 \(code dimension\), got shape \(2, 5, 0\)"):
        soft_vq(torch.randn(2, 4, 0), torch.randn(2, 5, 0), TAU)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(tau=True), TypeError, "tau must be a real number .float., got bool"),
        (dict(tau="0.5"), TypeError, "tau must be a real number .float., got str"),
        (dict(tau=torch.tensor(0.5)), TypeError, r"got Tensor \(a tensor tau would get no gradient"),
        (dict(entropy_temperature=None), TypeError, "entropy_temperature must be a real number"),
        (dict(l2_norm="yes"), TypeError, "l2_norm must be True or False, got 'yes'"),
        (dict(return_stats=1), TypeError, "return_stats must be True or False, got 1"),
        (dict(entropy=None), TypeError, "entropy must be True or False, got None"),
        (dict(allow_tf32="no"), TypeError, "allow_tf32 must be True, False or None, got 'no'"),
        (dict(backend=3), ValueError, "unknown backend 3"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, message):
    z, codebook = torch.randn(2, 4, 8), torch.randn(5, 8)
    with pytest.raises(error, match=message):
        soft_vq(z, codebook, **{"tau": TAU, **kwargs})


@pytest.mark.parametrize("z, codebook, name", [([[1.0]], torch.randn(5, 8), "z"), (torch.randn(4, 8), None, "codebook")])
def test_non_tensors_are_refused(z, codebook, name):
    with pytest.raises(TypeError, match=rf"soft_vq: {name} must be a torch.Tensor of shape .*, got"):
        soft_vq(z, codebook, TAU)


def test_tau_accepts_python_and_numpy_numbers():
    numpy = pytest.importorskip("numpy")
    z, codebook = torch.randn(2, 4, 8), torch.randn(5, 8)
    want = soft_vq(z, codebook, 0.5)
    assert torch.equal(soft_vq(z, codebook, numpy.float64(0.5)), want)
    assert torch.equal(soft_vq(z, codebook, 1), soft_vq(z, codebook, 1.0))


def test_environment_variable_picks_the_backend(monkeypatch):
    monkeypatch.delenv("SOFTVQ_FAST_BACKEND", raising=False)
    monkeypatch.setenv("SOFTVQ_FAST_SOFT_VQ_BACKEND", "nonexistent")
    with pytest.raises(ValueError, match="unknown backend 'nonexistent'"):
        soft_vq(torch.randn(2, 4, 8), torch.randn(5, 8), TAU)
    monkeypatch.setenv("SOFTVQ_FAST_SOFT_VQ_BACKEND", "reference")
    assert BACKENDS.select(SoftVQInputs(torch.device("cpu"), torch.float32, False, 8)).name == "reference"


def test_the_old_environment_variable_still_works_with_a_warning(monkeypatch):
    monkeypatch.delenv("SOFTVQ_FAST_SOFT_VQ_BACKEND", raising=False)
    monkeypatch.setenv("SOFTVQ_FAST_BACKEND", "reference")
    inputs = SoftVQInputs(torch.device("cpu"), torch.float32, False, 8)
    with pytest.warns(FutureWarning, match="SOFTVQ_FAST_BACKEND is deprecated; set SOFTVQ_FAST_SOFT_VQ_BACKEND"):
        assert BACKENDS.select(inputs).name == "reference"
    monkeypatch.setenv("SOFTVQ_FAST_SOFT_VQ_BACKEND", "cpu")  # the new name wins
    assert BACKENDS.select(inputs).name == "cpu"


def test_auto_order_per_device():
    def auto(device, dtype=torch.float32, dim=8):
        return list(BACKENDS.priority(SoftVQInputs(torch.device(device), dtype, False, dim)))

    assert auto("cpu") == ["cpu", "reference"]
    assert auto("cuda") == ["triton", "reference"]
    assert auto("meta") == ["reference"]
    assert BACKENDS.select(SoftVQInputs(torch.device("cpu"), torch.float64, True, 8)).name == "reference"


def test_custom_ops_pass_opcheck():
    z, codebook = torch.randn(2, 9, 16), torch.randn(2, 37, 16)
    for requires_grad in (False, True):
        args = (z.clone().requires_grad_(requires_grad), codebook.clone().requires_grad_(requires_grad))
        torch.library.opcheck(soft_vq_forward, (*args, TAU, 0.01, True, True, "cpu", False))
    z_q, row_stats, _, _ = soft_vq_forward(z, codebook, TAU, 0.01, True, True, "cpu", False)
    torch.library.opcheck(
        soft_vq_backward,
        (torch.randn_like(z), torch.randn(2, 9), torch.randn(2, 37), z, codebook, z_q, row_stats, TAU, 0.01, True, "cpu", False),
    )


def test_torch_compile_fullgraph_matches_eager():
    z, codebook = torch.randn(2, 8, 16, requires_grad=True), torch.randn(2, 37, 16, requires_grad=True)

    def step(z, codebook):
        z_q, stats = soft_vq(z, codebook, TAU, l2_norm=True, return_stats=True, backend="cpu")
        return (z_q * z_q).sum() + stats.entropy_loss, stats.indices

    loss, indices = torch.compile(step, fullgraph=True)(z, codebook)
    grads = torch.autograd.grad(loss, (z, codebook))
    loss_eager, indices_eager = step(z, codebook)
    grads_eager = torch.autograd.grad(loss_eager, (z, codebook))
    assert torch.equal(indices, indices_eager)
    for got, want in zip((loss, *grads), (loss_eager, *grads_eager)):
        assert rel_err(got, want) <= 1e-5  # inductor fuses the normalisation differently


def test_fused_cpu_memory_stays_far_below_tokens_times_codes():
    """Peak extra memory of forward + backward: O(N*D + C*K*D) for the fused path, far below one
    N x K float32 tensor (which the reference allocates several times)."""
    from bench.measure import peak_memory_bytes

    B, S, C, K, D = 64, 64, 4, 4096, 16
    z, codebook = torch.randn(B, S, D, requires_grad=True), torch.randn(C, K, D, requires_grad=True)

    def step(backend):
        def run():
            z_q, stats = soft_vq(z, codebook, TAU, return_stats=True, backend=backend)
            ((z_q * z_q).sum() + stats.entropy_loss).backward()
        return run

    n_by_k = B * S * K * 4
    linear = (B * S * D + C * K * D) * 4
    fused = peak_memory_bytes(step("cpu"), torch.device("cpu"))
    reference = peak_memory_bytes(step("reference"), torch.device("cpu"))
    assert reference > n_by_k  # the measurement sees the reference's tokens x codes tensors
    assert fused < n_by_k / 8 and fused < 16 * linear, f"fused peak {fused} B; N*K*4 = {n_by_k}, (N*D + C*K*D)*4 = {linear}"
