"""The ledger against real PostgreSQL with an injected clock: cycles, plans, states,
reservations, exactly-once, and the invariants after every scenario."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from support.clock import Clock

from extproc.ledger import Ledger, UnknownPlan, UnknownUser, Usage
from extproc.settings import Settings
from extproc.spool import Spool


def d(y: int, m: int, day: int, h: int = 12) -> datetime:
    return datetime(y, m, day, h, tzinfo=UTC)


@pytest.fixture
async def pool(service) -> asyncpg.Pool:
    return service.pool


@pytest.fixture
def clock() -> Clock:
    return Clock(d(2026, 1, 31))


@pytest.fixture
def ledger(pool, settings: Settings, clock: Clock) -> Ledger:
    return Ledger(pool, settings.replace(default_monthly_tokens=1000), clock)


def xid() -> str:
    return uuid.uuid4().hex


async def spend(ledger: Ledger, user: str, tokens: int, estimate: int | None = None) -> None:
    x = xid()
    admission = await ledger.admit(user, estimate if estimate is not None else tokens, x)
    assert admission.outcome == "ok", admission
    await ledger.settle(Usage(exchange_id=x, user_id=user, prompt_tokens=0, completion_tokens=tokens))


async def check_invariants(ledger: Ledger) -> None:
    assert await ledger.reconcile() == []


async def entries(pool: asyncpg.Pool, user: str, kind: str | None = None) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM ledger_entries WHERE user_id = $1 AND ($2::text IS NULL OR kind = $2) ORDER BY id",
        user, kind)


# ---------------------------------------------------------------- cycles


async def test_cycle_rolls_lazily_jan31_to_feb28(ledger, clock, pool, user):
    await spend(ledger, user, 600)
    account = await ledger.account(user)
    assert (account.cycle_start, account.cycle_end) == (d(2026, 1, 31, 0), d(2026, 2, 28, 0))
    clock.now = d(2026, 2, 27, 23)
    assert (await ledger.admit(user, 1, xid())).account.allowance == 400  # same cycle
    clock.now = d(2026, 2, 28, 0)
    admission = await ledger.admit(user, 1, xid())
    assert admission.outcome == "ok"
    assert admission.account.allowance == 1000
    assert admission.account.used_cycle == 0
    assert (admission.account.cycle_start, admission.account.cycle_end) == (
        d(2026, 2, 28, 0), d(2026, 3, 31, 0))
    resets = await entries(pool, user, "cycle_reset")
    assert [r["tokens"] for r in resets] == [1000, 600]  # opening + reset (400 expired)
    assert "400 unused tokens expired" in resets[1]["reason"]
    assert resets[1]["cycle_start"] == d(2026, 2, 28, 0)
    await check_invariants(ledger)


async def test_cycle_rolls_december_to_january(ledger, clock, user):
    clock.now = d(2026, 12, 15)
    await spend(ledger, user, 10)
    clock.now = d(2027, 1, 15, 0)
    account = (await ledger.admit(user, 1, xid())).account
    assert (account.cycle_start, account.cycle_end) == (d(2027, 1, 15, 0), d(2027, 2, 15, 0))


async def test_idle_account_rolls_once_for_many_months(ledger, clock, pool, user):
    await spend(ledger, user, 10)
    clock.now = d(2026, 7, 4)
    account = (await ledger.admit(user, 1, xid())).account
    assert (account.cycle_start, account.cycle_end) == (d(2026, 6, 30, 0), d(2026, 7, 31, 0))
    assert len(await entries(pool, user, "cycle_reset")) == 2


async def test_request_and_sweep_racing_roll_once(ledger, clock, pool, user):
    await spend(ledger, user, 100)
    clock.now = d(2026, 3, 1)
    results = await asyncio.gather(
        *[ledger.admit(user, 1, xid()) for _ in range(10)],
        ledger.roll_idle_cycles(), ledger.roll_idle_cycles())
    assert all(r.outcome == "ok" for r in results[:10])
    assert len(await entries(pool, user, "cycle_reset")) == 2
    assert await ledger.roll_idle_cycles() == 0
    await check_invariants(ledger)


async def test_rollover_plan_carries_unused_allowance_and_credits_survive(ledger, clock, user):
    await ledger.upsert_plan("carry", monthly_tokens=500, requests_per_minute=None, rollover=True,
                             actor="test")
    await spend(ledger, user, 100)  # default plan: 1000 -> 900
    await ledger.grant(user, 250, actor="test", reason="bonus")
    await ledger.set_plan(user, "carry", actor="test", reason="upgrade")
    clock.now = d(2026, 2, 28, 1)
    account = (await ledger.admit(user, 1, xid())).account
    assert account.allowance == 900 + 500
    assert account.credits == 250
    assert account.cycle_budget == 900 + 500 + 250
    await check_invariants(ledger)


async def test_no_rollover_by_default(ledger, clock, user):
    await spend(ledger, user, 100)
    await ledger.grant(user, 30, actor="test", reason="bonus")
    clock.now = d(2026, 2, 28, 1)
    account = (await ledger.admit(user, 1, xid())).account
    assert (account.allowance, account.credits) == (1000, 30)


async def test_plan_errors(ledger, user):
    with pytest.raises(UnknownUser):
        await ledger.set_plan(user, "default", actor="t", reason="r")
    await spend(ledger, user, 1)
    with pytest.raises(UnknownPlan):
        await ledger.set_plan(user, "nope", actor="t", reason="r")
    plans = {p.name: p for p in await ledger.plans()}
    assert plans["default"].monthly_tokens == 1000  # NULL column -> deployment default


# ---------------------------------------------------------------- states


async def test_states_follow_usage_thresholds(ledger, clock, user):
    await spend(ledger, user, 790)
    assert (await ledger.account(user)).state == "active"
    await spend(ledger, user, 10)
    assert (await ledger.account(user)).state == "warned_80"
    await spend(ledger, user, 100)
    assert (await ledger.account(user)).state == "warned_90"
    await spend(ledger, user, 100)
    account = await ledger.account(user)
    assert (account.state, account.balance, account.used_pct) == ("blocked", 0, 100.0)
    assert (await ledger.admit(user, 1, xid())).outcome == "insufficient"
    account, applied = await ledger.grant(user, 500, actor="test", reason="top-up")
    assert applied and account.state == "active"  # 1000 of a 1500 budget: 66.67 %
    clock.now = d(2026, 3, 1)
    assert (await ledger.admit(user, 1, xid())).account.state == "active"
    await check_invariants(ledger)


async def test_suspended_refused_regardless_of_balance(ledger, user):
    await spend(ledger, user, 1)
    await ledger.set_suspended(user, True, actor="admin", reason="abuse")
    assert (await ledger.admit(user, 1, xid())).outcome == "suspended"
    await ledger.grant(user, 10_000, actor="admin", reason="still suspended")
    assert (await ledger.admit(user, 1, xid())).outcome == "suspended"
    account = await ledger.set_suspended(user, False, actor="admin", reason="ok")
    assert account.state == "active"
    assert (await ledger.admit(user, 1, xid())).outcome == "ok"


async def test_admin_changes_write_audit_rows(ledger, pool, user):
    await spend(ledger, user, 1)
    await ledger.grant(user, 5, actor="admin:ana", reason="gift", source_ip="10.0.0.1")
    await ledger.set_suspended(user, True, actor="admin:ana", reason="x")
    await ledger.set_plan(user, "default", actor="admin:ana", reason="y")
    rows = await pool.fetch("SELECT * FROM audit_log WHERE target = $1 ORDER BY id", user)
    assert [r["action"] for r in rows] == ["grant", "suspend", "plan"]
    assert rows[0]["source_ip"] == "10.0.0.1" and rows[0]["actor"] == "admin:ana"
    with pytest.raises(asyncpg.RaiseError):
        await pool.execute("DELETE FROM audit_log WHERE target = $1", user)


async def test_grant_is_idempotent_by_key(ledger, pool, user):
    await spend(ledger, user, 1)
    results = await asyncio.gather(*[
        ledger.grant(user, 100, actor="admin", reason="double click", idempotency_key=f"k-{user}")
        for _ in range(5)])
    assert sorted(applied for _, applied in results) == [False] * 4 + [True]
    assert len(await entries(pool, user, "grant")) == 1
    with pytest.raises(UnknownUser):
        await ledger.grant("nobody-" + user, 1, actor="a", reason="r")


# ---------------------------------------------------------------- reservations


async def test_expired_reservations_are_charged_once_by_racing_sweepers(ledger, clock, pool, user):
    await spend(ledger, user, 1)
    x = xid()
    assert (await ledger.admit(user, 40, x)).outcome == "ok"
    assert (await ledger.account(user)).reserved == 40
    clock.now += timedelta(seconds=ledger.settings.reservation_ttl_seconds + 1)
    swept = await asyncio.gather(ledger.sweep_reservations(), ledger.sweep_reservations())
    assert sum(swept) >= 1  # other tests' stale holds may be swept too; ours exactly once:
    [entry] = [e for e in await entries(pool, user, "usage") if e["exchange_id"] == x]
    assert entry["tokens"] == -40 and list(entry["flags"]) == ["expired"]
    state = await pool.fetchval("SELECT state FROM reservations WHERE exchange_id = $1", x)
    assert state == "expired"
    assert (await ledger.account(user)).reserved == 0
    await check_invariants(ledger)


async def test_release_returns_the_hold_without_entry(ledger, pool, user):
    x = xid()
    await ledger.admit(user, 50, x)
    assert await ledger.release(x) is True
    assert await ledger.release(x) is False
    account = await ledger.account(user)
    assert (account.reserved, account.balance) == (0, 1000)
    assert await entries(pool, user, "usage") == []


async def test_concurrent_settle_replays_debit_once(ledger, pool, user):
    x = xid()
    await ledger.admit(user, 100, x)
    usage = Usage(exchange_id=x, user_id=user, prompt_tokens=30, completion_tokens=20)
    results = await asyncio.gather(*[ledger.settle(usage) for _ in range(20)])
    assert sum(r is not None for r in results) == 1
    assert [e["tokens"] for e in await entries(pool, user, "usage")] == [-50]
    await check_invariants(ledger)


async def test_a_settle_moves_its_hold_into_the_usage_entry(ledger, clock, pool, user):
    """One settle alone and a group-committed burst alike: the held reservation is deleted and
    its tokens and admission time are on the entry; a replay finds the entry, not a hold, and
    changes nothing. Other endings keep their row: the sweep's 'expired', a 'released'."""
    admitted_at = clock.now
    alone, burst, swept, released = xid(), [xid() for _ in range(6)], xid(), xid()
    for x, estimate in [(alone, 70), *[(b, 30) for b in burst], (swept, 40), (released, 20)]:
        assert (await ledger.admit(user, estimate, x)).outcome == "ok"
    clock.now += timedelta(seconds=5)
    assert await ledger.settle_one(Usage(exchange_id=alone, user_id=user, prompt_tokens=9, completion_tokens=1))
    results = await asyncio.gather(*[ledger.settle(Usage(exchange_id=b, user_id=user, prompt_tokens=4,
                                                         completion_tokens=1)) for b in burst])
    assert all(results)
    assert await ledger.release(released)
    clock.now += timedelta(seconds=ledger.settings.reservation_ttl_seconds)
    assert await ledger.sweep_reservations() >= 1
    rows = {r["exchange_id"]: r for r in await pool.fetch(
        "SELECT exchange_id, state FROM reservations WHERE user_id = $1", user)}
    assert {x: r["state"] for x, r in rows.items()} == {swept: "expired", released: "released"}
    by_id = {e["exchange_id"]: e for e in await entries(pool, user, "usage")}
    assert set(by_id) == {alone, *burst, swept}
    assert (by_id[alone]["held"], by_id[alone]["tokens"]) == (70, -10)
    assert {(by_id[b]["held"], by_id[b]["tokens"]) for b in burst} == {(30, -5)}
    assert (by_id[swept]["held"], by_id[swept]["tokens"]) == (40, -40)
    assert {by_id[x]["admitted_at"] for x in by_id} == {admitted_at}
    for x in (alone, burst[0]):  # replays, alone and batched: no hold, the entry stands
        assert await ledger.settle_one(Usage(exchange_id=x, user_id=user, completion_tokens=99)) is None
        assert await ledger.settle(Usage(exchange_id=x, user_id=user, completion_tokens=99)) is None
    account = await ledger.account(user)
    assert (account.balance, account.reserved) == (1000 - 10 - 6 * 5 - 40, 0)
    assert len(await entries(pool, user, "usage")) == 8
    await check_invariants(ledger)


