"""Account requests in chat: /request (a form with a summary and a confirm step), /requests
(mine and their states), /approvals (Approve/Reject cards; reject asks for a reason) and
/catalog (operators tick the checklist of e-ID code and domain requests and record the
outcome). Every button step also accepts its number or words typed (TypedChoice)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiogram import Bot, F, Router
from aiogram.exceptions import TelegramAPIError
from aiogram.filters import Command
from aiogram.filters.callback_data import CallbackData
from aiogram.fsm.context import FSMContext
from aiogram.fsm.state import State, StatesGroup
from aiogram.fsm.storage.base import BaseStorage
from aiogram.types import BufferedInputFile, CallbackQuery, Message
from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.config import Settings
from bot.middlewares import PostCommit
from db.models import Person, ProvisioningRequest, ProvKind, ProvState, System, Unit
from handlers.ui import (
    Choice,
    TypedChoice,
    answer_long,
    ask,
    end_form,
    keyboard,
    remember,
    reply_target,
    send_cards_after_commit,
)
from services import bulk_provision, imports
from services import provisioning as prov
from services.audit import Actor
from services.directory import DirectoryUnavailable, LdapDirectory
from services.folding import fold
from services.people import Who
from services.phones import try_normalize_phone
from services.texts import norm_lang, t
from services.units import search_units

router = Router(name=__name__)
log = logging.getLogger(__name__)
STAFF_PAGE = 8
PERSONAL = (ProvKind.email, ProvKind.system_account, ProvKind.password_reset,
            ProvKind.deprovision)


class ProvForm(StatesGroup):
    kind = State()
    unit = State()
    who = State()
    staff = State()
    system = State()
    role = State()
    domain = State()
    keep = State()
    confirm = State()


class ProvReason(StatesGroup):
    text = State()


class ProvOutcome(StatesGroup):
    text = State()


class KindCb(CallbackData, prefix="pk"):
    kind: str


class UnitPickCb(CallbackData, prefix="pu"):
    code: str


class ForCb(CallbackData, prefix="pf"):
    who: str  # me | staff


class StaffCb(CallbackData, prefix="pp"):
    person: int


class SysCb(CallbackData, prefix="py"):
    code: str


class RoleCb(CallbackData, prefix="pr"):
    role: str


class KeepCb(CallbackData, prefix="po"):
    keep: int


class SendCb(CallbackData, prefix="pc"):
    action: str  # send | cancel


class DecideCb(CallbackData, prefix="pd"):
    action: str  # ok | no
    req: int


class CheckCb(CallbackData, prefix="px"):
    req: int
    item: str  # a checklist item, or "_rec" to record the outcome


def _is_admin(who: Who) -> bool:
    return who.role in ("unit_admin", "dtc_admin")


async def _answer(event: Message | CallbackQuery, text: str) -> None:
    if isinstance(event, CallbackQuery):
        await event.answer(text, show_alert=True)
    else:
        await event.answer(text)


# --- the request form ---------------------------------------------------------------------


@router.message(Command("request"), flags={"perm": "request_account"})
async def start_request(message: Message, state: FSMContext, who: Who, lang: str) -> None:
    await state.clear()
    await state.set_state(ProvForm.kind)
    kinds = list(PERSONAL) + ([ProvKind.e_id_code, ProvKind.domain] if _is_admin(who) else [])
    await ask(message, state, t("prov.menu", lang), [
        Choice(t(f"btn.pk_{k.value}", lang), KindCb(kind=k.value).pack(),
               (t(f"prov.kind_{k.value}", lang),)) for k in kinds])


@router.message(ProvForm.kind, TypedChoice(KindCb), flags={"perm": "request_account"})
@router.callback_query(ProvForm.kind, KindCb.filter(), flags={"perm": "request_account"})
async def on_kind(event: Message | CallbackQuery, callback_data: KindCb, state: FSMContext,
                  session: AsyncSession, who: Who, lang: str) -> None:
    target = await reply_target(event)
    try:
        kind = ProvKind(callback_data.kind)
    except ValueError:
        await target.answer(t("common.stale_button", lang))
        return
    assert who.person is not None
    await state.update_data(kind=kind.value)
    if kind in (ProvKind.e_id_code, ProvKind.domain):
        if who.role == "dtc_admin":  # operators may ask for any unit: look it up first
            await state.set_state(ProvForm.unit)
            await target.answer(t("prov.ask_unit", lang))
            return
        await state.update_data(unit_code=who.person.unit_code)
        await _after_unit(target, state, session, lang)
        return
    if _is_admin(who):
        await state.set_state(ProvForm.who)
        await ask(target, state, t("prov.ask_for", lang), [
            Choice(t("btn.for_me", lang), ForCb(who="me").pack(), ("toi", "me")),
            Choice(t("btn.for_staff", lang), ForCb(who="staff").pack(), ("can bo", "staff")),
        ])
        return
    await state.update_data(subject_id=who.person.id)
    await _after_subject(target, state, session, lang)


async def _after_unit(target: Message, state: FSMContext, session: AsyncSession,
                      lang: str) -> None:
    if (await state.get_data()).get("kind") == ProvKind.domain.value:
        await state.set_state(ProvForm.domain)
        await target.answer(t("prov.ask_domain", lang))
        return
    await _confirm(target, state, session, lang)


@router.message(ProvForm.unit, TypedChoice(UnitPickCb), flags={"perm": "request_account"})
@router.callback_query(ProvForm.unit, UnitPickCb.filter(), flags={"perm": "request_account"})
async def on_unit_pick(event: Message | CallbackQuery, callback_data: UnitPickCb,
                       state: FSMContext, session: AsyncSession, lang: str) -> None:
    target = await reply_target(event)
    unit = await session.get(Unit, callback_data.code)
    if unit is None or not unit.active:
        await target.answer(t("common.stale_button", lang))
        return
    await state.update_data(unit_code=unit.code)
    await _after_unit(target, state, session, lang)


@router.message(ProvForm.unit, F.text, flags={"perm": "request_account"})
async def on_unit_query(message: Message, state: FSMContext, session: AsyncSession,
                        lang: str) -> None:
    query = (message.text or "").strip()[:200]
    found = await search_units(session, query, include_defunct=False, limit=STAFF_PAGE)
    if not found.items:
        await message.answer(t("prov.unit_none", lang, query=query))
        return
    await ask(message, state, t("prov.pick_unit", lang), [
        Choice(f"{u.name}{' — ' + u.province_name if u.province_name else ''}",
               UnitPickCb(code=u.code).pack()) for u in found.items])


@router.message(ProvForm.who, TypedChoice(ForCb), flags={"perm": "request_account"})
@router.callback_query(ProvForm.who, ForCb.filter(), flags={"perm": "request_account"})
async def on_for(event: Message | CallbackQuery, callback_data: ForCb, state: FSMContext,
                 session: AsyncSession, who: Who, lang: str) -> None:
    target = await reply_target(event)
    assert who.person is not None
    if callback_data.who == "staff":
        await state.set_state(ProvForm.staff)
        await target.answer(t("prov.ask_staff", lang))
        return
    await state.update_data(subject_id=who.person.id)
    await _after_subject(target, state, session, lang)


@router.message(ProvForm.staff, TypedChoice(StaffCb), flags={"perm": "request_account"})
@router.callback_query(StaffCb.filter(), flags={"perm": "request_account"})
async def on_staff(event: Message | CallbackQuery, callback_data: StaffCb, state: FSMContext,
                   session: AsyncSession, who: Who, lang: str) -> None:
    """Also reached by a forged button outside the form: the subject is re-checked here and
    again by the domain function."""
    target = await reply_target(event)
    subject = await session.get(Person, callback_data.person)
    if subject is None or not prov.may_request_for(who.person, subject):
        await target.answer(t("prov.err_other_unit", lang))
        return
    if await state.get_state() != ProvForm.staff.state:
        await target.answer(t("common.stale_button", lang))
        return
    await state.update_data(subject_id=subject.id)
    await _after_subject(target, state, session, lang)


@router.message(ProvForm.staff, F.text, flags={"perm": "request_account"})
async def on_staff_query(message: Message, state: FSMContext, session: AsyncSession, who: Who,
                         lang: str) -> None:
    assert who.person is not None
    query = (message.text or "").strip()[:100]
    phone = try_normalize_phone(query)
    q = select(Person).where(Person.active.is_(True))
    if phone:
        q = q.where(Person.phone == phone)
    else:
        folded = fold(query)
        if not folded:
            await message.answer(t("prov.staff_none", lang, query=query))
            return
        q = q.where(Person.name_folded.contains(folded, autoescape=True))
    if who.role != "dtc_admin":
        q = q.where(Person.unit_code == who.person.unit_code)
    people = list(await session.scalars(q.order_by(Person.full_name).limit(STAFF_PAGE)))
    if not people:
        await message.answer(t("prov.staff_none", lang, query=query))
        return
    await ask(message, state, t("prov.pick_staff", lang), [
        Choice(f"{p.full_name}{' — ' + p.position if p.position else ''}",
               StaffCb(person=p.id).pack()) for p in people])


async def _after_subject(target: Message, state: FSMContext, session: AsyncSession,
                         lang: str) -> None:
    data = await state.get_data()
    if data.get("kind") == ProvKind.system_account.value:
        names = {s.code: s for s in await session.scalars(
            select(System).where(System.code.in_(list(prov.SYSTEM_ROLES))))}
        await state.set_state(ProvForm.system)
        await ask(target, state, t("prov.ask_system", lang), [
            Choice(_sys_name(names.get(code), code, lang), SysCb(code=code).pack(), (code,))
            for code in prov.SYSTEM_ROLES])
        return
    await _confirm(target, state, session, lang)


def _sys_name(system: System | None, code: str, lang: str) -> str:
    if system is None:
        return code
    return f"{system.abbr} — {system.name_vi if lang == 'vi' else system.name_en}"


@router.message(ProvForm.system, TypedChoice(SysCb), flags={"perm": "request_account"})
@router.callback_query(ProvForm.system, SysCb.filter(), flags={"perm": "request_account"})
async def on_system(event: Message | CallbackQuery, callback_data: SysCb, state: FSMContext,
                    session: AsyncSession, lang: str) -> None:
    target = await reply_target(event)
    roles = prov.SYSTEM_ROLES.get(callback_data.code)
    if roles is None:
        await target.answer(t("common.stale_button", lang))
        return
    await state.update_data(system_code=callback_data.code)
    await state.set_state(ProvForm.role)
    name = _sys_name(await session.get(System, callback_data.code), callback_data.code, lang)
    await ask(target, state, t("prov.ask_role", lang, system=name), [
        Choice(t(f"prov.role_{r}", lang), RoleCb(role=r).pack(), (r.replace("_", " "),))
        for r in roles])


@router.message(ProvForm.role, TypedChoice(RoleCb), flags={"perm": "request_account"})
@router.callback_query(ProvForm.role, RoleCb.filter(), flags={"perm": "request_account"})
async def on_role(event: Message | CallbackQuery, callback_data: RoleCb, state: FSMContext,
                  session: AsyncSession, lang: str) -> None:
    target = await reply_target(event)
    data = await state.get_data()
    if callback_data.role not in prov.SYSTEM_ROLES.get(data.get("system_code", ""), ()):
        await target.answer(t("common.stale_button", lang))
        return
    await state.update_data(role=callback_data.role)
    await _confirm(target, state, session, lang)


@router.message(ProvForm.domain, F.text, flags={"perm": "request_account"})
async def on_domain(message: Message, state: FSMContext, session: AsyncSession,
                    lang: str) -> None:
    domain = (message.text or "").strip().lower()
    if not prov.DOMAIN_RE.match(domain):
        await message.answer(t("prov.err_domain", lang))
        return
    await state.update_data(domain=domain)
    data = await state.get_data()
    unit = await session.get(Unit, data.get("unit_code") or "")
    if unit is not None and unit.domain and unit.domain != domain:
        await state.set_state(ProvForm.keep)
        await ask(message, state, t("prov.ask_keep_old", lang, old=unit.domain), [
            Choice(t("btn.keep_yes", lang), KeepCb(keep=1).pack(), ("co", "yes")),
            Choice(t("btn.keep_no", lang), KeepCb(keep=0).pack(), ("khong", "no")),
        ])
        return
    await _confirm(message, state, session, lang)


@router.message(ProvForm.keep, TypedChoice(KeepCb), flags={"perm": "request_account"})
@router.callback_query(ProvForm.keep, KeepCb.filter(), flags={"perm": "request_account"})
async def on_keep(event: Message | CallbackQuery, callback_data: KeepCb, state: FSMContext,
                  session: AsyncSession, lang: str) -> None:
    target = await reply_target(event)
    await state.update_data(keep_old=bool(callback_data.keep))
    await _confirm(target, state, session, lang)


async def _confirm(target: Message, state: FSMContext, session: AsyncSession,
                   lang: str) -> None:
    data = await state.get_data()
    kind = ProvKind(data["kind"])
    subject = await session.get(Person, data["subject_id"]) if data.get("subject_id") else None
    unit_code = subject.unit_code if subject else data.get("unit_code")
    unit = await session.get(Unit, unit_code or "")
    system = data.get("system_code")
    await state.set_state(ProvForm.confirm)
    await ask(target, state, t(
        "prov.summary", lang, kind=kind.value, subject=subject.full_name if subject else None,
        unit=unit.name if unit else "—",
        system=_sys_name(await session.get(System, system), system, lang) if system else None,
        role=data.get("role"), domain=data.get("domain"), keep_old=data.get("keep_old"),
        policy=prov.POLICY[kind].value), [
        Choice(t("btn.prov_send", lang), SendCb(action="send").pack(), ("gui", "send")),
        Choice(t("btn.cancel", lang), SendCb(action="cancel").pack(), ("huy", "cancel")),
    ])


@router.message(ProvForm.confirm, TypedChoice(SendCb), flags={"perm": "request_account"})
@router.callback_query(ProvForm.confirm, SendCb.filter(), flags={"perm": "request_account"})
async def on_send(event: Message | CallbackQuery, callback_data: SendCb, state: FSMContext,
                  session: AsyncSession, who: Who, lang: str, actor: Actor, bot: Bot,
                  settings: Settings, fsm_storage: BaseStorage, post: PostCommit) -> None:
    target, data = await end_form(event, state)
    if callback_data.action != "send":
        await target.answer(t("common.cancelled", lang))
        return
    if "kind" not in data:
        await target.answer(t("common.expired", lang))
        return
    subject = await session.get(Person, data["subject_id"]) if data.get("subject_id") else None
    payload = {k: data[k] for k in ("domain", "keep_old") if k in data}
    try:
        req = await prov.create_request(
            session, who.person, ProvKind(data["kind"]), actor=actor, subject=subject,
            unit_code=data.get("unit_code"), system_code=data.get("system_code"),
            role=data.get("role"), payload=payload)
    except prov.ProvError as exc:
        await target.answer(t(exc.code, lang, **exc.detail))
        return
    notified = await send_cards(session, bot, fsm_storage, settings, post, req)
    await target.answer(t("prov.submitted", lang, id=req.id, kind=req.kind, state=req.state,
                          notified=notified))


# --- approvals ----------------------------------------------------------------------------


def decision_choices(req_id: int, lang: str) -> list[Choice]:
    return [
        Choice(t("btn.prov_approve", lang), DecideCb(action="ok", req=req_id).pack(),
               ("duyet", "dong y", "approve")),
        Choice(t("btn.prov_reject", lang), DecideCb(action="no", req=req_id).pack(),
               ("tu choi", "reject")),
    ]


async def card_text(session: AsyncSession, req: ProvisioningRequest, lang: str) -> str:
    requester = await session.get(Person, req.requester_id) if req.requester_id else None
    subject = await session.get(Person, req.subject_id) if req.subject_id else None
    unit = await session.get(Unit, req.unit_code or "")
    system = await session.get(System, req.system_code) if req.system_code else None
    return t("prov.card", lang, id=req.id, kind=req.kind,
             requester=requester.full_name if requester else "—",
             subject=subject.full_name if subject else None, unit=unit.name if unit else "—",
             system=_sys_name(system, req.system_code, lang) if req.system_code else None,
             role=req.role, domain=(req.payload or {}).get("domain"), at=req.created_at)


async def send_cards(session: AsyncSession, bot: Bot, storage: BaseStorage, settings: Settings,
                     post: PostCommit, req: ProvisioningRequest) -> int:
    """Queue the Approve/Reject card for every approver, sent after the commit."""
    if req.state != ProvState.submitted.value:
        return 0
    cards = []
    for approver in await prov.approvers_for(session, req):
        ident = await prov.identity_of(session, approver.id)
        if ident is None:
            continue
        alang = norm_lang(ident.lang or approver.lang or settings.default_lang)
        cards.append((int(ident.external_id), await card_text(session, req, alang),
                      decision_choices(req.id, alang)))

    send_cards_after_commit(post, bot, storage, cards, f"provisioning request {req.id}")
    return len(cards)


@router.message(Command("approvals"), flags={"perm": "approve_provisioning"})
async def approvals(message: Message, state: FSMContext, session: AsyncSession, who: Who,
                    lang: str) -> None:
    assert who.person is not None
    reqs = await prov.pending_for(session, who.person)
    if not reqs:
        await message.answer(t("prov.none_pending", lang))
        return
    for req in reqs[:10]:
        await message.answer(await card_text(session, req, lang),
                             reply_markup=keyboard(decision_choices(req.id, lang), columns=2))
    await remember(state, decision_choices(reqs[0].id, lang))


@router.message(TypedChoice(DecideCb), flags={"perm": "approve_provisioning"})
@router.callback_query(DecideCb.filter(), flags={"perm": "approve_provisioning"})
async def on_decide(event: Message | CallbackQuery, callback_data: DecideCb, state: FSMContext,
                    session: AsyncSession, who: Who, lang: str, actor: Actor) -> None:
    req = await session.get(ProvisioningRequest, callback_data.req)
    if req is None:
        await _answer(event, t("prov.not_found", lang))
        return
    if callback_data.action == "no":
        if req.state != ProvState.submitted.value:
            await _answer(event, t("prov.already", lang, id=req.id, state=req.state))
            return
        target = await reply_target(event, drop_keyboard=False)
        await state.set_state(ProvReason.text)
        await state.update_data(reject_req=req.id)
        await target.answer(t("prov.ask_reason", lang, id=req.id))
        return
    d = await prov.approve(session, req.id, who.person, actor)
    if d.outcome is prov.DecideOutcome.forbidden:
        await _answer(event, t("prov.forbidden", lang))
        return
    if d.outcome is prov.DecideOutcome.already:
        await _answer(event, t("prov.already", lang, id=req.id, state=req.state))
        return
    target = await reply_target(event)
    key = "prov.decided_ok" if d.outcome is prov.DecideOutcome.approved else "prov.decided_partly"
    await target.answer(t(key, lang, id=req.id))


@router.message(ProvReason.text, F.text, flags={"perm": "approve_provisioning"})
async def on_reason(message: Message, state: FSMContext, session: AsyncSession, who: Who,
                    lang: str, actor: Actor) -> None:
    reason = (message.text or "").strip()
    if len(reason) < 3 or reason.startswith("/"):
        await message.answer(t("prov.bad_text", lang))
        return
    data = await state.get_data()
    await state.clear()
    d = await prov.reject(session, int(data.get("reject_req", 0)), who.person, reason[:500],
                          actor)
    if d.outcome is prov.DecideOutcome.rejected:
        await message.answer(t("prov.decided_no", lang, id=d.request.id, reason=reason))
    elif d.outcome is prov.DecideOutcome.already and d.request is not None:
        await message.answer(t("prov.already", lang, id=d.request.id, state=d.request.state))
    elif d.outcome is prov.DecideOutcome.not_found:
        await message.answer(t("prov.not_found", lang))
    else:
        await message.answer(t("prov.forbidden", lang))


# --- my requests --------------------------------------------------------------------------


@router.message(Command("requests"), flags={"perm": "my_requests"})
async def my_requests(message: Message, session: AsyncSession, who: Who, lang: str) -> None:
    assert who.person is not None
    reqs = await prov.requests_of(session, who.person.id)
    if not reqs:
        await message.answer(t("prov.none", lang))
        return
    names = {p.id: p.full_name for p in await session.scalars(
        select(Person).where(Person.id.in_({r.subject_id for r in reqs if r.subject_id})))}
    lines = [t("prov.list_header", lang, n=len(reqs))]
    for r in reqs:
        detail = (r.result or {}).get("address") or (r.result or {}).get("value") or r.reason
        if r.state == ProvState.failed.value and r.result and r.result.get("error"):
            err = r.result["error"]
            detail = t(err, lang) if err.startswith("prov.") else err
        lines.append(t("prov.list_item", lang, id=r.id, kind=r.kind, state=r.state,
                       subject=names.get(r.subject_id) if r.subject_id != who.person.id
                       else None, at=r.created_at, detail=detail))
    await message.answer("\n".join(lines))


# --- catalog items (operators) ------------------------------------------------------------


async def _catalog_card(session: AsyncSession, req: ProvisioningRequest,
                        lang: str) -> tuple[str, list[Choice]]:
    unit = await session.get(Unit, req.unit_code or "")
    text = t("prov.catalog_item", lang, id=req.id, kind=req.kind,
             unit=unit.name if unit else "—", domain=(req.payload or {}).get("domain"))
    choices = [Choice(("☑ " if done else "☐ ") + t(f"prov.check_{item}", lang),
                      CheckCb(req=req.id, item=item).pack())
               for item, done in (req.checklist or {}).items()]
    choices.append(Choice(t("btn.record", lang), CheckCb(req=req.id, item="_rec").pack(),
                          ("ghi", "record")))
    return text, choices


@router.message(Command("catalog"), flags={"perm": "catalog"})
async def catalog(message: Message, state: FSMContext, session: AsyncSession,
                  lang: str) -> None:
    reqs = list(await session.scalars(select(ProvisioningRequest).where(
        ProvisioningRequest.state == ProvState.in_progress.value,
        or_(*[ProvisioningRequest.kind == k.value for k in prov.CATALOG_KINDS]))
        .order_by(ProvisioningRequest.id).limit(10)))
    if not reqs:
        await message.answer(t("prov.catalog_none", lang))
        return
    for req in reqs:
        text, choices = await _catalog_card(session, req, lang)
        await message.answer(text, reply_markup=keyboard(choices))
    await remember(state, (await _catalog_card(session, reqs[0], lang))[1])


@router.message(TypedChoice(CheckCb), flags={"perm": "catalog"})
@router.callback_query(CheckCb.filter(), flags={"perm": "catalog"})
async def on_check(event: Message | CallbackQuery, callback_data: CheckCb, state: FSMContext,
                   session: AsyncSession, who: Who, lang: str, actor: Actor) -> None:
    req = await session.get(ProvisioningRequest, callback_data.req)
    if req is None or req.state != ProvState.in_progress.value:
        await _answer(event, t("prov.err_already", lang))
        return
    if callback_data.item == "_rec":
        target = await reply_target(event, drop_keyboard=False)
        await state.set_state(ProvOutcome.text)
        await state.update_data(outcome_req=req.id)
        await target.answer(t(f"prov.ask_outcome_{req.kind}", lang, id=req.id))
        return
    updated = await prov.toggle_check(session, req.id, callback_data.item, who.person, actor)
    if updated is None:
        await _answer(event, t("common.stale_button", lang))
        return
    text, choices = await _catalog_card(session, updated, lang)
    if isinstance(event, CallbackQuery) and isinstance(event.message, Message):
        await event.answer()
        with contextlib.suppress(TelegramAPIError):
            await event.message.edit_text(text, reply_markup=keyboard(choices))
    else:
        await event.answer(text, reply_markup=keyboard(choices))
    await remember(state, choices)


@router.message(ProvOutcome.text, F.text, flags={"perm": "catalog"})
async def on_outcome(message: Message, state: FSMContext, session: AsyncSession, who: Who,
                     lang: str, actor: Actor) -> None:
    data = await state.get_data()
    try:
        req = await prov.record_outcome(session, int(data.get("outcome_req", 0)), who.person,
                                        message.text or "", actor)
    except prov.ProvError as exc:
        if exc.code in ("prov.err_domain", "prov.err_eid"):
            await message.answer(t(exc.code, lang))  # stay in the step: type it again
            return
        await state.clear()
        await message.answer(t(exc.code, lang))
        return
    await state.clear()
    unit = await session.get(Unit, req.unit_code or "")
    await message.answer(t("prov.outcome_saved", lang, id=req.id,
                           value=(req.result or {}).get("value"),
                           unit=unit.name if unit else "—"))


# --- bulk: an operator sends a staff list -------------------------------------------------

BULK_MAX_BYTES = 10 * 1024 * 1024
_watchers: set[asyncio.Task[None]] = set()


class ProvBulk(StatesGroup):
    file = State()
    confirm = State()


class BulkCb(CallbackData, prefix="pb"):
    action: str  # apply | cancel


def _directory_for(settings: Settings) -> LdapDirectory | None:
    if not settings.ldap_url:
        return None
    pw = settings.ldap_password.get_secret_value() if settings.ldap_password else ""
    return LdapDirectory(settings.ldap_url, settings.ldap_base_dn, settings.ldap_bind_dn, pw)


def render_plan(p: bulk_provision.BulkPlan, lang: str) -> str:
    return t("prov.bulk_plan", lang, create=p.create[:20], n_create=len(p.create),
             collisions=len(p.collisions), existing=p.existing[:10], n_existing=len(p.existing),
             invalid=p.report.error_rows + len(p.invalid),
             invalid_rows=[(r.row, t(r.note or "", lang)) for r in p.invalid[:10]]
             + [(e.row, t(f"import.err.{e.code}", lang, value=e.value, column=e.column,
                          **(e.detail or {}))) for e in p.report.errors[:10]])


@router.message(Command("provision"), flags={"perm": "bulk_provision"})
async def bulk_start(message: Message, state: FSMContext, lang: str) -> None:
    await state.clear()
    await state.set_state(ProvBulk.file)
    await message.answer(t("prov.bulk_send_file", lang))


@router.message(ProvBulk.file, F.document, flags={"perm": "bulk_provision"})
async def bulk_file(message: Message, state: FSMContext, session: AsyncSession, bot: Bot,
                    lang: str, settings: Settings) -> None:
    doc = message.document
    assert doc is not None
    name = doc.file_name or "staff.csv"
    if not name.lower().endswith((".csv", ".xlsx", ".txt")) or (
            doc.file_size or 0) > BULK_MAX_BYTES:
        await message.answer(t("prov.bulk_bad_file", lang, name=name))
        return
    buf = await bot.download(doc.file_id)
    assert buf is not None
    directory = _directory_for(settings)
    try:
        p = await bulk_provision.plan(session, directory, buf.read(), name,
                                      pattern=settings.address_pattern,
                                      mail_domain=settings.mail_domain)
    except imports.ImportFileError as exc:
        await state.clear()
        await message.answer(t(f"import.file_err.{exc.code}", lang, **exc.detail))
        return
    except DirectoryUnavailable:
        await message.answer(t("prov.err_unreachable", lang))
        return
    finally:
        if directory is not None:
            await directory.close()
    await answer_long(message, render_plan(p, lang))
    if not p.create:
        await state.clear()
        return
    await state.set_state(ProvBulk.confirm)
    await state.update_data(file_id=doc.file_id, file_name=name)
    await ask(message, state, t("prov.bulk_confirm", lang, n=len(p.create)), [
        Choice(t("btn.bulk_apply", lang, n=len(p.create)), BulkCb(action="apply").pack(),
               ("tao", "create", "dong y")),
        Choice(t("btn.cancel", lang), BulkCb(action="cancel").pack(), ("huy", "cancel")),
    ])


@router.message(ProvBulk.file, flags={"perm": "bulk_provision"})
async def bulk_waiting(message: Message, lang: str) -> None:
    await message.answer(t("prov.bulk_send_file", lang))


@router.message(ProvBulk.confirm, TypedChoice(BulkCb), flags={"perm": "bulk_provision"})
@router.callback_query(ProvBulk.confirm, BulkCb.filter(), flags={"perm": "bulk_provision"})
async def bulk_apply(event: Message | CallbackQuery, callback_data: BulkCb, state: FSMContext,
                     session: AsyncSession, bot: Bot, who: Who, lang: str, actor: Actor,
                     settings: Settings, sessionmaker: async_sessionmaker[AsyncSession],
                     post: PostCommit) -> None:
    target, data = await end_form(event, state)
    if callback_data.action != "apply" or "file_id" not in data:
        await target.answer(t("common.cancelled", lang))
        return
    buf = await bot.download(data["file_id"])
    assert buf is not None
    batch, p = await bulk_provision.submit(session, buf.read(), data["file_name"], who.person,
                                           actor, pattern=settings.address_pattern,
                                           mail_domain=settings.mail_domain)
    total = len(p.create)
    progress = await target.answer(t("prov.bulk_progress", lang, done=0, total=total))

    def watch() -> None:  # after the commit, so the task can see the jobs
        task = asyncio.create_task(_watch_batch(bot, sessionmaker, batch, progress.chat.id,
                                                progress.message_id, total, lang))
        _watchers.add(task)
        task.add_done_callback(_watchers.discard)

    async def start() -> None:
        watch()

    post.add(start)


async def _watch_batch(bot: Bot, maker: async_sessionmaker[AsyncSession], batch: str,
                       chat_id: int, message_id: int, total: int, lang: str,
                       every: float = 1.0, give_up: float = 6 * 3600) -> None:
    """Edit the progress message in place until the batch is finished, then send the result
    XLSX. Not durable: after a restart the jobs go on, /requests shows them."""
    loop = asyncio.get_running_loop()
    end = loop.time() + give_up
    shown = 0
    while loop.time() < end:
        await asyncio.sleep(every)
        async with maker() as s:
            counts = await bulk_provision.batch_counts(s, batch)
        finished = counts.get("done", 0) + counts.get("failed", 0)
        if finished != shown:
            shown = finished
            with contextlib.suppress(TelegramAPIError):
                await bot.edit_message_text(
                    t("prov.bulk_progress", lang, done=finished, total=total),
                    chat_id=chat_id, message_id=message_id)
        if finished >= total:
            break
    async with maker() as s:
        counts = await bulk_provision.batch_counts(s, batch)
        content = await bulk_provision.result_xlsx(s, batch, lang)
    with contextlib.suppress(TelegramAPIError):
        await bot.send_document(chat_id, BufferedInputFile(content, f"{batch}.xlsx"),
                                caption=t("prov.bulk_done", lang, done=counts.get("done", 0),
                                          failed=counts.get("failed", 0), total=total))
