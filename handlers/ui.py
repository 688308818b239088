"""Channel-neutral choices: every button step also accepts its number or its words as text.

A step offering options sends them as numbered inline buttons and remembers them in the
chat's FSM data (``_choices``). :class:`TypedChoice` turns a typed "2" or "english" into the
same ``callback_data`` a button press would give, so one handler serves both (and the Zalo
channel, which has no buttons, later needs no new flows).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from aiogram import Bot
from aiogram.exceptions import TelegramAPIError
from aiogram.filters import Filter
from aiogram.filters.callback_data import CallbackData
from aiogram.fsm.context import FSMContext
from aiogram.fsm.storage.base import BaseStorage, StorageKey
from aiogram.types import (
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
)

from bot.api_session import SharedMarkup
from services.folding import fold
from services.texts import split_text

CHOICES_KEY = "_choices"
MAX_CHOICE_TEXT = 120
_memo: weakref.WeakKeyDictionary[FSMContext, list[list[Any]]] = weakref.WeakKeyDictionary()


async def stored_choices(state: FSMContext) -> list[list[Any]]:
    """Remembered choices, read once per update: every TypedChoice filter asks for them."""
    cached = _memo.get(state)
    if cached is None:
        cached = (await state.get_data()).get(CHOICES_KEY) or []
        _memo[state] = cached
    return cached


@dataclass
class Choice:
    label: str
    data: str
    words: tuple[str, ...] = field(default_factory=tuple)


def keyboard(
    choices: list[Choice], columns: int = 1, numbered: bool = True
) -> InlineKeyboardMarkup:
    labels = tuple((f"{i}. {c.label}" if numbered else c.label, c.data)
                   for i, c in enumerate(choices, 1))
    return _markup(labels, columns)


@lru_cache(maxsize=4096)
def _markup(labels: tuple[tuple[str, str], ...], columns: int) -> InlineKeyboardMarkup:
    """The same buttons are offered again and again (menus, a unit's search answer), and
    each is a validated model: built once. Shared, so never changed after it is made."""
    buttons = [InlineKeyboardButton(text=text, callback_data=data) for text, data in labels]
    rows = [buttons[i:i + columns] for i in range(0, len(buttons), columns)]
    return SharedMarkup(inline_keyboard=rows)


def remembered(choices: list[Choice]) -> list[list[Any]]:
    return [[c.data, fold(c.label), *[fold(w) for w in c.words]] for c in choices]


async def remember(state: FSMContext, choices: list[Choice]) -> None:
    _memo.pop(state, None)
    await state.update_data({CHOICES_KEY: remembered(choices)})


def state_for(
    storage: BaseStorage, bot: Bot, chat_id: int, user_id: int | None = None
) -> FSMContext:
    """The FSM context of another chat (e.g. an approver's), to remember choices sent there."""
    key = StorageKey(bot_id=bot.id, chat_id=chat_id, user_id=user_id or chat_id)
    return FSMContext(storage=storage, key=key)


async def ask(
    target: Message,
    state: FSMContext,
    text: str,
    choices: list[Choice],
    columns: int = 1,
) -> Message:
    """Send ``text`` with numbered buttons and remember them for typed answers."""
    await remember(state, choices)
    return await target.answer(text, reply_markup=keyboard(choices, columns))


def match_choice(text: str, stored: list[list[Any]]) -> str | None:
    folded = fold(text)
    if not folded:
        return None
    if folded.isdigit():
        n = int(folded)
        return stored[n - 1][0] if 1 <= n <= len(stored) else None
    for data, *words in stored:
        if folded in words:
            return data
    return None


class TypedChoice(Filter):
    """Matches a text message that names one of the remembered choices of ``cb``'s kind."""

    def __init__(self, cb: type[CallbackData]) -> None:
        self.cb = cb

    @staticmethod
    def may_match(message: Any, _state: Any = None) -> bool:
        """The test on the text alone: commands and long texts are never a typed choice."""
        text = getattr(message, "text", None)
        return bool(text) and not text.startswith("/") and len(text) <= MAX_CHOICE_TEXT

    async def __call__(self, message: Message, state: FSMContext) -> bool | dict[str, Any]:
        if not self.may_match(message):
            return False
        text = message.text
        stored = await stored_choices(state)
        data = match_choice(text, stored)
        prefix = self.cb.__prefix__
        if data is None or (data != prefix  # a CallbackData without fields packs to its prefix
                            and not data.startswith(prefix + self.cb.__separator__)):
            return False
        try:
            return {"callback_data": self.cb.unpack(data)}
        except (ValueError, TypeError):
            return False


async def reply_target(event: Message | CallbackQuery, *, drop_keyboard: bool = True) -> Message:
    """Acknowledge a press (or a typed choice) and return the message to answer under.

    Pressed keyboards are removed so a stale second press cannot repeat the step.
    """
    if isinstance(event, Message):
        return event
    await event.answer()
    msg = event.message
    if not isinstance(msg, Message):
        raise LookupError("callback without an accessible message")
    if drop_keyboard and msg.reply_markup is not None:
        with contextlib.suppress(TelegramAPIError):  # a concurrent press already did it
            await msg.edit_reply_markup(reply_markup=None)
    return msg


async def end_form(event: Message | CallbackQuery, state: FSMContext
                   ) -> tuple[Message, dict[str, Any]]:
    """The last step of a form: acknowledge it, take the collected data, end the state."""
    target = await reply_target(event)
    data = await state.get_data()
    await state.clear()
    return target, data


async def answer_long(target: Message, text: str, **kwargs: Any) -> list[Message]:
    """Send a text of any length as several messages split on line boundaries."""
    parts = split_text(text)
    sent = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        sent.append(await target.answer(part, **(kwargs if last else {})))
    return sent


def send_cards_after_commit(post: Any, bot: Bot, storage: BaseStorage,
                            cards: list[tuple[int, str, list[Choice]]], what: str) -> None:
    """Decision cards for other people (approvers), sent once the update commits. Each
    card's choices are remembered first: the approver may type the answer as soon as the
    card shows. An unreachable chat is logged and the others still get theirs."""
    async def send() -> None:
        for chat_id, text, choices in cards:
            await remember(state_for(storage, bot, chat_id), choices)
            try:
                await bot.send_message(chat_id, text, reply_markup=keyboard(choices, columns=2))
            except TelegramAPIError:
                logging.getLogger(__name__).warning("chat %s unreachable for %s", chat_id, what)

    post.add(send)
