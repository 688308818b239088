"""Operators' broadcasts: compose (template + preview), audience, send now or schedule,
pause / resume / cancel, progress. The sending itself is the ledger's (services.deliveries).

Templates are Jinja2 in a sandbox with autoescape: an operator may write ``{{ name }}``,
``{{ unit }}``, ``{{ province }}``, ``{{ role }}`` and ``{% if %}``; the literal text is plain
(``<`` shows as ``<``), values are escaped, so a message can never break Telegram's HTML.
Each recipient's text is rendered when the broadcast starts and stored in its delivery row,
so a restart resends exactly what was planned.
"""

from __future__ import annotations

import enum
import html
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from sqlalchemy import and_, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import (
    Broadcast,
    BroadcastState,
    ChatIdentity,
    Delivery,
    DeliveryState,
    Person,
    Province,
    Role,
    Stage,
    Subscription,
    Unit,
    UnitKind,
    UnitSystemStatus,
    utcnow,
)
from services import deliveries
from services.audit import Actor, audit

MAX_TEMPLATE = 3500
MAX_MESSAGE = 4096
CHANNEL = "telegram"
_ENV = ImmutableSandboxedEnvironment(autoescape=True, undefined=StrictUndefined)
_JINJA_PART = re.compile(r"({{.*?}}|{%.*?%}|{#.*?#})", re.S)
VARIABLES = ("name", "unit", "province", "role")
# audience by progress on a system: the stages each choice stands for
STAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "behind": (Stage.not_started.value, Stage.surveyed.value, Stage.pilot.value),
    "deployed": (Stage.deployed.value, Stage.trained.value),
    "live": (Stage.live.value,),
}


class BroadcastError(Exception):
    """A broadcast request that cannot be done; ``code`` names a text key, nothing changed."""

    def __init__(self, code: str, **detail: Any) -> None:
        super().__init__(code)
        self.code = code
        self.detail = detail


# ------------------------------------------------------------------------------ templates


def _plain_source(source: str) -> str:
    """Escape HTML in the literal parts of a template (not inside Jinja tags)."""
    parts = _JINJA_PART.split(source)
    return "".join(p if i % 2 else html.escape(p, quote=False) for i, p in enumerate(parts))


def check_template(source: str) -> None:
    """Raise :class:`BroadcastError` if the template is empty, too long or does not render."""
    if not source.strip():
        raise BroadcastError("empty")
    if len(source) > MAX_TEMPLATE:
        raise BroadcastError("too_long", limit=MAX_TEMPLATE)
    render(source, SAMPLE)


SAMPLE: dict[str, str] = {"name": "Nguyễn Văn An", "unit": "Phường Bến Thành",
                          "province": "Thành phố Hồ Chí Minh", "role": "official"}


def render(source: str, values: dict[str, Any]) -> str:
    try:
        out = _ENV.from_string(_plain_source(source)).render(**values)
    except TemplateError as exc:
        raise BroadcastError("template", error=str(exc)[:200]) from None
    out = out.strip()
    if not out:
        raise BroadcastError("empty")
    if len(out) > MAX_MESSAGE:
        raise BroadcastError("too_long", limit=MAX_MESSAGE)
    return out


# ------------------------------------------------------------------------------- audience


