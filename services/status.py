"""Migration status per unit × system: where a unit stands, what is due next, who changed what.

Stages are ordered not_started < surveyed < pilot < deployed < trained < live; a unit without a
``unit_system_status`` row is at not_started. Functions take a session and never commit (the
caller owns the transaction); "today" is always passed in by the caller, as a date in
Asia/Ho_Chi_Minh, so views are reproducible and testable.

Which milestones apply to a unit (the scope rule):

- ``all``: every unit;
- ``province:<code>``: units of that post-merger province (codes compared without leading
  zeros);
- ``pilot``: only units whose stage for the milestone's system is already ≥ pilot, because the
  plan names pilot units in prose and the register has no pilot list: a unit admin marking a
  unit "pilot" is what makes it a pilot unit. A pilot milestone that names a province applies
  only to units of that province. Consequence: a pilot milestone can be "next" (upcoming) but
  never "overdue" for anyone.
- Milestones without a system (two-tier go-live, data centres, phase 2) are not part of any
  system's progress; ``unit_status`` lists the upcoming ones that apply as ``general``.
- Milestones without a due date or without a required stage never make a unit overdue.

"Next milestone" of a unit for a system = the earliest (by due date, undated last) applicable
milestone whose required stage the unit has not reached, so an overdue one shows first; when
every one is reached, the next upcoming applicable milestone (due ≥ today), or None.
"""

from __future__ import annotations

import enum
import hashlib
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Table,
    bindparam,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import (
    AuditLog,
    Milestone,
    Person,
    Province,
    Role,
    Stage,
    StatusHistory,
    System,
    Unit,
    UnitKind,
    UnitSystemStatus,
    utcnow,
)
from services.audit import Actor

STAGES: tuple[Stage, ...] = tuple(Stage)
RANK: dict[Stage, int] = {s: i for i, s in enumerate(STAGES)}
# Units whose status is tracked: the new commune-level units and the provincial bodies.
TRACKED_KINDS: tuple[str, ...] = (
    UnitKind.ward.value,
    UnitKind.commune.value,
    UnitKind.special_zone.value,
    UnitKind.department.value,
    UnitKind.party_office.value,
    UnitKind.province_office.value,
)
EDITOR_ROLES = frozenset({Role.unit_admin.value, Role.dtc_admin.value})
MAX_NOTE = 500
MAX_LIMIT = 100
_CHUNK = 500

_USS = cast(Table, UnitSystemStatus.__table__)
_HISTORY = cast(Table, StatusHistory.__table__)
_AUDIT = cast(Table, AuditLog.__table__)


# ------------------------------------------------------------------------------ value types


def parse_stage(value: str | Stage | None) -> Stage | None:
    """A stage from its code (case and spaces tolerated), or None."""
    if isinstance(value, Stage):
        return value
    if not value:
        return None
    try:
        return Stage(str(value).strip().lower().replace(" ", "_"))
    except ValueError:
        return None


def stage_of(value: str | None) -> Stage:
    """The stored stage of a row, not_started when there is no row (or garbage in it)."""
    return parse_stage(value) or Stage.not_started


def clean_note(note: str | None) -> str | None:
    """Strip, turn line breaks and tabs into spaces, drop other control chars, cap at 500."""
    if note is None:
        return None
    out = []
    for ch in unicodedata.normalize("NFC", note):
        if ch in "\r\n\t\v\f":
            out.append(" ")
        elif unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co"):
            out.append(ch)
    cleaned = " ".join("".join(out).split())[:MAX_NOTE].strip()
    return cleaned or None


def same_province(a: str | None, b: str | None) -> bool:
    """Province codes match ("79" == "79"; "1" == "01" since the plan drops leading zeros)."""
    return a is not None and b is not None and a.lstrip("0") == b.lstrip("0")


@dataclass(frozen=True)
class MilestoneInfo:
    """A milestone as the views need it, with the seed file it comes from."""

    key: str
    system_code: str | None
    phase: str | None
    name_vi: str
    name_en: str
    due: date | None
    stage_required: Stage | None
    scope: str
    province_code: str | None
    source: str

    def name(self, lang: str | None = "vi") -> str:
        return self.name_en if lang == "en" else self.name_vi

    @property
    def scope_province(self) -> str | None:
        if self.scope.startswith("province:"):
            return self.scope.split(":", 1)[1]
        return self.province_code

    def applies(self, province_code: str | None, stage: Stage) -> bool:
        """The scope rule of the module docstring, for one unit at ``stage``."""
        if self.scope == "all":
            return True
        if self.scope.startswith("province:"):
            return same_province(self.scope_province, province_code)
        if self.scope == "pilot":
            if RANK[stage] < RANK[Stage.pilot]:
                return False
            return self.province_code is None or same_province(self.province_code, province_code)
        return False

    def applies_to_scope(self, province_code: str | None) -> bool:
        """Whether the milestone concerns some unit of a province (None = the whole country)."""
        if province_code is None or self.scope == "all":
            return True
        scoped = self.scope_province
        return scoped is None or same_province(scoped, province_code)


