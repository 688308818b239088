"""The rollout plan (systems and milestones) as validated data, loaded into the database.

The plan lives in ``knowledge/plan.toml`` so its dates are reviewable against the source
articles; operators change it by XLSX round trip (export → edit → import → ``load_plan``)
without touching code. Every problem in a file is reported at once, with its row.
"""

from __future__ import annotations

import calendar
import io
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import Milestone, Province, Stage, System
from services.audit import Actor, audit
from services.folding import fold

PLAN_PATH = Path(__file__).with_name("plan.toml")
STAGES: tuple[str, ...] = tuple(s.value for s in Stage)
PRECISIONS = ("day", "month")
SYSTEM_COLUMNS = ("code", "abbr", "name_vi", "name_en", "sort", "source")
MILESTONE_COLUMNS = (
    "key",
    "system",
    "phase",
    "name_vi",
    "name_en",
    "due",
    "precision",
    "stage_required",
    "scope",
    "province",
    "source",
    "see_also",
    "note",
)
_CODE_RE = re.compile(r"^[a-z0-9_]{1,32}$")
_KEY_RE = re.compile(r"^[a-z0-9_.-]{1,64}$")
_MONTH_RE = re.compile(r"^(\d{4})-(\d{1,2})$")
_DMY_RE = re.compile(r"^(\d{1,2})[/.-](\d{1,2})[/.-](\d{4})$")


class PlanError(ValueError):
    """A plan file is invalid; ``problems`` lists every problem found, one per line."""

    def __init__(self, problems: Iterable[str], origin: str = "plan") -> None:
        self.problems = list(problems)
        self.origin = origin
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{origin}: {len(self.problems)} problem(s)\n{lines}")


@dataclass(frozen=True)
class PlanSystem:
    """One tracked system (QLVB, TTHC, email...)."""

    code: str
    abbr: str
    name_vi: str
    name_en: str
    sort: int = 0
    source: str | None = None

    def name(self, lang: str = "vi") -> str:
        return self.name_en if lang == "en" else self.name_vi


@dataclass(frozen=True)
class PlanMilestone:
    """A dated step of the plan and the stage units in its scope should have reached by then.

    ``due`` is None when the article gives no date; ``precision == "month"`` when it gives a
    month only (``due`` is then the month's last day); ``stage_required`` is None for events.
    """

    key: str
    name_vi: str
    name_en: str
    source: str
    system: str | None = None
    phase: str | None = None
    due: date | None = None
    precision: str = "day"
    stage_required: str | None = None
    scope: str = "all"
    province: str | None = None
    see_also: tuple[str, ...] = ()
    note: str | None = None

    def name(self, lang: str = "vi") -> str:
        return self.name_en if lang == "en" else self.name_vi


@dataclass(frozen=True)
class Plan:
    """Systems (sorted) and milestones (by due date, undated last)."""

    systems: tuple[PlanSystem, ...]
    milestones: tuple[PlanMilestone, ...]
    version: int = 1
    _by_code: dict[str, PlanSystem] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_code.update({s.code: s for s in self.systems})

    def system(self, code: str) -> PlanSystem | None:
        return self._by_code.get(code)

    def milestone(self, key: str) -> PlanMilestone | None:
        return next((m for m in self.milestones if m.key == key), None)

    def milestones_for(self, system_code: str | None) -> list[PlanMilestone]:
        return [m for m in self.milestones if m.system == system_code]


# ------------------------------------------------------------------------------ validation


