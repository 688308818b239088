"""Operator reports on migration status: XLSX export and import, and the progress chart.

Why a hand-written XLSX writer for the export: the national report is ~3,500 units × 10
systems (35,000 styled rows) and openpyxl needs 4-9 s for that; streaming the SpreadsheetML
directly takes about a second. Reading uploaded files still uses openpyxl (robust parsing).

Why the chart is cached by ``status_version``: operators ask for it repeatedly and the data
changes rarely; a render costs ~0.3 s of CPU, a version check a few cheap queries.

Error codes of the bulk import are stable strings; their texts live in
``locales/*/status.toml`` under ``status.err`` (see ``error_text``).
"""

from __future__ import annotations

import asyncio
import io
import re
import weakref
import zipfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from xml.sax.saxutils import escape
from zoneinfo import ZoneInfo

from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import Person, Province, Role, Stage, Unit, UnitSystemStatus
from services.audit import Actor, audit
from services.folding import fold
from services.status import (
    EDITOR_ROLES,
    RANK,
    STAGES,
    TRACKED_KINDS,
    ProgressCache,
    SystemInfo,
    clean_note,
    load_milestones,
    load_systems,
    province_name,
    stage_counts,
    stage_of,
    status_rows,
    status_version,
    tracked_units,
    write_changes,
)
from services.texts import norm_lang, t

TZ = ZoneInfo("Asia/Ho_Chi_Minh")
MAX_BYTES = 10 * 1024 * 1024
MAX_UNPACKED = 200 * 1024 * 1024
MAX_ROWS = 50_000
MAX_COLS = 30
HEADER_SCAN_ROWS = 10
SUMMARY_SHEET = "summary"
IMPORT_SHEET = "status"
IMPORT_SHEETS = ("status", "trang thai")  # folded: "status", "trang_thai", "Trạng thái"

# Row error code → detail keys it always carries (besides row, column and value).
ROW_ERRORS: dict[str, tuple[str, ...]] = {
    "required": (),
    "unknown_unit": (),
    "inactive_unit": ("merged_into",),
    "unknown_system": ("allowed",),
    "unknown_stage": ("allowed",),
    "duplicate_row": ("first_row",),
    "forbidden_unit": (),
}
# File error code → detail keys it always carries.
FILE_ERRORS: dict[str, tuple[str, ...]] = {
    "too_large": ("max_mb",),
    "empty_file": (),
    "bad_xlsx": (),
    "legacy_xls": (),
    "wrong_sheet": ("expected", "sheets"),
    "missing_columns": ("columns", "found"),
    "no_rows": (),
    "too_many_rows": ("max_rows",),
    "forbidden": (),
}


class StatusImportError(Exception):
    """The file as a whole cannot be used; ``code`` names the reason, ``detail`` its data."""

    def __init__(self, code: str, **detail: Any) -> None:
        super().__init__(code)
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.code} {self.detail}" if self.detail else self.code

    def text(self, lang: str | None = "vi") -> str:
        return t(f"status.err.{self.code}", lang, **self.detail)


def _plain(key: str, lang: str | None, **params: Any) -> str:
    """A text for a file or image (not Telegram HTML): parameters are not HTML-escaped."""
    return t(key, lang, **{k: Markup(v) if isinstance(v, str) else v for k, v in params.items()})


def stage_label(stage: Stage | str, lang: str | None = "vi") -> str:
    return t(f"stage.{stage_of(str(stage))}", lang)


# ================================================================================ XLSX writer

_ILLEGAL_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
_EPOCH_DATE = date(1899, 12, 30)
_EPOCH = datetime(1899, 12, 30)
_SHEET_BAD = re.compile(r"[\[\]:*?/\\]")
_MAIN_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_REL_NS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_PKG_REL_NS = "http://schemas.openxmlformats.org/package/2006/relationships"
_XML_HEAD = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'

