"""One error handler: log the traceback under a short reference, apologize with it."""

from __future__ import annotations

import logging
import secrets

from aiogram import Bot, Router
from aiogram.types import ErrorEvent
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.config import Settings
from db.models import InboxUpdate, utcnow
from services.texts import t

router = Router(name=__name__)
log = logging.getLogger("hopnhat.errors")


def _chat_of(event: ErrorEvent) -> int | None:
    upd = event.update
    msg = upd.message or upd.edited_message or (
        upd.callback_query.message if upd.callback_query else None)
    if msg is not None:
        return msg.chat.id
    if upd.callback_query is not None:
        return upd.callback_query.from_user.id
    return None


@router.errors()
async def on_error(
    event: ErrorEvent, bot: Bot, settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession], inbox_key: tuple[int, int] | None = None,
    lang: str | None = None,
) -> bool:
    ref = secrets.token_hex(4).upper()
    log.error("unhandled error ref=%s update=%s", ref, event.update.update_id,
              exc_info=event.exception)
    if inbox_key is not None:
        async with sessionmaker() as s:
            await s.execute(update(InboxUpdate).where(
                InboxUpdate.bot_id == inbox_key[0], InboxUpdate.update_id == inbox_key[1]
            ).values(status="failed", error_ref=ref, handled_at=utcnow()))
            await s.commit()
    chat_id = _chat_of(event)
    if chat_id is not None:
        try:
            await bot.send_message(chat_id, t("common.error", lang or settings.default_lang,
                                              ref=ref))
        except Exception:
            log.warning("could not deliver the apology for ref=%s", ref)
    return True
