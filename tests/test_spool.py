"""The settle spool (extproc/spool.py) with real SQLite files and a real migrated ledger:
several processes on one directory, poison rows, an unavailable ledger, the legacy JSONL
upgrade, and exactly-once settles however often an exchange is spooled or replayed."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from extproc import spool as spool_module
from extproc.ledger import Ledger, LedgerUnavailable, Usage
from extproc.settings import Settings
from extproc.spool import Spool


@pytest.fixture
def ledger(service, settings: Settings) -> Ledger:
    return Ledger(service.pool, settings)


def usage(user: str, exchange_id: str | None = None, tokens: int = 3, **kw) -> Usage:
    return Usage(exchange_id=exchange_id or uuid.uuid4().hex, user_id=user, prompt_tokens=tokens,
                 completion_tokens=1, **kw)


async def settled_counts(pool: asyncpg.Pool, exchange_ids: list[str]) -> dict[str, int]:
    """Usage entries per exchange id (missing ids: 0)."""
    rows = await pool.fetch("SELECT exchange_id, count(*) AS n FROM ledger_entries"
                            " WHERE exchange_id = ANY($1::text[]) GROUP BY exchange_id", exchange_ids)
    counts = dict.fromkeys(exchange_ids, 0)
    counts.update({r["exchange_id"]: r["n"] for r in rows})
    return counts


# ---------------------------------------------------------------- several processes

APPENDER = """
import asyncio, sys, time
from extproc.ledger import Usage
from extproc.spool import Spool

