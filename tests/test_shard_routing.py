"""Every money statement reaches one user's rows (docs/scaling.md, "Sharding the ledger by user").

The ledger is to shard by ``user_id`` on Citus, whose router sends a statement to one shard
only when each distributed table in it is pinned to one value of ``user_id``. Citus cannot be
installed on these machines, so this asks PostgreSQL's own planner instead: the ledger's money
operations run on connections that record every statement with its arguments and the ledger
function that sent it; each recorded statement is then EXPLAINed with those arguments, and
every scan of a distributed table must be pinned to one user (``user_id = <one value>``, or a
join on ``user_id`` with a table so pinned). A statement that spans users is accepted only
if ``SPANS_USERS`` (by design) or ``FANS_OUT`` (to change before the move) names it by its
function and a fragment of its SQL, with the reason docs/scaling.md gives.

A new statement that looks rows up by another key (an exchange id, an idempotency key) makes
this fail: under Citus it would fan out to every shard.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from support.clock import Clock

from extproc import ledger as ledger_module
from extproc.ledger import Ledger, Usage, create_pool, purchase_key
from extproc.settings import Settings

# Distributed by user_id in docs/scaling.md. Not here: audit_log (distributed by its target;
# the ledger only inserts there), plans and the billing tables (reference tables), and
# alert_deliveries, which has no user_id column yet (docs/scaling.md: what it needs first).
DISTRIBUTED = frozenset({"accounts", "ledger_entries", "reservations", "alert_outbox"})

# Statements that reach several users' rows by design, and why (docs/scaling.md), each named
# by its function and a fragment of its SQL: a new statement in the same function is checked.
SPANS_USERS = {
    ("_admit_batch", "FROM accounts WHERE user_id = ANY($3::text[])"):
        "a batch of admissions: one statement for many users (grouped by shard under Citus)",
    ("_settle_batch", "USING unnest($1::text[]) AS x(id) WHERE r.exchange_id = x.id"):
        "a batch of settles closes its holds by exchange id, as _settle does (FANS_OUT)",
    ("_settle_batch", "SELECT * FROM accounts WHERE user_id = ANY($1::text[])"):
        "a batch of settles locks its users' accounts in one statement (grouped by shard under Citus)",
    ("_settle_batch", "UPDATE accounts a SET allowance = v.al"):
        "a batch of settles updates its users' accounts in one statement (grouped by shard under Citus)",
    ("sweep_reservations", "WHERE state = 'held' AND expires_at <= $1"):
        "the sweep's search for expired holds (each is then settled on its own)",
    ("roll_idle_cycles", "WHERE cycle_end <= $1"):
        "the sweep's search for accounts whose cycle ended (each is then rolled on its own)",
    ("reconcile", "FROM accounts a LEFT JOIN"):
        "the audit of every account against its entries",
    ("calibration", "WHERE kind = 'usage' AND created_at >="):
        "the estimator's report over every user's entries",
}

# Statements that would fan out to every shard today, each with what it needs before the move
# (docs/scaling.md). The check fails on any other, and on one of these that no longer fans
# out, so this list and the document stay the truth.
FANS_OUT = {
    ("_settle", "WHERE exchange_id = $1 AND state = 'held'"):
        "closes the hold by exchange id alone so the debit follows an erasure's rename",
    ("release", "WHERE exchange_id = $1 AND state = 'held'"):
        "the same, for a release",
    ("release", "WHERE exchange_id = $1 AND state = 'expired'"):
        "the same, for a release after the sweep charged the hold",
    ("grant", "WHERE idempotency_key = $1"):
        "idempotency keys are global (a key used for one user is applied for no other)",
    ("settle_payment", "WHERE idempotency_key = $1"):
        "the purchase's credit by its key alone: a payment row whose user id no longer matches"
        " the credit's (an erasure) must fail loudly in grant, not look uncredited",
}

LEDGER_FILE = ledger_module.__file__


@dataclass(frozen=True)
class Sent:
    function: str
    sql: str
    args: tuple[Any, ...]


SENT: list[Sent] = []


def _sender() -> str:
    """The innermost function of extproc/ledger.py on the calling stack: the one whose SQL
    this is."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename == LEDGER_FILE:
            return frame.f_code.co_name
        frame = frame.f_back  # type: ignore[assignment]
    return ""


class Recording(asyncpg.Connection):  # type: ignore[misc]
    """A connection that notes each statement the ledger sends (not asyncpg's own)."""

    def _note(self, query: str, args: tuple[Any, ...]) -> None:
        function = _sender()
        if function:
            SENT.append(Sent(function, query, args))

    async def executemany(self, command: str, args: Any, **options: Any) -> Any:
        args = list(args)  # an iterator would be spent by the note
        for one in args:
            self._note(command, tuple(one))
        return await super().executemany(command, args, **options)


