"""Linear layers, y = activation(x·Wᵀ + b), with backend dispatch.

Why an op of our own: on the CPU, torch's float32 `nn.Linear` runs its BLAS GEMM (MKL on x86-64),
whose kernel choice does not always follow the CPU's instruction set; oneDNN, which torch also
carries, picks its kernels by instruction set and fuses the activation into the GEMM's epilogue.
Which one is faster depends on the CPU, the thread count and the layer size, so `auto` puts oneDNN
first only where the CPU rule in force says so (softvq_fast.ops.cpu_rules: a calibration of this
machine, else the built-in table of measured machines; windows over the multiply-adds
rows x in_features x out_features and in_features), and torch first everywhere else.

Backends (the `backend` argument or SOFTVQ_FAST_LINEAR_BACKEND overrides `auto`):
  onednn  torch.ops.mkldnn._linear_pointwise: CPU, float32. Without autograd, the activation runs
          in the GEMM's epilogue. With autograd (inputs that need a gradient), the affine map is
          an op whose backward GEMMs run on oneDNN too (grad_input = grad·W, grad_weight =
          gradᵀ·x, grad_bias = the column sums of grad; where the extension is built, its kernel
          that transposes grad for grad_weight sums them on the way) and the activation is a
          separate op on the saved pre-activation (a fused epilogue does not keep it): the
          extension's tanh-GELU kernels where it is built, else torch's; torch's erf GELU.
          Forward-mode AD, torch.func transforms, CPU autocast and in_features = 0 go to `torch`.
  torch   torch.nn.functional.linear, then the activation (in place when no gradient is needed):
          any device and dtype, as nn.Linear
The automatic order keys the rule by the pass: "forward" without autograd, "forward+backward"
with it (cpu_rules.window_key).
"""
from __future__ import annotations

import math
import weakref
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from softvq_fast._extension import extension_available
from softvq_fast.dispatch import AUTO, Backend, OpBackends, grad_needed, register_op
from softvq_fast.ops.cpu_rules import cpu_rule

__all__ = ["linear", "select_backend", "BACKENDS", "ACTIVATIONS"]

# activation -> (oneDNN post-op, its algorithm); the algorithm is also F.gelu's `approximate`
# ("none": the erf form).
ACTIVATIONS = {"none": ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


class LinearInputs(NamedTuple):
    """What the backends and the order look at."""

    device: torch.device
    dtype: torch.dtype
    needs_grad: bool
    weight_dtype: torch.dtype
    transformed: bool  # inside forward-mode AD or a torch.func transform (vmap, grad, jvp)
    autocast: bool
    macs: int  # multiply-adds: rows x in_features x out_features
    in_features: int


# Read once: torch.compile does not trace into torch.backends' queries.
_ONEDNN_BUILT = torch.backends.mkldnn.is_available()
# The extension's CPU kernels of the training path (an extension built before them lacks them).
_CPU_KERNELS = extension_available() and hasattr(torch.ops.softvq_fast, "transpose_cpu")


class OneDNNBackend(Backend):
    name = "onednn"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.float32})

    def unavailable_reason(self) -> str | None:
        return None if _ONEDNN_BUILT else "torch was built without oneDNN (mkldnn)"

    def input_reasons(self, inputs: LinearInputs) -> list[str]:
        reasons = []
        if inputs.weight_dtype != inputs.dtype:
            reasons.append(f"weight dtype {inputs.weight_dtype} differs from input dtype {inputs.dtype}")
        if inputs.in_features == 0:
            reasons.append("in_features is 0 (oneDNN rejects an empty reduction)")
        if inputs.transformed:
            reasons.append("forward-mode AD or a torch.func transform is active (the oneDNN op has no rules for them)")
        if inputs.autocast:
            reasons.append("CPU autocast is on (torch's linear computes in its lower precision)")
        return reasons


class TorchBackend(Backend):
    """F.linear: whatever nn.Linear runs (any device, dtype, autograd); torch raises its own errors."""

    name = "torch"

    def not_supported_reasons(self, inputs: LinearInputs) -> list[str]:
        return []


def _priority(inputs: LinearInputs) -> tuple[str, ...]:
    if inputs.device.type == "cpu":
        features = {"macs": inputs.macs, "in_features": inputs.in_features}
        if cpu_rule("linear").puts_first(inputs.dtype, inputs.needs_grad, features):
            return ("onednn", "torch")
    return ("torch",)


BACKENDS = register_op(OpBackends(
    op="linear",
    backends=(OneDNNBackend(), TorchBackend()),
    priority=_priority,
    order_summary="torch; on the CPU onednn first where the CPU rule says so (below)",
    legacy_env_var="SOFTVQ_FAST_LINEAR",
))
_TORCH = BACKENDS.get("torch")


# typing.Optional: the form torch's schema inference keys its table of argument types by.
@torch.library.custom_op("softvq_fast::linear_onednn", mutates_args=())
def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    post_op, algorithm = ACTIVATIONS[activation]
    # oneDNN reads weight and bias as dense (a strided bias, e.g. from torch.load, is misread).
    bias = None if bias is None else bias.contiguous()
    return torch.ops.mkldnn._linear_pointwise(x, weight.contiguous(), bias, post_op, [], algorithm)


