"""Timing and peak-memory measurement shared by every suite, and the side-by-side comparison
most suites run (check_and_time).

Times are medians over repeats after warm-up; on CUDA the device is synchronised around each
repeat (CUDA events would hide host overhead that users pay too). Peak memory is the peak of
memory allocated *during* the call above what was allocated before it: on CUDA from the caching
allocator's statistics, on the CPU from the profiler's allocation events.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch

from bench.compare import relative_error
from softvq_fast.dispatch import NoBackendError, registered_ops


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    repeats: int

    @classmethod
    def of(cls, samples_ms: list[float]) -> "Timing":
        return cls(statistics.median(samples_ms), min(samples_ms), len(samples_ms))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 2,
    repeats: int = 10,
    max_seconds: float = 20.0,
) -> Timing:
    """Median wall time of `fn()` in milliseconds. Stops repeating after `max_seconds` (at least
    three repeats are always taken) so that slow baselines on the CPU stay bounded."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples: list[float] = []
    start_all = time.perf_counter()
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
        if len(samples) >= 3 and time.perf_counter() - start_all > max_seconds:
            break
    return Timing.of(samples)


def time_round_robin(
    fns: dict[Hashable, Callable[[], Any]],
    device: torch.device,
    *,
    rounds: int,
    repeats: int = 1,
    warmup: int = 0,
    max_seconds: float = 20.0,
    uncounted_rounds: int = 0,
) -> dict[Hashable, list[float]]:
    """Time several workloads in turns, so that load or clock drift (a shared CPU, a warming GPU)
    hits all of them alike. Each round runs `time_fn` on every workload; the result holds, per
    workload, the round medians in milliseconds. The first `uncounted_rounds` rounds are dropped:
    right after other work the first workload of a round otherwise runs cold."""
    samples: dict[Hashable, list[float]] = {label: [] for label in fns}
    for round_index in range(uncounted_rounds + rounds):
        for label, fn in fns.items():
            median = time_fn(fn, device, warmup=warmup, repeats=repeats, max_seconds=max_seconds).median_ms
            if round_index >= uncounted_rounds:
                samples[label].append(median)
    return samples


@dataclass(frozen=True)
class Checked:
    """One workload of a side-by-side comparison: its round medians (ms), peak memory and error."""

    samples_ms: list[float]
    peak_bytes: int
    rel_err: float | None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    def columns(self) -> dict[str, float | None]:
        """median_ms, peak_mib and rel_err, as table columns."""
        return {"median_ms": self.median_ms, "peak_mib": self.peak_bytes / 2**20, "rel_err": self.rel_err}


def dense_matmul_gflops(device: torch.device, dtype: torch.dtype) -> float:
    """GFLOP/s of torch.mm on square matrices large enough to run at the machine's dense matrix
    product speed (2 n^3 FLOPs a product; median of several after a warm-up): the rate that work
    made of matrix products can approach and not exceed."""
    n = 8192 if device.type == "cuda" else 2048
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator, device=device, dtype=dtype) for _ in range(2))
    timing = time_fn(lambda: torch.mm(a, b), device, warmup=2, repeats=7)
    return 2 * n**3 / timing.median_ms / 1e6


def _label(key: Hashable) -> str:
    return " via ".join(key) if isinstance(key, tuple) else str(key)


def op_calls(ctx: Any, op: str, call: Callable[[str], Callable], plain: Callable) -> dict[tuple[str, str], Callable]:
    """(backend, via) -> function, for a suite that compares one op's backends with plain PyTorch:
    (name, "softvq_fast") -> call(name) for each backend of `op` that can run here (a note on ctx
    for each that cannot), then ("torch", "direct") -> plain and, in full mode, ("torch.compile",
    "direct") -> torch.compile(plain)."""
    calls: dict[tuple[str, str], Callable] = {}
    for backend in registered_ops()[op].backends:
        reason = backend.unavailable_reason()
        if reason is not None:
            ctx.note(f"{backend.name}: not run ({reason})")
            continue
        calls[backend.name, "softvq_fast"] = call(backend.name)
    calls["torch", "direct"] = plain
    if not ctx.quick:
        calls["torch.compile", "direct"] = torch.compile(plain)
    return calls


def check_and_time(
    ctx: Any,
    steps: dict[Hashable, Callable[[], Any]],
    what: str,
    *,
    reference: torch.Tensor | None = None,
    declined: Callable[[Hashable], type[BaseException]] = lambda key: NoBackendError,
    **timing: Any,
) -> dict[Hashable, Checked]:
    """Runs each step once (its warm-up) and compares what it returns with `reference`, if given
    (relative_error). A step that raises what `declined(key)` names cannot run these inputs: it is
    left out with a note on `ctx` ("<what>: <key> left out (<reason>)"). The others are timed in
    alternation (time_round_robin with `timing`), then their peak memory is measured."""
    errors, kept = {}, {}
    for key, step in steps.items():
        try:
            out = step()
        except declined(key) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            ctx.note(f"{what}: {_label(key)} left out ({reason})")
            continue
        errors[key] = relative_error(out, reference) if reference is not None else None
        kept[key] = step
    samples = time_round_robin(kept, ctx.device, **timing)
    return {key: Checked(samples[key], peak_memory_bytes(step, ctx.device), errors[key]) for key, step in kept.items()}


def _cpu_profile(fn: Callable[[], Any], profile_memory: bool = False) -> "torch.profiler.profile":
    """One call of `fn()` under torch.profiler, CPU activity only."""
    from torch.profiler import ProfilerActivity, profile

    # Kineto otherwise prints start/stop lines (and, without a GPU, a device-count error) on
    # every call; read when the profiler first starts.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=profile_memory) as prof:
        fn()
    return prof


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by one call of `fn()` above the allocation level before it."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    prof = _cpu_profile(fn, profile_memory=True)
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def cpu_op_share_ms(fn: Callable[[], Any], op_names: frozenset[str]) -> tuple[float, float]:
    """(self CPU time of the ops named `op_names`, self CPU time of all ops) in ms, for one call
    of `fn()` under the profiler (CPU work only; its overhead inflates both a little)."""
    averages = _cpu_profile(fn).key_averages()
    chosen = sum(event.self_cpu_time_total for event in averages if event.key in op_names)
    return chosen / 1e3, sum(event.self_cpu_time_total for event in averages) / 1e3


def cpu_name() -> str:
    """The CPU model, its logical cores and torch's thread count."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_name(device: torch.device) -> str:
    """A human name for the machine a measurement ran on: the CPU, or the GPU and its host CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, host {cpu_name()}"
    return cpu_name()
