"""One tokenizer training iteration (SoftVQ-VAE: the paper's losses, backward, gradient clipping,
AdamW, EMA; then the discriminator's update once the adversarial terms are on) in images/s and
peak memory: ours against the same iteration in plain PyTorch the way the authors' code runs it,
side by side; and the soft quantiser's own share of the iteration.

Networks (random weights, built in memory: nothing is read or downloaded): the training tokenizer
of a preset (softvq_fast.training.tokenizer_model.training_config: 4 codebooks of 8192 x 32,
the alignment projector), LPIPS on a random VGG16 with random heads, the alignment DINOv2 of the
encoder's size at patch 16, the DINO ViT-S/16 discriminator with fresh heads.
Rows of a case (the same weights, images and random draws on every stack):
  ours           SoftVQVAE.training_forward (the fused soft-VQ op; attention and linear layers on
                 `auto`), the frozen DINOv2 and DINO trunks on `auto` too, softvq_fast's LPIPS
                 (the fused lpips_distance op), TokenizerTrainingStep's losses, the trainer's
                 AdamW, clipping and EMA (softvq_fast.training.loop)
  ours + activation checkpointing
                 (no GAN only) ours with SoftVQVAE.set_activation_checkpointing(True) on a copy of
                 the tokenizer: each ViT block's activations recomputed in the backward, the
                 memory/time trade of the trainer's --activation-checkpointing
  plain PyTorch  the baseline: every network copied into plain PyTorch (bench.plain_models.plain_copy:
                 SDPA attention, nn.Linear, Conv2d patch embeddings, LayerScale as a multiply, the
                 encoder's last block over every token, the soft quantiser's `reference` math with
                 its tokens x codes tensors), LPIPS as the `lpips` package computes it
                 (bench.plain_models.PlainLPIPS, the same VGG16 and heads), the same loss
                 arithmetic (TokenizerTrainingStep), the same AdamW and clipping, the authors'
                 per-parameter EMA update
  no GAN: the tokenizer update alone (adversarial weight 0: reconstruction, LPIPS, entropy,
  alignment); GAN: after the adversarial start, the generator term in the tokenizer update, then
  the discriminator's (hinge, LeCAM, consistency).
Before timing, every stack computes every loss term and the tokenizer's gradients on two images in
float32 (check_exactness); NotTheSameFunction stops the suite when one of ours differs from the
plain stack beyond tolerance.

Quantizer rows: soft_vq forward (with the statistics and the entropy regulariser) and backward
at the iteration's shapes, ours (`auto`: the fused kernels) against `reference` (the plain rows'
math), time and peak memory; the notes give its share of the iteration at the same batch.

FLOP ceiling (bench.compare.add_flop_ceiling; gflop: the plain iteration's or quantizer pass's
matrix products, convolutions and attention, torch's FLOP counter): ceiling_pct and speedup_bound,
as in the train suite.

Quick mode (CPU, fp32): ViT-S encoder and decoder, 256 px, 64 tokens, batch 4; the quantizer also
at the authors' per-GPU batch of 32. Full mode (GPU, bf16 autocast): ViT-B and ViT-L, batch 32.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bench.compare import add_flop_ceiling, add_speedups, flop_ceiling_note
from bench.measure import Checked, check_and_time, dense_matmul_gflops
from bench.plain_models import PlainLPIPS, plain_copy, update_ema_plain
from bench.suites.claims import counted_flops
from bench.suites.train import register_training_flop_formulas
from bench.training_check import (
    LOSS_TOL, check_same, clear_gradients, float32_convolutions, gradients, make_every_layer_count, training_dtype,
    training_precision,
)
from softvq_fast.models.config import vit_spec
from softvq_fast.ops.soft_vq import BACKENDS as SOFT_VQ, SoftVQInputs, soft_vq
from softvq_fast.training.discriminator import DEFAULT_TAPS, DinoDiscriminator, zero_key_bias
from softvq_fast.training.frozen import DinoViTS16, FrozenDINOv2, VGG16Features
from softvq_fast.training.loop import LoopSettings, TrainingLoop, start_runtime
from softvq_fast.training.loss_config import TokenizerLossConfig
from softvq_fast.training.lpips import LPIPS, VGG16_CHANNELS
from softvq_fast.training.tokenizer_model import tokenizer_for_training, training_config
from softvq_fast.training.tokenizer_step import StepDraws, TokenizerTrainingStep

TITLE = "Tokenizer training iteration (SoftVQ-VAE losses, backward, AdamW, EMA; discriminator update)"
BASELINE = ("plain PyTorch: the same iteration with every network in eager PyTorch the way the authors' code runs "
            "it (their soft-VQ math with its tokens x codes tensors, SDPA attention, nn.Linear), the same losses, "
            "AdamW and clipping, their per-parameter EMA update")
OURS, PLAIN, CHECKPOINTED = "ours", "plain PyTorch", "ours + activation checkpointing"
QUANTIZER_CASE = "quantizer alone"
# The authors' optimiser (the AdamW they configured) and EMA, for both networks.
LR, BETAS, WEIGHT_DECAY, GRAD_CLIP, EMA_DECAY = 1e-4, (0.9, 0.95), 1e-4, 1.0, 0.9999
# Tokenizer updates made before the timed iteration: past LPIPS's warm-up and the adversarial start.
STEP = 25_000
CHECK_IMAGES = 2
# The tokenizer's gradients pass the entropy regulariser's softmax at temperature 0.01, which
# scales the float32 rounding of the logits by 100: a looser bound than the SiT's.
TOKENIZER_GRAD_TOL = 1e-3
ENTROPY_WEIGHT = TokenizerLossConfig().entropy_weight
DISCRIMINATOR_TAPS = DEFAULT_TAPS  # the DINO trunk's blocks read out (it runs up to the last)

# (preset, batch): each runs without and with the GAN terms.
QUICK = [("softvq-s-64", 4)]
FULL = [("softvq-b-64", 32), ("softvq-l-64", 32)]
# Batches of the quantizer rows: the iterations' and the authors' per-GPU batch.
QUANTIZER_BATCHES = {True: (4, 32), False: (32,)}
# Alternating rounds (time_round_robin's arguments): quick mode sized for the CI budget, full mode
# for bench/gpu_check.sh's limit of the suite.
TIMING = {True: dict(rounds=3, repeats=1), False: dict(rounds=5, repeats=2, uncounted_rounds=1)}


@dataclass
class Networks:
    """One preset's networks: ours, and the frozen ones the losses read."""

    tokenizer: nn.Module
    lpips: LPIPS
    alignment: FrozenDINOv2
    discriminator: DinoDiscriminator


