"""Engine and session factory, built once at start-up from a URL (never at import)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from sqlalchemy import TextClause, event, inspect
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import ORMExecuteState, Session

from db import sqlite_trips

IDLE_PING_SECONDS = 10.0


def make_engine(url: str, *, immediate: bool = False, serving: bool = False, **kwargs: Any
                ) -> AsyncEngine:
    """SQLite gets WAL, a busy timeout and enforced foreign keys; PostgreSQL a checked pool.

    ``immediate`` (the bot's own engine): SQLite transactions take the write lock at BEGIN.
    A deferred transaction that reads and then writes fails at once ("database is locked")
    when another writer committed in between; serializing writers up front avoids that.
    Read-only tools and tests keep deferred transactions so they never wait.
    The bot's SQLite engine also keeps ONE connection: its transactions are serialized
    anyway, and waiting for the pool wakes the next one the moment the previous commits,
    where waiting on SQLite's lock polls with sleeps (lost throughput); one connection
    also lets ``PRAGMA data_version`` tell other processes' commits from our own.

    ``serving`` (the bot's own engine on PostgreSQL): a fixed pool as large as the updates
    handled at once (no connections opened and closed under load), and a connection is
    pinged only when it sat idle for ``IDLE_PING_SECONDS``: asyncpg's ping is three round
    trips (BEGIN; ;ROLLBACK), a fifth of the bot's CPU when done on every checkout.
    """
    if url.startswith("sqlite"):
        if immediate and ":memory:" not in url:
            kwargs.setdefault("pool_size", 1)
            kwargs.setdefault("max_overflow", 0)
            kwargs.setdefault("pool_timeout", 300)
        engine = create_async_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            sqlite_trips.adopt(dbapi_conn)
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
    if not serving:
        kwargs.setdefault("pool_pre_ping", True)
        kwargs.setdefault("pool_size", 10)
        return create_async_engine(url, **kwargs)
    kwargs.setdefault("pool_size", 20)
    kwargs.setdefault("max_overflow", 0)
    engine = create_async_engine(url, **kwargs)

    @event.listens_for(engine.sync_engine, "checkin")
    def _checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < IDLE_PING_SECONDS:
            return  # new, or just used: alive
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # the pool replaces it and tries again
            raise DisconnectionError("idle connection failed its ping") from exc

    return engine


async def fill_pool(engine: AsyncEngine) -> int:
    """Open the serving pool's connections at start-up rather than under the first burst of
    updates, where each new one costs its connect and its server-capability queries while
    other updates wait (seen as the first round of a benchmark running 30% slower). Other
    engines, or a pool already open, do nothing."""
    pool = engine.sync_engine.pool
    size = getattr(pool, "size", lambda: 0)()
    if engine.dialect.name != "postgresql" or pool.checkedin() + pool.checkedout() >= size:
        return 0
    conns = await asyncio.gather(*(engine.connect() for _ in range(size)))
    for conn in conns:
        await conn.close()
    return len(conns)


def make_sessionmaker(engine: AsyncEngine, info: dict[str, Any] | None = None
                      ) -> async_sessionmaker[AsyncSession]:
    """``info``: objects every session of this maker carries (``session.info``)."""
    return async_sessionmaker(engine, expire_on_commit=False, info=info)


# --------------------------------------------------------------------------- change signals
# In-process caches of rows (the sender's identity, person and unit: services/people.py;
# the plan's systems and milestones: services/status.py) must hear of every change to those
# rows. All writes of the project go through ORM sessions, so session events see them: ORM
# flushes and Core statements run on a session. Listeners registered for the same database
# in this process are called at once and again after the transaction ends; on PostgreSQL
# the transaction also sends NOTIFY (delivered on commit) for caches in other processes
# (``listen_for_changes``). Writes that bypass sessions (psql, an Alembic data migration)
# are not seen: restart the bot, or ``NOTIFY hopnhat_rows`` on PostgreSQL.

WATCHED_TABLES = frozenset({"people", "chat_identities", "units", "systems", "milestones",
                            "unit_system_status"})
TOUCH_COLUMNS = frozenset({"last_seen_at", "display_name", "username"})  # nobody caches them
NOTIFY_CHANNEL = "hopnhat_rows"
PROCESS_TOKEN = uuid.uuid4().hex  # our own NOTIFYs were already applied locally
_INFO = "watched_changes"

# fn(tables changed, chat identity ids whose seen/name columns alone changed)
ChangeListener = Callable[[frozenset[str], frozenset[int]], None]
_listeners: dict[str, list[ChangeListener]] = {}  # by database (URL without password)


def _db_key(bind: Any) -> str:
    return bind.url.render_as_string(hide_password=True)


def add_change_listener(engine: AsyncEngine, fn: ChangeListener) -> None:
    """Call ``fn`` for every change in this process to a watched table of the engine's
    database, whatever engine made it: at once and after its transaction ends."""
    _listeners.setdefault(_db_key(engine.sync_engine), []).append(fn)


def remove_change_listener(engine: AsyncEngine, fn: ChangeListener) -> None:
    fns = _listeners.get(_db_key(engine.sync_engine), [])
    if fn in fns:
        fns.remove(fn)


def _fire(key: str, tables: frozenset[str], touched: frozenset[int]) -> None:
    for fn in list(_listeners.get(key, ())):
        fn(tables, touched)


def _mark(session: Session, tables: Iterable[str], touched: Iterable[int] = ()) -> None:
    info = session.info.setdefault(_INFO, {"tables": set(), "touched": set()})
    tables, touched = frozenset(tables), frozenset(touched)
    first = bool(tables) and not info["tables"]
    info["tables"].update(tables)
    info["touched"].update(touched)
    bind = session.get_bind()
    # at once too: a cache load racing with this transaction must not keep what it read
    _fire(_db_key(bind), tables, touched)
    if first and bind.dialect.name == "postgresql":
        session.connection().exec_driver_sql(
            f"SELECT pg_notify('{NOTIFY_CHANNEL}', '{PROCESS_TOKEN}')")


@event.listens_for(Session, "after_flush")
def _after_flush(session: Session, _ctx: Any) -> None:
    tables: set[str] = set()
    touched: set[int] = set()
    for obj in (*session.new, *session.dirty, *session.deleted):
        table = getattr(obj, "__tablename__", None)
        if table not in WATCHED_TABLES:
            continue
        new = obj in session.new
        gone = obj in session.deleted
        changed = set() if new or gone else {
            a.key for a in inspect(obj).attrs if a.history.has_changes()}
        if not (new or gone or changed):
            continue  # attributes set to what they were
        if table == "chat_identities" and not gone and (new or changed <= TOUCH_COLUMNS):
            touched.add(obj.id)  # a new identity, or only seen/name: nobody's role
            continue
        tables.add(table)
    if tables or touched:
        _mark(session, tables, touched)


@event.listens_for(Session, "do_orm_execute")
def _on_execute(state: ORMExecuteState) -> None:
    stmt = state.statement
    if state.is_insert or state.is_update or state.is_delete:
        table = getattr(getattr(stmt, "table", None), "name", None)
        if table in WATCHED_TABLES:
            _mark(state.session, {table})
    elif isinstance(stmt, TextClause):
        sql = stmt.text.lower()
        hit = {t for t in WATCHED_TABLES if t in sql}
        if hit and not sql.lstrip().startswith("select"):
            _mark(state.session, hit)


_USED = "hopnhat.used_database"


@event.listens_for(Session, "after_begin")
def _after_begin(session: Session, _transaction: Any, _connection: Any) -> None:
    session.info[_USED] = True  # sticky: a commit inside the handler still counts


def began_transaction(session: AsyncSession | Session) -> bool:
    """Whether this session ever ran a statement (so it holds or held a transaction)."""
    return bool(session.info.get(_USED))


def used_database(session: AsyncSession | Session) -> bool:
    """Whether this session ever ran a statement (began a transaction on a connection) or
    holds changes not yet flushed; a session fed only from the caches did neither."""
    return bool(session.info.get(_USED) or session.new or session.dirty or session.deleted)


@event.listens_for(Session, "after_commit")
@event.listens_for(Session, "after_rollback")
def _after_end(session: Session) -> None:
    info = session.info.pop(_INFO, None)
    if info is not None:
        _fire(_db_key(session.get_bind()), frozenset(info["tables"]),
              frozenset(info["touched"]))


async def listen_for_changes(engine: AsyncEngine, fn: ChangeListener,
                             lost: Callable[[], None]) -> Callable[[], Awaitable[None]] | None:
    """PostgreSQL: call ``fn`` when another process commits a watched change, ``lost`` if
    the listening connection drops. Returns the closer, or None for other databases."""
    if engine.dialect.name != "postgresql":
        return None
    import asyncpg

    dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)

    def on_notify(_c: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload != PROCESS_TOKEN:
            fn(WATCHED_TABLES, frozenset())

    await conn.add_listener(NOTIFY_CHANNEL, on_notify)
    conn.add_termination_listener(lambda _c: lost())

    async def close() -> None:
        if not conn.is_closed():
            await conn.close()

    return close
