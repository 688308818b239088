"""Migration status in one or two taps: my unit, a system, any unit; editors move stages;
operators get the province overview, the XLSX report and the progress chart."""

from __future__ import annotations

from datetime import date, datetime

from aiogram import F, Router
from aiogram.filters import Command, CommandObject, StateFilter
from aiogram.filters.callback_data import CallbackData
from aiogram.fsm.context import FSMContext
from aiogram.fsm.state import State, StatesGroup
from aiogram.types import (
    BufferedInputFile,
    CallbackQuery,
    InlineQuery,
    InlineQueryResultArticle,
    InputTextMessageContent,
    Message,
)
from sqlalchemy.ext.asyncio import AsyncSession

from bot.config import Settings
from handlers.ui import Choice, TypedChoice, ask, reply_target
from services import reports, roles, status
from services.audit import Actor
from services.people import Who
from services.status import SetStageOutcome, Stage
from services.texts import t
from services.units import get_unit, search_units

router = Router(name=__name__)
PAGE = 8
STAGES = list(Stage)


class StMenu(CallbackData, prefix="sm"):
    a: str  # my | sys | find | ov | rep | chart


class StSys(CallbackData, prefix="sy"):
    code: str


class StUnit(CallbackData, prefix="su"):
    code: str


class StEdit(CallbackData, prefix="se"):
    unit: str
    sys: str = ""  # empty: choose the system first


class StSet(CallbackData, prefix="ss"):
    unit: str
    sys: str
    stage: str


class StConfirm(CallbackData, prefix="sc"):
    ok: int


class StPage(CallbackData, prefix="sp"):
    what: str  # find | overdue
    offset: int


class StFlow(StatesGroup):
    find = State()
    note = State()
    confirm = State()


def today_in(settings: Settings) -> date:
    return datetime.now(settings.tz).date()


def is_editor(who: Who) -> bool:
    return roles.allowed(who.role, "status_update")


async def show_unit(target: Message, state: FSMContext, session: AsyncSession, who: Who,
                    lang: str, settings: Settings, code: str) -> None:
    view = await status.unit_status(session, code, today_in(settings))
    if view is None:
        await target.answer(t("st.unit_unknown", lang))
        return
    text = view.texts.get(lang)
    if text is None:
        text = view.texts[lang] = t("st.unit", lang, v=view, lines=view.systems, note=None)
    editable = who.person is not None and status.may_edit(who.person, view.unit_code)
    if editable and view.active:
        await ask(target, state, text, [
            Choice(t("btn.st_update", lang), StEdit(unit=view.unit_code).pack(),
                   ("cap nhat", "update")),
        ])
    else:
        await target.answer(text)


async def refuse(event: Message | CallbackQuery, lang: str) -> None:
    """Another unit's data (e.g. forged or stale callback data): an alert, nothing changes."""
    if isinstance(event, CallbackQuery):
        await event.answer(t("status.outcome.forbidden", lang), show_alert=True)
    else:
        await event.answer(t("status.outcome.forbidden", lang))


@router.message(Command("status"), flags={"perm": "status"})
async def menu(message: Message, state: FSMContext, who: Who, lang: str) -> None:
    await state.clear()
    items = []
    if who.person is not None and who.person.unit_code:
        items.append(("my", "btn.st_my", ("don vi cua toi", "my unit")))
    items += [("sys", "btn.st_sys", ("he thong", "system")),
              ("find", "btn.st_find", ("tra cuu", "tim", "search"))]
    if roles.allowed(who.role, "overview"):
        items += [("ov", "btn.st_overview", ("tong quan", "overview")),
                  ("rep", "btn.st_report", ("bao cao", "report")),
                  ("chart", "btn.st_chart", ("bieu do", "chart"))]
    choices = [Choice(t(key, lang), StMenu(a=a).pack(), words) for a, key, words in items]
    await ask(message, state, t("st.menu", lang), choices)


@router.message(Command("unit"), flags={"perm": "unit"})
async def unit_cmd(message: Message, command: CommandObject, state: FSMContext,
                   session: AsyncSession, who: Who, lang: str, settings: Settings) -> None:
    """/unit: my unit's status in one message; /unit NAME: look a unit up by name."""
    query = (command.args or "").strip()[:200]
    if query:
        await state.set_state(StFlow.find)
        await state.update_data(find_query=query)
        await find_page(message, state, session, lang, query, 0)
    elif who.person is not None and who.person.unit_code:
        await show_unit(message, state, session, who, lang, settings, who.person.unit_code)
    else:
        await message.answer(t("st.no_unit", lang))


