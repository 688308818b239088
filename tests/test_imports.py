"""Staff and unit list imports: encodings, formats, validation, all-or-nothing, audit (both DBs)."""

from __future__ import annotations

import csv
import io
import random
import tomllib
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from jinja2 import Environment, meta
from openpyxl import Workbook
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import AuditLog, ChatIdentity, Person, Province, Unit, utcnow
from services import imports
from services.audit import Actor
from services.folding import fold
from services.imports import (
    FILE_ERRORS,
    ROW_ERRORS,
    ImportFileError,
    ImportReport,
    import_staff,
    import_units,
)

ACTOR = Actor.system("test:import")
LOCALES = Path(imports.__file__).with_name("locales")
STAFF_HEADER = ["full_name", "phone", "unit_code", "position", "email", "role"]
GOOD_STAFF = [
    ["Nguyễn Văn An", "0912 345 678", "26743", "Chuyên viên", "annv@hochiminhcity.gov.vn", ""],
    ["Trần Thị Bình", "+84 987.654.321", "26740", "Phó chủ tịch", "", "cán bộ"],
    ["Lê Hoàng Cường", "84901234567", "79-SKHCN", "Chuyên viên CNTT", "", "quản trị đơn vị"],
    ["Phạm Thị Dung", "0356789012", "79-SKHCN", "", "DUNG.PT@Example.COM", "hỗ trợ"],
    ["Võ Minh Em", "0868123456", "26743", "", "", "vận hành"],
]
TONES = {"\u0300", "\u0301", "\u0303", "\u0309", "\u0323"}


# --------------------------------------------------------------------------- helpers


async def seed(session: AsyncSession) -> None:
    """A tiny register: enough for imports, much faster than the national one."""
    session.add_all([
        Province(code="79", name="Thành phố Hồ Chí Minh", name_folded="thanh pho ho chi minh"),
        Province(code="68", name="Lâm Đồng", name_folded="lam dong"),
    ])
    await session.flush()
    session.add_all([
        Unit(code="26743", name="Phường Bến Thành", name_folded="phuong ben thanh", kind="ward",
             province_code="79", source="vietnam-provinces test"),
        Unit(code="26740", name="Phường Sài Gòn", name_folded="phuong sai gon", kind="ward",
             province_code="79", source="vietnam-provinces test"),
        Unit(code="00070", name="Phường Hoàn Kiếm", name_folded="phuong hoan kiem",
             kind="ward", province_code="79"),
        Unit(code="79-SKHCN", name="Sở Khoa học và Công nghệ TP.HCM",
             name_folded=fold("Sở Khoa học và Công nghệ TP.HCM"), kind="department",
             province_code="79"),
    ])
    await session.flush()
    session.add(Unit(code="old-w-26740", name="Phường Bến Nghé, Quận 1",
                     name_folded="phuong ben nghe quan 1", kind="old_ward", province_code="79",
                     merged_into="26740", active=False))
    await session.commit()


def csv_bytes(rows: list[list[Any]], *, delimiter: str = ",", encoding: str = "utf-8") -> bytes:
    buf = io.StringIO()
    csv.writer(buf, delimiter=delimiter, lineterminator="\r\n").writerows(rows)
    return buf.getvalue().encode(encoding)


def to_cp1258(text: str) -> bytes:
    """What old Vietnamese Excel writes: base letters precomposed, tone marks combining.

    Python's cp1258 codec cannot encode precomposed toned letters ("ễ"), nor fully decomposed
    text (no combining circumflex), so split each letter into base (NFC) + tone marks.
    """
    out = []
    for ch in text:
        decomposed = unicodedata.normalize("NFD", ch)
        base = unicodedata.normalize("NFC", "".join(c for c in decomposed if c not in TONES))
        out.append(base + "".join(c for c in decomposed if c in TONES))
    return "".join(out).encode("cp1258")


def xlsx_bytes(sheets: dict[str, list[list[Any]]]) -> bytes:
    wb = Workbook()
    assert wb.active is not None
    wb.remove(wb.active)
    for title, rows in sheets.items():
        ws = wb.create_sheet(title)
        for row in rows:
            ws.append(row)
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()


