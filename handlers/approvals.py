"""Approvers decide verification requests: cards with Approve/Reject, and /pending."""

from __future__ import annotations

import logging

from aiogram import Bot, Router
from aiogram.exceptions import TelegramAPIError
from aiogram.filters import Command
from aiogram.filters.callback_data import CallbackData
from aiogram.fsm.context import FSMContext
from aiogram.fsm.storage.base import BaseStorage
from aiogram.types import CallbackQuery, Message, ReplyKeyboardRemove
from sqlalchemy.ext.asyncio import AsyncSession

from bot.commands import CommandMenu
from bot.config import Settings
from bot.middlewares import PostCommit
from db.models import RegistrationRequest
from handlers.ui import (
    Choice,
    TypedChoice,
    keyboard,
    remember,
    reply_target,
    send_cards_after_commit,
)
from services import registration
from services.audit import Actor
from services.people import Who
from services.registration import DecideOutcome
from services.texts import norm_lang, t

router = Router(name=__name__)
log = logging.getLogger(__name__)
PENDING_PAGE = 10


class DecideCb(CallbackData, prefix="rd"):
    action: str  # ok | no
    req: int


def decision_choices(req_id: int, lang: str) -> list[Choice]:
    return [
        Choice(t("btn.approve", lang), DecideCb(action="ok", req=req_id).pack(),
               ("duyet", "dong y", "approve")),
        Choice(t("btn.reject", lang), DecideCb(action="no", req=req_id).pack(),
               ("tu choi", "reject")),
    ]


async def card_text(session: AsyncSession, req: RegistrationRequest, lang: str) -> str:
    unit = await registration.unit_name(session, req.unit_code)
    return t("approve.card", lang, id=req.id, name=req.full_name, phone=req.phone,
             phone_verified=req.phone_verified, unit=unit, at=req.created_at)


async def notify_approvers(
    session: AsyncSession, bot: Bot, storage: BaseStorage, settings: Settings, post: PostCommit,
    req: RegistrationRequest, requester: Who,
) -> int:
    """Queue the request card for every approver, sent once the request is committed;
    returns how many approvers there are."""
    cards = []
    for ident in await registration.approvers_for(session, req.unit_code, settings.admin_ids):
        if ident.channel != "telegram" or ident.id == requester.identity.id:
            continue
        lang = norm_lang(ident.lang or settings.default_lang)
        cards.append((int(ident.external_id), await card_text(session, req, lang),
                      decision_choices(req.id, lang)))

    send_cards_after_commit(post, bot, storage, cards, f"registration request {req.id}")
    return len(cards)


@router.message(Command("pending"), flags={"perm": "approve_registration"})
async def pending(message: Message, state: FSMContext, session: AsyncSession, who: Who,
                  lang: str) -> None:
    assert who.person is not None
    reqs = await registration.pending_for(session, who.person)
    if not reqs:
        await message.answer(t("approve.none_pending", lang))
        return
    await message.answer(t("approve.pending_header", lang, total=len(reqs),
                           shown=min(len(reqs), PENDING_PAGE)))
    for req in reqs[:PENDING_PAGE]:
        choices = decision_choices(req.id, lang)
        await message.answer(await card_text(session, req, lang),
                             reply_markup=keyboard(choices, columns=2))
    await remember(state, decision_choices(reqs[0].id, lang))


@router.message(TypedChoice(DecideCb), flags={"perm": "approve_registration"})
@router.callback_query(DecideCb.filter(), flags={"perm": "approve_registration"})
async def decide(
    event: Message | CallbackQuery, callback_data: DecideCb, session: AsyncSession, who: Who,
    lang: str, actor: Actor, bot: Bot, settings: Settings, menu: CommandMenu, post: PostCommit,
) -> None:
    result = await registration.decide(
        session, callback_data.req, who.person, callback_data.action == "ok", actor
    )
    if result.outcome in (DecideOutcome.not_found, DecideOutcome.forbidden):
        key = "approve.not_found" if result.outcome is DecideOutcome.not_found else \
            "approve.forbidden"
        if isinstance(event, CallbackQuery):
            await event.answer(t(key, lang), show_alert=True)
        else:
            await event.answer(t(key, lang))
        return
    req = result.request
    assert req is not None
    if result.outcome is DecideOutcome.already:
        if isinstance(event, CallbackQuery):
            await event.answer(t("approve.already", lang, status=req.status), show_alert=True)
        else:
            await event.answer(t("approve.already", lang, status=req.status))
        return
    target = await reply_target(event, drop_keyboard=False)
    outcome = t("approve.done_ok" if result.outcome is DecideOutcome.approved
                else "approve.done_no", lang, by=who.person.full_name if who.person else "")
    text = await card_text(session, req, lang) + "\n\n" + outcome
    if isinstance(event, CallbackQuery):
        try:
            await target.edit_text(text, reply_markup=None)
        except TelegramAPIError:
            await target.answer(outcome)
    else:
        await target.answer(outcome)
    requester = result.requester
    if requester is None or requester.channel != "telegram":
        return
    rlang = norm_lang(requester.lang or settings.default_lang)
    chat_id = int(requester.external_id)
    if result.outcome is DecideOutcome.approved:
        unit = await registration.unit_name(session, req.unit_code)
        told = t("reg.approved", rlang, id=req.id, unit=unit)
    else:
        told = t("reg.rejected", rlang, id=req.id)
    role = result.person.role if result.person else None

    async def tell_requester() -> None:
        await bot.send_message(chat_id, told, reply_markup=ReplyKeyboardRemove())
        if role is not None:
            await menu.set_for_chat(chat_id, role)

    post.add(tell_requester)
