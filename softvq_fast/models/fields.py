"""Checks of single configuration and argument values. Each raises FieldError (a ValueError) in
one form, "<name> must be <what is expected>, got <value>", and returns the value (as float for
reals).

JSON and Python both let a bool pass as an int (True == 1) and a float pass where a count is
meant (16.0); both are refused, so a config that says `"num_codebooks": true` is named, not run.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Iterable


class FieldError(ValueError):
    """A value that one named field or argument (`name`) cannot take; callers such as the CLI
    map `name` to their own spelling of it."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def _fail(name: str, expected: str, value: Any) -> None:
    raise FieldError(name, f"{name} must be {expected}, got {value!r}")


def integer(name: str, value: Any, minimum: int = 1) -> int:
    """An integer (not a bool) >= minimum."""
    if not _is_integer(value, minimum):
        _fail(name, _integers(minimum), value)
    return int(value)


def optional_integer(name: str, value: Any, minimum: int = 1) -> int | None:
    """None, or an integer >= minimum."""
    if value is not None and not _is_integer(value, minimum):
        _fail(name, _integers(minimum) + " or None", value)
    return None if value is None else int(value)


def _is_integer(value: Any, minimum: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


def _integers(minimum: int) -> str:
    return "a positive integer" if minimum == 1 else f"an integer >= {minimum}"


def real(name: str, value: Any, *, above: float | None = None, at_least: float | None = None,
         below: float | None = None, at_most: float | None = None) -> float:
    """A finite real number (int or float, not a bool) within the given bounds."""
    limits = [(f"{sign} {limit:g}", test, limit) for sign, test, limit in (
        (">", operator.gt, above), (">=", operator.ge, at_least), ("<", operator.lt, below), ("<=", operator.le, at_most),
    ) if limit is not None]
    expected = " ".join(["a finite number", " and ".join(words for words, _, _ in limits)]).rstrip()
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or not all(test(value, limit) for _, test, limit in limits)):
        _fail(name, expected, value)
    return float(value)


def boolean(name: str, value: Any) -> bool:
    """True or False (JSON true/false), not 0/1 or a string."""
    if not isinstance(value, bool):
        _fail(name, "true or false", value)
    return value


def text(name: str, value: Any, choices: Iterable[str] | None = None) -> str:
    """A string, one of `choices` where given."""
    options = tuple(choices) if choices is not None else None
    if not isinstance(value, str) or (options is not None and value not in options):
        _fail(name, "a string" if options is None else "one of " + ", ".join(map(repr, options)), value)
    return value


def integer_list(name: str, value: Any, minimum: int = 1) -> list[int]:
    """A list of integers >= minimum."""
    if not isinstance(value, list) or not all(_is_integer(v, minimum) for v in value):
        _fail(name, f"a list of integers >= {minimum}", value)
    return value
