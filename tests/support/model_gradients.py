"""Gradients of the tiny sharp models (support.sharp_models), their float64 evaluation with every op
from the math, and backward mutants: ops whose forward is right and whose backward is wrong.

The models look their ops up as module globals at call time (`OP_SITES`): replacing those names
replaces an op in every model. `exact_evaluation` puts float64 math in every site, so the
reference gradients depend on no backend and on no mutant injected while they are computed.

A backward mutant is a torch.autograd.Function around the real op: its forward calls the op (the
outputs stay right, so forward checks cannot see it) and its backward is written here from the
math with one plausible bug. Each op's mutant table also holds "none", the same hand-written
backward without a bug: it must pass the gradient checks, which shows that the mutants fail by
their bug alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import softvq_fast.models.adaln_transformer as adaln_transformer
import softvq_fast.models.softvq_vae as softvq_vae
import softvq_fast.models.vit as vit
import softvq_fast.nn.linear as nn_linear
import softvq_fast.nn.transformer as transformer
import softvq_fast.ops.attention as attention_op
import softvq_fast.ops.layernorm_modulate as layernorm_modulate_op
import softvq_fast.ops.linear as linear_op
import softvq_fast.ops.soft_vq as soft_vq_op
from support.numerics import rel_err
from support.sharp_models import exact_attention
from support.tokenizer_training import soft_vq_math

# Every (module, global name) through which a model calls each op.
OP_SITES = {
    "attention": ((transformer, "attention"),),
    "linear": ((nn_linear, "linear"), (vit, "linear")),
    "layernorm_modulate": ((adaln_transformer, "layernorm_modulate"),),
    "soft_vq": ((softvq_vae, "soft_vq"),),
}
# The library's ops themselves (what the sites hold when nothing is replaced).
OPS = {
    "attention": attention_op.attention,
    "linear": linear_op.linear,
    "layernorm_modulate": layernorm_modulate_op.layernorm_modulate,
    "soft_vq": soft_vq_op.soft_vq,
}


@contextlib.contextmanager
def ops_replaced(**replacements: Callable) -> Iterator[None]:
    """Within the block each named op (a key of OP_SITES) is the given function at all its sites."""
    saved = [(module, name, getattr(module, name)) for op in replacements for module, name in OP_SITES[op]]
    try:
        for op, fn in replacements.items():
            for module, name in OP_SITES[op]:
                setattr(module, name, fn)
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def exact_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 activation: str = "none", backend: str | None = None) -> torch.Tensor:
    """activation(x·Wᵀ + b) in float64, from the math; x (..., in), weight (out, in) -> (..., out)."""
    y = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    if activation != "none":
        y = F.gelu(y, approximate=linear_op.ACTIVATIONS[activation][1])
    return y.to(x.dtype)


def exact_layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *, eps: float = 1e-6,
                             backend: str | None = None) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift in float64, from the math; x (B, S, D), shift, scale (B, D)."""
    x64 = x.double()
    mean = x64.mean(-1, keepdim=True)
    centred = x64 - mean
    normed = centred * (centred.square().mean(-1, keepdim=True) + eps).rsqrt()
    return (normed * (1 + scale.double().unsqueeze(1)) + shift.double().unsqueeze(1)).to(x.dtype)


def exact_evaluation() -> contextlib.AbstractContextManager:
    """Attention, linear layers and LayerNorm-modulate from the math in float64 in every model (any
    backend choice and any mutant set aside). Run float64 copies of the models under it; the
    tokenizer's soft quantiser comes from support.tokenizer_training.training_forward_float64."""
    return ops_replaced(attention=exact_attention, linear=exact_linear, layernorm_modulate=exact_layernorm_modulate)


# ------------------------------------------------------------------------------------ gradients
class Gradients(NamedTuple):
    """d loss / d input and d loss / d parameter (None where the loss does not reach it), by name."""

    input: torch.Tensor
    parameters: dict[str, torch.Tensor | None]


