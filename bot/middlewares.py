"""The update pipeline: DB session → who is this → role check (DESIGN.md §2).

One layer owns the commit: :class:`DbSessionMiddleware` commits the handler's work together
with the inbox row's "done" mark, so a crash either keeps both or neither.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiogram import BaseMiddleware
from aiogram.dispatcher.flags import get_flag
from aiogram.types import CallbackQuery, InlineQuery, Message, TelegramObject, User
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.config import Settings
from bot.fsm_storage import DbStorage, current_session
from bot.inbox import MARK_DONE
from db.models import utcnow
from db.session import used_database
from services import roles
from services.audit import Actor
from services.people import WhoCache, load_who
from services.texts import norm_lang, t

log = logging.getLogger(__name__)
Handler = Callable[[TelegramObject, dict[str, Any]], Awaitable[Any]]
CHANNEL = "telegram"


class PostCommit:
    """Side effects that must only happen once the update's transaction is committed
    (e.g. telling another person their request was approved)."""

    def __init__(self) -> None:
        self._jobs: list[Callable[[], Awaitable[Any]]] = []

    def add(self, job: Callable[[], Awaitable[Any]]) -> None:
        self._jobs.append(job)

    async def run(self) -> None:
        for job in self._jobs:
            try:
                await job()
            except Exception:
                log.exception("post-commit action failed")


class DbSessionMiddleware(BaseMiddleware):
    def __init__(self, maker: async_sessionmaker[AsyncSession],
                 storage: DbStorage | None = None) -> None:
        self.maker = maker
        self.storage = storage

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        committed = False
        session = self.maker()
        try:
            data["session"] = session
            data["post"] = post = PostCommit()
            token = current_session.set(session)
            try:
                try:
                    result = await handler(event, data)
                except Exception:
                    await session.rollback()
                    raise
                finally:
                    current_session.reset(token)
                key = data.get("inbox_key")
                marks = data.get("inbox_marks")
                used = used_database(session)
                lone = (self.storage.lone_write(session)
                        if used and self.storage is not None else None)
                if key is not None and marks is not None and not used:
                    marks.add(key)  # batched (bot/inbox.py DoneMarks): nothing to commit
                elif lone is not None:  # only an FSM step changed: one statement
                    await self.storage.write_alone(session, lone, key)  # type: ignore[union-attr]
                elif key is not None or used:
                    # (a session served from the caches alone is not committed: an empty
                    # commit still builds and ends a transaction object)
                    if key is not None:
                        await self._mark_done(session, key)
                    await session.commit()
                committed = True
            finally:
                if self.storage is not None:
                    self.storage.settle(session, committed)
        finally:
            await _close(session)
        if "inbox_outcome" in data:
            data["inbox_outcome"]["done"] = True
        await post.run()
        return result

    @staticmethod
    async def _mark_done(session: AsyncSession, key: tuple[int, int]) -> None:
        # Core on the session's connection: no ORM execution overhead
        conn = await session.connection()
        await conn.execute(MARK_DONE, {"b": key[0], "u": key[1], "at": utcnow()})


async def _close(session: AsyncSession) -> None:
    """Close the update's session. One that never took a connection (served from the
    caches: attaching them still opens a transaction object) has nothing to give back,
    so it is closed directly rather than in a greenlet."""
    if used_database(session):
        await session.close()
    else:
        session.sync_session.close()



class WhoMiddleware(BaseMiddleware):
    """Loads the sender's identity, person and unit; sets ``who``, ``lang`` and ``actor``."""

    def __init__(self, settings: Settings, cache: WhoCache | None = None) -> None:
        self.settings = settings
        self.cache = cache

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        user: User | None = data.get("event_from_user")
        data["who"] = None
        data["lang"] = self.settings.default_lang
        data["actor"] = Actor.system("telegram:unknown")
        if user is not None and not user.is_bot:
            name = " ".join(p for p in (user.first_name, user.last_name) if p)
            who = await load_who(data["session"], CHANNEL, str(user.id), name, user.username,
                                 self.cache)
            data["who"] = who
            data["lang"] = norm_lang(who.lang or self.settings.default_lang)
            data["actor"] = Actor(
                f"{CHANNEL}:{user.id}", who.person.id if who.person is not None else None
            )
        return await handler(event, data)


class RoleMiddleware(BaseMiddleware):
    """The one place roles are enforced: handlers declare ``flags={"perm": "<name>"}``."""

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        perm = get_flag(data, "perm")
        if perm is None:
            return await handler(event, data)
        who = data.get("who")
        if roles.allowed(who.role if who else None, perm):
            return await handler(event, data)
        lang = data.get("lang")
        key = "common.not_verified" if (who is None or who.role is None) else "common.forbidden"
        text = t(key, lang)
        if isinstance(event, CallbackQuery):
            await event.answer(text, show_alert=True)
        elif isinstance(event, Message):
            await event.answer(text)
        elif isinstance(event, InlineQuery):
            await event.answer([], cache_time=5, is_personal=True)
        return None
