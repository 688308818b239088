"""Broadcast domain: sandboxed templates, audience filters, idempotent start, pause/cancel
keep rows out of the sender's claims. SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from db.models import Delivery, UnitSystemStatus
from services import broadcasts, deliveries
from services.audit import Actor
from services.broadcasts import Audience, BroadcastError
from tests.test_e2e_registration import BEN_THANH, SAI_GON, add_person

ACTOR = Actor.system("test")


def test_template_is_sandboxed_escaped_and_strict() -> None:
    assert broadcasts.render("a < b & {{ name }}", {"name": "<Lê>"}) == "a &lt; b &amp; &lt;Lê&gt;"
    assert broadcasts.render("{% if unit %}Đơn vị {{ unit }}{% endif %}",
                             {"unit": "X"}) == "Đơn vị X"
    for bad in ("{{ ten }}", "{{ name.__class__.__mro__ }}", "{% for %}", "   "):
        with pytest.raises(BroadcastError):
            broadcasts.check_template(bad)
    with pytest.raises(BroadcastError) as exc:
        broadcasts.check_template("x" * 3501)
    assert exc.value.code == "too_long"


async def _people(maker) -> dict[str, int]:
    async with maker() as s:
        s.add(UnitSystemStatus(unit_code=SAI_GON, system_code="qlvb", stage="live"))
        await s.commit()
    return {
        "bt": await add_person(maker, "A", "+84900009001", BEN_THANH, telegram_id=9001,
                               verified=True),
        "bt_admin": await add_person(maker, "B", "+84900009002", BEN_THANH, role="unit_admin",
                                     telegram_id=9002, verified=True),
        "sg": await add_person(maker, "C", "+84900009003", SAI_GON, telegram_id=9003,
                               verified=True),
        "unverified": await add_person(maker, "D", "+84900009004", BEN_THANH,
                                       telegram_id=9004),
        "no_chat": await add_person(maker, "E", "+84900009005", BEN_THANH, verified=True),
    }


async def _chats(maker, audience: Audience) -> set[str]:
    async with maker() as s:
        return {r.chat_id for r in await broadcasts.recipients(s, audience)}


async def test_audience_filters(seeded_maker):
    ids = await _people(seeded_maker)
    assert await _chats(seeded_maker, Audience()) == {"9001", "9002", "9003"}
    assert await _chats(seeded_maker, Audience(province="79")) == {"9001", "9002", "9003"}
    assert await _chats(seeded_maker, Audience(province="01")) == set()
    assert await _chats(seeded_maker, Audience(unit_kinds=("ward",))) == {"9001", "9002",
                                                                          "9003"}
    assert await _chats(seeded_maker, Audience(unit_kinds=("department",))) == set()
    assert await _chats(seeded_maker, Audience(roles=("unit_admin",))) == {"9002"}
    behind = Audience(system="qlvb", stages=broadcasts.STAGE_GROUPS["behind"])
    assert await _chats(seeded_maker, behind) == {"9001", "9002"}
    live = Audience(system="qlvb", stages=broadcasts.STAGE_GROUPS["live"])
    assert await _chats(seeded_maker, live) == {"9003"}
    from services import reminders

    async with seeded_maker() as s:
        await reminders.set_subscription(s, ids["bt"], "qlvb", False, ACTOR)
        await s.commit()
    assert await _chats(seeded_maker, Audience(subscribers="qlvb")) == {"9002", "9003"}
    assert Audience.from_json(behind.to_json()) == behind
    with pytest.raises(BroadcastError):
        Audience(roles=("king",)).validate()


async def test_start_is_idempotent_and_pause_cancel_stop_claims(seeded_maker):
    await _people(seeded_maker)
    async with seeded_maker() as s:
        b = await broadcasts.create(s, ACTOR, "Chào {{ name }}", Audience())
        assert await broadcasts.start(s, b.id, ACTOR) == 3
        assert await broadcasts.start(s, b.id, ACTOR) == 0  # a second run plans nothing
        await broadcasts.act(s, b.id, broadcasts.Action.pause, ACTOR)
        await s.commit()
    async with seeded_maker() as s:
        assert await deliveries.claim(s, "t", 10) == []  # paused: nothing is claimed
    async with seeded_maker() as s:
        await broadcasts.act(s, b.id, broadcasts.Action.resume, ACTOR)
        await s.commit()
    async with seeded_maker() as s:
        claimed = await deliveries.claim(s, "t", 1)
        assert [c.text for c in claimed] == ["Chào A"]
    async with seeded_maker() as s:
        await broadcasts.act(s, b.id, broadcasts.Action.cancel, ACTOR)
        await s.commit()
        with pytest.raises(BroadcastError):
            await broadcasts.act(s, b.id, broadcasts.Action.resume, ACTOR)
    async with seeded_maker() as s:
        assert await deliveries.claim(s, "t", 10) == []
        p = await broadcasts.progress(s, b.id)
        assert (p.state, p.total, p.remaining) == ("cancelled", 3, 3)
        assert await s.scalar(select(func.count()).select_from(Delivery)) == 3


async def test_schedule_and_due(seeded_maker):
    await _people(seeded_maker)
    now = datetime.now(UTC)
    async with seeded_maker() as s:
        b = await broadcasts.create(s, ACTOR, "Hẹn", Audience())
        with pytest.raises(BroadcastError):
            await broadcasts.schedule(s, b.id, now - timedelta(minutes=1), ACTOR)
        await broadcasts.schedule(s, b.id, now + timedelta(hours=1), ACTOR)
        await s.commit()
        assert await broadcasts.due_scheduled(s, now) == []
        assert await broadcasts.due_scheduled(s, now + timedelta(hours=2)) == [b.id]
        assert await broadcasts.start(s, b.id, ACTOR, now + timedelta(hours=2)) == 3
        await s.commit()
        assert await broadcasts.due_scheduled(s, now + timedelta(hours=2)) == []
