"""Entry point: `python -m bench [--suite NAME ...] [--quick|--full] [--device DEV] [--out DIR] [--record]`."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from bench.harness import SUITES, run_suites


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run softvq-fast benchmark suites, print their tables and write results.json, "
        "results.md and one PNG per suite. Quick mode (reduced sizes that fit a 2-core CPU) is the "
        "default without a GPU; full mode (the paper's and the issues' shapes) the default with one. "
        "With several suites each runs in a fresh child process, so that none is measured in the state "
        "(allocator, caches) the others left.",
    )
    parser.add_argument("--suite", action="append", choices=SUITES, help="suite to run (repeatable; default: all)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="reduced sizes (default without a GPU)")
    mode.add_argument("--full", action="store_true", help="full sizes (default with a GPU)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default=None, help="results folder (default: bench/results/<device type>)")
    parser.add_argument("--record", action="store_true", help="also replace this device's tables in bench/RESULTS.md")
    parser.add_argument("--child-results", default=None, help=argparse.SUPPRESS)  # a child of an isolated run
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick or (not args.full and device.type != "cuda")
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", device.type)
    names = args.suite or list(SUITES)
    if args.child_results is not None and len(names) != 1:
        parser.error("--child-results takes one --suite")
    # several suites: each in its own process, so that none is measured in what the others left
    return run_suites(names, device, quick, out_dir, args.record, isolated=len(names) > 1 and args.child_results is None,
                      child_results=args.child_results)


if __name__ == "__main__":
    sys.exit(main())
