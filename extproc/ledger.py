"""The ledger: every SQL statement that moves money lives in this module.

The invariants, numbered alike here, in the first migration, in docs/architecture.md and in
the tests (``extproc reconcile`` checks I2 and I3 on a live database):

I1  Exactly once: a usage entry is keyed by the exchange id the processor minted
    (UNIQUE); settle() checks for it under the account's row lock, so replays are no-ops.
I2  allowance = SUM(allowance_delta), credits = SUM(credits_delta) for every account: each
    UPDATE of those columns happens in the same transaction as the INSERT of its entry,
    with the deltas the pure functions in ``accounting`` computed. No money moves without
    a ledger entry.
I3  reserved = SUM(held reservations): reservations are created and closed in the same
    statement/transaction that moves ``reserved``. A settle deletes the hold it closes and
    writes what the hold knew (``held``, ``admitted_at``) into the usage entry; an expired
    hold keeps its row (a late release gives the sweep's charge back from it), and so does a
    released one (the record of an exchange that ended without a debit).
I4  Admin and user changes (grant, plan, suspend, settings, allowance, erase) write their
    audit row in the same transaction.
I5  The final debit of an exchange equals its real cost: a settle that arrives after the
    sweep charged the hold adds one true-up entry (idempotency key ``trueup:<exchange id>``)
    for the difference, exactly once.

And one bound rather than an invariant:

B1  Overspend: admission reserves the full estimate, so concurrent exchanges can take a
    balance below zero only by the excess of real over estimated tokens of the exchanges in
    flight; credits absorb it (they may go negative, the account is then blocked).

Concurrency: every money transaction starts by locking the account row (FOR UPDATE), so
per-user operations serialize while different users never contend (no global hot row).
The admission fast path is a single conditional UPDATE (atomic on its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import asyncpg

from . import accounting, reasons
from .batching import Batcher
from .settings import Settings

Clock = Callable[[], datetime]
# How a settle ends a held reservation: by the exchange's usage, or by the sweep's charge.
HoldEnd = Literal["settled", "expired"]

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


class LedgerUnavailable(Exception):
    """The database cannot be reached (connection refused, pool closed, timeout)."""


class UnknownUser(LookupError):
    pass


class UnknownPlan(LookupError):
    pass


@dataclass(frozen=True)
class Plan:
    """A plan with the deployment defaults already filled in for NULL columns."""

    name: str
    monthly_tokens: int
    requests_per_minute: int
    rollover: bool

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "monthly_tokens": self.monthly_tokens,
                "requests_per_minute": self.requests_per_minute, "rollover": self.rollover}


class Unset:
    """The value of an argument left out (``set_settings``), apart from None (which clears)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = Unset()
LANGUAGES = ("pt-BR", "en", None)  # accounts.language (None: the deployment's GATE_LANGUAGE)
MAX_TOKENS_SETTING = 10**15  # a personal cap or an allowance above this is a typo, not a limit


# Errors that mean "the database is not there", as opposed to a bug in a statement.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InterfaceError,
)


@dataclass(frozen=True)
class Account:
    user_id: str
    email: str | None
    name: str | None
    plan: str
    state: str
    state_reason: str | None
    cycle_start: datetime
    cycle_end: datetime
    cycle_budget: int
    used_cycle: int
    allowance: int
    credits: int
    reserved: int
    created_at: datetime | None = None
    personal_cap: int | None = None
    allowance_override: int | None = None
    notify_80: bool = True
    notify_90: bool = True
    language: str | None = None
    inline_notice: int = 0
    erased_at: datetime | None = None

    @property
    def balance(self) -> int:
        return self.allowance + self.credits

    @property
    def available(self) -> int:
        return self.balance - self.reserved

    @property
    def effective_limit(self) -> int:
        """The cycle budget, or the user's own cap when lower (``accounting.effective_limit``)."""
        return accounting.effective_limit(self.cycle_budget, self.personal_cap)

    @property
    def used_pct(self) -> float:
        return accounting.usage_pct(self.used_cycle, self.effective_limit)

    def as_json(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "email": self.email,
            "name": self.name,
            "plan": self.plan,
            "state": self.state,
            "state_reason": self.state_reason,
            "available": self.available,
            "balance": self.balance,
            "allowance": self.allowance,
            "credits": self.credits,
            "reserved": self.reserved,
            "used": self.used_cycle,
            "budget": self.cycle_budget,
            "effective_limit": self.effective_limit,
            "used_pct": self.used_pct,
            "cycle_start": self.cycle_start.isoformat(),
            "cycle_end": self.cycle_end.isoformat(),
            "personal_cap": self.personal_cap,
            "allowance_override": self.allowance_override,
            "preferences": {"alerts": {"80": self.notify_80, "90": self.notify_90},
                            "language": self.language},
            "erased_at": None if self.erased_at is None else self.erased_at.isoformat(),
        }


_ACCOUNT_FIELDS = (
    "user_id, email, name, plan, state, state_reason, cycle_start, cycle_end, cycle_budget, "
    "used_cycle, allowance, credits, reserved, created_at, personal_cap, allowance_override, "
    "notify_80, notify_90, language, inline_notice, erased_at"
)


# One statement for a batch of settles (``Ledger._settle_batch``): the usage entries, the
# threshold alerts (once per user, cycle and threshold: the outbox's UNIQUE key) and the
# accounts' new values, as parallel arrays ($31 and $32, the holds' tokens and times, belong
# to the entries: added after the rest, so the other numbers kept their place).
_BATCH_SETTLE_SQL = (
    "WITH e AS (INSERT INTO ledger_entries (user_id, kind, tokens, allowance_delta, credits_delta,"
    "   balance_after, exchange_id, request_id, model, prompt_tokens, completion_tokens, estimate,"
    "   real_tokens, flags, actor, cycle_start, created_at, prompt_chars, held, admitted_at)"
    "  SELECT u, 'usage', t, ad, cd, ba, x, rq, m, pt, ct, es, rt, string_to_array(f, ','),"
    "   'gateway', cs, $1, pc, h, aa"
    "  FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::text[],"
    "   $8::text[], $9::text[], $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[],"
    "   $14::text[], $15::timestamptz[], $16::bigint[], $31::bigint[], $32::timestamptz[])"
    "   WITH ORDINALITY AS e(u, t, ad, cd, ba, x, rq, m, pt, ct, es, rt, f, cs, pc, h, aa, n) ORDER BY n),"
    " o AS (INSERT INTO alert_outbox (user_id, cycle_start, cycle_end, threshold, used_pct, used,"
    "   budget, remaining, created_at, next_attempt_at)"
    "  SELECT u, cs, ce, t, p, us, b, r, $1, $1"
    "  FROM unnest($17::text[], $18::timestamptz[], $19::timestamptz[], $20::int[], $21::numeric[],"
    "   $22::bigint[], $23::bigint[], $24::bigint[]) AS o(u, cs, ce, t, p, us, b, r)"
    "  ON CONFLICT (user_id, cycle_start, threshold) DO NOTHING)"
    " UPDATE accounts a SET allowance = v.al, credits = v.cr, used_cycle = v.us,"
    "  reserved = a.reserved - v.rl, state = v.st, updated_at = $1"
    " FROM unnest($25::text[], $26::bigint[], $27::bigint[], $28::bigint[], $29::bigint[], $30::text[])"
    "  AS v(uid, al, cr, us, rl, st) WHERE a.user_id = v.uid"
)


# One statement for a batch of admissions (``Ledger._admit_batch``): lock the accounts in
# user order, then reserve for each request whose account is current, funded, unsuspended,
# under its personal cap, not erased, and whose e-mail and name did not change (the fast
# path's condition, row by row).
_BATCH_ADMIT_SQL = (
    "WITH i AS (SELECT * FROM unnest($3::text[], $4::bigint[], $5::text[], $6::text[], $7::text[],"
    "   $8::text[], $9::text[]) AS i(uid, est, xid, rid, email, name, model)),"
    " l AS (SELECT user_id FROM accounts WHERE user_id = ANY($3::text[]) ORDER BY user_id FOR UPDATE),"
    " a AS (UPDATE accounts SET reserved = accounts.reserved + i.est FROM i"
    "  WHERE accounts.user_id = i.uid AND accounts.user_id IN (SELECT user_id FROM l)"
    "   AND accounts.state <> 'suspended' AND accounts.cycle_end > $1"
    "   AND accounts.allowance + accounts.credits - accounts.reserved >= i.est"
    "   AND (accounts.personal_cap IS NULL"
    "    OR accounts.used_cycle + accounts.reserved + i.est <= accounts.personal_cap)"
    "   AND accounts.erased_at IS NULL"
    "   AND (i.email IS NULL OR accounts.email IS NOT DISTINCT FROM i.email)"
    "   AND (i.name IS NULL OR accounts.name IS NOT DISTINCT FROM i.name)"
    f"  RETURNING {', '.join('accounts.' + f for f in _ACCOUNT_FIELDS.split(', '))}, i.xid),"
    " r AS (INSERT INTO reservations (exchange_id, user_id, tokens, request_id, model, created_at,"
    "   expires_at) SELECT i.xid, i.uid, i.est, i.rid, i.model, $1, $2 FROM a JOIN i ON i.xid = a.xid)"
    " SELECT * FROM a"
)


