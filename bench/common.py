"""Shared benchmark plumbing: an in-process emulator driving a bot in a child process."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "1234567890:BENCH-hopnhat-token-abcdefghijklmnopqrstu"
PG_ADMIN = os.environ.get("HOPNHAT_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
sys.path.insert(0, str(ROOT))

from bot.emulator import Emulator  # noqa: E402


async def new_pg_database() -> tuple[str, str]:
    name = f"hopnhat_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(PG_ADMIN)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}", name


async def drop_pg_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.close()


async def reset_inbox(url: str) -> None:
    """Forget handled updates: each round's fresh emulator numbers its updates from 1 again,
    and the bot rightly skips update ids it has already handled. Every round starts alike:
    the senders count as seen just now (the bot records a sighting once per five minutes
    per person; a round later than that would pay one write per user the others do not),
    and nobody is in a conversation (a person's first search stores its step; in a later
    round the same search would find it stored and write nothing)."""
    from sqlalchemy import delete, update

    from db.models import ChatIdentity, FsmRecord, InboxUpdate, utcnow
    from db.session import make_engine

    engine = make_engine(url)
    async with engine.begin() as conn:
        await conn.execute(delete(InboxUpdate))
        await conn.execute(delete(FsmRecord))
        await conn.execute(update(ChatIdentity).values(last_seen_at=utcnow()))
    await engine.dispose()


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, **env},
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


async def drive(emu, users: list[int], per_user: int, text: str, timeout: float = 300.0
                ) -> dict[str, float]:
    """Send ``per_user`` messages from each user at once; time until every reply arrived.

    Latency per message = reply time − send time (matched in order per chat)."""
    sent_at: dict[int, list[float]] = {u: [] for u in users}
    before = {u: emu.sent_count(u) for u in users}
    start = time.perf_counter()
    for _ in range(per_user):
        for u in users:
            sent_at[u].append(time.time())
            await emu.send_text(u, text)
    total = len(users) * per_user
    deadline = time.perf_counter() + timeout
    latencies: list[float] = []
    done_users: set[int] = set()
    while len(done_users) < len(users):
        if time.perf_counter() > deadline:
            got = sum(emu.sent_count(u) - before[u] for u in users)
            raise TimeoutError(f"only {got}/{total} replies")
        for u in users:
            if u in done_users:
                continue
            if emu.sent_count(u) - before[u] >= per_user:
                done_users.add(u)
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - start
    for u in users:
        msgs = emu.sent(u)[before[u]:before[u] + per_user]
        for t_sent, m in zip(sent_at[u], msgs, strict=False):
            latencies.append(max(0.0, m["time"] - t_sent))
    lat = sorted(latencies)
    out = {"updates": float(total), "seconds": elapsed, "per_sec": total / elapsed}
    if lat:
        out["p50_ms"] = 1000 * statistics.median(lat)
        out["p99_ms"] = 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    return out


async def latency(emu, user: int, text: str, n: int = 100) -> dict[str, float]:
    """Unloaded round trips: one message at a time, time until the bot's reply arrives."""
    times = []
    for _ in range(n):
        since = emu.sent_count(user)
        t0 = time.perf_counter()
        await emu.send_text(user, text)
        await emu.wait_for_messages(user, count=1, since=since, timeout=30)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"p50_ms": 1000 * statistics.median(times),
            "p99_ms": 1000 * times[min(n - 1, int(0.99 * n))]}


async def measure(args: list[str], env: dict[str, str], users: list[int], per_user: int,
                  texts: list[str], log: Path) -> dict[str, dict[str, float]]:
    """Start the bot in a child process against a fresh emulator; for each text, every user
    sends it ``per_user`` times at once; returns the measurements per text."""
    emu = Emulator()
    url = await emu.start()
    for u in users:
        emu.add_user(u, f"U{u}")
    proc = spawn(args, {"HOPNHAT_BOT_TOKEN": TOKEN, "HOPNHAT_TELEGRAM_API_URL": url,
                        "HOPNHAT_LOG_LEVEL": "WARNING", **env}, log)
    out: dict[str, dict[str, float]] = {}
    try:
        await emu.wait_for_call("getMe", timeout=60)
        await asyncio.sleep(1.0)
        for text in texts:
            await drive(emu, users[:5], 1, text)  # warm-up
            quiet_collector()
            cpu0 = cpu_seconds(proc.pid)
            spy = start_profiler(proc.pid, log, text)
            r = await drive(emu, users, per_user, text)
            stop_profiler(spy)
            r["cpu_ms_per_update"] = 1000 * (cpu_seconds(proc.pid) - cpu0) / r["updates"]
            quiet_collector()
            lat = await latency(emu, users[0], text)
            r["idle_p50_ms"], r["idle_p99_ms"] = lat["p50_ms"], lat["p99_ms"]
            out[text] = r
        return out
    finally:
        proc.terminate()
        proc.wait(20)
        await emu.stop()


def quiet_collector() -> None:
    """Keep this process's garbage collector out of the bot's latencies. This process plays
    Telegram (the emulator and its records of every message) and also seeded the database;
    a full collection of that heap took 150-300 ms, and a reply waiting on it was counted as
    the bot's (one-at-a-time p99 of ~200 ms that echo showed too). What exists now is
    frozen out of collections; garbage made afterwards is still collected."""
    gc.collect()
    gc.freeze()


PROFILE = os.environ.get("HOPNHAT_BENCH_PROFILE")  # a folder: py-spy stacks go there


def start_profiler(pid: int, log: Path, text: str) -> subprocess.Popen[bytes] | None:
    """With HOPNHAT_BENCH_PROFILE=DIR, sample the bot with py-spy during the saturated phase
    (collapsed stacks in ``DIR/<log>-<text>.folded``; ``pip install py-spy`` first)."""
    if not PROFILE:
        return None
    slug = "".join(c if c.isalnum() else "_" for c in text)
    out = Path(PROFILE) / f"{log.stem}-{slug}.folded"
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen([spy, "record", "-p", str(pid), "-r", "200", "-f", "raw",
                             "-o", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is not None:
        spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
        spy.wait(30)


def cpu_seconds(pid: int) -> float:
    """User+system CPU of a process (Linux /proc), to tell CPU-bound from waiting."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def show(name: str, r: dict[str, float]) -> None:
    print(f"  {name:<22} {r['per_sec']:7.1f} updates/s (saturated: p50 {r['p50_ms']:.0f} ms,"
          f" p99 {r['p99_ms']:.0f} ms)   one at a time: p50 {r['idle_p50_ms']:.1f} ms,"
          f" p99 {r['idle_p99_ms']:.1f} ms   bot CPU {r['cpu_ms_per_update']:.2f} ms/update")


