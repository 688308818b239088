"""A local, strict Telegram Bot API emulator served over real HTTP (aiohttp).

Why: bot tests against mocks pass while the real API rejects the same calls
(unescaped HTML, 65-byte callback_data, 4097-char texts, a webhook still set
while polling...).  This server speaks the same wire protocol as
``api.telegram.org`` -- aiogram points at it with ``TelegramAPIServer.from_base``
-- and validates every call against the official spec (``api.json``) before
doing anything, so a bot that works here is much more likely to work live.

Layout:

* ``/bot<token>/<method>``            Bot API (JSON, urlencoded or multipart)
* ``/file/bot<token>/<file_path>``    file downloads (after ``getFile``)
* ``/_emulator/<action>``             control API (JSON) mirroring :class:`Emulator`

Control endpoints (JSON in, ``{"ok": true, "result": ...}`` out; ``bot_id`` optional):

* POST ``users`` ``groups`` ``text`` ``contact`` ``press`` ``photo``/``document``
  (``content_b64``) ``edit`` ``inline_query`` ``update`` ``block`` ``rate_limits``
  ``fault`` ``latency`` ``clear_faults`` -- keyword arguments of the same-named methods
* GET ``sent?chat_id=`` ``calls?method=&since=`` ``wait?chat_id=&count=&since=&timeout=``
  (408 on timeout) ``state`` ``pending``

State is kept per bot id (the digits of the token).  Control methods act on
"the" bot: the ``bot_id=`` given, else the constructor's ``bot_token``, else the
only bot seen so far.  Anything queued before any bot called is adopted by the
first bot that does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import json
import logging
import mimetypes
import re
import secrets
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from .html import EntityParseError, render_text
from .ratelimit import RateLimiter, RateLimits
from .spec import ApiSpec, FilePart, MethodSpec, ParamError, load_spec

log = logging.getLogger("hopnhat.emulator")

TOKEN_RE = re.compile(r"^(\d{1,20}):([A-Za-z0-9_-]{30,})$")
TEXT_LIMIT = 4096
CAPTION_LIMIT = 1024
CALLBACK_DATA_LIMIT = 64
DOWNLOAD_LIMIT = 20 * 1024 * 1024  # getFile refuses bigger files
UPLOAD_LIMIT = 50 * 1024 * 1024
PHOTO_LIMIT = 10 * 1024 * 1024
FIRST_UPDATE_ID = 100_000_001
DEFAULT_EXCLUDED_UPDATES = {"chat_member", "message_reaction", "message_reaction_count"}
CHAT_ACTIONS = {
    "typing", "upload_photo", "record_video", "upload_video", "record_voice", "upload_voice",
    "upload_document", "choose_sticker", "find_location", "record_video_note",
    "upload_video_note",
}
TOPIC_COLORS = {7322096, 16766590, 13338331, 9367192, 16749490, 16478047}
MEDIA_KEYS = ("photo", "document", "video", "audio", "animation", "voice", "video_note",
              "sticker")
CONTENT_KEYS = ("text", "entities", "caption", "caption_entities", "contact", "location",
                "venue", "dice", "poll", "show_caption_above_media", *MEDIA_KEYS)
NOT_MODIFIED = ("message is not modified: specified new message content and reply markup "
                "are exactly the same as a current content and reply markup of the message")
WEBHOOK_CONFLICT = ("Conflict: can't use getUpdates method while webhook is active; "
                    "use deleteWebhook to delete the webhook first")
POLL_CONFLICT = ("Conflict: terminated by other getUpdates request; "
                 "make sure that only one bot instance is running")
_FAULT_TEXT = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    409: "Conflict", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}
_SAME: Any = object()  # sentinel: "unchanged" / "the same user"


class ApiError(Exception):
    """A Telegram-style error answer (``ok: false``)."""

    def __init__(self, code: int, description: str, retry_after: int | None = None) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.retry_after = retry_after

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": False, "error_code": self.code,
                               "description": self.description}
        if self.retry_after is not None:
            out["parameters"] = {"retry_after": self.retry_after}
        return out


class UnknownAction(Exception):
    """No such control endpoint under ``/_emulator/``."""


def bad(detail: str) -> ApiError:
    return ApiError(400, f"Bad Request: {detail}")


@dataclass
class StoredFile:
    file_id: str
    file_unique_id: str
    kind: str
    size: int
    data: bytes | None = None
    file_name: str | None = None
    mime_type: str | None = None
    width: int | None = None
    height: int | None = None
    url: str | None = None
    file_path: str | None = None

    def content(self) -> bytes:
        """Stored bytes; files faked by size only read back as zeros."""
        return self.data if self.data is not None else b"\0" * self.size


@dataclass
class StoredMessage:
    chat_id: int
    message_id: int
    message: dict[str, Any]
    from_bot: bool
    record: dict[str, Any] | None = None
    deleted: bool = False


@dataclass
class QueuedUpdate:
    update: dict[str, Any]
    force: bool = False  # explicit re-delivery: survive offset confirmation until delivered
    delivered: int = 0

    @property
    def id(self) -> int:
        return int(self.update["update_id"])


@dataclass
class Fault:
    method: str | None  # lower-case method name, None = any method except getUpdates
    status: int
    remaining: int
    retry_after: int | None = None
    description: str | None = None
    delay: float = 0.0
    bot_id: int | None = None

    def matches(self, method: str, bot_id: int | None) -> bool:
        if self.bot_id is not None and self.bot_id != bot_id:
            return False
        if self.method is None:
            return method.lower() != "getupdates"
        return self.method == method.lower()

    def error(self) -> ApiError:
        if self.status == 429:
            ra = self.retry_after if self.retry_after is not None else 1
            return ApiError(429, self.description or f"Too Many Requests: retry after {ra}", ra)
        desc = self.description or _FAULT_TEXT.get(self.status, f"Error {self.status}")
        return ApiError(self.status, desc, self.retry_after)


class BotState:
    """Everything the emulator remembers about one bot (keyed by token digits)."""

    def __init__(self, bot_id: int | None, token: str | None,
                 limits: Callable[[], RateLimits], first_update_id: int = FIRST_UPDATE_ID
                 ) -> None:
        self.bot_id = bot_id
        self.token = token
        self.updates: list[QueuedUpdate] = []
        self.next_update_id = first_update_id
        self.allowed_updates: list[str] | None = None
        self.webhook: dict[str, Any] | None = None
        self.webhook_task: asyncio.Task[None] | None = None
        self.last_error_date: int | None = None
        self.last_error_message: str | None = None
        self.chat_counters: dict[int, int] = {}
        self.messages: dict[tuple[int, int], StoredMessage] = {}
        self.sent: list[dict[str, Any]] = []
        self.sent_by_chat: dict[int, list[dict[str, Any]]] = {}  # the same records, per chat
        self.callback_queries: dict[str, dict[str, Any]] = {}
        self.inline_queries: dict[str, dict[str, Any]] = {}
        self.commands: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.menu_buttons: dict[int | None, dict[str, Any]] = {}
        self.topics: dict[tuple[int, int], dict[str, Any]] = {}
        self.limiter = RateLimiter(limits)
        self.poll_generation = 0
        self.media_group_seq = 0
        self.updates_changed = asyncio.Event()

    def notify_updates(self) -> None:
        """Wake long-pollers / the webhook sender (event-swap: no lock needed)."""
        ev, self.updates_changed = self.updates_changed, asyncio.Event()
        ev.set()

    def next_message_id(self, chat_id: int) -> int:
        n = self.chat_counters.get(chat_id, 0) + 1
        self.chat_counters[chat_id] = n
        return n


def _json_safe(value: Any) -> Any:
    if isinstance(value, FilePart):
        return value.describe()
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _utf16_len(s: str) -> int:
    return len(s.encode("utf-16-le")) // 2


def _image_size(data: bytes) -> tuple[int, int] | None:
    """Width/height of PNG, GIF or JPEG bytes (enough to fill PhotoSize)."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
            w, h = struct.unpack(">II", data[16:24])
            return int(w), int(h)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack("<HH", data[6:10])
            return int(w), int(h)
        if data[:2] == b"\xff\xd8":
            i = 2
            while i + 9 < len(data) and data[i] == 0xFF:
                marker = data[i + 1]
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                    h, w = struct.unpack(">HH", data[i + 5:i + 9])
                    return int(w), int(h)
                i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    except struct.error:
        return None
    return None


_RECORD_MIRRORED = (*CONTENT_KEYS, "chat", "from", "date", "edit_date", "forward_origin",
                    "has_protected_content", "is_topic_message", "has_media_spoiler",
                    "link_preview_options")


def _sync_record(record: dict[str, Any], msg: dict[str, Any]) -> None:
    """Mirror the Message fields into the sent-record so it reads like a Message too."""
    for key in _RECORD_MIRRORED:
        if key in msg:
            record[key] = msg[key]
        else:
            record.pop(key, None)
    record["text"] = msg.get("text")
    record["caption"] = msg.get("caption")
    record["entities"] = msg.get("entities") or msg.get("caption_entities")


def _fill_client_required(type_name: str, obj: dict[str, Any], flag: bool) -> None:
    """Also satisfy required scalar fields the installed aiogram knows but our spec predates.

    Real Telegram always answers with the newest API's fields; when aiogram is newer
    than ``api.json`` (e.g. a permission flag added later) its models would otherwise
    reject the emulator's answer.
    """
    try:
        from aiogram import types as tg_types
    except ImportError:  # pragma: no cover - aiogram is optional for the emulator
        return
    model = getattr(tg_types, type_name, None)
    fields = getattr(model, "model_fields", None) or {}
    defaults: dict[Any, Any] = {bool: flag, int: 0, str: "", float: 0.0}
    for name, info in fields.items():
        key = info.alias or name
        if key in obj or not info.is_required() or info.annotation not in defaults:
            continue
        obj[key] = defaults[info.annotation]


