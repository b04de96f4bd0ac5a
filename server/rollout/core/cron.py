"""Maintenance windows: a 5-field cron line, a duration and an IANA timezone.

Pure: no IO, no dependency beyond ``zoneinfo``. The window is open at ``now``
when the latest cron start at or before ``now`` (in the window's local wall
time) is less than ``duration`` ago. Cron follows Vixie semantics: when both
day-of-month and day-of-week are restricted, either may match. A local time
skipped by a DST jump never starts a window; a repeated one starts it once.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from server.errors import InvalidInputError

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # Feb 29 can happen
_MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
_SEARCH_DAYS = 366 * 8 + 2  # covers "Feb 29" even across a skipped leap year (2100)
_DAY = timedelta(days=1)


@dataclass(frozen=True)
class CronExpr:
    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_any: bool
    weekdays_any: bool

    def matches_day(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.weekday() + 1) % 7 in self.weekdays
        if self.days_any or self.weekdays_any:
            return dom and dow
        return dom or dow

    def times(self) -> list[tuple[int, int]]:
        return sorted((h, m) for h in self.hours for m in self.minutes)


def _value(token: str, lo: int, hi: int, names: tuple[str, ...], what: str) -> int:
    token = token.lower()
    if names and token in names:
        return names.index(token) + (1 if names is _MONTHS else 0)
    if not token.isdigit() or not lo <= int(token) <= hi:
        raise InvalidInputError(f"cron {what} {token[:20]!r} must be a number from {lo} to {hi}")
    return int(token)


def _field(text: str, lo: int, hi: int, names: tuple[str, ...], what: str) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        body, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) < 1:
                raise InvalidInputError(f"cron {what} step {step_text[:20]!r} must be >= 1")
            step = int(step_text)
        if body == "*":
            first, last = lo, hi
        elif "-" in body:
            a, _, b = body.partition("-")
            first, last = _value(a, lo, hi, names, what), _value(b, lo, hi, names, what)
            if first > last:
                raise InvalidInputError(f"cron {what} range {body!r} runs backwards")
        else:
            first = _value(body, lo, hi, names, what)
            last = hi if slash else first
        values.update(range(first, last + 1, step))
    return frozenset(values)


def parse_cron(value: object) -> CronExpr:
    """``"0 2 * * mon-fri"``: minute hour day-of-month month day-of-week."""
    if not isinstance(value, str):
        raise InvalidInputError("window cron must be text like '0 2 * * *'")
    text = " ".join(value.split())
    fields = _MACROS.get(text.lower(), text).split(" ")
    if len(fields) != 5:
        raise InvalidInputError(
            f"window cron {text[:80]!r} must have 5 fields (minute hour day month weekday), "
            f"got {len(fields)}"
        )
    minutes = _field(fields[0], 0, 59, (), "minute")
    hours = _field(fields[1], 0, 23, (), "hour")
    days = _field(fields[2], 1, 31, (), "day-of-month")
    months = _field(fields[3], 1, 12, _MONTHS, "month")
    weekdays = _field(fields[4], 0, 7, _DAYS, "day-of-week")
    expr = CronExpr(
        text=text,
        minutes=minutes,
        hours=hours,
        days=days,
        months=months,
        weekdays=frozenset(d % 7 for d in weekdays),  # 7 is Sunday too
        days_any=fields[2].startswith("*"),
        weekdays_any=fields[4].startswith("*"),
    )
    if expr.weekdays_any and not any(
        min(expr.days) <= _MONTH_DAYS[month - 1] for month in expr.months
    ):
        raise InvalidInputError(f"window cron {text!r} never matches a real date")
    return expr


@dataclass(frozen=True)
class MaintenanceWindow:
    cron: CronExpr
    duration: timedelta
    zone: ZoneInfo

    def _start(self, day: date, hour: int, minute: int) -> datetime | None:
        """The UTC instant of a local start time, or None if DST skips it."""
        local = datetime(day.year, day.month, day.day, hour, minute, tzinfo=self.zone)
        instant = local.astimezone(timezone.utc)
        if instant.astimezone(self.zone).replace(tzinfo=None) != local.replace(tzinfo=None):
            return None
        return instant

    def last_start(self, now: datetime) -> datetime | None:
        """The latest window start at or before ``now``, within one duration back."""
        local_now = now.astimezone(self.zone)
        earliest = (now - self.duration).astimezone(self.zone).date() - _DAY
        times = self.cron.times()
        # Starts later on today's wall clock are after now (an hour of slack for DST).
        cut = bisect.bisect_right(times, (local_now.hour + 1, local_now.minute))
        day = local_now.date()
        while day >= earliest:
            if self.cron.matches_day(day):
                for hour, minute in reversed(times[:cut]):
                    start = self._start(day, hour, minute)
                    if start is not None and start <= now:
                        return start
            day -= _DAY
            cut = len(times)
        return None

    def is_open(self, now: datetime) -> bool:
        start = self.last_start(now)
        return start is not None and now < start + self.duration

    def closes_at(self, now: datetime) -> datetime | None:
        start = self.last_start(now)
        return start + self.duration if start is not None and now < start + self.duration else None

    def next_open(self, now: datetime) -> datetime | None:
        """When the window next opens after ``now`` (``now`` itself if open)."""
        if self.is_open(now):
            return now
        times = self.cron.times()
        day = now.astimezone(self.zone).date()
        for _ in range(_SEARCH_DAYS):
            if self.cron.matches_day(day):
                for hour, minute in times:
                    start = self._start(day, hour, minute)
                    if start is not None and start > now:
                        return start
            day += _DAY
        return None

    def to_json(self) -> dict[str, Any]:
        seconds = int(self.duration.total_seconds())
        return {"cron": self.cron.text, "duration": f"{seconds}s", "timezone": self.zone.key}


def parse_window(
    cron: object, duration: timedelta, tz: object, max_duration: timedelta
) -> MaintenanceWindow:
    """A maintenance window from a cron line, a parsed duration and a timezone name."""
    if not isinstance(tz, str) or not tz:
        raise InvalidInputError("window timezone must be an IANA name like Europe/Berlin")
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise InvalidInputError(f"window timezone {tz[:60]!r} is not a known IANA zone") from err
    if not timedelta(0) < duration <= max_duration:
        raise InvalidInputError(f"window duration must be above zero and at most {max_duration}")
    return MaintenanceWindow(parse_cron(cron), duration, zone)
