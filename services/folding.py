"""Accent-, case- and spacing-insensitive keys for Vietnamese names ("Bến Thành" == "ben thanh")."""

from __future__ import annotations

import re
import unicodedata

_SPACES = re.compile(r"\s+")
_NON_WORD = re.compile(r"[^\w\s]", re.UNICODE)


def fold(text: str | None) -> str:
    """Lowercase, strip diacritics (đ→d), collapse spaces; keeps digits and letters."""
    if not text:
        return ""
    text = unicodedata.normalize("NFC", text).replace("đ", "d").replace("Đ", "D")
    decomposed = unicodedata.normalize("NFD", text)
    stripped = "".join(c for c in decomposed if unicodedata.category(c) != "Mn")
    stripped = _NON_WORD.sub(" ", stripped.lower())
    return _SPACES.sub(" ", stripped).strip()


def clean_name(text: str) -> str:
    """Normalize a display name: NFC and single spaces (the national register has doubles)."""
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip()
