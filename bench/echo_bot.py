"""Baseline: a bare aiogram echo bot (aiogram's own polling, no DB) for the benchmarks."""

from __future__ import annotations

import asyncio
import os

from aiogram import Bot, Dispatcher
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.types import Message


async def main() -> None:
    api = TelegramAPIServer.from_base(os.environ["HOPNHAT_TELEGRAM_API_URL"])
    session = AiohttpSession(api=api)
    bot = Bot(os.environ["HOPNHAT_BOT_TOKEN"], session=session)
    dp = Dispatcher()

    @dp.message()
    async def echo(message: Message) -> None:
        await message.answer(message.text or "?")

    await dp.start_polling(bot, polling_timeout=25, handle_signals=True)


if __name__ == "__main__":
    asyncio.run(main())
