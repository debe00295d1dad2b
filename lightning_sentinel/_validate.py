"""Argument checks shared by every callback's ``__init__``: one rule, one message format.

Every bad setting is refused at construction, before the ``Trainer`` exists, with a message of the
form ``"`argument` must be <what is allowed>, got <value>"``:

- a value of the wrong type (a string for a number, a float for an integer, a string where a list
  is expected) raises :class:`ArgumentTypeError`, a ``TypeError`` that is also a ``ValueError``, so
  that ``except ValueError`` still catches every bad setting (the contract in ``DESIGN.md``);
- a value of the right type outside what is allowed (a negative count, a share above 1, NaN or
  infinity for a number, an unknown choice, an invalid regular expression) raises ``ValueError``.

``bool`` is never accepted as a number (``True`` is an ``int`` to Python, not a step count); numpy
and other ``numbers.Integral`` / ``numbers.Real`` scalars are, and are returned as ``int`` / ``float``
so that the stored settings (and the ``state_key`` built from them) are plain Python values.

Example:
    >>> from lightning_sentinel._validate import require_int, require_number
    >>> require_int("window", 4)
    4
    >>> require_number("margin", 0.05, above=0, below=1)
    0.05
    >>> require_number("margin", 1.5, above=0, below=1)
    Traceback (most recent call last):
    ...
    ValueError: `margin` must be a number in (0, 1), got 1.5
    >>> require_int("window", "4")
    Traceback (most recent call last):
    ...
    lightning_sentinel._validate.ArgumentTypeError: `window` must be an integer >= 1, got '4' (type str)
"""

from __future__ import annotations

import math
import numbers
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

_T = TypeVar("_T")


class ArgumentTypeError(TypeError, ValueError):
    """A setting of the wrong type: a ``TypeError``, and a ``ValueError`` like every other bad setting."""


def _got(value: Any, with_type: bool = False) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"got {text} (type {type(value).__name__})" if with_type else f"got {text}"


def _wrong_type(argument: str, allowed: str, value: Any) -> ArgumentTypeError:
    return ArgumentTypeError(f"`{argument}` must be {allowed}, {_got(value, with_type=True)}")


def _out_of_range(argument: str, allowed: str, value: Any) -> ValueError:
    return ValueError(f"`{argument}` must be {allowed}, {_got(value)}")


def _or_none(allowed: str, allow_none: bool) -> str:
    return f"{allowed} or None" if allow_none else allowed


def require_choice(argument: str, value: Any, choices: Iterable[str], *, allow_none: bool = False) -> Any:
    """Return ``value`` if it is one of ``choices`` (or ``None`` when allowed), else raise ``ValueError``."""
    options = list(choices)
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or value not in options:
        raise _out_of_range(argument, _or_none(f"one of {options}", allow_none), value)
    return value


def require_int(argument: str, value: Any, *, minimum: int = 1, allow_none: bool = False) -> Any:
    """Return ``value`` as an ``int`` if it is an integer >= ``minimum`` (or an allowed ``None``)."""
    if value is None and allow_none:
        return None
    allowed = _or_none(f"an integer >= {minimum}", allow_none)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _wrong_type(argument, allowed, value)
    if value < minimum:
        raise _out_of_range(argument, allowed, value)
    if value > sys.maxsize:  # counts size deques and ranges: beyond ssize_t they overflow
        raise _out_of_range(
            argument, _or_none(f"an integer from {minimum} to {sys.maxsize}", allow_none), value
        )
    return int(value)


def _interval(above: float | None, at_least: float | None, below: float | None, at_most: float | None) -> str:
    low = "" if above is None and at_least is None else f"{'(' if above is not None else '['}"
    low_value = above if above is not None else at_least
    high_value = below if below is not None else at_most
    if low_value is not None and high_value is not None:
        return f"a number in {low}{low_value:g}, {high_value:g}{')' if below is not None else ']'}"
    if low_value is not None:
        return f"a finite number {'>' if above is not None else '>='} {low_value:g}"
    if high_value is not None:
        return f"a finite number {'<' if below is not None else '<='} {high_value:g}"
    return "a finite number"


