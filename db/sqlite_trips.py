"""One trip to aiosqlite's thread per SQL statement instead of three or four.

Why: SQLAlchemy's aiosqlite adapter awaits aiosqlite for the cursor, the execute, the fetch
and the close, and each await is a hand-off to aiosqlite's worker thread and back (a futex
wake-up there, a self-pipe write and an event-loop wake-up here). On a virtual machine those
hand-offs, not SQLite, were most of the bot's CPU per update. Here the whole statement runs as
one function in the worker thread and the rows come back with it.

It relies on two aiosqlite internals (``Connection._execute`` runs a function in the worker
thread; ``Connection._conn`` is the sqlite3 connection), pinned by the ``aiosqlite<1`` range
and exercised by every SQLite test.
"""

from __future__ import annotations

import collections
import sqlite3
from typing import Any

from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
)
from sqlalchemy.util import EMPTY_DICT
from sqlalchemy.util.concurrency import await_


def _execute(raw: sqlite3.Connection, operation: str, parameters: Any, many: bool
             ) -> tuple[Any, list[Any], int, int | None]:
    cur = raw.cursor()
    try:
        if many:
            cur.executemany(operation, parameters)
        elif parameters is None:
            cur.execute(operation)
        else:
            cur.execute(operation, parameters)
        desc = cur.description
        return desc, (cur.fetchall() if desc else []), cur.rowcount, cur.lastrowid
    finally:
        cur.close()


class OneTripCursor(AsyncAdapt_aiosqlite_cursor):
    """A buffered cursor whose statement, rows and counts arrive in one thread trip."""

    __slots__ = ("_description", "_rowcount", "_lastrowid", "_arraysize")

    def __init__(self, adapt_connection: Any) -> None:  # no aiosqlite cursor is made
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._cursor = None
        self._soft_closed_memoized = EMPTY_DICT
        self._rows = collections.deque()
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: int | None = None
        self._arraysize = 1

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> Any:
        return self._lastrowid

    @property
    def arraysize(self) -> int:
        return self._arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._arraysize = value

    async def _async_soft_close(self) -> None:
        return None  # nothing is open in the worker thread between trips

    def close(self) -> None:
        self._rows.clear()

    async def _run(self, operation: Any, parameters: Any, many: bool) -> None:
        async with self._adapt_connection._execute_mutex:
            conn = self._connection
            desc, rows, self._rowcount, self._lastrowid = await conn._execute(
                _execute, conn._conn, operation, parameters, many)
            self._description = desc
            self._rows = collections.deque(rows)

    def execute(self, operation: Any, parameters: Any = None) -> Any:
        try:
            return await_(self._run(operation, parameters, False))
        except Exception as error:
            self._adapt_connection._handle_exception(error)

    def executemany(self, operation: Any, seq_of_parameters: Any) -> Any:
        try:
            return await_(self._run(operation, seq_of_parameters, True))
        except Exception as error:
            self._adapt_connection._handle_exception(error)


class OneTripConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()
    _cursor_cls = OneTripCursor


def adopt(dbapi_conn: Any) -> None:
    """Switch a fresh adapted aiosqlite connection (the ``connect`` event's argument)."""
    if type(dbapi_conn) is AsyncAdapt_aiosqlite_connection:
        dbapi_conn.__class__ = OneTripConnection