def _find_buttons(markup: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = (markup or {}).get("inline_keyboard") or []
    return [b for row in rows for b in row if isinstance(b, dict)]


class Emulator:
    """In-process controller + HTTP server for the fake Bot API.

    Typical test::

        emu = Emulator()
        base = await emu.start()
        emu.add_user(1001, "An")
        bot = Bot(TOKEN, session=AiohttpSession(api=TelegramAPIServer.from_base(base)))
        await emu.send_text(1001, "/start")
        ...
        msgs = await emu.wait_for_messages(1001)
    """

    def __init__(
        self,
        spec_path: str | None = None,
        bot_username: str = "hopnhat_bot",
        bot_token: str | None = None,
        *,
        privacy_mode: bool = False,
        webhook_timeout: float = 10.0,
        webhook_max_backoff: float = 1.0,
        first_update_id: int = FIRST_UPDATE_ID,
    ) -> None:
        # Telegram's update ids only grow; a bot whose database outlives one emulator run
        # (the console) must get ids above the ones it already handled, or it drops them
        # as re-deliveries.
        self.first_update_id = first_update_id
        self.spec: ApiSpec = load_spec(spec_path)
        self.bot_username = bot_username
        self.privacy_mode = privacy_mode
        self.webhook_timeout = webhook_timeout
        self.webhook_max_backoff = webhook_max_backoff
        self._default_bot_id: int | None = None
        if bot_token is not None:
            m = TOKEN_RE.match(bot_token)
            if not m:
                raise ValueError("bot_token is not a well-formed Telegram token")
            self._default_bot_id = int(m.group(1))
        self._bots: dict[int, BotState] = {}
        self._unclaimed: BotState | None = None
        if self._default_bot_id is not None:
            self._bots[self._default_bot_id] = BotState(self._default_bot_id, bot_token,
                                                        self._get_limits, self.first_update_id)
        self._users: dict[int, dict[str, Any]] = {}
        self._groups: dict[int, dict[str, Any]] = {}
        self._files: dict[str, StoredFile] = {}
        self._file_seq = 0
        self._limits = RateLimits()
        self._faults: list[Fault] = []
        self._latency: dict[str | None, float] = {}
        self._calls: list[dict[str, Any]] = []
        self._activity = asyncio.Event()
        self._running = False
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self.port: int | None = None
        self.base_url: str | None = None

    # ================================================================ lifecycle
    def make_app(self) -> web.Application:
        """The aiohttp application (exposed for embedding in another server)."""
        app = web.Application(client_max_size=UPLOAD_LIMIT + 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._handle_api)
        app.router.add_get("/file/bot{token}/{path:.+}", self._handle_file)
        app.router.add_get("/_emulator/{action}", self._handle_control)
        app.router.add_post("/_emulator/{action}", self._handle_control)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0 = any free port) and return the base URL."""
        if self._running:
            raise RuntimeError("emulator already started")
        self._running = True
        self._client = aiohttp.ClientSession()
        self._runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        addr = self._runner.addresses[0]
        self.port = int(addr[1])
        self.base_url = f"http://{host}:{self.port}"
        for bot in self._all_bots():
            self._ensure_webhook_task(bot)
        log.info("Telegram Bot API emulator listening on %s", self.base_url)
        return self.base_url

    async def stop(self) -> None:
        """Stop serving: release long-polls, cancel webhook senders, close sockets."""
        self._running = False
        tasks = []
        for bot in self._all_bots():
            bot.notify_updates()
            if bot.webhook_task is not None:
                bot.webhook_task.cancel()
                tasks.append(bot.webhook_task)
                bot.webhook_task = None
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ============================================================ bot selection
    def _get_limits(self) -> RateLimits:
        return self._limits

    def _all_bots(self) -> list[BotState]:
        bots = list(self._bots.values())
        if self._unclaimed is not None:
            bots.append(self._unclaimed)
        return bots

    def _bot(self, bot_id: int | None = None) -> BotState:
        """The bot a control call refers to (see module docstring)."""
        if bot_id is not None:
            return self._bot_for_api(bot_id, None)
        if self._default_bot_id is not None:
            return self._bots[self._default_bot_id]
        if len(self._bots) == 1:
            return next(iter(self._bots.values()))
        if not self._bots:
            if self._unclaimed is None:
                self._unclaimed = BotState(None, None, self._get_limits, self.first_update_id)
            return self._unclaimed
        raise RuntimeError(f"several bots use this emulator ({sorted(self._bots)}); "
                           "pass bot_id=")

    def _bot_for_api(self, bot_id: int, token: str | None) -> BotState:
        bot = self._bots.get(bot_id)
        if bot is None:
            if self._unclaimed is not None and self._default_bot_id is None:
                bot, self._unclaimed = self._unclaimed, None
                bot.bot_id = bot_id
            else:
                bot = BotState(bot_id, token, self._get_limits, self.first_update_id)
            self._bots[bot_id] = bot
        if token and not bot.token:
            bot.token = token
        return bot

    def _bot_user(self, bot: BotState) -> dict[str, Any]:
        return {"id": bot.bot_id or 0, "is_bot": True, "first_name": "hopnhat (emulator)",
                "username": self.bot_username}

    # ============================================================ HTTP handlers
    async def _handle_api(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        method = request.match_info["method"]
        m = TOKEN_RE.match(token)
        if not m:
            self._log_call(None, method, {}, ApiError(401, "Unauthorized"), time.time())
            return web.json_response(ApiError(401, "Unauthorized").payload(), status=401)
        bot = self._bot_for_api(int(m.group(1)), token)
        try:
            raw, files = await self._read_request(request)
        except ApiError as exc:
            self._log_call(bot.bot_id, method, {}, exc, time.time())
            return web.json_response(exc.payload(), status=exc.code)
        status, payload = await self._execute(bot, method, raw, files, source="http")
        return web.json_response(payload, status=status)

    async def _read_request(self, request: web.Request) -> tuple[dict[str, Any],
                                                                  dict[str, FilePart]]:
        """Merge query string and body (JSON / urlencoded / multipart) into params."""
        raw: dict[str, Any] = dict(request.query)
        files: dict[str, FilePart] = {}
        if request.method != "POST" or not request.can_read_body:
            return raw, files
        ctype = request.content_type
        try:
            if ctype == "application/json":
                text = await request.text()
                if text.strip():
                    try:
                        body = json.loads(text)
                    except ValueError:
                        raise bad("can't parse JSON request body") from None
                    if not isinstance(body, dict):
                        raise bad("JSON request body must be an object")
                    raw.update(body)
            elif ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
                form = await request.post()
                for key, value in form.items():
                    if isinstance(value, web.FileField):
                        files[key] = FilePart(key, value.filename or key, value.file.read(),
                                              value.content_type or "application/octet-stream")
                    elif isinstance(value, (bytes, bytearray)):
                        raw[key] = bytes(value).decode("utf-8", "replace")
                    else:
                        raw[key] = value
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, "Request Entity Too Large") from None
        return raw, files

    async def _execute(self, bot: BotState, method: str, raw: dict[str, Any],
                       files: dict[str, FilePart], source: str) -> tuple[int, dict[str, Any]]:
        """Validate and run one Bot API call; always log it."""
        started = time.time()
        spec_m = self.spec.method(method)
        params: dict[str, Any] = {**raw, **files}
        try:
            if spec_m is None:
                raise ApiError(404, "Not Found: method not found")
            method = spec_m.name
            delay = self._latency.get(method.lower(), self._latency.get(None, 0.0))
            fault = self._take_fault(method, bot.bot_id)
            if fault is not None:
                delay += fault.delay
            if delay > 0:
                await asyncio.sleep(delay)
            if fault is not None:
                raise fault.error()
            try:
                params = self.spec.validate_params(spec_m, raw, files)
            except ParamError as exc:
                raise ApiError(400, str(exc)) from None
            handler = getattr(self, f"_api_{method.lower()}", None)
            if handler is not None:
                result = await handler(bot, params, files)
            else:
                result = await self._api_generic(bot, spec_m, params)
        except ApiError as exc:
            self._log_call(bot.bot_id, method, params, exc, started, source=source)
            return exc.code, exc.payload()
        except Exception as exc:  # noqa: BLE001 - an emulator bug must not look like Telegram
            log.exception("emulator bug while handling %s", method)
            err = ApiError(500, f"Internal Server Error: emulator bug: {exc!r}")
            self._log_call(bot.bot_id, method, params, err, started, source=source)
            return 500, err.payload()
        self._log_call(bot.bot_id, method, params, None, started, result=result, source=source)
        return 200, {"ok": True, "result": result}

    def _log_call(self, bot_id: int | None, method: str, params: dict[str, Any],
                  error: ApiError | None, started: float, *, result: Any = None,
                  source: str = "http") -> None:
        entry: dict[str, Any] = {
            "bot_id": bot_id, "method": method, "params": _json_safe(params),
            "ok": error is None, "error_code": error.code if error else None,
            "description": error.description if error else None,
            "time": started, "duration": time.time() - started, "source": source,
        }
        if error is None:
            entry["result"] = copy.deepcopy(result)
        elif error.retry_after is not None:
            entry["retry_after"] = error.retry_after
        if error is not None and error.code != 409:
            log.info("emulator: %s -> %s %s", method, error.code, error.description)
        self._calls.append(entry)
        self._notify_activity()

    async def _handle_file(self, request: web.Request) -> web.Response:
        if not TOKEN_RE.match(request.match_info["token"]):
            return web.json_response(ApiError(401, "Unauthorized").payload(), status=401)
        path = request.match_info["path"]
        for f in self._files.values():
            if f.file_path == path:
                return web.Response(body=f.content(),
                                    content_type=f.mime_type or "application/octet-stream")
        return web.json_response(ApiError(404, "Not Found").payload(), status=404)

    def _notify_activity(self) -> None:
        ev, self._activity = self._activity, asyncio.Event()
        ev.set()

    # ================================================================== faults
    def _take_fault(self, method: str, bot_id: int | None) -> Fault | None:
        for fault in self._faults:
            if fault.matches(method, bot_id):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    # ============================================================ chat helpers
    def _private_chat(self, user_id: int) -> dict[str, Any]:
        u = self._users[user_id]["user"]
        chat: dict[str, Any] = {"id": user_id, "type": "private", "first_name": u["first_name"]}
        for key in ("last_name", "username"):
            if u.get(key):
                chat[key] = u[key]
        return chat

    def _group_chat(self, chat_id: int) -> dict[str, Any]:
        g = self._groups[chat_id]
        chat: dict[str, Any] = {"id": chat_id, "type": g["type"], "title": g["title"]}
        if g.get("username"):
            chat["username"] = g["username"]
        if g["is_forum"]:
            chat["is_forum"] = True
        return chat

    def _chat_of(self, value: Any) -> dict[str, Any]:
        """Resolve a ``chat_id`` parameter to a chat the emulator knows."""
        if isinstance(value, int):
            if value in self._users:
                return self._private_chat(value)
            if value in self._groups:
                return self._group_chat(value)
        elif isinstance(value, str) and value.startswith("@"):
            for cid, g in self._groups.items():
                if (g.get("username") or "").lower() == value[1:].lower():
                    return self._group_chat(cid)
        raise bad("chat not found")

    def _check_blocked(self, chat: dict[str, Any]) -> None:
        if chat["type"] == "private" and self._users[chat["id"]].get("blocked"):
            raise ApiError(403, "Forbidden: bot was blocked by the user")

    def _send_target(self, bot: BotState, p: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        """Chat + thread for a send: chat exists, not blocked, thread valid in forums."""
        chat = self._chat_of(p["chat_id"])
        self._check_blocked(chat)
        return chat, self._thread(bot, chat, p.get("message_thread_id"))

    def _thread(self, bot: BotState, chat: dict[str, Any], thread_id: int | None) -> int | None:
        if thread_id is None or not chat.get("is_forum"):
            return None  # Telegram ignores thread ids outside forums
        if (chat["id"], thread_id) not in bot.topics:
            raise bad("message thread not found")
        return thread_id

    def _reply_target(self, bot: BotState, chat_id: int, p: dict[str, Any]
                      ) -> StoredMessage | None:
        rp = p.get("reply_parameters")
        if rp is None and p.get("reply_to_message_id") is None:
            return None
        if rp is not None:
            mid = rp["message_id"]
            allow = bool(rp.get("allow_sending_without_reply"))
            if rp.get("chat_id") is not None:
                chat_id = self._chat_of(rp["chat_id"])["id"]
        else:
            mid = p["reply_to_message_id"]
            allow = bool(p.get("allow_sending_without_reply"))
        target = bot.messages.get((chat_id, mid))
        if target is None or target.deleted:
            if allow:
                return None
            raise bad("message to be replied not found")
        return target

    def _rate_limit(self, bot: BotState, chat: dict[str, Any], cost: int = 1) -> None:
        retry = bot.limiter.check(chat["id"], chat["type"] == "private", cost)
        if retry is not None:
            raise ApiError(429, f"Too Many Requests: retry after {retry}", retry)

    def _check_markup(self, markup: dict[str, Any] | None) -> dict[str, Any] | None:
        """Telegram-side checks on keyboards beyond the spec's field types."""
        if not markup or "inline_keyboard" not in markup:
            return markup
        button_spec = self.spec.types.get("InlineKeyboardButton")
        actions = set(button_spec.fields) - {"text", "icon_custom_emoji_id", "style"} \
            if button_spec else {"url", "callback_data"}
        for button in _find_buttons(markup):
            used = [k for k in button if k in actions]
            if not used:
                raise bad("can't parse inline keyboard button: Text buttons are unallowed "
                          "in the inline keyboard")
            if len(used) > 1:
                raise bad(f"can't parse inline keyboard button: only one of {used} allowed")
            if "callback_data" in button:
                size = len(str(button["callback_data"]).encode("utf-8"))
                if not 1 <= size <= CALLBACK_DATA_LIMIT:
                    raise bad("BUTTON_DATA_INVALID")
            if "url" in button and not str(button["url"]).strip():
                raise bad("BUTTON_URL_INVALID")
        return markup

    def _render(self, text: str, parse_mode: str | None, entities: list[Any] | None,
                *, caption: bool) -> tuple[str, list[dict[str, Any]] | None]:
        """Apply parse_mode / entities and enforce Telegram's length limits."""
        if entities:  # explicit entities win; parse_mode is then ignored, as in Telegram
            plain, parsed = text, list(entities)
        else:
            try:
                plain, parsed = render_text(text, parse_mode)
            except (EntityParseError, ValueError) as exc:
                raise ApiError(400, str(exc)) from None
        ents = parsed
        if caption:
            if len(plain) > CAPTION_LIMIT:
                raise bad("message caption is too long")
        else:
            if not plain.strip():
                raise bad("message text is empty")
            if len(plain) > TEXT_LIMIT:
                raise bad("message is too long")
        return plain, ents or None

    # ========================================================= message storage
    def _build_message(self, bot: BotState, chat: dict[str, Any], sender: dict[str, Any],
                       thread_id: int | None, reply: StoredMessage | None,
                       content: dict[str, Any]) -> dict[str, Any]:
        mid = bot.next_message_id(chat["id"])
        msg: dict[str, Any] = {"message_id": mid}
        if thread_id is not None:
            msg["message_thread_id"] = thread_id
            msg["is_topic_message"] = True
        msg.update({"from": sender, "chat": chat, "date": int(time.time())})
        if reply is not None:
            replied = copy.deepcopy(reply.message)
            replied.pop("reply_to_message", None)
            msg["reply_to_message"] = replied
        msg.update({k: v for k, v in content.items() if v is not None})
        return msg

    def _store_bot_message(self, bot: BotState, chat: dict[str, Any], content: dict[str, Any],
                           p: dict[str, Any], method: str, *, thread_id: int | None,
                           reply: StoredMessage | None, markup: dict[str, Any] | None,
                           extra: dict[str, Any] | None = None) -> StoredMessage:
        """Create a bot message and its test-facing record (see :meth:`sent`)."""
        msg = self._build_message(bot, chat, self._bot_user(bot), thread_id, reply, content)
        if p.get("protect_content"):
            msg["has_protected_content"] = True
        if markup and "inline_keyboard" in markup:
            msg["reply_markup"] = markup  # only inline keyboards are echoed in Message
        media_type = next((k for k in MEDIA_KEYS if k in msg), None)
        media_ids: list[str] = []
        if media_type == "photo":
            media_ids = [msg["photo"][-1]["file_id"]]
        elif media_type:
            media_ids = [msg[media_type]["file_id"]]
        record: dict[str, Any] = {
            "bot_id": bot.bot_id, "chat_id": chat["id"], "message_id": msg["message_id"],
            "message_thread_id": thread_id, "method": method,
            "text": msg.get("text"), "caption": msg.get("caption"),
            "raw_text": p.get("text", p.get("caption")), "parse_mode": p.get("parse_mode"),
            "entities": msg.get("entities") or msg.get("caption_entities"),
            "reply_markup": markup, "protect_content": bool(p.get("protect_content")),
            "disable_notification": bool(p.get("disable_notification")),
            "reply_to_message_id": msg.get("reply_to_message", {}).get("message_id"),
            "media_type": media_type, "media": media_ids,
            "media_group_id": msg.get("media_group_id"),
            "edits": [], "deleted": False, "date": msg["date"], "time": time.time(),
            "message": msg,
        }
        if extra:
            record.update(extra)
        _sync_record(record, msg)
        stored = StoredMessage(chat["id"], msg["message_id"], msg, True, record)
        bot.messages[(chat["id"], msg["message_id"])] = stored
        bot.sent.append(record)
        bot.sent_by_chat.setdefault(chat["id"], []).append(record)
        self._notify_activity()
        return stored

    def _edit_target(self, bot: BotState, p: dict[str, Any]) -> StoredMessage:
        if p.get("inline_message_id"):
            raise bad("MESSAGE_ID_INVALID")  # inline messages are not tracked
        if p.get("chat_id") is None or p.get("message_id") is None:
            raise bad("message identifier is not specified")
        chat = self._chat_of(p["chat_id"])
        self._check_blocked(chat)
        stored = bot.messages.get((chat["id"], p["message_id"]))
        if stored is None or stored.deleted:
            raise bad("message to edit not found")
        if not stored.from_bot:
            raise bad("message can't be edited")
        return stored

    def _apply_edit(self, stored: StoredMessage, changes: dict[str, Any],
                    markup: dict[str, Any] | None, parse_mode: str | None,
                    raw_text: Any = _SAME) -> None:
        msg = stored.message
        rec = stored.record or {}
        rec["edits"].append({
            "time": time.time(), "text": msg.get("text"), "caption": msg.get("caption"),
            "entities": msg.get("entities") or msg.get("caption_entities"),
            "reply_markup": msg.get("reply_markup"),
        })
        for key, value in changes.items():
            if value is None:
                msg.pop(key, None)
            else:
                msg[key] = value
        if markup is None:
            msg.pop("reply_markup", None)
        else:
            msg["reply_markup"] = markup
        msg["edit_date"] = int(time.time())
        rec["parse_mode"] = parse_mode
        if raw_text is not _SAME:
            rec["raw_text"] = raw_text
        _sync_record(rec, msg)
        if markup is not None or "inline_keyboard" in (rec.get("reply_markup") or {}):
            rec["reply_markup"] = markup
        self._notify_activity()

    # ================================================================== files
    def _store_file(self, kind: str, data: bytes | None, *, size: int | None = None,
                    file_name: str | None = None, mime_type: str | None = None,
                    url: str | None = None) -> StoredFile:
        self._file_seq += 1
        prefix = {"photo": "AgACAgIAAxk", "document": "BQACAgIAAxk", "video": "BAACAgIAAxk",
                  "audio": "CQACAgIAAxk", "animation": "CgACAgIAAxk", "voice": "AwACAgIAAxk"}
        head = prefix.get(kind, "BQACAgIAAxk")
        file_id = f"{head}{self._file_seq:06d}{secrets.token_urlsafe(24)}"
        unique = "AQAD" + hashlib.sha1(file_id.encode()).hexdigest()[:12]
        f = StoredFile(file_id, unique, kind, size if size is not None else len(data or b""),
                       data, file_name, mime_type, url=url)
        if kind == "photo":
            dims = _image_size(data or b"") or (800, 600)
            f.width, f.height = dims
        self._files[file_id] = f
        return f

    def _input_file(self, value: Any, kind: str, files: dict[str, FilePart]) -> StoredFile:
        """Resolve an ``InputFile or String`` parameter (upload, file_id or URL)."""
        if isinstance(value, str) and value.startswith("attach://"):
            part = files.get(value[len("attach://"):])
            if part is None:
                raise bad("wrong file identifier/HTTP URL specified")
            value = part
        if isinstance(value, FilePart):
            if len(value.data) > UPLOAD_LIMIT:
                raise ApiError(413, "Request Entity Too Large")
            if kind == "photo" and len(value.data) > PHOTO_LIMIT:
                raise bad("PHOTO_INVALID_DIMENSIONS")
            mime = value.content_type
            if not mime or mime == "application/octet-stream":
                mime = mimetypes.guess_type(value.filename)[0] or "application/octet-stream"
            return self._store_file(kind, value.data, file_name=value.filename, mime_type=mime)
        if isinstance(value, str):
            if value.startswith(("http://", "https://")):
                name = value.rsplit("/", 1)[-1] or None
                return self._store_file(kind, None, size=0, file_name=name, url=value,
                                        mime_type=mimetypes.guess_type(value)[0])
            f = self._files.get(value)
            if f is None:
                raise bad("wrong file identifier/HTTP URL specified")
            if (kind == "photo") != (f.kind == "photo"):
                raise bad("type of file mismatch")
            return f
        raise bad("wrong file identifier/HTTP URL specified")

    def _media_obj(self, f: StoredFile, kind: str) -> Any:
        base: dict[str, Any] = {"file_id": f.file_id, "file_unique_id": f.file_unique_id}
        if kind == "photo":
            return [{**base, "width": f.width or 800, "height": f.height or 600,
                     "file_size": f.size}]
        if f.size:
            base["file_size"] = f.size
        if kind in ("document", "video", "audio", "animation", "voice"):
            if f.file_name and kind != "voice":
                base["file_name"] = f.file_name
            if f.mime_type:
                base["mime_type"] = f.mime_type
        if kind in ("video", "animation"):
            base.update(width=640, height=360, duration=1)
        if kind in ("audio", "voice"):
            base["duration"] = 1
        return base

    # ======================================================= webhook delivery
    def _ensure_webhook_task(self, bot: BotState) -> None:
        if not self._running or bot.webhook is None or self._client is None:
            return
        if bot.webhook_task is None or bot.webhook_task.done():
            bot.webhook_task = asyncio.get_running_loop().create_task(self._webhook_loop(bot))

    async def _webhook_loop(self, bot: BotState) -> None:
        """Deliver queued updates one at a time, in order, retrying with backoff."""
        backoff = 0.05
        while self._running and bot.webhook is not None:
            if not bot.updates:
                await bot.updates_changed.wait()
                continue
            item, hook = bot.updates[0], bot.webhook
            headers = {"Content-Type": "application/json"}
            if hook.get("secret_token"):
                headers["X-Telegram-Bot-Api-Secret-Token"] = hook["secret_token"]
            error: str | None = None
            reply: tuple[str, dict[str, Any], dict[str, FilePart]] | None = None
            assert self._client is not None
            try:
                async with self._client.post(
                    hook["url"], data=json.dumps(item.update, ensure_ascii=False).encode(),
                    headers=headers, timeout=aiohttp.ClientTimeout(total=self.webhook_timeout),
                ) as resp:
                    if 200 <= resp.status < 300:
                        reply = await self._read_webhook_reply(resp)
                    else:
                        error = f"Wrong response from the webhook: {resp.status} {resp.reason}"
            except TimeoutError:
                error = "Read timeout expired"
            except (aiohttp.ClientError, OSError) as exc:
                error = f"Connection error: {exc}"
            except ValueError as exc:  # unparseable reply body: Telegram ignores it
                log.warning("emulator: bad webhook reply body: %s", exc)
            if error is None:
                item.delivered += 1
                if item in bot.updates:
                    bot.updates.remove(item)
                backoff = 0.05
                if reply is not None:
                    await self._execute(bot, reply[0], reply[1], reply[2], source="webhook-reply")
            else:
                bot.last_error_date = int(time.time())
                bot.last_error_message = error
                log.info("emulator: webhook delivery failed (%s); retrying in %.2fs", error,
                         backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.webhook_max_backoff)

    async def _read_webhook_reply(self, resp: aiohttp.ClientResponse
                                  ) -> tuple[str, dict[str, Any], dict[str, FilePart]] | None:
        """A webhook may answer with a method call in its body, which Telegram executes."""
        ctype = resp.content_type
        raw: dict[str, Any] = {}
        files: dict[str, FilePart] = {}
        if ctype == "application/json":
            text = await resp.text()
            body = json.loads(text) if text.strip() else {}
            if isinstance(body, dict):
                raw = body
        elif ctype == "multipart/form-data":
            reader = aiohttp.MultipartReader(resp.headers, resp.content)
            while True:
                part = await reader.next()
                if part is None:
                    break
                if not isinstance(part, aiohttp.BodyPartReader):
                    continue
                data = await part.read()
                if part.filename:
                    files[part.name or ""] = FilePart(part.name or "", part.filename, bytes(data))
                else:
                    raw[part.name or ""] = bytes(data).decode("utf-8", "replace")
        method = raw.pop("method", None)
        if not method:
            return None
        return str(method), raw, files

    # ======================================================== update queueing
    def _enqueue(self, bot: BotState, update: dict[str, Any], *, force: bool = False
                 ) -> dict[str, Any]:
        uid = int(update.get("update_id", bot.next_update_id))
        update = {"update_id": uid, **{k: v for k, v in update.items() if k != "update_id"}}
        bot.next_update_id = max(bot.next_update_id, uid + 1)
        kind = next((k for k in update if k != "update_id"), "")
        allowed = bot.allowed_updates
        if (allowed and kind not in allowed) or (not allowed and kind in
                                                 DEFAULT_EXCLUDED_UPDATES):
            log.warning("emulator: update %s of type %r dropped by allowed_updates=%r",
                        update["update_id"], kind, allowed)
            return update
        bot.updates.append(QueuedUpdate(update, force=force))
        bot.notify_updates()
        self._ensure_webhook_task(bot)
        return copy.deepcopy(update)

    # ===================================================== Bot API: core
    async def _api_generic(self, bot: BotState, spec_m: MethodSpec, p: dict[str, Any]) -> Any:
        if "chat_id" in p and p["chat_id"] is not None:
            self._chat_of(p["chat_id"])
        if spec_m.returns_boolean:
            log.warning("emulator: %s is not implemented; answering true", spec_m.name)
            return True
        raise bad("method not supported by the emulator")

    async def _api_getme(self, bot: BotState, p: dict[str, Any], files: Any) -> dict[str, Any]:
        return {**self._bot_user(bot), "can_join_groups": True,
                "can_read_all_group_messages": not self.privacy_mode,
                "supports_inline_queries": True, "can_connect_to_business": False,
                "has_main_web_app": False}

    async def _api_logout(self, bot: BotState, p: dict[str, Any], files: Any) -> bool:
        return True

    async def _api_getupdates(self, bot: BotState, p: dict[str, Any], files: Any
                              ) -> list[dict[str, Any]]:
        if bot.webhook is not None:
            raise ApiError(409, WEBHOOK_CONFLICT)
        limit = min(100, max(1, int(p.get("limit", 100))))
        timeout = max(0, int(p.get("timeout", 0)))
        if "allowed_updates" in p:
            bot.allowed_updates = list(p["allowed_updates"]) or None
        offset = int(p.get("offset", 0))
        if offset > 0:
            bot.updates = [u for u in bot.updates
                           if u.id >= offset or (u.force and not u.delivered)]
        elif offset < 0:
            bot.updates = bot.updates[offset:]
        bot.poll_generation += 1
        generation = bot.poll_generation
        bot.notify_updates()  # an older poller waiting now gets 409 (like Telegram)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if generation != bot.poll_generation:
                raise ApiError(409, POLL_CONFLICT)
            if bot.webhook is not None:
                return []
            ready = bot.updates[:limit]
            remaining = deadline - loop.time()
            if ready or remaining <= 0 or not self._running:
                break
            ev = bot.updates_changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), remaining)
        for item in ready:
            item.delivered += 1
        return [copy.deepcopy(item.update) for item in ready]

    async def _api_setwebhook(self, bot: BotState, p: dict[str, Any], files: Any) -> bool:
        url = p["url"].strip()
        if not url:
            return await self._api_deletewebhook(bot, p, files)
        if not re.match(r"^https?://[^/\s]+", url):
            raise bad("bad webhook: invalid webhook URL specified")
        secret = p.get("secret_token")
        if secret is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", secret):
            raise bad("bad webhook: secret token contains unallowed characters")
        if p.get("drop_pending_updates"):
            bot.updates.clear()
        if "allowed_updates" in p:
            bot.allowed_updates = list(p["allowed_updates"]) or None
        if bot.webhook is None or bot.webhook["url"] != url:
            bot.last_error_date = bot.last_error_message = None
        bot.webhook = {"url": url, "secret_token": secret,
                       "max_connections": int(p.get("max_connections", 40)),
                       "has_custom_certificate": p.get("certificate") is not None,
                       "ip_address": p.get("ip_address")}
        bot.notify_updates()
        self._ensure_webhook_task(bot)
        return True

    async def _api_deletewebhook(self, bot: BotState, p: dict[str, Any], files: Any) -> bool:
        if p.get("drop_pending_updates"):
            bot.updates.clear()
        bot.webhook = None
        bot.notify_updates()
        return True

    async def _api_getwebhookinfo(self, bot: BotState, p: dict[str, Any], files: Any
                                  ) -> dict[str, Any]:
        info: dict[str, Any] = {"url": bot.webhook["url"] if bot.webhook else "",
                                "has_custom_certificate": bool(
                                    bot.webhook and bot.webhook["has_custom_certificate"]),
                                "pending_update_count": len(bot.updates)}
        if bot.webhook:
            info["max_connections"] = bot.webhook["max_connections"]
            if bot.webhook.get("ip_address"):
                info["ip_address"] = bot.webhook["ip_address"]
        if bot.allowed_updates:
            info["allowed_updates"] = bot.allowed_updates
        if bot.last_error_date is not None:
            info["last_error_date"] = bot.last_error_date
            info["last_error_message"] = bot.last_error_message
        return info

    # ================================================= Bot API: messages
    async def _api_sendmessage(self, bot: BotState, p: dict[str, Any], files: Any
                               ) -> dict[str, Any]:
        chat, thread = self._send_target(bot, p)
        text, ents = self._render(p["text"], p.get("parse_mode"), p.get("entities"),
                                  caption=False)
        markup = self._check_markup(p.get("reply_markup"))
        reply = self._reply_target(bot, chat["id"], p)
        self._rate_limit(bot, chat)
        content: dict[str, Any] = {"text": text, "entities": ents}
        lpo = p.get("link_preview_options")
        if lpo and lpo.get("url"):
            content["link_preview_options"] = lpo
        stored = self._store_bot_message(bot, chat, content, p, "sendMessage", thread_id=thread,
                                         reply=reply, markup=markup)
        return stored.message

    async def _send_media(self, bot: BotState, p: dict[str, Any], files: dict[str, FilePart],
                          kind: str, method: str) -> dict[str, Any]:
        chat, thread = self._send_target(bot, p)
        caption, cents = (None, None)
        if p.get("caption") is not None:
            caption, cents = self._render(p["caption"], p.get("parse_mode"),
                                          p.get("caption_entities"), caption=True)
        markup = self._check_markup(p.get("reply_markup"))
        reply = self._reply_target(bot, chat["id"], p)
        f = self._input_file(p[kind], kind, files)
        self._rate_limit(bot, chat)
        content = {kind: self._media_obj(f, kind), "caption": caption or None,
                   "caption_entities": cents}
        if kind == "photo" and p.get("has_spoiler"):
            content["has_media_spoiler"] = True
        stored = self._store_bot_message(bot, chat, content, p, method, thread_id=thread,
                                         reply=reply, markup=markup)
        return stored.message

    async def _api_sendphoto(self, bot: BotState, p: dict[str, Any],
                             files: dict[str, FilePart]) -> dict[str, Any]:
        return await self._send_media(bot, p, files, "photo", "sendPhoto")

    async def _api_senddocument(self, bot: BotState, p: dict[str, Any],
                                files: dict[str, FilePart]) -> dict[str, Any]:
        return await self._send_media(bot, p, files, "document", "sendDocument")

    async def _api_sendvideo(self, bot: BotState, p: dict[str, Any],
                             files: dict[str, FilePart]) -> dict[str, Any]:
        return await self._send_media(bot, p, files, "video", "sendVideo")

    async def _api_sendaudio(self, bot: BotState, p: dict[str, Any],
                             files: dict[str, FilePart]) -> dict[str, Any]:
        return await self._send_media(bot, p, files, "audio", "sendAudio")

    async def _api_sendmediagroup(self, bot: BotState, p: dict[str, Any],
                                  files: dict[str, FilePart]) -> list[dict[str, Any]]:
        chat, thread = self._send_target(bot, p)
        media = p["media"]
        if not 2 <= len(media) <= 10:
            raise bad("media group must contain 2-10 items")
        kinds = {item["type"] for item in media}
        if kinds - {"photo", "video", "document", "audio"}:
            raise bad(f"unsupported media type in a media group: {sorted(kinds)}")
        for solo in ("document", "audio"):
            if solo in kinds and len(kinds) > 1:
                raise bad(f"{solo} can't be mixed with other media types")
        reply = self._reply_target(bot, chat["id"], p)
        prepared = []
        for item in media:
            caption, cents = (None, None)
            if item.get("caption") is not None:
                caption, cents = self._render(item["caption"], item.get("parse_mode"),
                                              item.get("caption_entities"), caption=True)
            f = self._input_file(item["media"], item["type"], files)
            prepared.append((item, f, caption, cents))
        self._rate_limit(bot, chat, cost=len(prepared))
        bot.media_group_seq += 1
        group_id = f"{13_000_000_000_000_000 + bot.media_group_seq}"
        out = []
        for item, f, caption, cents in prepared:
            content = {item["type"]: self._media_obj(f, item["type"]), "caption": caption or None,
                       "caption_entities": cents, "media_group_id": group_id}
            stored = self._store_bot_message(bot, chat, content, {**p, **item}, "sendMediaGroup",
                                             thread_id=thread, reply=reply, markup=None)
            out.append(stored.message)
        return out

    async def _api_sendchataction(self, bot: BotState, p: dict[str, Any], files: Any) -> bool:
        self._send_target(bot, p)
        if p["action"] not in CHAT_ACTIONS:
            raise bad("wrong parameter action in request")
        return True

    async def _api_editmessagetext(self, bot: BotState, p: dict[str, Any], files: Any
                                   ) -> dict[str, Any]:
        stored = self._edit_target(bot, p)
        if not p.get("text"):
            raise bad("message text is empty")
        if "text" not in stored.message:
            raise bad("there is no text in the message to edit")
        text, ents = self._render(p["text"], p.get("parse_mode"), p.get("entities"),
                                  caption=False)
        markup = self._check_markup(p.get("reply_markup"))
        msg = stored.message
        if (text == msg.get("text") and ents == (msg.get("entities") or None)
                and markup == msg.get("reply_markup")):
            raise bad(NOT_MODIFIED)
        self._apply_edit(stored, {"text": text, "entities": ents}, markup, p.get("parse_mode"),
                         p["text"])
        return stored.message

    async def _api_editmessagecaption(self, bot: BotState, p: dict[str, Any], files: Any
                                      ) -> dict[str, Any]:
        stored = self._edit_target(bot, p)
        msg = stored.message
        if not any(k in msg for k in MEDIA_KEYS):
            raise bad("there is no caption in the message to edit")
        caption, cents = (None, None)
        if p.get("caption"):
            caption, cents = self._render(p["caption"], p.get("parse_mode"),
                                          p.get("caption_entities"), caption=True)
        markup = self._check_markup(p.get("reply_markup"))
        if ((caption or None) == msg.get("caption") and cents == (msg.get("caption_entities")
                                                                   or None)
                and markup == msg.get("reply_markup")):
            raise bad(NOT_MODIFIED)
        self._apply_edit(stored, {"caption": caption or None, "caption_entities": cents},
                         markup, p.get("parse_mode"), p.get("caption"))
        return stored.message

    async def _api_editmessagereplymarkup(self, bot: BotState, p: dict[str, Any], files: Any
                                          ) -> dict[str, Any]:
        stored = self._edit_target(bot, p)
        markup = self._check_markup(p.get("reply_markup"))
        if markup == stored.message.get("reply_markup"):
            raise bad(NOT_MODIFIED)
        self._apply_edit(stored, {}, markup, (stored.record or {}).get("parse_mode"))
        return stored.message

    def _mark_deleted(self, stored: StoredMessage) -> None:
        stored.deleted = True
        if stored.record is not None:
            stored.record["deleted"] = True
            stored.record["deleted_at"] = time.time()
        self._notify_activity()

    async def _api_deletemessage(self, bot: BotState, p: dict[str, Any], files: Any) -> bool:
        chat = self._chat_of(p["chat_id"])
        stored = bot.messages.get((chat["id"], p["message_id"]))
        if stored is None or stored.deleted:
            raise bad("message to delete not found")
        self._mark_deleted(stored)
        return True

    async def _api_deletemessages(self, bot: BotState, p: dict[str, Any], files: Any) -> bool:
        chat = self._chat_of(p["chat_id"])
        ids = p["message_ids"]
        if not 1 <= len(ids) <= 100:
            raise bad("message_ids must contain 1-100 identifiers")
        for mid in ids:
            stored = bot.messages.get((chat["id"], mid))
            if stored is not None and not stored.deleted:
                self._mark_deleted(stored)
        return True

    def _source_message(self, bot: BotState, p: dict[str, Any], verb: str) -> StoredMessage:
        src_chat = self._chat_of(p["from_chat_id"])
        src = bot.messages.get((src_chat["id"], p["message_id"]))
        if src is None or src.deleted:
            raise bad(f"message to {verb} not found")
        if not any(k in src.message for k in CONTENT_KEYS):
            raise bad(f"message can't be {verb}ed" if verb == "forward" else
                      "message can't be copied")
        if src.message.get("has_protected_content"):
            raise bad("message has protected content and can't be forwarded")
        return src

    async def _api_copymessage(self, bot: BotState, p: dict[str, Any], files: Any
                               ) -> dict[str, int]:
        src = self._source_message(bot, p, "copy")
        chat, thread = self._send_target(bot, p)
        markup = self._check_markup(p.get("reply_markup"))
        reply = self._reply_target(bot, chat["id"], p)
        content = {k: copy.deepcopy(src.message[k]) for k in CONTENT_KEYS if k in src.message}
        if "caption" in p and "text" not in content:
            caption, cents = self._render(p["caption"], p.get("parse_mode"),
                                          p.get("caption_entities"), caption=True)
            content["caption"] = caption or None
            content["caption_entities"] = cents
        self._rate_limit(bot, chat)
        stored = self._store_bot_message(
            bot, chat, content, p, "copyMessage", thread_id=thread, reply=reply, markup=markup,
            extra={"copied_from": {"chat_id": src.chat_id, "message_id": src.message_id}},
        )
        return {"message_id": stored.message_id}

    async def _api_forwardmessage(self, bot: BotState, p: dict[str, Any], files: Any
                                  ) -> dict[str, Any]:
        src = self._source_message(bot, p, "forward")
        chat, thread = self._send_target(bot, p)
        content = {k: copy.deepcopy(src.message[k]) for k in CONTENT_KEYS if k in src.message}
        content["forward_origin"] = {"type": "user", "date": src.message["date"],
                                     "sender_user": src.message.get("from",
                                                                    self._bot_user(bot))}
        self._rate_limit(bot, chat)
        stored = self._store_bot_message(
            bot, chat, content, p, "forwardMessage", thread_id=thread, reply=None, markup=None,
            extra={"forwarded_from": {"chat_id": src.chat_id, "message_id": src.message_id}},
        )
        return stored.message

    # ================================================= Bot API: queries
    async def _api_answercallbackquery(self, bot: BotState, p: dict[str, Any], files: Any
                                       ) -> bool:
        q = bot.callback_queries.get(p["callback_query_id"])
        if q is None or q["answered"]:
            raise bad("query is too old and response timeout expired or query ID is invalid")
        if len(p.get("text") or "") > 200:
            raise bad("MESSAGE_TOO_LONG")
        q["answered"] = True
        q["answer"] = {k: v for k, v in p.items() if k != "callback_query_id"}
        return True

    async def _api_answerinlinequery(self, bot: BotState, p: dict[str, Any], files: Any
                                     ) -> bool:
        q = bot.inline_queries.get(p["inline_query_id"])
        if q is None or q["answered"]:
            raise bad("query is too old and response timeout expired or query ID is invalid")
        results = p["results"]
        if len(results) > 50:
            raise bad("RESULTS_TOO_MUCH")
        ids = [str(r.get("id")) for r in results]
        if len(set(ids)) != len(ids):
            raise bad("RESULT_ID_DUPLICATE")
        if any(not 1 <= len(i.encode()) <= 64 for i in ids):
            raise bad("RESULT_ID_INVALID")
        for r in results:
            self._check_markup(r.get("reply_markup"))
        q["answered"] = True
        q["answer"] = {k: v for k, v in p.items() if k != "inline_query_id"}
        return True

    # ================================================= Bot API: files
    async def _api_getfile(self, bot: BotState, p: dict[str, Any], files: Any
                           ) -> dict[str, Any]:
        f = self._files.get(p["file_id"])
        if f is None:
            raise bad("invalid file_id")
        if f.size > DOWNLOAD_LIMIT:
            raise bad("file is too big")
        if f.file_path is None:
            folder = {"photo": "photos", "video": "videos", "audio": "music",
                      "voice": "voice", "animation": "animations"}.get(f.kind, "documents")
            ext = ""
            if f.file_name and "." in f.file_name:
                ext = "." + f.file_name.rsplit(".", 1)[-1]
            elif f.kind == "photo":
                ext = ".jpg"
            f.file_path = f"{folder}/file_{self._file_seq}_{f.file_unique_id}{ext}"
            self._file_seq += 1
        return {"file_id": f.file_id, "file_unique_id": f.file_unique_id, "file_size": f.size,
                "file_path": f.file_path}

    # ================================================= Bot API: commands/menu
    def _scope_key(self, p: dict[str, Any]) -> tuple[str, str]:
        scope = p.get("scope") or {"type": "default"}
        if scope.get("chat_id") is not None:
            scope = {**scope, "chat_id": self._chat_of(scope["chat_id"])["id"]}
        lang = p.get("language_code") or ""
        if lang and not re.fullmatch(r"[a-z]{2}", lang):
            raise bad("invalid language code specified")
        return json.dumps(scope, sort_keys=True), lang

    async def _api_setmycommands(self, bot: BotState, p: dict[str, Any], files: Any) -> bool:
        commands = p["commands"]
        if len(commands) > 100:
            raise bad("BOT_COMMANDS_TOO_MUCH")
        for c in commands:
            if not re.fullmatch(r"[a-z0-9_]{1,32}", c["command"]):
                raise bad("BOT_COMMAND_INVALID")
            if not 1 <= len(c["description"]) <= 256:
                raise bad("BOT_COMMAND_DESCRIPTION_INVALID")
        key = self._scope_key(p)
        if commands:
            bot.commands[key] = [{"command": c["command"], "description": c["description"]}
                                 for c in commands]
        else:
            bot.commands.pop(key, None)
        return True

    async def _api_getmycommands(self, bot: BotState, p: dict[str, Any], files: Any
                                 ) -> list[dict[str, Any]]:
        return copy.deepcopy(bot.commands.get(self._scope_key(p), []))

    async def _api_deletemycommands(self, bot: BotState, p: dict[str, Any], files: Any) -> bool:
        bot.commands.pop(self._scope_key(p), None)
        return True

    async def _api_setchatmenubutton(self, bot: BotState, p: dict[str, Any], files: Any
                                     ) -> bool:
        chat_id = self._chat_of(p["chat_id"])["id"] if p.get("chat_id") is not None else None
        if chat_id is not None and chat_id < 0:
            raise bad("menu button can be set only in private chats")
        button = p.get("menu_button") or {"type": "default"}
        bot.menu_buttons[chat_id] = button
        return True

    async def _api_getchatmenubutton(self, bot: BotState, p: dict[str, Any], files: Any
                                     ) -> dict[str, Any]:
        chat_id = self._chat_of(p["chat_id"])["id"] if p.get("chat_id") is not None else None
        button = bot.menu_buttons.get(chat_id) or bot.menu_buttons.get(None)
        return copy.deepcopy(button or {"type": "commands"})

    # ================================================= Bot API: chats
    def _fill_required(self, type_name: str, obj: dict[str, Any], flag: bool = False
                       ) -> dict[str, Any]:
        """Fill required fields the emulator has no data for with neutral values."""
        spec = self.spec.types.get(type_name)
        for fs in spec.fields.values() if spec else ():
            if not fs.required or fs.name in obj:
                continue
            t = fs.types[0]
            if t == "Integer":
                obj[fs.name] = 0
            elif t == "Float":
                obj[fs.name] = 0.0
            elif t in ("Boolean", "True"):
                obj[fs.name] = flag
            elif t == "String":
                obj[fs.name] = ""
            elif t.startswith("Array of"):
                obj[fs.name] = []
            elif t in self.spec.types:
                obj[fs.name] = self._fill_required(t, {}, flag)
        _fill_client_required(type_name, obj, flag)
        return obj

    async def _api_getchat(self, bot: BotState, p: dict[str, Any], files: Any
                           ) -> dict[str, Any]:
        chat = self._chat_of(p["chat_id"])
        info = {**chat, "accent_color_id": 0, "max_reaction_count": 11}
        if chat["type"] == "private":
            info["has_private_forwards"] = False
        return self._fill_required("ChatFullInfo", info)

    async def _api_getchatmember(self, bot: BotState, p: dict[str, Any], files: Any
                                 ) -> dict[str, Any]:
        chat = self._chat_of(p["chat_id"])
        uid = p["user_id"]
        if uid == bot.bot_id:
            return self._admin_member(self._bot_user(bot), can_be_edited=False)
        if uid not in self._users:
            raise bad("user not found")
        user = self._users[uid]["user"]
        if chat["type"] == "private":
            if uid != chat["id"]:
                raise bad("user not found")
            return {"status": "member", "user": user}
        group = self._groups[chat["id"]]
        if uid in group["admins"]:
            return self._admin_member(user, can_be_edited=False)
        if uid in group["members"]:
            return {"status": "member", "user": user}
        return {"status": "left", "user": user}

    def _admin_member(self, user: dict[str, Any], can_be_edited: bool) -> dict[str, Any]:
        member = {"status": "administrator", "user": user, "can_be_edited": can_be_edited,
                  "is_anonymous": False}
        return self._fill_required("ChatMemberAdministrator", member, flag=True)

    # ================================================= Bot API: forum topics
    def _forum(self, p: dict[str, Any]) -> dict[str, Any]:
        chat = self._chat_of(p["chat_id"])
        if not chat.get("is_forum"):
            raise bad("the chat is not a forum")
        return chat

    def _topic(self, bot: BotState, p: dict[str, Any]) -> dict[str, Any]:
        chat = self._forum(p)
        topic = bot.topics.get((chat["id"], p["message_thread_id"]))
        if topic is None:
            raise bad("message thread not found")
        return topic

    async def _api_createforumtopic(self, bot: BotState, p: dict[str, Any], files: Any
                                    ) -> dict[str, Any]:
        chat = self._forum(p)
        name = p["name"]
        if len(name) > 128:
            raise bad("TOPIC_TITLE_INVALID")
        color = p.get("icon_color", 7322096)
        if color not in TOPIC_COLORS:
            raise bad("TOPIC_ICON_COLOR_INVALID")
        created = {"name": name, "icon_color": color}
        if p.get("icon_custom_emoji_id"):
            created["icon_custom_emoji_id"] = p["icon_custom_emoji_id"]
        mid = bot.next_message_id(chat["id"])
        msg = {"message_id": mid, "message_thread_id": mid, "from": self._bot_user(bot),
               "chat": chat, "date": int(time.time()), "is_topic_message": True,
               "forum_topic_created": created}
        bot.messages[(chat["id"], mid)] = StoredMessage(chat["id"], mid, msg, True)
        bot.topics[(chat["id"], mid)] = {"message_thread_id": mid, **created, "closed": False}
        return {"message_thread_id": mid, **created}

    async def _api_editforumtopic(self, bot: BotState, p: dict[str, Any], files: Any) -> bool:
        topic = self._topic(bot, p)
        changes = {k: p[k] for k in ("name", "icon_custom_emoji_id") if p.get(k) is not None}
        if "name" in changes and len(changes["name"]) > 128:
            raise bad("TOPIC_TITLE_INVALID")
        if all(topic.get(k) == v for k, v in changes.items()):
            raise bad("TOPIC_NOT_MODIFIED")
        topic.update(changes)
        return True

    async def _api_closeforumtopic(self, bot: BotState, p: dict[str, Any], files: Any) -> bool:
        topic = self._topic(bot, p)
        if topic["closed"]:
            raise bad("TOPIC_NOT_MODIFIED")
        topic["closed"] = True
        return True

    async def _api_reopenforumtopic(self, bot: BotState, p: dict[str, Any], files: Any) -> bool:
        topic = self._topic(bot, p)
        if not topic["closed"]:
            raise bad("TOPIC_NOT_MODIFIED")
        topic["closed"] = False
        return True

    async def _api_deleteforumtopic(self, bot: BotState, p: dict[str, Any], files: Any) -> bool:
        topic = self._topic(bot, p)
        chat_id = self._chat_of(p["chat_id"])["id"]
        del bot.topics[(chat_id, topic["message_thread_id"])]
        for stored in bot.messages.values():
            if (stored.chat_id == chat_id and not stored.deleted and
                    stored.message.get("message_thread_id") == topic["message_thread_id"]):
                self._mark_deleted(stored)
        return True

    # ================================================================ control
    def add_user(self, user_id: int, first_name: str, last_name: str | None = None,
                 username: str | None = None, language_code: str = "vi",
                 phone: str | None = None) -> dict[str, Any]:
        """Register a user who has started the bot; their private chat id == user_id."""
        if user_id <= 0:
            raise ValueError("user ids are positive")
        user: dict[str, Any] = {"id": user_id, "is_bot": False, "first_name": first_name}
        if last_name:
            user["last_name"] = last_name
        if username:
            user["username"] = username
        if language_code:
            user["language_code"] = language_code
        prev = self._users.get(user_id, {})
        self._users[user_id] = {"user": user, "phone": phone,
                                "blocked": prev.get("blocked", False)}
        return copy.deepcopy(user)

    def create_group(self, chat_id: int, title: str, is_forum: bool = False,
                     members: Iterable[int] = (), admins: Iterable[int] = (),
                     username: str | None = None) -> dict[str, Any]:
        """Create a group the bot is an admin of (supergroup if forum or id -100...)."""
        if chat_id >= 0:
            raise ValueError("group chat ids are negative (e.g. -1001234567890)")
        kind = "supergroup" if is_forum or str(chat_id).startswith("-100") else "group"
        admins = set(admins)
        self._groups[chat_id] = {"title": title, "type": kind, "is_forum": bool(is_forum),
                                 "members": set(members) | admins, "admins": admins,
                                 "username": username}
        return self._group_chat(chat_id)

    def block_user(self, user_id: int, blocked: bool = True) -> None:
        """Make sends to this user's private chat fail with 403 (or undo it)."""
        self._require_user(user_id)
        self._users[user_id]["blocked"] = blocked

    def set_rate_limits(self, global_per_sec: float | None = None,
                        private_per_sec: float | None = None,
                        group_per_min: float | None = None) -> None:
        """Configure flood control (None = off); resets all buckets."""
        self._limits = RateLimits(global_per_sec, private_per_sec, group_per_min)
        for bot in self._all_bots():
            bot.limiter.reset()

    def inject_fault(self, method: str | None, status: int, count: int = 1,
                     retry_after: int | None = None, description: str | None = None, *,
                     delay: float = 0.0, bot_id: int | None = None) -> None:
        """Fail the next ``count`` calls of ``method`` (None = any except getUpdates)."""
        if method is not None and self.spec.method(method) is None:
            raise ValueError(f"unknown Bot API method {method!r}")
        if count < 1:
            raise ValueError("count must be >= 1")
        self._faults.append(Fault(method.lower() if method else None, int(status), int(count),
                                  retry_after, description, float(delay), bot_id))

    def set_latency(self, seconds: float, method: str | None = None) -> None:
        """Delay every call (of ``method``, or all) by ``seconds``; 0 removes it."""
        key = method.lower() if method else None
        if seconds <= 0:
            self._latency.pop(key, None)
        else:
            self._latency[key] = float(seconds)

    def clear_faults(self) -> None:
        self._faults.clear()
        self._latency.clear()

    def _require_user(self, user_id: int) -> dict[str, Any]:
        if user_id not in self._users:
            raise ValueError(f"unknown user {user_id}; call add_user() first")
        return self._users[user_id]

    def _user_chat(self, user_id: int, chat_id: int | None) -> dict[str, Any]:
        self._require_user(user_id)
        if chat_id is None or chat_id == user_id:
            return self._private_chat(user_id)
        if chat_id not in self._groups:
            raise ValueError(f"unknown chat {chat_id}; call create_group() first")
        self._groups[chat_id]["members"].add(user_id)
        return self._group_chat(chat_id)

    def _user_thread(self, bot: BotState, chat: dict[str, Any], thread_id: int | None
                     ) -> int | None:
        if thread_id is None:
            return None
        if not chat.get("is_forum"):
            raise ValueError(f"chat {chat['id']} is not a forum")
        if (chat["id"], thread_id) not in bot.topics:
            raise ValueError(f"no forum topic {thread_id} in chat {chat['id']}")
        return thread_id

    def _user_message(self, bot: BotState, user_id: int, chat_id: int | None,
                      content: dict[str, Any], reply_to_message_id: int | None = None,
                      message_thread_id: int | None = None) -> dict[str, Any]:
        chat = self._user_chat(user_id, chat_id)
        thread = self._user_thread(bot, chat, message_thread_id)
        reply = None
        if reply_to_message_id is not None:
            reply = bot.messages.get((chat["id"], reply_to_message_id))
            if reply is None:
                raise ValueError(f"no message {reply_to_message_id} in chat {chat['id']}")
        user = self._users[user_id]["user"]
        msg = self._build_message(bot, chat, copy.deepcopy(user), thread, reply, content)
        bot.messages[(chat["id"], msg["message_id"])] = StoredMessage(
            chat["id"], msg["message_id"], msg, False)
        return msg

    def _deliver_message(self, bot: BotState, msg: dict[str, Any], kind: str = "message"
                         ) -> dict[str, Any]:
        """Queue a user message, honouring privacy mode in groups."""
        if self.privacy_mode and msg["chat"]["type"] != "private" and kind == "message":
            text = msg.get("text") or msg.get("caption") or ""
            reply = msg.get("reply_to_message", {}).get("from", {})
            if not (text.startswith("/") or f"@{self.bot_username}" in text
                    or reply.get("id") == bot.bot_id):
                log.info("emulator: privacy mode hides group message %s", msg["message_id"])
                return {"message": copy.deepcopy(msg), "update_id": None}
        return self._enqueue(bot, {kind: copy.deepcopy(msg)})

    async def send_text(self, user_id: int, text: str, chat_id: int | None = None,
                        reply_to_message_id: int | None = None,
                        message_thread_id: int | None = None, *,
                        bot_id: int | None = None) -> dict[str, Any]:
        """The user sends ``text``; commands get a ``bot_command`` entity."""
        bot = self._bot(bot_id)
        content: dict[str, Any] = {"text": text}
        m = re.match(r"/[A-Za-z0-9_]{1,64}(?:@[A-Za-z0-9_]{3,64})?", text)
        if m:
            content["entities"] = [{"type": "bot_command", "offset": 0,
                                    "length": _utf16_len(m.group(0))}]
        msg = self._user_message(bot, user_id, chat_id, content, reply_to_message_id,
                                 message_thread_id)
        return self._deliver_message(bot, msg)

    async def send_contact(self, user_id: int, phone_number: str,
                           contact_user_id: Any = _SAME, first_name: str | None = None,
                           chat_id: int | None = None, *, bot_id: int | None = None
                           ) -> dict[str, Any]:
        """The user shares a contact (by default their own, as a request_contact button does)."""
        bot = self._bot(bot_id)
        user = self._require_user(user_id)["user"]
        same = contact_user_id is _SAME
        contact: dict[str, Any] = {"phone_number": phone_number,
                                   "first_name": first_name or user["first_name"]}
        if same:
            contact["user_id"] = user_id
            if user.get("last_name") and first_name is None:
                contact["last_name"] = user["last_name"]
        elif contact_user_id is not None:
            contact["user_id"] = int(contact_user_id)
        msg = self._user_message(bot, user_id, chat_id, {"contact": contact})
        return self._deliver_message(bot, msg)

    async def press_button(self, user_id: int, message: dict[str, Any] | int,
                           callback_data: str, chat_id: int | None = None, *,
                           force: bool = False, bot_id: int | None = None) -> dict[str, Any]:
        """The user taps an inline button; unless ``force``, it must exist on the message."""
        bot = self._bot(bot_id)
        user = self._require_user(user_id)["user"]
        if isinstance(message, dict):
            mid = int(message["message_id"])
            cid = message.get("chat_id") or message.get("chat", {}).get("id") or chat_id
        else:
            mid, cid = int(message), chat_id
        cid = int(cid if cid is not None else user_id)
        stored = bot.messages.get((cid, mid))
        if not force:
            if stored is None or not stored.from_bot:
                raise ValueError(f"no bot message {mid} in chat {cid}")
            if stored.deleted:
                raise ValueError(f"message {mid} in chat {cid} was deleted")
            datas = [b.get("callback_data") for b in
                     _find_buttons(stored.message.get("reply_markup"))]
            if callback_data not in datas:
                raise ValueError(f"message {mid} in chat {cid} has no button with "
                                 f"callback_data={callback_data!r}; current buttons: {datas}")
        if stored is not None and not stored.deleted:
            msg_obj: dict[str, Any] = copy.deepcopy(stored.message)
        else:
            chat = self._group_chat(cid) if cid in self._groups else self._private_chat(user_id)
            msg_obj = {"chat": chat, "message_id": mid, "date": 0}  # InaccessibleMessage
        query_id = str(secrets.randbits(63))
        chat_instance = str(int(hashlib.sha1(f"{cid}".encode()).hexdigest()[:15], 16))
        bot.callback_queries[query_id] = {"answered": False, "answer": None, "user_id": user_id,
                                          "chat_id": cid, "message_id": mid,
                                          "data": callback_data, "time": time.time()}
        cq = {"id": query_id, "from": copy.deepcopy(user), "message": msg_obj,
              "chat_instance": chat_instance, "data": callback_data}
        return self._enqueue(bot, {"callback_query": cq})

    async def _send_user_file(self, bot: BotState, user_id: int, kind: str, content: bytes,
                              caption: str | None, chat_id: int | None,
                              message_thread_id: int | None, **meta: Any) -> dict[str, Any]:
        f = self._store_file(kind, content if meta.get("size") is None else (content or None),
                             **meta)
        body: dict[str, Any] = {kind: self._media_obj(f, kind)}
        if caption:
            body["caption"] = caption
        msg = self._user_message(bot, user_id, chat_id, body, None, message_thread_id)
        return self._deliver_message(bot, msg)

    async def send_photo(self, user_id: int, content: bytes, caption: str | None = None,
                         chat_id: int | None = None, message_thread_id: int | None = None, *,
                         bot_id: int | None = None) -> dict[str, Any]:
        """The user sends a photo (bytes are stored; ``getFile`` can fetch them)."""
        bot = self._bot(bot_id)
        return await self._send_user_file(bot, user_id, "photo", content, caption, chat_id,
                                          message_thread_id, mime_type="image/jpeg")

    async def send_document(self, user_id: int, content: bytes, file_name: str,
                            mime_type: str = "application/octet-stream",
                            caption: str | None = None, chat_id: int | None = None,
                            file_size: int | None = None,
                            message_thread_id: int | None = None, *,
                            bot_id: int | None = None) -> dict[str, Any]:
        """The user sends a document; ``file_size`` fakes a size (e.g. 30 MB) without bytes."""
        bot = self._bot(bot_id)
        return await self._send_user_file(bot, user_id, "document", content, caption, chat_id,
                                          message_thread_id, size=file_size,
                                          file_name=file_name, mime_type=mime_type)

    async def edit_user_message(self, user_id: int, message_id: int, new_text: str,
                                chat_id: int | None = None, *, bot_id: int | None = None
                                ) -> dict[str, Any]:
        """The user edits an earlier text message (``edited_message`` update)."""
        bot = self._bot(bot_id)
        chat = self._user_chat(user_id, chat_id)
        stored = bot.messages.get((chat["id"], message_id))
        if stored is None or stored.from_bot or stored.message["from"]["id"] != user_id:
            raise ValueError(f"user {user_id} has no message {message_id} in chat {chat['id']}")
        if "text" not in stored.message:
            raise ValueError("only text messages can be edited by this helper")
        stored.message["text"] = new_text
        stored.message.pop("entities", None)
        stored.message["edit_date"] = int(time.time())
        return self._deliver_message(bot, stored.message, kind="edited_message")

    async def send_inline_query(self, user_id: int, query: str, *, offset: str = "",
                                chat_type: str = "sender", bot_id: int | None = None
                                ) -> dict[str, Any]:
        """The user types ``@bot query`` (answer with answerInlineQuery)."""
        bot = self._bot(bot_id)
        user = self._require_user(user_id)["user"]
        qid = str(secrets.randbits(63))
        bot.inline_queries[qid] = {"answered": False, "answer": None, "user_id": user_id,
                                   "query": query, "time": time.time()}
        iq = {"id": qid, "from": copy.deepcopy(user), "query": query, "offset": offset,
              "chat_type": chat_type}
        return self._enqueue(bot, {"inline_query": iq})

    def inject_update(self, update: dict[str, Any], *, bot_id: int | None = None
                      ) -> dict[str, Any]:
        """Queue a raw update; an explicit ``update_id`` is kept (duplicates allowed)."""
        bot = self._bot(bot_id)
        update = copy.deepcopy(update)
        return self._enqueue(bot, update, force="update_id" in update)

    def pending_updates(self, bot_id: int | None = None) -> int:
        return len(self._bot(bot_id).updates)

    def sent(self, chat_id: int | None = None, *, bot_id: int | None = None
             ) -> list[dict[str, Any]]:
        """Bot-sent message records (current state, deleted ones flagged), oldest first."""
        bot = self._bot(bot_id)
        records = bot.sent if chat_id is None else bot.sent_by_chat.get(chat_id, [])
        return copy.deepcopy(records)

    def sent_count(self, chat_id: int, *, bot_id: int | None = None) -> int:
        """How many messages the bot sent to a chat: ``len(sent(chat_id))`` without copying
        them (a driver checking a hundred chats every few milliseconds)."""
        return len(self._bot(bot_id).sent_by_chat.get(chat_id, ()))

    @property
    def calls(self) -> list[dict[str, Any]]:
        """Every Bot API call: method, params, ok, error_code, description, time, ..."""
        return list(self._calls)

    def callback_answer(self, query_id: str, *, bot_id: int | None = None
                        ) -> dict[str, Any] | None:
        """The bot's answerCallbackQuery params for a query (None if unanswered)."""
        q = self._bot(bot_id).callback_queries.get(query_id)
        return copy.deepcopy(q["answer"]) if q else None

    def commands(self, scope: dict[str, Any] | None = None, language_code: str = "", *,
                 bot_id: int | None = None) -> list[dict[str, Any]]:
        """Commands stored by setMyCommands for (scope, language_code)."""
        key = (json.dumps(scope or {"type": "default"}, sort_keys=True), language_code)
        return copy.deepcopy(self._bot(bot_id).commands.get(key, []))

    def forum_topics(self, chat_id: int, *, bot_id: int | None = None) -> list[dict[str, Any]]:
        return copy.deepcopy([t for (cid, _), t in self._bot(bot_id).topics.items()
                              if cid == chat_id])

    def webhook_info(self, *, bot_id: int | None = None) -> dict[str, Any] | None:
        hook = self._bot(bot_id).webhook
        return copy.deepcopy(hook) if hook else None

    async def wait_for_messages(self, chat_id: int, count: int = 1,
                                timeout: float = 10.0,  # noqa: ASYNC109 - public API
                                since: int = 0,
                                predicate: Callable[[dict[str, Any]], bool] | None = None, *,
                                bot_id: int | None = None) -> list[dict[str, Any]]:
        """Wait until >= ``count`` bot messages (index >= ``since`` in the chat) exist."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            ev = self._activity
            records = self._bot(bot_id).sent_by_chat.get(chat_id, [])[since:]
            matching = [r for r in records if predicate is None or predicate(r)]
            if len(matching) >= count:
                return copy.deepcopy(matching)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(self._explain_wait(chat_id, count, since, records,
                                                              matching, timeout))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), remaining)

    def _explain_wait(self, chat_id: int, count: int, since: int, records: list[dict[str, Any]],
                      matching: list[dict[str, Any]], timeout: float) -> str:
        lines = [f"timed out after {timeout}s waiting for {count} bot message(s) in chat "
                 f"{chat_id} (since index {since}); got {len(matching)} matching, "
                 f"{len(records)} in range"]
        for r in records[-10:]:
            body = r["text"] if r["text"] is not None else f"<{r['media_type']}> {r['caption']}"
            flag = " [deleted]" if r["deleted"] else ""
            lines.append(f"  #{r['message_id']} {r['method']}{flag}: {body!r}"[:300])
        failed = [c for c in self._calls if not c["ok"]][-5:]
        if failed:
            lines.append("recent failed API calls:")
            lines += [f"  {c['method']} -> {c['error_code']} {c['description']}" for c in failed]
        if not self._calls:
            lines.append("the bot has not called the API at all")
        return "\n".join(lines)

    async def wait_for_call(self, method: str,
                            timeout: float = 10.0,  # noqa: ASYNC109 - public API
                            predicate: Callable[[dict[str, Any]], bool] | None = None, *,
                            since: int = 0) -> dict[str, Any]:
        """First logged call of ``method`` (index >= ``since`` in :attr:`calls`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        name = method.lower()
        while True:
            ev = self._activity
            for c in self._calls[since:]:
                if c["method"].lower() == name and (predicate is None or predicate(c)):
                    return copy.deepcopy(c)
            remaining = deadline - loop.time()
            if remaining <= 0:
                seen = sorted({c["method"] for c in self._calls[since:]})
                raise TimeoutError(f"timed out after {timeout}s waiting for a "
                                           f"{method} call; methods seen: {seen}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), remaining)

    def state(self) -> dict[str, Any]:
        """Summary for consoles: bots, users, groups."""
        return {
            "bots": [{"bot_id": b.bot_id, "pending_updates": len(b.updates),
                      "webhook": b.webhook["url"] if b.webhook else None,
                      "sent": len(b.sent)} for b in self._all_bots()],
            "users": [{**u["user"], "phone": u["phone"], "blocked": u["blocked"]}
                      for u in self._users.values()],
            "groups": [{**self._group_chat(cid), "members": sorted(g["members"]),
                        "admins": sorted(g["admins"])} for cid, g in self._groups.items()],
            "rate_limits": vars(self._limits),
            "faults": [vars(f) for f in self._faults],
        }

    # ========================================================== HTTP control
    async def _handle_control(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        try:
            body: dict[str, Any] = dict(request.query)
            if request.method == "POST" and request.can_read_body:
                data = await request.json()
                if not isinstance(data, dict):
                    raise ValueError("body must be a JSON object")
                body.update(data)
            result = await self._control(action, request.method, body)
        except TimeoutError as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=408)
        except UnknownAction as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=404)
        except (ValueError, TypeError, RuntimeError, KeyError) as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=400)
        return web.json_response({"ok": True, "result": _json_safe(result)})

    async def _control(self, action: str, http_method: str, body: dict[str, Any]) -> Any:
        def opt_int(key: str) -> int | None:
            v = body.pop(key, None)
            return int(v) if v not in (None, "") else None

        bot_id = opt_int("bot_id")
        if http_method == "GET":
            if action == "sent":
                return self.sent(opt_int("chat_id"), bot_id=bot_id)
            if action == "calls":
                since = opt_int("since") or 0
                method = body.get("method")
                return [c for c in self._calls[since:]
                        if not method or c["method"].lower() == method.lower()]
            if action == "wait":
                chat_id = opt_int("chat_id")
                if chat_id is None:
                    raise ValueError("chat_id is required")
                return await self.wait_for_messages(
                    chat_id, count=opt_int("count") or 1,
                    timeout=float(body.get("timeout", 10.0)), since=opt_int("since") or 0,
                    bot_id=bot_id)
            if action == "state":
                return self.state()
            if action == "pending":
                return self.pending_updates(bot_id)
            raise UnknownAction(f"unknown control action GET {action}")
        kw = {"bot_id": bot_id} if bot_id is not None else {}
        if action == "users":
            return self.add_user(**body)
        if action == "groups":
            return self.create_group(**body)
        if action == "text":
            return await self.send_text(**body, **kw)
        if action == "contact":
            return await self.send_contact(**body, **kw)
        if action == "press":
            return await self.press_button(**body, **kw)
        if action in ("photo", "document"):
            content = base64.b64decode(body.pop("content_b64", "") or "")
            if action == "photo":
                return await self.send_photo(content=content, **body, **kw)
            return await self.send_document(content=content, **body, **kw)
        if action == "edit":
            return await self.edit_user_message(**body, **kw)
        if action == "inline_query":
            return await self.send_inline_query(**body, **kw)
        if action == "update":
            return self.inject_update(body.get("update", body), **kw)
        if action == "block":
            return self.block_user(**body)
        if action == "rate_limits":
            return self.set_rate_limits(**body)
        if action == "fault":
            return self.inject_fault(**body, **kw)
        if action == "latency":
            return self.set_latency(**body)
        if action == "clear_faults":
            return self.clear_faults()
        raise UnknownAction(f"unknown control action POST {action}")