def gradients(model: nn.Module, losses: Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]], x: torch.Tensor,
              names: tuple[str, ...] | None = None) -> dict[str, Gradients]:
    """The gradients of each scalar of losses(model, x) (one forward; those in `names`, default
    all) w.r.t. x and every parameter that requires grad, by loss name."""
    x = x.detach().clone().requires_grad_(True)
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    values = losses(model, x)
    names = tuple(values) if names is None else names
    result = {}
    for i, name in enumerate(names):
        grads = torch.autograd.grad(values[name], [x, *parameters.values()], allow_unused=True,
                                    retain_graph=i < len(names) - 1)
        result[name] = Gradients(grads[0], dict(zip(parameters, grads[1:])))
    return result


def gradient_errors(got: Gradients, expected: Gradients) -> dict[str, float]:
    """Relative errors against the float64 gradients: "parameters" of all parameter gradients
    concatenated into one vector, "input" of the input's. The same parameters must be reached."""
    reached = [name for name, g in expected.parameters.items() if g is not None]
    missing = [name for name in reached if got.parameters.get(name) is None]
    extra = [name for name, g in got.parameters.items() if g is not None and expected.parameters.get(name) is None]
    assert not missing and not extra, f"parameters without a gradient: {missing}; with an unexpected one: {extra}"
    pairs = [(got.parameters[name], expected.parameters[name]) for name in reached]
    return {"parameters": concatenated_rel_err(pairs), "input": rel_err(got.input, expected.input)}


def concatenated_rel_err(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """rel_err (support.numerics) of the concatenations of the (out, ref) pairs, summed tensor by
    tensor in float64 (no copy of the whole vector); NaN or inf anywhere gives inf."""
    squared_diff = squared_ref = 0.0
    for out, ref in pairs:
        out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
        assert out64.shape == ref64.shape, f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}"
        squared_diff += float(torch.linalg.vector_norm(out64 - ref64)) ** 2
        squared_ref += float(torch.linalg.vector_norm(ref64)) ** 2
    assert squared_ref > 0, "the reference gradients are all zero"
    error = (squared_diff / squared_ref) ** 0.5
    return error if math.isfinite(error) else math.inf


# ---------------------------------------------------------------------------- backward mutants
def _softmax_backward(p: torch.Tensor, dp: torch.Tensor, dim: int) -> torch.Tensor:
    """d loss / d logits of p = softmax(logits) along `dim`, given d loss / d p."""
    return p * (dp - (dp * p).sum(dim, keepdim=True))


def _attention_backward(g, q, k, v, *, bug: str, scale: float | None = None, backend: str = "auto"):
    """(dq, dk, dv) of o = softmax(q·kᵀ·scale)·v, q (B, Sq, H, D), k, v (B, Sk, H, D), with `bug`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = (torch.einsum("bqhd,bkhd->bhqk", q, k) * scale).softmax(-1)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, g)
    dp = torch.einsum("bqhd,bkhd->bhqk", g, v)
    ds = _softmax_backward(p, dp, -1)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k) * (1.0 if bug == "dq_unscaled" else scale)
    if bug == "dk_softmax_over_queries":
        ds = _softmax_backward(p, dp, -2)
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    return dq, dk, dv.roll(1, dims=2) if bug == "dv_of_next_head" else dv


def _linear_backward(g, x, weight, bias, *, bug: str, activation: str = "none", backend: str = "auto"):
    """(dx, dweight, dbias) of activation(x·Wᵀ + b), x (..., in), weight (out, in), with `bug`."""
    rows, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, weight.shape[0])
    if activation != "none" and bug != "activation_derivative_missing":
        with torch.enable_grad():
            pre = F.linear(rows, weight, bias).requires_grad_(True)
            (g,) = torch.autograd.grad(F.gelu(pre, approximate=linear_op.ACTIVATIONS[activation][1]), pre, g)
    square = weight.shape[0] == weight.shape[1]
    dx = g @ (weight.T if bug == "dx_through_w_transposed" and square else weight)
    db = None if bias is None else torch.zeros_like(bias) if bug == "bias_grad_dropped" else g.sum(0)
    return dx.reshape(x.shape), g.T @ rows, db


def _layernorm_modulate_backward(g, x, shift, scale, *, bug: str, eps: float = 1e-6, backend: str = "auto"):
    """(dx, dshift, dscale) of LN(x) * (1 + scale) + shift, x (B, S, D), shift, scale (B, D), with `bug`."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        normed = F.layer_norm(x, x.shape[-1:], eps=eps)
        d_normed = g if bug == "dx_without_scale" else g * (1 + scale.unsqueeze(1))
        (dx,) = torch.autograd.grad(normed, x, d_normed)
    return dx, g.sum(1), (g * normed.detach()).sum(1)