@router.message(TypedChoice(StMenu), flags={"perm": "status"})
@router.callback_query(StMenu.filter(), flags={"perm": "status"})
async def menu_choice(
    event: Message | CallbackQuery, callback_data: StMenu, state: FSMContext,
    session: AsyncSession, who: Who, lang: str, settings: Settings,
) -> None:
    target = await reply_target(event)
    a = callback_data.a
    if a in ("ov", "rep", "chart") and not roles.allowed(who.role, "overview"):
        await target.answer(t("common.forbidden", lang))
        return
    if a == "my":
        if who.person is None or not who.person.unit_code:
            await target.answer(t("st.no_unit", lang))
            return
        await show_unit(target, state, session, who, lang, settings, who.person.unit_code)
    elif a == "sys":
        systems = await status.load_systems(session)
        await ask(target, state, t("st.pick_system", lang), [
            Choice(f"{s.abbr} — {s.name(lang)}", StSys(code=s.code).pack(), (s.abbr, s.code))
            for s in systems])
    elif a == "find":
        await state.set_state(StFlow.find)
        await target.answer(t("st.ask_unit", lang))
    elif a == "ov":
        await overview(target, state, session, who, lang, settings, 0)
    elif a == "rep":
        await report(target, session, who, lang, settings)
    elif a == "chart":
        await chart(target, session, who, lang)


def operator_province(who: Who) -> str | None:
    return who.unit.province_code if who.unit is not None else None


async def overview(target: Message, state: FSMContext, session: AsyncSession, who: Who,
                   lang: str, settings: Settings, offset: int) -> None:
    prov = operator_province(who)
    today = today_in(settings)
    if offset == 0:
        ov = await status.province_overview(session, prov, today)
        await target.answer(t("st.overview", lang, ov=ov, stages=STAGES))
    rows, total = await status.overdue_units(session, prov, today, offset=offset, limit=PAGE)
    choices = []
    if offset + PAGE < total:
        choices.append(Choice(t("btn.more", lang), StPage(what="overdue",
                                                          offset=offset + PAGE).pack(),
                              ("them", "more", "tiep")))
    text = t("st.overdue", lang, rows=rows, total=total, offset=offset)
    if choices:
        await ask(target, state, text, choices)
    else:
        await target.answer(text)


async def report(target: Message, session: AsyncSession, who: Who, lang: str,
                 settings: Settings) -> None:
    prov = operator_province(who)
    data = await reports.export_status_xlsx(session, province_code=prov,
                                            today=today_in(settings), lang=lang)
    name = f"trang-thai-{prov or 'ca-nuoc'}-{today_in(settings):%Y%m%d}.xlsx"
    await target.answer_document(BufferedInputFile(data, filename=name),
                                 caption=t("st.report_caption", lang))


async def chart(target: Message, session: AsyncSession, who: Who, lang: str) -> None:
    png = await reports.progress_chart_png(session, province_code=operator_province(who),
                                           lang=lang)
    await target.answer_photo(BufferedInputFile(png, filename="tien-do.png"),
                              caption=t("st.chart_caption", lang))


@router.message(Command("overview"), flags={"perm": "overview"})
async def overview_cmd(message: Message, state: FSMContext, session: AsyncSession, who: Who,
                       lang: str, settings: Settings) -> None:
    await overview(message, state, session, who, lang, settings, 0)


@router.message(Command("export"), flags={"perm": "report"})
async def report_cmd(message: Message, session: AsyncSession, who: Who, lang: str,
                     settings: Settings) -> None:
    await report(message, session, who, lang, settings)


@router.message(Command("chart"), flags={"perm": "chart"})
async def chart_cmd(message: Message, session: AsyncSession, who: Who, lang: str) -> None:
    await chart(message, session, who, lang)


