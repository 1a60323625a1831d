"""`softvq-fast env`: versions, devices, the extension, and every backend of every op."""
from __future__ import annotations

import argparse
import platform
import sys

import torch


def _versions() -> list[tuple[str, str]]:
    from softvq_fast import __version__
    from softvq_fast._extension import extension_status

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return [
        ("softvq-fast", __version__),
        ("python", sys.version.split()[0]),
        ("platform", platform.platform()),
        ("torch", torch.__version__),
        ("torch CUDA", torch.version.cuda or "none (CPU-only build)"),
        ("triton", triton_version),
        ("extension", extension_status()),
    ]


def _devices() -> list[str]:
    devices = [f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(
                f"cuda:{index}: {props.name}, compute capability {props.major}.{props.minor}, "
                f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
            )
    else:
        devices.append("cuda: not available")
    return devices


def run(args: argparse.Namespace) -> int:
    from softvq_fast.dispatch import registered_ops
    from softvq_fast.ops.attention import CPU_ORDER_RULES
    from softvq_fast.ops.linear import ONEDNN_FIRST_CPU, ONEDNN_MIN_MACS

    for key, value in _versions():
        print(f"{key:<12} {value}")
    print("devices:")
    for line in _devices():
        print(f"  {line}")
    print("backends (`auto` takes the first usable one in the order shown; README: per-input orders):")
    for op_name, op in registered_ops().items():
        cpu_order = ", ".join(op.auto_order("cpu"))
        cuda_order = ", ".join(op.auto_order("cuda"))
        print(f"  {op_name}  (override: {op.env_var}; auto order cpu: {cpu_order}; cuda: {cuda_order})")
        for backend in op.backends:
            reason = backend.unavailable_reason()
            print(f"    {backend.name:<12} {'available' if reason is None else 'unavailable: ' + reason}")
    print(f"attention auto order on this CPU: the rules for CPUs {CPU_ORDER_RULES.cpu}")
    if ONEDNN_FIRST_CPU:
        print(f"linear auto order on this CPU: onednn first from 2^{ONEDNN_MIN_MACS.bit_length() - 1} multiply-adds "
              "(AVX-512 on a CPU not made by Intel, where MKL's float32 GEMM leaves AVX-512 unused)")
    else:
        print("linear auto order on this CPU: torch first")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("env", help=__doc__.split(":", 1)[1].strip(), description=__doc__)
    parser.set_defaults(func=run)
