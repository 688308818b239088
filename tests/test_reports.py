"""Status reports: XLSX export, bulk import (dry run, all or nothing), chart cache (both DBs)."""

from __future__ import annotations

import io
import time
import tomllib
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest
from jinja2 import Environment, meta
from openpyxl import Workbook, load_workbook
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import AuditLog, Stage, StatusHistory, UnitSystemStatus
from services import reports, status
from services.audit import Actor
from services.reports import (
    FILE_ERRORS,
    ROW_ERRORS,
    StatusImportError,
    error_text,
    export_status_xlsx,
    import_status_xlsx,
    progress_chart_png,
)
from services.status import SetStageOutcome, SystemInfo, set_stage
from tests.test_status import BEN_THANH, SAI_GON, XUAN_HUONG, add_people, all_codes, put

TODAY = date(2025, 7, 10)
LOCALES = Path(reports.__file__).with_name("locales")
OP = Actor("test:op")


def xlsx(rows: list[list[Any]], sheet: str = "status", extra: str | None = None) -> bytes:
    wb = Workbook()
    ws = wb.active
    assert ws is not None
    ws.title = sheet
    for r in rows:
        ws.append(r)
    if extra:
        wb.create_sheet(extra)
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()


HEADER = ["unit_code", "system_code", "stage", "note"]


async def stored(s: AsyncSession, unit: str, system: str) -> str | None:
    return await s.scalar(select(UnitSystemStatus.stage).where(
        UnitSystemStatus.unit_code == unit, UnitSystemStatus.system_code == system))


# ---------------------------------------------------------------------------------- export


async def test_export_hcmc(seeded_maker: async_sessionmaker[AsyncSession]) -> None:
    async with seeded_maker() as s:
        systems = await all_codes(s)
        await put(s, BEN_THANH, dict.fromkeys(systems, "live"))
        await put(s, SAI_GON, {"email": "surveyed"})
        await s.commit()
        data = await export_status_xlsx(s, province_code="79", today=TODAY)
        abbrs = [x.abbr for x in await status.load_systems(s)]
    wb = load_workbook(io.BytesIO(data))
    assert wb.sheetnames == ["summary", *abbrs]
    ws = wb["Email"]
    assert ws.freeze_panes == "A2" and ws.auto_filter.ref == "A1:K169"
    assert ws.max_row == 169 and ws["A1"].value == "Mã đơn vị"
    rows = {r[0].value: r for r in ws.iter_rows(min_row=2)}
    ok, late = rows[BEN_THANH], rows[SAI_GON]
    assert ok[3].value == "Vận hành chính thức" and ok[4].value == "live"
    assert ok[0].fill.patternType is None and ok[10].value is None
    assert isinstance(ok[5].value, datetime)  # updated at, Vietnam time
    assert late[4].value == "surveyed" and late[10].value == "Quá hạn"
    assert late[7].value.startswith("Tạo tài khoản thư điện tử")  # next: accounts by 10/6
    assert late[8].value.date() == date(2025, 6, 10) and late[9].value == -30
    assert all(c.fill.patternType == "solid" and c.fill.fgColor.rgb == reports.OVERDUE_FILL
               for c in late)
    summary = wb["summary"]
    table = {r[0]: r for r in summary.iter_rows(min_row=5, values_only=True)}
    assert table["Email"][2] == 168 and table["Email"][3 + 5] == 1  # one unit live
    assert table["Email"][10] == 168 - 1  # every unit but Bến Thành is late on email


async def test_export_national_is_fast(seeded_maker: async_sessionmaker[AsyncSession]) -> None:
    async with seeded_maker() as s:
        started = time.perf_counter()
        data = await export_status_xlsx(s, today=TODAY, lang="en")
        elapsed = time.perf_counter() - started
    wb = load_workbook(io.BytesIO(data), read_only=True)
    assert len(wb.sheetnames) == 11
    assert wb["QLVB"].max_row == 3321 + 1
    print(f"national export: {elapsed:.2f}s, {len(data) // 1024} KiB")
    assert elapsed < 10


async def test_export_import_round_trip(seeded_maker: async_sessionmaker[AsyncSession]) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        await put(s, XUAN_HUONG, {"qlvb": "trained", "email": "pilot"})
        data = await export_status_xlsx(s, province_code="68", today=TODAY,
                                        with_import_sheet=True)
        assert load_workbook(io.BytesIO(data), read_only=True).sheetnames[-1] == "status"
        report = await import_status_xlsx(s, data, "lam_dong.xlsx", OP, p["operator"])
        assert report.ok and not report.diff
        assert report.total_rows == report.unchanged == 124 * len(await all_codes(s))


