"""Batch warm-up of the sender caches (bot/prefetch.py) and the cached sender's attach.

A received batch's uncached senders are read in one query each for identities and FSM
state; their updates then run no SQL. The FSM keys it computes are aiogram's own, and an
identity served from the cache behaves in the session exactly as a loaded one.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from aiogram import Bot, Dispatcher
from aiogram.dispatcher.middlewares.user_context import UserContextMiddleware
from aiogram.fsm.storage.base import StorageKey
from aiogram.types import Update
from sqlalchemy import event, select
from sqlalchemy.exc import InvalidRequestError

from bot.prefetch import fsm_keys
from db.models import ChatIdentity, FsmRecord, Person, utcnow
from services.folding import fold
from services.people import WhoCache, load_who
from tests.test_e2e_status import BEN_THANH

TOKEN = "42:TEST-prefetch-token-abcdefghijklmnopqrstuvwxyz"
_ids = itertools.count(900_000_000)  # far above the emulator's own update ids


def message(user: int, text: str, chat: dict[str, Any] | None = None,
            **extra: Any) -> dict[str, Any]:
    n = next(_ids)
    msg: dict[str, Any] = {
        "message_id": n % 100_000, "date": 1_750_000_000, "text": text,
        "from": {"id": user, "is_bot": False, "first_name": f"U{user}"},
        "chat": chat or {"id": user, "type": "private", "first_name": f"U{user}"}, **extra}
    if text.startswith("/"):
        msg["entities"] = [{"type": "bot_command", "offset": 0,
                            "length": len(text.split()[0])}]
    return {"update_id": n, "message": msg}


SUPERGROUP = {"id": -1001234, "type": "supergroup", "title": "Hỗ trợ", "is_forum": True}
SHAPES = {
    "private message": message(7001, "xin chào"),
    "group topic message": message(7002, "hi", SUPERGROUP, message_thread_id=55,
                                   is_topic_message=True),
    "group reply, not a topic": message(7003, "hi", SUPERGROUP, message_thread_id=56),
    "edited message": {"update_id": 1, "edited_message": {
        **message(7004, "sửa")["message"], "edit_date": 1_750_000_100}},
    "button under a topic message": {"update_id": 2, "callback_query": {
        "id": "q1", "from": {"id": 7005, "is_bot": False, "first_name": "E"},
        "chat_instance": "ci", "data": "x",
        "message": {**message(7005, "menu", SUPERGROUP, message_thread_id=57,
                              is_topic_message=True)["message"],
                    "from": {"id": 42, "is_bot": True, "first_name": "bot"}}}},
    "button under an inaccessible message": {"update_id": 3, "callback_query": {
        "id": "q2", "from": {"id": 7006, "is_bot": False, "first_name": "F"},
        "chat_instance": "ci", "data": "x",
        "message": {"chat": {"id": 7006, "type": "private"}, "message_id": 9, "date": 0}}},
    "inline query": {"update_id": 4, "inline_query": {
        "id": "iq", "from": {"id": 7007, "is_bot": False, "first_name": "G"},
        "query": "bến thành", "offset": ""}},
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_fsm_keys_are_aiogram_s(shape: str) -> None:
    """The key computed from the raw update is the one aiogram's FSM middleware reads."""
    payload = SHAPES[shape]
    bot = Bot(TOKEN)
    dp = Dispatcher()
    upd = Update.model_validate(payload, context={"bot": bot})
    ctx = UserContextMiddleware.resolve_event_context(upd)
    expected = dp.fsm.resolve_context(
        bot=bot, chat_id=ctx.chat_id, user_id=ctx.user_id, thread_id=ctx.thread_id,
        business_connection_id=ctx.business_connection_id)
    assert expected is not None
    assert fsm_keys(dp, bot.id, [payload]) == [expected.key]


async def _known_sender(maker, user: int, name: str) -> int:
    """A verified official whose identity already has the name the emulator shows."""
    async with maker() as s:
        p = Person(full_name=name, name_folded=fold(name), phone=f"+8491{user:07d}",
                   unit_code=BEN_THANH, role="official", verified_at=utcnow())
        s.add(p)
        await s.flush()
        s.add(ChatIdentity(channel="telegram", external_id=str(user), person_id=p.id,
                           display_name=f"U{user}"))
        await s.commit()
        return p.id


