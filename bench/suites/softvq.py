"""Soft VQ (softvq_fast.soft_vq): median time and peak extra memory of every backend that runs,
against the `reference` backend (the baseline: the soft VQ written in plain PyTorch, eager) and
torch.compile(reference), at the authors' training shape family (C=4 codebooks of 8192 x 32,
64 tokens) and over K.

Passes: `fwd` returns z_q alone (what the tokenizer's encode runs), `fwd+stats` also the
statistics and the entropy regulariser (the training forward), `fwd+bwd` is a training step
through both. The K sweep runs `fwd+stats` and `fwd+bwd` without torch.compile (its compile time
would dominate the suite). The rows of a case and pass are timed in alternation, one repeat each
per round, so that load from other processes hits them alike.
"""
from __future__ import annotations

from typing import Callable

import torch

from bench.compare import add_speedups
from bench.measure import check_and_time
from softvq_fast import soft_vq

TITLE = "Soft VQ: forward (z_q alone; with statistics and regulariser) and forward+backward"
BASELINE = "the reference backend: the soft VQ in plain PyTorch (the authors' math), eager"

TAU = 0.07
TOKENS, CODEBOOKS, DIM = 64, 4, 32
# (batch, K): the main case, then the sweep over K.
QUICK = {"main": (64, 8192), "sweep": [(16, 2048), (16, 32768)]}
FULL = {"main": (256, 8192), "sweep": [(256, 1024), (256, 4096), (256, 16384), (256, 32768)]}
# pass -> exponentials per logit in the fused kernels' forward: one at tau, two more for the
# regulariser's statistics.
EXPS_PER_LOGIT = {"fwd": 1, "fwd+stats": 3}
# H100/H200 SFU throughput: 16 exponentials per clock per SM (ex2.approx, quarter rate).
EXP_PER_CLOCK_PER_SM = 16


def _backends(device: torch.device, with_stats: bool, with_compile: bool) -> dict[str, Callable]:
    """label -> f(z, codebook) returning z_q, or (z_q, stats) `with_stats`."""
    def make(backend: str, **kwargs):
        return lambda z, c: soft_vq(z, c, TAU, return_stats=with_stats, backend=backend, **kwargs)

    fused = {"cpu": make("cpu")} if device.type == "cpu" else {"triton": make("triton"),
                                                                "triton-tf32": make("triton", allow_tf32=True)}
    labels = {"reference": make("reference"), **fused}
    if with_compile:
        labels["compile(reference)"] = torch.compile(make("reference"), fullgraph=True)
    return labels


def _pass(pass_name: str, fn: Callable, z: torch.Tensor, codebook: torch.Tensor) -> Callable:
    if pass_name != "fwd+bwd":
        def forward():
            with torch.no_grad():
                return fn(z, codebook)

        return forward

    def forward_backward():
        z_q, stats = fn(z, codebook)
        (z_q.float().square().mean() + stats.entropy_loss).backward()
        z.grad = codebook.grad = None

    return forward_backward


def _exp_limit_ms(device: torch.device, logits: int, exps_per_logit: int) -> float | None:
    """Time the GPU's SFUs need for the kernels' exponentials alone (SMs x 16 per clock x max SM
    clock from NVML), or None where that is unknown."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        clock_hz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM) * 1e6
    except Exception:  # no NVML: leave the column empty
        return None
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return logits * exps_per_logit / (sms * EXP_PER_CLOCK_PER_SM * clock_hz) * 1e3


def _measure(ctx, rows: list[dict], batch: int, K: int, passes: tuple[str, ...], with_compile: bool) -> None:
    """Appends the case's rows to `rows`, saving them after each pass (a run stopped by a time
    limit keeps what it finished)."""
    device = ctx.device
    generator = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(batch, TOKENS, DIM, device=device, generator=generator).requires_grad_()
    codebook = torch.randn(CODEBOOKS, K, DIM, device=device, generator=generator).div_(DIM**0.5).requires_grad_()
    rounds = 3 if ctx.quick else 7
    case = f"B{batch}x{TOKENS} C{CODEBOOKS} K{K} D{DIM} fp32"
    for pass_name in passes:
        fns = {label: _pass(pass_name, backend_fn, z, codebook)
               for label, backend_fn in _backends(device, pass_name != "fwd", with_compile).items()}
        checked = check_and_time(ctx, fns, f"{case} {pass_name}", rounds=rounds)  # warm-up: also compilation
        exps = EXPS_PER_LOGIT.get(pass_name)
        limit = _exp_limit_ms(device, batch * TOKENS * K, exps) if exps else None
        for label, result in checked.items():
            rows.append({
                "case": case,
                "pass": pass_name,
                "backend": label,
                "median_ms": result.median_ms,
                "peak_mib": result.peak_bytes / 2**20,
                "memory_vs_baseline": result.peak_bytes / max(checked["reference"].peak_bytes, 1),
                "x_exp_limit": result.median_ms / limit if limit else "",
            })
        ctx.progress(rows)


def run(ctx) -> list[dict]:
    sizes = QUICK if ctx.quick else FULL
    rows: list[dict] = []
    _measure(ctx, rows, *sizes["main"], passes=("fwd", "fwd+stats", "fwd+bwd"), with_compile=True)
    for batch, K in sizes["sweep"]:
        _measure(ctx, rows, batch, K, passes=("fwd+stats", "fwd+bwd"), with_compile=False)
    add_speedups(rows, ("case", "pass"), lambda row: row["backend"] == "reference")
    ctx.note(
        "peak_mib: peak memory allocated during the call above what was allocated before it; memory_vs_baseline: "
        "that over the reference row's. x_exp_limit: forward time / (the pass's exponentials per logit, 1 for fwd "
        "and 3 for fwd+stats, at 16 per clock per SM at the max SM clock)."
    )
    return rows


def plot(rows: list[dict], path: str) -> None:
    """Speed-up over reference per case and pass, one bar per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["case"], r["pass"]) for r in rows))
    labels = [b for b in dict.fromkeys(r["backend"] for r in rows) if b != "reference"]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups)), 4))
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        values = [next((r["speedup"] for r in rows if (r["case"], r["pass"]) == g and r["backend"] == label), 0)
                  for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=label)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(groups))],
                  [f"{c.split(' fp32')[0]}\n{p}" for c, p in groups], fontsize=7)
    ax.set_ylabel("speed-up over reference (plain PyTorch)")
    ax.set_title(TITLE, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
