"""aiogram FSM storage in the project's database, so conversations survive a restart."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

from aiogram.fsm.state import State
from aiogram.fsm.storage.base import BaseStorage, DefaultKeyBuilder, StateType, StorageKey
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import FsmRecord, utcnow

# The session of the update being handled: FSM changes then commit (or roll back) with the
# handler's work, and on SQLite a second connection never waits for the first's write lock.
current_session: ContextVar[AsyncSession | None] = ContextVar("current_session", default=None)


class DbStorage(BaseStorage):
    """One row per (bot, chat, user[, thread]) key, in the handler's transaction if any."""

    def __init__(self, maker: async_sessionmaker[AsyncSession]) -> None:
        self.maker = maker
        self.keys = DefaultKeyBuilder(with_bot_id=True, with_destiny=True)

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[tuple[AsyncSession, bool]]:
        shared = current_session.get()
        if shared is not None:
            yield shared, False
            return
        async with self.maker() as s:
            yield s, True

    async def _write(self, key: StorageKey, **values: Any) -> None:
        k = self.keys.build(key)
        async with self._session() as (s, own):
            row = await s.get(FsmRecord, k)
            if row is None:
                row = FsmRecord(key=k, state=None, data={})
                s.add(row)
            for name, value in values.items():
                setattr(row, name, value)
            row.updated_at = utcnow()
            if own:
                await s.commit()
            else:
                await s.flush()

    async def _read(self, key: StorageKey) -> FsmRecord | None:
        async with self._session() as (s, _own):
            return await s.get(FsmRecord, self.keys.build(key))

    async def set_state(self, key: StorageKey, state: StateType = None) -> None:
        value = state.state if isinstance(state, State) else state
        await self._write(key, state=value)

    async def get_state(self, key: StorageKey) -> str | None:
        row = await self._read(key)
        return row.state if row else None

    async def set_data(self, key: StorageKey, data: Mapping[str, Any]) -> None:
        await self._write(key, data=dict(data))

    async def get_data(self, key: StorageKey) -> dict[str, Any]:
        row = await self._read(key)
        return dict(row.data or {}) if row else {}

    async def close(self) -> None:
        return None
