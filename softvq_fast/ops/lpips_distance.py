"""lpips_distance: the distance LPIPS computes on one layer of features, fused.

For features fx, fy (B, C, H, W) of two images and the layer's linear head weight (C,):
  a = fx / (sqrt(sum_c fx_c^2) + eps),  b = fy / (sqrt(sum_c fy_c^2) + eps)     (per pixel)
  out[b] = mean over (h, w) of sum_c weight_c (a_c - b_c)^2                       -> (B,)
which is the lpips package's normalize_tensor, squared difference, 1x1 linear head (no bias) and
spatial average. Eager PyTorch runs it as about ten passes over the features forward and as many
backward; the fused kernels read each feature map twice per direction and keep per-pixel norms.

At a pixel where every channel of fx is 0, the eager formula's autograd (and the reference backend)
gives NaN: sqrt's derivative at 0, times 0. The fused backends drop that term, which 0 multiplies,
and give the derivative of fx / (|fx| + eps) at 0 there, G / eps (G the gradient reaching a): finite,
and large for a small eps.

Backends (argument `backend`, else $SOFTVQ_FAST_LPIPS_DISTANCE_BACKEND, else `auto`: cpu then
reference on the CPU, triton then reference on CUDA):
  cpu        fused C++ kernels (csrc/cpu/lpips_distance*.cpp; at::parallel_for over pixel tiles)
  triton     fused Triton kernels for CUDA (softvq_fast.kernels.lpips_distance); on the CPU only
             under TRITON_INTERPRET=1 (tests)
  reference  the formula in eager PyTorch (also float64)
The fused backends compute in float32 and return the input dtype; they are the custom ops
softvq_fast::lpips_distance_forward/backward, differentiable in fx, fy and weight (each only when
it requires grad). They are deterministic, the CPU kernels also across thread counts: partial sums
are added up in a fixed order, without atomics.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from softvq_fast.dispatch import (
    AUTO, FLOAT_DTYPES, REFERENCE_DTYPES, ExtensionCpuBackend, OpBackends, ReferenceBackend, TritonBackend,
    grad_needed, register_op,
)



@dataclass(frozen=True)
class LpipsDistanceInputs:
    """What backend selection looks at."""

    device: torch.device
    dtype: torch.dtype
    needs_grad: bool


class CpuBackend(ExtensionCpuBackend):
    dtypes = FLOAT_DTYPES
    kernel = "lpips_distance_cpu_forward"


class LpipsDistanceTritonBackend(TritonBackend):
    dtypes = FLOAT_DTYPES


def _priority(inputs: LpipsDistanceInputs) -> tuple[str, ...]:
    if inputs.device.type == "cuda":
        return ("triton", "reference")
    return ("cpu", "reference") if inputs.device.type == "cpu" else ("reference",)


BACKENDS = register_op(OpBackends(
    op="lpips_distance",
    backends=(ReferenceBackend(), CpuBackend(), LpipsDistanceTritonBackend()),
    priority=_priority,
    order_summary="cuda: triton, reference; cpu: cpu, reference",
))


def reference_distance(fx: torch.Tensor, fy: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The formula in eager PyTorch, in the inputs' dtype, the head as a 1x1 convolution (as the
    lpips package applies it): (B, C, H, W) x 2, (C,) -> (B,)."""
    a = fx / (torch.sqrt(torch.sum(fx**2, dim=1, keepdim=True)) + eps)
    b = fy / (torch.sqrt(torch.sum(fy**2, dim=1, keepdim=True)) + eps)
    return F.conv2d((a - b) ** 2, weight.view(1, -1, 1, 1)).mean(dim=(2, 3)).flatten()


# ----------------------------------------------------------------------------- fused custom ops
def _fused_impl(backend: str):
    """(forward, backward) launchers of a fused backend; both take and return the same arguments
    as the custom ops below, the distance in float32."""
    if backend == "cpu":
        return torch.ops.softvq_fast.lpips_distance_cpu_forward, torch.ops.softvq_fast.lpips_distance_cpu_backward
    from softvq_fast.kernels import lpips_distance as triton_lpips

    return triton_lpips.lpips_distance_forward, triton_lpips.lpips_distance_backward


