"""Settings from the environment (prefix ``HOPNHAT_``) and an optional ``.env`` file.

One cached getter; nothing is read at import time so tests can set the environment first.
A bad setting is reported as one line (:class:`ConfigError`), never as a traceback.
"""

from __future__ import annotations

import re
from datetime import time
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.sla import BusinessCalendar, CalendarError

TELEGRAM_API_URL = "https://api.telegram.org"
_TOKEN_RE = re.compile(r"^\d{3,}:[A-Za-z0-9_-]{20,}$")
_TIME_RE = re.compile(r"([01]?\d|2[0-3]):[0-5]\d")


def _hhmm(value: str) -> time:
    h, m = value.split(":")
    return time(int(h), int(m))


class ConfigError(Exception):
    """A setting is missing or malformed; the message is one human-readable line."""


def _int_list(text: str, item: str, what: str) -> list[int]:
    """A list typed in an env var: numbers separated by commas, spaces or semicolons."""
    parts = [p for p in re.split(r"[,\s;]+", text.strip()) if p]
    bad = [p for p in parts if not re.fullmatch(item, p)]
    if bad:
        raise ValueError(f"expected {what}; got {bad[0]!r}")
    return [int(p) for p in parts]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="HOPNHAT_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    bot_token: SecretStr | None = None
    database_url: str = "sqlite+aiosqlite:///./hopnhat.db"
    telegram_api_url: str = TELEGRAM_API_URL
    default_lang: Literal["vi", "en"] = "vi"
    timezone: str = "Asia/Ho_Chi_Minh"
    admin_ids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    webhook_host: str = "127.0.0.1"
    webhook_port: int = Field(default=8080, ge=1, le=65535)
    log_level: str = "INFO"
    data_dir: Path = Path("./data")
    # Support desk (issue 6): the helpdesk's business calendar and the ticket worker's pace.
    sla_workdays: str = "mon-fri"
    sla_hours: str = "07:30-11:30,13:30-17:00"
    sla_holidays: str = ""
    sla_due_hours: str = ""
    sla_warn_minutes: int = Field(default=60, ge=1, le=24 * 60)
    ticket_scan_seconds: float = Field(default=30.0, gt=0, le=3600)
    incident_window_minutes: int = Field(default=60, ge=1, le=7 * 24 * 60)
    incident_threshold: int = Field(default=3, ge=2, le=1000)
    # provisioning (issue 5): the LDAP directory accounts are created in
    ldap_url: str | None = None
    ldap_base_dn: str = "dc=hopnhat,dc=gov,dc=vn"
    ldap_bind_dn: str = "cn=admin,dc=hopnhat,dc=gov,dc=vn"
    ldap_password: SecretStr | None = None
    address_pattern: str = "{given}{initials}"
    mail_domain: str | None = None
    parallel_days: int = Field(default=90, ge=1, le=3650)
    prov_max_attempts: int = Field(default=6, ge=1, le=100)
    prov_retry_seconds: float = Field(default=5.0, gt=0, le=3600)
    # reminders, broadcasts and the sender (issue 7)
    reminder_offsets: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [7, 3, 1, 0])
    reminder_time: str = "08:00"
    quiet_hours: str = "22:00-07:00"
    send_rate_global: float = Field(default=30.0, gt=0)
    send_rate_private: float = Field(default=1.0, gt=0)
    send_rate_group_per_min: float = Field(default=20.0, gt=0)
    sender_concurrency: int = Field(default=16, ge=1, le=1000)
    sender_name: str = Field(default="sender", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    sender_retry_base: float = Field(default=2.0, gt=0)
    sender_max_attempts: int = Field(default=8, ge=1)
    sender_request_timeout: float = Field(default=30.0, gt=0, le=300)

    @field_validator("bot_token", mode="before")
    @classmethod
    def _check_token(cls, v: object) -> object:
        if v in (None, ""):
            return None
        if not isinstance(v, str) or not _TOKEN_RE.match(v.strip()):
            raise ValueError("expected the form 123456789:AA... given by @BotFather")
        return v.strip()

    @field_validator("database_url")
    @classmethod
    def _check_db(cls, v: str) -> str:
        v = v.strip()
        if v.startswith("postgresql://") or v.startswith("postgres://"):
            v = "postgresql+asyncpg://" + v.split("://", 1)[1]
        if v.startswith("sqlite:///"):
            v = "sqlite+aiosqlite:///" + v[len("sqlite:///"):]
        if not (v.startswith("sqlite+aiosqlite://") or v.startswith("postgresql+asyncpg://")):
            raise ValueError("use sqlite+aiosqlite:///path.db or postgresql+asyncpg://user@host/db")
        return v

    @field_validator("telegram_api_url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("expected an http(s) URL such as https://api.telegram.org")
        return v

    @field_validator("timezone")
    @classmethod
    def _check_tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {v!r}") from exc
        return v

    @field_validator("sla_workdays", "sla_hours", "sla_holidays", "sla_due_hours")
    @classmethod
    def _check_calendar(cls, v: str, info: ValidationInfo) -> str:
        key = {"sla_workdays": "workdays", "sla_hours": "hours", "sla_holidays": "holidays",
               "sla_due_hours": "due_hours"}[str(info.field_name)]
        if v.strip():
            try:
                BusinessCalendar.from_config(**{key: v})
            except CalendarError as exc:
                raise ValueError(str(exc)) from exc
        return v

    @field_validator("admin_ids", mode="before")
    @classmethod
    def _split_ids(cls, v: object) -> object:
        if isinstance(v, str):
            return _int_list(v, r"-?\d+", "numeric Telegram ids, comma separated")
        return v

    @field_validator("ldap_url")
    @classmethod
    def _check_ldap_url(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        v = v.strip()
        if not re.match(r"^ldaps?://[^/\s]+/?$", v):
            raise ValueError("expected ldap://host:port or ldaps://host:port")
        return v

    @field_validator("address_pattern")
    @classmethod
    def _check_pattern(cls, v: str) -> str:
        from services.addresses import check_pattern

        return check_pattern(v)

    @field_validator("reminder_offsets", mode="before")
    @classmethod
    def _split_offsets(cls, v: object) -> object:
        if isinstance(v, str):
            days = _int_list(v, r"\d{1,3}", "days before a due date, e.g. 7,3,1,0")
            return sorted(set(days), reverse=True)
        return v

    @field_validator("reminder_time")
    @classmethod
    def _check_time(cls, v: str) -> str:
        if not _TIME_RE.fullmatch(v.strip()):
            raise ValueError("expected HH:MM, e.g. 08:00")
        return v.strip()

    @field_validator("quiet_hours")
    @classmethod
    def _check_quiet(cls, v: str) -> str:
        v = v.strip()
        if v.lower() in ("", "off", "none"):
            return "off"
        parts = [p.strip() for p in v.split("-")]
        if len(parts) != 2 or not all(_TIME_RE.fullmatch(p) for p in parts):
            raise ValueError("expected HH:MM-HH:MM (e.g. 22:00-07:00) or off")
        return f"{parts[0]}-{parts[1]}"

    @property
    def quiet(self) -> tuple[time, time] | None:
        """Quiet hours as (start, end) local times; None when switched off."""
        if self.quiet_hours == "off":
            return None
        a, b = self.quiet_hours.split("-")
        return _hhmm(a), _hhmm(b)

    @property
    def reminder_clock(self) -> time:
        return _hhmm(self.reminder_time)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def sla_calendar(self) -> BusinessCalendar:
        """The helpdesk's calendar; built (and checked) once per settings object."""
        cal = self.__dict__.get("_sla_calendar")
        if cal is None:
            cal = BusinessCalendar.from_config(
                tz=self.timezone, workdays=self.sla_workdays, hours=self.sla_hours,
                holidays=self.sla_holidays or None, due_hours=self.sla_due_hours or None)
            self.__dict__["_sla_calendar"] = cal
        return cal

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def masked(self) -> dict[str, str]:
        """Effective settings for display, secrets masked."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                raw = value.get_secret_value()
                shown = (raw.split(":")[0] + ":****") if name == "bot_token" else "****"
            elif value is None:
                shown = "(unset)"
            elif isinstance(value, list):
                shown = ",".join(str(x) for x in value) or "(none)"
            else:
                shown = str(value)
            if name == "database_url":
                shown = re.sub(r"://([^:/@]+):([^@]+)@", r"://\1:****@", shown)
            out["HOPNHAT_" + name.upper()] = shown
        return out


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning validation errors into one line per the first problem."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err.get("loc", ())) or "?"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        raise ConfigError(f"HOPNHAT_{field.upper()}: {msg}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