def _sort_key(m: MilestoneInfo) -> tuple[bool, date, str]:
    return (m.due is None, m.due or date.max, m.key)


@dataclass(frozen=True)
class Progress:
    """Where one unit stands against the milestones of one system."""

    milestone: MilestoneInfo | None
    days_left: int | None  # negative = overdue by that many days
    behind: bool  # stage < milestone.stage_required
    overdue: bool  # behind and due < today
    overdue_milestones: tuple[MilestoneInfo, ...] = ()  # every applicable overdue one, oldest first


def progress(
    milestones: Sequence[MilestoneInfo], province_code: str | None, stage: Stage, today: date
) -> Progress:
    """Next milestone, days left and overdue state; ``milestones`` = one system's, sorted."""
    applicable = [m for m in milestones if m.applies(province_code, stage)]
    unreached = [
        m for m in applicable
        if m.stage_required is not None and RANK[stage] < RANK[m.stage_required]
    ]
    overdue = tuple(m for m in unreached if m.due is not None and m.due < today)
    nxt = unreached[0] if unreached else None
    if nxt is None:
        nxt = next((m for m in applicable if m.due is not None and m.due >= today), None)
    if nxt is None:
        return Progress(None, None, False, False, overdue)
    days_left = (nxt.due - today).days if nxt.due is not None else None
    behind = nxt.stage_required is not None and RANK[stage] < RANK[nxt.stage_required]
    is_overdue = behind and nxt.due is not None and nxt.due < today
    return Progress(nxt, days_left, behind, is_overdue, overdue)


class ProgressCache:
    """progress() depends only on (system, province, stage): memoize for province-wide views."""

    def __init__(self, by_system: dict[str | None, list[MilestoneInfo]], today: date) -> None:
        self.by_system = by_system
        self.today = today
        self._memo: dict[tuple[str, str | None, Stage], Progress] = {}

    def get(self, system_code: str, province_code: str | None, stage: Stage) -> Progress:
        key = (system_code, province_code, stage)
        hit = self._memo.get(key)
        if hit is None:
            hit = progress(self.by_system.get(system_code, []), province_code, stage, self.today)
            self._memo[key] = hit
        return hit


# ------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class SystemInfo:
    code: str
    abbr: str
    name_vi: str
    name_en: str
    sort: int

    def name(self, lang: str | None = "vi") -> str:
        return self.name_en if lang == "en" else self.name_vi


class PlanCache:
    """The plan's systems and milestones, read on every status view and changed only by a
    plan import: kept in memory by the bot (``session.info["plan_cache"]``), dropped on
    every change to those tables (``db.session`` change signals, same as the sender cache).
    """

    TABLES = frozenset({"systems", "milestones"})
    # a unit's view also shows its name, its statuses and who last changed each one
    UNIT_TABLES = TABLES | {"unit_system_status", "units", "people"}
    UNIT_VIEWS = 20_000  # (unit, day) pairs kept; all 3,321 communes fit several times

    def __init__(self) -> None:
        self.enabled = False
        self._gen = 0
        self.systems: list[SystemInfo] | None = None
        self.milestones: dict[str | None, list[MilestoneInfo]] | None = None
        self._unit_gen = 0
        self.units: dict[tuple[str, date], UnitStatusView | None] = {}

    def changed(self, tables: frozenset[str] = TABLES, _touched: frozenset[int] = frozenset()
                ) -> None:
        if tables & self.TABLES:
            self._gen += 1
            self.systems = self.milestones = None
        if tables & self.UNIT_TABLES:
            self._unit_gen += 1
            self.units.clear()


def _plan_cache(session: AsyncSession) -> PlanCache | None:
    cache = session.info.get("plan_cache")
    return cache if isinstance(cache, PlanCache) and cache.enabled else None


async def load_systems(session: AsyncSession) -> list[SystemInfo]:
    """Systems in display order (System.sort, then code)."""
    cache = _plan_cache(session)
    if cache is not None and cache.systems is not None:
        return list(cache.systems)
    gen = cache._gen if cache is not None else 0
    out = await _load_systems(session)
    if cache is not None and cache._gen == gen:
        cache.systems = list(out)
    return out


async def _load_systems(session: AsyncSession) -> list[SystemInfo]:
    rows = await session.execute(
        select(System.code, System.abbr, System.name_vi, System.name_en, System.sort).order_by(
            System.sort, System.code
        )
    )
    return [SystemInfo(*r) for r in rows]


