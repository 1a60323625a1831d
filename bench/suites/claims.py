"""The paper's throughput claims, measured side by side: SiT on SoftVQ's 32/64 tokens against
SiT on SD-VAE latents ("up to 18x faster at 256 px and 55x at 512 px").

Systems at each resolution R (the same generator implementation, sampler, steps, batch,
precision and guidance on every side):
  (a)  SD-VAE f8 (diffusers AutoencoderKL, SD config, 4 channels, random weights) + SiT/2 on its
       latents: (R/16)^2 tokens, the common setup
  (b)  the same SD-VAE + SiT/1: (R/8)^2 tokens, the counts the paper's tables list for SD-VAE
  ours SoftVQ tokenizer preset + SiT/1 on its 32 or 64 1-D tokens
Per system: the median time of one sampling step (one generator evaluation; with CFG a batch of
2B) and of one decode, both measured; images/s for `steps` steps are composed from them:
generator-only = B / (steps x step), end-to-end = B / (steps x step + decode). Next to every
measured ratio stands the ideal one from counted FLOPs (generator: linear layers and attention,
counted analytically; decoder: torch's FLOP counter on one decode, convolutions included), and
measured/ideal. On a GPU, NVML telemetry (energy counter, power, memory, SM clock,
utilisation) is sampled during the timed repeats: images per joule.

$SOFTVQ_FAST_SD_VAE may name a local diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema) to use
instead of random weights; nothing is downloaded.

Full mode (GPU): SiT-XL, bf16, SoftVQ-L tokenizers, 256 and 512 px. Quick mode (CPU): SiT-S,
float32, SoftVQ-S tokenizers, the full SD-VAE, 256 and 512 px, batch 1: CPU ratios of smaller
generators, not the paper's setting.
"""
from __future__ import annotations

import functools
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from bench.measure import Timing, synchronize
from softvq_fast.telemetry import MIN_ENERGY_SPAN_S

TITLE = "Paper claims: SiT throughput on SoftVQ 1-D tokens vs SD-VAE latents"
PAPER_CLAIMS = {(256, 32): 18.0, (512, 64): 55.0}
SD_VAE_SCALE = 0.18215
SD_VAE_ENV = "SOFTVQ_FAST_SD_VAE"
CFG_SCALE = 1.5
CHECK_STEPS = 4


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
    steps: int = 250
    warmup: int = 2
    repeats: int = 5
    max_seconds: float = 5.0
    stack_batches: tuple[int, ...] = (1,)
    # A later resolution is skipped (with a note) when the earlier ones took more than this share of it.
    time_budget_s: float | None = None
    # Workloads whose warm-up call took less than this run once untimed before each timed call (see
    # _round_robin); 0 turns it off.
    settle_below_ms: float = 0.0
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
        stack_batches=(8, 256),
        time_budget_s=80.0,
        # bench/gpu_check.sh gives a suite 90 s: CUDA-graph capture already runs each step 3 times.
        warmup=1,
        repeats=3,
        max_seconds=3.0,
    )


