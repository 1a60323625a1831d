"""Every Triton kernel compiles for sm_80 and sm_90 (ahead of time, no GPU needed) with the block
sizes our launchers choose, fits the shared memory of an A100 / H100-H200, and at the released
models' codebook dims (D <= 64) keeps its tiles in registers: at most MAX_STACK_BYTES of stack a
thread, a small allowance that a kernel holding its tiles in registers stays within, because
registers spilled to local memory make every access to them a round trip through the caches. A
launcher whose block size makes a kernel spill must pick a smaller one. The interpreter tests check
the arithmetic; this checks what only a GPU compile sees (tl.dot layouts, bf16 paths, register and
shared-memory budgets) before a GPU ever runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.compiler")

from support.triton_aot import GPUS, LAYERNORM_DIMS, LPIPS_DTYPES, SOFT_VQ_CASES  # noqa: E402

CASES = ([f"soft_vq-{case}" for case in SOFT_VQ_CASES] + [f"layernorm_modulate-D{dim}" for dim in LAYERNORM_DIMS]
         + [f"lpips_distance-{case}" for case in LPIPS_DTYPES])


MAX_STACK_BYTES = 128
# Kernels allowed more stack: float32 without TF32 (CUDA-core products) at D >= 128.
SPILLING_CASES = ("soft_vq-fp32-D128", "soft_vq-fp32-D256")


@pytest.fixture(scope="module")
def resources() -> dict:
    """{case-gpu: {kernel: {"shared": bytes, "stack": bytes}}} from tests/support/triton_aot.py, run
    without the interpreter."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    script = Path(__file__).parent / "support" / "triton_aot.py"
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("gpu", list(GPUS))
@pytest.mark.parametrize("case", CASES)
def test_kernels_compile_within_shared_memory_and_registers(resources, case, gpu):
    _, limit = GPUS[gpu]
    kernels = resources[f"{case}-{gpu}"]
    assert kernels and all(used["shared"] <= limit for used in kernels.values()), (limit, kernels)
    if case not in SPILLING_CASES:
        assert all(used["stack"] <= MAX_STACK_BYTES for used in kernels.values()), kernels
