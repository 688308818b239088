"""Verification: shared contact → staff list match, or a request form for an approver."""

from __future__ import annotations

import re

from aiogram import Bot, F, Router
from aiogram.filters import StateFilter
from aiogram.filters.callback_data import CallbackData
from aiogram.fsm.context import FSMContext
from aiogram.fsm.state import State, StatesGroup
from aiogram.fsm.storage.base import BaseStorage
from aiogram.types import CallbackQuery, Message, ReplyKeyboardRemove
from sqlalchemy.ext.asyncio import AsyncSession

from bot.commands import CommandMenu
from bot.config import Settings
from bot.middlewares import PostCommit
from handlers.approvals import notify_approvers
from handlers.ui import Choice, TypedChoice, ask, reply_target
from services import registration
from services.audit import Actor
from services.folding import clean_name
from services.people import Who, person_by_phone
from services.phones import try_normalize_phone
from services.registration import ContactOutcome
from services.texts import t
from services.units import UnitItem, get_unit, resolve_old_address, search_units

router = Router(name=__name__)

PHONE_LIKE = re.compile(r"^\s*\+?[\d\s.\-()]{9,20}\s*$")
NAME_OK = re.compile(r"^[^\x00-\x1f\x7f]{2,100}$")
UNIT_PAGE = 8


class Reg(StatesGroup):
    name = State()
    unit = State()
    confirm = State()


class UnitCb(CallbackData, prefix="ru"):
    code: str


class ConfirmCb(CallbackData, prefix="rc"):
    action: str  # send | edit | cancel


async def _start_request(message: Message, state: FSMContext, lang: str, *, phone: str | None,
                         phone_verified: bool, full_name: str | None = None) -> None:
    await state.set_state(Reg.name)
    await state.set_data({"phone": phone, "phone_verified": phone_verified})
    if full_name:
        await state.update_data(full_name=full_name)
    await message.answer(t("reg.ask_name", lang), reply_markup=ReplyKeyboardRemove())


@router.message(F.contact, flags={"perm": "register"})
async def on_contact(
    message: Message, state: FSMContext, session: AsyncSession, who: Who, lang: str,
    actor: Actor, menu: CommandMenu,
) -> None:
    if who.role is not None:
        await message.answer(t("reg.already_verified", lang), reply_markup=ReplyKeyboardRemove())
        return
    contact = message.contact
    assert contact is not None and message.from_user is not None
    result = await registration.verify_by_contact(
        session, who.identity, str(message.from_user.id),
        None if contact.user_id is None else str(contact.user_id), contact.phone_number, actor,
    )
    if result.outcome is ContactOutcome.forged:
        await message.answer(t("reg.forged", lang))
    elif result.outcome is ContactOutcome.bad_phone:
        await message.answer(t("reg.bad_phone", lang))
    elif result.outcome in (ContactOutcome.verified, ContactOutcome.already):
        await state.clear()
        person = result.person
        assert person is not None
        unit = await registration.unit_name(session, person.unit_code)
        await message.answer(
            t("reg.verified", lang, name=person.full_name, unit=unit, position=person.position,
              role=person.role),
            reply_markup=ReplyKeyboardRemove(),
        )
        await menu.set_for_chat(message.chat.id, person.role)
    elif result.outcome is ContactOutcome.taken:
        await message.answer(t("reg.phone_taken", lang))
        await _start_request(message, state, lang, phone=result.phone, phone_verified=True)
    else:
        await message.answer(t("reg.not_on_list", lang, phone=result.phone))
        await _start_request(message, state, lang, phone=result.phone, phone_verified=True)


@router.message(StateFilter(None), F.text.regexp(PHONE_LIKE), flags={"perm": "register"})
async def on_typed_phone(
    message: Message, state: FSMContext, session: AsyncSession, who: Who, lang: str
) -> None:
    """Channels without contact sharing: a typed number is a claim an approver must check."""
    if who.role is not None:
        return
    phone = try_normalize_phone(message.text)
    if phone is None:
        await message.answer(t("reg.bad_phone", lang))
        return
    staff = await person_by_phone(session, phone)
    await message.answer(t("reg.typed_phone", lang, phone=phone))
    await _start_request(message, state, lang, phone=phone, phone_verified=False,
                         full_name=staff.full_name if staff else None)


@router.message(Reg.name, F.text, flags={"perm": "register"})
async def on_name(message: Message, state: FSMContext, lang: str) -> None:
    name = clean_name(message.text or "")
    if not NAME_OK.match(name) or len(name.split()) < 2:
        await message.answer(t("reg.bad_name", lang))
        return
    await state.update_data(full_name=name)
    await state.set_state(Reg.unit)
    await message.answer(t("reg.ask_unit", lang))