@router.message(TypedChoice(StSys), flags={"perm": "status"})
@router.callback_query(StSys.filter(), flags={"perm": "status"})
async def system_view(event: Message | CallbackQuery, callback_data: StSys,
                      session: AsyncSession, who: Who, lang: str, settings: Settings) -> None:
    target = await reply_target(event)
    prov = who.unit.province_code if who.unit is not None else None
    view = await status.system_status(session, callback_data.code, province_code=prov,
                                      today=today_in(settings))
    if view is None:
        await target.answer(t("st.system_unknown", lang))
        return
    await target.answer(t("st.system", lang, v=view, stages=STAGES))


async def find_page(target: Message, state: FSMContext, session: AsyncSession, lang: str,
                    query: str, offset: int) -> None:
    found = await search_units(session, query, include_defunct=True, limit=PAGE, offset=offset)
    if not found.items:
        await target.answer(t("st.find_none", lang, query=query))
        return
    choices = []
    for u in found.items:
        code = u.code if u.active or not u.merged_into else u.merged_into
        label = u.name if u.active else f"{u.name} → {u.merged_into_name}"
        choices.append(Choice(f"{label} — {u.province_name}" if u.province_name else label,
                              StUnit(code=code).pack()))
    if offset + PAGE < found.total:
        choices.append(Choice(t("btn.more", lang), StPage(what="find",
                                                          offset=offset + PAGE).pack(),
                              ("them", "more", "tiep")))
    await ask(target, state, t("st.find_results", lang, total=found.total, offset=offset,
                               shown=len(found.items), query=query), choices)


@router.message(TypedChoice(StPage), flags={"perm": "status"})
@router.callback_query(StPage.filter(), flags={"perm": "status"})
async def next_page(event: Message | CallbackQuery, callback_data: StPage, state: FSMContext,
                    session: AsyncSession, who: Who, lang: str, settings: Settings) -> None:
    target = await reply_target(event)
    if callback_data.what == "overdue":
        if not roles.allowed(who.role, "overview"):
            await target.answer(t("common.forbidden", lang))
            return
        await overview(target, state, session, who, lang, settings, max(0, callback_data.offset))
        return
    query = (await state.get_data()).get("find_query")
    if not query:
        await target.answer(t("common.expired", lang))
        return
    await find_page(target, state, session, lang, query, max(0, callback_data.offset))


@router.message(TypedChoice(StUnit), flags={"perm": "status"})
@router.callback_query(StUnit.filter(), flags={"perm": "status"})
async def unit_view(event: Message | CallbackQuery, callback_data: StUnit, state: FSMContext,
                    session: AsyncSession, who: Who, lang: str, settings: Settings) -> None:
    target = await reply_target(event)
    await show_unit(target, state, session, who, lang, settings, callback_data.code)


@router.message(TypedChoice(StEdit), flags={"perm": "status_update"})
@router.callback_query(StEdit.filter(), flags={"perm": "status_update"})
async def edit_pick(event: Message | CallbackQuery, callback_data: StEdit, state: FSMContext,
                    session: AsyncSession, who: Who, lang: str) -> None:
    if who.person is None or not status.may_edit(who.person, callback_data.unit):
        await refuse(event, lang)
        return
    target = await reply_target(event)
    if not callback_data.sys:
        systems = await status.load_systems(session)
        await ask(target, state, t("st.edit_system", lang), [
            Choice(f"{s.abbr} — {s.name(lang)}",
                   StEdit(unit=callback_data.unit, sys=s.code).pack(), (s.abbr, s.code))
            for s in systems])
        return
    await ask(target, state, t("st.edit_stage", lang), [
        Choice(t(f"stage.{st.value}", lang),
               StSet(unit=callback_data.unit, sys=callback_data.sys, stage=st.value).pack())
        for st in STAGES])


@router.message(TypedChoice(StSet), flags={"perm": "status_update"})
@router.callback_query(StSet.filter(), flags={"perm": "status_update"})
async def edit_stage(event: Message | CallbackQuery, callback_data: StSet, state: FSMContext,
                     who: Who, lang: str) -> None:
    if who.person is None or not status.may_edit(who.person, callback_data.unit):
        await refuse(event, lang)
        return
    target = await reply_target(event)
    await state.set_state(StFlow.note)
    await state.update_data(_choices=[], upd={"unit": callback_data.unit, "sys": callback_data.sys,
                                 "stage": callback_data.stage})
    await target.answer(t("st.ask_note", lang))


