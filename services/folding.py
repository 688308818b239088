"""Accent-, case- and spacing-insensitive keys for Vietnamese names ("Bến Thành" == "ben thanh")."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

_SPACES = re.compile(r"\s+")
_NON_WORD = re.compile(r"[^\w\s]", re.UNICODE)


def fold(text: str | None) -> str:
    """Lowercase, strip diacritics (đ→d), collapse spaces; keeps digits and letters."""
    if not text:
        return ""
    # Short texts repeat (button labels, unit names, typed answers): remembered. Several
    # filters fold every incoming message, and a choice step folds all its labels.
    return _fold_short(text) if len(text) <= _REMEMBERED_LEN else _fold(text)


_REMEMBERED_LEN = 160


def _fold(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("đ", "d").replace("Đ", "D")
    decomposed = unicodedata.normalize("NFD", text)
    if decomposed.isascii():
        stripped = decomposed  # nothing to strip (ASCII has no combining marks)
    else:
        stripped = "".join(c for c in decomposed if unicodedata.category(c) != "Mn")
    stripped = _NON_WORD.sub(" ", stripped.lower())
    return _SPACES.sub(" ", stripped).strip()


_fold_short = lru_cache(maxsize=16384)(_fold)


def clean_name(text: str) -> str:
    """Normalize a display name: NFC and single spaces (the national register has doubles)."""
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip()