async def load_milestones(session: AsyncSession) -> dict[str | None, list[MilestoneInfo]]:
    """Milestones grouped by system code (None = not tied to a system), earliest first."""
    cache = _plan_cache(session)
    if cache is not None and cache.milestones is not None:
        return {k: list(v) for k, v in cache.milestones.items()}
    gen = cache._gen if cache is not None else 0
    out = await _load_milestones(session)
    if cache is not None and cache._gen == gen:
        cache.milestones = {k: list(v) for k, v in out.items()}
    return out


async def _load_milestones(session: AsyncSession) -> dict[str | None, list[MilestoneInfo]]:
    rows = await session.scalars(select(Milestone))
    out: dict[str | None, list[MilestoneInfo]] = defaultdict(list)
    for m in rows:
        out[m.system_code].append(
            MilestoneInfo(
                key=m.key,
                system_code=m.system_code,
                phase=m.phase,
                name_vi=m.name_vi,
                name_en=m.name_en,
                due=m.due_date,
                stage_required=parse_stage(m.stage_required),
                scope=m.scope or "all",
                province_code=m.province_code,
                source=m.source,
            )
        )
    for items in out.values():
        items.sort(key=_sort_key)
    return dict(out)


def tracked_units(province_code: str | None = None) -> list[ColumnElement[bool]]:
    """WHERE clauses selecting the units whose status is tracked (optionally one province)."""
    where: list[ColumnElement[bool]] = [Unit.active.is_(True), Unit.kind.in_(TRACKED_KINDS)]
    if province_code is not None:
        where.append(Unit.province_code == province_code)
    return where


async def province_name(session: AsyncSession, province_code: str | None) -> str | None:
    if province_code is None:
        return None
    return await session.scalar(select(Province.name).where(Province.code == province_code))


# ---------------------------------------------------------------------------- unit status


@dataclass(frozen=True)
class SystemLine:
    """One system in a unit's status: stage, last change and the next milestone."""

    system_code: str
    abbr: str
    name_vi: str
    name_en: str
    stage: Stage
    note: str | None
    updated_at: datetime | None
    updated_by: str | None  # full name of the person who made the last change
    milestone: MilestoneInfo | None
    days_left: int | None
    behind: bool
    overdue: bool
    overdue_count: int  # applicable milestones of this system already overdue

    def name(self, lang: str | None = "vi") -> str:
        return self.name_en if lang == "en" else self.name_vi


@dataclass(frozen=True)
class UnitStatusView:
    unit_code: str
    unit_name: str
    kind: str
    province_code: str | None
    province_name: str | None
    active: bool
    merged_into: str | None
    today: date
    systems: list[SystemLine]
    general: list[MilestoneInfo]  # upcoming milestones not tied to a system
    # the view's message per language, rendered once: cached views are shown many times
    texts: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def overdue_systems(self) -> int:
        return sum(1 for s in self.systems if s.overdue)

    @property
    def live_systems(self) -> int:
        return sum(1 for s in self.systems if s.stage is Stage.live)


_UNIT_WITH_STATUSES = (
    select(Unit.code, Unit.name, Unit.kind, Unit.province_code, Province.name, Unit.active,
           Unit.merged_into, UnitSystemStatus.system_code, UnitSystemStatus.stage,
           UnitSystemStatus.note, UnitSystemStatus.updated_at, Person.full_name)
    .outerjoin(Province, Province.code == Unit.province_code)
    .outerjoin(UnitSystemStatus, UnitSystemStatus.unit_code == Unit.code)
    .outerjoin(Person, Person.id == UnitSystemStatus.updated_by)
    .where(Unit.code == bindparam("code"))
)


async def unit_status(session: AsyncSession, unit_code: str, today: date) -> UnitStatusView | None:
    """Every system's stage and next milestone for one unit; None if the code is unknown.

    The most asked question of all ("where does my unit stand?"): the bot keeps the views
    (frozen) in its plan cache until any change to what they show, so repeated asks of an
    unchanged unit need no SQL at all."""
    cache = _plan_cache(session)
    if cache is None:
        return await _unit_status(session, unit_code, today)
    key = (unit_code, today)
    if key in cache.units:
        return cache.units[key]
    gen = cache._unit_gen
    view = await _unit_status(session, unit_code, today)
    if cache._unit_gen == gen:  # no change raced with the read
        if len(cache.units) >= cache.UNIT_VIEWS:
            cache.units.clear()
        cache.units[key] = view
    return view


