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


# ---------------------------------------------------------------- LGPD erasure


async def person(ledger: Ledger, pool: asyncpg.Pool, clock: Clock) -> tuple[str, str, str]:
    """An account with something in every table that can hold personal data."""
    tag = uuid.uuid4().hex[:8]
    user, email, name = f"ana-{tag}", f"ana.{tag}@example.com", f'Ana "Zé" Souza {tag}'
    x = xid()
    assert (await ledger.admit(user, 10, x, email=email, name=name)).status == "ok"
    await ledger.settle(Usage(exchange_id=x, user_id=user, completion_tokens=10))
    await spend(ledger, user, 7_990)  # 80 % of 10 000: an alert in the outbox
    await ledger.grant(user, 500, actor="admin", reason=f"bonus for {name} <{email}> ({user})")
    await ledger.set_settings(user, personal_cap=9_000, language="en", actor=f"user:{user}", source_ip="10.0.0.7")
    await ledger.set_allowance(user, 20_000, actor="admin", reason=f"{name} leads a team")
    await ledger.set_suspended(user, True, actor="admin", reason=f"asked by {email}")
    await ledger.set_suspended(user, False, actor="admin", reason="ok")
    # Someone else's row that mentions the person (a free-text reason).
    await ledger.upsert_plan(f"p-{tag}", monthly_tokens=5, requests_per_minute=None, rollover=False,
                             actor=f"user:{user}")
    outbox = await pool.fetchval("SELECT id FROM alert_outbox WHERE user_id = $1", user)
    await pool.execute("UPDATE alert_outbox SET last_error = $2 WHERE id = $1", outbox, f"email {email}: refused")
    await pool.execute(
        "INSERT INTO alert_deliveries (outbox_id, channel, audience, recipient, state, last_error, next_attempt_at,"
        " created_at) VALUES ($1, 'email', 'user', $2, 'failed', $3, $4, $4),"
        " ($1, 'email', 'admin', 'boss@example.org', 'sent', NULL, $4, $4)",
        outbox, email, f"550 <{email}> mailbox full", clock.now)
    await pool.execute("INSERT INTO magic_links VALUES ($1, $2, $3, $4, NULL)", f"n-{tag}", user, clock.now, clock.now)
    await pool.execute(
        "INSERT INTO web_sessions VALUES ($1, 'me', $2, $3, $3, $3, NULL, '10.0.0.7', 'Firefox'),"
        " ($4, 'admin', 'admin', $3, $3, $3, NULL, '10.0.0.1', 'Chrome')",
        f"sid-{tag}", user, clock.now, f"asid-{tag}")
    await pool.execute(
        "INSERT INTO billing_payments (payment_intent, session_id, user_id, pack, tokens, amount, currency)"
        " VALUES ($1, $2, $3, 'small', 1000, 990, 'brl')", f"pi_{tag}", f"cs_{tag}", user)
    return user, email, name


async def traces(pool: asyncpg.Pool, *values: str) -> list[tuple[str, str, str]]:
    """(table, column, value) for every text, jsonb or array column of every table holding
    one of ``values`` anywhere (case-insensitive)."""
    columns = await pool.fetch(
        "SELECT table_name, column_name FROM information_schema.columns c"
        " JOIN information_schema.tables t USING (table_schema, table_name)"
        " WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE'"
        " AND c.data_type IN ('text', 'jsonb', 'json', 'ARRAY', 'character varying')")
    found = []
    for c in columns:
        for v in values:
            hits = await pool.fetchval(
                f'SELECT count(*) FROM "{c["table_name"]}"'
                f' WHERE strpos(lower("{c["column_name"]}"::text), lower($1)) > 0', v)
            if hits:
                found.append((c["table_name"], c["column_name"], v))
    return found


