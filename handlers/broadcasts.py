"""Broadcasts by operators in chat: compose, preview, audience, confirm, send or schedule,
a live progress message with pause / resume / cancel. Every button also takes typed text."""

from __future__ import annotations

import asyncio
from datetime import datetime

from aiogram import F, Router
from aiogram.filters import Command, StateFilter
from aiogram.filters.callback_data import CallbackData
from aiogram.fsm.context import FSMContext
from aiogram.fsm.state import State, StatesGroup
from aiogram.types import CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Message
from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.config import Settings
from bot.middlewares import PostCommit
from db.models import Province, Role, UnitKind
from handlers.ui import Choice, TypedChoice, ask, remember, reply_target
from services import broadcasts, reminders, status
from services.audit import Actor
from services.broadcasts import Audience, BroadcastError
from services.folding import fold
from services.people import Who
from services.texts import t

router = Router(name=__name__)
PERM = "broadcast"
STAGE_GROUPS = broadcasts.STAGE_GROUPS
KINDS = (UnitKind.ward, UnitKind.commune, UnitKind.special_zone, UnitKind.department,
         UnitKind.party_office, UnitKind.province_office)


class BcAct(CallbackData, prefix="bca"):
    """A button on a progress message: pause / resume / cancel broadcast ``id``."""

    action: str
    id: int


class BcAud(CallbackData, prefix="bcu"):
    """Audience step: ``kind`` all | province | kind | role | stage | subscribers; ``value``
    empty asks the next question."""

    kind: str
    value: str = ""


class BcStage(CallbackData, prefix="bcs"):
    sys: str
    group: str


class BcGo(CallbackData, prefix="bcg"):
    what: str  # now | schedule | cancel


class BcFlow(StatesGroup):
    text = State()
    audience = State()
    province = State()
    go = State()
    when = State()


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


def _action_choices(bid: int, lang: str) -> list[Choice]:
    """Typed equivalents of the progress buttons (remembered once; the state decides)."""
    return [
        Choice(t("bc.btn.pause", lang), BcAct(action="pause", id=bid).pack(),
               ("tam dung", "dung", "pause")),
        Choice(t("bc.btn.resume", lang), BcAct(action="resume", id=bid).pack(),
               ("tiep tuc", "resume")),
        Choice(t("bc.btn.stop", lang), BcAct(action="cancel", id=bid).pack(),
               ("huy gui", "stop")),
    ]


def _error(exc: BroadcastError, lang: str) -> str:
    return t(f"bc.err.{exc.code}", lang, **exc.detail)


async def describe(session: AsyncSession, a: Audience, lang: str) -> str:
    """The audience in words, for the confirmation."""
    parts = []
    if a.province:
        name = await session.scalar(select(Province.name).where(Province.code == a.province))
        parts.append(t("bc.audience_province", lang, name=name or a.province))
    parts += [t("bc.audience_kind", lang, kind=k) for k in a.unit_kinds]
    parts += [t("bc.audience_role", lang, role=r) for r in a.roles]
    abbr = {s.code: s.abbr for s in await status.load_systems(session)}
    if a.system and a.stages:
        group = next((g for g, st in STAGE_GROUPS.items() if st == a.stages), "behind")
        parts.append(t("bc.audience_stage", lang, group=group,
                       system=abbr.get(a.system, a.system)))
    if a.subscribers:
        parts.append(t("bc.audience_subscribers", lang,
                       system=abbr.get(a.subscribers, a.subscribers)))
    return "; ".join(parts) or t("bc.audience_all", lang)


def _audience_choices(lang: str) -> list[Choice]:
    items = [("all", ("tat ca", "all", "everyone")), ("province", ("tinh", "province")),
             ("kind", ("loai don vi", "kind")), ("role", ("vai tro", "role")),
             ("stage", ("tien do", "stage", "progress")),
             ("subscribers", ("theo doi", "subscribers"))]
    return [Choice(t(f"bc.btn.{k}", lang), BcAud(kind=k).pack(), words) for k, words in items]


@router.message(Command("broadcast"), flags={"perm": PERM})
async def start(message: Message, state: FSMContext, lang: str) -> None:
    await state.clear()
    await state.set_state(BcFlow.text)
    await message.answer(t("bc.ask_text", lang))