async def test_entries_without_a_hold_leave_held_empty(ledger, pool, user, tmp_path):
    """A grant and an exchange replayed from the spool (admitted while the ledger was down)
    closed no reservation: nothing claims to have been held."""
    x = xid()
    spool = Spool(tmp_path)
    await spool.append(Usage(exchange_id=x, user_id=user, prompt_tokens=2, completion_tokens=3))
    assert (await spool.replay(ledger)).replayed == 1  # opens the account, as the gate would
    await ledger.grant(user, 5, actor="test", reason="r", idempotency_key="k-" + xid())
    rows = await pool.fetch("SELECT kind, held, admitted_at FROM ledger_entries WHERE user_id = $1"
                            " AND kind IN ('grant', 'usage')", user)
    assert sorted((r["kind"], r["held"], r["admitted_at"]) for r in rows) == [
        ("grant", None, None), ("usage", None, None)]
    await check_invariants(ledger)


async def test_overspend_beyond_reservation_is_bounded_and_recorded(ledger, user):
    """Real usage above the estimate is debited in full (credits go negative): the bound of
    B1 is the excess of real over estimated tokens of the requests in flight."""
    await spend(ledger, user, 990)
    x = xid()
    await ledger.admit(user, 10, x)
    await ledger.settle(Usage(exchange_id=x, user_id=user, prompt_tokens=0, completion_tokens=25))
    account = await ledger.account(user)
    assert (account.allowance, account.credits, account.state) == (0, -15, "blocked")
    await check_invariants(ledger)


