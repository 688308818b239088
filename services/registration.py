"""Registration and verification of officials (DESIGN.md §5 "Verification").

A shared contact proves the phone only if it is the sender's own contact; a matching phone on
the imported staff list verifies at once. Anything else becomes a request that the unit's
admins (or operators) decide. Typed phone numbers (the path for channels without contact
sharing) are never trusted on their own: they always go to an approver.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import (
    ChatIdentity,
    Person,
    RegistrationRequest,
    RequestStatus,
    Role,
    Unit,
    utcnow,
)
from services.audit import Actor, audit
from services.folding import clean_name, fold
from services.people import identities_of, person_by_phone
from services.phones import PhoneError, normalize_phone


class ContactOutcome(enum.StrEnum):
    verified = "verified"
    already = "already"
    forged = "forged"
    bad_phone = "bad_phone"
    unknown = "unknown"  # not on the staff list: needs a request
    taken = "taken"  # the staff entry is linked to another account on this channel


@dataclass
class ContactResult:
    outcome: ContactOutcome
    person: Person | None = None
    phone: str | None = None


def _snapshot(person: Person) -> dict[str, object]:
    return {
        "full_name": person.full_name, "phone": person.phone, "unit_code": person.unit_code,
        "role": person.role, "verified": person.verified_at is not None,
    }


async def bootstrap_admin(
    session: AsyncSession, identity: ChatIdentity, admin_ids: list[int], actor: Actor
) -> Person | None:
    """Operators listed in HOPNHAT_ADMIN_IDS become verified dtc_admins on first contact."""
    if identity.person_id is not None or identity.channel != "telegram":
        return None
    if not identity.external_id.lstrip("-").isdigit() or int(identity.external_id) not in admin_ids:
        return None
    name = clean_name(identity.display_name or f"Operator {identity.external_id}")
    person = Person(full_name=name, name_folded=fold(name), role=Role.dtc_admin.value,
                    verified_at=utcnow())
    session.add(person)
    await session.flush()
    identity.person_id = person.id
    await audit(session, actor, "registration.admin_bootstrap", "person", person.id,
                after=_snapshot(person))
    return person


async def verify_by_contact(
    session: AsyncSession,
    identity: ChatIdentity,
    sender_id: str,
    contact_user_id: str | None,
    phone_raw: str,
    actor: Actor,
) -> ContactResult:
    """Check a shared contact and link the identity to the staff entry with that phone."""
    if contact_user_id is None or contact_user_id != sender_id:
        await audit(session, actor, "registration.forged_contact", "chat_identity", identity.id,
                    after={"contact_user_id": contact_user_id, "sender": sender_id})
        return ContactResult(ContactOutcome.forged)
    try:
        phone = normalize_phone(phone_raw)
    except PhoneError:
        return ContactResult(ContactOutcome.bad_phone)
    person = await person_by_phone(session, phone)
    if person is None or not person.active:
        return ContactResult(ContactOutcome.unknown, phone=phone)
    if identity.person_id == person.id and person.verified_at is not None:
        return ContactResult(ContactOutcome.already, person, phone)
    others = [i for i in await identities_of(session, [person.id])
              if i.channel == identity.channel and i.id != identity.id]
    if others:
        await audit(session, actor, "registration.phone_taken", "person", person.id,
                    after={"identity": identity.id, "linked": [i.id for i in others]})
        return ContactResult(ContactOutcome.taken, person, phone)
    before = _snapshot(person)
    person.verified_at = utcnow()
    if identity.lang and not person.lang:
        person.lang = identity.lang
    identity.person_id = person.id
    await audit(session, actor, "registration.verified", "person", person.id,
                before=before, after=_snapshot(person) | {"identity": identity.id})
    return ContactResult(ContactOutcome.verified, person, phone)


async def pending_request_of(
    session: AsyncSession, identity: ChatIdentity
) -> RegistrationRequest | None:
    return await session.scalar(
        select(RegistrationRequest).where(
            RegistrationRequest.identity_id == identity.id,
            RegistrationRequest.status == RequestStatus.pending.value,
        )
    )


async def create_request(
    session: AsyncSession,
    identity: ChatIdentity,
    *,
    full_name: str,
    unit_code: str,
    phone: str | None,
    phone_verified: bool,
    actor: Actor,
    position: str | None = None,
) -> RegistrationRequest:
    """File (or return the already pending) verification request of this identity."""
    existing = await pending_request_of(session, identity)
    if existing is not None:
        return existing
    req = RegistrationRequest(
        identity_id=identity.id, full_name=clean_name(full_name)[:200], unit_code=unit_code,
        phone=phone, phone_verified=phone_verified, position=position,
    )
    session.add(req)
    await session.flush()
    await audit(session, actor, "registration.requested", "registration_request", req.id,
                after={"full_name": req.full_name, "unit_code": unit_code, "phone": phone,
                       "phone_verified": phone_verified})
    return req


async def approvers_for(
    session: AsyncSession, unit_code: str, admin_ids: list[int]
) -> list[ChatIdentity]:
    """Chat identities to notify: the unit's admins, else the operators (DB and ADMIN_IDS)."""
    base = select(ChatIdentity).join(Person, Person.id == ChatIdentity.person_id).where(
        Person.verified_at.is_not(None), Person.active.is_(True)
    )
    rows = list(await session.scalars(
        base.where(Person.role == Role.unit_admin.value, Person.unit_code == unit_code)
    ))
    if not rows:
        rows = list(await session.scalars(base.where(Person.role == Role.dtc_admin.value)))
    seen = {(i.channel, i.external_id) for i in rows}
    extra = [str(a) for a in admin_ids if ("telegram", str(a)) not in seen]
    if extra:
        rows += list(await session.scalars(select(ChatIdentity).where(
            ChatIdentity.channel == "telegram", ChatIdentity.external_id.in_(extra))))
    return rows