async def people(session: AsyncSession) -> dict[str, Person]:
    session.expire_all()
    return {p.phone or "": p for p in (await session.scalars(select(Person))).all()}


async def audit_rows(session: AsyncSession, action: str | None = None) -> list[AuditLog]:
    stmt = select(AuditLog).order_by(AuditLog.id)
    if action:
        stmt = stmt.where(AuditLog.action == action)
    return list((await session.scalars(stmt)).all())


def codes(report: ImportReport) -> list[tuple[int, str | None, str]]:
    return [(e.row, e.column, e.code) for e in report.errors]


async def file_error(coro: Any) -> ImportFileError:
    with pytest.raises(ImportFileError) as info:
        await coro
    exc = info.value
    assert exc.code in FILE_ERRORS and set(exc.detail) == set(FILE_ERRORS[exc.code])
    return exc


# --------------------------------------------------------------------------- staff: formats


async def test_good_csv_creates_people(session: AsyncSession) -> None:
    await seed(session)
    report = await import_staff(session, csv_bytes([STAFF_HEADER, *GOOD_STAFF]), "cb.csv", ACTOR)
    await session.commit()
    assert (report.kind, report.total_rows, report.valid_rows, report.errors) == ("staff", 5, 5, [])
    assert (report.created, report.updated, report.unchanged, report.applied) == (5, 0, 0, True)
    got = await people(session)
    an = got["+84912345678"]
    assert (an.full_name, an.name_folded, an.unit_code, an.role) == (
        "Nguyễn Văn An", "nguyen van an", "26743", "official",
    )
    assert an.email == "annv@hochiminhcity.gov.vn" and an.position == "Chuyên viên"
    assert an.verified_at is None and an.is_sample is False
    assert {p.phone: p.role for p in got.values()} == {
        "+84912345678": "official", "+84987654321": "official", "+84901234567": "unit_admin",
        "+84356789012": "support", "+84868123456": "dtc_admin",
    }
    assert got["+84356789012"].email == "dung.pt@example.com"


@pytest.mark.parametrize(
    ("label", "encode"),
    [
        ("bom", lambda rows: b"\xef\xbb\xbf" + csv_bytes(rows)),
        ("semicolon", lambda rows: csv_bytes(rows, delimiter=";")),
        ("tab", lambda rows: csv_bytes(rows, delimiter="\t")),
        ("utf16-bom", lambda rows: csv_bytes(rows, delimiter="\t", encoding="utf-16")),
        ("cp1258", lambda rows: to_cp1258(csv_bytes(rows).decode())),
        ("cp1258-semicolon", lambda rows: to_cp1258(csv_bytes(rows, delimiter=";").decode())),
        ("nfd", lambda rows: unicodedata.normalize("NFD", csv_bytes(rows).decode()).encode()),
    ],
)
async def test_csv_encodings_and_delimiters(session: AsyncSession, label: str, encode: Any) -> None:
    await seed(session)
    data = encode([STAFF_HEADER, *GOOD_STAFF])
    if label.startswith("cp1258"):
        with pytest.raises(UnicodeDecodeError):
            data.decode("utf-8")
    report = await import_staff(session, data, f"{label}.csv", ACTOR)
    assert report.errors == [] and report.created == 5, codes(report)
    got = await people(session)
    assert got["+84912345678"].full_name == "Nguyễn Văn An"  # NFC, whatever the input form
    assert got["+84987654321"].full_name == unicodedata.normalize("NFC", "Trần Thị Bình")
    assert got["+84901234567"].role == "unit_admin"


async def test_cp1258_single_name_roundtrip(session: AsyncSession) -> None:
    await seed(session)
    data = to_cp1258("Họ tên;Số điện thoại;Mã đơn vị\nNguyễn Văn An;0912345678;26743\n")
    report = await import_staff(session, data, "ansi.csv", ACTOR)
    assert report.created == 1
    assert (await people(session))["+84912345678"].full_name == "Nguyễn Văn An"


