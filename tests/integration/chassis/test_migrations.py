import asyncio
import uuid
from pathlib import Path

import asyncpg
import pytest

from services.chassis import MigrationError, migrate, postgres


def _write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, sql in files.items():
        (folder / name).write_text(sql)
    return folder


@pytest.fixture
def schema() -> str:
    return f"t_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def migrations(tmp_path: Path) -> Path:
    return _write(
        tmp_path / "migrations",
        {
            "0001_accounts.sql": "CREATE TABLE accounts (id bigint PRIMARY KEY, name text);",
            "0002_seed.sql": "INSERT INTO accounts VALUES (1, 'fee');",
        },
    )


async def test_migrations_apply_once_and_are_idempotent(
    database_url: str, schema: str, migrations: Path
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await migrate(conn, schema, migrations) == [1, 2]
        assert await migrate(conn, schema, migrations) == []
        assert await conn.fetchval(f"SELECT count(*) FROM {schema}.accounts") == 1
        rows = await conn.fetch(f"SELECT version, name FROM {schema}.schema_migrations ORDER BY 1")
        assert [(r["version"], r["name"]) for r in rows] == [(1, "accounts"), (2, "seed")]
    finally:
        await conn.close()


async def test_concurrent_starters_apply_each_migration_exactly_once(
    database_url: str, schema: str, migrations: Path
) -> None:
    conns = [await asyncpg.connect(database_url) for _ in range(5)]
    try:
        applied = await asyncio.gather(*(migrate(c, schema, migrations) for c in conns))
        assert sorted(applied) == [[], [], [], [], [1, 2]]
        assert await conns[0].fetchval(f"SELECT count(*) FROM {schema}.accounts") == 1
    finally:
        await asyncio.gather(*(c.close() for c in conns))


async def test_a_new_migration_applies_on_top(
    database_url: str, schema: str, migrations: Path
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, schema, migrations)
        _write(migrations, {"0003_more.sql": "ALTER TABLE accounts ADD COLUMN kind text;"})
        assert await migrate(conn, schema, migrations) == [3]
    finally:
        await conn.close()


async def test_an_edited_migration_is_refused(
    database_url: str, schema: str, migrations: Path
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, schema, migrations)
        _write(migrations, {"0002_seed.sql": "INSERT INTO accounts VALUES (2, 'custody');"})
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(conn, schema, migrations)
        assert await conn.fetchval(f"SELECT count(*) FROM {schema}.accounts") == 1
    finally:
        await conn.close()


async def test_a_failing_migration_leaves_nothing_behind(
    database_url: str, schema: str, tmp_path: Path
) -> None:
    folder = _write(
        tmp_path / "bad",
        {"0001_ok.sql": "CREATE TABLE a (id int);", "0002_broken.sql": "CREATE TABLE oops ("},
    )
    conn = await asyncpg.connect(database_url)
    try:
        with pytest.raises(asyncpg.PostgresSyntaxError):
            await migrate(conn, schema, folder)
        exists = await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema)
        assert exists == 0
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"0002_late.sql": "SELECT 1;"}, "without gaps"),
        ({"1_short.sql": "SELECT 1;"}, "NNNN_description"),
    ],
)
def test_misnamed_or_gapped_folders_are_refused(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    from services.chassis.db import load_migrations

    with pytest.raises(MigrationError, match=message):
        load_migrations(_write(tmp_path / "m", files))


async def test_pool_connections_see_their_schema_first(
    database_url: str, schema: str, migrations: Path
) -> None:
    async with postgres(database_url, schema=schema, migrations=migrations) as pool:
        assert await pool.fetchval("SELECT name FROM accounts WHERE id = 1") == "fee"
