"""One generator training iteration (SiT: flow-matching loss, backward, gradient clipping, AdamW,
EMA) in samples/s and peak memory: ours against the authors' step in plain PyTorch, side by side,
with the per-sample cost of SiT on SoftVQ's 1-D tokens against SiT on SD-VAE-shaped latents
(the paper's training claim: far cheaper iterations on 32/64 tokens than on 256).

Rows of a case (the same weights, inputs, times, noise and label drop on both):
  ours           softvq_fast's SiT with every op on `auto` (attention, LayerNorm-modulate, linear:
                 the backends named in a note), `flow_matching_loss`, the trainer's AdamW,
                 gradient clipping and foreach EMA (softvq_fast.training.loop.TrainingLoop)
  plain PyTorch  the baseline: the authors' SiT written in eager PyTorch (bench.plain_models:
                 SDPA attention, nn.Linear, LayerNorm then the modulation, tanh GELU), their loss,
                 the same AdamW and clipping, their per-parameter EMA update
Before timing, both compute the per-sample losses and the gradients of a few samples in float32;
NotTheSameFunction stops the suite when they differ beyond fp32 tolerance (loss_rel_err,
grad_rel_err: ours against the plain step).

Cost ratios: x_vs_sd_vae = the SD-VAE-shaped case's time per sample / the row's, per stack;
ideal_x the same ratio of training FLOPs per sample (torch's FLOP counter on one plain forward +
backward: matrix products and attention), eff = x_vs_sd_vae / ideal_x.
FLOP ceiling (bench.compare.add_flop_ceiling): ceiling_pct = the row's FLOPs per second as a
percentage of this machine's dense matrix-product rate (measured in the run, in the stacks'
precision); speedup_bound = the largest speed-up over the plain step that doing the same FLOPs
allows here. Where the plain step already runs near that rate, no exact kernel can gain more.

Quick mode (CPU, fp32): SiT-B/1 on 64 tokens of 32 channels at batch 16, and SiT-B/2 on 32x32x4
latents (256 tokens) at batch 4, the same 1024 token rows per matrix product (batch 16 would take
four times the quick mode's budget). Full mode (GPU, bf16 autocast): SiT-XL/1 on 32 and 64 tokens
of 32 channels at batch 256, SiT-XL/2 on 32x32x4 at the largest batch from 256 down that fits.
"""
from __future__ import annotations

import copy
import gc
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bench.compare import add_flop_ceiling, add_speedups, flop_ceiling_note
from bench.measure import check_and_time, dense_matmul_gflops
from bench.plain_models import PlainSiT, flow_matching_loss_plain, update_ema_plain
from bench.suites.claims import _register_flop_formulas, counted_flops
from bench.training_check import (
    GRAD_TOL, LOSS_TOL, check_same, clear_gradients, float32_convolutions, gradients, largest_fitting_batch,
    make_every_layer_count, training_dtype, training_precision,
)
from softvq_fast.models import SiT
from softvq_fast.training.generator import training_backends
from softvq_fast.training.loop import LoopSettings, TrainingLoop, start_runtime
from softvq_fast.training.objectives import flow_matching_loss, flow_matching_times, label_drop_mask

TITLE = "Generator training step (SiT: flow matching, backward, AdamW, EMA)"
BASELINE = ("plain PyTorch: the authors' SiT training step in eager PyTorch (SDPA attention, nn.Linear, LayerNorm "
            "+ modulation, their loss, the same AdamW and gradient clipping, their per-parameter EMA update)")
OURS, PLAIN = "ours", "plain PyTorch"
LR, BETAS, GRAD_CLIP, EMA_DECAY = 1e-4, (0.9, 0.999), 1.0, 0.9999
CHECK_SAMPLES = 4  # samples of the exactness check (the losses are per sample)


@dataclass(frozen=True)
class Case:
    preset: str  # e.g. "SiT-B/1"
    shape: dict[str, Any] = field(hash=False)  # the model's input arguments
    batch: int
    sd_vae: bool = False  # the SD-VAE-shaped case the cost ratios divide

    @property
    def name(self) -> str:
        size = self.shape["input_size"]
        inputs = (f"{size} x {self.shape['in_channels']} tokens" if self.shape.get("vae_1d")
                  else f"{size}x{size}x{self.shape['in_channels']} latents")
        return f"{self.preset} on {inputs}"


def _tokens(size: int, channels: int) -> dict[str, Any]:
    return {"input_size": size, "in_channels": channels, "vae_1d": True}


