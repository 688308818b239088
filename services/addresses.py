"""Official address convention (DESIGN.md §5): given name + initials of the other names,
ASCII lowercase (Nguyễn Văn An → ``annv``); a taken address gets a number (annv1, annv2…).

The pattern is configurable (``HOPNHAT_ADDRESS_PATTERN``) with the fields ``{given}``,
``{initials}`` (family + middle names), ``{family}``, ``{middle}`` (middle initials) and
``{family_initial}``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Collection

from services.folding import fold

DEFAULT_PATTERN = "{given}{initials}"
FIELDS = frozenset({"given", "initials", "family", "middle", "family_initial"})
_ASCII = re.compile(r"[^a-z0-9]")
MAX_LOCAL = 40


class AddressError(ValueError):
    """The name gives no usable ASCII address (e.g. only punctuation)."""


def check_pattern(pattern: str) -> str:
    """Validate a pattern: only known fields, at least one of them."""
    names = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
    bad = [n for n in names if n not in FIELDS]
    if bad or not names:
        raise ValueError(f"unknown field {bad[0]!r}" if bad else "no {field} in the pattern")
    return pattern


def _words(full_name: str) -> list[str]:
    return [w for w in (_ASCII.sub("", p) for p in fold(full_name).split()) if w]


def local_part(full_name: str, pattern: str = DEFAULT_PATTERN) -> str:
    """The address before any collision number: ASCII lowercase letters and digits only."""
    words = _words(full_name)
    if not words:
        raise AddressError(full_name)
    given, others = words[-1], words[:-1]
    values = {
        "given": given,
        "initials": "".join(w[0] for w in others),
        "family": others[0] if others else "",
        "middle": "".join(w[0] for w in others[1:]),
        "family_initial": others[0][0] if others else "",
    }
    local = _ASCII.sub("", pattern.format(**values).lower())[:MAX_LOCAL]
    if not local:
        raise AddressError(full_name)
    return local


def numbered(base: str, taken: Collection[str]) -> str:
    """``base`` if free, else the first of base1, base2, … not in ``taken``."""
    if base not in taken:
        return base
    n = 1
    while f"{base}{n}" in taken:
        n += 1
    return f"{base}{n}"
