"""The national register of administrative units, loaded from the PyPI packages.

Why from packages: the 34 provinces and 3,321 commune-level units in force since 1 July 2025 are
public data (``vietnam-provinces``), and ``vietnamadminunits`` knows the 63-province era units
and which new unit each became, so officials who still say "Phường Bến Nghé, Quận 1" are
understood.

Code scheme (documented, stable):

- provinces: national statistics code zero-padded to 2 digits ("01", "79");
- new wards/communes/special zones: national statistics code zero-padded to 5 ("26743");
- pre-2025 wards: ``old-w-<5-digit old code>`` ("old-w-26734"), pre-2025 districts:
  ``old-d-<3-digit old code>`` ("old-d-760"). New codes are digits only and imports reject the
  ``old-`` prefix, so they cannot collide. The prefix is needed: the new national codes reuse
  old ward codes (new "25747" Phường Thủ Dầu Một took old Phường Phú Cường's code).

Old units are ``active=False``. An old ward's ``merged_into`` is the new unit it became; when an
old ward was split, the package marks one part as the default (``isDefaultNewWard``, the main
part) and that one is used (the first listed if none were marked, which the data never does).
Its ``parent_code`` is its old district. Old districts have no ``merged_into`` (they were
abolished, not merged), except the five island districts that became special zones. Old units'
``province_code`` is the NEW province. Their names carry the old district (and the old province
when it differs from the new one) so a list of them is unambiguous:
"Phường Phú Cường, Thành phố Thủ Dầu Một, Tỉnh Bình Dương".
"""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

from sqlalchemy import Table, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import Province, Unit, UnitKind, utcnow
from services.audit import Actor, audit
from services.folding import clean_name, fold

OLD_WARD_PREFIX = "old-w-"
OLD_DISTRICT_PREFIX = "old-d-"
OLD_PREFIX = "old-"
NEW_KINDS = (UnitKind.ward, UnitKind.commune, UnitKind.special_zone)
_DIVISION_KIND = {"xã": UnitKind.commune, "phường": UnitKind.ward, "đặc khu": UnitKind.special_zone}
# Columns the register owns; domain, e-ID code and old domains belong to operators' imports.
_UNIT_FIELDS = (
    "name",
    "name_folded",
    "kind",
    "province_code",
    "parent_code",
    "merged_into",
    "active",
    "source",
)
_PROVINCE_FIELDS = ("name", "name_folded", "codename", "active")
_CHUNK = 500


@dataclass
class KindCounts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0


@dataclass
class RegisterStats:
    """What a load changed, per kind ("province", "ward", "commune", ...)."""

    by_kind: dict[str, KindCounts] = field(default_factory=dict)
    deactivated: int = 0
    seconds: float = 0.0
    source: str = ""

    @property
    def created(self) -> int:
        return sum(c.created for c in self.by_kind.values())

    @property
    def updated(self) -> int:
        return sum(c.updated for c in self.by_kind.values())

    @property
    def unchanged(self) -> int:
        return sum(c.unchanged for c in self.by_kind.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "by_kind": {k: vars(v).copy() for k, v in self.by_kind.items()},
            "deactivated": self.deactivated,
        }


@dataclass(frozen=True)
class OldUnitRecord:
    """One pre-2025 unit from vietnamadminunits with the new unit it became."""

    code: str
    kind: UnitKind
    name: str
    own_name: str
    district_name: str | None
    province_name: str
    parent_code: str | None
    merged_into: str | None
    province_code: str


@dataclass(frozen=True)
class RegisterData:
    """Everything the load writes, computed once per process from the packages."""

    provinces: list[dict[str, Any]]
    units: list[dict[str, Any]]
    old_units: list[OldUnitRecord]
    new_source: str
    old_source: str


def province_code(value: int | str) -> str:
    return f"{int(value):02d}"


def ward_code(value: int | str) -> str:
    return f"{int(value):05d}"


def new_source_label() -> str:
    import vietnam_provinces

    return f"vietnam-provinces {vietnam_provinces.__data_version__}"


def _new_units() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from vietnam_provinces import Province as VP
    from vietnam_provinces import Ward as VW

    source = new_source_label()
    provinces = [
        {
            "code": province_code(p.code.value),
            "name": clean_name(p.name),
            "name_folded": fold(p.name),
            "codename": p.codename,
            "active": True,
        }
        for p in VP.iter_all()
    ]
    units = [
        {
            "code": ward_code(w.code.value),
            "name": clean_name(w.name),
            "name_folded": fold(w.name),
            "kind": _DIVISION_KIND[w.division_type.value].value,
            "province_code": province_code(w.province_code.value),
            "parent_code": None,
            "merged_into": None,
            "active": True,
            "source": source,
        }
        for w in VW.iter_all()
    ]
    return provinces, units


