"""App assembly: bot, dispatcher, middlewares, routers, and the polling/webhook runners.

Factories only; nothing is built at import time. The runners feed updates through the
durable :class:`~bot.inbox.Inbox`, never through aiogram's own polling loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import aiohttp
from aiogram import Bot, Dispatcher
from aiogram.client.default import DefaultBotProperties
from aiogram.client.telegram import TelegramAPIServer
from aiogram.enums import ParseMode
from aiogram.exceptions import TelegramRetryAfter, TelegramServerError
from aiogram.methods import GetUpdates
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.api_session import JsonBodySession
from bot.commands import CommandMenu
from bot.config import ConfigError, Settings
from bot.fsm_storage import DbStorage
from bot.inbox import Inbox
from bot.middlewares import DbSessionMiddleware, RoleMiddleware, WhoMiddleware
from bot.prefetch import Prefetch
from bot.routing import accelerate
from db.session import (
    WATCHED_TABLES,
    add_change_listener,
    fill_pool,
    listen_for_changes,
    make_engine,
    make_sessionmaker,
    remove_change_listener,
)
from handlers.desk import Desk
from services import texts
from services.people import WhoCache
from services.status import PlanCache
from tasks.ticket_worker import TicketWorker

log = logging.getLogger("hopnhat")
POLL_TIMEOUT = 25
ALLOWED_UPDATES = ["message", "edited_message", "callback_query", "inline_query",
                   "my_chat_member"]


_PINNED_RESPONSE_TYPES: list[type] = []


def _pin_response_types() -> None:
    """aiogram parses each reply as ``Response[ReturnType]``; pydantic keeps those generic
    classes only weakly, so the garbage collector drops them and they are rebuilt again and
    again (13% of the bot's CPU under load). Holding them once avoids that."""
    if _PINNED_RESPONSE_TYPES:
        return
    from aiogram import methods as m
    from aiogram.methods.base import Response

    used = (m.SendMessage, m.EditMessageText, m.EditMessageReplyMarkup, m.AnswerCallbackQuery,
            m.SetMyCommands, m.DeleteWebhook, m.SetWebhook, m.GetMe, m.SendDocument,
            m.SendPhoto, m.AnswerInlineQuery, m.GetFile, m.DeleteMessage, m.CopyMessage,
            m.SendChatAction, m.GetUpdates, m.CreateForumTopic)
    for returning in {meth.__returning__ for meth in used}:
        _PINNED_RESPONSE_TYPES.append(Response[returning])  # type: ignore[index]


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run`` on uvloop where it is installed (Linux/macOS): the bot is bound by
    event-loop and socket work (a few Bot API and database round trips per update)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def create_bot(settings: Settings) -> Bot:
    if settings.bot_token is None:
        raise ConfigError("HOPNHAT_BOT_TOKEN: not set (get one from @BotFather)")
    _pin_response_types()
    session = JsonBodySession(api=TelegramAPIServer.from_base(settings.telegram_api_url))
    return Bot(
        settings.bot_token.get_secret_value(),
        session=session,
        default=DefaultBotProperties(parse_mode=ParseMode.HTML, link_preview_is_disabled=True),
    )


def create_dispatcher(
    settings: Settings, maker: async_sessionmaker[AsyncSession], menu: CommandMenu,
    who_cache: WhoCache | None = None,
) -> Dispatcher:
    from handlers import (
        approvals,
        broadcasts,
        errors,
        fallback,
        imports,
        knowledge,
        provisioning,
        registration,
        start,
        status,
        support,
        tickets,
    )
    from knowledge.store import load_knowledge

    storage = DbStorage(maker)
    dp = Dispatcher(storage=storage, settings=settings, sessionmaker=maker, menu=menu,
                    kb=load_knowledge(settings.data_dir))
    # The DB session opens before aiogram's FSM middleware reads the state, so the state is
    # read and written in the update's one transaction (one connection per update).
    dp.update.outer_middleware.unregister(dp.fsm)
    dp.update.outer_middleware(DbSessionMiddleware(maker, storage))
    dp.update.outer_middleware(dp.fsm)
    dp.update.outer_middleware(WhoMiddleware(settings, who_cache))
    for observer in (dp.message, dp.edited_message, dp.callback_query, dp.inline_query):
        observer.middleware(RoleMiddleware())
    routers = (
        errors.router,
        start.router,
        approvals.router,
        imports.router,
        registration.router,
        status.router,
        support.router,
        tickets.router,
        provisioning.router,
        broadcasts.router,
        knowledge.router,  # free text not claimed above is a question
        fallback.router,  # catch-all last
    )
    for r in routers:  # module routers: re-attachable when a process builds a new dispatcher
        r._parent_router = None
    dp.include_routers(*routers)
    accelerate(dp)
    return dp


@dataclass
class App:
    settings: Settings
    engine: AsyncEngine
    maker: async_sessionmaker[AsyncSession]
    bot: Bot
    dp: Dispatcher
    inbox: Inbox
    menu: CommandMenu
    desk: Desk
    who_cache: WhoCache
    plan_cache: PlanCache
    _unlisten: Callable[[], Awaitable[None]] | None = None
    background: list[asyncio.Task[None]] = field(default_factory=list)
    stop_background: asyncio.Event = field(default_factory=asyncio.Event)
    delivery: Any = None  # sender + scheduler (bot.background), started with the runner

    def start_workers(self) -> None:
        """Background loops beside the update handling: the support desk and provisioning."""
        from tasks.provisioning import start_provisioning

        worker = TicketWorker(self.maker, self.desk.publish, self.desk.sla_scan,
                              self.desk.wakeup, self.settings.ticket_scan_seconds)
        self.background.append(asyncio.create_task(worker.run(self.stop_background)))
        start_provisioning(self)

    def changed(self, tables: frozenset[str], touched: frozenset[int]) -> None:
        """A change signal (db.session) for our database: tell every cache."""
        self.who_cache.changed(tables, touched)
        self.plan_cache.changed(tables, touched)

    def outside_change(self) -> None:
        self.changed(WATCHED_TABLES, frozenset())

    async def close(self) -> None:
        if self.delivery is not None:
            await self.delivery.close()
        self.stop_background.set()
        for task in self.background:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 15)
        self.background.clear()
        await self.inbox.drain()
        self.who_cache.enabled = self.plan_cache.enabled = False
        remove_change_listener(self.engine, self.changed)
        if self._unlisten is not None:
            await self._unlisten()
        await self.bot.session.close()
        await self.engine.dispose()

    async def enable_caches(self) -> None:
        """Cache senders and the plan only once changes by other processes reach us: LISTEN
        on PostgreSQL, ``PRAGMA data_version`` per received batch on SQLite (bot/inbox.py)."""

        def lost() -> None:
            if self.who_cache.enabled:
                log.warning("change notifications lost: caches off")
            self.who_cache.enabled = self.plan_cache.enabled = False
            self.outside_change()

        if self.engine.dialect.name == "postgresql":
            self._unlisten = await listen_for_changes(self.engine, self.changed, lost)
        elif self.engine.dialect.name != "sqlite":
            return
        self.outside_change()
        self.who_cache.enabled = self.plan_cache.enabled = True


