"""The bot's in-memory caches (sender, plan, FSM state) never outlive the rows they copy:
changes by this process, by another engine in it, and by another process all reach the
next update; FSM state stays durable and a rolled-back write is not served."""

from __future__ import annotations

import asyncio
import sys
import textwrap

from aiogram.fsm.storage.base import StorageKey
from sqlalchemy import select, update

from bot.fsm_storage import DbStorage, current_session
from db.models import FsmRecord, Person, System
from db.session import make_engine, make_sessionmaker
from services.texts import t
from tests.live import ROOT
from tests.test_e2e_registration import add_person, say
from tests.test_e2e_status import BEN_THANH, buttons

NOT_VERIFIED = t("common.not_verified", "vi")


async def test_change_by_another_engine_reaches_the_next_update(live, seeded_maker):
    emu = live.emu
    pid = await add_person(seeded_maker, "Cán Bộ Đệm", "+84900000601", BEN_THANH,
                           telegram_id=8101, verified=True)
    emu.add_user(8101, "Đệm")
    [first] = await say(emu, 8101, "/unit")
    assert "QLVB" in first["text"] and not buttons(first)
    [again] = await say(emu, 8101, "/unit")  # now served from the caches
    assert again["text"] == first["text"]
    async with seeded_maker() as s:  # the test's own engine, as an operator tool would
        await s.execute(update(Person).where(Person.id == pid).values(role="unit_admin"))
        system = await s.scalar(select(System).where(System.abbr == "QLVB"))
        system.abbr = "QLVB-MỚI"
        await s.commit()
    [now] = await say(emu, 8101, "/unit")
    assert "QLVB-MỚI" in now["text"]  # the plan cache was dropped
    assert any("Cập nhật" in b["text"] for b in buttons(now))  # and the sender's role
    async with seeded_maker() as s:
        person = await s.get(Person, pid)
        person.active = False
        await s.commit()
    [refused] = await say(emu, 8101, "/unit")
    assert refused["text"] == NOT_VERIFIED


async def test_change_by_another_process_reaches_the_bot(live, seeded_maker, db_url):
    emu = live.emu
    pid = await add_person(seeded_maker, "Cán Bộ Khác", "+84900000602", BEN_THANH,
                           telegram_id=8102, verified=True)
    emu.add_user(8102, "Khác")
    [first] = await say(emu, 8102, "/me")
    assert "Cán Bộ Khác" in first["text"]
    await say(emu, 8102, "/me")  # cached
    script = textwrap.dedent(f"""
        import asyncio
        from db.models import Person
        from db.session import make_engine, make_sessionmaker

        async def main():
            engine = make_engine({db_url!r}, immediate=True)  # a writer: waits for locks
            async with make_sessionmaker(engine)() as s:
                (await s.get(Person, {pid})).active = False
                await s.commit()
            await engine.dispose()

        asyncio.run(main())
    """)
    # not subprocess.run: the in-process bot must keep running (and commit) meanwhile
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, cwd=ROOT)
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    if db_url.startswith("sqlite"):
        # PRAGMA data_version is checked before the next batch is handled: at once
        [reply] = await say(emu, 8102, "/me")
        assert reply["text"] == NOT_VERIFIED
        return
    for _ in range(100):  # PostgreSQL: NOTIFY arrives asynchronously, within moments
        [reply] = await say(emu, 8102, "/me")
        if reply["text"] == NOT_VERIFIED:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the bot kept serving a person another process deactivated")