# Cell style ids (cellXfs order in _STYLES).
S_DEFAULT, S_HEADER, S_DATE, S_DATETIME, S_RED, S_RED_DATE, S_RED_DATETIME, S_BOLD, S_PCT = range(9)
OVERDUE_FILL = "FFFFC7CE"
_STYLES = (
    _XML_HEAD + f'<styleSheet xmlns="{_MAIN_NS}">'
    '<numFmts count="2"><numFmt numFmtId="164" formatCode="yyyy-mm-dd"/>'
    '<numFmt numFmtId="165" formatCode="yyyy-mm-dd hh:mm"/></numFmts>'
    '<fonts count="2"><font><sz val="11"/><name val="Calibri"/><family val="2"/></font>'
    '<font><b/><sz val="11"/><name val="Calibri"/><family val="2"/></font></fonts>'
    '<fills count="4"><fill><patternFill patternType="none"/></fill>'
    '<fill><patternFill patternType="gray125"/></fill>'
    f'<fill><patternFill patternType="solid"><fgColor rgb="{OVERDUE_FILL}"/>'
    '<bgColor indexed="64"/></patternFill></fill>'
    '<fill><patternFill patternType="solid"><fgColor rgb="FFD9E1F2"/>'
    '<bgColor indexed="64"/></patternFill></fill></fills>'
    '<borders count="1"><border><left/><right/><top/><bottom/><diagonal/></border></borders>'
    '<cellStyleXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0"/></cellStyleXfs>'
    '<cellXfs count="9">'
    '<xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/>'
    '<xf numFmtId="0" fontId="1" fillId="3" borderId="0" xfId="0" applyFont="1" applyFill="1"/>'
    '<xf numFmtId="164" fontId="0" fillId="0" borderId="0" xfId="0" applyNumberFormat="1"/>'
    '<xf numFmtId="165" fontId="0" fillId="0" borderId="0" xfId="0" applyNumberFormat="1"/>'
    '<xf numFmtId="0" fontId="0" fillId="2" borderId="0" xfId="0" applyFill="1"/>'
    '<xf numFmtId="164" fontId="0" fillId="2" borderId="0" xfId="0" applyNumberFormat="1"'
    ' applyFill="1"/>'
    '<xf numFmtId="165" fontId="0" fillId="2" borderId="0" xfId="0" applyNumberFormat="1"'
    ' applyFill="1"/>'
    '<xf numFmtId="0" fontId="1" fillId="0" borderId="0" xfId="0" applyFont="1"/>'
    '<xf numFmtId="9" fontId="0" fillId="0" borderId="0" xfId="0" applyNumberFormat="1"/>'
    '</cellXfs><cellStyles count="1"><cellStyle name="Normal" xfId="0" builtinId="0"/>'
    "</cellStyles></styleSheet>"
)


def _col(n: int) -> str:
    """1 → A, 27 → AA."""
    out = ""
    while n:
        n, r = divmod(n - 1, 26)
        out = chr(65 + r) + out
    return out


def _attr(text: str) -> str:
    return escape(_ILLEGAL_XML.sub("", text), {'"': "&quot;"})


@dataclass
class _Sheet:
    """Rows of values with a row style: None, "header", "red", "bold"; numbers may carry "pct"."""

    name: str
    widths: Sequence[float]
    rows: list[tuple[Sequence[Any], str | None]] = field(default_factory=list)
    header_row: int | None = 1  # frozen and filtered header; None = neither

    def append(self, values: Sequence[Any], style: str | None = None) -> None:
        self.rows.append((values, style))


def _cell(ref: str, value: Any, style: str | None) -> str:
    red = style == "red"
    if value is None:
        return f'<c r="{ref}" s="{S_RED}"/>' if red else ""
    if isinstance(value, datetime):
        serial = (value.replace(tzinfo=None) - _EPOCH).total_seconds() / 86400
        return f'<c r="{ref}" s="{S_RED_DATETIME if red else S_DATETIME}"><v>{serial!r}</v></c>'
    if isinstance(value, date):
        serial = (value - _EPOCH_DATE).days
        return f'<c r="{ref}" s="{S_RED_DATE if red else S_DATE}"><v>{serial}</v></c>'
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int | float):
        s = S_RED if red else (S_PCT if style == "pct" and isinstance(value, float) else 0)
        s_attr = f' s="{s}"' if s else ""
        return f'<c r="{ref}"{s_attr}><v>{value!r}</v></c>'
    s = {"red": S_RED, "header": S_HEADER, "bold": S_BOLD}.get(style or "", 0)
    body = escape(_ILLEGAL_XML.sub("", str(value)))
    space = ' xml:space="preserve"' if body[:1].isspace() or body[-1:].isspace() else ""
    s_attr = f' s="{s}"' if s else ""
    return f'<c r="{ref}"{s_attr} t="inlineStr"><is><t{space}>{body}</t></is></c>'


