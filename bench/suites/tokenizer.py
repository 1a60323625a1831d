"""SoftVQ-VAE tokenizer: encode and decode throughput and peak memory of random-weight presets,
our backends ("auto": softvq attention and soft-VQ kernels where they run, oneDNN linear layers
where faster, and each attention backend on its own) against the same model on the `math`
attention, `reference` soft-VQ and `torch` linear backends, with the relative difference of their
outputs. On the CPU a row "auto, torch linear" separates the linear layers' share of the gain."""
from __future__ import annotations

import statistics
from functools import partial
from typing import Callable

import torch

from bench.measure import cpu_op_share_ms, peak_memory_bytes, time_round_robin
from softvq_fast.dispatch import NoBackendError
from softvq_fast.models import SoftVQVAE

TITLE = "Tokenizer encode/decode (SoftVQ-VAE presets, random weights)"

# label -> (attention, soft-VQ, linear backend). "auto" is what users get; each attention backend
# is also shown on its own (where it cannot run the inputs, e.g. a bf16-only kernel in fp32, the
# row is left out and a note says so); "math" is the baseline: math attention, reference soft VQ,
# torch's linear layers.
QUICK_BACKENDS = {"auto": ("auto", "auto", "auto"), "auto, torch linear": ("auto", "auto", "torch"),
                  "sdpa": ("sdpa", "auto", "auto"), "math": ("math", "reference", "torch")}
FULL_BACKENDS = {"auto": ("auto", "auto", "auto"), "auto, torch linear": ("auto", "auto", "torch"),
                 "softvq": ("softvq", "auto", "auto"), "flash_attn": ("flash_attn", "auto", "auto"),
                 "sdpa": ("sdpa", "auto", "auto"), "xformers": ("xformers", "auto", "auto"),
                 "math": ("math", "reference", "torch")}
# Rows that differ from "auto" on the CPU only (on CUDA the linear layers' auto is torch).
CPU_ONLY_LABELS = frozenset({"auto, torch linear"})

# (preset, batch); quick mode fits the 2-core CI CPU in well under two minutes.
QUICK = [("softvq-b-32", 2), ("softvq-s-32-512", 1)]
# full mode is sized for about 90 s on one H200
FULL = [("softvq-s-32", 16), ("softvq-b-32", 16), ("softvq-b-64", 16), ("softvq-bl-64", 16), ("softvq-l-64", 16),
        ("softvq-bl-64-512", 4), ("softvq-l-32-512", 4)]
# The linear layers (patch embedding, qkv, proj, MLP, projections, pixel head): the same matrix
# products on every backend set, through MKL (torch) or oneDNN; with the MLP's GELU, which oneDNN
# runs inside its matrix product and torch after it.
LINEAR_OPS = frozenset({"aten::addmm", "aten::mm", "mkldnn::_linear_pointwise", "aten::gelu", "aten::gelu_"})
PROFILED_RUNS = 3


def _use(model: SoftVQVAE, choice: tuple[str, str, str]) -> None:
    """Set a backend set, (attention, soft-VQ, linear)."""
    attention, soft_vq, linear = choice
    model.set_backends(attention=attention, soft_vq=soft_vq, linear=linear)


def _precision(dtype: torch.dtype | None) -> str:
    return "bf16 autocast" if dtype is not None else "fp32"


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    return float(torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64).clamp_min(1e-300))


def _measure(ctx, model: SoftVQVAE, name: str, batch: int, precision: torch.dtype | None) -> list[dict]:
    """Rows for both passes and every backend set that runs. The backends are timed in
    alternation, one repeat each per round, so that load from other processes hits them alike."""
    device = ctx.device
    generator = torch.Generator(device=device).manual_seed(0)
    size = model.config.image_size
    images = torch.rand(batch, 3, size, size, device=device, generator=generator) * 2 - 1
    rounds = 5
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
            outputs, peaks = {}, {}
            for label in backends:
                _use(model, backends[label])
                try:
                    outputs[label] = fn()  # also the warm-up
                except NoBackendError as exc:
                    ctx.note(f"{name} {pass_name} {_precision(precision)}: {label} left out ({str(exc).splitlines()[0]})")
                    continue
                peaks[label] = peak_memory_bytes(fn, device)
            samples = time_round_robin({label: partial(run_with, label, fn) for label in outputs}, device, rounds=rounds)
            medians = {label: statistics.median(values) for label, values in samples.items()}
            for label in outputs:
                rows.append({
                    "case": f"{name} {size}px b{batch}",
                    "precision": _precision(precision),
                    "pass": pass_name,
                    "backend": label,
                    "median_ms": medians[label],
                    "min_ms": min(samples[label]),
                    "images_per_s": batch / medians[label] * 1e3,
                    "peak_mib": peaks[label] / 2**20,
                    "speedup_vs_math": medians["math"] / medians[label],
                    "rel_err_vs_math": _relative_error(outputs[label], outputs["math"]),
                })
        if device.type == "cpu" and precision is None:
            _note_time_split(ctx, model, f"{name} {size}px b{batch}", images, backends)
    _use(model, backends["auto"])
    return rows


def _note_time_split(ctx, model: SoftVQVAE, case: str, images: torch.Tensor, backends: dict) -> None:
    """Where an encode+decode's time goes: the linear layers (matrix products and the MLP's GELU)
    against everything else (attention, soft VQ, norms, ...), on math/reference and on auto, so
    that the gain splits into the linear layers' and the rest's. Profiled runs alternate between
    the two; of each, the run with the least total counts (a single run moves by tens of percent
    on a shared CPU)."""
    shares: dict[str, tuple[float, float]] = {}
    for _ in range(PROFILED_RUNS):
        for label in ("auto", "math"):
            _use(model, backends[label])
            split = cpu_op_share_ms(lambda: model.decode(model.encode(images)), LINEAR_OPS)
            if label not in shares or split[1] < shares[label][1]:
                shares[label] = split
    (auto_linear, auto_total), (math_linear, math_total) = shares["auto"], shares["math"]
    ctx.note(f"{case}, fp32, profiled encode+decode (least of {PROFILED_RUNS} runs each): the linear layers "
             f"(matrix products, GELU) take {math_linear:.0f} of {math_total:.0f} ms on math/reference "
             f"({math_linear / math_total:.0%}) and {auto_linear:.0f} of "
             f"{auto_total:.0f} ms on auto ({math_linear / auto_linear:.2f}x faster); the other ops "
             f"{math_total - math_linear:.0f} vs {auto_total - auto_linear:.0f} ms "
             f"({(math_total - math_linear) / (auto_total - auto_linear):.2f}x)")


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
    for case in dict.fromkeys(r["case"] for r in rows if r["precision"] == "fp32"):
        fp32 = [r for r in rows if r["case"] == case and r["precision"] == "fp32"]
        total = {(label, stat): sum(r[stat] for r in fp32 if r["backend"] == label)
                 for label in ("auto", "math") for stat in ("median_ms", "min_ms")}
        ctx.note(f"{case}, fp32 encode+decode, auto vs math/reference: median {total['auto', 'median_ms']:.0f} vs "
                 f"{total['math', 'median_ms']:.0f} ms ({total['math', 'median_ms'] / total['auto', 'median_ms']:.2f}x), "
                 f"fastest {total['auto', 'min_ms']:.0f} vs {total['math', 'min_ms']:.0f} ms "
                 f"({total['math', 'min_ms'] / total['auto', 'min_ms']:.2f}x)")
    return rows
