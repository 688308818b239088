"""Officials report problems from their phones: a short form, knowledge answers and open
tickets on the same system shown first, a code like HT-000123, and /mytickets."""

from __future__ import annotations

from aiogram import F, Router
from aiogram.dispatcher.event.bases import SkipHandler
from aiogram.filters import Command, StateFilter
from aiogram.filters.callback_data import CallbackData
from aiogram.fsm.context import FSMContext
from aiogram.fsm.state import State, StatesGroup
from aiogram.types import CallbackQuery, Message
from sqlalchemy.ext.asyncio import AsyncSession

from bot.middlewares import PostCommit
from db.models import Ticket
from handlers.desk import Desk, mirror_edit
from handlers.ui import (
    MAX_CHOICE_TEXT,
    Choice,
    TypedChoice,
    ask,
    match_choice,
    reply_target,
    stored_choices,
)
from knowledge.search import KnowledgeBase
from services import roles, status, tickets
from services.audit import Actor
from services.people import Who
from services.texts import norm_lang, t

router = Router(name=__name__)

MAX_SUMMARY = 4000
MAX_FILES = 10
BOT_DOWNLOAD_LIMIT = 20 * 1024 * 1024  # Telegram bots cannot fetch larger files
SEVERITIES = ("low", "normal", "high", "critical")
PAGE = 8


class Rep(StatesGroup):
    system = State()
    summary = State()
    severity = State()
    files = State()
    confirm = State()


class RepCb(CallbackData, prefix="rp"):
    step: str  # sys | sev | files | go
    value: str = ""


class MyCb(CallbackData, prefix="mt"):
    action: str  # page | show | info | reopen | rate
    code: str = ""
    value: int = 0


class Info(StatesGroup):
    text = State()


async def start_form(target: Message, state: FSMContext, session: AsyncSession, lang: str,
                     summary: str | None = None) -> None:
    await state.clear()
    await state.set_state(Rep.system)
    await state.update_data(rep={"summary": summary, "files": []})
    systems = await status.load_systems(session)
    choices = [Choice(f"{s.abbr} — {s.name(lang)}", RepCb(step="sys", value=s.code).pack(),
                      (s.abbr, s.code)) for s in systems]
    choices.append(Choice(t("btn.tk_other_system", lang), RepCb(step="sys", value="-").pack(),
                          ("khac", "other")))
    await ask(target, state, t("tk.ask_system", lang), choices)


@router.message(Command("ticket"), flags={"perm": "ticket"})
async def new_ticket(message: Message, state: FSMContext, session: AsyncSession,
                     lang: str) -> None:
    await start_form(message, state, session, lang)


async def _rep(state: FSMContext) -> dict:
    return dict((await state.get_data()).get("rep") or {})


@router.message(Rep.system, TypedChoice(RepCb), flags={"perm": "ticket"})
@router.callback_query(Rep.system, RepCb.filter(F.step == "sys"), flags={"perm": "ticket"})
async def on_system(event: Message | CallbackQuery, callback_data: RepCb, state: FSMContext,
                    lang: str) -> None:
    target = await reply_target(event)
    rep = await _rep(state)
    rep["system"] = None if callback_data.value == "-" else callback_data.value
    await state.update_data(rep=rep, _choices=[])
    if rep.get("summary"):
        await ask_severity(target, state, lang)
        return
    await state.set_state(Rep.summary)
    await target.answer(t("tk.ask_summary", lang))


async def ask_severity(target: Message, state: FSMContext, lang: str) -> None:
    await state.set_state(Rep.severity)
    await ask(target, state, t("tk.ask_severity", lang), [
        Choice(t(f"btn.tk_sev_{s}", lang), RepCb(step="sev", value=s).pack(),
               (s, t(f"ticket.severity.{s}", lang)))  # "khẩn cấp" typed works too
        for s in SEVERITIES])


