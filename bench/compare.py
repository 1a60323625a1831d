"""Speed-ups against a baseline row, and output errors: the arithmetic that the suites' tables share.

Rows are grouped by the values of `group_keys` (for example case and pass); in each group the
fastest row that `is_baseline` accepts is the baseline. Every row then gets two more columns:
  speedup   the baseline's median time / the row's (above 1: faster than the baseline)
  baseline  "yes" on the baseline row, empty elsewhere
A group without an accepted row gets NaN speed-ups and no baseline.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

TIME_KEY = "median_ms"


def add_speedups(
    rows: list[dict], group_keys: tuple[str, ...], is_baseline: Callable[[dict], bool], time_key: str = TIME_KEY
) -> None:
    """Adds `speedup` and `baseline` to every row, in place (see the module docstring)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in group_keys), []).append(row)
    for members in groups.values():
        base = min((row for row in members if is_baseline(row)), key=lambda row: row[time_key], default=None)
        for row in members:
            row["speedup"] = base[time_key] / row[time_key] if base is not None else math.nan
            row["baseline"] = "yes" if row is base else ""



def add_flop_ceiling(
    rows: list[dict], group_keys: tuple[str, ...], gflop: Callable[[dict], float], gflop_per_s: float,
    time_key: str = TIME_KEY,
) -> None:
    """Adds two columns, in place, from each row's work in GFLOP (`gflop(row)`) and the machine's
    dense matrix-product rate (`gflop_per_s`, bench.measure.dense_matmul_gflops):
      ceiling_pct    the row's FLOP rate as a percentage of that rate
      speedup_bound  the group baseline's median time / the time its FLOPs take at that rate: the
                     largest speed-up that any implementation doing the same FLOPs could show
                     over the baseline on this machine
    Needs add_speedups' `baseline` column on the rows (NaN bound in a group without one)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in group_keys), []).append(row)
    for members in groups.values():
        base = next((row for row in members if row["baseline"] == "yes"), None)
        for row in members:
            ceiling_ms = gflop(row) / gflop_per_s * 1e3
            row["ceiling_pct"] = 100 * ceiling_ms / row[time_key]
            row["speedup_bound"] = base[time_key] / ceiling_ms if base is not None else math.nan


def flop_ceiling_note(gflop_per_s: float, dtype: torch.dtype, counted: str) -> str:
    """The table note that explains add_flop_ceiling's columns; `counted` says whose FLOPs."""
    return (f"FLOP ceiling: the machine's dense matrix-product rate, {gflop_per_s:.0f} GFLOP/s in "
            f"{str(dtype).removeprefix('torch.')} (torch.mm of two large square matrices, measured in this run); "
            f"ceiling_pct = the row's FLOPs ({counted}) per second as a percentage of it; speedup_bound = the "
            "baseline's time / the time its FLOPs take at that rate, the most any implementation doing the same "
            "FLOPs could gain over the baseline here.")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 for an empty or zero reference with equal output)."""
    out64, ref64 = out.double(), ref.double()
    return float(torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64).clamp_min(1e-300))
