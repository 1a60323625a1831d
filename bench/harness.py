"""The benchmark harness: runs suites, prints their tables, writes JSON + markdown + PNG plots.

A suite is a module in `bench/suites/` with
  TITLE: str
  def run(ctx: Context) -> list[dict]   rows of one table (same keys in every row)
and optionally
  BASELINE: str   what the speed-ups divide by (bench.compare.add_speedups marks that row)
  def plot(rows: list[dict], path: str) -> None   a custom PNG (default: bar chart of median_ms)

Each table's header names the machine (CPU model, cores, torch threads; on CUDA the GPU and its
host), the mode, the date, the versions, the suite's wall time with the 1-minute load average
before and after it (other processes slow a suite's rows alike, but not every suite) and the
baseline.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.measure import device_name

SUITES = ("softvq", "tokenizer", "claims", "attention", "linear", "layernorm_modulate", "lpips_distance", "train",
          "tokenizer_train")
RESULTS_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


@dataclass
class Context:
    """What a suite gets: the device, quick or full mode, and where to write extra files."""

    device: torch.device
    quick: bool
    out_dir: str
    suite: str = ""
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        """A line printed under the suite's table and kept in the markdown."""
        self.notes.append(text)

    def progress(self, rows: list[dict]) -> None:
        """Saves the rows finished so far (and the notes) as <out_dir>/<suite>.partial.json, so
        that a suite stopped by a time limit (bench/gpu_check.sh) still leaves what it measured.
        The harness removes the file once the suite's results are written."""
        if self.suite:
            path = partial_path(self.out_dir, self.suite)
            with open(path + ".tmp", "w") as f:  # then renamed: a kill mid-write leaves the last whole file
                json.dump({"partial": True, "suites": {self.suite: {"rows": rows, "notes": self.notes}}}, f, indent=1,
                          default=str)
            os.replace(path + ".tmp", path)


def partial_path(out_dir: str, suite: str) -> str:
    return os.path.join(out_dir, f"{suite}.partial.json")


def environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from softvq_fast._extension import extension_status

    return {
        "machine": device_name(device),
        "device": str(device),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "extension": extension_status(),
        "platform": platform.platform(),
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
        return f"{value:.3e}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    keys = list(rows[0].keys())
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _default_plot(title: str, rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if isinstance(r.get("median_ms"), (int, float))]
    if not timed:
        return
    labels = [" ".join(str(r[k]) for k in r if k in ("case", "pass", "backend")) for r in timed]
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(timed) + 1.5))
    ax.barh(range(len(timed)), [r["median_ms"] for r in timed])
    ax.set_yticks(range(len(timed)), labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("median time (ms, log scale)")
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section_markdown(
    title: str,
    env: dict,
    rows: list[dict],
    notes: list[str],
    quick: bool,
    *,
    load: tuple[float, float] | None = None,
    seconds: float | None = None,
    baseline: str | None = None,
) -> str:
    """One suite's section: a header (machine, mode, date, versions, wall time and load, baseline),
    the table and the notes."""
    mode = "quick" if quick else "full"
    head = f"### {title}: {env['machine']}, {mode} mode, {env['date']}\n\n"
    head += f"torch {env['torch']}, triton {env['triton']}, extension: {env['extension']}\n\n"
    if seconds is not None:
        head += f"The suite ran {seconds:.0f} s"
        if load is not None:
            head += f"; 1-minute load average {load[0]:.1f} before it, {load[1]:.1f} after, on {os.cpu_count()} cores"
        head += ".\n\n"
    if baseline is not None:
        head += f"Baseline: {baseline}."
        if rows and "speedup" in rows[0]:
            head += " speedup = the baseline's median time / the row's (above 1: faster)."
        head += "\n\n"
    return head + markdown_table(rows) + "".join(f"\n{n}\n" for n in notes)


def record(suite: str, device_kind: str, text: str) -> None:
    """Replace (or append) this suite's section for this device kind in bench/RESULTS.md."""
    begin, end = f"<!-- {suite}:{device_kind}:begin -->", f"<!-- {suite}:{device_kind}:end -->"
    current = open(RESULTS_MD).read() if os.path.exists(RESULTS_MD) else "# Measured results\n"
    block = f"{begin}\n{text}{end}"
    if begin in current and end in current:
        before, rest = current.split(begin, 1)
        current = before + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    with open(RESULTS_MD, "w") as f:
        f.write(current)


def run_suite(name: str, env: dict[str, Any], device: torch.device, quick: bool, out_dir: str,
              record_results: bool) -> tuple[dict[str, Any], str]:
    """Runs one suite in this process: prints its section, writes its PNG, records it if asked.
    Returns its results.json entry and its markdown section."""
    module = importlib.import_module(f"bench.suites.{name}")
    ctx = Context(device=device, quick=quick, out_dir=out_dir, suite=name)
    print(f"\n## {module.TITLE} (running)", flush=True)
    load_before, started = os.getloadavg()[0], time.perf_counter()
    rows = module.run(ctx)
    load, seconds = (load_before, os.getloadavg()[0]), time.perf_counter() - started
    text = section_markdown(module.TITLE, env, rows, ctx.notes, quick, load=load, seconds=seconds,
                            baseline=getattr(module, "BASELINE", None))
    print(text, flush=True)
    png = os.path.join(out_dir, f"{name}.png")
    getattr(module, "plot", lambda r, p: _default_plot(module.TITLE, r, p))(rows, png)
    if record_results:
        record(name, device.type, text)
    entry = {"title": module.TITLE, "rows": rows, "notes": ctx.notes, "load_average": load, "seconds": seconds}
    return entry, text


def run_suite_in_child(name: str, device: torch.device, quick: bool, out_dir: str,
                       record_results: bool) -> tuple[dict[str, Any], str] | int:
    """Runs one suite through `python -m bench` in a child process (its output goes to ours) and
    returns what run_suite returned there, or the child's exit status if it failed."""
    results = os.path.join(out_dir, f"{name}.child.json")
    command = [sys.executable, "-m", "bench", "--suite", name, "--quick" if quick else "--full",
               "--device", str(device), "--out", out_dir, "--child-results", results]
    status = subprocess.run(command + (["--record"] if record_results else []), check=False).returncode
    if status != 0:
        return status
    with open(results) as f:
        child = json.load(f)
    os.remove(results)
    return child["entry"], child["markdown"]


def run_suites(names: list[str], device: torch.device, quick: bool, out_dir: str, record_results: bool, *,
               isolated: bool = False, child_results: str | None = None) -> int:
    """Runs the suites one after the other, then writes results.json and results.md for them all.

    isolated: each suite in a fresh child process, so that no suite's numbers depend on the suites
    run before it (on the CPU a process's allocator keeps or returns freed memory depending on what
    it freed before, which moves allocation-heavy steps by tens of percent). child_results: the
    file a child writes its suite's results to, for the parent."""
    os.makedirs(out_dir, exist_ok=True)
    env = environment(device)
    if child_results is None:
        print(f"# softvq-fast benchmarks on {env['machine']} ({'quick' if quick else 'full'} mode), {env['date']}")
    summary: dict[str, Any] = {"environment": env, "quick": quick, "suites": {}}
    markdown = [f"# softvq-fast benchmarks\n\n{json.dumps(env, indent=1)}\n"]
    run_started = time.perf_counter()
    for name in names:
        if isolated:
            outcome = run_suite_in_child(name, device, quick, out_dir, record_results)
            if isinstance(outcome, int):
                print(f"\nsuite {name} failed (exit status {outcome})", file=sys.stderr)
                return outcome
            entry, text = outcome
        else:
            entry, text = run_suite(name, env, device, quick, out_dir, record_results)
        summary["suites"][name] = entry
        markdown.append(text)
    if child_results is not None:
        with open(child_results, "w") as f:
            json.dump({"entry": summary["suites"][names[0]], "markdown": markdown[1]}, f, default=str)
        return 0
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(markdown))
    for name in names:
        if os.path.exists(partial_path(out_dir, name)):
            os.remove(partial_path(out_dir, name))
    print(f"\n{len(names)} suites in {time.perf_counter() - run_started:.0f} s; "
          f"wrote {out_dir}/results.json, results.md and one PNG per suite")
    return 0