async def test_erase_leaves_no_trace_and_keeps_every_amount(
        ledger: Ledger, pool: asyncpg.Pool, clock: Clock) -> None:
    user, email, name = await person(ledger, pool, clock)
    held = xid()
    assert (await ledger.admit(user, 300, held)).status == "ok"  # in flight across the erasure
    before = await ledger.account(user)
    sums = await pool.fetchrow("SELECT count(*) AS n, sum(tokens) AS t FROM ledger_entries WHERE user_id = $1", user)
    assert await traces(pool, user, email, name) != []  # the probe finds them before

    pseudonym = await ledger.erase(user, actor="admin", reason=f"LGPD request of {name}", source_ip="10.0.0.1")

    assert pseudonym.startswith("erased-") and await ledger.account(user) is None
    after = await ledger.account(pseudonym)
    assert before is not None and after is not None
    assert (after.allowance, after.credits, after.reserved, after.used_cycle, after.cycle_budget, after.plan) == (
        before.allowance, before.credits, before.reserved, before.used_cycle, before.cycle_budget, before.plan)
    assert (after.email, after.name, after.personal_cap, after.language, after.erased_at) == (
        None, None, None, None, clock.now)
    assert tuple(await pool.fetchrow(
        "SELECT count(*) AS n, sum(tokens) AS t FROM ledger_entries WHERE user_id = $1", pseudonym)) == tuple(sums)
    await clean(ledger)
    # Nothing of the id, the e-mail or the name is left, in any column of any table.
    assert await traces(pool, user, email, name, f"Souza {user[4:]}") == []
    assert await pool.fetchval("SELECT pseudonym FROM erased_users WHERE id_sha256 = $1", id_sha256(user)) == pseudonym
    assert await pool.fetchval("SELECT count(*) FROM magic_links WHERE user_id = $1", pseudonym) == 0
    assert await pool.fetchval("SELECT count(*) FROM web_sessions WHERE subject = $1", pseudonym) == 0
    assert await pool.fetchval("SELECT count(*) FROM web_sessions WHERE kind = 'admin' AND subject = 'admin'") >= 1
    assert await pool.fetchval("SELECT user_id FROM billing_payments WHERE user_id = $1", pseudonym) == pseudonym
    assert [tuple(r) for r in await pool.fetch(
        "SELECT d.audience, d.recipient FROM alert_deliveries d JOIN alert_outbox o ON o.id = d.outbox_id"
        " WHERE o.user_id = $1 ORDER BY d.audience", pseudonym)] == [("admin", "boss@example.org"), ("user", "")]
    # The audit trail: every row about the person now names the pseudonym; the erasure's own row.
    actions = [r["action"] for r in await pool.fetch(
        "SELECT action FROM audit_log WHERE target = $1 ORDER BY id", pseudonym)]
    assert actions == ["grant", "settings", "allowance", "suspend", "unsuspend", "erase"]
    erase_row = await pool.fetchrow("SELECT * FROM audit_log WHERE target = $1 AND action = 'erase'", pseudonym)
    assert (erase_row["actor"], erase_row["reason"], erase_row["source_ip"], erase_row["before"]) == (
        "admin", "LGPD request of [erased]", "10.0.0.1", None)
    settings_row = await pool.fetchrow("SELECT * FROM audit_log WHERE target = $1 AND action = 'settings'", pseudonym)
    assert settings_row["actor"] == f"user:{pseudonym}"
    snapshot = json.loads(settings_row["after"])
    assert (snapshot["user_id"], snapshot["email"], snapshot["name"]) == (pseudonym, "[erased]", "[erased]")
    assert (snapshot["personal_cap"], snapshot["balance"]) == (9_000, 2_500)  # amounts untouched
    grant = await pool.fetchrow("SELECT reason FROM ledger_entries WHERE user_id = $1 AND kind = 'grant'", pseudonym)
    assert grant["reason"] == f"bonus for [erased] <[erased]> ({pseudonym})"
    # The audit trail stays append-only outside an erasure.
    with pytest.raises(asyncpg.RaiseError):
        await pool.execute("UPDATE audit_log SET reason = 'x' WHERE id = $1", erase_row["id"])

    # Refused afterwards, never re-created; its hold in flight settles under the pseudonym.
    assert (await ledger.admit(user, 1, xid(), email=email)).status == "erased"
    await ledger.settle(Usage(exchange_id=held, user_id=user, completion_tokens=250))
    late = xid()  # admitted fail-open before the erasure, replayed from the spool after it
    await ledger.settle(Usage(exchange_id=late, user_id=user, completion_tokens=40))
    assert await ledger.account(user) is None
    final = await ledger.account(pseudonym)
    assert final is not None and (final.reserved, final.balance) == (0, before.balance - 250 - 40)
    assert await pool.fetchval("SELECT user_id FROM ledger_entries WHERE exchange_id = $1", late) == pseudonym
    with pytest.raises(UnknownUser):
        await ledger.erase(user, actor="admin", reason="again")
    await clean(ledger)


