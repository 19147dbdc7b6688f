"""The ledger side of the user's side (issue 14) against real PostgreSQL with an injected
clock: the personal cap (effective limit, admission on the fast, batched and slow paths,
alerts), settings and allowance writes, LGPD erasure and export. Every scenario ends with
``reconcile`` clean (I2, I3)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
from support.clock import Clock

from extproc.ledger import AdmitRequest, Ledger, UnknownUser, Usage, create_pool, id_sha256
from extproc.settings import Settings


def d(y: int, m: int, day: int, h: int = 12) -> datetime:
    return datetime(y, m, day, h, tzinfo=UTC)


def xid() -> str:
    return uuid.uuid4().hex


def uid(tag: str = "u") -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(settings, min_size=1, max_size=6)
    yield p
    await p.close()


@pytest.fixture
def clock() -> Clock:
    return Clock(d(2026, 3, 10))


@pytest.fixture
def ledger(pool: asyncpg.Pool, settings: Settings, clock: Clock) -> Ledger:
    # 10 000 a month, so a cap of 1 000 is well below the budget; no batching (each path alone).
    return Ledger(pool, settings.replace(default_monthly_tokens=10_000), clock, batch=False)


async def opened(ledger: Ledger, user: str, cap: int | None = None, **columns: object) -> None:
    """Open ``user`` (its first admission, released) and set columns directly."""
    x = xid()
    assert (await ledger.admit(user, 1, x)).outcome == "ok"
    assert await ledger.release(x)
    sets = {"personal_cap": cap, **columns}
    assignments = ", ".join(f"{k} = ${i + 2}" for i, k in enumerate(sets))
    await ledger.pool.execute(f"UPDATE accounts SET {assignments} WHERE user_id = $1", user, *sets.values())


async def spend(ledger: Ledger, user: str, tokens: int) -> None:
    x = xid()
    admission = await ledger.admit(user, tokens, x)
    assert admission.outcome == "ok", admission
    await ledger.settle(Usage(exchange_id=x, user_id=user, completion_tokens=tokens))


async def clean(ledger: Ledger) -> None:
    assert await ledger.reconcile() == []


# ---------------------------------------------------------------- effective limit and alerts


async def test_used_pct_and_alerts_count_against_the_personal_cap(ledger: Ledger, pool: asyncpg.Pool) -> None:
    user = uid()
    await opened(ledger, user, cap=1_000)
    acc = await ledger.account(user)
    assert acc is not None and (acc.cycle_budget, acc.effective_limit, acc.used_pct) == (10_000, 1_000, 0.0)
    await spend(ledger, user, 799)
    assert [r["threshold"] for r in await pool.fetch("SELECT * FROM alert_outbox WHERE user_id = $1", user)] == []
    await spend(ledger, user, 1)
    await spend(ledger, user, 100)
    acc = await ledger.account(user)
    assert acc is not None and (acc.used_cycle, acc.used_pct, acc.state) == (900, 90.0, "warned_90")
    assert acc.as_json()["effective_limit"] == 1_000
    rows = await pool.fetch(
        "SELECT threshold, used, budget, remaining, used_pct FROM alert_outbox WHERE user_id = $1 ORDER BY threshold",
        user)
    # budget is the effective limit, remaining the room left under the cap (not the 9 100 balance)
    assert [tuple(r.values()) for r in rows] == [(80, 800, 1_000, 200, 80), (90, 900, 1_000, 100, 90)]
    # Raising the cap lowers the % (45 of 2 000); crossing 80 % again this cycle sends nothing new.
    await ledger.pool.execute("UPDATE accounts SET personal_cap = 2000 WHERE user_id = $1", user)
    await spend(ledger, user, 800)
    assert (await ledger.account(user)).used_pct == 85.0  # type: ignore[union-attr]
    assert await pool.fetchval("SELECT count(*) FROM alert_outbox WHERE user_id = $1", user) == 2
    await clean(ledger)


async def test_uncapped_account_is_measured_against_its_budget(ledger: Ledger) -> None:
    user = uid()
    await opened(ledger, user)
    await spend(ledger, user, 900)
    acc = await ledger.account(user)
    assert acc is not None and (acc.effective_limit, acc.used_pct, acc.state) == (10_000, 9.0, "active")


async def test_grant_state_counts_against_the_cap(ledger: Ledger) -> None:
    user = uid()
    await opened(ledger, user, cap=1_000)
    await spend(ledger, user, 850)
    acc, applied = await ledger.grant(user, 500, actor="admin", reason="top up")
    assert applied and (acc.state, acc.used_pct) == ("warned_80", 85.0)  # not 850 of 10 500


# ---------------------------------------------------------------- admission: personal cap


async def test_cap_refuses_on_the_fast_path_with_holds_counted(ledger: Ledger) -> None:
    """The fast statement must not admit it (it would answer "ok"); the slow path says why."""
    user = uid()
    await opened(ledger, user, cap=1_000)
    await spend(ledger, user, 700)
    held = xid()
    assert (await ledger.admit(user, 200, held)).outcome == "ok"  # 700 + 200 <= 1 000
    refused = await ledger.admit(user, 101, xid())  # 700 + 200 + 101 > 1 000
    assert refused.status == "personal_cap" and refused.account is not None
    assert refused.account.personal_cap == 1_000 and refused.account.reserved == 200
    assert (await ledger.admit(user, 100, xid())).outcome == "ok"  # exactly at the cap
    acc = await ledger.account(user)
    assert acc is not None and (acc.reserved, acc.used_cycle, acc.balance) == (300, 700, 9_300)
    await clean(ledger)


async def test_cap_refuses_on_the_batched_path(ledger: Ledger) -> None:
    capped, free = uid("capped"), uid("free")
    await opened(ledger, capped, cap=500)
    await opened(ledger, free)
    results = await ledger._admit_batch([AdmitRequest(capped, 501, xid()), AdmitRequest(free, 501, xid())])
    assert [r.status for r in results] == ["personal_cap", "ok"]
    # The batch statement itself: the capped row is not admitted at all.
    rows = await ledger.admit_pool.fetch(
        "SELECT user_id FROM reservations WHERE user_id = ANY($1::text[]) AND state = 'held'", [capped, free])
    assert [r["user_id"] for r in rows] == [free]
    ok = await ledger._admit_batch([AdmitRequest(capped, 500, xid()), AdmitRequest(free, 1, xid())])
    assert [r.status for r in ok] == ["ok", "ok"]
    await clean(ledger)


async def test_cap_refuses_on_the_slow_path_after_a_cycle_roll(ledger: Ledger, clock: Clock) -> None:
    user = uid()
    await opened(ledger, user, cap=300)
    await spend(ledger, user, 250)
    clock.now = d(2026, 4, 11)  # the cycle ended: only the slow path rolls it
    refused = await ledger.admit(user, 301, xid())
    assert refused.status == "personal_cap"
    assert refused.account is not None and refused.account.used_cycle == 0
    assert refused.account.cycle_start == d(2026, 4, 10, 0)
    assert (await ledger.admit(user, 300, xid())).status == "ok"
    await clean(ledger)


async def test_insufficient_comes_before_the_cap(ledger: Ledger) -> None:
    user = uid()
    await opened(ledger, user, cap=20_000)
    assert (await ledger.admit(user, 10_001, xid())).status == "insufficient"
    await ledger.pool.execute("UPDATE accounts SET personal_cap = 5 WHERE user_id = $1", user)
    assert (await ledger.admit(user, 10_001, xid())).status == "insufficient"
    assert (await ledger.admit(user, 6, xid())).status == "personal_cap"


async def test_erased_id_is_refused_not_opened(ledger: Ledger, pool: asyncpg.Pool) -> None:
    """Admission of an id listed in erased_users (by SHA-256) is "erased", no account opened."""
    pseudonym, gone = uid("erased"), uid("gone")
    await opened(ledger, pseudonym)
    await pool.execute("UPDATE accounts SET erased_at = $2 WHERE user_id = $1", pseudonym, d(2026, 3, 1))
    await pool.execute("INSERT INTO erased_users VALUES ($1, $2, $3)", id_sha256(gone), pseudonym, d(2026, 3, 1))
    refused = await ledger.admit(gone, 10, xid())
    assert (refused.status, refused.account) == ("erased", None)
    assert await ledger.account(gone) is None
    # Presenting the pseudonym itself is refused too.
    assert (await ledger.admit(pseudonym, 10, xid())).status == "erased"
    batched = await ledger._admit_batch([AdmitRequest(gone, 1, xid()), AdmitRequest(pseudonym, 1, xid())])
    assert [r.status for r in batched] == ["erased", "erased"]
    await clean(ledger)


# ---------------------------------------------------------------- settings and allowance


async def audit_rows(pool: asyncpg.Pool, user: str, action: str) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM audit_log WHERE target = $1 AND action = $2 ORDER BY id", user, action)


async def test_set_settings_changes_only_what_is_given_and_audits(ledger: Ledger, pool: asyncpg.Pool) -> None:
    user = uid()
    await opened(ledger, user)
    await spend(ledger, user, 850)
    acc = await ledger.set_settings(user, personal_cap=1_000, actor=f"user:{user}", source_ip="10.0.0.9")
    assert (acc.personal_cap, acc.notify_80, acc.notify_90, acc.language) == (1_000, True, True, None)
    assert (acc.used_pct, acc.state) == (85.0, "warned_80")  # the band moves with the cap at once
    acc = await ledger.set_settings(user, notify_80=False, language="en", actor=f"user:{user}")
    assert (acc.personal_cap, acc.notify_80, acc.notify_90, acc.language) == (1_000, False, True, "en")
    assert acc.as_json()["preferences"] == {"alerts": {"80": False, "90": True}, "language": "en"}
    acc = await ledger.set_settings(user, personal_cap=None, language=None, actor="ana")
    assert (acc.personal_cap, acc.language, acc.state, acc.used_pct) == (None, None, "active", 8.5)
    rows = await audit_rows(pool, user, "settings")
    assert [(r["actor"], r["source_ip"]) for r in rows] == [
        (f"user:{user}", "10.0.0.9"), (f"user:{user}", None), ("ana", None)]
    first = (json.loads(rows[0]["before"]), json.loads(rows[0]["after"]))
    assert (first[0]["personal_cap"], first[1]["personal_cap"]) == (None, 1_000)
    # No alert for a threshold the change itself passed: alerts are for usage crossing one.
    assert await pool.fetchval("SELECT count(*) FROM alert_outbox WHERE user_id = $1", user) == 0
    assert await pool.fetchval("SELECT count(*) FROM ledger_entries WHERE user_id = $1 AND kind <> 'usage'"
                               " AND kind <> 'cycle_reset'", user) == 0
    await clean(ledger)


@pytest.mark.parametrize("kwargs", [
    {"personal_cap": -1}, {"personal_cap": 10**15 + 1}, {"personal_cap": True}, {"personal_cap": "100"},
    {"language": "fr"}, {"language": ""}, {"notify_80": "yes"}, {"notify_90": 1},
])
async def test_set_settings_refuses_bad_values_before_writing(ledger: Ledger, pool: asyncpg.Pool, kwargs) -> None:
    user = uid()
    await opened(ledger, user)
    with pytest.raises(ValueError):
        await ledger.set_settings(user, actor="x", **kwargs)
    assert await audit_rows(pool, user, "settings") == []


async def test_set_settings_and_allowance_of_unknown_user(ledger: Ledger) -> None:
    with pytest.raises(UnknownUser):
        await ledger.set_settings(uid(), personal_cap=5, actor="x")
    with pytest.raises(UnknownUser):
        await ledger.set_allowance(uid(), 5, actor="x", reason="r")
    with pytest.raises(ValueError):
        await ledger.set_allowance(uid(), -5, actor="x", reason="r")


async def test_concurrent_set_settings_each_audited(ledger: Ledger, pool: asyncpg.Pool) -> None:
    """Ten concurrent changes serialize on the account's lock: ten audit rows, each one's
    before is the previous one's after, and the last after is the account."""
    user = uid()
    await opened(ledger, user)
    await asyncio.gather(*(ledger.set_settings(user, personal_cap=100 * (i + 1), actor=f"user:{user}")
                           for i in range(10)))
    rows = await audit_rows(pool, user, "settings")
    assert len(rows) == 10
    chain = [(json.loads(r["before"])["personal_cap"], json.loads(r["after"])["personal_cap"]) for r in rows]
    assert chain[0][0] is None
    assert all(chain[i][1] == chain[i + 1][0] for i in range(9))
    assert sorted(after for _, after in chain) == [100 * (i + 1) for i in range(10)]
    assert (await ledger.account(user)).personal_cap == chain[-1][1]  # type: ignore[union-attr]


