"""The paper's throughput claims, measured side by side: SiT on SoftVQ's 32/64 tokens against
SiT on SD-VAE latents ("up to 18x faster at 256 px and 55x at 512 px").

Systems at each resolution R (the same generator implementation, sampler, steps, batch,
precision and guidance on every side, so that the ratios measure the token counts):
  (a)  SD-VAE f8 (diffusers AutoencoderKL, SD config, 4 channels, random weights) + SiT/2 on its
       latents: (R/16)^2 tokens, the common setup
  (b)  the same SD-VAE + SiT/1: (R/8)^2 tokens, the counts the paper's tables list for SD-VAE
  ours SoftVQ tokenizer preset + SiT/1 on its 32 or 64 1-D tokens
Per system: the median time of one sampling step (one generator evaluation; with CFG a batch of
2B) and of one decode, both measured; images/s for `steps` steps are composed from them:
generator-only = B / (steps x step), end-to-end = B / (steps x step + decode). Next to every
measured ratio stands the ideal one from counted FLOPs (generator: linear layers and attention,
counted analytically; decoder: torch's FLOP counter on one decode, convolutions included), and
measured/ideal. Every timed call follows one untimed call of the same workload (a sampling loop
runs its step back to back; in turns a short call after a long one would find its weights
evicted). A composition check runs every system for real (check_steps Euler steps with CFG, then
the decode) and flags a gap above 5% from the composed time.

On a GPU, NVML telemetry reads energy over bursts of back-to-back calls of each workload lasting
at least MIN_ENERGY_SPAN_S, divided by the calls (images per joule), and samples power, clock,
utilisation and memory during them. The kernels' own gain is reported beside the table: one
sampling step on plain eager PyTorch against ours, each with and without a CUDA graph (a plain
torch feature that users can take without us).

Each resolution has its own time budget: the timed repeats, then the batch, are reduced to fit
(each with a note), never a row. $SOFTVQ_FAST_SD_VAE may name a local diffusers AutoencoderKL
folder (e.g. sd-vae-ft-ema) to use instead of random weights; nothing is downloaded.

Full mode (GPU): SiT-XL, bf16, SoftVQ-L tokenizers, 256 and 512 px: the paper's setting, with
its claim beside the rows (paper_x). Quick mode (CPU): SiT-S, float32, SoftVQ-S tokenizers, the
full SD-VAE, 256 px, batch 1: CPU ratios of a smaller generator, not the paper's setting.
"""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch

from bench.measure import Timing, synchronize
from softvq_fast.dispatch import NoBackendError
from softvq_fast.telemetry import MIN_ENERGY_SPAN_S

TITLE = "Paper claims: SiT throughput on SoftVQ 1-D tokens vs SD-VAE latents"
BASELINE = ("systems (a) SD-VAE + SiT/2 and (b) SD-VAE + SiT/1, on the same generator implementation, "
            "sampler, steps, batch, precision and guidance; *_x_a, *_x_b = their time / the row's")
PAPER_CLAIMS = {(256, 32): 18.0, (512, 64): 55.0}
SD_VAE_SCALE = 0.18215
SD_VAE_ENV = "SOFTVQ_FAST_SD_VAE"
CFG_SCALE = 1.5
CHECK_GAP = 0.05  # composition checks further than this from the composed time are flagged
# Bursts are sized from the median call time with this margin, so that back-to-back calls (a
# little faster than synchronised ones) still fill MIN_ENERGY_SPAN_S.
BURST_MARGIN = 1.25


