"""Bulk provisioning throughput: N accounts from a staff file through the task path, against
N raw ldap3 adds on the same slapd in the same run; prints the ratio (target ≥ 0.8).

Not a test: run ``.venv/bin/python bench/bench_provision.py [--n 5000] [--pg]``.
The task path is what ``hopnhat provision FILE`` does: parse the CSV, upsert the staff,
queue one auto-approved email job each (one transaction), then the provisioning task
claims chunks, reserves addresses (committed), creates the entries, marks them done and
audits every one. The baseline is a bare loop of ``Connection.add`` calls with the same
attributes (password hashed the same way) on one connection, no database at all. The task
path pipelines its adds (services/ldap_wire.py), so a third line shows those pipelined adds
alone: the task path against it is what the database work costs.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ldap3  # noqa: E402
from ldap3.utils.hashed import hashed  # noqa: E402

from bench.common import drop_pg_database, new_pg_database  # noqa: E402
from db.migrate import upgrade_async  # noqa: E402
from db.models import Unit  # noqa: E402
from db.session import make_engine, make_sessionmaker  # noqa: E402
from services import bulk_provision, ldap_wire  # noqa: E402
from services.audit import Actor  # noqa: E402
from services.directory import LdapDirectory  # noqa: E402
from tasks.provisioning import Provisioner, temp_password  # noqa: E402
from tests.ldap_server import ADMIN_DN, ADMIN_PW, BASE_DN, SlapdServer  # noqa: E402

FAMILY = ["Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ", "Võ", "Đặng"]
MIDDLE = ["Văn", "Thị", "Hữu", "Minh", "Ngọc", "Thanh", "Đức", "Quốc"]
GIVEN = ["An", "Bình", "Cường", "Dũng", "Hà", "Hải", "Hùng", "Lan", "Long", "Mai", "Nam",
         "Phong", "Quang", "Sơn", "Tâm", "Thảo", "Trang", "Tuấn", "Vy", "Yến"]
UNITS = 20


def staff_csv(n: int) -> str:
    rnd = random.Random(5)
    lines = ["full_name,phone,unit_code,position"]
    for i in range(n):
        name = f"{rnd.choice(FAMILY)} {rnd.choice(MIDDLE)} {rnd.choice(GIVEN)}"
        lines.append(f"{name},09{i:08d},B{i % UNITS:03d},Chuyên viên")
    return "\n".join(lines) + "\n"


async def task_path(url: str, server: SlapdServer, data: bytes) -> tuple[float, int]:
    await upgrade_async(url)
    engine = make_engine(url, immediate=True)
    maker = make_sessionmaker(engine)
    async with maker() as s:
        for i in range(UNITS):
            s.add(Unit(code=f"B{i:03d}", name=f"Đơn vị {i}", name_folded=f"don vi {i}",
                       kind="ward", domain=f"dv{i}.bench.gov.vn"))
        await s.commit()
    directory = LdapDirectory(server.url, BASE_DN, ADMIN_DN, ADMIN_PW)
    worker = Provisioner(maker, directory, chunk=500)
    start = time.perf_counter()
    async with maker() as s:
        batch, _ = await bulk_provision.submit(s, data, "staff.csv", None,
                                               Actor.system("bench"))
        await s.commit()
    await worker.run_until_idle()
    elapsed = time.perf_counter() - start
    async with maker() as s:
        done = (await bulk_provision.batch_counts(s, batch)).get("done", 0)
    await directory.close()
    await engine.dispose()
    return elapsed, done


def _raw_entry(i: int, ou: str) -> tuple[str, list[str], dict[str, str]]:
    return f"uid=raw{i},ou={ou},{BASE_DN}", ["inetOrgPerson"], {
        "uid": f"raw{i}", "mail": f"raw{i}@raw.gov.vn", "cn": f"Nguyễn Văn Raw {i}",
        "sn": "Nguyễn", "givenName": "Raw", "displayName": f"Nguyễn Văn Raw {i}",
        "employeeNumber": f"raw-{i}", "title": "Chuyên viên",
        "userPassword": hashed(ldap3.HASHED_SALTED_SHA, temp_password()), "pwdReset": "TRUE"}


def raw_adds(server: SlapdServer, n: int, ou: str, pipelined: bool = False) -> float:
    """The baseline: ``Connection.add`` in a loop; ``pipelined``: the same entries through
    services.ldap_wire (what the task path uses), still without any database."""
    conn = ldap3.Connection(ldap3.Server(server.url.rstrip("/")), ADMIN_DN, ADMIN_PW,
                            auto_bind=True)
    conn.add(BASE_DN, ["dcObject", "organization"], {"dc": "hopnhat", "o": "hopnhat"})
    conn.add(f"ou={ou},{BASE_DN}", ["organizationalUnit"], {"ou": ou})
    start = time.perf_counter()
    if pipelined:
        for _i, result in ldap_wire.add_many(conn, (_raw_entry(i, ou) for i in range(n))):
            assert result["result"] == 0, result
    else:
        for i in range(n):
            ok = conn.add(*_raw_entry(i, ou))
            assert ok, conn.result
    elapsed = time.perf_counter() - start
    conn.unbind()
    return elapsed


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--pg", action="store_true", help="PostgreSQL instead of SQLite")
    args = ap.parse_args()
    server = SlapdServer().start()
    pg_name = None
    try:
        if args.pg:
            url, pg_name = await new_pg_database()
        else:
            url = f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='bench-prov-')}/b.db"
        data = staff_csv(args.n).encode()
        # baseline before and after the task path (the machine is shared: load drifts),
        # so the directory holds as many entries on average for both
        raw1 = await asyncio.to_thread(raw_adds, server, args.n, "raw1")
        task_s, done = await task_path(url, server, data)
        raw2 = await asyncio.to_thread(raw_adds, server, args.n, "raw2")
        raw_s = (raw1 + raw2) / 2
        piped = await asyncio.to_thread(raw_adds, server, args.n, "raw3", True)
        print(f"accounts: {args.n} ({'PostgreSQL' if args.pg else 'SQLite'}), "
              f"slapd mdb on loopback")
        print(f"task path : {task_s:7.2f} s  {args.n / task_s:8.0f} accounts/s  ({done} done)")
        print(f"raw ldap3 : {raw_s:7.2f} s  {args.n / raw_s:8.0f} adds/s  "
              f"(before {raw1:.2f} s, after {raw2:.2f} s)")
        print(f"pipelined : {piped:7.2f} s  {args.n / piped:8.0f} adds/s  "
              f"(services.ldap_wire alone, no database)")
        print(f"ratio task/raw throughput: {raw_s / task_s:.2f} (target >= 0.8)")
        print(f"ratio task/pipelined     : {piped / task_s:.2f} (the database's share)")
    finally:
        server.cleanup()
        if pg_name:
            await drop_pg_database(pg_name)


if __name__ == "__main__":
    asyncio.run(main())
