"""The claims benchmark at a tiny size: its rows, ratios and plot, and its FLOP model."""
from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch
from support.onednn import needs_onednn

from bench.harness import Context
from bench.measure import Timing
from bench.suites import claims
from softvq_fast.models import SiT, SoftVQVAE


@pytest.mark.parametrize("linear", [
    "torch", pytest.param("onednn", marks=needs_onednn),
])
@pytest.mark.parametrize("tokens, patch, vae_1d", [(7, 1, True), (8, 2, False)])
def test_generator_flop_model_matches_torch_flop_counter(tokens, patch, vae_1d, linear):
    claims._register_flop_formulas()
    shape = dict(input_size=tokens, in_channels=4, vae_1d=vae_1d, patch_size=patch)
    model = SiT(depth=2, hidden_size=48, num_heads=3, num_classes=5, **shape).set_backends(attention="math", linear=linear)
    x = torch.randn(1, *model.latent_shape)
    with torch.no_grad():
        _, counted = claims.counted_flops(lambda: model(x, torch.rand(1), torch.tensor([1])))
    expected = claims.generator_flops(2, 48, model.num_tokens, 4, patch)
    assert counted == expected


def test_flop_counter_sees_cpu_sdpa_and_our_attention():
    import torch.nn.functional as F

    from softvq_fast import attention

    claims._register_flop_formulas()
    claims._register_flop_formulas()  # a second run in one process
    q, kv = torch.randn(2, 3, 40, 16), torch.randn(2, 3, 24, 16)
    _, counted = claims.counted_flops(lambda: F.scaled_dot_product_attention(q, kv, kv))
    assert counted == 4 * 2 * 3 * 40 * 24 * 16
    for backend in ("softvq", "math"):
        if backend == "softvq" and not hasattr(torch.ops.softvq_fast, "attention_fwd"):
            continue
        _, counted = claims.counted_flops(lambda: attention(q.transpose(1, 2), kv.transpose(1, 2), kv.transpose(1, 2), backend=backend))
        assert counted == 4 * 2 * 3 * 40 * 24 * 16, backend


def test_sd_vae_decode_flops_counted_on_meta_match_a_real_decode():
    claims._register_flop_formulas()
    setup = dataclasses.replace(claims.quick_setup(), sd_vae_channels=(8, 16, 16, 16), sd_vae_groups=4)
    vae = claims._sd_vae(setup, 64, torch.device("cpu"))
    with torch.inference_mode():
        _, real = claims.counted_flops(lambda: vae.decode(torch.randn(1, 4, 8, 8) / claims.SD_VAE_SCALE).sample)
    assert claims._sd_vae_decode_flops(setup, 64) == real > 0


def _measured(ms: float, energy_j: float | None = None, **telemetry) -> claims.Measured:
    return claims.Measured(Timing(ms, ms, 1), telemetry, energy_j)


def _system(key, tokens, step_ms, decode_ms, gen_flops, decode_flops, batch=2, check_ms=None, step_j=None, decode_j=None):
    """step_ms and step_j: (without CFG, with CFG)."""
    step = {cfg: _measured(step_ms[cfg], step_j[cfg] if step_j else None, mean_power_w=300.0) for cfg in (0, 1)}
    return claims.System(key, f"system {key}", tokens, gen_flops, decode_flops, {False: step[0], True: step[1]},
                         _measured(decode_ms, decode_j), batch, check_ms)


def _hand_systems():
    return [
        _system("a", 256, (10.0, 20.0), 100.0, 1e9, 5e10, step_j=(1.0, 2.0), decode_j=10.0),
        _system("b", 1024, (40.0, 80.0), 100.0, 4e9, 5e10),
        _system("SoftVQ-32", 32, (2.0, 3.0), 10.0, 1e8, 1e10, step_j=(0.25, 0.5), decode_j=2.0),
    ]


