"""Ticket statistics for operators: how much arrives, how fast support answers and resolves,
how often the SLA is missed and how satisfied reporters are — per system and per unit.

The cohort is the tickets *created* in [since, until): every figure describes the same tickets,
so a month's report does not mix old tickets' resolutions into new tickets' volume. Durations
are medians (a few stuck tickets do not hide the typical case), in wall-clock time and in
business time (``services.sla`` calendar), because "4 hours" means little across a weekend.
"""

from __future__ import annotations

import io
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import Severity, System, Ticket, TicketStatus, Unit
from services.sla import DEFAULT_CALENDAR, BusinessCalendar, business_time_between
from services.texts import t

_DONE = (TicketStatus.resolved.value, TicketStatus.closed.value)


@dataclass(frozen=True)
class Durations:
    """Median of one duration over the tickets that have it."""

    count: int
    median_wall: timedelta | None
    median_business: timedelta | None


@dataclass(frozen=True)
class GroupStats:
    """One system or one unit (code None = tickets without one)."""

    code: str | None
    name_vi: str | None
    name_en: str | None
    total: int
    open: int
    breached: int
    csat_count: int
    csat_avg: float | None

    def name(self, lang: str | None = "vi") -> str | None:
        return self.name_en if lang == "en" else self.name_vi


@dataclass(frozen=True)
class Stats:
    since: datetime
    until: datetime
    now: datetime
    total: int
    by_status: dict[TicketStatus, int]  # every status, zeros included
    by_severity: dict[Severity, int]
    first_response: Durations
    resolution: Durations
    breached: int  # resolved after the due time, or still open past it
    csat_count: int
    csat_avg: float | None
    by_system: list[GroupStats]  # most tickets first
    by_unit: list[GroupStats]

    @property
    def breach_rate(self) -> float | None:
        return self.breached / self.total if self.total else None


