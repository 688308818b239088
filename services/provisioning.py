"""Provisioning requests: who may ask for what, who approves which kind, and the state machine
submitted → approved/rejected → in_progress → done/failed (DESIGN.md §3).

An approved request is itself the durable job the provisioning task executes
(``tasks/provisioning.py``). Approvals are conditional UPDATEs, so a double press or two
approvers at the same moment approve once. People are told of changes through
:class:`~db.models.ProvNotice` rows the task sends after the commit.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import (
    Account,
    AccountStatus,
    ChatIdentity,
    Person,
    ProvisioningRequest,
    ProvKind,
    ProvNotice,
    ProvState,
    Role,
    Unit,
    UTCDateTime,
    utcnow,
)
from services.audit import Actor, audit


class Approval(enum.StrEnum):
    unit_admin = "unit_admin"
    operator = "operator"
    both = "both"


# Who approves which kind. "unit_admin": an admin of the request's unit (an operator stands
# in when the unit has none); "both": that and an operator, in either order.
POLICY: dict[ProvKind, Approval] = {
    ProvKind.email: Approval.unit_admin,
    ProvKind.system_account: Approval.both,
    ProvKind.password_reset: Approval.unit_admin,
    ProvKind.deprovision: Approval.unit_admin,
    ProvKind.e_id_code: Approval.operator,
    ProvKind.domain: Approval.operator,
}
DIRECTORY_KINDS = (ProvKind.email, ProvKind.system_account, ProvKind.password_reset,
                   ProvKind.deprovision)
CATALOG_KINDS = (ProvKind.e_id_code, ProvKind.domain)
OPEN_STATES = (ProvState.submitted.value, ProvState.approved.value, ProvState.in_progress.value)

# Roles (directory groups ``<system>-<role>``) a system account can be given.
SYSTEM_ROLES: dict[str, tuple[str, ...]] = {
    "qlvb": ("van_thu", "chuyen_vien", "lanh_dao", "quan_tri"),
    "tthc": ("mot_cua", "chuyen_vien", "lanh_dao", "quan_tri"),
    "csdl_cbcc": ("chuyen_vien", "quan_tri"),
}
ADMIN_ROLES = frozenset({"quan_tri"})

# Catalog items: what an operator ticks off before recording the outcome.
CHECKLISTS: dict[ProvKind, tuple[str, ...]] = {
    ProvKind.e_id_code: ("decision", "issue", "close_unused"),
    ProvKind.domain: ("register", "dns", "keep_old"),
}
DOMAIN_RE = re.compile(r"^(?=.{4,120}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,}$")
EID_RE = re.compile(r"^[A-Za-z0-9.\-]{3,40}$")


class ProvError(Exception):
    """A request that cannot be made; ``code`` names the text key shown to the person."""

    def __init__(self, code: str, **detail: Any) -> None:
        super().__init__(code)
        self.code = code
        self.detail = detail


def _active(p: Person | None) -> bool:
    return p is not None and p.verified_at is not None and p.active


def is_operator(p: Person | None) -> bool:
    return _active(p) and p is not None and p.role == Role.dtc_admin.value


def is_unit_admin_of(p: Person | None, unit_code: str | None) -> bool:
    return (_active(p) and p is not None and p.role == Role.unit_admin.value
            and unit_code is not None and p.unit_code == unit_code)


def may_request_for(requester: Person | None, subject: Person) -> bool:
    """Oneself; a unit admin for staff of their unit; an operator for anyone."""
    if not _active(requester):
        return False
    assert requester is not None
    return (requester.id == subject.id or is_operator(requester)
            or is_unit_admin_of(requester, subject.unit_code))


async def unit_has_admin(session: AsyncSession, unit_code: str | None) -> bool:
    if unit_code is None:
        return False
    n = await session.scalar(select(func.count()).select_from(Person).where(
        Person.unit_code == unit_code, Person.role == Role.unit_admin.value,
        Person.active.is_(True), Person.verified_at.is_not(None)))
    return bool(n)


async def active_account(session: AsyncSession, person_id: int,
                         system: str = "email") -> Account | None:
    return await session.scalar(select(Account).where(
        Account.person_id == person_id, Account.system_code == system,
        Account.status == AccountStatus.active.value).order_by(Account.id.desc()).limit(1))


async def notice(session: AsyncSession, person_id: int | None, key: str,
                 request_id: int | None = None, **params: Any) -> None:
    """Queue a message for a person (sent by the provisioning task after the commit)."""
    if person_id is not None:
        session.add(ProvNotice(person_id=person_id, key=key, params=params,
                               request_id=request_id))


async def operators(session: AsyncSession) -> list[Person]:
    return list(await session.scalars(select(Person).where(
        Person.role == Role.dtc_admin.value, Person.active.is_(True),
        Person.verified_at.is_not(None)).order_by(Person.id)))


def _snapshot(req: ProvisioningRequest) -> dict[str, Any]:
    return {"kind": req.kind, "state": req.state, "subject": req.subject_id,
            "unit": req.unit_code, "system": req.system_code, "role": req.role}


async def create_request(
    session: AsyncSession, requester: Person | None, kind: ProvKind, *, actor: Actor,
    subject: Person | None = None, unit_code: str | None = None, system_code: str | None = None,
    role: str | None = None, payload: dict[str, Any] | None = None, batch: str | None = None,
    auto_approve: bool = False,
) -> ProvisioningRequest:
    """Validate and store a request; approvals the requester can give themselves (their own
    unit as its admin, any as an operator) are filled in at once. ``auto_approve`` is for the
    system's own jobs (expiry, revocation) and operators' bulk files."""
    payload = dict(payload or {})
    if kind in DIRECTORY_KINDS:
        if subject is None:
            raise ProvError("prov.err_no_subject")
        if not auto_approve and not may_request_for(requester, subject):
            raise ProvError("prov.err_other_unit")
        unit_code = subject.unit_code
        if unit_code is None:
            raise ProvError("prov.err_no_unit")
    elif kind in CATALOG_KINDS:
        if not auto_approve and not (is_operator(requester) or
                                     is_unit_admin_of(requester, unit_code)):
            raise ProvError("prov.err_other_unit")
        if kind is ProvKind.domain and not DOMAIN_RE.match(str(payload.get("domain", ""))):
            raise ProvError("prov.err_domain")
    if unit_code is None or await session.get(Unit, unit_code) is None:
        raise ProvError("prov.err_no_unit")
    if kind is ProvKind.system_account and (
            system_code not in SYSTEM_ROLES or role not in SYSTEM_ROLES[system_code]):
        raise ProvError("prov.err_role")
    assert subject is not None or kind in CATALOG_KINDS
    if (kind in (ProvKind.password_reset, ProvKind.deprovision) and subject is not None
            and not payload.get("account_id")
            and await active_account(session, subject.id) is None):
        raise ProvError("prov.err_no_account")
    if kind in (ProvKind.email, ProvKind.system_account) and subject is not None:
        dup = await session.scalar(select(ProvisioningRequest.id).where(
            ProvisioningRequest.kind == kind.value, ProvisioningRequest.subject_id == subject.id,
            ProvisioningRequest.system_code.is_(system_code) if system_code is None
            else ProvisioningRequest.system_code == system_code,
            ProvisioningRequest.state.in_(OPEN_STATES)).limit(1))
        if dup is not None:
            raise ProvError("prov.err_duplicate", id=dup)
        if kind is ProvKind.email:
            acc = await active_account(session, subject.id)
            if acc is not None and acc.request_id is not None:
                raise ProvError("prov.err_has_account", address=acc.address)
    policy = POLICY[kind]
    needs_unit = policy in (Approval.unit_admin, Approval.both)
    needs_op = policy in (Approval.operator, Approval.both)
    if needs_unit and not await unit_has_admin(session, unit_code):
        needs_unit, needs_op = False, True  # no admin of the unit: operators decide
    req = ProvisioningRequest(
        kind=kind.value, requester_id=requester.id if requester else None,
        subject_id=subject.id if subject else None, unit_code=unit_code,
        system_code=system_code, role=role, payload=payload, needs_unit_admin=needs_unit,
        needs_operator=needs_op, batch=batch, attempts=0,
        checklist={k: False for k in CHECKLISTS.get(kind, ())} or None,
    )
    if auto_approve:
        req.state = ProvState.approved.value
        req.decided_at = utcnow()
    else:
        if needs_unit and is_unit_admin_of(requester, unit_code):
            req.unit_approved_by = requester.id if requester else None
        if needs_op and is_operator(requester):
            req.operator_approved_by = requester.id if requester else None
        if (not needs_unit or req.unit_approved_by) and (not needs_op or req.operator_approved_by):
            req.state = ProvState.approved.value
            req.decided_at = utcnow()
    session.add(req)
    await session.flush()
    await audit(session, actor, "provisioning.requested", "provisioning_request", req.id,
                after=_snapshot(req) | {"payload": payload})
    if req.state == ProvState.approved.value:
        await after_approval(session, req)
    return req


class DecideOutcome(enum.StrEnum):
    approved = "approved"  # fully approved now
    partly = "partly"  # this approval counted, another is still needed
    rejected = "rejected"
    already = "already"
    forbidden = "forbidden"
    not_found = "not_found"


@dataclass
class Decision:
    outcome: DecideOutcome
    request: ProvisioningRequest | None = None


async def _as_which(session: AsyncSession, req: ProvisioningRequest,
                    approver: Person | None) -> str | None:
    """Which approval this person may give: 'unit', 'operator' or None."""
    if req.needs_operator and req.operator_approved_by is None and is_operator(approver):
        return "operator"
    if req.needs_unit_admin and req.unit_approved_by is None and \
            is_unit_admin_of(approver, req.unit_code):
        return "unit"
    return None


async def approve(session: AsyncSession, request_id: int, approver: Person | None,
                  actor: Actor) -> Decision:
    """Give one approval; the final one flips the state in the same UPDATE, so concurrent
    approvers (same or different part) can neither approve twice nor leave it hanging."""
    req = await session.get(ProvisioningRequest, request_id)
    if req is None:
        return Decision(DecideOutcome.not_found)
    if req.state != ProvState.submitted.value:
        return Decision(DecideOutcome.already, req)
    which = await _as_which(session, req, approver)
    if which is None and ((req.needs_operator and req.operator_approved_by is not None
                           and is_operator(approver)) or
                          (req.needs_unit_admin and req.unit_approved_by is not None
                           and is_unit_admin_of(approver, req.unit_code))):
        return Decision(DecideOutcome.already, req)  # their part was given by someone else
    if which is None:
        await audit(session, actor, "provisioning.approve_refused", "provisioning_request",
                    req.id)
        return Decision(DecideOutcome.forbidden, req)
    assert approver is not None
    T = ProvisioningRequest
    mine, other = ((T.unit_approved_by, T.operator_approved_by) if which == "unit"
                   else (T.operator_approved_by, T.unit_approved_by))
    other_needed = T.needs_operator if which == "unit" else T.needs_unit_admin
    complete = or_(other_needed.is_(False), other.is_not(None))
    values: dict[str, Any] = {
        mine.key: approver.id,
        "state": case((complete, ProvState.approved.value), else_=T.state),
        "decided_at": case((complete, literal(utcnow(), UTCDateTime())), else_=T.decided_at),
        "updated_at": utcnow(),
    }
    res = await session.execute(
        update(T).where(T.id == req.id, T.state == ProvState.submitted.value, mine.is_(None))
        .values(**values).execution_options(synchronize_session=False))
    await session.refresh(req)
    if res.rowcount != 1:
        return Decision(DecideOutcome.already, req)
    await audit(session, actor, f"provisioning.approved_{which}", "provisioning_request",
                req.id, after={"state": req.state})
    if req.state == ProvState.approved.value:
        await after_approval(session, req)
        return Decision(DecideOutcome.approved, req)
    return Decision(DecideOutcome.partly, req)


async def after_approval(session: AsyncSession, req: ProvisioningRequest) -> None:
    """Tell the requester; catalog items go to operators' hands (no directory job)."""
    if req.kind in CATALOG_KINDS:
        req.state = ProvState.in_progress.value
        for op in await operators(session):
            await notice(session, op.id, "prov.catalog_card", req.id, id=req.id)
    if req.batch is None:
        await notice(session, req.requester_id, "prov.n_approved", req.id, id=req.id,
                     kind=req.kind)