@pytest.mark.parametrize("paper", [True, False])
def test_rows_for_on_hand_computed_numbers(paper):
    setup = dataclasses.replace(claims.quick_setup(), steps=10, paper=paper)
    rows = claims.rows_for(_hand_systems(), 256, setup)
    assert [(r["system"], r["cfg"]) for r in rows] == [
        (f"system {key}", cfg) for key in ("a", "b", "SoftVQ-32") for cfg in ("-", claims.CFG_SCALE)]
    ours, ours_cfg, a = rows[4], rows[5], rows[0]
    # 10 steps of 2 ms for a batch of 2: 0.02 s (100 images/s); with the 10 ms decode 0.03 s.
    assert ours["gen_img_s"] == pytest.approx(100.0) and ours["e2e_img_s"] == pytest.approx(2 / 0.03)
    assert a["gen_img_s"] == pytest.approx(20.0) and a["e2e_img_s"] == pytest.approx(10.0)
    # (a): 0.1 s and 0.2 s a batch against our 0.02 s and 0.03 s.
    assert ours["gen_x_a"] == pytest.approx(5.0) and ours["e2e_x_a"] == pytest.approx(0.2 / 0.03)
    assert ours["gen_x_b"] == pytest.approx(20.0) and ours["e2e_x_b"] == pytest.approx(0.5 / 0.03)
    # FLOPs per image: 10 x 1e9 against 10 x 1e8; end to end (1e10 + 5e10) against (1e9 + 1e10).
    assert ours["gen_ideal_a"] == pytest.approx(10.0) and ours["e2e_ideal_a"] == pytest.approx(6e10 / 1.1e10)
    assert ours["e2e_eff_a"] == pytest.approx((0.2 / 0.03) / (6e10 / 1.1e10))
    # With CFG a step evaluates two samples: (2e10 + 5e10) against (2e9 + 1e10).
    assert ours_cfg["gen_ideal_a"] == pytest.approx(10.0) and ours_cfg["e2e_ideal_a"] == pytest.approx(7e10 / 1.2e10)
    assert ours_cfg["e2e_x_a"] == pytest.approx((10 * 20 + 100) / (10 * 3 + 10))
    assert a["gen_x_a"] == a["e2e_ideal_a"] == a["e2e_eff_a"] == 1
    # Energy per image: (10 steps x 0.25 J + 2 J) / 2 images = 2.25 J; with CFG (5 + 2) / 2 = 3.5 J.
    assert ours["img_per_j"] == pytest.approx(1 / 2.25) and ours_cfg["img_per_j"] == pytest.approx(1 / 3.5)
    assert a["img_per_j"] == pytest.approx(2 / (10 * 1.0 + 10.0)) and rows[2]["img_per_j"] == "-"  # (b): no energy
    assert ours["step_w"] == 300.0 and ours["step_sm_mhz"] == "-"
    if paper:
        assert [r["paper_x"] for r in rows] == ["-"] * 4 + [18.0, 18.0]
    else:
        assert all("paper_x" not in r for r in rows)
    assert len({tuple(r) for r in rows}) == 1  # same keys in every row


def test_composition_note_flags_gaps_above_five_percent():
    systems = _hand_systems()
    # with CFG: 10 x 20 + 100 = 300 ms for (a), 10 x 80 + 100 = 900 for (b), 10 x 3 + 10 = 40 for ours
    for system, check_ms in zip(systems, (320.0, 909.0, 37.0)):
        system.check_ms = check_ms
    note = claims.composition_note(256, systems, 10)
    assert "system a 320.0 vs 300.0 ms (+6.7%)" in note and "system b 909.0 vs 900.0 ms (+1.0%)" in note
    assert "system SoftVQ-32 37.0 vs 40.0 ms (-7.5%)" in note
    assert note.endswith("Gaps above 5%: system a (+6.7%), system SoftVQ-32 (-7.5%) (the composed images/s of these "
                         "are off).")


