"""LayerNorm + adaLN modulation (softvq_fast.ops.layernorm_modulate), y = LN(x) * (1 + scale) +
shift, at the generators' shapes: our op's backends against the same expression in plain
PyTorch (F.layer_norm, then the modulation, eager: the baseline), forward and forward+backward,
median time, peak memory and the error against float64.

Rows: the op's `triton` (fused kernels; CUDA) and `reference` backends (via softvq_fast), and the
expression called directly (via direct), eager and, in full mode, under torch.compile. shift and
scale are two chunks of one (B, 6 x D) adaLN output, as the models produce them; forward+backward
differentiates x and that output.

Shapes (x is (B, S, D)): full mode (GPU, bf16) SiT-XL's hidden size 1152 at batch 512 (256 images
with CFG) on 32 and 64 SoftVQ tokens and on 256 SD-VAE/2 tokens at 256 px, and batch 64 on 1024
tokens (512 px); quick mode (CPU, float32) SiT-S's 384 at batch 2 (one image with CFG) on 32, 256
and 1024 tokens, and SiT-XL's 1152 on 64 tokens.

On the CPU the fused Triton kernels run only in Triton's interpreter (tests): the quick mode's
rows compare the op's reference path (what auto runs there) with the expression called directly,
which is the op's own overhead, and leave torch.compile out (compiling each shape and pass takes
longer on a small CPU than the quick mode's whole budget).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from bench.compare import add_speedups
from bench.measure import check_and_time, op_calls
from softvq_fast.ops.layernorm_modulate import layernorm_modulate

TITLE = "LayerNorm-modulate (fused kernels vs F.layer_norm + modulation)"
BASELINE = "F.layer_norm followed by the modulation, called directly in eager PyTorch"
EPS = 1e-6
# (model, batch, tokens, hidden size)
QUICK = [("SiT-S", 2, 32, 384), ("SiT-S", 2, 256, 384), ("SiT-S", 2, 1024, 384), ("SiT-XL", 2, 64, 1152)]
FULL = [("SiT-XL", 512, 32, 1152), ("SiT-XL", 512, 64, 1152), ("SiT-XL", 512, 256, 1152), ("SiT-XL", 64, 1024, 1152)]

Modulate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def plain(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The expression as the authors' DiT/SiT code writes it."""
    return F.layer_norm(x, x.shape[-1:], eps=EPS) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def calls_for(ctx) -> dict[tuple[str, str], Modulate]:
    """(backend, via) -> f(x, shift, scale) (bench.measure.op_calls)."""
    return op_calls(ctx, "layernorm_modulate", lambda name: (
        lambda x, shift, scale: layernorm_modulate(x, shift, scale, eps=EPS, backend=name)), plain)


def _step(call: Modulate, x: torch.Tensor, modulation: torch.Tensor, grad: torch.Tensor | None) -> Callable:
    """One forward (returns y) or forward+backward (returns the gradients of x and the adaLN
    output, flattened into one vector)."""
    if grad is None:
        def forward() -> torch.Tensor:
            with torch.no_grad():
                shift, scale = modulation.chunk(6, dim=1)[:2]
                return call(x, shift, scale)

        return forward
    x_leaf, modulation_leaf = x.detach().requires_grad_(), modulation.detach().requires_grad_()

    def forward_backward() -> torch.Tensor:
        shift, scale = modulation_leaf.chunk(6, dim=1)[:2]
        call(x_leaf, shift, scale).backward(grad)
        grads = torch.cat([x_leaf.grad.flatten(), modulation_leaf.grad.flatten()])
        x_leaf.grad = modulation_leaf.grad = None
        return grads

    return forward_backward


def run(ctx) -> list[dict]:
    device = ctx.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rounds, repeats, max_seconds = (5, 20, 0.5) if ctx.quick else (3, 20, 1.0)
    calls = calls_for(ctx)
    rows: list[dict] = []
    for model, batch, tokens, dim in QUICK if ctx.quick else FULL:
        x = torch.randn(batch, tokens, dim, device=device, dtype=dtype)
        modulation = torch.randn(batch, 6 * dim, device=device, dtype=dtype)
        grad = torch.randn_like(x)
        for backward in (False, True):
            pass_name = "fwd+bwd" if backward else "fwd"
            reference = _step(plain, x.double(), modulation.double(), grad.double() if backward else None)()
            checked = check_and_time(
                ctx, {key: _step(call, x, modulation, grad if backward else None) for key, call in calls.items()},
                f"{model} B={batch} S={tokens} {pass_name}", reference=reference,
                rounds=rounds, repeats=repeats, warmup=2, max_seconds=max_seconds, uncounted_rounds=1,
            )
            shape = {"case": model, "B": batch, "S": tokens, "D": dim, "dtype": str(dtype).replace("torch.", "")}
            rows += [{**shape, "pass": pass_name, "backend": name, "via": via, **result.columns()}
                     for (name, via), result in checked.items()]
            ctx.progress(rows)
    add_speedups(rows, ("case", "B", "S", "D", "pass"), lambda row: row["via"] == "direct" and row["backend"] == "torch")
    ctx.note(
        f"medians of {rounds} alternating rounds of up to {repeats} calls after an uncounted one. rel_err: "
        "||out - ref|| / ||ref|| against the expression in float64 (fwd: y; fwd+bwd: the gradients of x and of "
        "the adaLN output). peak_mib: memory allocated during the call above what was allocated before it."
    )
    if ctx.device.type == "cpu":
        ctx.note("CPU: the fused Triton kernels run only in Triton's interpreter, so these rows show the op's "
                 "reference path (what auto runs on the CPU) against the same expression called directly, that "
                 "is the op's own overhead; torch.compile of the expression is a full-mode row (its compile time "
                 "per shape exceeds the quick mode's budget on a small CPU).")
    return rows