# The settle's first statement (``Ledger._settle``): close this exchange's held reservation
# and lock its account. Settled, the hold is deleted (a deletion writes no index; the usage
# entry keeps its tokens and time); expired by the sweep, it stays, for a late release to
# find (migrations/20261130000001_settled_holds.sql).
_HOLD_ACCOUNT_SQL = (
    " SELECT a.*, r.tokens AS held, r.created_at AS admitted_at FROM r LEFT JOIN LATERAL"
    "  (SELECT * FROM accounts WHERE user_id = r.user_id FOR UPDATE) a ON true"
)
_CLOSE_HOLD_SQL = (
    "WITH r AS (DELETE FROM reservations WHERE exchange_id = $1 AND state = 'held'"
    "   RETURNING user_id, tokens, created_at)" + _HOLD_ACCOUNT_SQL
)
_EXPIRE_HOLD_SQL = (
    "WITH r AS (UPDATE reservations SET state = 'expired', closed_at = $2"
    "   WHERE exchange_id = $1 AND state = 'held' RETURNING user_id, tokens, created_at)"
    + _HOLD_ACCOUNT_SQL
)


def _account(row: asyncpg.Record) -> Account:
    return Account(**{k: row[k] for k in Account.__dataclass_fields__})


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    user_id: str
    estimate: int
    exchange_id: str
    email: str | None = None
    name: str | None = None
    request_id: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class Admission:
    """Outcome of admit(): ``ok``, ``insufficient`` (the balance), ``suspended`` (an admin),
    ``personal_cap`` (used_cycle + reserved + estimate would pass the user's own cap) or
    ``erased`` (the id was erased under LGPD: ``account`` is None, nothing was opened)."""

    outcome: str
    account: Account | None
    reserved: int = 0

    @property
    def status(self) -> str:
        return self.outcome


# The flag of a settle built from Envoy's access log (gate.handoff), kept in the ledger entry as
# provenance: such a settle closes or trues up a reservation, never creates a debit.
FROM_ACCESS_LOG = "envoy"


