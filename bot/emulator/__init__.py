"""Local Telegram Bot API emulator: real HTTP, spec-validated, scriptable from tests.

See :mod:`bot.emulator.server` for the design and :class:`Emulator` for the control API.
"""

from .html import EntityParseError, parse_html, render_text
from .ratelimit import RateLimits, TokenBucket
from .server import ApiError, Emulator
from .spec import ApiSpec, FilePart, ParamError, SpecError, find_spec_path, load_spec

__all__ = [
    "ApiError",
    "ApiSpec",
    "Emulator",
    "EntityParseError",
    "FilePart",
    "ParamError",
    "RateLimits",
    "SpecError",
    "TokenBucket",
    "find_spec_path",
    "load_spec",
    "parse_html",
    "render_text",
]