async def test_allowance_override_applies_at_the_next_roll_only(
        ledger: Ledger, clock: Clock, pool: asyncpg.Pool) -> None:
    user = uid()
    await opened(ledger, user)
    await spend(ledger, user, 1_000)
    acc = await ledger.set_allowance(user, 25_000, actor="ana", reason="team lead", source_ip="10.1.1.1")
    assert (acc.allowance_override, acc.allowance, acc.cycle_budget) == (25_000, 9_000, 10_000)
    assert acc.as_json()["allowance_override"] == 25_000
    rows = await audit_rows(pool, user, "allowance")
    assert [(r["actor"], r["reason"], r["source_ip"]) for r in rows] == [("ana", "team lead", "10.1.1.1")]
    clock.now = d(2026, 4, 10, 1)
    assert (await ledger.admit(user, 1, xid())).status == "ok"
    acc = await ledger.account(user)
    assert acc is not None and (acc.allowance, acc.cycle_budget, acc.used_cycle) == (25_000, 25_000, 0)
    reset = await pool.fetchrow("SELECT * FROM ledger_entries WHERE user_id = $1 AND kind = 'cycle_reset'"
                                " ORDER BY id DESC LIMIT 1", user)
    assert (reset["allowance_delta"], reset["balance_after"]) == (16_000, 25_000)
    # Back to the plan's (10 000) from the following cycle, by the periodic roll too.
    await ledger.set_allowance(user, None, actor="ana", reason="back to plan")
    clock.now = d(2026, 5, 10, 1)
    assert await ledger.roll_idle_cycles() >= 1
    acc = await ledger.account(user)
    assert acc is not None and (acc.allowance, acc.cycle_budget, acc.allowance_override) == (10_000, 10_000, None)
    await clean(ledger)
