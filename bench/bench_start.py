"""Updates/s of /start by verified users (DB-backed) vs a bare aiogram echo bot, through the
same emulator in the same run, on SQLite and PostgreSQL. Prints the ratio (target ≥ 0.5).

    python bench/bench_start.py [--users 100] [--per-user 10] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

from common import drop_pg_database, measure, new_pg_database, reset_inbox, show

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
            # the name the emulator gives them (bench/common.py), as recorded at first contact
            s.add(ChatIdentity(channel="telegram", external_id=str(uid), person_id=p.id,
                               display_name=f"U{uid}"))
        await s.commit()
    await engine.dispose()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--per-user", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1,
                    help="echo and both backends measured in turn this many times, so a "
                         "shared machine's load hits them alike; ratios are per round")
    a = ap.parse_args()
    users = [BASE_USER + i for i in range(a.users)]
    tmp = Path(tempfile.mkdtemp(prefix="hopnhat-bench-"))
    urls: dict[str, str] = {"sqlite": f"sqlite+aiosqlite:///{tmp / 'bench.db'}"}
    pg_url, pg_name = await new_pg_database()
    urls["postgresql"] = pg_url
    ratios: dict[str, list[float]] = {b: [] for b in urls}
    try:
        for url in urls.values():
            await seed(url, users)
        print(f"{len(users) * a.per_user} updates from {len(users)} users")
        for rnd in range(a.rounds):
            if a.rounds > 1:
                print(f"round {rnd + 1}/{a.rounds}")
            echo = (await measure(["bench/echo_bot.py"], {}, users, a.per_user, ["xin chào"],
                                  tmp / "echo.log"))["xin chào"]
            show("echo (aiogram, no DB)", echo)
            for backend, url in urls.items():
                await reset_inbox(url)
                r = (await measure(["-m", "bot", "run"], {"HOPNHAT_DATABASE_URL": url}, users,
                                   a.per_user, ["/start"], tmp / f"bot-{backend}.log"))["/start"]
                show(f"/start on {backend}", r)
                ratios[backend].append(r["per_sec"] / echo["per_sec"])
                print(f"  ratio /start({backend}) / echo = {ratios[backend][-1]:.2f}"
                      f"   (target ≥ 0.5)")
    finally:
        await drop_pg_database(pg_name)
    if a.rounds > 1:
        for backend, rs in ratios.items():
            print(f"ratio /start({backend}) / echo over {a.rounds} rounds: median "
                  f"{statistics.median(rs):.2f}, range {min(rs):.2f}-{max(rs):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
