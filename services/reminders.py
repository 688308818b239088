"""Automatic reminders from the plan's milestones, planned into the delivery ledger.

- **Due reminders**: N days before a milestone's due date (N in the configured offsets,
  default 7, 3, 1, 0) to the officials and unit admins of units to which the milestone
  applies and whose stage for its system is below the required one (``services.status``'s
  scope rule), unless they opted out of that system.
- **Weekly overdue nags**: to unit admins of units past a due date, once per ISO week.
- **Daily digest**: to operators, once per day.

Each message is a Delivery row with a unique key ("r:<milestone>:<days>", "n:<milestone>:<week>",
"d:<date>") per chat, so running the planner again — after a restart, twice a day, from two
processes — never sends twice. Rows are marked ``quiet``: the sender defers them past quiet
hours instead of dropping them. "Now" is always passed in, so tests move the clock.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import and_, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import (
    ChatIdentity,
    Delivery,
    Person,
    Role,
    Stage,
    Subscription,
    Unit,
    UnitSystemStatus,
)
from services import deliveries, status
from services.audit import Actor, audit
from services.status import RANK, MilestoneInfo, stage_of
from services.texts import norm_lang, t

CHANNEL = "telegram"
REMINDED_ROLES = (Role.official.value, Role.unit_admin.value)


@dataclass(frozen=True)
class PlanResult:
    due: int
    nags: int
    digests: int

    @property
    def total(self) -> int:
        return self.due + self.nags + self.digests


@dataclass(frozen=True)
class _Person:
    id: int
    chat_id: str
    role: str
    unit_code: str | None
    unit_name: str | None
    province_code: str | None
    lang: str


async def _people(session: AsyncSession, roles: tuple[str, ...]) -> list[_Person]:
    rows = await session.execute(
        select(Person.id, ChatIdentity.external_id, Person.role, Person.unit_code, Unit.name,
               Unit.province_code, func.coalesce(ChatIdentity.lang, Person.lang))
        .join(ChatIdentity, and_(ChatIdentity.person_id == Person.id,
                                 ChatIdentity.channel == CHANNEL))
        .outerjoin(Unit, Unit.code == Person.unit_code)
        .where(Person.verified_at.is_not(None), Person.active.is_(True),
               Person.role.in_(roles))
        .order_by(Person.id, ChatIdentity.id)
    )
    return [_Person(pid, chat, role, unit, uname, prov, norm_lang(lang))
            for pid, chat, role, unit, uname, prov, lang in rows]


async def opted_out(session: AsyncSession) -> set[tuple[int, str]]:
    rows = await session.execute(select(Subscription.person_id, Subscription.system_code)
                                 .where(Subscription.enabled.is_(False)))
    return {(p, s) for p, s in rows}


async def _stages(session: AsyncSession, units: set[str]) -> dict[tuple[str, str], Stage]:
    out: dict[tuple[str, str], Stage] = {}
    codes = sorted(units)
    for i in range(0, len(codes), 500):
        rows = await session.execute(
            select(UnitSystemStatus.unit_code, UnitSystemStatus.system_code,
                   UnitSystemStatus.stage).where(UnitSystemStatus.unit_code.in_(codes[i:i + 500])))
        out.update({(u, s): stage_of(st) for u, s, st in rows})
    return out


def _trackable(m: MilestoneInfo) -> bool:
    return m.system_code is not None and m.due is not None and m.stage_required is not None


async def plan(session: AsyncSession, now: datetime, *, tz: ZoneInfo,
               offsets: list[int], actor: Actor | None = None) -> PlanResult:
    """Add today's reminders, nags and digests to the ledger (idempotent). Caller commits."""
    today = now.astimezone(tz).date()
    milestones = [m for ms in (await status.load_milestones(session)).values() for m in ms
                  if _trackable(m)]
    systems = {s.code: s for s in await status.load_systems(session)}
    people = await _people(session, REMINDED_ROLES)
    out = await opted_out(session)
    stages = await _stages(session, {p.unit_code for p in people if p.unit_code})
    iso = today.isocalendar()
    week = f"{iso.year}-W{iso.week:02d}"
    rows: list[dict[str, Any]] = []
    n_due = n_nag = 0
    for m in milestones:
        assert m.system_code is not None and m.due is not None and m.stage_required is not None
        days = (m.due - today).days
        is_due = days in offsets
        is_overdue = days < 0
        if not (is_due or is_overdue):
            continue
        sysinfo = systems.get(m.system_code)
        for p in people:
            if p.unit_code is None or (p.id, m.system_code) in out:
                continue
            stage = stages.get((p.unit_code, m.system_code), Stage.not_started)
            if not m.applies(p.province_code, stage) or RANK[stage] >= RANK[m.stage_required]:
                continue
            params = {"system": sysinfo.abbr if sysinfo else m.system_code,
                      "milestone": m.name(p.lang), "due": m.due, "unit": p.unit_name or "",
                      "stage": t(f"stage.{stage.value}", p.lang),
                      "required": t(f"stage.{m.stage_required.value}", p.lang)}
            if is_due:
                rows.append({"key": f"r:{m.key}:{days}", "kind": "reminder", "person_id": p.id,
                             "chat_id": p.chat_id, "quiet": True, "next_try_at": now,
                             "text": t("rem.due", p.lang, days=days, **params)})
                n_due += 1
            elif p.role == Role.unit_admin.value:
                rows.append({"key": f"n:{m.key}:{week}", "kind": "nag", "person_id": p.id,
                             "chat_id": p.chat_id, "quiet": True, "next_try_at": now,
                             "text": t("rem.overdue", p.lang, days=-days, **params)})
                n_nag += 1
    added_digests = await _digests(session, now, today, rows)
    added = await deliveries.enqueue(session, rows)
    result = PlanResult(n_due, n_nag, added_digests)
    if actor is not None and added:
        await audit(session, actor, "reminders.plan", "ledger", today.isoformat(), None,
                    {"added": added, "due": n_due, "nags": n_nag, "digests": added_digests})
    return result