@dataclass(frozen=True)
class Usage:
    """What one exchange really cost, as the processor observed it."""

    exchange_id: str
    user_id: str
    model: str | None = None
    request_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimate: int | None = None
    prompt_chars: int | None = None
    flags: Sequence[str] = field(default_factory=tuple)
    email: str | None = None
    # The debit in ledger tokens when already known (the sweep charges a hold exactly, its
    # weight already applied); None: the model's weight times real_tokens.
    cost: int | None = None

    @property
    def real_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict[str, Any]:
        return {
            "exchange_id": self.exchange_id, "user_id": self.user_id, "model": self.model,
            "request_id": self.request_id, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "estimate": self.estimate,
            "prompt_chars": self.prompt_chars,
            "flags": list(self.flags), "email": self.email, "cost": self.cost,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Usage:
        return cls(**{**data, "flags": tuple(data.get("flags", ()))})


@dataclass(frozen=True)
class Settled:
    cost: int                 # what this settle moved (a true-up: the correction only)
    alerts: tuple[int, ...]   # thresholds crossed, queued in the outbox


class Ledger:
    """``admit_pool``: connections with ``synchronous_commit = off`` for admissions. An
    admission writes no money that cannot be re-derived: a reservation, a lazy cycle roll or an
    account opening lost to a database crash is lost whole (WAL keeps the transaction atomic)
    and redone by the next request, and any later settle's synchronous commit flushes it
    first. Debits, grants and audit rows always commit synchronously on ``pool``."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, clock: Clock = utcnow,
                 admit_pool: asyncpg.Pool | None = None, *, batch: bool = True) -> None:
        self.pool = pool
        self.admit_pool = admit_pool or pool
        self.settings = settings
        self.clock = clock
        self._weights = settings.weights()
        self._thresholds = settings.thresholds()
        # One settle transaction in flight per process: settles are off the reply's path, so
        # while one commits the next ones queue and go out as one batch (group commit).
        self._settles: Batcher[Usage, Settled | None] | None = Batcher(
            self._settle_batch, self.settle_one, max_in_flight=1, fatal=(LedgerUnavailable,)) if batch else None
        self._admits: Batcher[AdmitRequest, Admission] | None = Batcher(
            self._admit_batch, self.admit_one, fatal=(LedgerUnavailable,)) if batch else None

    def batch_counts(self) -> dict[str, tuple[int, int]]:
        """Per operation, (batches run, operations they carried): the group commit's reach."""
        return {name: (b.batches, b.items) for name, b in (("admit", self._admits), ("settle", self._settles))
                if b is not None}

    @property
    def settle_backlog(self) -> int:
        """Settles waiting for a batch in flight to finish (0 without batching)."""
        return self._settles.waiting if self._settles is not None else 0

    # ------------------------------------------------------------ helpers

    async def _locked_account(
        self, conn: asyncpg.Connection, user_id: str, extra: str = "", *args: Any
    ) -> asyncpg.Record | None:
        return await conn.fetchrow(
            f"SELECT a.*, p.monthly_tokens, p.rollover{extra} FROM accounts a "
            "JOIN plans p ON p.name = a.plan WHERE a.user_id = $1 FOR UPDATE OF a",
            user_id, *args,
        )

    @contextlib.asynccontextmanager
    async def _account_change(self, user_id: str) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Record]]:
        """One change of an account by an admin or its user: a transaction holding the
        account's lock (its audit row goes in the same transaction, I4); UnknownUser if none."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await self._locked_account(conn, user_id)
            if row is None:
                raise UnknownUser(user_id)
            yield conn, row

    def _plan_tokens(self, row: asyncpg.Record) -> int:
        """A cycle's allowance: the account's own (``set_allowance``) when an admin set one, else
        its plan's, else the deployment's default. ``row`` is an account joined with its plan,
        or a plan alone (an account being opened has no override yet)."""
        override = row.get("allowance_override")
        if override is not None:
            return int(override)
        tokens = row["monthly_tokens"]
        return self.settings.default_monthly_tokens if tokens is None else tokens

    async def _open_account(
        self, conn: asyncpg.Connection, user_id: str, email: str | None, name: str | None,
        now: datetime,
    ) -> None:
        """Onboarding: the first request creates the account with the default plan's
        allowance, recorded as the cycle's opening entry (I2)."""
        anchor, start, end = accounting.first_cycle(now)
        plan = await conn.fetchrow("SELECT monthly_tokens FROM plans WHERE name = 'default'")
        tokens = self._plan_tokens(plan)
        created = await conn.fetchval(
            "INSERT INTO accounts (user_id, email, name, cycle_anchor_day, cycle_start, cycle_end,"
            " cycle_budget, allowance, state, created_at, updated_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8, $9, $9)"
            " ON CONFLICT (user_id) DO NOTHING RETURNING true",
            user_id, email, name, anchor, start, end, tokens,
            accounting.state_for("active", tokens, 0.0), now,
        )
        if created:
            await conn.execute(
                "INSERT INTO ledger_entries (user_id, kind, tokens, allowance_delta, credits_delta,"
                " balance_after, actor, reason, reason_code, reason_params, cycle_start, created_at)"
                " VALUES ($1, 'cycle_reset', $2, $2, 0, $2, 'system', $3, $4, $5::jsonb, $6, $7)",
                user_id, tokens, *reasons.columns(reasons.account_opened()), start, now,
            )

    async def _roll_if_due(
        self, conn: asyncpg.Connection, row: asyncpg.Record, now: datetime
    ) -> asyncpg.Record:
        """Lazily start the cycle ``now`` falls in; idempotent because the caller holds the
        row lock and the check reads the locked row's cycle_end."""
        reset = accounting.roll_cycle(
            anchor_day=row["cycle_anchor_day"], cycle_start=row["cycle_start"],
            cycle_end=row["cycle_end"], allowance=row["allowance"], credits=row["credits"],
            plan_tokens=self._plan_tokens(row), rollover=row["rollover"], now=now,
        )
        if reset is None:
            return row
        balance = reset.allowance + row["credits"]
        state = accounting.state_for(row["state"], balance, 0.0)
        expired = row["allowance"] if not row["rollover"] else 0
        reason = reasons.new_cycle(reset.start, reset.end, expired)
        await conn.execute(
            "INSERT INTO ledger_entries (user_id, kind, tokens, allowance_delta, credits_delta,"
            " balance_after, actor, reason, reason_code, reason_params, cycle_start, created_at)"
            " VALUES ($1, 'cycle_reset', $2, $2, 0, $3, 'system', $4, $5, $6::jsonb, $7, $8)",
            row["user_id"], reset.split.allowance_delta, balance, *reasons.columns(reason), reset.start, now,
        )
        return await conn.fetchrow(
            "UPDATE accounts a SET cycle_start = $2, cycle_end = $3, allowance = $4,"
            " cycle_budget = $5, used_cycle = 0, state = $6, inline_notice = 0, updated_at = $7"
            " FROM plans p WHERE a.user_id = $1 AND p.name = a.plan"
            " RETURNING a.*, p.monthly_tokens, p.rollover",
            row["user_id"], reset.start, reset.end, reset.allowance, reset.budget, state, now,
        )

    # ------------------------------------------------------------ admission

    async def admit(
        self,
        user_id: str,
        estimate: int,
        exchange_id: str,
        *,
        email: str | None = None,
        name: str | None = None,
        request_id: str | None = None,
        model: str | None = None,
    ) -> Admission:
        """Reserve ``estimate`` tokens for one exchange, or say why not. Admissions that
        arrive together go out as one statement (``_admit_batch``)."""
        request = AdmitRequest(user_id, estimate, exchange_id, email, name, request_id, model)
        if self._admits is not None:
            return await self._admits.submit(request)
        return await self.admit_one(request)

    async def admit_one(self, request: AdmitRequest) -> Admission:
        """``admit`` for one exchange: one conditional statement, or the slow transaction."""
        user_id, estimate, exchange_id = request.user_id, request.estimate, request.exchange_id
        email, name, request_id, model = request.email, request.name, request.request_id, request.model
        now = self.clock()
        expires = accounting.reservation_expiry(now, self.settings.reservation_ttl_seconds)
        try:
            async with self.admit_pool.acquire() as conn:
                # Fast path, one round trip: a known, current, funded, unsuspended account
                # under its personal cap (the slow path says which condition refused).
                row = await conn.fetchrow(
                    "WITH a AS (UPDATE accounts SET reserved = reserved + $2"
                    "  WHERE user_id = $1 AND state <> 'suspended' AND cycle_end > $3"
                    "    AND allowance + credits - reserved >= $2"
                    "    AND (personal_cap IS NULL OR used_cycle + reserved + $2 <= personal_cap)"
                    "    AND erased_at IS NULL"
                    "    AND ($6::text IS NULL OR email IS NOT DISTINCT FROM $6)"
                    "    AND ($9::text IS NULL OR name IS NOT DISTINCT FROM $9)"
                    f"  RETURNING {_ACCOUNT_FIELDS}),"
                    " r AS (INSERT INTO reservations"
                    "  (exchange_id, user_id, tokens, request_id, model, created_at, expires_at)"
                    "  SELECT $4, user_id, $2, $5, $7, $3, $8 FROM a)"
                    " SELECT * FROM a",
                    user_id, estimate, now, exchange_id, request_id, email, model, expires, name,
                )
                if row is not None:
                    return Admission("ok", _account(row), estimate)
                return await self._admit_slow(
                    conn, user_id, estimate, exchange_id, email, name, request_id, model,
                    now, expires,
                )
        except UNAVAILABLE_ERRORS as exc:
            raise LedgerUnavailable(str(exc)) from exc

    async def _admit_batch(self, requests: list[AdmitRequest]) -> list[Admission]:
        """Many admissions in one statement: the fast path's conditional reservation for the
        first request of each user (the condition is per row, so two of one user's requests
        go in separate statements), accounts locked in user order first so two batches never
        deadlock. A request the statement did not admit takes ``admit_one`` (onboarding, a
        cycle to roll, an e-mail that changed, a refusal with its reason)."""
        now = self.clock()
        expires = accounting.reservation_expiry(now, self.settings.reservation_ttl_seconds)
        first: dict[str, int] = {}
        for i, r in enumerate(requests):
            first.setdefault(r.user_id, i)
        batch = [requests[i] for i in sorted(first.values(), key=lambda i: requests[i].user_id)]
        results: list[Admission | None] = [None] * len(requests)
        try:
            async with self.admit_pool.acquire() as conn:
                rows = await conn.fetch(
                    _BATCH_ADMIT_SQL, now, expires, [r.user_id for r in batch], [r.estimate for r in batch],
                    [r.exchange_id for r in batch], [r.request_id for r in batch],
                    [r.email for r in batch], [r.name for r in batch], [r.model for r in batch])
        except UNAVAILABLE_ERRORS as exc:
            raise LedgerUnavailable(str(exc)) from exc
        admitted = {row["xid"]: row for row in rows}
        for i, r in enumerate(requests):
            row = admitted.get(r.exchange_id)
            if row is not None:
                results[i] = Admission("ok", _account(row), r.estimate)
        for i, r in enumerate(requests):
            if results[i] is None:
                results[i] = await self.admit_one(r)
        return [a for a in results if a is not None]

    async def _admit_slow(
        self, conn: asyncpg.Connection, user_id: str, estimate: int, exchange_id: str,
        email: str | None, name: str | None, request_id: str | None, model: str | None,
        now: datetime, expires: datetime,
    ) -> Admission:
        async with conn.transaction():
            row = await self._locked_account(conn, user_id)
            if row is None:
                # An erased id is refused, never opened again: its ledger lives on under the
                # pseudonym and a new account would hand the person a fresh allowance.
                if await erased_pseudonym(conn, user_id) is not None:
                    return Admission("erased", None)
                await self._open_account(conn, user_id, email, name, now)
                row = await self._locked_account(conn, user_id)
            if row["erased_at"] is not None:
                return Admission("erased", None)  # someone presenting the pseudonym itself
            if (email and email != row["email"]) or (name and name != row["name"]):
                row = await conn.fetchrow(
                    # Qualified: plans has a ``name`` column too, and an unqualified one in
                    # the SET expressions is ambiguous (every later request answered 500).
                    "UPDATE accounts a SET email = COALESCE($2, a.email), name = COALESCE($3, a.name)"
                    " FROM plans p WHERE a.user_id = $1 AND p.name = a.plan"
                    " RETURNING a.*, p.monthly_tokens, p.rollover",
                    user_id, email, name,
                )
            row = await self._roll_if_due(conn, row, now)
            account = _account(row)
            if account.state == "suspended":
                return Admission("suspended", account)
            if account.available < estimate:
                state = accounting.state_for(account.state, account.balance, account.used_pct)
                if state != account.state:
                    row = await conn.fetchrow(
                        f"UPDATE accounts SET state = $2 WHERE user_id = $1 RETURNING {_ACCOUNT_FIELDS}",
                        user_id, state,
                    )
                return Admission("insufficient", _account(row))
            if account.personal_cap is not None and (
                    account.used_cycle + account.reserved + estimate > account.personal_cap):
                return Admission("personal_cap", account)
            row = await conn.fetchrow(
                "WITH r AS (INSERT INTO reservations"
                " (exchange_id, user_id, tokens, request_id, model, created_at, expires_at)"
                " VALUES ($3, $1, $2, $4, $5, $6, $7))"
                " UPDATE accounts SET reserved = reserved + $2 WHERE user_id = $1"
                f" RETURNING {_ACCOUNT_FIELDS}",
                user_id, estimate, exchange_id, request_id, model, now, expires,
            )
            return Admission("ok", _account(row), estimate)

    # ------------------------------------------------------------ settle / release

    async def settle(self, usage: Usage, *, reservation_state: HoldEnd = "settled") -> Settled | None:
        """Debit an exchange's real usage exactly once (I1), release its reservation (I3),
        move the account's state and queue threshold alerts, all in one transaction.

        Settles that arrive together are group-committed (``batching``): one transaction and
        two statements for the whole batch when they close held reservations; anything else
        (a replay, a true-up, an unreserved spool entry, a sweep) takes ``settle_one``.
        Returns None when the exchange was already settled (a replay)."""
        if reservation_state == "settled" and self._settles is not None:
            return await self._settles.submit(usage)
        return await self.settle_one(usage, reservation_state=reservation_state)

    def _cost(self, usage: Usage) -> int:
        """The debit of an exchange: its explicit cost (a sweep's hold), else real x weight."""
        if usage.cost is not None:
            return usage.cost
        return accounting.weighted_cost(usage.real_tokens, usage.model, self._weights)

    async def settle_one(self, usage: Usage, *, reservation_state: HoldEnd = "settled") -> Settled | None:
        """``settle`` for one exchange in its own transaction."""
        now = self.clock()
        try:
            for _ in range(SETTLE_ATTEMPTS - 1):
                try:
                    return await self._settle(usage, self._cost(usage), reservation_state, now)
                except (_AccountMoved, asyncpg.DeadlockDetectedError):
                    # Rolled back: the next statement's snapshot sees the new id. A deadlock is
                    # possible only against an erasure that met a hold made while it started.
                    continue
            return await self._settle(usage, self._cost(usage), reservation_state, now)
        except _AccountMoved as exc:
            raise LedgerUnavailable("the account kept moving during the settle") from exc
        except asyncpg.UniqueViolationError:
            # Two settles of one unreserved exchange (spool replays) raced past the check:
            # the UNIQUE exchange_id let exactly one commit (I1).
            return None
        except UNAVAILABLE_ERRORS as exc:
            raise LedgerUnavailable(str(exc)) from exc

    async def _settle(
        self, usage: Usage, cost: int, reservation_state: HoldEnd, now: datetime
    ) -> Settled | None:
        async with self.pool.acquire() as conn, conn.transaction():
            # Common case, one statement: close this exchange's held reservation and lock the
            # account. Owning the held reservation proves no settle of it committed before.
            # The account is the reservation's, not the id the settle names: an erasure moves
            # the reservation to the pseudonym (ON UPDATE CASCADE) and the debit follows it.
            row = await (conn.fetchrow(_CLOSE_HOLD_SQL, usage.exchange_id) if reservation_state == "settled"
                         else conn.fetchrow(_EXPIRE_HOLD_SQL, usage.exchange_id, now))
            if row is not None and row["user_id"] is None:
                # The hold was renamed by an erasure that committed while this statement
                # waited for its lock; the statement's snapshot still has the old id.
                raise _AccountMoved(usage.exchange_id)
            flags = list(usage.flags)
            exchange_key, trueup_key, debit = usage.exchange_id, None, cost
            split, this_cycle = accounting.split_debit(0, 0), True
            if row is None:
                row, swept = await self._unreserved_row(conn, usage, now)
                if row is None:
                    return None  # settled before: a replay
                if swept is None:
                    flags.append("unreserved")
                else:
                    # I5: the sweep charged this exchange its hold; the real settle corrects
                    # that charge to the real cost, once (keyed apart from the usage entry).
                    exchange_key, trueup_key = None, trueup_key_for(usage.exchange_id)
                    debit = cost + swept["tokens"]  # the sweep's entry is negative
                    this_cycle = debit >= 0 or swept["cycle_start"] == row["cycle_start"]
                    split = accounting.split_trueup(
                        row["allowance"], debit, swept_from_credits=-swept["credits_delta"],
                        same_cycle=this_cycle)
                    flags.append("trueup")
            if trueup_key is None:
                split = accounting.split_debit(row["allowance"], debit)
            held, admitted_at = row["held"], row.get("admitted_at")
            new = accounting.apply_split(
                allowance=row["allowance"], credits=row["credits"], used=row["used_cycle"],
                budget=row["cycle_budget"], state=row["state"], split=split,
                thresholds=self._thresholds, this_cycle=this_cycle, personal_cap=row["personal_cap"])
            await conn.execute(
                "WITH e AS (INSERT INTO ledger_entries (user_id, kind, tokens, allowance_delta,"
                "   credits_delta, balance_after, exchange_id, request_id, model, prompt_tokens,"
                "   completion_tokens, estimate, real_tokens, flags, actor, cycle_start,"
                "   created_at, prompt_chars, idempotency_key, held, admitted_at)"
                "   VALUES ($1, 'usage', $9, $10, $11, $2::bigint + $3::bigint, $8, $12, $13, $14, $15, $16,"
                "   $17, $18, 'gateway', $19, $5, $24, $25, $27, $28)),"
                " o AS (INSERT INTO alert_outbox (user_id, cycle_start, cycle_end, threshold,"
                "   used_pct, used, budget, remaining, created_at, next_attempt_at)"
                "   SELECT $1, $19, $20, t, $21, $4, $22, $26, $5, $5 FROM unnest($23::int[]) t"
                "   ON CONFLICT (user_id, cycle_start, threshold) DO NOTHING)"
                " UPDATE accounts SET allowance = $2, credits = $3, used_cycle = $4,"
                "   reserved = reserved - $6, state = $7, updated_at = $5 WHERE user_id = $1",
                row["user_id"], new.allowance, new.credits, new.used, now, held, new.state, exchange_key,
                split.tokens, split.allowance_delta, split.credits_delta, usage.request_id,
                usage.model, usage.prompt_tokens, usage.completion_tokens, usage.estimate,
                usage.real_tokens, flags, row["cycle_start"], row["cycle_end"], new.used_pct,
                new.limit, list(new.crossed), usage.prompt_chars, trueup_key,
                accounting.spendable(new.balance, new.used, row["personal_cap"]),
                held if admitted_at is not None else None, admitted_at,
            )
            return Settled(debit, new.crossed)

    async def _settle_batch(self, items: list[Usage]) -> list[Settled | None]:
        """Settle many exchanges in one transaction: close their held reservations in one
        statement, lock their accounts in user order (two batches never deadlock), compute
        every debit with the pure rules in arrival order, and write all entries, alerts and
        account rows in one more statement. An item whose reservation is not held here (a
        replay, a true-up, a duplicate within the batch) is settled alone afterwards."""
        now = self.clock()
        results: list[Settled | None] = [None] * len(items)
        alone: list[int] = []
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                closed = await conn.fetch(
                    "DELETE FROM reservations r USING unnest($1::text[]) AS x(id)"
                    " WHERE r.exchange_id = x.id AND r.state = 'held'"
                    " RETURNING r.exchange_id, r.user_id, r.tokens, r.created_at",
                    [u.exchange_id for u in items])
                held = {r["exchange_id"]: r for r in closed}
                users = sorted({r["user_id"] for r in closed})
                accounts = {r["user_id"]: dict(r) for r in await conn.fetch(
                    "SELECT * FROM accounts WHERE user_id = ANY($1::text[]) ORDER BY user_id FOR UPDATE",
                    users)}
                entries: list[tuple[Any, ...]] = []
                alerts: list[tuple[Any, ...]] = []
                released: dict[str, int] = {}
                for i, usage in enumerate(items):
                    hold = held.pop(usage.exchange_id, None)
                    if hold is None:
                        alone.append(i)
                        continue
                    # The reservation's account (after an erasure: the pseudonym's), as _settle.
                    user = hold["user_id"]
                    acc = accounts.get(user)
                    if acc is None:  # a closed hold without its account: let _settle decide
                        raise _AccountMoved(usage.exchange_id)
                    cost = self._cost(usage)
                    split = accounting.split_debit(acc["allowance"], cost)
                    new = accounting.apply_split(
                        allowance=acc["allowance"], credits=acc["credits"], used=acc["used_cycle"],
                        budget=acc["cycle_budget"], state=acc["state"], split=split,
                        thresholds=self._thresholds, personal_cap=acc["personal_cap"])
                    acc.update(allowance=new.allowance, credits=new.credits, used_cycle=new.used,
                               state=new.state)
                    released[user] = released.get(user, 0) + hold["tokens"]
                    entries.append((
                        user, split.tokens, split.allowance_delta, split.credits_delta,
                        new.balance, usage.exchange_id, usage.request_id, usage.model, usage.prompt_tokens,
                        usage.completion_tokens, usage.estimate, usage.real_tokens,
                        ",".join(usage.flags), acc["cycle_start"], usage.prompt_chars,
                        hold["tokens"], hold["created_at"]))
                    remaining = accounting.spendable(new.balance, new.used, acc["personal_cap"])
                    alerts.extend((user, acc["cycle_start"], acc["cycle_end"], t, new.used_pct,
                                   new.used, new.limit, remaining) for t in new.crossed)
                    results[i] = Settled(cost, new.crossed)
                if entries:
                    columns = [list(column) for column in zip(*entries, strict=True)]
                    await conn.execute(
                        _BATCH_SETTLE_SQL, now, *columns[:-2],
                        *([list(column) for column in zip(*alerts, strict=True)] if alerts else [[]] * 8),
                        *[list(column) for column in zip(*[
                            (user, a["allowance"], a["credits"], a["used_cycle"], released[user], a["state"])
                            for user, a in accounts.items() if user in released], strict=True)],
                        *columns[-2:],
                    )
        except UNAVAILABLE_ERRORS as exc:
            raise LedgerUnavailable(str(exc)) from exc
        for i in alone:
            results[i] = await self.settle_one(items[i])
        return results

    async def _unreserved_row(
        self, conn: asyncpg.Connection, usage: Usage, now: datetime
    ) -> tuple[dict[str, Any] | None, asyncpg.Record | None]:
        """No held reservation. Returns (account row, None) for an exchange admitted while the
        ledger was unreachable (fail-open) and replayed from the spool; (row, the sweep's
        entry) for the real settle of an exchange the sweep charged (a true-up is due);
        (None, None) for a replay of a settle already applied."""
        release = "released" in usage.flags  # a spooled release: undoes, never creates
        # A settle from Envoy's access log closes or trues up a reservation, never creates a
        # debit: its entry comes over the network, and an exchange id that never held anything
        # (a forged or garbled entry) must not charge, nor open, an account.
        logged = FROM_ACCESS_LOG in usage.flags
        row = await self._locked_account(conn, usage.user_id)
        if row is None:
            pseudonym = await erased_pseudonym(conn, usage.user_id)
            if pseudonym is not None:
                # Erased since: the exchange happened before (or while) the erasure, so it is
                # charged (or trued up) under the pseudonym, where the rest of the ledger is;
                # an erased id is never opened again.
                log.info("settle of an erased id, kept under its pseudonym (exchange %s)", usage.exchange_id)
                row = await self._locked_account(conn, pseudonym)
            elif release or logged:
                if logged:
                    log.warning("settle from the access log for an unknown account refused (exchange %s)",
                                usage.exchange_id)
                return None, None
            else:
                await self._open_account(conn, usage.user_id, usage.email, None, now)
                row = await self._locked_account(conn, usage.user_id)
            if row is None:
                raise _AccountMoved(usage.exchange_id)
        # Separate statements on purpose: under READ COMMITTED they take a snapshot after the
        # lock was granted, so they see a settle that committed while we waited (a subquery in
        # the locking SELECT would not).
        # Pinned to the account's id as well (the entries of an erased user moved with it):
        # one user's rows, which is what a ledger sharded by user needs (docs/scaling.md).
        previous = await conn.fetchrow(
            "SELECT tokens, credits_delta, cycle_start, flags FROM ledger_entries"
            " WHERE exchange_id = $1 AND user_id = $2", usage.exchange_id, row["user_id"])
        if previous is None:
            if logged:
                log.warning("settle from the access log without a reservation refused (exchange %s)",
                            usage.exchange_id)
            return (None, None) if release or logged else ({**dict(row), "held": 0}, None)
        if "expired" not in previous["flags"] or "expired" in usage.flags or await conn.fetchval(
                "SELECT 1 FROM ledger_entries WHERE idempotency_key = $1 AND user_id = $2",
                trueup_key_for(usage.exchange_id), row["user_id"]):
            return None, None
        return {**dict(row), "held": 0}, previous

    async def release(self, exchange_id: str) -> bool:
        """Give back a reservation without a debit (upstream error before any output). When
        the sweep got there first and charged the hold, the charge is given back instead (a
        zero-cost settle: its true-up, I5). Returns whether a hold or a charge was undone."""
        try:
            async with self.pool.acquire() as conn:
                released = await conn.fetchrow(
                    "WITH r AS (UPDATE reservations SET state = 'released', closed_at = $2"
                    "   WHERE exchange_id = $1 AND state = 'held' RETURNING user_id, tokens)"
                    " UPDATE accounts a SET reserved = a.reserved - r.tokens FROM r"
                    " WHERE a.user_id = r.user_id RETURNING true AS done",
                    exchange_id, self.clock(),
                )
                swept_user = None if released else await conn.fetchval(
                    "SELECT user_id FROM reservations WHERE exchange_id = $1 AND state = 'expired'",
                    exchange_id)
        except UNAVAILABLE_ERRORS as exc:
            raise LedgerUnavailable(str(exc)) from exc
        if released:
            return True
        if swept_user is None:
            return False
        undone = await self.settle(Usage(exchange_id=exchange_id, user_id=swept_user,
                                         flags=("released",), cost=0))
        return undone is not None

    # ------------------------------------------------------------ credits and admin

    async def grant(
        self,
        user_id: str,
        tokens: int,
        *,
        actor: str,
        reason: str | reasons.Reason,
        kind: str = "grant",
        idempotency_key: str | None = None,
        source_ip: str | None = None,
    ) -> tuple[Account, bool]:
        """Add (or, with a negative amount, claw back) credits, with its ledger entry and
        audit row in one transaction. Returns (account, applied); a repeated idempotency key
        returns the current account and applied=False. ``reason``: an admin's text, or a coded
        reason (purchases, clawbacks) that pages show in the reader's language."""
        if kind not in ("grant", "purchase", "refund", "adjustment"):
            raise ValueError(f"unknown credit kind {kind!r}")
        now = self.clock()
        async with self.pool.acquire() as conn, conn.transaction():
            row = await self._locked_account(conn, user_id)
            if row is None:
                raise UnknownUser(user_id)
            if idempotency_key is not None and await conn.fetchval(
                "SELECT 1 FROM ledger_entries WHERE idempotency_key = $1", idempotency_key
            ):
                return _account(row), False
            before = _account(row)
            credits = row["credits"] + tokens
            budget = max(row["cycle_budget"] + tokens, 0)
            pct = accounting.usage_pct(row["used_cycle"], accounting.effective_limit(budget, row["personal_cap"]))
            state = accounting.state_for(row["state"], row["allowance"] + credits, pct)
            await conn.execute(
                "INSERT INTO ledger_entries (user_id, kind, tokens, allowance_delta, credits_delta,"
                " balance_after, idempotency_key, actor, reason, reason_code, reason_params, cycle_start,"
                " created_at) VALUES ($1, $2, $3, 0, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11)",
                user_id, kind, tokens, row["allowance"] + credits, idempotency_key, actor,
                *reasons.columns(reason), row["cycle_start"], now,
            )
            updated = _account(await conn.fetchrow(
                "UPDATE accounts SET credits = $2, cycle_budget = $3, state = $4, updated_at = $5"
                f" WHERE user_id = $1 RETURNING {_ACCOUNT_FIELDS}",
                user_id, credits, budget, state, now,
            ))
            await audit(conn, actor, kind, user_id, before, updated, reason, source_ip, now)
            return updated, True

    # ------------------------------------------------------------ purchases: refunds and disputes
    # What Stripe's refund and dispute events take back from one purchase of credits, or give
    # back. ``purchases`` records the events (billing_payments, billing_disputes) and words the
    # entries; the balance rule and the entries are here. Keys and constants: end of module.

    @functools.cached_property
    def _payment_slots(self) -> asyncio.Semaphore:
        """Bounds concurrent settle_payment() calls: each holds one pooled connection (the
        payment's lock) while grant() takes another, so a burst of webhooks must not fill the
        pool with holders that all wait for a second connection. The lock is an advisory lock,
        not a row's, so the plain upserts of other deliveries never wait on it."""
        return asyncio.Semaphore(PAYMENT_CONCURRENCY)

    async def settle_payment(
        self, payment_intent: str, *, actor: str, reason: Callable[[Clawback], str | reasons.Reason],
        source_ip: str | None = None,
    ) -> PaymentSettled:
        """Bring what is clawed back from one purchase to what Stripe's events say it should be
        (``clawback_target``): the whole pack while a dispute of it is open or lost (any status
        outside DISPUTE_RELEASED), else tokens x refunded / amount (rounded down). So the total
        taken back never exceeds the pack, a refund during a dispute takes nothing more, a
        dispute after a partial refund takes the rest, and a released dispute gives back what
        it took beyond the refunded share (never a refund's clawback).

        A per-payment lock serializes this; the rows are read after the lock, and every writer
        of them calls this after its write commits, so the last caller sees the newest state.
        What was already taken back is read from the ledger (the truth), not from a counter:
        replays, concurrent deliveries and any order of events converge to the same total. Each
        movement has a deterministic key (refunds: the cumulative amount refunded; disputes: the
        number of the payment's dispute entries before it), so even a second caller that did
        not see the first one's entry cannot apply it twice. ``reason`` words the entry."""
        async with self._payment_slots, self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", PAYMENT_LOCK_CLASS, payment_intent)
            row = await conn.fetchrow("SELECT * FROM billing_payments WHERE payment_intent = $1", payment_intent)
            if row is None or row["session_id"] is None or not row["tokens"] or not await conn.fetchval(
                    "SELECT 1 FROM ledger_entries WHERE idempotency_key = $1", purchase_key(row["session_id"])):
                return PaymentSettled()  # the purchase is not known or not credited (yet, or never: unknown user)
            disputes = await conn.fetch(
                "SELECT dispute_id, status, amount, currency FROM billing_disputes WHERE payment_intent = $1"
                " ORDER BY created_at, dispute_id", payment_intent)
            held = [d for d in disputes if d["status"] not in DISPUTE_RELEASED]
            target = clawback_target(row["tokens"], row["amount"], row["amount_refunded"], disputed=bool(held))
            prefix, dprefix = refund_prefix(payment_intent), dispute_prefix(payment_intent)
            taken = await conn.fetchrow(
                "SELECT COALESCE(-SUM(tokens), 0)::bigint AS total,"
                " COALESCE(-SUM(tokens) FILTER (WHERE starts_with(idempotency_key, $3)), 0)::bigint AS disputed,"
                " count(*) FILTER (WHERE starts_with(idempotency_key, $3)) AS moves"
                " FROM ledger_entries WHERE user_id = $1"
                " AND (starts_with(idempotency_key, $2) OR starts_with(idempotency_key, $3))",
                row["user_id"], prefix, dprefix)
            total, disputed, moves = taken["total"], taken["disputed"], taken["moves"]
            payment = {"payment_intent": payment_intent, "user_id": row["user_id"], "refunded": row["amount_refunded"]}
            if target > total:
                if held:
                    d = held[0]
                    move = Clawback("dispute", "refund", f"{dprefix}{moves + 1}:{d['dispute_id']}", total - target,
                                    amount=d["amount"], currency=d["currency"], dispute_id=d["dispute_id"],
                                    status=d["status"], **payment)
                else:
                    move = Clawback("refund", "refund", f"{prefix}{row['amount_refunded']}", total - target,
                                    amount=row["amount"], currency=row["currency"], **payment)
            elif target < total and disputed > 0:
                # Only what disputes took comes back; a refund's share stays (and a refund that
                # failed later gives nothing back either: an admin grants it).
                d = [d for d in disputes if d["status"] in DISPUTE_RELEASED][-1]
                # 'adjustment', not 'refund': it undoes a clawback, and "Estorno +N" in the
                # user's statement would read as money going back to the card.
                move = Clawback("dispute_released", "adjustment", f"{dprefix}{moves + 1}:{d['dispute_id']}",
                                min(total - target, disputed), amount=d["amount"], currency=d["currency"],
                                dispute_id=d["dispute_id"], status=d["status"], **payment)
            else:
                return PaymentSettled(credited=True)
            # Another connection, while this one holds the payment's lock.
            _, applied = await self.grant(row["user_id"], move.tokens, actor=actor, kind=move.kind,
                                          reason=reason(move), idempotency_key=move.key, source_ip=source_ip)
        return PaymentSettled(credited=True, move=move, applied=applied)

    async def set_suspended(
        self, user_id: str, suspended: bool, *, actor: str, reason: str,
        source_ip: str | None = None,
    ) -> Account:
        now = self.clock()
        async with self._account_change(user_id) as (conn, row):
            before = _account(row)
            state = "suspended" if suspended else accounting.state_for(
                "active", before.balance, before.used_pct)
            updated = _account(await conn.fetchrow(
                "UPDATE accounts SET state = $2, state_reason = $3, updated_at = $4"
                f" WHERE user_id = $1 RETURNING {_ACCOUNT_FIELDS}",
                user_id, state, reason if suspended else None, now,
            ))
            action = "suspend" if suspended else "unsuspend"
            await audit(conn, actor, action, user_id, before, updated, reason, source_ip, now)
            return updated

    async def set_plan(
        self, user_id: str, plan: str, *, actor: str, reason: str, source_ip: str | None = None
    ) -> Account:
        """Move a user to another plan. The new allowance applies from the next cycle (the
        current cycle's budget is what the user was told; grant credits to top up now)."""
        now = self.clock()
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT 1 FROM plans WHERE name = $1", plan):
                raise UnknownPlan(plan)
            row = await self._locked_account(conn, user_id)
            if row is None:
                raise UnknownUser(user_id)
            before = _account(row)
            updated = _account(await conn.fetchrow(
                f"UPDATE accounts SET plan = $2, updated_at = $3 WHERE user_id = $1 RETURNING {_ACCOUNT_FIELDS}",
                user_id, plan, now,
            ))
            await audit(conn, actor, "plan", user_id, before, updated, reason, source_ip, now)
            return updated

    async def upsert_plan(
        self, name: str, *, monthly_tokens: int | None, requests_per_minute: int | None,
        rollover: bool, actor: str, source_ip: str | None = None,
    ) -> Plan:
        async with self.pool.acquire() as conn, conn.transaction():
            before = await conn.fetchrow("SELECT * FROM plans WHERE name = $1 FOR UPDATE", name)
            row = await conn.fetchrow(
                "INSERT INTO plans (name, monthly_tokens, requests_per_minute, rollover)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO UPDATE SET"
                " monthly_tokens = $2, requests_per_minute = $3, rollover = $4 RETURNING *",
                name, monthly_tokens, requests_per_minute, rollover,
            )
            plan = self._plan(row)
            await audit(conn, actor, "plan_upsert", f"plan:{name}",
                        None if before is None else self._plan(before).as_json(), plan.as_json(),
                        None, source_ip, self.clock())
            return plan

    async def set_settings(
        self, user_id: str, *, personal_cap: int | Unset | None = UNSET, notify_80: bool | Unset = UNSET,
        notify_90: bool | Unset = UNSET, language: str | Unset | None = UNSET, actor: str,
        reason: str | None = None, source_ip: str | None = None,
    ) -> Account:
        """The user's own settings (or an admin's change of them), one audited transaction
        (action ``settings``); arguments left UNSET keep their value. ``personal_cap`` None
        removes the cap, ``language`` None follows the deployment. A new cap moves the state
        band at once (warned_80...) but queues no alert: alerts are for usage that crosses a
        threshold, not for a limit the user just chose. ``reason``: an admin's (required by the
        console), None for the user's own change. Raises ValueError before any write."""
        changes: dict[str, Any] = {}
        if not isinstance(personal_cap, Unset):
            if personal_cap is not None and (
                    isinstance(personal_cap, bool) or not isinstance(personal_cap, int)
                    or not 0 <= personal_cap <= MAX_TOKENS_SETTING):
                raise ValueError(f"personal_cap must be an integer in [0, {MAX_TOKENS_SETTING}] or None")
            changes["personal_cap"] = personal_cap
        for key, flag in (("notify_80", notify_80), ("notify_90", notify_90)):
            if not isinstance(flag, Unset):
                if not isinstance(flag, bool):
                    raise ValueError(f"{key} must be true or false")
                changes[key] = flag
        if not isinstance(language, Unset):
            if language not in LANGUAGES:
                raise ValueError("language must be 'pt-BR', 'en' or None")
            changes["language"] = language
        now = self.clock()
        async with self._account_change(user_id) as (conn, row):
            before = _account(row)
            moved = replace(before, **changes)
            state = moved.state if moved.state == "suspended" else accounting.state_for(
                moved.state, moved.balance, moved.used_pct)
            columns = [*changes, "state"]
            assignments = ", ".join(f"{c} = ${i + 3}" for i, c in enumerate(columns))
            updated = _account(await conn.fetchrow(
                f"UPDATE accounts SET {assignments}, updated_at = $2 WHERE user_id = $1 RETURNING {_ACCOUNT_FIELDS}",
                user_id, now, *changes.values(), state))
            await audit(conn, actor, "settings", user_id, before, updated, reason, source_ip, now)
            return updated

    async def set_allowance(
        self, user_id: str, tokens: int | None, *, actor: str, reason: str, source_ip: str | None = None,
    ) -> Account:
        """This user's monthly allowance instead of the plan's (None: the plan's again). Like a
        plan change it applies from the next cycle (``_plan_tokens`` at the roll): the current
        budget is what the user was told; grant credits to top up now. Audited (``allowance``)."""
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int)
                                   or not 0 <= tokens <= MAX_TOKENS_SETTING):
            raise ValueError(f"the allowance must be an integer in [0, {MAX_TOKENS_SETTING}] or None")
        now = self.clock()
        async with self._account_change(user_id) as (conn, row):
            before = _account(row)
            updated = _account(await conn.fetchrow(
                "UPDATE accounts SET allowance_override = $2, updated_at = $3 WHERE user_id = $1"
                f" RETURNING {_ACCOUNT_FIELDS}", user_id, tokens, now))
            await audit(conn, actor, "allowance", user_id, before, updated, reason, source_ip, now)
            return updated

    # ------------------------------------------------------------ LGPD: erasure and export
    # What is kept, why and for how long: docs/privacy.md.

    async def erase(self, user_id: str, *, actor: str, reason: str, source_ip: str | None = None) -> str:
        """Erase the personal data of ``user_id`` (LGPD), irreversibly, in one transaction, and
        return the pseudonym its account now lives under. Amounts, entries and dates stay (an
        accounting record the operator must keep); the id, e-mail and name go, everywhere:
        the account's id becomes the pseudonym (the foreign keys cascade it to entries,
        reservations, alerts and links), e-mail, name and preferences are cleared, sign-in
        links and /me sessions deleted, purchases re-pointed, alert recipients blanked, and
        every text that quoted them (audit trail, entry reasons, delivery errors) rewritten.
        The id is remembered only as a SHA-256, so the gateway refuses it afterwards. An id
        already erased (or unknown) raises UnknownUser."""
        for _ in range(ERASE_ATTEMPTS - 1):
            try:
                return await self._erase(user_id, actor=actor, reason=reason, source_ip=source_ip)
            except asyncpg.DeadlockDetectedError:
                # A settle locked one of the holds between our two lock statements (it takes
                # the hold first, then the account): it lost or we did; run again.
                continue
        return await self._erase(user_id, actor=actor, reason=reason, source_ip=source_ip)

    async def _erase(self, user_id: str, *, actor: str, reason: str, source_ip: str | None) -> str:
        now = self.clock()
        pseudonym = f"erased-{secrets.token_hex(12)}"
        async with self.pool.acquire() as conn, conn.transaction():
            # The one transaction the audit trigger lets rewrite audit rows (SET LOCAL: ends
            # with it).
            await conn.execute("SET LOCAL solaris.erasure = 'on'")
            # The holds first, then the account: the order a settle takes them, so a settle
            # in flight waits for the erasure (and follows the hold to the pseudonym).
            await conn.execute(
                "SELECT 1 FROM reservations WHERE user_id = $1 AND state = 'held' ORDER BY exchange_id FOR UPDATE",
                user_id)
            row = await self._locked_account(conn, user_id)
            if row is None or row["erased_at"] is not None:
                raise UnknownUser(user_id)
            scrub = Scrubber(user_id, pseudonym, row["email"], row["name"])
            await conn.execute(
                "UPDATE accounts SET user_id = $2, email = NULL, name = NULL, state_reason = $3,"
                " personal_cap = NULL, notify_80 = true, notify_90 = true, language = NULL,"
                " inline_notice = 0, erased_at = $4, updated_at = $4 WHERE user_id = $1",
                user_id, pseudonym, scrub.text(row["state_reason"]), now)
            await conn.execute("INSERT INTO erased_users (id_sha256, pseudonym, erased_at) VALUES ($1, $2, $3)",
                               id_sha256(user_id), pseudonym, now)
            await conn.execute("DELETE FROM magic_links WHERE user_id = $1", pseudonym)
            await conn.execute("DELETE FROM web_sessions WHERE kind = 'me' AND subject = $1", user_id)
            await conn.execute("UPDATE billing_payments SET user_id = $2 WHERE user_id = $1", user_id, pseudonym)
            await conn.execute(
                "UPDATE alert_deliveries d SET recipient = '' FROM alert_outbox o"
                " WHERE d.outbox_id = o.id AND o.user_id = $1 AND d.audience = 'user'", pseudonym)
            await self._scrub_texts(conn, scrub)
            await audit(conn, scrub.text(actor), "erase", pseudonym, None,
                        {"pseudonym": pseudonym, "erased_at": now.isoformat()},
                        scrub.text(reason), source_ip, now)
        return pseudonym

    async def _scrub_texts(self, conn: asyncpg.Connection, scrub: Scrubber) -> None:
        """Rewrite the free texts that may quote the erased id, e-mail or name: the account's
        entries (reason, reason codes' parameters, actor), its alerts' delivery errors (they
        name the recipient) and the audit trail (rows about the user, by the user, or that
        mention their id or e-mail anywhere; in those rows the name too — a name alone does not
        make a row theirs, another person may bear it). The values are rewritten in Python, string by
        string inside the JSON, so JSON escaping and numbers are never touched."""
        needles = scrub.needles()
        for r in await conn.fetch(
                "SELECT id, actor, reason, reason_params FROM ledger_entries WHERE user_id = $1"
                " AND (reason IS NOT NULL OR reason_params IS NOT NULL OR actor LIKE 'user:%')", scrub.pseudonym):
            new = scrub.text(r["actor"]), scrub.text(r["reason"]), scrub.json(r["reason_params"])
            if new != (r["actor"], r["reason"], r["reason_params"]):
                await conn.execute("UPDATE ledger_entries SET actor = $2, reason = $3, reason_params = $4::jsonb"
                                   " WHERE id = $1", r["id"], *new)
        await conn.execute(
            "UPDATE alert_outbox SET last_error = '[erased]' WHERE user_id = $1 AND last_error IS NOT NULL",
            scrub.pseudonym)
        await conn.execute(
            "UPDATE alert_deliveries d SET last_error = '[erased]' FROM alert_outbox o"
            " WHERE d.outbox_id = o.id AND o.user_id = $1 AND d.last_error IS NOT NULL", scrub.pseudonym)
        rows = await conn.fetch(
            "SELECT id, actor, target, before::text AS before, after::text AS after, reason,"
            " reason_params::text AS reason_params FROM audit_log"
            " WHERE target = $1 OR actor = $2 OR EXISTS (SELECT 1 FROM unnest($3::text[]) n WHERE"
            "  strpos(actor, n) > 0 OR strpos(target, n) > 0 OR strpos(before::text, n) > 0"
            "  OR strpos(after::text, n) > 0 OR strpos(reason, n) > 0 OR strpos(reason_params::text, n) > 0)",
            scrub.user_id, f"user:{scrub.user_id}", needles)
        for r in rows:
            old = (r["actor"], r["target"], r["before"], r["after"], r["reason"], r["reason_params"])
            new = (scrub.text(r["actor"]), scrub.text(r["target"]), scrub.json(r["before"]),
                   scrub.json(r["after"]), scrub.text(r["reason"]), scrub.json(r["reason_params"]))
            if new != old:
                await conn.execute(
                    "UPDATE audit_log SET actor = $2, target = $3, before = $4::jsonb, after = $5::jsonb,"
                    " reason = $6, reason_params = $7::jsonb WHERE id = $1", r["id"], *new)

    async def export(self, user_id: str) -> dict[str, Any] | None:
        """Everything held about ``user_id`` (LGPD access and portability), JSON-serialisable:
        the account, its ledger entries, reservations, alerts and their deliveries, purchases,
        the audit rows about it, its /me sessions (never a session's hash) and sign-in links
        (times only). Dates ISO 8601, amounts integers. None for an unknown id."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            row = await conn.fetchrow(f"SELECT {_ACCOUNT_FIELDS} FROM accounts WHERE user_id = $1", user_id)
            if row is None:
                return None

            async def rows(sql: str) -> list[dict[str, Any]]:
                return [_exported(r) for r in await conn.fetch(sql, user_id)]

            return {
                "exported_at": self.clock().isoformat(),
                "account": _account(row).as_json(),
                "ledger_entries": await rows(
                    "SELECT id, kind, tokens, allowance_delta, credits_delta, balance_after, exchange_id,"
                    " request_id, model, prompt_tokens, completion_tokens, estimate, real_tokens, flags, actor,"
                    " reason, reason_code, reason_params, cycle_start, created_at, held, admitted_at"
                    " FROM ledger_entries"
                    " WHERE user_id = $1 ORDER BY id"),
                "reservations": await rows(
                    "SELECT exchange_id, tokens, request_id, model, state, created_at, expires_at, closed_at"
                    " FROM reservations WHERE user_id = $1 ORDER BY created_at, exchange_id"),
                "alerts": await rows(
                    "SELECT o.id, o.cycle_start, o.cycle_end, o.threshold, o.used_pct, o.used, o.budget,"
                    " o.remaining, o.state, o.created_at, o.sent_at, COALESCE((SELECT jsonb_agg(jsonb_build_object("
                    "  'channel', d.channel, 'recipient', d.recipient, 'state', d.state, 'sent_at', d.sent_at)"
                    "  ORDER BY d.id) FROM alert_deliveries d WHERE d.outbox_id = o.id"
                    "  AND d.audience = 'user'), '[]'::jsonb) AS deliveries"
                    " FROM alert_outbox o WHERE o.user_id = $1 ORDER BY o.id"),
                "purchases": await rows(
                    "SELECT payment_intent, session_id, pack, tokens, amount, currency, amount_refunded,"
                    " created_at, updated_at FROM billing_payments WHERE user_id = $1 ORDER BY created_at"),
                "audit": await rows(
                    "SELECT id, actor, action, before, after, reason, reason_code, reason_params, source_ip,"
                    " created_at FROM audit_log WHERE target = $1 ORDER BY id"),
                "sessions": await rows(
                    "SELECT created_at, last_used_at, expires_at, revoked_at, source_ip, user_agent"
                    " FROM web_sessions WHERE kind = 'me' AND subject = $1 ORDER BY created_at"),
                "sign_in_links": await rows(
                    "SELECT created_at, expires_at, used_at FROM magic_links WHERE user_id = $1 ORDER BY created_at"),
            }

    def _plan(self, row: asyncpg.Record) -> Plan:
        return Plan(
            name=row["name"],
            monthly_tokens=self._plan_tokens(row),
            requests_per_minute=row["requests_per_minute"] or self.settings.rate_limit_per_minute,
            rollover=row["rollover"],
        )

    async def plans(self) -> list[Plan]:
        return [self._plan(r) for r in await self.pool.fetch("SELECT * FROM plans ORDER BY name")]

    async def claim_inline_notice(self, user_id: str, threshold: int, cycle_start: datetime) -> bool:
        """True for exactly one caller per (user, cycle, threshold): the one whose conditional
        UPDATE raised the account's ``inline_notice`` to ``threshold``. A later cycle starts
        at 0 again (``_roll_if_due``); a notice for a lower threshold after a higher one was
        shown is never due. Not money: no ledger entry, no audit row."""
        try:
            return bool(await self.pool.fetchval(
                "UPDATE accounts SET inline_notice = $2 WHERE user_id = $1 AND cycle_start = $3"
                " AND inline_notice < $2 RETURNING true", user_id, threshold, cycle_start))
        except UNAVAILABLE_ERRORS as exc:
            raise LedgerUnavailable(str(exc)) from exc

    # ------------------------------------------------------------ reads

    async def account(self, user_id: str) -> Account | None:
        row = await self.pool.fetchrow(
            f"SELECT {_ACCOUNT_FIELDS} FROM accounts WHERE user_id = $1", user_id)
        return None if row is None else _account(row)

    async def pseudonym_of(self, user_id: str) -> str | None:
        """The pseudonym an erased id's account lives under now, None if it was never erased."""
        async with self.pool.acquire() as conn:
            return await erased_pseudonym(conn, user_id)

    # ------------------------------------------------------------ maintenance

    async def sweep_reservations(self, limit: int = 500) -> int:
        """Charge expired reservations their estimate (documented rule: an exchange admitted
        and never settled, e.g. its processor died mid-stream, costs what was reserved),
        flagged ``expired``. Two sweepers may pick the same row; settle() locks the account
        and re-checks the exchange, so only one of them charges it."""
        now = self.clock()
        swept = 0
        rows = await self.pool.fetch(
            "SELECT exchange_id, user_id, tokens, request_id, model FROM reservations"
            " WHERE state = 'held' AND expires_at <= $1 ORDER BY expires_at LIMIT $2",
            now, limit,
        )
        for r in rows:
            done = await self.settle(
                Usage(exchange_id=r["exchange_id"], user_id=r["user_id"], model=r["model"],
                      request_id=r["request_id"], prompt_tokens=0, completion_tokens=r["tokens"],
                      estimate=r["tokens"], flags=("expired",), cost=r["tokens"]),
                reservation_state="expired",
            )
            swept += done is not None
        return swept

    async def roll_idle_cycles(self, limit: int = 500) -> int:
        """The periodic sweep's half of cycle rolling (the request path rolls lazily). Erased
        accounts are not rolled: nobody can spend from them, and a new allowance entry every
        month would only grow a balance no one owns."""
        now = self.clock()
        rolled = 0
        users = await self.pool.fetch(
            "SELECT user_id FROM accounts WHERE cycle_end <= $1 AND erased_at IS NULL LIMIT $2", now, limit)
        for u in users:
            async with self.pool.acquire() as conn, conn.transaction():
                row = await self._locked_account(conn, u["user_id"])
                after = await self._roll_if_due(conn, row, now)
                rolled += after is not row
        return rolled

    async def calibration(self, days: int = 30) -> list[dict[str, Any]]:
        """Per model over the last ``days``: real prompt tokens per prompt character (the
        conversion factor the data suggests) and real/estimate of whole exchanges. Only
        exchanges whose usage the upstream reported count (not counted or expired ones)."""
        rows = await self.pool.fetch(
            "SELECT model, count(*) AS exchanges, SUM(prompt_tokens)::bigint AS prompt_tokens,"
            " SUM(prompt_chars)::bigint AS prompt_chars, SUM(real_tokens)::bigint AS real_tokens,"
            " SUM(estimate)::bigint AS estimate FROM ledger_entries"
            " WHERE kind = 'usage' AND created_at >= $1::timestamptz - make_interval(days => $2::int)"
            "   AND prompt_chars > 0 AND estimate > 0 AND flags = '{}'"
            " GROUP BY model ORDER BY model",
            self.clock(), days,
        )
        return [{
            **dict(r),
            "suggested_factor": round(r["prompt_tokens"] / r["prompt_chars"], 4),
            "real_to_estimate": round(r["real_tokens"] / r["estimate"], 4),
        } for r in rows]

    async def reconcile(self) -> list[dict[str, Any]]:
        """Accounts whose columns disagree with their ledger entries or reservations."""
        rows = await self.pool.fetch(
            "SELECT a.user_id, a.allowance, a.credits, a.reserved,"
            " COALESCE(e.allowance, 0)::bigint AS ledger_allowance,"
            " COALESCE(e.credits, 0)::bigint AS ledger_credits, COALESCE(r.held, 0)::bigint AS held"
            " FROM accounts a"
            " LEFT JOIN (SELECT user_id, SUM(allowance_delta) AS allowance,"
            "   SUM(credits_delta) AS credits FROM ledger_entries GROUP BY user_id) e"
            "   ON e.user_id = a.user_id"
            " LEFT JOIN (SELECT user_id, SUM(tokens) AS held FROM reservations"
            "   WHERE state = 'held' GROUP BY user_id) r ON r.user_id = a.user_id"
            " WHERE a.allowance <> COALESCE(e.allowance, 0) OR a.credits <> COALESCE(e.credits, 0)"
            "   OR a.reserved <> COALESCE(r.held, 0)"
        )
        return [dict(r) for r in rows]


