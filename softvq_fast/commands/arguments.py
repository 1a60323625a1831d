"""Argument types and checks shared by the subcommands: bad values fail at parse time (or before
any work) with one line that names the option."""
from __future__ import annotations

import argparse

import torch


def _integer(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _integer(text, 0)


def device(text: str) -> torch.device:
    """argparse type: a torch device string ("cpu", "cuda", "cuda:1", ...); meta holds no data."""
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if parsed.type == "meta":
        raise argparse.ArgumentTypeError("meta holds no data; expected a device such as cpu or cuda")
    return parsed


def check_device_usable(device: torch.device, option: str = "--device") -> None:
    """SystemExit naming `option` unless a tensor can be made on `device` (a CUDA device on a
    machine without one, or an index past the last GPU, fails here rather than after loading)."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SystemExit(f"{option}: {device} is not usable here ({reason})") from None