def _sheet_xml(sheet: _Sheet) -> Iterator[str]:
    ncols = max([len(v) for v, _ in sheet.rows] + [len(sheet.widths), 1])
    nrows = max(len(sheet.rows), 1)
    cols = [_col(i) for i in range(1, ncols + 1)]
    yield (
        _XML_HEAD + f'<worksheet xmlns="{_MAIN_NS}" xmlns:r="{_REL_NS}">'
        f'<dimension ref="A1:{cols[-1]}{nrows}"/><sheetViews><sheetView workbookViewId="0">'
    )
    if sheet.header_row:
        top = sheet.header_row + 1
        yield (
            f'<pane ySplit="{sheet.header_row}" topLeftCell="A{top}" activePane="bottomLeft"'
            f' state="frozen"/><selection pane="bottomLeft" activeCell="A{top}" sqref="A{top}"/>'
        )
    yield '</sheetView></sheetViews><sheetFormatPr defaultRowHeight="15"/><cols>'
    yield "".join(
        f'<col min="{i}" max="{i}" width="{w}" customWidth="1"/>'
        for i, w in enumerate(sheet.widths, 1)
    )
    yield "</cols><sheetData>"
    chunk: list[str] = []
    for r, (values, style) in enumerate(sheet.rows, 1):
        cells = "".join(_cell(f"{cols[i]}{r}", v, style) for i, v in enumerate(values))
        chunk.append(f'<row r="{r}">{cells}</row>')
        if len(chunk) >= 500:
            yield "".join(chunk)
            chunk = []
    yield "".join(chunk) + "</sheetData>"
    if sheet.header_row and len(sheet.rows) >= sheet.header_row:
        yield f'<autoFilter ref="{_filter_ref(sheet, cols)}"/>'
    yield (
        '<pageMargins left="0.7" right="0.7" top="0.75" bottom="0.75" header="0.3"'
        ' footer="0.3"/></worksheet>'
    )


def _filter_ref(sheet: _Sheet, cols: list[str]) -> str:
    return f"A{sheet.header_row}:{cols[-1]}{len(sheet.rows)}"


def _quote_sheet(name: str) -> str:
    return "'" + name.replace("'", "''") + "'"


