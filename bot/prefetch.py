"""Warm the per-sender caches for a batch of received updates, in two queries.

Why: an update whose sender is cached (who they are, their conversation state) runs no SQL
at all, and its inbox mark is batched; an uncached sender's update paid two reads and a
transaction of its own, five to six times the CPU. After a restart, and in bursts (the
replies to a broadcast), most senders are uncached. Reading them for the whole batch before
it is dispatched turns those into cached updates.

Only a warm-up: whatever is not found, or a key computed here that aiogram would build
differently, is read the usual way when the update is handled, so handling never depends
on this. The caches' generation checks keep a read that raced with a write out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from aiogram import Dispatcher
from aiogram.fsm.storage.base import StorageKey
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.fsm_storage import DbStorage
from bot.middlewares import CHANNEL
from services.people import WhoCache, prefetch_who

log = logging.getLogger(__name__)


def _sender(payload: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None,
                                               int | None, str | None]:
    """(user, chat, thread id, business connection) as aiogram's event context takes them
    for the update kinds the bot handles; (None, …) for the rest."""
    for kind in ("message", "edited_message"):
        msg = payload.get(kind)
        if msg:
            thread = msg.get("message_thread_id") if msg.get("is_topic_message") else None
            return msg.get("from"), msg.get("chat"), thread, None
    cq = payload.get("callback_query")
    if cq:
        msg = cq.get("message")
        if not msg:
            return cq.get("from"), None, None, None
        if not msg.get("date"):  # inaccessible (date 0): its chat only
            return cq.get("from"), msg.get("chat"), None, None
        thread = msg.get("message_thread_id") if msg.get("is_topic_message") else None
        return cq.get("from"), msg.get("chat"), thread, msg.get("business_connection_id")
    iq = payload.get("inline_query")
    if iq:
        return iq.get("from"), None, None, None
    return None, None, None, None


def fsm_keys(dp: Dispatcher, bot_id: int, payloads: Iterable[dict[str, Any]]
             ) -> list[StorageKey]:
    """The FSM keys these updates will read, through aiogram's own strategy."""
    keys = []
    for p in payloads:
        user, chat, thread, business = _sender(p)
        if user is None:
            continue
        ctx = dp.fsm.resolve_context(
            bot=_BotId(bot_id), chat_id=chat["id"] if chat else None, user_id=user["id"],
            thread_id=thread, business_connection_id=business)
        if ctx is not None:
            keys.append(ctx.key)
    return keys


class _BotId:
    """What ``resolve_context`` reads of a bot: its id (the key's first part)."""

    def __init__(self, bot_id: int) -> None:
        self.id = bot_id


class Prefetch:
    def __init__(self, dp: Dispatcher, maker: async_sessionmaker[AsyncSession],
                 who_cache: WhoCache, storage: DbStorage) -> None:
        self.dp, self.maker, self.who_cache, self.storage = dp, maker, who_cache, storage

    async def __call__(self, bot_id: int, payloads: list[dict[str, Any]]) -> None:
        if len(payloads) < 2 or not self.who_cache.enabled:
            return  # a lone update reads for itself at the same cost
        senders = [str(u["id"]) for u in (_sender(p)[0] for p in payloads)
                   if u is not None and not u.get("is_bot")]
        keys = fsm_keys(self.dp, bot_id, payloads)
        if not self.who_cache.missing(CHANNEL, senders) and not self.storage.missing(keys):
            return  # all cached: no transaction at all
        try:
            async with self.maker() as s:
                await prefetch_who(s, CHANNEL, senders, self.who_cache)
                await self.storage.prefetch(s, keys)
                await s.commit()
        except Exception:  # a warm-up only: the updates read for themselves
            log.warning("could not prefetch %d sender(s)", len(senders), exc_info=True)