async def _unit_status(session: AsyncSession, unit_code: str, today: date
                       ) -> UnitStatusView | None:
    rows = (await session.execute(_UNIT_WITH_STATUSES, {"code": unit_code})).all()
    if not rows:
        return None
    code, name, kind, prov, prov_name, active, merged_into = rows[0][:7]
    # one round trip: the unit (with its province) outer-joined to its status rows
    statuses = {r.system_code: r for r in rows if r.system_code is not None}
    by_system = await load_milestones(session)
    lines = []
    for s in await load_systems(session):
        st = statuses.get(s.code)
        stage = stage_of(st.stage if st else None)
        p = progress(by_system.get(s.code, []), prov, stage, today)
        lines.append(
            SystemLine(
                system_code=s.code,
                abbr=s.abbr,
                name_vi=s.name_vi,
                name_en=s.name_en,
                stage=stage,
                note=st.note if st else None,
                updated_at=st.updated_at if st else None,
                updated_by=st.full_name if st else None,
                milestone=p.milestone,
                days_left=p.days_left,
                behind=p.behind,
                overdue=p.overdue,
                overdue_count=len(p.overdue_milestones),
            )
        )
    general = [
        m
        for m in by_system.get(None, [])
        if m.due is not None and m.due >= today and m.applies(prov, Stage.not_started)
    ]
    return UnitStatusView(
        unit_code=code,
        unit_name=name,
        kind=kind,
        province_code=prov,
        province_name=prov_name,
        active=bool(active),
        merged_into=merged_into,
        today=today,
        systems=lines,
        general=general[:3],
    )


# -------------------------------------------------------------------------- stage counts


def _empty_counts() -> dict[Stage, int]:
    return dict.fromkeys(STAGES, 0)


async def _unit_totals(session: AsyncSession, province_code: str | None) -> dict[str | None, int]:
    rows = await session.execute(
        select(Unit.province_code, func.count()).where(*tracked_units(province_code))
        .group_by(Unit.province_code)
    )
    return {p: n for p, n in rows}


async def _grid(
    session: AsyncSession, province_code: str | None, system_code: str | None = None
) -> tuple[dict[tuple[str, str | None], dict[Stage, int]], int]:
    """Counts per (system, province) per stage (not_started = units without a later stage),
    and the number of tracked units."""
    totals = await _unit_totals(session, province_code)
    q = (
        select(UnitSystemStatus.system_code, Unit.province_code, UnitSystemStatus.stage,
               func.count())
        .join(Unit, Unit.code == UnitSystemStatus.unit_code)
        .where(*tracked_units(province_code))
        .group_by(UnitSystemStatus.system_code, Unit.province_code, UnitSystemStatus.stage)
    )
    if system_code is not None:
        q = q.where(UnitSystemStatus.system_code == system_code)
    systems = (
        [system_code] if system_code is not None
        else list(await session.scalars(select(System.code)))
    )
    grid: dict[tuple[str, str | None], dict[Stage, int]] = {
        (s, p): _empty_counts() for s in systems for p in totals
    }
    for sys_code, prov, stage, n in await session.execute(q):
        counts = grid.setdefault((sys_code, prov), _empty_counts())
        st = stage_of(stage)
        if st is not Stage.not_started:
            counts[st] += n
    for (_s, prov), counts in grid.items():
        counts[Stage.not_started] = max(0, totals.get(prov, 0) - sum(counts.values()))
    return grid, sum(totals.values())


@dataclass(frozen=True)
class SystemCounts:
    """One system's stage counts over a set of units."""

    system_code: str
    abbr: str
    name_vi: str
    name_en: str
    counts: dict[Stage, int]
    overdue_units: int

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def live(self) -> int:
        return self.counts[Stage.live]

    def name(self, lang: str | None = "vi") -> str:
        return self.name_en if lang == "en" else self.name_vi


@dataclass(frozen=True)
class Overview:
    province_code: str | None  # None = the whole country
    province_name: str | None
    total_units: int
    today: date
    systems: list[SystemCounts]


async def province_overview(
    session: AsyncSession, province_code: str | None, today: date
) -> Overview:
    """Counts per stage for every system over the tracked units of a province (or country).

    ``overdue_units`` per system counts units with at least one overdue milestone of it.
    """
    grid, total = await _grid(session, province_code)
    cache = ProgressCache(await load_milestones(session), today)
    out = []
    for s in await load_systems(session):
        counts = _empty_counts()
        overdue = 0
        for (sys_code, prov), c in grid.items():
            if sys_code != s.code:
                continue
            for st, n in c.items():
                counts[st] += n
                if n and cache.get(s.code, prov, st).overdue_milestones:
                    overdue += n
        out.append(SystemCounts(s.code, s.abbr, s.name_vi, s.name_en, counts, overdue))
    return Overview(province_code, await province_name(session, province_code), total, today, out)


