"""Finding administrative units the way officials type them, and old addresses → new units.

Search runs on an in-memory index of the register (``services.unit_index``) so it behaves the
same on SQLite and PostgreSQL and answers in well under a millisecond: accent- and
typo-tolerant ("ben thnah", "bn thanh"), kind words and abbreviations optional ("p. ben
thanh", "x.tan phu", "q1"), province hints narrowing ("ben thanh hcm", "tan phu dong nai"),
and old (pre-2025) names found together with the unit they became.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from db.models import Unit
from services.unit_index import Hit, get_index
from services.unit_index import invalidate as invalidate_unit_index

log = logging.getLogger(__name__)

MAX_LIMIT = 100
MAX_ADDRESS_CHARS = 500
MAX_SUGGESTIONS = 20

__all__ = [
    "OldAddressResolution",
    "UnitItem",
    "UnitSearchResult",
    "get_unit",
    "invalidate_unit_index",
    "resolve_old_address",
    "search_units",
    "suggest_units",
    "warm_up",
    "warm_up_search",
]


@dataclass(frozen=True)
class UnitItem:
    """A unit as lists show it.

    ``via_old_name`` is set when the unit was found through the old name of a defunct unit
    merged into it ("Phường Bến Nghé, Quận 1" → Phường Sài Gòn), so the UI can say so.
    Defaulted, so positional constructors written before it keep working.
    """

    code: str
    name: str
    kind: str
    province_code: str | None
    province_name: str | None
    active: bool
    merged_into: str | None
    merged_into_name: str | None
    via_old_name: str | None = None


@dataclass(frozen=True)
class UnitSearchResult:
    """One page of matches; ``total`` counts all of them.

    ``fuzzy``: nothing matched without typos, so these are typo matches ("did you mean").
    """

    items: list[UnitItem]
    total: int
    fuzzy: bool = False


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


def _item(hit: Hit) -> UnitItem:
    doc = hit.doc
    return UnitItem(
        code=doc.code,
        name=doc.name,
        kind=doc.kind,
        province_code=doc.province_code,
        province_name=doc.province_name,
        active=doc.active,
        merged_into=doc.merged_into,
        merged_into_name=doc.merged_into_name,
        via_old_name=hit.via.name if hit.via is not None else None,
    )


async def search_units(
    session: AsyncSession,
    query: str,
    *,
    province_code: str | None = None,
    include_defunct: bool = False,
    limit: int = 10,
    offset: int = 0,
) -> UnitSearchResult:
    """Units the query names, best first; ``total`` counts all, ``offset`` pages stably.

    Every content word of the query must match a word of the unit's own name (exactly or as
    a prefix; with a typo only when nothing matches otherwise); kind words ("phường", "xã",
    "p.") are optional; province and old-district names narrow. A unit code finds its unit.

    Ranking: the unit's code; the exact name (a typed kind word agreeing first); fewer typos;
    active units, then active units found by an old name, then defunct ones; fewer unmatched
    words in the name; fewer prefix completions; shorter names; alphabetical; code.

    ``include_defunct=False``: defunct units are never listed, but when an old name matches
    better than any current one (e.g. "Bến Nghé"), the unit it became is, with
    ``via_old_name``. ``include_defunct=True``: defunct units are listed themselves, with
    ``merged_into``/``merged_into_name``.
    """
    limit = max(1, min(int(limit), MAX_LIMIT))
    offset = max(0, int(offset))
    index = await get_index(session)
    found = index.search(
        query if isinstance(query, str) else "",
        province_code=province_code,
        include_defunct=include_defunct,
    )
    items = [_item(hit) for hit in found.page(offset, limit)]
    return UnitSearchResult(items=items, total=found.total, fuzzy=found.fuzzy)


async def suggest_units(session: AsyncSession, query: str, limit: int = 5) -> list[UnitItem]:
    """"Did you mean …?" candidates, for when ``search_units`` finds nothing good.

    Looser than search: up to half the words may be wrong or missing, and words may have
    more typos. Only current units are returned; one found by an old name carries
    ``via_old_name``.
    """
    limit = max(1, min(int(limit), MAX_SUGGESTIONS))
    index = await get_index(session)
    text = query if isinstance(query, str) else ""
    return [_item(hit) for hit in index.suggest(text, limit=limit)]


async def warm_up_search(session: AsyncSession) -> None:
    """Build the search index now (~0.5 s for the full register) instead of on a user query."""
    await get_index(session)


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
