"""/start, /help, /lang, /me, /cancel: the entry points every person sees."""

from __future__ import annotations

from aiogram import F, Router
from aiogram.filters import Command, CommandStart
from aiogram.filters.callback_data import CallbackData
from aiogram.fsm.context import FSMContext
from aiogram.types import (
    CallbackQuery,
    KeyboardButton,
    Message,
    ReplyKeyboardMarkup,
    ReplyKeyboardRemove,
)
from sqlalchemy.ext.asyncio import AsyncSession

from bot.commands import CommandMenu
from bot.config import Settings
from handlers.ui import Choice, TypedChoice, ask, reply_target
from services import registration, roles
from services.audit import Actor
from services.folding import fold
from services.people import Who
from services.texts import t

router = Router(name=__name__)

LANG_WORDS = {"vi": ("tieng viet", "vietnamese", "vi"), "en": ("english", "tieng anh", "en")}


class LangCb(CallbackData, prefix="lang"):
    code: str


def contact_keyboard(lang: str) -> ReplyKeyboardMarkup:
    other = "en" if lang == "vi" else "vi"
    return ReplyKeyboardMarkup(
        keyboard=[
            [KeyboardButton(text=t("btn.share_contact", lang), request_contact=True)],
            [KeyboardButton(text=t(f"btn.lang_{other}", lang))],
        ],
        resize_keyboard=True,
        is_persistent=True,
        input_field_placeholder=t("btn.phone_placeholder", lang),
    )


def profile_params(who: Who) -> dict[str, object]:
    p = who.person
    assert p is not None
    return {
        "name": p.full_name, "position": p.position, "phone": p.phone,
        "unit": who.unit.name if who.unit else None, "role": p.role,
    }


@router.message(CommandStart(), flags={"perm": "start"})
async def start(
    message: Message, state: FSMContext, session: AsyncSession, who: Who, lang: str,
    settings: Settings, actor: Actor, menu: CommandMenu, raw_state: str | None = None,
) -> None:
    if raw_state is not None:
        await state.clear()
    person_is_new = False
    if who.person is None:
        person = await registration.bootstrap_admin(session, who.identity, settings.admin_ids,
                                                    actor)
        if person is not None:
            who, person_is_new = Who(who.identity, person, None), True
    if who.role is not None:
        await message.answer(t("start.welcome_back", lang, **profile_params(who)),
                             reply_markup=ReplyKeyboardRemove())
        if person_is_new:
            await menu.set_for_chat(message.chat.id, who.role)
        return
    pending = await registration.pending_request_of(session, who.identity)
    if pending is not None:
        await message.answer(t("reg.still_pending", lang, id=pending.id))
        return
    await message.answer(t("start.greeting", lang, bot_name=t("common.bot_name", lang)),
                         reply_markup=contact_keyboard(lang))


@router.message(Command("help"), flags={"perm": "help"})
async def help_(message: Message, who: Who, lang: str) -> None:
    cmds = roles.commands_for(who.role)
    await message.answer(t("help.text", lang, commands=cmds, role=who.role))


@router.message(Command("lang"), flags={"perm": "lang"})
async def lang_menu(message: Message, state: FSMContext, lang: str) -> None:
    choices = [
        Choice(t("btn.lang_vi", lang), LangCb(code="vi").pack(), LANG_WORDS["vi"]),
        Choice(t("btn.lang_en", lang), LangCb(code="en").pack(), LANG_WORDS["en"]),
    ]
    await ask(message, state, t("lang.choose", lang), choices, columns=2)


def _typed_lang(text: str) -> str | None:
    folded = fold(text)
    for code, words in LANG_WORDS.items():
        if folded in words:
            return code
    return None


@router.callback_query(LangCb.filter(), flags={"perm": "lang"})
@router.message(TypedChoice(LangCb), flags={"perm": "lang"})
@router.message(F.text.func(_typed_lang).as_("typed_lang"), flags={"perm": "lang"})
async def set_lang(
    event: Message | CallbackQuery, session: AsyncSession, who: Who, actor: Actor,
    menu: CommandMenu, callback_data: LangCb | None = None, typed_lang: str | None = None,
) -> None:
    code = callback_data.code if callback_data else typed_lang
    if code not in LANG_WORDS:
        return
    target = await reply_target(event)
    await registration.set_language(session, who.identity, who.person, code, actor)
    if who.role is not None:
        await target.answer(t("lang.changed", code), reply_markup=ReplyKeyboardRemove())
        await menu.set_for_chat(target.chat.id, who.role)
    else:
        await target.answer(t("lang.changed", code), reply_markup=contact_keyboard(code))


@router.message(Command("me"), flags={"perm": "me"})
async def me(message: Message, who: Who, lang: str) -> None:
    await message.answer(t("me.profile", lang, **profile_params(who)))


@router.message(Command("cancel"), flags={"perm": "cancel"})
@router.message(F.text.func(lambda s: fold(s) in {"huy", "cancel", "thoat"}),
                flags={"perm": "cancel"})
async def cancel(message: Message, state: FSMContext, lang: str, who: Who) -> None:
    had = await state.get_state()
    await state.clear()
    markup = ReplyKeyboardRemove() if who.role else contact_keyboard(lang)
    await message.answer(t("common.cancelled" if had else "common.nothing_to_cancel", lang),
                         reply_markup=markup)