# --------------------------------------------------------------------------- system view


@dataclass(frozen=True)
class UnitRef:
    code: str
    name: str
    province_code: str | None


@dataclass(frozen=True)
class SystemView:
    system_code: str
    abbr: str
    name_vi: str
    name_en: str
    province_code: str | None
    province_name: str | None
    total_units: int
    counts: dict[Stage, int]
    live_units: list[UnitRef]  # up to ``limit``, by name
    pilot_units: list[UnitRef]  # units at stage pilot, up to ``limit``
    next_milestone: MilestoneInfo | None  # earliest milestone of the scope due today or later
    days_left: int | None
    overdue_units: int

    @property
    def live_count(self) -> int:
        return self.counts[Stage.live]

    @property
    def pilot_count(self) -> int:
        return self.counts[Stage.pilot]

    def name(self, lang: str | None = "vi") -> str:
        return self.name_en if lang == "en" else self.name_vi


async def _units_at(
    session: AsyncSession, system_code: str, stage: Stage, province_code: str | None, limit: int
) -> list[UnitRef]:
    rows = await session.execute(
        select(Unit.code, Unit.name, Unit.province_code)
        .join(UnitSystemStatus, UnitSystemStatus.unit_code == Unit.code)
        .where(UnitSystemStatus.system_code == system_code, UnitSystemStatus.stage == stage.value,
               *tracked_units(province_code))
        .order_by(Unit.name_folded, Unit.code)
        .limit(limit)
    )
    return [UnitRef(*r) for r in rows]


async def system_status(
    session: AsyncSession,
    system_code: str,
    *,
    province_code: str | None = None,
    today: date,
    limit: int = 10,
) -> SystemView | None:
    """Where one system stands over a province (or the country); None if unknown."""
    system = next((s for s in await load_systems(session) if s.code == system_code), None)
    if system is None:
        return None
    limit = max(0, min(limit, MAX_LIMIT))
    grid, _total = await _grid(session, province_code, system_code)
    milestones = await load_milestones(session)
    cache = ProgressCache(milestones, today)
    counts = _empty_counts()
    overdue = 0
    for (_s, prov), c in grid.items():
        for st, n in c.items():
            counts[st] += n
            if n and cache.get(system_code, prov, st).overdue_milestones:
                overdue += n
    upcoming = [
        m for m in milestones.get(system_code, [])
        if m.due is not None and m.due >= today and m.applies_to_scope(province_code)
    ]
    nxt = upcoming[0] if upcoming else None
    return SystemView(
        system_code=system.code,
        abbr=system.abbr,
        name_vi=system.name_vi,
        name_en=system.name_en,
        province_code=province_code,
        province_name=await province_name(session, province_code),
        total_units=sum(counts.values()),
        counts=counts,
        live_units=await _units_at(session, system_code, Stage.live, province_code, limit),
        pilot_units=await _units_at(session, system_code, Stage.pilot, province_code, limit),
        next_milestone=nxt,
        days_left=(nxt.due - today).days if nxt and nxt.due else None,
        overdue_units=overdue,
    )


# ------------------------------------------------------------------------- overdue units


@dataclass(frozen=True)
class OverdueSystem:
    """A system a unit is behind on: its stage and the oldest overdue milestone."""

    system_code: str
    abbr: str
    stage: Stage
    milestone: MilestoneInfo
    days_overdue: int
    overdue_count: int


@dataclass(frozen=True)
class OverdueUnit:
    unit_code: str
    unit_name: str
    province_code: str | None
    overdue_count: int  # overdue milestones over all its systems
    max_days_overdue: int  # days since the oldest of them was due
    systems: list[OverdueSystem]


async def status_rows(
    session: AsyncSession, province_code: str | None, system_code: str | None = None
) -> dict[tuple[str, str], Any]:
    """Stored status rows of the tracked units, by (unit, system): stage, note, updated_at."""
    q = (
        select(UnitSystemStatus.unit_code, UnitSystemStatus.system_code, UnitSystemStatus.stage,
               UnitSystemStatus.note, UnitSystemStatus.updated_at)
        .join(Unit, Unit.code == UnitSystemStatus.unit_code)
        .where(*tracked_units(province_code))
    )
    if system_code is not None:
        q = q.where(UnitSystemStatus.system_code == system_code)
    return {(r.unit_code, r.system_code): r for r in await session.execute(q)}


async def stage_counts(
    session: AsyncSession, province_code: str | None = None
) -> tuple[dict[str, dict[Stage, int]], int]:
    """Units per stage for every system (code → counts), and the number of tracked units."""
    grid, total = await _grid(session, province_code)
    out: dict[str, dict[Stage, int]] = {}
    for (sys_code, _prov), c in grid.items():
        counts = out.setdefault(sys_code, _empty_counts())
        for st, n in c.items():
            counts[st] += n
    return out, total


