"""Updates/s of /start by verified users (DB-backed) vs a bare aiogram echo bot, through the
same emulator in the same run, on SQLite and PostgreSQL. Prints the ratio (target ≥ 0.5).

    python bench/bench_start.py [--users 100] [--per-user 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

from common import TOKEN, drive, drop_pg_database, new_pg_database, spawn

from bot.emulator import Emulator
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


async def measure(args: list[str], env: dict[str, str], users: list[int], per_user: int,
                  text: str, log: Path) -> dict[str, float]:
    emu = Emulator()
    url = await emu.start()
    for u in users:
        emu.add_user(u, f"U{u}")
    prof = os.environ.get("BENCH_PROFILE")
    if prof and args[0] == "-m":
        args = ["/tmp/prof_bot.py"]
        env = {**env, "PROF_OUT": prof}
    proc = spawn(args, {"HOPNHAT_BOT_TOKEN": TOKEN, "HOPNHAT_TELEGRAM_API_URL": url,
                        "HOPNHAT_LOG_LEVEL": "WARNING", **env}, log)
    try:
        await emu.wait_for_call("getMe", timeout=60)
        await asyncio.sleep(1.0)
        await drive(emu, users[:5], 1, text)  # warm-up
        cpu0 = cpu_seconds(proc.pid)
        r = await drive(emu, users, per_user, text)
        r["cpu_ms_per_update"] = 1000 * (cpu_seconds(proc.pid) - cpu0) / r["updates"]
        return r
    finally:
        proc.terminate()
        proc.wait(20)
        await emu.stop()


def cpu_seconds(pid: int) -> float:
    """User+system CPU of a process (Linux /proc), to tell CPU-bound from waiting."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def show(name: str, r: dict[str, float]) -> None:
    print(f"  {name:<22} {r['per_sec']:8.1f} updates/s   p50 {r.get('p50_ms', 0):7.1f} ms"
          f"   p99 {r.get('p99_ms', 0):7.1f} ms   bot CPU {r['cpu_ms_per_update']:.2f} ms/update")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--per-user", type=int, default=10)
    a = ap.parse_args()
    users = [BASE_USER + i for i in range(a.users)]
    tmp = Path(tempfile.mkdtemp(prefix="hopnhat-bench-"))
    echo = await measure(["bench/echo_bot.py"], {}, users, a.per_user, "xin chào", tmp / "echo.log")
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
            r = await measure(["-m", "bot", "run"], {"HOPNHAT_DATABASE_URL": url}, users,
                              a.per_user, "/start", tmp / f"bot-{backend}.log")
            show(f"/start on {backend}", r)
            print(f"  ratio /start({backend}) / echo = {r['per_sec'] / echo['per_sec']:.2f}"
                  f"   (target ≥ 0.5)")
        finally:
            if pg_name:
                await drop_pg_database(pg_name)


if __name__ == "__main__":
    asyncio.run(main())
