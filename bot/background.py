"""Background work wired to the bot: the ledger sender (with broadcast progress views) and
the scheduler. Used by ``hopnhat sender`` (its own process) and inside ``hopnhat run``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiogram import Bot
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.config import Settings
from tasks.broadcasts import broadcast_housekeeper
from tasks.sender import Housekeeper, Sender, Stats, run_sender

log = logging.getLogger("hopnhat")


def housekeepers() -> list[Housekeeper]:
    from handlers.broadcasts import progress_view

    return [broadcast_housekeeper(progress_view)]


async def sender_process(settings: Settings, stop: asyncio.Event, *, name: str | None = None,
                         concurrency: int | None = None) -> Stats:
    """``hopnhat sender``: a sender with its own engine and bot session until ``stop``."""
    from bot.app import create_bot

    bot = create_bot(settings)
    try:
        stats = await run_sender(settings, stop, bot, name=name, concurrency=concurrency,
                                 housekeepers=housekeepers())
    finally:
        await bot.session.close()
    log.info("sender stopped: %s", stats)
    return stats


class Background:
    """The sender and the scheduler running beside the bot in one process."""

    def __init__(self, settings: Settings, maker: async_sessionmaker[AsyncSession],
                 bot: Bot) -> None:
        self.settings = settings
        self.sender = Sender(maker, bot, settings, housekeepers=housekeepers())
        self.maker = maker
        self.bot = bot
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []
        self.scheduler: Any = None

    async def start(self) -> None:
        from tasks.scheduler import start_scheduler

        self.tasks.append(asyncio.create_task(self.sender.run(self.stop)))
        self.scheduler = await start_scheduler(self.settings, self.maker, self.sender)

    async def close(self) -> None:
        self.stop.set()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        for t in self.tasks:
            with contextlib.suppress(Exception):
                await t
