"""National register load, unit search, old-address resolution and sample data (both backends)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import aliased

from db.models import AuditLog, Base, ChatIdentity, Person, Province, Role, Unit
from db.session import make_engine, make_sessionmaker
from services.audit import Actor
from services.folding import clean_name, fold
from services.register import load_national_register
from services.sample import SAMPLE_PEOPLE, SampleDataError, load_sample_data
from services.units import get_unit, resolve_old_address, search_units

ACTOR = Actor.system("test")
NEW_UNITS = 3321
OLD_DISTRICTS = 696
OLD_WARDS = 10035
REGISTER_UNITS = NEW_UNITS + OLD_DISTRICTS + OLD_WARDS
GARBAGE = ["", "   ", "<b>", "*)(uid=*", "'; DROP TABLE units;--", "%", "_", "\\", "x" * 5000,
           "\x00\x01\x02", "🙂🙂", "Phường " * 900, "((((((((((", "[a-z]+$", "a " * 2500,
           " ".join(str(i) for i in range(3000))]


async def _fast_wipe(engine: AsyncEngine) -> None:
    """Empty every table without per-row foreign-key checks.

    ``units.parent_code`` has no index, so a plain DELETE of the 14k register units checks
    each row against the whole table (about 10 s on SQLite, 6 s on PostgreSQL).
    """
    async with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            await conn.exec_driver_sql("PRAGMA foreign_keys=OFF")  # outside a transaction
            for table in reversed(Base.metadata.sorted_tables):
                await conn.execute(delete(table))
            await conn.commit()
            await conn.exec_driver_sql("PRAGMA foreign_keys=ON")
        else:
            names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
            await conn.exec_driver_sql(f"TRUNCATE {names} CASCADE")
            await conn.commit()


@pytest.fixture(scope="module")
async def reg_engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """One engine per backend for this module; leaves the database empty for the next one."""
    engine = make_engine(db_url)
    yield engine
    await _fast_wipe(engine)
    await engine.dispose()


@pytest.fixture
async def empty(reg_engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    """A session on an empty database (fast wipe, unlike the shared ``session`` fixture)."""
    await _fast_wipe(reg_engine)
    async with make_sessionmaker(reg_engine)() as s:
        yield s


@pytest.fixture
async def reg(reg_engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    """A session on a database holding the register; loaded once per backend, not per test.

    Tests using it never commit (the session rolls back), so the next test finds it intact;
    if it is not there (another test emptied the database), it is loaded again.
    """
    maker = make_sessionmaker(reg_engine)
    async with maker() as s:
        n = await s.scalar(
            select(func.count()).select_from(Unit).where(Unit.source.like("vietnam%"))
        )
    if n != REGISTER_UNITS:
        await _fast_wipe(reg_engine)
        async with maker() as s:
            await load_national_register(s, ACTOR)
            await s.commit()
    async with maker() as s:
        yield s
        await s.rollback()


async def _count(session: AsyncSession, *where: object) -> int:
    stmt = select(func.count()).select_from(Unit).where(*where)  # type: ignore[arg-type]
    return int(await session.scalar(stmt) or 0)


# --------------------------------------------------------------------------- load


async def test_load_then_reload_is_idempotent(empty: AsyncSession) -> None:
    session = empty
    first = await load_national_register(session, ACTOR)
    await session.commit()
    counts = {k: (v.created, v.updated, v.unchanged) for k, v in first.by_kind.items()}
    assert counts == {
        "province": (34, 0, 0),
        "commune": (2621, 0, 0),
        "ward": (687, 0, 0),
        "special_zone": (13, 0, 0),
        "old_district": (OLD_DISTRICTS, 0, 0),
        "old_ward": (OLD_WARDS, 0, 0),
    }
    assert first.source.startswith("vietnam-provinces ")
    second = await load_national_register(session, ACTOR)
    await session.commit()
    assert (second.created, second.updated, second.deactivated) == (0, 0, 0)
    assert second.unchanged == 34 + REGISTER_UNITS
    assert second.seconds < first.seconds + 1
    print(f"\nregister load: first {first.seconds:.2f}s, second {second.seconds:.2f}s")
    assert await _count(session) == REGISTER_UNITS
    logged = (
        await session.scalars(select(AuditLog).where(AuditLog.action == "register.load"))
    ).all()
    assert len(logged) == 2 and logged[0].after and "by_kind" in logged[0].after


async def test_counts_codes_and_names(reg: AsyncSession) -> None:
    assert await reg.scalar(select(func.count()).select_from(Province)) == 34
    new = Unit.kind.in_(["ward", "commune", "special_zone"])
    assert await _count(reg, new, Unit.active.is_(True)) == NEW_UNITS
    assert await _count(reg, Unit.kind == "commune") == 2621
    assert await _count(reg, Unit.kind == "ward") == 687
    assert await _count(reg, Unit.kind == "special_zone") == 13
    hcmc = await reg.get(Province, "79")
    lam_dong = await reg.get(Province, "68")
    assert hcmc is not None and hcmc.name == "Thành phố Hồ Chí Minh"
    assert lam_dong is not None and lam_dong.name == "Lâm Đồng"
    assert await _count(reg, new, Unit.province_code == "79") == 168
    assert await _count(reg, new, Unit.province_code == "68") == 124

    for code, name in (await reg.execute(select(Province.code, Province.name))).all():
        assert re.fullmatch(r"\d{2}", code) and "  " not in name
    rows = (await reg.execute(select(Unit.code, Unit.name, Unit.name_folded, Unit.kind))).all()
    for code, name, folded, kind in rows:
        assert "  " not in name and name == clean_name(name) and folded == fold(name), code
        if kind in ("ward", "commune", "special_zone"):
            assert re.fullmatch(r"\d{5}", code), code
        else:
            assert re.fullmatch(r"old-w-\d{5}|old-d-\d{3}", code), code
    # the package's double space ('Xã  Bắc Đông Quan') is cleaned
    bdq = (await reg.scalars(select(Unit).where(Unit.name_folded == "xa bac dong quan"))).all()
    assert [u.name for u in bdq] == ["Xã Bắc Đông Quan"]

    ben_thanh = await get_unit(reg, "26743")
    assert ben_thanh is not None
    assert (ben_thanh.name, ben_thanh.kind, ben_thanh.province_code, ben_thanh.active) == (
        "Phường Bến Thành", "ward", "79", True,
    )
    assert await get_unit(reg, "nope") is None


async def test_old_units_point_to_new_units(reg: AsyncSession) -> None:
    ben_nghe = await get_unit(reg, "old-w-26740")
    assert ben_nghe is not None
    assert ben_nghe.name == "Phường Bến Nghé, Quận 1"
    assert (ben_nghe.kind, ben_nghe.active, ben_nghe.merged_into) == ("old_ward", False, "26740")
    assert ben_nghe.parent_code == "old-d-760" and ben_nghe.province_code == "79"
    phu_cuong = await get_unit(reg, "old-w-25747")
    assert phu_cuong is not None and phu_cuong.merged_into == "25747"
    assert phu_cuong.name == "Phường Phú Cường, Thành phố Thủ Dầu Một, Tỉnh Bình Dương"
    district = await get_unit(reg, "old-d-760")
    assert district is not None and district.name == "Quận 1" and district.merged_into is None
    con_dao = await get_unit(reg, "old-d-755")  # island district → special zone
    assert con_dao is not None and con_dao.merged_into == "26732"

    target = aliased(Unit)
    orphan = (
        select(func.count())
        .select_from(Unit)
        .outerjoin(target, target.code == Unit.merged_into)
        .where(Unit.kind == "old_ward")
        .where((target.code.is_(None)) | (target.active.is_(False)) | (target.kind == "old_ward"))
    )
    assert await reg.scalar(orphan) == 0
    assert await _count(reg, Unit.kind == "old_ward", Unit.province_code.is_(None)) == 0
    assert await _count(reg, Unit.kind.in_(["old_ward", "old_district"]), Unit.active) == 0


async def test_reload_repairs_changes_and_retires_vanished_units(reg: AsyncSession) -> None:
    ben_thanh = await reg.get(Unit, "26743")
    assert ben_thanh is not None
    ben_thanh.name = "Phường Bến Thành (sửa tay)"
    ben_thanh.domain = "benthanh.example.gov.vn"  # operators' columns are left alone
    reg.add(Unit(code="99999", name="Xã Đã Bỏ", name_folded="xa da bo", kind="commune",
                 province_code="79", active=True, source="vietnam-provinces 2025-07-01"))
    await reg.flush()
    stats = await load_national_register(reg, ACTOR)
    assert (stats.by_kind["ward"].updated, stats.created, stats.updated) == (1, 0, 1)
    assert stats.deactivated == 1
    reg.expire_all()
    fixed = await reg.get(Unit, "26743")
    gone = await reg.get(Unit, "99999")
    assert fixed is not None and fixed.name == "Phường Bến Thành"
    assert fixed.domain == "benthanh.example.gov.vn"
    assert gone is not None and gone.active is False


# --------------------------------------------------------------------------- search


@pytest.mark.parametrize(
    "query", ["ben thanh", "Bến Thành", "phuong ben  THANH", "P. Bến Thành", "p.ben thanh",
              "  bến   thành ", "BEN THANH", "26743"],
)
async def test_search_finds_ben_thanh_first(reg: AsyncSession, query: str) -> None:
    result = await search_units(reg, query)
    assert result.items and result.items[0].code == "26743", [i.name for i in result.items]
    top = result.items[0]
    assert (top.name, top.kind, top.province_name, top.active) == (
        "Phường Bến Thành", "ward", "Thành phố Hồ Chí Minh", True,
    )


async def test_search_options(reg: AsyncSession) -> None:
    assert (await search_units(reg, "thu dau mot")).items[0].code == "25747"
    assert (await search_units(reg, "đặc khu côn đảo")).items[0].code == "26732"
    assert (await search_units(reg, "dac khu con dao")).items[0].name == "Đặc khu Côn Đảo"

    # defunct units only on request; otherwise the unit they became, saying how it was found
    successor = (await search_units(reg, "ben nghe")).items[0]
    assert (successor.code, successor.via_old_name) == ("26740", "Phường Bến Nghé, Quận 1")
    old = await search_units(reg, "ben nghe quan 1", include_defunct=True)
    assert old.items[0].code == "old-w-26740" and old.items[0].active is False
    assert (old.items[0].merged_into, old.items[0].merged_into_name) == ("26740", "Phường Sài Gòn")
    mixed = await search_units(reg, "ben thanh", include_defunct=True, limit=50)
    assert mixed.items[0].code == "26743"
    assert any(not i.active for i in mixed.items)
    assert [i.active for i in mixed.items] == sorted((i.active for i in mixed.items), reverse=True)

    in_hcmc = await search_units(reg, "tan", province_code="79", limit=5)
    assert in_hcmc.total > 10 and all(i.province_name == "Thành phố Hồ Chí Minh"
                                      for i in in_hcmc.items)
    lengths = [len(i.name) for i in in_hcmc.items]
    assert lengths == sorted(lengths)
    page2 = await search_units(reg, "tan", province_code="79", limit=5, offset=5)
    assert page2.total == in_hcmc.total
    assert not {i.code for i in page2.items} & {i.code for i in in_hcmc.items}
    everywhere = await search_units(reg, "tan thanh", limit=100)
    assert everywhere.total > (await search_units(reg, "tan thanh", province_code="79")).total
    # all tokens must match; tokens match words from their start first
    assert all("an" in fold(i.name) and "phu" in fold(i.name)
               for i in (await search_units(reg, "an phu", limit=50)).items)
    assert (await search_units(reg, "zzzz qqq")).total == 0


@pytest.mark.parametrize("query", GARBAGE)
async def test_search_survives_garbage(reg: AsyncSession, query: str) -> None:
    result = await search_units(reg, query, include_defunct=True, limit=1000, offset=-5)
    assert len(result.items) <= 100 and result.total >= len(result.items)
    if query.strip() in ("", "%", "_", "\\", "🙂🙂", "((((((((((", "\x00\x01\x02"):
        assert result.total == 0  # LIKE wildcards are escaped, empty queries list nothing


# --------------------------------------------------------------------------- old addresses


@pytest.mark.parametrize(
    ("text", "code", "name"),
    [
        ("Phường Phú Cường, TP Thủ Dầu Một, Bình Dương", "25747", "Phường Thủ Dầu Một"),
        ("phường Bến Nghé, quận 1, TP Hồ Chí Minh", "26740", "Phường Sài Gòn"),
        ("12 Lê Lợi, P. Bến Nghé, Q.1, TP.HCM", "26740", "Phường Sài Gòn"),
        ("huyện Côn Đảo, Bà Rịa - Vũng Tàu", "26732", "Đặc khu Côn Đảo"),
    ],
)
def test_resolve_old_address(text: str, code: str, name: str) -> None:
    r = resolve_old_address(text)
    assert r is not None
    assert (r.new_ward_code, r.new_ward_name) == (code, name)
    assert r.new_province_code == "79" and r.new_province_name == "Thành phố Hồ Chí Minh"
    assert r.old_unit_code and r.old_unit_code.startswith("old-")
    assert r.old_description and r.new_name == name


def test_resolve_old_address_describes_the_old_unit() -> None:
    r = resolve_old_address("Phường Phú Cường, TP Thủ Dầu Một, Bình Dương")
    assert r is not None
    assert r.old_description == "Phường Phú Cường, Thành phố Thủ Dầu Một, Tỉnh Bình Dương"
    assert r.old_unit_code == "old-w-25747"


@pytest.mark.parametrize("text", [*GARBAGE, "Bình Dương", "Bến Nghé", None, 42])
def test_resolve_old_address_never_raises(text: object) -> None:
    assert resolve_old_address(text) is None  # type: ignore[arg-type]


# --------------------------------------------------------------------------- sample data


async def test_sample_needs_the_register(empty: AsyncSession) -> None:
    with pytest.raises(SampleDataError, match="load_national_register"):
        await load_sample_data(empty, ACTOR)


async def test_sample_data_is_labelled_and_idempotent(reg: AsyncSession) -> None:
    first = await load_sample_data(reg, ACTOR)
    assert first["people_created"] == len(SAMPLE_PEOPLE) == 8
    assert first["units_created"] >= 2
    again = await load_sample_data(reg, ACTOR)
    assert not any(again.values())
    people = (await reg.scalars(select(Person).order_by(Person.phone))).all()
    assert len(people) == 8
    assert all(p.is_sample and p.full_name.endswith(" (mẫu)") for p in people)
    assert {p.role for p in people} == {r.value for r in Role}
    assert {p.unit_code for p in people} >= {"26743", "26740", "25747", "79-TTCDS"}
    admins = {p.unit_code for p in people if p.role == "unit_admin"}
    assert admins == {"26743", "26740"}
    assert [p.phone for p in people] == [f"+8490000000{i}" for i in range(1, 9)]
    assert {p.telegram_id for p in SAMPLE_PEOPLE} == set(range(900001, 900009))
    dtc = await reg.get(Unit, "79-TTCDS")
    assert dtc is not None and dtc.source == "sample" and dtc.parent_code == "79-SKHCN"
    assert dtc.name == "Trung tâm Chuyển đổi số TP.HCM"
    # identities only on request
    assert await reg.scalar(select(func.count()).select_from(ChatIdentity)) == 0
    linked = await load_sample_data(reg, ACTOR, link_telegram=True)
    assert linked["identities_created"] == 8 and linked["people_created"] == 0
    found = await search_units(reg, "so khoa hoc va cong nghe")
    assert found.items[0].code == "79-SKHCN"