def _recording(name: str) -> Any:
    """Connection.<name>, noting the statement first."""
    async def method(self: Recording, query: str, *args: Any, **options: Any) -> Any:
        self._note(query, args)
        return await getattr(super(Recording, self), name)(query, *args, **options)
    return method


for _name in ("execute", "fetch", "fetchrow", "fetchval"):
    setattr(Recording, _name, _recording(_name))


@pytest.fixture
async def recorded(make_database: Any, settings: Settings) -> AsyncIterator[tuple[Ledger, asyncpg.Pool]]:
    s = settings.replace(database_url=make_database(), default_monthly_tokens=10_000)
    pool = await create_pool(s, connection_class=Recording)
    admit_pool = await create_pool(s, asynchronous_commit=True, connection_class=Recording)
    SENT.clear()
    try:
        yield Ledger(pool, s, Clock(datetime(2026, 3, 10, 12, tzinfo=UTC)), admit_pool), pool
    finally:
        await admit_pool.close()
        await pool.close()


def xid() -> str:
    return uuid.uuid4().hex


async def every_money_operation(ledger: Ledger, pool: asyncpg.Pool) -> None:
    """The ledger's money operations, each at least once, on a few users."""
    clock = ledger.clock
    assert isinstance(clock, Clock)
    users = ["ana", "bia", "caio"]
    for u in users:  # onboarding: the slow path opens each account
        x = xid()
        assert (await ledger.admit(u, 100, x, email=f"{u}@example.com", name=u.title())).outcome == "ok"
        await ledger.settle(Usage(exchange_id=x, user_id=u, prompt_tokens=10, completion_tokens=40))
    # the fast path, then a batch of admissions and a batch of settles
    xs = [(u, xid()) for u in users for _ in range(3)]
    admitted = await asyncio.gather(*(ledger.admit(u, 50, x, email=f"{u}@example.com", name=u.title())
                                      for u, x in xs))
    assert all(a.outcome == "ok" for a in admitted)
    await asyncio.gather(*(ledger.settle(Usage(exchange_id=x, user_id=u, prompt_tokens=5, completion_tokens=20))
                           for u, x in xs))
    # a replay, a release, a refusal, a changed e-mail
    u, x = xs[0]
    assert await ledger.settle(Usage(exchange_id=x, user_id=u, prompt_tokens=5, completion_tokens=20)) is None
    x = xid()
    await ledger.admit("ana", 70, x)
    assert await ledger.release(x)
    assert (await ledger.admit("ana", 10**9, xid())).outcome != "ok"
    assert (await ledger.admit("ana", 10, xid(), email="ana.new@example.com")).outcome == "ok"
    # an exchange settled without a hold (a spooled settle after its hold was swept), true-ups
    await ledger.settle(Usage(exchange_id=xid(), user_id="bia", prompt_tokens=1, completion_tokens=2))
    # admins and users: grants, plans, settings, suspension, allowance, notices
    await ledger.grant("bia", 500, actor="admin", reason="gift", idempotency_key=f"k-{xid()}")
    await ledger.upsert_plan("pro", monthly_tokens=50_000, requests_per_minute=None, rollover=True, actor="admin")
    await ledger.set_plan("bia", "pro", actor="admin", reason="upgrade")
    await ledger.set_settings("bia", personal_cap=5_000, notify_80=False, actor="bia")
    await ledger.set_allowance("caio", 20_000, actor="admin", reason="project")
    await ledger.set_suspended("caio", True, actor="admin", reason="abuse")
    await ledger.set_suspended("caio", False, actor="admin", reason="cleared")
    assert (await ledger.account("bia")) is not None
    account = await ledger.account("ana")
    assert account is not None
    await ledger.claim_inline_notice("ana", 80, account.cycle_start)
    # a purchase (as extproc.purchases records it), then its refund and a dispute
    session, intent = f"cs_{xid()}", f"pi_{xid()}"
    await ledger.grant("caio", 3_000, actor="stripe", reason="pack", kind="purchase",
                       idempotency_key=purchase_key(session))
    await pool.execute(
        "INSERT INTO billing_payments (payment_intent, session_id, user_id, pack, tokens, amount, currency,"
        " amount_refunded, created_at, updated_at) VALUES ($1, $2, 'caio', 'p', 3000, 1000, 'brl', 500, now(), now())",
        intent, session)
    settled = await ledger.settle_payment(intent, actor="stripe", reason=lambda move: "refund")
    assert settled.applied
    await pool.execute(
        "INSERT INTO billing_disputes (dispute_id, payment_intent, amount, currency, status, status_rank, status_at)"
        " VALUES ($1, $2, 1000, 'brl', 'needs_response', 1, now())", f"dp_{xid()}", intent)
    assert (await ledger.settle_payment(intent, actor="stripe", reason=lambda move: "dispute")).applied
    # the sweep: an expired hold, a cycle that ended
    x, y = xid(), xid()
    await ledger.admit("bia", 30, x)
    await ledger.admit("caio", 30, y)
    clock.now = datetime(2026, 4, 20, 12, tzinfo=UTC)
    assert await ledger.sweep_reservations() == 3  # these two, and ana's last admission
    assert await ledger.roll_idle_cycles() >= 1
    await ledger.settle(Usage(exchange_id=x, user_id="bia", prompt_tokens=1, completion_tokens=1))  # late
    assert await ledger.release(y)  # an upstream error reported after the sweep charged the hold
    assert await ledger.reconcile() == []
    await ledger.calibration()
    # LGPD: the export, then the erasure
    assert await ledger.export("ana") is not None
    await ledger.erase("ana", actor="admin", reason="request")