async def reject(session: AsyncSession, request_id: int, approver: Person | None, reason: str,
                 actor: Actor) -> Decision:
    req = await session.get(ProvisioningRequest, request_id)
    if req is None:
        return Decision(DecideOutcome.not_found)
    if req.state != ProvState.submitted.value:
        return Decision(DecideOutcome.already, req)
    if await _as_which(session, req, approver) is None:
        await audit(session, actor, "provisioning.reject_refused", "provisioning_request", req.id)
        return Decision(DecideOutcome.forbidden, req)
    T = ProvisioningRequest
    res = await session.execute(
        update(T).where(T.id == req.id, T.state == ProvState.submitted.value)
        .values(state=ProvState.rejected.value, reason=reason[:1000], decided_at=utcnow(),
                finished_at=utcnow()).execution_options(synchronize_session=False))
    await session.refresh(req)
    if res.rowcount != 1:
        return Decision(DecideOutcome.already, req)
    await audit(session, actor, "provisioning.rejected", "provisioning_request", req.id,
                after={"state": req.state, "reason": reason})
    await notice(session, req.requester_id, "prov.n_rejected", req.id, id=req.id,
                 kind=req.kind, reason=reason)
    return Decision(DecideOutcome.rejected, req)


async def approvers_for(session: AsyncSession, req: ProvisioningRequest) -> list[Person]:
    """Who should get the Approve/Reject card for this request now."""
    out: list[Person] = []
    if req.needs_unit_admin and req.unit_approved_by is None:
        out += list(await session.scalars(select(Person).where(
            Person.unit_code == req.unit_code, Person.role == Role.unit_admin.value,
            Person.active.is_(True), Person.verified_at.is_not(None))))
    if req.needs_operator and req.operator_approved_by is None:
        out += await operators(session)
    return [p for p in out if p.id != req.requester_id]


