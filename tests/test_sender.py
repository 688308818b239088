"""The delivery ledger and its sender, through the emulator over HTTP: limits, 429, 5xx,
blocked chats, quiet hours, a SIGKILL mid-broadcast, two senders on PostgreSQL."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from bot.app import create_bot
from db.models import Delivery
from db.session import make_engine, make_sessionmaker
from services import broadcasts
from services.audit import Actor
from tasks.sender import Sender
from tests.conftest import ROOT, create_pg_database, drop_pg_database, pg_url
from tests.ledger_helpers import (
    add_recipients,
    enqueue_plain,
    open_rows,
    sent_per_chat,
    until,
)
from tests.live import TOKEN, ChildProcess, settings_for


def sender_settings(emu, db_url: str, **extra):
    extra.setdefault("sender_retry_base", 0.05)
    extra.setdefault("send_rate_global", 1000)
    extra.setdefault("send_rate_private", 1000)
    return settings_for(f"http://127.0.0.1:{emu.port}", db_url, **extra)


async def run_until_drained(maker, sender: Sender, timeout: float = 60.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    try:
        await until(lambda: _drained(maker), timeout, "the ledger to drain")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def _drained(maker) -> bool:
    return await open_rows(maker) == 0


async def ledger(maker) -> dict[str, Delivery]:
    async with maker() as s:
        return {d.chat_id: d for d in await s.scalars(select(Delivery))}


@pytest.fixture
async def maker(db_url):
    from tests.conftest import wipe

    engine = make_engine(db_url, immediate=True)
    m = make_sessionmaker(engine)
    await wipe(m)
    yield m
    await engine.dispose()


async def test_every_row_sent_once_with_message_ids(emu, maker, db_url):
    chats = list(range(6000, 6030))
    for c in chats:
        emu.add_user(c, f"U{c}")
    assert await enqueue_plain(maker, chats) == 30
    assert await enqueue_plain(maker, chats) == 0  # re-planning adds nothing
    settings = sender_settings(emu, db_url)
    bot = create_bot(settings)
    try:
        await run_until_drained(maker, Sender(maker, bot, settings, concurrency=4))
    finally:
        await bot.session.close()
    assert sent_per_chat(emu, chats) == Counter({c: 1 for c in chats})
    rows = await ledger(maker)
    by_chat = {r["chat_id"]: r["message_id"] for r in emu.sent()}
    assert {int(k): v.message_id for k, v in rows.items()} == by_chat
    assert all(r.state == "sent" and r.attempts == 1 and r.uncertain == 0 for r in rows.values())
    assert rows[str(chats[0])].text == f"Xin chào {chats[0]}"


async def test_429_5xx_blocked_and_unknown_chat(emu, maker, db_url):
    chats = list(range(6100, 6110))
    for c in chats:
        emu.add_user(c, f"U{c}")
    emu.block_user(6105)
    unknown = 6199  # never started the bot: "Bad Request: chat not found"
    await enqueue_plain(maker, [*chats, unknown])
    emu.inject_fault("sendMessage", 429, count=1, retry_after=1)
    emu.inject_fault("sendMessage", 502, count=2)
    settings = sender_settings(emu, db_url)
    bot = create_bot(settings)
    sender = Sender(maker, bot, settings, concurrency=1)
    try:
        await run_until_drained(maker, sender)
    finally:
        await bot.session.close()
    delivered = [c for c in chats if c != 6105]
    assert sent_per_chat(emu, chats) == Counter({c: 1 for c in delivered})
    rows = await ledger(maker)
    assert rows["6105"].state == "blocked" and "blocked" in rows["6105"].error
    assert rows[str(unknown)].state == "blocked" and "chat not found" in rows[str(unknown)].error
    assert sum(r.attempts for r in rows.values()) == len(rows) + 2  # the two 5xx retried
    assert all(r.state == "sent" for k, r in rows.items() if int(k) in delivered)
    calls = [c for c in emu.calls if c["method"] == "sendMessage"]
    first = calls[0]
    assert first["error_code"] == 429
    # retry_after honoured: nothing was sent until it had passed
    assert calls[1]["time"] - first["time"] >= 1.0
    assert sender.stats.rate_limited == 1 and sender.stats.retried == 2


async def test_configured_limits_keep_clear_of_429(emu, maker, db_url):
    """With the emulator enforcing Telegram's limits, a sender configured with the same
    limits is never refused: several messages to one chat wait for the per-chat bucket."""
    emu.set_rate_limits(global_per_sec=20, private_per_sec=1, group_per_min=20)
    chats = list(range(6200, 6225))
    for c in chats:
        emu.add_user(c, f"U{c}")
    emu.create_group(-1006200, "Nhóm hỗ trợ")
    await enqueue_plain(maker, [*chats, -1006200])
    await enqueue_plain(maker, [6200, -1006200], key="t:2")
    await enqueue_plain(maker, [6200, -1006200], key="t:3")
    settings = sender_settings(emu, db_url, send_rate_global=20, send_rate_private=1,
                               send_rate_group_per_min=20)
    bot = create_bot(settings)
    try:
        await run_until_drained(maker, Sender(maker, bot, settings, concurrency=8))
    finally:
        await bot.session.close()
    calls = [c for c in emu.calls if c["method"] == "sendMessage"]
    assert [c for c in calls if not c["ok"]] == []
    assert len(calls) == 26 + 4
    to_6200 = sorted(c["time"] for c in calls if c["params"]["chat_id"] == 6200)
    assert len(to_6200) == 3 and all(b - a >= 0.9 for a, b in zip(to_6200, to_6200[1:],
                                                                 strict=False))


async def test_quiet_hours_defer_not_drop(emu, maker, db_url):
    clock = {"now": datetime(2025, 8, 10, 16, 30, tzinfo=UTC)}  # 23:30 in Ho Chi Minh City
    for c in (6301, 6302):
        emu.add_user(c, f"U{c}")
    await enqueue_plain(maker, [6301], key="r:quiet", quiet=True, next_try_at=clock["now"])
    await enqueue_plain(maker, [6302], key="b:loud", next_try_at=clock["now"])
    settings = sender_settings(emu, db_url)
    bot = create_bot(settings)
    try:
        sender = Sender(maker, bot, settings, concurrency=2, clock=lambda: clock["now"])
        stop = asyncio.Event()
        task = asyncio.create_task(sender.run(stop))
        await emu.wait_for_messages(6302)
        async def deferred() -> bool:
            rows = await ledger(maker)
            return rows["6301"].next_try_at == datetime(2025, 8, 11, 0, 0, tzinfo=UTC)
        await until(deferred, what="the quiet-hours row to move to 07:00")
        assert emu.sent(6301) == []
        clock["now"] = datetime(2025, 8, 11, 0, 1, tzinfo=UTC)  # 07:01: quiet hours over
        sender.wake.set()
        await emu.wait_for_messages(6301)
        stop.set()
        await asyncio.wait_for(task, 30)
    finally:
        await bot.session.close()


class SenderProcess(ChildProcess):
    """``python -m bot sender`` as a child process, so it can be SIGKILLed."""

    command = "sender"

    def __init__(self, emu, db_url: str, log: Path, name: str = "sender", **env: str) -> None:
        super().__init__({
            **os.environ, "HOPNHAT_BOT_TOKEN": TOKEN, "PYTHONPATH": str(ROOT),
            "HOPNHAT_TELEGRAM_API_URL": f"http://127.0.0.1:{emu.port}",
            "HOPNHAT_DATABASE_URL": db_url, "HOPNHAT_SENDER_NAME": name,
            "HOPNHAT_SEND_RATE_GLOBAL": "2000", "HOPNHAT_SEND_RATE_PRIVATE": "100",
            "HOPNHAT_LOG_LEVEL": "INFO", **env}, log)

    def start(self) -> SenderProcess:
        super().start()
        return self


async def _broadcast(maker, n: int, first: int, emu) -> tuple[int, list[int]]:
    chats = await add_recipients(maker, n, first=first)
    for c in chats:
        emu.add_user(c, f"U{c}")
    async with maker() as s:
        b = await broadcasts.create(s, Actor.system("test"), "Chào {{ name }}!",
                                    broadcasts.Audience())
        await broadcasts.start(s, b.id, Actor.system("test"))
        await s.commit()
    return b.id, chats


@pytest.mark.slow
async def test_sigkill_mid_broadcast_then_restart(emu, maker, db_url, tmp_path):
    concurrency = 8
    bid, chats = await _broadcast(maker, 160, 6400, emu)
    emu.set_latency(0.25, method="sendMessage")  # sends are in flight when the kill lands
    proc = SenderProcess(emu, db_url, tmp_path / "sender.log",
                         HOPNHAT_SENDER_CONCURRENCY=str(concurrency)).start()
    try:
        await until(lambda: _sent_at_least(emu, 40), 60, "40 messages before the kill")
        # kill while sends are in flight (rows durably "sending"), not in the instant between
        # one batch's outcomes and the next claim
        await until(lambda: _sending(maker), 30, "rows in flight")
        proc.kill()
        async with maker() as s:
            in_flight = set(await s.scalars(select(Delivery.chat_id).where(
                Delivery.state == "sending")))
        assert 0 < len(in_flight) <= concurrency
        emu.set_latency(0, method="sendMessage")
        proc.start()
        await until(lambda: _drained(maker), 60, "the restarted sender to finish")
        async with maker() as s:
            uncertain = set(await s.scalars(select(Delivery.chat_id).where(
                Delivery.uncertain > 0)))
            b = await s.get(broadcasts.Broadcast, bid)
        await until(lambda: _broadcast_done(maker, bid), 30, "the broadcast to be done")
    finally:
        proc.terminate()
    got = sent_per_chat(emu, chats)
    assert set(got) == set(chats), "every recipient got the message"
    repeats = {str(c) for c, n in got.items() if n > 1}
    assert all(n <= 2 for n in got.values())
    assert repeats <= in_flight, "repeats only among the sends in flight at the kill"
    assert uncertain == in_flight, "every possible repeat is counted"
    assert len(repeats) <= concurrency
    assert b is not None
    log = (tmp_path / "sender.log").read_text()
    assert f"{len(in_flight)} deliveries were in flight" in log
    assert "Traceback" not in log, log[-3000:]


async def _sending(maker) -> bool:
    async with maker() as s:
        return bool(await s.scalar(select(func.count()).select_from(Delivery).where(
            Delivery.state == "sending")))


async def _sent_at_least(emu, n: int) -> bool:
    return len(emu.sent()) >= n


async def _broadcast_done(maker, bid: int) -> bool:
    async with maker() as s:
        b = await s.get(broadcasts.Broadcast, bid, populate_existing=True)
        return b is not None and b.state == "done" and b.sent == b.total


@pytest.mark.slow
async def test_two_sender_processes_on_postgresql(emu, tmp_path):
    name = await create_pg_database()
    url = pg_url(name)
    try:
        from db.migrate import upgrade_async

        await upgrade_async(url)
        engine = make_engine(url)
        maker = make_sessionmaker(engine)
        emu.set_latency(0.05, method="sendMessage")
        logs = [tmp_path / f"s{i}.log" for i in (1, 2)]
        procs = [SenderProcess(emu, url, log, name=f"s{i}",
                               HOPNHAT_SENDER_CONCURRENCY="8").start()
                 for i, log in zip((1, 2), logs, strict=True)]
        try:
            async def both_up() -> bool:
                return all(log.exists() and "started" in log.read_text() for log in logs)
            await until(both_up, 60, "both senders to start")  # then the work appears
            _bid, chats = await _broadcast(maker, 400, 6600, emu)
            await until(lambda: _drained(maker), 90, "both senders to finish")
        finally:
            for p in procs:
                p.terminate()
        assert sent_per_chat(emu, chats) == Counter({c: 1 for c in chats})
        async with maker() as s:
            by_sender = dict((await s.execute(select(Delivery.claimed_by, func.count())
                                              .group_by(Delivery.claimed_by))).all())
        assert set(by_sender) == {"s1", "s2"} and sum(by_sender.values()) == 400
        await engine.dispose()
    finally:
        await drop_pg_database(name)


async def test_recover_counts_only_own_or_expired_claims(maker):
    await enqueue_plain(maker, [1, 2, 3])
    from services import deliveries

    async with maker() as s:
        mine = await deliveries.claim(s, "a", 2)
    async with maker() as s:
        theirs = await deliveries.claim(s, "b", 5)
    assert len(mine) == 2 and len(theirs) == 1
    async with maker() as s:
        assert sorted(await deliveries.recover(s, "a")) == sorted(r.id for r in mine)
    later = datetime.now(UTC) + deliveries.LEASE + timedelta(seconds=1)
    async with maker() as s:  # b's lease ran out: anyone may take its row back
        assert await deliveries.recover(s, "c", later) == [theirs[0].id]
    async with maker() as s:
        summary = await deliveries.ledger_summary(s)
    assert summary["pending"] == 3 and summary["uncertain"] == 3


async def test_two_senders_with_one_name_refused_on_postgresql(emu):
    from tasks.sender import SenderNameInUse

    name = await create_pg_database()
    url = pg_url(name)
    try:
        from db.migrate import upgrade_async

        await upgrade_async(url)
        engine = make_engine(url)
        maker = make_sessionmaker(engine)
        settings = sender_settings(emu, url)
        bot = create_bot(settings)
        stop = asyncio.Event()
        first = asyncio.create_task(Sender(maker, bot, settings, name="same").run(stop))
        await asyncio.sleep(0.5)
        with pytest.raises(SenderNameInUse):
            await Sender(maker, bot, settings, name="same").run(asyncio.Event())
        other = asyncio.create_task(Sender(maker, bot, settings, name="other").run(stop))
        await asyncio.sleep(0.3)
        assert not other.done()
        stop.set()
        await asyncio.gather(first, other)
        await bot.session.close()
        await engine.dispose()
    finally:
        await drop_pg_database(name)


async def test_too_many_server_errors_end_failed(emu, maker, db_url):
    emu.add_user(6700, "U")
    emu.add_user(6701, "V")
    await enqueue_plain(maker, [6700])
    emu.inject_fault("sendMessage", 500, count=3)
    settings = sender_settings(emu, db_url, sender_max_attempts=3)
    bot = create_bot(settings)
    try:
        await run_until_drained(maker, Sender(maker, bot, settings, concurrency=1))
        rows = await ledger(maker)
        assert rows["6700"].state == "failed" and rows["6700"].attempts == 3
        assert emu.sent(6700) == []
        await enqueue_plain(maker, [6701], key="t:after")  # the sender moved on
        await run_until_drained(maker, Sender(maker, bot, settings, concurrency=1))
        assert len(emu.sent(6701)) == 1
    finally:
        await bot.session.close()


async def test_timeout_is_retried_and_counted_as_a_possible_repeat(emu, maker, db_url):
    emu.add_user(6800, "U")
    await enqueue_plain(maker, [6800])
    emu.inject_fault("sendMessage", 500, count=1, delay=2.5)  # answers after the timeout
    settings = sender_settings(emu, db_url, sender_request_timeout=1)
    bot = create_bot(settings)
    try:
        await run_until_drained(maker, Sender(maker, bot, settings, concurrency=1))
    finally:
        await bot.session.close()
    row = (await ledger(maker))["6800"]
    assert row.state == "sent" and row.attempts == 2
    assert row.uncertain == 1  # the first request might have been delivered: counted
    assert len(emu.sent(6800)) == 1