def may_decide(approver: Person | None, request_unit: str) -> bool:
    if approver is None or approver.verified_at is None or not approver.active:
        return False
    if approver.role == Role.dtc_admin.value:
        return True
    return approver.role == Role.unit_admin.value and approver.unit_code == request_unit


class DecideOutcome(enum.StrEnum):
    approved = "approved"
    rejected = "rejected"
    not_found = "not_found"
    forbidden = "forbidden"
    already = "already"


@dataclass
class DecideResult:
    outcome: DecideOutcome
    request: RegistrationRequest | None = None
    person: Person | None = None
    requester: ChatIdentity | None = None


async def decide(
    session: AsyncSession,
    request_id: int,
    approver: Person | None,
    approve: bool,
    actor: Actor,
    reason: str | None = None,
) -> DecideResult:
    """Approve or reject once: the status flip is a conditional UPDATE, so a double press or two
    approvers at the same moment decide exactly once."""
    req = await session.get(RegistrationRequest, request_id)
    if req is None:
        return DecideResult(DecideOutcome.not_found)
    if not may_decide(approver, req.unit_code):
        await audit(session, actor, "registration.decide_refused", "registration_request",
                    request_id)
        return DecideResult(DecideOutcome.forbidden, req)
    assert approver is not None
    new_status = RequestStatus.approved if approve else RequestStatus.rejected
    flipped = await session.execute(
        update(RegistrationRequest)
        .where(RegistrationRequest.id == request_id,
               RegistrationRequest.status == RequestStatus.pending.value)
        .values(status=new_status.value, decided_by=approver.id, decided_at=utcnow(),
                reason=reason)
        .execution_options(synchronize_session=False)
    )
    await session.refresh(req)
    if flipped.rowcount != 1:
        return DecideResult(DecideOutcome.already, req)
    requester = await session.get(ChatIdentity, req.identity_id)
    assert requester is not None
    await audit(session, actor, f"registration.{new_status.value}", "registration_request",
                req.id, before={"status": "pending"},
                after={"status": new_status.value, "reason": reason})
    if not approve:
        return DecideResult(DecideOutcome.rejected, req, None, requester)
    person = await person_by_phone(session, req.phone) if req.phone else None
    if person is None:
        person = Person(full_name=req.full_name, name_folded=fold(req.full_name),
                        phone=req.phone, unit_code=req.unit_code, position=req.position,
                        role=Role.official.value)
        session.add(person)
        await session.flush()
        before: dict[str, object] | None = None
    else:
        before = _snapshot(person)
    person.verified_at = utcnow()
    person.lang = person.lang or requester.lang
    requester.person_id = person.id
    await audit(session, actor, "registration.verified", "person", person.id, before=before,
                after=_snapshot(person) | {"identity": requester.id, "request": req.id})
    return DecideResult(DecideOutcome.approved, req, person, requester)


async def pending_for(session: AsyncSession, approver: Person) -> list[RegistrationRequest]:
    q = select(RegistrationRequest).where(
        RegistrationRequest.status == RequestStatus.pending.value
    ).order_by(RegistrationRequest.id)
    if approver.role != Role.dtc_admin.value:
        q = q.where(RegistrationRequest.unit_code == approver.unit_code)
    return list(await session.scalars(q))


async def unit_name(session: AsyncSession, code: str | None) -> str | None:
    if code is None:
        return None
    unit = await session.get(Unit, code)
    return unit.name if unit else None


async def set_language(
    session: AsyncSession, identity: ChatIdentity, person: Person | None, lang: str, actor: Actor
) -> None:
    before = identity.lang
    identity.lang = lang
    if person is not None:
        person.lang = lang
    await audit(session, actor, "profile.language", "chat_identity", identity.id,
                before={"lang": before}, after={"lang": lang})
