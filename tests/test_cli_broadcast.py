"""`hopnhat broadcast ...` and `hopnhat reminders plan` as real processes on a SQLite file."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import func, select

from db.migrate import upgrade_async
from db.models import AuditLog, Broadcast, Delivery
from db.session import make_engine, make_sessionmaker
from tests.ledger_helpers import add_recipients
from tests.test_cli import hopnhat


async def _setup(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    await upgrade_async(url)
    engine = make_engine(url)
    maker = make_sessionmaker(engine)
    await add_recipients(maker, 5, first=9100)
    await add_recipients(maker, 2, first=9200, role="unit_admin")
    await engine.dispose()
    return url


async def _query(url: str, q):  # type: ignore[no-untyped-def]
    engine = make_engine(url)
    try:
        async with make_sessionmaker(engine)() as s:
            return (await s.execute(q)).all()
    finally:
        await engine.dispose()


def test_broadcast_cli_send_list_pause_cancel(tmp_path: Path) -> None:
    url = asyncio.run(_setup(tmp_path))
    r = hopnhat(tmp_path, "broadcast", "send", "Chào {{ name }}", "--role", "unit_admin",
                "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "Chào Người Nhận 9200" in r.stdout and "recipients: 2" in r.stdout
    assert asyncio.run(_query(url, select(func.count()).select_from(Broadcast))) == [(0,)]
    r = hopnhat(tmp_path, "broadcast", "send", "Chào {{ ten }}")
    assert r.returncode == 1 and "Mẫu không hợp lệ" in r.stderr
    r = hopnhat(tmp_path, "broadcast", "send", "Chào {{ name }}", "--role", "unit_admin")
    assert r.returncode == 0 and "queued for 2 recipients" in r.stdout, r.stderr
    rows = asyncio.run(_query(url, select(Delivery.chat_id, Delivery.text, Delivery.state)
                              .order_by(Delivery.chat_id)))
    assert rows == [("9200", "Chào Người Nhận 9200", "pending"),
                    ("9201", "Chào Người Nhận 9201", "pending")]
    r = hopnhat(tmp_path, "broadcast", "pause", "1")
    assert r.returncode == 0 and "#1: paused" in r.stdout
    r = hopnhat(tmp_path, "broadcast", "pause", "1")
    assert r.returncode == 1 and "tạm dừng" in r.stderr  # polite refusal, nothing changed
    r = hopnhat(tmp_path, "broadcast", "send", "Hẹn {{ name }}", "--at", "01/01/2099 08:00")
    assert r.returncode == 0 and "scheduled for 01/01/2099 08:00" in r.stdout
    r = hopnhat(tmp_path, "broadcast", "list")
    assert "#2 scheduled" in r.stdout and "#1 paused" in r.stdout and "sent 0/2" in r.stdout
    r = hopnhat(tmp_path, "broadcast", "cancel", "2")
    assert r.returncode == 0 and "#2: cancelled" in r.stdout
    actions = [a for (a,) in asyncio.run(_query(url, select(AuditLog.action)
                                                .order_by(AuditLog.id)))]
    assert actions == ["broadcast.create", "broadcast.start", "broadcast.pause",
                       "broadcast.create", "broadcast.schedule", "broadcast.cancel"]


def test_reminders_plan_cli(tmp_path: Path) -> None:
    asyncio.run(_setup(tmp_path))
    r = hopnhat(tmp_path, "reminders", "plan", "--now", "2025-08-08T08:30")
    assert r.returncode == 0, r.stderr
    assert "planned: 0 reminders" in r.stdout  # nobody belongs to a unit here