@dataclass(frozen=True)
class Audience:
    """Who receives a broadcast: verified, active people with a chat, filtered by all of
    province, unit kinds, roles, stage on a system, and not opted out of ``subscribers``."""

    province: str | None = None
    unit_kinds: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    system: str | None = None
    stages: tuple[str, ...] = ()
    subscribers: str | None = None  # system code: only people not opted out of it

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Audience:
        data = data or {}
        return cls(
            province=data.get("province") or None,
            unit_kinds=tuple(data.get("unit_kinds") or ()),
            roles=tuple(data.get("roles") or ()),
            system=data.get("system") or None,
            stages=tuple(data.get("stages") or ()),
            subscribers=data.get("subscribers") or None,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("province", "system", "subscribers"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        for key in ("unit_kinds", "roles", "stages"):
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        return out

    def validate(self) -> None:
        bad = [k for k in self.unit_kinds if k not in UnitKind.__members__]
        bad += [r for r in self.roles if r not in Role.__members__]
        bad += [s for s in self.stages if s not in Stage.__members__]
        if bad:
            raise BroadcastError("audience", value=bad[0])
        if self.stages and not self.system:
            raise BroadcastError("audience", value="stages without system")


@dataclass(frozen=True)
class Recipient:
    person_id: int
    chat_id: str
    name: str
    unit: str | None
    province: str | None
    role: str
    lang: str | None


def _recipients_query(a: Audience) -> Any:
    q = (
        select(Person.id, ChatIdentity.external_id, Person.full_name, Unit.name, Province.name,
               Person.role, func.coalesce(ChatIdentity.lang, Person.lang))
        .join(ChatIdentity, and_(ChatIdentity.person_id == Person.id,
                                 ChatIdentity.channel == CHANNEL))
        .outerjoin(Unit, Unit.code == Person.unit_code)
        .outerjoin(Province, Province.code == Unit.province_code)
        .where(Person.verified_at.is_not(None), Person.active.is_(True))
    )
    if a.province:
        q = q.where(Unit.province_code == a.province)
    if a.unit_kinds:
        q = q.where(Unit.kind.in_(a.unit_kinds))
    if a.roles:
        q = q.where(Person.role.in_(a.roles))
    if a.system and a.stages:
        stage = (
            select(UnitSystemStatus.stage)
            .where(UnitSystemStatus.unit_code == Person.unit_code,
                   UnitSystemStatus.system_code == a.system)
            .scalar_subquery()
        )
        q = q.where(func.coalesce(stage, Stage.not_started.value).in_(a.stages))
    if a.subscribers:
        opted_out = select(Subscription.person_id).where(
            Subscription.system_code == a.subscribers, Subscription.enabled.is_(False))
        q = q.where(Person.id.not_in(opted_out))
    return q.order_by(Person.id, ChatIdentity.id)


async def recipients(session: AsyncSession, audience: Audience) -> list[Recipient]:
    rows = await session.execute(_recipients_query(audience))
    seen: set[str] = set()
    out = []
    for pid, chat, name, unit, prov, role, lang in rows:
        if chat in seen:
            continue
        seen.add(chat)
        out.append(Recipient(pid, chat, name, unit, prov, role, lang))
    return out


async def count_audience(session: AsyncSession, audience: Audience) -> int:
    return len(await recipients(session, audience))


def values_for(r: Recipient) -> dict[str, Any]:
    return {"name": r.name, "unit": r.unit or "", "province": r.province or "", "role": r.role}


async def preview(session: AsyncSession, source: str, audience: Audience) -> tuple[str, int]:
    """The message as the first recipient would get it (or a sample one), and the count."""
    people = await recipients(session, audience)
    values = values_for(people[0]) if people else SAMPLE
    return render(source, values), len(people)


# ------------------------------------------------------------------------------ lifecycle


class Action(enum.StrEnum):
    pause = "pause"
    resume = "resume"
    cancel = "cancel"


_ALLOWED: dict[Action, set[str]] = {
    Action.pause: {BroadcastState.sending.value},
    Action.resume: {BroadcastState.paused.value},
    Action.cancel: {BroadcastState.draft.value, BroadcastState.scheduled.value,
                    BroadcastState.sending.value, BroadcastState.paused.value},
}
_TARGET = {Action.pause: BroadcastState.paused, Action.resume: BroadcastState.sending,
           Action.cancel: BroadcastState.cancelled}


def _snapshot(b: Broadcast) -> dict[str, Any]:
    return {"state": b.state, "audience": b.audience,
            "scheduled_at": b.scheduled_at.isoformat() if b.scheduled_at else None}


async def create(session: AsyncSession, actor: Actor, source: str, audience: Audience,
                 lang: str = "vi") -> Broadcast:
    """A draft broadcast (validated, audited)."""
    check_template(source)
    audience.validate()
    b = Broadcast(template=source, audience=audience.to_json(),
                  state=BroadcastState.draft.value, created_by=actor.person_id, lang=lang,
                  created_at=utcnow())
    session.add(b)
    await session.flush()
    await audit(session, actor, "broadcast.create", "broadcast", b.id, None, _snapshot(b))
    return b


async def _get_locked(session: AsyncSession, broadcast_id: int) -> Broadcast:
    q = select(Broadcast).where(Broadcast.id == broadcast_id)
    if session.get_bind().dialect.name == "postgresql":
        q = q.with_for_update()
    b = await session.scalar(q.execution_options(populate_existing=True))
    if b is None:
        raise BroadcastError("not_found", id=broadcast_id)
    return b


async def start(session: AsyncSession, broadcast_id: int, actor: Actor,
                now: datetime | None = None) -> int:
    """Plan one delivery per recipient and set the broadcast sending; returns the count.

    Idempotent: a broadcast already started (sending, paused, done) plans nothing new, so a
    scheduled job that runs twice sends once.
    """
    now = now or utcnow()
    b = await _get_locked(session, broadcast_id)
    if b.state not in (BroadcastState.draft.value, BroadcastState.scheduled.value):
        return 0
    before = _snapshot(b)
    people = await recipients(session, Audience.from_json(b.audience))
    rows = [{"key": f"b:{b.id}", "kind": "broadcast", "broadcast_id": b.id,
             "person_id": r.person_id, "chat_id": r.chat_id,
             "text": render(b.template, values_for(r)), "next_try_at": now} for r in people]
    await deliveries.enqueue(session, rows)
    b.total = len(rows)
    b.state = BroadcastState.sending.value if rows else BroadcastState.done.value
    b.started_at = now
    if not rows:
        b.finished_at = now
    await audit(session, actor, "broadcast.start", "broadcast", b.id, before,
                {**_snapshot(b), "total": b.total})
    return len(rows)


async def schedule(session: AsyncSession, broadcast_id: int, when: datetime, actor: Actor,
                   now: datetime | None = None) -> Broadcast:
    now = now or utcnow()
    if when <= now:
        raise BroadcastError("past")
    b = await _get_locked(session, broadcast_id)
    if b.state not in (BroadcastState.draft.value, BroadcastState.scheduled.value):
        raise BroadcastError("state", state=b.state)
    before = _snapshot(b)
    b.state = BroadcastState.scheduled.value
    b.scheduled_at = when
    await audit(session, actor, "broadcast.schedule", "broadcast", b.id, before, _snapshot(b))
    return b


async def act(session: AsyncSession, broadcast_id: int, action: Action, actor: Actor) -> Broadcast:
    """Pause, resume or cancel. Paused and cancelled broadcasts' pending rows stay in the
    ledger but are never claimed; a row already being sent finishes."""
    b = await _get_locked(session, broadcast_id)
    if b.state not in _ALLOWED[action]:
        raise BroadcastError("state", state=b.state)
    before = _snapshot(b)
    b.state = _TARGET[action].value
    if action == Action.cancel:
        b.finished_at = utcnow()
    await audit(session, actor, f"broadcast.{action.value}", "broadcast", b.id, before,
                _snapshot(b))
    return b


async def set_progress_message(session: AsyncSession, broadcast_id: int, chat_id: str,
                               message_id: int) -> None:
    await session.execute(update(Broadcast).where(Broadcast.id == broadcast_id)
                          .values(progress_chat_id=chat_id, progress_message_id=message_id))


@dataclass(frozen=True)
class Progress:
    id: int
    state: str
    total: int
    sent: int
    blocked: int
    failed: int
    remaining: int
    uncertain: int


async def progress(session: AsyncSession, broadcast_id: int) -> Progress:
    b = await session.get(Broadcast, broadcast_id, populate_existing=True)
    if b is None:
        raise BroadcastError("not_found", id=broadcast_id)
    c = await deliveries.counts(session, broadcast_id)
    uncertain = await session.scalar(
        select(func.coalesce(func.sum(Delivery.uncertain), 0))
        .where(Delivery.broadcast_id == broadcast_id))
    return Progress(b.id, b.state, b.total, c["sent"], c["blocked"], c["failed"],
                    c["pending"] + c["sending"], int(uncertain or 0))


async def finish_completed(session: AsyncSession, now: datetime | None = None) -> list[int]:
    """Sending broadcasts with nothing left to send become ``done`` with final counters;
    cancelled ones get their final counters. Returns the ids finished now."""
    now = now or utcnow()
    open_rows = (
        select(Delivery.id)
        .where(Delivery.broadcast_id == Broadcast.id,
               Delivery.state.in_([DeliveryState.pending.value, DeliveryState.sending.value]))
        .exists()
    )
    ids = list(await session.scalars(select(Broadcast.id).where(
        Broadcast.state == BroadcastState.sending.value, ~open_rows)))
    for bid in ids:
        c = await deliveries.counts(session, bid)
        await session.execute(
            update(Broadcast).where(Broadcast.id == bid,
                                    Broadcast.state == BroadcastState.sending.value)
            .values(state=BroadcastState.done.value, finished_at=now, sent=c["sent"],
                    blocked=c["blocked"], failed=c["failed"]))
    return ids


async def due_scheduled(session: AsyncSession, now: datetime) -> list[int]:
    """Scheduled broadcasts whose time has come (a safety net beside the scheduler's jobs)."""
    return list(await session.scalars(select(Broadcast.id).where(
        Broadcast.state == BroadcastState.scheduled.value, Broadcast.scheduled_at <= now)))
