"""Alembic is the only way the schema is made: up, down, and no drift from the models."""

from __future__ import annotations

import asyncio

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from db.migrate import downgrade, upgrade
from db.models import Base
from db.session import make_engine
from tests.conftest import drop_pg_database, fresh_database_url


async def _diff_and_tables(url: str) -> tuple[list, set[str]]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            def inspect_sync(sync_conn):  # type: ignore[no-untyped-def]
                ctx = MigrationContext.configure(sync_conn, opts={
                    "compare_type": True, "compare_server_default": True})
                tables = set(inspect(sync_conn).get_table_names())
                return compare_metadata(ctx, Base.metadata), tables
            return await conn.run_sync(inspect_sync)
    finally:
        await engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_upgrade_downgrade_and_no_drift(backend: str, tmp_path) -> None:
    url, pg_name = await fresh_database_url(backend, tmp_path)
    try:
        await asyncio.to_thread(upgrade, url)
        diff, tables = await _diff_and_tables(url)
        assert diff == [], f"models and migrations differ: {diff}"
        assert {t.name for t in Base.metadata.sorted_tables} <= tables
        await asyncio.to_thread(downgrade, url)
        _, tables = await _diff_and_tables(url)
        assert tables <= {"alembic_version"}
        await asyncio.to_thread(upgrade, url)  # and back up again
        diff, _ = await _diff_and_tables(url)
        assert diff == []
    finally:
        if pg_name:
            await drop_pg_database(pg_name)