@router.message(BcFlow.text, F.text, flags={"perm": PERM})
async def got_text(message: Message, state: FSMContext, session: AsyncSession,
                   lang: str) -> None:
    source = (message.text or "").strip()
    try:
        broadcasts.check_template(source)
        text, _n = await broadcasts.preview(session, source, Audience())
    except BroadcastError as exc:
        await message.answer(_error(exc, lang))
        return
    await state.set_state(BcFlow.audience)
    await state.update_data(bc_text=source)
    # the rendered message is already safe HTML (sandboxed, autoescaped)
    await ask(message, state, t("bc.preview", lang, text=Markup(text)), _audience_choices(lang))


async def _confirm(target: Message, state: FSMContext, session: AsyncSession, lang: str,
                   audience: Audience) -> None:
    n = await broadcasts.count_audience(session, audience)
    if n == 0:
        await state.set_state(BcFlow.audience)
        await ask(target, state, t("bc.nobody", lang), _audience_choices(lang))
        return
    await state.set_state(BcFlow.go)
    await state.update_data(bc_aud=audience.to_json())
    await ask(target, state, t("bc.confirm", lang, audience=await describe(session, audience,
                                                                          lang), count=n), [
        Choice(t("bc.btn.now", lang), BcGo(what="now").pack(), ("gui ngay", "now", "gui")),
        Choice(t("bc.btn.schedule", lang), BcGo(what="schedule").pack(),
               ("hen gio", "schedule")),
        Choice(t("bc.btn.cancel", lang), BcGo(what="cancel").pack(), ("huy", "cancel")),
    ])


@router.message(BcFlow.audience, TypedChoice(BcAud), flags={"perm": PERM})
@router.callback_query(BcFlow.audience, BcAud.filter(), flags={"perm": PERM})
async def audience_step(event: Message | CallbackQuery, callback_data: BcAud,
                        state: FSMContext, session: AsyncSession, lang: str) -> None:
    target = await reply_target(event)
    kind, value = callback_data.kind, callback_data.value
    if kind == "all":
        await _confirm(target, state, session, lang, Audience())
    elif kind == "province":
        await state.set_state(BcFlow.province)
        await target.answer(t("bc.ask_province", lang))
    elif kind == "kind" and not value:
        await ask(target, state, t("bc.ask_kind", lang), [
            Choice(t(f"bc.kind.{k.value}", lang), BcAud(kind="kind", value=k.value).pack(),
                   (k.value,)) for k in KINDS])
    elif kind == "kind":
        await _confirm(target, state, session, lang, Audience(unit_kinds=(value,)))
    elif kind == "role" and not value:
        await ask(target, state, t("bc.ask_role", lang), [
            Choice(t(f"role.{r.value}", lang), BcAud(kind="role", value=r.value).pack(),
                   (r.value,)) for r in Role])
    elif kind == "role":
        await _confirm(target, state, session, lang, Audience(roles=(value,)))
    elif kind in ("stage", "subscribers") and not value:
        systems = await status.load_systems(session)
        await ask(target, state, t("bc.ask_system", lang), [
            Choice(f"{s.abbr} — {s.name(lang)}", BcAud(kind=kind, value=s.code).pack(),
                   (s.abbr, s.code)) for s in systems])
    elif kind == "stage":
        abbr = {s.code: s.abbr for s in await status.load_systems(session)}
        await ask(target, state, t("bc.ask_stage", lang, system=abbr.get(value, value)), [
            Choice(t(f"bc.stage_group.{g}", lang), BcStage(sys=value, group=g).pack(), (g,))
            for g in STAGE_GROUPS])
    elif kind == "subscribers":
        await _confirm(target, state, session, lang, Audience(subscribers=value))


@router.message(BcFlow.audience, TypedChoice(BcStage), flags={"perm": PERM})
@router.callback_query(BcFlow.audience, BcStage.filter(), flags={"perm": PERM})
async def stage_step(event: Message | CallbackQuery, callback_data: BcStage, state: FSMContext,
                     session: AsyncSession, lang: str) -> None:
    target = await reply_target(event)
    stages = STAGE_GROUPS.get(callback_data.group)
    if stages is None:
        await target.answer(t("common.use_buttons", lang))
        return
    await _confirm(target, state, session, lang,
                   Audience(system=callback_data.sys, stages=stages))