SETTLE_ATTEMPTS = 3  # _settle runs again when an erasure renamed the account under it (or won a deadlock)


class _AccountMoved(Exception):
    """An erasure renamed the account while a settle waited for it: roll back and run again."""


def id_sha256(user_id: str) -> str:
    """How erased_users remembers an erased id: hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(user_id.encode()).hexdigest()


async def erased_pseudonym(conn: asyncpg.Connection, user_id: str) -> str | None:
    """The pseudonym an erased id's ledger lives under now, or None if it was never erased."""
    return await conn.fetchval("SELECT pseudonym FROM erased_users WHERE id_sha256 = $1", id_sha256(user_id))


ERASE_ATTEMPTS = 3  # erase() runs again after losing a deadlock to a settle
ERASED = "[erased]"  # what an erased e-mail or name reads as in the texts that quoted it
# An id shorter than this is replaced only where it is a whole value (or "user:<id>"): inside
# longer text, "7" or "ana" would also match dates, amounts and other words.
MIN_ID_IN_TEXT = 4


class Scrubber:
    """Rewrites the erased person's id (to the pseudonym), e-mail and name (to ``[erased]``)
    inside one text or the string values of one JSON document."""

    def __init__(self, user_id: str, pseudonym: str, email: str | None, name: str | None) -> None:
        self.user_id, self.pseudonym = user_id, pseudonym
        self.whole = {user_id: pseudonym, f"user:{user_id}": f"user:{pseudonym}"}
        swaps = [(v, ERASED) for v in (email, name) if v and v.strip()]
        if len(user_id) >= MIN_ID_IN_TEXT:
            swaps.append((user_id, pseudonym))
        swaps.sort(key=lambda s: -len(s[0]))  # the longest first: an e-mail may contain the id
        self.swaps = dict(swaps)
        self.pattern = re.compile("|".join(re.escape(v) for v in self.swaps)) if swaps else None
        # A name is not an identifier: another person may share it (their own account's
        # snapshots carry it). So it is rewritten only in rows found by the id or the e-mail.
        self.name = name if name and name.strip() else None

    def needles(self) -> list[str]:
        """What marks a row as about this person (for the SQL that finds the rows): the id and
        the e-mail, also as they read inside JSON text (quotes and backslashes escaped); never
        the name alone (see ``name``)."""
        plain = [*(v for v in self.swaps if v != self.name), *self.whole]
        return sorted({*plain, *(json.dumps(v, ensure_ascii=False)[1:-1] for v in plain)})

    def text(self, value: str | None) -> str | None:
        if value is None:
            return None
        if value in self.whole:
            return self.whole[value]
        return self.pattern.sub(lambda m: self.swaps[m.group(0)], value) if self.pattern else value

    def json(self, document: str | None) -> str | None:
        if document is None:
            return None

        def walk(v: Any) -> Any:
            if isinstance(v, str):
                return self.text(v)
            if isinstance(v, list):
                return [walk(x) for x in v]
            if isinstance(v, dict):
                return {self.text(k): walk(x) for k, x in v.items()}
            return v

        before = json.loads(document)
        after = walk(before)
        return document if after == before else json.dumps(after, ensure_ascii=False)


