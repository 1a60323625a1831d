"""The benchmark harness's shared arithmetic and plumbing: speed-ups against the baseline row,
table headers, bench/RESULTS.md sections, and the CUDA attention order read from a suite run."""
from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

from bench import attention_order, harness
from bench.compare import add_flop_ceiling, add_speedups, relative_error
from bench.measure import cpu_name, dense_matmul_gflops, device_name


def _row(case: str, backend: str, ms: float, via: str = "softvq_fast") -> dict:
    return {"case": case, "backend": backend, "via": via, "median_ms": ms}


def test_speedups_divide_the_fastest_baseline_row_of_each_group():
    rows = [
        _row("x", "ours", 2.0), _row("x", "sdpa", 8.0, "direct"), _row("x", "flash", 5.0, "direct"),
        _row("y", "ours", 3.0), _row("y", "sdpa", 6.0, "direct"),
        _row("z", "ours", 1.0),  # no baseline candidate
    ]
    add_speedups(rows, ("case",), lambda row: row["via"] == "direct")
    assert [row["speedup"] for row in rows[:5]] == [2.5, 5.0 / 8.0, 1.0, 2.0, 1.0]
    assert [row["baseline"] for row in rows] == ["", "", "yes", "", "yes", ""]
    assert math.isnan(rows[5]["speedup"])
    assert list(rows[0]) == ["case", "backend", "via", "median_ms", "speedup", "baseline"]


def test_flop_ceiling_against_hand_computed_numbers():
    rows = [_row("x", "ours", 2.0), _row("x", "plain", 4.0, "direct"), _row("y", "ours", 5.0)]
    for row, gflop in zip(rows, (0.3, 0.3, 1.0)):
        row["gflop"] = gflop
    add_speedups(rows, ("case",), lambda row: row["via"] == "direct")
    add_flop_ceiling(rows, ("case",), lambda row: row["gflop"], gflop_per_s=300.0)
    # 0.3 GFLOP at 300 GFLOP/s take 1 ms: 50% of the ceiling in 2 ms, 25% in 4; bound 4 ms / 1 ms
    assert [row["ceiling_pct"] for row in rows[:2]] == [pytest.approx(50.0), pytest.approx(25.0)]
    assert [row["speedup_bound"] for row in rows[:2]] == [pytest.approx(4.0), pytest.approx(4.0)]
    assert rows[2]["ceiling_pct"] == pytest.approx(100 * (1.0 / 300 * 1e3) / 5.0)
    assert math.isnan(rows[2]["speedup_bound"])  # no baseline in its group


def test_dense_matmul_rate_counts_two_n_cubed_flops_per_product(monkeypatch):
    from bench import measure

    monkeypatch.setattr(measure, "time_fn", lambda fn, device, **kw: measure.Timing.of([1000.0]))  # 1 s a product
    assert dense_matmul_gflops(torch.device("cpu"), torch.float32) == pytest.approx(2 * 2048**3 / 1e9)


def test_relative_error():
    ref = torch.tensor([3.0, 4.0])
    assert relative_error(ref + torch.tensor([0.0, 0.5]), ref) == pytest.approx(0.1)
    assert relative_error(torch.zeros(0), torch.zeros(0)) == 0.0


def test_machine_names_the_cpu_and_threads():
    name = device_name(torch.device("cpu"))
    assert name == cpu_name() and f"{torch.get_num_threads()} torch threads" in name and "cores" in name


_ENV = {"machine": "Test CPU (2 cores, 2 torch threads)", "date": "2026-01-01 00:00 UTC", "torch": "t", "triton": "r",
        "extension": "e"}


