"""Support staff triage tickets in their chat group: one forum topic (or one card, in a group
without topics) per ticket, buttons for the life cycle, messages relayed both ways, /queue,
incidents, and ticket statistics for operators."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta

from aiogram import F, Router
from aiogram.filters import Command, CommandObject
from aiogram.filters.callback_data import CallbackData
from aiogram.types import (
    BufferedInputFile,
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
)
from sqlalchemy.ext.asyncio import AsyncSession

from bot.config import Settings
from bot.middlewares import PostCommit
from db.models import Incident, Person, Ticket, utcnow
from handlers.desk import Desk, IncCb, TkAct, mirror_edit
from handlers.ui import Choice, keyboard, reply_target
from services import roles, status, ticket_stats, tickets
from services.audit import Actor
from services.folding import fold
from services.people import Who
from services.texts import t
from services.units import search_units

router = Router(name=__name__)
GROUP = F.chat.type.in_({"group", "supergroup"})
NOTE_WORDS = ("note", "ghichu", "noibo")  # after "#": "#note", "#ghichú", "#nộibộ"
QUEUE_PAGE = 10
MINE_WORDS = frozenset({"mine", "cua toi", "toi"})
UNASSIGNED_WORDS = frozenset({"unassigned", "chua nhan", "chua giao"})


class QCb(CallbackData, prefix="q"):
    f: str = ""  # m = mine, u = unassigned
    s: str = ""  # system code
    u: str = ""  # unit code
    o: int = 0


def _agent(who: Who | None) -> Person | None:
    if who is None or who.person is None or not roles.allowed(who.role, "support"):
        return None
    return who.person


@router.message(Command("supportgroup"), GROUP, flags={"perm": "supportgroup"})
async def set_group(message: Message, session: AsyncSession, who: Who, lang: str,
                    actor: Actor, desk: Desk, post: PostCommit) -> None:
    assert who.person is not None
    await tickets.set_support_group(session, str(message.chat.id), message.chat.title,
                                    bool(message.chat.is_forum), who.person, actor)
    await message.answer(t("sp.group_set", lang, forum=bool(message.chat.is_forum)))
    post.add(desk.kick)  # tickets reported before the group existed appear now


@router.callback_query(TkAct.filter())
async def on_card_button(callback: CallbackQuery, callback_data: TkAct,
                         session: AsyncSession, who: Who | None, lang: str, actor: Actor,
                         desk: Desk, post: PostCommit) -> None:
    """Only support staff may press; a button whose ticket is not the card it sits on (forged)
    or whose ticket moved on (stale) changes nothing."""
    person = _agent(who)
    if person is None:
        await callback.answer(t("sp.not_agent", lang), show_alert=True)
        return
    ticket = await tickets.get(session, callback_data.id)
    msg = callback.message
    if ticket is None or msg is None or ticket.card_message_id != msg.message_id \
            or ticket.group_chat_id != str(msg.chat.id):
        await callback.answer(t("sp.forged", lang), show_alert=True)
        return
    result = await tickets.act(session, ticket.id, callback_data.action, person, actor=actor,
                               value=callback_data.value or None,
                               cal=desk.settings.sla_calendar)
    if not result.ok or result.ticket is None:
        await callback.answer(t(f"tk.act.{result.outcome}", lang, code=ticket.code),
                              show_alert=True)
        return
    await callback.answer(t("sp.done", lang, action=t(f"sp.action.{callback_data.action}",
                                                         lang), code=ticket.code))
    _after_action(post, desk, result, person, callback_data.action)


def _after_action(post: PostCommit, desk: Desk, result: tickets.ActResult, person: Person,
                  action: str) -> None:
    """Tell the people the domain says should know, once the change is committed."""
    ticket = result.ticket
    assert ticket is not None
    tid, code, name = ticket.id, ticket.code, person.full_name
    post.add(lambda: desk.refresh_card(tid))
    if tickets.Notify.reporter in result.notify:
        key = "sp.need_info" if action == "need_info" else (
            "sp.resolved" if action == "resolve" else "sp.status_changed")
        post.add(lambda: desk.notify_reporter(tid, key))
    if action in ("claim", "need_info", "resolve", "escalate", "set_priority", "close"):
        post.add(lambda: desk.tell_group(tid, "sp.log." + action, name=name,
                                         p=ticket.priority))
    if tickets.Notify.operators in result.notify:
        post.add(lambda: desk.notify_staff("sp.escalated_ops", operators_only=True, code=code,
                                           name=name, summary=ticket.summary[:200]))


async def ticket_of_group_message(session: AsyncSession, message: Message) -> Ticket | None:
    """The ticket a group message belongs to: its forum topic, else the card or relayed
    message it replies to."""
    if message.message_thread_id and message.is_topic_message:
        found = await tickets.by_topic(session, str(message.chat.id), message.message_thread_id)
        if found is not None:
            return found
    reply = message.reply_to_message
    if reply is not None:
        return await tickets.by_message(session, str(message.chat.id), reply.message_id)
    return None


@router.message(Command("note"), GROUP)
async def note_cmd(message: Message, command: CommandObject, session: AsyncSession,
                   who: Who | None, lang: str) -> None:
    person = _agent(who)
    ticket = await ticket_of_group_message(session, message) if person else None
    if person is None or ticket is None or not (command.args or "").strip():
        await message.reply(t("sp.note_usage", lang))
        return
    await tickets.add_message(session, ticket, "note", person, command.args,
                              src=(str(message.chat.id), message.message_id))
    await message.reply(t("sp.note_saved", lang, code=ticket.code))


@router.message(GROUP, ~F.text.startswith("/"), F.content_type.in_(
    {"text", "photo", "document", "video", "audio", "voice", "animation", "sticker"}))
async def from_group(message: Message, session: AsyncSession, who: Who | None, lang: str,
                     actor: Actor, desk: Desk, post: PostCommit) -> None:
    """An agent writes in a ticket's topic (or replies to its card): relay it to the reporter,
    unless it is an internal note. Other chatter in the group is left alone."""
    ticket = await ticket_of_group_message(session, message)
    if ticket is None:
        return
    person = _agent(who)
    if person is None:
        return  # not staff: the group is theirs to talk in, nothing reaches the reporter
    text_ = message.text or message.caption or ""
    src = (str(message.chat.id), message.message_id)
    head = text_.lstrip()
    if head.startswith("#") and fold(head[1:]).startswith(NOTE_WORDS):
        await tickets.add_message(session, ticket, "note", person, text_, src=src)
        return
    if ticket.status == "closed":
        await message.reply(t("sp.closed_no_relay", lang, code=ticket.code))
        return
    result = await tickets.act(session, ticket.id, "reply", person, actor=actor,
                               cal=desk.settings.sla_calendar)
    row = await tickets.add_message(session, ticket, "agent", person, text_ or None, src=src)
    await session.flush()
    row_id, chat_id, mid, name = row.id, message.chat.id, message.message_id, person.full_name
    post.add(lambda: desk.relay_to_reporter(row_id, chat_id, mid, name))
    if result.ok and result.changed:
        post.add(lambda: desk.refresh_card(ticket.id))


@router.edited_message(GROUP)
async def group_edit(message: Message, session: AsyncSession, desk: Desk,
                     post: PostCommit) -> None:
    """An agent corrected a relayed message: correct the reporter's copy too."""
    await mirror_edit(message, session, desk, post)


