"""Durable update inbox: record every update before Telegram is told it was received.

aiogram's polling confirms an update (the next getUpdates offset) before its handler runs, and
its webhook handler answers 200 first; a crash there loses the update. Here each update is
stored (``inbox_updates``) first and confirmed after; whatever is still pending at start-up is
handled then. The (bot_id, update_id) key makes a re-delivered update a no-op once handled.
Updates of one chat are handled in order; different chats run concurrently.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from aiogram import Bot, Dispatcher
from aiogram.types import Update
from sqlalchemy import bindparam, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import InboxUpdate, utcnow

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3  # an update that kills the process every time must not stop the bot forever


def chat_key(payload: dict[str, Any]) -> str:
    """Serialize per chat (or per user for inline queries); unknown shapes share one lane."""
    for field in ("message", "edited_message", "channel_post", "callback_query",
                  "my_chat_member", "chat_member", "inline_query", "chosen_inline_result"):
        obj = payload.get(field)
        if not obj:
            continue
        chat = obj.get("chat") or (obj.get("message") or {}).get("chat")
        if chat:
            return f"c{chat['id']}"
        if obj.get("from"):
            return f"u{obj['from']['id']}"
    return "other"


# An update's "done" mark, as its handler's transaction (bot/middlewares.py) or a lone FSM
# write (bot/fsm_storage.py) sets it: parameters b (bot id), u (update id), at.
MARK_DONE = (
    update(InboxUpdate)
    .where(InboxUpdate.bot_id == bindparam("b"), InboxUpdate.update_id == bindparam("u"))
    .values(status="done", handled_at=bindparam("at"))
)


class DoneMarks:
    """"Done" marks of updates whose handler read but wrote nothing, written a few at a time.

    Why: for a read-only answer (/start of a known user, a status question) the mark was the
    update's only write, and its own transaction (BEGIN, UPDATE, COMMIT) cost more than the
    rest of the handling. Marks wait at most ``delay`` seconds and go out in one statement.
    A crash in that window leaves those updates pending, so they are answered again after the
    restart: repeats only among the answers in flight at the crash, as for any send, and
    never a repeated write, because an update that wrote anything is marked in its own
    transaction, as before."""

    def __init__(self, maker: async_sessionmaker[AsyncSession], delay: float = 0.05) -> None:
        self.maker = maker
        self.delay = delay
        self._keys: list[tuple[int, int]] = []
        self._timer: asyncio.Task[None] | None = None

    def add(self, key: tuple[int, int]) -> None:
        self._keys.append(key)
        if self._timer is None:
            self._timer = asyncio.create_task(self._later())

    async def _later(self) -> None:
        await asyncio.sleep(self.delay)
        self._timer = None
        await self.flush()

    async def flush(self) -> None:
        keys, self._keys = self._keys, []
        if not keys:
            return
        by_bot: dict[int, list[int]] = defaultdict(list)
        for bot_id, update_id in keys:
            by_bot[bot_id].append(update_id)
        try:
            async with self.maker() as s:
                now = utcnow()
                for bot_id, ids in by_bot.items():
                    await s.execute(update(InboxUpdate).where(
                        InboxUpdate.bot_id == bot_id, InboxUpdate.update_id.in_(ids),
                        InboxUpdate.status == "pending").values(status="done", handled_at=now))
                await s.commit()
        except Exception:  # the database is away: keep them for the next try
            log.exception("could not mark %d handled update(s); will retry", len(keys))
            self._keys[:0] = keys
            if self._timer is None:
                self._timer = asyncio.create_task(self._later())


class Inbox:
    def __init__(
        self,
        dp: Dispatcher,
        bot: Bot,
        maker: async_sessionmaker[AsyncSession],
        concurrency: int = 64,
        on_outside_change: Callable[[], None] | None = None,
    ) -> None:
        self.dp, self.bot, self.maker = dp, bot, maker
        self.on_outside_change = on_outside_change
        # warms the sender caches for a batch before it is dispatched (bot/prefetch.py)
        self.prefetch: Callable[[int, list[dict[str, Any]]], Awaitable[None]] | None = None
        self.bot_id = bot.id
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._sem = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self.marks = DoneMarks(maker)

    async def record(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store a batch in one statement and one transaction (ignoring updates already
        stored); return those newly stored, to handle now. A re-delivered update is never
        handled twice: if it is done it is skipped, and if it is still pending from a
        previous run, ``resume`` has already dispatched it."""
        if not payloads:
            return []
        async with self.maker() as s:
            dialect = s.bind.dialect.name
            insert = pg_insert if dialect == "postgresql" else sqlite_insert
            now = utcnow()
            rows = [{"bot_id": self.bot_id, "update_id": p["update_id"],
                     "payload": json.dumps(p, ensure_ascii=False), "status": "pending",
                     "attempts": 1, "received_at": now} for p in payloads]
            if dialect == "sqlite" and self.on_outside_change is not None:
                await self._check_data_version(s)
            stmt = insert(InboxUpdate).on_conflict_do_nothing().returning(InboxUpdate.update_id)
            conn = await s.connection()
            new = set((await conn.execute(stmt, rows)).scalars())
            await s.commit()
        return [p for p in payloads if p["update_id"] in new]

    async def _check_data_version(self, s: AsyncSession) -> None:
        """SQLite: ``PRAGMA data_version`` changes when ANOTHER connection (another process)
        committed; the bot's engine has one connection, so our own commits do not count.
        Checked once per received batch, before its updates are handled."""
        raw = await (await s.connection()).get_raw_connection()
        version = (await s.execute(text("PRAGMA data_version"))).scalar_one()
        if raw.info.get("data_version") != version:  # also a new connection: unknown past
            raw.info["data_version"] = version
            assert self.on_outside_change is not None
            self.on_outside_change()

    def dispatch(self, payloads: list[dict[str, Any]]) -> None:
        """Handle recorded updates in background tasks (per-chat FIFO via fair locks)."""
        for payload in payloads:
            lock = self._locks[chat_key(payload)]
            task = asyncio.create_task(self._handle(payload, lock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, payload: dict[str, Any], lock: asyncio.Lock) -> None:
        async with lock, self._sem:
            await self.handle_one(payload)

    async def handle_one(self, payload: dict[str, Any]) -> None:
        key = (self.bot_id, payload["update_id"])
        outcome: dict[str, bool] = {}
        try:
            upd = Update.model_validate(payload, context={"bot": self.bot})
            await self.dp.feed_update(self.bot, upd, inbox_key=key, inbox_outcome=outcome,
                                      inbox_marks=self.marks)
        except Exception:  # the errors router already logged and apologized
            log.debug("update %s failed", key, exc_info=True)
        if outcome.get("done"):
            return
        async with self.maker() as s:  # the handler did not commit: do not retry forever
            await s.execute(
                update(InboxUpdate)
                .where(InboxUpdate.bot_id == key[0], InboxUpdate.update_id == key[1],
                       InboxUpdate.status == "pending")
                .values(status="failed", handled_at=utcnow())
            )
            await s.commit()

    async def pending(self) -> list[dict[str, Any]]:
        async with self.maker() as s:
            rows = await s.scalars(select(InboxUpdate.payload).where(
                InboxUpdate.bot_id == self.bot_id, InboxUpdate.status == "pending"
            ).order_by(InboxUpdate.update_id))
            return [json.loads(r) for r in rows]

    async def resume(self) -> int:
        """Handle what a previous process recorded but did not finish (counted as a new
        attempt; an update that already failed MAX_ATTEMPTS times is abandoned)."""
        async with self.maker() as s:
            mine = (InboxUpdate.bot_id == self.bot_id, InboxUpdate.status == "pending")
            abandoned = await s.execute(update(InboxUpdate).where(
                *mine, InboxUpdate.attempts >= MAX_ATTEMPTS).values(
                status="failed", handled_at=utcnow()))
            if abandoned.rowcount:
                log.error("abandoned %d update(s) after %d attempts", abandoned.rowcount,
                          MAX_ATTEMPTS)
            await s.execute(update(InboxUpdate).where(*mine).values(
                attempts=InboxUpdate.attempts + 1))
            await s.commit()
        left = await self.pending()
        if left:
            log.info("resuming %d update(s) left pending by the previous run", len(left))
            await self._warm(left)
            self.dispatch(left)
        return len(left)

    async def feed(self, payloads: list[dict[str, Any]]) -> None:
        new = await self.record(payloads)
        await self._warm(new)
        self.dispatch(new)

    async def _warm(self, payloads: list[dict[str, Any]]) -> None:
        if self.prefetch is not None and payloads:
            await self.prefetch(self.bot_id, payloads)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.marks.flush()
