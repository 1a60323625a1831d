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


def _cpu_rule_lines() -> list[str]:
    from softvq_fast.ops import cpu_rules
    from softvq_fast.ops.calibration import PLANS

    machine = cpu_rules.MACHINE
    lines = [f"machine: {machine.model or 'unknown model'}, vendor {machine.vendor or 'unknown'}, ISA {machine.isa}, "
             f"{cpu_rules.torch_threads()} torch threads",
             f"calibration file: {cpu_rules.calibration_status()}"]
    for op, plan in PLANS.items():
        try:
            lines.append(f"{op}: {cpu_rules.cpu_rule(op).describe(f'{plan.default} first')}")
        except ValueError as exc:
            lines.append(f"{op}: {exc}")
    return lines


def run(args: argparse.Namespace) -> int:
    from softvq_fast.dispatch import registered_ops

    for key, value in _versions():
        print(f"{key:<12} {value}")
    print("devices:")
    for line in _devices():
        print(f"  {line}")
    print("backends (`auto` takes the first usable one of the op's order for the inputs):")
    for op_name, op in registered_ops().items():
        print(f"  {op_name}  (override: {op.env_var}; auto order: {op.order_summary})")
        for backend in op.backends:
            reason = backend.unavailable_reason()
            print(f"    {backend.name:<12} {'available' if reason is None else 'unavailable: ' + reason}")
    print("CPU rules in force (`softvq-fast calibrate` measures this machine):")
    for line in _cpu_rule_lines():
        print(f"  {line}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("env", help=__doc__.split(":", 1)[1].strip(), description=__doc__)
    parser.set_defaults(func=run)
