"""Argument types and checks shared by the subcommands: bad values fail at parse time (or before
any work) with one line that names the option."""
from __future__ import annotations

import argparse
import contextlib
import math
from typing import Callable, Iterator

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


class UsageError(Exception):
    """An argument the command cannot use, found after parsing (a missing folder, a checkpoint that
    does not load). `softvq_fast.cli.main` prints it as argparse prints the values it rejects
    itself, `softvq-fast COMMAND: error: <message>`, and exits with status 2; failures of a run
    that had valid arguments exit with status 1."""


def check_device_usable(device: torch.device, option: str = "--device") -> None:
    """UsageError naming `option` unless a tensor can be made on `device` (a CUDA device on a
    machine without one, or an index past the last GPU, fails here rather than after loading)."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{option}: {device} is not usable here ({reason})") from None


def _real(text: str, accept, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and accept(value)):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _real(text, lambda v: v > 0, "a number > 0")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _real(text, lambda v: v >= 0, "a number >= 0")


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    return _real(text, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def unit_interval(text: str) -> float:
    """argparse type: a number in [0, 1) (a decay, a beta)."""
    return _real(text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def checked_by(check: Callable[[str], object]) -> Callable[[str], str]:
    """argparse type: the text itself, when check(text) raises no ValueError (whose message becomes
    the error)."""
    def parse(text: str) -> str:
        try:
            check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return parse


@contextlib.contextmanager
def training_errors() -> Iterator[None]:
    """A trainer's setting or input it cannot train (FieldError, SetupError) as a UsageError
    naming the option, a run that cannot go on (TrainingError) as a one-line SystemExit (status 1)
    naming why."""
    from softvq_fast.models.fields import FieldError
    from softvq_fast.training.loop import SetupError, TrainingError

    try:
        yield
    except FieldError as exc:
        raise UsageError(f"--{exc.name.replace('_', '-').split('[')[0]}: {exc}") from None
    except SetupError as exc:
        raise UsageError(f"--{exc.argument.replace('_', '-')}: {exc.message}") from None
    except TrainingError as exc:
        raise SystemExit(f"error: {exc}") from None
