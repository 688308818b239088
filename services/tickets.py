"""Support tickets: an official reports a problem, support staff run its life cycle.

Plain async functions over an AsyncSession; none of them commits (the caller owns the
transaction) and none knows about Telegram: chat and message ids are opaque strings/ints.

Life cycle (one table, ``TRANSITIONS``; Zammad/GLPI-like)::

    new ─▶ triaged ─▶ in_progress ⇄ waiting_reporter ─▶ resolved ─▶ closed
     └───────────────▲ (claim)                              │          │
                     └──────── reopened ◀── (reporter, 7 days) ◀───────┘

Concurrency: ``act`` locks the ticket (PostgreSQL ``SELECT … FOR UPDATE``; SQLite takes the
database write lock) and re-reads it before deciding, so two agents pressing buttons at the same
moment are serialized and the second sees the first one's result. A claim is additionally a
conditional ``UPDATE … WHERE assignee_id IS NULL``: exactly one owner even without the lock.
The SLA scanners mark tickets with the same kind of conditional update, so two scanner processes
never both send a warning.
"""

from __future__ import annotations

import enum
import math
import re
import unicodedata
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

from sqlalchemy import ColumnElement, Select, case, func, select, text, union_all, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from db.models import (
    AuditLog,
    ChatIdentity,
    Incident,
    Person,
    Role,
    Severity,
    SupportGroup,
    System,
    Ticket,
    TicketAttachment,
    TicketMessage,
    TicketStatus,
    Unit,
    utcnow,
)
from services.audit import Actor, audit
from services.sla import BusinessCalendar, sla_due

S = TicketStatus
OPEN_STATUSES: tuple[TicketStatus, ...] = (S.new, S.triaged, S.in_progress, S.waiting_reporter,
                                           S.reopened)
DONE_STATUSES: tuple[TicketStatus, ...] = (S.resolved, S.closed)
AGENT_ROLES = frozenset({Role.support.value, Role.dtc_admin.value})
OPERATOR_ROLES = frozenset({Role.dtc_admin.value})
MAX_SUMMARY = 4000
MAX_MESSAGE = 10000
MAX_TITLE = 500
MAX_ATTACHMENTS = 10
REOPEN_WINDOW = timedelta(days=7)
ATTACHMENT_KINDS = frozenset({"photo", "document", "video", "audio", "voice", "animation"})
MESSAGE_KINDS = frozenset({"report", "reporter", "agent", "note", "system"})
# Priority 1 is the most urgent (P1…P4); a new ticket starts at its severity's priority.
PRIORITY_OF: Mapping[Severity, int] = MappingProxyType(
    {Severity.critical: 1, Severity.high: 2, Severity.normal: 3, Severity.low: 4})
SEVERITY_RANK: Mapping[Severity, int] = MappingProxyType(
    {Severity.critical: 0, Severity.high: 1, Severity.normal: 2, Severity.low: 3})
_OPEN = tuple(s.value for s in OPEN_STATUSES)

ERROR_CODES = (
    "empty_summary", "summary_too_long", "bad_severity", "unknown_system", "unknown_unit",
    "bad_attachment", "too_many_attachments", "bad_kind", "inactive_reporter", "forbidden",
    "not_found", "empty_title", "incident_closed",
)


class TicketError(Exception):
    """Bad input to a ticket function; ``code`` is one of ``ERROR_CODES`` (stable, for texts)."""

    def __init__(self, code: str) -> None:
        assert code in ERROR_CODES, code
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class AttachmentIn:
    """A file the reporter or an agent sent, by its chat-platform file id (never downloaded)."""

    kind: str  # photo | document | video | audio | voice | animation
    file_id: str
    file_name: str | None = None
    file_size: int | None = None


# ------------------------------------------------------------------------------ value helpers


def clean_text(value: str | None, limit: int | None = None) -> str:
    """NFC, line breaks kept (\\r\\n → \\n), tabs → space, other control chars dropped, stripped.

    ``limit`` cuts the result (callers that must refuse long input check before cutting).
    """
    if not value:
        return ""
    out = []
    for ch in unicodedata.normalize("NFC", value.replace("\r\n", "\n").replace("\r", "\n")):
        if ch == "\n":
            out.append(ch)
        elif ch in "\t\v\f":
            out.append(" ")
        elif unicodedata.category(ch) not in ("Cc", "Cs"):
            out.append(ch)
    cleaned = "".join(out).strip()
    return cleaned[:limit].rstrip() if limit is not None else cleaned


def parse_severity(value: str | Severity | None) -> Severity | None:
    if isinstance(value, Severity):
        return value
    try:
        return Severity(str(value or "").strip().lower())
    except ValueError:
        return None


_CODE = re.compile(r"^#?\s*(?:ht)?\s*[-_ ]?\s*(\d{1,9})$", re.IGNORECASE)


def parse_code(value: str | None) -> int | None:
    """The ticket id in "HT-000123", "ht123", "#123" or "123"; None for anything else."""
    m = _CODE.match((value or "").strip())
    n = int(m.group(1)) if m else 0
    return n or None


def format_code(ticket_id: int) -> str:
    return f"HT-{ticket_id:06d}"


def is_agent(person: Person | None) -> bool:
    """Support staff: active, verified, role support or dtc_admin."""
    return (person is not None and bool(person.active) and person.verified_at is not None
            and person.role in AGENT_ROLES)


def is_operator(person: Person | None) -> bool:
    return is_agent(person) and person is not None and person.role in OPERATOR_ROLES


def is_open(ticket: Ticket) -> bool:
    return ticket.status in _OPEN


def _now(now: datetime | None) -> datetime:
    if now is not None and now.tzinfo is None:
        raise ValueError("naive datetime")
    return now or utcnow()


def _chat(chat_id: str | int) -> str:
    return str(chat_id)


# -------------------------------------------------------------------------------- creation


