"""Broadcasts by operators in chat: compose, preview, audience, confirm, send or schedule,
a live progress message with pause / resume / cancel."""

from __future__ import annotations

from aiogram import Router
from aiogram.filters.callback_data import CallbackData
from aiogram.types import InlineKeyboardButton, InlineKeyboardMarkup

from services import broadcasts
from services.texts import t

router = Router(name=__name__)


class BcAct(CallbackData, prefix="bca"):
    """A button on a progress message: pause / resume / cancel broadcast ``id``."""

    action: str
    id: int


def progress_view(p: broadcasts.Progress, rate: float, lang: str
                  ) -> tuple[str, InlineKeyboardMarkup | None]:
    """Text and buttons of the live progress message (also used by the sender's edits)."""
    text = t("bc.progress", lang, p=p, rate=rate)
    buttons = []
    if p.state == "sending":
        buttons.append(InlineKeyboardButton(text=t("bc.btn.pause", lang),
                                            callback_data=BcAct(action="pause", id=p.id).pack()))
    if p.state == "paused":
        buttons.append(InlineKeyboardButton(text=t("bc.btn.resume", lang),
                                            callback_data=BcAct(action="resume", id=p.id).pack()))
    if p.state in ("sending", "paused", "scheduled"):
        buttons.append(InlineKeyboardButton(text=t("bc.btn.stop", lang),
                                            callback_data=BcAct(action="cancel", id=p.id).pack()))
    return text, InlineKeyboardMarkup(inline_keyboard=[buttons]) if buttons else None
