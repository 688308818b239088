"""The command gate (bot/routing.py) never refuses a message its Command filter would accept,
for every Command filter the bot's routers use."""

from __future__ import annotations

import re
from typing import Any

import pytest
from aiogram import Bot
from aiogram.filters import Command, CommandStart
from aiogram.types import Message

from bot.app import create_dispatcher
from bot.routing import command_gate
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


def _samples() -> list[Any]:
    from aiogram.types import CallbackQuery

    base = {"message_id": 1, "date": 0, "chat": {"id": 1, "type": "private"},
            "from": {"id": 1, "is_bot": False, "first_name": "A"}}
    texts = ["/unit", "/unit ben thanh", "/start", "/ticket", "1", "2", "9", "xin chào",
             "huy", "tieng viet", "english", "x" * 300, "0901234567", "Trần Văn An",
             "phường Bến Thành", "khẩn cấp", "xong", "gui", "có"]
    out: list[Any] = [Message.model_validate({**base, "text": t}) for t in texts]
    out.append(Message.model_validate({**base, "contact": {
        "phone_number": "+84901234567", "first_name": "A", "user_id": 1}}))
    out.append(Message.model_validate({**base, "caption": "ds", "document": {
        "file_id": "f", "file_unique_id": "u", "file_name": "a.csv"}}))
    out.append(Message.model_validate({**base, "chat": {"id": -5, "type": "supergroup",
                                                        "title": "g"}, "text": "/queue"}))
    for data in ("lang:vi", "x", "st:my", "tk:1:claim", "sm:my", "sm", "sm:my:x", "su:79-26734",
                 "sp:find:8", "sy:qlvb", "se:u1:", "sc:1", "sp:find"):
        out.append(CallbackQuery.model_validate({
            "id": "q", "from": base["from"], "chat_instance": "c", "data": data,
            "message": {**base, "text": "menu"}}))
    return out


async def test_prechecks_and_skipped_routers_never_refuse_a_match() -> None:
    """For every handler of the bot's routers, over messages, files, contacts and button
    presses in every FSM state the routers use (and none): a refusing precheck
    (bot/routing.py) means the handler's own filters refuse too, and a router skipped as
    idle holds no handler (in it or below it) whose filters accept. And both do refuse:
    most handlers wait for a state a newcomer is not in, most routers hold only such."""
    from aiogram.dispatcher.event.handler import HandlerObject
    from aiogram.filters import StateFilter
    from aiogram.fsm.context import FSMContext
    from aiogram.fsm.state import State
    from aiogram.fsm.storage.base import StorageKey
    from aiogram.fsm.storage.memory import MemoryStorage

    from bot.routing import precheck, router_plan
    from handlers.ui import CHOICES_KEY

    bot = Bot("1:x")
    dp = dispatcher()
    kinds = ("message", "callback_query")
    handlers = [(name, h) for r in dp.chain_tail for name, o in r.observers.items()
                if name in kinds for h in o.handlers]
    states: set[str | None] = {None}
    for _, h in handlers:
        for f in h.filters or ():
            cb = getattr(f.callback, "__wrapped__", f.callback)
            if isinstance(cb, State):
                states.add(cb.state)
            elif isinstance(cb, StateFilter):
                states.update(s.state if isinstance(s, State) else s for s in cb.states
                              if isinstance(s, State | str))
    assert len(states) > 15  # the routers' conversation steps were found
    plans = {(r, kind): router_plan(r, kind) for r in dp.chain_tail if r is not dp
             for kind in kinds}
    assert sum(p is not None for p in plans.values()) > 15
    storage = MemoryStorage()
    refused = checked = skipped = entered = 0
    matched_kinds: set[str] = set()
    for raw_state in states:
        key = StorageKey(bot_id=1, chat_id=1, user_id=1)
        await storage.set_data(key, {CHOICES_KEY: [["lang:vi", "tieng viet"], ["x", "1"]]})
        context = FSMContext(storage, key)
        for event in _samples():
            kind = "message" if isinstance(event, Message) else "callback_query"
            accepted: set[int] = set()
            for name, h in handlers:
                if name != kind:
                    continue
                passes = not precheck(h).refuses(event, raw_state)
                matched, _ = await HandlerObject.check(
                    h, event, bot=bot, state=context, raw_state=raw_state,
                    event_from_user=event.from_user)
                assert passes or not matched, (h.callback.__name__, raw_state, event)
                refused += not passes
                checked += 1
                if matched:
                    accepted.add(id(h))
                    matched_kinds.add(kind)
            for (router, plan_kind), plan in plans.items():
                if plan_kind != kind or plan is None:
                    continue
                if not plan.idle(event, raw_state):
                    entered += 1
                    continue
                skipped += 1
                below = {id(h) for r in router.chain_tail for h in r.observers[kind].handlers}
                assert not below & accepted, (router.name, raw_state, event)
    assert refused > checked // 2
    assert skipped > entered
    assert matched_kinds == set(kinds)  # presses and messages that do match were checked