async def test_a_batch_of_uncached_senders_runs_no_sql_per_update(live, seeded_maker):
    """Three known senders (one mid-conversation) and their /me in one batch: the batch
    reads identities and FSM state once each, the updates themselves read nothing.
    Without the warm-up, the same batch makes each update read for itself."""
    app, emu = live.app, live.emu
    users = [7101, 7102, 7103]
    for u in users:
        await _known_sender(seeded_maker, u, f"Cán Bộ {u}")
        emu.add_user(u, f"U{u}")
    storage = app.dp.storage
    talking = storage.keys.build(StorageKey(bot_id=app.bot.id, chat_id=7103, user_id=7103))
    async with seeded_maker() as s:
        s.add(FsmRecord(key=talking, state="ticket:describe", data={"system": "qlvb"},
                        updated_at=utcnow()))
        await s.commit()

    statements: list[str] = []

    def seen(_conn, _cursor, sql, *_args) -> None:
        statements.append(" ".join(sql.split()))

    async def batch(text: str) -> tuple[list[str], list[str]]:
        app.who_cache.changed()  # as after a restart: nobody cached
        storage.forget()
        since = {u: emu.sent_count(u) for u in users}
        statements.clear()
        await app.inbox.feed([message(u, text) for u in users])
        during_feed = list(statements)
        for u in users:
            [reply] = await emu.wait_for_messages(u, since=since[u])
            assert f"Cán Bộ {u}" in reply["text"]
        handling = [q for q in statements[len(during_feed):] if "inbox_updates" not in q]
        return during_feed, handling

    emu.add_user(7100, "Khách")  # one round trip: start-up (and its resume) is over
    await emu.send_text(7100, "/start")
    await emu.wait_for_messages(7100)
    event.listen(app.engine.sync_engine, "before_cursor_execute", seen)
    try:
        assert app.who_cache.enabled
        fed, handling = await batch("/me")
        assert handling == []  # every update was served from the warmed caches
        assert sum("FROM chat_identities" in q for q in fed) == 1
        assert sum("FROM fsm_records" in q for q in fed) == 1
        assert storage._cache[talking] == ("ticket:describe", {"system": "qlvb"}, True)

        warm_up, app.inbox.prefetch = app.inbox.prefetch, None  # the control
        try:
            _, handling = await batch("/me")
        finally:
            app.inbox.prefetch = warm_up
        assert sum("FROM chat_identities" in q for q in handling) == len(users)
    finally:
        event.remove(app.engine.sync_engine, "before_cursor_execute", seen)


async def test_a_cached_sender_is_attached_as_if_loaded(seeded_maker):
    """From the cache, identity, person and unit are persistent in the update's session:
    changes to them are written, and relationships raise as when loaded."""
    pid = await _known_sender(seeded_maker, 7201, "Cán Bộ Gắn")
    cache = WhoCache()
    cache.enabled = True
    async with seeded_maker() as s:
        loaded = await load_who(s, "telegram", "7201", "U7201", None, cache)
    assert loaded.person is not None and loaded.unit is not None
    async with seeded_maker() as s:
        statements: list[str] = []

        def seen(_conn, _cursor, sql, *_args) -> None:
            statements.append(sql)

        engine = s.bind.sync_engine
        event.listen(engine, "before_cursor_execute", seen)
        try:
            who = await load_who(s, "telegram", "7201", "U7201", None, cache)
        finally:
            event.remove(engine, "before_cursor_execute", seen)
        assert statements == []  # from the cache
        for obj in (who.identity, who.person, who.unit):
            assert obj in s and not s.is_modified(obj)
        assert await s.get(Person, pid) is who.person  # the identity map holds it
        with pytest.raises(InvalidRequestError):
            _ = who.identity.person  # lazy="raise", as for a loaded identity
        who.person.position = "Chuyên viên <CNTT>"
        who.identity.lang = "en"
        await s.commit()
    async with seeded_maker() as s:
        person = await s.get(Person, pid)
        identity = await s.scalar(select(ChatIdentity).where(
            ChatIdentity.external_id == "7201"))
        assert person.position == "Chuyên viên <CNTT>" and identity.lang == "en"
