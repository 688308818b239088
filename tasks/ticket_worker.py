"""The support desk's background loop: publish new tickets to the support group and scan
SLA deadlines.

Publication happens here, not in the reporter's handler, so a ticket committed just before a
crash (or before any support group existed) is still published later: the ticket row is the
durable record of what is left to do. The Telegram side is injected (``bot/app.py`` passes
the desk's methods), so this module depends on services only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services import tickets

log = logging.getLogger(__name__)
Publish = Callable[[int], Awaitable[bool]]
SlaScan = Callable[[datetime | None], Awaitable[tuple[int, int]]]


class TicketWorker:
    def __init__(self, maker: async_sessionmaker[AsyncSession], publish: Publish,
                 sla_scan: SlaScan, wakeup: asyncio.Event, interval: float) -> None:
        self.maker = maker
        self.publish = publish
        self.sla_scan = sla_scan
        self.wakeup = wakeup
        self.interval = interval

    async def publish_pending(self) -> int:
        """Publish every waiting ticket; stops at the first ``publish`` that finds no support
        group (nowhere to publish yet: they wait, in order, for /supportgroup)."""
        done = 0
        failed: set[int] = set()
        while True:
            async with self.maker() as session:
                ids = [x.id for x in await tickets.unpublished(session, limit=20 + len(failed))
                       if x.id not in failed]
            if not ids:
                return done
            for ticket_id in ids:
                try:
                    if not await self.publish(ticket_id):
                        return done
                    done += 1
                except Exception:  # one ticket Telegram refuses must not hold up the rest
                    log.exception("publishing ticket %s failed; retried next round", ticket_id)
                    failed.add(ticket_id)

    async def tick(self, now: datetime | None = None, *, sla: bool = True) -> None:
        await self.publish_pending()
        if sla:
            await self.sla_scan(now)

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_scan = 0.0
        while not stop.is_set():
            scan = loop.time() >= next_scan
            self.wakeup.clear()  # a kick during the tick below is kept for the next round
            try:
                await self.tick(sla=scan)
            except Exception:  # a Telegram or DB hiccup must not end the loop
                log.exception("ticket worker tick failed")
            if scan:
                next_scan = loop.time() + self.interval
            waits = [asyncio.ensure_future(self.wakeup.wait()),
                     asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waits, timeout=max(0.05, next_scan - loop.time()),
                               return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await w