def median(values: Sequence[timedelta]) -> timedelta | None:
    """The middle value (mean of the two middle ones for an even count), None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2


def _durations(pairs: Iterable[tuple[datetime, datetime]], cal: BusinessCalendar) -> Durations:
    items = list(pairs)
    return Durations(
        len(items),
        median([b - a for a, b in items]),
        median([business_time_between(a, b, cal) for a, b in items]),
    )


def _avg(values: Sequence[int]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


@dataclass
class _Acc:
    total: int = 0
    open: int = 0
    breached: int = 0
    csat: list[int] = field(default_factory=list)

    def add(self, is_open: bool, breached: bool, csat: int | None) -> None:
        self.total += 1
        self.open += is_open
        self.breached += breached
        if csat is not None:
            self.csat.append(csat)


def _is_breached(row: Any, now: datetime) -> bool:
    if row.sla_due_at is None:
        return False
    if row.sla_breached_at is not None:
        return True
    end = (row.resolved_at or row.closed_at or now) if row.status in _DONE else now
    return end > row.sla_due_at


async def ticket_stats(
    session: AsyncSession,
    *,
    since: datetime,
    until: datetime,
    now: datetime,
    cal: BusinessCalendar | None = None,
) -> Stats:
    """Figures for the tickets created in [since, until), as of ``now``."""
    cal = cal or DEFAULT_CALENDAR
    rows = (await session.execute(
        select(Ticket.status, Ticket.severity, Ticket.system_code, Ticket.unit_code,
               Ticket.created_at, Ticket.first_response_at, Ticket.resolved_at,
               Ticket.closed_at, Ticket.sla_due_at, Ticket.sla_breached_at, Ticket.csat)
        .where(Ticket.created_at >= since, Ticket.created_at < until)
    )).all()
    by_status: Counter[str] = Counter()
    by_severity: Counter[str] = Counter()
    systems: dict[str | None, _Acc] = defaultdict(_Acc)
    units: dict[str | None, _Acc] = defaultdict(_Acc)
    first: list[tuple[datetime, datetime]] = []
    resolve: list[tuple[datetime, datetime]] = []
    csat: list[int] = []
    breached = 0
    for r in rows:
        by_status[r.status] += 1
        by_severity[r.severity] += 1
        if r.first_response_at is not None:
            first.append((r.created_at, r.first_response_at))
        if r.resolved_at is not None:
            resolve.append((r.created_at, r.resolved_at))
        miss = _is_breached(r, now)
        breached += miss
        if r.csat is not None:
            csat.append(r.csat)
        is_open = r.status not in _DONE
        systems[r.system_code].add(is_open, miss, r.csat)
        units[r.unit_code].add(is_open, miss, r.csat)

    sys_names = {c: (vi, en) for c, vi, en in await session.execute(
        select(System.code, System.name_vi, System.name_en)
        .where(System.code.in_([c for c in systems if c])))}
    unit_names = {c: n for c, n in await session.execute(
        select(Unit.code, Unit.name).where(Unit.code.in_([c for c in units if c])))}

    def groups(accs: dict[str | None, _Acc],
               names: dict[str, tuple[str, str]]) -> list[GroupStats]:
        out = [GroupStats(code, *names.get(code or "", (None, None)), a.total, a.open,
                          a.breached, len(a.csat), _avg(a.csat))
               for code, a in accs.items()]
        return sorted(out, key=lambda g: (-g.total, g.code is None, g.code or ""))

    return Stats(
        since=since, until=until, now=now, total=len(rows),
        by_status={s: by_status.get(s.value, 0) for s in TicketStatus},
        by_severity={s: by_severity.get(s.value, 0) for s in Severity},
        first_response=_durations(first, cal),
        resolution=_durations(resolve, cal),
        breached=breached,
        csat_count=len(csat),
        csat_avg=_avg(csat),
        by_system=groups(systems, sys_names),
        by_unit=groups(units, {c: (n, n) for c, n in unit_names.items()}),
    )


# ------------------------------------------------------------------------------------ XLSX


def _hours(value: timedelta | None) -> float | None:
    return round(value.total_seconds() / 3600, 2) if value is not None else None


def export_stats_xlsx(stats: Stats, lang: str | None = "vi", *,
                      tz: ZoneInfo | None = None) -> bytes:
    """The statistics as a workbook: a summary sheet, one sheet per system, one per unit."""
    from openpyxl import Workbook
    from openpyxl.styles import Font, PatternFill

    tz = tz or DEFAULT_CALENDAR.tz
    bold = Font(bold=True)
    fill = PatternFill("solid", fgColor="FFD9E1F2")

    def x(key: str) -> str:
        return t(f"ticket.xlsx.{key}", lang)

    def local(value: datetime) -> datetime:  # Excel has no time zones: local wall time
        return value.astimezone(tz).replace(tzinfo=None)

    wb = Workbook()
    ws = wb.active
    assert ws is not None
    ws.title = x("sheet_summary")[:31]
    ws.append([x("metric"), x("value")])
    fr, rs = stats.first_response, stats.resolution
    summary: list[tuple[str, Any]] = [
        ("period_from", local(stats.since)), ("period_to", local(stats.until)),
        ("total", stats.total),
        ("first_response_count", fr.count),
        ("first_response_median_wall_h", _hours(fr.median_wall)),
        ("first_response_median_business_h", _hours(fr.median_business)),
        ("resolved_count", rs.count),
        ("resolve_median_wall_h", _hours(rs.median_wall)),
        ("resolve_median_business_h", _hours(rs.median_business)),
        ("breached", stats.breached),
        ("breach_rate", stats.breach_rate),
        ("csat_count", stats.csat_count), ("csat_avg", stats.csat_avg),
    ]
    for key, value in summary:
        ws.append([x(key), value])
        if isinstance(value, datetime):
            ws.cell(ws.max_row, 2).number_format = "yyyy-mm-dd hh:mm"
        elif key == "breach_rate":
            ws.cell(ws.max_row, 2).number_format = "0.0%"
    ws.append([])
    ws.append([x("by_status")])
    ws.cell(ws.max_row, 1).font = bold
    for status, n in stats.by_status.items():
        ws.append([t(f"ticket.status.{status.value}", lang), n])
    ws.append([])
    ws.append([x("by_severity")])
    ws.cell(ws.max_row, 1).font = bold
    for sev, n in stats.by_severity.items():
        ws.append([t(f"ticket.severity.{sev.value}", lang), n])
    ws.column_dimensions["A"].width = 44
    ws.column_dimensions["B"].width = 20

    for title_key, none_key, items in (("sheet_systems", "no_system", stats.by_system),
                                       ("sheet_units", "no_unit", stats.by_unit)):
        sheet = wb.create_sheet(x(title_key)[:31])
        sheet.append([x(k) for k in ("code", "name", "total", "open", "breached",
                                     "csat_count", "csat_avg")])
        for g in items:
            sheet.append([g.code or "", g.name(lang) or (x(none_key) if g.code is None else ""),
                          g.total, g.open, g.breached, g.csat_count, g.csat_avg])
        sheet.column_dimensions["B"].width = 48
        sheet.freeze_panes = "A2"
    for sheet in wb.worksheets:
        for cell in sheet[1]:
            cell.font = bold
            cell.fill = fill
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()
