"""Service-level deadlines counted in business hours, the way the provincial helpdesk works.

A ticket reported on Friday at 16:30 with 4 business hours is due on Monday morning, not on
Friday night: deadlines are counted only inside working periods (Mon–Fri 07:30–11:30 and
13:30–17:00 in Asia/Ho_Chi_Minh by default), skipping weekends and public holidays. Everything
here is pure (no DB); datetimes in and out are timezone-aware (the DB stores UTC).

Default holidays are only the dates of Vietnam's public holidays that are certain for 2025–2026
(Labour Code 2019 art. 112 and the published 2025 schedules). Swapped working days and the
2026 Tết and Hùng Kings dates are announced year by year: operators add them through
``BusinessCalendar.from_config`` (``holidays`` / ``extra_workdays``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from types import MappingProxyType
from zoneinfo import ZoneInfo

from db.models import Severity

DEFAULT_TZ = "Asia/Ho_Chi_Minh"
DEFAULT_PERIODS: tuple[tuple[time, time], ...] = (
    (time(7, 30), time(11, 30)),
    (time(13, 30), time(17, 0)),
)
DEFAULT_WORKDAYS = frozenset({0, 1, 2, 3, 4})  # Monday = 0
DEFAULT_DUE_HOURS: Mapping[Severity, float] = MappingProxyType({
    Severity.critical: 4.0,
    Severity.high: 8.0,
    Severity.normal: 16.0,
    Severity.low: 40.0,
})


def _days(start: date, end: date) -> list[date]:
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


# Public holidays certain for 2025–2026. 2025: New Year; Tết Ất Tỵ for public servants
# 25 Jan–2 Feb (Mon 27–Fri 31 are the working days off); Hùng Kings 10/3 lunar = Mon 7 Apr;
# 30 Apr, 1 May; National Day 1–2 Sep. 2026: the fixed solar-calendar days only.
VN_HOLIDAYS_2025_2026: frozenset[date] = frozenset({
    date(2025, 1, 1),
    *_days(date(2025, 1, 25), date(2025, 2, 2)),
    date(2025, 4, 7),
    date(2025, 4, 30),
    date(2025, 5, 1),
    date(2025, 9, 1),
    date(2025, 9, 2),
    date(2026, 1, 1),
    date(2026, 4, 30),
    date(2026, 5, 1),
    date(2026, 9, 2),
})

_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_MAX_DAYS = 366 * 20  # a calendar without working time must not loop forever


class CalendarError(ValueError):
    """A calendar setting that cannot be parsed or has no working time."""


@dataclass(frozen=True)
class BusinessCalendar:
    """When the helpdesk works, and how many business hours each severity gets."""

    tz: ZoneInfo = field(default_factory=lambda: ZoneInfo(DEFAULT_TZ))
    workdays: frozenset[int] = DEFAULT_WORKDAYS
    periods: tuple[tuple[time, time], ...] = DEFAULT_PERIODS
    holidays: frozenset[date] = VN_HOLIDAYS_2025_2026
    extra_workdays: frozenset[date] = frozenset()  # make-up Saturdays announced each year
    due_hours: Mapping[Severity, float] = field(default_factory=lambda: DEFAULT_DUE_HOURS)

    def __post_init__(self) -> None:
        last = time.min
        for start, end in self.periods:
            if not start < end or start < last:
                raise CalendarError("periods must be ordered and not overlap")
            last = end
        for sev in Severity:
            if self.due_hours.get(sev, 0) <= 0:
                raise CalendarError(f"due hours for {sev} must be positive")

    @classmethod
    def from_config(
        cls,
        *,
        tz: str = DEFAULT_TZ,
        workdays: str = "mon-fri",
        hours: str = "07:30-11:30,13:30-17:00",
        holidays: str | Iterable[date] | None = None,
        extra_workdays: str | Iterable[date] = (),
        due_hours: str | Mapping[str, float] | None = None,
    ) -> BusinessCalendar:
        """Build from settings strings, e.g. ``workdays="mon-fri"``, ``hours="08:00-17:00"``,
        ``holidays="2026-02-16,2026-02-17"`` (added to the defaults; prefix ``=`` to replace
        them), ``due_hours="critical=2,high=6"`` (others keep their defaults)."""
        try:
            zone = ZoneInfo(tz)
        except Exception as exc:
            raise CalendarError(f"unknown time zone {tz!r}") from exc
        return cls(
            tz=zone,
            workdays=_parse_workdays(workdays),
            periods=_parse_periods(hours),
            holidays=_parse_holidays(holidays),
            extra_workdays=frozenset(_parse_dates(extra_workdays)),
            due_hours=_parse_due_hours(due_hours),
        )

    def is_workday(self, day: date) -> bool:
        if day in self.extra_workdays:
            return True
        return day.weekday() in self.workdays and day not in self.holidays

    def periods_on(self, day: date) -> Iterator[tuple[datetime, datetime]]:
        """The working periods of one local day as aware datetimes (none on days off)."""
        if not self.is_workday(day):
            return
        for start, end in self.periods:
            yield (datetime.combine(day, start, tzinfo=self.tz),
                   datetime.combine(day, end, tzinfo=self.tz))

    def hours_for(self, severity: Severity | str) -> float:
        return self.due_hours[Severity(severity)]


DEFAULT_CALENDAR = BusinessCalendar()


def _parse_workdays(text: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.lower().replace(" ", "").split(","):
        if not part:
            continue
        a, _, b = part.partition("-")
        if a not in _WEEKDAYS or (b and b not in _WEEKDAYS):
            raise CalendarError(f"bad working days {text!r}")
        i, j = _WEEKDAYS.index(a), _WEEKDAYS.index(b or a)
        out.update(range(i, j + 1) if i <= j else [*range(i, 7), *range(0, j + 1)])
    if not out:
        raise CalendarError("no working days")
    return frozenset(out)


def _parse_periods(text: str) -> tuple[tuple[time, time], ...]:
    try:
        periods = []
        for part in text.replace(" ", "").split(","):
            if part:
                a, b = part.split("-")
                periods.append((time.fromisoformat(a), time.fromisoformat(b)))
    except ValueError as exc:
        raise CalendarError(f"bad working hours {text!r}") from exc
    if not periods:
        raise CalendarError("no working hours")
    return tuple(sorted(periods))


def _parse_dates(value: str | Iterable[date] | None) -> list[date]:
    if value is None:
        return []
    if not isinstance(value, str):
        return list(value)
    try:
        return [date.fromisoformat(p) for p in value.replace(" ", "").split(",") if p]
    except ValueError as exc:
        raise CalendarError(f"bad date list {value!r}") from exc


def _parse_holidays(value: str | Iterable[date] | None) -> frozenset[date]:
    if isinstance(value, str) and value.strip().startswith("="):
        return frozenset(_parse_dates(value.strip()[1:]))
    return VN_HOLIDAYS_2025_2026 | frozenset(_parse_dates(value))


def _parse_due_hours(value: str | Mapping[str, float] | None) -> Mapping[Severity, float]:
    out = dict(DEFAULT_DUE_HOURS)
    if value is None:
        return MappingProxyType(out)
    items: list[tuple[str, float | str]] = []
    if isinstance(value, str):
        for part in value.replace(" ", "").split(","):
            if part:
                key, _, hours = part.partition("=")
                items.append((key, hours))
    else:
        items.extend(value.items())
    try:
        for key, hours in items:
            out[Severity(str(key).lower())] = float(hours)
    except ValueError as exc:
        raise CalendarError(f"bad due hours {value!r}") from exc
    return MappingProxyType(out)


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("naive datetime")
    return value


def add_business_time(start: datetime, hours: float,
                      cal: BusinessCalendar | None = None) -> datetime:
    """The moment ``hours`` of working time after ``start`` (returned in UTC).

    Time outside working periods does not count; a deadline that uses up a period exactly
    ends at that period's end (4 h from 07:30 → 11:30 the same day, not 13:30).
    """
    cal = cal or DEFAULT_CALENDAR
    if hours < 0:
        raise ValueError("hours must not be negative")
    cursor = _aware(start).astimezone(cal.tz)
    remaining = timedelta(hours=hours)
    if not remaining:
        return cursor.astimezone(UTC)
    day = cursor.date()
    for _ in range(_MAX_DAYS):
        for p_start, p_end in cal.periods_on(day):
            if cursor >= p_end:
                continue
            begin = max(cursor, p_start)
            available = p_end - begin
            if remaining <= available:
                return (begin + remaining).astimezone(UTC)
            remaining -= available
        day += timedelta(days=1)
    raise CalendarError("the calendar has no working time")


def business_time_between(a: datetime, b: datetime,
                          cal: BusinessCalendar | None = None) -> timedelta:
    """Working time from ``a`` to ``b``; negative when ``b`` is before ``a``."""
    cal = cal or DEFAULT_CALENDAR
    a, b = _aware(a).astimezone(cal.tz), _aware(b).astimezone(cal.tz)
    if b < a:
        return -business_time_between(b, a, cal)
    total = timedelta(0)
    day = a.date()
    while day <= b.date():
        for p_start, p_end in cal.periods_on(day):
            lo, hi = max(a, p_start), min(b, p_end)
            if hi > lo:
                total += hi - lo
        day += timedelta(days=1)
    return total


def sla_due(created_at: datetime, severity: Severity | str,
            cal: BusinessCalendar | None = None) -> datetime:
    """When a ticket of ``severity`` created at ``created_at`` must be resolved (UTC)."""
    cal = cal or DEFAULT_CALENDAR
    return add_business_time(created_at, cal.hours_for(severity), cal)