def _vau_path(name: str) -> Path:
    """A data file of vietnamadminunits, found without importing it (its import takes ~1 s)."""
    spec = importlib.util.find_spec("vietnamadminunits")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("vietnamadminunits is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / name


def _new_key_index(
    conn: sqlite3.Connection, units: list[dict[str, Any]]
) -> tuple[dict[tuple[str, str], str], dict[str, str]]:
    """Map vietnamadminunits' (province key, ward key) to vietnam-provinces codes.

    The two packages disagree on ~130 codes (and some tone-mark spellings), so match by exact
    name within the province, then by folded name, then by code among same-name candidates.
    Also returns the new-province key → province code map.
    """
    by_exact: dict[tuple[str, str], list[str]] = {}
    by_folded: dict[tuple[str, str], list[str]] = {}
    for u in units:
        by_exact.setdefault((u["province_code"], u["name"]), []).append(u["code"])
        by_folded.setdefault((u["province_code"], u["name_folded"]), []).append(u["code"])
    index: dict[tuple[str, str], str] = {}
    province_keys: dict[str, str] = {}
    rows = conn.execute(
        "SELECT provinceKey, wardKey, ward, wardCode, provinceCode FROM admin_units"
    ).fetchall()
    for pkey, wkey, name, code, pcode in rows:
        pc = province_code(pcode)
        province_keys[pkey] = pc
        cands = by_exact.get((pc, clean_name(name))) or by_folded.get((pc, fold(name))) or []
        if len(cands) > 1:
            cands = [c for c in cands if c == ward_code(code)] or cands[:1]
        if cands:
            index[(pkey, wkey)] = cands[0]
    return index, province_keys


def _old_units(units: list[dict[str, Any]], old_source: str) -> list[OldUnitRecord]:
    uri = _vau_path("dataset.db").as_uri() + "?mode=ro"
    with _vau_path("converter_2025.json").open(encoding="utf-8") as f:
        conv = json.load(f)
    conn = sqlite3.connect(uri, uri=True)
    try:
        new_index, new_province_keys = _new_key_index(conn, units)
        legacy = conn.execute(
            "SELECT provinceKey, districtKey, wardKey, wardCode, districtCode, provinceCode,"
            " ward, district, province FROM admin_units_legacy"
            " ORDER BY provinceCode, districtCode, wardCode"
        ).fetchall()
    finally:
        conn.close()
    old_prov_to_new = {
        old: new_province_keys[new]
        for new, olds in conv["DICT_PROVINCE"].items()
        for old in olds
        if new in new_province_keys
    }
    # old "province_district_ward" key → new unit code
    old_to_new: dict[str, str] = {}
    for pkey, wards in conv["DICT_PROVINCE_WARD_NO_DIVIDED"].items():
        for wkey, olds in wards.items():
            code = new_index.get((pkey, wkey))
            if code:
                for old in olds:
                    old_to_new[old] = code
    for pkey, divided in conv["DICT_PROVINCE_WARD_DIVIDED"].items():
        for old, parts in divided.items():
            first = parts[0] if parts else None
            main = next((p for p in parts if p.get("isDefaultNewWard")), first)
            code = main and new_index.get((pkey, main["newWardKey"]))
            if code:
                old_to_new[old] = code

    unit_province = {u["code"]: u["province_code"] for u in units}
    records: list[OldUnitRecord] = []
    seen_districts: set[str] = set()
    for pkey, dkey, wkey, wcode, dcode, pcode, wname, dname, pname in legacy:
        new_pc = old_prov_to_new.get(pkey)
        if not new_pc or not dcode:
            continue
        suffix = "" if province_code(pcode) == new_pc else f", {clean_name(pname)}"
        dcode_s = OLD_DISTRICT_PREFIX + f"{int(dcode):03d}"
        target = old_to_new.get(f"{pkey}_{dkey}_{wkey or ''}")
        if dcode_s not in seen_districts:
            seen_districts.add(dcode_s)
            records.append(
                OldUnitRecord(
                    code=dcode_s,
                    kind=UnitKind.old_district,
                    name=clean_name(dname) + suffix,
                    own_name=clean_name(dname),
                    district_name=None,
                    province_name=clean_name(pname),
                    parent_code=None,
                    # only the island districts became one unit (a special zone)
                    merged_into=None if wkey else target,
                    province_code=new_pc,
                )
            )
        if not wkey or not wcode:
            continue
        records.append(
            OldUnitRecord(
                code=OLD_WARD_PREFIX + ward_code(wcode),
                kind=UnitKind.old_ward,
                name=f"{clean_name(wname)}, {clean_name(dname)}{suffix}",
                own_name=clean_name(wname),
                district_name=clean_name(dname),
                province_name=clean_name(pname),
                parent_code=dcode_s,
                merged_into=target,
                province_code=unit_province.get(target or "", new_pc),
            )
        )
    return records


@lru_cache(maxsize=1)
def register_data() -> RegisterData:
    """Parse both packages once per process (about 0.2 s); the data is immutable."""
    provinces, units = _new_units()
    old_source = f"vietnamadminunits {version('vietnamadminunits')}"
    old = _old_units(units, old_source)
    return RegisterData(provinces, units, old, new_source_label(), old_source)


@lru_cache(maxsize=1)
def old_units_by_code() -> dict[str, OldUnitRecord]:
    """Old unit records by their register code ("old-w-26734", "old-d-760")."""
    return {r.code: r for r in register_data().old_units}


@lru_cache(maxsize=1)
def new_units_by_code() -> dict[str, tuple[dict[str, Any], dict[str, Any] | None]]:
    """New unit rows by code, each with its province row."""
    data = register_data()
    provinces = {p["code"]: p for p in data.provinces}
    return {u["code"]: (u, provinces.get(u["province_code"])) for u in data.units}


def old_unit_rows(data: RegisterData) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Old districts and old wards as unit rows (districts first: wards reference them)."""
    districts: list[dict[str, Any]] = []
    wards: list[dict[str, Any]] = []
    for r in data.old_units:
        row = {
            "code": r.code,
            "name": r.name,
            "name_folded": fold(r.name),
            "kind": r.kind.value,
            "province_code": r.province_code,
            "parent_code": r.parent_code,
            "merged_into": r.merged_into,
            "active": False,
            "source": data.old_source,
        }
        (districts if r.kind is UnitKind.old_district else wards).append(row)
    return districts, wards


def _chunks(rows: Sequence[dict[str, Any]], size: int) -> Iterable[Sequence[dict[str, Any]]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


async def upsert_rows(
    session: AsyncSession,
    table: Table,
    rows: Sequence[dict[str, Any]],
    key: Sequence[str],
    *,
    chunk: int = _CHUNK,
) -> None:
    """INSERT .. ON CONFLICT (key) DO UPDATE, executemany in batches (SQLite and PostgreSQL).

    Every row must have the same keys; all non-key columns given are overwritten. One
    executemany per batch is ~5x faster than multi-VALUES statements (no per-batch compile).
    Rows are written in order, so a row may reference one from an earlier batch.
    """
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - the project supports these two only
        raise RuntimeError(f"unsupported database dialect {dialect!r}")
    size = max(1, chunk)
    stmt = insert(table)
    update = {c: stmt.excluded[c] for c in rows[0] if c not in key}
    if update:
        stmt = stmt.on_conflict_do_update(index_elements=list(key), set_=update)
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(key))
    for part in _chunks(rows, size):
        await session.execute(stmt, list(part))


def _diff(
    rows: list[dict[str, Any]],
    existing: dict[str, tuple[Any, ...]],
    fields: Sequence[str],
    counts: dict[str, KindCounts],
    kind_of: Callable[[dict[str, Any]], str],
) -> list[dict[str, Any]]:
    """Rows that are new or differ from the stored ones; counts them per kind."""
    out: list[dict[str, Any]] = []
    for row in rows:
        c = counts.setdefault(kind_of(row), KindCounts())
        old = existing.get(row["code"])
        if old is None:
            c.created += 1
            out.append(row)
        elif old != tuple(row[f] for f in fields):
            c.updated += 1
            out.append(row)
        else:
            c.unchanged += 1
    return out


async def load_national_register(session: AsyncSession, actor: Actor) -> RegisterStats:
    """Upsert provinces, new units and defunct old units; writes only rows that differ.

    Idempotent and bulk (a few thousand rows per statement batch). Units of the register that
    the current package no longer lists are deactivated, never deleted (people reference them).
    One audit row summarises the load; per-unit audit rows would be 14k rows of noise.
    """
    started = time.perf_counter()
    data = register_data()
    stats = RegisterStats(source=data.new_source)
    now = utcnow()

    prov_rows = data.provinces
    stored_p = {
        r[0]: tuple(r[1:])
        for r in await session.execute(
            select(Province.code, *(getattr(Province, f) for f in _PROVINCE_FIELDS))
        )
    }
    changed_p = _diff(prov_rows, stored_p, _PROVINCE_FIELDS, stats.by_kind, lambda _: "province")
    await upsert_rows(session, Province.__table__, changed_p, ["code"])  # type: ignore[arg-type]

    stored_u = {
        r[0]: tuple(r[1:])
        for r in await session.execute(
            select(Unit.code, *(getattr(Unit, f) for f in _UNIT_FIELDS))
        )
    }
    districts, old_wards = old_unit_rows(data)
    # Order matters for the self-referencing foreign keys: targets before referrers.
    for batch in (data.units, districts, old_wards):
        changed = _diff(batch, stored_u, _UNIT_FIELDS, stats.by_kind, lambda r: r["kind"])
        stamped = [dict(row, updated_at=now) for row in changed]  # the cached rows stay as is
        await upsert_rows(session, Unit.__table__, stamped, ["code"])  # type: ignore[arg-type]

    current = {u["code"] for u in data.units}
    stale = [
        code
        for code, values in stored_u.items()
        if code not in current
        and values[_UNIT_FIELDS.index("kind")] in {k.value for k in NEW_KINDS}
        and (values[_UNIT_FIELDS.index("source")] or "").startswith("vietnam-provinces")
        and values[_UNIT_FIELDS.index("active")]
    ]
    if stale:
        await session.execute(
            update(Unit).where(Unit.code.in_(stale)).values(active=False, updated_at=now)
        )
    stats.deactivated = len(stale)
    stats.seconds = time.perf_counter() - started
    await audit(session, actor, "register.load", "register", data.new_source, after=stats.as_dict())
    return stats
