"""Compiles every Triton kernel ahead of time (no GPU needed) for an A100 (sm_80) and an
H100/H200 (sm_90) with the block sizes our launchers choose at the benchmark sizes and the
alignment specialisation Triton applies at run time, and prints the shared memory and the stack
(local memory: spilled registers) each needs as JSON. tests/test_triton_compile.py runs it as a
script in a process without TRITON_INTERPRET: once the interpreter is on, triton.jit gives kernels
that cannot be compiled."""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import torch

# name -> (compute capability, opt-in shared memory per block in bytes)
GPUS = {"sm80": (80, 166_912), "sm90": (90, 232_448)}
# name -> (dtype, codebook dim D, allow_tf32); the released tokenizers have D = 32 (float32 unless
# autocast). 4 codebooks x 16,384 rows: the benchmark's row blocks.
SOFT_VQ_CASES = {"fp32-D32": (torch.float32, 32, False), "fp32-D32-tf32": (torch.float32, 32, True),
                 "bf16-D32": (torch.bfloat16, 32, False), "fp16-D64": (torch.float16, 64, False),
                 "bf16-D64": (torch.bfloat16, 64, False), "fp32-D128": (torch.float32, 128, False),
                 "fp32-D128-tf32": (torch.float32, 128, True), "fp32-D256": (torch.float32, 256, False),
                 "fp32-D256-tf32": (torch.float32, 256, True)}
SOFT_VQ_ROWS = 16_384
LAYERNORM_DIMS = (1152, 4608)  # SiT-XL width; a wide one (16 warps)
# LPIPS-VGG's first layer at 256 px: 64 channels of 256 x 256 pixels (the largest pixel blocks).
LPIPS_DTYPES = ("fp32", "bf16")
LPIPS_PIXELS = 256 * 256

_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_SCALARS = {"M": "i32", "K": "i32", "D": "i32", "S": "i32", "mod_stride": "i32", "ROWS_PER_PROGRAM": "i32",
            "inv_tau": "fp32", "inv_t": "fp32", "eps": "fp32", "C": "i32", "P": "i32"}
_FLOAT32_BUFFERS = {"row_stats_ptr", "grad_row_entropy_ptr", "grad_column_sum_ptr", "column_sum_ptr", "mean_ptr",
                    "rstd_ptr", "grad_scale_part_ptr", "grad_shift_part_ptr", "weight_ptr", "norm_x_ptr",
                    "norm_y_ptr", "block_sums_ptr", "grad_out_ptr", "block_squares_ptr"}
_DIVISIBLE_SIZES = ("M", "K", "D", "C", "P")


def _resources(kernel, dtype: str, constants: dict, num_warps: int, capability: int) -> dict:
    """{"shared": bytes, "stack": bytes a thread} of the compiled kernel. Pointers and the sizes
    in _DIVISIBLE_SIZES are marked divisible by 16, as Triton specialises them at run time for our
    tensors."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in _SCALARS:
            signature[name] = _SCALARS[name]
        elif name == "indices_ptr":
            signature[name] = "*i64"
        else:
            signature[name] = "*fp32" if name in _FLOAT32_BUFFERS else f"*{dtype}"
        if signature[name].startswith("*") or name in _DIVISIBLE_SIZES:
            attrs[(index,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    return {"shared": compiled.metadata.shared, "stack": int(re.search(r"STACK:(\d+)", usage).group(1))}


def main() -> dict:
    from softvq_fast.kernels import layernorm_modulate as ln
    from softvq_fast.kernels import lpips_distance as lp
    from softvq_fast.kernels import soft_vq as sv

    results = {}
    for gpu, (capability, shared_limit) in GPUS.items():
        sv._shared_memory_per_block = lambda device, limit=shared_limit: limit
        sv._multiprocessors = lambda device: 132
        for case, (dtype, dim, allow_tf32) in SOFT_VQ_CASES.items():
            config = sv._config(torch.empty(4, SOFT_VQ_ROWS, dim, dtype=dtype, device="meta"), allow_tf32)
            num_warps = config.pop("num_warps")
            kernels = {"forward": (sv._forward_kernel, dict(config, WITH_STATS=True, WITH_ENTROPY=True)),
                       "forward-plain": (sv._forward_kernel, dict(config, WITH_STATS=False, WITH_ENTROPY=False)),
                       "column_sum": (sv._column_sum_kernel, config),
                       "grad_z": (sv._grad_z_kernel, dict(sv._grad_z_config(config, True), WITH_ENTROPY=True)),
                       "grad_z-plain": (sv._grad_z_kernel, dict(sv._grad_z_config(config, False), WITH_ENTROPY=False)),
                       "grad_codebook": (sv._grad_codebook_kernel, config)}
            results[f"soft_vq-{case}-{gpu}"] = {
                name: _resources(kernel, _TRITON_DTYPES[dtype], constants, num_warps, capability)
                for name, (kernel, constants) in kernels.items()}
        for dim in LAYERNORM_DIMS:
            block_d = ln._block_d(dim)
            results[f"layernorm_modulate-D{dim}-{gpu}"] = {
                name: _resources(kernel, "bf16", {"BLOCK_D": block_d}, ln._num_warps(block_d), capability)
                for name, kernel in (("forward", ln._forward_kernel), ("backward", ln._backward_kernel))}
        block_p = lp._block_pixels(LPIPS_PIXELS)
        backward = {"BLOCK_P": block_p, "NEED_FX": True, "NEED_FY": True, "NEED_WEIGHT": True}
        kernels = {"forward": (lp._forward_kernel, {"BLOCK_P": block_p}), "backward": (lp._backward_kernel, backward),
                   "backward-fx": (lp._backward_kernel, dict(backward, NEED_FY=False, NEED_WEIGHT=False))}
        for case in LPIPS_DTYPES:
            results[f"lpips_distance-{case}-{gpu}"] = {
                name: _resources(kernel, case, constants, lp._num_warps(block_p), capability)
                for name, (kernel, constants) in kernels.items()}
    return results


if __name__ == "__main__":
    print(json.dumps(main()))