SD_VAE_LATENTS = {"input_size": 32, "in_channels": 4}
QUICK = [Case("SiT-B/1", _tokens(64, 32), 16), Case("SiT-B/2", SD_VAE_LATENTS, 4, sd_vae=True)]
FULL = [Case("SiT-XL/1", _tokens(32, 32), 256), Case("SiT-XL/1", _tokens(64, 32), 256),
        Case("SiT-XL/2", SD_VAE_LATENTS, 256, sd_vae=True)]
# Alternating rounds (time_round_robin's arguments): quick mode sized for the CI budget.
TIMING = {True: dict(rounds=3, repeats=1), False: dict(rounds=5, repeats=3, uncounted_rounds=1)}


@dataclass
class Inputs:
    """One batch and its draws: latents x, labels y, times t, noise, label drop."""

    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor

    @classmethod
    def draw(cls, model: SiT, batch: int, device: torch.device) -> "Inputs":
        generator = torch.Generator(device=device).manual_seed(batch)
        x = torch.randn(batch, *model.latent_shape, generator=generator, device=device)
        return cls(x, torch.randint(0, model.y_embedder.num_classes, (batch,), generator=generator, device=device),
                   flow_matching_times(batch, generator=generator), torch.randn_like(x),
                   label_drop_mask(batch, model.y_embedder.dropout_prob, generator=generator))

    def first(self, count: int) -> "Inputs":
        return Inputs(*(value[:count] for value in (self.x, self.y, self.t, self.noise, self.drop)))


def ours_loss(model, inputs: Inputs) -> torch.Tensor:
    return flow_matching_loss(model, inputs.x, inputs.y, t=inputs.t, noise=inputs.noise, label_drop=inputs.drop)


def plain_loss(model, inputs: Inputs) -> torch.Tensor:
    return flow_matching_loss_plain(model, inputs.x, inputs.y, inputs.t, inputs.noise, inputs.drop)


def ours_step(loop: TrainingLoop, model: SiT, inputs: Inputs) -> Callable[[], None]:
    """The trainer's iteration (softvq_fast.training.generator): loss under the loop's autocast,
    backward, clip, AdamW, EMA."""
    part = loop.add_part("generator", model, lr=LR, betas=BETAS)

    def loss(runner, batch, index: int) -> dict[str, torch.Tensor]:
        with loop.autocast():
            return {"loss": ours_loss(runner, inputs).float().mean()}

    def step() -> None:
        loop.accumulate(part, [None], loss)
        loop.update(part)

    return step


