"""SoftVQ-VAE tokenizer: encode and decode throughput and peak memory of random-weight presets,
our backends against plain PyTorch, with the relative difference of every output from the
`math` reference.

Rows (label -> attention, soft-VQ and linear backends):
  auto                    what users get: every op on "auto"
  auto, torch linear      (CPU) the same with torch's linear layers: the linear layers' share
  softvq attention        (GPU) our CUDA attention kernel, which auto leaves to be asked for
  plain PyTorch           SDPA attention, the reference soft VQ, torch's linear layers: what a
                          user of the authors' code runs
  plain PyTorch, flash_attn  (GPU) the same with flash_attn, where installed
The baseline of each case, precision and pass is the fastest "plain" row. `math` attention with
the reference soft VQ and torch's linear layers runs once, untimed: rel_err_vs_math is every
row's output difference from it. A row whose backend cannot run the inputs (a bf16-only kernel in
fp32, a package not installed) is left out with a note.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from bench.compare import add_speedups
from bench.measure import check_and_time, cpu_op_share_ms
from softvq_fast.models import SoftVQVAE

TITLE = "Tokenizer encode/decode (SoftVQ-VAE presets, random weights)"
BASELINE = ("plain PyTorch: the same model on SDPA attention (or flash_attn where installed, whichever is "
            "faster), the reference soft VQ and torch's linear layers, eager")

PLAIN = "plain PyTorch"
# label -> (attention, soft-VQ, linear backend)
QUICK_BACKENDS = {"auto": ("auto", "auto", "auto"), "auto, torch linear": ("auto", "auto", "torch"),
                  PLAIN: ("sdpa", "reference", "torch")}
FULL_BACKENDS = {"auto": ("auto", "auto", "auto"), "softvq attention": ("softvq", "auto", "auto"),
                 PLAIN: ("sdpa", "reference", "torch"), f"{PLAIN}, flash_attn": ("flash_attn", "reference", "torch")}
# Rows that differ from "auto" on the CPU only (on CUDA the linear layers' auto is torch).
CPU_ONLY_LABELS = frozenset({"auto, torch linear"})
MATH = ("math", "reference", "torch")  # the correctness reference, not timed

# (preset, batch)
QUICK = [("softvq-b-32", 2), ("softvq-s-32-512", 1)]
FULL = [("softvq-s-32", 16), ("softvq-b-32", 16), ("softvq-b-64", 16), ("softvq-bl-64", 16), ("softvq-l-64", 16),
        ("softvq-bl-64-512", 4), ("softvq-l-32-512", 4)]
# The linear layers (patch embedding, qkv, proj, MLP, projections, pixel head): the same matrix
# products on every backend set, through MKL (torch) or oneDNN; with the MLP's GELU, which oneDNN
# runs inside its matrix product and torch after it.
LINEAR_OPS = frozenset({"aten::addmm", "aten::mm", "mkldnn::_linear_pointwise", "aten::gelu", "aten::gelu_"})
PROFILED_RUNS = 2
# Alternating rounds: quick mode, sized for the CI budget, and full mode.
ROUNDS = {True: 3, False: 5}


def _use(model: SoftVQVAE, choice: tuple[str, str, str]) -> None:
    """Set a backend set, (attention, soft-VQ, linear)."""
    attention, soft_vq, linear = choice
    model.set_backends(attention=attention, soft_vq=soft_vq, linear=linear)


def _precision(dtype: torch.dtype | None) -> str:
    return "bf16 autocast" if dtype is not None else "fp32"


def _measure(ctx, model: SoftVQVAE, name: str, batch: int, precision: torch.dtype | None) -> list[dict]:
    """Rows for both passes and every backend set that runs. The backend sets are timed in
    alternation, one repeat each per round, so that load from other processes hits them alike."""
    device = ctx.device
    generator = torch.Generator(device=device).manual_seed(0)
    size = model.config.image_size
    images = torch.rand(batch, 3, size, size, device=device, generator=generator) * 2 - 1
    backends = {label: choice for label, choice in (QUICK_BACKENDS if ctx.quick else FULL_BACKENDS).items()
                if device.type == "cpu" or label not in CPU_ONLY_LABELS}

    def run_with(label: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        _use(model, backends[label])
        return fn()

    rows = []
    with torch.inference_mode():
        latents = model.encode(images)
        passes = {
            "encode": lambda: model.encode(images, autocast_dtype=precision),
            "decode": lambda: model.decode(latents, autocast_dtype=precision),
        }
        for pass_name, fn in passes.items():
            _use(model, MATH)
            reference = fn()
            checked = check_and_time(ctx, {label: partial(run_with, label, fn) for label in backends},
                                     f"{name} {pass_name} {_precision(precision)}", reference=reference,
                                     rounds=ROUNDS[ctx.quick])
            for label, result in checked.items():
                rows.append({
                    "case": f"{name} {size}px b{batch}",
                    "precision": _precision(precision),
                    "pass": pass_name,
                    "backend": label,
                    "median_ms": result.median_ms,
                    "min_ms": min(result.samples_ms),
                    "images_per_s": batch / result.median_ms * 1e3,
                    "peak_mib": result.peak_bytes / 2**20,
                    "rel_err_vs_math": result.rel_err,
                })
        if device.type == "cpu" and precision is None:
            _note_time_split(ctx, model, f"{name} {size}px b{batch}", images, backends)
    _use(model, backends["auto"])
    return rows


def _note_time_split(ctx, model: SoftVQVAE, case: str, images: torch.Tensor, backends: dict) -> None:
    """Where an encode+decode's time goes: the linear layers (matrix products and the MLP's GELU)
    against everything else (attention, soft VQ, norms, ...), on plain PyTorch and on auto, so
    that the gain splits into the linear layers' and the rest's. Profiled runs alternate between
    the two; of each, the run with the least total counts (a single run moves by tens of percent
    on a shared CPU)."""
    shares: dict[str, tuple[float, float]] = {}
    for _ in range(PROFILED_RUNS):
        for label in ("auto", PLAIN):
            _use(model, backends[label])
            split = cpu_op_share_ms(lambda: model.decode(model.encode(images)), LINEAR_OPS)
            if label not in shares or split[1] < shares[label][1]:
                shares[label] = split
    (auto_linear, auto_total), (plain_linear, plain_total) = shares["auto"], shares[PLAIN]
    ctx.note(f"{case}, fp32, profiled encode+decode (least of {PROFILED_RUNS} runs each): the linear layers "
             f"(matrix products, GELU) take {plain_linear:.0f} of {plain_total:.0f} ms on plain PyTorch "
             f"({plain_linear / plain_total:.0%}) and {auto_linear:.0f} of "
             f"{auto_total:.0f} ms on auto ({plain_linear / auto_linear:.2f}x faster); the other ops "
             f"{plain_total - plain_linear:.0f} vs {auto_total - auto_linear:.0f} ms "
             f"({(plain_total - plain_linear) / (auto_total - auto_linear):.2f}x)")


def _note_round_trip(ctx, rows: list[dict], case: str, precision: str) -> None:
    """auto against the baseline over encode + decode of one case and precision."""
    chosen = [r for r in rows if r["case"] == case and r["precision"] == precision]
    groups = {"auto": [r for r in chosen if r["backend"] == "auto"],
              "baseline": [r for r in chosen if r["baseline"] == "yes"]}
    if any(len(group) != 2 for group in groups.values()):  # a pass without either row
        return
    total = {(role, stat): sum(r[stat] for r in group) for role, group in groups.items() for stat in ("median_ms", "min_ms")}
    ctx.note(f"{case}, {precision} encode+decode, auto vs the baseline: median {total['auto', 'median_ms']:.0f} vs "
             f"{total['baseline', 'median_ms']:.0f} ms "
             f"({total['baseline', 'median_ms'] / total['auto', 'median_ms']:.2f}x), fastest "
             f"{total['auto', 'min_ms']:.0f} vs {total['baseline', 'min_ms']:.0f} ms "
             f"({total['baseline', 'min_ms'] / total['auto', 'min_ms']:.2f}x)")


def run(ctx) -> list[dict]:
    rows = []
    precisions = [None] if ctx.device.type == "cpu" else [None, torch.bfloat16]
    for name, batch in QUICK if ctx.quick else FULL:
        torch.manual_seed(0)
        with torch.device(ctx.device):
            model = SoftVQVAE.from_preset(name)
        for precision in precisions:
            rows += _measure(ctx, model, name, batch, precision)
            ctx.progress(rows)
        del model
    add_speedups(rows, ("case", "precision", "pass"), lambda row: row["backend"].startswith(PLAIN))
    for case, precision in dict.fromkeys((r["case"], r["precision"]) for r in rows):
        _note_round_trip(ctx, rows, case, precision)
    ctx.note(f"medians of {ROUNDS[ctx.quick]} alternating rounds; min_ms: the fastest of them. rel_err_vs_math: "
             "||out - ref|| / ||ref|| against math attention, the reference soft VQ and torch's linear layers "
             "at the row's precision (run once, untimed).")
    return rows
