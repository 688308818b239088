"""Engine and session factory, built once at start-up from a URL (never at import)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)


def make_engine(url: str, *, immediate: bool = False, **kwargs: Any) -> AsyncEngine:
    """SQLite gets WAL, a busy timeout and enforced foreign keys; PostgreSQL a checked pool.

    ``immediate`` (the bot's own engine): SQLite transactions take the write lock at BEGIN.
    A deferred transaction that reads and then writes fails at once ("database is locked")
    when another writer committed in between; serializing writers up front avoids that.
    Read-only tools and tests keep deferred transactions so they never wait.
    """
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
            if immediate:
                dbapi_conn.isolation_level = None

        if immediate:
            @event.listens_for(engine.sync_engine, "begin")
            def _begin_immediate(conn: Any) -> None:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    return create_async_engine(url, **kwargs)


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
