"""What the CUDA attention `auto` order should become, read from an attention suite run: per case
and pass, our `softvq` kernel (through the op) against the fastest library called directly, and
whether it was also correct (rel_err against float64 within the dtype's tolerance).

    python -m bench.attention_order RESULTS            (a results folder or its results.json)

prints a markdown table and, per pass, the shapes where softvq won and the order to take. The
order keeps flash_attn / SDPA first wherever softvq did not win by at least MARGIN.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

MARGIN = 1.05  # softvq counts as faster only above this speed-up
# Largest rel_err against float64 that counts as correct (the project's test tolerances).
TOLERANCE = {"bfloat16": 1e-2, "float16": 1e-2, "float32": 1e-5}
PASSES = {"fwd": "inputs without gradients (inference)", "fwd+bwd": "inputs that need gradients (training)"}


@dataclass(frozen=True)
class Comparison:
    case: str
    batch: int
    seq: int
    head_dim: int
    dtype: str
    pass_name: str
    softvq_ms: float | None
    best: str | None  # the fastest direct call
    best_ms: float | None
    rel_err: float | None

    @property
    def speedup(self) -> float | None:
        return self.best_ms / self.softvq_ms if self.softvq_ms and self.best_ms else None

    @property
    def correct(self) -> bool:
        return self.rel_err is not None and self.rel_err <= TOLERANCE.get(self.dtype, 1e-2)

    @property
    def verdict(self) -> str:
        if self.softvq_ms is None:
            return "did not run"
        if self.best_ms is None:
            return "no other backend"
        if not self.correct:
            return "wrong"
        return "faster" if self.speedup >= MARGIN else "not faster"


def compare(rows: list[dict]) -> list[Comparison]:
    """One comparison per case and pass of the attention suite's rows."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["case"], row["B"], row["S"], row["D"], row["dtype"], row["pass"]), []).append(row)
    comparisons = []
    for key, members in groups.items():
        ours = next((r for r in members if r["backend"] == "softvq" and r["via"] == "softvq_fast"), None)
        best = min((r for r in members if r["via"] == "direct"), key=lambda r: r["median_ms"], default=None)
        comparisons.append(Comparison(
            *key,
            softvq_ms=ours["median_ms"] if ours else None,
            best=best["backend"] if best else None,
            best_ms=best["median_ms"] if best else None,
            rel_err=ours["rel_err"] if ours else None,
        ))
    return comparisons


def table(comparisons: list[Comparison]) -> str:
    lines = ["| case | B | S | D | pass | softvq ms | best other | other ms | speed-up | softvq rel_err | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        def num(value, fmt):
            return format(value, fmt) if value is not None else "-"

        lines.append(f"| {c.case} | {c.batch} | {c.seq} | {c.head_dim} | {c.pass_name} | {num(c.softvq_ms, '.3f')} | "
                     f"{c.best or '-'} | {num(c.best_ms, '.3f')} | {num(c.speedup, '.2f')} | "
                     f"{num(c.rel_err, '.1e')} | {c.verdict} |")
    return "\n".join(lines)


def _shape(c: Comparison) -> str:
    return f"{c.case} S={c.seq} D={c.head_dim}"


def _rule(won: list[Comparison], measured: list[Comparison]) -> str:
    """The shapes softvq won, as kv-length bounds per head dim where they are a prefix of the
    measured lengths, else listed."""
    parts = []
    for head_dim in sorted({c.head_dim for c in measured}):
        lengths = sorted({c.seq for c in measured if c.head_dim == head_dim})
        wins = sorted({c.seq for c in won if c.head_dim == head_dim})
        losses = {c.seq for c in measured if c.head_dim == head_dim and c not in won}
        if not wins:
            continue
        if wins == lengths[:len(wins)] and not losses & set(wins):
            parts.append(f"kv length <= {wins[-1]} at head dim {head_dim}")
        else:
            parts.append(f"kv lengths {', '.join(map(str, wins))} at head dim {head_dim}")
    return "; ".join(parts)


def recommend(comparisons: list[Comparison]) -> list[str]:
    """Per pass: where softvq won (faster than the best direct call by MARGIN, and correct),
    where it did not, and the order to take on CUDA."""
    lines = []
    for pass_name, inputs in PASSES.items():
        measured = [c for c in comparisons if c.pass_name == pass_name]
        if not measured:
            continue
        won = [c for c in measured if c.verdict == "faster"]
        others = [c for c in measured if c.verdict != "faster"]
        described = ", ".join(f"{_shape(c)} ({c.speedup:.2f}x vs {c.best})" for c in won) or "none"
        lines.append(f"{pass_name}: softvq faster than the best other backend (by {MARGIN:.2f}x or more, and "
                     f"correct) at: {described}")
        if others:
            lines.append(f"{pass_name}: not at: " + ", ".join(
                f"{_shape(c)} ({c.verdict}" + (f", {c.speedup:.2f}x" if c.speedup else "") + ")" for c in others))
        if not won:
            lines.append(f"recommend for {inputs}: keep flash_attn / sdpa first on CUDA; softvq stays opt-in")
        elif not others:
            lines.append(f"recommend for {inputs}: softvq first on CUDA at every measured shape "
                         f"({_rule(won, measured)}); flash_attn / sdpa first beyond them")
        else:
            lines.append(f"recommend for {inputs}: softvq first on CUDA only where it won ({_rule(won, measured)}); "
                         "flash_attn / sdpa first elsewhere")
    return lines


def load_rows(path: str) -> list[dict]:
    """The attention rows of a results folder (results.json, else the partial file of a run that
    its time limit stopped) or of a results.json."""
    if os.path.isdir(path):
        full = os.path.join(path, "results.json")
        path = full if os.path.exists(full) else os.path.join(path, "attention.partial.json")
    with open(path) as f:
        return json.load(f)["suites"]["attention"]["rows"]


def main(argv: list[str]) -> int:
    try:
        rows = load_rows(argv[0])
    except (OSError, KeyError, ValueError, IndexError) as exc:
        print(f"(no attention results: {exc})")
        return 0
    comparisons = compare(rows)
    print(table(comparisons))
    print()
    for line in recommend(comparisons):
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