def _exported(row: asyncpg.Record) -> dict[str, Any]:
    """One row for export(): dates ISO 8601, numerics as int (or float when fractional), JSON
    columns parsed."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, Decimal):
            value = int(value) if value == value.to_integral_value() else float(value)
        elif isinstance(value, str) and key in ("reason_params", "before", "after", "deliveries"):
            value = json.loads(value)
        out[key] = value
    return out


def trueup_key_for(exchange_id: str) -> str:
    """The idempotency key of the one true-up an exchange may get after its sweep (I5)."""
    return f"trueup:{exchange_id}"


async def audit(
    conn: asyncpg.Connection, actor: str, action: str, target: str | None,
    before: Account | dict[str, Any] | None, after: Account | dict[str, Any] | None,
    reason: str | reasons.Reason | None, source_ip: str | None, now: datetime,
) -> None:
    """One audit row; call it inside the transaction of the change it records (I4)."""

    def dump(value: Account | dict[str, Any] | None) -> str | None:
        if value is None:
            return None
        return json.dumps(value.as_json() if isinstance(value, Account) else value, default=str)

    await conn.execute(
        "INSERT INTO audit_log (actor, action, target, before, after, reason, reason_code, reason_params,"
        " source_ip, created_at) VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7, $8::jsonb, $9, $10)",
        actor, action, target, dump(before), dump(after), *reasons.columns(reason), source_ip, now,
    )


async def _no_reset(conn: asyncpg.Connection) -> None:
    """asyncpg resets every released connection (advisory locks, cursors, LISTEN, SET) with an
    extra round trip; this code takes only transaction-scoped locks and sets nothing per
    session, so only a transaction left open (a cancelled task) needs ending."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def create_pool(settings: Settings, *, asynchronous_commit: bool = False, **kwargs: Any) -> asyncpg.Pool:
    """A pool on the ledger database; ``asynchronous_commit`` only for ``Ledger.admit_pool``."""
    server_settings = {"synchronous_commit": "off"} if asynchronous_commit else None
    return await asyncpg.create_pool(
        settings.database_url, min_size=kwargs.pop("min_size", 1),
        max_size=kwargs.pop("max_size", settings.db_pool_size), command_timeout=10,
        server_settings=server_settings, reset=_no_reset, **kwargs,
    )


