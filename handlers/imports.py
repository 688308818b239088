"""Operators import staff and unit lists by sending a CSV/XLSX file: dry run, report, confirm."""

from __future__ import annotations

from typing import Any

from aiogram import Bot, F, Router
from aiogram.filters import Command, StateFilter
from aiogram.filters.callback_data import CallbackData
from aiogram.fsm.context import FSMContext
from aiogram.fsm.state import State, StatesGroup
from aiogram.types import CallbackQuery, Message
from sqlalchemy.ext.asyncio import AsyncSession

from handlers.ui import Choice, TypedChoice, answer_long, ask, reply_target
from services import imports
from services.audit import Actor
from services.texts import t

router = Router(name=__name__)

MAX_BYTES = 10 * 1024 * 1024  # services.imports refuses more; Telegram bots may fetch 20 MB
REPORT_ROWS = 200


class Imp(StatesGroup):
    file = State()
    kind = State()
    confirm = State()


class KindCb(CallbackData, prefix="ik"):
    kind: str  # staff | units


class ApplyCb(CallbackData, prefix="ia"):
    action: str  # apply | cancel


def render_report(report: imports.ImportReport, lang: str) -> str:
    errors = [
        t("import.row_error", lang, row=e.row, column=e.column,
          reason=t(f"import.err.{e.code}", lang, value=e.value, column=e.column,
                   **(e.detail or {})))
        for e in report.errors[:REPORT_ROWS]
    ]
    return t("import.report", lang, r=report, kind=t(f"import.kind_{report.kind}", lang),
             errors=errors, more=max(0, len(report.errors) - REPORT_ROWS))


async def _run(bot: Bot, session: AsyncSession, data: dict[str, Any], actor: Actor, *,
               dry_run: bool, skip_invalid: bool) -> imports.ImportReport:
    buf = await bot.download(data["file_id"])
    assert buf is not None
    fn = imports.import_staff if data["kind"] == "staff" else imports.import_units
    return await fn(session, buf.read(), data["file_name"], actor, dry_run=dry_run,
                    skip_invalid=skip_invalid)


@router.message(Command("import"), flags={"perm": "import"})
async def start_import(message: Message, state: FSMContext, lang: str) -> None:
    await state.clear()
    await state.set_state(Imp.file)
    await message.answer(t("import.send_file", lang))


@router.message(StateFilter(None, Imp.file), F.document, flags={"perm": "import"})
async def on_file(message: Message, state: FSMContext, lang: str) -> None:
    doc = message.document
    assert doc is not None
    name = doc.file_name or "file"
    if not name.lower().endswith((".csv", ".xlsx", ".txt")):
        await message.answer(t("import.bad_type", lang, name=name))
        return
    if doc.file_size is not None and doc.file_size > MAX_BYTES:
        await message.answer(t("import.too_big", lang, mb=MAX_BYTES // (1024 * 1024)))
        return
    await state.set_state(Imp.kind)
    await state.set_data({"file_id": doc.file_id, "file_name": name})
    choices = [
        Choice(t("btn.import_staff", lang), KindCb(kind="staff").pack(), ("can bo", "staff")),
        Choice(t("btn.import_units", lang), KindCb(kind="units").pack(), ("don vi", "units")),
    ]
    await ask(message, state, t("import.choose_kind", lang, name=name), choices)


@router.message(Imp.kind, TypedChoice(KindCb), flags={"perm": "import"})
@router.callback_query(Imp.kind, KindCb.filter(), flags={"perm": "import"})
async def on_kind(
    event: Message | CallbackQuery, callback_data: KindCb, state: FSMContext,
    session: AsyncSession, bot: Bot, lang: str, actor: Actor,
) -> None:
    target = await reply_target(event)
    await state.update_data(kind=callback_data.kind)
    data = await state.get_data()
    try:
        report = await _run(bot, session, data, actor, dry_run=True, skip_invalid=False)
    except imports.ImportFileError as exc:
        await state.clear()
        await target.answer(t(f"import.file_err.{exc.code}", lang, **exc.detail))
        return
    await answer_long(target, render_report(report, lang))
    if report.valid_rows == 0:
        await state.clear()
        await target.answer(t("import.nothing_valid", lang))
        return
    await state.set_state(Imp.confirm)
    await state.update_data(skip_invalid=bool(report.errors))
    label = "btn.import_skip_invalid" if report.errors else "btn.import_apply"
    choices = [
        Choice(t(label, lang, n=report.valid_rows), ApplyCb(action="apply").pack(),
               ("nhap", "apply", "dong y")),
        Choice(t("btn.cancel", lang), ApplyCb(action="cancel").pack(), ("huy", "cancel")),
    ]
    await ask(target, state, t("import.confirm", lang, n=report.valid_rows,
                               bad=len(report.errors)), choices)


@router.message(Imp.confirm, TypedChoice(ApplyCb), flags={"perm": "import"})
@router.callback_query(Imp.confirm, ApplyCb.filter(), flags={"perm": "import"})
async def on_apply(
    event: Message | CallbackQuery, callback_data: ApplyCb, state: FSMContext,
    session: AsyncSession, bot: Bot, lang: str, actor: Actor,
) -> None:
    target = await reply_target(event)
    data = await state.get_data()
    await state.clear()
    if callback_data.action != "apply" or "file_id" not in data:
        await target.answer(t("common.cancelled", lang))
        return
    try:
        report = await _run(bot, session, data, actor, dry_run=False,
                            skip_invalid=bool(data.get("skip_invalid")))
    except imports.ImportFileError as exc:
        await target.answer(t(f"import.file_err.{exc.code}", lang, **exc.detail))
        return
    await target.answer(t("import.applied", lang, r=report))


@router.message(Imp.file, flags={"perm": "import"})
async def waiting_file(message: Message, lang: str) -> None:
    await message.answer(t("import.send_file", lang))
