"""The Bot API emulator must be at least as strict as Telegram, over real HTTP.

Each test talks to a freshly started emulator through aiohttp (raw JSON / form
calls) or through a real aiogram ``Bot`` pointed at it, and checks that the
validation bites exactly where Telegram's does.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiogram import Bot, Dispatcher, F
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import (
    TelegramBadRequest,
    TelegramForbiddenError,
    TelegramRetryAfter,
    TelegramServerError,
)
from aiogram.filters import CommandStart
from aiogram.types import (
    BotCommand,
    BufferedInputFile,
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    KeyboardButton,
    Message,
    ReplyKeyboardMarkup,
)
from aiogram.webhook.aiohttp_server import SimpleRequestHandler
from aiohttp import web

from bot.emulator import Emulator, load_spec, parse_html
from bot.emulator.html import EntityParseError
from bot.emulator.spec import find_spec_path

TOKEN = "123456789:AAH-emulator-test-token-abcdefghijklmnop"
BOT_ID = 123456789
USER = 1001
OTHER = 1002
GROUP = -1001234567890
FORUM = -1009876543210
PNG_1x1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


# ------------------------------------------------------------------ fixtures
@pytest_asyncio.fixture
async def emu() -> AsyncIterator[Emulator]:
    e = Emulator()
    await e.start()
    e.add_user(USER, "An", last_name="Nguyen", username="an_ops")
    e.add_user(OTHER, "Binh")
    e.create_group(GROUP, "Ops group", members=[USER])
    e.create_group(FORUM, "Ops forum", is_forum=True, members=[USER, OTHER])
    yield e
    await e.stop()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest_asyncio.fixture
async def bot(emu: Emulator) -> AsyncIterator[Bot]:
    assert emu.base_url
    b = Bot(TOKEN, session=AiohttpSession(api=TelegramAPIServer.from_base(emu.base_url)))
    yield b
    await b.session.close()


async def call(http: aiohttp.ClientSession, emu: Emulator, method: str, token: str = TOKEN,
               **params: Any) -> tuple[int, dict[str, Any]]:
    """JSON-body call, like most non-aiogram clients."""
    async with http.post(f"{emu.base_url}/bot{token}/{method}", json=params) as r:
        return r.status, await r.json()


async def call_form(http: aiohttp.ClientSession, emu: Emulator, method: str,
                    fields: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """Multipart call with string fields, exactly like aiogram's session."""
    form = aiohttp.FormData(quote_fields=False)
    for k, v in fields.items():
        form.add_field(k, v)
    async with http.post(f"{emu.base_url}/bot{TOKEN}/{method}", data=form) as r:
        return r.status, await r.json()