async def pending_for(session: AsyncSession, approver: Person) -> list[ProvisioningRequest]:
    rows = await session.scalars(select(ProvisioningRequest).where(
        ProvisioningRequest.state == ProvState.submitted.value).order_by(ProvisioningRequest.id))
    out = []
    for r in rows:
        if await _as_which(session, r, approver) is not None:
            out.append(r)
    return out


async def requests_of(session: AsyncSession, person_id: int,
                      limit: int = 20) -> list[ProvisioningRequest]:
    """A person's requests (made by or for them), newest first."""
    return list(await session.scalars(select(ProvisioningRequest).where(or_(
        ProvisioningRequest.requester_id == person_id,
        ProvisioningRequest.subject_id == person_id)).order_by(
        ProvisioningRequest.id.desc()).limit(limit)))


async def identity_of(session: AsyncSession, person_id: int,
                      channel: str = "telegram") -> ChatIdentity | None:
    return await session.scalar(select(ChatIdentity).where(
        ChatIdentity.person_id == person_id, ChatIdentity.channel == channel).order_by(
        ChatIdentity.id.desc()).limit(1))


# --- catalog items (e-ID code, domain): operators tick a checklist, then record the outcome --


async def toggle_check(session: AsyncSession, request_id: int, item: str, operator: Person | None,
                       actor: Actor) -> ProvisioningRequest | None:
    req = await session.get(ProvisioningRequest, request_id)
    if (req is None or not is_operator(operator) or req.state != ProvState.in_progress.value
            or req.kind not in CATALOG_KINDS or item not in (req.checklist or {})):
        return None
    checklist = dict(req.checklist or {})
    checklist[item] = not checklist[item]
    req.checklist = checklist
    await audit(session, actor, "provisioning.checklist", "provisioning_request", req.id,
                after={item: checklist[item]})
    return req


