"""Shared fixtures: every DB test runs on SQLite and on PostgreSQL, on a migrated schema.

PostgreSQL is required, not optional: if it is unreachable the tests fail (CI starts it).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.migrate import upgrade_async
from db.models import Base
from db.session import make_engine, make_sessionmaker

PG_ADMIN_DSN = os.environ.get("HOPNHAT_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
ROOT = Path(__file__).resolve().parent.parent


def pg_url(dbname: str) -> str:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{dbname}"


async def create_pg_database() -> str:
    name = f"hopnhat_t_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_pg_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def fresh_database_url(backend: str, tmp_dir: Path) -> tuple[str, str | None]:
    """An empty database of the backend: (url, pg database name to drop later or None)."""
    if backend == "sqlite":
        path = tmp_dir / f"t_{uuid.uuid4().hex[:8]}.db"
        return f"sqlite+aiosqlite:///{path}", None
    name = await create_pg_database()
    return pg_url(name), name


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A migrated database per backend, shared by the session's tests (tables emptied per test)."""
    url, pg_name = await fresh_database_url(request.param, tmp_path_factory.mktemp("db"))
    await upgrade_async(url)
    yield url
    if pg_name:
        await drop_pg_database(pg_name)


async def wipe(maker: async_sessionmaker[AsyncSession]) -> None:
    async with maker() as s:
        for table in reversed(Base.metadata.sorted_tables):
            await s.execute(delete(table))
        await s.commit()


@pytest.fixture
async def sessionmaker(db_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = make_engine(db_url)
    maker = make_sessionmaker(engine)
    await wipe(maker)
    yield maker
    await engine.dispose()


@pytest.fixture
async def session(sessionmaker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    async with sessionmaker() as s:
        yield s


REGISTER_SOURCES = ("vietnam-provinces%", "vietnamadminunits%")
KEPT_TABLES = {"provinces", "units", "systems", "milestones"}


async def wipe_keep_reference(maker: async_sessionmaker[AsyncSession]) -> None:
    """Empty what tests create but keep the (slow to load) national register and plan."""
    from sqlalchemy import and_, func, not_, select

    from db.models import Milestone, Unit
    from knowledge.plan import load_plan
    from services.audit import Actor
    from services.register import load_national_register

    async with maker() as s:
        for table in reversed(Base.metadata.sorted_tables):
            if table.name not in KEPT_TABLES:
                await s.execute(delete(table))
        await s.execute(delete(Unit).where(and_(*[
            not_(func.coalesce(Unit.source, "").like(p)) for p in REGISTER_SOURCES])))
        n_units = await s.scalar(select(func.count()).select_from(Unit))
        if (n_units or 0) < 3321:
            await load_national_register(s, Actor.system("test"))
        if not await s.scalar(select(func.count()).select_from(Milestone)):
            await load_plan(s, Actor.system("test"))
        await s.commit()


@pytest.fixture
async def seeded_maker(db_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """A database holding the national register and the plan, and nothing else."""
    engine = make_engine(db_url)
    maker = make_sessionmaker(engine)
    await wipe_keep_reference(maker)
    yield maker
    await engine.dispose()


@pytest.fixture
async def emu():
    from bot.emulator import Emulator

    e = Emulator()
    await e.start(host="127.0.0.1", port=0)
    yield e
    await e.stop()


@pytest.fixture
async def live(emu, seeded_maker, db_url):
    """The real bot, polling the emulator over HTTP, on a seeded database."""
    from tests.live import LiveBot, settings_for

    bot = await LiveBot(emu, settings_for(f"http://127.0.0.1:{emu.port}", db_url)).start()
    yield bot
    await bot.stop()


@pytest.fixture(scope="session")
def slapd_server():
    """A throwaway OpenLDAP server (own config, mdb, ppolicy) for the whole test session."""
    from tests.ldap_server import SlapdServer

    server = SlapdServer().start()
    yield server
    server.cleanup()


@pytest.fixture
async def directory(slapd_server):
    """The real LDAP directory, emptied of people and groups before each test."""
    from services.directory import LdapDirectory
    from tests.ldap_server import ADMIN_DN, ADMIN_PW, BASE_DN, wipe_directory

    if slapd_server.proc is None:
        slapd_server.start()
    wipe_directory(slapd_server)
    d = LdapDirectory(slapd_server.url, BASE_DN, ADMIN_DN, ADMIN_PW)
    yield d
    await d.close()
