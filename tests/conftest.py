"""Shared test fixtures: reference data, CUDA skipping, relative-error helper."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = ROOT.parent / "shared" / "reference"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """../shared/reference beside the checkout (the authors' conformance data). Missing in CI is a
    failure; on a user's machine without it the conformance tests skip."""
    if not REFERENCE_DIR.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"conformance data not found at {REFERENCE_DIR}")
        pytest.skip(f"conformance data not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


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