async def record_outcome(session: AsyncSession, request_id: int, operator: Person | None,
                         value: str, actor: Actor) -> ProvisioningRequest:
    """The operator's result of a catalog item: the e-ID code issued, or the domain
    registered (the unit's previous domain kept in ``old_domains`` when the checklist says so).
    Updates the unit's record and tells the requester."""
    T = ProvisioningRequest
    req = await session.get(T, request_id)
    if req is None or req.kind not in CATALOG_KINDS:
        raise ProvError("prov.err_not_found")
    if not is_operator(operator):
        raise ProvError("prov.err_forbidden")
    value = value.strip().lower() if req.kind == ProvKind.domain.value else value.strip()
    if req.kind == ProvKind.domain.value and not DOMAIN_RE.match(value):
        raise ProvError("prov.err_domain")
    if req.kind == ProvKind.e_id_code.value and not EID_RE.match(value):
        raise ProvError("prov.err_eid")
    res = await session.execute(update(T).where(T.id == req.id,
                                                T.state == ProvState.in_progress.value)
                                .values(state=ProvState.done.value, finished_at=utcnow())
                                .execution_options(synchronize_session=False))
    if res.rowcount != 1:
        raise ProvError("prov.err_already")
    await session.refresh(req)
    unit = await session.get(Unit, req.unit_code)
    assert unit is not None
    before = {"e_id_code": unit.e_id_code, "domain": unit.domain, "old_domains": unit.old_domains}
    if req.kind == ProvKind.e_id_code.value:
        unit.e_id_code = value
    else:
        keep = bool((req.checklist or {}).get("keep_old", False)) or bool(
            (req.payload or {}).get("keep_old", False))
        if unit.domain and unit.domain != value and keep:
            olds = [d for d in (unit.old_domains or "").split(",") if d]
            unit.old_domains = ",".join([*olds, unit.domain])
        unit.domain = value
    req.result = {"value": value}
    await audit(session, actor, f"unit.{req.kind}", "unit", unit.code, before=before,
                after={"e_id_code": unit.e_id_code, "domain": unit.domain,
                       "old_domains": unit.old_domains, "request": req.id})
    await notice(session, req.requester_id, "prov.n_catalog_done", req.id, id=req.id,
                 kind=req.kind, value=value, unit=unit.name)
    return req


