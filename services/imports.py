"""Import unit lists and staff lists from the CSV/XLSX files provinces actually send.

Why so lenient on input: lists come from many offices' Excel, in UTF-8 or the old Windows-1258
code page, with Vietnamese or English headers, comma/semicolon/tab separated, sometimes with a
title row above the header. Why so strict on content: the staff list is what verifies a
person's phone, so every row is checked and, unless the operator asks to skip invalid rows,
one bad row means nothing is written.

Rules worth knowing:

- Rows are numbered as the user sees them in the sheet (the header is usually row 1).
- A blank optional cell never erases stored data: it keeps the stored value (new rows get the
  default). Re-importing a file is therefore idempotent, and a list without roles does not
  demote unit admins.
- Staff are matched by normalized phone, units by code. Staff rows never touch chat
  identities or ``verified_at``.
- Error codes are stable strings; their texts live in ``locales/*/imports.toml`` under
  ``import.err`` (row errors, rendered with ``value``, ``column`` and the detail keys) and
  ``import.file_err`` (file errors, rendered with the detail keys only).
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import unicodedata
import zipfile
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain
from pathlib import PurePath
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import AuditLog, Person, Province, Role, Unit, UnitKind, utcnow
from services.audit import Actor, audit
from services.folding import clean_name, fold
from services.phones import PhoneError, normalize_phone
from services.register import OLD_PREFIX, upsert_rows

MAX_BYTES = 10 * 1024 * 1024
MAX_UNPACKED = 300 * 1024 * 1024  # XLSX is zipped XML; 50,000 rows unpack to far less
MAX_ROWS = 50_000
MAX_COLS = 60
HEADER_SCAN_ROWS = 10
VALUE_CHARS = 200

STAFF = "staff"
UNITS = "units"

# Row error code → detail keys it always carries (besides value and column).
ROW_ERRORS: dict[str, tuple[str, ...]] = {
    "required": (),
    "too_long": ("max",),
    "control_chars": (),
    "bad_phone": (),
    "duplicate_phone": ("first_row",),
    "unknown_unit": (),
    "inactive_unit": ("merged_into",),
    "bad_email": (),
    "bad_role": ("allowed",),
    "bad_code": (),
    "reserved_code": (),
    "duplicate_code": ("first_row",),
    "bad_kind": ("allowed",),
    "unknown_province": (),
    "unknown_parent": (),
    "unknown_merged_into": (),
    "self_reference": (),
    "reference_cycle": (),
    "ref_row_invalid": ("ref_row",),
    "bad_bool": (),
    "bad_domain": (),
}
# File error code → detail keys it always carries.
FILE_ERRORS: dict[str, tuple[str, ...]] = {
    "too_large": ("max_mb",),
    "empty_file": (),
    "no_rows": (),
    "too_many_rows": ("max_rows",),
    "bad_encoding": (),
    "bad_csv": ("line",),
    "bad_xlsx": (),
    "legacy_xls": (),
    "wrong_sheet": ("sheets", "expected"),
    "missing_columns": ("columns", "found"),
    "duplicate_columns": ("columns",),
}


class ImportFileError(Exception):
    """The file as a whole cannot be read; ``code`` names the reason, ``detail`` its data."""

    def __init__(self, code: str, **detail: Any) -> None:
        super().__init__(code)
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.code} {self.detail}" if self.detail else self.code


@dataclass
class RowError:
    row: int
    column: str | None
    code: str
    value: str | None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImportReport:
    kind: str
    filename: str
    total_rows: int
    valid_rows: int
    errors: list[RowError]
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    applied: bool = False
    dry_run: bool = False
    ignored_columns: list[str] = field(default_factory=list)

    @property
    def error_rows(self) -> int:
        return len({e.row for e in self.errors})


# --------------------------------------------------------------------------- headers

@lru_cache(maxsize=4096)
def _key(text: str) -> str:
    """Header/sheet/enum key: folded, with _ and - as spaces ("Họ_Tên" → "ho ten")."""
    return " ".join(fold(text.replace("_", " ").replace("-", " ")).split())


_STAFF_ALIASES: dict[str, tuple[str, ...]] = {
    "full_name": ("full name", "fullname", "name", "ho ten", "ho va ten", "ho ten can bo",
                  "ten can bo", "ho va ten can bo"),
    "phone": ("phone", "phone number", "mobile", "so dien thoai", "dien thoai", "sdt", "so dt",
              "dt", "di dong", "so di dong"),
    "unit_code": ("unit code", "unit", "ma don vi", "ma dv", "don vi ma", "ma co quan"),
    "position": ("position", "title", "job title", "chuc vu", "chuc danh"),
    "email": ("email", "e mail", "mail", "thu dien tu", "dia chi email", "dia chi thu dien tu"),
    "role": ("role", "vai tro", "quyen"),
    # a family/given name split, joined into full_name when no full-name column exists
    "_family": ("ho", "ho dem", "ho va ten dem", "ho va dem", "family name", "last name"),
    "_given": ("ten", "given name", "first name"),
}
_UNIT_ALIASES: dict[str, tuple[str, ...]] = {
    "code": ("code", "unit code", "ma", "ma don vi", "ma dv", "ma co quan"),
    "name": ("name", "unit name", "ten", "ten don vi", "ten co quan"),
    "kind": ("kind", "type", "loai", "loai don vi", "loai hinh"),
    "province_code": ("province code", "province", "ma tinh", "ma tinh thanh", "tinh"),
    "parent_code": ("parent code", "parent", "ma don vi cha", "don vi cha", "ma cap tren",
                    "ma don vi cap tren", "truc thuoc"),
    "merged_into": ("merged into", "sap nhap vao", "ma don vi moi", "ma sap nhap",
                    "don vi moi"),
    "domain": ("domain", "ten mien", "website"),
    "active": ("active", "hoat dong", "con hoat dong", "dang hoat dong", "trang thai"),
}
_REQUIRED = {STAFF: ("full_name", "phone", "unit_code"), UNITS: ("code", "name", "kind")}
_ALIASES = {STAFF: _STAFF_ALIASES, UNITS: _UNIT_ALIASES}
_SHEETS = {
    STAFF: {"staff", "can bo", "danh sach can bo", "nhan su", "people", "cbcc"},
    UNITS: {"units", "unit", "don vi", "danh sach don vi", "danh muc don vi", "co quan"},
}


def _alias_index(kind: str) -> dict[str, str]:
    return {_key(a): f for f, aliases in _ALIASES[kind].items() for a in (f, *aliases)}


@dataclass
class _Table:
    header_row: int
    columns: dict[str, int]
    ignored: list[str]
    rows: list[tuple[int, list[str]]]  # (sheet row number, cells), non-empty data rows only


def _header_score(cells: Sequence[str], index: dict[str, str]) -> int:
    return len({index[k] for c in cells if (k := _key(c)) in index})


def _map_header(cells: Sequence[str], kind: str) -> tuple[dict[str, int], list[str]]:
    index = _alias_index(kind)
    columns: dict[str, int] = {}
    ignored: list[str] = []
    dupes: list[str] = []
    for i, cell in enumerate(cells):
        name = cell.strip()
        if not name:
            continue
        fieldname = index.get(_key(name))
        if fieldname is None:
            ignored.append(name[:60])
        elif fieldname in columns:
            dupes.append(fieldname)
        else:
            columns[fieldname] = i
    if dupes:
        raise ImportFileError("duplicate_columns", columns=", ".join(sorted(set(dupes))))
    if kind == STAFF and "_given" in columns and not {"full_name", "_family"} & columns.keys():
        columns["full_name"] = columns.pop("_given")  # a lone "Tên" column holds the whole name
    missing = [f for f in _REQUIRED[kind] if f not in columns]
    if kind == STAFF and "full_name" in missing and {"_family", "_given"} <= columns.keys():
        missing.remove("full_name")
    if missing:
        found = ", ".join(c.strip()[:40] for c in cells if c.strip())
        raise ImportFileError("missing_columns", columns=", ".join(missing), found=found)
    return columns, ignored


def _build_table(grid: Iterable[tuple[int, list[str]]], kind: str) -> _Table:
    """Find the header among the first rows (a title row may sit above it), then the data."""
    index = _alias_index(kind)
    it = iter(grid)
    head: list[tuple[int, list[str]]] = []
    for number, cells in it:
        if any(c.strip() for c in cells):
            head.append((number, cells))
            if len(head) >= HEADER_SCAN_ROWS:
                break
    if not head:
        raise ImportFileError("empty_file")
    best = max(range(len(head)), key=lambda i: (_header_score(head[i][1], index), -i))
    if _header_score(head[best][1], index) == 0:
        best = 0
    header_row, header_cells = head[best]
    columns, ignored = _map_header(header_cells, kind)
    rows: list[tuple[int, list[str]]] = []
    for number, cells in chain(head[best + 1 :], it):  # lazily: stop early on huge sheets
        if not any(c.strip() for c in cells):
            continue
        rows.append((number, cells))
        if len(rows) > MAX_ROWS:
            raise ImportFileError("too_many_rows", max_rows=MAX_ROWS)
    if not rows:
        raise ImportFileError("no_rows")
    return _Table(header_row, columns, ignored, rows)


# --------------------------------------------------------------------------- reading

_VI_MARKS = {"\u0300", "\u0301", "\u0303", "\u0309", "\u0323", "\u0302", "\u0306", "\u031b"}
_PUNCT_OK = set("–—‘’“”…•€°±×·«»§©®™")


def _is_vietnamese_letter(ch: str) -> bool:
    if ch in "đĐ":
        return True
    decomposed = unicodedata.normalize("NFD", ch)
    return decomposed[0].isascii() and decomposed[0].isalpha() and all(
        m in _VI_MARKS for m in decomposed[1:]
    )


_ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x19\x1b-\x1f\x7f]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _weird_ratio(text: str, *, vietnamese: bool) -> float:
    """Share of characters that no real staff list contains (controls, orphan marks, ...)."""
    if not text:
        return 0.0
    weird = len(_ASCII_CONTROL.findall(text))
    for ch in _NON_ASCII.findall(text):
        cat = unicodedata.category(ch)
        broken = cat[0] == "C" or ch == "\ufffd"
        foreign = vietnamese and not (
            _is_vietnamese_letter(ch) or ch in _PUNCT_OK or cat[0] == "Z"
        )
        weird += broken or foreign
    return weird / len(text)


def decode_text(data: bytes) -> str:
    """UTF-8 (BOM or not), UTF-16 with BOM, or Windows-1258 — else ``bad_encoding``."""
    if data.startswith(codecs.BOM_UTF8):
        candidates = [("utf-8-sig", False)]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        candidates = [("utf-16", False)]
    else:
        candidates = [("utf-8", False)]
        if b"\x00" not in data:
            candidates.append(("cp1258", True))
    for encoding, vietnamese in candidates:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        # CP1258 writes tones as combining marks; NFC makes "Nguyễn" one code point per letter.
        text = unicodedata.normalize("NFC", text)
        if _weird_ratio(text, vietnamese=vietnamese) <= (0.02 if vietnamese else 0.01):
            return text
    raise ImportFileError("bad_encoding")


def _csv_grid(text: str, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    number = 0
    try:
        for number, cells in enumerate(reader, 1):  # noqa: B007 - used in the except
            yield number, [c.strip() for c in cells[:MAX_COLS]]
    except csv.Error as exc:
        raise ImportFileError("bad_csv", line=reader.line_num or number + 1) from exc


def _sniff_delimiter(text: str, kind: str) -> str:
    """The delimiter under which the header is recognized best; else the most frequent one."""
    index = _alias_index(kind)
    head = "\n".join(text.splitlines()[:HEADER_SCAN_ROWS])
    best, best_score = ",", 0
    for d in (",", ";", "\t"):
        try:
            rows = list(csv.reader(io.StringIO(head, newline=""), delimiter=d))
        except csv.Error:
            continue
        score = max((_header_score(r, index) for r in rows), default=0)
        if score > best_score:
            best, best_score = d, score
    if best_score:
        return best
    first = next((line for line in text.splitlines() if line.strip()), "")
    return max((",", ";", "\t"), key=lambda d: (first.count(d), d == ","))


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    return str(value).strip()


def _pick_sheet(titles: list[str], kind: str) -> int:
    other = UNITS if kind == STAFF else STAFF
    keys = [_key(t) for t in titles]
    for i, k in enumerate(keys):
        if k in _SHEETS[kind]:
            return i
    for i, k in enumerate(keys):
        if k not in _SHEETS[other]:
            return i
    expected = "staff / can_bo" if kind == STAFF else "units / don_vi"
    raise ImportFileError("wrong_sheet", sheets=", ".join(titles), expected=expected)


def _xlsx_table(data: bytes, kind: str) -> _Table:
    from openpyxl import load_workbook

    try:
        wb = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as exc:  # zipfile.BadZipFile, KeyError, InvalidFileException, XML errors…
        raise ImportFileError("bad_xlsx") from exc
    try:
        sheets = list(wb.worksheets)
        if not sheets:
            raise ImportFileError("bad_xlsx")
        ws = sheets[_pick_sheet([s.title for s in sheets], kind)]
        if hasattr(ws, "reset_dimensions"):
            ws.reset_dimensions()  # some writers store a wrong sheet size

        def grid() -> Iterator[tuple[int, list[str]]]:
            rows = ws.iter_rows(min_row=1, max_col=MAX_COLS, values_only=True)
            for number, values in enumerate(rows, 1):
                yield number, [_cell_text(v) for v in values]

        try:
            return _build_table(grid(), kind)
        except ImportFileError:
            raise
        except Exception as exc:  # corrupt sheet XML inside a valid zip
            raise ImportFileError("bad_xlsx") from exc
    finally:
        wb.close()


def read_table(data: bytes, filename: str, kind: str) -> _Table:
    """Bytes of a CSV or XLSX file → header mapping and data rows, or ImportFileError."""
    if len(data) > MAX_BYTES:
        raise ImportFileError("too_large", max_mb=MAX_BYTES // (1024 * 1024))
    if not data.strip():
        raise ImportFileError("empty_file")
    ext = PurePath(filename or "").suffix.lower()
    if data.startswith(b"\xd0\xcf\x11\xe0"):  # OLE2: Excel 97-2003 or a password-protected file
        raise ImportFileError("legacy_xls")
    is_zip = data.startswith(b"PK")
    if is_zip or ext in (".xlsx", ".xlsm"):
        if not is_zip:
            raise ImportFileError("bad_xlsx")
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                unpacked = sum(info.file_size for info in archive.infolist())
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise ImportFileError("bad_xlsx") from exc
        if unpacked > MAX_UNPACKED:  # a zip bomb, or far more than 50,000 rows anyway
            raise ImportFileError("too_large", max_mb=MAX_BYTES // (1024 * 1024))
        return _xlsx_table(data, kind)
    text = decode_text(data)
    return _build_table(_csv_grid(text, _sniff_delimiter(text, kind)), kind)


# --------------------------------------------------------------------------- values

_CODE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_EMAIL_RE = re.compile(
    r"^(?!\.)(?!.*\.\.)[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}(?<!\.)"
    r"@(?=.{4,190}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}$"
)
_HOST_RE = re.compile(
    r"^(?=.{4,120}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,24}$"
)
_ROLE_WORDS: dict[str, Role] = {
    **{_key(r.value): r for r in Role},
    "can bo": Role.official, "cong chuc": Role.official, "vien chuc": Role.official,
    "chuyen vien": Role.official, "nhan vien": Role.official, "official": Role.official,
    "quan tri don vi": Role.unit_admin, "admin don vi": Role.unit_admin,
    "cntt don vi": Role.unit_admin, "can bo cntt": Role.unit_admin, "unit admin": Role.unit_admin,
    "ho tro": Role.support, "ho tro ky thuat": Role.support, "tong dai": Role.support,
    "support": Role.support, "helpdesk": Role.support,
    "van hanh": Role.dtc_admin, "quan tri": Role.dtc_admin, "quan tri he thong": Role.dtc_admin,
    "dtc admin": Role.dtc_admin, "operator": Role.dtc_admin, "admin": Role.dtc_admin,
}
_KIND_WORDS: dict[str, UnitKind] = {
    **{_key(k.value): k for k in UnitKind},
    "so": UnitKind.department, "ban": UnitKind.department, "nganh": UnitKind.department,
    "so ban nganh": UnitKind.department, "so nganh": UnitKind.department,
    "co quan chuyen mon": UnitKind.department,
    "phuong": UnitKind.ward, "xa": UnitKind.commune, "dac khu": UnitKind.special_zone,
    "dang uy": UnitKind.party_office, "van phong dang": UnitKind.party_office,
    "van phong dang uy": UnitKind.party_office, "dang bo": UnitKind.party_office,
    "tinh uy": UnitKind.party_office, "thanh uy": UnitKind.party_office,
    "ubnd tinh": UnitKind.province_office, "ubnd thanh pho": UnitKind.province_office,
    "van phong ubnd": UnitKind.province_office, "uy ban nhan dan tinh": UnitKind.province_office,
    "province office": UnitKind.province_office,
}
_TRUE = {"1", "true", "yes", "y", "x", "co", "con", "dang hoat dong", "hoat dong", "active"}
_FALSE = {"0", "false", "no", "n", "khong", "het", "ngung", "ngung hoat dong", "giai the",
          "inactive"}


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co") for c in text)


def _parse_domain(text: str) -> str | None:
    host = re.sub(r"^[a-z][a-z0-9+.-]*://", "", text.strip().lower()).split("/", 1)[0]
    host = host.removeprefix("www.") if host.count(".") > 1 else host
    return host if _HOST_RE.match(host) else None


class _Rows:
    """Collects row errors; checks each code carries exactly its documented detail keys."""

    def __init__(self, errors: list[RowError]) -> None:
        self.errors = errors

    def add(
        self, row: int, column: str | None, code: str, value: str | None, **detail: Any
    ) -> None:
        assert code in ROW_ERRORS and set(detail) == set(ROW_ERRORS[code]), code
        shown = None if value is None else value[:VALUE_CHARS]
        self.errors.append(RowError(row, column, code, shown, detail))


def _text_field(
    rows: _Rows, number: int, column: str, raw: str, max_len: int, *, required: bool
) -> str | None:
    """Trimmed, single-spaced NFC text or None (blank); adds an error and returns None if bad."""
    if not raw:
        if required:
            rows.add(number, column, "required", None)
        return None
    if _has_control(raw):
        rows.add(number, column, "control_chars", raw)
        return None
    value = clean_name(raw)
    if len(value) > max_len:
        rows.add(number, column, "too_long", raw, max=max_len)
        return None
    return value


def _chunked(items: Sequence[Any], size: int = 500) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass
class _UnitRef:
    code: str
    active: bool
    merged_into: str | None


async def _unit_refs(session: AsyncSession) -> dict[str, _UnitRef]:
    """All unit codes (about 14k with the old units): cheaper than one query per row."""
    rows = await session.execute(select(Unit.code, Unit.active, Unit.merged_into))
    return {c: _UnitRef(c, a, m) for c, a, m in rows}


def _lookup_code(text: str, known: Collection[str], lower: dict[str, str]) -> str | None:
    """Exact code, then case-insensitive, then a numeric code that lost leading zeros."""
    if text in known:
        return text
    if text.lower() in lower:
        return lower[text.lower()]
    if text.isdigit() and len(text) < 5 and text.zfill(5) in known:
        return text.zfill(5)
    return None


def _cell(cells: list[str], columns: dict[str, int], name: str) -> str:
    i = columns.get(name)
    return cells[i].strip() if i is not None and i < len(cells) else ""


async def _write_audit(
    session: AsyncSession,
    actor: Actor,
    action: str,
    object_type: str,
    changes: list[tuple[str, dict[str, Any] | None, dict[str, Any]]],
) -> None:
    """One audit row per changed object, inserted in bulk."""
    now = utcnow()
    rows = [
        {
            "at": now,
            "actor": actor.label[:100],
            "actor_person_id": actor.person_id,
            "action": action,
            "object_type": object_type,
            "object_id": str(obj_id)[:64],
            "before": before,
            "after": after,
        }
        for obj_id, before, after in changes
    ]
    for part in _chunked(rows):
        await session.execute(insert(AuditLog.__table__), list(part))


async def _summary_audit(
    session: AsyncSession, actor: Actor, report: ImportReport
) -> None:
    await audit(
        session,
        actor,
        f"import.{report.kind}",
        "import",
        (report.filename or "")[:64],
        after={
            "filename": report.filename,
            "total_rows": report.total_rows,
            "valid_rows": report.valid_rows,
            "error_rows": report.error_rows,
            "created": report.created,
            "updated": report.updated,
            "unchanged": report.unchanged,
        },
    )


def _changed(
    before: dict[str, Any], after: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    keys = [k for k in after if before.get(k) != after[k]]
    return {k: before.get(k) for k in keys}, {k: after[k] for k in keys}


# --------------------------------------------------------------------------- staff

_PERSON_FIELDS = ("full_name", "unit_code", "position", "email", "role")


async def import_staff(
    session: AsyncSession,
    data: bytes,
    filename: str,
    actor: Actor,
    *,
    skip_invalid: bool = False,
    dry_run: bool = False,
) -> ImportReport:
    """Upsert people by normalized phone from a staff list (full_name, phone, unit_code, …).

    Any invalid row → nothing is written unless ``skip_invalid``; ``dry_run`` only counts.
    """
    table = read_table(data, filename, STAFF)
    cols = table.columns
    errors: list[RowError] = []
    rows = _Rows(errors)
    units = await _unit_refs(session)
    lower = {c.lower(): c for c in units}
    first_by_phone: dict[str, int] = {}
    valid: dict[str, tuple[int, dict[str, Any]]] = {}  # phone → (row, values)

    for number, cells in table.rows:
        before = len(errors)
        raw_name = _cell(cells, cols, "full_name")
        if "full_name" not in cols:
            raw_name = " ".join(
                p for p in (_cell(cells, cols, "_family"), _cell(cells, cols, "_given")) if p
            )
        name = _text_field(rows, number, "full_name", raw_name, 200, required=True)

        raw_phone = _cell(cells, cols, "phone")
        phone: str | None = None
        if not raw_phone:
            rows.add(number, "phone", "required", None)
        else:
            try:
                phone = normalize_phone(raw_phone)
            except PhoneError:
                rows.add(number, "phone", "bad_phone", raw_phone)
        if phone is not None:
            if phone in first_by_phone:
                rows.add(number, "phone", "duplicate_phone", raw_phone,
                         first_row=first_by_phone[phone])
                phone = None
            else:
                first_by_phone[phone] = number

        raw_unit = _cell(cells, cols, "unit_code")
        unit_code: str | None = None
        if not raw_unit:
            rows.add(number, "unit_code", "required", None)
        else:
            found = _lookup_code(raw_unit, units, lower)
            if found is None:
                rows.add(number, "unit_code", "unknown_unit", raw_unit)
            elif not units[found].active:
                rows.add(number, "unit_code", "inactive_unit", raw_unit,
                         merged_into=units[found].merged_into or "")
            else:
                unit_code = found

        position = _text_field(
            rows, number, "position", _cell(cells, cols, "position"), 200, required=False
        )
        raw_email = _cell(cells, cols, "email")
        email: str | None = None
        if raw_email:
            if len(raw_email) <= 200 and _EMAIL_RE.match(raw_email):
                email = raw_email.lower()
            else:
                rows.add(number, "email", "bad_email", raw_email)
        raw_role = _cell(cells, cols, "role")
        role: str | None = None
        if raw_role:
            found_role = _ROLE_WORDS.get(_key(raw_role))
            if found_role is None:
                rows.add(number, "role", "bad_role", raw_role,
                         allowed=", ".join(r.value for r in Role))
            else:
                role = found_role.value

        if len(errors) == before and phone and name and unit_code:
            valid[phone] = (
                number,
                {"full_name": name, "unit_code": unit_code, "position": position,
                 "email": email, "role": role},
            )

    # One pass over the table instead of chunked IN (...) lookups: on PostgreSQL a prepared
    # 500-parameter IN list gets a generic plan that compares linearly (minutes at 50k rows).
    existing: dict[str, dict[str, Any]] = {}
    result = await session.execute(
        select(Person.id, Person.phone, *(getattr(Person, f) for f in _PERSON_FIELDS))
        .where(Person.phone.is_not(None))
    )
    for pid, ph, *values in result:
        if ph in valid:
            existing[ph] = {"id": pid, **dict(zip(_PERSON_FIELDS, values, strict=True))}

    now = utcnow()
    writes: list[dict[str, Any]] = []
    changes: list[tuple[str, dict[str, Any] | None, dict[str, Any]]] = []
    created = updated = unchanged = 0
    for phone, (_, values) in valid.items():
        old = existing.get(phone)
        if old is None:
            record = {**values, "role": values["role"] or Role.official.value}
            created += 1
            changes.append((phone, None, {"phone": phone, **record}))
        else:
            record = {f: (values[f] if values[f] is not None else old[f]) for f in _PERSON_FIELDS}
            b, a = _changed(old, record)
            if not a:
                unchanged += 1
                continue
            updated += 1
            changes.append((phone, b, a))
        writes.append(
            {"phone": phone, **record, "name_folded": fold(record["full_name"]), "updated_at": now}
        )

    report = ImportReport(
        kind=STAFF, filename=filename, total_rows=len(table.rows), valid_rows=len(valid),
        errors=errors, created=created, updated=updated, unchanged=unchanged,
        dry_run=dry_run, ignored_columns=table.ignored,
    )
    if dry_run or (errors and not skip_invalid) or not valid:
        return report

    await upsert_rows(session, Person.__table__, writes, ["phone"])  # type: ignore[arg-type]
    changed_phones = {c[0] for c in changes}
    result = await session.execute(select(Person.phone, Person.id).where(Person.phone.is_not(None)))
    ids = {ph: pid for ph, pid in result if ph in changed_phones}
    for action, subset in (
        ("import.staff.create", [c for c in changes if c[1] is None]),
        ("import.staff.update", [c for c in changes if c[1] is not None]),
    ):
        await _write_audit(
            session, actor, action, "person", [(str(ids[p]), b, a) for p, b, a in subset]
        )
    report.applied = True
    await _summary_audit(session, actor, report)
    return report


# --------------------------------------------------------------------------- units

_UNIT_FIELDS = (
    "name", "kind", "province_code", "parent_code", "merged_into", "domain", "active", "source",
)


def _levels(deps: dict[str, set[str]]) -> tuple[list[list[str]], set[str]]:
    """Kahn's algorithm: batches where each code depends only on earlier ones; plus cycles."""
    remaining = {c: set(d) for c, d in deps.items()}
    levels: list[list[str]] = []
    while remaining:
        ready = sorted(c for c, d in remaining.items() if not d)
        if not ready:
            break
        levels.append(ready)
        for c in ready:
            del remaining[c]
        for d in remaining.values():
            d.difference_update(ready)
    return levels, set(remaining)


