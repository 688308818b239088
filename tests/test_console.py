"""The offline console: emulator + real bot in one process, driven by scripted lines."""

from __future__ import annotations

from bot.cli import CONSOLE_TOKEN
from bot.config import load_settings
from bot.console import run_console


async def test_console_session(tmp_path, capsys) -> None:
    settings = load_settings(bot_token=CONSOLE_TOKEN,
                             database_url=f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    await run_console(settings, lines=[
        "/start", ":c 0987 654 321", "Nguyễn Thị Mai", "phuong ben thanh", ":b 1", "1",
        ":u 4", ":b 1", ":u 1", "/me", ":u 2", "/start", "khi nao email cu bi dong?", ":q",
    ])
    out = capsys.readouterr().out
    assert "mẫu" in out  # sample users are labelled as such
    assert "Xin chào" in out and "Chia sẻ số điện thoại" in out
    assert "Đã gửi yêu cầu xác minh số 1" in out
    assert "Yêu cầu xác minh số 1" in out and "Đã duyệt bởi Lê Hoàng Cường (mẫu)" in out
    assert "đã được duyệt" in out and "Nguyễn Thị Mai" in out
    assert "Chào Nguyễn Văn An (mẫu)" in out
    assert "Tạm biệt" in out


async def test_second_session_on_the_same_database_is_answered(tmp_path, capsys) -> None:
    """The console's emulator starts afresh each time; its update ids must continue above
    those the database already handled, or the bot drops them as re-deliveries."""
    settings = load_settings(bot_token=CONSOLE_TOKEN,
                             database_url=f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    await run_console(settings, lines=[":u 2", "/start", ":q"])
    capsys.readouterr()
    await run_console(settings, lines=[":u 2", "/ticket", ":q"])
    out = capsys.readouterr().out
    assert "hệ thống nào gặp sự cố" in out