def build_app(settings: Settings) -> App:
    texts.configure(settings.timezone)
    engine = make_engine(settings.database_url, immediate=True, serving=True)
    plan_cache = PlanCache()
    maker = make_sessionmaker(engine, info={"plan_cache": plan_cache})
    bot = create_bot(settings)
    menu = CommandMenu(bot, settings.default_lang)
    who_cache = WhoCache()
    dp = create_dispatcher(settings, maker, menu, who_cache)
    desk = Desk(bot, maker, settings)
    dp["desk"] = desk
    inbox = Inbox(dp, bot, maker)
    inbox.prefetch = Prefetch(dp, maker, who_cache, dp.storage)
    app = App(settings, engine, maker, bot, dp, inbox, menu, desk, who_cache, plan_cache)
    inbox.on_outside_change = app.outside_change
    add_change_listener(engine, app.changed)
    return app


async def _startup(app: App) -> None:
    me = await app.bot.get_me()
    log.info("bot @%s (%s) on %s", me.username, me.id, app.settings.telegram_api_url)
    try:
        await app.menu.set_default()
    except Exception:
        log.warning("could not set the default command menu", exc_info=True)
    from services.units import warm_up_search

    async with app.maker() as s:  # build the unit index now, not on the first user's query
        await warm_up_search(s)
    await fill_pool(app.engine)
    await app.enable_caches()
    app.start_workers()
    from bot.background import Background

    app.delivery = Background(app.settings, app.maker, app.bot)
    await app.delivery.start()
    _freeze_startup_heap()


