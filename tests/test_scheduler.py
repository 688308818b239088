"""APScheduler on the project's database: jobs survive a restart, and a job missed during
downtime runs once (coalesced), not once per missed time. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from apscheduler.events import EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import text

from bot.config import load_settings
from db.session import make_engine, make_sessionmaker
from tasks.scheduler import jobstore_url, make_scheduler, start_scheduler
from tests.ledger_helpers import until

RUNS: list[float] = []


async def tick() -> None:
    """The job under test (referenced by name, as persistent jobs must be)."""
    RUNS.append(time.time())


async def _clear(db_url: str) -> None:
    engine = make_engine(db_url)
    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM apscheduler_jobs"))
    await engine.dispose()


def test_jobstore_url_is_the_same_database_sync() -> None:
    assert jobstore_url("sqlite+aiosqlite:///./x.db") == "sqlite:///./x.db"
    assert jobstore_url("postgresql+asyncpg://u@h/db") == "postgresql+psycopg://u@h/db"


async def test_restart_across_a_scheduled_time_runs_the_job_once(db_url):
    await _clear(db_url)
    settings = load_settings(database_url=db_url)
    first = make_scheduler(settings)
    first.start()
    start = datetime.now(UTC) + timedelta(seconds=1)
    first.add_job("tests.test_scheduler:tick", IntervalTrigger(seconds=1, start_date=start),
                  id="tick", replace_existing=True)
    first.shutdown(wait=False)  # down before the first run time
    await asyncio.sleep(4.5)  # four run times pass while nothing runs
    assert RUNS == []
    restarted_at = datetime.now(UTC)
    second = make_scheduler(settings)
    executed: list[datetime] = []

    def on_run(event: JobExecutionEvent) -> None:
        executed.append(event.scheduled_run_time)

    second.add_listener(on_run, EVENT_JOB_EXECUTED)
    second.start()
    try:
        assert second.get_job("tick") is not None  # the schedule survived the restart

        async def ran() -> bool:
            return bool(executed)
        await until(ran, 10, "the missed job to run after the restart")
    finally:
        second.shutdown(wait=False)
    missed_runs = [t for t in executed if t < restarted_at]
    assert len(missed_runs) == 1, executed  # coalesced: once, not four times
    RUNS.clear()


async def test_standard_jobs_registered_once_across_restarts(db_url):
    await _clear(db_url)
    settings = load_settings(database_url=db_url, reminder_time="07:30")
    engine = make_engine(db_url)
    maker = make_sessionmaker(engine)
    try:
        for _ in range(2):
            scheduler = await start_scheduler(settings, maker)
            jobs = {j.id: j for j in scheduler.get_jobs()}
            scheduler.shutdown(wait=False)
        assert set(jobs) == {"reminders.daily", "broadcasts.due"}
        trigger = str(jobs["reminders.daily"].trigger)
        assert "hour='7'" in trigger and "minute='30'" in trigger
        async with maker() as s:
            assert await s.scalar(text("SELECT count(*) FROM apscheduler_jobs")) == 2
    finally:
        await engine.dispose()


async def test_daily_job_plans_reminders_once_on_a_moved_clock(seeded_maker, db_url):
    from sqlalchemy import select

    from db.models import Delivery
    from tasks.scheduler import daily_job
    from tests.test_reminders import MORNING, people

    await people(seeded_maker)
    settings = load_settings(database_url=db_url)
    scheduler = await start_scheduler(settings, seeded_maker, clock=lambda: MORNING,
                                      standard_jobs=False)
    scheduler.shutdown(wait=False)
    await daily_job()
    await daily_job()  # e.g. run again after a restart: nothing new
    async with seeded_maker() as s:
        chats = list(await s.scalars(select(Delivery.chat_id).where(
            Delivery.key == "r:hcm_qlvb_rollout:7").order_by(Delivery.chat_id)))
    assert chats == ["7101", "7102", "7104"]


async def test_scheduled_broadcast_survives_a_restart_across_its_time(seeded_maker, db_url):
    from sqlalchemy import func, select

    from db.models import Broadcast, Delivery
    from services import broadcasts
    from services.audit import Actor
    from tasks.scheduler import schedule_broadcast_job
    from tests.ledger_helpers import add_recipients

    await _clear(db_url)
    await add_recipients(seeded_maker, 5, first=9700)
    when = datetime.now(UTC) + timedelta(seconds=1.5)
    async with seeded_maker() as s:
        b = await broadcasts.create(s, Actor.system("test"), "Hẹn {{ name }}",
                                    broadcasts.Audience())
        await broadcasts.schedule(s, b.id, when, Actor.system("test"))
        await s.commit()
    settings = load_settings(database_url=db_url)
    scheduler = await start_scheduler(settings, seeded_maker, standard_jobs=False)
    assert schedule_broadcast_job(b.id, when)
    scheduler.shutdown(wait=False)  # down across the scheduled time
    await asyncio.sleep(2.5)
    async with seeded_maker() as s:
        assert (await s.get(Broadcast, b.id)).state == "scheduled"
    scheduler = await start_scheduler(settings, seeded_maker, standard_jobs=False)
    try:
        async def started() -> bool:
            async with seeded_maker() as s:
                row = await s.get(Broadcast, b.id, populate_existing=True)
                return row.state == "sending"
        await until(started, 10, "the missed broadcast job to run after the restart")
        assert scheduler.get_job(f"broadcast:{b.id}") is None  # a date job runs once
    finally:
        scheduler.shutdown(wait=False)
    async with seeded_maker() as s:
        assert await s.scalar(select(func.count()).select_from(Delivery).where(
            Delivery.broadcast_id == b.id)) == 5