# ---------------------------------------------------------------------------------- incidents


@router.callback_query(IncCb.filter())
async def on_incident(callback: CallbackQuery, callback_data: IncCb, session: AsyncSession,
                      who: Who | None, lang: str, actor: Actor, desk: Desk,
                      post: PostCommit) -> None:
    person = _agent(who)
    if person is None:
        await callback.answer(t("sp.not_agent", lang), show_alert=True)
        return
    s = desk.settings
    if callback_data.action == "open":
        rows = await tickets.incident_candidate(
            session, callback_data.sys, now=utcnow(),
            window=timedelta(minutes=s.incident_window_minutes), threshold=2)
        if not rows:
            await callback.answer(t("sp.incident_stale", lang), show_alert=True)
            return
        systems = {x.code: x for x in await status.load_systems(session)}
        system = systems.get(callback_data.sys)
        title = t("sp.incident_title", lang, system=system.name(lang) if system else
                  callback_data.sys)
        incident = await tickets.create_incident(session, callback_data.sys,
                                                 [r.id for r in rows], person, actor, title)
        target = await reply_target(callback)
        markup = _incident_markup(incident.id, lang)
        await target.answer(t("sp.incident_opened", lang, id=incident.id, title=title,
                              codes=[r.code for r in rows]), reply_markup=markup)
        for r in rows:
            post.add(_notice(desk, r.id, "sp.incident_known", title))
        return
    incident = await session.get(Incident, callback_data.id)
    title = incident.title if incident is not None else None
    resolved = await tickets.resolve_incident(session, callback_data.id, person, actor)
    if not resolved:
        await callback.answer(t("sp.incident_done_already", lang), show_alert=True)
        return
    await reply_target(callback)
    if isinstance(callback.message, Message):
        await callback.message.answer(t("sp.incident_resolved", lang, id=callback_data.id,
                                        n=len(resolved)))
    for r in resolved:
        post.add(_notice(desk, r.id, "sp.resolved", title))
        rid = r.id
        post.add(lambda rid=rid: desk.refresh_card(rid))