async def overdue_units(
    session: AsyncSession,
    province_code: str | None,
    today: date,
    *,
    system_code: str | None = None,
    offset: int = 0,
    limit: int = 10,
) -> tuple[list[OverdueUnit], int]:
    """Units with overdue milestones, worst first, and how many there are in all.

    Worst = most overdue milestones, then most days since the oldest was due, then code.
    ``system_code`` restricts the count to one system.
    """
    systems = [s for s in await load_systems(session)
               if system_code is None or s.code == system_code]
    cache = ProgressCache(await load_milestones(session), today)
    stages = await status_rows(session, province_code, system_code)
    units = await session.execute(
        select(Unit.code, Unit.name, Unit.province_code).where(*tracked_units(province_code))
    )
    found: list[OverdueUnit] = []
    for code, name, prov in units:
        behind = []
        for s in systems:
            st = stages.get((code, s.code))
            stage = stage_of(st.stage if st else None)
            p = cache.get(s.code, prov, stage)
            if not p.overdue_milestones:
                continue
            oldest = p.overdue_milestones[0]
            days = (today - oldest.due).days if oldest.due else 0
            behind.append(OverdueSystem(s.code, s.abbr, stage, oldest, days,
                                        len(p.overdue_milestones)))
        if behind:
            found.append(OverdueUnit(
                unit_code=code,
                unit_name=name,
                province_code=prov,
                overdue_count=sum(b.overdue_count for b in behind),
                max_days_overdue=max(b.days_overdue for b in behind),
                systems=behind,
            ))
    found.sort(key=lambda u: (-u.overdue_count, -u.max_days_overdue, u.unit_code))
    offset = max(0, offset)
    limit = max(0, min(limit, MAX_LIMIT))
    return found[offset : offset + limit], len(found)


# ------------------------------------------------------------------------------- set stage


class SetStageOutcome(enum.StrEnum):
    updated = "updated"
    unchanged = "unchanged"
    needs_confirmation = "needs_confirmation"  # a backwards move without confirm_backwards
    forbidden = "forbidden"
    unknown_unit = "unknown_unit"
    unknown_system = "unknown_system"
    bad_stage = "bad_stage"


@dataclass(frozen=True)
class SetStageResult:
    outcome: SetStageOutcome
    unit_code: str
    system_code: str
    old_stage: Stage | None = None
    new_stage: Stage | None = None
    note: str | None = None
    history_id: int | None = None

    @property
    def ok(self) -> bool:
        return self.outcome in (SetStageOutcome.updated, SetStageOutcome.unchanged)

    @property
    def backwards(self) -> bool:
        return (self.old_stage is not None and self.new_stage is not None
                and RANK[self.new_stage] < RANK[self.old_stage])


def may_edit(person: Person, unit_code: str) -> bool:
    """Operators edit any unit, a unit admin only their own; officials and support never."""
    if not person.active or person.verified_at is None or person.role not in EDITOR_ROLES:
        return False
    return person.role == Role.dtc_admin.value or person.unit_code == unit_code


async def take_write_lock(session: AsyncSession) -> None:
    """Serialize status writers before reading the current stage.

    SQLite: a no-op UPDATE takes the database write lock now (waiting on busy_timeout), so the
    rows read next cannot change before commit. PostgreSQL needs nothing here: rows are read
    with SELECT … FOR UPDATE.
    """
    if session.get_bind().dialect.name == "sqlite":
        await session.execute(text("UPDATE unit_system_status SET stage = stage WHERE 1 = 0"))