@_onednn_linear.register_fake
def _(x, weight, bias, activation):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# With autograd: the affine map x·Wᵀ + b, and the two GEMMs of its backward. oneDNN's product
# (`_linear_pointwise(a, b)` = a·bᵀ) reads `b` in place when it is row-major or the transpose of
# a row-major matrix, but copies any other `a` to row-major: the `a` of grad_weight, gradᵀ, is made
# by the extension's transpose, which sums grad's columns (grad_bias) on the way.
@torch.library.custom_op("softvq_fast::linear_onednn_affine", mutates_args=())
def _onednn_affine(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _onednn_linear(x, weight, bias, "none")


@_onednn_affine.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("softvq_fast::linear_onednn_grad_input", mutates_args=())
def _onednn_grad_input(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad (..., out_features)·weight (out_features, in_features) -> (..., in_features)."""
    if weight.shape[0] == 0:  # an empty reduction, which oneDNN rejects
        return grad.new_zeros(*grad.shape[:-1], weight.shape[1])
    return torch.ops.mkldnn._linear_pointwise(grad, weight.contiguous().t(), None, "none", [], "")


@_onednn_grad_input.register_fake
def _(grad, weight):
    return grad.new_empty(*grad.shape[:-1], weight.shape[1])


@torch.library.custom_op("softvq_fast::linear_onednn_grad_weight", mutates_args=())
def _onednn_grad_weight(grad: torch.Tensor, x: torch.Tensor, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """gradᵀ·x over every row and, with_bias, the sum of grad's rows: grad (..., out_features),
    x (..., in_features) -> (out_features, in_features), (out_features,) (else (0,))."""
    rows_grad = _rows(grad)
    if _CPU_KERNELS:
        grad_t, grad_bias = torch.ops.softvq_fast.transpose_cpu(rows_grad, with_bias)
    else:
        grad_t = rows_grad.t()
        grad_bias = rows_grad.sum(0) if with_bias else grad.new_empty(0)
    if x.numel() == 0:  # no rows: an empty reduction, which oneDNN rejects
        return grad.new_zeros(grad.shape[-1], x.shape[-1]), grad_bias
    grad_weight = torch.ops.mkldnn._linear_pointwise(grad_t, _rows(x).contiguous().t(), None, "none", [], "")
    return grad_weight, grad_bias


@_onednn_grad_weight.register_fake
def _(grad, x, with_bias):
    return grad.new_empty(grad.shape[-1], x.shape[-1]), grad.new_empty(grad.shape[-1] if with_bias else 0)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (rows, n), rows the product of the leading dimensions (1 for a vector)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _affine_setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    # x serves only grad_weight and weight only grad_input: keep no more than the backward reads.
    # Where x is the unmodified output of the previous layer's activation, keep that activation's
    # input instead (its own backward keeps it anyway) and compute x again in the backward.
    ctx.activation = None
    if ctx.needs_input_grad[1]:
        ctx.activation, x = _activation_source(x)
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
    ctx.has_bias = bias is not None


def _affine_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    if ctx.activation is not None:
        x = _activation(x, ctx.activation)
    need_input, need_weight, need_bias = ctx.needs_input_grad
    need_bias = need_bias and ctx.has_bias
    grad_weight = grad_bias = None
    if torch.is_grad_enabled():  # create_graph=True: differentiable torch products, for a double backward
        grad_input = grad @ weight if need_input else None
        grad_weight = _rows(grad).t() @ _rows(x) if need_weight else None
    else:
        grad_input = _onednn_grad_input(grad, weight) if need_input else None
        if need_weight:
            grad_weight, sums = _onednn_grad_weight(grad, x, need_bias)
            grad_bias = sums if need_bias else None
    if need_bias and grad_bias is None:
        grad_bias = _rows(grad).sum(0)
    return grad_input, grad_weight, grad_bias


_onednn_affine.register_autograd(_affine_backward, setup_context=_affine_setup_context)


def _gelu_tanh_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _gelu_tanh_backward(ctx, grad):
    x, = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: torch's differentiable derivative
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")
    return torch.ops.softvq_fast.gelu_tanh_cpu_backward(grad, x)


if _CPU_KERNELS:
    torch.library.register_fake("softvq_fast::gelu_tanh_cpu_forward")(lambda x: x.new_empty(x.shape))
    torch.library.register_fake("softvq_fast::gelu_tanh_cpu_backward")(lambda grad, x: x.new_empty(x.shape))
    torch.library.register_fake("softvq_fast::transpose_cpu")(
        lambda x, with_column_sums: (x.new_empty(x.shape[1], x.shape[0]), x.new_empty(x.shape[1] if with_column_sums else 0)))
    torch.library.register_autograd("softvq_fast::gelu_tanh_cpu_forward", _gelu_tanh_backward,
                                    setup_context=_gelu_tanh_setup_context)


# The attribute by which an activation's output on the training path names its source:
# (weak reference to the pre-activation, activation, the output's version when made).
_SOURCE = "_softvq_fast_activation_source"


def _activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation of the oneDNN training path, differentiable; deterministic, so that a
    second evaluation on the same input gives the same values."""
    if activation == "gelu_tanh" and _CPU_KERNELS:
        return torch.ops.softvq_fast.gelu_tanh_cpu_forward(y)
    return F.gelu(y, approximate=ACTIVATIONS[activation][1])


def _trainable_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation after the affine op of the oneDNN training path, tagged with its source for
    a next linear layer (_affine_setup_context)."""
    out = _activation(y, activation)
    if not torch.compiler.is_compiling():
        setattr(out, _SOURCE, (weakref.ref(y), activation, out._version))
    return out


def _activation_source(x: torch.Tensor) -> tuple[str | None, torch.Tensor]:
    """(activation, its input) when x is an activation's output not modified since, else (None, x)."""
    source = getattr(x, _SOURCE, None)
    if source is None or source[2] != x._version:
        return None, x
    pre_activation = source[0]()
    return (None, x) if pre_activation is None else (source[1], pre_activation)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> None:
    # The common, valid case in few attribute reads (this runs on every call). Other mismatched
    # devices make the backend fail (then _raise_mismatch names the argument), but torch computes
    # a CPU x with a meta weight or bias without complaint, hence is_meta here.
    try:
        valid = (activation in ACTIVATIONS and weight.dim() == 2 and x.dim() > 0 and x.shape[-1] == weight.shape[1]
                 and weight.is_meta == x.is_meta
                 and (bias is None or (tuple(bias.shape) == (weight.shape[0],) and bias.is_meta == x.is_meta)))
    except (AttributeError, TypeError):  # a non-tensor, an unhashable activation
        valid = False
    if not valid:
        _raise_invalid(x, weight, bias, activation)


def _raise_invalid(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> None:
    """Raises the error that says what is wrong with the arguments."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"linear: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) and not (name == "bias" and t is None):
            raise TypeError(f"linear: {name} must be a torch.Tensor{' or None' if name == 'bias' else ''}, "
                            f"got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"linear: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: x must be (..., in_features={weight.shape[1]}) for weight {tuple(weight.shape)}, "
            f"got shape {tuple(x.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear: bias must be (out_features,) = ({weight.shape[0]},), got shape {tuple(bias.shape)}")
    _raise_mismatch(x, weight, bias)


def _raise_mismatch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """After the backend failed: raises the error naming a weight or bias on another device or (outside
    autocast, which casts them itself) of another dtype than x, if that is the cause."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"linear: {name} is on {t.device}, expected x's device {x.device}")
        if t.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"linear: {name} dtype {t.dtype} differs from x dtype {x.dtype}")


def select_backend(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   backend: str = AUTO) -> Backend:
    """The backend `linear` runs these inputs on (`backend`, else SOFTVQ_FAST_LINEAR_BACKEND, else
    the automatic order); raises NoBackendError with the reasons where the choice cannot run them."""
    if x.device.type != "cpu" and backend == AUTO and BACKENDS.env_choice() is None:
        return _TORCH  # what the order gives off the CPU, without its per-call checks
    out_features, in_features = weight.shape
    inputs = LinearInputs(
        device=x.device,
        dtype=x.dtype,
        needs_grad=grad_needed(x, weight, bias),
        weight_dtype=weight.dtype,
        transformed=forward_ad._current_level >= 0 or torch._C._functorch.maybe_current_level() is not None,
        autocast=x.device.type == "cpu" and torch.is_autocast_enabled("cpu"),
        macs=x.numel() * out_features,
        in_features=in_features,
    )
    return BACKENDS.select(inputs, backend)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "none",
    backend: str = AUTO,
) -> torch.Tensor:
    """activation(x·weightᵀ + bias): x (..., in_features), weight (out_features, in_features),
    bias (out_features,) or None -> (..., out_features). activation: "none", "gelu" (erf) or
    "gelu_tanh". Differentiable on both backends. See the module docstring for the backends and
    the automatic order."""
    _check(x, weight, bias, activation)
    try:
        if select_backend(x, weight, bias, backend=backend).name == "onednn":
            if not grad_needed(x, weight, bias):
                return _onednn_linear(x, weight, bias, activation)
            y = _onednn_affine(x, weight, bias)
            return y if activation == "none" else _trainable_activation(y, activation)
        y = F.linear(x, weight, bias)
    except RuntimeError:  # checked only after a failure: the valid case pays nothing
        _raise_mismatch(x, weight, bias)
        raise
    if activation == "none":
        return y
    approximate = ACTIVATIONS[activation][1]
    if y.requires_grad:
        return F.gelu(y, approximate=approximate)
    # No autograd: GELU in place, so the layer's output is not allocated (and first touched) twice.
    return torch.ops.aten.gelu_(y, approximate=approximate)
