"""Updates/s of /start by verified users (DB-backed) vs a bare aiogram echo bot, through the
same emulator in the same run, on SQLite and PostgreSQL. Prints the ratio (target ≥ 0.5).

    python bench/bench_start.py [--users 100] [--per-user 10]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from common import drop_pg_database, measure, new_pg_database, show

from db.migrate import upgrade_async
from db.models import ChatIdentity, Person, utcnow
from db.session import make_engine, make_sessionmaker
from services.audit import Actor
from services.register import load_national_register

BASE_USER = 800000


async def seed(url: str, users: list[int]) -> None:
    await upgrade_async(url)
    engine = make_engine(url)
    async with make_sessionmaker(engine)() as s:
        await load_national_register(s, Actor.system("bench"))
        for i, uid in enumerate(users):
            p = Person(full_name=f"Cán bộ {i}", name_folded=f"can bo {i}",
                       phone=f"+8490{uid:07d}", unit_code="26743", role="official",
                       verified_at=utcnow())
            s.add(p)
            await s.flush()
            s.add(ChatIdentity(channel="telegram", external_id=str(uid), person_id=p.id))
        await s.commit()
    await engine.dispose()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--per-user", type=int, default=10)
    a = ap.parse_args()
    users = [BASE_USER + i for i in range(a.users)]
    tmp = Path(tempfile.mkdtemp(prefix="hopnhat-bench-"))
    echo = (await measure(["bench/echo_bot.py"], {}, users, a.per_user, ["xin chào"],
                          tmp / "echo.log"))["xin chào"]
    print(f"{len(users) * a.per_user} updates from {len(users)} users")
    show("echo (aiogram, no DB)", echo)
    for backend in ("sqlite", "postgresql"):
        pg_name = None
        if backend == "sqlite":
            url = f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
        else:
            url, pg_name = await new_pg_database()
        try:
            await seed(url, users)
            r = (await measure(["-m", "bot", "run"], {"HOPNHAT_DATABASE_URL": url}, users,
                               a.per_user, ["/start"], tmp / f"bot-{backend}.log"))["/start"]
            show(f"/start on {backend}", r)
            print(f"  ratio /start({backend}) / echo = {r['per_sec'] / echo['per_sec']:.2f}"
                  f"   (target ≥ 0.5)")
        finally:
            if pg_name:
                await drop_pg_database(pg_name)


if __name__ == "__main__":
    asyncio.run(main())