def plan_nodes(plan: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def walk(node: dict[str, Any]) -> None:
        out.append(node)
        for child in node.get("Plans", []):
            walk(child)

    for entry in plan:
        walk(entry["Plan"])
    return out


# `user_id = 'ana'::text`, `a.user_id = $1`, `(user_id = ANY (...))` is not one value.
ONE_VALUE = re.compile(r"\buser_id = ('(?:[^']|'')*'::text|\$\d+)")
JOINED = re.compile(r"\buser_id = \w+\.user_id\b|\b\w+\.user_id = \w*\.?user_id\b")


def unpinned_scans(plan: Any) -> list[str]:
    """The distributed tables this plan reads without pinning them to one user."""
    nodes = plan_nodes(plan)
    conditions = " ".join(str(n.get(k, "")) for n in nodes
                          for k in ("Index Cond", "Filter", "Recheck Cond", "Hash Cond", "Join Filter", "Merge Cond"))
    pinned = bool(ONE_VALUE.search(conditions))
    bad = []
    for node in nodes:
        relation = node.get("Relation Name")
        if relation not in DISTRIBUTED or node.get("Node Type") == "ModifyTable":
            continue
        own = " ".join(str(node.get(k, "")) for k in ("Index Cond", "Filter", "Recheck Cond"))
        own += " ".join(str(child.get("Index Cond", "")) for child in node.get("Plans", []))
        if ONE_VALUE.search(own):
            continue
        if pinned and JOINED.search(conditions):
            continue  # reached through a join on user_id from a pinned table
        bad.append(f"{relation} ({node.get('Node Type')})")
    return bad


async def test_every_money_statement_reaches_one_users_rows(recorded: tuple[Ledger, asyncpg.Pool]) -> None:
    ledger, pool = recorded
    await every_money_operation(ledger, pool)
    sent = [s for s in SENT if any(re.search(rf"\b{t}\b", s.sql) for t in DISTRIBUTED)]
    functions = {s.function for s in sent}
    # the scenario reached what it is meant to check
    assert {"admit_one", "_admit_slow", "_admit_batch", "_settle", "_settle_batch", "release", "grant",
            "settle_payment", "sweep_reservations", "_erase"} <= functions, functions
    problems: dict[str, list[str]] = {}
    async with pool.acquire() as conn:
        for s in {(s.function, s.sql): s for s in sent}.values():
            raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {s.sql}", *s.args)
            bad = unpinned_scans(json.loads(raw) if isinstance(raw, str) else raw)
            if bad:
                problems.setdefault(s.function, []).append(f"{', '.join(bad)}: {s.sql}")
    listed = {**SPANS_USERS, **FANS_OUT}
    known = {key: [p for p in problems.get(key[0], []) if key[1] in p] for key in listed}
    assert all(known.values()), {key: "no longer spans users: update the lists and docs/scaling.md"
                                 for key, found in known.items() if not found}
    unknown = {function: [p for p in found if not any(f == function and fragment in p for f, fragment in listed)]
               for function, found in problems.items()}
    assert not any(unknown.values()), json.dumps(unknown, indent=1)


def test_the_check_sees_a_statement_that_fans_out() -> None:
    """What the planner prints for a lookup by exchange id alone, and for one pinned by user."""
    by_exchange = [{"Plan": {"Node Type": "Index Scan", "Relation Name": "reservations",
                             "Index Cond": "(exchange_id = 'x'::text)"}}]
    by_user = [{"Plan": {"Node Type": "Nested Loop", "Plans": [
        {"Node Type": "Index Scan", "Relation Name": "accounts", "Index Cond": "(user_id = $1)"},
        {"Node Type": "Index Scan", "Relation Name": "ledger_entries", "Index Cond": "(l.user_id = a.user_id)"}]}}]
    batch = [{"Plan": {"Node Type": "Bitmap Heap Scan", "Relation Name": "accounts",
                       "Recheck Cond": "(user_id = ANY ($1))", "Plans": [
                           {"Node Type": "Bitmap Index Scan", "Index Cond": "(user_id = ANY ($1))"}]}}]
    assert unpinned_scans(by_exchange) == ["reservations (Index Scan)"]
    assert unpinned_scans(by_user) == []
    assert unpinned_scans(batch) == ["accounts (Bitmap Heap Scan)"]
