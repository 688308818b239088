"""The bot's serving pool on PostgreSQL is opened at start-up (db/session.py fill_pool), so
the first burst of updates opens no connection."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, text

from db.session import fill_pool, make_engine


async def test_fill_pool_opens_every_connection_once(db_url: str) -> None:
    engine = make_engine(db_url, immediate=True, serving=True)
    opened: list[Any] = []
    event.listen(engine.sync_engine, "connect", lambda *_a: opened.append(1))
    try:
        n = await fill_pool(engine)
        pool = engine.sync_engine.pool
        if engine.dialect.name != "postgresql":
            assert n == 0  # SQLite keeps its one connection, opened on first use
            return
        assert n == pool.size() == 20 and len(opened) == 20 and pool.checkedin() == 20
        assert await fill_pool(engine) == 0  # already open: nothing more
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
        assert len(opened) == 20
    finally:
        await engine.dispose()