# ---------------------------------------------------------------- purchases: refunds and disputes
# (the keys, constants and values of Ledger.settle_payment)

PAYMENT_LOCK_CLASS = 74_2001  # pg_advisory_xact_lock(class, hashtext(payment intent))
PAYMENT_CONCURRENCY = 4  # settle_payment() calls at once per process (see Ledger._payment_slots)
# Dispute statuses that give the dispute's clawback back: won (the merchant keeps the money),
# warning_closed (an inquiry closed without becoming a chargeback) and prevented (settled
# before it became a dispute; any money returned then comes as charge.refunded and is clawed
# back by the refund rule). Every other status, "lost" and any status this code does not know
# included, keeps the purchase clawed back: when unsure, the credits stay taken and an admin
# can grant them, rather than a cardholder keeping both the money and the credits.
DISPUTE_RELEASED = frozenset({"won", "warning_closed", "prevented"})


def purchase_key(session_id: str) -> str:
    """The idempotency key of the purchase entry of one Stripe Checkout Session."""
    return f"stripe:checkout:{session_id}"


def refund_prefix(payment_intent: str) -> str:
    return f"stripe:refund:{payment_intent}:"


def dispute_prefix(payment_intent: str) -> str:
    return f"stripe:dispute:{payment_intent}:"


