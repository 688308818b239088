"""Helpers for ledger, sender and broadcast tests and benchmarks: many recipients fast."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import ChatIdentity, Delivery, Person, utcnow
from services import deliveries

FIRST_CHAT = 5_000_000


async def add_recipients(maker: async_sessionmaker[AsyncSession], n: int, *,
                         first: int = FIRST_CHAT, unit_code: str | None = None,
                         role: str = "official") -> list[int]:
    """``n`` verified people, each with a Telegram chat (ids first, first+1, ...)."""
    now = utcnow()
    ids = list(range(first, first + n))
    async with maker() as s:
        for i in range(0, n, 1000):
            chunk = ids[i : i + 1000]
            pids = list(await s.scalars(
                insert(Person).returning(Person.id, sort_by_parameter_order=True), [{
                    "full_name": f"Người Nhận {c}", "name_folded": f"nguoi nhan {c}",
                    "role": role, "unit_code": unit_code, "verified_at": now, "active": True,
                    "is_sample": False, "created_at": now, "updated_at": now} for c in chunk]))
            await s.execute(insert(ChatIdentity), [{
                "channel": "telegram", "external_id": str(c), "person_id": pid,
                "created_at": now, "last_seen_at": now} for c, pid in zip(chunk, pids,
                                                                         strict=True)])
        await s.commit()
    return ids


async def enqueue_plain(maker: async_sessionmaker[AsyncSession], chats: list[int | str],
                        key: str = "t:1", **extra: Any) -> int:
    async with maker() as s:
        n = await deliveries.enqueue(s, [{"key": key, "kind": "test", "chat_id": c,
                                          "text": f"Xin chào {c}", **extra} for c in chats])
        await s.commit()
    return n


async def open_rows(maker: async_sessionmaker[AsyncSession]) -> int:
    async with maker() as s:
        return int(await s.scalar(select(func.count()).select_from(Delivery).where(
            Delivery.state.in_(["pending", "sending"]))) or 0)


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 60.0,
                what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def sent_per_chat(emu: Any, chats: list[int]) -> Counter[int]:
    """How many messages each of ``chats`` received, from the emulator's record."""
    wanted = set(chats)
    return Counter(r["chat_id"] for r in emu.sent() if r["chat_id"] in wanted)