@router.message(Rep.summary, F.text, flags={"perm": "ticket"})
async def on_summary(message: Message, state: FSMContext, lang: str) -> None:
    text = (message.text or "").strip()
    if not text:
        await message.answer(t("tk.summary_empty", lang))
        return
    if len(text) > MAX_SUMMARY:
        await message.answer(t("tk.summary_long", lang, max=MAX_SUMMARY, n=len(text)))
        return
    rep = await _rep(state)
    rep["summary"] = text
    await state.update_data(rep=rep)
    await ask_severity(message, state, lang)


@router.message(Rep.severity, TypedChoice(RepCb), flags={"perm": "ticket"})
@router.callback_query(Rep.severity, RepCb.filter(F.step == "sev"), flags={"perm": "ticket"})
async def on_severity(event: Message | CallbackQuery, callback_data: RepCb, state: FSMContext,
                      lang: str) -> None:
    target = await reply_target(event)
    if callback_data.value not in SEVERITIES:
        await target.answer(t("common.use_buttons", lang))
        return
    rep = await _rep(state)
    rep["severity"] = callback_data.value
    await state.update_data(rep=rep)
    await state.set_state(Rep.files)
    await ask(target, state, t("tk.ask_files", lang, max=MAX_FILES), [
        Choice(t("btn.tk_files_done", lang), RepCb(step="files").pack(),
               ("xong", "bo qua", "done", "skip"))])


