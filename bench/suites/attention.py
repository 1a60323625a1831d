"""Attention: every backend that can run, at generator and tokenizer shapes, forward and
forward+backward, median time and peak memory, ratio to SDPA side by side.

Shapes (H = 16): generator B=512 (256 images with CFG), S in {32, 64, 128}, head dim 72 (SiT-XL)
and 64; tokenizer B=64, S in {321, 1089} (256/1024 patches + class + 64 latent tokens), head dim
64. Full mode (GPU) runs them in bf16; quick mode (CPU, CI) runs float32 with B=8 for the
generator shapes and B=1 for the tokenizer shapes. Inputs are strided q/k/v views of one
(B, S, 3, H, D) tensor, as the models produce them. Backends are timed in alternation over a few
rounds (median of the round medians) so that load from other processes hits all of them alike,
after one uncounted round.
"""
from __future__ import annotations

import statistics
from typing import Callable

import torch

from bench.measure import peak_memory_bytes, time_round_robin
from softvq_fast.ops.attention import OPS, _describe, attention

TITLE = "Attention backends (softvq kernels vs SDPA, flash-attn, xformers, math)"
HEADS = 16
GENERATOR = [(s, d) for d in (72, 64) for s in (32, 64, 128)]
TOKENIZER = [(321, 64), (1089, 64)]


def cases(quick: bool) -> list[tuple[str, int, int, int]]:
    """(case, batch, seq, head_dim) of every shape the suite times."""
    gen_batch, tok_batch = (8, 1) if quick else (512, 64)
    return [("generator", gen_batch, s, d) for s, d in GENERATOR] + [
        ("tokenizer", tok_batch, s, d) for s, d in TOKENIZER
    ]


def _step(backend: str, qkv: torch.Tensor, backward: bool) -> Callable[[], None]:
    if not backward:
        def forward() -> None:
            with torch.no_grad():
                attention(*qkv.unbind(2), backend=backend)

        return forward
    leaf = qkv.detach().requires_grad_()
    grad = torch.ones(qkv.shape[0], qkv.shape[1], qkv.shape[3], qkv.shape[4], dtype=qkv.dtype, device=qkv.device)

    def forward_backward() -> None:
        attention(*leaf.unbind(2), backend=backend).backward(grad)
        leaf.grad = None

    return forward_backward


def run(ctx) -> list[dict]:
    device = ctx.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rounds, repeats, max_seconds = (5, 10, 0.5) if ctx.quick else (3, 10, 1.0)
    rows = []
    for case, batch, seq, head_dim in cases(ctx.quick):
        qkv = torch.randn(batch, seq, 3, HEADS, head_dim, device=device, dtype=dtype)
        inputs = _describe(*qkv.unbind(2))
        backends = [b.name for b in OPS.backends if not b.not_supported_reasons(inputs)]
        for backward in (False, True):
            steps = {name: _step(name, qkv, backward) for name in backends}
            # The first round is not counted: for a few milliseconds after the previous case (its
            # peak-memory profiling above all) whichever backend runs first is measured slow.
            medians = time_round_robin(
                steps, device, rounds=rounds, repeats=repeats, warmup=2, max_seconds=max_seconds, uncounted_rounds=1
            )
            times = {name: statistics.median(m) for name, m in medians.items()}
            for name in backends:
                rows.append(
                    {
                        "case": case,
                        "B": batch,
                        "S": seq,
                        "D": head_dim,
                        "dtype": str(dtype).replace("torch.", ""),
                        "pass": "fwd+bwd" if backward else "fwd",
                        "backend": name,
                        "median_ms": times[name],
                        "peak_MB": peak_memory_bytes(steps[name], device) / 2**20,
                        "sdpa_ms / ms": times["sdpa"] / times[name] if "sdpa" in times else float("nan"),
                    }
                )
            ctx.progress(rows)
        del qkv
    ctx.note(
        f"H={HEADS}; q, k, v are strided views of one (B, S, 3, H, D) tensor; medians of {rounds} alternating "
        f"rounds of up to {repeats} repeats after an uncounted one; 'sdpa_ms / ms' > 1 means faster than torch SDPA."
    )
    return rows