def test_sheet_names_are_valid_and_unique() -> None:
    def sys(abbr: str, code: str = "x") -> SystemInfo:
        return SystemInfo(code, abbr, "n", "n", 0)

    names = reports.sheet_names([sys("QLVB"), sys("qlvb"), sys("a/b:c*?[d]"), sys("Summary"),
                                 sys("Y" * 40), sys("Y" * 40), sys("", "code"), sys("STATUS")])
    assert names[0] == "QLVB" and names[1] == "qlvb (2)" and names[2] == "a-b-c---d-"
    assert names[3] == "Summary (2)" and names[6] == "code" and names[7] == "STATUS (2)"
    assert all(len(n) <= 31 for n in names)
    assert len({n.lower() for n in names}) == len(names)


# ---------------------------------------------------------------------------------- import


async def test_import_dry_run_then_apply(seeded_maker: async_sessionmaker[AsyncSession]) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        await put(s, BEN_THANH, {"cong_ttdt": "live", "mang_tsl": "deployed"})
        await s.commit()
        data = xlsx([
            HEADER,
            [BEN_THANH, "qlvb", "Thí điểm", "đợt 1"],
            [int(BEN_THANH), "TTHC", "van hanh chinh thuc", None],  # abbr, no accents, number
            [SAI_GON, "Email", "deployed", None],
            [],  # blank rows are skipped, numbering stays as in the sheet
            [BEN_THANH, "cong_ttdt", "surveyed", "làm lại"],  # backwards
            [BEN_THANH, "mang_tsl", "Đã triển khai", None],  # unchanged
        ])
        op = p["operator"]
        report = await import_status_xlsx(s, data, "status.xlsx", OP, op)
        assert report.ok and report.dry_run and not report.applied
        assert report.total_rows == report.valid_rows == 5 and report.unchanged == 1
        assert [(d.row, d.unit_code, d.system_code, d.old_stage, d.new_stage, d.backwards)
                for d in report.diff] == [
            (2, BEN_THANH, "qlvb", Stage.not_started, Stage.pilot, False),
            (3, BEN_THANH, "tthc", Stage.not_started, Stage.live, False),
            (4, SAI_GON, "email", Stage.not_started, Stage.deployed, False),
            (6, BEN_THANH, "cong_ttdt", Stage.live, Stage.surveyed, True),
        ]
        assert report.backwards == 1 and report.diff[0].unit_name == "Phường Bến Thành"
        assert await stored(s, BEN_THANH, "qlvb") is None  # a dry run writes nothing

        report = await import_status_xlsx(s, data, "status.xlsx", OP, op, dry_run=False)
        assert report.applied and report.updated == 4 and len(report.diff) == 4
        await s.commit()
    async with seeded_maker() as s:
        assert await stored(s, BEN_THANH, "qlvb") == "pilot"
        assert await stored(s, BEN_THANH, "cong_ttdt") == "surveyed"
        assert await stored(s, SAI_GON, "email") == "deployed"
        hist = await status.history(s, BEN_THANH, "qlvb")
        assert len(hist) == 1 and hist[0].note == "đợt 1" and hist[0].actor_id == op.id
        assert await s.scalar(select(func.count()).select_from(StatusHistory)) == 4
        actions = list(await s.scalars(select(AuditLog.action)))
        assert actions.count("status.update") == 4 and actions.count("status.import") == 1


async def test_import_errors_apply_nothing(seeded_maker: async_sessionmaker[AsyncSession]) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        data = xlsx([
            ["Mã đơn vị", "Hệ thống", "Giai đoạn"],  # Vietnamese headers
            [BEN_THANH, "qlvb", "live"],  # valid, but the file has errors
            ["99999", "qlvb", "live"],
            [BEN_THANH, "email", "xong roi"],
            [BEN_THANH, "fax", "live"],
            [BEN_THANH, "QLVB", "pilot"],
            [SAI_GON, None, "live"],
            ["old-w-26734", "qlvb", "live"],  # an old ward, merged into Bến Thành
        ], sheet="Trạng thái")
        report = await import_status_xlsx(s, data, "x.xlsx", OP, p["operator"], dry_run=False)
        assert not report.applied and not report.ok
        got = [(e.row, e.code, e.column) for e in report.errors]
        assert got == [
            (3, "unknown_unit", "unit_code"),
            (4, "unknown_stage", "stage"),
            (5, "unknown_system", "system_code"),
            (6, "duplicate_row", None),
            (7, "required", "system_code"),
            (8, "inactive_unit", "unit_code"),
        ]
        assert report.errors[3].detail == {"first_row": 2}
        assert report.errors[5].detail["merged_into"] is not None
        assert report.error_rows == 6
        for e in report.errors:
            assert f"Dòng {e.row}" in error_text(e, "vi") and f"Row {e.row}" in error_text(e, "en")
        assert await stored(s, BEN_THANH, "qlvb") is None
        assert await s.scalar(select(func.count()).select_from(StatusHistory)) == 0

        # A unit admin may only bulk-update their own unit; officials not at all.
        own = xlsx([HEADER, [BEN_THANH, "qlvb", "pilot"], [SAI_GON, "qlvb", "pilot"]])
        report = await import_status_xlsx(s, own, "x.xlsx", OP, p["admin"], dry_run=False)
        assert [(e.row, e.code) for e in report.errors] == [(3, "forbidden_unit")]
        assert not report.applied
        with pytest.raises(StatusImportError) as exc:
            await import_status_xlsx(s, own, "x.xlsx", OP, p["official"])
        assert exc.value.code == "forbidden"


