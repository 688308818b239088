"""aiogram's aiohttp session with the request body encoded directly, as JSON.

Why: almost every call the bot makes (sendMessage, editMessageText, answerCallbackQuery) has
no file, yet aiogram builds an aiohttp ``FormData`` for each, which aiohttp then turns into
``application/x-www-form-urlencoded`` bytes through several layers (a twentieth of the bot's
CPU per update), and percent-encoding Vietnamese text byte by byte in Python cost as much
again: 0.17 ms for a search answer, against 0.03 ms for ``json.dumps``. The Bot API takes a
JSON body for any call without a file; the fields and their values are exactly those of
aiogram's form (strings, objects as JSON text), so Telegram reads the same parameters. Calls
with a file (sendDocument, sendPhoto) still go through aiogram's multipart path unchanged.
Answers are parsed without the returned message's own formatting and keyboard (see
:func:`loads_without_own_formatting`).
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from aiogram import Bot
from aiogram.client.default import Default
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.methods import TelegramMethod
from aiogram.types import InlineKeyboardMarkup, InputFile
from aiohttp.payload import BytesPayload
from pydantic import ConfigDict, PrivateAttr

_JSON = "application/json"


def loads_without_own_formatting(content: str) -> Any:
    """JSON of a Bot API answer, minus the ``entities`` and the keyboard of the message it
    returns.

    Why: those are the formatting of the bot's own HTML and the buttons it just sent, which
    the bot never reads back, and aiogram makes a model of each one: a status message with
    thirty bold spans cost 0.35 ms to parse, a tenth of the update, and a search answer's
    buttons a model per button. Updates (incoming messages, whose entities the relay copies
    and whose keyboards a button press clears) are never read through this session:
    polling parses them itself."""
    data = json.loads(content)
    result = data.get("result") if isinstance(data, dict) else None
    if isinstance(result, dict):
        result.pop("entities", None)
        result.pop("caption_entities", None)
        result.pop("reply_markup", None)
    return data


class SharedMarkup(InlineKeyboardMarkup):
    """An inline keyboard built once and sent many times (``handlers/ui.keyboard``: menus,
    a unit's search answer), never changed after it is made: its JSON is encoded on the
    first send and reused. A search answer's eight buttons cost 0.3 ms to encode, as much
    as the rest of the request."""

    model_config = ConfigDict(frozen=True)
    _encoded: str | None = PrivateAttr(default=None)


class JsonBodySession(AiohttpSession):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("json_loads", loads_without_own_formatting)
        super().__init__(**kwargs)
        self._defaults: dict[str, Any] = {}
        self._defaults_of: Any = None  # the bot's DefaultBotProperties they were made from

    def _default(self, bot: Bot, value: Default) -> Any:
        """A bot default as sent (``link_preview_options`` is a model dumped to JSON on
        every call otherwise); a bot's defaults never change after it is made."""
        if self._defaults_of is not bot.default:
            self._defaults, self._defaults_of = {}, bot.default
        if value.name not in self._defaults:
            prepared = self.prepare_value(value, bot=bot, files={})
            self._defaults[value.name] = (prepared.value if isinstance(prepared, Enum)
                                          else prepared)
        return self._defaults[value.name]

    def encode(self, bot: Bot, method: TelegramMethod[Any]) -> bytes | None:
        """The fields of aiogram's form as a JSON object, or None when a file is attached."""
        files: dict[str, InputFile] = {}
        fields: dict[str, Any] = {}
        shared = getattr(method, "reply_markup", None)
        if not isinstance(shared, SharedMarkup):
            shared = None
        dumped = method.model_dump(warnings=False, exclude={"reply_markup"} if shared else None)
        for key, value in dumped.items():
            if value is None:
                continue
            if isinstance(value, Default):  # parse_mode, link preview: fixed per bot
                value = self._default(bot, value)
            else:
                value = self.prepare_value(value, bot=bot, files=files)
                if isinstance(value, Enum):
                    value = value.value
            if value:  # aiogram leaves out empty values too
                fields[key] = value
        if shared is not None:
            if shared._encoded is None:
                shared._encoded = self.prepare_value(shared, bot=bot, files=files)
            fields["reply_markup"] = shared._encoded
        return None if files else json.dumps(fields, ensure_ascii=False).encode()

    def build_form_data(self, bot: Bot, method: TelegramMethod[Any]) -> Any:
        """What aiogram's own ``make_request`` posts: the JSON bytes, or (a file is attached)
        aiogram's multipart form."""
        body = self.encode(bot, method)
        if body is None:
            return super().build_form_data(bot, method)
        return BytesPayload(body, content_type=_JSON)
