"""Texts: both languages complete, HTML autoescaped, long answers split on line boundaries."""

from __future__ import annotations

import pytest

from bot.emulator import parse_html
from services import texts
from services.phones import PhoneError, normalize_phone
from services.texts import split_text, t


def test_every_key_in_both_languages() -> None:
    assert texts.keys("vi") == texts.keys("en")


def test_messages_escape_html_but_buttons_stay_plain() -> None:
    out = t("me.profile", "vi", name="<b>Lê & Sơn</b>", position=None, phone=None,
            unit="Phường <i>", role="official")
    assert "&lt;b&gt;Lê &amp; Sơn&lt;/b&gt;" in out and "Phường &lt;i&gt;" in out
    parse_html(out)  # valid Telegram HTML
    assert t("btn.import_apply", "vi", n="<3") == "Nhập <3 dòng"


def test_split_on_line_boundaries() -> None:
    lines = [f"• Dòng {i}: Mã đơn vị «99999» không có trong danh mục" for i in range(200)]
    text = "\n".join(lines)
    assert len(text) > 4096
    parts = split_text(text)
    assert len(parts) >= 2 and all(len(p) <= 4096 for p in parts)
    assert "\n".join(parts) == text  # nothing lost, no line cut
    long_line = "x " * 5000
    parts = split_text(long_line, limit=1000)
    assert all(len(p) <= 1000 for p in parts) and "".join(parts).replace(" ", "") == \
        long_line.replace(" ", "")
    assert split_text("") == []


@pytest.mark.parametrize(("raw", "want"), [
    ("+84 912.345.678", "+84912345678"), ("84912345678", "+84912345678"),
    ("0912 345 678", "+84912345678"), ("0912-345-678", "+84912345678"),
    ("912345678", "+84912345678"), ("028 3829 1234", "+842838291234"),
])
def test_phone_normalization(raw: str, want: str) -> None:
    assert normalize_phone(raw) == want


@pytest.mark.parametrize("raw", ["", "abc", "+1 202 555 0100", "0912", "091234567890123"])
def test_bad_phones(raw: str) -> None:
    with pytest.raises(PhoneError):
        normalize_phone(raw)


def test_remembered_renders_equal_fresh_ones() -> None:
    from datetime import UTC, datetime

    when = datetime(2026, 6, 10, 1, 30, tzinfo=UTC)
    args = {"id": 7, "when": when, "count": 3}
    first = t("bc.scheduled", "vi", **args)
    assert t("bc.scheduled", "vi", **args) == first  # served from memory
    texts._rendered.clear()
    assert t("bc.scheduled", "vi", **args) == first  # and equal to a fresh render
    assert t("bc.scheduled", "en", **args) != first  # per language
    # equal but different values are different parameters (True == 1 in Python)
    assert t("btn.import_apply", "vi", n=True) == "Nhập True dòng"
    assert t("btn.import_apply", "vi", n=1) == "Nhập 1 dòng"
    # the time zone is part of a date's text: changing it forgets the renders
    texts.configure("UTC")
    try:
        assert t("bc.scheduled", "vi", **args) != first
        assert "01:30" in t("bc.scheduled", "vi", **args)
    finally:
        texts.configure("Asia/Ho_Chi_Minh")
    assert t("bc.scheduled", "vi", **args) == first