# ---------------------------------------------------------------- spool


async def test_spool_replays_exactly_once(ledger, pool, user, tmp_path):
    spool = Spool(tmp_path)
    x = xid()
    await ledger.admit(user, 100, x)
    usage = Usage(exchange_id=x, user_id=user, prompt_tokens=3, completion_tokens=4)
    await spool.append(usage)
    await spool.append(usage)  # a retry that spooled twice: one row (unreadable rows: test_spool.py)
    assert spool.pending() == 1
    result = await spool.replay(ledger)
    assert (result.replayed, result.quarantined, result.left) == (1, 0, 0)
    assert spool.pending() == 0
    assert [e["tokens"] for e in await entries(pool, user, "usage")] == [-7]
    await check_invariants(ledger)


async def test_spool_replay_of_unknown_user_opens_account(ledger, pool, user, tmp_path):
    """Fail-open admissions have no reservation and maybe no account yet."""
    spool = Spool(tmp_path)
    await spool.append(Usage(exchange_id=xid(), user_id=user, prompt_tokens=5, completion_tokens=5,
                             email="late@example.com"))
    assert (await spool.replay(ledger)).replayed == 1
    [entry] = await entries(pool, user, "usage")
    assert "unreserved" in entry["flags"]
    account = await ledger.account(user)
    assert (account.balance, account.email) == (990, "late@example.com")