def build_networks(preset: str, device: torch.device) -> Networks:
    """Random weights, drawn on `device` (the tokenizer's and the alignment DINOv2's LayerScale
    gammas and zero biases redrawn: make_every_layer_count)."""
    config = dataclasses.replace(training_config(preset), enc_pretrained=False)
    generator = torch.Generator().manual_seed(2)
    heads = [torch.rand(1, c, 1, 1, generator=generator) for c in VGG16_CHANNELS]
    with torch.random.fork_rng(devices=[]), torch.device(device):
        tokenizer = tokenizer_for_training(config, seed=0)
        make_every_layer_count(tokenizer, seed=1)
        torch.manual_seed(3)
        lpips = LPIPS(VGG16Features(), heads)
        alignment = FrozenDINOv2(vit_spec(config.repa_model), config.image_size, config.repa_patch_size)
        make_every_layer_count(alignment, seed=4)
        dino = DinoViTS16(depth=max(DISCRIMINATOR_TAPS) + 1, gelu="tanh")
        zero_key_bias(dino)
        discriminator = DinoDiscriminator(dino.freeze(), DISCRIMINATOR_TAPS)
    return Networks(tokenizer.to(device), lpips.to(device), alignment.freeze(), discriminator.train())


@dataclass
class Stack:
    """One side of the comparison: its networks and the loss computation over them."""

    tokenizer: nn.Module
    discriminator: DinoDiscriminator | None
    losses: TokenizerTrainingStep


