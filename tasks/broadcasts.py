"""Broadcast housekeeping run by the sender: finish completed broadcasts and keep each
operator's progress message up to date (edited at most every few seconds)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from aiogram.exceptions import TelegramAPIError
from sqlalchemy import or_, select

from db.models import Broadcast, BroadcastState
from services import broadcasts

if TYPE_CHECKING:
    from tasks.sender import Housekeeper, Sender

log = logging.getLogger("hopnhat.broadcasts")
EDIT_EVERY = 3.0  # seconds between edits of one progress message
FINISHED_SHOWN = timedelta(minutes=10)
# (progress, rate per second, lang) -> (text, reply_markup or None); supplied by the bot layer
ProgressView = Callable[[broadcasts.Progress, float, str], tuple[str, Any]]


def _live_or_just_finished(now: datetime) -> Any:
    """Broadcasts whose message may still change: running ones, and finished ones for a
    while (their final numbers are shown once), not every broadcast ever made."""
    return or_(
        Broadcast.state.in_([BroadcastState.scheduled.value, BroadcastState.sending.value,
                             BroadcastState.paused.value]),
        Broadcast.finished_at >= now - FINISHED_SHOWN,
    )


def broadcast_housekeeper(view: ProgressView | None = None) -> Housekeeper:
    shown: dict[int, tuple[Any, float, int]] = {}  # id -> (what was shown, when, sent then)

    async def job(sender: Sender) -> None:
        async with sender.maker() as s:
            await broadcasts.finish_completed(s, sender.clock())
            await s.commit()
            if view is None:
                return
            rows = list(await s.execute(select(Broadcast.id, Broadcast.progress_chat_id,
                                               Broadcast.progress_message_id, Broadcast.lang,
                                               Broadcast.state)
                                        .where(Broadcast.progress_message_id.is_not(None),
                                               _live_or_just_finished(sender.clock()))))
            progresses = {r.id: await broadcasts.progress(s, r.id) for r in rows}
        now = time.monotonic()
        for r in rows:
            p = progresses[r.id]
            key = (p.state, p.sent, p.blocked, p.failed, p.remaining)
            last = shown.get(r.id)
            if last is not None and (last[0] == key or now - last[1] < EDIT_EVERY):
                continue
            rate = 0.0 if last is None else max(0.0, (p.sent - last[2]) / (now - last[1]))
            text, markup = view(p, rate, r.lang)
            shown[r.id] = (key, now, p.sent)
            await sender.limiter.acquire(r.progress_chat_id)
            with contextlib.suppress(TelegramAPIError):  # "not modified", message deleted
                await sender.bot.edit_message_text(
                    text=text, chat_id=int(r.progress_chat_id),
                    message_id=r.progress_message_id, reply_markup=markup)

    return job
