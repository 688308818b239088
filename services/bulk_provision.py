"""Bulk accounts from a staff list (CSV/XLSX, the staff import's format and parser): a dry
run (accounts to create, address collisions, invalid rows, people who already have one),
then the people upserted and one auto-approved email job per person in one batch, executed
by the provisioning task; the result is an XLSX of addresses (never passwords)."""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import Account, AccountStatus, Person, ProvisioningRequest, Unit
from services import imports, provisioning
from services.addresses import DEFAULT_PATTERN, AddressError, local_part, numbered
from services.audit import Actor, audit
from services.directory import Directory
from services.phones import PhoneError, normalize_phone


@dataclass
class PlanRow:
    row: int
    full_name: str
    phone: str
    unit_code: str
    address: str | None = None
    note: str | None = None


@dataclass
class BulkPlan:
    report: imports.ImportReport  # the staff list's own validation (invalid rows)
    create: list[PlanRow] = field(default_factory=list)
    collisions: list[PlanRow] = field(default_factory=list)  # subset of create, numbered
    existing: list[PlanRow] = field(default_factory=list)  # already have an active mailbox
    invalid: list[PlanRow] = field(default_factory=list)  # valid staff rows we cannot serve


async def plan(session: AsyncSession, directory: Directory | None, data: bytes, filename: str,
               *, pattern: str = DEFAULT_PATTERN, mail_domain: str | None = None,
               report: imports.ImportReport | None = None) -> BulkPlan:
    """What a bulk run would do; changes nothing (the staff import runs as a dry run, unless
    the caller already imported the file and passes its ``report``)."""
    if report is None:
        report = await imports.import_staff(session, data, filename, Actor.system("dry-run"),
                                            dry_run=True)
    out = BulkPlan(report)
    bad_rows = {e.row for e in report.errors}
    table = imports.read_table(data, filename, imports.STAFF)
    cols = table.columns
    units = {u.code: u for u in await session.scalars(select(Unit))}
    lower = {c.lower(): c for c in units}
    rows: list[PlanRow] = []
    for number, cells in table.rows:
        if number in bad_rows:
            continue
        name = imports._cell(cells, cols, "full_name")
        try:
            phone = normalize_phone(imports._cell(cells, cols, "phone"))
        except PhoneError:
            continue
        code = imports._lookup_code(imports._cell(cells, cols, "unit_code"), units, lower)
        if code is None:
            continue
        rows.append(PlanRow(number, " ".join(name.split()), phone, code))
    people = {p.phone: p for p in await session.scalars(
        select(Person).where(Person.phone.in_([r.phone for r in rows])))} if rows else {}
    with_mail = {a.person_id: a for a in await session.scalars(select(Account).where(
        Account.system_code == "email", Account.status == AccountStatus.active.value,
        Account.request_id.is_not(None)))}
    bases: dict[int, str] = {}
    for r in rows:
        p = people.get(r.phone)
        if p is not None and p.id in with_mail:
            r.address = with_mail[p.id].address
            out.existing.append(r)
            continue
        unit = units[r.unit_code]
        if not (unit.domain or mail_domain):
            r.note = "prov.err_no_domain"
            out.invalid.append(r)
            continue
        try:
            bases[r.row] = local_part(r.full_name, pattern)
        except AddressError:
            r.note = "prov.err_address"
            out.invalid.append(r)
            continue
        out.create.append(r)
    taken: set[str] = set(await session.scalars(select(Account.login).where(
        Account.system_code == "email")))
    if directory is not None and bases:
        taken |= await directory.taken_uids_many(list(set(bases.values())))
    for r in out.create:
        uid = numbered(bases[r.row], taken)
        taken.add(uid)
        r.address = f"{uid}@{units[r.unit_code].domain or mail_domain}"
        if uid != bases[r.row]:
            out.collisions.append(r)
    return out


async def submit(session: AsyncSession, data: bytes, filename: str, operator: Person | None,
                 actor: Actor, *, pattern: str = DEFAULT_PATTERN,
                 mail_domain: str | None = None) -> tuple[str, BulkPlan]:
    """Upsert the staff (valid rows only) and queue one email job per person who needs one,
    all in the caller's transaction; returns the batch id."""
    report = await imports.import_staff(session, data, filename, actor, skip_invalid=True)
    p = await plan(session, None, data, filename, pattern=pattern, mail_domain=mail_domain,
                   report=report)
    batch = f"bulk-{uuid.uuid4().hex[:12]}"
    phones = [r.phone for r in p.create]
    people = {x.phone: x for x in await session.scalars(
        select(Person).where(Person.phone.in_(phones)))} if phones else {}
    skipped = set(await provisioning.create_email_batch(
        session, operator, [people[r.phone] for r in p.create], actor=actor, batch=batch))
    for r in p.create:
        if people[r.phone].id in skipped:
            r.note = "prov.err_duplicate"  # an email request already open for this person
    await audit(session, actor, "provisioning.bulk", "batch", batch,
                after={"file": filename, "create": len(p.create), "existing": len(p.existing),
                       "invalid_rows": p.report.error_rows + len(p.invalid)})
    return batch, p


async def batch_counts(session: AsyncSession, batch: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for state in await session.scalars(select(ProvisioningRequest.state).where(
            ProvisioningRequest.batch == batch)):
        out[state] = out.get(state, 0) + 1
    return out


async def result_xlsx(session: AsyncSession, batch: str, lang: str = "vi") -> bytes:
    """One row per person of the batch: name, phone, unit, address, state (no passwords)."""
    from openpyxl import Workbook

    from services.texts import t

    wb = Workbook(write_only=True)
    ws = wb.create_sheet("accounts")
    ws.append(["full_name", "phone", "unit_code", "unit", "address", "state", "error"])
    rows = await session.execute(
        select(ProvisioningRequest, Person, Unit)
        .join(Person, Person.id == ProvisioningRequest.subject_id)
        .outerjoin(Unit, Unit.code == ProvisioningRequest.unit_code)
        .where(ProvisioningRequest.batch == batch).order_by(ProvisioningRequest.id))
    for req, person, unit in rows:
        res = req.result or {}
        err = res.get("error")
        ws.append([person.full_name, person.phone, req.unit_code, unit.name if unit else None,
                   res.get("address"), t(f"prov.state_{req.state}", lang),
                   t(err, lang) if err and err.startswith("prov.") else err])
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()