def test_sampling_step_note_separates_cuda_graphs_from_our_kernels():
    gpu = claims.sampling_step_note("x", {("plain", False): 10.0, ("plain", True): 8.0, ("ours", False): 5.0,
                                          ("ours", True): 4.0})
    assert "ours eager 5.00 ms (2.00x: our kernels)" in gpu
    assert "plain + CUDA graph 8.00 ms (1.25x: CUDA graphs alone)" in gpu
    assert "ours + CUDA graph 4.00 ms (2.00x over plain + CUDA graph" in gpu and "2.50x over plain eager" in gpu
    cpu = claims.sampling_step_note("x", {("plain", False): 10.0, ("ours", False): 4.0})
    assert cpu == "Sampling step of x: plain eager 10.00 ms; ours eager 4.00 ms (2.50x: our kernels)."


def test_budget_arithmetic():
    # each round: two calls (untimed, timed) of 100 + 400 ms = 1 s
    calls = {"x": 100.0, "y": 400.0}
    assert claims.plan_repeats(calls, left_s=10.0, other_s=2.0, most=5) == 5
    assert claims.plan_repeats(calls, left_s=4.5, other_s=2.0, most=5) == 2
    assert claims.plan_repeats(calls, left_s=1.0, other_s=2.0, most=5) == 1  # never below one
    assert claims.choose_batch(32, 60.0, lambda batch: 3.0 * batch) == 16
    assert claims.choose_batch(32, 1e-9, lambda batch: 3.0 * batch) == 1
    assert claims.choose_batch(32, 96.0, lambda batch: 3.0 * batch) == 32
    assert claims.burst_calls(300.0, 1.0) == 5 and claims.burst_calls(5000.0, 1.0) == 1


def test_quick_mode_rows_at_a_tiny_size(reference_dir, tmp_path):
    tiny_tokenizer = ("tiny-8", lambda: SoftVQVAE.from_pretrained(reference_dir / "vectors" / "tokenizer_tiny"))
    setup = claims.Setup(
        label="test",
        dtype=torch.float32,
        generator=(1, 32, 2),
        generator_name="SiT-tiny",
        resolutions=(32, 64),
        batch={32: 2, 64: 4},
        sd_vae_channels=(8, 8, 8, 8),
        sd_vae_groups=4,
        tokenizers={32: [tiny_tokenizer], 64: [tiny_tokenizer]},
        budget_s={32: 1e-6, 64: 1e-6},  # spent at once: fewer repeats, then a smaller batch, no row dropped
        steps=10,
        repeats=2,
        check_steps=2,
    )
    ctx = Context(device=torch.device("cpu"), quick=True, out_dir=str(tmp_path))
    rows = claims.run_setup(ctx, setup)
    names = ("SD-VAE + SiT-tiny/2 (a)", "SD-VAE + SiT-tiny/1 (b)", "tiny-8 + SiT-tiny/1")
    assert [(r["px"], r["system"], r["cfg"]) for r in rows] == [
        (px, name, cfg) for px in (32, 64) for name in names for cfg in ("-", claims.CFG_SCALE)]
    assert [r["tokens"] for r in rows[:6:2]] == [4, 16, 8]
    assert [r["batch"] for r in rows] == [2] * 6 + [1] * 6
    assert len({tuple(r) for r in rows}) == 1 and "paper_x" not in rows[0]
    for row in rows:
        assert row["step_ms"] > 0 and row["decode_ms"] > 0
        assert row["e2e_img_s"] < row["gen_img_s"]
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("gen_x_a", "e2e_ideal_b", "e2e_eff_a"))
    assert rows[-1]["gen_ideal_b"] > 1  # fewer tokens, fewer FLOPs
    assert "32 px: 1 timed repeat(s) instead of 2, to fit its 0 s budget." in ctx.notes
    assert any(note.startswith("64 px: batch 1 instead of 4") for note in ctx.notes)
    for px in (32, 64):
        check = next(note for note in ctx.notes if note.startswith(f"{px} px composition check"))
        assert all(name in check for name in names)
    assert any("plain eager" in note and "our kernels" in note for note in ctx.notes)
    claims.plot(rows, str(tmp_path / "claims.png"))
    assert (tmp_path / "claims.png").stat().st_size > 0


