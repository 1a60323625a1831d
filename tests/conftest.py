"""Shared test fixtures: reference data, CUDA skipping, the Triton interpreter without a GPU,
a seed per test, the oneDNN call recorder. Helpers live in tests/support/."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from support.numerics import seed_for
from support.onednn import OneDNNCalls
from support.paths import REFERENCE_DIR

# Before any test module imports Triton (it reads this once): its kernels run in the interpreter
# when there is no GPU, whichever test file runs first.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


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


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """Every test starts from torch's global generator seeded by its id (support.numerics.seed_for);
    tests that build their own generators take this value as their seed."""
    value = seed_for(request.node.nodeid)
    torch.manual_seed(value)
    return value


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
