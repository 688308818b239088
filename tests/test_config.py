"""Configuration: defaults, validation as one clear line, secrets masked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    for k in ("HOPNHAT_BOT_TOKEN", "HOPNHAT_DATABASE_URL", "HOPNHAT_ADMIN_IDS"):
        monkeypatch.delenv(k, raising=False)
    s = load_settings()
    assert s.bot_token is None
    assert s.database_url == "sqlite+aiosqlite:///./hopnhat.db"
    assert s.telegram_api_url == "https://api.telegram.org"
    assert (s.default_lang, s.timezone, s.admin_ids) == ("vi", "Asia/Ho_Chi_Minh", [])


def test_env_and_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("HOPNHAT_ADMIN_IDS=11, 22;33\nHOPNHAT_DEFAULT_LANG=en\n")
    monkeypatch.setenv("HOPNHAT_DATABASE_URL", "postgresql://postgres@127.0.0.1/x")
    s = load_settings()
    assert s.admin_ids == [11, 22, 33] and s.default_lang == "en"
    assert s.database_url == "postgresql+asyncpg://postgres@127.0.0.1/x"


@pytest.mark.parametrize(("name", "value", "fragment"), [
    ("HOPNHAT_BOT_TOKEN", "not-a-token", "HOPNHAT_BOT_TOKEN"),
    ("HOPNHAT_ADMIN_IDS", "12,abc", "HOPNHAT_ADMIN_IDS"),
    ("HOPNHAT_TIMEZONE", "Mars/Olympus", "HOPNHAT_TIMEZONE"),
    ("HOPNHAT_DATABASE_URL", "mysql://x", "HOPNHAT_DATABASE_URL"),
    ("HOPNHAT_DEFAULT_LANG", "fr", "HOPNHAT_DEFAULT_LANG"),
])
def test_bad_setting_is_one_line(monkeypatch, tmp_path, name, value, fragment) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert fragment in str(info.value) and "\n" not in str(info.value)
    proc = subprocess.run([sys.executable, "-m", "bot", "config", "show"], cwd=tmp_path,
                          env={**__import__("os").environ, name: value,
                               "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and fragment in proc.stderr


def test_config_show_masks_secrets(tmp_path) -> None:
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT),
           "HOPNHAT_BOT_TOKEN": "123456:TOPtokenTOPtokenTOPtoken1234",
           "HOPNHAT_WEBHOOK_SECRET": "hush-hush-hush",
           "HOPNHAT_DATABASE_URL": "postgresql://app:pgpass@db/hopnhat"}
    out = subprocess.run([sys.executable, "-m", "bot", "config", "show"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60).stdout
    assert "HOPNHAT_BOT_TOKEN=123456:****" in out
    assert "TOPtoken" not in out and "hush" not in out and "pgpass" not in out


def test_ldap_settings_validated_and_password_masked(tmp_path) -> None:
    from bot.config import ConfigError, load_settings

    s = load_settings(ldap_url="ldap://127.0.0.1:389", ldap_password="dir-secret-123")
    assert s.masked()["HOPNHAT_LDAP_PASSWORD"] == "****"
    assert "dir-secret" not in repr(s.masked())
    for field, bad in (("ldap_url", "http://x"), ("address_pattern", "{given}{nick}")):
        try:
            load_settings(**{field: bad})
        except ConfigError as exc:
            assert f"HOPNHAT_{field.upper()}" in str(exc)
        else:
            raise AssertionError(f"{field}={bad!r} accepted")
