"""Attention's backends, each declaring what it runs (`not_supported_reasons`), and their
registration with the dispatcher (`BACKENDS`).

  softvq      ours, softvq_fast._C: CPU float32/bfloat16 (head dim <= 256); CUDA bfloat16/float16
              on compute capability >= 8.0 (kv length <= 128 with head dims 64/72/128, any kv
              length with head dim 64). Needs stride 1 in the last dimension and at least one key.
  flash_attn  flash_attn.flash_attn_func, when the package imports (CUDA, bfloat16/float16).
  xformers    xformers.ops.memory_efficient_attention, when the package imports (CUDA).
  sdpa        torch.nn.functional.scaled_dot_product_attention.
  math        plain PyTorch, softmax in float32 or better: the reference.
Each is a function (q, k, v, scale) -> (B, Sq, H, D) contiguous.

With no keys (kv length 0) the output is the empty sum, zeros (and so are the gradients): `math`
computes that on every device and `sdpa` on the CPU, where it is tested; the other backends
declare no keys a reason, so `auto` falls back to one of those two.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Callable

import torch

from softvq_fast._extension import extension_available, extension_has_cuda
from softvq_fast.dispatch import Backend, OpBackends, register_op
from softvq_fast.ops.attention import order
from softvq_fast.ops.attention.custom_op import kernel_op_available, softvq_attention
from softvq_fast.ops.attention.inputs import FLOATS, AttentionInputs
from softvq_fast.ops.attention.plain import math_attention, sdpa

HALVES = frozenset({torch.bfloat16, torch.float16})
# Kernel limits of csrc/ (keep in sync with csrc/cpu/attention.cpp and csrc/cuda/attention_kernel.cuh).
CPU_MAX_HEAD_DIM = 256
CUDA_SHORT_MAX_LEN = 128
CUDA_SHORT_HEAD_DIMS = (64, 72, 128)
CUDA_TILED_HEAD_DIMS = (64,)
NO_KEYS = "no keys (kv length 0)"

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def package_problem(package: str) -> str | None:
    """Why `package` cannot serve (not installed, or installed but failing to import, e.g. built
    for another torch), or None."""
    if importlib.util.find_spec(package) is None:
        return f"package {package} is not installed"
    try:
        importlib.import_module(package)
    except Exception as exc:  # noqa: BLE001  (any import failure makes the backend unusable)
        return f"package {package} is installed but fails to import ({type(exc).__name__}: {exc})"
    return None


class AttentionBackend(Backend):
    """A backend that runs `fn`; with `package`, available only where that package imports."""

    def __init__(self, name: str, devices: tuple[str, ...], dtypes: frozenset[torch.dtype], fn: AttentionFn,
                 package: str | None = None) -> None:
        self.name, self.devices, self.dtypes, self.fn = name, frozenset(devices), dtypes, fn
        # Looked up once: torch.compile traces backend selection, and dynamo refuses to trace
        # importlib.util.find_spec (fullgraph=True fails on the graph break).
        self.package_problem = package_problem(package) if package else None

    def unavailable_reason(self) -> str | None:
        return self.package_problem


class SoftVQBackend(AttentionBackend):
    def unavailable_reason(self) -> str | None:
        if not extension_available():
            return "extension softvq_fast._C is not built"
        if not kernel_op_available():
            return "extension softvq_fast._C lacks the softvq_fast::attention_* ops (rebuild it)"
        return None

    def input_reasons(self, inputs: AttentionInputs) -> list[str]:
        reasons = []
        if not inputs.last_dim_contiguous:
            reasons.append("q, k, v need stride 1 in the last (head_dim) dimension")
        if inputs.kv_len == 0:
            reasons.append(NO_KEYS)
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
                major, minor = cuda_capability(inputs.device.index or 0)
                if major < 8:
                    reasons.append(
                        f"cuda kernels need compute capability >= 8.0 (bf16/fp16 mma.sync), this GPU has {major}.{minor}"
                    )
            if inputs.dtype not in HALVES:
                reasons.append(f"cuda kernels take bfloat16 or float16, got {inputs.dtype}")
            short = s <= CUDA_SHORT_MAX_LEN and d in CUDA_SHORT_HEAD_DIMS
            if not short and d not in CUDA_TILED_HEAD_DIMS:
                reasons.append(
                    f"cuda kernels take head_dim in {CUDA_SHORT_HEAD_DIMS} for kv length <= {CUDA_SHORT_MAX_LEN} "
                    f"or head_dim in {CUDA_TILED_HEAD_DIMS} for any length, got head_dim {d}, kv length {s}"
                )
        return reasons


@functools.lru_cache(maxsize=None)
def cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


class FlashAttnBackend(AttentionBackend):
    def input_reasons(self, inputs: AttentionInputs) -> list[str]:
        reasons = []
        if inputs.head_dim > 256 or inputs.head_dim % 8:
            reasons.append(f"flash_attn takes head_dim <= 256 and a multiple of 8, got {inputs.head_dim}")
        if not inputs.last_dim_contiguous:
            reasons.append("flash_attn needs stride 1 in the last dimension")
        if inputs.kv_len == 0:
            reasons.append(NO_KEYS)
        return reasons


class XFormersBackend(AttentionBackend):
    def input_reasons(self, inputs: AttentionInputs) -> list[str]:
        return [NO_KEYS] if inputs.kv_len == 0 else []


class SdpaBackend(AttentionBackend):
    def input_reasons(self, inputs: AttentionInputs) -> list[str]:
        if inputs.kv_len == 0 and inputs.device.type != "cpu":
            return [f"{NO_KEYS}: zeros from sdpa are tested on the cpu only"]
        return []


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, softmax_scale=scale).contiguous()


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from xformers.ops import memory_efficient_attention

    return memory_efficient_attention(q, k, v, scale=scale).contiguous()


BACKENDS = register_op(OpBackends(
    op=order.OP,
    backends=(
        SoftVQBackend("softvq", ("cpu", "cuda"), frozenset({torch.float32, torch.bfloat16, torch.float16}),
                      softvq_attention),
        FlashAttnBackend("flash_attn", ("cuda",), HALVES, _flash_attn, package="flash_attn"),
        XFormersBackend("xformers", ("cuda",), FLOATS - {torch.float64}, _xformers, package="xformers"),
        SdpaBackend("sdpa", ("cpu", "cuda"), FLOATS, sdpa),
        AttentionBackend("math", ("cpu", "cuda"), FLOATS, math_attention),
    ),
    priority=order.priority,
    order_summary=order.SUMMARY,
    legacy_env_var="SOFTVQ_FAST_ATTENTION",
))
