"""soft_vq: every token becomes a softmax-weighted mix of its codebook's rows (SoftVQ-VAE).

Per codebook c (the S tokens split into C contiguous segments):
  logits = ẑ · Êᵀ (ẑ, Ê L2-normalised when l2_norm), p = softmax(logits / tau), z_q = p · Ê.
The codebook gets gradient only through the value path p · Ê (the authors detach it in the logits).

Backends (argument `backend`, else $SOFTVQ_FAST_SOFT_VQ_BACKEND, else `auto`: cpu then reference on
the CPU, triton then reference on CUDA):
  reference  plain PyTorch, the math as written (materialises tokens x codebook tensors)
  cpu        fused C++ kernels (csrc/cpu/soft_vq*.cpp: OpenMP tasks, AVX-512/AVX2), bounded workspace
  triton     fused Triton kernels for CUDA (softvq_fast.kernels.soft_vq); on the CPU only under
             TRITON_INTERPRET=1 (tests)
The fused backends are the torch.library custom ops softvq_fast::soft_vq_forward/backward.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from softvq_fast.dispatch import (
    AUTO, FLOAT_DTYPES, REFERENCE_DTYPES, ExtensionCpuBackend, OpBackends, ReferenceBackend, TritonBackend,
    grad_needed, register_op,
)
from softvq_fast.ops.soft_vq_reference import SoftVQParts, reference_parts

ENTROPY_TEMPERATURE = 0.01
MAX_TRITON_DIM = 256
# Rows of the fused forward's row_stats (4, C, M), all float32. The max logit is kept apart from
# the log-sums so that exp(logit - max) stays exact when logits / temperature is large.
ROW_STATS = ("max_logit", "log_sum_tau", "log_sum_entropy", "row_entropy")
# Temperatures t whose 1/t is a normal float32: the fused kernels scale (logit - max) by 1/t in
# float32, and a 1/t that is zero, subnormal (flushed to zero) or infinite turns the -inf of
# padded codes into NaN. A larger tau means uniform weights: codebook.mean(-2) says it exactly.
TEMPERATURE_RANGE = (2.0**-126, 2.0**126)


@dataclass(frozen=True)
class SoftVQInputs:
    """What backend selection looks at."""

    device: torch.device
    dtype: torch.dtype
    needs_grad: bool
    dim: int


class CpuBackend(ExtensionCpuBackend):
    dtypes = FLOAT_DTYPES
    kernel = "soft_vq_cpu_forward"


class SoftVQTritonBackend(TritonBackend):
    dtypes = FLOAT_DTYPES

    def input_reasons(self, inputs: SoftVQInputs) -> list[str]:
        if inputs.dim > MAX_TRITON_DIM:
            return [f"code dimension D={inputs.dim} > {MAX_TRITON_DIM}"]
        return []


def _priority(inputs: SoftVQInputs) -> tuple[str, ...]:
    if inputs.device.type == "cuda":
        return ("triton", "reference")
    return ("cpu", "reference") if inputs.device.type == "cpu" else ("reference",)


BACKENDS = register_op(OpBackends(
    op="soft_vq",
    backends=(ReferenceBackend(), CpuBackend(), SoftVQTritonBackend()),
    priority=_priority,
    order_summary="cuda: triton, reference; cpu: cpu, reference",
    legacy_env_var="SOFTVQ_FAST_BACKEND",
))


# ----------------------------------------------------------------------------- fused custom ops
def _cpu_forward(z, codebook, tau, entropy_temperature, with_stats, with_entropy, allow_tf32):
    """csrc/cpu/soft_vq.cpp computes in float32."""
    z_q, row_stats, column_sum, indices = torch.ops.softvq_fast.soft_vq_cpu_forward(
        z, codebook, tau, entropy_temperature, with_stats, with_entropy
    )
    return z_q.to(z.dtype), row_stats, column_sum, indices


def _cpu_backward(grad_z_q, grad_row_entropy, grad_column_sum, z, codebook, z_q, row_stats, tau,
                  entropy_temperature, with_entropy, allow_tf32):
    grad_z, grad_codebook = torch.ops.softvq_fast.soft_vq_cpu_backward(
        grad_z_q, grad_row_entropy, grad_column_sum, z, codebook, z_q, row_stats, tau, entropy_temperature, with_entropy
    )
    return grad_z.to(z.dtype), grad_codebook.to(codebook.dtype)


def _fused_impl(backend: str):
    """(forward, backward) launchers of a fused backend."""
    if backend == "cpu":
        return _cpu_forward, _cpu_backward
    from softvq_fast.kernels import soft_vq as triton_soft_vq

    return triton_soft_vq.forward, triton_soft_vq.backward


@torch.library.custom_op("softvq_fast::soft_vq_forward", mutates_args=())
def soft_vq_forward(
    z: torch.Tensor,
    codebook: torch.Tensor,
    tau: float,
    entropy_temperature: float,
    with_stats: bool,
    with_entropy: bool,
    backend: str,
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """z (C, M, D), codebook (C, K, D) -> z_q (C, M, D), row_stats (4, C, M) float32 (ROW_STATS),
    column_sum (C, K) float32 (sum over rows of softmax(logits / entropy_temperature)), indices (C, M).
    Per row, log softmax(logits / t)_k = (logit_k - max_logit) / t - log_sum_t. Indices come with
    `with_stats`, the entropy statistics and column sums with `with_entropy` (else zeros)."""
    forward, _ = _fused_impl(backend)
    return forward(z, codebook, tau, entropy_temperature, with_stats, with_entropy, allow_tf32)


@soft_vq_forward.register_fake
def _(z, codebook, tau, entropy_temperature, with_stats, with_entropy, backend, allow_tf32):
    C, M, _ = z.shape
    return (
        torch.empty_like(z),
        z.new_empty(4, C, M, dtype=torch.float32),
        z.new_empty(C, codebook.shape[1], dtype=torch.float32),
        z.new_empty(C, M, dtype=torch.long),
    )


@torch.library.custom_op("softvq_fast::soft_vq_backward", mutates_args=())
def soft_vq_backward(
    grad_z_q: torch.Tensor,
    grad_row_entropy: torch.Tensor,
    grad_column_sum: torch.Tensor,
    z: torch.Tensor,
    codebook: torch.Tensor,
    z_q: torch.Tensor,
    row_stats: torch.Tensor,
    tau: float,
    entropy_temperature: float,
    with_entropy: bool,
    backend: str,
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (z (C, M, D), codebook (C, K, D)) of soft_vq_forward's z_q and, with `with_entropy`,
    of its row entropy (C, M) and column sum (C, K). With p = softmax(s / tau), q = softmax(s / T),
    h the row entropy of q and G = grad_column_sum, the logits s = z . E get
      ds_j = p_j (g . E_j - g . z_q) / tau + q_j (G_j - sum_k q_k G_k - grad_h (log q_j + h)) / T."""
    _, backward = _fused_impl(backend)
    return backward(grad_z_q.contiguous(), grad_row_entropy.contiguous(), grad_column_sum.contiguous(), z, codebook,
                    z_q, row_stats, tau, entropy_temperature, with_entropy, allow_tf32)