@dataclass
class Setup:
    """Everything that differs between full, quick and test sizes."""

    label: str
    dtype: torch.dtype
    generator: tuple[int, int, int]  # depth, hidden, heads
    generator_name: str
    resolutions: tuple[int, ...]
    batch: dict[int, int]
    sd_vae_channels: tuple[int, ...]
    sd_vae_groups: int
    # resolution -> [(name, factory() -> tokenizer)]
    tokenizers: dict[int, list[tuple[str, Callable[[], Any]]]]
    # resolution -> seconds it may take in all (building, warm-up, timing, energy, checks)
    budget_s: dict[int, float] = field(default_factory=dict)
    steps: int = 250
    warmup: int = 1
    repeats: int = 3
    check_steps: int = 10
    stack_batches: tuple[int, ...] = (1,)
    paper: bool = False  # the paper's setting: rows carry its claim (paper_x)
    notes: list[str] = field(default_factory=list)


def _preset_factory(name: str) -> Callable[[], Any]:
    def build():
        from softvq_fast.models import SoftVQVAE

        return SoftVQVAE.from_preset(name)

    return build


def _tokenizer_presets(size: str) -> dict[int, list[tuple[str, Callable[[], Any]]]]:
    """The 32- and 64-token presets of one size ("s", "l", ...) at 256 and 512 px."""
    return {
        px: [
            (f"SoftVQ-{size.upper()}-{tokens}", _preset_factory(f"softvq-{size}-{tokens}" + ("" if px == 256 else f"-{px}")))
            for tokens in (32, 64)
        ]
        for px in (256, 512)
    }


def full_setup() -> Setup:
    return Setup(
        label="GPU full",
        dtype=torch.bfloat16,
        generator=(28, 1152, 16),
        generator_name="SiT-XL",
        resolutions=(256, 512),
        batch={256: 256, 512: 32},
        sd_vae_channels=(128, 256, 512, 512),
        sd_vae_groups=32,
        tokenizers=_tokenizer_presets("l"),
        # bench/gpu_check.sh's limit for the suite holds both and the sampling-step comparison.
        budget_s={256: 70.0, 512: 70.0},
        warmup=2,  # the first call of a step captures its CUDA graph: the second is the estimate
        stack_batches=(8, 256),
        paper=True,
    )


def quick_setup() -> Setup:
    return Setup(
        label="CPU quick (reduced models)",
        dtype=torch.float32,
        generator=(12, 384, 6),
        generator_name="SiT-S",
        resolutions=(256,),
        batch={256: 1},
        sd_vae_channels=(128, 256, 512, 512),
        sd_vae_groups=32,
        tokenizers=_tokenizer_presets("s"),
        budget_s={256: 120.0},
        notes=[
            "CPU quick mode: SiT-S instead of SiT-XL, SoftVQ-S tokenizers, the full SD-VAE, float32, batch 1, "
            "256 px only (512 px, where the SD-VAE decode and SiT/1 on 4096 tokens dominate, does not fit the "
            "quick mode's CI budget on a small CPU). These are CPU ratios of a smaller generator, not the "
            "paper's SiT-XL setting; run on a GPU (full mode) for that."
        ],
    )


# ----------------------------------------------------------------------------------- FLOPs
def generator_flops(depth: int, hidden: int, tokens: int, in_channels: int, patch: int, mlp_ratio: float = 4.0) -> float:
    """FLOPs (2 per multiply-add) of one SiT forward on one sample: linear layers and attention."""
    per_block = 2 * tokens * (4 + 2 * mlp_ratio) * hidden**2 + 4 * tokens**2 * hidden + 2 * hidden * 6 * hidden
    embed = 2 * tokens * in_channels * patch**2 * hidden + 2 * (256 * hidden + hidden**2)
    final = 2 * hidden * 2 * hidden + 2 * tokens * hidden * patch**2 * in_channels
    return depth * per_block + embed + final