async def test_calibration_reports_factor_per_model(ledger, pool, user):
    for chars, prompt in ((1000, 380), (2000, 740)):
        x = xid()
        assert (await ledger.admit(user, 400, x, model="m-cal")).outcome == "ok"
        await ledger.settle(Usage(exchange_id=x, user_id=user, model="m-cal", prompt_tokens=prompt,
                                  completion_tokens=100, estimate=400, prompt_chars=chars))
    [row] = [r for r in await ledger.calibration(days=1) if r["model"] == "m-cal"]
    assert row["exchanges"] == 2
    assert row["suggested_factor"] == round(1120 / 3000, 4)
    assert row["real_to_estimate"] == round(1320 / 800, 4)


# ---------------------------------------------------------------- late settles (I5)


async def _swept(ledger: Ledger, clock: Clock, user: str, hold: int, model: str | None = None) -> str:
    """An exchange admitted with ``hold`` and charged by the sweep before its settle came."""
    x = xid()
    assert (await ledger.admit(user, hold, x, model=model)).outcome == "ok"
    clock.now += timedelta(seconds=ledger.settings.reservation_ttl_seconds + 1)
    assert await ledger.sweep_reservations() == 1
    return x


async def test_late_settle_trues_up_the_sweep_once(ledger, clock, pool, user):
    x = await _swept(ledger, clock, user, 100)
    assert (await ledger.account(user)).balance == 900
    late = Usage(exchange_id=x, user_id=user, prompt_tokens=40, completion_tokens=260)
    settled = await ledger.settle(late)
    assert settled is not None and settled.cost == 200  # 300 real - 100 swept
    assert await ledger.settle(late) is None  # a replay of the late settle: nothing
    account = await ledger.account(user)
    assert (account.balance, account.used_cycle, account.reserved) == (700, 300, 0)
    [trueup] = [e for e in await entries(pool, user, "usage") if "trueup" in e["flags"]]
    assert (trueup["tokens"], trueup["exchange_id"], trueup["idempotency_key"]) == (-200, None, f"trueup:{x}")
    await check_invariants(ledger)


