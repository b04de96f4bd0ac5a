"""Operator quantities: device amounts (% or count), percentages and durations.

Pure: no IO. Numbers are parsed from decimal text into exact ``Fraction`` values,
so a limit such as 0.1% of 1,000 devices is exactly one device, never 1.0000001.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction

from server.errors import InvalidInputError

_NUMBER = re.compile(r"^(\d{1,9})(?:\.(\d{1,6}))?$")
_DURATION = re.compile(r"^(?:(\d{1,5})d)?(?:(\d{1,6})h)?(?:(\d{1,7})m)?(?:(\d{1,9})s)?$")
HUNDRED = Fraction(100)
MAX_DURATION = timedelta(days=30)


def text_of(value: object, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidInputError(f"{what} must be text, got {type(value).__name__}")
    return str(value).strip()


def _number(text: str, what: str, expected: str) -> Fraction:
    if not _NUMBER.match(text):
        raise InvalidInputError(f"{what} {text[:40]!r} is not valid: expected {expected}")
    return Fraction(text)


def parse_number(value: object, what: str) -> Fraction:
    """A plain non-negative decimal such as ``"0.5"`` or ``100``."""
    return _number(text_of(value, what), what, "a number like 0.5")


def format_number(value: Fraction) -> str:
    return str(Decimal(value.numerator) / Decimal(value.denominator))


@dataclass(frozen=True)
class Amount:
    """A number of devices, either a percentage of some total or a plain count."""

    value: Fraction
    percent: bool

    def of(self, total: int) -> Fraction:
        """The exact number of devices this amount means out of ``total``."""
        return self.value * total / HUNDRED if self.percent else self.value

    def at_most(self, total: int) -> int:
        """Whole devices allowed by a maximum (rounded down, never above total)."""
        return min(total, math.floor(self.of(total)))

    def at_least(self, total: int) -> int:
        """Whole devices required by a minimum (rounded up, never above total)."""
        return min(total, math.ceil(self.of(total)))

    def exceeded_by(self, count: int, total: int) -> bool:
        return count > self.of(total)

    def __str__(self) -> str:
        return f"{format_number(self.value)}%" if self.percent else format_number(self.value)


def parse_amount(value: object, what: str, *, allow_zero: bool = True) -> Amount:
    """``"2%"`` (of the stage) or ``"3"`` (devices)."""
    text = text_of(value, what)
    expected = "a percentage like 2% or a device count like 3"
    if text.endswith("%"):
        number = _number(text[:-1].strip(), what, expected)
        if number > HUNDRED:
            raise InvalidInputError(f"{what} {text!r} is more than 100%")
        amount = Amount(number, percent=True)
    else:
        number = _number(text, what, expected)
        if number.denominator != 1:
            raise InvalidInputError(f"{what} {text!r}: a device count must be a whole number")
        amount = Amount(number, percent=False)
    if number == 0 and not allow_zero:
        raise InvalidInputError(f"{what} {text!r} must be more than zero")
    return amount


def parse_percent(value: object, what: str) -> Fraction:
    """A relative limit such as ``"10%"``; the % sign is required."""
    text = text_of(value, what)
    if not text.endswith("%"):
        raise InvalidInputError(f"{what} {text[:40]!r} must be a percentage like 10%")
    return _number(text[:-1].strip(), what, "a percentage like 10%")


def parse_fraction(value: object, what: str) -> Fraction:
    """An accuracy: ``"90%"`` or ``"0.9"``, between 0 and 1."""
    text = text_of(value, what)
    if text.endswith("%"):
        result = parse_percent(text, what) / HUNDRED
    else:
        result = _number(text, what, "a percentage like 90% or a fraction like 0.9")
    if result > 1:
        raise InvalidInputError(f"{what} {text!r} must be at most 100% (or 1.0)")
    return result


def parse_duration(
    value: object, what: str, *, allow_zero: bool = False, longest: timedelta = MAX_DURATION
) -> timedelta:
    """``"45s"``, ``"30m"``, ``"2h"``, ``"1d"`` or combinations like ``"1h30m"``."""
    text = text_of(value, what).lower()
    match = _DURATION.match(text)
    if not text or match is None:
        raise InvalidInputError(
            f"{what} {text[:40]!r} is not a duration: use a number with a unit, like 45s, 30m, "
            "2h, 1d or 1h30m"
        )
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    result = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    if not allow_zero and result <= timedelta(0):
        raise InvalidInputError(f"{what} {text!r} must be longer than zero")
    if result > longest:
        raise InvalidInputError(f"{what} {text!r} is longer than {format_duration(longest)}")
    return result


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    if seconds == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def parse_whole(value: object, what: str, minimum: int = 0) -> int:
    text = text_of(value, what)
    if not text.isdigit() or int(text) < minimum:
        raise InvalidInputError(f"{what} {text[:40]!r} must be a whole number >= {minimum}")
    return int(text)
