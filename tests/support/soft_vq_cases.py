"""Shared helpers of the soft_vq tests: random problems, one training step per backend, and the
comparison against the float64 reference."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from support.numerics import rel_err

from softvq_fast import soft_vq

# (B, S, C, K, D, l2_norm): N and K not multiples of any block size, D in {8, 16, 32, 64}, C in {1, 2, 4}
SHAPES = [
    (2, 7, 1, 45, 8, False),
    (3, 10, 2, 70, 16, True),
    (2, 12, 4, 33, 32, False),
    (1, 20, 4, 100, 64, True),
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
TAU = 0.3
# The authors' entropy_loss_ratio. A larger weight on unit-scale logits makes grad_z depend on the
# 0.01-temperature softmax's float32 rounding (errors up to ~3e-5 in fp32, the reference's own up
# to ~2e-5); the soft-regulariser tests check that gradient on well-conditioned logits instead.
ENTROPY_WEIGHT = 0.01


@dataclass
class Problem:
    z: torch.Tensor
    codebook: torch.Tensor
    grad_output: torch.Tensor
    l2_norm: bool


def make_problem(B: int, S: int, C: int, K: int, D: int, l2_norm: bool, device="cpu", scale: float = 1.0) -> Problem:
    """Fresh random float64 inputs; `scale` shrinks the logits so that the 0.01-softmax is not one-hot."""
    z = scale * torch.randn(B, S, D, dtype=torch.float64, device=device)
    codebook = torch.randn(C, K, D, dtype=torch.float64, device=device) / D**0.5
    return Problem(z, codebook, torch.randn(B, S, D, dtype=torch.float64, device=device), l2_norm)


def train_step(problem: Problem, backend: str, dtype: torch.dtype, entropy_weight: float = ENTROPY_WEIGHT) -> dict:
    """z_q, stats and the gradients of sum(z_q * grad_output) + entropy_weight * entropy_loss."""
    z = problem.z.to(dtype, copy=True).requires_grad_()
    codebook = problem.codebook.to(dtype, copy=True).requires_grad_()
    z_q, stats = soft_vq(z, codebook, TAU, l2_norm=problem.l2_norm, return_stats=True, backend=backend)
    loss = (z_q.double() * problem.grad_output).sum() + entropy_weight * stats.entropy_loss.double()
    loss.backward()
    return dict(z_q=z_q, entropy_loss=stats.entropy_loss, max_prob=stats.max_prob, cos=stats.cos,
                grad_z=z.grad, grad_codebook=codebook.grad, indices=stats.indices, usage=stats.usage)


def assert_matches_float64(problem: Problem, backend: str, dtype: torch.dtype, entropy_weight: float = ENTROPY_WEIGHT) -> None:
    got = train_step(problem, backend, dtype, entropy_weight)
    # the float64 reference sees the same (rounded) inputs
    rounded = Problem(problem.z.to(dtype).double(), problem.codebook.to(dtype).double(), problem.grad_output, problem.l2_norm)
    want = train_step(rounded, "reference", torch.float64, entropy_weight)
    keys = ("z_q", "entropy_loss", "max_prob", "cos", "grad_z", "grad_codebook")
    # The regulariser divides logits by 0.01, so float32 rounding of the logits alone can cost
    # ~1e-5 in grad_z: where the float32 reference itself errs that much, allow twice its error.
    baseline = train_step(problem, "reference", dtype, entropy_weight)
    tol = {k: max(TOLERANCE[dtype], 2 * rel_err(baseline[k], want[k])) for k in keys}
    errors = {k: rel_err(got[k], want[k]) for k in keys}
    bad = {k: f"{e:.2e} > {tol[k]:.2e}" for k, e in errors.items() if not e <= tol[k]}
    assert not bad, f"{backend} {dtype}: relative errors above tolerance: {bad}"
    agree = (got["indices"] == want["indices"]).double().mean().item()
    if dtype == torch.float32:
        assert agree == 1.0 and torch.equal(got["usage"], want["usage"])
    else:  # near-ties may flip in half precision
        assert agree >= 0.9
    assert int(got["usage"].sum()) == got["indices"].numel()