async def create_ticket(
    session: AsyncSession,
    reporter: Person,
    *,
    summary: str,
    system_code: str | None,
    severity: str | Severity,
    unit_code: str | None = None,
    attachments: Sequence[AttachmentIn] = (),
    actor: Actor,
    now: datetime | None = None,
    cal: BusinessCalendar | None = None,
) -> Ticket:
    """Store a new ticket with its report message, files, SLA due time and an audit row.

    The public code is derived from the id (``HT-000123``), so it is unique and gap-tolerant
    without a counter table. Raises ``TicketError`` for bad input; nothing is written then.
    """
    now = _now(now)
    if not reporter.active:
        raise TicketError("inactive_reporter")
    text_ = clean_text(summary)
    if not text_:
        raise TicketError("empty_summary")
    if len(text_) > MAX_SUMMARY:
        raise TicketError("summary_too_long")
    sev = parse_severity(severity)
    if sev is None:
        raise TicketError("bad_severity")
    system_code = (system_code or "").strip() or None
    if system_code is not None and await session.scalar(
            select(System.code).where(System.code == system_code)) is None:
        raise TicketError("unknown_system")
    unit = (unit_code or "").strip() or reporter.unit_code
    if unit_code and await session.scalar(select(Unit.code).where(Unit.code == unit)) is None:
        raise TicketError("unknown_unit")
    files = _check_attachments(attachments)

    ticket = Ticket(
        code=f"~{uuid.uuid4().hex[:18]}",  # placeholder until the id is known
        reporter_id=reporter.id, unit_code=unit, system_code=system_code, severity=sev.value,
        priority=PRIORITY_OF[sev], status=S.new.value, summary=text_, created_at=now,
        updated_at=now, sla_due_at=sla_due(now, sev, cal), reopen_count=0,
    )
    session.add(ticket)
    await session.flush()
    ticket.code = format_code(ticket.id)
    message = TicketMessage(ticket_id=ticket.id, kind="report", author_id=reporter.id,
                            text=text_, created_at=now)
    session.add(message)
    if files:
        await session.flush()
        session.add_all(_attachment_rows(ticket.id, message.id, files, now))
    await audit(session, actor, "ticket.create", "ticket", ticket.id, None, {
        "code": ticket.code, "system": system_code, "unit": unit, "severity": sev.value,
        "attachments": len(files),
    })
    return ticket


def _check_attachments(items: Iterable[AttachmentIn]) -> list[AttachmentIn]:
    files = list(items)
    if len(files) > MAX_ATTACHMENTS:
        raise TicketError("too_many_attachments")
    for f in files:
        if f.kind not in ATTACHMENT_KINDS or not f.file_id or len(f.file_id) > 255 \
                or (f.file_size is not None and f.file_size < 0):
            raise TicketError("bad_attachment")
    return files


def _attachment_rows(ticket_id: int, message_id: int | None, files: Iterable[AttachmentIn],
                     now: datetime) -> list[TicketAttachment]:
    return [TicketAttachment(ticket_id=ticket_id, message_id=message_id, kind=f.kind,
                             file_id=f.file_id, file_name=clean_text(f.file_name, 255) or None,
                             file_size=f.file_size, created_at=now)
            for f in files]


# --------------------------------------------------------------------------------- lookups


async def get(session: AsyncSession, ticket_id: int) -> Ticket | None:
    return await session.get(Ticket, ticket_id)


async def get_by_code(session: AsyncSession, code: str | None) -> Ticket | None:
    """Find by what people type: "HT-000123", "ht123", "#123" or "123"."""
    n = parse_code(code)
    if n is None:
        return None
    return await session.scalar(select(Ticket).where(Ticket.code == format_code(n)))


async def similar_open(session: AsyncSession, system_code: str | None, unit_code: str | None,
                       limit: int = 5) -> list[Ticket]:
    """Open tickets on the same system and unit, newest first: "already reported — follow it?"."""
    if not system_code:
        return []
    unit_cond = Ticket.unit_code.is_(None) if unit_code is None else Ticket.unit_code == unit_code
    rows = await session.scalars(
        select(Ticket)
        .where(Ticket.system_code == system_code, unit_cond, Ticket.status.in_(_OPEN))
        .order_by(Ticket.created_at.desc(), Ticket.id.desc())
        .limit(max(0, limit))
    )
    return list(rows)


async def list_for_reporter(session: AsyncSession, person_id: int, *, offset: int = 0,
                            limit: int = 10) -> tuple[list[Ticket], int]:
    """A reporter's tickets, newest first, one page, with the total for paging."""
    where = Ticket.reporter_id == person_id
    total = await session.scalar(select(func.count()).select_from(Ticket).where(where)) or 0
    rows = await session.scalars(
        select(Ticket).where(where).order_by(Ticket.created_at.desc(), Ticket.id.desc())
        .offset(max(0, offset)).limit(max(0, min(limit, 100)))
    )
    return list(rows), total


async def open_for_reporter(session: AsyncSession, person_id: int,
                            limit: int = 10) -> list[Ticket]:
    """A reporter's open tickets, newest first: to ask which one a new message belongs to."""
    rows = await session.scalars(
        select(Ticket).where(Ticket.reporter_id == person_id, Ticket.status.in_(_OPEN))
        .order_by(Ticket.created_at.desc(), Ticket.id.desc()).limit(max(0, limit))
    )
    return list(rows)


# --------------------------------------------------------------------------- state machine


class Party(enum.StrEnum):
    """Who may perform an action."""

    agent = "agent"
    reporter = "reporter"
    reporter_or_unit = "reporter_or_unit"  # the reporter or a colleague of the ticket's unit
    agent_or_reporter = "agent_or_reporter"


@dataclass(frozen=True)
class Transition:
    """An action: who may do it, from which statuses to which (None = status kept), and the
    statuses in which it has already been done."""

    who: Party
    moves: Mapping[TicketStatus, TicketStatus | None]
    already: frozenset[TicketStatus] = frozenset()


def _t(who: Party, moves: dict[TicketStatus, TicketStatus | None],
       already: Iterable[TicketStatus] = ()) -> Transition:
    return Transition(who, MappingProxyType(moves), frozenset(already))


