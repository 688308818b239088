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

from bot.config import Settings
from handlers.ui import Choice, TypedChoice, answer_long, ask, end_form, reply_target
from knowledge.search import KnowledgeBase, KnowledgeError
from knowledge.store import add_faq_file
from services import imports, reports
from services.audit import Actor, audit
from services.people import Who
from services.texts import t

router = Router(name=__name__)

MAX_BYTES = 10 * 1024 * 1024  # services.imports refuses more; Telegram bots may fetch 20 MB
REPORT_ROWS = 200


class Imp(StatesGroup):
    file = State()
    kind = State()
    confirm = State()


class KindCb(CallbackData, prefix="ik"):
    kind: str  # staff | units | status


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
    content = await _download(bot, data)
    fn = imports.import_staff if data["kind"] == "staff" else imports.import_units
    return await fn(session, content, data["file_name"], actor, dry_run=dry_run,
                    skip_invalid=skip_invalid)


async def _download(bot: Bot, data: dict[str, Any]) -> bytes:
    buf = await bot.download(data["file_id"])
    assert buf is not None
    return buf.read()


async def _faq_import(
    target: Message, state: FSMContext, session: AsyncSession, bot: Bot, lang: str,
    actor: Actor, kb: KnowledgeBase, settings: Settings,
) -> None:
    """FAQ entries added or edited live (and kept for restarts); a bad file changes nothing."""
    data = await state.get_data()
    await state.clear()
    try:
        result = add_faq_file(kb, settings.data_dir, await _download(bot, data),
                              data["file_name"])
    except KnowledgeError as exc:
        await answer_long(target, t("import.faq_errors", lang, problems=exc.problems[:200]))
        return
    await audit(session, actor, "knowledge.import", "faq_file", data["file_name"],
                after=result)
    await target.answer(t("import.faq_done", lang, added=len(result["added"]),
                          updated=len(result["updated"])))


def render_status_report(report: reports.BulkStatusReport, lang: str) -> str:
    errors = [reports.error_text(e, lang) for e in report.errors[:REPORT_ROWS]]
    diff = [t("import.status_diff", lang, d=d, old=t(f"stage.{d.old_stage.value}", lang),
              new=t(f"stage.{d.new_stage.value}", lang)) for d in report.diff[:REPORT_ROWS]]
    return t("import.status_report", lang, r=report, errors=errors, diff=diff,
             more=max(0, len(report.diff) + len(report.errors) - 2 * REPORT_ROWS))


async def _status_import(
    target: Message, state: FSMContext, session: AsyncSession, bot: Bot, lang: str,
    actor: Actor, who: Who, *, dry_run: bool,
) -> None:
    """Bulk status update: the dry run shows the diff, applying needs a confirmation."""
    data = await state.get_data()
    if who.person is None:
        await state.clear()
        await target.answer(t("common.not_verified", lang))
        return
    try:
        report = await reports.import_status_xlsx(session, await _download(bot, data),
                                                  data["file_name"], actor, who.person,
                                                  dry_run=dry_run)
    except reports.StatusImportError as exc:
        await state.clear()
        await target.answer(exc.text(lang))
        return
    if not dry_run:
        await state.clear()
        await target.answer(t("import.status_applied", lang, r=report))
        return
    await answer_long(target, render_status_report(report, lang))
    if report.errors or not report.diff:
        await state.clear()
        await target.answer(t("import.status_nothing", lang, errors=len(report.errors)))
        return
    await state.set_state(Imp.confirm)
    choices = [
        Choice(t("btn.import_apply", lang, n=len(report.diff)), ApplyCb(action="apply").pack(),
               ("nhap", "apply", "dong y")),
        Choice(t("btn.cancel", lang), ApplyCb(action="cancel").pack(), ("huy", "cancel")),
    ]
    await ask(target, state, t("import.confirm", lang, n=len(report.diff), bad=0), choices)


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
    if not name.lower().endswith((".csv", ".xlsx", ".txt", ".toml")):
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
        Choice(t("btn.import_status", lang), KindCb(kind="status").pack(),
               ("trang thai", "status")),
        Choice(t("btn.import_faq", lang), KindCb(kind="faq").pack(), ("hoi dap", "faq")),
    ]
    await ask(message, state, t("import.choose_kind", lang, name=name), choices)


@router.message(Imp.kind, TypedChoice(KindCb), flags={"perm": "import"})
@router.callback_query(Imp.kind, KindCb.filter(), flags={"perm": "import"})
async def on_kind(
    event: Message | CallbackQuery, callback_data: KindCb, state: FSMContext,
    session: AsyncSession, bot: Bot, lang: str, actor: Actor, who: Who, kb: KnowledgeBase,
    settings: Settings,
) -> None:
    target = await reply_target(event)
    await state.update_data(kind=callback_data.kind)
    if callback_data.kind == "status":
        await _status_import(target, state, session, bot, lang, actor, who, dry_run=True)
        return
    if callback_data.kind == "faq":
        await _faq_import(target, state, session, bot, lang, actor, kb, settings)
        return
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
    session: AsyncSession, bot: Bot, lang: str, actor: Actor, who: Who,
) -> None:
    target, data = await end_form(event, state)
    if callback_data.action != "apply" or "file_id" not in data:
        await target.answer(t("common.cancelled", lang))
        return
    if data.get("kind") == "status":
        await state.set_data(data)
        await _status_import(target, state, session, bot, lang, actor, who, dry_run=False)
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
