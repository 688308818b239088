"""Free-text questions answered from the knowledge base, with the source cited."""

from __future__ import annotations

from aiogram import F, Router
from aiogram.filters import StateFilter
from aiogram.filters.callback_data import CallbackData
from aiogram.fsm.context import FSMContext
from aiogram.types import CallbackQuery, Message

from handlers.ui import Choice, TypedChoice, ask, reply_target
from knowledge.search import Entry, KnowledgeBase
from knowledge.sources import cite
from services.texts import t

router = Router(name=__name__)
MAX_QUESTION = 500


class KbCb(CallbackData, prefix="kb"):
    id: str


def render_entry(entry: Entry, lang: str) -> str:
    return t("kb.answer", lang, answer=entry.answer(lang), sources=cite(entry.sources))


@router.message(StateFilter(None), F.chat.type == "private", F.text,
                ~F.text.startswith("/"), flags={"perm": "ask"})
async def question(message: Message, state: FSMContext, kb: KnowledgeBase, lang: str) -> None:
    text = (message.text or "").strip()
    if not text:
        await message.answer(t("common.empty", lang))
        return
    hits = kb.search(text[:MAX_QUESTION], lang, limit=3)
    if hits and hits[0].confident:
        await message.answer(render_entry(hits[0].entry, lang))
        return
    if not hits:
        await message.answer(t("kb.unknown", lang))
        return
    choices = [Choice(h.entry.question(lang), KbCb(id=h.entry.id).pack()) for h in hits]
    await ask(message, state, t("kb.not_sure", lang), choices)


@router.message(StateFilter(None), TypedChoice(KbCb), flags={"perm": "ask"})
@router.callback_query(KbCb.filter(), flags={"perm": "ask"})
async def show_entry(event: Message | CallbackQuery, callback_data: KbCb, kb: KnowledgeBase,
                     lang: str) -> None:
    entry = kb.get(callback_data.id)
    if entry is None:
        if isinstance(event, CallbackQuery):
            await event.answer(t("common.stale_button", lang), show_alert=True)
        return
    target = await reply_target(event)
    await target.answer(render_entry(entry, lang))