def test_section_header_names_machine_load_time_and_baseline():
    rows = [{"case": "x", "median_ms": 1.0, "speedup": 1.0, "baseline": "yes"}]
    text = harness.section_markdown("Title", _ENV, rows, ["a note"], True, load=(0.5, 1.25), seconds=42.4,
                                    baseline="plain PyTorch")
    lines = text.splitlines()
    assert lines[0] == "### Title: Test CPU (2 cores, 2 torch threads), quick mode, 2026-01-01 00:00 UTC"
    assert "The suite ran 42 s; 1-minute load average 0.5 before it, 1.2 after" in text
    assert "Baseline: plain PyTorch. speedup = the baseline's median time / the row's (above 1: faster)." in text
    assert "| case | median_ms | speedup | baseline |" in text and text.rstrip().endswith("a note")
    no_speedup = harness.section_markdown("Title", _ENV, [{"px": 1}], [], False, baseline="systems (a), (b)")
    assert "Baseline: systems (a), (b).\n" in no_speedup and "speedup =" not in no_speedup


def test_run_suites_prints_and_records_every_suite_in_the_same_shape(tmp_path, monkeypatch, capsys):
    suite = types.ModuleType("bench.suites.fake")
    suite.TITLE = "Fake suite"
    suite.BASELINE = "the slow row"

    def run(ctx):
        ctx.progress([{"case": "c", "backend": "fast", "median_ms": 1.0}])  # removed once the results are written
        rows = [{"case": "c", "backend": "fast", "median_ms": 1.0}, {"case": "c", "backend": "slow", "median_ms": 4.0}]
        add_speedups(rows, ("case",), lambda row: row["backend"] == "slow")
        ctx.note("fake note")
        return rows

    suite.run = run
    monkeypatch.setitem(sys.modules, "bench.suites.fake", suite)
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Measured results\n\nkept\n\n<!-- fake:cpu:begin -->\nold\n<!-- fake:cpu:end -->\n")
    monkeypatch.setattr(harness, "RESULTS_MD", str(results_md))
    out = tmp_path / "out"
    assert harness.run_suites(["fake"], torch.device("cpu"), True, str(out), record_results=True) == 0
    printed = capsys.readouterr().out
    machine = device_name(torch.device("cpu"))
    assert f"### Fake suite: {machine}, quick mode" in printed and "Baseline: the slow row." in printed
    recorded = results_md.read_text()
    assert recorded.startswith("# Measured results\n\nkept\n\n<!-- fake:cpu:begin -->\n### Fake suite: ")
    assert "old" not in recorded and recorded.count("<!-- fake:cpu:end -->") == 1
    assert "| c | fast | 1 | 4 |  |" in recorded and "fake note" in recorded
    summary = json.loads((out / "results.json").read_text())["suites"]["fake"]
    assert summary["rows"][1]["baseline"] == "yes" and len(summary["load_average"]) == 2 and summary["seconds"] >= 0
    assert not (out / "fake.partial.json").exists() and (out / "results.md").exists()


def _attention_rows(softvq: dict[tuple[int, int, str], tuple[float, float]], sdpa_ms: float = 1.0) -> list[dict]:
    """softvq: (S, D, pass) -> (ms, rel_err); every case also has a direct sdpa and a slower direct flash_attn."""
    rows = []
    for (seq, head_dim, pass_name), (ms, err) in softvq.items():
        common = {"case": "generator", "B": 8, "S": seq, "D": head_dim, "dtype": "bfloat16", "pass": pass_name}
        rows += [
            {**common, "backend": "softvq", "via": "softvq_fast", "median_ms": ms, "rel_err": err},
            {**common, "backend": "sdpa", "via": "softvq_fast", "median_ms": sdpa_ms / 2, "rel_err": 1e-3},
            {**common, "backend": "sdpa", "via": "direct", "median_ms": sdpa_ms, "rel_err": 1e-3},
            {**common, "backend": "flash_attn", "via": "direct", "median_ms": 2 * sdpa_ms, "rel_err": 1e-3},
        ]
    return rows