async def import_units(
    session: AsyncSession,
    data: bytes,
    filename: str,
    actor: Actor,
    *,
    skip_invalid: bool = False,
    dry_run: bool = False,
) -> ImportReport:
    """Upsert units by code (code, name, kind, province_code, parent_code, merged_into, …).

    Parents and merge targets may be in the database or anywhere in the file; rows are written
    parents first. Codes starting with ``old-`` are reserved for the national register.
    """
    table = read_table(data, filename, UNITS)
    cols = table.columns
    errors: list[RowError] = []
    rows = _Rows(errors)
    units = await _unit_refs(session)
    lower = {c.lower(): c for c in units}
    provinces = set((await session.execute(select(Province.code))).scalars())

    parsed: list[tuple[int, str | None, dict[str, Any], dict[str, str]]] = []
    first_by_code: dict[str, int] = {}
    bad: set[str] = set()
    for number, cells in table.rows:
        before = len(errors)
        raw_code = _cell(cells, cols, "code")
        code: str | None = None
        if not raw_code:
            rows.add(number, "code", "required", None)
        elif not _CODE_RE.match(raw_code):
            rows.add(number, "code", "bad_code", raw_code)
        elif raw_code.lower().startswith(OLD_PREFIX):
            rows.add(number, "code", "reserved_code", raw_code)
        else:
            code = _lookup_code(raw_code, units, lower) or raw_code
            if code.lower() in first_by_code:
                rows.add(number, "code", "duplicate_code", raw_code,
                         first_row=first_by_code[code.lower()])
                code = None
            else:
                first_by_code[code.lower()] = number
        is_new = code is None or code not in units

        name = _text_field(rows, number, "name", _cell(cells, cols, "name"), 200,
                           required=is_new)
        raw_kind = _cell(cells, cols, "kind")
        kind: str | None = None
        if raw_kind:
            found_kind = _KIND_WORDS.get(_key(raw_kind))
            if found_kind is None:
                rows.add(number, "kind", "bad_kind", raw_kind,
                         allowed=", ".join(k.value for k in UnitKind))
            else:
                kind = found_kind.value
        elif is_new:
            rows.add(number, "kind", "required", None)

        raw_prov = _cell(cells, cols, "province_code")
        province: str | None = None
        if raw_prov:
            candidate = raw_prov.zfill(2) if raw_prov.isdigit() else raw_prov
            if candidate in provinces:
                province = candidate
            else:
                rows.add(number, "province_code", "unknown_province", raw_prov)

        raw_active = _cell(cells, cols, "active")
        active: bool | None = None
        if raw_active:
            k = _key(raw_active)
            if k in _TRUE:
                active = True
            elif k in _FALSE:
                active = False
            else:
                rows.add(number, "active", "bad_bool", raw_active)

        raw_domain = _cell(cells, cols, "domain")
        domain: str | None = None
        if raw_domain:
            domain = _parse_domain(raw_domain)
            if domain is None:
                rows.add(number, "domain", "bad_domain", raw_domain)

        refs = {
            f: _cell(cells, cols, f) for f in ("parent_code", "merged_into")
            if _cell(cells, cols, f)
        }
        values = {"name": name, "kind": kind, "province_code": province, "domain": domain,
                  "active": active}
        parsed.append((number, code, values, refs))
        if code and len(errors) > before:
            bad.add(code)

    # References go to the database or to any row of the file. Iterate: skipping an invalid
    # row invalidates the rows that need it (unless the database already has that unit).
    file_codes = {c for _, c, _, _ in parsed if c}
    file_lower = {c.lower(): c for c in file_codes}
    file_row = {c: n for n, c, _, _ in parsed if c}
    resolved: dict[str, dict[str, str]] = {}
    changed = True
    while changed:
        changed = False
        for number, code, _values, refs in parsed:
            if not code or code in bad:
                continue
            out: dict[str, str] = {}
            for col, raw in refs.items():
                err = "unknown_parent" if col == "parent_code" else "unknown_merged_into"
                in_file = _lookup_code(raw, file_codes, file_lower)
                target = in_file if in_file and in_file not in bad else None
                target = target or _lookup_code(raw, units, lower)
                if target == code or (target is None and in_file == code):
                    rows.add(number, col, "self_reference", raw)
                elif target is not None:
                    out[col] = target
                    continue
                elif in_file is not None:
                    rows.add(number, col, "ref_row_invalid", raw, ref_row=file_row[in_file])
                else:
                    rows.add(number, col, err, raw)
                bad.add(code)
                changed = True
                break
            else:
                resolved[code] = out
    good = [(n, c, v) for n, c, v, _ in parsed if c and c not in bad]

    # Rows referencing other new-or-changed rows of the file are written after them.
    in_file = {c for _, c, _ in good}
    deps = {c: {t for t in resolved.get(c, {}).values() if t in in_file} for c in in_file}
    levels, cyclic = _levels(deps)
    by_code = {c: (n, v) for n, c, v in good}
    for code in sorted(cyclic, key=lambda c: by_code[c][0]):
        refs = resolved.get(code, {})
        col = "parent_code" if refs.get("parent_code") in cyclic else "merged_into"
        rows.add(by_code[code][0], col, "reference_cycle", refs.get(col))
    good = [g for g in good if g[1] not in cyclic]

    existing: dict[str, dict[str, Any]] = {}
    wanted = {c for _, c, _ in good}
    result = await session.execute(select(Unit.code, *(getattr(Unit, f) for f in _UNIT_FIELDS)))
    for c, *vals in result:
        if c in wanted:
            existing[c] = dict(zip(_UNIT_FIELDS, vals, strict=True))

    now = utcnow()
    records: dict[str, dict[str, Any]] = {}
    changes: list[tuple[str, dict[str, Any] | None, dict[str, Any]]] = []
    created = updated = unchanged = 0
    for _, code, values in good:
        refs = resolved.get(code, {})
        old = existing.get(code)
        new_vals = {**values, **refs}
        if old is None:
            record = {
                "name": new_vals["name"], "kind": new_vals["kind"],
                "province_code": new_vals["province_code"],
                "parent_code": new_vals.get("parent_code"),
                "merged_into": new_vals.get("merged_into"),
                "domain": new_vals["domain"],
                "active": True if new_vals["active"] is None else new_vals["active"],
                "source": "import",
            }
            created += 1
            changes.append((code, None, {"code": code, **record}))
        else:
            record = {
                f: (new_vals[f] if new_vals.get(f) is not None else old[f]) for f in _UNIT_FIELDS
            }
            b, a = _changed(old, record)
            if not a:
                unchanged += 1
                continue
            updated += 1
            changes.append((code, b, a))
        records[code] = {"code": code, **record, "name_folded": fold(record["name"]),
                         "updated_at": now}

    report = ImportReport(
        kind=UNITS, filename=filename, total_rows=len(table.rows), valid_rows=len(good),
        errors=sorted(errors, key=lambda e: e.row), created=created, updated=updated,
        unchanged=unchanged, dry_run=dry_run, ignored_columns=table.ignored,
    )
    if dry_run or (errors and not skip_invalid) or not good:
        return report

    for level in levels:
        batch = [records[c] for c in level if c in records]
        await upsert_rows(session, Unit.__table__, batch, ["code"])  # type: ignore[arg-type]
    for action, subset in (
        ("import.units.create", [c for c in changes if c[1] is None]),
        ("import.units.update", [c for c in changes if c[1] is not None]),
    ):
        await _write_audit(session, actor, action, "unit", subset)
    report.applied = True
    await _summary_audit(session, actor, report)
    return report