def _itself(network: nn.Module) -> nn.Module:
    return network


def _checkpointed_copy(tokenizer: nn.Module) -> nn.Module:
    checkpointed = copy.deepcopy(tokenizer)
    checkpointed.set_activation_checkpointing(True)
    return checkpointed


def stacks(networks: Networks, gan: bool, autocast_dtype: torch.dtype | None) -> dict[str, Stack]:
    """Ours and the plain copies, from the same current weights; without the GAN also ours on a
    copy of the tokenizer with activation checkpointing (the same frozen networks)."""
    config = TokenizerLossConfig() if gan else TokenizerLossConfig(adversarial_weight=0.0)
    made = {}
    sides = [(OURS, _itself, _itself, networks.lpips), (PLAIN, plain_copy, plain_copy, PlainLPIPS(networks.lpips))]
    if not gan:  # the tokenizer's activations are the same with the GAN terms: one case shows the trade
        sides.append((CHECKPOINTED, _checkpointed_copy, _itself, networks.lpips))
    for label, tokenizer_of, copy_of, lpips in sides:
        tokenizer, alignment = tokenizer_of(networks.tokenizer), copy_of(networks.alignment)
        discriminator = copy_of(networks.discriminator) if gan else None
        step = TokenizerTrainingStep(tokenizer, config, lpips=lpips, alignment=alignment,
                                     discriminator=discriminator, autocast_dtype=autocast_dtype)
        made[label] = Stack(tokenizer, discriminator, step)
    return made


def _draws(device: torch.device, call: int) -> StepDraws:
    return StepDraws.seeded(0, STEP, 0, call, device=device)


def check_exactness(made: dict[str, Stack], images: torch.Tensor, what: str) -> dict[str, tuple[float, float]]:
    """Every loss term and the tokenizer's gradients of each stack on the first CHECK_IMAGES
    images in float32, from equal states and draws: (loss, gradient) rel_err of each of ours
    against the plain stack (the plain row takes ours'). The check runs as the iteration just before
    the adversarial start: the discriminator's forwards and terms all run, but without gradient,
    so the gradients compared are those of the other terms. (Gradients through the
    discriminator pass its hinge and LeakyReLU kinks, where float32 rounding alone flips units.)"""
    results = {}
    for label, stack in made.items():
        losses = copy.copy(stack.losses)  # the same networks and LeCAM state, without autocast
        losses.autocast_dtype = None
        losses.config = dataclasses.replace(losses.config, adversarial_start_step=STEP + 2)
        with float32_convolutions():
            tokenizer_losses = losses.tokenizer_losses(images[:CHECK_IMAGES], STEP, _draws(images.device, 0))
            tokenizer_losses.loss.backward()
            terms = list(tokenizer_losses.terms.values())
            if stack.discriminator is not None:
                disc = losses.discriminator_losses(images[:CHECK_IMAGES], tokenizer_losses.reconstructions, STEP,
                                                   _draws(images.device, 1))
                terms += list(disc.terms.values())
        results[label] = (torch.stack([term.float() for term in terms]), gradients(stack.tokenizer))
        clear_gradients(stack.tokenizer)
    errors = {label: check_same(what if label == OURS else f"{what}, {label}", result, results[PLAIN],
                                grad_tol=TOKENIZER_GRAD_TOL)
              for label, result in results.items() if label != PLAIN}
    return {**errors, PLAIN: errors[OURS]}


def ours_iteration(loop: TrainingLoop, stack: Stack, images: torch.Tensor) -> Callable[[], None]:
    """The trainer's iteration: the tokenizer's losses, backward, the loop's update (clip, AdamW,
    EMA); with a discriminator, then its losses on that forward's reconstructions and its update."""
    parts = {"tokenizer": loop.add_part("tokenizer", stack.tokenizer, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)}
    if stack.discriminator is not None:
        parts["discriminator"] = loop.add_part("discriminator", stack.discriminator, lr=LR, betas=BETAS,
                                               weight_decay=WEIGHT_DECAY, ema=False)

    def iteration() -> None:
        losses = stack.losses.tokenizer_losses(images, STEP, _draws(images.device, 0))
        losses.loss.backward()
        loop.update(parts["tokenizer"])
        if stack.discriminator is not None:
            disc = stack.losses.discriminator_losses(images, losses.reconstructions, STEP, _draws(images.device, 1))
            disc.loss.backward()
            loop.update(parts["discriminator"])

    return iteration