_KEEP = None
TRANSITIONS: Mapping[str, Transition] = MappingProxyType({
    "triage": _t(Party.agent, {S.new: S.triaged}, [S.triaged]),
    "claim": _t(Party.agent, {S.new: S.in_progress, S.triaged: S.in_progress,
                              S.reopened: S.in_progress, S.in_progress: _KEEP,
                              S.waiting_reporter: _KEEP}),
    "need_info": _t(Party.agent, {S.new: S.waiting_reporter, S.triaged: S.waiting_reporter,
                                  S.in_progress: S.waiting_reporter,
                                  S.reopened: S.waiting_reporter}, [S.waiting_reporter]),
    "resolve": _t(Party.agent, {s: S.resolved for s in OPEN_STATUSES}, [S.resolved]),
    "close": _t(Party.agent_or_reporter, {S.resolved: S.closed}, [S.closed]),
    "escalate": _t(Party.agent, {s: _KEEP for s in OPEN_STATUSES}),
    "set_priority": _t(Party.agent, {S.new: S.triaged, S.triaged: _KEEP, S.in_progress: _KEEP,
                                     S.waiting_reporter: _KEEP, S.reopened: _KEEP}),
    "reply": _t(Party.agent, {S.new: S.in_progress, S.triaged: S.in_progress,
                              S.reopened: S.in_progress, S.in_progress: _KEEP,
                              S.waiting_reporter: _KEEP, S.resolved: _KEEP}),
    "reporter_reply": _t(Party.reporter, {S.waiting_reporter: S.in_progress, S.new: _KEEP,
                                          S.triaged: _KEEP, S.in_progress: _KEEP,
                                          S.reopened: _KEEP, S.resolved: _KEEP}),
    "add_info": _t(Party.reporter_or_unit, {S.waiting_reporter: S.in_progress, S.new: _KEEP,
                                            S.triaged: _KEEP, S.in_progress: _KEEP,
                                            S.reopened: _KEEP}),
    "reopen": _t(Party.reporter, {S.resolved: S.reopened, S.closed: S.reopened}),
    "rate": _t(Party.reporter, {S.resolved: _KEEP, S.closed: _KEEP}),
})
ACTIONS: tuple[str, ...] = tuple(TRANSITIONS)


class ActOutcome(enum.StrEnum):
    ok = "ok"
    forbidden = "forbidden"
    invalid_transition = "invalid_transition"
    not_found = "not_found"
    already = "already"
    too_late = "too_late"
    bad_value = "bad_value"


class Notify(enum.StrEnum):
    """Who the caller should tell after an ``ok`` action (the domain sends nothing itself)."""

    reporter = "reporter"  # the status changed, or the agent asked for something
    group = "group"  # the support group's card/topic should be refreshed or told
    assignee = "assignee"  # the owner, when the reporter did something
    operators = "operators"  # escalation


@dataclass(frozen=True)
class ActResult:
    outcome: ActOutcome
    ticket: Ticket | None = None
    old_status: TicketStatus | None = None
    new_status: TicketStatus | None = None
    notify: tuple[Notify, ...] = ()
    message: TicketMessage | None = None  # the text stored by add_info / reopen, if any

    @property
    def ok(self) -> bool:
        return self.outcome is ActOutcome.ok

    @property
    def changed(self) -> bool:
        return self.old_status != self.new_status


def _may(who: Party, person: Person, ticket: Ticket) -> bool:
    if not person.active:
        return False
    reporter = person.id == ticket.reporter_id
    if who is Party.agent:
        return is_agent(person)
    if who is Party.reporter:
        return reporter
    if who is Party.agent_or_reporter:
        return reporter or is_agent(person)
    # reporter_or_unit: a colleague following an already reported problem may add to it
    return reporter or (person.verified_at is not None and ticket.unit_code is not None
                        and person.unit_code == ticket.unit_code)


def _value_ok(action: str, value: int | None, reason: str | None) -> bool:
    if action == "set_priority":
        return isinstance(value, int) and 1 <= value <= 4
    if action == "rate":
        return isinstance(value, int) and 1 <= value <= 5
    if action == "add_info":
        return bool(clean_text(reason))
    return True


_SNAP_FIELDS = ("status", "assignee_id", "priority", "csat", "reopen_count")
_SNAP_TIMES = ("first_response_at", "resolved_at", "closed_at", "sla_due_at")


def _snapshot(ticket: Ticket) -> dict[str, Any]:
    snap: dict[str, Any] = {f: getattr(ticket, f) for f in _SNAP_FIELDS}
    for f in _SNAP_TIMES:
        v = getattr(ticket, f)
        snap[f] = v.isoformat() if v is not None else None
    return snap


async def lock(session: AsyncSession, ticket_id: int) -> Ticket | None:
    """Re-read the ticket under a write lock held until the caller's commit."""
    stmt = select(Ticket).where(Ticket.id == ticket_id).execution_options(
        populate_existing=True)
    if session.get_bind().dialect.name == "sqlite":
        await session.execute(text("UPDATE tickets SET id = id WHERE 1 = 0"))
    else:
        stmt = stmt.with_for_update()
    return await session.scalar(stmt)