async def main(directory, user, run, name, n):
    spool = Spool(directory)
    for i in range(n):
        for xid in (f"{run}-{name}-{i}", f"{run}-shared-{i}"):  # shared: both processes spool it
            await spool.append(Usage(exchange_id=xid, user_id=user, prompt_tokens=1, completion_tokens=i))
        time.sleep(0.002)  # spread the appends over the replays running meanwhile

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
"""


async def test_two_appending_processes_and_a_replaying_one_lose_nothing(ledger, service, user, tmp_path):
    """The old file spool rewrote the file on replay and dropped lines appended meanwhile."""
    run, n = uuid.uuid4().hex[:8], 150
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", APPENDER, str(tmp_path), user, run, name, str(n), cwd=Path(__file__).parent.parent)
        for name in ("a", "b")]
    replayer = Spool(tmp_path)  # this test process is the third one
    while any(p.returncode is None for p in procs):
        await replayer.replay(ledger)
        await asyncio.sleep(0.01)
    assert [await p.wait() for p in procs] == [0, 0]
    expected = [f"{run}-{name}-{i}" for name in ("a", "b", "shared") for i in range(n)]
    overlapped = sum((await settled_counts(service.pool, expected)).values())
    assert overlapped > 0, "the appenders finished before any replay overlapped them"
    await replayer.replay(ledger)
    assert replayer.pending() == 0
    counts = await settled_counts(service.pool, expected)
    assert {x: c for x, c in counts.items() if c != 1} == {}
    assert await ledger.reconcile() == []


# ---------------------------------------------------------------- poison rows


async def test_poison_rows_are_quarantined_counted_and_replay_goes_on(service, user, tmp_path, monkeypatch):
    """A row the ledger rejects (a data error, not an outage) and a row that is not a Usage
    are set aside; the rows behind them are still settled, through Service.maintain_once."""
    spool = Spool(tmp_path)
    monkeypatch.setattr(service, "spool", spool)
    before, after = usage(user), usage(user)
    poison = usage(user, tokens=2**63)  # bigint overflow: PostgreSQL raises DataError
    for u in (before, poison):
        await spool.append(u)
    with sqlite3.connect(tmp_path / "spool.db") as db:  # what a bug or a bit flip could leave
        db.execute("INSERT INTO spool (exchange_id, payload, spooled_at) VALUES ('garbled', '{not json', 0)")
    await spool.append(after)
    metrics = service.metrics

    def sample(name: str) -> float:
        return metrics.registry.get_sample_value(name) or 0.0

    quarantined, replayed = sample("solaris_spool_quarantined_total"), sample("solaris_spool_replayed_total")
    await service.maintain_once()
    assert sample("solaris_spool_quarantined_total") - quarantined == 2
    assert sample("solaris_spool_replayed_total") - replayed == 2
    assert sample("solaris_spool_pending") == 0
    assert spool.pending() == 0
    counts = await settled_counts(service.pool, [before.exchange_id, poison.exchange_id, after.exchange_id])
    assert counts == {before.exchange_id: 1, poison.exchange_id: 0, after.exchange_id: 1}
    errors = dict(await spool.quarantined())
    assert set(errors) == {poison.exchange_id, "garbled"}
    assert "DataError" in errors[poison.exchange_id]
    assert "JSONDecodeError" in errors["garbled"]
    with sqlite3.connect(tmp_path / "spool.db") as db:  # the payload is kept for a requeue
        [(payload,)] = db.execute("SELECT payload FROM quarantine WHERE exchange_id = ?", (poison.exchange_id,))
    assert Usage.from_json(json.loads(payload)) == poison
    await service.maintain_once()  # quarantined rows are not retried
    assert sample("solaris_spool_quarantined_total") - quarantined == 2


# ---------------------------------------------------------------- ledger unavailable


class DeadlockingLedger:
    """A settle failing for the database's condition (a deadlock), not for the row's."""

    async def settle(self, usage: Usage):
        raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")


@pytest.mark.parametrize("down", ["closed pool", "deadlock"])
async def test_unavailable_ledger_keeps_every_row(down, ledger, service, settings, user, tmp_path):
    spool = Spool(tmp_path)
    rows = [usage(user) for _ in range(3)]
    for u in rows:
        await spool.append(u)
    if down == "closed pool":
        pool = await asyncpg.create_pool(settings.database_url, min_size=0, max_size=1)
        await pool.close()
        broken: object = Ledger(pool, settings)
        with pytest.raises(LedgerUnavailable):  # what the spool sees from it
            await broken.settle(rows[0])
    else:
        broken = DeadlockingLedger()
    result = await spool.replay(broken)
    assert (result.replayed, result.quarantined, result.left) == (0, 0, 3)
    assert spool.pending() == 3 and await spool.quarantined() == []
    # The failed replay gave its claims back: the next one, with the ledger back, takes all.
    result = await spool.replay(ledger)
    assert (result.replayed, result.quarantined, result.left) == (3, 0, 0)
    ids = [u.exchange_id for u in rows]
    assert await settled_counts(service.pool, ids) == dict.fromkeys(ids, 1)


# ---------------------------------------------------------------- upgrade from JSONL


async def test_legacy_jsonl_is_imported_and_removed(ledger, service, user, tmp_path):
    good = [usage(user) for _ in range(3)]
    lines = [json.dumps(u.to_json()) for u in good]
    lines.insert(1, lines[0])  # the old spool kept duplicates
    lines += ["", "{not json", json.dumps({"exchange_id": "not-a-usage", "tokens": 5})]
    (tmp_path / "settles.jsonl").write_text("\n".join(lines) + "\n")
    # A crash inside the old replay could leave its temporary file behind: import it too.
    (tmp_path / "settles.tmp").write_text(lines[-3] + "\n")
    spool = Spool(tmp_path)
    assert spool.pending() == 5  # three usages (one twice), two unreadable lines
    assert not (tmp_path / "settles.jsonl").exists() and not (tmp_path / "settles.tmp").exists()
    result = await spool.replay(ledger)
    assert (result.replayed, result.quarantined, result.left) == (3, 2, 0)
    ids = [u.exchange_id for u in good]
    assert await settled_counts(service.pool, ids) == dict.fromkeys(ids, 1)
    errors = dict(await spool.quarantined())
    assert "not-a-usage" in errors and "TypeError" in errors["not-a-usage"]
    assert any(x.startswith("legacy:") and "JSONDecodeError" in e for x, e in errors.items())


async def test_legacy_file_written_after_open_is_imported_at_the_next_replay(ledger, service, user, tmp_path):
    """An old-version process still running on the directory during an upgrade."""
    spool = Spool(tmp_path)
    await spool.append(first := usage(user))
    late = usage(user)
    (tmp_path / "settles.jsonl").write_text(json.dumps(late.to_json()) + "\n")
    assert (await spool.replay(ledger)).replayed == 2
    ids = [first.exchange_id, late.exchange_id]
    assert await settled_counts(service.pool, ids) == dict.fromkeys(ids, 1)


# ---------------------------------------------------------------- exactly once


async def test_same_exchange_spooled_twice_is_one_row_settled_once(ledger, service, user, tmp_path):
    spool = Spool(tmp_path)
    x = uuid.uuid4().hex
    assert (await ledger.admit(user, 100, x)).outcome == "ok"
    u = usage(user, x, tokens=6)
    await spool.append(u)
    await spool.append(u)  # a retry that spooled twice
    assert spool.pending() == 1
    assert Spool(tmp_path).pending() == 1  # what another process sees
    result = await spool.replay(ledger)
    assert (result.replayed, result.left) == (1, 0)
    # Spooled again after it was settled (a late retry): replayed as a no-op, then gone.
    await spool.append(u)
    assert (await spool.replay(ledger)).replayed == 1
    assert await settled_counts(service.pool, [x]) == {x: 1}
    account = await ledger.account(user)
    assert (account.reserved, account.used_cycle) == (0, 7)
    assert await ledger.reconcile() == []


async def test_rows_claimed_by_a_crashed_replay_come_back(ledger, service, user, tmp_path):
    spool = Spool(tmp_path)
    rows = [usage(user) for _ in range(2)]
    for u in rows:
        await spool.append(u)
    # A replayer claims the rows and dies before settling or releasing them.
    assert len(await asyncio.to_thread(spool._claim, "crashed", 10)) == 2
    result = await Spool(tmp_path).replay(ledger)  # another process, while the claim is live
    assert (result.replayed, result.left) == (0, 2)
    with sqlite3.connect(tmp_path / "spool.db") as db:  # the lease runs out
        db.execute("UPDATE spool SET claimed_until = claimed_until - ?", (spool_module.CLAIM_SECONDS + 1,))
    result = await Spool(tmp_path).replay(ledger)
    assert (result.replayed, result.left) == (2, 0)
    ids = [u.exchange_id for u in rows]
    assert await settled_counts(service.pool, ids) == dict.fromkeys(ids, 1)


async def test_replay_of_unknown_user_opens_account(ledger, user, tmp_path):
    """Fail-open admissions have no reservation and maybe no account yet."""
    spool = Spool(tmp_path)
    await spool.append(usage(user, tokens=9, email="late@example.com"))
    assert (await spool.replay(ledger)).replayed == 1
    account = await ledger.account(user)
    assert (account.used_cycle, account.email) == (10, "late@example.com")


# ---------------------------------------------------------------- durability settings


async def test_spool_is_wal_with_full_sync_and_private(user, tmp_path):
    spool = Spool(tmp_path / "new" / "spool")
    assert spool.pending() == 0 and not (tmp_path / "new").exists()  # nothing created to count
    await spool.append(usage(user))
    conn = spool._conn
    assert conn is not None
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    assert (spool.path.stat().st_mode & 0o777) == 0o600
    spool.close()
