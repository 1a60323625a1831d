"""pytest-benchmark micro-benchmarks of the soft-VQ kernels (not part of the test run):

    python -m pytest bench/micro/test_soft_vq_micro.py --benchmark-columns=median,iqr,rounds

On CUDA every round synchronises the device. Sizes: the authors' codebooks (C=4, K=8192, D=32) at
batch 256 x 64 tokens on a GPU, batch 16 on the CPU.
"""
from __future__ import annotations

import pytest
import torch

from softvq_fast import soft_vq
from softvq_fast.dispatch import NoBackendError

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 256 if DEVICE.type == "cuda" else 16
FUSED = "triton" if DEVICE.type == "cuda" else "cpu"


def _synchronised(fn):
    def run():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out
    return run


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    z = torch.randn(BATCH, 64, 32, device=DEVICE, generator=generator).requires_grad_()
    codebook = torch.randn(4, 8192, 32, device=DEVICE, generator=generator).div_(32**0.5).requires_grad_()
    return z, codebook


@pytest.mark.parametrize("backend", [FUSED, "reference"])
@pytest.mark.parametrize("with_stats", [False, True], ids=["plain", "stats"])
def test_forward(benchmark, inputs, backend, with_stats):
    z, codebook = inputs

    def forward():
        with torch.no_grad():
            return soft_vq(z, codebook, 0.07, return_stats=with_stats, backend=backend)

    try:
        forward()
    except NoBackendError as exc:
        pytest.skip(str(exc))
    benchmark(_synchronised(forward))


@pytest.mark.parametrize("backend", [FUSED, "reference"])
def test_forward_backward_with_regulariser(benchmark, inputs, backend):
    z, codebook = inputs

    def step():
        z_q, stats = soft_vq(z, codebook, 0.07, return_stats=True, backend=backend)
        (z_q.square().mean() + stats.entropy_loss).backward()
        z.grad = codebook.grad = None

    try:
        step()
    except NoBackendError as exc:
        pytest.skip(str(exc))
    benchmark(_synchronised(step))
