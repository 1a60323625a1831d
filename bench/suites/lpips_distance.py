"""LPIPS layer distance (softvq_fast.ops.lpips_distance) at LPIPS-VGG's five layers for 256 px
images: our op's backends against the same formula in plain PyTorch (eager: the baseline), forward
and forward+backward, median time, peak memory and the error against float64.

Per layer, with features fx, fy (B, C, H, W) of the two images and the layer's linear head w (C,):
normalise each pixel's feature vector to unit length (+1e-10), square the difference, apply the
head as a 1x1 convolution and average over pixels. Forward+backward differentiates fx only, as in
a tokenizer's training step (the real image's features and the heads are frozen).

Rows: the op's backends (via softvq_fast: `cpu` fused C++ kernels, `triton` fused kernels on CUDA,
`reference` the eager formula inside the op), and the formula called directly (via direct), eager
and, in full mode, under torch.compile. Features are ReLU outputs (non-negative, about half zeros)
as VGG produces them.

Shapes (C, H = W): relu1_2 (64, 256), relu2_2 (128, 128), relu3_3 (256, 64), relu4_3 (512, 32),
relu5_3 (512, 16). Full mode (GPU, bf16) batch 32; quick mode (CPU, float32) batch 2.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from bench.compare import add_speedups
from bench.measure import check_and_time, op_calls
from softvq_fast.ops.lpips_distance import lpips_distance

TITLE = "LPIPS layer distance (fused kernels vs the eager formula)"
BASELINE = "the formula (normalise, squared difference, 1x1 conv head, spatial mean) called directly in eager PyTorch"
EPS = 1e-10
LAYERS = [("relu1_2", 64, 256), ("relu2_2", 128, 128), ("relu3_3", 256, 64), ("relu4_3", 512, 32),
          ("relu5_3", 512, 16)]
QUICK_BATCH, FULL_BATCH = 2, 32

Distance = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def plain(fx: torch.Tensor, fy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One layer of LPIPS as a user writes it in PyTorch: (B, C, H, W) x 2, (C,) -> (B,)."""
    a = fx / (torch.sqrt(torch.sum(fx**2, dim=1, keepdim=True)) + EPS)
    b = fy / (torch.sqrt(torch.sum(fy**2, dim=1, keepdim=True)) + EPS)
    return F.conv2d((a - b) ** 2, weight.view(1, -1, 1, 1)).mean(dim=(2, 3)).flatten()


def _step(call: Distance, fx: torch.Tensor, fy: torch.Tensor, weight: torch.Tensor,
          grad: torch.Tensor | None) -> Callable[[], torch.Tensor]:
    """One forward (returns the distance) or forward+backward (returns fx's gradient)."""
    if grad is None:
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return call(fx, fy, weight)

        return forward
    leaf = fx.detach().requires_grad_()

    def forward_backward() -> torch.Tensor:
        call(leaf, fy, weight).backward(grad)
        grad_fx, leaf.grad = leaf.grad, None
        return grad_fx

    return forward_backward


def run(ctx) -> list[dict]:
    device = ctx.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = QUICK_BATCH if ctx.quick else FULL_BATCH
    rounds, repeats, max_seconds = (3, 5, 0.3) if ctx.quick else (3, 20, 1.0)
    calls = op_calls(ctx, "lpips_distance", lambda name: (
        lambda fx, fy, weight: lpips_distance(fx, fy, weight, eps=EPS, backend=name)), plain)
    rows: list[dict] = []
    for layer, channels, size in LAYERS:
        fx = torch.randn(batch, channels, size, size, device=device).relu()
        fy = (fx + 0.5 * torch.randn_like(fx)).relu()
        fx, fy = fx.to(dtype), fy.to(dtype)
        weight = torch.rand(channels, device=device, dtype=dtype) / channels
        grad = torch.ones(batch, device=device, dtype=dtype)
        for backward in (False, True):
            pass_name = "fwd+bwd" if backward else "fwd"
            reference = _step(plain, fx.double(), fy.double(), weight.double(), grad.double() if backward else None)()
            checked = check_and_time(
                ctx, {key: _step(call, fx, fy, weight, grad if backward else None) for key, call in calls.items()},
                f"{layer} B={batch} {pass_name}", reference=reference,
                rounds=rounds, repeats=repeats, warmup=1, max_seconds=max_seconds, uncounted_rounds=1,
            )
            shape = {"case": layer, "B": batch, "C": channels, "H=W": size, "dtype": str(dtype).replace("torch.", "")}
            rows += [{**shape, "pass": pass_name, "backend": name, "via": via, **result.columns()}
                     for (name, via), result in checked.items()]
            ctx.progress(rows)
    add_speedups(rows, ("case", "B", "pass"), lambda row: row["via"] == "direct" and row["backend"] == "torch")
    ctx.note(
        f"medians of {rounds} alternating rounds of up to {repeats} calls after an uncounted one. rel_err: "
        "||out - ref|| / ||ref|| against the formula in float64 (fwd: the distance; fwd+bwd: the gradient of fx). "
        "peak_mib: memory allocated during the call above what was allocated before it."
    )
    return rows
