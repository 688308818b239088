"""Registration domain functions on both backends, without Telegram."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from db.models import AuditLog, ChatIdentity, Person, RegistrationRequest, utcnow
from services import registration
from services.audit import Actor
from services.registration import DecideOutcome


async def _setup(maker):
    async with maker() as s:
        admins = []
        for i, (role, unit) in enumerate([("unit_admin", "26743"), ("dtc_admin", None),
                                          ("unit_admin", "26740")]):
            p = Person(full_name=f"Admin {i}", name_folded=f"admin {i}", role=role,
                       unit_code=unit, verified_at=utcnow())
            s.add(p)
            admins.append(p)
        ident = ChatIdentity(channel="telegram", external_id="42")
        s.add(ident)
        await s.flush()
        req = await registration.create_request(
            s, ident, full_name="Mai Thị Hoa", unit_code="26743", phone="+84911000999",
            phone_verified=True, actor=Actor("telegram:42"))
        again = await registration.create_request(
            s, ident, full_name="Mai Thị Hoa", unit_code="26743", phone="+84911000999",
            phone_verified=True, actor=Actor("telegram:42"))
        assert again.id == req.id  # one pending request per identity
        await s.commit()
        return [a.id for a in admins], req.id


async def test_two_approvers_at_once_approve_once(seeded_maker) -> None:
    admin_ids, req_id = await _setup(seeded_maker)

    async def decide(admin_id: int):
        async with seeded_maker() as s:
            approver = await s.get(Person, admin_id)
            res = await registration.decide(s, req_id, approver, True, Actor(f"a:{admin_id}"))
            await s.commit()
            return res.outcome

    outcomes = await asyncio.gather(decide(admin_ids[0]), decide(admin_ids[1]))
    assert sorted(outcomes) == sorted([DecideOutcome.approved, DecideOutcome.already])
    async with seeded_maker() as s:
        assert await s.scalar(select(func.count()).select_from(Person).where(
            Person.phone == "+84911000999")) == 1
        assert await s.scalar(select(func.count()).select_from(AuditLog).where(
            AuditLog.action == "registration.approved")) == 1


async def test_admin_of_another_unit_is_refused(seeded_maker) -> None:
    admin_ids, req_id = await _setup(seeded_maker)
    async with seeded_maker() as s:
        other = await s.get(Person, admin_ids[2])
        res = await registration.decide(s, req_id, other, True, Actor("x"))
        await s.commit()
        assert res.outcome is DecideOutcome.forbidden
        req = await s.get(RegistrationRequest, req_id)
        assert req.status == "pending"
        res = await registration.decide(s, 999999, other, True, Actor("x"))
        assert res.outcome is DecideOutcome.not_found