@torch.library.custom_op("softvq_fast::lpips_distance_forward", mutates_args=())
def lpips_distance_forward(
    fx: torch.Tensor, fy: torch.Tensor, weight: torch.Tensor, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fx, fy (B, C, H, W) contiguous, weight (C,) -> distance (B,) in fx's dtype, and the norms over
    channels of fx and fy, (B, H, W) float32 (kept for the backward)."""
    forward, _ = _fused_impl(backend)
    out, norm_x, norm_y = forward(fx, fy, weight, eps)
    return out.to(fx.dtype), norm_x, norm_y


@lpips_distance_forward.register_fake
def _(fx, fy, weight, eps, backend):
    B, _, H, W = fx.shape
    norm = fx.new_empty(B, H, W, dtype=torch.float32)
    return fx.new_empty(B), norm, norm.clone()


@torch.library.custom_op("softvq_fast::lpips_distance_backward", mutates_args=())
def lpips_distance_backward(
    grad_out: torch.Tensor,
    fx: torch.Tensor,
    fy: torch.Tensor,
    weight: torch.Tensor,
    norm_x: torch.Tensor,
    norm_y: torch.Tensor,
    eps: float,
    need_fx: bool,
    need_fy: bool,
    need_weight: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of lpips_distance_forward's distance for grad_out (B,): fx's and fy's (B, C, H, W)
    in fx's dtype, weight's (C,) in float32; each one not asked for is an empty tensor. With
    s = n + eps (n = norm_x), d = a - b and G_c = 2 weight_c d_c grad_out / (H W):
      grad fx_k = G_k / s - fx_k / (s^2 n) sum_c G_c fx_c   (the second term 0 where n = 0)
      grad fy_k: the same with fy and -G;  grad weight_c = sum_b grad_out_b mean_hw d_c^2."""
    _, backward = _fused_impl(backend)
    return backward(grad_out.contiguous(), fx, fy, weight, norm_x, norm_y, eps, need_fx, need_fy, need_weight)


@lpips_distance_backward.register_fake
def _(grad_out, fx, fy, weight, norm_x, norm_y, eps, need_fx, need_fy, need_weight, backend):
    return (
        torch.empty_like(fx) if need_fx else fx.new_empty(0),
        torch.empty_like(fy) if need_fy else fy.new_empty(0),
        fx.new_empty(weight.shape[0] if need_weight else 0, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output) -> None:
    fx, fy, weight, eps, backend = inputs
    _, norm_x, norm_y = output
    ctx.mark_non_differentiable(norm_x, norm_y)
    ctx.save_for_backward(fx, fy, weight, norm_x, norm_y)
    ctx.params = (eps, backend)


def _backward(ctx, grad_out, _grad_norm_x, _grad_norm_y):
    fx, fy, weight, norm_x, norm_y = ctx.saved_tensors
    eps, backend = ctx.params
    need = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # create_graph=True: the eager formula's differentiable gradients
        wanted = [t for t, needed in zip((fx, fy, weight), need) if needed]
        grads = iter(torch.autograd.grad(reference_distance(fx, fy, weight, eps), wanted, grad_out, create_graph=True))
        return (*(next(grads) if needed else None for needed in need), None, None)
    grad_fx, grad_fy, grad_weight = lpips_distance_backward(
        grad_out, fx, fy, weight, norm_x, norm_y, eps, *need, backend
    )
    # grad_weight is float32: autograd casts it to weight's dtype
    return grad_fx if need[0] else None, grad_fy if need[1] else None, grad_weight if need[2] else None, None, None


lpips_distance_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def _check(fx: torch.Tensor, fy: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    for name, t in (("fx", fx), ("fy", fy), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lpips_distance: {name} must be a torch.Tensor, got {type(t).__name__}")
    if fx.dim() != 4 or fx.shape[1] == 0 or fx.shape[2] * fx.shape[3] == 0:
        raise ValueError(f"lpips_distance: fx must be (B, C, H, W) with C, H, W >= 1, got shape {tuple(fx.shape)}")
    if fy.shape != fx.shape:
        raise ValueError(f"lpips_distance: fy must have fx's shape {tuple(fx.shape)}, got {tuple(fy.shape)}")
    channels = fx.shape[1]
    if tuple(weight.shape) != (channels,):
        raise ValueError(
            f"lpips_distance: weight must be (C,) = ({channels},) for features of shape {tuple(fx.shape)}, got "
            f"{tuple(weight.shape)} (a 1x1 convolution's weight (1, C, 1, 1) gives it with .flatten())"
        )
    if fx.dtype not in REFERENCE_DTYPES:
        raise TypeError(
            f"lpips_distance: fx must be float32, bfloat16 or float16 (float64: reference backend only), got {fx.dtype}"
        )
    for name, t in (("fy", fy), ("weight", weight)):
        if t.dtype != fx.dtype:
            raise TypeError(f"lpips_distance: {name} dtype {t.dtype} differs from fx dtype {fx.dtype}")
        if t.device != fx.device:
            raise ValueError(f"lpips_distance: {name} is on {t.device}, expected fx's device {fx.device}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"lpips_distance: eps must be a real number (float), got {type(eps).__name__}")
    if not 0 <= eps < math.inf:  # NaN fails too
        raise ValueError(f"lpips_distance: eps must be finite and >= 0, got {eps}")


def lpips_distance(
    fx: torch.Tensor,
    fy: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float = 1e-10,
    backend: str = AUTO,
) -> torch.Tensor:
    """LPIPS distance of one layer: features fx, fy (B, C, H, W) and the layer's linear head weight
    (C,), all of one dtype (float32, bfloat16, float16; float64 on the reference backend) and
    device. Returns (B,) in that dtype: per sample, the mean over pixels of
    sum_c weight_c (fx_c / (|fx| + eps) - fy_c / (|fy| + eps))^2, |.| the norm over channels.
    `backend`: "auto", "cpu", "triton" or "reference" (module docstring). The fused backends read
    NCHW-contiguous features (others are copied first)."""
    _check(fx, fy, weight, eps)
    eps = float(eps)
    chosen = BACKENDS.select(LpipsDistanceInputs(fx.device, fx.dtype, grad_needed(fx, fy, weight)), backend)
    if chosen.name == "reference":
        return reference_distance(fx, fy, weight, eps)
    return lpips_distance_forward(fx.contiguous(), fy.contiguous(), weight.contiguous(), eps, chosen.name)[0]