@soft_vq_backward.register_fake
def _(grad_z_q, grad_row_entropy, grad_column_sum, z, codebook, z_q, row_stats, tau, entropy_temperature,
      with_entropy, backend, allow_tf32):
    return torch.empty_like(z), torch.empty_like(codebook)


def _setup_context(ctx, inputs, output) -> None:
    z, codebook, tau, entropy_temperature, _, with_entropy, backend, allow_tf32 = inputs
    z_q, row_stats, _, _ = output
    ctx.save_for_backward(z, codebook, z_q, row_stats)
    ctx.params = (tau, entropy_temperature, with_entropy, backend, allow_tf32)


def _backward(ctx, grad_z_q, grad_row_stats, grad_column_sum, _grad_indices):
    z, codebook, z_q, row_stats = ctx.saved_tensors
    tau, entropy_temperature, with_entropy, backend, allow_tf32 = ctx.params
    with_entropy = with_entropy and (grad_row_stats is not None or grad_column_sum is not None)
    if grad_z_q is None:
        grad_z_q = torch.zeros_like(z_q)
    grad_row_entropy = torch.zeros_like(row_stats[3]) if grad_row_stats is None else grad_row_stats[3]
    if grad_column_sum is None:
        grad_column_sum = z.new_zeros(codebook.shape[:2], dtype=torch.float32)
    grad_z, grad_codebook = soft_vq_backward(
        grad_z_q, grad_row_entropy, grad_column_sum, z, codebook, z_q, row_stats,
        tau, entropy_temperature, with_entropy, backend, allow_tf32,
    )
    return grad_z, grad_codebook, None, None, None, None, None, None


soft_vq_forward.register_autograd(_backward, setup_context=_setup_context)


