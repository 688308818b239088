"""Every user-visible string: Jinja2 templates in TOML locale files, Vietnamese first.

``services/locales/<lang>/*.toml`` hold nested tables; a dotted key names a template.
Message templates are autoescaped for Telegram HTML (a name like ``<b>Lê & Sơn</b>`` shows
literally); button labels (keys under ``btn.``) are plain text and not escaped, because
Telegram does not parse HTML in buttons. Channel-neutral: no aiogram here.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from datetime import date, datetime
from functools import cache, lru_cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from jinja2 import Environment, StrictUndefined, Template
from markupsafe import Markup, escape

LOCALES_DIR = Path(__file__).with_name("locales")
LANGS = ("vi", "en")
DEFAULT_LANG = "vi"
TELEGRAM_LIMIT = 4096


def _flatten(prefix: str, table: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            yield from _flatten(full, value)
        else:
            yield full, str(value)


@cache
def _catalog(lang: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for path in sorted((LOCALES_DIR / lang).glob("*.toml")):
        with path.open("rb") as fh:
            out.update(_flatten("", tomllib.load(fh)))
    return out


_tz = ZoneInfo("Asia/Ho_Chi_Minh")


def configure(timezone: str) -> None:
    """Dates are shown in the deployment's time zone (HOPNHAT_TIMEZONE)."""
    global _tz
    _tz = ZoneInfo(timezone)
    _rendered.clear()


def _dt(value: datetime | date | None, fmt: str = "%H:%M %d/%m/%Y") -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(_tz).strftime(fmt)
    return value.strftime("%d/%m/%Y")


def _is_plain(key: str) -> bool:
    return key.startswith("btn.") or ".btn." in key


_HTML = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True,
                    lstrip_blocks=True)
_PLAIN = Environment(autoescape=False, undefined=StrictUndefined, trim_blocks=True,
                     lstrip_blocks=True)
for _env in (_HTML, _PLAIN):
    _env.filters["dt"] = _dt


@lru_cache(maxsize=4096)
def _template(lang: str, key: str) -> Template:
    source = _catalog(lang).get(key)
    if source is None and lang != DEFAULT_LANG:
        source = _catalog(DEFAULT_LANG).get(key)
    if source is None:
        raise KeyError(f"missing text {key!r} for {lang!r}")
    env = _PLAIN if _is_plain(key) else _HTML
    return env.from_string(source)


def norm_lang(lang: str | None) -> str:
    if lang and lang[:2].lower() in LANGS:
        return lang[:2].lower()
    return DEFAULT_LANG


# Renders of templates whose parameters are plain values (a button label, a greeting with a
# name): the same few hundred texts are shown over and over, and a render is a function of
# (language, key, parameters) alone. Cleared with the catalog or the time zone.
_PLAIN_PARAMS = frozenset({str, int, float, bool, type(None), date, datetime})
_rendered: dict[tuple[Any, ...], str] = {}
RENDERED_MAX = 8192


def t(key: str, lang: str | None = None, /, **params: Any) -> str:
    """Render the template ``key`` in ``lang`` (falls back to Vietnamese)."""
    lang = norm_lang(lang)
    memo: tuple[Any, ...] | None = None
    if all(v.__class__ in _PLAIN_PARAMS for v in params.values()):
        memo = (lang, key, *((k, v.__class__, v) for k, v in params.items()))
        hit = _rendered.get(memo)
        if hit is not None:
            return hit

    def inner(k: str, **kw: Any) -> Markup:
        out = t(k, lang, **kw)
        return escape(out) if _is_plain(k) else Markup(out)

    out = _template(lang, key).render(t=inner, **params)
    if memo is not None:
        if len(_rendered) >= RENDERED_MAX:
            _rendered.clear()
        _rendered[memo] = out
    return out


def has(key: str, lang: str | None = None) -> bool:
    return key in _catalog(norm_lang(lang)) or key in _catalog(DEFAULT_LANG)


def keys(lang: str) -> set[str]:
    return set(_catalog(lang))


def reload() -> None:
    _rendered.clear()
    _catalog.cache_clear()
    _template.cache_clear()


def split_text(text: str, limit: int = TELEGRAM_LIMIT) -> list[str]:
    """Split on line boundaries into chunks of at most ``limit`` characters.

    A single line longer than the limit is cut at the last space before it (or hard-cut).
    Splitting never happens inside an HTML tag because templates close tags per line.
    """
    chunks: list[str] = []
    current = ""
    for line in text.split("\n"):
        while len(line) > limit:
            cut = line.rfind(" ", 0, limit)
            cut = cut if cut > limit // 2 else limit
            if current:
                chunks.append(current)
                current = ""
            chunks.append(line[:cut])
            line = line[cut:].lstrip(" ")
        candidate = f"{current}\n{line}" if current else line
        if len(candidate) > limit:
            chunks.append(current)
            current = line
        else:
            current = candidate
    if current.strip():
        chunks.append(current)
    return [c for c in chunks if c.strip()]


def strip_html(text: str) -> str:
    """Terminal rendering of a Telegram-HTML message (CLI and console)."""
    import html
    import re

    return html.unescape(re.sub(r"</?[a-zA-Z][^>]*>", "", text))
