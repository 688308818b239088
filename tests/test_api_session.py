"""The direct JSON body carries exactly the fields and values aiogram's own FormData would."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

import pytest
from aiogram import Bot
from aiogram.client.default import DefaultBotProperties
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.enums import ParseMode
from aiogram.methods import (
    AnswerCallbackQuery,
    CopyMessage,
    EditMessageText,
    SendDocument,
    SendMessage,
    SetMyCommands,
)
from aiogram.types import (
    BotCommand,
    BotCommandScopeChat,
    BufferedInputFile,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    ReplyParameters,
)

from bot.api_session import JsonBodySession, SharedMarkup

KB = InlineKeyboardMarkup(inline_keyboard=[[
    InlineKeyboardButton(text="Đồng ý <x> & \"y\"", callback_data="ap:1:ok")]])
METHODS = [
    SendMessage(chat_id=1, text="Xin chào <b>Bé</b> & 100%", reply_markup=KB,
                protect_content=True, reply_parameters=ReplyParameters(message_id=3)),
    SendMessage(chat_id=-100123, text="x", message_thread_id=7, disable_notification=False),
    AnswerCallbackQuery(callback_query_id="q1", text="Đã nhận", show_alert=True),
    EditMessageText(chat_id=1, message_id=2, text="t", parse_mode=None),
    CopyMessage(chat_id=5, from_chat_id=6, message_id=7),
    SetMyCommands(commands=[BotCommand(command="start", description="Bắt đầu")],
                  scope=BotCommandScopeChat(chat_id=9), language_code="vi"),
]


@pytest.fixture
def bot() -> Bot:
    return Bot("1:test", session=JsonBodySession(), default=DefaultBotProperties(
        parse_mode=ParseMode.HTML, link_preview_is_disabled=True))


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__api_method__)
def test_same_fields_as_aiogram_form(bot: Bot, method) -> None:
    session = bot.session
    assert isinstance(session, JsonBodySession)
    form = AiohttpSession.build_form_data(session, bot, method)
    theirs = dict(parse_qsl(form()._value.decode(), keep_blank_values=True))
    ours = json.loads(session.encode(bot, method))
    assert ours == theirs and all(isinstance(v, str) for v in ours.values())
    assert session.build_form_data(bot, method).content_type == "application/json"


def test_a_shared_keyboard_is_encoded_once_and_the_same(bot: Bot) -> None:
    from handlers.ui import Choice, keyboard

    shared = keyboard([Choice("Phường Bến Thành — TP. Hồ Chí Minh", "su:26734"),
                       Choice("Xã <b> & \"c\"", "su:1")])
    assert isinstance(shared, SharedMarkup)
    plain = InlineKeyboardMarkup(inline_keyboard=shared.inline_keyboard)
    bodies = [json.loads(bot.session.encode(bot, SendMessage(chat_id=1, text="t",
                                                              reply_markup=m)))
              for m in (shared, shared, plain)]
    assert bodies[0] == bodies[1] == bodies[2]
    assert json.loads(bodies[0]["reply_markup"])["inline_keyboard"][1][0]["text"] == \
        "2. Xã <b> & \"c\""
    assert shared._encoded == bodies[0]["reply_markup"]
    with pytest.raises(ValueError):  # frozen: what was encoded can not change
        shared.inline_keyboard = []


def test_a_file_goes_through_aiogram_multipart(bot: Bot) -> None:
    doc = SendDocument(chat_id=1, document=BufferedInputFile(b"abc", "a.csv"))
    assert bot.session.encode(bot, doc) is None


def test_answers_lose_only_the_returned_message_formatting_and_keyboard(bot: Bot) -> None:
    from aiogram.methods.base import Response
    from aiogram.types import Message

    from bot.api_session import loads_without_own_formatting

    sent = {"message_id": 9, "date": 0, "chat": {"id": 1, "type": "private"}, "text": "Đậm",
            "entities": [{"type": "bold", "offset": 0, "length": 3}],
            "reply_markup": KB.model_dump(exclude_none=True)}
    data = loads_without_own_formatting(json.dumps({"ok": True, "result": sent}))
    msg = Response[Message].model_validate(data, context={"bot": bot}).result
    assert msg.message_id == 9 and msg.chat.id == 1 and msg.text == "Đậm"
    assert msg.entities is None and msg.reply_markup is None
    batch = [{"update_id": 1, "message": sent}]  # lists (getUpdates) are left alone
    kept = loads_without_own_formatting(json.dumps({"ok": True, "result": batch}))[
        "result"][0]["message"]
    assert kept["entities"] == sent["entities"] and kept["reply_markup"] == sent["reply_markup"]
    assert loads_without_own_formatting('{"ok": false, "error_code": 400}')["error_code"] == 400
    assert isinstance(bot.session, JsonBodySession)
    assert bot.session.json_loads is loads_without_own_formatting