def quick_setup() -> Setup:
    return Setup(
        label="CPU quick (reduced models)",
        dtype=torch.float32,
        generator=(12, 384, 6),
        generator_name="SiT-S",
        resolutions=(256, 512),
        batch={256: 1, 512: 1},
        sd_vae_channels=(128, 256, 512, 512),
        sd_vae_groups=32,
        tokenizers=_tokenizer_presets("s"),
        warmup=1,
        repeats=3,
        max_seconds=3.0,
        time_budget_s=480.0,
        settle_below_ms=1000.0,
        notes=[
            "CPU quick mode: SiT-S instead of SiT-XL (XL at 1024 tokens does not fit a few CPU minutes), "
            "SoftVQ-S tokenizers, the full SD-VAE, float32, batch 1. These are CPU ratios of "
            "smaller generators, not the paper's SiT-XL setting; run on a GPU (full mode) for that."
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


def _round_robin(fns: dict[str, Callable[[], Any]], device: torch.device, setup: Setup) -> dict[str, Measured]:
    """Warm every workload up, then time them in turns, one call of each per round, so that load
    or clock drift (a shared CPU, a warming GPU) hits all of them alike. Median per workload;
    after three rounds, stops once max_seconds per workload have passed.

    A sampling loop runs the same step hundreds of times in a row, so its weights and buffers stay
    in cache; in turns, a short call right after a long one (on a CPU, a 5 s step on 4096 tokens
    before a 30 ms one on 32) finds them evicted and measured up to 2x slow. Workloads whose
    warm-up took under setup.settle_below_ms therefore run once untimed before each timed call."""
    from softvq_fast.telemetry import GpuTelemetry

    settle = set()
    for key, fn in fns.items():
        for _ in range(setup.warmup):
            synchronize(device)
            began = time.perf_counter()
            fn()
            synchronize(device)
            if (time.perf_counter() - began) * 1e3 < setup.settle_below_ms:
                settle.add(key)
    times: dict[str, list[float]] = {key: [] for key in fns}
    with GpuTelemetry(device) as telemetry:
        start = time.perf_counter()
        for round_index in range(setup.repeats):
            for key, fn in fns.items():
                if key in settle:
                    fn()
                with telemetry.span(key):
                    synchronize(device)
                    began = time.perf_counter()
                    fn()
                    synchronize(device)
                    times[key].append((time.perf_counter() - began) * 1e3)
            if round_index >= 2 and time.perf_counter() - start > setup.max_seconds * len(fns):
                break
    measured = {}
    for key, samples in times.items():
        summary = telemetry.summary(key)
        timing = Timing(statistics.median(samples), min(samples), len(samples))
        measured[key] = Measured(timing, summary, summary.get("energy_per_span_j"))
    return measured


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
    check_ms: float | None = None  # a real CHECK_STEPS-step run with CFG + decode

    def check_note(self) -> str:
        composed = CHECK_STEPS * self.step[True].timing.median_ms + self.decode.timing.median_ms
        return (
            f"Composition check, {self.name} at batch {self.batch}: a real {CHECK_STEPS}-step Euler run with CFG "
            f"+ decode took {self.check_ms:.1f} ms; composed from the medians: {composed:.1f} ms."
        )


def _step_calls(model, labels: torch.Tensor, device: torch.device) -> dict[bool, Callable[[], Any]]:
    """One sampling step (at t = 0.5) without and with CFG, keyed by CFG on/off."""
    from softvq_fast.sampling import ConditionalModel

    x = torch.randn(labels.shape[0], *model.latent_shape, device=device)
    calls = {}
    for cfg in (False, True):
        step = ConditionalModel(model, labels, cfg_scale=CFG_SCALE if cfg else 1.0, cuda_graph=device.type == "cuda")
        calls[cfg] = functools.partial(step, x, 0.5)
    return calls


def _sampling_run(model, labels: torch.Tensor, device: torch.device, decode: Callable[[torch.Tensor], Any]) -> Callable[[], Any]:
    """A real CHECK_STEPS-step Euler run with CFG, then decode: checks the composed figures."""
    from softvq_fast.sampling import ConditionalModel, sample_flow

    step = ConditionalModel(model, labels, cfg_scale=CFG_SCALE, cuda_graph=device.type == "cuda")
    noise = torch.randn(labels.shape[0], *model.latent_shape, device=device)
    return lambda: decode(sample_flow(step, noise, steps=CHECK_STEPS))


def _measure_systems(setup: Setup, resolution: int, device: torch.device) -> list[System]:
    """Build every system of one resolution, then time all sampling steps in one round robin
    and all decoders in another."""
    depth, hidden, _ = setup.generator
    batch = setup.batch[resolution]
    labels = torch.randint(0, 1000, (batch,), device=device)
    autocast = None if setup.dtype == torch.float32 else setup.dtype
    steps: dict[str, Callable[[], Any]] = {}
    decodes: dict[str, Callable[[], Any]] = {}
    described = []  # (key, name, tokens, generator FLOPs, decode FLOPs, decoder key)
    with torch.inference_mode():
        vae = _sd_vae(setup, resolution, device)
        latents = torch.randn(batch, 4, resolution // 8, resolution // 8, device=device, dtype=setup.dtype)
        _, sd_flops = counted_flops(lambda: vae.decode(latents[:1] / SD_VAE_SCALE).sample)
        decodes["SD-VAE"] = lambda: vae.decode(latents / SD_VAE_SCALE).sample
        for key, patch in (("a", 2), ("b", 1)):
            model = _generator(setup, device, input_size=resolution // 8, patch_size=patch, in_channels=4)
            for cfg, call in _step_calls(model, labels, device).items():
                steps[f"{key}/{cfg}"] = call
            name = f"SD-VAE + {setup.generator_name}/{patch} ({key})"
            described.append((key, name, model.num_tokens, generator_flops(depth, hidden, model.num_tokens, 4, patch), sd_flops, "SD-VAE"))
        for index, (name, factory) in enumerate(setup.tokenizers[resolution]):
            with torch.device(device):  # initialise the random weights on the device
                tokenizer = factory()
            tokenizer = tokenizer.to(device).eval()
            tokens, channels = tokenizer.config.num_latent_tokens, tokenizer.config.codebook_embed_dim
            decode = functools.partial(tokenizer.decode, autocast_dtype=autocast)
            z = torch.randn(batch, tokens, channels, device=device)
            _, flops = counted_flops(lambda: decode(z[:1]))
            decodes[name] = functools.partial(decode, z)
            model = _generator(setup, device, input_size=tokens, in_channels=channels, vae_1d=True)
            for cfg, call in _step_calls(model, labels, device).items():
                steps[f"{name}/{cfg}"] = call
            if index == 0:  # one composition check per resolution keeps the GPU run short
                steps[f"{name}/check"] = _sampling_run(model, labels, device, decode)
            described.append((name, f"{name} + {setup.generator_name}/1", tokens,
                              generator_flops(depth, hidden, tokens, channels, 1), flops, name))
        step_times = _round_robin(steps, device, setup)
        decode_times = _round_robin(decodes, device, setup)
    systems = []
    for key, name, tokens, gen_flops, dec_flops, decoder in described:
        check = step_times.get(f"{key}/check")
        systems.append(
            System(key, name, tokens, gen_flops, dec_flops, {cfg: step_times[f"{key}/{cfg}"] for cfg in (False, True)},
                   decode_times[decoder], batch, check.timing.median_ms if check else None)
        )
    return systems


# ---------------------------------------------------------------------------------- rows
def _seconds(system: System, cfg: bool, steps: int) -> tuple[float, float]:
    """(generator seconds, end-to-end seconds) for one batch."""
    generator = steps * system.step[cfg].timing.median_ms / 1e3
    return generator, generator + system.decode.timing.median_ms / 1e3


def _ideal_flops(system: System, cfg: bool, steps: int) -> tuple[float, float]:
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
                gen_x, e2e_x = _ratio(base_gen_s, gen_s), _ratio(base_e2e_s, e2e_s)
                gen_ideal, e2e_ideal = _ratio(base_gen_f, gen_f), _ratio(base_e2e_f, e2e_f)
                row[f"gen_x_{key}"] = gen_x
                row[f"gen_ideal_{key}"] = gen_ideal
                row[f"e2e_x_{key}"] = e2e_x
                row[f"e2e_ideal_{key}"] = e2e_ideal
                row[f"e2e_eff_{key}"] = _ratio(e2e_x, e2e_ideal)
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


# ------------------------------------------------------------------------ stack comparison
def stack_comparison(setup: Setup, device: torch.device, batch: int, tokens: int = 64, channels: int = 32) -> str:
    """One sampling step of SiT/1 on `tokens` tokens: our stack (fused LayerNorm-modulate,
    softvq_fast attention and linear layers auto, CUDA graph on GPUs) against plain eager PyTorch
    (reference LayerNorm, SDPA, torch's linear layers, no graph), same weights, dtype and batch,
    CFG on."""
    from softvq_fast.sampling import ConditionalModel

    with torch.inference_mode():
        model = _generator(setup, device, input_size=tokens, in_channels=channels, vae_1d=True)
        labels = torch.randint(0, 1000, (batch,), device=device)
        x = torch.randn(batch, tokens, channels, device=device)
        plain_model = _generator(setup, device, input_size=tokens, in_channels=channels, vae_1d=True)
        plain_model.load_state_dict(model.state_dict())
        plain_model.set_backends(attention="sdpa", layernorm_modulate="reference", linear="torch")
        calls = {
            "plain": ConditionalModel(plain_model, labels, cfg_scale=CFG_SCALE),
            "ours": ConditionalModel(model, labels, cfg_scale=CFG_SCALE, cuda_graph=device.type == "cuda"),
        }
        timings = _round_robin({key: functools.partial(call, x, 0.5) for key, call in calls.items()}, device, setup)
    plain, ours = timings["plain"].timing.median_ms, timings["ours"].timing.median_ms
    return (
        f"Sampling step of {setup.generator_name}/1 on {tokens} tokens, batch {batch} with CFG, "
        f"{str(setup.dtype).replace('torch.', '')}: plain eager {plain:.2f} ms, softvq-fast {ours:.2f} ms "
        f"({plain / ours:.2f}x)."
    )


def run_setup(ctx, setup: Setup) -> list[dict[str, Any]]:
    _register_flop_formulas()
    torch.manual_seed(0)
    rows = []
    started = time.perf_counter()
    for index, resolution in enumerate(setup.resolutions):
        elapsed = time.perf_counter() - started
        if index and setup.time_budget_s and elapsed > setup.time_budget_s * index / len(setup.resolutions):
            ctx.note(f"{resolution} px skipped: the smaller resolutions took {elapsed:.0f} s of the {setup.time_budget_s:.0f} s budget.")
            continue
        systems = _measure_systems(setup, resolution, ctx.device)
        rows += rows_for(systems, resolution, setup)
        ctx.progress(rows)
        for system in systems:
            if system.check_ms is not None:
                ctx.note(f"{resolution} px: " + system.check_note())
    for note in setup.notes:
        ctx.note(note)
    ctx.note(
        f"{setup.label}: images/s composed from measured medians for {setup.steps} sampling steps "
        "(one generator evaluation each, e.g. Euler or Euler-Maruyama): gen = B / (steps x step_ms), "
        "e2e = B / (steps x step_ms + decode_ms). x_a, x_b: measured speed-up over baseline (a), (b); "
        "ideal_*: the FLOP ratio; e2e_eff_* = measured / ideal. paper_x: the paper's claim (18x at 256 px "
        "with 32 tokens, 55x at 512 px with 64 tokens)."
    )
    if ctx.device.type == "cuda":
        ctx.note(
            "NVML telemetry: img_per_j from the energy counter over each workload's timed calls where they last "
            f"{MIN_ENERGY_SPAN_S} s or more on average ('-' otherwise: the counter advances in steps of the power "
            "sensor's updates); step_w, step_sm_mhz, step_util_pct: samples during the timed steps; peak_mem_gib: "
            "device-wide memory in use (every model and CUDA-graph pool alive counts), not the workload's own peak."
        )
    else:
        ctx.note("No GPU: NVML telemetry (energy, power, clock, utilisation, images per joule) is not recorded.")
        load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
        ctx.note(f"CPU load average (1, 5, 15 min) at the end: {load} on {os.cpu_count()} cores; other processes skew CPU timings.")
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
