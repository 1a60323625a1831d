"""Every Triton kernel compiles for sm_80 and sm_90 (ahead of time, no GPU needed) with the block
sizes our launchers choose, and fits the shared memory of an A100 / H100-H200. The interpreter
tests check the arithmetic; this checks what only a GPU compile sees (tl.dot layouts, bf16
paths, register and shared-memory budgets) before a GPU ever runs it."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
compiler = pytest.importorskip("triton.compiler")
backends = pytest.importorskip("triton.backends.compiler")

from softvq_fast.kernels import layernorm_modulate as ln  # noqa: E402
from softvq_fast.kernels import soft_vq as sv  # noqa: E402

# (compute capability, opt-in shared memory per block in bytes): A100, H100/H200.
GPUS = [(80, 166_912), (90, 232_448)]
TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SCALARS = {"M": "i32", "K": "i32", "D": "i32", "S": "i32", "mod_stride": "i32", "ROWS_PER_PROGRAM": "i32",
           "inv_tau": "fp32", "inv_t": "fp32", "eps": "fp32"}
FLOAT32_BUFFERS = {"STATS", "GH", "GC", "COLSUM", "mean_ptr", "rstd_ptr", "dscale_part_ptr", "dshift_part_ptr"}


def _signature(kernel, dtype: str, constants: dict) -> dict:
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in SCALARS:
            signature[name] = SCALARS[name]
        elif name == "IDX":
            signature[name] = "*i64"
        else:
            signature[name] = "*fp32" if name in FLOAT32_BUFFERS else f"*{dtype}"
    return signature


def _compile(kernel, dtype: str, constants: dict, num_warps: int, capability: int):
    source = compiler.ASTSource(kernel, _signature(kernel, dtype, constants), constexprs=constants)
    target = backends.GPUTarget("cuda", capability, 32)
    return triton.compile(source, target=target, options={"num_warps": num_warps})


@pytest.mark.parametrize("capability, shared_limit", GPUS, ids=["sm80", "sm90"])
@pytest.mark.parametrize("dtype, D, allow_tf32", [(torch.float32, 32, True), (torch.float32, 256, False),
                                                  (torch.bfloat16, 64, False)], ids=["fp32-D32-tf32", "fp32-D256", "bf16-D64"])
def test_soft_vq_kernels_compile_within_shared_memory(monkeypatch, capability, shared_limit, dtype, D, allow_tf32):
    monkeypatch.setattr(sv, "_shared_memory_per_block", lambda device: shared_limit)
    monkeypatch.setattr(sv, "_multiprocessors", lambda device: 132)
    config = sv._config(torch.zeros(4, 4096, D, dtype=dtype), allow_tf32)
    num_warps = config.pop("num_warps")
    kernels = [(sv._forward_kernel, dict(config, WITH_STATS=True, WITH_ENTROPY=True)), (sv._column_sum_kernel, config),
               (sv._grad_z_kernel, dict(config, WITH_ENTROPY=True)), (sv._grad_codebook_kernel, config)]
    for kernel, constants in kernels:
        compiled = _compile(kernel, TRITON_DTYPES[dtype], constants, num_warps, capability)
        assert compiled.metadata.shared <= shared_limit, (kernel.fn.__name__, constants, compiled.metadata.shared)


@pytest.mark.parametrize("capability, shared_limit", GPUS, ids=["sm80", "sm90"])
@pytest.mark.parametrize("D", [1152, 4608])
def test_layernorm_modulate_kernels_compile(capability, shared_limit, D):
    block_d = ln._block_d(D)
    for kernel in (ln._forward_kernel, ln._backward_kernel):
        compiled = _compile(kernel, "bf16", {"BLOCK_D": block_d}, ln._num_warps(block_d), capability)
        assert compiled.metadata.shared <= shared_limit