def _plain_update(module: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def plain_iteration(stack: Stack, images: torch.Tensor) -> Callable[[], None]:
    """The authors' iteration: the same losses; backward, clip, AdamW, zero_grad per network; the
    tokenizer's EMA parameter by parameter."""
    def adamw(module: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=LR, betas=BETAS,
                                 weight_decay=WEIGHT_DECAY)

    optimizer, ema = adamw(stack.tokenizer), copy.deepcopy(stack.tokenizer).requires_grad_(False)
    disc_optimizer = adamw(stack.discriminator) if stack.discriminator is not None else None

    def iteration() -> None:
        losses = stack.losses.tokenizer_losses(images, STEP, _draws(images.device, 0))
        _plain_update(stack.tokenizer, optimizer, losses.loss)
        update_ema_plain(ema, stack.tokenizer, EMA_DECAY)
        if disc_optimizer is not None:
            disc = stack.losses.discriminator_losses(images, losses.reconstructions, STEP, _draws(images.device, 1))
            _plain_update(stack.discriminator, disc_optimizer, disc.loss)

    return iteration


def _row(case: str, batch: int, precision: str, stack: str, result: Checked, errors: tuple[float, float],
         gflop: float) -> dict:
    return {"case": case, "batch": batch, "precision": precision, "backend": stack, "median_ms": result.median_ms,
            "images_per_s": batch / result.median_ms * 1e3, "peak_mib": result.peak_bytes / 2**20,
            "loss_rel_err": errors[0], "grad_rel_err": errors[1], "gflop": gflop}


def plain_gflop(step: Callable[[], Any]) -> float:
    """GFLOP of one call of a plain step (torch's FLOP counter: matrix products, convolutions,
    attention)."""
    register_training_flop_formulas()
    return counted_flops(step)[1] / 1e9


def measure_iteration(ctx, networks: Networks, preset: str, batch: int, gan: bool) -> list[dict[str, Any]]:
    device = ctx.device
    case = f"{preset} {networks.tokenizer.config.image_size} px, {'GAN' if gan else 'no GAN'}"
    settings = LoopSettings(out=Path(ctx.out_dir) / "tokenizer-train-loop", steps=1, global_batch=batch,
                            precision=training_precision(device), grad_clip=GRAD_CLIP, ema_decay=EMA_DECAY,
                            progress=False)
    runtime = start_runtime(device)
    loop = TrainingLoop(settings, runtime, config={}, data_size=batch)
    made = stacks(networks, gan, loop.autocast_dtype)
    size = networks.tokenizer.config.image_size
    images = torch.rand(batch, 3, size, size, generator=torch.Generator(device=device).manual_seed(batch),
                        device=device) * 2 - 1
    errors = check_exactness(made, images, f"{case}, batch {batch}")
    iterations = {OURS: ours_iteration(loop, made[OURS], images), PLAIN: plain_iteration(made[PLAIN], images)}
    if CHECKPOINTED in made:  # a loop of its own: a loop holds one part of each name
        own_loop = TrainingLoop(settings, runtime, config={}, data_size=batch)
        iterations[CHECKPOINTED] = ours_iteration(own_loop, made[CHECKPOINTED], images)
    gflop = plain_gflop(iterations[PLAIN])
    checked = check_and_time(ctx, iterations, case, **TIMING[ctx.quick])
    return [_row(case, batch, training_precision(device), stack, result, errors[stack], gflop)
            for stack, result in checked.items()]


def quantizer_pass(z: torch.Tensor, codebook: torch.Tensor, grad: torch.Tensor, tau: float, l2_norm: bool,
                   backend: str) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """soft_vq as the training forward calls it, then the backward of (z_q . grad + entropy weight x
    regulariser); returns ((sum of z_q . grad, regulariser), the gradients of z and the codebook)."""
    z, codebook = z.detach().requires_grad_(), codebook.detach().requires_grad_()

    def forward_backward() -> tuple[torch.Tensor, torch.Tensor]:
        z_q, stats = soft_vq(z, codebook, tau, l2_norm=l2_norm, return_stats=True, backend=backend)
        value = (z_q * grad).sum()
        (value + ENTROPY_WEIGHT * stats.entropy_loss).backward()
        grads = torch.cat([z.grad.flatten(), codebook.grad.flatten()])
        z.grad = codebook.grad = None
        return torch.stack([value.detach(), stats.entropy_loss.detach()]), grads

    return forward_backward


def measure_quantizer(ctx, tokenizer: nn.Module, batch: int) -> list[dict[str, Any]]:
    config, quantizer = tokenizer.config, tokenizer.quantize
    generator = torch.Generator(device=ctx.device).manual_seed(batch)
    shape = (batch, config.num_latent_tokens, config.codebook_embed_dim)
    z = torch.randn(shape, generator=generator, device=ctx.device)
    grad = torch.randn(shape, generator=generator, device=ctx.device)
    codebook = quantizer.embedding.detach().float()
    passes = {stack: quantizer_pass(z, codebook, grad, quantizer.tau, quantizer.l2_norm, backend)
              for stack, backend in ((OURS, "auto"), (PLAIN, "reference"))}
    case = (f"{QUANTIZER_CASE}: soft VQ fwd+bwd, {config.num_latent_tokens} tokens, {config.num_codebooks} x "
            f"{config.codebook_size} x {config.codebook_embed_dim} codes")
    errors = check_same(f"{case}, batch {batch}", passes[OURS](), passes[PLAIN]())
    chosen = SOFT_VQ.select(SoftVQInputs(ctx.device, torch.float32, True, config.codebook_embed_dim)).name
    ctx.note(f"{case}, batch {batch}: ours runs soft_vq's {chosen} backend (auto's choice), the plain rows its "
             "reference backend.")
    gflop = plain_gflop(passes[PLAIN])
    checked = check_and_time(ctx, passes, case, **TIMING[ctx.quick])
    return [_row(case, batch, "fp32", stack, result, errors, gflop) for stack, result in checked.items()]


def share_notes(ctx, rows: list[dict[str, Any]]) -> None:
    """The quantizer's time and peak memory as fractions of each iteration at the same batch."""
    quantizer = {(r["batch"], r["backend"]): r for r in rows if r["case"].startswith(QUANTIZER_CASE)}
    for row in rows:
        q = quantizer.get((row["batch"], row["backend"]))
        if q is None or row["case"].startswith(QUANTIZER_CASE):
            continue
        ctx.note(f"Quantizer share, {row['case']}, batch {row['batch']}, {row['backend']}: {q['median_ms']:.0f} of "
                 f"{row['median_ms']:.0f} ms ({q['median_ms'] / row['median_ms']:.1%}), peak {q['peak_mib']:.0f} of "
                 f"{row['peak_mib']:.0f} MiB ({q['peak_mib'] / row['peak_mib']:.1%}).")


def checkpointing_notes(ctx, rows: list[dict[str, Any]]) -> None:
    """Activation checkpointing's trade in each case: its peak memory and time against ours'."""
    ours = {(r["case"], r["batch"]): r for r in rows if r["backend"] == OURS}
    for row in rows:
        if row["backend"] == CHECKPOINTED:
            base = ours[(row["case"], row["batch"])]
            ctx.note(f"Activation checkpointing, {row['case']}, batch {row['batch']}: peak {row['peak_mib']:.0f} "
                     f"of ours' {base['peak_mib']:.0f} MiB ({row['peak_mib'] / base['peak_mib']:.1%}), "
                     f"{row['median_ms'] / base['median_ms']:.2f}x ours' time.")


def run(ctx) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for index, (preset, batch) in enumerate(QUICK if ctx.quick else FULL):
        networks = build_networks(preset, ctx.device)
        if index == 0:  # the codebooks are the same for every preset: first, as they are quick
            for quantizer_batch in QUANTIZER_BATCHES[ctx.quick]:
                rows += measure_quantizer(ctx, networks.tokenizer, quantizer_batch)
        for gan in (False, True):
            rows += measure_iteration(ctx, networks, preset, batch, gan)
            ctx.progress(rows)
            gc.collect()  # the case's plain copies, optimisers and EMA copies, before the next case's
        del networks
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    add_speedups(rows, ("case", "batch"), lambda row: row["backend"] == PLAIN)
    dtype = training_dtype(ctx.device)
    rate = dense_matmul_gflops(ctx.device, dtype)
    add_flop_ceiling(rows, ("case", "batch"), lambda row: row["gflop"], rate)
    share_notes(ctx, rows)
    checkpointing_notes(ctx, rows)
    timing = TIMING[ctx.quick]
    ctx.note(f"Medians of {timing['rounds']} alternating rounds of {timing['repeats']} iteration(s) each"
             + (f" after {timing['uncounted_rounds']} uncounted round(s)" if timing.get("uncounted_rounds") else "")
             + ", after one warm-up iteration per stack. peak_mib: memory allocated during one iteration above what "
             "was allocated before it (weights, optimiser state, EMA excluded). The quantizer's share divides its "
             "rows by the iteration's at the same batch; its peak is its own, in isolation.")
    ctx.note(f"Exactness (loss_rel_err, grad_rel_err; limits {LOSS_TOL:.0e} and {TOKENIZER_GRAD_TOL:.0e}): every "
             f"loss term and the tokenizer's gradients on the first {CHECK_IMAGES} images of the batch in float32, "
             "ours against the plain stack on the same weights (LayerScale gammas and zero-initialised biases redrawn "
             "so that every block counts) with the same random draws (DiffAugment, crops), computed as the "
             "iteration before the adversarial start (the discriminator's forwards run without gradient), and for "
             "the quantizer rows its outputs and gradients.")
    ctx.note("The stacks share the frozen VGG16's weights and torch's convolutions (LPIPS's own arithmetic differs: "
             "softvq_fast's fused lpips_distance against the lpips package's eager one) and the loss arithmetic "
             "(TokenizerTrainingStep); the generator term's discriminator forward runs with the heads' gradients off on "
             "both (the authors' code also computes, then discards, those heads' gradients).")
    ctx.note(f"{CHECKPOINTED} (no-GAN cases): ours with every ViT block of the tokenizer recomputed in the "
             "backward (softvq_fast.models.vit.Block.checkpoint_activations, the trainer's "
             "--activation-checkpointing), timed in the same alternating rounds; its exactness is its own against the "
             "plain stack, its gflop the plain iteration's (the recomputation is not counted). The tokenizer keeps "
             "the same activations with the GAN terms on (the discriminator's come on top), so the GAN cases have no "
             "such row.")
    if ctx.quick:
        ctx.note("Quick mode (CPU, fp32): ViT-S encoder and decoder at batch 4; the authors' per-GPU batch of 32 "
                 "appears in the quantizer rows alone, its share of an iteration at that batch is full mode's. Full "
                 "mode (GPU, bf16 autocast): ViT-B and ViT-L at batch 32.")
    ctx.note(flop_ceiling_note(rate, dtype, "gflop: one plain iteration's, or the plain quantizer pass's"))
    if ctx.device.type == "cpu":
        ctx.note("On the CPU the iterations' times depend on the C library's allocator: with glibc's defaults in a "
                 "fresh process (as here), temporaries of tens of MB go back to the system when freed and come back "
                 "as fresh pages in the next iteration, a cost that grows with what a stack allocates (peak_mib); an "
                 "allocator that keeps freed memory (tcmalloc, jemalloc, or glibc with MALLOC_MMAP_THRESHOLD_ set "
                 "high) makes both stacks faster and the speed-up smaller.")
    return rows