def _fused_parts(
    z: torch.Tensor, codebook: torch.Tensor, tau: float, entropy_temperature: float, with_stats: bool,
    with_entropy: bool, backend: str, allow_tf32: bool,
) -> SoftVQParts:
    z_q, row_stats, column_sum, indices = soft_vq_forward(
        z.contiguous(), codebook.contiguous(), tau, entropy_temperature, with_stats, with_entropy, backend, allow_tf32
    )
    # max_prob is a statistic, without gradient (the op's backward drops row_stats' gradients)
    return SoftVQParts(z_q, row_stats[3], column_sum, torch.exp(-row_stats[1]).detach(), indices)


def _matmul_allows_tf32() -> bool:
    """torch's setting for float32 CUDA matmuls. The legacy flag first (dynamo traces it); torch
    >= 2.9 raises on reading it once the new `fp32_precision` API has set TF32."""
    matmul = torch.backends.cuda.matmul
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return matmul.fp32_precision == "tf32"


# ----------------------------------------------------------------------------- public API
@dataclass
class SoftVQStats:
    """Side outputs of soft_vq(..., return_stats=True), computed without a tokens x codebook tensor.

    entropy_loss: scalar float32, differentiable w.r.t. z: mean row entropy minus the entropy of
        the mean distribution over all rows and codebooks, both of softmax(logits / 0.01) (the
        authors' regulariser before `entropy_loss_ratio`); None when called with entropy=False.
    indices: argmax code per token, z's leading shape ((B, S) or (N,)), int64.
    max_prob: scalar, mean over tokens of the largest probability at temperature tau.
    usage: (C, K) int64, how many tokens picked each code (argmax).
    cos: scalar, mean cosine similarity between the (normalised if l2_norm) input and z_q.
    column_sum: (C, K) float32, differentiable w.r.t. z: the sum over rows of softmax(logits /
        0.01), of which entropy_loss's mean distribution is made (a trainer pools it over
        processes); None when called with entropy=False.
    """

    entropy_loss: torch.Tensor | None
    indices: torch.Tensor
    max_prob: torch.Tensor
    usage: torch.Tensor
    cos: torch.Tensor
    column_sum: torch.Tensor | None = None


def entropy_regulariser(row_entropy: torch.Tensor, column_sum: torch.Tensor) -> torch.Tensor:
    """row_entropy (C, M), column_sum (C, K) -> scalar: mean row entropy minus the entropy of the
    mean distribution over all C*M rows (log with +1e-6 as in the authors' code)."""
    C, M = row_entropy.shape
    mean_probs = column_sum.sum(dim=0) / (C * M)
    return row_entropy.mean() + (mean_probs * torch.log(mean_probs + 1e-6)).sum()


def _check_inputs(z: torch.Tensor, codebook: torch.Tensor) -> None:
    for name, t, shapes in (("z", z, "(B, S, D) or (N, D)"), ("codebook", codebook, "(C, K, D) or (K, D)")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"soft_vq: {name} must be a torch.Tensor of shape {shapes}, got {type(t).__name__}")
        if t.dim() not in (2, 3):
            raise ValueError(f"soft_vq: {name} must be a tensor of shape {shapes}, got shape {tuple(t.shape)}")
    if z.dtype not in REFERENCE_DTYPES:
        raise TypeError(f"soft_vq: z must be float32, bfloat16, float16 (or float64, reference only), got {z.dtype}")
    if codebook.dtype != z.dtype:
        raise TypeError(f"soft_vq: codebook dtype {codebook.dtype} differs from z dtype {z.dtype}")
    if codebook.device != z.device:
        raise ValueError(f"soft_vq: codebook is on {codebook.device} but z is on {z.device}")
    if codebook.shape[-1] != z.shape[-1]:
        raise ValueError(
            f"soft_vq: codebook code dimension {codebook.shape[-1]} != z dimension D={z.shape[-1]} "
            f"(z {tuple(z.shape)}, codebook {tuple(codebook.shape)})"
        )
    num_codebooks, codes = (codebook.shape[0], codebook.shape[1]) if codebook.dim() == 3 else (1, codebook.shape[0])
    for count, what in ((num_codebooks, "C >= 1 (codebooks)"), (codes, "K >= 1 (codes per codebook)"),
                        (z.shape[-1], "D >= 1 (code dimension)")):
        if count == 0:
            raise ValueError(f"soft_vq: codebook needs {what}, got shape {tuple(codebook.shape)}")
    tokens = z.shape[-2]
    if tokens % num_codebooks:
        raise ValueError(
            f"soft_vq: z has {tokens} tokens per sample (dim -2), not divisible by the {num_codebooks} codebooks"
        )


