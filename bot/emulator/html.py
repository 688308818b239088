"""Telegram-flavoured HTML (``parse_mode=HTML``) parsing and validation.

Telegram rejects malformed markup with ``Bad Request: can't parse entities: ...``;
a bot that forgets to escape user input (``a < b``) works in dev and breaks in
production.  This parser mirrors TDLib's rules closely enough to catch that:

* supported tags only: b/strong, i/em, u/ins, s/strike/del, tg-spoiler,
  span class="tg-spoiler", a href, tg-emoji emoji-id, code, pre, blockquote
  (``expandable`` allowed) and tg-time (unix, format);
* tags must be properly nested and closed;
* entities: ``&lt; &gt; &amp; &quot;`` and numeric ``&#NN;``/``&#xHH;`` only.

Deliberately *stricter* than TDLib in one place: TDLib copies a bare ``&`` that
does not start an entity through literally, we reject it, because an unescaped
``&`` in bot output almost always means ``html.escape`` was forgotten.

The result is the plain text plus Bot API entities with UTF-16 offsets, which is
what Telegram returns in the ``Message`` object and what length limits apply to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_ENTITY_RE = re.compile(r"&(?:(lt|gt|amp|quot);|#(\d{1,8});|#[xX]([0-9a-fA-F]{1,7});)")
_NAMED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
_TAG_NAME_RE = re.compile(r"[A-Za-z0-9-]*")
_ATTR_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")

_TAG_ENTITY = {
    "b": "bold",
    "strong": "bold",
    "i": "italic",
    "em": "italic",
    "u": "underline",
    "ins": "underline",
    "s": "strikethrough",
    "strike": "strikethrough",
    "del": "strikethrough",
    "tg-spoiler": "spoiler",
    "span": "spoiler",
    "a": "text_link",
    "tg-emoji": "custom_emoji",
    "code": "code",
    "pre": "pre",
    "blockquote": "blockquote",
    "tg-time": "date_time",
}

SUPPORTED_PARSE_MODES = {"html": "HTML", "markdownv2": "MarkdownV2", "markdown": "Markdown"}


class EntityParseError(ValueError):
    """Markup is invalid; ``str(exc)`` is the full Telegram description."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"Bad Request: can't parse entities: {detail}")
        self.detail = detail


@dataclass
class _Open:
    tag: str
    offset: int  # UTF-16 offset in the output where the entity starts
    attrs: dict[str, str] = field(default_factory=dict)


def _utf16_len(s: str) -> int:
    return len(s.encode("utf-16-le")) // 2


def _byte_offset(text: str, i: int) -> int:
    return len(text[:i].encode("utf-8"))