class _BackwardMutant(torch.autograd.Function):
    """Forward: the real op on `tensors` with `kwargs`. Backward: `backward(grad, *tensors, bug=bug,
    **kwargs)` in float32, each gradient returned in its input's dtype."""

    @staticmethod
    def forward(ctx, original, backward, bug, kwargs, *tensors):
        ctx.save_for_backward(*tensors)
        ctx.backward, ctx.bug, ctx.kwargs = backward, bug, kwargs
        return original(*tensors, **kwargs)

    @staticmethod
    def backward(ctx, grad):
        tensors = ctx.saved_tensors
        grads = ctx.backward(grad.float(), *(None if t is None else t.float() for t in tensors), bug=ctx.bug, **ctx.kwargs)
        return None, None, None, None, *(None if d is None else d.to(t.dtype) for d, t in zip(grads, tensors))


def _mutant_with_backward(op: str, backward: Callable) -> Callable[[str], Callable]:
    def make(bug: str) -> Callable:
        original = OPS[op]

        def mutant(*tensors, **kwargs):
            return _BackwardMutant.apply(original, backward, bug, kwargs, *tensors)

        return mutant

    return make


def _soft_vq_mutant(bug: str) -> Callable:
    """The real soft_vq plus, for "codebook_through_logits", terms of value exactly zero whose
    gradient is what the codebook would get through the logits (of z_q and of the entropy
    regulariser) if they saw it undetached."""
    original = OPS["soft_vq"]

    def soft_vq(z, codebook, tau, *, l2_norm=False, return_stats=False, **kwargs):
        out = original(z, codebook, tau, l2_norm=l2_norm, return_stats=return_stats, **kwargs)
        if bug == "none":
            return out
        z_q, stats = out if return_stats else (out, None)
        leaky_z_q, leaky_entropy = soft_vq_math(z.detach(), codebook, tau, l2_norm, logits_see_codebook=True)
        right_z_q, right_entropy = soft_vq_math(z.detach(), codebook, tau, l2_norm)
        z_q = z_q + (leaky_z_q - right_z_q)
        if stats is None:
            return z_q
        entropy = stats.entropy_loss if stats.entropy_loss is None else stats.entropy_loss + (leaky_entropy - right_entropy)
        return z_q, dataclasses.replace(stats, entropy_loss=entropy)

    return soft_vq


# Plausible backward bugs, per op ("none": the hand-written backward without a bug):
#   attention: dq without the softmax scale; dk through the softmax Jacobian taken over the
#     queries; dv of the neighbouring head (a head stride bug)
#   linear: the bias gradient dropped; dx through Wᵀ instead of W where W is square (a layout
#     mix-up that shapes cannot reveal); the fused GELU's derivative left out
#   layernorm_modulate: dx without the (1 + scale) factor
#   soft_vq: the codebook gets gradient through the logits (the authors detach it there)
BACKWARD_MUTANTS: dict[str, tuple[Callable[[str], Callable], tuple[str, ...]]] = {
    "attention": (_mutant_with_backward("attention", _attention_backward),
                  ("none", "dq_unscaled", "dk_softmax_over_queries", "dv_of_next_head")),
    "linear": (_mutant_with_backward("linear", _linear_backward),
               ("none", "bias_grad_dropped", "dx_through_w_transposed", "activation_derivative_missing")),
    "layernorm_modulate": (_mutant_with_backward("layernorm_modulate", _layernorm_modulate_backward),
                           ("none", "dx_without_scale")),
    "soft_vq": (_soft_vq_mutant, ("codebook_through_logits",)),
}


def backward_mutant_cases(ops: tuple[str, ...]) -> list[tuple[str, str]]:
    """(op, bug) for every backward mutant of `ops`, the bug-free "none" included."""
    return [(op, bug) for op in ops for bug in BACKWARD_MUTANTS[op][1]]


def inject_backward_mutant(monkeypatch, op: str, bug: str) -> None:
    """Make `op` the backward mutant `bug` at every site for the rest of the test."""
    make, _ = BACKWARD_MUTANTS[op]
    for module, name in OP_SITES[op]:
        monkeypatch.setattr(module, name, make(bug))
