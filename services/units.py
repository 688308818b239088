"""Finding administrative units the way officials type them, and old addresses → new units.

Search runs on ``units.name_folded`` with LIKE only, so it behaves the same on SQLite and
PostgreSQL: "ben thanh", "P. Bến Thành" and "phuong ben  THANH" all find Phường Bến Thành.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select, true
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from db.models import Province, Unit
from services.folding import fold

log = logging.getLogger(__name__)

MAX_LIMIT = 100
MAX_ADDRESS_CHARS = 500
MAX_QUERY_CHARS = 200  # a unit name is shorter; bounds the SQL built from the query
MAX_TOKENS = 8
# Leading words naming the kind of unit; users may or may not type them.
_KIND_WORDS = {("phuong",), ("p",), ("xa",), ("x",), ("dac", "khu"), ("dk",)}
_KIND_PREFIXES = ("phuong", "xa", "dac khu")


@dataclass(frozen=True)
class UnitItem:
    code: str
    name: str
    kind: str
    province_code: str | None
    province_name: str | None
    active: bool
    merged_into: str | None
    merged_into_name: str | None


@dataclass(frozen=True)
class UnitSearchResult:
    items: list[UnitItem]
    total: int


@dataclass(frozen=True)
class OldAddressResolution:
    """An old (63-province) address and the new unit it belongs to since 1 July 2025."""

    old_ward: str | None
    old_district: str | None
    old_province: str | None
    old_unit_code: str | None
    new_ward_code: str
    new_ward_name: str
    new_province_code: str
    new_province_name: str

    @property
    def old_description(self) -> str:
        return ", ".join(p for p in (self.old_ward, self.old_district, self.old_province) if p)

    @property
    def old_name(self) -> str:
        """Alias of ``old_description`` (what handlers show as "you typed ...")."""
        return self.old_description

    @property
    def new_name(self) -> str:
        """The new unit's name; look it up by ``new_ward_code``, names repeat across provinces."""
        return self.new_ward_name


def _query_tokens(query: str) -> tuple[str, list[str]]:
    """Folded query and its tokens without leading kind words ("p. ben thanh" → ben, thanh)."""
    folded = fold(query[:MAX_QUERY_CHARS])
    tokens = folded.split()[: MAX_TOKENS + 2]
    changed = True
    while changed and tokens:
        changed = False
        for words in _KIND_WORDS:
            n = len(words)
            if tuple(tokens[:n]) == words and len(tokens) > n:
                tokens = tokens[n:]
                changed = True
                break
    return folded, tokens[:MAX_TOKENS]


def _like_escape(token: str) -> str:
    return token.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _token_filter(tokens: list[str], *, word_prefix: bool) -> ColumnElement[bool]:
    conds: list[ColumnElement[bool]] = []
    for tok in tokens:
        t = _like_escape(tok)
        if word_prefix:
            conds.append(
                or_(
                    Unit.name_folded.like(f"{t}%", escape="\\"),
                    Unit.name_folded.like(f"% {t}%", escape="\\"),
                )
            )
        else:
            conds.append(Unit.name_folded.like(f"%{t}%", escape="\\"))
    return and_(true(), *conds)


