"""Vietnamese phone numbers in one canonical form: +84 followed by the national number."""

from __future__ import annotations

import re

_DROP = re.compile(r"[\s.\-()/]")


class PhoneError(ValueError):
    """The text is not a plausible Vietnamese phone number."""


def normalize_phone(raw: str | int | None) -> str:
    """'+84 912.345.678', '84912345678', '0912 345 678' → '+84912345678'.

    Accepts 9-10 national digits after the trunk prefix (mobile 9, landline 10 with area code).
    """
    if raw is None:
        raise PhoneError("empty")
    text = _DROP.sub("", str(raw).strip())
    if text.endswith(".0") and text[:-2].isdigit():  # spreadsheet floats
        text = text[:-2]
    if text.startswith("+"):
        text = text[1:]
        if not text.startswith("84"):
            raise PhoneError("not a Vietnamese number")
    if not text.isdigit():
        raise PhoneError("contains non-digits")
    if text.startswith("84") and len(text) >= 11:
        national = text[2:]
    elif text.startswith("0"):
        national = text[1:]
    elif len(text) == 9:  # leading zero lost in a spreadsheet
        national = text
    else:
        raise PhoneError("unrecognized prefix")
    if national.startswith("0"):
        national = national[1:]
    if not 9 <= len(national) <= 10:
        raise PhoneError("wrong length")
    return "+84" + national


def try_normalize_phone(raw: str | int | None) -> str | None:
    try:
        return normalize_phone(raw)
    except PhoneError:
        return None
