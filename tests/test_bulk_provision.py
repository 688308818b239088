"""Bulk accounts from a staff list: the dry run's four lists, and `hopnhat provision` as a
real process against a real slapd, writing the result XLSX (addresses, no passwords)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from openpyxl import load_workbook
from sqlalchemy import func, select

from db.models import Account, Person, ProvisioningRequest, Unit
from services import bulk_provision
from services.directory import NewEntry
from services.folding import fold
from tests.ldap_server import ADMIN_DN, ADMIN_PW, BASE_DN, ldap_search

ROOT = Path(__file__).resolve().parent.parent
U1, U2, U3 = "91001", "91002", "91003"
CSV = (
    "full_name,phone,unit_code,position\n"
    "Nguyễn Văn An,0912000001,91001,Văn thư\n"
    "Nguyễn Văn An,0912000002,91002,Chuyên viên\n"  # same name: numbered
    "Trần Thị Bình,0912000003,91001,\n"  # already has a mailbox
    "Lê Văn Cường,12,91001,\n"  # bad phone
    "Phạm Minh Dũng,0912000005,91003,\n"  # unit without a domain
    "*)(uid=* Hoà,0912000006,91002,\n"  # metacharacters, stored literally
)


async def seed(maker) -> None:
    async with maker() as s:
        s.add_all([
            Unit(code=U1, name="Phường Một", name_folded="phuong mot", kind="ward",
                 domain="mot.gov.vn"),
            Unit(code=U2, name="Xã Hai", name_folded="xa hai", kind="commune",
                 domain="hai.gov.vn"),
            Unit(code=U3, name="Xã Ba", name_folded="xa ba", kind="commune"),
        ])
        await s.flush()
        binh = Person(full_name="Trần Thị Bình", name_folded=fold("Trần Thị Bình"),
                      phone="+84912000003", unit_code=U1)
        s.add(binh)
        await s.flush()
        s.add(Account(person_id=binh.id, system_code="email", login="binhtt",
                      address="binhtt@mot.gov.vn", status="active", request_id=None))
        await s.commit()


async def test_dry_run_lists(sessionmaker, directory):
    await seed(sessionmaker)
    await directory.create(NewEntry(uid="annv", mail="annv@x.gov.vn", full_name="Ngô Văn An",
                                    unit_code="x", employee="x"), "Pre-existing-123")
    async with sessionmaker() as s:
        # the pre-2025 mailbox (request_id None) does not count as "has an account"
        p = await bulk_provision.plan(s, directory, CSV.encode(), "staff.csv")
        assert [r.address for r in p.create] == ["annv1@mot.gov.vn", "annv2@hai.gov.vn",
                                                 "binhtt1@mot.gov.vn", "hoau@hai.gov.vn"]
        assert [r.row for r in p.collisions] == [2, 3, 4]
        assert [e.row for e in p.report.errors] == [5]
        assert [(r.row, r.note) for r in p.invalid] == [(6, "prov.err_no_domain")]
        assert p.existing == []
        assert await s.scalar(select(func.count()).select_from(ProvisioningRequest)) == 0


def hopnhat(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bot", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


async def test_cli_provision_dry_run_then_create(sessionmaker, db_url, slapd_server,
                                                 directory, tmp_path):
    await seed(sessionmaker)
    f = tmp_path / "staff.csv"
    f.write_text(CSV, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOPNHAT_DATABASE_URL": db_url,
           "HOPNHAT_LDAP_URL": slapd_server.url, "HOPNHAT_LDAP_BASE_DN": BASE_DN,
           "HOPNHAT_LDAP_BIND_DN": ADMIN_DN, "HOPNHAT_LDAP_PASSWORD": ADMIN_PW}
    env.pop("HOPNHAT_BOT_TOKEN", None)
    r = hopnhat(env, tmp_path, "provision", str(f), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "accounts to create: 4" in r.stdout and "address collisions: 2" in r.stdout
    assert "invalid rows: 2" in r.stdout and "Dry run" in r.stdout
    assert ldap_search(slapd_server, "(objectClass=inetOrgPerson)") == []
    r = hopnhat(env, tmp_path, "provision", str(f))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4/4" in r.stdout and "done 4" in r.stdout
    assert ADMIN_PW not in r.stdout + r.stderr
    mails = sorted(e["mail"][0] for e in ldap_search(slapd_server, "(employeeNumber=*)",
                                                    ["mail"]))
    assert mails == ["annv1@hai.gov.vn", "annv@mot.gov.vn", "binhtt1@mot.gov.vn",
                     "hoau@hai.gov.vn"]
    [odd] = ldap_search(slapd_server, "(mail=hoau@hai.gov.vn)", ["cn"])
    assert odd["cn"] == ["*)(uid=* Hoà"]
    wb = load_workbook(io.BytesIO((tmp_path / "staff-accounts.xlsx").read_bytes()))
    rows = list(wb.active.iter_rows(values_only=True))
    assert rows[0][:6] == ("full_name", "phone", "unit_code", "unit", "address", "state")
    assert sorted(r[4] for r in rows[1:]) == sorted(mails)
    assert all(r[5] == "hoàn thành" for r in rows[1:])
    # again: everyone has an account now, nothing new
    r = hopnhat(env, tmp_path, "provision", str(f), "--dry-run")
    assert "accounts to create: 0" in r.stdout and "already have an account: 4" in r.stdout
    async with sessionmaker() as s:
        assert await s.scalar(select(func.count()).select_from(Account).where(
            Account.request_id.is_not(None))) == 4