@router.message(Reg.unit, TypedChoice(UnitCb), flags={"perm": "register"})
@router.callback_query(Reg.unit, UnitCb.filter(), flags={"perm": "register"})
async def on_unit_chosen(
    event: Message | CallbackQuery, callback_data: UnitCb, state: FSMContext,
    session: AsyncSession, lang: str,
) -> None:
    target = await reply_target(event)
    unit = await registration.unit_name(session, callback_data.code)
    if unit is None:
        await target.answer(t("reg.unit_not_found", lang))
        return
    await state.update_data(unit_code=callback_data.code, unit_name=unit)
    await state.set_state(Reg.confirm)
    data = await state.get_data()
    choices = [
        Choice(t("btn.send_request", lang), ConfirmCb(action="send").pack(), ("gui", "send")),
        Choice(t("btn.edit", lang), ConfirmCb(action="edit").pack(), ("sua", "edit")),
        Choice(t("btn.cancel", lang), ConfirmCb(action="cancel").pack(), ("huy", "cancel")),
    ]
    await ask(target, state, t("reg.confirm", lang, name=data["full_name"], unit=unit,
                               phone=data.get("phone"),
                               phone_verified=data.get("phone_verified")), choices)


def unit_choices(items: list[UnitItem]) -> list[Choice]:
    """One choice per target unit; a former unit points to the unit it became."""
    seen: set[str] = set()
    out = []
    for u in items:
        if not u.active and not u.merged_into:
            continue  # a former district with no single successor cannot be chosen
        target = u.code if u.active else u.merged_into
        if target in seen:
            continue
        seen.add(target)
        label = u.name if u.active else f"{u.name} → {u.merged_into_name}"
        if u.province_name:
            label = f"{label} — {u.province_name}"
        out.append(Choice(label, UnitCb(code=target).pack()))
    return out


@router.message(Reg.unit, F.text, flags={"perm": "register"})
async def on_unit_query(message: Message, state: FSMContext, session: AsyncSession,
                        lang: str) -> None:
    query = (message.text or "").strip()[:200]
    found = await search_units(session, query, include_defunct=True, limit=UNIT_PAGE)
    items = list(found.items)
    note = None
    if not items:
        old = resolve_old_address(query)
        new_unit = await get_unit(session, old.new_ward_code) if old else None
        if old is not None and new_unit is not None:
            note = t("reg.old_unit_note", lang, old=old.old_name, new=new_unit.name)
            items = [UnitItem(new_unit.code, new_unit.name, new_unit.kind,
                              new_unit.province_code, old.new_province_name, True, None, None)]
    if not items:
        await message.answer(t("reg.unit_none", lang, query=query))
        return
    text = t("reg.pick_unit", lang, total=found.total, shown=len(items), note=note)
    await ask(message, state, text, unit_choices(items))


@router.message(Reg.confirm, TypedChoice(ConfirmCb), flags={"perm": "register"})
@router.callback_query(Reg.confirm, ConfirmCb.filter(), flags={"perm": "register"})
async def on_confirm(
    event: Message | CallbackQuery, callback_data: ConfirmCb, state: FSMContext,
    session: AsyncSession, who: Who, lang: str, actor: Actor, bot: Bot, settings: Settings,
    fsm_storage: BaseStorage, post: PostCommit,
) -> None:
    target = await reply_target(event)
    data = await state.get_data()
    if callback_data.action == "cancel":
        await state.clear()
        await target.answer(t("common.cancelled", lang))
        return
    if callback_data.action == "edit":
        await _start_request(target, state, lang, phone=data.get("phone"),
                             phone_verified=bool(data.get("phone_verified")))
        return
    if "unit_code" not in data or "full_name" not in data:
        await state.clear()
        await target.answer(t("common.expired", lang))
        return
    req = await registration.create_request(
        session, who.identity, full_name=data["full_name"], unit_code=data["unit_code"],
        phone=data.get("phone"), phone_verified=bool(data.get("phone_verified")), actor=actor,
    )
    await state.clear()
    sent = await notify_approvers(session, bot, fsm_storage, settings, post, req, who)
    await target.answer(t("reg.request_sent", lang, id=req.id, notified=sent))


@router.message(Reg.confirm, flags={"perm": "register"})
async def on_confirm_other(message: Message, lang: str) -> None:
    await message.answer(t("common.use_buttons", lang))
