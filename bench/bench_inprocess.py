"""CPU per update of the bot's own handling, with the Bot API answered in memory: no HTTP,
no emulator, no second process, so a noisy machine disturbs it less than the end-to-end
benchmarks. Baseline: the same kind of echo handler on a bare aiogram dispatcher, answered
by the same in-memory session, measured in the same run.

    python bench/bench_inprocess.py [--text /start] [--users 100] [--rounds 20] [--cold]
        [--pg] [--profile]

Each round feeds one batch (one update per user) through the bot's inbox (record, warm-up,
dispatch, handle) and waits for all of it. ``--cold`` empties the sender and FSM caches
before every batch, as after a restart. ``--profile`` prints cProfile's top functions.
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import itertools
import json
import os
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

from aiogram import Bot, Dispatcher
from aiogram.client.session.base import BaseSession
from aiogram.methods import TelegramMethod
from aiogram.types import Message, Update
from bench_start import BASE_USER, seed
from common import TOKEN, drop_pg_database, new_pg_database

_ids = itertools.count(1)


class MemorySession(BaseSession):
    """Answers every call at once, as Telegram would: a sent message comes back."""

    async def make_request(self, bot: Bot, method: TelegramMethod[Any],
                           timeout: int | None = None) -> Any:
        name = type(method).__name__
        if name in ("SendMessage", "EditMessageText"):
            result: Any = {
                "message_id": next(_ids), "date": 1_750_000_000, "text": method.text,
                "chat": {"id": method.chat_id, "type": "private", "first_name": "U"},
                "from": {"id": bot.id, "is_bot": True, "first_name": "hopnhat"}}
        elif name == "GetMe":
            result = {"id": bot.id, "is_bot": True, "first_name": "hopnhat",
                      "username": "hopnhat_bot"}
        else:
            result = True
        return self.check_response(bot=bot, method=method, status_code=200,
                                   content=json.dumps({"ok": True, "result": result})).result

    async def stream_content(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        return None


def update(user: int, text: str) -> dict[str, Any]:
    n = next(_ids)
    msg: dict[str, Any] = {
        "message_id": n, "date": 1_750_000_000, "text": text,
        "from": {"id": user, "is_bot": False, "first_name": f"U{user}", "language_code": "vi"},
        "chat": {"id": user, "type": "private", "first_name": f"U{user}"}}
    if text.startswith("/"):
        msg["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
    return {"update_id": n, "message": msg}


async def cpu_per_update(batch: Any, rounds: int, n: int, profile: bool) -> float:
    for _ in range(3):  # warm-up: imports, caches of what does not change between rounds
        await batch()
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    t0 = time.process_time()
    for _ in range(rounds):
        await batch()
    spent = time.process_time() - t0
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    return 1000 * spent / (rounds * n)


async def echo(users: list[int], rounds: int, profile: bool) -> float:
    bot = Bot(TOKEN, session=MemorySession())
    dp = Dispatcher()

    @dp.message()
    async def answer(message: Message) -> None:
        await message.answer(message.text or "?")

    async def batch() -> None:
        ups = [Update.model_validate(update(u, "xin chào"), context={"bot": bot})
               for u in users]
        await asyncio.gather(*(dp.feed_update(bot, x) for x in ups))

    return await cpu_per_update(batch, rounds, len(users), profile)


async def hopnhat(url: str, users: list[int], text: str, rounds: int, cold: bool,
                  profile: bool) -> float:
    import bot.app as assembly
    from bot.config import Settings

    os.environ.update(HOPNHAT_BOT_TOKEN=TOKEN, HOPNHAT_LOG_LEVEL="WARNING")
    real_session = assembly.JsonBodySession
    assembly.JsonBodySession = lambda api: MemorySession()  # type: ignore[assignment,misc]
    try:
        app = assembly.build_app(Settings(database_url=url))
    finally:
        assembly.JsonBodySession = real_session  # type: ignore[misc]
    await app.bot.get_me()
    from services.units import warm_up_search

    async with app.maker() as s:
        await warm_up_search(s)
    await app.enable_caches()
    gc.collect()
    gc.freeze()

    async def batch() -> None:
        if cold:
            app.who_cache.changed()
            app.dp.storage.forget()
        await app.inbox.feed([update(u, text) for u in users])
        while app.inbox._tasks:
            await asyncio.gather(*list(app.inbox._tasks))

    try:
        return await cpu_per_update(batch, rounds, len(users), profile)
    finally:
        await app.inbox.marks.flush()
        await app.bot.session.close()
        await app.engine.dispose()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default="/start")
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--cold", action="store_true", help="no sender cached at each batch")
    ap.add_argument("--pg", action="store_true", help="PostgreSQL instead of SQLite")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    users = [BASE_USER + i for i in range(a.users)]
    pg_name = None
    if a.pg:
        url, pg_name = await new_pg_database()
    else:
        url = f"sqlite+aiosqlite:///{Path(tempfile.mkdtemp(prefix='hopnhat-bench-')) / 'b.db'}"
    try:
        await seed(url, users)
        base = await echo(users, a.rounds, a.profile)
        mine = await hopnhat(url, users, a.text, a.rounds, a.cold, a.profile)
    finally:
        if pg_name:
            await drop_pg_database(pg_name)
    print(f"echo handler (aiogram, no DB)      {base:.2f} ms CPU/update")
    print(f"{a.text!r} ({'cold' if a.cold else 'cached'} senders, "
          f"{'PostgreSQL' if a.pg else 'SQLite'})  {mine:.2f} ms CPU/update")
    print(f"ratio echo / bot = {base / mine:.2f}   (in-process; the end-to-end benchmarks add "
          f"HTTP, polling and the event loop, which both pay)")


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
