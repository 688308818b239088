"""The direct form encoding sends exactly the bytes aiogram's own FormData would."""

from __future__ import annotations

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

from bot.api_session import FormSession

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
    return Bot("1:test", session=FormSession(), default=DefaultBotProperties(
        parse_mode=ParseMode.HTML, link_preview_is_disabled=True))


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__api_method__)
def test_same_bytes_as_aiogram_form(bot: Bot, method) -> None:
    session = bot.session
    assert isinstance(session, FormSession)
    form = AiohttpSession.build_form_data(session, bot, method)
    theirs = form()  # no file: aiohttp's urlencoded payload
    assert session.encode(bot, method) == theirs._value


def test_a_file_goes_through_aiogram_multipart(bot: Bot) -> None:
    doc = SendDocument(chat_id=1, document=BufferedInputFile(b"abc", "a.csv"))
    assert bot.session.encode(bot, doc) is None


def test_answers_lose_only_the_returned_message_formatting_and_keyboard(bot: Bot) -> None:
    import json

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
    assert isinstance(bot.session, FormSession)
    assert bot.session.json_loads is loads_without_own_formatting
