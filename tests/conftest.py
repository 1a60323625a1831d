"""Shared test fixtures: reference data, CUDA skipping, the Triton interpreter without a GPU,
relative-error helper."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Before any test module imports Triton (it reads this once): its kernels run in the interpreter
# when there is no GPU, whichever test file runs first.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = ROOT.parent / "shared" / "reference"
ONEDNN = torch.backends.mkldnn.is_available()
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="torch built without oneDNN")


@pytest.fixture(scope="session", autouse=True)
def _patch_old_triton_interpreter() -> None:
    """Triton < 3.7's interpreter turns a scalar kernel argument (a shape-(1,) NumPy array) into a
    Python int with int(array), which NumPy >= 2.4 refuses: every loop bounded by a runtime
    argument (range(0, K, BLOCK_K)) fails under TRITON_INTERPRET=1. Give such triton the
    __index__ of triton 3.7+ (squeeze first). Compiled (GPU) kernels never take this path.
    A fixture, not import-time code: triton must first be imported after the test modules set
    TRITON_INTERPRET."""
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 7):
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


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


class OneDNNCalls:
    """The weights (by data pointer) that went through the oneDNN linear op, in order."""

    def __init__(self) -> None:
        self.weights: list[int] = []

    def expect_every_linear_of(self, model: torch.nn.Module, *extra_weights: torch.Tensor) -> None:
        """Every softvq_fast.nn.Linear of `model` (and `extra_weights`) ran on oneDNN."""
        from softvq_fast.nn import Linear

        expected = {m.weight.data_ptr() for m in model.modules() if isinstance(m, Linear)}
        expected |= {w.data_ptr() for w in extra_weights}
        assert expected and set(self.weights) == expected


@pytest.fixture
def onednn_calls(monkeypatch) -> OneDNNCalls:
    """Records the calls of the oneDNN linear op (softvq_fast.ops.linear._onednn_linear)."""
    import softvq_fast.ops.linear as linear_op

    calls, original = OneDNNCalls(), linear_op._onednn_linear

    def record(x, weight, bias, activation):
        calls.weights.append(weight.data_ptr())
        return original(x, weight, bias, activation)

    monkeypatch.setattr(linear_op, "_onednn_linear", record)
    return calls
