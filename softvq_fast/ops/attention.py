"""Non-causal multi-head attention with backend dispatch: `attention(q, k, v, *, scale, backend)`.

Layout: q is (B, Sq, H, D), k and v are (B, Sk, H, D) (batch, sequence, heads, head dim), the
layout that one qkv Linear produces (`x @ Wqkv -> (B, S, 3, H, D)`, unbound into strided views).
Inputs may be non-contiguous as long as the last dimension has stride 1; the `softvq` kernels read
them in place. The output is (B, Sq, H, D) contiguous, so `.flatten(2)` is free.

Backends (`softvq-fast env` lists them with the reasons each cannot run here):
  softvq      ours, from csrc/: CPU fp32/bf16 (any length, head dim <= 256); CUDA bf16/fp16 on
              compute capability >= 8.0 (S <= 128 with head dims 64/72/128, any S with head dim
              64). Backward: ours on the CPU (from the saved log-sum-exp); on CUDA it recomputes
              the forward through torch SDPA and differentiates that.
  flash_attn  flash_attn.flash_attn_func, when the package is importable (CUDA, bf16/fp16).
  xformers    xformers.ops.memory_efficient_attention, when importable (CUDA).
  sdpa        torch.nn.functional.scaled_dot_product_attention.
  math        plain PyTorch (softmax in fp32 or better); the reference.

`backend="auto"` takes the first backend of the device's order that supports the inputs:
  cpu:  softvq, sdpa, math        but where SDPA was measured faster, sdpa, softvq, math: the
                                  rules depend on the CPU (CpuOrderRules, below; measured with
                                  bench/suites/attention.py or its shapes, 2 cores). With AMX
                                  (measured on a Xeon): ours at 1.12-1.35x of SDPA in float32 for
                                  kv lengths up to 321, 1.05-1.17x at 1024-1089, so SDPA first over
                                  1200 (level at 1536, 0.94-0.98x from 2048), in bfloat16 over 32
                                  keys (SDPA's AMX kernels 1.3-2.5x faster from 64 keys; ours
                                  1.3-1.4x at 32) and with gradients below 64 keys or in bfloat16
                                  (our forward+backward 0.91-0.99x of SDPA's at 32 keys, 0.99-1.15x
                                  at 64, 1.07-1.27x from 128 to 1089). With AVX-512 and no AMX
                                  (measured on an AMD EPYC, Zen 4) ours first everywhere: forward
                                  1.1-2.2x of SDPA in float32 and 1.3-1.8x in bfloat16 from 32 to
                                  4096 keys, forward+backward 1.2-1.45x in float32 from 64 to 2048
                                  keys and 0.95-1.34x from 8 to 32 keys, 1.2-2.6x in bfloat16 from
                                  32 to 1089 keys. With AVX2 only (emulated: that EPYC with torch,
                                  MKL and our kernels held to AVX2) ours first up to 1200 keys:
                                  float32 forward 0.93-1.24x from 32 to 1089 keys (level,
                                  0.95-0.99x, at 1089; 0.80x at 2048), bfloat16 1.09-1.51x to 1089
                                  (1.00x at 2048); forward+backward 0.97-1.10x in float32 to 1089
                                  keys (0.86x at 2048), 0.98-2.98x in bfloat16. Elsewhere (not
                                  measured) SDPA first.
  cuda: softvq, flash_attn, sdpa, xformers, math   not yet measured on a GPU: ours first because
                                  it targets these shapes; bench/gpu_check.sh measures it.
When q, k or v needs a gradient, the CUDA order is flash_attn, sdpa, softvq, xformers, math: our
CUDA backward recomputes the forward through SDPA, an extra forward.
`SOFTVQ_FAST_ATTENTION=<name>` overrides "auto"; an explicit backend that cannot run raises
`NoBackendError` listing the reasons.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from softvq_fast._extension import extension_available, extension_has_cuda
from softvq_fast.dispatch import Backend, OpBackends, register_op

__all__ = ["attention", "ATTENTION_BACKENDS"]

_FLOATS = frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64})
_HALVES = frozenset({torch.bfloat16, torch.float16})

# Kernel limits of csrc/ (keep in sync with csrc/cpu/attention.cpp and csrc/cuda/attention_kernel.cuh).
CPU_MAX_HEAD_DIM = 256
CUDA_SHORT_MAX_LEN = 128
CUDA_SHORT_HEAD_DIMS = (64, 72, 128)
CUDA_TILED_HEAD_DIMS = (64,)


class AttentionInputs(NamedTuple):
    """What the backends look at: shapes (B, Sq, H, D) / (B, Sk, H, D), device, dtype, strides.
    (A NamedTuple: cheap to build on every call, and hashable as a key of _CHOSEN.)"""

    device: torch.device
    dtype: torch.dtype
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    last_dim_contiguous: bool


def _describe(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttentionInputs:
    try:  # the common, valid case in few attribute reads (this runs on every call)
        shape, kv_shape, dtype, device = q.shape, k.shape, q.dtype, q.device
        valid = (
            len(shape) == 4 and kv_shape == v.shape and len(kv_shape) == 4
            and kv_shape[0] == shape[0] and kv_shape[2] == shape[2] and kv_shape[3] == shape[3]
            and k.dtype == dtype and v.dtype == dtype and dtype in _FLOATS
            and k.device == device and v.device == device
        )
    except AttributeError:
        valid = False
    if not valid:
        _raise_invalid(q, k, v)
    b, sq, h, d = shape
    return AttentionInputs(
        device=device,
        dtype=dtype,
        batch=b,
        heads=h,
        q_len=sq,
        kv_len=kv_shape[1],
        head_dim=d,
        last_dim_contiguous=all(t.stride(-1) == 1 or t.shape[-1] == 1 for t in (q, k, v)),
    )


def _raise_invalid(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raises the error that says what is wrong with q, k, v."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"attention: {name} must be 4-D (batch, seq, heads, head_dim), got shape {tuple(t.shape)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.dtype not in _FLOATS:
        raise ValueError(f"attention: dtype must be floating point ({sorted(map(str, _FLOATS))}), got {q.dtype}")
    b, sq, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(
            f"attention: k and v must be (B, Sk, H, D) = ({b}, Sk, {h}, {d}) matching q {tuple(q.shape)}, "
            f"got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    raise ValueError(
        f"attention: invalid q, k, v: shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, "
        f"dtypes {q.dtype}, {k.dtype}, {v.dtype}, devices {q.device}, {k.device}, {v.device}"
    )


# ---------------------------------------------------------------------------------------------
# The C++/CUDA ops: softvq_fast::attention_fwd(q, k, v, scale) -> (out, lse) and, on the CPU,
# softvq_fast::attention_bwd(grad_out, q, k, v, out, lse, scale) -> (dq, dk, dv)
# ---------------------------------------------------------------------------------------------


def _fwd_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    b, sq, h, d = q.shape
    out = q.new_empty((b, sq, h, d))
    lse = q.new_empty((b, h, sq), dtype=torch.float32)
    return out, lse


def _backward_by_recompute(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the CUDA `softvq` forward: recompute it through torch's SDPA and
    differentiate that (the two forwards agree to rounding). The CPU has its own kernel,
    softvq_fast::attention_bwd, which uses the saved log-sum-exp instead."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = _sdpa(*leaves, scale)
        return torch.autograd.grad(out, leaves, grad_out)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


NO_DOUBLE_BACKWARD = (
    "attention: the softvq backend has no double backward; use backend='sdpa' or 'math' for higher-order gradients"
)


def _fwd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if q.device.type == "cpu":
        dq, dk, dv = torch.ops.softvq_fast.attention_bwd(grad_out, q, k, v, out, lse, ctx.scale)
    else:
        # Grad mode is on here only under create_graph=True: the recompute below would hand back
        # gradients detached from q, k, v, so higher-order terms would be silently dropped.
        if torch.is_grad_enabled():
            raise RuntimeError(NO_DOUBLE_BACKWARD)
        dq, dk, dv = _backward_by_recompute(grad_out, q, k, v, ctx.scale)
    return dq, dk, dv, None


def _bwd_fake(grad_out, q, k, v, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(NO_DOUBLE_BACKWARD)


def _kernel_op_available() -> bool:
    """True when the loaded extension defines the attention ops (an older build may not)."""
    return (
        extension_available()
        and hasattr(torch.ops.softvq_fast, "attention_fwd")
        and hasattr(torch.ops.softvq_fast, "attention_bwd")
    )


if _kernel_op_available():
    torch.library.register_fake("softvq_fast::attention_fwd")(_fwd_fake)
    torch.library.register_fake("softvq_fast::attention_bwd")(_bwd_fake)
    torch.library.register_autograd("softvq_fast::attention_fwd", _fwd_backward, setup_context=_setup_context)
    torch.library.register_autograd("softvq_fast::attention_bwd", _no_double_backward)


def _softvq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad or torch.compiler.is_compiling():
        return torch.ops.softvq_fast.attention_fwd(q, k, v, scale)[0]
    # Without gradients, skip the Python autograd kernel registered above: it costs more than
    # the whole kernel call at short lengths (about 4 of 8 us measured on the CI CPU).
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.softvq_fast.attention_fwd(q, k, v, scale)[0]


# ---------------------------------------------------------------------------------------------
# The other backends
# ---------------------------------------------------------------------------------------------


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.to(acc)).to(q.dtype).contiguous()


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2).contiguous()


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, softmax_scale=scale).contiguous()


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from xformers.ops import memory_efficient_attention

    return memory_efficient_attention(q, k, v, scale=scale).contiguous()


class _AttentionBackend(Backend):
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

    def __init__(self, name, devices, dtypes, fn, package: str | None = None) -> None:
        self.name, self.devices, self.dtypes, self.fn, self.package = name, frozenset(devices), dtypes, fn, package
        # Looked up once: torch.compile traces backend selection, and torch 2.11's dynamo refuses
        # to trace importlib.util.find_spec (fullgraph=True fails on the graph break).
        self.package_problem = _package_problem(package) if package else None

    def unavailable_reason(self) -> str | None:
        return self.package_problem


def _package_problem(package: str) -> str | None:
    """Why `package` cannot serve (not installed, or installed but failing to import, e.g. built
    for another torch), or None."""
    if importlib.util.find_spec(package) is None:
        return f"package {package} is not installed"
    try:
        importlib.import_module(package)
    except Exception as exc:  # noqa: BLE001  (any import failure makes the backend unusable)
        return f"package {package} is installed but fails to import ({type(exc).__name__}: {exc})"
    return None


class _SoftVQBackend(_AttentionBackend):
    def unavailable_reason(self) -> str | None:
        if not extension_available():
            return "extension softvq_fast._C is not built"
        if not _kernel_op_available():
            return "extension softvq_fast._C lacks the softvq_fast::attention_* ops (rebuild it)"
        return None

    def input_reasons(self, inputs: AttentionInputs) -> list[str]:
        reasons = []
        if not inputs.last_dim_contiguous:
            reasons.append("q, k, v need stride 1 in the last (head_dim) dimension")
        d, s = inputs.head_dim, inputs.kv_len
        if inputs.device.type == "cpu":
            if inputs.dtype not in (torch.float32, torch.bfloat16):
                reasons.append(f"cpu kernel takes float32 or bfloat16, got {inputs.dtype}")
            if d > CPU_MAX_HEAD_DIM:
                reasons.append(f"cpu kernel takes head_dim <= {CPU_MAX_HEAD_DIM}, got {d}")
        elif inputs.device.type == "cuda":
            if not extension_has_cuda():
                reasons.append("extension was built without its CUDA kernels")
            # Newer GPUs run the PTX of the default build. (Not under torch.compile, which may not
            # trace the device query; eager calls come first.)
            elif not torch.compiler.is_compiling():
                major, minor = _cuda_capability(inputs.device.index or 0)
                if major < 8:
                    reasons.append(
                        f"cuda kernels need compute capability >= 8.0 (bf16/fp16 mma.sync), this GPU has {major}.{minor}"
                    )
            if inputs.dtype not in _HALVES:
                reasons.append(f"cuda kernels take bfloat16 or float16, got {inputs.dtype}")
            short = s <= CUDA_SHORT_MAX_LEN and d in CUDA_SHORT_HEAD_DIMS
            if not short and d not in CUDA_TILED_HEAD_DIMS:
                reasons.append(
                    f"cuda kernels take head_dim in {CUDA_SHORT_HEAD_DIMS} for kv length <= {CUDA_SHORT_MAX_LEN} "
                    f"or head_dim in {CUDA_TILED_HEAD_DIMS} for any length, got head_dim {d}, kv length {s}"
                )
        return reasons


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


class _FlashAttnBackend(_AttentionBackend):
    def input_reasons(self, inputs: AttentionInputs) -> list[str]:
        reasons = []
        if inputs.head_dim > 256 or inputs.head_dim % 8:
            reasons.append(f"flash_attn takes head_dim <= 256 and a multiple of 8, got {inputs.head_dim}")
        if not inputs.last_dim_contiguous:
            reasons.append("flash_attn needs stride 1 in the last dimension")
        return reasons


ATTENTION_BACKENDS: tuple[Backend, ...] = (
    _SoftVQBackend("softvq", ("cpu", "cuda"), frozenset({torch.float32, torch.bfloat16, torch.float16}), _softvq),
    _FlashAttnBackend("flash_attn", ("cuda",), _HALVES, _flash_attn, package="flash_attn"),
    _AttentionBackend("xformers", ("cuda",), _FLOATS - {torch.float64}, _xformers, package="xformers"),
    _AttentionBackend("sdpa", ("cpu", "cuda"), _FLOATS, _sdpa),
    _AttentionBackend("math", ("cpu", "cuda"), _FLOATS, _math_attention),
)

_AUTO_ORDER = {
    "cpu": ("softvq", "sdpa", "math"),
    "cuda": ("softvq", "flash_attn", "sdpa", "xformers", "math"),
}
# With gradients: on CUDA the softvq backward recomputes the forward through SDPA, so on top of
# SDPA's forward and backward it costs its own forward: backends with a native backward go first.
# On the CPU this order serves the inputs where SDPA was measured faster (see _ops_for).
_TRAINING_ORDER = {
    "cpu": ("sdpa", "softvq", "math"),
    "cuda": ("flash_attn", "sdpa", "softvq", "xformers", "math"),
}


def _auto_order(device_type: str) -> tuple[str, ...]:
    return _AUTO_ORDER.get(device_type, ("sdpa", "math"))


def _training_order(device_type: str) -> tuple[str, ...]:
    return _TRAINING_ORDER.get(device_type, ("sdpa", "math"))


OPS = register_op(OpBackends("attention", ATTENTION_BACKENDS, "SOFTVQ_FAST_ATTENTION", _auto_order))
TRAINING_OPS = OpBackends("attention", ATTENTION_BACKENDS, "SOFTVQ_FAST_ATTENTION", _training_order)


class CpuOrderRules(NamedTuple):
    """Where `auto` puts our CPU kernels before SDPA, by dtype: in the forward up to
    `forward_max_len` keys, with gradients from `training_lengths[0]` to `training_lengths[1]`
    keys (inclusive). A dtype left out puts SDPA first."""

    cpu: str
    forward_max_len: dict[torch.dtype, float]
    training_lengths: dict[torch.dtype, tuple[float, float]]


# Measured on a Xeon with AMX (module docstring): SDPA's bfloat16 kernels use the AMX tiles, and
# its float32 ones win at long lengths and at short ones with gradients.
AMX_CPU_RULES = CpuOrderRules(
    "with AMX (measured on a Xeon)",
    forward_max_len={torch.float32: 1200, torch.bfloat16: 32},
    training_lengths={torch.float32: (64, 1200)},
)
# Measured on an AMD EPYC (Zen 4, AVX-512 without AMX): ours faster at every length measured.
AVX512_CPU_RULES = CpuOrderRules(
    "with AVX-512 but no AMX (measured on an AMD EPYC, Zen 4)",
    forward_max_len={torch.float32: math.inf, torch.bfloat16: math.inf},
    training_lengths={torch.float32: (0, math.inf), torch.bfloat16: (0, math.inf)},
)
# Emulated: the same EPYC with torch's kernels (ATEN_CPU_CAPABILITY), MKL's and ours held to AVX2.
AVX2_CPU_RULES = CpuOrderRules(
    "with AVX2 but no AVX-512 (emulated on an AMD EPYC, Zen 4, held to AVX2)",
    forward_max_len={torch.float32: 1200, torch.bfloat16: 1200},
    training_lengths={torch.float32: (0, 1200), torch.bfloat16: (0, 1200)},
)
# Not measured (other instruction sets, other architectures): SDPA first.
UNMEASURED_CPU_RULES = CpuOrderRules("not measured (SDPA first)", forward_max_len={}, training_lengths={})


def detect_cpu_order_rules() -> CpuOrderRules:
    """The rules for this machine's CPU: by AMX tiles, then by the vector instruction set torch's
    own CPU kernels (SDPA's among them) run, which ATEN_CPU_CAPABILITY can lower."""
    try:
        has_amx = bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # private API: absent from some torch versions
        has_amx = False
    if has_amx:
        return AMX_CPU_RULES
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return AVX512_CPU_RULES
    return AVX2_CPU_RULES if capability == "AVX2" else UNMEASURED_CPU_RULES


# Read once: torch.compile does not trace into the feature query.
CPU_ORDER_RULES = detect_cpu_order_rules()

# Backends chosen so far, by (inputs, requested backend, SOFTVQ_FAST_ATTENTION, needs_grad). The
# attention backends' availability does not change within a process, so choosing again would
# only repeat the checks: several microseconds a call, which short sequences notice.
_CHOSEN: dict[tuple, Backend] = {}
_CHOSEN_MAX = 4096


def _ops_for(inputs: AttentionInputs, needs_grad: bool) -> OpBackends:
    """The automatic order for these inputs: OPS (ours first), or TRAINING_OPS (native backwards
    first; SDPA first on the CPU) where that was measured faster (CPU_ORDER_RULES)."""
    if inputs.device.type != "cpu":
        return TRAINING_OPS if needs_grad else OPS
    rules = CPU_ORDER_RULES
    if needs_grad:
        low, high = rules.training_lengths.get(inputs.dtype, (1, 0))
        ours_faster = low <= inputs.kv_len <= high
    else:
        ours_faster = inputs.kv_len <= rules.forward_max_len.get(inputs.dtype, 0)
    return OPS if ours_faster else TRAINING_OPS


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v per batch and head, non-causal.

    q: (B, Sq, H, D); k, v: (B, Sk, H, D); any strides with stride 1 in the last dimension are read
    without a copy by the `softvq` kernels. scale defaults to 1/sqrt(D). Returns (B, Sq, H, D),
    contiguous, in q's dtype. Differentiable with every backend. See the module docstring for the
    backends and the automatic order.
    """
    inputs = _describe(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(inputs.head_dim)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if torch.compiler.is_compiling():
        chosen = _ops_for(inputs, needs_grad).select(inputs, backend)
    else:
        key = (inputs, backend, os.environ.get(OPS.env_var), needs_grad)
        chosen = _CHOSEN.get(key)
        if chosen is None:
            chosen = _ops_for(inputs, needs_grad).select(inputs, backend)
            if len(_CHOSEN) >= _CHOSEN_MAX:
                _CHOSEN.clear()
            _CHOSEN[key] = chosen
    return chosen.fn(q, k, v, float(scale))