def test_round_robin_settles_every_workload_before_each_timed_call(monkeypatch):
    clock = iter(range(0, 10_000, 1))  # fake perf_counter: every read a second later
    monkeypatch.setattr(claims.time, "perf_counter", lambda: float(next(clock)))
    calls = {"short": 0, "long": 0}

    def short():
        calls["short"] += 1

    def long():
        calls["long"] += 1

    timings = claims.round_robin({"short": short, "long": long}, torch.device("cpu"), repeats=3)
    assert calls == {"short": 6, "long": 6}  # per round: one untimed call, one timed
    assert timings["short"] == timings["long"] == Timing(1000.0, 1000.0, 3)  # two clock reads per timed call


def test_energy_bursts_divide_one_long_span_by_its_calls(monkeypatch):
    from softvq_fast import telemetry as telemetry_module

    fake = _install_fake_nvml(monkeypatch)
    monkeypatch.setattr(telemetry_module, "MIN_ENERGY_SPAN_S", 0.01)
    calls = {"step": 0}

    def step():
        calls["step"] += 1
        time.sleep(0.004)

    # 4 ms calls fill a 10 ms span with BURST_MARGIN in ceil(1.25 x 10 / 4) = 4 calls.
    summary = claims.energy_bursts({"step": step}, torch.device("cuda"), {"step": 4.0}, min_span_s=0.01)["step"]
    assert calls["step"] == 4
    assert summary["energy_j"] == 1.0 and summary["energy_per_call_j"] == 0.25  # one 1 J counter step over the span
    assert fake.energy_mj == 4000  # counter read at the start and end of the run and of the span


class _FakeNvml:
    """Enough of pynvml for GpuTelemetry: an energy counter that grows 1000 mJ per read."""

    NVML_CLOCK_SM = 1

    class NVMLError(Exception):
        pass

    def __init__(self):
        self.energy_mj = 0

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return "handle"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        self.energy_mj += 1000
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, handle):
        return 300_000

    def nvmlDeviceGetMemoryInfo(self, handle):
        return type("Memory", (), {"used": 3 * 2**30})()

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return 1980

    def nvmlDeviceGetUtilizationRates(self, handle):
        return type("Rates", (), {"gpu": 97})()


def _install_fake_nvml(monkeypatch) -> "_FakeNvml":
    import sys

    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("Props", (), {"uuid": "abc"})())
    return fake


def test_gpu_telemetry_accounts_spans_with_a_fake_nvml(monkeypatch):
    from softvq_fast import telemetry as telemetry_module
    from softvq_fast.telemetry import GpuTelemetry

    _install_fake_nvml(monkeypatch)
    with GpuTelemetry(torch.device("cuda"), interval_s=0.001) as telemetry:
        for _ in range(3):
            with telemetry.span("work") as span:
                time.sleep(0.01)
                span.calls = 2
    assert telemetry.summary("work")["energy_j"] is None  # 10 ms spans: the counter's steps, not energy
    monkeypatch.setattr(telemetry_module, "MIN_ENERGY_SPAN_S", 0.005)
    work = telemetry.summary("work")
    assert work["energy_j"] == 3.0 and work["energy_per_call_j"] == 0.5  # one 1 J counter step per span of 2 calls
    assert work["mean_power_w"] == 300 and work["mean_sm_clock_mhz"] == 1980 and work["peak_memory_gib"] == 3
    whole = telemetry.summary()
    assert whole["energy_source"] == "counter" and whole["energy_j"] == 7.0  # 8 counter reads
    assert GpuTelemetry(torch.device("cpu")).summary() == {"telemetry": "no GPU telemetry on cpu"}


def test_progress_keeps_the_finished_rows(tmp_path):
    # bench/gpu_check.sh stops a suite at its time limit; what it finished must be on disk.
    import json

    from bench.harness import partial_path

    ctx = Context(device=torch.device("cpu"), quick=True, out_dir=str(tmp_path), suite="claims")
    ctx.note("a note")
    ctx.progress([{"case": 1, "median_ms": 2.0}])
    saved = json.loads(open(partial_path(str(tmp_path), "claims")).read())
    assert saved == {"partial": True, "suites": {"claims": {"rows": [{"case": 1, "median_ms": 2.0}], "notes": ["a note"]}}}
