"""An update whose only change is its FSM step (a search, a menu page) is stored with the
inbox "done" mark in ONE statement on PostgreSQL (bot/fsm_storage.py ``write_alone``); on
SQLite, and whenever anything else changed, the update's transaction commits as before.
Either way the step survives a restart and the update is marked handled."""

from __future__ import annotations

from aiogram.fsm.storage.base import StorageKey
from sqlalchemy import event, select

from bot.fsm_storage import current_session
from db.models import FsmRecord, InboxUpdate
from services import unit_index
from services.people import WhoCache, load_who
from services.units import warm_up_search
from tests.test_prefetch import _known_sender, message


async def test_a_search_step_is_one_statement_and_survives_a_restart(live, seeded_maker):
    app, emu = live.app, live.emu
    user = 7301
    await _known_sender(seeded_maker, user, "Cán Bộ Tìm")
    emu.add_user(user, f"U{user}")
    await emu.send_text(user, "/me")  # the sender is cached now
    await emu.wait_for_messages(user)
    storage = app.dp.storage
    key = storage.keys.build(StorageKey(bot_id=app.bot.id, chat_id=user, user_id=user))
    unit_index._recheck_until = 0.0  # the seeding wrote units: a search would re-check
    async with seeded_maker() as s:  # the index version first (a statement: no lone write)
        await warm_up_search(s)

    statements: list[str] = []

    def seen(_conn, _cursor, sql, *_args) -> None:
        statements.append(" ".join(sql.split()))

    since = emu.sent_count(user)
    update = message(user, "/unit ben thanh")
    event.listen(app.engine.sync_engine, "before_cursor_execute", seen)
    try:
        await app.inbox.feed([update])
        [answer] = await emu.wait_for_messages(user, since=since)
        await app.inbox.drain()
    finally:
        event.remove(app.engine.sync_engine, "before_cursor_execute", seen)
    assert "ben thanh" in answer["text"] and "Bến Thành" in str(answer["reply_markup"])
    handling = [q for q in statements if not q.startswith("INSERT INTO inbox_updates")]
    fsm = [q for q in handling if "fsm_records" in q]
    if app.engine.dialect.name == "postgresql":
        assert len(fsm) == 1 and fsm[0].startswith("WITH done AS (UPDATE inbox_updates")
        assert handling == fsm  # no separate mark, and no ORM flush
    else:
        assert fsm and any("UPDATE inbox_updates" in q for q in handling)

    async with seeded_maker() as s:
        row = await s.get(FsmRecord, key)
        mark = await s.get(InboxUpdate, (app.bot.id, update["update_id"]))
    assert row is not None and row.state == "StFlow:find"
    assert row.data["find_query"] == "ben thanh" and row.data["_choices"]
    assert mark is not None and mark.status == "done"

    app.who_cache.changed()  # as after a restart: nothing cached, the step read back
    storage.forget()
    since = emu.sent_count(user)
    await emu.send_text(user, "1")
    [unit] = await emu.wait_for_messages(user, since=since)
    assert "Bến Thành" in unit["text"] and "QLVB" in unit["text"]


async def test_an_fsm_step_with_another_change_is_not_a_lone_write(seeded_maker):
    """The sender's own row changed too (a language choice): the update's transaction
    commits both, as before."""
    from aiogram.fsm.context import FSMContext

    from bot.fsm_storage import DbStorage

    await _known_sender(seeded_maker, 7302, "Cán Bộ Đổi")
    storage = DbStorage(seeded_maker)
    key = StorageKey(bot_id=1, chat_id=7302, user_id=7302)
    async with seeded_maker() as s:
        token = current_session.set(s)
        try:
            who = await load_who(s, "telegram", "7302", "U7302", None, WhoCache())
            await s.commit()  # a statement ran: never a lone write
            assert storage.lone_write(s) is None
        finally:
            current_session.reset(token)
    cache = WhoCache()
    cache.enabled = True
    async with seeded_maker() as s:
        await load_who(s, "telegram", "7302", "U7302", None, cache)
    async with seeded_maker() as s:
        token = current_session.set(s)
        try:
            who = await load_who(s, "telegram", "7302", "U7302", None, cache)  # cached
            storage._cache[storage.keys.build(key)] = (None, {}, False)
            await FSMContext(storage, key).update_data(step=1)
            rec = storage.lone_write(s)
            if s.bind.dialect.name == "postgresql":
                assert rec is not None and rec.data == {"step": 1}
            else:
                assert rec is None
            who.identity.lang = "en"
            assert storage.lone_write(s) is None
            await s.commit()
            storage.settle(s, True)
        finally:
            current_session.reset(token)
    async with seeded_maker() as s:
        row = await s.get(FsmRecord, storage.keys.build(key))
        lang = await s.scalar(select(who.identity.__class__.lang).where(
            who.identity.__class__.external_id == "7302"))
    assert row is not None and row.data == {"step": 1} and lang == "en"