@pytest.mark.parametrize(
    "data",
    [
        "full_name,phone,unit_code\nNguyễn Văn An,0912345678,26743\n".encode("utf-16-le"),
        "full_name,phone,unit_code\nAn,0912345678,26743\n".encode("utf-16-be"),
        bytes(random.Random(7).randrange(256) for _ in range(3000)).replace(b"PK", b"pk"),
        b"\x00\x01\x02\x03" * 100,
        "full_name,phone,unit_code\n" "名前,0912345678,26743\n".encode("shift_jis") * 20,
    ],
    ids=["utf16le-nobom", "utf16be-nobom", "random", "nul", "shift-jis"],
)
async def test_unreadable_encoding_is_a_clear_error(session: AsyncSession, data: bytes) -> None:
    await seed(session)
    exc = await file_error(import_staff(session, data, "x.csv", ACTOR))
    assert exc.code == "bad_encoding"


async def test_file_level_errors(session: AsyncSession, monkeypatch: pytest.MonkeyPatch) -> None:
    await seed(session)
    run = lambda data, name="f.csv": import_staff(session, data, name, ACTOR)  # noqa: E731
    assert (await file_error(run(b""))).code == "empty_file"
    assert (await file_error(run(b"\r\n \n"))).code == "empty_file"
    assert (await file_error(run(csv_bytes([STAFF_HEADER])))).code == "no_rows"
    assert (await file_error(run(csv_bytes([STAFF_HEADER, [], []])))).code == "no_rows"
    missing = await file_error(run(csv_bytes([["full_name", "unit_code"], ["An", "26743"]])))
    assert missing.code == "missing_columns" and missing.detail["columns"] == "phone"
    assert "full_name" in missing.detail["found"]
    dup = await file_error(run(csv_bytes([["Họ tên", "full_name", "phone", "unit_code"]])))
    assert dup.code == "duplicate_columns" and dup.detail["columns"] == "full_name"
    big = await file_error(run(b"a" * (imports.MAX_BYTES + 1)))
    assert big.code == "too_large" and big.detail == {"max_mb": 10}
    monkeypatch.setattr(imports, "MAX_ROWS", 3)
    rows = [[f"Người {i}", f"091234567{i}", "26743"] for i in range(4)]
    many = await file_error(run(csv_bytes([["full_name", "phone", "unit_code"], *rows])))
    assert many.code == "too_many_rows" and many.detail == {"max_rows": 3}
    unclosed = b'full_name,phone,unit_code\n"An,0912345678,26743\n' + b"x" * 140000
    broken = await file_error(run(unclosed))
    assert broken.code == "bad_csv"
    assert await session.scalar(select(func.count()).select_from(Person)) == 0


@pytest.mark.parametrize(
    ("data", "name", "code"),
    [
        (b"PK\x03\x04garbage", "list.xlsx", "bad_xlsx"),
        (b"full_name,phone\nAn,0912345678\n", "renamed.xlsx", "bad_xlsx"),
        (b"PK\x03\x04garbage", "list.csv", "bad_xlsx"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 500, "old.xls", "legacy_xls"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 500, "protected.xlsx", "legacy_xls"),
    ],
)
async def test_broken_spreadsheets(
    session: AsyncSession, data: bytes, name: str, code: str
) -> None:
    await seed(session)
    assert (await file_error(import_staff(session, data, name, ACTOR))).code == code


async def test_zip_that_is_not_a_workbook(session: AsyncSession) -> None:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("hello.txt", "not a workbook")
    await seed(session)
    exc = await file_error(import_staff(session, buf.getvalue(), "x.xlsx", ACTOR))
    assert exc.code == "bad_xlsx"