def _freeze_startup_heap() -> None:
    """What start-up built (the unit search index, the knowledge base, aiogram's routers and
    models: ~300k objects) lives as long as the process. A full garbage collection walked
    all of it every time: 0.26 s pauses, ~10% of the bot's time under load. Frozen
    objects are left out of cycle collections (reference counting still frees them, e.g.
    a rebuilt index's predecessor); objects made after start-up are collected as usual."""
    gc.collect()
    gc.freeze()


class RawPoller:
    """getUpdates returning the JSON as sent, not aiogram objects: the inbox stores the raw
    update and parses it once when handling it (parse → dump → parse costs CPU per update)."""

    def __init__(self, bot: Bot) -> None:
        session = bot.session
        self.url = session.api.api_url(bot.token, "getUpdates")
        self.http = aiohttp.ClientSession()

    async def get(self, offset: int | None) -> list[dict[str, Any]]:
        body = {"timeout": POLL_TIMEOUT, "allowed_updates": ALLOWED_UPDATES}
        if offset is not None:
            body["offset"] = offset
        async with self.http.post(self.url, json=body,
                                  timeout=aiohttp.ClientTimeout(total=POLL_TIMEOUT + 15)) as r:
            data = await r.json(content_type=None)
        if data.get("ok"):
            return list(data["result"])
        if r.status == 429:
            raise TelegramRetryAfter(method=GetUpdates(), message=data.get("description", ""),
                                     retry_after=int(data["parameters"]["retry_after"]))
        raise TelegramServerError(method=GetUpdates(),
                                  message=f"{r.status} {data.get('description', '')}")

    async def close(self) -> None:
        await self.http.close()


async def run_polling(app: App, stop: asyncio.Event | None = None) -> None:
    """Long polling where the offset advances only after the batch is stored in the inbox."""
    stop = stop or asyncio.Event()
    await _startup(app)
    await app.bot.delete_webhook(drop_pending_updates=False)
    await app.inbox.resume()
    poller = RawPoller(app.bot)
    offset: int | None = None
    backoff = 1.0
    try:
        while not stop.is_set():
            poll = asyncio.ensure_future(poller.get(offset))
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({poll, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if poll not in done:
                poll.cancel()
                with contextlib.suppress(BaseException):
                    await poll
                break
            try:
                updates = poll.result()
            except TelegramRetryAfter as exc:
                await asyncio.sleep(exc.retry_after)
                continue
            except (TimeoutError, TelegramServerError, aiohttp.ClientError, ValueError) as exc:
                log.warning("getUpdates failed (%s); retrying in %.0fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30)
                continue
            backoff = 1.0
            if not updates:
                continue
            await app.inbox.feed(updates)  # stored before the next call confirms them
            offset = updates[-1]["update_id"] + 1
    finally:
        await poller.close()


def webhook_app(app: App, path: str = "/webhook") -> web.Application:
    """aiohttp app: store the update, answer 200, handle it in the background."""
    secret = app.settings.webhook_secret.get_secret_value() if app.settings.webhook_secret else None

    async def receive(request: web.Request) -> web.Response:
        if secret is not None and request.headers.get("X-Telegram-Bot-Api-Secret-Token") != secret:
            return web.Response(status=401, text="unauthorized")
        try:
            payload = await request.json()
            int(payload["update_id"])
        except (ValueError, KeyError, TypeError):
            return web.Response(status=400, text="bad update")
        await app.inbox.feed([payload])
        return web.json_response({"ok": True})

    web_app = web.Application()
    web_app.router.add_post(path, receive)
    return web_app


async def run_webhook(app: App, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    s = app.settings
    if not s.webhook_url:
        raise ConfigError("HOPNHAT_WEBHOOK_URL: required for webhook mode")
    await _startup(app)
    runner = web.AppRunner(webhook_app(app, path=urlparse(s.webhook_url).path or "/webhook"))
    await runner.setup()
    site = web.TCPSite(runner, s.webhook_host, s.webhook_port)
    await site.start()
    await app.bot.set_webhook(
        s.webhook_url, allowed_updates=ALLOWED_UPDATES,
        secret_token=s.webhook_secret.get_secret_value() if s.webhook_secret else None,
    )
    await app.inbox.resume()
    log.info("webhook listening on %s:%s for %s", s.webhook_host, s.webhook_port, s.webhook_url)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
