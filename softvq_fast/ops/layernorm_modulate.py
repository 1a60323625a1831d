"""Fused LayerNorm (no affine) + adaLN modulation: y = LN(x) * (1 + scale) + shift.

The operation at the entry of every DiT/SiT attention and MLP branch and of the final layer.
x is (B, S, D); scale and shift are (B, D), one row per sample, broadcast over the S tokens.

Backends (the `backend` argument or SOFTVQ_FAST_LAYERNORM_MODULATE_BACKEND overrides `auto`,
which takes triton then reference on CUDA, reference elsewhere):
  triton     fused Triton kernels, forward and backward (CUDA; on the CPU only under
             TRITON_INTERPRET=1, for tests)
  reference  torch.nn.functional.layer_norm followed by the modulation (CPU, CUDA)
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from softvq_fast.dispatch import (
    AUTO, FLOAT_DTYPES, OpBackends, ReferenceBackend, TritonBackend, grad_needed, register_op,
)

_MAX_TRITON_DIM = 16384


@dataclass(frozen=True)
class LayerNormModulateInputs:
    device: torch.device
    dtype: torch.dtype
    needs_grad: bool
    dim: int


class LayerNormModulateTritonBackend(TritonBackend):
    dtypes = FLOAT_DTYPES

    def input_reasons(self, inputs: LayerNormModulateInputs) -> list[str]:
        if inputs.dim > _MAX_TRITON_DIM:
            return [f"hidden size {inputs.dim} > {_MAX_TRITON_DIM} (one row per program)"]
        return []


def _priority(inputs: LayerNormModulateInputs) -> tuple[str, ...]:
    return ("triton", "reference") if inputs.device.type == "cuda" else ("reference",)


BACKENDS = register_op(OpBackends(
    op="layernorm_modulate",
    backends=(LayerNormModulateTritonBackend(), ReferenceBackend()),
    priority=_priority,
    order_summary="cuda: triton, reference; elsewhere: reference",
    legacy_env_var="SOFTVQ_FAST_LN_MODULATE_BACKEND",
))


@torch.library.custom_op("softvq_fast::layernorm_modulate_triton", mutates_args=())
def _triton_forward(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from softvq_fast.kernels.layernorm_modulate import layernorm_modulate_forward

    return layernorm_modulate_forward(x, scale, shift, eps)


@_triton_forward.register_fake
def _(x, scale, shift, eps):
    rows = x.shape[0] * x.shape[1]
    stats = x.new_empty(rows, dtype=torch.float32)
    return torch.empty_like(x), stats, stats.clone()


@torch.library.custom_op("softvq_fast::layernorm_modulate_triton_backward", mutates_args=())
def _triton_backward(
    dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from softvq_fast.kernels.layernorm_modulate import layernorm_modulate_backward

    return layernorm_modulate_backward(dy.contiguous(), x, scale, mean, rstd)


@_triton_backward.register_fake
def _(dy, x, scale, mean, rstd):
    grad_row = x.new_empty(x.shape[0], x.shape[2], dtype=torch.float32)
    return torch.empty_like(x), grad_row, grad_row.clone()


def _setup_context(ctx, inputs, output) -> None:
    x, scale, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dscale, dshift = _triton_backward(dy, x, scale, mean, rstd)
    return dx, dscale.to(scale.dtype), dshift.to(scale.dtype), None


_triton_forward.register_autograd(_backward, setup_context=_setup_context)


def _check(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> None:
    for name, t in (("x", x), ("shift", shift), ("scale", scale)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"layernorm_modulate: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"layernorm_modulate: {name} must be floating point, got {t.dtype}")
    if x.dim() != 3 or x.shape[2] == 0:
        raise ValueError(f"layernorm_modulate: x must be (B, S, D) with D >= 1, got shape {tuple(x.shape)}")
    expected = (x.shape[0], x.shape[2])
    for name, t in (("shift", shift), ("scale", scale)):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"layernorm_modulate: {name} must be (B, D) = {expected} for x of shape {tuple(x.shape)}, "
                f"got {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"layernorm_modulate: {name} is on {t.device}, expected x's device {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"layernorm_modulate: eps must be a real number (float), got {type(eps).__name__}")
    if not 0 <= eps < math.inf:  # NaN fails too
        raise ValueError(f"layernorm_modulate: eps must be finite and >= 0, got {eps}")


def _modulation_rows(scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with unit column stride and one shared row stride (adaLN chunks qualify as they are)."""
    if scale.stride(1) == 1 and shift.stride(1) == 1 and scale.stride(0) == shift.stride(0):
        return scale, shift
    return scale.contiguous(), shift.contiguous()


def layernorm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    *,
    eps: float = 1e-6,
    backend: str = AUTO,
) -> torch.Tensor:
    """LayerNorm over the last dimension of x (B, S, D) without affine parameters, then
    `* (1 + scale[:, None]) + shift[:, None]` with shift, scale of shape (B, D). Returns (B, S, D),
    computed in the promoted dtype of the three inputs (under autocast the modulation arrives in
    bf16 and the residual stream in float32: the result is float32)."""
    _check(x, shift, scale, eps)
    eps = float(eps)
    dtype = torch.promote_types(torch.promote_types(x.dtype, shift.dtype), scale.dtype)
    x, shift, scale = x.to(dtype), shift.to(dtype), scale.to(dtype)
    inputs = LayerNormModulateInputs(x.device, x.dtype, grad_needed(x, shift, scale), x.shape[-1])
    chosen = BACKENDS.select(inputs, backend)
    if chosen.name == "triton":
        scale, shift = _modulation_rows(scale, shift)
        return _triton_forward(x.contiguous(), scale, shift, eps)[0]
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
