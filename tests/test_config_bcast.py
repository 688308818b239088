"""Settings of issue 7: reminder offsets, quiet hours, send rates — and clear errors."""

from __future__ import annotations

from datetime import UTC, datetime, time

import pytest

from bot.config import ConfigError, load_settings
from services.deliveries import in_quiet_hours, quiet_end


def test_defaults() -> None:
    s = load_settings()
    assert s.reminder_offsets == [7, 3, 1, 0]
    assert s.quiet == (time(22, 0), time(7, 0))
    assert (s.send_rate_global, s.send_rate_private, s.send_rate_group_per_min) == (30, 1, 20)
    assert s.masked()["HOPNHAT_REMINDER_OFFSETS"] == "7,3,1,0"


def test_parsing_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOPNHAT_REMINDER_OFFSETS", "14, 7 ,0")
    monkeypatch.setenv("HOPNHAT_QUIET_HOURS", "21:30-6:00")
    s = load_settings()
    assert s.reminder_offsets == [14, 7, 0] and s.quiet == (time(21, 30), time(6, 0))
    assert load_settings(quiet_hours="off").quiet is None
    for key, value, word in (("reminder_offsets", "7,ba", "ba"),
                             ("quiet_hours", "22h-7h", "HH:MM-HH:MM"),
                             ("send_rate_global", "0", "greater than 0"),
                             ("sender_name", "two words", "pattern")):
        with pytest.raises(ConfigError) as exc:
            load_settings(**{key: value})
        assert f"HOPNHAT_{key.upper()}" in str(exc.value) and word in str(exc.value)


def test_quiet_hours_across_midnight() -> None:
    tz = load_settings().tz
    quiet = (time(22, 0), time(7, 0))
    night = datetime(2025, 8, 8, 16, 0, tzinfo=UTC)  # 23:00 local
    early = datetime(2025, 8, 8, 23, 30, tzinfo=UTC)  # 06:30 local
    day = datetime(2025, 8, 8, 3, 0, tzinfo=UTC)  # 10:00 local
    assert in_quiet_hours(night, quiet, tz) and in_quiet_hours(early, quiet, tz)
    assert not in_quiet_hours(day, quiet, tz)
    assert quiet_end(night, quiet, tz) == datetime(2025, 8, 9, 0, 0, tzinfo=UTC)
    assert quiet_end(early, quiet, tz) == datetime(2025, 8, 9, 0, 0, tzinfo=UTC)
    assert quiet_end(day, quiet, tz) == day
