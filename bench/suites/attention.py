"""Attention: our `softvq` kernels against what a user runs without us, at generator and tokenizer
shapes, forward and forward+backward: median time, peak memory, speed-up over the baseline and
the error against float64.

Rows: `softvq` and `sdpa` through softvq_fast's op (via softvq_fast: what `backend=` gives), and
the libraries called directly (via direct: torch's scaled_dot_product_attention on transposed
views, flash_attn's flash_attn_func and xformers' memory_efficient_attention where installed and
able to run the inputs). The baseline is the fastest direct row of each case and pass. The
`math` backend is not timed: in float64 it is the reference that rel_err compares with (the
output for the forward, the gradient of q, k and v together for forward+backward).

Shapes (H = 16): generator B=512 (256 images with CFG), S in {32, 64, 128}, head dim 72 (SiT-XL)
and 64; tokenizer B=64, S in {321, 1089} (256/1024 patches + class + 64 latent tokens), head dim
64. Full mode (GPU) runs them in bf16; quick mode (CPU, CI) runs float32 with B=8 for the
generator shapes and B=1 for the tokenizer shapes. Inputs are strided q/k/v views of one
(B, S, 3, H, D) tensor, as the models produce them. The rows of a case are timed in alternation
over a few rounds (median of the round medians) after one uncounted round, so that load from
other processes hits all of them alike.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from bench.compare import add_speedups
from bench.measure import check_and_time
from softvq_fast import attention
from softvq_fast.dispatch import NoBackendError

TITLE = "Attention: softvq kernels vs torch SDPA (flash_attn, xformers where installed)"
BASELINE = ("per case and pass, the fastest library called directly (via direct): torch's "
            "scaled_dot_product_attention, flash_attn_func, xformers' memory_efficient_attention")
HEADS = 16
GENERATOR = [(s, d) for d in (72, 64) for s in (32, 64, 128)]
TOKENIZER = [(321, 64), (1089, 64)]
OURS = ("softvq", "sdpa")  # through softvq_fast.attention(backend=...)

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cases(quick: bool) -> list[tuple[str, int, int, int]]:
    """(case, batch, seq, head_dim) of every shape the suite times."""
    gen_batch, tok_batch = (8, 1) if quick else (512, 64)
    return [("generator", gen_batch, s, d) for s, d in GENERATOR] + [
        ("tokenizer", tok_batch, s, d) for s, d in TOKENIZER
    ]


def _torch_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()  # (B, S, H, D) rows, ready for the projection


def direct_calls() -> dict[str, Attention]:
    """The libraries a user calls without us, (B, S, H, D) in and out, default scale."""
    calls: dict[str, Attention] = {"sdpa": _torch_sdpa}
    try:
        from flash_attn import flash_attn_func

        calls["flash_attn"] = flash_attn_func
    except Exception:  # not installed, or built for another torch
        pass
    try:
        from xformers.ops import memory_efficient_attention

        calls["xformers"] = memory_efficient_attention
    except Exception:
        pass
    return calls


def calls_for() -> dict[tuple[str, str], Attention]:
    """(backend, via) -> f(q, k, v): ours through the op, then the direct calls."""
    ours = {(name, "softvq_fast"): (lambda q, k, v, name=name: attention(q, k, v, backend=name)) for name in OURS}
    return {**ours, **{(name, "direct"): call for name, call in direct_calls().items()}}


def _step(call: Attention, qkv: torch.Tensor, grad: torch.Tensor | None) -> Callable[[], torch.Tensor]:
    """One forward (returns the output) or forward+backward (returns the gradient of qkv)."""
    if grad is None:
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return call(*qkv.unbind(2))

        return forward
    leaf = qkv.detach().requires_grad_()

    def forward_backward() -> torch.Tensor:
        call(*leaf.unbind(2)).backward(grad)
        result, leaf.grad = leaf.grad, None
        return result

    return forward_backward


def run(ctx) -> list[dict]:
    device = ctx.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rounds, repeats, max_seconds = (3, 10, 0.3) if ctx.quick else (3, 10, 1.0)
    calls = calls_for()
    rows: list[dict] = []
    for case, batch, seq, head_dim in cases(ctx.quick):
        qkv = torch.randn(batch, seq, 3, HEADS, head_dim, device=device, dtype=dtype)
        grad = torch.randn(batch, seq, HEADS, head_dim, device=device, dtype=dtype)
        for backward in (False, True):
            pass_name = "fwd+bwd" if backward else "fwd"
            reference = _step(lambda q, k, v: attention(q, k, v, backend="math"), qkv.double(),
                              grad.double() if backward else None)()
            # The first round is not counted: for a few milliseconds after the previous case (its
            # peak-memory profiling above all) whichever row runs first is measured slow.
            checked = check_and_time(
                ctx, {key: _step(call, qkv, grad if backward else None) for key, call in calls.items()},
                f"{case} S={seq} D={head_dim} {pass_name}", reference=reference,
                # Ours may only decline the inputs; a library called directly may refuse them in its own way.
                declined=lambda key: NoBackendError if key[1] == "softvq_fast" else Exception,
                rounds=rounds, repeats=repeats, warmup=2, max_seconds=max_seconds, uncounted_rounds=1,
            )
            del reference
            shape = {"case": case, "B": batch, "S": seq, "D": head_dim, "dtype": str(dtype).replace("torch.", "")}
            rows += [{**shape, "pass": pass_name, "backend": name, "via": via, **result.columns()}
                     for (name, via), result in checked.items()]
            ctx.progress(rows)
        del qkv, grad
    add_speedups(rows, ("case", "S", "D", "pass"), lambda row: row["via"] == "direct")
    ctx.note(
        f"H={HEADS}; q, k, v are strided views of one (B, S, 3, H, D) tensor; medians of {rounds} alternating "
        f"rounds of up to {repeats} repeats after an uncounted one. rel_err: ||out - ref|| / ||ref|| against the "
        "math backend in float64 (forward: the output; fwd+bwd: the gradient of q, k, v for a random output "
        "gradient). peak_mib: memory allocated during the call above what was allocated before it."
    )
    return rows