def _incident_markup(incident_id: int, lang: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(inline_keyboard=[[InlineKeyboardButton(
        text=t("btn.sp_incident_resolve", lang),
        callback_data=IncCb(action="resolve", id=incident_id).pack())]])


def _notice(desk: Desk, ticket_id: int, key: str,
            title: str | None = None) -> Callable[[], Awaitable[None]]:
    async def job() -> None:
        await desk.notify_reporter(ticket_id, key, title=title)
    return job


# ------------------------------------------------------------------------------------ queue


async def _parse_queue_args(session: AsyncSession, args: str) -> QCb | str:
    """``mine`` / ``unassigned``, a system code or abbreviation, a unit name; the error key
    for words that are none of these."""
    q = QCb()
    words = fold(args)
    if not words:
        return q
    systems = await status.load_systems(session)
    rest: list[str] = []
    for word in words.split():
        sys_match = next((x for x in systems if word in (x.code, fold(x.abbr))), None)
        if word in MINE_WORDS:
            q.f = "m"
        elif word in UNASSIGNED_WORDS:
            q.f = "u"
        elif sys_match is not None:
            q.s = sys_match.code
        else:
            rest.append(word)
    phrase = " ".join(rest)
    if phrase in MINE_WORDS:
        q.f = "m"
    elif phrase in UNASSIGNED_WORDS:
        q.f = "u"
    elif phrase:
        found = await search_units(session, phrase, limit=1)
        if not found.items:
            return "sp.queue_bad_filter"
        q.u = found.items[0].code
    return q


@router.message(Command("queue"), flags={"perm": "queue"})
async def queue_cmd(message: Message, command: CommandObject, session: AsyncSession,
                    who: Who, lang: str) -> None:
    parsed = await _parse_queue_args(session, command.args or "")
    if isinstance(parsed, str):
        await message.answer(t(parsed, lang, args=command.args or ""))
        return
    await show_queue(message, session, who, lang, parsed)


@router.callback_query(QCb.filter(), flags={"perm": "queue"})
async def queue_page(callback: CallbackQuery, callback_data: QCb, session: AsyncSession,
                     who: Who, lang: str) -> None:
    target = await reply_target(callback, drop_keyboard=False)
    await show_queue(target, session, who, lang, callback_data, edit=True)


async def show_queue(target: Message, session: AsyncSession, who: Who, lang: str, q: QCb,
                     edit: bool = False) -> None:
    rows, total = await tickets.queue(
        session, person=who.person, mine=q.f == "m", unassigned=q.f == "u",
        system_code=q.s or None, unit_code=q.u or None, now=utcnow(), offset=max(0, q.o),
        limit=QUEUE_PAGE, count_cap=1000)
    text_ = t("sp.queue", lang, rows=rows, total=total, offset=q.o, cap=1000,
              filters=q.model_dump(exclude={"o"}))
    nav = []
    if q.o > 0:
        nav.append(Choice(t("btn.prev", lang), q.model_copy(update={
            "o": max(0, q.o - QUEUE_PAGE)}).pack()))
    if q.o + QUEUE_PAGE < total:
        nav.append(Choice(t("btn.more", lang), q.model_copy(update={
            "o": q.o + QUEUE_PAGE}).pack()))
    markup = keyboard(nav, columns=2, numbered=False) if nav else None
    if edit:
        await target.edit_text(text_, reply_markup=markup)
    else:
        await target.answer(text_, reply_markup=markup)


# ------------------------------------------------------------------------------- statistics


@router.message(Command("ticketstats"), flags={"perm": "ticketstats"})
async def stats_cmd(message: Message, command: CommandObject, session: AsyncSession,
                    lang: str, settings: Settings) -> None:
    arg = (command.args or "").strip()
    days = int(arg) if arg.isdigit() and 0 < int(arg) <= 3660 else 30
    await send_stats(message, session, lang, settings, days)


async def send_stats(target: Message, session: AsyncSession, lang: str, settings: Settings,
                     days: int) -> None:
    now = utcnow()
    stats = await ticket_stats.ticket_stats(session, since=now - timedelta(days=days),
                                            until=now + timedelta(seconds=1), now=now,
                                            cal=settings.sla_calendar)
    await target.answer(t("sp.stats", lang, s=stats, days=days))
    data = ticket_stats.export_stats_xlsx(stats, lang, tz=settings.tz)
    await target.answer_document(BufferedInputFile(data, filename=f"phieu-ho-tro-{days}d.xlsx"))