def test_attention_order_recommends_softvq_only_where_it_won_and_was_correct():
    rows = _attention_rows({
        (32, 72, "fwd"): (0.5, 3e-3), (64, 72, "fwd"): (0.9, 3e-3), (128, 72, "fwd"): (0.97, 3e-3),
        (32, 64, "fwd"): (0.5, 0.2),  # fast but wrong
        (32, 72, "fwd+bwd"): (1.5, 3e-3),
    })
    comparisons = attention_order.compare(rows)
    assert [(c.seq, c.head_dim, c.pass_name, c.best, c.verdict) for c in comparisons] == [
        (32, 72, "fwd", "sdpa", "faster"), (64, 72, "fwd", "sdpa", "faster"), (128, 72, "fwd", "sdpa", "not faster"),
        (32, 64, "fwd", "sdpa", "wrong"), (32, 72, "fwd+bwd", "sdpa", "not faster"),
    ]
    assert comparisons[0].speedup == 2.0  # against the fastest direct call, not softvq_fast's own sdpa
    lines = attention_order.recommend(comparisons)
    assert lines[0].startswith("fwd: softvq faster than the best other backend") and "S=32 D=72 (2.00x vs sdpa)" in lines[0]
    assert lines[2] == ("recommend for inputs without gradients (inference): softvq first on CUDA only where it won "
                        "(kv length <= 64 at head dim 72); flash_attn / sdpa first elsewhere")
    assert lines[-1] == ("recommend for inputs that need gradients (training): keep flash_attn / sdpa first on CUDA; "
                         "softvq stays opt-in")
    table = attention_order.table(comparisons)
    assert "| generator | 8 | 32 | 64 | fwd | 0.500 | sdpa | 1.000 | 2.00 | 2.0e-01 | wrong |" in table


def test_attention_order_everywhere_faster_and_partial_results(tmp_path, capsys):
    rows = _attention_rows({(32, 72, "fwd"): (0.5, 3e-3), (64, 72, "fwd"): (0.5, 3e-3)})
    lines = attention_order.recommend(attention_order.compare(rows))
    assert lines[-1] == ("recommend for inputs without gradients (inference): softvq first on CUDA at every measured "
                         "shape (kv length <= 64 at head dim 72); flash_attn / sdpa first beyond them")
    # a run stopped by its time limit leaves only attention.partial.json
    (tmp_path / "attention.partial.json").write_text(json.dumps({"suites": {"attention": {"rows": rows}}}))
    assert attention_order.main([str(tmp_path)]) == 0
    assert "softvq first on CUDA at every measured shape" in capsys.readouterr().out
    assert attention_order.main([str(tmp_path / "missing")]) == 0
    assert capsys.readouterr().out.startswith("(no attention results:")


def test_the_gpu_check_runs_every_suite():
    """bench/gpu_check.sh names its suites one by one: a suite added to the harness must be there
    (all but linear, whose backends differ on the CPU only)."""
    import re
    from pathlib import Path

    script = (Path(harness.__file__).parent / "gpu_check.sh").read_text()
    listed = {name for line in re.findall(r"^bench_suites (.+)$", script, flags=re.M)
              for name in re.findall(r"(\w+):\d+", line)}
    assert listed == set(harness.SUITES) - {"linear"}


def test_suites_run_in_child_processes(tmp_path, monkeypatch, capsys):
    """The children's sections come back into results.json and results.md; a failing child's
    exit status is the run's."""
    monkeypatch.chdir(harness.RESULTS_MD.rsplit("/bench/", 1)[0])  # `python -m bench` from the repository root
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the children would time Triton's interpreter
    out = tmp_path / "out"
    assert harness.run_suites(["layernorm_modulate"], torch.device("cpu"), True, str(out), False, isolated=True) == 0
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["suites"]) == ["layernorm_modulate"]
    assert all(entry["rows"] and entry["notes"] for entry in summary["suites"].values())
    assert "LayerNorm-modulate" in (out / "results.md").read_text()
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".json") == ["results.json"]  # no child files left
    assert harness.run_suite_in_child("layernorm_modulate", torch.device("meta"), True, str(out), False) != 0