async def find_province(session: AsyncSession, query: str) -> Province | None:
    q = fold(query)
    if not q:
        return None
    provinces = list(await session.scalars(select(Province).where(Province.active.is_(True))))
    for p in provinces:
        if q.isdigit() and p.code.lstrip("0") == q.lstrip("0"):
            return p
    exact = [p for p in provinces if p.name_folded == q or p.name_folded.endswith(" " + q)]
    if exact:
        return exact[0]
    partial = [p for p in provinces if q in p.name_folded]
    return partial[0] if len(partial) == 1 else None


@router.message(BcFlow.province, F.text, flags={"perm": PERM})
async def province_step(message: Message, state: FSMContext, session: AsyncSession,
                        lang: str) -> None:
    query = (message.text or "").strip()[:100]
    p = await find_province(session, query)
    if p is None:
        await message.answer(t("bc.no_province", lang, query=query))
        return
    await _confirm(message, state, session, lang, Audience(province=p.code))


async def _draft(state: FSMContext) -> tuple[str, Audience] | None:
    data = await state.get_data()
    if "bc_text" not in data or "bc_aud" not in data:
        return None
    return data["bc_text"], Audience.from_json(data["bc_aud"])


@router.message(BcFlow.go, TypedChoice(BcGo), flags={"perm": PERM})
@router.callback_query(BcFlow.go, BcGo.filter(), flags={"perm": PERM})
async def go_step(event: Message | CallbackQuery, callback_data: BcGo, state: FSMContext,
                  session: AsyncSession, lang: str, actor: Actor, post: PostCommit) -> None:
    target = await reply_target(event)
    draft = await _draft(state)
    if callback_data.what == "cancel" or draft is None:
        await state.clear()
        await target.answer(t("bc.cancelled" if draft else "common.expired", lang))
        return
    if callback_data.what == "schedule":
        await state.set_state(BcFlow.when)
        await target.answer(t("bc.ask_when", lang))
        return
    source, audience = draft
    try:
        b = await broadcasts.create(session, actor, source, audience, lang)
        n = await broadcasts.start(session, b.id, actor)
    except BroadcastError as exc:
        await target.answer(_error(exc, lang))
        return
    await state.clear()
    p = await broadcasts.progress(session, b.id)
    text, markup = progress_view(p, 0.0, lang)
    await remember(state, _action_choices(b.id, lang))
    msg = await target.answer(t("bc.started", lang, id=b.id, count=n) + "\n\n" + text,
                              reply_markup=markup)
    await broadcasts.set_progress_message(session, b.id, str(msg.chat.id), msg.message_id)
    post.add(_wake_sender)


async def _wake_sender() -> None:
    from tasks.sender import wake_local_senders

    wake_local_senders()


def parse_when(text: str, settings: Settings) -> datetime | None:
    for fmt in ("%d/%m/%Y %H:%M", "%d-%m-%Y %H:%M", "%Y-%m-%d %H:%M"):
        try:
            return datetime.strptime(text.strip(), fmt).replace(tzinfo=settings.tz)
        except ValueError:
            continue
    return None


@router.message(BcFlow.when, F.text, flags={"perm": PERM})
async def when_step(message: Message, state: FSMContext, session: AsyncSession, lang: str,
                    actor: Actor, settings: Settings, post: PostCommit) -> None:
    value = (message.text or "").strip()[:40]
    when = parse_when(value, settings)
    draft = await _draft(state)
    if draft is None:
        await state.clear()
        await message.answer(t("common.expired", lang))
        return
    if when is None:
        await message.answer(t("bc.bad_when", lang, value=value))
        return
    source, audience = draft
    try:
        b = await broadcasts.create(session, actor, source, audience, lang)
        await broadcasts.schedule(session, b.id, when, actor)
    except BroadcastError as exc:
        await message.answer(_error(exc, lang))
        return
    await state.clear()
    n = await broadcasts.count_audience(session, audience)
    p = await broadcasts.progress(session, b.id)
    _text, markup = progress_view(p, 0.0, lang)
    await remember(state, _action_choices(b.id, lang))
    msg = await message.answer(t("bc.scheduled", lang, id=b.id, when=when, count=n),
                               reply_markup=markup)
    await broadcasts.set_progress_message(session, b.id, str(msg.chat.id), msg.message_id)
    bid = b.id

    async def add_job() -> None:
        from tasks.scheduler import schedule_broadcast_job

        # off the event loop: the job store writes synchronously, and on SQLite it would
        # wait for a transaction of ours (a batched done mark) that needs the loop to end
        await asyncio.to_thread(schedule_broadcast_job, bid, when)

    post.add(add_job)


