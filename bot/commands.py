"""The command menu (setMyCommands), Vietnamese and English, filtered by role."""

from __future__ import annotations

import logging

from aiogram import Bot
from aiogram.types import BotCommand, BotCommandScopeChat, BotCommandScopeDefault

from services import roles
from services.texts import LANGS, t

log = logging.getLogger(__name__)


def commands(role: str | None, lang: str) -> list[BotCommand]:
    return [BotCommand(command=c, description=t(f"cmd.{c}", lang))
            for c in roles.commands_for(role)]


class CommandMenu:
    """Default menu for people not yet verified; a per-chat menu once their role is known."""

    def __init__(self, bot: Bot, default_lang: str) -> None:
        self.bot = bot
        self.default_lang = default_lang

    async def set_default(self) -> None:
        await self.bot.set_my_commands(commands(None, self.default_lang), BotCommandScopeDefault())
        for lang in LANGS:
            await self.bot.set_my_commands(
                commands(None, lang), BotCommandScopeDefault(), language_code=lang
            )

    async def set_for_chat(self, chat_id: int, role: str | None) -> None:
        scope = BotCommandScopeChat(chat_id=chat_id)
        try:
            await self.bot.set_my_commands(commands(role, self.default_lang), scope)
            for lang in LANGS:
                await self.bot.set_my_commands(commands(role, lang), scope, language_code=lang)
        except Exception:  # the menu is a convenience; /help always works
            log.warning("could not set the command menu for chat %s", chat_id, exc_info=True)