async def test_fsm_cache_serves_only_committed_state(db_url, seeded_maker):
    engine = make_engine(db_url, immediate=True)
    maker = make_sessionmaker(engine)
    storage = DbStorage(maker)
    key = StorageKey(bot_id=1, chat_id=42, user_id=42)

    async def in_update(work, commit: bool) -> None:
        async with maker() as s:
            token = current_session.set(s)
            try:
                await work()
            finally:
                current_session.reset(token)
            if commit:
                await s.commit()
            else:
                await s.rollback()
            storage.settle(s, commit)

    try:
        assert await storage.get_state(key) is None

        async def write_a() -> None:
            await storage.set_state(key, "flow:a")
            await storage.set_data(key, {"opts": [1, 2]})
            assert await storage.get_state(key) == "flow:a"  # own write, uncommitted

        await in_update(write_a, commit=True)
        assert await storage.get_state(key) == "flow:a"
        data = await storage.get_data(key)
        data["opts"].append(3)  # a caller mutating what it got does not touch the cache
        assert await storage.get_data(key) == {"opts": [1, 2]}

        async def write_b() -> None:
            await storage.set_state(key, "flow:b")

        await in_update(write_b, commit=False)
        assert await storage.get_state(key) == "flow:a"  # the rollback is not served
        restarted = DbStorage(maker)  # a new process reads the database
        assert await restarted.get_state(key) == "flow:a"
        assert await restarted.get_data(key) == {"opts": [1, 2]}
        async with maker() as s:
            rec = await s.get(FsmRecord, storage.keys.build(key))
            assert rec is not None and rec.state == "flow:a"
    finally:
        await engine.dispose()


async def test_unit_status_change_reaches_the_next_unit_view(live, seeded_maker, db_url):
    """The unit views are cached (the most asked question); a stage set by another engine,
    then by another process, shows in the very next /unit."""
    from db.models import Stage
    from services.audit import Actor
    from services.status import write_changes

    emu = live.emu
    await add_person(seeded_maker, "Cán Bộ Tiến Độ", "+84900000603", BEN_THANH,
                     telegram_id=8103, verified=True)
    emu.add_user(8103, "Tiến")
    [first] = await say(emu, 8103, "/unit")
    [again] = await say(emu, 8103, "/unit")  # from the cache now
    assert again["text"] == first["text"]
    assert ": Thí điểm" not in first["text"]  # no system is at pilot yet
    async with seeded_maker() as s:
        await write_changes(s, [(BEN_THANH, "qlvb", Stage.pilot, None)],
                            actor=Actor.system("test"), person_id=None)
        await s.commit()
    [now] = await say(emu, 8103, "/unit")
    assert ": Thí điểm" in now["text"]
    script = textwrap.dedent(f"""
        import asyncio
        from db.models import Stage
        from db.session import make_engine, make_sessionmaker
        from services.audit import Actor
        from services.status import write_changes

        async def main():
            engine = make_engine({db_url!r}, immediate=True)
            async with make_sessionmaker(engine)() as s:
                await write_changes(s, [({BEN_THANH!r}, "qlvb", Stage.live, None)],
                                    actor=Actor.system("script"), person_id=None)
                await s.commit()
            await engine.dispose()

        asyncio.run(main())
    """)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, cwd=ROOT)
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    for _ in range(100):  # SQLite: at once (data_version); PostgreSQL: NOTIFY, within moments
        [reply] = await say(emu, 8103, "/unit")
        if ": Vận hành chính thức" in reply["text"]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the bot kept serving a unit status another process changed")


def test_who_cache_a_seen_bump_does_not_spoil_other_loads() -> None:
    """A last-seen bump of one identity drops that entry only; a load of someone else that
    raced with it is still kept. A change to people (what the cache serves) spoils it."""
    from db.models import ChatIdentity
    from services.people import WhoCache

    cache = WhoCache()
    cache.enabled = True
    a, b = ChatIdentity(id=1, channel="telegram", external_id="1"), ChatIdentity(
        id=2, channel="telegram", external_id="2")
    cache.put(("telegram", "1"), cache._gen, a, None, None)
    gen = cache._gen  # a load of identity 2 starts
    cache.changed(frozenset(), frozenset({1}))  # identity 1 was seen meanwhile
    cache.put(("telegram", "2"), gen, b, None, None)
    assert cache.get(("telegram", "1")) is None  # dropped: its last_seen changed
    assert cache.get(("telegram", "2")) is not None  # kept
    gen = cache._gen
    cache.changed(frozenset({"people"}), frozenset())
    cache.put(("telegram", "1"), gen, a, None, None)  # raced with a real change: not kept
    assert cache.get(("telegram", "1")) is None and cache.get(("telegram", "2")) is None
