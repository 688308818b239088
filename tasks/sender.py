"""The outbox sender: delivers the ledger's pending rows within Telegram's limits.

Runs as its own process (``hopnhat sender``) or inside ``hopnhat run``. One loop claims due
rows in small batches (durably marked ``sending`` before any HTTP call), one task per claimed
row sends it, and a writer records outcomes in batches. A claimed row keeps its slot until its
outcome is committed, so the number of rows in ``sending`` — the only sends a crash can
repeat — never exceeds ``concurrency``.

Limits: token buckets for the whole bot (``send_rate_global`` per second), per private chat
(``send_rate_private`` per second) and per group (``send_rate_group_per_min``). A 429 pauses
every send for ``retry_after`` and retries the same row (it was not sent). 403 and "chat not
found" mark the row ``blocked``; other 4xx ``failed``; 5xx and network errors go back to
``pending`` with exponential backoff, ``failed`` after ``sender_max_attempts``.
Note: the buckets are per process; with N sender processes configure rates divided by N.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from aiogram import Bot
from aiogram.exceptions import (
    TelegramAPIError,
    TelegramBadRequest,
    TelegramForbiddenError,
    TelegramMigrateToChat,
    TelegramNetworkError,
    TelegramRetryAfter,
    TelegramServerError,
    TelegramUnauthorizedError,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.config import Settings
from db.models import DeliveryState, utcnow
from services import deliveries
from services.deliveries import Claimed, Outcome

log = logging.getLogger("hopnhat.sender")
MAX_BACKOFF = 300.0
MAX_RETRY_AFTER_LOOPS = 10
FLUSH_EVERY = 0.02  # seconds between outcome commits under load
IDLE_POLL = 0.5  # seconds between claims when nothing is due
HOUSEKEEPING_EVERY = 1.0
Clock = Callable[[], datetime]
Housekeeper = Callable[["Sender"], Awaitable[None]]


@dataclass
class Bucket:
    """``rate`` tokens per second, at most ``capacity`` banked (burst)."""

    rate: float
    capacity: float
    tokens: float = -1.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.capacity

    def wait(self, now: float) -> float:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return 0.0 if self.tokens >= 1 - 1e-9 else (1 - self.tokens) / self.rate


class Limiter:
    """Global + per-chat token buckets and a global pause after a 429.

    The effective rates keep a margin under the configured limits so network jitter cannot
    make two sends look closer together to Telegram than they were here: small for the global
    bucket (Telegram's allows a second's burst), larger for a chat's (a burst of one).
    """

    MARGIN = 0.995
    CHAT_MARGIN = 0.95

    def __init__(self, global_per_sec: float, private_per_sec: float,
                 group_per_min: float) -> None:
        rate = global_per_sec * self.MARGIN
        # a quarter second of burst: catches up after a CPU stall, stays under Telegram's
        # (and the emulator's) one-second bucket
        self.global_ = Bucket(rate, capacity=max(1.0, rate / 4))
        self.private_rate = private_per_sec * self.CHAT_MARGIN
        self.group_rate = group_per_min / 60.0 * self.CHAT_MARGIN
        self.chats: dict[str, Bucket] = {}
        self.paused_until = 0.0
        self._lock = asyncio.Lock()

    def _chat(self, chat_id: str) -> Bucket:
        b = self.chats.get(chat_id)
        if b is None:
            if len(self.chats) > 50_000:  # forget idle chats (their buckets are full anyway)
                now = time.monotonic()
                self.chats = {k: v for k, v in self.chats.items() if now - v.stamp < 60}
            group = chat_id.startswith("-")
            b = Bucket(self.group_rate if group else self.private_rate, capacity=1.0)
            self.chats[chat_id] = b
        return b

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    async def acquire(self, chat_id: str) -> None:
        """Wait for a per-chat token and a global one. Global tokens are handed out in FIFO
        order under a lock, so one waiter sleeps at a time instead of every sender task
        waking for every token (which cost more CPU than the sends)."""
        chat = self._chat(chat_id)
        await _ready(chat)
        async with self._lock:
            while True:
                now = time.monotonic()
                wait = max(self.paused_until - now, self.global_.wait(now))
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            self.global_.tokens -= 1
        await _ready(chat)  # another task may have taken it meanwhile
        chat.tokens -= 1


async def _ready(bucket: Bucket) -> None:
    while True:
        wait = bucket.wait(time.monotonic())
        if wait <= 0:
            return
        await asyncio.sleep(wait)


def _backoff(settings: Settings, attempts: int) -> float:
    return min(MAX_BACKOFF, settings.sender_retry_base * (2 ** max(0, attempts - 1)))


@dataclass
class Stats:
    sent: int = 0
    blocked: int = 0
    failed: int = 0
    retried: int = 0
    rate_limited: int = 0
    recovered: int = 0  # rows found in "sending" at start-up: possible repeats


_LOCAL: weakref.WeakSet[Sender] = weakref.WeakSet()


class SenderNameInUse(RuntimeError):
    """Another live sender has this name."""


def wake_local_senders() -> None:
    """Tell the senders of this process that new work is due (they also poll)."""
    for s in list(_LOCAL):
        s.wake.set()


class Sender:
    """See the module docstring. ``clock`` is injectable so tests can move time."""

    def __init__(self, maker: async_sessionmaker[AsyncSession], bot: Bot, settings: Settings,
                 *, name: str | None = None, concurrency: int | None = None,
                 clock: Clock = utcnow, housekeepers: list[Housekeeper] | None = None) -> None:
        self.maker = maker
        self.bot = bot
        self.settings = settings
        self.name = name or settings.sender_name
        self.concurrency = concurrency or settings.sender_concurrency
        self.clock = clock
        self.limiter = Limiter(settings.send_rate_global, settings.send_rate_private,
                               settings.send_rate_group_per_min)
        self.housekeepers = list(housekeepers or [])
        self.stats = Stats()
        self.in_flight = 0
        self._outcomes: list[Outcome] = []
        self._outcome_ready = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()  # set by producers (e.g. a broadcast just started)
        _LOCAL.add(self)

    async def recover(self) -> int:
        async with self.maker() as s:
            ids = await deliveries.recover(s, self.name, self.clock())
        self.stats.recovered += len(ids)
        if ids:
            log.warning("sender %s: %d deliveries were in flight at the last stop; resending "
                        "them (each may reach its recipient twice)", self.name, len(ids))
        return len(ids)

    async def _lock_name(self) -> Any:
        """PostgreSQL: hold an advisory lock on the sender's name for the process's life, so
        two senders with one name (which would take back each other's in-flight rows as
        crashed) cannot run at once. SQLite runs one sender per database file."""
        engine = self.maker.kw.get("bind")
        if engine is None or engine.dialect.name != "postgresql":
            return None
        conn = await engine.connect()
        got = await conn.scalar(text("SELECT pg_try_advisory_lock(hashtext(:k))"),
                                {"k": f"hopnhat-sender:{self.name}"})
        await conn.commit()
        if not got:
            await conn.close()
            raise SenderNameInUse(f"another sender named {self.name!r} is running on this "
                                  "database (HOPNHAT_SENDER_NAME)")
        return conn

    async def run(self, stop: asyncio.Event) -> None:
        lock = await self._lock_name()
        try:
            await self._run(stop)
        finally:
            if lock is not None:  # pooled connections keep session locks: unlock first
                await lock.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"),
                                   {"k": f"hopnhat-sender:{self.name}"})
                await lock.commit()
                await lock.close()

    async def _run(self, stop: asyncio.Event) -> None:
        await self.recover()
        writer = asyncio.create_task(self._writer(stop))
        housekeeping = asyncio.create_task(self._housekeeping(stop))
        log.info("sender %s started (concurrency %d, %.0f msg/s)", self.name, self.concurrency,
                 self.settings.send_rate_global)
        try:
            await self._claim_loop(stop)
        finally:
            for t in list(self._tasks):  # in-flight sends finish and are recorded
                with contextlib.suppress(Exception):
                    await t
            stop.set()
            await writer
            housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeping

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        quiet, tz = self.settings.quiet, self.settings.tz
        low_water = max(1, self.concurrency // 4)
        while not stop.is_set():
            free = self.concurrency - self.in_flight
            if free < low_water and self.in_flight > 0:
                await self._wait(self._slot_freed, stop, IDLE_POLL)
                continue
            try:
                async with self.maker() as s:
                    batch = await deliveries.claim(s, self.name, free, now=self.clock(),
                                                   quiet=quiet, tz=tz)
            except Exception:
                log.exception("sender %s: claiming failed; retrying", self.name)
                await self._wait(self.wake, stop, 1.0)
                continue
            for row in batch:
                self.in_flight += 1
                task = asyncio.create_task(self._deliver(row))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if not batch:
                await self._wait(self.wake, stop, IDLE_POLL)

    @staticmethod
    async def _wait(event: asyncio.Event, stop: asyncio.Event, seconds: float) -> None:
        waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(stop.wait())]
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        event.clear()

    async def _deliver(self, row: Claimed) -> None:
        try:
            outcome = await self._attempt(row)
        except Exception as exc:  # a bug must not lose the row: retry it later
            log.exception("sender %s: delivery %d crashed", self.name, row.id)
            outcome = Outcome(row.id, DeliveryState.pending, error=repr(exc)[:200],
                              next_try_at=self.clock() + timedelta(seconds=MAX_BACKOFF))
        self._outcomes.append(outcome)
        self._outcome_ready.set()

    def _target(self, chat_id: str) -> int | str:
        return int(chat_id) if chat_id.lstrip("-").isdigit() else chat_id

    async def _attempt(self, row: Claimed) -> Outcome:
        chat_id = row.chat_id
        migrated: str | None = None
        for _ in range(MAX_RETRY_AFTER_LOOPS):
            await self.limiter.acquire(chat_id)
            try:
                msg = await self.bot.send_message(
                    self._target(chat_id), row.text,
                    request_timeout=int(max(1, self.settings.sender_request_timeout)))
            except TelegramRetryAfter as exc:  # not sent: wait and send the same row again
                self.stats.rate_limited += 1
                self.limiter.pause(float(exc.retry_after))
                continue
            except TelegramMigrateToChat as exc:
                chat_id = migrated = str(exc.migrate_to_chat_id)
                continue
            except TelegramForbiddenError as exc:
                self.stats.blocked += 1
                return Outcome(row.id, DeliveryState.blocked, error=exc.message, chat_id=migrated)
            except TelegramBadRequest as exc:
                text = exc.message.lower()
                blocked = "chat not found" in text or "user not found" in text
                if blocked:
                    self.stats.blocked += 1
                else:
                    self.stats.failed += 1
                return Outcome(row.id, DeliveryState.blocked if blocked else DeliveryState.failed,
                               error=exc.message, chat_id=migrated)
            except (TelegramServerError, TelegramNetworkError, TelegramUnauthorizedError,
                    TimeoutError) as exc:
                # A timeout or a dropped connection may have delivered the message.
                uncertain = isinstance(exc, TelegramNetworkError | TimeoutError)
                return self._retry(row, str(exc), uncertain, migrated)
            except TelegramAPIError as exc:
                self.stats.failed += 1
                return Outcome(row.id, DeliveryState.failed, error=exc.message, chat_id=migrated)
            self.stats.sent += 1
            return Outcome(row.id, DeliveryState.sent, message_id=msg.message_id,
                           chat_id=migrated)
        return self._retry(row, "rate limited repeatedly", False, migrated)

    def _retry(self, row: Claimed, error: str, uncertain: bool, migrated: str | None) -> Outcome:
        if row.attempts >= self.settings.sender_max_attempts:
            self.stats.failed += 1
            return Outcome(row.id, DeliveryState.failed, error=error, uncertain=uncertain,
                           chat_id=migrated)
        self.stats.retried += 1
        delay = _backoff(self.settings, row.attempts)
        return Outcome(row.id, DeliveryState.pending, error=error, uncertain=uncertain,
                       next_try_at=self.clock() + timedelta(seconds=delay), chat_id=migrated)

    async def _writer(self, stop: asyncio.Event) -> None:
        """Commit outcomes in batches; a slot is freed only once its outcome is durable."""
        while True:
            if not self._outcomes:
                if stop.is_set():
                    if not self._tasks:
                        return
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._outcome_ready.wait(), 0.1)
                    self._outcome_ready.clear()
                else:
                    await self._wait(self._outcome_ready, stop, IDLE_POLL)
                continue
            batch, self._outcomes = self._outcomes, []
            while True:
                try:
                    async with self.maker() as s:
                        await deliveries.record(s, batch, self.name)
                        await s.commit()
                    break
                except Exception:
                    log.exception("sender %s: recording %d outcomes failed; retrying",
                                  self.name, len(batch))
                    await asyncio.sleep(1.0)
            self.in_flight -= len(batch)
            self._slot_freed.set()
            if not stop.is_set():
                await asyncio.sleep(FLUSH_EVERY)

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for job in self.housekeepers:
                try:
                    await job(self)
                except Exception:
                    log.exception("sender %s: housekeeping failed", self.name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HOUSEKEEPING_EVERY)


async def run_sender(settings: Settings, stop: asyncio.Event, bot: Bot, *,
                     name: str | None = None, concurrency: int | None = None,
                     housekeepers: list[Housekeeper] | None = None) -> Stats:
    """The standalone process: its own engine (SQLite: BEGIN IMMEDIATE); the bot (and the
    housekeepers, which may render chat views) come from the bot layer."""
    from db.session import make_engine, make_sessionmaker

    engine = make_engine(settings.database_url, immediate=True)
    try:
        sender = Sender(make_sessionmaker(engine), bot, settings, name=name,
                        concurrency=concurrency, housekeepers=housekeepers)
        await sender.run(stop)
        return sender.stats
    finally:
        await engine.dispose()
