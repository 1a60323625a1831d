"""The C++/CUDA attention ops of softvq_fast._C, made traceable and differentiable:

  softvq_fast::attention_fwd(q, k, v, scale) -> (out (B, Sq, H, D), lse (B, H, Sq) float32)
  softvq_fast::attention_bwd(grad_out, q, k, v, out, lse, scale) -> (dq, dk, dv)   (CPU kernel)

Fake kernels let torch.compile trace them; the autograd formula of attention_fwd calls
attention_bwd on the CPU (from the saved log-sum-exp) and, on CUDA, where the extension has no
backward kernel, recomputes the forward through torch's SDPA and differentiates that (the two
forwards agree to rounding). Higher-order gradients are refused: the recompute hands back
gradients detached from q, k, v, which would silently drop the second-order terms.
"""
from __future__ import annotations

import torch

from softvq_fast._extension import extension_available
from softvq_fast.ops.attention.plain import sdpa

NO_DOUBLE_BACKWARD = (
    "attention: the softvq backend has no double backward; use backend='sdpa' or 'math' for higher-order gradients"
)


def kernel_op_available() -> bool:
    """True when the loaded extension defines the attention ops (an older build may not)."""
    return (
        extension_available()
        and hasattr(torch.ops.softvq_fast, "attention_fwd")
        and hasattr(torch.ops.softvq_fast, "attention_bwd")
    )


def _fwd_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    b, sq, h, d = q.shape
    return q.new_empty((b, sq, h, d)), q.new_empty((b, h, sq), dtype=torch.float32)


def _bwd_fake(grad_out, q, k, v, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward_by_recompute(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(sdpa(*leaves, scale), leaves, grad_out)


def _fwd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if q.device.type == "cpu":
        dq, dk, dv = torch.ops.softvq_fast.attention_bwd(grad_out, q, k, v, out, lse, ctx.scale)
    else:
        # Grad mode is on here only under create_graph=True (module docstring).
        if torch.is_grad_enabled():
            raise RuntimeError(NO_DOUBLE_BACKWARD)
        dq, dk, dv = _backward_by_recompute(grad_out, q, k, v, ctx.scale)
    return dq, dk, dv, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError(NO_DOUBLE_BACKWARD)


if kernel_op_available():
    torch.library.register_fake("softvq_fast::attention_fwd")(_fwd_fake)
    torch.library.register_fake("softvq_fast::attention_bwd")(_bwd_fake)
    torch.library.register_autograd("softvq_fast::attention_fwd", _fwd_backward, setup_context=_setup_context)
    torch.library.register_autograd("softvq_fast::attention_bwd", _no_double_backward)


def softvq_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The `softvq` backend: attention_fwd's output."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad or torch.compiler.is_compiling():
        return torch.ops.softvq_fast.attention_fwd(q, k, v, scale)[0]
    # Without gradients, skip the Python autograd kernel registered above: at short lengths it
    # costs as much as the kernel call itself.
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.softvq_fast.attention_fwd(q, k, v, scale)[0]
