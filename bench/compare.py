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



def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 for an empty or zero reference with equal output)."""
    out64, ref64 = out.double(), ref.double()
    return float(torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64).clamp_min(1e-300))