async def test_xlsx_that_unpacks_too_big(
    session: AsyncSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    await seed(session)
    monkeypatch.setattr(imports, "MAX_UNPACKED", 1000)
    data = xlsx_bytes({"can_bo": [STAFF_HEADER, *GOOD_STAFF]})
    assert (await file_error(import_staff(session, data, "bomb.xlsx", ACTOR))).code == "too_large"


async def test_good_xlsx_with_numbers_as_cells(session: AsyncSession) -> None:
    await seed(session)
    data = xlsx_bytes({"Sheet1": [
        STAFF_HEADER,
        ["Nguyễn Văn An", 912345678, 26743, "Chuyên viên", None, None],  # Excel dropped the 0
        ["Trần Thị Bình", 84987654321, "26740", None, None, "official"],
        ["Hoàng Kiếm", 912000111.0, 70, None, None, None],  # ward code 00070 lost its zeros
    ]})
    report = await import_staff(session, data, "staff.xlsx", ACTOR)
    assert report.errors == [] and report.created == 3, codes(report)
    got = await people(session)
    assert got["+84912345678"].unit_code == "26743"
    assert got["+84987654321"].unit_code == "26740"
    assert got["+84912000111"].unit_code == "00070"


async def test_xlsx_vietnamese_headers_title_row_and_row_numbers(session: AsyncSession) -> None:
    await seed(session)
    data = xlsx_bytes({"Danh sách": [
        ["DANH SÁCH CÁN BỘ PHƯỜNG BẾN THÀNH"],
        ["STT", "Họ và tên", "Số điện thoại", "Mã đơn vị", "Chức vụ", "Vai trò", "Ghi chú"],
        [1, "Nguyễn Văn An", "0912345678", "26743", "Chủ tịch", "Cán bộ", "x"],
        [2, "Trần Thị Bình", "12345", "26743", None, None, None],
        [],
        [4, "Lê Văn Cường", "0987654321", "99999", None, "quản trị", None],
    ]})
    report = await import_staff(session, data, "ds.xlsx", ACTOR)
    assert codes(report) == [(4, "phone", "bad_phone"), (6, "unit_code", "unknown_unit")]
    assert report.errors[0].value == "12345" and report.errors[1].value == "99999"
    assert (report.total_rows, report.valid_rows, report.applied) == (3, 1, False)
    assert report.ignored_columns == ["STT", "Ghi chú"]


async def test_xlsx_sheet_choice(session: AsyncSession) -> None:
    await seed(session)
    rows = [["ho_ten", "so_dien_thoai", "ma_don_vi"], ["Nguyễn Văn An", "0912345678", "26743"]]
    # the sheet named for the kind wins over the first sheet
    data = xlsx_bytes({"Hướng dẫn": [["Điền danh sách ở trang can_bo"]], "can_bo": rows})
    assert (await import_staff(session, data, "a.xlsx", ACTOR, dry_run=True)).created == 1
    # a workbook holding only the other kind's sheet is refused, naming the sheets
    units_only = xlsx_bytes({"don_vi": [["code", "name", "kind"], ["X1", "Ban X", "sở"]]})
    exc = await file_error(import_staff(session, units_only, "b.xlsx", ACTOR))
    assert exc.code == "wrong_sheet" and exc.detail["sheets"] == "don_vi"
    # and the other way round the same workbook is fine
    report = await import_units(session, units_only, "b.xlsx", ACTOR, dry_run=True)
    assert report.created == 1 and report.errors == []


# --------------------------------------------------------------------------- staff: rows


async def test_row_errors_and_nothing_applied(session: AsyncSession) -> None:
    await seed(session)
    rows = [
        STAFF_HEADER,
        ["Nguyễn Văn An", "0912345678", "26743", "", "", ""],           # 2 ok
        ["", "0912000001", "26743", "", "", ""],                         # 3 name required
        ["Trần Bình", "+84 912 345 678", "26743", "", "", ""],          # 4 duplicate of row 2
        ["Lê Cường", "12ab", "26743", "", "", ""],                       # 5 bad phone
        ["Phạm Dung", "0912000002", "99999", "", "", ""],                # 6 unknown unit
        ["Võ Em", "0912000003", "old-w-26740", "", "", ""],              # 7 defunct unit
        ["Đỗ Giang", "0912000004", "26743", "", "not-an-email", ""],     # 8 bad email
        ["Hồ Hải", "0912000005", "26743", "", "", "president"],          # 9 bad role
        ["Ngô\x07Khánh", "0912000006", "26743", "", "", ""],             # 10 control char
        ["X" * 201, "0912000007", "26743", "", "", ""],                  # 11 too long
        ["Mai Lan", "", "", "", "a@b.vn", ""],                           # 12 phone+unit req.
        ["Phan Minh", "0912000008", "26743", "", "", ""],                # 13 ok
    ]
    report = await import_staff(session, csv_bytes(rows), "bad.csv", ACTOR)
    assert codes(report) == [
        (3, "full_name", "required"),
        (4, "phone", "duplicate_phone"),
        (5, "phone", "bad_phone"),
        (6, "unit_code", "unknown_unit"),
        (7, "unit_code", "inactive_unit"),
        (8, "email", "bad_email"),
        (9, "role", "bad_role"),
        (10, "full_name", "control_chars"),
        (11, "full_name", "too_long"),
        (12, "phone", "required"),
        (12, "unit_code", "required"),
    ]
    by_row = {e.row: e for e in report.errors}
    assert by_row[4].detail == {"first_row": 2}
    assert by_row[7].detail == {"merged_into": "26740"}
    assert by_row[11].detail == {"max": 200}
    assert "dtc_admin" in by_row[9].detail["allowed"]
    for e in report.errors:
        assert set(e.detail) == set(ROW_ERRORS[e.code])
    assert (report.total_rows, report.valid_rows, report.error_rows) == (12, 2, 10)
    assert (report.created, report.applied) == (2, False)
    await session.commit()
    assert await people(session) == {}
    assert await audit_rows(session) == []

    skipped = await import_staff(session, csv_bytes(rows), "bad.csv", ACTOR, skip_invalid=True)
    await session.commit()
    assert skipped.applied and skipped.created == 2 and len(skipped.errors) == 11
    assert set(await people(session)) == {"+84912345678", "+84912000008"}


async def test_dry_run_writes_nothing(session: AsyncSession) -> None:
    await seed(session)
    report = await import_staff(session, csv_bytes([STAFF_HEADER, *GOOD_STAFF]), "a.csv", ACTOR,
                                dry_run=True)
    assert (report.created, report.applied, report.dry_run) == (5, False, True)
    await session.commit()
    assert await people(session) == {}
    assert await audit_rows(session) == []


async def test_reimport_is_idempotent_and_updates_keep_identity(session: AsyncSession) -> None:
    await seed(session)
    data = csv_bytes([STAFF_HEADER, *GOOD_STAFF])
    await import_staff(session, data, "a.csv", ACTOR)
    await session.commit()
    # a verified person with a chat identity, then the same list again
    an = (await people(session))["+84912345678"]
    verified = utcnow()
    an.verified_at = verified
    session.add(ChatIdentity(channel="telegram", external_id="555", person_id=an.id))
    await session.commit()
    again = await import_staff(session, data, "a.csv", ACTOR)
    await session.commit()
    assert (again.created, again.updated, again.unchanged, again.applied) == (0, 0, 5, True)
    assert len(await people(session)) == 5

    # a list without role/email columns: changes the name and unit, keeps role and email
    changed = csv_bytes([
        ["Họ tên", "Điện thoại", "Mã đơn vị", "Chức vụ"],
        ["Nguyễn Văn Ân", "0912345678", "26740", "Trưởng phòng"],
        ["Lê Hoàng Cường", "0901234567", "79-SKHCN", "Chuyên viên CNTT"],
    ])
    upd = await import_staff(session, changed, "b.csv", ACTOR)
    await session.commit()
    assert (upd.created, upd.updated, upd.unchanged) == (0, 1, 1)
    got = await people(session)
    an2 = got["+84912345678"]
    assert (an2.id, an2.full_name, an2.unit_code, an2.position) == (
        an.id, "Nguyễn Văn Ân", "26740", "Trưởng phòng",
    )
    assert an2.email == "annv@hochiminhcity.gov.vn" and an2.role == "official"
    assert an2.verified_at == verified
    ident = (await session.scalars(select(ChatIdentity))).one()
    assert ident.person_id == an.id
    assert got["+84901234567"].role == "unit_admin"  # blank role never demotes

    update_audit = await audit_rows(session, "import.staff.update")
    assert len(update_audit) == 1 and update_audit[0].object_id == str(an.id)
    assert update_audit[0].before == {
        "full_name": "Nguyễn Văn An", "unit_code": "26743", "position": "Chuyên viên",
    }
    assert update_audit[0].after == {
        "full_name": "Nguyễn Văn Ân", "unit_code": "26740", "position": "Trưởng phòng",
    }


async def test_metacharacter_names_are_stored_literally(session: AsyncSession) -> None:
    await seed(session)
    names = [
        "<b>Lê & Sơn</b>",
        "'; DROP TABLE people;--",
        "*)(uid=*",
        'Robert"); DELETE FROM units; --',
        "{{ 7*7 }} {% raw %}",
        "Ngô \\N %s %(x)s ${jndi:ldap://x}",
        "=HYPERLINK(\"http://x\")",
    ]
    rows = [["full_name", "phone", "unit_code", "position"]]
    rows += [[n, f"09120000{i:02d}", "26743", n] for i, n in enumerate(names)]
    report = await import_staff(session, csv_bytes(rows), "meta.csv", ACTOR)
    await session.commit()
    assert report.errors == [] and report.created == len(names)
    got = await people(session)
    stored = {p.full_name for p in got.values()}
    assert stored == set(names)
    assert {p.position for p in got.values()} == set(names)
    assert await session.scalar(select(func.count()).select_from(Unit)) == 5  # still there


async def test_audit_rows(session: AsyncSession) -> None:
    await seed(session)
    actor = Actor(label="telegram:42")
    await import_staff(session, csv_bytes([STAFF_HEADER, *GOOD_STAFF]), "ds-cb.csv", actor)
    await session.commit()
    summary = await audit_rows(session, "import.staff")
    assert len(summary) == 1
    assert summary[0].actor == "telegram:42" and summary[0].object_id == "ds-cb.csv"
    assert summary[0].after is not None
    assert summary[0].after["filename"] == "ds-cb.csv"
    assert (summary[0].after["created"], summary[0].after["total_rows"]) == (5, 5)
    ids = {str(p.id) for p in (await people(session)).values()}
    created = await audit_rows(session, "import.staff.create")
    assert {a.object_id for a in created} == ids and len(created) == 5
    assert all(a.before is None and a.after and a.object_type == "person" for a in created)
    assert created[0].after is not None and created[0].after["phone"].startswith("+84")


async def test_names_split_into_family_and_given(session: AsyncSession) -> None:
    await seed(session)
    data = csv_bytes([["Họ đệm", "Tên", "SĐT", "Mã ĐV"],
                      ["Nguyễn Văn", "An", "0912345678", "26743"]])
    report = await import_staff(session, data, "split.csv", ACTOR)
    assert report.created == 1
    assert (await people(session))["+84912345678"].full_name == "Nguyễn Văn An"


async def test_lone_name_column(session: AsyncSession) -> None:
    await seed(session)
    data = csv_bytes([["Tên", "SĐT", "Mã ĐV"], ["Nguyễn Văn An", "0912345678", "26743"]])
    assert (await import_staff(session, data, "ten.csv", ACTOR)).created == 1
    assert (await people(session))["+84912345678"].full_name == "Nguyễn Văn An"


# --------------------------------------------------------------------------- units

UNIT_HEADER = ["code", "name", "kind", "province_code", "parent_code", "merged_into", "domain",
               "active"]


async def test_units_import_with_references_in_any_order(session: AsyncSession) -> None:
    await seed(session)
    rows = [
        UNIT_HEADER,
        # the child comes before its parent: written parents first anyway
        ["79-TTCDS", "Trung tâm Chuyển đổi số TP.HCM", "Sở", "79", "79-SNV", "", "", ""],
        ["79-SNV", "Sở Nội vụ TP.HCM", "department", "79", "", "",
         "https://snv.hochiminhcity.gov.vn/", "có"],
        ["79-DU", "Đảng ủy phường Bến Thành", "Đảng ủy", "79", "26743", "", "", "1"],
        ["79-OLD", "Ban cũ", "ban", "79", "", "79-SNV", "", "không"],
        ["LD-01", "Văn phòng UBND tỉnh Lâm Đồng", "province_office", "68", "", "", "", ""],
    ]
    report = await import_units(session, csv_bytes(rows), "dv.csv", ACTOR)
    await session.commit()
    assert report.errors == [] and (report.created, report.applied) == (5, True), codes(report)
    session.expire_all()
    dtc = await session.get(Unit, "79-TTCDS")
    snv = await session.get(Unit, "79-SNV")
    old = await session.get(Unit, "79-OLD")
    du = await session.get(Unit, "79-DU")
    assert dtc is not None and snv is not None and old is not None and du is not None
    assert (dtc.kind, dtc.parent_code, dtc.province_code, dtc.active) == (
        "department", "79-SNV", "79", True,
    )
    assert dtc.name_folded == "trung tam chuyen doi so tp hcm" and dtc.source == "import"
    assert snv.domain == "snv.hochiminhcity.gov.vn"
    assert (old.active, old.merged_into) == (False, "79-SNV")
    assert (du.kind, du.parent_code) == ("party_office", "26743")

    again = await import_units(session, csv_bytes(rows), "dv.csv", ACTOR)
    await session.commit()
    assert (again.created, again.updated, again.unchanged) == (0, 0, 5)
    assert len(await audit_rows(session, "import.units.create")) == 5
    assert len(await audit_rows(session, "import.units")) == 2


async def test_units_update_national_ward_domain_only(session: AsyncSession) -> None:
    await seed(session)
    data = csv_bytes([["Mã", "Tên đơn vị", "Loại", "Tên miền"],
                      ["26743", "", "", "phuongbenthanh.hochiminhcity.gov.vn"]])
    report = await import_units(session, data, "domains.csv", ACTOR)
    await session.commit()
    assert (report.updated, report.created, report.errors) == (1, 0, [])
    session.expire_all()
    ward = await session.get(Unit, "26743")
    assert ward is not None
    assert (ward.name, ward.kind, ward.domain) == (
        "Phường Bến Thành", "ward", "phuongbenthanh.hochiminhcity.gov.vn",
    )
    assert ward.source == "vietnam-provinces test"
    log = await audit_rows(session, "import.units.update")
    assert log[0].before == {"domain": None}
    assert log[0].after == {"domain": "phuongbenthanh.hochiminhcity.gov.vn"}


async def test_units_row_errors(session: AsyncSession) -> None:
    await seed(session)
    rows = [
        UNIT_HEADER,
        ["A 1", "Tên", "sở", "79", "", "", "", ""],                   # 2 bad code
        ["old-w-1", "Tên", "sở", "79", "", "", "", ""],               # 3 reserved
        ["X1", "Ban X", "sở", "79", "", "", "", ""],                  # 4 ok
        ["x1", "Ban X lặp", "sở", "79", "", "", "", ""],              # 5 duplicate of 4
        ["X2", "Ban 2", "hợp tác xã", "79", "", "", "", ""],          # 6 bad kind
        ["X3", "Ban 3", "sở", "63", "", "", "", ""],                  # 7 unknown province
        ["X4", "Ban 4", "sở", "79", "NOPE", "", "", ""],              # 8 unknown parent
        ["X5", "Ban 5", "sở", "79", "", "NOPE", "", ""],              # 9 unknown merged_into
        ["X6", "Ban 6", "sở", "79", "", "", "", "maybe"],             # 10 bad bool
        ["X7", "Ban 7", "sở", "79", "", "", "not a host", ""],        # 11 bad domain
        ["X8", "Ban 8", "sở", "79", "X8", "", "", ""],                # 12 self reference
        ["X9", "Ban 9", "sở", "79", "X10", "", "", ""],               # 13 cycle
        ["X10", "Ban 10", "sở", "79", "X9", "", "", ""],              # 14 cycle
        ["X11", "", "", "79", "", "", "", ""],                        # 15 new: name, kind
        ["X12", "Ban 12", "sở", "79", "X7", "", "", ""],              # 16 parent row invalid
        ["X13", "Ban 13", "sở", "79", "X1", "", "", ""],              # 17 ok (parent row 4)
    ]
    report = await import_units(session, csv_bytes(rows), "bad.csv", ACTOR)
    assert codes(report) == [
        (2, "code", "bad_code"),
        (3, "code", "reserved_code"),
        (5, "code", "duplicate_code"),
        (6, "kind", "bad_kind"),
        (7, "province_code", "unknown_province"),
        (8, "parent_code", "unknown_parent"),
        (9, "merged_into", "unknown_merged_into"),
        (10, "active", "bad_bool"),
        (11, "domain", "bad_domain"),
        (12, "parent_code", "self_reference"),
        (13, "parent_code", "reference_cycle"),
        (14, "parent_code", "reference_cycle"),
        (15, "name", "required"),
        (15, "kind", "required"),
        (16, "parent_code", "ref_row_invalid"),
    ]
    by_row = {e.row: e for e in report.errors}
    assert by_row[5].detail == {"first_row": 4} and by_row[16].detail == {"ref_row": 11}
    for e in report.errors:
        assert set(e.detail) == set(ROW_ERRORS[e.code])
    assert (report.valid_rows, report.applied) == (2, False)
    await session.commit()
    assert await session.get(Unit, "X1") is None

    applied = await import_units(session, csv_bytes(rows), "bad.csv", ACTOR, skip_invalid=True)
    await session.commit()
    assert applied.applied and applied.created == 2
    session.expire_all()
    x13 = await session.get(Unit, "X13")
    assert x13 is not None and x13.parent_code == "X1"


async def test_units_then_staff_in_one_transaction(session: AsyncSession) -> None:
    """Staff may name a unit created by an earlier import in the same (uncommitted) session."""
    await seed(session)
    await import_units(session, csv_bytes([UNIT_HEADER[:3], ["79-STC", "Sở Tài chính", "sở"]]),
                       "u.csv", ACTOR)
    report = await import_staff(session, csv_bytes([STAFF_HEADER[:3],
                                                    ["Ngô Lan", "0912345678", "79-stc"]]),
                                "s.csv", ACTOR)
    await session.commit()
    assert report.errors == [] and report.created == 1
    assert (await people(session))["+84912345678"].unit_code == "79-STC"


# --------------------------------------------------------------------------- texts


def _catalog(lang: str) -> dict[str, Any]:
    with (LOCALES / lang / "imports.toml").open("rb") as fh:
        return tomllib.load(fh)["import"]


@pytest.mark.parametrize("lang", ["vi", "en"])
def test_every_error_code_has_a_text(lang: str) -> None:
    table = _catalog(lang)
    env = Environment(autoescape=True)
    for section, spec, extra in (("err", ROW_ERRORS, {"value", "column"}),
                                 ("file_err", FILE_ERRORS, set())):
        texts = table[section]
        assert set(texts) == set(spec), (lang, section)
        for code, keys in spec.items():
            used = meta.find_undeclared_variables(env.parse(texts[code]))
            assert used <= set(keys) | extra, (lang, code, used)
            assert set(keys) <= used, (lang, code, "detail not shown")
            rendered = env.from_string(texts[code]).render(
                value="<b>x</b>", column="phone", **{k: "1" for k in keys}
            )
            assert rendered and "&lt;b&gt;" in rendered if "value" in used else rendered


def test_vietnamese_texts_are_vietnamese() -> None:
    vi = _catalog("vi")
    assert "Mã đơn vị" in vi["err"]["unknown_unit"]
    assert vi["err"] != _catalog("en")["err"]
