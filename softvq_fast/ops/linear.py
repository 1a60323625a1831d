"""Linear layers, y = activation(x·Wᵀ + b), with backend dispatch.

Why an op of our own: on the CPU, torch's float32 `nn.Linear` runs MKL's sgemm, which on CPUs not
made by Intel leaves AVX-512 unused: on an AMD EPYC (Zen 4, AVX-512, 2 threads, torch 2.14.1 with
MKL 2024.2) it ran as fast with MKL_ENABLE_INSTRUCTIONS=AVX2 as without (an exploratory timing).
oneDNN, which torch also carries, picks its kernels by instruction set. There, float32, oneDNN
against MKL (`python -m bench --suite linear`, bench/RESULTS.md): 1.5-2.7x faster at the
tokenizer's and the generators' layer shapes, 0.4-0.9x for SiT-S's 2-row layers and its
32-feature embedder. An exploratory sweep outside the harness put the break-even near 2^20-2^21
multiply-adds (oneDNN sets up each call in about 15 us), hence ONEDNN_MIN_MACS; with both held to
AVX2 (ONEDNN_MAX_CPU_ISA=AVX2 too) the two were level (0.87-1.39x): the gain is AVX-512.

Backends (the `backend` argument or `SOFTVQ_FAST_LINEAR` overrides `auto`):
  onednn  torch.ops.mkldnn._linear_pointwise with the activation in its epilogue: CPU, float32,
          forward only (inputs that need a gradient, forward-mode AD, torch.func transforms and
          CPU autocast go to `torch`)
  torch   torch.nn.functional.linear, then the activation (in place when no gradient is needed):
          any device and dtype, as nn.Linear

auto: on the CPU, onednn first where AVX-512 is there, the CPU is not Intel's and torch uses MKL
(`ONEDNN_FIRST_CPU`, read once) for layers of at least 2^21 multiply-adds with 64 or more input
features; torch first everywhere else (Intel CPUs: not measured; CUDA: cuBLAS).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from softvq_fast.dispatch import AUTO, Backend, OpBackends, register_op

__all__ = ["linear", "select_backend", "LINEAR_BACKENDS", "ACTIVATIONS"]

# activation -> (oneDNN post-op, its algorithm); the algorithm is also F.gelu's `approximate`
# ("none": the erf form).
ACTIVATIONS = {"none": ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}
# Below these, oneDNN's per-call set-up costs more than its faster kernel saves (module docstring).
ONEDNN_MIN_MACS = 2**21
ONEDNN_MIN_IN_FEATURES = 64


class LinearInputs(NamedTuple):
    """What the backends look at."""

    device: torch.device
    dtype: torch.dtype
    weight_dtype: torch.dtype
    needs_grad: bool
    transformed: bool  # inside forward-mode AD or a torch.func transform (vmap, grad, jvp)
    autocast: bool


# Read once: torch.compile does not trace into torch.backends' queries.
_ONEDNN_BUILT = torch.backends.mkldnn.is_available()


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
        if inputs.needs_grad:
            reasons.append("an input needs a gradient (the oneDNN path is forward-only)")
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


LINEAR_BACKENDS: tuple[Backend, ...] = (OneDNNBackend(), TorchBackend())
_TORCH = LINEAR_BACKENDS[1]
ENV_VAR = "SOFTVQ_FAST_LINEAR"


def _cpu_prefers_onednn() -> bool:
    """True where MKL's float32 GEMM leaves AVX-512 unused: an AVX-512 CPU not made by Intel
    (vendor from /proc/cpuinfo) with torch's BLAS being MKL. Read once."""
    if not (torch.backends.mkl.is_available() and torch.backends.cpu.get_cpu_capability().startswith("AVX512")):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            vendor = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("vendor_id")), "")
    except OSError:
        return False
    return vendor not in ("", "GenuineIntel")


ONEDNN_FIRST_CPU = _cpu_prefers_onednn()

ONEDNN_FIRST = register_op(OpBackends(
    "linear", LINEAR_BACKENDS, ENV_VAR,
    lambda device_type: ("onednn", "torch") if device_type == "cpu" and ONEDNN_FIRST_CPU else ("torch", "onednn"),
))
TORCH_FIRST = OpBackends("linear", LINEAR_BACKENDS, ENV_VAR, lambda device_type: ("torch", "onednn"))


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


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if weight.dim() != 2:
        raise ValueError(f"linear: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: x must be (..., in_features={weight.shape[1]}) for weight {tuple(weight.shape)}, "
            f"got shape {tuple(x.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear: bias must be (out_features,) = ({weight.shape[0]},), got shape {tuple(bias.shape)}")


def select_backend(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   backend: str = AUTO) -> Backend:
    """The backend `linear` runs these inputs on (`backend`, else SOFTVQ_FAST_LINEAR, else the
    automatic order); raises NoBackendError with the reasons where the choice cannot run them."""
    if x.device.type != "cpu" and backend == AUTO and not os.environ.get(ENV_VAR):
        return _TORCH  # what the order below gives off the CPU, without its per-call checks
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    transformed = forward_ad._current_level >= 0 or torch._C._functorch.maybe_current_level() is not None
    inputs = LinearInputs(
        x.device, x.dtype, weight.dtype, needs_grad, transformed,
        x.device.type == "cpu" and torch.is_autocast_enabled("cpu"),
    )
    out_features, in_features = weight.shape
    large = x.numel() * out_features >= ONEDNN_MIN_MACS and in_features >= ONEDNN_MIN_IN_FEATURES
    return (ONEDNN_FIRST if large else TORCH_FIRST).select(inputs, backend)


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
    "gelu_tanh". Differentiable (inputs that need a gradient run on `torch`). See the module
    docstring for the backends and the automatic order."""
    _check(x, weight, bias, activation)
    if select_backend(x, weight, bias, backend=backend).name == "onednn":
        return _onednn_linear(x, weight, bias, activation)
    y = F.linear(x, weight, bias)
    if activation == "none":
        return y
    approximate = ACTIVATIONS[activation][1]
    if y.requires_grad:
        return F.gelu(y, approximate=approximate)
    # No autograd: GELU in place, so the layer's output is not allocated (and first touched) twice.
    return torch.ops.aten.gelu_(y, approximate=approximate)
