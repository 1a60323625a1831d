"""Calibration: time each op's candidates on this machine, at the current torch thread count, and
derive CPU rules (softvq_fast.ops.cpu_rules) from the timings.

  attention  softvq against sdpa, float32 and bfloat16, forward (no autograd) and forward+backward,
             at the generator and tokenizer shapes and a sweep of kv lengths (self-attention,
             16 heads; q, k, v strided views of one (B, S, 3, H, D) tensor as the models make them)
  linear     onednn against torch, float32, forward (no autograd) at the models' inference layer
             shapes and forward+backward (the gradients of x, weight and bias) at their training
             layer shapes, each with a sweep of multiply-adds
`calibrate()` writes the rules to the calibration file under this machine's key; `auto` then
uses them on this machine (same CPU model, vendor, ISA, thread count and torch version), and only
there. The timing happens here, never inside an op call, so choices are the same in every process.

Deriving a window (`derive_window`) from the timed cases: a case is a win when the op's own
backend took less time. Among the windows whose bounds are measured values (lower bounds for
every feature, upper bounds for those that have one) and that hold no loss, the one holding the
most wins is taken, the tightest where several do; a bound at the smallest or largest measured
value is opened to 0 or infinity (the rule holds beyond the sweep as at its ends).
"""
from __future__ import annotations

import functools
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from softvq_fast.ops import cpu_rules
from softvq_fast.ops.cpu_rules import CpuRule, calibration_key, calibration_path, window_key

HEADS = 16
ATTENTION_TOKENS = 1024  # batch x kv length of each sweep case (at least one sample)


@dataclass(frozen=True)
class Case:
    """One timed configuration: `features` are what the rule's window is over."""

    op: str
    dtype: torch.dtype
    needs_grad: bool
    features: Mapping[str, int]
    shape: tuple[int, ...]  # attention: (batch, seq, heads, head_dim); linear: (rows, in, out)


@dataclass(frozen=True)
class OpPlan:
    """What calibrating one op times: its own backend `first` against `default`, and which
    features have upper bounds in a window."""

    first: str
    default: str
    bounded_above: frozenset[str]
    cases: Callable[[bool], list[Case]]
    calls: Callable[[Case], dict[str, Callable[[], object]]]


# Seconds per call of each candidate backend of one case.
Timer = Callable[[Case, Mapping[str, Callable[[], object]]], Mapping[str, float]]