async def act(
    session: AsyncSession,
    ticket_id: int,
    action: str,
    person: Person,
    *,
    actor: Actor,
    now: datetime | None = None,
    reason: str | None = None,
    value: int | None = None,
    cal: BusinessCalendar | None = None,
) -> ActResult:
    """Perform one life-cycle action (see ``TRANSITIONS``) for ``person``.

    Refusals change nothing and are told by the outcome; an ``ok`` writes an audit row
    ``ticket.<action>`` with the fields that changed before and after. ``reason`` is the text of
    add_info / reopen (stored as a reporter message) and is kept in the audit row of the others
    (a relayed reply is recorded with ``add_message``, which knows its chat message ids).
    """
    now = _now(now)
    ticket = await session.get(Ticket, ticket_id)
    if ticket is None:
        return ActResult(ActOutcome.not_found)
    rule = TRANSITIONS.get(action)
    if rule is None:
        return _refused(ActOutcome.bad_value, ticket)
    if not _may(rule.who, person, ticket):
        return _refused(ActOutcome.forbidden, ticket)
    if not _value_ok(action, value, reason):
        return _refused(ActOutcome.bad_value, ticket)
    locked = await lock(session, ticket_id)
    if locked is None:
        return ActResult(ActOutcome.not_found)
    ticket = locked
    old = TicketStatus(ticket.status)
    if old in rule.already:
        return _refused(ActOutcome.already, ticket)
    if old not in rule.moves:
        return _refused(ActOutcome.invalid_transition, ticket)
    target = rule.moves[old] or old
    before = _snapshot(ticket)
    step = _Step(session, ticket, person, now, clean_text(reason, MAX_MESSAGE) or None, value,
                 cal, target)
    outcome = await _APPLY[action](step)
    if outcome is not ActOutcome.ok:
        return _refused(outcome, step.ticket)
    ticket = step.ticket
    after = _snapshot(ticket)
    diff_before = {k: v for k, v in before.items() if after[k] != v}
    diff_after = {k: after[k] for k in diff_before}
    if step.reason and action not in ("add_info", "reopen"):
        diff_after["reason"] = step.reason[:500]
    if diff_before or action in ("escalate", "add_info", "reopen"):
        ticket.updated_at = now
        await audit(session, actor, f"ticket.{action}", "ticket", ticket.id, diff_before,
                    diff_after)
    new = TicketStatus(ticket.status)
    return ActResult(ActOutcome.ok, ticket, old, new,
                     _notify(action, ticket, person, old, new, bool(diff_before)), step.message)


def _refused(outcome: ActOutcome, ticket: Ticket) -> ActResult:
    status = TicketStatus(ticket.status)
    return ActResult(outcome, ticket, status, status)


@dataclass
class _Step:
    session: AsyncSession
    ticket: Ticket
    person: Person
    now: datetime
    reason: str | None
    value: int | None
    cal: BusinessCalendar | None
    target: TicketStatus
    message: TicketMessage | None = None


def _notify(action: str, ticket: Ticket, person: Person, old: TicketStatus, new: TicketStatus,
            changed: bool) -> tuple[Notify, ...]:
    out: list[Notify] = []
    by_reporter = person.id == ticket.reporter_id
    if (old != new or action == "need_info") and not by_reporter:
        out.append(Notify.reporter)
    if changed or action in ("add_info", "reporter_reply", "reopen", "rate", "escalate"):
        out.append(Notify.group)
    if by_reporter and ticket.assignee_id is not None and ticket.assignee_id != person.id:
        out.append(Notify.assignee)
    if action == "escalate":
        out.append(Notify.operators)
    return tuple(out)