@cache
def province_codes() -> frozenset[str]:
    """National statistics codes of the 34 provinces in force since 1 July 2025."""
    from vietnam_provinces import Province as VnProvince

    return frozenset(str(int(p.code)) for p in VnProvince.iter_all())


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def parse_due(value: Any) -> tuple[date | None, str | None]:
    """A due date from TOML/XLSX/text → (date, "month" if only a month was given, else None).

    Accepts date cells, ISO ``2025-06-15``, Vietnamese ``15/6/2025`` and ``2025-06`` (month).
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, None
    if isinstance(value, datetime):
        return value.date(), None
    if isinstance(value, date):
        return value, None
    text = str(value).strip()
    if m := _MONTH_RE.match(text):
        year, month = int(m[1]), int(m[2])
        if 1 <= month <= 12:
            return date(year, month, calendar.monthrange(year, month)[1]), "month"
    if m := _DMY_RE.match(text):
        return date(int(m[3]), int(m[2]), int(m[1])), None
    return date.fromisoformat(text), None


def _split_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list | tuple) else re.split(r"[,;\n]", str(value))
    return tuple(s for s in (str(i).strip() for i in items) if s)


def _build_system(raw: Mapping[str, Any], where: str, problems: list[str]) -> PlanSystem | None:
    before = len(problems)
    code = _text(raw.get("code"))
    if not code or not _CODE_RE.match(code):
        problems.append(f"{where}: code {code!r} must be 1-32 chars of a-z, 0-9, _")
    values: dict[str, str] = {}
    for name, limit in (("abbr", 20), ("name_vi", 200), ("name_en", 200)):
        text = _text(raw.get(name))
        if not text:
            problems.append(f"{where}: {name} is missing")
        elif len(text) > limit:
            problems.append(f"{where}: {name} is longer than {limit} characters")
        else:
            values[name] = text
    sort_raw = raw.get("sort")
    sort_text = _text(sort_raw)  # spreadsheet floats such as 10.0 arrive as "10"
    try:
        sort = int(sort_text) if sort_text is not None else 0
    except ValueError:
        problems.append(f"{where}: sort {sort_raw!r} is not a whole number")
        sort = 0
    source = _text(raw.get("source"))
    if source and len(source) > 200:
        problems.append(f"{where}: source is longer than 200 characters")
    if len(problems) > before or code is None:
        return None
    return PlanSystem(code=code, sort=sort, source=source, **values)


def _build_milestone(
    raw: Mapping[str, Any], where: str, systems: set[str], problems: list[str]
) -> PlanMilestone | None:
    before = len(problems)
    key = _text(raw.get("key"))
    if not key or not _KEY_RE.match(key):
        problems.append(f"{where}: key {key!r} must be 1-64 chars of a-z, 0-9, _ . -")
    system = _text(raw.get("system"))
    if system is not None and system not in systems:
        problems.append(f"{where}: unknown system {system!r} (known: {', '.join(sorted(systems))})")
    names: dict[str, str] = {}
    for name in ("name_vi", "name_en"):
        text = _text(raw.get(name))
        if not text:
            problems.append(f"{where}: {name} is missing")
        else:
            names[name] = text
    source = _text(raw.get("source"))
    if not source:
        problems.append(f"{where}: source is missing (cite the article the date comes from)")
    elif len(source) > 200:
        problems.append(f"{where}: source is longer than 200 characters")
    due: date | None = None
    implied: str | None = None
    try:
        due, implied = parse_due(raw.get("due"))
    except (TypeError, ValueError):
        problems.append(f"{where}: due {raw.get('due')!r} is not a date (YYYY-MM-DD or DD/MM/YYYY)")
    precision = _text(raw.get("precision")) or implied or "day"
    if precision not in PRECISIONS:
        problems.append(f"{where}: precision {precision!r} must be one of {', '.join(PRECISIONS)}")
    elif precision == "month" and due is not None:
        last = calendar.monthrange(due.year, due.month)[1]
        if due.day != last:
            problems.append(
                f"{where}: precision 'month' needs due on the month's last day "
                f"({due.replace(day=last).isoformat()}), got {due.isoformat()}"
            )
    stage = _text(raw.get("stage_required"))
    if stage is not None and stage not in STAGES:
        problems.append(f"{where}: stage_required {stage!r} must be one of {', '.join(STAGES)}")
    scope = _text(raw.get("scope")) or "all"
    province = _text(raw.get("province"))
    valid = province_codes()
    if scope.startswith("province:"):
        scoped = scope.split(":", 1)[1]
        if scoped not in valid:
            problems.append(f"{where}: scope {scope!r} names an unknown province code")
        elif province is None:
            province = scoped
        elif province != scoped:
            problems.append(f"{where}: province {province!r} differs from scope {scope!r}")
    elif scope not in ("all", "pilot"):
        problems.append(f"{where}: scope {scope!r} must be all, pilot or province:<code>")
    if province is not None and province not in valid:
        problems.append(f"{where}: province {province!r} is not a province code (e.g. 79, 68)")
    if len(problems) > before or key is None or source is None:
        return None
    return PlanMilestone(
        key=key,
        system=system,
        phase=_text(raw.get("phase")),
        due=due,
        precision=precision,
        stage_required=stage,
        scope=scope,
        province=province,
        source=source,
        see_also=_split_list(raw.get("see_also")),
        note=_text(raw.get("note")),
        **names,
    )


def build_plan(
    systems: Iterable[tuple[str, Mapping[str, Any]]],
    milestones: Iterable[tuple[str, Mapping[str, Any]]],
    origin: str = "plan",
    version: int = 1,
) -> Plan:
    """Validate raw rows (each with a label for messages) into a Plan or raise PlanError."""
    problems: list[str] = []
    built_systems: list[PlanSystem] = []
    seen: dict[str, str] = {}
    for where, raw in systems:
        code = _text(raw.get("code"))
        if code and code in seen:
            problems.append(f"{where}: duplicate system code {code!r} (also {seen[code]})")
            continue
        if code:
            seen[code] = where
        s = _build_system(raw, where, problems)
        if s is not None:
            built_systems.append(s)
    codes = set(seen)
    built: list[PlanMilestone] = []
    keys: dict[str, str] = {}
    for where, raw in milestones:
        key = _text(raw.get("key"))
        if key and key in keys:
            problems.append(f"{where}: duplicate milestone key {key!r} (also {keys[key]})")
            continue
        if key:
            keys[key] = where
        m = _build_milestone(raw, where, codes, problems)
        if m is not None:
            built.append(m)
    if problems:
        raise PlanError(problems, origin)
    built_systems.sort(key=lambda s: (s.sort, s.code))
    built.sort(key=lambda m: (m.due is None, m.due or date.max, m.key))
    return Plan(systems=tuple(built_systems), milestones=tuple(built), version=version)


def load_plan_file(path: str | Path | None = None) -> Plan:
    """Read and validate ``plan.toml`` (default: the one shipped in this package)."""
    path = Path(path) if path else PLAN_PATH
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise PlanError([f"not valid TOML: {exc}"], str(path)) from exc
    systems = raw.get("systems", [])
    milestones = raw.get("milestones", [])
    if not isinstance(systems, list) or not isinstance(milestones, list):
        raise PlanError(["use [[systems]] and [[milestones]] tables"], str(path))

    def label(kind: str, i: int, row: Mapping[str, Any]) -> str:
        ident = row.get("code") if kind == "systems" else row.get("key")
        return f"{kind}[{i}]" + (f" ({ident})" if ident else "")

    return build_plan(
        ((label("systems", i, r), r) for i, r in enumerate(systems, 1)),
        ((label("milestones", i, r), r) for i, r in enumerate(milestones, 1)),
        origin=str(path),
        version=int(raw.get("version", 1)),
    )


# -------------------------------------------------------------------------------- database


def _system_fields(s: PlanSystem) -> dict[str, Any]:
    return {
        "abbr": s.abbr,
        "name_vi": s.name_vi,
        "name_en": s.name_en,
        "sort": s.sort,
        "source": s.source,
    }


MILESTONE_DB_FIELDS = (
    "system_code",
    "phase",
    "name_vi",
    "name_en",
    "due_date",
    "stage_required",
    "scope",
    "province_code",
    "source",
)


def _milestone_fields(m: PlanMilestone) -> dict[str, Any]:
    return {
        "system_code": m.system,
        "phase": m.phase,
        "name_vi": m.name_vi,
        "name_en": m.name_en,
        "due_date": m.due,
        "stage_required": m.stage_required,
        "scope": m.scope,
        "province_code": m.province,
        "source": m.source,
    }


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, date) else v for k, v in values.items()}


async def _ensure_provinces(session: AsyncSession, actor: Actor, codes: set[str]) -> list[str]:
    """Milestones reference provinces by FK: add missing ones from the national register."""
    if not codes:
        return []
    have = set((await session.scalars(select(Province.code).where(Province.code.in_(codes)))).all())
    missing = sorted(codes - have)
    if not missing:
        return []
    from vietnam_provinces import Province as VnProvince
    from vietnam_provinces import ProvinceCode

    for code in missing:
        vp = VnProvince.from_code(ProvinceCode(int(code)))
        after = {"name": vp.name, "codename": vp.codename}
        session.add(Province(code=code, name_folded=fold(vp.name), active=True, **after))
        await audit(session, actor, "province.create", "province", code, None, after)
    return missing


async def load_plan(
    session: AsyncSession, actor: Actor, plan: Plan | None = None, *, prune: bool = False
) -> dict[str, Any]:
    """Upsert systems (by code) and milestones (by key); idempotent, audited, not committed.

    Missing provinces referenced by milestones are added from the national register.
    With ``prune`` milestones absent from the plan are deleted (audited); by default they
    are only reported, since an operator may have added them on purpose.
    """
    plan = plan or load_plan_file()
    result: dict[str, Any] = {
        "systems_created": 0,
        "systems_updated": 0,
        "systems_unchanged": 0,
        "milestones_created": 0,
        "milestones_updated": 0,
        "milestones_unchanged": 0,
        "milestones_not_in_plan": [],
        "milestones_deleted": 0,
        "provinces_created": [],
    }
    result["provinces_created"] = await _ensure_provinces(
        session, actor, {m.province for m in plan.milestones if m.province}
    )

    existing = {s.code: s for s in (await session.scalars(select(System))).all()}
    for s in plan.systems:
        wanted = _system_fields(s)
        row = existing.get(s.code)
        if row is None:
            session.add(System(code=s.code, **wanted))
            await audit(session, actor, "system.create", "system", s.code, None, wanted)
            result["systems_created"] += 1
            continue
        before = {k: getattr(row, k) for k in wanted}
        if before == wanted:
            result["systems_unchanged"] += 1
            continue
        for k, v in wanted.items():
            setattr(row, k, v)
        changed = [k for k in wanted if before[k] != wanted[k]]
        await audit(
            session,
            actor,
            "system.update",
            "system",
            s.code,
            {k: before[k] for k in changed},
            {k: wanted[k] for k in changed},
        )
        result["systems_updated"] += 1
    await session.flush()

    rows = {m.key: m for m in (await session.scalars(select(Milestone))).all()}
    for m in plan.milestones:
        wanted = _milestone_fields(m)
        mrow = rows.get(m.key)
        if mrow is None:
            session.add(Milestone(key=m.key, **wanted))
            await audit(
                session, actor, "milestone.create", "milestone", m.key, None, _jsonable(wanted)
            )
            result["milestones_created"] += 1
            continue
        before = {k: getattr(mrow, k) for k in wanted}
        if before == wanted:
            result["milestones_unchanged"] += 1
            continue
        changed = [k for k in wanted if before[k] != wanted[k]]
        for k in changed:
            setattr(mrow, k, wanted[k])
        await audit(
            session,
            actor,
            "milestone.update",
            "milestone",
            m.key,
            _jsonable({k: before[k] for k in changed}),
            _jsonable({k: wanted[k] for k in changed}),
        )
        result["milestones_updated"] += 1

    keys = {m.key for m in plan.milestones}
    extra = sorted(k for k in rows if k not in keys)
    result["milestones_not_in_plan"] = extra
    if prune:
        for k in extra:
            mrow = rows[k]
            before = _jsonable({c: getattr(mrow, c) for c in MILESTONE_DB_FIELDS})
            await session.delete(mrow)
            await audit(session, actor, "milestone.delete", "milestone", k, before, None)
            result["milestones_deleted"] += 1
    await session.flush()
    return result


async def plan_from_db(session: AsyncSession, base: Plan | None = None) -> Plan:
    """The plan as currently stored, for export; file-only fields come from ``base`` by key."""
    base = base or load_plan_file()
    systems = [
        PlanSystem(
            code=s.code,
            abbr=s.abbr,
            name_vi=s.name_vi,
            name_en=s.name_en,
            sort=s.sort,
            source=s.source,
        )
        for s in (await session.scalars(select(System))).all()
    ]
    milestones = []
    for r in (await session.scalars(select(Milestone))).all():
        known = base.milestone(r.key)
        milestones.append(
            PlanMilestone(
                key=r.key,
                system=r.system_code,
                phase=r.phase,
                name_vi=r.name_vi,
                name_en=r.name_en,
                due=r.due_date,
                precision=known.precision if known else "day",
                stage_required=r.stage_required,
                scope=r.scope,
                province=r.province_code,
                source=r.source,
                see_also=known.see_also if known else (),
                note=known.note if known else None,
            )
        )
    systems.sort(key=lambda s: (s.sort, s.code))
    milestones.sort(key=lambda m: (m.due is None, m.due or date.max, m.key))
    return Plan(systems=tuple(systems), milestones=tuple(milestones), version=base.version)


# ------------------------------------------------------------------------------------ XLSX


def _system_row(s: PlanSystem) -> list[Any]:
    return [s.code, s.abbr, s.name_vi, s.name_en, s.sort, s.source]


def _milestone_row(m: PlanMilestone) -> list[Any]:
    return [
        m.key,
        m.system,
        m.phase,
        m.name_vi,
        m.name_en,
        m.due,
        m.precision,
        m.stage_required,
        m.scope,
        m.province,
        m.source,
        ", ".join(m.see_also) or None,
        m.note,
    ]


_README = [
    ("sheet", "column", "meaning"),
    ("systems", "code", "stable id (a-z, 0-9, _); milestones refer to it"),
    ("milestones", "key", "stable id of the milestone; rows are matched by it on import"),
    ("milestones", "due", "date (YYYY-MM-DD or DD/MM/YYYY); empty if the source gives none"),
    (
        "milestones",
        "precision",
        "day, or month when the source gives a month only (due = last day)",
    ),
    ("milestones", "stage_required", ", ".join(STAGES) + "; empty for events"),
    ("milestones", "scope", "all | pilot | province:<code> (79 = TP.HCM, 68 = Lâm Đồng)"),
    ("milestones", "source", "the article the date comes from"),
]


def export_plan_xlsx(plan: Plan) -> bytes:
    """Workbook with sheets "systems" and "milestones" (plus a "readme"), for editing."""
    from openpyxl import Workbook
    from openpyxl.styles import Font

    wb = Workbook()
    sheets: list[tuple[str, Iterable[str], Iterable[list[Any]]]] = [
        ("systems", SYSTEM_COLUMNS, (_system_row(s) for s in plan.systems)),
        ("milestones", MILESTONE_COLUMNS, (_milestone_row(m) for m in plan.milestones)),
        ("readme", _README[0], (list(r) for r in _README[1:])),
    ]
    first = True
    for title, header, rows in sheets:
        ws = wb.active if first else wb.create_sheet()
        first = False
        assert ws is not None
        ws.title = title
        ws.append(list(header))
        for cell in ws[1]:
            cell.font = Font(bold=True)
        for row in rows:
            ws.append(row)
        ws.freeze_panes = "A2"
        for col in ws.columns:
            letter = col[0].column_letter
            width = max(len(str(c.value)) if c.value is not None else 0 for c in col)
            ws.column_dimensions[letter].width = min(max(width + 2, 8), 60)
            for c in col[1:]:
                if isinstance(c.value, date):
                    c.number_format = "yyyy-mm-dd"
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()


def _sheet_rows(
    wb: Any, name: str, required: tuple[str, ...], problems: list[str]
) -> list[tuple[str, dict[str, Any]]]:
    if name not in wb.sheetnames:
        problems.append(f"sheet {name!r} is missing (have: {', '.join(wb.sheetnames)})")
        return []
    rows = wb[name].iter_rows(values_only=True)
    header_row = next(rows, None)
    if header_row is None:
        problems.append(f"sheet {name!r} is empty")
        return []
    header = [str(h).strip().lower() if h is not None else "" for h in header_row]
    missing = [c for c in required if c not in header]
    if missing:
        problems.append(f"sheet {name!r}: missing column(s) {', '.join(missing)}")
        return []
    out = []
    for n, values in enumerate(rows, 2):
        if values is None or all(_text(v) is None for v in values):
            continue
        row = {h: v for h, v in zip(header, values, strict=False) if h}
        out.append((f"{name} row {n}", row))
    return out


def import_plan_xlsx(data: bytes) -> Plan:
    """Parse an edited workbook back into a validated Plan; PlanError lists bad rows."""
    from openpyxl import load_workbook

    try:
        wb = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises several unrelated types for bad files
        raise PlanError([f"not a readable XLSX file: {exc}"], "xlsx") from exc
    problems: list[str] = []
    systems = _sheet_rows(wb, "systems", ("code", "abbr", "name_vi", "name_en"), problems)
    milestones = _sheet_rows(
        wb,
        "milestones",
        ("key", "system", "name_vi", "name_en", "due", "scope", "source"),
        problems,
    )
    wb.close()
    if problems:
        raise PlanError(problems, "xlsx")
    return build_plan(systems, milestones, origin="xlsx")


def describe(plan: Plan, lang: str = "vi", fmt: Callable[[date], str] | None = None) -> list[str]:
    """One line per milestone (date, system, name) for CLI listings and reminders."""
    fmt = fmt or (lambda d: d.strftime("%d/%m/%Y"))
    lines = []
    for m in plan.milestones:
        when = (
            "—"
            if m.due is None
            else (m.due.strftime("%m/%Y") if m.precision == "month" else fmt(m.due))
        )
        sys = plan.system(m.system) if m.system else None
        lines.append(f"{when} · {sys.abbr if sys else '*'} · {m.name(lang)}")
    return lines