async def test_erasing_one_person_leaves_another_of_the_same_name_alone(ledger: Ledger, pool: asyncpg.Pool) -> None:
    """Names are not identifiers: erasing one "Maria Silva" must not rewrite the audit trail of
    another, whose own account snapshots carry the same name."""
    tag = uuid.uuid4().hex[:8]
    name = f"Maria Silva {tag}"
    erased, kept = f"maria-a-{tag}", f"maria-b-{tag}"
    for user in (erased, kept):
        assert (await ledger.admit(user, 1, xid(), email=f"{user}@example.com", name=name)).status == "ok"
        await ledger.grant(user, 100, actor="admin", reason=f"welcome {name}")
    await ledger.erase(erased, actor="admin", reason="LGPD")
    rows = await pool.fetch("SELECT after->>'name' AS name, reason FROM audit_log WHERE target = $1", kept)
    assert [(r["name"], r["reason"]) for r in rows] == [(name, f"welcome {name}")]
    assert (await ledger.account(kept)).name == name
    await clean(ledger)


async def test_erase_scrubs_short_ids_only_as_whole_values(pool: asyncpg.Pool) -> None:
    from extproc.ledger import Scrubber
    s = Scrubber("7", "erased-x", "a@b.c", None)
    assert s.text("7") == "erased-x" and s.text("user:7") == "user:erased-x"
    assert s.text("2027-07-07 for a@b.c") == "2027-07-07 for [erased]"
    assert json.loads(s.json('{"n": 7, "id": "7", "t": "17", "e": "x \\"a@b.c\\""}')) == {
        "n": 7, "id": "erased-x", "t": "17", "e": 'x "[erased]"'}
    long = Scrubber("user-1234", "erased-y", None, 'Zé "Z"')
    assert long.text('by user-1234 and Zé "Z"') == "by erased-y and [erased]"
    # The name is rewritten in the rows found, but never finds a row by itself.
    assert not any("Zé" in n for n in long.needles()) and "user-1234" in long.needles()


async def wait_for_lock_waiters(pool: asyncpg.Pool, n: int) -> None:
    for _ in range(500):
        waiting = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
        if waiting >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{n} lock waiters never appeared")


@pytest.mark.parametrize("batched", [False, True])
async def test_settle_racing_an_erasure_is_neither_lost_nor_doubled(
        ledger: Ledger, pool: asyncpg.Pool, batched: bool) -> None:
    """Two connections: the erasure waits for the account (held by a third), then a settle of
    its hold waits for the erasure; the erasure commits first and the settle, whose statement
    began before, lands on the pseudonym exactly once, and the reserved column follows."""
    user = uid()
    await opened(ledger, user)
    holds = [xid(), xid()]
    for x in holds:
        assert (await ledger.admit(user, 100, x)).status == "ok"
    blocker = await pool.acquire()
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM accounts WHERE user_id = $1 FOR UPDATE", user)
        erasing = asyncio.create_task(ledger.erase(user, actor="admin", reason="LGPD"))
        await wait_for_lock_waiters(pool, 1)
        usages = [Usage(exchange_id=x, user_id=user, completion_tokens=60) for x in holds]
        settling = asyncio.create_task(
            ledger._settle_batch(usages) if batched else ledger.settle_one(usages[0]))
        await wait_for_lock_waiters(pool, 2)
        await tx.commit()
    finally:
        await pool.release(blocker)
    pseudonym = await erasing
    await settling
    if not batched:
        assert await ledger.settle_one(usages[1]) is not None
    assert await ledger.account(user) is None
    acc = await ledger.account(pseudonym)
    assert acc is not None and (acc.reserved, acc.used_cycle, acc.balance) == (0, 120, 10_000 - 120)
    assert await pool.fetchval(
        "SELECT count(*) FROM ledger_entries WHERE exchange_id = ANY($1::text[]) AND user_id = $2",
        holds, pseudonym) == 2
    assert await ledger.settle_one(usages[0]) is None  # a replay changes nothing
    await clean(ledger)


async def test_erased_accounts_are_not_rolled(ledger: Ledger, pool: asyncpg.Pool, clock: Clock) -> None:
    user = uid()
    await opened(ledger, user)
    await spend(ledger, user, 100)
    pseudonym = await ledger.erase(user, actor="admin", reason="LGPD")
    entries = await pool.fetchval("SELECT count(*) FROM ledger_entries WHERE user_id = $1", pseudonym)
    clock.now = d(2026, 6, 11)
    await ledger.roll_idle_cycles(limit=100_000)
    assert await pool.fetchval("SELECT count(*) FROM ledger_entries WHERE user_id = $1", pseudonym) == entries
    acc = await ledger.account(pseudonym)
    assert acc is not None and (acc.balance, acc.cycle_start) == (9_900, d(2026, 3, 10, 0))
    await clean(ledger)