async def _digests(session: AsyncSession, now: datetime, today: date,
                   rows: list[dict[str, Any]]) -> int:
    """One digest per operator per day, for the operator's province (or the whole country)."""
    operators = await _people(session, (Role.dtc_admin.value,))
    if not operators:
        return 0
    summary = await deliveries.ledger_summary(session)
    reminders_today = len([r for r in rows if r["kind"] == "reminder"])
    by_province: dict[str | None, tuple[list[Any], int]] = {}
    n = 0
    for op in operators:
        if op.province_code not in by_province:
            by_province[op.province_code] = await status.overdue_units(
                session, op.province_code, today, limit=5)
        worst, total = by_province[op.province_code]
        rows.append({"key": f"d:{today.isoformat()}", "kind": "digest", "person_id": op.id,
                     "chat_id": op.chat_id, "quiet": True, "next_try_at": now,
                     "text": t("rem.digest", op.lang, day=today, overdue=total, worst=worst,
                               reminders=reminders_today, pending=summary["pending"],
                               blocked=summary["blocked"], failed=summary["failed"])})
        n += 1
    return n


# ---------------------------------------------------------------------------- per person


@dataclass(frozen=True)
class Upcoming:
    system_code: str
    abbr: str
    milestone: MilestoneInfo
    days: int
    enabled: bool


async def upcoming(session: AsyncSession, person: Person, today: date) -> list[Upcoming]:
    """The milestones the person's unit is behind on, soonest first, with the opt-in state:
    what the reminders will be about."""
    if person.unit_code is None:
        return []
    unit = await session.get(Unit, person.unit_code)
    by_system = await status.load_milestones(session)
    stages = await _stages(session, {person.unit_code})
    off = {s for p, s in await opted_out(session) if p == person.id}
    out = []
    for s in await status.load_systems(session):
        stage = stages.get((person.unit_code, s.code), Stage.not_started)
        p = status.progress(by_system.get(s.code, []), unit.province_code if unit else None,
                            stage, today)
        if p.milestone is None or not p.behind or p.days_left is None:
            continue
        out.append(Upcoming(s.code, s.abbr, p.milestone, p.days_left, s.code not in off))
    out.sort(key=lambda u: (u.days, u.abbr))
    return out


async def subscriptions(session: AsyncSession, person_id: int) -> dict[str, bool]:
    """Every system's opt-in state for a person (default on)."""
    off = {s for p, s in await opted_out(session) if p == person_id}
    return {s.code: s.code not in off for s in await status.load_systems(session)}


async def set_subscription(session: AsyncSession, person_id: int, system_code: str,
                           enabled: bool, actor: Actor) -> bool:
    """Opt a person in or out of one system's reminders (audited); returns the new state."""
    row = await session.get(Subscription, (person_id, system_code))
    before = None if row is None else {"enabled": row.enabled}
    if row is None:
        row = Subscription(person_id=person_id, system_code=system_code, enabled=enabled)
        session.add(row)
    else:
        row.enabled = enabled
    await session.flush()
    await audit(session, actor, "reminders.subscription", "subscription",
                f"{person_id}:{system_code}", before, {"enabled": enabled})
    return enabled


async def planned(session: AsyncSession, key_prefix: str) -> list[Delivery]:
    return list(await session.scalars(select(Delivery).where(Delivery.key.startswith(key_prefix))
                                      .order_by(Delivery.id)))


def group_by_chat(rows: list[Delivery]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        out[r.chat_id].append(r.key)
    return dict(out)