def kb(*datas: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(inline_keyboard=[
        [InlineKeyboardButton(text=d[:10] or "x", callback_data=d) for d in datas]])


# ------------------------------------------------------------ spec and HTML
def test_spec_is_found_and_indexed() -> None:
    path = find_spec_path()
    assert path.name == "api.json" and path.parent.name == "telegram-bot-api"
    spec = load_spec()
    assert spec is load_spec()  # cached per process
    assert spec.method("SENDMESSAGE") is spec.method("sendMessage")
    assert spec.method("sendMessage").fields["chat_id"].required


def test_html_parser_rules() -> None:
    assert parse_html("<b>x</b> &amp; <i>y</i>") == (
        "x & y", [{"type": "bold", "offset": 0, "length": 1},
                  {"type": "italic", "offset": 4, "length": 1}])
    text, ents = parse_html('😀<a href="https://x.vn/?a=1&amp;b=2">l</a>')
    assert text == "😀l" and ents[0]["offset"] == 2 and ents[0]["url"] == "https://x.vn/?a=1&b=2"
    text, ents = parse_html('<pre><code class="language-sql">select 1</code></pre>')
    assert ents == [{"type": "pre", "offset": 0, "length": 8, "language": "sql"}]
    for bad in ("<b>x", "a < b & c", "<script>x</script>", "<b><i>x</b></i>", "x &nbsp; y",
                "<span>x</span>", "<a>x</a>", "</b>"):
        with pytest.raises(EntityParseError, match="^Bad Request: can't parse entities: "):
            parse_html(bad)


# --------------------------------------------------------- protocol errors
@pytest.mark.asyncio
async def test_token_method_and_param_errors(emu: Emulator, http: aiohttp.ClientSession) -> None:
    st, body = await call(http, emu, "getMe", token="not-a-token")
    assert (st, body) == (401, {"ok": False, "error_code": 401, "description": "Unauthorized"})

    st, body = await call(http, emu, "sendMessag", chat_id=USER, text="x")
    assert st == 404 and body["description"] == "Not Found: method not found"

    st, body = await call(http, emu, "SENDMESSAGE", chat_id=USER, text="case-insensitive")
    assert st == 200 and body["result"]["text"] == "case-insensitive"

    st, body = await call(http, emu, "sendMessage", chat_id=USER)
    assert st == 400 and body["description"] == 'Bad Request: parameter "text" is required'

    st, body = await call(http, emu, "sendMessage", chat_id=USER, text="x", colour="red")
    assert st == 400 and body["description"] == 'Bad Request: unknown parameter "colour"'

    st, body = await call(http, emu, "sendMessage", chat_id=USER, text="x",
                          disable_notification="maybe")
    assert st == 400
    assert body["description"].startswith(
        'Bad Request: parameter "disable_notification" must be of type Boolean')

    st, body = await call(http, emu, "sendMessage", chat_id=[USER], text="x")
    assert st == 400 and 'parameter "chat_id" must be of type Integer or String' in \
        body["description"]

    # Form encoding (what aiogram sends): numbers/booleans/objects arrive as strings.
    st, body = await call_form(http, emu, "sendMessage", {
        "chat_id": str(USER), "text": "form", "protect_content": "true",
        "reply_markup": json.dumps({"inline_keyboard": [[{"text": "a", "callback_data": "a"}]]}),
    })
    assert st == 200 and body["result"]["has_protected_content"] is True
    st, body = await call_form(http, emu, "sendMessage", {"chat_id": "12x", "text": "x"})
    assert (st, body["description"]) == (400, "Bad Request: chat not found")
    st, body = await call_form(http, emu, "sendMessage", {
        "chat_id": str(USER), "text": "x",
        "reply_markup": json.dumps({"inline_keyboard": [[{"callback_data": "a"}]]}),
    })
    assert st == 400
    assert 'field "text" is required in InlineKeyboardButton' in body["description"]
    st, body = await call_form(http, emu, "sendMessage", {
        "chat_id": str(USER), "text": "x", "reply_markup": "{not json",
    })
    assert st == 400 and "can't parse JSON" in body["description"]

    # Every failure is in the call log with Telegram's wording.
    failed = [c for c in emu.calls if not c["ok"]]
    assert all(c["description"].startswith(("Bad Request: ", "Not Found", "Unauthorized"))
               for c in failed)


@pytest.mark.asyncio
async def test_chat_not_found_and_blocked_user(emu: Emulator, bot: Bot) -> None:
    with pytest.raises(TelegramBadRequest, match="chat not found"):
        await bot.send_message(424242, "hello?")
    with pytest.raises(TelegramBadRequest, match="chat not found"):
        await bot.send_message("@nobody", "hello?")
    emu.block_user(USER)
    with pytest.raises(TelegramForbiddenError, match="bot was blocked by the user"):
        await bot.send_message(USER, "hi")
    emu.block_user(USER, blocked=False)
    assert (await bot.send_message(USER, "hi again")).text == "hi again"


# ------------------------------------------------------------ text limits
@pytest.mark.asyncio
async def test_text_and_caption_limits(emu: Emulator, bot: Bot) -> None:
    assert len((await bot.send_message(USER, "x" * 4096)).text) == 4096
    with pytest.raises(TelegramBadRequest, match="message is too long"):
        await bot.send_message(USER, "x" * 4097)
    # Limits apply after entity parsing: 4096 visible chars wrapped in tags is fine.
    msg = await bot.send_message(USER, "<b>" + "y" * 4096 + "</b>", parse_mode="HTML")
    assert len(msg.text) == 4096 and msg.entities[0].type == "bold"
    with pytest.raises(TelegramBadRequest, match="message text is empty"):
        await bot.send_message(USER, "   ")
    with pytest.raises(TelegramBadRequest, match="message text is empty"):
        await bot.send_message(USER, "<b></b>", parse_mode="HTML")
    with pytest.raises(TelegramBadRequest, match="message caption is too long"):
        await bot.send_photo(USER, BufferedInputFile(PNG_1x1, "p.png"), caption="c" * 1025)


@pytest.mark.asyncio
async def test_html_validation_over_http(emu: Emulator, bot: Bot) -> None:
    for bad in ("<b>x", "a < b & c", "<script>alert(1)</script>"):
        with pytest.raises(TelegramBadRequest, match="can't parse entities"):
            await bot.send_message(USER, bad, parse_mode="HTML")
    msg = await bot.send_message(
        USER, "a &lt; b &amp; c <i>ok</i> <tg-spoiler>s</tg-spoiler>", parse_mode="HTML")
    assert msg.text == "a < b & c ok s"
    assert [e.type for e in msg.entities] == ["italic", "spoiler"]
    # Without parse_mode the same characters are plain text.
    assert (await bot.send_message(USER, "a < b & c")).text == "a < b & c"
    with pytest.raises(TelegramBadRequest, match="unsupported parse_mode"):
        await bot.send_message(USER, "x", parse_mode="BBCode")
    assert (await bot.send_message(USER, "*bold* \\.", parse_mode="MarkdownV2")).text
    rec = emu.sent(USER)[-1]
    assert rec["parse_mode"] == "MarkdownV2" and rec["raw_text"] == "*bold* \\."


# ----------------------------------------------------- keyboards & callbacks
@pytest.mark.asyncio
async def test_keyboards_callback_data_and_callback_queries(emu: Emulator, bot: Bot) -> None:
    with pytest.raises(TelegramBadRequest, match="BUTTON_DATA_INVALID"):
        await bot.send_message(USER, "x", reply_markup=kb("d" * 65))
    with pytest.raises(TelegramBadRequest, match="BUTTON_DATA_INVALID"):
        await bot.send_message(USER, "x", reply_markup=kb("đ" * 33))  # 66 bytes in UTF-8
    with pytest.raises(TelegramBadRequest, match="Text buttons are unallowed"):
        await bot.send_message(USER, "x", reply_markup=InlineKeyboardMarkup(
            inline_keyboard=[[InlineKeyboardButton(text="no action")]]))
    msg = await bot.send_message(USER, "Chọn", reply_markup=kb("d" * 64, "no"))
    assert msg.reply_markup.inline_keyboard[0][0].callback_data == "d" * 64

    reply_kb = ReplyKeyboardMarkup(keyboard=[[KeyboardButton(text="Gửi SĐT",
                                                             request_contact=True)]])
    await bot.send_message(USER, "Share your phone", reply_markup=reply_kb)
    rec = emu.sent(USER)[-1]
    assert rec["reply_markup"]["keyboard"][0][0]["request_contact"] is True
    assert "reply_markup" not in rec["message"]  # only inline keyboards are echoed

    with pytest.raises(ValueError, match="no button with callback_data='yes'"):
        await emu.press_button(USER, msg.message_id, "yes")
    await emu.press_button(USER, msg.message_id, "no")
    forged = await emu.press_button(USER, msg.message_id, "forged", force=True)
    updates = await bot.get_updates(timeout=0)
    queries = [u.callback_query for u in updates]
    assert [q.data for q in queries] == ["no", "forged"]
    assert queries[0].message.message_id == msg.message_id
    assert forged["callback_query"]["id"] == queries[1].id

    assert await bot.answer_callback_query(queries[0].id, text="OK")
    assert emu.callback_answer(queries[0].id) == {"text": "OK"}
    with pytest.raises(TelegramBadRequest, match="query is too old"):
        await bot.answer_callback_query(queries[0].id)  # answered twice
    with pytest.raises(TelegramBadRequest, match="query ID is invalid"):
        await bot.answer_callback_query("123")


# --------------------------------------------------------------- editing
@pytest.mark.asyncio
async def test_edit_delete_and_not_modified(emu: Emulator, bot: Bot) -> None:
    msg = await bot.send_message(USER, "<b>v1</b>", parse_mode="HTML", reply_markup=kb("a"))
    edited = await bot.edit_message_text(text="<b>v1</b>", parse_mode="HTML", chat_id=USER,
                                         message_id=msg.message_id, reply_markup=kb("b"))
    assert edited.edit_date is not None
    with pytest.raises(TelegramBadRequest, match="message is not modified"):
        await bot.edit_message_text(text="<b>v1</b>", parse_mode="HTML", chat_id=USER,
                                    message_id=msg.message_id, reply_markup=kb("b"))
    with pytest.raises(TelegramBadRequest, match="message is not modified"):
        await bot.edit_message_reply_markup(chat_id=USER, message_id=msg.message_id,
                                            reply_markup=kb("b"))
    # Editing text without reply_markup removes the keyboard, as in Telegram.
    plain = await bot.edit_message_text(text="v2", chat_id=USER, message_id=msg.message_id)
    assert plain.reply_markup is None
    with pytest.raises(TelegramBadRequest, match="message to edit not found"):
        await bot.edit_message_text(text="v3", chat_id=USER, message_id=9999)
    with pytest.raises(TelegramBadRequest, match="there is no caption"):
        await bot.edit_message_caption(chat_id=USER, message_id=msg.message_id, caption="c")

    rec = emu.sent(USER)[-1]
    assert rec["text"] == "v2" and [e["text"] for e in rec["edits"]] == ["v1", "v1"]
    assert await bot.delete_message(USER, msg.message_id)
    assert emu.sent(USER)[-1]["deleted"] is True
    with pytest.raises(TelegramBadRequest, match="message to delete not found"):
        await bot.delete_message(USER, msg.message_id)
    with pytest.raises(TelegramBadRequest, match="message to edit not found"):
        await bot.edit_message_text(text="zombie", chat_id=USER, message_id=msg.message_id)
    m2 = await bot.send_message(USER, "a")
    m3 = await bot.send_message(USER, "b")
    assert m3.message_id == m2.message_id + 1  # ids increase per chat
    assert await bot.delete_messages(USER, [m2.message_id, m3.message_id, 777])
    assert all(r["deleted"] for r in emu.sent(USER)[-2:])
    # the per-chat index the benchmarks count with agrees with the full record
    assert emu.sent_count(USER) == len(emu.sent(USER)) == len(
        [r for r in emu.sent() if r["chat_id"] == USER])
    assert emu.sent_count(USER + 1) == 0 and emu.sent(USER + 1) == []


# ------------------------------------------------------------ getUpdates
@pytest.mark.asyncio
async def test_get_updates_offset_semantics_and_long_poll(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    u1 = await emu.send_text(USER, "/start ref42")
    u2 = await emu.send_text(USER, "hello")
    u3 = await emu.send_text(USER, "again")
    assert u1["message"]["entities"] == [{"type": "bot_command", "offset": 0, "length": 6}]
    ids = [u["update_id"] for u in (u1, u2, u3)]
    assert ids == sorted(ids) and len(set(ids)) == 3

    _, body = await call(http, emu, "getUpdates")
    assert [u["update_id"] for u in body["result"]] == ids  # nothing confirmed yet
    _, body = await call(http, emu, "getUpdates", limit=1)
    assert [u["update_id"] for u in body["result"]] == ids[:1]
    _, body = await call(http, emu, "getUpdates", offset=ids[1])  # confirms ids[0]
    assert [u["update_id"] for u in body["result"]] == ids[1:]
    assert emu.pending_updates() == 2
    _, body = await call(http, emu, "getUpdates", offset=-1)  # keep only the last one
    assert [u["update_id"] for u in body["result"]] == ids[2:]
    _, body = await call(http, emu, "getUpdates", offset=ids[2] + 1, timeout=0)
    assert body["result"] == [] and emu.pending_updates() == 0

    # Long poll returns as soon as an update arrives, not at the timeout.
    loop = asyncio.get_running_loop()
    started = loop.time()
    poll = asyncio.create_task(call(http, emu, "getUpdates", offset=ids[2] + 1, timeout=5))
    await asyncio.sleep(0.2)
    assert not poll.done()
    await emu.send_text(USER, "wake up")
    st, body = await asyncio.wait_for(poll, 3)
    assert st == 200 and body["result"][0]["message"]["text"] == "wake up"
    assert loop.time() - started < 2

    # A second poller kicks out the first one with 409, like Telegram.
    last = body["result"][0]["update_id"]
    first = asyncio.create_task(call(http, emu, "getUpdates", offset=last + 1, timeout=5))
    await asyncio.sleep(0.2)
    second = asyncio.create_task(call(http, emu, "getUpdates", offset=last + 1, timeout=1))
    st1, body1 = await asyncio.wait_for(first, 3)
    assert st1 == 409 and "terminated by other getUpdates request" in body1["description"]
    st2, _ = await asyncio.wait_for(second, 3)
    assert st2 == 200

    # Explicit duplicates are re-delivered even after their id was confirmed.
    dup = emu.inject_update({"update_id": last, "message": body["result"][0]["message"]})
    assert dup["update_id"] == last
    _, body = await call(http, emu, "getUpdates", offset=last + 1)
    assert [u["update_id"] for u in body["result"]] == [last]


@pytest.mark.asyncio
async def test_aiogram_get_updates_and_user_inputs(emu: Emulator, bot: Bot) -> None:
    await emu.send_contact(USER, "+84901234567")
    doc_update = await emu.send_document(USER, b"%PDF-1.4 fake", "bao_cao.pdf",
                                         mime_type="application/pdf", caption="Báo cáo")
    await emu.send_document(USER, b"", "huge.zip", file_size=30 * 1024 * 1024)
    await emu.send_text(USER, "ping", chat_id=GROUP)
    sent = await bot.send_message(USER, "reply me")
    await emu.send_text(USER, "replying", reply_to_message_id=sent.message_id)
    updates = await bot.get_updates()
    contact = updates[0].message.contact
    assert contact.phone_number == "+84901234567" and contact.user_id == USER
    doc = updates[1].message.document
    assert (doc.file_name, doc.mime_type, doc.file_size) == ("bao_cao.pdf", "application/pdf", 13)
    f = await bot.get_file(doc.file_id)
    assert (await bot.download_file(f.file_path)).read() == b"%PDF-1.4 fake"
    with pytest.raises(TelegramBadRequest, match="file is too big"):
        await bot.get_file(updates[2].message.document.file_id)
    assert updates[3].message.chat.type == "supergroup"
    assert updates[4].message.reply_to_message.message_id == sent.message_id
    assert doc_update["message"]["caption"] == "Báo cáo"

    text_update = await emu.send_text(USER, "typo")
    await emu.edit_user_message(USER, text_update["message"]["message_id"], "fixed")
    updates = await bot.get_updates(offset=updates[-1].update_id + 1)
    assert updates[-1].edited_message.text == "fixed"
    iq = await emu.send_inline_query(USER, "tinh")
    assert await bot.answer_inline_query(iq["inline_query"]["id"], results=[], cache_time=1)


# --------------------------------------------------------------- webhook
@pytest.mark.asyncio
async def test_webhook_delivery_secret_retry_and_conflict(
    emu: Emulator, http: aiohttp.ClientSession, bot: Bot
) -> None:
    received: list[tuple[str | None, dict[str, Any]]] = []
    fail_first = {"n": 1}

    async def hook(request: web.Request) -> web.Response:
        body = await request.json()
        if fail_first["n"]:
            fail_first["n"] -= 1
            return web.Response(status=500)
        received.append((request.headers.get("X-Telegram-Bot-Api-Secret-Token"), body))
        if body.get("message", {}).get("text") == "/echo":
            # Answering with a method in the body is executed by Telegram.
            return web.json_response({"method": "sendMessage", "chat_id": USER,
                                      "text": "echo from webhook reply"})
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        await emu.send_text(USER, "queued before webhook")
        assert await bot.set_webhook(f"http://127.0.0.1:{port}/hook", secret_token="s3cr3t_X")
        st, body = await call(http, emu, "getUpdates")
        assert st == 409 and body["description"].startswith("Conflict: can't use getUpdates")
        await emu.send_text(USER, "/echo")
        await emu.send_text(USER, "third")
        for _ in range(100):
            if len(received) == 3:
                break
            await asyncio.sleep(0.05)
        assert [b["message"]["text"] for _, b in received] == [
            "queued before webhook", "/echo", "third"]
        assert {secret for secret, _ in received} == {"s3cr3t_X"}
        info = await bot.get_webhook_info()
        assert info.url.endswith("/hook") and info.pending_update_count == 0
        assert info.last_error_message and "500" in info.last_error_message
        replies = await emu.wait_for_messages(USER, predicate=lambda r: "webhook" in r["text"])
        assert replies[0]["text"] == "echo from webhook reply"
        assert await bot.delete_webhook()
        st, body = await call(http, emu, "getUpdates")
        assert st == 200
    finally:
        await runner.cleanup()


# ------------------------------------------------------- flood & faults
@pytest.mark.asyncio
async def test_rate_limit_returns_429_with_retry_after(emu: Emulator, bot: Bot) -> None:
    emu.set_rate_limits(private_per_sec=1)
    await bot.send_message(USER, "first")
    with pytest.raises(TelegramRetryAfter) as exc:
        await bot.send_message(USER, "second")
    assert exc.value.retry_after >= 1
    await bot.send_message(OTHER, "other chat has its own bucket")
    assert await bot.send_chat_action(USER, "typing")  # not a message: not limited
    emu.set_rate_limits(group_per_min=2)
    await bot.send_message(GROUP, "g1")
    await bot.send_message(GROUP, "g2")
    with pytest.raises(TelegramRetryAfter) as exc:
        await bot.send_message(GROUP, "g3")
    assert exc.value.retry_after >= 20
    emu.set_rate_limits()
    await bot.send_message(GROUP, "limits off")
    call_429 = [c for c in emu.calls if c["error_code"] == 429][-1]
    assert call_429["retry_after"] == exc.value.retry_after


@pytest.mark.asyncio
async def test_fault_injection(emu: Emulator, bot: Bot, http: aiohttp.ClientSession) -> None:
    emu.inject_fault("sendMessage", 502, count=2)
    for _ in range(2):
        with pytest.raises(TelegramServerError, match="Bad Gateway"):
            await bot.send_message(USER, "x")
    assert (await bot.send_message(USER, "third time lucky")).text == "third time lucky"

    emu.inject_fault(None, 429, retry_after=7)
    with pytest.raises(TelegramRetryAfter) as exc:
        await bot.get_me()
    assert exc.value.retry_after == 7

    emu.inject_fault("getMe", 500, description="Internal Server Error", delay=0.3)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    st, body = await call(http, emu, "getMe")
    assert (st, body["description"]) == (500, "Internal Server Error")
    assert loop.time() - t0 >= 0.3
    assert (await bot.get_me()).username == "hopnhat_bot"
    with pytest.raises(ValueError):
        emu.inject_fault("noSuchMethod", 500)


# ---------------------------------------------------------------- files
@pytest.mark.asyncio
async def test_file_roundtrip_and_file_ids(emu: Emulator, bot: Bot) -> None:
    msg = await bot.send_document(USER, BufferedInputFile(b"a,b\n1,2\n", "units.csv"),
                                  caption="<b>CSV</b>", parse_mode="HTML")
    doc = msg.document
    assert (doc.file_name, doc.file_size, doc.mime_type) == ("units.csv", 8, "text/csv")
    assert msg.caption == "CSV"
    f = await bot.get_file(doc.file_id)
    assert f.file_path and f.file_size == 8
    assert (await bot.download_file(f.file_path)).read() == b"a,b\n1,2\n"
    again = await bot.send_document(OTHER, doc.file_id)  # resend by file_id
    assert again.document.file_unique_id == doc.file_unique_id
    with pytest.raises(TelegramBadRequest, match="wrong file identifier"):
        await bot.send_document(USER, "no-such-file-id")
    photo = await bot.send_photo(USER, BufferedInputFile(PNG_1x1, "p.png"))
    assert (photo.photo[-1].width, photo.photo[-1].height) == (1, 1)
    with pytest.raises(TelegramBadRequest, match="type of file mismatch"):
        await bot.send_photo(USER, doc.file_id)
    rec = emu.sent(USER)[-1]
    assert rec["media_type"] == "photo" and rec["media"] == [photo.photo[-1].file_id]
    first = emu.sent(USER)[0]  # records also read like Message objects
    assert first["chat"]["id"] == USER and first["document"]["file_name"] == "units.csv"
    assert (first["caption"], first["raw_text"], first["parse_mode"]) == (
        "CSV", "<b>CSV</b>", "HTML")


# ------------------------------------------------ forum, copy, commands
@pytest.mark.asyncio
async def test_forum_topics_copy_and_commands(emu: Emulator, bot: Bot) -> None:
    with pytest.raises(TelegramBadRequest, match="the chat is not a forum"):
        await bot.create_forum_topic(GROUP, "Sự cố")
    topic = await bot.create_forum_topic(FORUM, "Sự cố")
    in_topic = await bot.send_message(FORUM, "Báo cáo sự cố",
                                      message_thread_id=topic.message_thread_id)
    assert in_topic.message_thread_id == topic.message_thread_id and in_topic.is_topic_message
    with pytest.raises(TelegramBadRequest, match="message thread not found"):
        await bot.send_message(FORUM, "lost", message_thread_id=99999)
    assert await bot.close_forum_topic(FORUM, topic.message_thread_id)
    with pytest.raises(TelegramBadRequest, match="TOPIC_NOT_MODIFIED"):
        await bot.close_forum_topic(FORUM, topic.message_thread_id)
    assert await bot.reopen_forum_topic(FORUM, topic.message_thread_id)
    assert await bot.edit_forum_topic(FORUM, topic.message_thread_id, name="Sự cố #2")
    assert emu.forum_topics(FORUM)[0]["name"] == "Sự cố #2"

    # A user writes inside the topic.
    upd = await emu.send_text(USER, "đã xử lý", chat_id=FORUM,
                              message_thread_id=topic.message_thread_id)
    assert upd["message"]["message_thread_id"] == topic.message_thread_id

    copied = await bot.copy_message(USER, FORUM, in_topic.message_id)
    rec = emu.sent(USER)[-1]
    assert rec["message_id"] == copied.message_id and rec["text"] == "Báo cáo sự cố"
    assert rec["copied_from"] == {"chat_id": FORUM, "message_id": in_topic.message_id}
    with pytest.raises(TelegramBadRequest, match="message to copy not found"):
        await bot.copy_message(USER, FORUM, 424242)
    fwd = await bot.forward_message(GROUP, USER, copied.message_id)
    assert fwd.forward_origin is not None

    cmds = [BotCommand(command="start", description="Bắt đầu")]
    assert await bot.set_my_commands(cmds)
    assert await bot.set_my_commands([BotCommand(command="help", description="Trợ giúp")],
                                     language_code="en")
    assert [c.command for c in await bot.get_my_commands()] == ["start"]
    assert [c.command for c in await bot.get_my_commands(language_code="en")] == ["help"]
    with pytest.raises(TelegramBadRequest, match="BOT_COMMAND_INVALID"):
        await bot.set_my_commands([BotCommand(command="Start", description="x")])
    assert await bot.delete_my_commands(language_code="en")
    assert emu.commands(language_code="en") == []

    member = await bot.get_chat_member(FORUM, OTHER)
    assert member.status == "member"
    assert (await bot.get_chat_member(FORUM, BOT_ID)).status == "administrator"
    assert (await bot.get_chat(FORUM)).is_forum is True


@pytest.mark.asyncio
async def test_unimplemented_methods_and_legacy_params(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    st, body = await call(http, emu, "pinChatMessage", chat_id=USER, message_id=1)
    assert (st, body["result"]) == (200, True)  # Boolean-returning: accepted, logged
    st, body = await call(http, emu, "sendPoll", chat_id=USER, question="q",
                          options=[{"text": "a"}, {"text": "b"}])
    assert st == 400 and body["description"] == "Bad Request: method not supported by the emulator"
    st, body = await call(http, emu, "sendMessage", chat_id=USER, text="first")
    mid = body["result"]["message_id"]
    st, body = await call(http, emu, "sendMessage", chat_id=USER, text="reply",
                          reply_to_message_id=mid)  # deprecated, still accepted by Telegram
    assert st == 200 and body["result"]["reply_to_message"]["message_id"] == mid
    st, body = await call(http, emu, "sendMessage", chat_id=USER, text="reply",
                          reply_parameters={"message_id": 9999})
    assert st == 400 and body["description"] == "Bad Request: message to be replied not found"


# ------------------------------------------------------------ control API
@pytest.mark.asyncio
async def test_http_control_api_and_wait_helpers(
    emu: Emulator, http: aiohttp.ClientSession, bot: Bot
) -> None:
    base = f"{emu.base_url}/_emulator"

    async def post(action: str, **body: Any) -> dict[str, Any]:
        async with http.post(f"{base}/{action}", json=body) as r:
            return await r.json()

    assert (await post("users", user_id=2001, first_name="Chi"))["ok"]
    assert (await post("text", user_id=2001, text="/start"))["result"]["message"]["text"]
    doc = await post("document", user_id=2001, file_name="a.txt",
                     content_b64=base64.b64encode(b"abc").decode())
    assert doc["result"]["message"]["document"]["file_size"] == 3
    bad = await post("text", user_id=9, text="who am i")
    assert bad["ok"] is False and "unknown user" in bad["error"]

    async def http_wait() -> dict[str, Any]:
        params = {"chat_id": 2001, "count": 1, "timeout": 5}
        async with http.get(f"{base}/wait", params=params) as r:
            return await r.json()

    waiter = asyncio.create_task(emu.wait_for_messages(2001, count=2))
    http_waiter = asyncio.create_task(http_wait())
    await asyncio.sleep(0.1)
    sent = await bot.send_message(2001, "một")
    body = await asyncio.wait_for(http_waiter, 5)
    assert body["ok"] and body["result"][0]["message_id"] == sent.message_id
    await bot.send_message(2001, "hai")
    assert [m["text"] for m in await asyncio.wait_for(waiter, 5)] == ["một", "hai"]
    async with http.get(f"{base}/sent", params={"chat_id": 2001}) as r:
        assert len((await r.json())["result"]) == 2
    async with http.get(f"{base}/calls", params={"method": "sendMessage"}) as r:
        assert len((await r.json())["result"]) == 2
    assert (await post("fault", method="getMe", status=500))["ok"]
    with pytest.raises(TelegramServerError):
        await bot.get_me()
    assert (await emu.wait_for_call("getMe", predicate=lambda c: not c["ok"]))["error_code"] == 500

    with pytest.raises(asyncio.TimeoutError, match="got 2 matching"):
        await emu.wait_for_messages(2001, count=3, timeout=0.2)


# ------------------------------------------------------ real aiogram bots
@pytest.mark.asyncio
async def test_real_dispatcher_polling_roundtrip(emu: Emulator, bot: Bot) -> None:
    dp = Dispatcher()

    @dp.message(CommandStart())
    async def start(m: Message) -> None:
        await m.answer("Xin chào <b>An</b> &amp; team", parse_mode="HTML",
                       reply_markup=kb("menu:1"))

    @dp.callback_query(F.data == "menu:1")
    async def chosen(q: CallbackQuery) -> None:
        await q.answer("OK")
        assert isinstance(q.message, Message)
        await q.message.edit_text("Đã chọn")

    task = asyncio.create_task(dp.start_polling(bot, handle_signals=False,
                                                close_bot_session=False, polling_timeout=1))
    try:
        await emu.send_text(USER, "/start")
        [msg] = await emu.wait_for_messages(USER, timeout=5)
        assert msg["text"] == "Xin chào An & team" and msg["entities"][0]["type"] == "bold"
        await emu.press_button(USER, msg, "menu:1")
        answer = await emu.wait_for_call("answerCallbackQuery", timeout=5)
        assert answer["ok"] and answer["params"]["text"] == "OK"
        [edited] = await emu.wait_for_messages(USER, timeout=5,
                                               predicate=lambda r: r["text"] == "Đã chọn")
        assert edited["message_id"] == msg["message_id"] and len(edited["edits"]) == 1
        assert edited["reply_markup"] is None  # edit without markup drops the keyboard
    finally:
        await dp.stop_polling()
        await asyncio.wait_for(task, 5)
    assert all(c["ok"] for c in emu.calls if c["method"] != "getUpdates")


@pytest.mark.asyncio
async def test_real_dispatcher_webhook_with_reply_in_body(emu: Emulator, bot: Bot) -> None:
    dp = Dispatcher()

    @dp.message()
    async def echo(m: Message) -> Any:
        return m.answer(f"echo: {m.text}")  # a method returned in the webhook response

    app = web.Application()
    SimpleRequestHandler(dp, bot, handle_in_background=False,
                         secret_token="right-secret").register(app, path="/wh")
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/wh"
    try:
        assert await bot.set_webhook(url, secret_token="wrong-secret")
        await emu.send_text(USER, "xin chào")
        for _ in range(100):
            info = await bot.get_webhook_info()
            if info.last_error_message:
                break
            await asyncio.sleep(0.05)
        assert "401" in (info.last_error_message or "") and info.pending_update_count == 1
        assert await bot.set_webhook(url, secret_token="right-secret")
        [reply] = await emu.wait_for_messages(USER, timeout=5)
        assert reply["text"] == "echo: xin chào"
        call = await emu.wait_for_call("sendMessage")
        assert call["source"] == "webhook-reply"
        assert emu.pending_updates() == 0
    finally:
        await bot.delete_webhook()
        await runner.cleanup()