def _insert_ignore(session: AsyncSession) -> Any:
    """INSERT … ON CONFLICT DO NOTHING for the status table on either backend."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(_USS).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(_USS).on_conflict_do_nothing()


async def _locked_rows(
    session: AsyncSession, pairs: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], tuple[str, str | None]]:
    """Current (stage, note) of existing status rows, locked for update (PostgreSQL).

    One pair: that row. Many: every row of the units involved (cheaper than row-value IN;
    locking a unit's other systems for the bulk transaction is harmless). Rows are locked in
    key order, the same for every writer, so writers cannot deadlock.
    """
    wanted = set(pairs)
    out: dict[tuple[str, str], tuple[str, str | None]] = {}
    cols = (_USS.c.unit_code, _USS.c.system_code, _USS.c.stage, _USS.c.note)
    order = (_USS.c.unit_code, _USS.c.system_code)
    if len(wanted) == 1:
        ((unit, system),) = wanted
        queries = [select(*cols).where(_USS.c.unit_code == unit, _USS.c.system_code == system)]
    else:
        units = sorted({u for u, _s in wanted})
        queries = [select(*cols).where(_USS.c.unit_code.in_(units[i : i + _CHUNK]))
                   for i in range(0, len(units), _CHUNK)]
    for q in queries:
        rows = await session.execute(q.order_by(*order).with_for_update())
        out.update({(u, s): (st, n) for u, s, st, n in rows if (u, s) in wanted})
    return out


@dataclass(frozen=True)
class StageChange:
    """One change to write: the (unit, system) pair, the stage it had and the one it gets."""

    unit_code: str
    system_code: str
    old_stage: Stage
    new_stage: Stage
    note: str | None
    old_note: str | None = None


async def write_changes(
    session: AsyncSession,
    wanted: Sequence[tuple[str, str, Stage, str | None]],
    *,
    actor: Actor,
    person_id: int | None,
    confirm_backwards: bool = True,
) -> tuple[list[StageChange], list[StageChange], list[int]]:
    """Apply (unit, system, stage, note) targets under the write lock: bulk-friendly core.

    Returns (applied, refused backwards moves, history ids — only for a single change).
    Re-reads the current stages after
    locking, so concurrent writers chain correctly (each history row's old stage is the stage
    the previous writer left). Units and systems must exist (callers validate).
    """
    await take_write_lock(session)
    pairs = [(u, s) for u, s, _st, _n in wanted]
    current = await _locked_rows(session, pairs)
    missing = [(u, s, st, n) for u, s, st, n in wanted
               if (u, s) not in current and st is not Stage.not_started]
    now = utcnow()
    inserted: set[tuple[str, str]] = set()
    if missing:  # executemany: SQLAlchemy batches it as multi-row INSERT … RETURNING
        rows = await session.execute(
            _insert_ignore(session).returning(_USS.c.unit_code, _USS.c.system_code),
            [{"unit_code": u, "system_code": s, "stage": st.value, "note": n,
              "updated_by": person_id, "updated_at": now} for u, s, st, n in missing],
        )
        inserted.update((r[0], r[1]) for r in rows)
    raced = [(u, s) for u, s, _st, _n in missing if (u, s) not in inserted]
    if raced:  # another writer inserted these between our read and our insert
        current.update(await _locked_rows(session, raced))

    applied: list[StageChange] = []
    refused: list[StageChange] = []
    updates: list[dict[str, Any]] = []
    for u, s, st, n in wanted:
        if (u, s) in inserted:
            applied.append(StageChange(u, s, Stage.not_started, st, n))
            continue
        old_stage, old_note = current.get((u, s), (Stage.not_started.value, None))
        old = stage_of(old_stage)
        if old is st:
            continue
        change = StageChange(u, s, old, st, n, old_note)
        if RANK[st] < RANK[old] and not confirm_backwards:
            refused.append(change)
            continue
        applied.append(change)
        updates.append({"b_unit": u, "b_system": s, "b_stage": st.value, "b_note": n,
                        "b_by": person_id, "b_at": now})
    if updates:
        stmt = (
            update(_USS)
            .where(_USS.c.unit_code == bindparam("b_unit"),
                   _USS.c.system_code == bindparam("b_system"))
            .values(stage=bindparam("b_stage"), note=bindparam("b_note"),
                    updated_by=bindparam("b_by"), updated_at=bindparam("b_at"))
        )
        await session.execute(stmt, updates)

    history_ids: list[int] = []
    history_rows = [
        {"unit_code": c.unit_code, "system_code": c.system_code, "old_stage": c.old_stage.value,
         "new_stage": c.new_stage.value, "note": c.note, "actor_id": person_id, "at": now}
        for c in applied
    ]
    if len(history_rows) == 1:  # set_stage: report the row's id
        rows = await session.execute(insert(_HISTORY).returning(_HISTORY.c.id), history_rows)
        history_ids = [r[0] for r in rows]
    elif history_rows:  # bulk: no RETURNING, which SQLite would run row by row
        await session.execute(insert(_HISTORY), history_rows)
    if applied:
        audit_rows = [
            {"at": now, "actor": actor.label[:100], "actor_person_id": actor.person_id,
             "action": "status.update", "object_type": "unit_system_status",
             "object_id": f"{c.unit_code}:{c.system_code}"[:64],
             "before": {"stage": c.old_stage.value, "note": c.old_note},
             "after": {"stage": c.new_stage.value, "note": c.note}}
            for c in applied
        ]
        await session.execute(insert(_AUDIT), audit_rows)
    return applied, refused, history_ids


async def set_stage(
    session: AsyncSession,
    unit_code: str,
    system_code: str,
    new_stage: str | Stage,
    *,
    actor: Actor,
    person: Person,
    note: str | None = None,
    confirm_backwards: bool = False,
) -> SetStageResult:
    """Move one unit's stage for one system, with a history row and an audit row.

    Same stage → unchanged (nothing written, a note alone is not saved). A backwards move needs
    ``confirm_backwards``. Safe under concurrency: see ``write_changes``.
    """
    def result(outcome: SetStageOutcome, **kw: Any) -> SetStageResult:
        return SetStageResult(outcome, unit_code, system_code, **kw)

    if not person.active or person.verified_at is None or person.role not in EDITOR_ROLES:
        return result(SetStageOutcome.forbidden)
    stage = parse_stage(new_stage)
    if stage is None:
        return result(SetStageOutcome.bad_stage)
    unit = (
        await session.execute(
            select(Unit.code).where(Unit.code == unit_code, *tracked_units(None))
        )
    ).first()
    if unit is None:
        return result(SetStageOutcome.unknown_unit)
    if not may_edit(person, unit_code):
        return result(SetStageOutcome.forbidden)
    if await session.scalar(select(System.code).where(System.code == system_code)) is None:
        return result(SetStageOutcome.unknown_system)
    cleaned = clean_note(note)
    applied, refused, ids = await write_changes(
        session, [(unit_code, system_code, stage, cleaned)], actor=actor, person_id=person.id,
        confirm_backwards=confirm_backwards,
    )
    if refused:
        return result(SetStageOutcome.needs_confirmation, old_stage=refused[0].old_stage,
                      new_stage=stage, note=cleaned)
    if not applied:
        return result(SetStageOutcome.unchanged, old_stage=stage, new_stage=stage)
    return result(SetStageOutcome.updated, old_stage=applied[0].old_stage, new_stage=stage,
                  note=cleaned, history_id=ids[0] if ids else None)


# ----------------------------------------------------------------------------------- history


@dataclass(frozen=True)
class HistoryEntry:
    id: int
    at: datetime
    old_stage: Stage | None
    new_stage: Stage
    note: str | None
    actor_id: int | None
    actor_name: str | None


async def history(
    session: AsyncSession, unit_code: str, system_code: str, limit: int = 10
) -> list[HistoryEntry]:
    """The latest changes of one unit × system, newest first."""
    rows = await session.execute(
        select(StatusHistory.id, StatusHistory.at, StatusHistory.old_stage,
               StatusHistory.new_stage, StatusHistory.note, StatusHistory.actor_id,
               Person.full_name)
        .outerjoin(Person, Person.id == StatusHistory.actor_id)
        .where(StatusHistory.unit_code == unit_code, StatusHistory.system_code == system_code)
        .order_by(StatusHistory.at.desc(), StatusHistory.id.desc())
        .limit(max(0, min(limit, MAX_LIMIT)))
    )
    return [
        HistoryEntry(i, at, parse_stage(old), stage_of(new), note, actor_id, name)
        for i, at, old, new, note, actor_id, name in rows
    ]


# ----------------------------------------------------------------------------------- version


def data_version(*parts: object) -> str:
    """A short stable fingerprint of the given values."""
    digest = hashlib.sha1(repr(parts).encode("utf-8"), usedforsecurity=False)
    return digest.hexdigest()[:16]


async def status_version(session: AsyncSession, province_code: str | None = None) -> str:
    """Changes whenever a status, the unit list, a system or a milestone changes.

    Cheap (a few aggregate queries): used to cache rendered charts and reports.
    """
    in_scope = tracked_units(province_code)
    uss = (
        await session.execute(
            select(func.count(), func.max(UnitSystemStatus.updated_at))
            .select_from(UnitSystemStatus)
            .join(Unit, Unit.code == UnitSystemStatus.unit_code)
            .where(*in_scope)
        )
    ).one()
    hist = (
        await session.execute(
            select(func.count(), func.max(StatusHistory.id))
            .select_from(StatusHistory)
            .join(Unit, Unit.code == StatusHistory.unit_code)
            .where(*in_scope)
        )
    ).one()
    units = await session.scalar(select(func.count()).select_from(Unit).where(*in_scope))
    plan = (
        await session.execute(
            select(System.code, System.abbr, System.name_vi, System.name_en, System.sort,
                   literal(None), literal(None), literal(None))
            .union_all(
                select(Milestone.key, Milestone.system_code, Milestone.name_vi,
                       Milestone.scope, literal(0), Milestone.due_date,
                       Milestone.stage_required, Milestone.province_code)
            )
        )
    ).all()
    plan_rows = sorted(tuple(str(v) for v in r) for r in plan)
    prov_name = await province_name(session, province_code)
    return data_version(province_code, prov_name, tuple(uss), tuple(hist), units, plan_rows)