def plain_step(model: PlainSiT, inputs: Inputs, autocast: Callable[[], Any]) -> Callable[[], None]:
    """The authors' iteration: loss under autocast, backward, clip, AdamW, zero_grad, EMA."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=0.0)
    ema = copy.deepcopy(model).requires_grad_(False)

    def step() -> None:
        with autocast():
            loss = plain_loss(model, inputs).float().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema_plain(ema, model, EMA_DECAY)

    return step


def check_exactness(ours: SiT, plain: PlainSiT, inputs: Inputs, what: str) -> tuple[float, float]:
    """Per-sample float32 losses and gradients of both on the first CHECK_SAMPLES samples."""
    results = []
    for model, loss_fn in ((ours, ours_loss), (plain, plain_loss)):
        with float32_convolutions():
            losses = loss_fn(model, inputs.first(CHECK_SAMPLES))
            losses.sum().backward()
        results.append((losses.detach(), gradients(model)))
    clear_gradients(ours, plain)
    return check_same(what, results[0], results[1])


def training_flops_per_sample(plain: PlainSiT, inputs: Inputs) -> float:
    """FLOPs of one plain forward + backward on one sample (float32, torch's FLOP counter)."""
    register_training_flop_formulas()
    _, flops = counted_flops(lambda: plain_loss(plain, inputs.first(1)).sum().backward())
    clear_gradients(plain)
    return flops


def register_training_flop_formulas() -> None:
    """claims' formulas, and the backward of the CPU kernel SDPA dispatches to (torch counts it
    as 0 FLOPs)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count

    _register_flop_formulas()
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if op is not None and op not in flop_registry:
        def sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

        register_flop_formula(op)(sdpa_cpu_backward)


def measure_case(ctx, case: Case, batch: int) -> list[dict[str, Any]]:
    """Both stacks' rows for one case at `batch`."""
    device = ctx.device
    torch.manual_seed(0)
    with torch.device(device):
        model = SiT.from_preset(case.preset, **case.shape)
    make_every_layer_count(model, seed=1)
    model.train()
    plain = PlainSiT(model).train()
    inputs = Inputs.draw(model, batch, device)
    check = check_exactness(model, plain, inputs, f"{case.name}, batch {batch}")
    flops = training_flops_per_sample(plain, inputs)
    settings = LoopSettings(out=Path(ctx.out_dir) / "train-loop", steps=1, global_batch=batch,
                            precision=training_precision(device), grad_clip=GRAD_CLIP, ema_decay=EMA_DECAY,
                            progress=False)
    loop = TrainingLoop(settings, start_runtime(device), config={}, data_size=batch)
    backends = training_backends(model, batch, device, loop.autocast_dtype)
    ctx.note(f"{case.name}, batch {batch}: ours runs attention {backends['attention']}, LayerNorm-modulate "
             f"{backends['layernorm_modulate']}, linear {backends['linear']} (auto's choices for this step)")
    steps = {OURS: ours_step(loop, model, inputs), PLAIN: plain_step(plain, inputs, loop.autocast)}
    checked = check_and_time(ctx, steps, case.name, **TIMING[ctx.quick])
    tokens = model.num_tokens
    return [{"case": case.name, "tokens": tokens, "batch": batch, "precision": training_precision(device),
             "backend": stack, "median_ms": result.median_ms, "samples_per_s": batch / result.median_ms * 1e3,
             "peak_mib": result.peak_bytes / 2**20, "loss_rel_err": check[0], "grad_rel_err": check[1],
             "gflops_per_sample": flops / 1e9, "sd_vae": case.sd_vae}
            for stack, result in checked.items()]


def add_cost_ratios(rows: list[dict[str, Any]]) -> None:
    """x_vs_sd_vae, ideal_x and eff on every row (NaN without an SD-VAE-shaped case); drops the
    rows' sd_vae flag."""
    reference = {row["backend"]: row for row in rows if row["sd_vae"]}
    for row in rows:
        del row["sd_vae"]
        base = reference.get(row["backend"])
        if base is None:
            row.update(x_vs_sd_vae=math.nan, ideal_x=math.nan, eff=math.nan)
            continue
        measured = (base["median_ms"] / base["batch"]) / (row["median_ms"] / row["batch"])
        ideal = base["gflops_per_sample"] / row["gflops_per_sample"]
        row.update(x_vs_sd_vae=measured, ideal_x=ideal, eff=measured / ideal)


def run(ctx) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for case in QUICK if ctx.quick else FULL:
        rows += largest_fitting_batch(ctx, case.batch, lambda batch: measure_case(ctx, case, batch), case.name)
        ctx.progress(rows)
        gc.collect()  # the case's models, optimisers and EMA copies, before the next case's
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    add_cost_ratios(rows)
    add_speedups(rows, ("case",), lambda row: row["backend"] == PLAIN)
    dtype = training_dtype(ctx.device)
    rate = dense_matmul_gflops(ctx.device, dtype)
    add_flop_ceiling(rows, ("case",), lambda row: row["gflops_per_sample"] * row["batch"], rate)
    timing = TIMING[ctx.quick]
    ctx.note(f"Medians of {timing['rounds']} alternating rounds of {timing['repeats']} iteration(s) each"
             + (f" after {timing['uncounted_rounds']} uncounted round(s)" if timing.get("uncounted_rounds") else "")
             + ", after one warm-up iteration per stack (AdamW's state is created there). peak_mib: memory allocated "
             "during one iteration above what was allocated before it (weights, AdamW state, EMA excluded).")
    ctx.note(f"Exactness (loss_rel_err, grad_rel_err; limits {LOSS_TOL:.0e} and {GRAD_TOL:.0e}): per-sample "
             f"float32 losses and all gradients of the first {CHECK_SAMPLES} samples, ours "
             "against the plain step on the same weights (adaLN-Zero layers and biases redrawn so that every block "
             "counts); times t (lognormal), noise and the label drop (probability 0.1) are drawn once per case and "
             "given to both stacks.")
    ctx.note("Cost ratios: x_vs_sd_vae = time per sample of the SD-VAE-shaped case (same stack) / the row's; "
             "ideal_x = training FLOPs per sample of that case / the row's (torch's FLOP counter on one plain "
             "forward + backward in float32: matrix products and attention); eff = x_vs_sd_vae / ideal_x.")
    ctx.note(flop_ceiling_note(rate, dtype, "gflops_per_sample x batch"))
    if ctx.quick:
        ctx.note("Quick mode (CPU, fp32): the SD-VAE-shaped case runs at batch 4 instead of 16 to fit the CI budget "
                 "(the same 1024 token rows per matrix product as 64 tokens x 16); full mode (GPU, bf16 autocast) "
                 "runs SiT-XL/1 on 32 and 64 tokens at batch 256 and SiT-XL/2 on 32x32x4 at the largest batch "
                 "that fits.")
    return rows