async def search_units(
    session: AsyncSession,
    query: str,
    *,
    province_code: str | None = None,
    include_defunct: bool = False,
    limit: int = 10,
    offset: int = 0,
) -> UnitSearchResult:
    """Units whose folded name contains every query token, best matches first.

    Tokens match at word starts first ("an" finds "An Phú", not "Thành"); only when that finds
    nothing are they matched anywhere in the name. A query equal to a unit code finds it too.
    Ranking: exact name (with or without the kind word), exact code, active before defunct,
    shorter names, then alphabetical.
    """
    limit = max(1, min(int(limit), MAX_LIMIT))
    offset = max(0, int(offset))
    folded, tokens = _query_tokens(query or "")
    core = " ".join(tokens)
    code_text = (query or "").strip()[:32]

    if not tokens and not province_code:
        return UnitSearchResult(items=[], total=0)  # "", "%", "***": nothing to look for

    base: list[ColumnElement[bool]] = []
    if province_code:
        base.append(Unit.province_code == province_code)
    if not include_defunct:
        base.append(Unit.active.is_(True))

    exact_names = {folded, core, *(f"{p} {core}" for p in _KIND_PREFIXES)} - {""}
    rank = case(
        (Unit.name_folded.in_(sorted(exact_names)), 0),
        (Unit.code == code_text, 0),
        else_=1,
    )

    total = 0
    match: ColumnElement[bool] = true()
    for word_prefix in (True, False):
        match = _token_filter(tokens, word_prefix=word_prefix)
        if code_text:
            match = or_(match, Unit.code == code_text)
        total = (
            await session.execute(select(func.count()).select_from(Unit).where(match, *base))
        ).scalar_one()
        if total or not tokens:
            break

    target = aliased(Unit)
    stmt = (
        select(Unit, Province.name, target.name)
        .outerjoin(Province, Province.code == Unit.province_code)
        .outerjoin(target, target.code == Unit.merged_into)
        .where(match, *base)
        .order_by(
            rank,
            Unit.active.desc(),
            func.length(Unit.name_folded),
            Unit.name_folded,
            Unit.code,
        )
        .limit(limit)
        .offset(offset)
    )
    items = [
        UnitItem(
            code=u.code,
            name=u.name,
            kind=u.kind,
            province_code=u.province_code,
            province_name=pname,
            active=u.active,
            merged_into=u.merged_into,
            merged_into_name=tname,
        )
        for u, pname, tname in (await session.execute(stmt)).all()
    ]
    return UnitSearchResult(items=items, total=total)


async def get_unit(session: AsyncSession, code: str) -> Unit | None:
    return await session.get(Unit, code)


def _clean_address(text: Any) -> str | None:
    """Reject what cannot be an address before the (slow, regex-heavy) parser sees it."""
    if not isinstance(text, str):
        return None
    text = unicodedata.normalize("NFC", text).strip()
    if not text or len(text) > MAX_ADDRESS_CHARS:
        return None
    text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)
    return text if any(c.isalpha() for c in text) else None


def resolve_old_address(text: str) -> OldAddressResolution | None:
    """"Phường Bến Nghé, Quận 1, TP Hồ Chí Minh" → Phường Sài Gòn (26740); None if unknown.

    Uses vietnamadminunits' legacy parser for the old ward, then the register's own
    old→new table (codes of vietnam-provinces, the same as ``units.merged_into``). We do not
    call ``convert_address``: with a street in the text it geocodes over the network (ArcGIS)
    to pick a part of a split ward; we take the main part instead, like the register does.
    Never raises: garbage, huge or hostile input gives None.
    """
    cleaned = _clean_address(text)
    if cleaned is None:
        return None
    try:
        from vietnamadminunits import ParseMode, parse_address

        old = parse_address(cleaned, mode=ParseMode.LEGACY, keep_street=False, level=3)
    except Exception:  # the parser raises on inputs it does not expect
        log.debug("old address parse failed", exc_info=True)
        return None
    return _resolution_from_old(
        getattr(old, "ward_code", None),
        getattr(old, "district_code", None),
        getattr(old, "ward", None),
        getattr(old, "district", None),
        getattr(old, "province", None),
    )


def _resolution_from_old(
    ward_code: str | None,
    district_code: str | None,
    ward: str | None,
    district: str | None,
    province: str | None,
) -> OldAddressResolution | None:
    from services.register import (
        OLD_DISTRICT_PREFIX,
        OLD_WARD_PREFIX,
        new_units_by_code,
        old_units_by_code,
    )

    olds = old_units_by_code()
    record = None
    if ward_code:
        record = olds.get(OLD_WARD_PREFIX + str(ward_code).zfill(5))
    elif district_code:  # island districts without wards became special zones
        record = olds.get(OLD_DISTRICT_PREFIX + str(district_code).zfill(3))
    if record is None or not record.merged_into:
        return None
    new, prov = new_units_by_code().get(record.merged_into, (None, None))
    if new is None:
        return None
    return OldAddressResolution(
        old_ward=ward,
        old_district=district,
        old_province=province,
        old_unit_code=record.code,
        new_ward_code=new["code"],
        new_ward_name=new["name"],
        new_province_code=new["province_code"],
        new_province_name=prov["name"] if prov else "",
    )


def warm_up() -> None:
    """Load the parser and the register tables now (~1 s) instead of on the first user query."""
    resolve_old_address("Phường Bến Nghé, Quận 1, Thành phố Hồ Chí Minh")
