"""Harness for end-to-end tests: the real bot (in-process or as a child process) talking to
the emulator over real HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.app import App, build_app, run_polling, run_webhook
from bot.config import Settings, load_settings
from bot.emulator import Emulator

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "1234567890:TEST-hopnhat-token-abcdefghijklmnopqrstuv"
BOT_ID = 1234567890
OPERATOR_ID = 700001


def settings_for(emu_url: str, db_url: str, **extra: Any) -> Settings:
    extra.setdefault("data_dir", Path(tempfile.mkdtemp(prefix="hopnhat-data-")))
    return load_settings(bot_token=TOKEN, telegram_api_url=emu_url, database_url=db_url,
                         admin_ids=[OPERATOR_ID], **extra)


@dataclass
class LiveBot:
    """The real dispatcher and runner in this process, polling (or webhook) over HTTP."""

    emu: Emulator
    settings: Settings
    mode: str = "polling"
    app: App | None = None
    task: asyncio.Task[None] | None = None
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> LiveBot:
        self.app = build_app(self.settings)
        runner = run_webhook if self.mode == "webhook" else run_polling
        self.task = asyncio.create_task(runner(self.app, self.stop_event))
        await self.emu.wait_for_call("getMe", timeout=10)
        if self.mode == "webhook":
            await self.emu.wait_for_call("setWebhook", timeout=10)
        else:  # updates sent from now on are queued for the first getUpdates
            await self.emu.wait_for_call("deleteWebhook", timeout=10)
        return self

    async def stop(self) -> None:
        self.stop_event.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 30)
        if self.app is not None:
            await self.app.close()


class ChildProcess:
    """``python -m bot <command>`` as a child process, so tests can SIGKILL it."""

    command = "run"

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bot", self.command], cwd=ROOT, env=self.env,
            stdout=log, stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class BotProcess(ChildProcess):
    """``python -m bot run`` against the emulator."""

    def __init__(self, emu_url: str, db_url: str, log_path: Path) -> None:
        super().__init__({
            **os.environ,
            "HOPNHAT_BOT_TOKEN": TOKEN,
            "HOPNHAT_TELEGRAM_API_URL": emu_url,
            "HOPNHAT_DATABASE_URL": db_url,
            "HOPNHAT_ADMIN_IDS": str(OPERATOR_ID),
            "HOPNHAT_LOG_LEVEL": "INFO",
        }, log_path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def texts(messages: list[dict[str, Any]]) -> list[str]:
    return [m.get("text") or m.get("caption") or "" for m in messages]
