"""Compiles every Triton kernel ahead of time (no GPU needed) for an A100 (sm_80) and an
H100/H200 (sm_90) with the block sizes our launchers choose, and prints the shared memory each
needs as JSON. tests/test_triton_compile.py runs it as a script in a process without
TRITON_INTERPRET: once the interpreter is on, triton.jit gives kernels that cannot be compiled."""
from __future__ import annotations

import json

import torch

# name -> (compute capability, opt-in shared memory per block in bytes)
GPUS = {"sm80": (80, 166_912), "sm90": (90, 232_448)}
# name -> (dtype, codebook dim D, allow_tf32)
SOFT_VQ_CASES = {"fp32-D32-tf32": (torch.float32, 32, True), "fp32-D256": (torch.float32, 256, False),
                 "bf16-D64": (torch.bfloat16, 64, False)}
LAYERNORM_DIMS = (1152, 4608)  # SiT-XL width; a wide one (16 warps)

_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
_SCALARS = {"M": "i32", "K": "i32", "D": "i32", "S": "i32", "mod_stride": "i32", "ROWS_PER_PROGRAM": "i32",
            "inv_tau": "fp32", "inv_t": "fp32", "eps": "fp32"}
_FLOAT32_BUFFERS = {"STATS", "GH", "GC", "COLSUM", "mean_ptr", "rstd_ptr", "dscale_part_ptr", "dshift_part_ptr"}


def _shared_bytes(kernel, dtype: str, constants: dict, num_warps: int, capability: int) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in _SCALARS:
            signature[name] = _SCALARS[name]
        elif name == "IDX":
            signature[name] = "*i64"
        else:
            signature[name] = "*fp32" if name in _FLOAT32_BUFFERS else f"*{dtype}"
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants),
                              target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})
    return compiled.metadata.shared


def main() -> dict:
    from softvq_fast.kernels import layernorm_modulate as ln
    from softvq_fast.kernels import soft_vq as sv

    results = {}
    for gpu, (capability, shared_limit) in GPUS.items():
        sv._shared_memory_per_block = lambda device, limit=shared_limit: limit
        sv._multiprocessors = lambda device: 132
        for case, (dtype, dim, allow_tf32) in SOFT_VQ_CASES.items():
            config = sv._config(torch.zeros(4, 4096, dim, dtype=dtype), allow_tf32)
            num_warps = config.pop("num_warps")
            kernels = {"forward": (sv._forward_kernel, dict(config, WITH_STATS=True, WITH_ENTROPY=True)),
                       "column_sum": (sv._column_sum_kernel, config),
                       "grad_z": (sv._grad_z_kernel, dict(config, WITH_ENTROPY=True)),
                       "grad_codebook": (sv._grad_codebook_kernel, config)}
            results[f"soft_vq-{case}-{gpu}"] = {
                name: _shared_bytes(kernel, _TRITON_DTYPES[dtype], constants, num_warps, capability)
                for name, (kernel, constants) in kernels.items()}
        for dim in LAYERNORM_DIMS:
            block_d = ln._block_d(dim)
            results[f"layernorm_modulate-D{dim}-{gpu}"] = {
                name: _shared_bytes(kernel, "bf16", {"BLOCK_D": block_d}, ln._num_warps(block_d), capability)
                for name, kernel in (("forward", ln._forward_kernel), ("backward", ln._backward_kernel))}
    return results


if __name__ == "__main__":
    print(json.dumps(main()))
