"""`softvq-fast calibrate`: time the CPU backends on this machine and store the rules `auto` uses."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from softvq_fast.ops import cpu_rules
from softvq_fast.ops.calibration import PLANS, calibrate


def run(args: argparse.Namespace) -> int:
    path = Path(args.file) if args.file else cpu_rules.calibration_path()
    key = cpu_rules.calibration_key(torch.get_num_threads())
    print(f"calibrating {', '.join(args.ops)} for {key}{' (quick)' if args.quick else ''}", flush=True)
    progress = (lambda line: print(f"  {line}", flush=True)) if args.verbose else None
    rules = calibrate(args.ops, quick=args.quick, path=path, progress=progress)
    print(f"wrote {path}")
    for op, rule in rules.items():
        print(f"  {op}: {rule.describe(f'{PLANS[op].default} first')}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate", help=__doc__.split(":", 1)[1].strip(), description=__doc__ + (
            " The rules apply to this CPU model, vendor, ISA, torch thread count and torch version only; "
            "run it with the thread count your programs use (OMP_NUM_THREADS). "
            "SOFTVQ_FAST_CPU_RULES=builtin ignores the file; SOFTVQ_FAST_CACHE_DIR moves it."))
    parser.add_argument("--ops", nargs="+", choices=list(PLANS), default=list(PLANS),
                        help="the ops to calibrate (default: all)")
    parser.add_argument("--quick", action="store_true", help="a few small cases only (a smoke check)")
    parser.add_argument("--file", help="the calibration file (default: cpu_rules.json in $SOFTVQ_FAST_CACHE_DIR, "
                                       "else ~/.cache/softvq-fast)")
    parser.add_argument("--verbose", action="store_true", help="print each case's timings")
    parser.set_defaults(func=run)
