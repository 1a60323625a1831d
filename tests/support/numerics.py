"""Error measures and per-test random seeds."""
from __future__ import annotations

import os
import zlib

import torch

# Added to every test's seed: set it to draw other inputs while each seed stays reproducible.
SEED_OFFSET_VAR = "SOFTVQ_FAST_TEST_SEED"


def seed_for(test_id: str) -> int:
    """The seed of one test: a hash of its id (stable across runs and machines, unlike hash())
    plus $SOFTVQ_FAST_TEST_SEED, so a failing seed is reproduced by rerunning that test."""
    return (zlib.crc32(test_id.encode()) + int(os.environ.get(SEED_OFFSET_VAR, "0"))) % 2**31


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ computed in float64; NaN anywhere gives inf (never passes)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}")
    if torch.isnan(out64).any() != torch.isnan(ref64).any():
        return float("inf")
    diff = torch.nan_to_num(out64 - ref64, nan=0.0)
    denom = torch.linalg.vector_norm(torch.nan_to_num(ref64, nan=0.0))
    return float(torch.linalg.vector_norm(diff) / denom.clamp_min(1e-300))
