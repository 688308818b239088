"""Business-hours SLA arithmetic with fixed datetimes: lunch, evenings, weekends, holidays."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from db.models import Severity
from services.sla import (
    DEFAULT_CALENDAR,
    BusinessCalendar,
    CalendarError,
    add_business_time,
    business_time_between,
    sla_due,
)

TZ = ZoneInfo("Asia/Ho_Chi_Minh")


def vn(y: int, m: int, d: int, h: int, mi: int = 0) -> datetime:
    return datetime(y, m, d, h, mi, tzinfo=TZ)


# 2025-07-07 is a Monday.
@pytest.mark.parametrize(("start", "hours", "want"), [
    (vn(2025, 7, 7, 9), 1, vn(2025, 7, 7, 10)),
    (vn(2025, 7, 7, 11), 1, vn(2025, 7, 7, 14)),  # across lunch
    (vn(2025, 7, 7, 7, 30), 4, vn(2025, 7, 7, 11, 30)),  # a period used up exactly
    (vn(2025, 7, 7, 11, 30), 0.5, vn(2025, 7, 7, 14)),
    (vn(2025, 7, 7, 12), 1, vn(2025, 7, 7, 14, 30)),  # reported during lunch
    (vn(2025, 7, 7, 6), 1, vn(2025, 7, 7, 8, 30)),  # before the office opens
    (vn(2025, 7, 7, 20), 1, vn(2025, 7, 8, 8, 30)),  # evening
    (vn(2025, 7, 7, 17), 0.5, vn(2025, 7, 8, 8)),  # at closing time
    (vn(2025, 7, 11, 16), 2, vn(2025, 7, 14, 8, 30)),  # Friday → Monday
    (vn(2025, 7, 12, 10), 1, vn(2025, 7, 14, 8, 30)),  # reported on Saturday
    (vn(2025, 7, 7, 7, 30), 16, vn(2025, 7, 9, 8, 30)),  # 7.5 h a day
    (vn(2025, 4, 29, 16), 8, vn(2025, 5, 2, 16, 30)),  # 30/4 and 1/5 are holidays
    (vn(2025, 1, 24, 16), 2, vn(2025, 2, 3, 8, 30)),  # Tết Ất Tỵ 25/1–2/2
    (vn(2025, 8, 29, 16), 2, vn(2025, 9, 3, 8, 30)),  # National Day 1–2/9
    (vn(2025, 4, 4, 16, 30), 1, vn(2025, 4, 8, 8)),  # Hùng Kings Monday 7/4
    (vn(2025, 7, 7, 9), 0, vn(2025, 7, 7, 9)),
])
def test_add_business_time(start: datetime, hours: float, want: datetime) -> None:
    got = add_business_time(start, hours, DEFAULT_CALENDAR)
    assert got == want and got.tzinfo is UTC


def test_utc_in_utc_out() -> None:
    start = datetime(2025, 7, 7, 2, 0, tzinfo=UTC)  # 09:00 in Hanoi/HCMC
    assert add_business_time(start, 1) == datetime(2025, 7, 7, 3, 0, tzinfo=UTC)
    with pytest.raises(ValueError):
        add_business_time(datetime(2025, 7, 7, 9), 1)
    with pytest.raises(ValueError):
        add_business_time(start, -1)


@pytest.mark.parametrize(("a", "b", "hours"), [
    (vn(2025, 7, 7, 9), vn(2025, 7, 7, 14), 3),
    (vn(2025, 7, 11, 16), vn(2025, 7, 14, 8, 30), 2),
    (vn(2025, 7, 12, 8), vn(2025, 7, 13, 20), 0),  # a weekend
    (vn(2025, 4, 29, 7), vn(2025, 5, 2, 7), 7.5),  # holidays do not count
    (vn(2025, 7, 7, 12), vn(2025, 7, 7, 13), 0),  # lunch
    (vn(2025, 7, 7, 0), vn(2025, 7, 14, 0), 37.5),  # a full week
])
def test_business_time_between(a: datetime, b: datetime, hours: float) -> None:
    assert business_time_between(a, b) == timedelta(hours=hours)
    assert business_time_between(b, a) == -timedelta(hours=hours)


def test_between_inverts_add() -> None:
    start = vn(2025, 4, 28, 6, 15)
    for step in range(0, 200, 7):
        hours = step / 4
        s = start + timedelta(hours=step)
        assert business_time_between(s, add_business_time(s, hours)) == timedelta(hours=hours)


def test_due_per_severity() -> None:
    mon = vn(2025, 7, 7, 7, 30)
    assert sla_due(mon, Severity.critical) == vn(2025, 7, 7, 11, 30)
    assert sla_due(mon, "high") == vn(2025, 7, 8, 8)
    assert sla_due(mon, "normal") == vn(2025, 7, 9, 8, 30)
    assert sla_due(mon, "low") == vn(2025, 7, 14, 7, 30) + timedelta(hours=2.5)
    with pytest.raises(ValueError):
        sla_due(mon, "urgent")


def test_configured_calendar() -> None:
    cal = BusinessCalendar.from_config(
        workdays="mon-sat", hours="08:00-12:00", holidays="2025-07-08",
        extra_workdays="2025-07-13", due_hours="critical=2, low=10")
    assert cal.due_hours[Severity.critical] == 2 and cal.due_hours[Severity.high] == 8
    assert date(2025, 1, 1) in cal.holidays  # the defaults are kept
    # Mon 11:00 + 2 h → Tue is a holiday → Wed 09:00
    assert add_business_time(vn(2025, 7, 7, 11), 2, cal) == vn(2025, 7, 9, 9)
    # Saturday works, Sunday 13/7 is a make-up working day
    assert add_business_time(vn(2025, 7, 12, 11), 2, cal) == vn(2025, 7, 13, 9)
    only = BusinessCalendar.from_config(holidays="=2025-07-07")
    assert only.holidays == frozenset({date(2025, 7, 7)})
    assert add_business_time(vn(2025, 1, 1, 7, 30), 1, only) == vn(2025, 1, 1, 8, 30)
    wrap = BusinessCalendar.from_config(workdays="sat-mon")
    assert wrap.workdays == frozenset({5, 6, 0})


@pytest.mark.parametrize("kwargs", [
    {"tz": "Mars/Olympus"}, {"hours": "8-17"}, {"hours": "13:00-17:00,08:00-14:00"},
    {"workdays": "weekdays"}, {"holidays": "1/1/2025"}, {"due_hours": "urgent=1"},
    {"due_hours": "low=0"},
])
def test_bad_config(kwargs: dict[str, str]) -> None:
    with pytest.raises(CalendarError):
        BusinessCalendar.from_config(**kwargs)  # type: ignore[arg-type]


def test_calendar_without_working_time_fails_fast() -> None:
    cal = BusinessCalendar(workdays=frozenset(), extra_workdays=frozenset())
    with pytest.raises(CalendarError):
        add_business_time(vn(2025, 7, 7, 9), 1, cal)
