"""The command gate (bot/app.py) never refuses a message its Command filter would accept,
for every Command filter the bot's routers use."""

from __future__ import annotations

import re

import pytest
from aiogram import Bot
from aiogram.filters import Command, CommandStart
from aiogram.types import Message

from bot.app import command_gate, create_dispatcher
from tests.live import TOKEN

TEXTS = ["/unit", " /unit", "/unit ben thanh", "/UNIT", "/unit\nx", "/units", "/", "", "unit",
         "/start", "/start abc", "!unit", "/ticket", "/queue mine", "/help", "/me", " ",
         "/lang en", "/Start", "/unit@", "/st", "/statusx"]


def message(text: str, caption: bool = False) -> Message:
    data = {"message_id": 1, "date": 0, "chat": {"id": 1, "type": "private"},
            "from": {"id": 1, "is_bot": False, "first_name": "A"}}
    data["caption" if caption else "text"] = text
    return Message.model_validate(data)


def dispatcher():
    from bot.commands import CommandMenu
    from bot.config import Settings

    settings = Settings(bot_token=TOKEN, database_url="sqlite+aiosqlite://")
    return create_dispatcher(settings, None, CommandMenu(None, "vi"))  # type: ignore[arg-type]


def command_filters() -> list[Command]:
    dp = dispatcher()
    out = []
    for router in dp.chain_tail:
        for observer in router.observers.values():
            for handler in observer.handlers:
                out += [f.callback for f in handler.filters or ()
                        if isinstance(f.callback, Command)]
    return out


async def test_gate_refuses_only_what_the_command_refuses() -> None:
    bot = Bot("1:x")
    filters = command_filters()
    assert len(filters) > 20  # the routers' commands were found
    gated = 0
    for cmd in filters:
        gate = command_gate(cmd)
        assert gate is not None
        for text in TEXTS:
            for caption in (False, True):
                msg = message(text, caption)
                passed = await gate(msg)
                accepted = bool(await cmd(msg, bot))
                assert passed or not accepted, (cmd, text)
                gated += not passed
    assert gated  # and it does refuse something


@pytest.mark.parametrize("cmd", [Command("Unit", ignore_case=True), CommandStart(),
                                 Command("a", "b", prefix="!/")])
async def test_gate_matches_the_command_exactly_without_mentions(cmd: Command) -> None:
    bot = Bot("1:x")
    gate = command_gate(cmd)
    assert gate is not None
    for text in [*TEXTS, "!a", "!b x", "/B", "/unit", "/UnIt"]:
        msg = message(text)
        assert await gate(msg) == bool(await cmd(msg, bot)), text


def test_regex_commands_are_not_gated() -> None:
    assert command_gate(Command(re.compile(r"item_\d+"))) is None


def test_building_another_dispatcher_adds_no_second_gate() -> None:
    def gates(dp) -> list[int]:
        return [sum(1 for f in h.filters or () if getattr(f.callback, "command_gate", False))
                for r in dp.chain_tail for o in r.observers.values() for h in o.handlers]

    first = gates(dispatcher())
    assert max(first) == 1 and gates(dispatcher()) == first