def due_clause(now: datetime) -> Any:
    """Jobs the task may take now: approved and due, or in progress with an expired lease
    (a crashed or backing-off try)."""
    T = ProvisioningRequest
    return and_(T.kind.in_([k.value for k in DIRECTORY_KINDS]), or_(
        and_(T.state == ProvState.approved.value,
             or_(T.next_attempt_at.is_(None), T.next_attempt_at <= now)),
        and_(T.state == ProvState.in_progress.value, T.next_attempt_at <= now)))


async def create_email_batch(session: AsyncSession, requester: Person | None,
                             people: list[Person], *, actor: Actor, batch: str) -> list[int]:
    """Auto-approved email jobs for many people at once (an operator's staff list): the same
    checks as :func:`create_request` (open request, existing mailbox, unit) in a few set
    queries, rows and their audit entries inserted in bulk. Returns the ids of skipped people."""
    from sqlalchemy import insert

    from db.models import AuditLog

    ids = [p.id for p in people]
    busy: set[int] = set()
    for i in range(0, len(ids), 1000):
        part = ids[i:i + 1000]
        busy |= set(await session.scalars(select(ProvisioningRequest.subject_id).where(
            ProvisioningRequest.kind == ProvKind.email.value,
            ProvisioningRequest.subject_id.in_(part),
            ProvisioningRequest.state.in_(OPEN_STATES))))
        busy |= set(await session.scalars(select(Account.person_id).where(
            Account.person_id.in_(part), Account.system_code == "email",
            Account.status == AccountStatus.active.value, Account.request_id.is_not(None))))
    now = utcnow()
    rows = [{"kind": ProvKind.email.value, "state": ProvState.approved.value,
             "requester_id": requester.id if requester else None, "subject_id": p.id,
             "unit_code": p.unit_code, "payload": {}, "needs_unit_admin": False,
             "needs_operator": False, "batch": batch, "attempts": 0, "decided_at": now,
             "created_at": now, "updated_at": now}
            for p in people if p.id not in busy and p.unit_code is not None]
    if not rows:
        return sorted(busy)
    new_ids = list(await session.scalars(
        insert(ProvisioningRequest).returning(ProvisioningRequest.id, sort_by_parameter_order=True),
        rows))
    await session.execute(insert(AuditLog), [
        {"at": now, "actor": actor.label[:100], "actor_person_id": actor.person_id,
         "action": "provisioning.requested", "object_type": "provisioning_request",
         "object_id": str(rid), "after": {"kind": "email", "state": "approved",
                                          "subject": r["subject_id"], "unit": r["unit_code"],
                                          "batch": batch}}
        for rid, r in zip(new_ids, rows, strict=True)])
    return sorted(busy | {p.id for p in people if p.unit_code is None})
