"""Last router: anything no feature claimed gets a polite pointer instead of silence."""

from __future__ import annotations

from aiogram import F, Router
from aiogram.types import CallbackQuery, Message

from services.people import Who
from services.texts import t

router = Router(name=__name__)
MAX_TEXT = 4096


@router.callback_query()
async def stale_button(callback: CallbackQuery, lang: str) -> None:
    await callback.answer(t("common.stale_button", lang), show_alert=True)


@router.message(F.chat.type == "private")
async def anything(message: Message, who: Who | None, lang: str) -> None:
    if who is None or who.role is None:
        await message.answer(t("common.not_verified", lang))
    elif message.text is not None and not message.text.strip():
        await message.answer(t("common.empty", lang))
    else:
        await message.answer(t("common.unknown", lang))