async def _claim(st: _Step) -> ActOutcome:
    t = st.ticket
    if t.assignee_id is not None:
        if t.assignee_id == st.person.id and t.status != st.target.value:
            t.status = st.target.value  # the owner takes up a reopened/triaged ticket
            return ActOutcome.ok
        return ActOutcome.already
    result = await st.session.execute(
        update(Ticket)
        .where(Ticket.id == t.id, Ticket.assignee_id.is_(None), Ticket.status == t.status)
        .values(assignee_id=st.person.id, status=st.target.value, updated_at=st.now)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        return ActOutcome.already
    fresh = await st.session.scalar(select(Ticket).where(Ticket.id == t.id)
                                    .execution_options(populate_existing=True))
    assert fresh is not None
    st.ticket = fresh
    return ActOutcome.ok


async def _triage(st: _Step) -> ActOutcome:
    st.ticket.status = st.target.value
    return ActOutcome.ok


async def _need_info(st: _Step) -> ActOutcome:
    t = st.ticket
    t.status = st.target.value
    t.first_response_at = t.first_response_at or st.now
    return ActOutcome.ok


async def _resolve(st: _Step) -> ActOutcome:
    _mark_resolved(st.ticket, st.person, st.now)
    return ActOutcome.ok


def _mark_resolved(t: Ticket, person: Person, now: datetime) -> None:
    t.status = S.resolved.value
    t.resolved_at = now
    t.first_response_at = t.first_response_at or now
    if t.assignee_id is None:
        t.assignee_id = person.id


async def _close(st: _Step) -> ActOutcome:
    st.ticket.status = st.target.value
    st.ticket.closed_at = st.now
    return ActOutcome.ok


async def _escalate(st: _Step) -> ActOutcome:
    t = st.ticket
    if t.priority <= 1:
        earlier = await st.session.scalar(
            select(AuditLog.id).where(AuditLog.object_type == "ticket",
                                      AuditLog.object_id == str(t.id),
                                      AuditLog.action == "ticket.escalate").limit(1))
        if earlier is not None:
            return ActOutcome.already
    t.priority = max(1, t.priority - 1)
    return ActOutcome.ok


async def _set_priority(st: _Step) -> ActOutcome:
    t = st.ticket
    if t.priority == st.value:
        return ActOutcome.already
    assert st.value is not None
    t.priority = st.value
    t.status = st.target.value
    return ActOutcome.ok


async def _reply(st: _Step) -> ActOutcome:
    t = st.ticket
    t.status = st.target.value
    t.first_response_at = t.first_response_at or st.now
    if t.assignee_id is None:  # whoever answers first owns it
        t.assignee_id = st.person.id
    return ActOutcome.ok


async def _reporter_reply(st: _Step) -> ActOutcome:
    st.ticket.status = st.target.value
    return ActOutcome.ok


async def _add_info(st: _Step) -> ActOutcome:
    st.ticket.status = st.target.value
    st.message = await add_message(st.session, st.ticket, "reporter", st.person, st.reason or "",
                                   now=st.now)
    return ActOutcome.ok


async def _reopen(st: _Step) -> ActOutcome:
    t = st.ticket
    resolved_at = t.resolved_at or t.closed_at
    if resolved_at is not None and st.now - resolved_at > REOPEN_WINDOW:
        return ActOutcome.too_late
    t.status = st.target.value
    t.reopen_count = (t.reopen_count or 0) + 1
    t.resolved_at = None
    t.closed_at = None
    t.sla_due_at = sla_due(st.now, t.severity, st.cal)  # a fresh deadline, scanned again
    t.sla_warned_at = None
    t.sla_breached_at = None
    if st.reason:
        st.message = await add_message(st.session, t, "reporter", st.person, st.reason,
                                       now=st.now)
    return ActOutcome.ok


async def _rate(st: _Step) -> ActOutcome:
    t = st.ticket
    if t.csat is not None:
        return ActOutcome.already
    t.csat = st.value
    t.csat_at = st.now
    return ActOutcome.ok


_APPLY = {
    "triage": _triage, "claim": _claim, "need_info": _need_info, "resolve": _resolve,
    "close": _close, "escalate": _escalate, "set_priority": _set_priority, "reply": _reply,
    "reporter_reply": _reporter_reply, "add_info": _add_info, "reopen": _reopen, "rate": _rate,
}
assert set(_APPLY) == set(TRANSITIONS)


# -------------------------------------------------------------------------------- messages


async def add_message(
    session: AsyncSession,
    ticket: Ticket,
    kind: str,
    author: Person | None,
    text: str | None,
    *,
    src: tuple[str | int, int] | None = None,
    dst: tuple[str | int, int] | None = None,
    attachments: Sequence[AttachmentIn] = (),
    now: datetime | None = None,
) -> TicketMessage:
    """Record one message of the conversation with where it lives on each side, so an edit of
    the original (``src``) can be relayed to its copy (``dst``) and a reply to either side can
    be traced back to the ticket."""
    if kind not in MESSAGE_KINDS:
        raise TicketError("bad_kind")
    files = _check_attachments(attachments)
    now = _now(now)
    msg = TicketMessage(
        ticket_id=ticket.id, kind=kind, author_id=author.id if author is not None else None,
        text=clean_text(text, MAX_MESSAGE) or None, created_at=now,
        src_chat_id=_chat(src[0]) if src else None, src_message_id=src[1] if src else None,
        dst_chat_id=_chat(dst[0]) if dst else None, dst_message_id=dst[1] if dst else None,
    )
    session.add(msg)
    if files:
        await session.flush()
        session.add_all(_attachment_rows(ticket.id, msg.id, files, now))
    return msg


async def set_message_route(session: AsyncSession, message_id: int, *,
                            src: tuple[str | int, int] | None = None,
                            dst: tuple[str | int, int] | None = None) -> None:
    """Fill in where a stored message was sent once the copy exists (after the send)."""
    msg = await session.get(TicketMessage, message_id)
    if msg is None:
        return
    if src is not None:
        msg.src_chat_id, msg.src_message_id = _chat(src[0]), src[1]
    if dst is not None:
        msg.dst_chat_id, msg.dst_message_id = _chat(dst[0]), dst[1]


async def find_message_by_src(session: AsyncSession, chat_id: str | int,
                              message_id: int) -> TicketMessage | None:
    """The stored message whose original is this chat message (to relay its edit)."""
    return await session.scalar(
        select(TicketMessage).where(TicketMessage.src_chat_id == _chat(chat_id),
                                    TicketMessage.src_message_id == message_id)
        .order_by(TicketMessage.id.desc()).limit(1))


async def find_message_by_dst(session: AsyncSession, chat_id: str | int,
                              message_id: int) -> TicketMessage | None:
    """The stored message whose relayed copy is this chat message (a reply to a copy)."""
    return await session.scalar(
        select(TicketMessage).where(TicketMessage.dst_chat_id == _chat(chat_id),
                                    TicketMessage.dst_message_id == message_id)
        .order_by(TicketMessage.id.desc()).limit(1))


async def mark_edited(session: AsyncSession, chat_id: str | int, message_id: int,
                      text: str | None, *, now: datetime | None = None) -> TicketMessage | None:
    """Store the new text of an edited original; returns the message (its ``dst`` is the copy
    to edit) or None when the message is not part of any ticket."""
    msg = await find_message_by_src(session, chat_id, message_id)
    if msg is None:
        return None
    msg.text = clean_text(text, MAX_MESSAGE) or None
    msg.edited_at = _now(now)
    return msg


async def record_publication(session: AsyncSession, ticket_id: int, chat_id: str | int,
                             topic_id: int | None, card_message_id: int | None) -> None:
    """Remember where the ticket's card (and forum topic) lives in the support group."""
    ticket = await session.get(Ticket, ticket_id)
    if ticket is not None:
        ticket.group_chat_id = _chat(chat_id)
        ticket.topic_id = topic_id
        ticket.card_message_id = card_message_id


async def by_topic(session: AsyncSession, chat_id: str | int, topic_id: int) -> Ticket | None:
    """The ticket owning a forum topic of the support group."""
    return await session.scalar(
        select(Ticket).where(Ticket.group_chat_id == _chat(chat_id), Ticket.topic_id == topic_id)
        .order_by(Ticket.id.desc()).limit(1))


async def by_message(session: AsyncSession, chat_id: str | int,
                     message_id: int) -> Ticket | None:
    """The ticket a chat message belongs to: its card, or a relayed message on either side
    (replying to a ticket's message picks that ticket)."""
    chat = _chat(chat_id)
    ticket = await session.scalar(
        select(Ticket).where(Ticket.group_chat_id == chat, Ticket.card_message_id == message_id)
        .limit(1))
    if ticket is not None:
        return ticket
    msg = await find_message_by_dst(session, chat, message_id) \
        or await find_message_by_src(session, chat, message_id)
    return await session.get(Ticket, msg.ticket_id) if msg is not None else None


async def attachments_of(session: AsyncSession, ticket_id: int) -> list[TicketAttachment]:
    rows = await session.scalars(select(TicketAttachment)
                                 .where(TicketAttachment.ticket_id == ticket_id)
                                 .order_by(TicketAttachment.id))
    return list(rows)


@dataclass(frozen=True)
class CardView:
    """What the support group's card shows about one ticket."""

    id: int
    code: str
    summary: str
    status: TicketStatus
    severity: Severity
    priority: int
    system_code: str | None
    system_abbr: str | None
    system_name_vi: str | None
    system_name_en: str | None
    unit_code: str | None
    unit_name: str | None
    reporter_name: str
    reporter_phone: str | None
    reporter_position: str | None
    assignee_name: str | None
    created_at: datetime
    sla_due_at: datetime | None
    incident_id: int | None
    attachments: int
    csat: int | None

    def system_name(self, lang: str | None = "vi") -> str | None:
        return self.system_name_en if lang == "en" else self.system_name_vi


async def card_view(session: AsyncSession, ticket: Ticket) -> CardView:
    """Names behind a ticket's ids, in one query."""
    reporter, assignee = aliased(Person), aliased(Person)
    row = (await session.execute(
        select(System.abbr, System.name_vi, System.name_en, Unit.name, reporter.full_name,
               reporter.phone, reporter.position, assignee.full_name,
               select(func.count()).where(TicketAttachment.ticket_id == ticket.id)
               .scalar_subquery())
        .select_from(Ticket)
        .join(reporter, reporter.id == Ticket.reporter_id)
        .outerjoin(assignee, assignee.id == Ticket.assignee_id)
        .outerjoin(System, System.code == Ticket.system_code)
        .outerjoin(Unit, Unit.code == Ticket.unit_code)
        .where(Ticket.id == ticket.id)
    )).one()
    abbr, name_vi, name_en, unit_name, rep, phone, position, agent, files = row
    return CardView(
        ticket.id, ticket.code, ticket.summary, TicketStatus(ticket.status),
        Severity(ticket.severity), ticket.priority, ticket.system_code, abbr, name_vi, name_en,
        ticket.unit_code, unit_name, rep, phone, position, agent, ticket.created_at,
        ticket.sla_due_at, ticket.incident_id, files or 0, ticket.csat,
    )


# ------------------------------------------------------------------------------- incidents


async def open_incident_for(session: AsyncSession, system_code: str | None) -> Incident | None:
    """The open incident on a system, if any (to tell new reporters it is known)."""
    if not system_code:
        return None
    return await session.scalar(
        select(Incident).where(Incident.system_code == system_code, Incident.status == "open")
        .order_by(Incident.id.desc()).limit(1))


async def incident_candidate(
    session: AsyncSession,
    system_code: str | None,
    *,
    now: datetime,
    window: timedelta = timedelta(minutes=60),
    threshold: int = 3,
) -> list[Ticket] | None:
    """Open tickets on ``system_code`` created within ``window`` and not in an incident, oldest
    first, when there are at least ``threshold`` of them and no incident is open on that system
    yet (then the caller links new tickets to it instead); otherwise None."""
    if not system_code or await open_incident_for(session, system_code) is not None:
        return None
    rows = list(await session.scalars(
        select(Ticket).where(Ticket.system_code == system_code, Ticket.status.in_(_OPEN),
                             Ticket.incident_id.is_(None), Ticket.created_at > now - window,
                             Ticket.created_at <= now)
        .order_by(Ticket.created_at, Ticket.id)))
    return rows if len(rows) >= max(1, threshold) else None


async def _lock_system(session: AsyncSession, system_code: str) -> bool:
    """Serialize incident changes on one system; False if the system does not exist."""
    stmt = select(System.code).where(System.code == system_code)
    if session.get_bind().dialect.name == "sqlite":
        await session.execute(text("UPDATE tickets SET id = id WHERE 1 = 0"))
    else:
        stmt = stmt.with_for_update()
    return await session.scalar(stmt) is not None


async def _link(session: AsyncSession, incident: Incident, ticket_ids: Iterable[int],
                person: Person, now: datetime) -> list[Ticket]:
    conds: list[ColumnElement[bool]] = [
        Ticket.id.in_(list(ticket_ids)), Ticket.status.in_(_OPEN), Ticket.incident_id.is_(None)]
    if incident.system_code is not None:
        conds.append(Ticket.system_code == incident.system_code)
    if not is_agent(person):  # a reporter may link only their own tickets
        conds.append(Ticket.reporter_id == person.id)
    rows = list(await session.scalars(select(Ticket).where(*conds).order_by(Ticket.id)
                                      .with_for_update()
                                      .execution_options(populate_existing=True)))
    for t in rows:
        t.incident_id = incident.id
        t.updated_at = now
    return rows


async def create_incident(
    session: AsyncSession,
    system_code: str,
    ticket_ids: Iterable[int],
    person: Person,
    actor: Actor,
    title: str,
    *,
    now: datetime | None = None,
) -> Incident:
    """Open an incident on a system and link the given open tickets to it.

    If an incident is already open on that system (two agents accepted the same proposal), the
    tickets are linked to that one and it is returned: never two open incidents per system.
    """
    now = _now(now)
    if not is_agent(person):
        raise TicketError("forbidden")
    title = clean_text(title, MAX_TITLE).replace("\n", " ")
    if not title:
        raise TicketError("empty_title")
    if not await _lock_system(session, system_code):
        raise TicketError("unknown_system")
    incident = await open_incident_for(session, system_code)
    created = incident is None
    if incident is None:
        incident = Incident(system_code=system_code, title=title, status="open",
                            created_by=person.id, created_at=now)
        session.add(incident)
        await session.flush()
    linked = await _link(session, incident, ticket_ids, person, now)
    await audit(session, actor, "incident.create" if created else "incident.link", "incident",
                incident.id, None, {"system": system_code, "title": incident.title,
                                    "tickets": [t.code for t in linked]})
    return incident


async def link_to_incident(
    session: AsyncSession,
    incident_id: int,
    ticket_ids: Iterable[int],
    person: Person,
    actor: Actor,
    *,
    now: datetime | None = None,
) -> list[Ticket]:
    """Link more open tickets to an open incident; returns those actually linked (tickets of
    another system, closed or already in an incident are skipped). Agents link any ticket, a
    reporter only their own ("my problem is this known one")."""
    now = _now(now)
    if not person.active:
        raise TicketError("forbidden")
    incident = await session.get(Incident, incident_id)
    if incident is None:
        raise TicketError("not_found")
    if incident.status != "open":
        raise TicketError("incident_closed")
    linked = await _link(session, incident, ticket_ids, person, now)
    if linked:
        await audit(session, actor, "incident.link", "incident", incident.id, None,
                    {"tickets": [t.code for t in linked]})
    return linked


async def resolve_incident(
    session: AsyncSession,
    incident_id: int,
    person: Person,
    actor: Actor,
    now: datetime | None = None,
) -> list[Ticket]:
    """Resolve an incident and every open ticket linked to it; returns those tickets so the
    caller notifies their reporters. An incident already resolved returns []."""
    now = _now(now)
    if not is_agent(person):
        raise TicketError("forbidden")
    incident = await session.get(Incident, incident_id)
    if incident is None:
        raise TicketError("not_found")
    if incident.system_code is not None:
        await _lock_system(session, incident.system_code)
    await session.refresh(incident)
    if incident.status != "open":
        return []
    incident.status = "resolved"
    incident.resolved_at = now
    tickets = list(await session.scalars(
        select(Ticket).where(Ticket.incident_id == incident.id, Ticket.status.in_(_OPEN))
        .order_by(Ticket.id).with_for_update().execution_options(populate_existing=True)))
    for t in tickets:
        before = _snapshot(t)
        _mark_resolved(t, person, now)
        t.updated_at = now
        after = _snapshot(t)
        changed = {k for k in before if before[k] != after[k]}
        await audit(session, actor, "ticket.resolve", "ticket", t.id,
                    {k: before[k] for k in changed},
                    {**{k: after[k] for k in changed}, "incident_id": incident.id})
    await audit(session, actor, "incident.resolve", "incident", incident.id, {"status": "open"},
                {"status": "resolved", "tickets": [t.code for t in tickets]})
    return tickets


# ----------------------------------------------------------------------------------- queue


@dataclass(frozen=True)
class QueueRow:
    """One open ticket in the support queue."""

    id: int
    code: str
    summary: str  # the first 80 characters
    system_code: str | None
    system_abbr: str | None
    unit_code: str | None
    unit_name: str | None
    severity: Severity
    priority: int
    status: TicketStatus
    assignee_id: int | None
    assignee_name: str | None
    sla_due_at: datetime | None
    minutes_to_due: int | None  # negative = breached by that many minutes

    @property
    def breached(self) -> bool:
        return self.minutes_to_due is not None and self.minutes_to_due < 0


def _severity_rank() -> ColumnElement[int]:
    return case({s.value: r for s, r in SEVERITY_RANK.items()}, value=Ticket.severity, else_=9)


async def queue(
    session: AsyncSession,
    *,
    person: Person | None = None,
    mine: bool = False,
    unassigned: bool = False,
    system_code: str | None = None,
    unit_code: str | None = None,
    now: datetime,
    offset: int = 0,
    limit: int = 10,
    count_cap: int | None = None,
) -> tuple[list[QueueRow], int]:
    """Open tickets, most urgent first: the earliest SLA due (so breached ones lead), then
    severity, then age; filters combine. ``mine`` without a person matches nothing.

    The page is picked per open status (each an ordered walk of ``ix_tickets_open`` that stops
    after offset+limit rows) and merged, so it costs the same with 100 or 100,000 open tickets;
    names are joined only for the rows of the page. Counting is the one part that grows with
    the backlog: ``count_cap`` stops it there (total = min(open, cap); show "cap+").
    """
    conds: list[ColumnElement[bool]] = []
    if mine:
        conds.append(Ticket.assignee_id == (person.id if person is not None else -1))
    if unassigned:
        conds.append(Ticket.assignee_id.is_(None))
    if system_code:
        conds.append(Ticket.system_code == system_code)
    if unit_code:
        conds.append(Ticket.unit_code == unit_code)
    matching = select(Ticket.id).where(Ticket.status.in_(_OPEN), *conds)
    if count_cap is not None:
        matching = matching.limit(max(1, count_cap))
    total = await session.scalar(select(func.count()).select_from(matching.subquery())) or 0
    offset, limit = max(0, offset), max(0, min(limit, 100))
    if not total or not limit:
        return [], total
    rank = _severity_rank()
    parts = [
        select(Ticket.id.label("id"), Ticket.sla_due_at.label("due"), rank.label("rank"),
               Ticket.created_at.label("created"))
        .where(Ticket.status == status, *conds)
        .order_by(Ticket.sla_due_at.asc().nulls_last(), rank, Ticket.created_at, Ticket.id)
        .limit(offset + limit).subquery()
        for status in _OPEN
    ]
    merged = union_all(*(select(*p.c) for p in parts)).subquery()
    page = (select(merged)
            .order_by(merged.c.due.asc().nulls_last(), merged.c.rank, merged.c.created,
                      merged.c.id)
            .offset(offset).limit(limit).subquery())
    stmt: Select[Any] = (
        select(Ticket.id, Ticket.code, func.substr(Ticket.summary, 1, 80), Ticket.system_code,
               System.abbr, Ticket.unit_code, Unit.name, Ticket.severity, Ticket.priority,
               Ticket.status, Ticket.assignee_id, Person.full_name, Ticket.sla_due_at)
        .join(page, page.c.id == Ticket.id)
        .outerjoin(System, System.code == Ticket.system_code)
        .outerjoin(Unit, Unit.code == Ticket.unit_code)
        .outerjoin(Person, Person.id == Ticket.assignee_id)
        .order_by(page.c.due.asc().nulls_last(), page.c.rank, page.c.created, page.c.id)
    )
    out = []
    for (tid, code, summary, sys_code, abbr, u_code, u_name, sev, prio, status, a_id, a_name,
         due) in await session.execute(stmt):
        minutes = math.floor((due - now).total_seconds() / 60) if due is not None else None
        out.append(QueueRow(tid, code, summary, sys_code, abbr, u_code, u_name, Severity(sev),
                            prio, TicketStatus(status), a_id, a_name, due, minutes))
    return out, total


# -------------------------------------------------------------------------------- SLA scan


async def sla_due_for_warning(
    session: AsyncSession,
    now: datetime,
    *,
    warn_before: timedelta = timedelta(hours=1),
    limit: int = 500,
) -> list[Ticket]:
    """Open tickets not yet warned whose SLA ends within ``warn_before`` (not yet breached)."""
    rows = await session.scalars(
        select(Ticket).where(Ticket.status.in_(_OPEN), Ticket.sla_warned_at.is_(None),
                             Ticket.sla_breached_at.is_(None), Ticket.sla_due_at > now,
                             Ticket.sla_due_at <= now + warn_before)
        .order_by(Ticket.sla_due_at, Ticket.id).limit(limit))
    return list(rows)


async def sla_breached(session: AsyncSession, now: datetime, *, limit: int = 500) -> list[Ticket]:
    """Open tickets whose SLA has passed and that are not yet marked breached."""
    rows = await session.scalars(
        select(Ticket).where(Ticket.status.in_(_OPEN), Ticket.sla_breached_at.is_(None),
                             Ticket.sla_due_at <= now)
        .order_by(Ticket.sla_due_at, Ticket.id).limit(limit))
    return list(rows)


async def _mark_once(session: AsyncSession, ticket_id: int, column: str, now: datetime,
                     actor: Actor | None, action: str) -> bool:
    col = getattr(Ticket, column)
    result = await session.execute(
        update(Ticket).where(Ticket.id == ticket_id, col.is_(None))
        .values({column: now, "updated_at": now})
        .execution_options(synchronize_session=False))
    if getattr(result, "rowcount", 0) != 1:
        return False
    await session.execute(select(Ticket).where(Ticket.id == ticket_id)
                          .execution_options(populate_existing=True))  # refresh a loaded copy
    await audit(session, actor or Actor.system("sla"), action, "ticket", ticket_id, None,
                {column: now.isoformat()})
    return True


async def mark_warned(session: AsyncSession, ticket_id: int, now: datetime, *,
                      actor: Actor | None = None) -> bool:
    """True only for the one caller that marks it: send the warning only then."""
    return await _mark_once(session, ticket_id, "sla_warned_at", now, actor, "ticket.sla_warning")


async def mark_breached(session: AsyncSession, ticket_id: int, now: datetime, *,
                        actor: Actor | None = None) -> bool:
    """True only for the one caller that marks it: escalate to operators only then."""
    return await _mark_once(session, ticket_id, "sla_breached_at", now, actor,
                            "ticket.sla_breach")


# -------------------------------------------------------------------------- support groups


async def set_support_group(
    session: AsyncSession,
    chat_id: str | int,
    title: str | None,
    is_forum: bool,
    person: Person,
    actor: Actor,
    *,
    now: datetime | None = None,
) -> SupportGroup:
    """Make this chat the (single active) support group; operators only."""
    now = _now(now)
    if not is_operator(person):
        raise TicketError("forbidden")
    chat = _chat(chat_id)
    group = await session.get(SupportGroup, chat)
    before = None if group is None else {"title": group.title, "is_forum": group.is_forum,
                                         "active": group.active}
    await session.execute(update(SupportGroup).where(SupportGroup.chat_id != chat,
                                                     SupportGroup.active.is_(True))
                          .values(active=False).execution_options(synchronize_session="fetch"))
    if group is None:
        group = SupportGroup(chat_id=chat)
        session.add(group)
    group.title = clean_text(title, 255) or None
    group.is_forum = bool(is_forum)
    group.active = True
    group.configured_by = person.id
    group.configured_at = now
    await audit(session, actor, "support_group.set", "support_group", chat, before,
                {"title": group.title, "is_forum": group.is_forum, "active": True})
    return group


async def current_support_group(session: AsyncSession) -> SupportGroup | None:
    """The active support group, the most recently configured if several."""
    return await session.scalar(
        select(SupportGroup).where(SupportGroup.active.is_(True))
        .order_by(SupportGroup.configured_at.desc()).limit(1))



# ---------------------------------------------------------------------------- publication


async def unpublished(session: AsyncSession, *, limit: int = 20,
                      skip_locked: bool = False) -> list[Ticket]:
    """Open tickets not yet shown in a support group, oldest first. With ``skip_locked`` (on
    PostgreSQL) the rows are locked for the caller's transaction, so two workers never publish
    the same ticket."""
    stmt = (select(Ticket).where(Ticket.group_chat_id.is_(None), Ticket.status.in_(_OPEN))
            .order_by(Ticket.id).limit(limit))
    if skip_locked and session.get_bind().dialect.name != "sqlite":
        stmt = stmt.with_for_update(skip_locked=True)
    return list(await session.scalars(stmt))


async def agent_chats(session: AsyncSession, *, operators_only: bool = False
                      ) -> list[tuple[Person, str, str | None]]:
    """(person, telegram chat id, language) of active verified support staff (or operators):
    whom to tell about escalations and SLA breaches."""
    roles_ = OPERATOR_ROLES if operators_only else AGENT_ROLES
    rows = await session.execute(
        select(Person, ChatIdentity.external_id, ChatIdentity.lang)
        .join(ChatIdentity, ChatIdentity.person_id == Person.id)
        .where(Person.role.in_(sorted(roles_)), Person.active.is_(True),
               Person.verified_at.is_not(None), ChatIdentity.channel == "telegram")
        .order_by(Person.id))
    return [(p, ext, lang) for p, ext, lang in rows]


async def reporter_chat(session: AsyncSession, ticket: Ticket) -> tuple[str, str | None] | None:
    """(telegram chat id, language) of the ticket's reporter, if they have a chat identity."""
    row = (await session.execute(
        select(ChatIdentity.external_id, ChatIdentity.lang)
        .where(ChatIdentity.person_id == ticket.reporter_id, ChatIdentity.channel == "telegram")
        .order_by(ChatIdentity.id).limit(1))).first()
    return (row[0], row[1]) if row is not None else None