@pytest.mark.parametrize(("data", "code"), [
    (b"", "empty_file"),
    (b"unit_code,system_code,stage\n26743,qlvb,live\n", "bad_xlsx"),
    (b"PK\x03\x04 not really a zip", "bad_xlsx"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 100, "legacy_xls"),
])
async def test_import_broken_files(
    seeded_maker: async_sessionmaker[AsyncSession], data: bytes, code: str
) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        with pytest.raises(StatusImportError) as exc:
            await import_status_xlsx(s, data, "f.xlsx", OP, p["operator"])
        assert exc.value.code == code and exc.value.text("vi") and exc.value.text("en")


async def test_import_wrong_sheet_and_columns(
    seeded_maker: async_sessionmaker[AsyncSession],
) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        with pytest.raises(StatusImportError) as exc:
            await import_status_xlsx(s, xlsx([HEADER], sheet="Sheet1", extra="Data"), "f.xlsx",
                                     OP, p["operator"])
        assert exc.value.code == "wrong_sheet" and exc.value.detail["sheets"] == "Sheet1, Data"
        assert "Sheet1, Data" in exc.value.text("vi")
        with pytest.raises(StatusImportError) as exc:
            await import_status_xlsx(s, xlsx([["unit_code", "stage"], ["1", "2"]]), "f.xlsx",
                                     OP, p["operator"])
        assert exc.value.code == "missing_columns"
        with pytest.raises(StatusImportError) as exc:
            await import_status_xlsx(s, xlsx([HEADER]), "f.xlsx", OP, p["operator"])
        assert exc.value.code == "no_rows"


# ----------------------------------------------------------------------------------- chart


async def test_chart_rendered_once_per_change(
    seeded_maker: async_sessionmaker[AsyncSession],
) -> None:
    reports.clear_chart_cache()
    async with seeded_maker() as s:
        p = await add_people(s)
        await s.commit()
        before = reports.chart_renders()
        png = await progress_chart_png(s, province_code="79")
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and reports.chart_renders() == before + 1
        assert await progress_chart_png(s, province_code="79") == png
        assert reports.chart_renders() == before + 1  # cached
        r = await set_stage(s, BEN_THANH, "qlvb", "live", actor=OP, person=p["operator"])
        assert r.outcome is SetStageOutcome.updated
        await s.commit()
        again = await progress_chart_png(s, province_code="79")
        assert again.startswith(b"\x89PNG") and reports.chart_renders() == before + 2
        await progress_chart_png(s, province_code="68")  # another scope, its own entry
        assert reports.chart_renders() == before + 3
        await set_stage(s, XUAN_HUONG, "qlvb", "live", actor=OP, person=p["operator"])
        await progress_chart_png(s, province_code="79")  # unaffected by a Lâm Đồng change
        assert reports.chart_renders() == before + 3


# ----------------------------------------------------------------------------------- texts


def _toml(lang: str) -> dict[str, Any]:
    return tomllib.loads((LOCALES / lang / "status.toml").read_text(encoding="utf-8"))


@pytest.mark.parametrize("lang", ["vi", "en"])
def test_every_error_code_has_a_text(lang: str) -> None:
    texts = _toml(lang)
    errs, outcomes = texts["status"]["err"], texts["status"]["outcome"]
    assert set(errs) == set(ROW_ERRORS) | set(FILE_ERRORS)
    assert set(outcomes) == {o.value for o in SetStageOutcome}
    env = Environment()
    for code, detail in ROW_ERRORS.items():
        used = meta.find_undeclared_variables(env.parse(errs[code]))
        assert used <= {"row", "column", "value", *detail}, code
    for code, detail in FILE_ERRORS.items():
        used = meta.find_undeclared_variables(env.parse(errs[code]))
        assert used <= set(detail), code
    for code, tmpl in outcomes.items():
        assert meta.find_undeclared_variables(env.parse(tmpl)) <= {"unit", "system", "old",
                                                                   "new"}, code
    assert set(texts["stage"]) == {s.value for s in Stage}


def test_stage_labels_and_words() -> None:
    vi = _toml("vi")["stage"]
    assert vi == {"not_started": "Chưa bắt đầu", "surveyed": "Đã khảo sát", "pilot": "Thí điểm",
                  "deployed": "Đã triển khai", "trained": "Đã tập huấn",
                  "live": "Vận hành chính thức"}
    words = reports.stage_words()
    assert words["da trien khai"] is Stage.deployed and words["not started"] is Stage.not_started
    assert words["live official operation"] is Stage.live
    assert reports.stage_label("pilot", "en") == "Pilot"

