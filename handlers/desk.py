"""The Telegram side of the support desk: cards and topics in the support group, relayed
messages, and notices to reporters and staff.

Handlers and the ticket worker (``tasks/ticket_worker.py``, which gets these methods injected
by ``bot/app.py``) share it. Every method takes ids and opens its own session, so it can run
after the handler's transaction has committed (nobody is told of a change that rolled back)
and record where each copy landed (replying to any copy picks its ticket).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from aiogram import Bot
from aiogram.exceptions import TelegramAPIError
from aiogram.filters.callback_data import CallbackData
from aiogram.types import InlineKeyboardButton, InlineKeyboardMarkup, Message, MessageEntity
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.config import Settings
from bot.middlewares import PostCommit
from db.models import Person, Ticket, TicketMessage, TicketStatus, utcnow
from services import tickets
from services.texts import norm_lang, t

log = logging.getLogger(__name__)


class TkAct(CallbackData, prefix="ta"):
    """A card button: the action and the ticket it was drawn for (checked against the card
    message it sits on, so forged ids change nothing)."""

    action: str  # claim | need_info | resolve | escalate | set_priority | close
    id: int
    value: int = 0


class IncCb(CallbackData, prefix="ic"):
    action: str  # open | resolve
    sys: str = ""
    id: int = 0


def card_markup(ticket: Ticket, lang: str) -> InlineKeyboardMarkup:
    def b(label: str, action: str, value: int = 0, **params: object) -> InlineKeyboardButton:
        return InlineKeyboardButton(
            text=t(label, lang, **params),
            callback_data=TkAct(action=action, id=ticket.id, value=value).pack())

    if ticket.status == TicketStatus.closed:
        return InlineKeyboardMarkup(inline_keyboard=[])
    if ticket.status == TicketStatus.resolved:
        return InlineKeyboardMarkup(inline_keyboard=[[b("btn.sp_close", "close")]])
    nxt = ticket.priority % 4 + 1
    return InlineKeyboardMarkup(inline_keyboard=[
        [b("btn.sp_claim", "claim"), b("btn.sp_need_info", "need_info")],
        [b("btn.sp_resolve", "resolve"), b("btn.sp_escalate", "escalate")],
        [b("btn.sp_priority", "set_priority", nxt, p=nxt)],
    ])


async def card_text(session: AsyncSession, ticket: Ticket, lang: str) -> str:
    view = await tickets.card_view(session, ticket)
    return t("sp.card", lang, v=view, st=t("ticket.status." + ticket.status, lang),
             sev=t("ticket.severity." + ticket.severity, lang),
             prio=t(f"ticket.priority.{ticket.priority}", lang))


class Desk:
    def __init__(self, bot: Bot, maker: async_sessionmaker[AsyncSession],
                 settings: Settings) -> None:
        self.bot = bot
        self.maker = maker
        self.settings = settings
        self.lang = settings.default_lang  # the group's language
        self.wakeup = asyncio.Event()  # set when a ticket waits to be published

    async def kick(self) -> None:
        """Wake the ticket worker (a post-commit job: the ticket it publishes is committed)."""
        self.wakeup.set()

    # ---------------------------------------------------------------- support group side

    async def publish(self, ticket_id: int) -> bool:
        """Open the ticket's forum topic (or post its card) in the support group, with the
        report's files; then see whether it makes an incident. False if there is no group."""
        async with self.maker() as session:
            group = await tickets.current_support_group(session)
            if group is None:
                return False
            ticket = await tickets.lock(session, ticket_id)  # a second worker waits, then skips
            if ticket is None or ticket.group_chat_id is not None:
                return True
            chat_id = int(group.chat_id)
            thread = None
            if group.is_forum:
                topic = await self.bot.create_forum_topic(
                    chat_id, f"{ticket.code} {ticket.summary.splitlines()[0][:100]}")
                thread = topic.message_thread_id
            card = await self.bot.send_message(
                chat_id, await card_text(session, ticket, self.lang),
                reply_markup=card_markup(ticket, self.lang), message_thread_id=thread)
            for f in await tickets.attachments_of(session, ticket.id):
                with contextlib.suppress(TelegramAPIError):  # a file Telegram lost: card says
                    if f.kind == "photo":
                        await self.bot.send_photo(chat_id, f.file_id, message_thread_id=thread,
                                                  reply_to_message_id=card.message_id)
                    else:
                        await self.bot.send_document(chat_id, f.file_id,
                                                     message_thread_id=thread,
                                                     reply_to_message_id=card.message_id)
            await tickets.record_publication(session, ticket.id, chat_id, thread,
                                             card.message_id)
            system_code = ticket.system_code
            await session.commit()
        if system_code:
            await self.propose_incident(system_code)
        return True

    async def propose_incident(self, system_code: str, now: datetime | None = None) -> None:
        """When the threshold-th ticket on a system arrives within the window, ask the group
        whether it is one incident (once: the next ticket makes more than the threshold)."""
        s = self.settings
        async with self.maker() as session:
            rows = await tickets.incident_candidate(
                session, system_code, now=now or utcnow(),
                window=timedelta(minutes=s.incident_window_minutes),
                threshold=s.incident_threshold)
            group = await tickets.current_support_group(session)
            if rows is None or len(rows) != s.incident_threshold or group is None:
                return
            text_ = t("sp.incident_proposal", self.lang, n=len(rows), system=system_code,
                      codes=[r.code for r in rows], minutes=s.incident_window_minutes)
        markup = InlineKeyboardMarkup(inline_keyboard=[[InlineKeyboardButton(
            text=t("btn.sp_incident_open", self.lang),
            callback_data=IncCb(action="open", sys=system_code).pack())]])
        await self.bot.send_message(int(group.chat_id), text_, reply_markup=markup)

    async def refresh_card(self, ticket_id: int) -> None:
        async with self.maker() as session:
            ticket = await session.get(Ticket, ticket_id)
            if ticket is None or ticket.group_chat_id is None or ticket.card_message_id is None:
                return
            with contextlib.suppress(TelegramAPIError):  # "message is not modified" and such
                await self.bot.edit_message_text(
                    await card_text(session, ticket, self.lang),
                    chat_id=int(ticket.group_chat_id), message_id=ticket.card_message_id,
                    reply_markup=card_markup(ticket, self.lang))

    async def tell_group(self, ticket_id: int, key: str, **params: object) -> None:
        """A notice in the ticket's topic (or under its card)."""
        async with self.maker() as session:
            ticket = await session.get(Ticket, ticket_id)
            if ticket is None or ticket.group_chat_id is None:
                return
            await self._to_group(ticket, t(key, self.lang, code=ticket.code, **params))

    async def _to_group(self, ticket: Ticket, text_: str) -> Message:
        assert ticket.group_chat_id is not None
        return await self.bot.send_message(
            int(ticket.group_chat_id), text_, message_thread_id=ticket.topic_id,
            reply_to_message_id=None if ticket.topic_id else ticket.card_message_id)

    async def relay_to_group(self, message_row_id: int, from_chat: int, message_id: int,
                             reporter_name: str) -> None:
        """Copy the reporter's message into the ticket's topic and remember the copy."""
        async with self.maker() as session:
            row = await session.get(TicketMessage, message_row_id)
            ticket = await session.get(Ticket, row.ticket_id) if row is not None else None
            if row is None or ticket is None or ticket.group_chat_id is None:
                return
            header = await self._to_group(ticket, t("sp.from_reporter", self.lang,
                                                    code=ticket.code, name=reporter_name))
            copied = await self.bot.copy_message(
                int(ticket.group_chat_id), from_chat, message_id,
                message_thread_id=ticket.topic_id, reply_to_message_id=header.message_id)
            await tickets.set_message_route(session, row.id,
                                            dst=(ticket.group_chat_id, copied.message_id))
            await session.commit()

    # --------------------------------------------------------------------- reporter side

    async def relay_to_reporter(self, message_row_id: int, from_chat: int, message_id: int,
                                agent_name: str) -> None:
        """Copy an agent's message (files included) to the reporter's private chat."""
        async with self.maker() as session:
            row = await session.get(TicketMessage, message_row_id)
            ticket = await session.get(Ticket, row.ticket_id) if row is not None else None
            chat = await tickets.reporter_chat(session, ticket) if ticket is not None else None
            if row is None or ticket is None or chat is None:
                return
            dst, lang = int(chat[0]), norm_lang(chat[1] or self.lang)
            header = await self.bot.send_message(dst, t("sp.from_agent", lang, code=ticket.code,
                                                        name=agent_name))
            copied = await self.bot.copy_message(dst, from_chat, message_id,
                                                 reply_to_message_id=header.message_id)
            await tickets.set_message_route(session, row.id, dst=(dst, copied.message_id))
            await tickets.add_message(session, ticket, "system", None, None,
                                      dst=(dst, header.message_id))
            await session.commit()

    async def notify_reporter(self, ticket_id: int, key: str, **params: object) -> None:
        """A notice to the reporter, remembered so that replying to it picks the ticket."""
        async with self.maker() as session:
            ticket = await session.get(Ticket, ticket_id)
            chat = await tickets.reporter_chat(session, ticket) if ticket is not None else None
            if ticket is None or chat is None:
                return
            dst, lang = int(chat[0]), norm_lang(chat[1] or self.lang)
            sent = await self.bot.send_message(dst, t(
                key, lang, code=ticket.code, st=t("ticket.status." + ticket.status, lang),
                **params))
            await tickets.add_message(session, ticket, "system", None, None,
                                      dst=(dst, sent.message_id))
            await session.commit()

    async def notify_staff(self, key: str, *, operators_only: bool,
                           people: list[tuple[Person, str, str | None]] | None = None,
                           **params: object) -> None:
        """A private notice to every operator (or every agent), each in their language."""
        if people is None:
            async with self.maker() as session:
                people = await tickets.agent_chats(session, operators_only=operators_only)
        for _person, chat_id, lang in people:
            try:
                await self.bot.send_message(int(chat_id), t(key, norm_lang(lang or self.lang),
                                                            **params))
            except TelegramAPIError:  # blocked the bot, never started it: the others still
                log.warning("could not notify staff chat %s", chat_id)

    async def edit_copy(self, chat_id: str, message_id: int, text_: str | None,
                        entities: list[MessageEntity] | None, is_caption: bool) -> None:
        """Mirror an edit of an original onto its relayed copy."""
        with contextlib.suppress(TelegramAPIError):
            if is_caption:
                await self.bot.edit_message_caption(
                    chat_id=int(chat_id), message_id=message_id, caption=text_ or "",
                    caption_entities=entities, parse_mode=None)
            elif text_:
                await self.bot.edit_message_text(
                    text_, chat_id=int(chat_id), message_id=message_id, entities=entities,
                    parse_mode=None)

    # ------------------------------------------------------------------------ SLA scan

    async def sla_scan(self, now: datetime | None = None) -> tuple[int, int]:
        """Warn in the topic before a ticket's SLA ends; on breach tell the topic and every
        operator. Each ticket is marked by one conditional update before its notice is sent
        and committed after, so two scanners never both send (a crash in between resends)."""
        now = now or utcnow()
        warn = timedelta(minutes=self.settings.sla_warn_minutes)
        warned = breached = 0
        async with self.maker() as session:
            due = [x.id for x in await tickets.sla_due_for_warning(session, now,
                                                                   warn_before=warn)]
            late = [x.id for x in await tickets.sla_breached(session, now)]
            # read now: on SQLite a second session inside the marking transaction would wait
            # for the write lock that transaction holds
            ops = await tickets.agent_chats(session, operators_only=True) if late else []
        for ticket_id in due:
            async with self.maker() as session:
                if await tickets.mark_warned(session, ticket_id, now):
                    ticket = await session.get(Ticket, ticket_id)
                    if ticket is not None and ticket.group_chat_id is not None:
                        assert ticket.sla_due_at is not None
                        with contextlib.suppress(TelegramAPIError):
                            await self._to_group(ticket, t(
                                "sp.sla_warning", self.lang, code=ticket.code,
                                due=ticket.sla_due_at,
                                minutes=max(0, int((ticket.sla_due_at - now).total_seconds()
                                                   // 60))))
                    warned += 1
                await session.commit()
        for ticket_id in late:
            async with self.maker() as session:
                if await tickets.mark_breached(session, ticket_id, now):
                    ticket = await session.get(Ticket, ticket_id)
                    assert ticket is not None
                    code, due_at = ticket.code, ticket.sla_due_at
                    if ticket.group_chat_id is not None:
                        with contextlib.suppress(TelegramAPIError):
                            await self._to_group(ticket, t("sp.sla_breach", self.lang,
                                                           code=code, due=due_at))
                    await self.notify_staff("sp.sla_breach_ops", operators_only=True,
                                            people=ops, code=code, due=due_at,
                                            summary=ticket.summary[:200])
                    breached += 1
                await session.commit()
        return warned, breached


async def mirror_edit(message: Message, session: AsyncSession, desk: Desk,
                      post: PostCommit) -> None:
    """Store the new text of an edited relayed original and edit its copy after the commit."""
    is_caption = message.text is None
    text_ = message.text if message.text is not None else message.caption
    row = await tickets.mark_edited(session, str(message.chat.id), message.message_id, text_)
    if row is None or row.dst_chat_id is None or row.dst_message_id is None:
        return
    entities = message.entities if not is_caption else message.caption_entities
    dst_chat, dst_id = row.dst_chat_id, row.dst_message_id
    post.add(lambda: desk.edit_copy(dst_chat, dst_id, text_, entities, is_caption))