def require_number(
    argument: str,
    value: Any,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    allow_none: bool = False,
) -> Any:
    """Return ``value`` as a ``float`` if it is a finite real number within the given bounds.

    ``above``/``below`` are exclusive bounds, ``at_least``/``at_most`` inclusive ones (give at most one
    of each pair). NaN and +-infinity are always refused.
    """
    if value is None and allow_none:
        return None
    allowed = _or_none(_interval(above, at_least, below, at_most), allow_none)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _wrong_type(argument, allowed, value)
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        raise _out_of_range(argument, allowed, value) from None
    if (
        not math.isfinite(number)
        or (above is not None and not number > above)
        or (at_least is not None and not number >= at_least)
        or (below is not None and not number < below)
        or (at_most is not None and not number <= at_most)
    ):
        raise _out_of_range(argument, allowed, value)
    return number


def require_bool(argument: str, value: Any) -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (not ``1``, ``"yes"`` or ``None``)."""
    if not isinstance(value, bool):
        raise _wrong_type(argument, "True or False", value)
    return value


def require_text(argument: str, value: Any) -> str:
    """Return ``value`` if it is a non-empty string."""
    if not isinstance(value, str):
        raise _wrong_type(argument, "a non-empty string", value)
    if not value:
        raise _out_of_range(argument, "a non-empty string", value)
    return value


def require_key(argument: str, value: Any) -> Any:
    """Return ``value`` if it is a batch key: a string (mapping key or attribute), an integer index or ``None``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, numbers.Integral))):
        raise _wrong_type(argument, "a string, an integer or None", value)
    return int(value) if isinstance(value, numbers.Integral) else value


def require_regex(argument: str, value: Any, *, allow_none: bool = False) -> Any:
    """Return ``value`` if it is a valid regular expression (a string), or an allowed ``None``."""
    if value is None and allow_none:
        return None
    allowed = _or_none("a valid regular expression (a string)", allow_none)
    if not isinstance(value, str):
        raise _wrong_type(argument, allowed, value)
    try:
        re.compile(value)
    except re.error as error:
        raise ValueError(f"`{argument}` must be {allowed}, {_got(value)}: {error}") from None
    return value


def require_list(argument: str, value: Any, item_type: type[_T], item_name: str) -> list[_T]:
    """Return ``value`` as a list if it is ``None`` (empty) or a list/tuple of ``item_type``.

    A lone string or item is refused rather than iterated: ``allow="dropout"`` would otherwise become
    the seven one-letter patterns ``d``, ``r``, ...
    """
    allowed = f"a list of {item_name} or None"
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise _wrong_type(argument, allowed, value)
    items = list(value)
    for item in items:
        if not isinstance(item, item_type):
            raise ArgumentTypeError(
                f"`{argument}` must be {allowed}, got an item {_got(item, with_type=True)[4:]}"
            )
    return items


def require_order(
    lower_argument: str, lower: float, upper_argument: str, upper: float, *, or_equal: bool = False
) -> None:
    """Raise ``ValueError`` naming both settings unless ``lower < upper`` (``<=`` with ``or_equal``)."""
    if or_equal and not lower <= upper:
        raise ValueError(f"`{lower_argument}` ({lower!r}) must not exceed `{upper_argument}` ({upper!r})")
    if not or_equal and not lower < upper:
        raise ValueError(f"`{lower_argument}` ({lower!r}) must be below `{upper_argument}` ({upper!r})")


__all__ = [
    "ArgumentTypeError",
    "require_bool",
    "require_choice",
    "require_int",
    "require_key",
    "require_list",
    "require_number",
    "require_order",
    "require_regex",
    "require_text",
]