@router.message(Rep.files, F.photo | F.document, flags={"perm": "ticket"})
async def on_file(message: Message, state: FSMContext, lang: str) -> None:
    rep = await _rep(state)
    files = list(rep.get("files") or [])
    if len(files) >= MAX_FILES:
        await message.answer(t("tk.files_full", lang, max=MAX_FILES))
        return
    if message.photo:
        p = message.photo[-1]
        item = {"kind": "photo", "file_id": p.file_id, "file_name": None,
                "file_size": p.file_size}
    else:
        d = message.document
        assert d is not None
        item = {"kind": "document", "file_id": d.file_id, "file_name": d.file_name,
                "file_size": d.file_size}
    if (item["file_size"] or 0) > BOT_DOWNLOAD_LIMIT:
        await message.answer(t("tk.file_too_big", lang, mb=BOT_DOWNLOAD_LIMIT // 2**20))
        return
    files.append(item)
    rep["files"] = files
    await state.update_data(rep=rep)
    await message.answer(t("tk.file_added", lang, n=len(files)))


@router.message(Rep.files, TypedChoice(RepCb), flags={"perm": "ticket"})
@router.callback_query(Rep.files, RepCb.filter(F.step == "files"), flags={"perm": "ticket"})
async def on_files_done(event: Message | CallbackQuery, state: FSMContext,
                        session: AsyncSession, who: Who, lang: str, kb: KnowledgeBase) -> None:
    target = await reply_target(event)
    rep = await _rep(state)
    hints = [h.entry for h in kb.search(rep.get("summary") or "", lang, limit=2) if h.confident]
    unit = who.person.unit_code if who.person else None
    same = await tickets.similar_open(session, rep.get("system"), unit) if rep.get("system") \
        else []
    await state.set_state(Rep.confirm)
    choices = [Choice(t("btn.tk_send", lang), RepCb(step="go", value="new").pack(),
                      ("gui", "send"))]
    choices += [Choice(t("btn.tk_follow", lang, code=tk.code),
                       RepCb(step="go", value=tk.code).pack()) for tk in same[:3]]
    choices.append(Choice(t("btn.cancel", lang), RepCb(step="go", value="cancel").pack(),
                          ("huy", "cancel")))
    system = next((f"{x.abbr} — {x.name(lang)}" for x in await status.load_systems(session)
                   if x.code == rep.get("system")), None)
    await ask(target, state, t("tk.confirm", lang, rep=rep, system=system,
                               files=len(rep.get("files") or []),
                               hints=[h.answer(lang) for h in hints], same=same,
                               sev=t(f"btn.tk_sev_{rep.get('severity', 'normal')}", lang)),
              choices)


@router.message(Rep.confirm, TypedChoice(RepCb), flags={"perm": "ticket"})
@router.callback_query(Rep.confirm, RepCb.filter(F.step == "go"), flags={"perm": "ticket"})
async def on_go(event: Message | CallbackQuery, callback_data: RepCb, state: FSMContext,
                session: AsyncSession, who: Who, lang: str, actor: Actor, desk: Desk,
                post: PostCommit) -> None:
    target = await reply_target(event)
    rep = await _rep(state)
    await state.clear()
    if callback_data.value == "cancel" or not rep.get("summary") or who.person is None:
        await target.answer(t("common.cancelled", lang))
        return
    if callback_data.value != "new":
        existing = await tickets.get_by_code(session, callback_data.value)
        if existing is None:
            await target.answer(t("tk.not_found", lang))
            return
        result = await tickets.act(session, existing.id, "add_info", who.person, actor=actor,
                                   reason=rep["summary"])
        _tell_group(post, desk, result, "sp.log.add_info", who.person.full_name)
        await target.answer(t("tk.followed", lang, code=existing.code, ok=result.ok))
        return
    try:
        ticket = await tickets.create_ticket(
            session, who.person, summary=rep["summary"], system_code=rep.get("system"),
            severity=rep.get("severity") or "normal",
            attachments=[tickets.AttachmentIn(**f) for f in rep.get("files") or []],
            actor=actor, cal=desk.settings.sla_calendar)
    except tickets.TicketError as exc:
        await target.answer(t(f"tk.err.{exc.code}", lang))
        return
    incident = await tickets.open_incident_for(session, ticket.system_code)
    if incident is not None:  # a known problem: link it so its resolution reaches this reporter
        await tickets.link_to_incident(session, incident.id, [ticket.id], who.person, actor)
    post.add(desk.kick)
    sent = await target.answer(t("tk.created", lang, code=ticket.code, due=ticket.sla_due_at,
                                 incident=incident.title if incident is not None else None))
    # replying to this notice later adds to the ticket
    await tickets.add_message(session, ticket, "system", None, None,
                              dst=(str(sent.chat.id), sent.message_id))


@router.message(StateFilter(Rep.system, Rep.severity, Rep.files, Rep.confirm),
                flags={"perm": "ticket"})
async def form_other(message: Message, lang: str) -> None:
    await message.answer(t("common.use_buttons", lang))


async def show_list(target: Message, state: FSMContext, session: AsyncSession, who: Who,
                    lang: str, offset: int) -> None:
    assert who.person is not None
    rows, total = await tickets.list_for_reporter(session, who.person.id, offset=offset,
                                                  limit=PAGE)
    if not rows:
        await target.answer(t("tk.none", lang))
        return
    choices = [Choice(f"{tk.code} — {t('ticket.status.' + tk.status, lang)}",
                      MyCb(action="show", code=tk.code).pack(), (tk.code.lower(),))
               for tk in rows]
    if offset + PAGE < total:
        choices.append(Choice(t("btn.more", lang), MyCb(action="page",
                                                        value=offset + PAGE).pack()))
    await ask(target, state, t("tk.list", lang, rows=rows, total=total, offset=offset), choices)


@router.message(Command("mytickets"), flags={"perm": "mytickets"})
async def my_tickets(message: Message, state: FSMContext, session: AsyncSession, who: Who,
                     lang: str) -> None:
    await state.clear()
    await show_list(message, state, session, who, lang, 0)


@router.message(TypedChoice(MyCb), flags={"perm": "ticket"})
@router.callback_query(MyCb.filter(), flags={"perm": "ticket"})
async def my_ticket_action(event: Message | CallbackQuery, callback_data: MyCb,
                           state: FSMContext, session: AsyncSession, who: Who, lang: str,
                           actor: Actor, desk: Desk, post: PostCommit) -> None:
    assert who.person is not None
    if callback_data.action == "page":
        await show_list(await reply_target(event), state, session, who, lang,
                        max(0, callback_data.value))
        return
    ticket = await tickets.get_by_code(session, callback_data.code)
    if ticket is None or ticket.reporter_id != who.person.id:  # another's or forged
        if isinstance(event, CallbackQuery):
            await event.answer(t("tk.not_yours", lang), show_alert=True)
        else:
            await event.answer(t("tk.not_yours", lang))
        return
    target = await reply_target(event)
    if callback_data.action == "show":
        choices = [Choice(t("btn.tk_add_info", lang),
                          MyCb(action="info", code=ticket.code).pack(), ("bo sung", "add"))]
        if ticket.status in ("resolved", "closed"):
            choices.append(Choice(t("btn.tk_reopen", lang),
                                  MyCb(action="reopen", code=ticket.code).pack(),
                                  ("mo lai", "reopen")))
            if ticket.csat is None:
                choices += [Choice("⭐" * n, MyCb(action="rate", code=ticket.code,
                                                  value=n).pack()) for n in range(1, 6)]
        await ask(target, state, t("tk.detail", lang, tk=ticket,
                                   st=t("ticket.status." + ticket.status, lang),
                                   sev=t("ticket.severity." + ticket.severity, lang)), choices)
    elif callback_data.action == "info":
        await state.set_state(Info.text)
        await state.update_data(info_code=ticket.code, _choices=[])
        await target.answer(t("tk.ask_info", lang, code=ticket.code))
    else:
        result = await tickets.act(session, ticket.id, callback_data.action, who.person,
                                   actor=actor, value=callback_data.value or None,
                                   cal=desk.settings.sla_calendar)
        _tell_group(post, desk, result, f"sp.log.{callback_data.action}",
                    who.person.full_name, value=callback_data.value)
        await target.answer(t(f"tk.act.{result.outcome}", lang, code=ticket.code,
                              action=callback_data.action))


@router.message(Info.text, F.text, flags={"perm": "ticket"})
async def on_info(message: Message, state: FSMContext, session: AsyncSession, who: Who,
                  lang: str, actor: Actor, desk: Desk, post: PostCommit) -> None:
    code = (await state.get_data()).get("info_code")
    await state.clear()
    ticket = await tickets.get_by_code(session, code or "")
    if ticket is None or who.person is None or ticket.reporter_id != who.person.id:
        await message.answer(t("tk.not_yours", lang))
        return
    result = await tickets.act(session, ticket.id, "add_info", who.person, actor=actor,
                               reason=(message.text or "").strip()[:MAX_SUMMARY])
    _tell_group(post, desk, result, "sp.log.add_info", who.person.full_name,
                text=(message.text or "").strip()[:MAX_SUMMARY])
    await message.answer(t(f"tk.act.{result.outcome}", lang, code=ticket.code,
                           action="add_info"))


def _tell_group(post: PostCommit, desk: Desk, result: tickets.ActResult, key: str, name: str,
                **params: object) -> None:
    """The reporter did something to their ticket: the support group sees it."""
    if not result.ok or result.ticket is None:
        return
    tid = result.ticket.id
    post.add(lambda: desk.tell_group(tid, key, name=name, **params))
    post.add(lambda: desk.refresh_card(tid))


# ------------------------------------------------------- the reporter's messages to support

RELAYED = {"text", "photo", "document", "video", "audio", "voice", "animation"}


class PickCb(CallbackData, prefix="tkp"):
    code: str  # the ticket the message belongs to; "-" = it is a question, not for a ticket


async def relay_from_reporter(message: Message, ticket: Ticket, who: Who, lang: str,
                              actor: Actor, session: AsyncSession, desk: Desk,
                              post: PostCommit, src_message_id: int | None = None,
                              text_: str | None = None) -> None:
    """Store the reporter's message on the ticket and copy it into the ticket's topic."""
    assert who.person is not None
    result = await tickets.act(session, ticket.id, "reporter_reply", who.person, actor=actor,
                               cal=desk.settings.sla_calendar)
    if not result.ok:
        key = "tk.closed_use_reopen" if ticket.status == "closed" else f"tk.act.{result.outcome}"
        await message.answer(t(key, lang, code=ticket.code))
        return
    src_id = src_message_id or message.message_id
    body = text_ if text_ is not None else (message.text or message.caption)
    row = await tickets.add_message(session, ticket, "reporter", who.person, body,
                                    src=(str(message.chat.id), src_id))
    await session.flush()
    row_id, chat_id, name, tid = row.id, message.chat.id, who.person.full_name, ticket.id
    post.add(lambda: desk.relay_to_group(row_id, chat_id, src_id, name))
    if result.changed:
        post.add(lambda: desk.refresh_card(tid))
    await message.answer(t("tk.relayed", lang, code=ticket.code,
                           published=ticket.group_chat_id is not None))


@router.message(StateFilter(None), F.chat.type == "private", F.reply_to_message,
                F.content_type.in_(RELAYED), ~F.text.startswith("/"))
async def reply_to_ticket(message: Message, session: AsyncSession, who: Who | None,
                          lang: str, actor: Actor, desk: Desk, post: PostCommit) -> None:
    """Replying to any message of a ticket (a relayed answer, a status notice) adds to it."""
    reply = message.reply_to_message
    assert reply is not None
    ticket = await tickets.by_message(session, str(message.chat.id), reply.message_id)
    if ticket is None or who is None or who.person is None \
            or ticket.reporter_id != who.person.id:
        raise SkipHandler  # not about a ticket of theirs: a question like any other
    await relay_from_reporter(message, ticket, who, lang, actor, session, desk, post)


@router.message(StateFilter(None), F.chat.type == "private", F.content_type.in_(RELAYED),
                ~F.text.startswith("/"))
async def loose_message(message: Message, state: FSMContext, session: AsyncSession,
                        who: Who | None) -> None:
    """A message that is not a reply, from someone with open tickets: a file always belongs
    to one of them, a text may (when support is waiting for an answer) or may be a question.
    Ask which instead of piling everything into one ticket."""
    if who is None or who.person is None or not roles.allowed(who.role, "ticket"):
        raise SkipHandler
    is_text = message.content_type == "text"
    if is_text and len(message.text or "") <= MAX_CHOICE_TEXT and match_choice(
            message.text or "", await stored_choices(state)) is not None:
        raise SkipHandler  # a typed answer to the buttons just shown
    open_ = await tickets.open_for_reporter(session, who.person.id, limit=6)
    if not open_ or (is_text and not any(x.status == "waiting_reporter" for x in open_)):
        raise SkipHandler
    lang = norm_lang(who.lang)
    choices = [Choice(f"{x.code} — {x.summary.splitlines()[0][:40]}",
                      PickCb(code=x.code).pack(), (x.code.lower(),)) for x in open_]
    if is_text:
        choices.append(Choice(t("btn.tk_is_question", lang), PickCb(code="-").pack(),
                              ("cau hoi", "question")))
    await state.update_data(pick={"id": message.message_id,
                                  "text": (message.text or message.caption or "")[:MAX_SUMMARY]})
    await ask(message, state, t("tk.pick_ticket", lang), choices)


@router.message(StateFilter(None), TypedChoice(PickCb), flags={"perm": "ticket"})
@router.callback_query(PickCb.filter(), flags={"perm": "ticket"})
async def on_pick(event: Message | CallbackQuery, callback_data: PickCb, state: FSMContext,
                  session: AsyncSession, who: Who, lang: str, actor: Actor, desk: Desk,
                  post: PostCommit, kb: KnowledgeBase) -> None:
    target = await reply_target(event)
    pick = (await state.get_data()).get("pick") or {}
    await state.update_data(pick=None, _choices=[])
    if not pick:
        await target.answer(t("common.stale_button", lang))
        return
    if callback_data.code == "-":
        from handlers.knowledge import answer_question  # it imports this module

        await answer_question(target, pick.get("text") or "", state, kb, lang, who)
        return
    ticket = await tickets.get_by_code(session, callback_data.code)
    assert who.person is not None
    if ticket is None or ticket.reporter_id != who.person.id:
        await target.answer(t("tk.not_yours", lang))
        return
    await relay_from_reporter(target, ticket, who, lang, actor, session, desk, post,
                              src_message_id=int(pick["id"]), text_=pick.get("text"))


@router.edited_message(F.chat.type == "private")
async def reporter_edit(message: Message, session: AsyncSession, desk: Desk,
                        post: PostCommit) -> None:
    """The reporter corrected a message already relayed: correct the group's copy too."""
    await mirror_edit(message, session, desk, post)