def check_temperature(name: str, value: float, where: str = "soft_vq") -> float:
    """`value` as a float in TEMPERATURE_RANGE, else TypeError/ValueError naming `where` and `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = f" (a tensor {name} would get no gradient: pass float({name}))" if torch.is_tensor(value) else ""
        raise TypeError(f"{where}: {name} must be a real number (float), got {type(value).__name__}{hint}")
    low, high = TEMPERATURE_RANGE
    if not low <= value <= high:  # NaN fails too
        raise ValueError(
            f"{where}: {name} must be a finite number in [{low:.3g}, {high:.3g}] (the fused kernels scale by "
            f"1/{name} in float32; a larger {name} means uniform weights), got {value}"
        )
    return float(value)


def _check_flags(**flags: object) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool) and not (name == "allow_tf32" and value is None):
            expected = "True, False or None" if name == "allow_tf32" else "True or False"
            raise TypeError(f"soft_vq: {name} must be {expected}, got {value!r}")


def soft_vq(
    z: torch.Tensor,
    codebook: torch.Tensor,
    tau: float,
    *,
    l2_norm: bool = False,
    return_stats: bool = False,
    entropy: bool = True,
    entropy_temperature: float = ENTROPY_TEMPERATURE,
    backend: str = AUTO,
    allow_tf32: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, SoftVQStats]:
    """Soft vector quantization.

    z: (B, S, D) or (N, D); codebook: (C, K, D) or (K, D), same dtype and device, C, K, D >= 1.
    With C codebooks the S tokens (N rows) split into C contiguous segments; segment c uses
    codebook c. tau and entropy_temperature: floats in TEMPERATURE_RANGE. Returns z_q shaped like z, and with `return_stats` also a SoftVQStats; `entropy=False` skips
    the regulariser (about half the forward work of the stats; evaluation needs no loss).
    `allow_tf32` (fp32 inputs, triton backend): tensor-core TF32 dot products (logits to ~3e-4
    relative; z_q and the entropy terms less exact, as the logits are divided by tau); default:
    torch's float32 matmul setting (`torch.backends.cuda.matmul.fp32_precision`, or `allow_tf32`
    before torch 2.9). `backend`: "auto", "reference", "cpu" or "triton" (module docstring).
    """
    _check_inputs(z, codebook)
    tau = check_temperature("tau", tau)
    entropy_temperature = check_temperature("entropy_temperature", entropy_temperature)
    _check_flags(l2_norm=l2_norm, return_stats=return_stats, entropy=entropy, allow_tf32=allow_tf32)
    z3 = z if z.dim() == 3 else z.unsqueeze(0)
    codebooks = codebook if codebook.dim() == 3 else codebook.unsqueeze(0)
    B, S, D = z3.shape
    C = codebooks.shape[0]
    segment = S // C
    # codebook-major rows: (C, B * segment, D), as in the authors' code
    z_rows = z3.reshape(B, C, segment, D).transpose(0, 1).reshape(C, B * segment, D)
    if l2_norm:
        z_rows = F.normalize(z_rows, p=2, dim=-1)
        codebooks = F.normalize(codebooks, p=2, dim=-1)
    chosen = BACKENDS.select(SoftVQInputs(z.device, z.dtype, grad_needed(z, codebook), D), backend)
    with_entropy = return_stats and entropy
    if chosen.name == "reference":
        parts = reference_parts(z_rows, codebooks, tau, entropy_temperature, return_stats, with_entropy)
    else:
        if chosen.name != "triton":  # TF32 is a tensor-core format: the CPU kernels have none
            tf32 = False
        else:
            tf32 = _matmul_allows_tf32() if allow_tf32 is None else allow_tf32
        parts = _fused_parts(z_rows, codebooks, tau, entropy_temperature, return_stats, with_entropy,
                             chosen.name, tf32)
    z_q = parts.z_q.reshape(C, B, segment, D).transpose(0, 1).reshape(z.shape)
    if not return_stats:
        return z_q
    with torch.no_grad():
        cos = F.cosine_similarity(z_rows.reshape(-1, D), parts.z_q.reshape(-1, D), dim=-1).mean()
        usage = torch.zeros(C, codebooks.shape[1], dtype=torch.long, device=z.device)
        usage.scatter_add_(1, parts.indices, torch.ones_like(parts.indices))
    stats = SoftVQStats(
        entropy_loss=entropy_regulariser(parts.row_entropy, parts.column_sum) if with_entropy else None,
        indices=parts.indices.reshape(C, B, segment).transpose(0, 1).reshape(z.shape[:-1]),
        max_prob=parts.max_prob.mean(),
        usage=usage,
        cos=cos,
        column_sum=parts.column_sum if with_entropy else None,
    )
    return z_q, stats