async def test_late_settle_smaller_than_the_sweep_gives_back(ledger, clock, user):
    x = await _swept(ledger, clock, user, 500)
    settled = await ledger.settle(Usage(exchange_id=x, user_id=user, prompt_tokens=10, completion_tokens=20))
    assert settled is not None and settled.cost == -470
    account = await ledger.account(user)
    assert (account.balance, account.used_cycle) == (970, 30)
    await check_invariants(ledger)


async def test_concurrent_late_settles_true_up_once(ledger, clock, pool, user):
    x = await _swept(ledger, clock, user, 100)
    late = Usage(exchange_id=x, user_id=user, prompt_tokens=0, completion_tokens=150)
    results = await asyncio.gather(*[ledger.settle(late) for _ in range(8)])
    assert sum(r is not None for r in results) == 1
    assert (await ledger.account(user)).balance == 850
    await check_invariants(ledger)


async def test_sweep_charges_a_weighted_hold_once_not_weighted_again(pool, settings, clock, user):
    weighted = Ledger(pool, settings.replace(default_monthly_tokens=1000, model_weights="heavy=10"), clock)
    x = await _swept(weighted, clock, user, 200, model="heavy")  # 20 tokens x 10, held as 200
    assert (await weighted.account(user)).balance == 800
    # the real usage, 15 tokens x 10 = 150: a true-up of -50
    await weighted.settle(Usage(exchange_id=x, user_id=user, model="heavy", completion_tokens=15))
    assert (await weighted.account(user)).balance == 850
    await check_invariants(weighted)


async def test_a_spooled_release_after_the_sweep_gives_the_charge_back(ledger, clock, user):
    x = await _swept(ledger, clock, user, 100)
    await ledger.settle(Usage(exchange_id=x, user_id=user, flags=("released",), cost=0))
    assert (await ledger.account(user)).balance == 1000
    await check_invariants(ledger)


async def test_late_give_back_returns_credits_the_sweep_took(ledger, clock, pool, user):
    await spend(ledger, user, 1000)  # the allowance is gone: the sweep will take credits
    await ledger.grant(user, 500, actor="test", reason="top-up")
    x = await _swept(ledger, clock, user, 300)
    account = await ledger.account(user)
    assert (account.allowance, account.credits) == (0, 200)
    await ledger.settle(Usage(exchange_id=x, user_id=user, completion_tokens=100))
    account = await ledger.account(user)
    assert (account.allowance, account.credits) == (0, 400)  # as if settled on time
    await check_invariants(ledger)


async def test_late_give_back_after_a_cycle_roll_does_not_swell_the_new_allowance(ledger, clock, user):
    x = await _swept(ledger, clock, user, 500)
    clock.now += timedelta(days=40)  # the cycle rolls (no rollover): a fresh 1000
    await ledger.roll_idle_cycles()
    assert (await ledger.account(user)).allowance == 1000
    await ledger.settle(Usage(exchange_id=x, user_id=user, completion_tokens=100))
    account = await ledger.account(user)
    # 400 over-charged in the old cycle come back as credits; the new cycle is untouched
    assert (account.allowance, account.credits, account.used_cycle) == (1000, 400, 0)
    await check_invariants(ledger)


async def test_a_release_after_the_sweep_gives_the_charge_back(ledger, clock, user):
    x = await _swept(ledger, clock, user, 100)
    assert (await ledger.account(user)).balance == 900
    assert await ledger.release(x) is True
    assert await ledger.release(x) is False  # once
    assert (await ledger.account(user)).balance == 1000
    await check_invariants(ledger)


# ---------------------------------------------------------------- group commit


