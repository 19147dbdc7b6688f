"""Operations on a real database: backup/restore round trip and migrations down and up."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import pytest

from extproc import cli
from extproc.ledger import Ledger, Usage, create_pool
from extproc.migrate import dbmate, expected_versions
from extproc.settings import Settings
from extproc_dev import devstack


def in_thread(coro):  # callable from sync tests while the session loop is idle
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _populate(url: str) -> None:
    settings = Settings(database_url=url, default_monthly_tokens=5000)
    pool = await create_pool(settings, min_size=1, max_size=2)
    ledger = Ledger(pool, settings)
    for i in range(5):
        user = f"bk-{i}"
        x = uuid.uuid4().hex
        await ledger.admit(user, 100, x, email=f"{user}@example.com")
        await ledger.settle(Usage(exchange_id=x, user_id=user, prompt_tokens=10 * i, completion_tokens=7))
        await ledger.grant(user, 50 * i + 1, actor="test", reason="gift")
    await ledger.admit("bk-held", 30, uuid.uuid4().hex)  # a reservation in flight
    await pool.close()


async def _snapshot(url: str) -> dict[str, list]:
    conn = await asyncpg.connect(url)
    try:
        return {
            table: [tuple(r) for r in await conn.fetch(f"SELECT * FROM {table} ORDER BY 1")]
            for table in ("accounts", "ledger_entries", "reservations", "audit_log", "plans")
        }
    finally:
        await conn.close()


def test_backup_wipe_restore_gives_back_every_balance_and_entry(make_database, monkeypatch, tmp_path, capsys):
    url = make_database()
    in_thread(_populate(url))
    before = in_thread(_snapshot(url))
    monkeypatch.setenv("DATABASE_URL", url)
    dump = tmp_path / "ledger.dump"
    assert cli.main(["backup", str(dump)]) == 0
    assert dump.stat().st_size > 0

    async def wipe() -> None:
        conn = await asyncpg.connect(url)
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
        await conn.close()

    in_thread(wipe())
    assert cli.main(["restore", str(dump)]) == 0
    after = in_thread(_snapshot(url))
    assert after == before
    assert len(after["ledger_entries"]) == 5 * 3 + 1
    assert cli.main(["reconcile"]) == 0
    assert cli.main(["restore", str(tmp_path / "missing.dump")]) == 1
    assert "restore failed" in capsys.readouterr().err


def test_every_migration_goes_down_and_up_again(make_database):
    url = make_database()
    versions = expected_versions()
    for _ in versions:
        dbmate(url, "rollback")
    status = dbmate(url, "status").stdout
    assert "[X]" not in status and status.count("[ ]") == len(versions)

    async def tables() -> list[str]:
        conn = await asyncpg.connect(url)
        try:
            return [r[0] for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'schema_migrations'")]
        finally:
            await conn.close()

    assert in_thread(tables()) == []  # the down sections remove everything the up sections made
    dbmate(url, "up")
    assert dbmate(url, "status").stdout.count("[X]") == len(versions)
    in_thread(_populate(url))


@pytest.mark.parametrize("verb", ["backup", "restore"])
def test_backup_errors_are_reported(verb, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/none")
    assert cli.main([verb, str(tmp_path / "x.dump")]) == 1
    assert f"error: {verb}" in capsys.readouterr().err


def test_concurrent_migrate_runs_are_serialized(make_database, monkeypatch, capsys):
    """Replicas starting together each run `extproc migrate`: all succeed, one applies."""
    url = make_database(migrate=False)
    monkeypatch.setenv("DATABASE_URL", url)
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda _: cli.main(["migrate"]), range(4)))
    assert codes == [0, 0, 0, 0]
    out = capsys.readouterr().out
    for version in expected_versions():
        assert out.count(f"Applying: {version}") == 1
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/none")
    assert cli.main(["migrate"]) == 1


def test_migrate_creates_a_missing_database(pg_server_url, monkeypatch):
    url = devstack.with_database(pg_server_url, f"solaris_test_new_{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("DATABASE_URL", url)
    try:
        assert cli.main(["migrate"]) == 0
        assert dbmate(url, "status").stdout.count("[X]") == len(expected_versions())
    finally:
        dbmate(url, "drop", check=False)