def parse_html(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Return ``(plain_text, entities)`` or raise :class:`EntityParseError`."""
    out: list[str] = []
    out_len = 0  # UTF-16 length of the output so far
    stack: list[_Open] = []
    entities: list[dict[str, Any]] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "&":
            m = _ENTITY_RE.match(text, i)
            if not m:
                raise EntityParseError(
                    f'character "&" at byte offset {_byte_offset(text, i)} must be escaped '
                    "as &amp; (or start one of &lt; &gt; &amp; &quot; &#NN;)"
                )
            decoded = _decode_entity(m, text, i)
            out.append(decoded)
            out_len += _utf16_len(decoded)
            i = m.end()
            continue
        if ch != "<":
            out.append(ch)
            out_len += 2 if ord(ch) > 0xFFFF else 1
            i += 1
            continue

        start = i
        if i + 1 < n and text[i + 1] == "/":
            close = text.find(">", i)
            if close < 0:
                raise EntityParseError(f"Unclosed end tag at byte offset {_byte_offset(text, i)}")
            name = text[i + 2:close].strip().lower()
            if not stack:
                raise EntityParseError(
                    f'Unexpected end tag "</{name}>" at byte offset {_byte_offset(text, i)}'
                )
            top = stack.pop()
            if name != top.tag:
                raise EntityParseError(
                    f"Unmatched end tag at byte offset {_byte_offset(text, i)}, "
                    f'expected "</{top.tag}>", found "</{name}>"'
                )
            _finish_entity(top, out_len, entities, stack)
            i = close + 1
            continue

        m = _TAG_NAME_RE.match(text, i + 1)
        name = m.group(0).lower() if m else ""
        if name not in _TAG_ENTITY:
            raise EntityParseError(
                f'Unsupported start tag "{name}" at byte offset {_byte_offset(text, start)}'
            )
        i = m.end() if m else i + 1
        attrs: dict[str, str] = {}
        while True:
            while i < n and text[i].isspace():
                i += 1
            if i >= n:
                raise EntityParseError(
                    f"Unclosed start tag at byte offset {_byte_offset(text, start)}"
                )
            if text[i] == ">":
                i += 1
                break
            am = _ATTR_NAME_RE.match(text, i)
            if not am:
                raise EntityParseError(
                    f'Expected an attribute name in tag "{name}" '
                    f"at byte offset {_byte_offset(text, i)}"
                )
            attr = am.group(0).lower()
            i = am.end()
            value = ""
            if i < n and text[i] == "=":
                i += 1
                if i < n and text[i] in "\"'":
                    quote = text[i]
                    end = text.find(quote, i + 1)
                    if end < 0:
                        raise EntityParseError(
                            f"Unclosed attribute value at byte offset {_byte_offset(text, i)}"
                        )
                    raw_value = text[i + 1:end]
                    i = end + 1
                else:
                    j = i
                    while j < n and not text[j].isspace() and text[j] != ">":
                        j += 1
                    raw_value = text[i:j]
                    i = j
                value = _unescape_attr(raw_value)
            attrs[attr] = value
        _check_start_tag(name, attrs, text, start)
        stack.append(_Open(name, out_len, attrs))

    if stack:
        raise EntityParseError(f'Can\'t find end tag corresponding to start tag "{stack[-1].tag}"')
    entities.sort(key=lambda e: (e["offset"], -e["length"]))
    return "".join(out), entities


def _decode_entity(m: re.Match[str], text: str, i: int) -> str:
    if m.group(1):
        return _NAMED[m.group(1)]
    code = int(m.group(2)) if m.group(2) else int(m.group(3), 16)
    if code == 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        raise EntityParseError(
            f"invalid character reference {m.group(0)!r} at byte offset {_byte_offset(text, i)}"
        )
    return chr(code)


def _unescape_attr(raw: str) -> str:
    def repl(m: re.Match[str]) -> str:
        return _decode_entity(m, raw, m.start())

    return _ENTITY_RE.sub(repl, raw)


def _check_start_tag(name: str, attrs: dict[str, str], text: str, start: int) -> None:
    where = f"at byte offset {_byte_offset(text, start)}"
    if name == "a" and not attrs.get("href"):
        raise EntityParseError(f'tag "a" must have a non-empty "href" attribute {where}')
    if name == "span" and attrs.get("class") != "tg-spoiler":
        raise EntityParseError(f'tag "span" must have class "tg-spoiler" {where}')
    if name == "tg-emoji" and not attrs.get("emoji-id"):
        raise EntityParseError(f'tag "tg-emoji" must have attribute "emoji-id" {where}')
    if name == "tg-time" and not re.fullmatch(r"-?\d+", attrs.get("unix", "")):
        raise EntityParseError(f'tag "tg-time" must have an integer "unix" attribute {where}')


def _finish_entity(
    top: _Open, end: int, entities: list[dict[str, Any]], stack: list[_Open]
) -> None:
    length = end - top.offset
    if length <= 0:
        return  # Telegram drops empty entities
    etype = _TAG_ENTITY[top.tag]
    ent: dict[str, Any] = {"type": etype, "offset": top.offset, "length": length}
    if top.tag == "a":
        href = top.attrs["href"]
        mention = re.fullmatch(r"tg://user\?id=(\d+)", href)
        if mention:
            ent["type"] = "text_mention"
            ent["user"] = {"id": int(mention.group(1)), "is_bot": False, "first_name": ""}
        else:
            ent["url"] = href
    elif top.tag == "tg-emoji":
        ent["custom_emoji_id"] = top.attrs["emoji-id"]
    elif top.tag == "blockquote" and "expandable" in top.attrs:
        ent["type"] = "expandable_blockquote"
    elif top.tag == "tg-time":
        ent["unix_time"] = int(top.attrs["unix"])
        if top.attrs.get("format"):
            ent["date_time_format"] = top.attrs["format"]
    elif top.tag == "code":
        lang = top.attrs.get("class", "")
        parent = stack[-1] if stack else None
        if parent is not None and parent.tag == "pre":
            # <pre><code class="language-x"> is one pre entity with a language
            if lang.startswith("language-"):
                parent.attrs["language"] = lang[len("language-"):]
            return
    elif top.tag == "pre" and top.attrs.get("language"):
        ent["language"] = top.attrs["language"]
    entities.append(ent)


_MD_LINK_RE = re.compile(r"\[([^\]]*)\]\([^)]*\)")


def strip_markdown(text: str, v2: bool) -> str:
    """Rough plain-text view of Markdown/MarkdownV2 for length checks (not validated)."""
    text = _MD_LINK_RE.sub(r"\1", text)
    if v2:
        text = re.sub(r"\\(.)", "\x00\\1", text)
        text = re.sub(r"(?<!\x00)(\|\||[*_~`])", "", text)
        return text.replace("\x00", "")
    return re.sub(r"[*_`]", "", text)


def render_text(text: str, parse_mode: str | None) -> tuple[str, list[dict[str, Any]] | None]:
    """Apply ``parse_mode`` and return ``(plain_text, entities_or_None)``.

    Raises :class:`EntityParseError` for bad HTML and ``ValueError`` for an
    unknown parse mode (Telegram: ``Bad Request: unsupported parse_mode``).
    """
    if not parse_mode:
        return text, None
    mode = SUPPORTED_PARSE_MODES.get(parse_mode.lower())
    if mode is None:
        raise ValueError("Bad Request: unsupported parse_mode")
    if mode == "HTML":
        plain, ents = parse_html(text)
        return plain, ents or None
    return strip_markdown(text, v2=mode == "MarkdownV2"), None