def _attention_cases(quick: bool) -> list[Case]:
    if quick:
        shapes = [(max(1, 256 // s), s, 4, 64) for s in (8, 64, 160)]
    else:
        generator = [(8, s, HEADS, d) for d in (64, 72) for s in (32, 64, 128)]
        tokenizer = [(1, 321, HEADS, 64), (1, 1089, HEADS, 64)]
        sweep = [(max(1, ATTENTION_TOKENS // s), s, HEADS, 64) for s in (8, 16, 256, 512, 2048)]
        shapes = generator + tokenizer + sweep
    return [Case("attention", dtype, grad, {"kv_len": shape[1]}, shape)
            for dtype in (torch.float32, torch.bfloat16) for grad in (False, True) for shape in shapes]


def _attention_calls(case: Case) -> dict[str, Callable[[], object]]:
    from softvq_fast.ops.attention import attention

    batch, seq, heads, head_dim = case.shape

    @functools.cache
    def tensors() -> tuple[torch.Tensor, torch.Tensor]:  # made on the first call, not for a fake timer
        packed = torch.randn(batch, seq, 3, heads, head_dim).to(case.dtype).requires_grad_(case.needs_grad)
        return packed, torch.randn(batch, seq, heads, head_dim).to(case.dtype)

    def call(name: str) -> Callable[[], object]:
        def run() -> object:
            packed, grad = tensors()
            if not case.needs_grad:
                return _no_grad(lambda: attention(*packed.unbind(2), backend=name))
            return torch.autograd.grad(attention(*packed.unbind(2), backend=name), packed, grad)

        return run

    return {name: call(name) for name in ("softvq", "sdpa")}


def _no_grad(fn: Callable[[], object]) -> object:
    with torch.no_grad():
        return fn()


# (rows, in_features, out_features): the tokenizer's layers at 256 px, batch 2; SiT-S/1 and
# SiT-XL/1 on 64 tokens with CFG, their per-sample layers and token embedder.
LINEAR_LAYERS = [(578, 768, 2304), (578, 768, 3072), (578, 3072, 768), (128, 384, 1152), (128, 1536, 384),
                 (2, 384, 2304), (2, 256, 384), (128, 32, 384), (128, 1152, 4608), (2, 1152, 6912)]
LINEAR_SWEEP = [(rows, 256, 256) for rows in (1, 4, 16, 64, 256)] + [(rows, 64, 64) for rows in (64, 1024)]
# Training steps: SiT-B/1 on 64 tokens at batch 16 (its block's layers, adaLN, timestep and token
# embedders, final layer) and the ViT-S tokenizer at 256 px, batch 4 (321 tokens per image).
LINEAR_TRAINING_LAYERS = [(1024, 768, 2304), (1024, 768, 768), (1024, 768, 3072), (1024, 3072, 768), (16, 768, 4608),
                          (16, 256, 768), (1024, 32, 768), (1024, 768, 32), (1284, 384, 1152), (1284, 384, 1536),
                          (1284, 1536, 384), (1284, 384, 384)]
LINEAR_TRAINING_SWEEP = [(rows, 256, 256) for rows in (4, 64, 1024)] + [(1024, 64, 64)]


def _linear_cases(quick: bool) -> list[Case]:
    quick_shapes = [(1, 256, 256), (32, 256, 256), (128, 32, 384), (512, 512, 512)]
    by_pass = {False: quick_shapes if quick else LINEAR_LAYERS + LINEAR_SWEEP,
               True: quick_shapes if quick else LINEAR_TRAINING_LAYERS + LINEAR_TRAINING_SWEEP}
    return [Case("linear", torch.float32, grad, {"macs": m * k * n, "in_features": k}, (m, k, n))
            for grad, shapes in by_pass.items() for m, k, n in shapes]


def _linear_calls(case: Case) -> dict[str, Callable[[], object]]:
    from softvq_fast.ops.linear import linear

    rows, in_features, out_features = case.shape

    @functools.cache
    def tensors() -> tuple[torch.Tensor, ...]:
        x, weight, bias = torch.randn(rows, in_features), torch.randn(out_features, in_features), torch.randn(out_features)
        return tuple(t.requires_grad_(case.needs_grad) for t in (x, weight, bias)) + (torch.randn(rows, out_features),)

    def call(name: str) -> Callable[[], object]:
        def run() -> object:
            x, weight, bias, grad = tensors()
            if not case.needs_grad:
                return _no_grad(lambda: linear(x, weight, bias, backend=name))
            return torch.autograd.grad(linear(x, weight, bias, backend=name), (x, weight, bias), grad)

        return run

    return {name: call(name) for name in ("onednn", "torch")}


PLANS = {
    "attention": OpPlan("softvq", "sdpa", frozenset({"kv_len"}), _attention_cases, _attention_calls),
    "linear": OpPlan("onednn", "torch", frozenset(), _linear_cases, _linear_calls),
}


def round_robin_timer(rounds: int = 3, seconds_per_sample: float = 0.02) -> Timer:
    """Times the candidates in alternation: after one uncounted call each, `rounds` rounds of one
    sample per candidate (as many calls as fill about `seconds_per_sample`); the least sample, as
    other processes only ever add time."""

    def timer(case: Case, calls: Mapping[str, Callable[[], object]]) -> dict[str, float]:
        repeats = {}
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            repeats[name] = max(1, int(seconds_per_sample / max(time.perf_counter() - start, 1e-6)))
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                for _ in range(repeats[name]):
                    call()
                samples[name].append((time.perf_counter() - start) / repeats[name])
        return {name: min(values) for name, values in samples.items()}

    return timer


def derive_window(points: Sequence[tuple[Mapping[str, int], bool]],
                  bounded_above: frozenset[str]) -> dict[str, tuple[float, float]] | None:
    """The window (feature -> inclusive (low, high)) of `points` (features, won) by the module
    docstring's rule, or None when no window holds wins alone (no case won, or every window
    around a win takes in a loss too)."""
    if not any(won for _, won in points):
        return None
    names = sorted(points[0][0])
    values = {name: sorted({features[name] for features, _ in points}) for name in names}
    bounds = {name: [(low, high) for low in values[name] for high in values[name] if low <= high]
              if name in bounded_above else [(low, values[name][-1]) for low in values[name]] for name in names}
    best, best_key = None, None
    for combination in itertools.product(*(bounds[name] for name in names)):
        window = dict(zip(names, combination))
        inside = [won for features, won in points
                  if all(low <= features[name] <= high for name, (low, high) in window.items())]
        if not inside or not all(inside):
            continue
        width = sum(math.log2(max(high, 1)) - math.log2(max(low, 1)) for low, high in combination)
        key = (len(inside), -width)
        if best_key is None or key > best_key:
            best, best_key = window, key
    if best is None:
        return None
    return {name: (0.0 if low == values[name][0] else float(low),
                   math.inf if high == values[name][-1] or name not in bounded_above else float(high))
            for name, (low, high) in best.items()}


def derive_rule(op: str, timings: Sequence[tuple[Case, Mapping[str, float]]], source: str) -> CpuRule:
    """The rule for `op` from (case, seconds per backend) pairs: a window per dtype and pass."""
    plan = PLANS[op]
    groups: dict[tuple[torch.dtype, bool], list[tuple[Mapping[str, int], bool]]] = {}
    for case, seconds in timings:
        groups.setdefault((case.dtype, case.needs_grad), []).append(
            (case.features, seconds[plan.first] < seconds[plan.default]))
    windows = {}
    for group, points in groups.items():
        window = derive_window(points, plan.bounded_above)
        if window is not None:
            windows[group] = window
    return CpuRule(op, plan.first, windows, source)


def calibrate(ops: Sequence[str] = tuple(PLANS), *, quick: bool = False, timer: Timer | None = None,
              path: Path | None = None, progress: Callable[[str], None] | None = None) -> dict[str, CpuRule]:
    """Times `ops` on this machine at torch's current thread count, derives their rules, writes
    them to the calibration file (`path`, default cpu_rules.calibration_path()) under this
    machine's key and returns them. `quick`: a few small cases (tests, a smoke check)."""
    from softvq_fast.dispatch import registered_ops

    unknown = sorted(set(ops) - set(PLANS))
    if unknown:
        raise ValueError(f"calibrate: ops must be among {sorted(PLANS)}, got {unknown}")
    timer = timer or (round_robin_timer(rounds=1, seconds_per_sample=0.002) if quick else round_robin_timer())
    path = calibration_path() if path is None else Path(path)
    threads = torch.get_num_threads()
    key = calibration_key(threads)
    rules = {}
    for op in ops:
        plan = PLANS[op]
        backends = registered_ops()[op]
        missing = [name for name in (plan.first, plan.default) if backends.get(name).unavailable_reason()]
        if missing:
            raise RuntimeError(f"calibrate: {op} cannot be calibrated here: "
                               + "; ".join(f"{name}: {backends.get(name).unavailable_reason()}" for name in missing))
        timings = []
        for case in plan.cases(quick):
            seconds = timer(case, plan.calls(case))
            timings.append((case, seconds))
            if progress is not None:
                ms = ", ".join(f"{name} {value * 1e3:.3f} ms" for name, value in seconds.items())
                progress(f"{op} {window_key(case.dtype, case.needs_grad)} {case.shape}: {ms}")
        rules[op] = derive_rule(op, timings, f"calibration file {path} for {key}")
    cpu_rules.write_calibration(rules, key, path)
    return rules
