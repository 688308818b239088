"""Free-text questions answered from the knowledge base, with the source cited."""

from __future__ import annotations

from aiogram import F, Router
from aiogram.filters import StateFilter
from aiogram.filters.callback_data import CallbackData
from aiogram.fsm.context import FSMContext
from aiogram.types import CallbackQuery, Message
from sqlalchemy.ext.asyncio import AsyncSession

from handlers.tickets import start_form
from handlers.ui import Choice, TypedChoice, ask, reply_target
from knowledge.search import Entry, KnowledgeBase
from knowledge.sources import cite
from services import roles
from services.people import Who
from services.texts import t

router = Router(name=__name__)
MAX_QUESTION = 500


class KbCb(CallbackData, prefix="kb"):
    id: str


class KbTicketCb(CallbackData, prefix="kt"):
    pass


def render_entry(entry: Entry, lang: str) -> str:
    return t("kb.answer", lang, answer=entry.answer(lang), sources=cite(entry.sources))


async def answer_question(message: Message, text: str, state: FSMContext, kb: KnowledgeBase,
                          lang: str, who: Who | None) -> None:
    """Answer from the knowledge base; when unsure, the closest entries and a ticket offer."""
    text = text.strip()
    if not text:
        await message.answer(t("common.empty", lang))
        return
    hits = kb.search(text[:MAX_QUESTION], lang, limit=3)
    if hits and hits[0].confident:
        await message.answer(render_entry(hits[0].entry, lang))
        return
    choices = [Choice(h.entry.question(lang), KbCb(id=h.entry.id).pack()) for h in hits]
    can_report = who is not None and roles.allowed(who.role, "ticket")
    if can_report:  # not sure: offer to hand the question to support as a ticket
        await state.update_data(kb_question=text[:MAX_QUESTION])
        choices.append(Choice(t("btn.kb_ticket", lang), KbTicketCb().pack(),
                              ("tao phieu", "ho tro", "ticket")))
    if not choices:
        await message.answer(t("kb.unknown", lang))
        return
    await ask(message, state, t("kb.not_sure" if hits else "kb.unknown_offer", lang), choices)


@router.message(StateFilter(None), TypedChoice(KbTicketCb), flags={"perm": "ticket"})
@router.callback_query(KbTicketCb.filter(), flags={"perm": "ticket"})
async def to_ticket(event: Message | CallbackQuery, state: FSMContext, session: AsyncSession,
                    lang: str) -> None:
    target = await reply_target(event)
    question_text = (await state.get_data()).get("kb_question")
    await start_form(target, state, session, lang, summary=question_text)


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


# Last in the router: a typed option number ("1" under the suggestions) is taken by the
# TypedChoice handlers above before it could be read as a new question.
@router.message(StateFilter(None), F.chat.type == "private", F.text,
                ~F.text.startswith("/"), flags={"perm": "ask"})
async def question(message: Message, state: FSMContext, kb: KnowledgeBase, lang: str,
                   who: Who | None) -> None:
    await answer_question(message, message.text or "", state, kb, lang, who)
