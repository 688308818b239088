"""Reminders planned from the plan's milestones into the ledger, on a moved clock; then
delivered through the emulator by the real sender (quiet hours, opt-out)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from sqlalchemy import select

from bot.app import create_bot
from db.models import AuditLog, Delivery, UnitSystemStatus
from services import reminders
from services.audit import Actor
from tasks.sender import Sender
from tests.ledger_helpers import open_rows, until
from tests.test_e2e_registration import BEN_THANH, SAI_GON, add_person
from tests.test_sender import sender_settings

TZ = ZoneInfo("Asia/Ho_Chi_Minh")
# 2025-08-08 08:30 in Ho Chi Minh City: 7 days before hcm_qlvb_rollout (15/08, deployed)
MORNING = datetime(2025, 8, 8, 1, 30, tzinfo=UTC)


async def people(maker) -> dict[str, int]:
    async with maker() as s:
        s.add(UnitSystemStatus(unit_code=SAI_GON, system_code="qlvb", stage="deployed"))
        await s.commit()
    return {
        "official": await add_person(maker, "Cán Bộ Bến Thành", "+84900007001", BEN_THANH,
                                     telegram_id=7101, verified=True),
        "admin": await add_person(maker, "Quản Trị Bến Thành", "+84900007002", BEN_THANH,
                                  role="unit_admin", telegram_id=7102, verified=True),
        "ahead": await add_person(maker, "Cán Bộ Sài Gòn", "+84900007003", SAI_GON,
                                  telegram_id=7103, verified=True),
        "optout": await add_person(maker, "Cán Bộ Tắt Nhắc", "+84900007004", BEN_THANH,
                                   telegram_id=7104, verified=True),
        "operator": await add_person(maker, "Vận Hành", "+84900007005", BEN_THANH,
                                     role="dtc_admin", telegram_id=7105, verified=True),
        "unverified": await add_person(maker, "Chưa Xác Minh", "+84900007006", BEN_THANH,
                                       telegram_id=7106),
    }


async def plan_at(maker, now: datetime) -> reminders.PlanResult:
    async with maker() as s:
        result = await reminders.plan(s, now, tz=TZ, offsets=[7, 3, 1, 0],
                                      actor=Actor.system("test"))
        await s.commit()
    return result


async def keys_by_chat(maker, prefix: str) -> dict[str, list[str]]:
    async with maker() as s:
        return reminders.group_by_chat(await reminders.planned(s, prefix))


async def test_due_reminders_only_to_units_behind_and_opted_in(seeded_maker):
    ids = await people(seeded_maker)
    async with seeded_maker() as s:
        await reminders.set_subscription(s, ids["optout"], "qlvb", False, Actor.system("test"))
        await s.commit()
    first = await plan_at(seeded_maker, MORNING)
    assert first.total > 0
    due = await keys_by_chat(seeded_maker, "r:hcm_qlvb_rollout:7")
    assert set(due) == {"7101", "7102"}  # behind; Sài Gòn is deployed; opt-out; unverified
    async with seeded_maker() as s:
        row = await s.scalar(select(Delivery).where(Delivery.key == "r:hcm_qlvb_rollout:7",
                                                    Delivery.chat_id == "7101"))
        assert row is not None and row.quiet and row.kind == "reminder"
        assert "QLVB" in row.text and "15/08/2025" in row.text and "còn 7 ngày" in row.text
        assert "Phường Bến Thành" in row.text
        assert await s.scalar(select(AuditLog).where(AuditLog.action == "reminders.plan"))
    # nags: unit admins only, for overdue milestones; the digest: operators only
    nags = await keys_by_chat(seeded_maker, "n:")
    assert set(nags) == {"7102"} and all(k.endswith(":2025-W32") for k in nags["7102"])
    assert set(await keys_by_chat(seeded_maker, "d:2025-08-08")) == {"7105"}
    # re-running the planner (restart, second run) adds nothing
    async with seeded_maker() as s:
        before = len(list(await s.scalars(select(Delivery.id))))
    await plan_at(seeded_maker, MORNING.replace(hour=5))
    async with seeded_maker() as s:
        assert len(list(await s.scalars(select(Delivery.id)))) == before
    # the next day: no new nags in the same week, a new digest, no 7-day reminder again
    await plan_at(seeded_maker, datetime(2025, 8, 9, 1, 30, tzinfo=UTC))
    assert await keys_by_chat(seeded_maker, "n:") == nags
    assert set(await keys_by_chat(seeded_maker, "d:2025-08-09")) == {"7105"}
    assert await keys_by_chat(seeded_maker, "r:hcm_qlvb_rollout:6") == {}


async def test_offsets_are_configurable(seeded_maker):
    await people(seeded_maker)
    async with seeded_maker() as s:
        await reminders.plan(s, MORNING, tz=TZ, offsets=[3], actor=None)
        await s.commit()
    assert await keys_by_chat(seeded_maker, "r:hcm_qlvb_rollout:") == {}
    async with seeded_maker() as s:
        await reminders.plan(s, datetime(2025, 8, 12, 1, 0, tzinfo=UTC), tz=TZ, offsets=[3])
        await s.commit()
    assert set(await keys_by_chat(seeded_maker, "r:hcm_qlvb_rollout:3")) == {"7101", "7102", "7104"}


async def test_planned_at_night_is_sent_after_quiet_hours(emu, seeded_maker, db_url):
    await people(seeded_maker)
    night = datetime(2025, 8, 8, 16, 0, tzinfo=UTC)  # 23:00 local, still 8 Aug there
    await plan_at(seeded_maker, night)
    for c in (7101, 7102, 7103, 7104, 7105):
        emu.add_user(c, f"U{c}")
    clock = {"now": night}
    settings = sender_settings(emu, db_url)
    bot = create_bot(settings)
    stop = asyncio.Event()
    sender = Sender(seeded_maker, bot, settings, concurrency=4, clock=lambda: clock["now"])
    task = asyncio.create_task(sender.run(stop))
    try:
        async def all_deferred() -> bool:
            async with seeded_maker() as s:
                rows = list(await s.scalars(select(Delivery)))
            return bool(rows) and all(r.state == "pending" and r.next_try_at ==
                                      datetime(2025, 8, 9, 0, 0, tzinfo=UTC) for r in rows)
        await until(all_deferred, what="every reminder to wait for 07:00")
        assert emu.sent() == []
        clock["now"] = datetime(2025, 8, 9, 0, 0, 5, tzinfo=UTC)
        sender.wake.set()
        await until(lambda: _drained(seeded_maker), what="the reminders to be sent")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await bot.session.close()
    texts = {r["chat_id"]: r["text"] for r in emu.sent() if "15/08/2025" in (r["text"] or "")}
    assert set(texts) == {7101, 7102, 7104}


async def _drained(maker) -> bool:
    return await open_rows(maker) == 0


async def test_upcoming_and_subscriptions(seeded_maker):
    ids = await people(seeded_maker)
    async with seeded_maker() as s:
        from db.models import Person

        person = await s.get(Person, ids["official"])
        items = await reminders.upcoming(s, person, MORNING.astimezone(TZ).date())
        qlvb = next(u for u in items if u.system_code == "qlvb")
        assert qlvb.enabled and qlvb.milestone.key == "hcm_qlvb_rollout" and qlvb.days == 7
        await reminders.set_subscription(s, person.id, "qlvb", False, Actor.system("test"))
        subs = await reminders.subscriptions(s, person.id)
        assert subs["qlvb"] is False and subs["email"] is True
        items = await reminders.upcoming(s, person, MORNING.astimezone(TZ).date())
        assert not next(u for u in items if u.system_code == "qlvb").enabled
        await s.commit()
