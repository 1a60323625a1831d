"""One launch of the softvq CUDA attention forward at each shape of the attention suite's full mode
(bf16, q/k/v as strided views of one qkv tensor): the program that bench/gpu_check.sh runs under
Nsight Compute, so that each profiled kernel is one benchmark case.

    ncu --clock-control none --kernel-name regex:attention_forward python -m bench.cuda_attention_runs
"""
from __future__ import annotations

import torch

from bench.suites.attention import HEADS, cases
from softvq_fast.ops.attention import attention


def main() -> None:
    for case, batch, seq, head_dim in cases(quick=False):
        qkv = torch.randn(batch, seq, 3, HEADS, head_dim, device="cuda", dtype=torch.bfloat16)
        attention(*qkv.unbind(2), backend="softvq")
        print(f"{case}: B={batch} S={seq} H={HEADS} D={head_dim}", flush=True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
