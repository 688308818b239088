"""The offline console: emulator + real bot in one process, driven by scripted lines."""

from __future__ import annotations

from bot.cli import CONSOLE_TOKEN
from bot.config import load_settings
from bot.console import run_console


async def test_console_session(tmp_path, capsys) -> None:
    settings = load_settings(bot_token=CONSOLE_TOKEN,
                             database_url=f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    await run_console(settings, lines=[
        "/start", ":u 2", "/start", ":c", "/me", ":lạ", "khi nao email cu bi dong?", ":q",
    ])
    out = capsys.readouterr().out
    assert "mẫu" in out  # sample users are labelled as such
    assert "Xin chào" in out
    assert "Chia sẻ số điện thoại" in out
    assert "Xác minh thành công" in out
    assert "Nguyễn Văn An (mẫu)" in out
    assert "Tạm biệt" in out