def _write_xlsx(sheets: list[_Sheet]) -> bytes:
    """A minimal valid workbook: inline strings, one styles part, frozen headers, filters."""
    n = len(sheets)
    content_types = (
        _XML_HEAD
        + '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.'
        'relationships+xml"/><Default Extension="xml" ContentType="application/xml"/>'
        '<Override PartName="/xl/workbook.xml" ContentType="application/vnd.openxmlformats-'
        'officedocument.spreadsheetml.sheet.main+xml"/>'
        '<Override PartName="/xl/styles.xml" ContentType="application/vnd.openxmlformats-'
        'officedocument.spreadsheetml.styles+xml"/>'
        + "".join(
            f'<Override PartName="/xl/worksheets/sheet{i}.xml" ContentType="application/'
            'vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
            for i in range(1, n + 1)
        )
        + "</Types>"
    )
    root_rels = (
        _XML_HEAD + f'<Relationships xmlns="{_PKG_REL_NS}"><Relationship Id="rId1" '
        f'Type="{_REL_NS}/officeDocument" Target="xl/workbook.xml"/></Relationships>'
    )
    defined = []
    for i, sh in enumerate(sheets):
        if sh.header_row and len(sh.rows) >= sh.header_row:
            ncols = max([len(v) for v, _ in sh.rows] + [len(sh.widths), 1])
            ref = f"$A${sh.header_row}:${_col(ncols)}${len(sh.rows)}"
            defined.append(
                f'<definedName name="_xlnm._FilterDatabase" localSheetId="{i}" hidden="1">'
                f"{escape(_quote_sheet(sh.name))}!{ref}</definedName>"
            )
    workbook = (
        _XML_HEAD + f'<workbook xmlns="{_MAIN_NS}" xmlns:r="{_REL_NS}">'
        '<bookViews><workbookView activeTab="0"/></bookViews><sheets>'
        + "".join(
            f'<sheet name="{_attr(sh.name)}" sheetId="{i}" r:id="rId{i}"/>'
            for i, sh in enumerate(sheets, 1)
        )
        + "</sheets>"
        + (f"<definedNames>{''.join(defined)}</definedNames>" if defined else "")
        + "</workbook>"
    )
    workbook_rels = (
        _XML_HEAD + f'<Relationships xmlns="{_PKG_REL_NS}">'
        + "".join(
            f'<Relationship Id="rId{i}" Type="{_REL_NS}/worksheet" '
            f'Target="worksheets/sheet{i}.xml"/>'
            for i in range(1, n + 1)
        )
        + f'<Relationship Id="rId{n + 1}" Type="{_REL_NS}/styles" Target="styles.xml"/>'
        "</Relationships>"
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        zf.writestr("[Content_Types].xml", content_types)
        zf.writestr("_rels/.rels", root_rels)
        zf.writestr("xl/workbook.xml", workbook)
        zf.writestr("xl/_rels/workbook.xml.rels", workbook_rels)
        zf.writestr("xl/styles.xml", _STYLES)
        for i, sh in enumerate(sheets, 1):
            with zf.open(f"xl/worksheets/sheet{i}.xml", "w") as fh:
                for part in _sheet_xml(sh):
                    fh.write(part.encode("utf-8"))
    return buf.getvalue()


def sheet_names(
    systems: Sequence[SystemInfo], reserved: Sequence[str] = (SUMMARY_SHEET, IMPORT_SHEET)
) -> list[str]:
    """Excel-safe, unique (case-insensitively) sheet names ≤ 31 chars from the abbreviations."""
    used = {r.lower() for r in reserved}
    names = []
    for s in systems:
        base = _SHEET_BAD.sub("-", s.abbr or s.code).strip().strip("'").strip() or s.code
        base = base[:31]
        name, n = base, 2
        while name.lower() in used or name.lower() == "history":
            suffix = f" ({n})"
            name = base[: 31 - len(suffix)] + suffix
            n += 1
        used.add(name.lower())
        names.append(name)
    return names


# ================================================================================== export

_COLUMNS = ("unit_code", "unit_name", "province", "stage", "stage_code", "updated_at", "note",
            "next_milestone", "due", "days_left", "overdue")
_WIDTHS = (10, 36, 24, 20, 12, 17, 30, 70, 11, 10, 10)


async def export_status_xlsx(
    session: AsyncSession, *, province_code: str | None = None, today: date,
    lang: str | None = "vi", with_import_sheet: bool = False,
) -> bytes:
    """Workbook: a "summary" sheet, then one sheet per system listing every tracked unit of the
    scope with stage, last update (Vietnam time), next milestone, due and days left; rows of
    units with an overdue milestone are filled red. Header frozen, autofilter on.

    ``with_import_sheet`` adds a last sheet "status" (unit_code, unit_name, system_code, stage,
    note; one row per unit × system) that ``import_status_xlsx`` reads back: the operator's
    round trip for bulk edits."""
    lang = norm_lang(lang)
    systems = await load_systems(session)
    cache = ProgressCache(await load_milestones(session), today)
    stored = await status_rows(session, province_code)
    units = (
        await session.execute(
            select(Unit.code, Unit.name, Unit.province_code, Province.name)
            .outerjoin(Province, Province.code == Unit.province_code)
            .where(*tracked_units(province_code))
            .order_by(Unit.province_code, Unit.name_folded, Unit.code)
        )
    ).all()
    labels = {s: t(f"stage.{s.value}", lang) for s in STAGES}
    header = [t(f"status.xlsx.{c}", lang) for c in _COLUMNS]
    mark = t("status.xlsx.overdue_mark", lang)
    names = sheet_names(systems)
    counts: dict[str, dict[Stage, int]] = {s.code: dict.fromkeys(STAGES, 0) for s in systems}
    overdue: dict[str, int] = defaultdict(int)
    sheets = []
    for s, name in zip(systems, names, strict=True):
        sheet = _Sheet(name, _WIDTHS)
        sheet.append(header, "header")
        for code, unit_name, prov, prov_name in units:
            row = stored.get((code, s.code))
            stage = stage_of(row.stage if row else None)
            counts[s.code][stage] += 1
            p = cache.get(s.code, prov, stage)
            late = bool(p.overdue_milestones)
            overdue[s.code] += late
            m = p.milestone
            updated = row.updated_at.astimezone(TZ).replace(tzinfo=None) if row else None
            sheet.append(
                (code, unit_name, prov_name, labels[stage], stage.value, updated,
                 row.note if row else None, m.name(lang) if m else None,
                 m.due if m else None, p.days_left, mark if late else None),
                "red" if late else None,
            )
        sheets.append(sheet)

    scope = (await province_name(session, province_code) or province_code
             if province_code else t("status.xlsx.national", lang))
    summary = _Sheet(SUMMARY_SHEET, (14, 50, 10, *([14] * len(STAGES)), 14, 14, 14),
                     header_row=4)
    summary.append([_plain("status.xlsx.title", lang, scope=scope)], "bold")
    summary.append([_plain("status.xlsx.generated", lang, today=today.strftime("%d/%m/%Y"),
                           units=len(units))])
    summary.append([])
    summary.append([t("status.xlsx.system", lang), t("status.xlsx.system_name", lang),
                    t("status.xlsx.total", lang), *labels.values(),
                    t("status.xlsx.live_share", lang), t("status.xlsx.overdue_units", lang),
                    t("status.xlsx.sheet", lang)], "header")
    for s, name in zip(systems, names, strict=True):
        c = counts[s.code]
        total = sum(c.values())
        summary.append([s.abbr, s.name(lang), total, *(c[st] for st in STAGES),
                        (c[Stage.live] / total) if total else 0.0, overdue[s.code], name], "pct")
    if with_import_sheet:
        editable = _Sheet(IMPORT_SHEET, (10, 36, 16, 14, 40))
        editable.append(["unit_code", "unit_name", "system_code", "stage", "note"], "header")
        for code, unit_name, _prov, _prov_name in units:
            for s in systems:
                row = stored.get((code, s.code))
                editable.append((code, unit_name, s.code, stage_of(row.stage if row else None)
                                 .value, row.note if row else None))
        sheets.append(editable)
    return await asyncio.to_thread(_write_xlsx, [summary, *sheets])


# ================================================================================== import


@dataclass
class StatusRowError:
    row: int  # as the user sees it in the sheet (header = 1)
    column: str | None
    code: str
    value: str | None
    detail: dict[str, Any] = field(default_factory=dict)


def error_text(err: StatusRowError | StatusImportError, lang: str | None = "vi") -> str:
    """The human text (Telegram HTML) of a row or file error."""
    if isinstance(err, StatusImportError):
        return err.text(lang)
    return t(f"status.err.{err.code}", lang, row=err.row, column=err.column or "",
             value=err.value or "", **err.detail)


@dataclass(frozen=True)
class StatusDiff:
    row: int
    unit_code: str
    unit_name: str
    system_code: str
    system_abbr: str
    old_stage: Stage
    new_stage: Stage
    note: str | None

    @property
    def backwards(self) -> bool:
        return RANK[self.new_stage] < RANK[self.old_stage]


@dataclass
class BulkStatusReport:
    filename: str
    sheet: str
    total_rows: int
    valid_rows: int
    errors: list[StatusRowError]
    diff: list[StatusDiff]  # changes (would be) applied; unchanged rows are not listed
    unchanged: int
    dry_run: bool
    applied: bool = False
    updated: int = 0

    @property
    def error_rows(self) -> int:
        return len({e.row for e in self.errors})

    @property
    def backwards(self) -> int:
        return sum(1 for d in self.diff if d.backwards)

    @property
    def ok(self) -> bool:
        return not self.errors


_HEADER_ALIASES: dict[str, tuple[str, ...]] = {
    "unit_code": ("unit code", "unit", "ma don vi", "ma dv", "don vi"),
    "system_code": ("system code", "system", "he thong", "ma he thong"),
    "stage": ("stage", "giai doan", "trang thai", "stage code", "ma giai doan"),
    "note": ("note", "ghi chu", "notes"),
}
_REQUIRED = ("unit_code", "system_code", "stage")
_STAGE_SYNONYMS: dict[str, Stage] = {
    "chua": Stage.not_started, "chua trien khai": Stage.not_started,
    "khao sat": Stage.surveyed, "thi diem": Stage.pilot, "trien khai": Stage.deployed,
    "tap huan": Stage.trained, "van hanh": Stage.live, "chinh thuc": Stage.live,
    "hoan thanh": Stage.live,
}


def _key(text: str) -> str:
    """Folded lookup key: accents, case, "_" and "-" ignored ("Trạng_thái" → "trang thai")."""
    return " ".join(fold(text.replace("_", " ").replace("-", " ")).split())


def stage_words() -> dict[str, Stage]:
    """Every accepted spelling of a stage: code, Vietnamese and English label, short forms."""
    words: dict[str, Stage] = dict(_STAGE_SYNONYMS)
    for s in STAGES:
        words[_key(s.value)] = s
        for lang in ("vi", "en"):
            words[_key(t(f"stage.{s.value}", lang))] = s
    return words


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _read_rows(data: bytes) -> tuple[str, int, list[tuple[int, dict[str, str]]]]:
    """(sheet title, header row, [(row number, {column: text})]) or StatusImportError."""
    if len(data) > MAX_BYTES:
        raise StatusImportError("too_large", max_mb=MAX_BYTES // (1024 * 1024))
    if not data.strip():
        raise StatusImportError("empty_file")
    if data.startswith(b"\xd0\xcf\x11\xe0"):  # OLE2: Excel 97-2003 or password-protected
        raise StatusImportError("legacy_xls")
    if not data.startswith(b"PK"):
        raise StatusImportError("bad_xlsx")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise StatusImportError("bad_xlsx") from exc
    if unpacked > MAX_UNPACKED:
        raise StatusImportError("too_large", max_mb=MAX_BYTES // (1024 * 1024))
    from openpyxl import load_workbook

    try:
        wb = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as exc:  # BadZipFile, KeyError, InvalidFileException, XML errors…
        raise StatusImportError("bad_xlsx") from exc
    try:
        titles = list(wb.sheetnames)
        title = next((n for n in titles if _key(n) in IMPORT_SHEETS), None)
        if title is None:
            raise StatusImportError("wrong_sheet", expected="status / trang_thai",
                                    sheets=", ".join(titles) or "—")
        ws = wb[title]
        if hasattr(ws, "reset_dimensions"):
            ws.reset_dimensions()  # some writers store a wrong sheet size
        try:
            return (title, *_table(ws.iter_rows(max_col=MAX_COLS, values_only=True)))
        except StatusImportError:
            raise
        except Exception as exc:  # corrupt sheet XML inside a valid zip
            raise StatusImportError("bad_xlsx") from exc
    finally:
        wb.close()


def _table(rows: Iterator[tuple[Any, ...]]) -> tuple[int, list[tuple[int, dict[str, str]]]]:
    aliases = {_key(a): name for name, words in _HEADER_ALIASES.items() for a in (name, *words)}
    header: dict[str, int] | None = None
    header_row = 0
    first_seen: list[str] = []
    out: list[tuple[int, dict[str, str]]] = []
    for number, values in enumerate(rows, 1):
        cells = [_cell_text(v) for v in values]
        if header is None:
            if number > HEADER_SCAN_ROWS:
                break
            if not any(cells):
                continue
            first_seen = first_seen or [c for c in cells if c]
            mapped: dict[str, int] = {}
            for i, c in enumerate(cells):
                name = aliases.get(_key(c)) if c else None
                if name and name not in mapped:
                    mapped[name] = i
            if all(r in mapped for r in _REQUIRED):
                header, header_row = mapped, number
            continue
        if not any(cells):
            continue
        if len(out) >= MAX_ROWS:
            raise StatusImportError("too_many_rows", max_rows=MAX_ROWS)
        out.append((number, {k: cells[i] if i < len(cells) else "" for k, i in header.items()}))
    if header is None:
        raise StatusImportError("missing_columns", columns=", ".join(_REQUIRED),
                                found=", ".join(first_seen) or "—")
    if not out:
        raise StatusImportError("no_rows")
    return header_row, out


@dataclass(frozen=True)
class _UnitRow:
    code: str
    name: str
    active: bool
    tracked: bool
    merged_into: str | None


async def _units_by_code(session: AsyncSession, texts: set[str]) -> dict[str, _UnitRow]:
    """Units whose code is typed in the file (also "70" for "00070", which Excel strips)."""
    wanted = set(texts) | {x.zfill(5) for x in texts if x.isdigit() and len(x) < 5}
    found: dict[str, _UnitRow] = {}
    items = sorted(wanted)
    for i in range(0, len(items), 500):
        rows = await session.execute(
            select(Unit.code, Unit.name, Unit.active, Unit.kind, Unit.merged_into)
            .where(Unit.code.in_(items[i : i + 500]))
        )
        for code, name, active, kind, merged in rows:
            found[code] = _UnitRow(code, name, bool(active), kind in TRACKED_KINDS, merged)
    return found


async def import_status_xlsx(
    session: AsyncSession,
    data: bytes,
    filename: str,
    actor: Actor,
    person: Person,
    *,
    dry_run: bool = True,
) -> BulkStatusReport:
    """Bulk stage update from a sheet "status" (or "trang_thai") with columns unit_code,
    system_code, stage[, note]. All or nothing: one invalid row and nothing is applied.

    The dry run returns the diff (old → new, backwards flagged) for the operator to confirm.
    Applying re-reads the current stages under the write lock and writes history and audit
    rows like ``set_stage``; backwards moves are applied (the dry run is the confirmation).
    Raises StatusImportError for a file that cannot be used (and for officials/support).
    """
    if not person.active or person.verified_at is None or person.role not in EDITOR_ROLES:
        raise StatusImportError("forbidden")
    title, _header_row, rows = _read_rows(data)
    systems = await load_systems(session)
    sys_words: dict[str, SystemInfo] = {}
    for s in systems:
        for word in (s.name_en, s.name_vi, s.abbr, s.code):
            sys_words[_key(word)] = s
    allowed_systems = ", ".join(f"{s.code} ({s.abbr})" for s in systems)
    stages = stage_words()
    allowed_stages = ", ".join(s.value for s in STAGES)
    units = await _units_by_code(session, {r["unit_code"] for _n, r in rows if r["unit_code"]})
    lower = {c.lower(): c for c in units}
    is_operator = person.role == Role.dtc_admin.value

    errors: list[StatusRowError] = []
    valid: list[tuple[int, _UnitRow, SystemInfo, Stage, str | None]] = []
    seen: dict[tuple[str, str], int] = {}
    for number, r in rows:
        before = len(errors)
        for col in _REQUIRED:
            if not r.get(col):
                errors.append(StatusRowError(number, col, "required", None))
        if len(errors) > before:
            continue
        raw_unit = r["unit_code"]
        code = lower.get(raw_unit.lower()) or (
            raw_unit.zfill(5) if raw_unit.isdigit() and raw_unit.zfill(5) in units else None
        )
        unit = units.get(code) if code else None
        if unit is None:
            errors.append(StatusRowError(number, "unit_code", "unknown_unit", raw_unit))
        elif not unit.active or not unit.tracked:
            errors.append(StatusRowError(number, "unit_code", "inactive_unit", raw_unit,
                                         {"merged_into": unit.merged_into}))
        elif not is_operator and unit.code != person.unit_code:
            errors.append(StatusRowError(number, "unit_code", "forbidden_unit", raw_unit))
        system = sys_words.get(_key(r["system_code"]))
        if system is None:
            errors.append(StatusRowError(number, "system_code", "unknown_system",
                                         r["system_code"], {"allowed": allowed_systems}))
        stage = stages.get(_key(r["stage"]))
        if stage is None:
            errors.append(StatusRowError(number, "stage", "unknown_stage", r["stage"],
                                         {"allowed": allowed_stages}))
        if len(errors) > before or unit is None or system is None or stage is None:
            continue
        pair = (unit.code, system.code)
        if pair in seen:
            errors.append(StatusRowError(number, None, "duplicate_row",
                                         f"{unit.code} / {system.code}", {"first_row": seen[pair]}))
            continue
        seen[pair] = number
        valid.append((number, unit, system, stage, clean_note(r.get("note"))))

    current = await _current_stages(session, [(u.code, s.code) for _n, u, s, _st, _no in valid])
    diff: list[StatusDiff] = []
    for number, unit, system, stage, note in valid:
        old = stage_of(current.get((unit.code, system.code)))
        if old is not stage:
            diff.append(StatusDiff(number, unit.code, unit.name, system.code, system.abbr, old,
                                   stage, note))
    report = BulkStatusReport(
        filename=filename, sheet=title, total_rows=len(rows), valid_rows=len(valid),
        errors=errors, diff=diff, unchanged=len(valid) - len(diff), dry_run=dry_run,
    )
    if errors or dry_run:
        return report

    by_pair = {(u.code, s.code): (n, u, s) for n, u, s, _st, _no in valid}
    applied, _refused, _ids = await write_changes(  # every valid row: stages may have moved
        session, [(u.code, s.code, st, note) for _n, u, s, st, note in valid],
        actor=actor, person_id=person.id, confirm_backwards=True,
    )
    report.diff = []
    for c in applied:  # the stages found under the lock, which may differ from the dry run's
        n, u, s = by_pair[(c.unit_code, c.system_code)]
        report.diff.append(StatusDiff(n, u.code, u.name, s.code, s.abbr, c.old_stage,
                                      c.new_stage, c.note))
    report.diff.sort(key=lambda d: d.row)
    report.applied = True
    report.updated = len(applied)
    report.unchanged = len(valid) - len(applied)
    await audit(session, actor, "status.import", "import", (filename or "")[:64], after={
        "filename": filename, "sheet": title, "rows": len(rows), "updated": report.updated,
        "unchanged": report.unchanged, "backwards": report.backwards,
    })
    return report


async def _current_stages(
    session: AsyncSession, pairs: list[tuple[str, str]]
) -> dict[tuple[str, str], str]:
    uss = UnitSystemStatus
    out: dict[tuple[str, str], str] = {}
    unit_codes = sorted({u for u, _s in pairs})
    wanted = set(pairs)
    for i in range(0, len(unit_codes), 500):
        rows = await session.execute(
            select(uss.unit_code, uss.system_code, uss.stage)
            .where(uss.unit_code.in_(unit_codes[i : i + 500]))
        )
        out.update({(u, s): st for u, s, st in rows if (u, s) in wanted})
    return out


# =================================================================================== chart

STAGE_COLORS: dict[Stage, str] = {
    Stage.not_started: "#c7c7c7",
    Stage.surveyed: "#9ecae1",
    Stage.pilot: "#fdae6b",
    Stage.deployed: "#4292c6",
    Stage.trained: "#8c6bb1",
    Stage.live: "#31a354",
}
_chart_cache: dict[tuple[str | None, str], tuple[str, bytes]] = {}
_renders = 0
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def chart_renders() -> int:
    """How many charts were rendered in this process (tests check the cache with it)."""
    return _renders


def clear_chart_cache() -> None:
    _chart_cache.clear()


def _render_chart(
    title: str, xlabel: str, systems: list[str], legend: list[str], matrix: list[list[int]]
) -> bytes:
    """Horizontal stacked bars, one per system, one segment per stage; Agg, no display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 2.2 + 0.5 * len(systems)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ys = list(range(len(systems)))
    left = [0] * len(systems)
    widest = max([sum(r) for r in matrix] + [1])
    for j, stage in enumerate(STAGES):
        values = [row[j] for row in matrix]
        ax.barh(ys, values, left=left, color=STAGE_COLORS[stage], label=legend[j],
                edgecolor="white", linewidth=0.6, height=0.7)
        for y, v, x0 in zip(ys, values, left, strict=True):
            if v and v >= widest * 0.05:
                ax.text(x0 + v / 2, y, str(v), ha="center", va="center", fontsize=8,
                        color="black" if stage in (Stage.not_started, Stage.surveyed,
                                                   Stage.pilot) else "white")
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_yticks(ys, systems)
    ax.invert_yaxis()
    ax.set_xlim(0, widest)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=12, fontweight="bold")
    ax.spines[["top", "right"]].set_visible(False)
    handles, names = ax.get_legend_handles_labels()
    order = [0, 3, 1, 4, 2, 5] if len(handles) == 6 else list(range(len(handles)))
    # (legends fill column by column: this order reads the stages row by row)
    fig.legend([handles[i] for i in order], [names[i] for i in order],
               loc="outside lower center", ncols=3, frameon=False, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


async def progress_chart_png(
    session: AsyncSession, *, province_code: str | None = None, lang: str | None = "vi"
) -> bytes:
    """PNG of units per stage for each system of a province (None = the whole country).

    Rendered once per data change: cached in-process by ``status_version``.
    """
    global _renders
    lang = norm_lang(lang)
    key = (province_code, lang)
    version = await status_version(session, province_code)
    hit = _chart_cache.get(key)
    if hit is not None and hit[0] == version:
        return hit[1]
    lock = _locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())
    async with lock:
        hit = _chart_cache.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        systems = await load_systems(session)
        counts, total = await stage_counts(session, province_code)
        scope = (await province_name(session, province_code) or province_code
                 if province_code else t("status.chart.national", lang))
        title = _plain("status.chart.title", lang, scope=scope)
        xlabel = _plain("status.chart.xlabel", lang, units=total)
        matrix = [[counts.get(s.code, {}).get(st, 0) for st in STAGES] for s in systems]
        legend = [t(f"stage.{st.value}", lang) for st in STAGES]
        png = await asyncio.to_thread(
            _render_chart, title, xlabel, [s.abbr for s in systems], legend, matrix
        )
        _renders += 1
        _chart_cache[key] = (version, png)
        return png