@router.message(TypedChoice(BcAct), flags={"perm": PERM})
@router.callback_query(BcAct.filter(), flags={"perm": PERM})
async def act(event: Message | CallbackQuery, callback_data: BcAct, session: AsyncSession,
              lang: str, actor: Actor, post: PostCommit) -> None:
    try:
        action = broadcasts.Action(callback_data.action)
        b = await broadcasts.act(session, callback_data.id, action, actor)
    except (ValueError, BroadcastError) as exc:
        text = _error(exc, lang) if isinstance(exc, BroadcastError) else t("common.stale_button",
                                                                           lang)
        if isinstance(event, CallbackQuery):
            await event.answer(text, show_alert=True)
        else:
            await event.answer(text)
        return
    p = await broadcasts.progress(session, b.id)
    text, markup = progress_view(p, 0.0, b.lang)
    if isinstance(event, CallbackQuery):
        await event.answer(t("bc.done_action", lang, id=b.id, state=b.state))
        if isinstance(event.message, Message):
            await event.message.edit_text(text, reply_markup=markup)
    else:
        await event.answer(t("bc.done_action", lang, id=b.id, state=b.state) + "\n\n" + text)
    post.add(_wake_sender)


@router.message(StateFilter(BcFlow.audience, BcFlow.go), flags={"perm": PERM})
async def flow_other(message: Message, lang: str) -> None:
    await message.answer(t("common.use_buttons", lang))


# ------------------------------------------------------------------------------ /reminders


class RemToggle(CallbackData, prefix="rmt"):
    sys: str


async def show_reminders(target: Message, state: FSMContext, session: AsyncSession, who: Who,
                         lang: str, settings: Settings, note: str | None = None) -> None:
    person = who.person
    if person is None or person.unit_code is None or who.unit is None:
        await target.answer(t("rem.no_unit", lang))
        return
    today = datetime.now(settings.tz).date()
    items = await reminders.upcoming(session, person, today)
    subs = await reminders.subscriptions(session, person.id)
    lines = [t("rem.header", lang, unit=who.unit.name)]
    if note:
        lines.insert(0, note)
    lines += [t("rem.item", lang, system=u.abbr, milestone=u.milestone.name(lang),
                due=u.milestone.due, days=u.days, on=u.enabled) for u in items]
    if not items:
        lines.append(t("rem.none", lang))
    lines.append(t("rem.toggles", lang))
    systems = await status.load_systems(session)
    choices = [Choice(t("rem.btn.on" if subs.get(s.code, True) else "rem.btn.off", lang,
                        system=s.abbr), RemToggle(sys=s.code).pack(), (s.abbr, s.code))
               for s in systems]
    await ask(target, state, "\n".join(lines), choices, columns=2)


@router.message(Command("reminders"), flags={"perm": "reminders"})
async def reminders_cmd(message: Message, state: FSMContext, session: AsyncSession, who: Who,
                        lang: str, settings: Settings) -> None:
    await state.clear()
    await show_reminders(message, state, session, who, lang, settings)


@router.message(TypedChoice(RemToggle), flags={"perm": "reminders"})
@router.callback_query(RemToggle.filter(), flags={"perm": "reminders"})
async def toggle(event: Message | CallbackQuery, callback_data: RemToggle, state: FSMContext,
                 session: AsyncSession, who: Who, lang: str, actor: Actor,
                 settings: Settings) -> None:
    target = await reply_target(event)
    systems = {s.code: s for s in await status.load_systems(session)}
    if who.person is None or callback_data.sys not in systems:
        await target.answer(t("common.stale_button", lang))
        return
    now_on = not (await reminders.subscriptions(session, who.person.id))[callback_data.sys]
    await reminders.set_subscription(session, who.person.id, callback_data.sys, now_on, actor)
    note = t("rem.toggled", lang, system=systems[callback_data.sys].abbr, on=now_on)
    await show_reminders(target, state, session, who, lang, settings, note=note)
