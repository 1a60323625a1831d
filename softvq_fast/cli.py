"""The `softvq-fast` console script: one subcommand per module in `softvq_fast.commands`."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines `register(subparsers)`, which adds its parser and sets `func(args) -> int`;
# `args.error` is that parser's error (a one-line usage error, exit status 2).
COMMANDS = ("env", "calibrate", "reconstruct", "encode_dataset", "generate", "profile", "sample", "fid", "train_generator",
            "train_tokenizer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softvq-fast",
        description="Fast SoftVQ-VAE tokenizers and generators: environment report, tools and benchmarks.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"softvq_fast.commands.{name}").register(subparsers)
    for command in subparsers.choices.values():
        command.set_defaults(error=command.error)
    return parser


def main(argv: list[str] | None = None) -> int:
    from softvq_fast.commands.arguments import UsageError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        args.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