# ---------------------------------------------------------------- export


async def test_export_holds_everything_about_the_user(ledger: Ledger, pool: asyncpg.Pool, clock: Clock) -> None:
    user, email, name = await person(ledger, pool, clock)
    held = xid()
    assert (await ledger.admit(user, 300, held)).status == "ok"
    data = await ledger.export(user)
    assert data is not None
    text = json.dumps(data)  # JSON-serialisable as it is
    assert data["account"]["email"] == email and data["account"]["name"] == name
    assert data["account"]["personal_cap"] == 9_000 and data["account"]["allowance_override"] == 20_000
    kinds = [e["kind"] for e in data["ledger_entries"]]
    assert kinds == ["cycle_reset", "usage", "usage", "grant"]
    assert sum(e["tokens"] for e in data["ledger_entries"]) == data["account"]["balance"]
    assert all(isinstance(e["tokens"], int) and e["created_at"].startswith("2026-03-10T")
               for e in data["ledger_entries"])
    assert [(r["exchange_id"], r["state"], r["tokens"]) for r in data["reservations"] if r["state"] == "held"] == [
        (held, "held", 300)]
    # The settled holds are deleted; what they held, and when, is on their usage entries.
    assert [(e["held"], e["admitted_at"]) for e in data["ledger_entries"] if e["kind"] == "usage"] == [
        (10, clock.now.isoformat()), (7_990, clock.now.isoformat())]
    [alert] = data["alerts"]
    assert (alert["threshold"], alert["used"], alert["budget"], alert["used_pct"]) == (80, 8_000, 10_000, 80)
    assert alert["deliveries"] == [{"channel": "email", "recipient": email, "state": "failed", "sent_at": None}]
    assert [(p["payment_intent"], p["tokens"], p["amount"]) for p in data["purchases"]] == [
        (f"pi_{user[4:]}", 1_000, 990)]
    assert [a["action"] for a in data["audit"]] == ["grant", "settings", "allowance", "suspend", "unsuspend"]
    assert data["audit"][1]["after"]["preferences"]["language"] == "en"
    assert data["sessions"] == [{"created_at": clock.now.isoformat(), "last_used_at": clock.now.isoformat(),
                                 "expires_at": clock.now.isoformat(), "revoked_at": None,
                                 "source_ip": "10.0.0.7", "user_agent": "Firefox"}]
    assert data["sign_in_links"] == [{"created_at": clock.now.isoformat(), "expires_at": clock.now.isoformat(),
                                      "used_at": None}]
    # Never a session's hash nor a link's nonce (either would sign the reader in).
    assert f"sid-{user[4:]}" not in text and f"n-{user[4:]}" not in text and "boss@example.org" not in text
    assert await ledger.export(uid()) is None


async def test_erasure_amid_a_burst_of_settles(pool: asyncpg.Pool, settings: Settings, clock: Clock) -> None:
    """Thirty holds settled (group-committed) while the erasure runs: every one is debited
    once, under the pseudonym, and nothing stays reserved."""
    ledger = Ledger(pool, settings.replace(default_monthly_tokens=10_000), clock)  # batching on
    user = uid()
    await opened(ledger, user)
    holds = [xid() for _ in range(30)]
    for x in holds:
        assert (await ledger.admit(user, 50, x)).status == "ok"
    settles = [ledger.settle(Usage(exchange_id=x, user_id=user, completion_tokens=7)) for x in holds]
    results = await asyncio.gather(*settles[:15], ledger.erase(user, actor="admin", reason="LGPD"), *settles[15:])
    pseudonym = results[15]
    assert all(r is not None and r.cost == 7 for r in results[:15] + results[16:])
    acc = await ledger.account(pseudonym)
    assert acc is not None and (acc.reserved, acc.used_cycle, acc.balance) == (0, 210, 10_000 - 210)
    assert await pool.fetchval("SELECT count(*) FROM ledger_entries WHERE exchange_id = ANY($1::text[])"
                               " AND user_id = $2", holds, pseudonym) == 30
    assert await ledger.account(user) is None
    await clean(ledger)
