"""Each benchmark suite's plumbing at tiny shapes with a fake timer: the rows it produces, its
baseline row and speed-ups, and its error columns (no timed assertions)."""
from __future__ import annotations

import math

import pytest
import torch

from bench import measure
from bench.harness import Context
from bench.suites import attention, layernorm_modulate, linear, softvq, tokenizer
from softvq_fast.models import SoftVQVAE


def _fake_round_robin(fns, device, *, rounds, **kwargs):
    """Runs each workload once; row i of the table takes i + 1 ms."""
    for fn in fns.values():
        fn()
    return {label: [float(index + 1)] * rounds for index, label in enumerate(fns)}


@pytest.fixture
def ctx(tmp_path):
    return Context(device=torch.device("cpu"), quick=True, out_dir=str(tmp_path), suite="test")


def _groups(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def _check_baselines(rows: list[dict], keys: tuple[str, ...], is_baseline) -> None:
    """One baseline row per group, the fastest accepted one, and every speed-up divides its time."""
    for members in _groups(rows, keys).values():
        (base,) = [row for row in members if row["baseline"] == "yes"]
        assert is_baseline(base) and base["median_ms"] == min(r["median_ms"] for r in members if is_baseline(r))
        for row in members:
            assert row["speedup"] == base["median_ms"] / row["median_ms"]


def test_attention_suite(ctx, monkeypatch):
    monkeypatch.setattr(measure, "time_round_robin", _fake_round_robin)
    monkeypatch.setattr(attention, "cases", lambda quick: [("generator", 2, 17, 72), ("tokenizer", 1, 33, 64)])
    rows = attention.run(ctx)
    assert [(r["S"], r["pass"], r["backend"], r["via"]) for r in rows] == [
        (seq, pass_name, backend, via)
        for seq in (17, 33) for pass_name in ("fwd", "fwd+bwd")
        for backend, via in (("softvq", "softvq_fast"), ("sdpa", "softvq_fast"), ("sdpa", "direct"))
    ]
    _check_baselines(rows, ("case", "S", "D", "pass"), lambda row: row["via"] == "direct")
    assert all(row["rel_err"] < 1e-5 and row["peak_mib"] >= 0 for row in rows)
    assert len({tuple(r) for r in rows}) == 1


def test_linear_suite(ctx, monkeypatch):
    monkeypatch.setattr(linear, "time_round_robin", _fake_round_robin)
    monkeypatch.setattr(linear, "SHAPES", [("a", 5, 80, 48, "none"), ("b", 3, 16, 24, "gelu_tanh")])
    rows = linear.run(ctx)
    assert {(r["backend"], r["via"]) for r in rows} >= {("torch", "softvq_fast"), ("torch", "direct")}
    _check_baselines(rows, ("case",), lambda row: row["via"] == "direct")
    assert all(row["rel_err"] < 1e-5 and row["auto"] in ("onednn", "torch") for row in rows)


def test_layernorm_modulate_suite(ctx, monkeypatch):
    monkeypatch.setattr(measure, "time_round_robin", _fake_round_robin)
    monkeypatch.setattr(layernorm_modulate, "QUICK", [("SiT-S", 2, 5, 40)])
    rows = layernorm_modulate.run(ctx)
    # conftest runs Triton in its interpreter without a GPU: the fused kernels get rows too
    assert [(r["pass"], r["backend"], r["via"]) for r in rows] == [
        (pass_name, backend, via) for pass_name in ("fwd", "fwd+bwd")
        for backend, via in (("triton", "softvq_fast"), ("reference", "softvq_fast"), ("torch", "direct"))
    ]
    _check_baselines(rows, ("case", "B", "S", "D", "pass"), lambda row: row["via"] == "direct")
    assert all(row["rel_err"] < 1e-5 for row in rows)
    assert any(note.startswith("CPU: the fused Triton kernels") for note in ctx.notes)


def test_softvq_suite(ctx, monkeypatch):
    monkeypatch.setattr(measure, "time_round_robin", _fake_round_robin)
    monkeypatch.setattr(softvq, "QUICK", {"main": (2, 48), "sweep": [(1, 24)]})
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the plumbing, not the compiler
    rows = softvq.run(ctx)
    assert [(r["case"].split()[2], r["pass"]) for r in rows[:9:3]] == [
        ("K48", "fwd"), ("K48", "fwd+stats"), ("K48", "fwd+bwd")]
    assert [r["backend"] for r in rows[:3]] == ["reference", "cpu", "compile(reference)"]
    assert [(r["pass"], r["backend"]) for r in rows[9:]] == [
        ("fwd+stats", "reference"), ("fwd+stats", "cpu"), ("fwd+bwd", "reference"), ("fwd+bwd", "cpu")]
    _check_baselines(rows, ("case", "pass"), lambda row: row["backend"] == "reference")
    assert all(row["memory_vs_baseline"] >= 0 and row["x_exp_limit"] == "" for row in rows)


def test_tokenizer_suite(ctx, monkeypatch, reference_dir):
    class TinyPresets:
        @staticmethod
        def from_preset(name):
            return SoftVQVAE.from_pretrained(reference_dir / "vectors" / "tokenizer_tiny")

    monkeypatch.setattr(measure, "time_round_robin", _fake_round_robin)
    monkeypatch.setattr(tokenizer, "SoftVQVAE", TinyPresets)
    monkeypatch.setattr(tokenizer, "QUICK", [("tiny", 2)])
    monkeypatch.setattr(tokenizer, "PROFILED_RUNS", 1)
    rows = tokenizer.run(ctx)
    assert [(r["pass"], r["backend"]) for r in rows] == [
        (pass_name, label) for pass_name in ("encode", "decode")
        for label in ("auto", "auto, torch linear", "plain PyTorch")]
    _check_baselines(rows, ("case", "precision", "pass"), lambda row: row["backend"].startswith("plain PyTorch"))
    assert rows[0]["speedup"] == 3.0  # fake times: auto 1 ms, plain 3 ms
    assert all(row["rel_err_vs_math"] < 1e-5 and math.isfinite(row["images_per_s"]) for row in rows)
    assert all(row["rel_err_vs_math"] > 0 for row in rows if row["backend"] == "auto")  # other kernels than math's
    assert any("on plain PyTorch" in note for note in ctx.notes)  # the time split
    assert any("auto vs the baseline: median 2 vs 6 ms (3.00x)" in note for note in ctx.notes)