def _register_flop_formulas() -> None:
    """Let torch's FLOP counter see the ops it misses: attention, 4 B H Sq Sk D, softvq_fast's and
    the CPU kernel SDPA dispatches to (aten._scaled_dot_product_flash_attention_for_cpu, which
    torch counts as 0 FLOPs: the decoders' attention would drop out of the ideal ratios), and
    softvq_fast's oneDNN linear layers, 2 x rows x in x out."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    def ours(q_shape, k_shape, *args, **kwargs) -> int:
        batch, q_len, heads, head_dim = q_shape
        return 4 * batch * heads * q_len * k_shape[1] * head_dim

    def sdpa_cpu(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
        return sdpa_flop_count(q_shape, k_shape, v_shape)

    def linear(x_shape, weight_shape, *args, **kwargs) -> int:
        return 2 * math.prod(x_shape) * weight_shape[0]

    formulas = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = sdpa_cpu
    if hasattr(torch.ops.softvq_fast, "attention_fwd"):
        formulas[torch.ops.softvq_fast.attention_fwd] = ours
    if hasattr(torch.ops.softvq_fast, "linear_onednn"):
        formulas[torch.ops.softvq_fast.linear_onednn] = linear
    for op, formula in formulas.items():
        if op not in flop_registry:  # once per process
            register_flop_formula(op)(formula)


def counted_flops(fn: Callable[[], Any]) -> tuple[Any, float]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, float(counter.get_total_flops())


# ------------------------------------------------------------------------------- measuring
@dataclass
class Measured:
    timing: Timing
    telemetry: dict[str, Any]
    energy_per_call_j: float | None


def _time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one synchronised call."""
    synchronize(device)
    began = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - began) * 1e3


def warm_up(fns: dict[Hashable, Callable[[], Any]], device: torch.device, calls: int) -> dict[Hashable, float]:
    """Runs each workload `calls` times (at least once: compilation, CUDA-graph capture, cuDNN's
    choices); returns the milliseconds of each one's last call, the estimate plans start from."""
    estimates = {}
    for key, fn in fns.items():
        for _ in range(max(calls, 1)):
            estimates[key] = _time_call(fn, device)
    return estimates