async def test_concurrent_settles_are_group_committed_exactly(ledger, pool, user):
    users = [f"{user}-{i}" for i in range(5)]
    holds = []
    for u in users:
        for _ in range(8):
            x = xid()
            assert (await ledger.admit(u, 30, x)).outcome == "ok"
            holds.append((u, x))
    batches_before = ledger._settles.batches
    usages = [Usage(exchange_id=x, user_id=u, prompt_tokens=10, completion_tokens=5) for u, x in holds]
    usages.append(usages[0])  # the same exchange twice in one burst: debited once
    results = await asyncio.gather(*[ledger.settle(u) for u in usages])
    assert sum(r is not None for r in results) == len(holds)
    assert ledger._settles.batches - batches_before < len(usages)  # batches did form
    for u in users:
        account = await ledger.account(u)
        assert (account.balance, account.reserved, account.used_cycle) == (1000 - 8 * 15, 0, 120)
        assert len(await entries(pool, u, "usage")) == 8
    await check_invariants(ledger)


async def test_batched_settles_queue_each_alert_once(ledger, pool, user):
    holds = []
    for _ in range(20):
        x = xid()
        assert (await ledger.admit(user, 50, x)).outcome == "ok"
        holds.append(x)
    await asyncio.gather(*[ledger.settle(Usage(exchange_id=x, user_id=user, completion_tokens=50))
                           for x in holds])
    account = await ledger.account(user)
    assert (account.balance, account.state) == (0, "blocked")
    thresholds = [r["threshold"] for r in await pool.fetch(
        "SELECT threshold FROM alert_outbox WHERE user_id = $1 ORDER BY threshold", user)]
    assert thresholds == [80, 90, 100]
    await check_invariants(ledger)


async def test_one_bad_settle_does_not_fail_its_batch(ledger, pool, user, monkeypatch):
    first, good, bad = xid(), xid(), xid()
    for x in (first, good, bad):
        assert (await ledger.admit(user, 10, x)).outcome == "ok"
    monkeypatch.setattr(ledger._settles, "max_in_flight", 1)  # the 2nd and 3rd wait: one batch
    batches = ledger._settles.batches
    poisoned = Usage(exchange_id=bad, user_id=user, prompt_tokens=2**63, completion_tokens=1)
    results = await asyncio.gather(
        ledger.settle(Usage(exchange_id=first, user_id=user, completion_tokens=1)),
        ledger.settle(Usage(exchange_id=good, user_id=user, completion_tokens=7)),
        ledger.settle(poisoned), return_exceptions=True)
    assert ledger._settles.batches - batches == 2
    assert results[1] is not None and results[1].cost == 7
    assert isinstance(results[2], Exception)
    assert [e["exchange_id"] for e in await entries(pool, user, "usage")] == [first, good]
    await check_invariants(ledger)


async def test_concurrent_admissions_are_batched_and_never_overdraw(ledger, user):
    """100 admissions of 30 on 1,000 tokens, one user among others, all at once: exactly
    33 fit, however the batches form (one user's requests never share a statement)."""
    others = [f"{user}-other-{i}" for i in range(4)]
    for u in [user, *others]:
        await spend(ledger, u, 0, estimate=0)  # open the accounts
    batches = ledger._admits.batches
    requests = [(user, xid()) for _ in range(100)] + [(u, xid()) for u in others for _ in range(5)]
    results = await asyncio.gather(*[ledger.admit(u, 30, x) for u, x in requests])
    assert ledger._admits.batches - batches < len(requests)
    mine = [r for (u, _), r in zip(requests, results, strict=True) if u == user]
    assert sum(r.outcome == "ok" for r in mine) == 33
    assert all(r.outcome == "ok" for (u, _), r in zip(requests, results, strict=True) if u != user)
    account = await ledger.account(user)
    assert (account.reserved, account.available) == (990, 10)
    await check_invariants(ledger)


async def test_batched_admission_falls_back_for_what_the_fast_path_cannot_do(ledger, clock, user):
    """New accounts, a changed e-mail and a refusal in one burst each take the slow path."""
    await spend(ledger, user, 995)
    fresh = f"{user}-new"
    results = await asyncio.gather(
        ledger.admit(fresh, 10, xid(), email="new@example.com"),
        ledger.admit(user, 10, xid()),                                # 5 left: insufficient
        ledger.admit(f"{user}-new2", 10, xid()),
    )
    assert [r.outcome for r in results] == ["ok", "insufficient", "ok"]
    assert (await ledger.account(fresh)).email == "new@example.com"
    await check_invariants(ledger)
