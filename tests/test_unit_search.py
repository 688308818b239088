"""Unit search as officials type it on phones (issue 4 §2), on SQLite and PostgreSQL.

Accents, typos, kind words and abbreviations, province hints, old names and their successors,
ambiguity and pagination, hostile input, and the index noticing imported units.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import Unit
from services.audit import Actor
from services.imports import import_units
from services.unit_index import osa_distance, words
from services.units import UnitItem, UnitSearchResult, search_units, suggest_units

ACTOR = Actor.system("test")
BEN_THANH = "26743"
SAI_GON = "26740"
HCM = "Thành phố Hồ Chí Minh"


@pytest.fixture
async def s(seeded_maker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    async with seeded_maker() as session:
        yield session


def codes(result: UnitSearchResult) -> list[str]:
    return [i.code for i in result.items]


def names(result: UnitSearchResult) -> list[str]:
    return [f"{i.code} {i.name} ({i.province_name})" for i in result.items]


async def everything(s: AsyncSession, query: str, page: int = 7, **kw: Any) -> list[UnitItem]:
    """All results of a query, fetched page by page."""
    first = await search_units(s, query, limit=page, **kw)
    items = list(first.items)
    while len(items) < first.total:
        more = await search_units(s, query, limit=page, offset=len(items), **kw)
        assert more.total == first.total and more.items
        items += more.items
    return items


# --------------------------------------------------------------------------- accents and typos


@pytest.mark.parametrize(
    "query",
    [
        "phuong ben thanh", "Bến Thành", "ben thanh", "BEN THANH", "  bến   thành ",
        "ben thnah",  # transposition
        "ben tanh",  # deletion
        "bn thanh",  # dropped vowel
        "benthanh",  # no space
        "phuong ben thnah",
        "p. ben thanh", "P.Bến Thành", "p.ben thanh", "phường bến thành",
        "ben thanh hcm", "ben thanh ho chi minh", "Bến Thành, TP.HCM", "ben thanh tphcm",
        "phường Bến Thành thành phố hồ chí minh",
        "26743",
    ],
)
async def test_ben_thanh_first(s: AsyncSession, query: str) -> None:
    result = await search_units(s, query)
    assert codes(result)[:1] == [BEN_THANH], names(result)
    top = result.items[0]
    assert (top.name, top.kind, top.province_name, top.active, top.via_old_name) == (
        "Phường Bến Thành", "ward", HCM, True, None,
    )


async def test_typo_results_say_so(s: AsyncSession) -> None:
    assert not (await search_units(s, "ben thanh")).fuzzy
    assert (await search_units(s, "ben thnah")).fuzzy
    # without a typo, look-alikes are not listed: "ben thanh" is exactly one unit
    assert (await search_units(s, "ben thanh")).total == 1


async def test_d_folds_to_d(s: AsyncSession) -> None:
    plain = await search_units(s, "dak mil")
    marked = await search_units(s, "Đắk Mil")
    assert codes(plain) == codes(marked) and plain.items[0].name == "Xã Đắk Mil"
    # a province name alone lists its units
    lak = await search_units(s, "dak lak", limit=100)
    assert codes(lak) == codes(await search_units(s, "Đắk Lắk", limit=100))
    in_lak = await s.scalar(
        select(func.count()).select_from(Unit).where(Unit.province_code == "66", Unit.active)
    )
    assert lak.total == in_lak and lak.total > 50
    assert {i.province_name for i in lak.items} == {"Đắk Lắk"}


# --------------------------------------------------------------------------- kind words


async def test_kind_words_and_abbreviations(s: AsyncSession) -> None:
    exact = await s.scalar(select(func.count()).select_from(Unit).where(
        Unit.name_folded == "xa tan phu", Unit.active))
    assert exact and exact >= 5
    for query in ("x. tan phu", "xa tan phu", "X.Tân Phú", "xã Tân Phú"):
        result = await search_units(s, query, limit=20)
        top = result.items[:exact]
        assert {i.name for i in top} == {"Xã Tân Phú"}, (query, names(result))
        # the Phường Tân Phú comes right after the communes: exact name, other kind
        assert result.items[exact].name == "Phường Tân Phú", names(result)
    assert codes(await search_units(s, "phuong tan phu"))[:1] == ["27031"]
    assert codes(await search_units(s, "p tan phu"))[:1] == ["27031"]
    for query in ("dac khu con dao", "dk con dao", "đặc khu Côn Đảo", "con dao"):
        assert codes(await search_units(s, query))[:1] == ["26732"], query


async def test_old_district_abbreviations(s: AsyncSession) -> None:
    for query in ("q1", "quan 1", "Q.1", "quận 1"):
        result = await search_units(s, query, include_defunct=True, limit=20)
        assert codes(result)[:1] == ["old-d-760"], (query, names(result))
        # then the old wards of District 1
        assert "old-w-26740" in codes(result)
    for query in ("tp thu dau mot", "TP. Thủ Dầu Một", "thanh pho thu dau mot"):
        result = await search_units(s, query, include_defunct=True)
        assert codes(result)[:2] == ["old-d-718", "25747"], (query, names(result))
    # without defunct units: District 1's wards are shown as the wards they became
    q1 = await search_units(s, "q1", limit=4)
    assert set(codes(q1)) <= {SAI_GON, BEN_THANH, "26734", "26758", "26737"}, names(q1)
    assert all(i.active and i.via_old_name and "Quận 1" in i.via_old_name for i in q1.items)


# --------------------------------------------------------------------------- province hints


async def test_province_hints_narrow(s: AsyncSession) -> None:
    everywhere = await search_units(s, "tan phu", limit=100)
    dong_nai = await search_units(s, "tan phu dong nai", limit=100)
    assert codes(dong_nai)[:1] == ["26116"], names(dong_nai)
    assert {i.province_name for i in dong_nai.items} == {"Đồng Nai"}
    assert dong_nai.total < everywhere.total
    for query in ("tân phú, đồng nai", "tan phu tinh dong nai", "xa tan phu dongnai"):
        assert codes(await search_units(s, query))[:1] == ["26116"], query
    hcm = await search_units(s, "tan phu hcm", limit=100)
    assert codes(hcm)[:1] == ["27031"] and {i.province_name for i in hcm.items} == {HCM}
    # the province_code argument narrows the same way
    assert codes(await search_units(s, "tan phu", province_code="75"))[:1] == ["26116"]


# --------------------------------------------------------------------------- old names


@pytest.mark.parametrize(
    "query", ["phường Bến Nghé, quận 1", "Bến Nghé", "ben nghe", "p. ben nghe q1",
              "ben nghe quan 1 tp hcm"],
)
async def test_old_name_finds_successor(s: AsyncSession, query: str) -> None:
    result = await search_units(s, query)
    top = result.items[0]
    assert (top.code, top.name, top.active) == (SAI_GON, "Phường Sài Gòn", True), names(result)
    assert top.via_old_name == "Phường Bến Nghé, Quận 1"
    assert all(i.active for i in result.items)

    old = await search_units(s, query, include_defunct=True)
    first = old.items[0]
    assert (first.code, first.active) == ("old-w-26740", False), names(old)
    assert (first.merged_into, first.merged_into_name) == (SAI_GON, "Phường Sài Gòn")
    assert first.via_old_name is None


async def test_old_names_with_old_places(s: AsyncSession) -> None:
    for query in ("Phường Phú Cường, Bình Dương", "phu cuong tp thu dau mot"):
        result = await search_units(s, query)
        assert codes(result)[:1] == ["25747"], (query, names(result))
        assert result.items[0].via_old_name == (
            "Phường Phú Cường, Thành phố Thủ Dầu Một, Tỉnh Bình Dương")
    assert codes(await search_units(s, "p1 q3"))[:1] == ["27160"]  # Phường 1, Quận 3 → Bàn Cờ
    # an old address naming a ward that kept its name gives the ward itself
    result = await search_units(s, "ben thanh quan 1")
    assert codes(result) == [BEN_THANH] and result.items[0].via_old_name


async def test_current_units_win_over_old_namesakes(s: AsyncSession) -> None:
    # many old wards were called An Phú too; the current An Phús are what is listed
    result = await search_units(s, "an phu", limit=100)
    assert result.items and all(i.active and i.via_old_name is None for i in result.items)
    mixed = await search_units(s, "ben thanh", include_defunct=True, limit=50)
    assert codes(mixed) == [BEN_THANH, "old-w-26743"]  # active before defunct


# --------------------------------------------------------------------------- ambiguity, pages


async def test_ambiguous_name_lists_all_exact_first(s: AsyncSession) -> None:
    exact = set(await s.scalars(select(Unit.code).where(
        Unit.name_folded.in_(["xa tan phu", "phuong tan phu"]), Unit.active)))
    assert len(exact) >= 6  # Tân Phú exists in many provinces
    items = await everything(s, "Tân Phú", page=4)
    assert {i.code for i in items[: len(exact)]} == exact
    assert len({i.province_code for i in items[: len(exact)]}) == len(exact)
    # then names containing both words (Tân Phú Đông, Phú Tân, Tân Phước …)
    rest = items[len(exact):]
    assert rest and all(i.active for i in items)
    assert rest[0].name in {"Xã Phú Tân", "Phường Phú Tân"}  # all words, other order
    assert (await search_units(s, "tan phu")).total == len(items)


@pytest.mark.parametrize(
    ("query", "kw"),
    [("Tân Phú", {}), ("tan", {"province_code": "79"}), ("thanh", {"include_defunct": True}),
     ("q1", {}), ("dak lak", {}), ("ben tanh", {"include_defunct": True})],
)
async def test_pagination_is_stable_and_complete(s: AsyncSession, query: str,
                                                 kw: dict[str, Any]) -> None:
    total = (await search_units(s, query, **kw)).total
    assert total > 0
    paged = await everything(s, query, page=7, **kw)
    assert len(paged) == total and len({i.code for i in paged}) == total  # no duplicates
    if total <= 100:
        whole = await search_units(s, query, limit=100, **kw)
        assert codes(whole) == [i.code for i in paged]  # pages are slices of one order
    again = await search_units(s, query, limit=7, offset=7, **kw)
    assert codes(again) == [i.code for i in paged[7:14]]
    beyond = await search_units(s, query, limit=7, offset=total + 5, **kw)
    assert beyond.items == [] and beyond.total == total


async def test_defunct_only_on_request(s: AsyncSession) -> None:
    for query in ("ben nghe", "q1", "thanh", "tan phu", "xa", "phuong 1", "thu duc"):
        result = await search_units(s, query, limit=100)
        assert all(i.active for i in result.items), query


# --------------------------------------------------------------------------- hostile input

HOSTILE = [
    "", "   ", "<b>", "</b><script>alert(1)</script>", "%", "_", "%%%", "\\", "'",
    "'; drop table units;--", "'; DROP TABLE units;--", "*)(uid=*", "*)(|(objectClass=*))",
    "x" * 5000, "ben thanh " * 500, "Phường " * 900, "\x00\x01\x02", "🙂🙂", "[a-z]+$",
    " ".join(str(i) for i in range(3000)), "a " * 2500, "((((((((((", "ben%thanh", "b_n thanh",
]


@pytest.mark.parametrize("query", HOSTILE)
async def test_hostile_queries_are_harmless(s: AsyncSession, query: str) -> None:
    before = await s.scalar(select(func.count()).select_from(Unit))
    for kw in ({}, {"include_defunct": True}, {"province_code": "79"}):
        result = await search_units(s, query, limit=1000, offset=-3, **kw)  # type: ignore[arg-type]
        assert len(result.items) <= 100 and result.total >= len(result.items)
    assert isinstance(await suggest_units(s, query), list)
    assert await s.scalar(select(func.count()).select_from(Unit)) == before
    if query.strip(" %_\\'()[]*") == "" or query in ("\x00\x01\x02", "🙂🙂"):
        assert (await search_units(s, query)).total == 0
    if query.startswith("ben thanh ") or query in ("ben%thanh",):
        assert codes(await search_units(s, query))[:1] == [BEN_THANH]


async def test_metacharacters_are_just_separators(s: AsyncSession) -> None:
    assert (await search_units(s, "'; drop table units;--")).total == 0
    assert (await search_units(s, "*)(uid=*")).total == 0
    b = await search_units(s, "<b>")  # the letter b: sane, short list
    assert all("b" in i.name.lower() for i in b.items)


async def test_non_string_query(s: AsyncSession) -> None:
    assert (await search_units(s, None)).total == 0  # type: ignore[arg-type]
    assert await suggest_units(s, 42) == []  # type: ignore[arg-type]


# --------------------------------------------------------------------------- suggestions


async def test_suggestions(s: AsyncSession) -> None:
    assert (await search_units(s, "ben thanh xyz")).total == 0
    assert codes_of(await suggest_units(s, "ben thanh xyz"))[:1] == [BEN_THANH]
    nghe = await suggest_units(s, "ben nhge")
    assert nghe[0].code == SAI_GON and nghe[0].via_old_name == "Phường Bến Nghé, Quận 1"
    assert all(i.active for i in nghe)
    lak = await suggest_units(s, "tan phu dong nia", limit=5)
    assert "26116" in codes_of(lak) and len(lak) == 5
    assert len(await suggest_units(s, "tan", limit=3)) == 3
    assert await suggest_units(s, "qqqq zzzz") == []


def codes_of(items: list[UnitItem]) -> list[str]:
    return [i.code for i in items]


# --------------------------------------------------------------------------- index freshness


def csv_bytes(rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerows(rows)
    return buf.getvalue().encode()


HEADER = ["code", "name", "kind", "province_code", "parent_code", "merged_into", "domain",
          "active"]


async def test_imported_unit_is_found_right_after(
    seeded_maker: async_sessionmaker[AsyncSession],
) -> None:
    async with seeded_maker() as s:
        assert (await search_units(s, "so khoa hoc va cong nghe")).total == 0  # index built
        report = await import_units(s, csv_bytes([
            HEADER, ["79-SKHCN", "Sở Khoa học và Công nghệ", "department", "79", "", "", "", ""],
        ]), "dv.csv", ACTOR)
        assert report.errors == [] and report.created == 1
        # the importing session sees its own unit before committing …
        assert codes(await search_units(s, "so khoa hoc"))[:1] == ["79-SKHCN"]
        await s.commit()
    async with seeded_maker() as s:  # … and everyone does after
        for query in ("so khoa hoc va cong nghe",  # asked (and remembered) before: not stale
                      "Sở Khoa học và Công nghệ", "so khoa hoc cong nghe",
                      "so khoa hoc va cong nghe ho chi minh", "79-SKHCN"):
            result = await search_units(s, query)
            assert codes(result)[:1] == ["79-SKHCN"], (query, names(result))
            assert result.items[0].province_name == HCM
        # a rename by a second import is seen too
        await import_units(s, csv_bytes([
            HEADER, ["79-SKHCN", "Sở Khoa học, Công nghệ và Đổi mới", "department", "79", "", "",
                     "", ""],
        ]), "dv.csv", ACTOR)
        await s.commit()
    async with seeded_maker() as s:
        assert codes(await search_units(s, "so khoa hoc doi moi"))[:1] == ["79-SKHCN"]


async def test_rolled_back_unit_is_forgotten(
    seeded_maker: async_sessionmaker[AsyncSession],
) -> None:
    async with seeded_maker() as s:
        s.add(Unit(code="79-TMP", name="Ban Thử Nghiệm Tạm", name_folded="ban thu nghiem tam",
                   kind="department", province_code="79"))
        await s.flush()
        assert codes(await search_units(s, "thu nghiem tam")) == ["79-TMP"]
        await s.rollback()
    async with seeded_maker() as s:
        assert (await search_units(s, "thu nghiem tam")).total == 0


# --------------------------------------------------------------------------- pure helpers


def test_words_expand_abbreviations() -> None:
    assert words("p ben thanh q1 tp hcm") == [
        "phuong", "ben", "thanh", "quan", "1", "thanh", "pho", "hcm"]
    assert words("tt x dk tx tphcm") == [
        "thi", "tran", "xa", "dac", "khu", "thi", "xa", "thanh", "pho", "hcm"]
    assert len(words("a " * 100)) == 12


def test_osa_distance() -> None:
    assert osa_distance("thnah", "thanh", 2) == 1  # transposition
    assert osa_distance("tanh", "thanh", 2) == 1
    assert osa_distance("bn", "ben", 2) == 1
    assert osa_distance("ben", "thanh", 2) == 3  # capped: cap + 1


def test_fold_short_and_long_texts_alike() -> None:
    """fold() remembers short texts and has an ASCII shortcut; every path gives one key."""
    from services.folding import _REMEMBERED_LEN, _fold, fold

    cases = {"Phường Bến Thành": "phuong ben thanh", "ĐẮK LẮK  ": "dak lak",
             "  ben   thnah ": "ben thnah", "Xã Đông Hòa, TP.HCM": "xa dong hoa tp hcm",
             "": "", "/unit": "unit", "Thừa Thiên–Huế": "thua thien hue"}
    for text, key in cases.items():
        assert fold(text) == key and fold(text) == key  # the second from memory
        assert not text or _fold(text) == key
        long = " ".join([text] * 40)  # past the remembered length: folded afresh
        assert len(long) > _REMEMBERED_LEN or not text
        assert fold(long) == " ".join([key] * 40).strip()
    assert fold(None) == ""
