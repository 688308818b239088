"""APScheduler 3 with its job store in the project's database, so schedules survive restarts.

Jobs (all idempotent, their effects go through the ledger):

- ``reminders.daily`` (cron, ``HOPNHAT_REMINDER_TIME`` local): plan due reminders, weekly
  nags and the operators' digest (services.reminders).
- ``broadcasts.due`` (every 30 s): start scheduled broadcasts whose time has come — the
  safety net for broadcasts scheduled from the CLI or while no scheduler ran.
- ``broadcast:<id>`` (date): start one scheduled broadcast at its time.

``coalesce=True`` and a ``misfire_grace_time``: after downtime a missed job runs once, not
once per missed time. The job store table (``apscheduler_jobs``) is made by Alembic like every
other table (declared in db.models); APScheduler's own create_all then finds it present.
APScheduler's job store is synchronous, so it gets a sync URL of the same database
(sqlite3 / psycopg), and the scheduler runs in its own thread (``BackgroundScheduler``): its
job store reads and writes (due jobs, next run times, the table check at start) would
otherwise stall the bot's event loop, 100-200 ms at start-up and a few ms every sweep. The
jobs themselves are coroutines run on the bot's loop (:class:`LoopExecutor`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from apscheduler.executors.base import BaseExecutor, run_coroutine_job, run_job
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger
from apscheduler.util import iscoroutinefunction_partial
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.config import Settings
from db.models import utcnow
from services import broadcasts, reminders
from services.audit import Actor

if TYPE_CHECKING:
    from tasks.sender import Sender

log = logging.getLogger("hopnhat.scheduler")
MISFIRE_GRACE = int(timedelta(hours=12).total_seconds())
DUE_SWEEP_SECONDS = 30
_ctx: dict[str, Any] = {}  # this process's maker, settings, clock, sender (jobs are by reference)


def jobstore_url(database_url: str) -> str:
    """The synchronous SQLAlchemy URL of the same database for APScheduler's job store."""
    if database_url.startswith("sqlite+aiosqlite://"):
        return "sqlite://" + database_url[len("sqlite+aiosqlite://"):]
    if database_url.startswith("postgresql+asyncpg://"):
        return "postgresql+psycopg://" + database_url[len("postgresql+asyncpg://"):]
    return database_url


class LoopExecutor(BaseExecutor):
    """Runs coroutine jobs on an asyncio loop from the scheduler's thread (what
    ``AsyncIOExecutor`` does for a scheduler living on the loop); plain functions run in a
    small thread pool. Outcomes are reported to the scheduler as its own executors do."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="hopnhat-job")
        self._pending: set[Future[Any]] = set()

    def shutdown(self, wait: bool = True) -> None:
        for f in list(self._pending):
            f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=wait)

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        def done(f: Future[Any]) -> None:
            self._pending.discard(f)
            if f.cancelled():
                return
            try:
                events = f.result()
            except BaseException:
                self._run_job_error(job.id, *sys.exc_info()[1:])
            else:
                self._run_job_success(job.id, events)

        args = (job, job._jobstore_alias, run_times, self._logger.name)
        if iscoroutinefunction_partial(job.func):
            f = asyncio.run_coroutine_threadsafe(run_coroutine_job(*args), self.loop)
        else:
            f = self._pool.submit(run_job, *args)
        self._pending.add(f)
        f.add_done_callback(done)


def make_scheduler(settings: Settings, loop: asyncio.AbstractEventLoop | None = None
                   ) -> BackgroundScheduler:
    """A scheduler whose coroutine jobs run on ``loop`` (default: the running loop)."""
    store = SQLAlchemyJobStore(url=jobstore_url(settings.database_url),
                               tablename="apscheduler_jobs")
    return BackgroundScheduler(
        jobstores={"default": store},
        executors={"default": LoopExecutor(loop or asyncio.get_running_loop())},
        job_defaults={"coalesce": True, "misfire_grace_time": MISFIRE_GRACE,
                      "max_instances": 1},
        timezone=settings.tz,
    )


async def start_scheduler(settings: Settings, maker: async_sessionmaker[AsyncSession],
                          sender: Sender | None = None, *, clock: Any = utcnow,
                          standard_jobs: bool = True) -> BackgroundScheduler:
    """Start this process's scheduler on the persistent job store and (re)register the
    standard jobs under fixed ids (``replace_existing``: never duplicated by restarts).
    The job store's I/O happens in worker threads, never on the event loop."""
    _ctx.update(settings=settings, maker=maker, sender=sender, clock=clock)
    scheduler = make_scheduler(settings)
    await asyncio.to_thread(scheduler.start)
    if standard_jobs:
        at = settings.reminder_clock
        await asyncio.to_thread(
            scheduler.add_job, "tasks.scheduler:daily_job",
            CronTrigger(hour=at.hour, minute=at.minute, timezone=settings.tz),
            id="reminders.daily", replace_existing=True)
        await asyncio.to_thread(
            scheduler.add_job, "tasks.scheduler:due_broadcasts_job",
            IntervalTrigger(seconds=DUE_SWEEP_SECONDS), id="broadcasts.due",
            replace_existing=True)
    _ctx["scheduler"] = scheduler
    return scheduler


def schedule_broadcast_job(broadcast_id: int, when: datetime) -> bool:
    """Add the date job of a scheduled broadcast, if a scheduler runs in this process.
    Blocking (the job store's own connection): call it from a worker thread in async code."""
    scheduler = _ctx.get("scheduler")
    if scheduler is None or not scheduler.running:
        return False
    scheduler.add_job("tasks.scheduler:broadcast_job", DateTrigger(run_date=when),
                      args=[broadcast_id], id=f"broadcast:{broadcast_id}", replace_existing=True)
    return True


def _wake() -> None:
    sender = _ctx.get("sender")
    if sender is not None:
        sender.wake.set()


async def daily_job() -> None:
    """Plan today's reminders, nags and digests (idempotent: keys are unique per chat)."""
    settings: Settings = _ctx["settings"]
    async with _ctx["maker"]() as s:
        result = await reminders.plan(s, _ctx["clock"](), tz=settings.tz,
                                      offsets=settings.reminder_offsets,
                                      actor=Actor.system("scheduler:reminders"))
        await s.commit()
    log.info("reminders planned: %s", result)
    _wake()


async def broadcast_job(broadcast_id: int) -> None:
    async with _ctx["maker"]() as s:
        n = await broadcasts.start(s, broadcast_id, Actor.system("scheduler:broadcast"),
                                   _ctx["clock"]())
        await s.commit()
    log.info("scheduled broadcast #%d started: %d recipients", broadcast_id, n)
    _wake()


async def due_broadcasts_job() -> None:
    async with _ctx["maker"]() as s:
        for bid in await broadcasts.due_scheduled(s, _ctx["clock"]()):
            await broadcasts.start(s, bid, Actor.system("scheduler:broadcast"), _ctx["clock"]())
        await s.commit()
    _wake()