def round_robin(fns: dict[Hashable, Callable[[], Any]], device: torch.device, repeats: int) -> dict[Hashable, Timing]:
    """Times the workloads in turns, `repeats` rounds, so that load or clock drift (a shared CPU,
    a warming GPU) hits all of them alike; every timed call follows one untimed call of the same
    workload (see the module docstring). Median per workload."""
    samples: dict[Hashable, list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            fn()
            samples[key].append(_time_call(fn, device))
    return {key: Timing.of(values) for key, values in samples.items()}


def energy_bursts(
    fns: dict[Hashable, Callable[[], Any]], device: torch.device, call_ms: dict[Hashable, float],
    min_span_s: float = MIN_ENERGY_SPAN_S,
) -> dict[Hashable, dict[str, Any]]:
    """Per workload, NVML telemetry over one burst of back-to-back calls lasting at least
    `min_span_s` (sized from `call_ms` with BURST_MARGIN): energy_per_call_j is the burst's energy
    over its calls. Without a GPU or NVML, each summary says why it is empty."""
    from softvq_fast.telemetry import GpuTelemetry

    with GpuTelemetry(device) as telemetry:
        if telemetry.unavailable is None:
            for key, fn in fns.items():
                calls = burst_calls(call_ms[key], min_span_s)
                with telemetry.span(str(key)) as span:
                    for _ in range(calls):
                        fn()
                    span.calls = calls
    return {key: telemetry.summary(str(key)) for key in fns}


def burst_calls(call_ms: float, min_span_s: float) -> int:
    """Calls of `call_ms` each that fill `min_span_s` with BURST_MARGIN to spare."""
    return max(1, math.ceil(BURST_MARGIN * min_span_s * 1e3 / max(call_ms, 1e-6)))


def plan_repeats(call_ms: dict[Hashable, float], left_s: float, other_s: float, most: int) -> int:
    """Timed rounds that fit `left_s` seconds beside `other_s` of other planned work: each round
    runs every workload twice (one untimed call, one timed). Between 1 and `most`."""
    per_round_s = 2 * sum(call_ms.values()) / 1e3
    if per_round_s <= 0:
        return most
    return max(1, min(most, math.floor((left_s - other_s) / per_round_s)))


def choose_batch(batch: int, budget_s: float, predict_s: Callable[[int], float]) -> int:
    """The largest of batch, batch/2, batch/4, ... (at least 1) whose predicted seconds fit."""
    while batch > 1 and predict_s(batch) > budget_s:
        batch //= 2
    return batch


def _sd_vae(setup: Setup, resolution: int, device: torch.device):
    """The SD f8 VAE: from the local diffusers folder in $SOFTVQ_FAST_SD_VAE if set (never
    downloaded), else built from the SD config (channels from the setup) with random weights."""
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    local = os.environ.get(SD_VAE_ENV)
    if local:
        return AutoencoderKL.from_pretrained(local, local_files_only=True, torch_dtype=setup.dtype).to(device).eval()
    diffusers_logging.set_verbosity_error()  # its advice on casting applies to pretrained weights
    with torch.device(device):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(setup.sd_vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(setup.sd_vae_channels),
            block_out_channels=setup.sd_vae_channels,
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=setup.sd_vae_groups,
            sample_size=resolution,
        )
    return vae.to(setup.dtype).eval()


def _generator(setup: Setup, device: torch.device, **shape):
    from softvq_fast.models import SiT

    depth, hidden, heads = setup.generator
    with torch.device(device):
        model = SiT(depth=depth, hidden_size=hidden, num_heads=heads, num_classes=1000, **shape)
    return model.to(setup.dtype).eval()


@dataclass
class System:
    key: str  # "a", "b" or the tokenizer name
    name: str
    tokens: int
    generator_flops: float  # per sample and forward
    decode_flops: float  # per image
    step: dict[bool, Measured]  # keyed by CFG on/off
    decode: Measured
    batch: int
    check_ms: float | None = None  # a real check_steps-step run with CFG + decode


@dataclass
class Built:
    """One resolution's systems, ready to run: their workloads and the FLOPs of each."""

    described: list[tuple[str, str, int, float, float, str]]  # key, name, tokens, gen FLOPs, decode FLOPs, decoder
    calls: dict[tuple[str, ...], Callable[[], Any]]  # ("step", key, cfg) and ("decode", decoder)
    checks: dict[str, Callable[[], Any]]  # system key -> a real sampling run + decode


def _step_models(model, labels: torch.Tensor, device: torch.device) -> dict[bool, Any]:
    """The sampling-step callables (ConditionalModel; CUDA graphs on a GPU) without and with CFG."""
    from softvq_fast.sampling import ConditionalModel

    return {cfg: ConditionalModel(model, labels, cfg_scale=CFG_SCALE if cfg else 1.0, cuda_graph=device.type == "cuda")
            for cfg in (False, True)}


def _add_system(built: Built, key: str, name: str, model, labels: torch.Tensor, decoder: str,
                decode: Callable[[torch.Tensor], Any], flops: tuple[float, float], check_steps: int) -> None:
    from softvq_fast.sampling import sample_flow

    device = labels.device
    x = torch.randn(labels.shape[0], *model.latent_shape, device=device)
    steps = _step_models(model, labels, device)
    for cfg, step in steps.items():
        built.calls["step", key, str(cfg)] = functools.partial(step, x, 0.5)
    # The check reuses the CFG step (its CUDA graph is captured by then) and starts from noise.
    built.checks[key] = lambda: decode(sample_flow(steps[True], torch.randn_like(x), steps=check_steps))
    built.described.append((key, name, model.num_tokens, *flops, decoder))


def _sd_vae_decode_flops(setup: Setup, resolution: int) -> float:
    """FLOPs of one SD-VAE decode at `resolution`, counted on the meta device (no compute)."""
    vae = _sd_vae(setup, resolution, torch.device("meta"))
    latents = torch.empty(1, 4, resolution // 8, resolution // 8, device="meta", dtype=setup.dtype)
    with torch.inference_mode():
        return counted_flops(lambda: vae.decode(latents / SD_VAE_SCALE).sample)[1]


def _build(setup: Setup, resolution: int, batch: int, device: torch.device, sd_flops: float) -> Built:
    depth, hidden, _ = setup.generator
    labels = torch.randint(0, 1000, (batch,), device=device)
    autocast = None if setup.dtype == torch.float32 else setup.dtype
    built = Built([], {}, {})
    vae = _sd_vae(setup, resolution, device)
    latents = torch.randn(batch, 4, resolution // 8, resolution // 8, device=device, dtype=setup.dtype)
    built.calls["decode", "SD-VAE"] = lambda: vae.decode(latents / SD_VAE_SCALE).sample

    def sd_decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z.to(setup.dtype) / SD_VAE_SCALE).sample

    for key, patch in (("a", 2), ("b", 1)):
        model = _generator(setup, device, input_size=resolution // 8, patch_size=patch, in_channels=4)
        flops = (generator_flops(depth, hidden, model.num_tokens, 4, patch), sd_flops)
        _add_system(built, key, f"SD-VAE + {setup.generator_name}/{patch} ({key})", model, labels, "SD-VAE",
                    sd_decode, flops, setup.check_steps)
    for name, factory in setup.tokenizers[resolution]:
        with torch.device(device):  # initialise the random weights on the device
            tokenizer = factory()
        tokenizer = tokenizer.to(device).eval()
        tokens, channels = tokenizer.config.num_latent_tokens, tokenizer.config.codebook_embed_dim
        decode = functools.partial(tokenizer.decode, autocast_dtype=autocast)
        z = torch.randn(batch, tokens, channels, device=device)
        built.calls["decode", name] = functools.partial(decode, z)
        flops = (generator_flops(depth, hidden, tokens, channels, 1), counted_flops(lambda: decode(z[:1]))[1])
        model = _generator(setup, device, input_size=tokens, in_channels=channels, vae_1d=True)
        _add_system(built, name, f"{name} + {setup.generator_name}/1", model, labels, name, decode, flops,
                    setup.check_steps)
    return built


def measure_resolution(ctx, setup: Setup, resolution: int, batch: int, sd_flops: float, started: float) -> list[System]:
    """Builds and measures every system of one resolution within what is left of its budget:
    warm-up, timed rounds (as many as fit, at most setup.repeats), energy bursts (GPU), then the
    composition checks."""
    device = ctx.device
    budget = setup.budget_s.get(resolution, math.inf)
    with torch.inference_mode():
        built = _build(setup, resolution, batch, device, sd_flops)
        estimates = warm_up(built.calls, device, setup.warmup)
        steps_ms = {key: estimates["step", key, "True"] for key, *_ in built.described}
        checks_s = sum(setup.check_steps * steps_ms[key] + estimates["decode", decoder]
                       for key, *_, decoder in built.described) / 1e3
        bursts_s = 0.0 if device.type != "cuda" else sum(
            max(BURST_MARGIN * MIN_ENERGY_SPAN_S, ms / 1e3) for ms in estimates.values())
        repeats = plan_repeats(estimates, budget - (time.perf_counter() - started), checks_s + bursts_s, setup.repeats)
        if repeats < setup.repeats:
            ctx.note(f"{resolution} px: {repeats} timed repeat(s) instead of {setup.repeats}, to fit its "
                     f"{budget:.0f} s budget.")
        timings = round_robin(built.calls, device, repeats)
        energy = energy_bursts(built.calls, device, {key: t.median_ms for key, t in timings.items()})
        checks = {key: _time_call(check, device) for key, check in built.checks.items()}

    def measured(call: tuple[str, ...]) -> Measured:
        return Measured(timings[call], energy[call], energy[call].get("energy_per_call_j"))

    return [
        System(key, name, tokens, gen_flops, dec_flops, {cfg: measured(("step", key, str(cfg))) for cfg in (False, True)},
               measured(("decode", decoder)), batch, checks[key])
        for key, name, tokens, gen_flops, dec_flops, decoder in built.described
    ]


# ---------------------------------------------------------------------------------- rows
def _seconds(system: System, cfg: bool, steps: int) -> tuple[float, float]:
    """(generator seconds, end-to-end seconds) for one batch."""
    generator = steps * system.step[cfg].timing.median_ms / 1e3
    return generator, generator + system.decode.timing.median_ms / 1e3


def _ideal_flops(system: System, cfg: bool, steps: int) -> tuple[float, float]:
    """(generator FLOPs, end-to-end FLOPs) per image; with CFG each step evaluates two samples."""
    generator = steps * (2 if cfg else 1) * system.generator_flops
    return generator, generator + system.decode_flops


def _energy_per_image(system: System, cfg: bool, steps: int) -> float | None:
    step, decode = system.step[cfg].energy_per_call_j, system.decode.energy_per_call_j
    if step is None or decode is None:
        return None
    return (steps * step + decode) / system.batch


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def rows_for(systems: list[System], resolution: int, setup: Setup) -> list[dict[str, Any]]:
    """One row per system and CFG setting: measured times, composed images/s, the measured and
    ideal (FLOP) ratios to baselines (a) and (b), and the GPU telemetry."""
    baselines = {s.key: s for s in systems if s.key in ("a", "b")}
    rows = []
    for system in systems:
        for cfg in (False, True):
            gen_s, e2e_s = _seconds(system, cfg, setup.steps)
            gen_f, e2e_f = _ideal_flops(system, cfg, setup.steps)
            row: dict[str, Any] = {
                "px": resolution,
                "system": system.name,
                "tokens": system.tokens,
                "cfg": CFG_SCALE if cfg else "-",
                "batch": system.batch,
                "step_ms": system.step[cfg].timing.median_ms,
                "decode_ms": system.decode.timing.median_ms,
                "gen_img_s": system.batch / gen_s,
                "e2e_img_s": system.batch / e2e_s,
            }
            for key in ("a", "b"):
                base = baselines[key]
                base_gen_s, base_e2e_s = _seconds(base, cfg, setup.steps)
                base_gen_f, base_e2e_f = _ideal_flops(base, cfg, setup.steps)
                # Images/s ratios: the baseline's seconds per image over the row's.
                gen_x = _ratio(base_gen_s / base.batch, gen_s / system.batch)
                e2e_x = _ratio(base_e2e_s / base.batch, e2e_s / system.batch)
                gen_ideal, e2e_ideal = _ratio(base_gen_f, gen_f), _ratio(base_e2e_f, e2e_f)
                row[f"gen_x_{key}"] = gen_x
                row[f"gen_ideal_{key}"] = gen_ideal
                row[f"e2e_x_{key}"] = e2e_x
                row[f"e2e_ideal_{key}"] = e2e_ideal
                row[f"e2e_eff_{key}"] = _ratio(e2e_x, e2e_ideal)
            if setup.paper:
                row["paper_x"] = PAPER_CLAIMS.get((resolution, system.tokens), "-") if system.key not in ("a", "b") else "-"
            energy = _energy_per_image(system, cfg, setup.steps)
            row["img_per_j"] = 1 / energy if energy else "-"
            telemetry = system.step[cfg].telemetry
            row["step_w"] = telemetry.get("mean_power_w") or "-"
            row["step_sm_mhz"] = telemetry.get("mean_sm_clock_mhz") or "-"
            row["step_util_pct"] = telemetry.get("mean_utilization_pct") or "-"
            row["peak_mem_gib"] = telemetry.get("peak_memory_gib") or "-"
            rows.append(row)
    return rows


def composition_note(resolution: int, systems: list[System], check_steps: int) -> str:
    """Each system's real check_steps-step run with CFG + decode against check_steps x step_ms +
    decode_ms, with the gaps above CHECK_GAP named."""
    parts, flagged = [], []
    for system in systems:
        composed = check_steps * system.step[True].timing.median_ms + system.decode.timing.median_ms
        gap = system.check_ms / composed - 1
        parts.append(f"{system.name} {system.check_ms:.1f} vs {composed:.1f} ms ({gap:+.1%})")
        if abs(gap) > CHECK_GAP:
            flagged.append(f"{system.name} ({gap:+.1%})")
    return (f"{resolution} px composition check, a real {check_steps}-step Euler run with CFG + decode against "
            f"{check_steps} x step_ms + decode_ms: " + "; ".join(parts) + ". Gaps above "
            f"{CHECK_GAP:.0%}: " + (", ".join(flagged) + " (the composed images/s of these are off)" if flagged
                                    else "none") + ".")


# --------------------------------------------------------------- kernels against CUDA graphs
def _plain_attention(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """flash_attn where it is installed and runs these inputs (a user without us would take it),
    else SDPA."""
    from softvq_fast import attention

    q = torch.randn(1, 1, 1, head_dim, device=device, dtype=dtype)
    try:
        attention(q, q, q, backend="flash_attn")
    except NoBackendError:
        return "sdpa"
    return "flash_attn"


def stack_comparison(setup: Setup, device: torch.device, batch: int, tokens: int = 64, channels: int = 32) -> str:
    """One sampling step of SiT/1 on `tokens` tokens with CFG, same weights, dtype and batch:
    plain eager PyTorch (SDPA or flash_attn, F.layer_norm + modulation, torch's linear layers)
    against ours (every op on auto), each also replayed as a CUDA graph on a GPU, so that what
    graphs give (a torch feature open to any user) and what our kernels give are told apart."""
    from softvq_fast.sampling import ConditionalModel

    _, hidden, heads = setup.generator
    with torch.inference_mode():
        ours = _generator(setup, device, input_size=tokens, in_channels=channels, vae_1d=True)
        plain = _generator(setup, device, input_size=tokens, in_channels=channels, vae_1d=True)
        plain.load_state_dict(ours.state_dict())
        plain_attention = _plain_attention(device, setup.dtype, hidden // heads)
        plain.set_backends(attention=plain_attention, layernorm_modulate="reference", linear="torch")
        labels = torch.randint(0, 1000, (batch,), device=device)
        x = torch.randn(batch, tokens, channels, device=device)
        graphs = (False, True) if device.type == "cuda" else (False,)
        fns = {(stack, graph): functools.partial(ConditionalModel(model, labels, cfg_scale=CFG_SCALE, cuda_graph=graph),
                                                 x, 0.5)
               for stack, model in (("plain", plain), ("ours", ours)) for graph in graphs}
        warm_up(fns, device, setup.warmup)
        ms = {key: timing.median_ms for key, timing in round_robin(fns, device, setup.repeats).items()}
    return sampling_step_note(f"{setup.generator_name}/1 on {tokens} tokens, batch {batch} with CFG, "
                              f"{str(setup.dtype).replace('torch.', '')}, plain attention {plain_attention}", ms)


def sampling_step_note(what: str, ms: dict[tuple[str, bool], float]) -> str:
    """The sampling-step times, keyed (plain|ours, CUDA graph), and the ratios that separate the
    graphs' gain from the kernels'."""
    eager = ms["plain", False]
    text = (f"Sampling step of {what}: plain eager {eager:.2f} ms; ours eager {ms['ours', False]:.2f} ms "
            f"({eager / ms['ours', False]:.2f}x: our kernels)")
    if ("plain", True) in ms:
        text += (f"; plain + CUDA graph {ms['plain', True]:.2f} ms ({eager / ms['plain', True]:.2f}x: CUDA graphs "
                 f"alone); ours + CUDA graph {ms['ours', True]:.2f} ms ({ms['plain', True] / ms['ours', True]:.2f}x "
                 f"over plain + CUDA graph: our kernels with graphs on both sides; {eager / ms['ours', True]:.2f}x "
                 "over plain eager: both)")
    return text + "."


def run_setup(ctx, setup: Setup) -> list[dict[str, Any]]:
    _register_flop_formulas()
    torch.manual_seed(0)
    depth, hidden, _ = setup.generator
    rows: list[dict[str, Any]] = []
    previous: tuple[float, float] | None = None  # (seconds, work) of the last resolution
    for resolution in setup.resolutions:
        started = time.perf_counter()
        budget = setup.budget_s.get(resolution, math.inf)
        sd_flops = _sd_vae_decode_flops(setup, resolution)
        per_image = 3 * sum(generator_flops(depth, hidden, (resolution // 8 // patch) ** 2, 4, patch) for patch in (1, 2))

        def work(batch: int) -> float:
            """The SD-VAE systems' FLOPs (a step without and one with CFG, a decode): they dominate."""
            return batch * (per_image + sd_flops)

        batch = setup.batch[resolution]
        if previous is not None:
            seconds, done = previous
            batch = choose_batch(batch, budget, lambda b: seconds * work(b) / done)
            if batch < setup.batch[resolution]:
                ctx.note(f"{resolution} px: batch {batch} instead of {setup.batch[resolution]}: at the previous "
                         f"resolution's pace the planned work would take over its {budget:.0f} s budget.")
        systems = measure_resolution(ctx, setup, resolution, batch, sd_flops, started)
        previous = (time.perf_counter() - started, work(batch))
        rows += rows_for(systems, resolution, setup)
        ctx.progress(rows)
        ctx.note(composition_note(resolution, systems, setup.check_steps))
    for note in setup.notes:
        ctx.note(note)
    ctx.note(
        f"{setup.label}: images/s composed from measured medians for {setup.steps} sampling steps "
        "(one generator evaluation each, e.g. Euler or Euler-Maruyama): gen = B / (steps x step_ms), "
        "e2e = B / (steps x step_ms + decode_ms). x_a, x_b: measured speed-up over baseline (a), (b); "
        "ideal_*: the FLOP ratio; e2e_eff_* = measured / ideal."
        + (" paper_x: the paper's claim (18x at 256 px with 32 tokens, 55x at 512 px with 64 tokens)."
           if setup.paper else "")
    )
    if ctx.device.type == "cuda":
        ctx.note(
            "NVML telemetry over one burst of back-to-back calls per workload lasting at least "
            f"{MIN_ENERGY_SPAN_S:.0f} s: img_per_j from the energy counter's difference over the burst divided by "
            "its calls ('-' where a burst fell short or the counter failed); step_w, step_sm_mhz, step_util_pct: "
            "samples during the step's burst; peak_mem_gib: device-wide memory in use (every model and CUDA-graph "
            "pool alive counts), not the workload's own peak."
        )
    else:
        ctx.note("No GPU: NVML telemetry (energy, power, clock, utilisation, images per joule) is not recorded.")
    for batch in setup.stack_batches:
        ctx.note(stack_comparison(setup, ctx.device, batch))
    return rows


def run(ctx) -> list[dict[str, Any]]:
    return run_setup(ctx, quick_setup() if ctx.quick else full_setup())


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """End-to-end and generator-only images/s against transformer tokens (CFG on), per resolution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for resolution in sorted({r["px"] for r in rows}):
        chosen = sorted((r for r in rows if r["px"] == resolution and r["cfg"] != "-"), key=lambda r: r["tokens"])
        tokens = [r["tokens"] for r in chosen]
        for key, style in (("e2e_img_s", "o-"), ("gen_img_s", "s--")):
            ax.plot(tokens, [r[key] for r in chosen], style, label=f"{resolution} px, {key.split('_')[0]}")
        for r in chosen:
            ax.annotate(r["system"], (r["tokens"], r["e2e_img_s"]), fontsize=6, rotation=20)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("generator tokens per image")
    ax.set_ylabel("images / s (with CFG)")
    ax.set_title("Throughput against token count")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