def clawback_target(tokens: int, amount: int | None, refunded: int, *, disputed: bool) -> int:
    """What a purchase of ``tokens`` paid ``amount`` (minor units) should have had taken back:
    the whole pack while a dispute holds it (a chargeback reverses the whole payment: the pack
    is one line item, and the dispute's amount may differ from the charge's by currency
    conversion, so it is not prorated), else the refunded share, rounded down."""
    if disputed:
        return tokens
    return tokens * min(refunded, amount) // amount if amount and refunded else 0


@dataclass(frozen=True)
class Clawback:
    """One movement settle_payment() decided: ``tokens`` is the signed change of the balance
    (negative: taken back; positive: a released dispute gives back)."""

    cause: str  # "refund", "dispute" (held) or "dispute_released"
    kind: str  # of the ledger entry: "refund" or "adjustment"
    key: str  # its idempotency key
    tokens: int
    payment_intent: str
    user_id: str
    refunded: int  # the payment's amount refunded so far (minor units)
    amount: int | None  # refund: the payment's amount; dispute: the dispute's
    currency: str | None
    dispute_id: str | None = None
    status: str | None = None  # the dispute's


@dataclass(frozen=True)
class PaymentSettled:
    """What settle_payment() did. ``credited``: the purchase is known and credited (if not,
    nothing could be settled yet); ``move``: the movement due, if any; ``applied``: whether
    this call wrote it (False: its key was used already)."""

    credited: bool = False
    move: Clawback | None = None
    applied: bool = False

    @property
    def change(self) -> int:
        """The signed change of the balance made now."""
        return self.move.tokens if self.move is not None and self.applied else 0


# ---------------------------------------------------------------- the Account mapping, public
# For the read-only queries of the web surfaces (web.queries): one mapping of an accounts row.

ACCOUNT_COLUMNS = _ACCOUNT_FIELDS
account_from_row = _account
