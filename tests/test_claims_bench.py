"""The claims benchmark at a tiny size: its rows, ratios and plot, and its FLOP model."""
from __future__ import annotations

import math

import pytest
import torch
from support.onednn import needs_onednn

from bench.harness import Context
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


def test_quick_mode_rows_at_a_tiny_size(reference_dir, tmp_path):
    tiny_tokenizer = ("tiny-8", lambda: SoftVQVAE.from_pretrained(reference_dir / "vectors" / "tokenizer_tiny"))
    setup = claims.Setup(
        label="test",
        dtype=torch.float32,
        generator=(1, 32, 2),
        generator_name="SiT-tiny",
        resolutions=(64, 128),  # 128 px is skipped: the budget below is spent by 64 px
        batch={64: 2},
        sd_vae_channels=(8, 8, 8, 8),
        sd_vae_groups=4,
        tokenizers={64: [tiny_tokenizer]},
        steps=10,
        warmup=0,
        repeats=1,
        stack_batches=(1,),
        time_budget_s=1e-6,
    )
    ctx = Context(device=torch.device("cpu"), quick=True, out_dir=str(tmp_path))
    rows = claims.run_setup(ctx, setup)
    assert [(r["system"], r["cfg"]) for r in rows] == [
        (name, cfg)
        for name in ("SD-VAE + SiT-tiny/2 (a)", "SD-VAE + SiT-tiny/1 (b)", "tiny-8 + SiT-tiny/1")
        for cfg in ("-", claims.CFG_SCALE)
    ]
    assert [r["tokens"] for r in rows[::2]] == [16, 64, 8]
    assert len({tuple(r) for r in rows}) == 1  # same keys in every row
    for row in rows:
        assert row["step_ms"] > 0 and row["decode_ms"] > 0
        assert row["e2e_img_s"] < row["gen_img_s"]
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("gen_x_a", "e2e_ideal_b", "e2e_eff_a"))
    baseline_a = rows[0]
    assert baseline_a["gen_x_a"] == 1 and baseline_a["e2e_ideal_a"] == 1
    # fewer tokens, fewer FLOPs: the ideal speed-up over baseline (b) of 8 tokens exceeds 1
    assert rows[-1]["gen_ideal_b"] > 1
    assert any("plain eager" in note for note in ctx.notes)
    assert any("Composition check, tiny-8" in note for note in ctx.notes)
    assert any(note.startswith("128 px skipped") for note in ctx.notes)
    assert {r["px"] for r in rows} == {64}
    claims.plot(rows, str(tmp_path / "claims.png"))
    assert (tmp_path / "claims.png").stat().st_size > 0


@pytest.mark.parametrize("settle_below_ms, short_calls", [(10.0, 1 + 2 * 3), (0.0, 1 + 3)])
def test_round_robin_runs_short_workloads_once_untimed_before_each_timed_call(settle_below_ms, short_calls):
    import dataclasses
    import time

    calls = {"short": 0, "long": 0}

    def short():
        calls["short"] += 1

    def long():
        calls["long"] += 1
        time.sleep(0.02)

    setup = dataclasses.replace(claims.quick_setup(), warmup=1, repeats=3, max_seconds=0.0, settle_below_ms=settle_below_ms)
    measured = claims._round_robin({"short": short, "long": long}, torch.device("cpu"), setup)
    assert calls == {"short": short_calls, "long": 1 + 3}  # warm-up, then per round: (untimed,) timed
    assert measured["long"].timing.repeats == measured["short"].timing.repeats == 3
    assert measured["long"].timing.median_ms >= 20


def test_a_local_sd_vae_checkpoint_replaces_random_weights(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    blocks = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    saved = AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4, latent_channels=4, **blocks)
    saved.save_pretrained(tmp_path)
    monkeypatch.setenv(claims.SD_VAE_ENV, str(tmp_path))
    setup = claims.quick_setup()
    loaded = claims._sd_vae(setup, 64, torch.device("cpu"))
    for name, tensor in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


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


def test_gpu_telemetry_accounts_spans_with_a_fake_nvml(monkeypatch):
    import sys
    import time

    from softvq_fast import telemetry as telemetry_module
    from softvq_fast.telemetry import GpuTelemetry

    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("Props", (), {"uuid": "abc"})())
    with GpuTelemetry(torch.device("cuda"), interval_s=0.001) as telemetry:
        for _ in range(3):
            with telemetry.span("work"):
                time.sleep(0.01)
    assert telemetry.summary("work")["energy_j"] is None  # 10 ms spans: the counter's steps, not energy
    monkeypatch.setattr(telemetry_module, "MIN_ENERGY_SPAN_S", 0.005)
    work = telemetry.summary("work")
    assert work["energy_j"] == 3.0 and work["energy_per_span_j"] == 1.0  # one 1 J counter step per span
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