async def apply_change(target: Message, state: FSMContext, session: AsyncSession, who: Who,
                       lang: str, actor: Actor, note: str | None, confirm: bool) -> None:
    upd = (await state.get_data()).get("upd")
    if not upd or who.person is None:
        await state.clear()
        await target.answer(t("common.expired", lang))
        return
    res = await status.set_stage(session, upd["unit"], upd["sys"], upd["stage"], actor=actor,
                                 person=who.person, note=note, confirm_backwards=confirm)
    names = {s.code: s.abbr for s in await status.load_systems(session)}
    unit = await get_unit(session, upd["unit"])
    params = {"unit": unit.name if unit else upd["unit"],
              "system": names.get(upd["sys"], upd["sys"]),
              "old": t(f"stage.{res.old_stage.value}", lang) if res.old_stage else "",
              "new": t(f"stage.{res.new_stage.value}", lang) if res.new_stage else ""}
    text = t(f"status.outcome.{res.outcome.value}", lang, **params)
    if res.outcome is SetStageOutcome.needs_confirmation:
        await state.set_state(StFlow.confirm)
        await state.update_data(upd={**upd, "note": note})
        await ask(target, state, text, [
            Choice(t("btn.st_yes_back", lang), StConfirm(ok=1).pack(), ("co", "yes", "dong y")),
            Choice(t("btn.cancel", lang), StConfirm(ok=0).pack(), ("khong", "huy", "no")),
        ])
        return
    await state.clear()
    await target.answer(text)


@router.message(StFlow.note, F.text, flags={"perm": "status_update"})
async def edit_note(message: Message, state: FSMContext, session: AsyncSession, who: Who,
                    lang: str, actor: Actor) -> None:
    text = (message.text or "").strip()
    note = None if text in ("-", ".") or text.lower() in ("bo qua", "bỏ qua", "skip") else text
    await apply_change(message, state, session, who, lang, actor, note, confirm=False)


@router.message(StFlow.confirm, TypedChoice(StConfirm), flags={"perm": "status_update"})
@router.callback_query(StFlow.confirm, StConfirm.filter(), flags={"perm": "status_update"})
async def edit_confirm(event: Message | CallbackQuery, callback_data: StConfirm,
                       state: FSMContext, session: AsyncSession, who: Who, lang: str,
                       actor: Actor) -> None:
    target = await reply_target(event)
    if not callback_data.ok:
        await state.clear()
        await target.answer(t("common.cancelled", lang))
        return
    note = ((await state.get_data()).get("upd") or {}).get("note")
    await apply_change(target, state, session, who, lang, actor, note, confirm=True)


# typed choices above win over a new search typed in the same state
@router.message(StFlow.find, F.text, flags={"perm": "status"})
async def find_query(message: Message, state: FSMContext, session: AsyncSession,
                     lang: str) -> None:
    query = (message.text or "").strip()[:200]
    await state.update_data(find_query=query)
    await find_page(message, state, session, lang, query, 0)


@router.inline_query(flags={"perm": "status"})
async def inline_search(query: InlineQuery, session: AsyncSession, lang: str,
                        settings: Settings) -> None:
    text = query.query.strip()[:200]
    if not text:
        await query.answer([], cache_time=5, is_personal=True)
        return
    found = await search_units(session, text, include_defunct=True, limit=8)
    results = []
    today = today_in(settings)
    for u in found.items:
        code = u.code if u.active or not u.merged_into else u.merged_into
        view = await status.unit_status(session, code, today)
        if view is None:
            continue
        note = None if u.active else t("st.old_note", lang, old=u.name, new=u.merged_into_name)
        results.append(InlineQueryResultArticle(
            id=f"{u.code}"[:64], title=view.unit_name,
            description=t("st.inline_desc", lang, v=view),
            input_message_content=InputTextMessageContent(
                message_text=t("st.unit", lang, v=view, lines=view.systems, note=note)),
        ))
    await query.answer(results, cache_time=30, is_personal=True)


@router.message(StateFilter(StFlow.find, StFlow.note, StFlow.confirm), flags={"perm": "status"})
async def flow_other(message: Message, lang: str) -> None:
    await message.answer(t("common.use_buttons", lang))
