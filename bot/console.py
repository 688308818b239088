"""Offline chat console: the emulator and the real bot in one process, talking over HTTP.

A person types messages as one of the labelled sample users (or a new, unregistered user),
presses inline buttons by number, shares their contact, sends files, and switches users.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from bot.app import build_app, run_polling
from bot.config import Settings
from bot.emulator import Emulator
from bot.emulator.server import FIRST_UPDATE_ID
from db.migrate import upgrade_async
from db.models import InboxUpdate, Unit
from db.session import make_engine, make_sessionmaker

NEW_USER_ID = 899999
QUIET_AFTER = 0.6  # seconds without new bot output before the prompt returns
FIRST_REPLY = 4.0

HELP = """Lệnh của bảng điều khiển (console commands):
  <văn bản>        gửi tin nhắn (send a message), ví dụ /start, /help, 1, ben thanh
  :b N             bấm nút số N của tin nhắn gần nhất (press inline button N)
  :c [SĐT]         chia sẻ số điện thoại của mình (share your contact; optional number)
  :f ĐƯỜNG_DẪN     gửi tệp CSV/XLSX (send a file)
  :u [N]           xem / chuyển người dùng mẫu (list / switch sample user)
  :h               trợ giúp (help)      :q  thoát (quit)"""


@dataclass
class ConsoleUser:
    telegram_id: int
    name: str
    phone: str | None
    note: str


def sample_users() -> list[ConsoleUser]:
    from services.sample import SAMPLE_PEOPLE

    users = [ConsoleUser(NEW_USER_ID, "Người dùng mới", None, "chưa đăng ký / not registered")]
    for p in SAMPLE_PEOPLE:
        users.append(ConsoleUser(p.telegram_id, p.full_name, p.phone, f"{p.role}, {p.unit_code}"))
    return users


async def ensure_database(settings: Settings) -> int:
    """First run: create the schema and load the register, plan and labelled sample data.

    Returns the first update id the emulator may use: above every update this database has
    handled, so a second console session on the same file is not taken for re-deliveries."""
    await upgrade_async(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        async with make_sessionmaker(engine)() as s:
            have_units = await s.scalar(select(func.count()).select_from(Unit))
            last = await s.scalar(select(func.max(InboxUpdate.update_id)))
    finally:
        await engine.dispose()
    if not have_units:
        print("Khởi tạo cơ sở dữ liệu (danh mục đơn vị hành chính, kế hoạch, dữ liệu mẫu)…")
        from bot.cli import init_database

        # the console logs in as the sample staff, so they start verified and linked
        await init_database(settings, sample=True, echo=False, link_sample=True)
    return max(FIRST_UPDATE_ID, (last or 0) + 1)


class Console:
    def __init__(self, emu: Emulator, users: list[ConsoleUser], out: Any = None) -> None:
        self.emu = emu
        self.users = users
        self.user = users[0]
        self.out = out or sys.stdout
        self.seen: dict[int, int] = {}
        self.shown_text: dict[tuple[int, int], str] = {}
        self.last_keyboard: dict[int, dict[str, Any]] = {}
        for u in users:
            emu.add_user(u.telegram_id, u.name, phone=u.phone)

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def render(self, msg: dict[str, Any], edited: bool = False) -> None:
        # the emulator's record holds the text as Telegram renders it (markup already
        # turned into entities): a name like "<b>Lê</b>" is literal and must stay so
        body = msg.get("text") or msg.get("caption") or ""
        if msg.get("document"):
            body = f"[tệp / file: {msg['document'].get('file_name')}] " + body
        if msg.get("photo"):
            body = "[ảnh / photo] " + body
        self.say(("🤖 (đã sửa) " if edited else "🤖 ") + body.replace("\n", "\n   "))
        markup = msg.get("reply_markup") or {}
        if markup.get("inline_keyboard"):
            buttons = [b for row in markup["inline_keyboard"] for b in row]
            labels = [b["text"] if b["text"].startswith(f"{i}.") else f"{i}. {b['text']}"
                      for i, b in enumerate(buttons, 1)]
            self.say("   " + "\n   ".join(f"[{x}]" for x in labels) + "   (:b N)")
            self.last_keyboard[msg["chat"]["id"]] = msg
        elif markup.get("keyboard"):
            labels = [b["text"] if isinstance(b, dict) else b
                      for row in markup["keyboard"] for b in row]
            self.say("   ⌨ " + " | ".join(labels) + "   (:c = chia sẻ số điện thoại)")

    def flush(self) -> int:
        """Print new and edited bot messages of the current chat; note other chats' news."""
        printed = 0
        chat = self.user.telegram_id
        for msg in self.emu.sent(chat):
            key = (chat, msg["message_id"])
            text = msg.get("text") or msg.get("caption") or ""  # a dropped keyboard is no news
            if msg.get("deleted"):
                continue
            if key not in self.shown_text:
                self.render(msg)
                printed += 1
            elif self.shown_text[key] != text:
                self.render(msg, edited=True)
                printed += 1
            self.shown_text[key] = text
        for u in self.users:
            if u.telegram_id == chat:
                continue
            new = sum(1 for m in self.emu.sent(u.telegram_id)
                      if (u.telegram_id, m["message_id"]) not in self.shown_text)
            if new and self.seen.get(u.telegram_id) != new:
                self.say(f"   🔔 {new} tin nhắn mới cho {u.name} (:u để chuyển người dùng)")
            self.seen[u.telegram_id] = new
        return printed

    async def settle(self) -> None:
        """Wait for the bot's answer: the first message, then until it goes quiet."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FIRST_REPLY
        quiet_since: float | None = None
        got = False
        while True:
            await asyncio.sleep(0.1)
            if self.flush():
                got, quiet_since = True, loop.time()
                continue
            now = loop.time()
            if got and quiet_since is not None and now - quiet_since > QUIET_AFTER:
                return
            if not got and now > deadline:
                return

    def list_users(self) -> None:
        for i, u in enumerate(self.users, 1):
            mark = "→" if u is self.user else " "
            self.say(f" {mark} {i}. {u.name} — {u.note}" + (f", {u.phone}" if u.phone else ""))

    async def handle(self, line: str) -> bool:
        """Run one console line; False means quit."""
        line = line.strip()
        if not line:
            return True
        uid = self.user.telegram_id
        if line in (":q", ":quit", ":thoat"):
            return False
        if line in (":h", ":help"):
            self.say(HELP)
            return True
        if line.startswith(":u"):
            arg = line[2:].strip()
            if arg.isdigit() and 1 <= int(arg) <= len(self.users):
                self.user = self.users[int(arg) - 1]
                self.say(f"Bạn đang là: {self.user.name} ({self.user.note})")
                self.flush()
            else:
                self.list_users()
            return True
        if line.startswith(":b"):
            msg = self.last_keyboard.get(uid)
            arg = line[2:].strip()
            if msg is None or not arg.isdigit():
                self.say("Không có nút nào để bấm (no buttons). Dùng :b N.")
                return True
            current = next((m for m in self.emu.sent(uid)
                            if m["message_id"] == msg["message_id"]), msg)
            buttons = [b for row in (current.get("reply_markup") or {}).get(
                "inline_keyboard", []) for b in row]
            n = int(arg)
            if not 1 <= n <= len(buttons):
                self.say(f"Chỉ có {len(buttons)} nút (only {len(buttons)} buttons).")
                return True
            await self.emu.press_button(uid, current, buttons[n - 1]["callback_data"])
        elif line.startswith(":c"):
            phone = line[2:].strip() or self.user.phone
            if not phone:
                self.say("Người dùng mới chưa có số: dùng ':c 0912345678'.")
                return True
            await self.emu.send_contact(uid, phone)
        elif line.startswith(":f"):
            parts = shlex.split(line[2:].strip() or "''")
            path = Path(parts[0]) if parts and parts[0] else None
            if path is None or not path.is_file():
                self.say(f"Không tìm thấy tệp (file not found): {path}")
                return True
            await self.emu.send_document(uid, path.read_bytes(), path.name)
        else:
            await self.emu.send_text(uid, line)
        await self.settle()
        return True


async def run_console(settings: Settings, lines: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    first_update_id = await ensure_database(settings)
    emu = Emulator(first_update_id=first_update_id)
    url = await emu.start(host="127.0.0.1", port=0)
    settings = settings.model_copy(update={"telegram_api_url": url})
    app = build_app(settings)
    stop = asyncio.Event()
    runner = asyncio.create_task(run_polling(app, stop))
    console = Console(emu, sample_users())
    console.say("hopnhat — bảng điều khiển trò chuyện ngoại tuyến (offline chat console).")
    console.say("Người dùng mẫu (sample users, dữ liệu mẫu — not real people):")
    console.list_users()
    console.say(HELP)
    console.say(f"Bạn đang là: {console.user.name}. Gõ /start để bắt đầu.")
    try:
        feed = iter(lines) if lines is not None else None
        while True:
            if feed is not None:
                line = next(feed, None)
                if line is None:
                    break
                console.say(f"» {line}")
            else:
                try:
                    line = await asyncio.to_thread(input, f"[{console.user.name}] » ")
                except (EOFError, KeyboardInterrupt):
                    break
            if not await console.handle(line):
                break
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runner, 10)
        await app.close()
        await emu.stop()
        console.say("Tạm biệt!")
