"""Linear layers on the CPU: `softvq_fast.ops.linear`'s backends (oneDNN, torch) against torch's
F.linear and F.gelu called directly (the baseline: what nn.Linear and nn.GELU run), float32,
forward without autograd, at the layer shapes of the tokenizer and the generators: median time,
the error against float64 and which backend `auto` takes.

Shapes (rows M = batch x tokens), the same in quick and full mode: SoftVQ-B tokenizer at 256 px,
batch 2 (578 rows: 256 patches + class + 32 latents, twice); SiT-S/1 and SiT-XL/1 on 64 tokens,
batch 1 with CFG (128 rows), and their per-sample layers (2 rows: adaLN modulation, timestep MLP)
and 32-channel token embedder. The rows of a shape are timed in alternation over a few rounds
(median of the round medians). On CUDA there is nothing to compare (oneDNN is CPU-only; `auto`
is torch).
"""
from __future__ import annotations

import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from bench.compare import add_speedups, relative_error
from bench.measure import time_round_robin
from softvq_fast.dispatch import registered_ops
from softvq_fast.ops.linear import linear, select_backend

TITLE = "Linear layers (oneDNN vs torch/MKL, float32, CPU)"
BASELINE = "torch's F.linear (then F.gelu) called directly, as nn.Linear and nn.GELU run them"
GELU = {"gelu": "none", "gelu_tanh": "tanh"}  # activation -> F.gelu's approximate

# (case, rows, in_features, out_features, activation)
SHAPES = [
    ("softvq-b-32 qkv", 578, 768, 2304, "none"),
    ("softvq-b-32 proj", 578, 768, 768, "none"),
    ("softvq-b-32 fc1+gelu", 578, 768, 3072, "gelu"),
    ("softvq-b-32 fc2", 578, 3072, 768, "none"),
    ("SiT-S qkv", 128, 384, 1152, "none"),
    ("SiT-S fc1+gelu_tanh", 128, 384, 1536, "gelu_tanh"),
    ("SiT-S fc2", 128, 1536, 384, "none"),
    ("SiT-S adaLN", 2, 384, 2304, "none"),
    ("SiT-S t_embedder.mlp[0]", 2, 256, 384, "none"),
    ("SiT-S x_embedder", 128, 32, 384, "none"),
    ("SiT-XL qkv", 128, 1152, 3456, "none"),
    ("SiT-XL fc1+gelu_tanh", 128, 1152, 4608, "gelu_tanh"),
    ("SiT-XL fc2", 128, 4608, 1152, "none"),
    ("SiT-XL adaLN", 2, 1152, 6912, "none"),
    ("SiT-XL t_embedder.mlp[2]", 2, 1152, 1152, "none"),
]


def _plain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str) -> Callable[[], torch.Tensor]:
    if activation == "none":
        return lambda: F.linear(x, weight, bias)
    return lambda: F.gelu(F.linear(x, weight, bias), approximate=GELU[activation])


def run(ctx) -> list[dict]:
    if ctx.device.type != "cpu":
        ctx.note("oneDNN is CPU-only: on CUDA the linear layers run on torch (cuBLAS); nothing to compare.")
        return []
    rows = []
    rounds, repeats = (3, 10) if ctx.quick else (5, 20)
    backends = [b.name for b in registered_ops()["linear"].backends if b.unavailable_reason() is None]
    with torch.no_grad():
        for case, m, k, n, activation in SHAPES:
            x = torch.randn(m, k)
            weight, bias = torch.randn(n, k) / k**0.5, torch.randn(n)
            calls = {(name, "softvq_fast"): (lambda name=name: linear(x, weight, bias, activation=activation,
                                                                       backend=name))
                     for name in backends}
            calls["torch", "direct"] = _plain(x, weight, bias, activation)
            reference = _plain(x.double(), weight.double(), bias.double(), activation)()
            errors = {key: relative_error(call(), reference) for key, call in calls.items()}
            auto_backend = select_backend(x, weight, bias).name
            samples = time_round_robin(calls, ctx.device, rounds=rounds, repeats=repeats, warmup=3, max_seconds=0.5,
                                       uncounted_rounds=1)
            for (name, via), values in samples.items():
                median = statistics.median(values)
                rows.append({
                    "case": case, "M": m, "K": k, "N": n, "activation": activation, "backend": name, "via": via,
                    "median_ms": median,
                    "gflop_s": 2 * m * k * n / median / 1e6,
                    "rel_err": errors[name, via],
                    "auto": auto_backend,
                })
            ctx.progress(rows)
    add_speedups(rows, ("case",), lambda row: row["via"] == "direct")
    ctx.note(f"medians of {rounds} alternating rounds of up to {repeats} calls after an uncounted one; "
             "via softvq_fast: softvq_fast.ops.linear with the backend named; via direct: F.linear (and F.gelu) "
             "called directly; rel_err: ||out - ref|| / ||ref|| against F.linear (and F.gelu) in float64; 'auto' is "
             "the backend auto took.")
    return rows
