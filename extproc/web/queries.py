"""Read-only queries behind the admin console and /me: SELECT statements only.

Money moves in ``ledger`` alone; this module only reads. Queries that list accounts are
built for 100 000+ rows: keyset paging (no OFFSET), search by substring on the trigram indexes
of migrations/20261129000004_search.sql (by prefix on the "C"-collation indexes of
migrations/20261125000003_web.sql where pg_trgm is missing), sorts served by those "C"
indexes, and counts capped so a broad filter never counts the whole table.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from ..accounting import STATES
from ..ledger import ACCOUNT_COLUMNS, Account, account_from_row

# accounting.usage_pct in SQL, for the usage bands and the "usage" sort only: what is shown is
# always Account.used_pct. It must be SQL: the list pages 100 000+ accounts by keyset, so the
# value has to be in the WHERE and ORDER BY of the query itself (and in its cursor), not
# computed after the rows are read. Python rounds the binary float, SQL the exact decimal,
# so the two differ, by 0.01, only when the exact value ends in 5 at the third decimal
# (tests/test_web_queries.py checks that this is the only difference).
# The denominator is the effective limit (accounting.effective_limit): the cycle budget, or the
# user's personal cap when lower; LEAST ignores a NULL cap.
USED_PCT = (
    "(CASE WHEN LEAST(a.cycle_budget, a.personal_cap) <= 0 THEN 100.0"
    " ELSE round(100.0 * a.used_cycle / LEAST(a.cycle_budget, a.personal_cap), 2) END)"
)

USAGE_BANDS: dict[str, str] = {
    "lt50": f"{USED_PCT} < 50",
    "50to80": f"{USED_PCT} >= 50 AND {USED_PCT} < 80",
    "80to90": f"{USED_PCT} >= 80 AND {USED_PCT} < 90",
    "90to100": f"{USED_PCT} >= 90 AND {USED_PCT} < 100",
    "gte100": f"{USED_PCT} >= 100",
}

_UID = 'a.user_id COLLATE "C"'
# sort name -> (key expressions with the SQL type a cursor value is cast back to). The last
# key is always the user id, so every ordering is total and keyset paging never skips a row.
SORTS: dict[str, tuple[tuple[str, str], ...]] = {
    "user": ((_UID, "text"),),
    "email": (("COALESCE(lower(a.email), '') COLLATE \"C\"", "text"), (_UID, "text")),
    "name": (("COALESCE(lower(a.name), '') COLLATE \"C\"", "text"), (_UID, "text")),
    "created": (("a.created_at", "timestamptz"), (_UID, "text")),
    "usage": ((USED_PCT, "numeric"), (_UID, "text")),
}

MAX_PAGE = 200
COUNT_CAP = 10_000


class BadCursor(ValueError):
    pass


def like_literal(text: str) -> str:
    """``text`` for LIKE / ILIKE with its wildcards (and the escape character) taken literally."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def like_prefix(text: str) -> str:
    """``text%`` for LIKE with the wildcards in ``text`` taken literally."""
    return like_literal(text) + "%"


def like_substring(text: str) -> str:
    """``%text%`` for ILIKE with the wildcards in ``text`` taken literally."""
    return "%" + like_literal(text) + "%"


# How the user list searches: "substring" (pg_trgm and the trigram indexes of
# migrations/20261129000004_search.sql exist) or "prefix" (the documented fallback). Found out
# once per pool (a pool is one database); pools cannot be weakly referenced, so the entry
# keeps its pool, and the map is bounded (tests open many pools, a service one or two).
SEARCH_MODES = ("substring", "prefix")
_search_mode: dict[int, tuple[asyncpg.Pool, str]] = {}
TRGM_INDEXES = ("accounts_user_id_trgm", "accounts_email_trgm", "accounts_name_trgm")


async def search_mode(pool: asyncpg.Pool) -> str:
    known = _search_mode.get(id(pool))
    if known is not None and known[0] is pool:
        return known[1]
    found = await pool.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm')"
        " AND (SELECT count(*) FROM pg_indexes WHERE tablename = 'accounts' AND indexname = ANY($1::text[]))"
        " = cardinality($1::text[])", list(TRGM_INDEXES))
    mode = "substring" if found else "prefix"
    if len(_search_mode) >= 64:
        _search_mode.clear()
    _search_mode[id(pool)] = (pool, mode)
    return mode


def encode_cursor(values: Sequence[Any]) -> str:
    raw = json.dumps([v.isoformat() if isinstance(v, datetime) else str(v) for v in values])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, types: Sequence[str]) -> list[Any]:
    """The typed key values of a cursor; BadCursor (a 400, never a database error) otherwise."""
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(values, list) or len(values) != len(types) or not all(isinstance(v, str) for v in values):
            raise ValueError("shape")
        return [_typed(v, t) for v, t in zip(values, types, strict=True)]
    except (ValueError, binascii.Error, ArithmeticError):
        raise BadCursor("invalid cursor") from None


def _typed(value: str, sqltype: str) -> Any:
    if sqltype == "timestamptz":
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            raise ValueError("naive timestamp")
        return parsed
    if sqltype == "numeric":
        number = Decimal(value)
        if not number.is_finite():
            raise ValueError("not finite")
        return number
    return value


@dataclass(frozen=True)
class UserFilter:
    q: str = ""
    state: str = ""
    plan: str = ""
    band: str = ""
    sort: str = "user"
    desc: bool = False
    limit: int = 50
    after: str = ""
    before: str = ""
    # "substring" or "prefix"; empty: what the database supports (search_mode), chosen by
    # list_users and iter_users. Not a user's choice: tests force "prefix" to check the fallback.
    mode: str = ""

    def validate(self) -> dict[str, str]:
        """Field -> problem code; empty when the filter is usable."""
        errors: dict[str, str] = {}
        if self.state and self.state not in STATES:
            errors["state"] = "invalid_choice"
        if self.band and self.band not in USAGE_BANDS:
            errors["band"] = "invalid_choice"
        if self.sort not in SORTS:
            errors["sort"] = "invalid_choice"
        if not 1 <= self.limit <= MAX_PAGE:
            errors["limit"] = "out_of_range"
        if len(self.q) > 320 or len(self.plan) > 64:
            errors["q" if len(self.q) > 320 else "plan"] = "too_long"
        if self.after and self.before:
            errors["after"] = "conflict"
        if self.mode and self.mode not in SEARCH_MODES:
            errors["mode"] = "invalid_choice"
        return errors


@dataclass(frozen=True)
class UserPage:
    accounts: list[Account]
    next_cursor: str | None
    prev_cursor: str | None
    total: int
    total_capped: bool


def _where(f: UserFilter, args: list[Any]) -> list[str]:
    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    where: list[str] = []
    q = f.q.strip()
    if q and f.mode == "substring":
        # Three substring searches, each on its own trigram index, OR-ed (a BitmapOr).
        low = arg(like_substring(q.lower()))
        where.append(f"(lower(a.user_id) ILIKE {low} OR lower(a.email) ILIKE {low} OR lower(a.name) ILIKE {low})")
    elif q:
        # Three prefix searches, each on its own index, OR-ed (a BitmapOr in the plan).
        raw, low = arg(like_prefix(q)), arg(like_prefix(q.lower()))
        where.append(
            f"({_UID} LIKE {raw} OR COALESCE(lower(a.email), '') COLLATE \"C\" LIKE {low}"
            f" OR COALESCE(lower(a.name), '') COLLATE \"C\" LIKE {low})")
    if f.state:
        where.append(f"a.state = {arg(f.state)}")
    if f.plan:
        where.append(f"a.plan = {arg(f.plan)}")
    if f.band:
        where.append(USAGE_BANDS[f.band])
    return where


def user_query(f: UserFilter) -> tuple[str, list[Any], bool]:
    """SQL and arguments of one page (limit + 1 rows, to know whether another follows), and
    whether the rows come back reversed (paging backwards)."""
    args: list[Any] = []
    where = _where(f, args)
    keys = SORTS[f.sort]
    backwards = bool(f.before)
    descending = f.desc != backwards
    cursor = f.before or f.after
    if cursor:
        values = decode_cursor(cursor, [t for _, t in keys])
        placeholders = []
        for value, (_expr, sqltype) in zip(values, keys, strict=True):
            args.append(value)
            placeholders.append(f"${len(args)}::{sqltype}")
        op = "<" if descending else ">"
        where.append(f"({', '.join(e for e, _ in keys)}) {op} ({', '.join(placeholders)})")
    direction = "DESC" if descending else "ASC"
    order = ", ".join(f"{e} {direction}" for e, _ in keys)
    select = ", ".join(f"{e} AS k{i}" for i, (e, _) in enumerate(keys))
    args.append(f.limit + 1)
    filtered = f"accounts a{' WHERE ' + ' AND '.join(where) if where else ''}"
    if f.q.strip() and f.mode == "substring":
        # The planner cannot estimate how many rows a substring matches (its guess moves with
        # ANALYZE's sample): guessing "many", it walks the sort key's index and filters every
        # row, which for a rare term reads the whole table. Matching first (the trigram
        # indexes' bitmap) and sorting the matches makes a rare term cheap; the price is a
        # common term ("example.com"), whose every page sorts all its matches (a top-N sort:
        # tens of milliseconds at 100 000 accounts), where the index walk would stop early.
        filtered = f"(SELECT * FROM {filtered} OFFSET 0) a"
    sql = f"SELECT {ACCOUNT_COLUMNS}, {select} FROM {filtered} ORDER BY {order} LIMIT ${len(args)}"
    return sql, args, backwards


def count_query(f: UserFilter, cap: int = COUNT_CAP) -> tuple[str, list[Any]]:
    args: list[Any] = []
    where = _where(replace(f, after="", before=""), args)
    args.append(cap + 1)
    sql = (f"SELECT count(*) FROM (SELECT 1 FROM accounts a"
           f"{' WHERE ' + ' AND '.join(where) if where else ''} LIMIT ${len(args)}) s")
    return sql, args


def _cursor(row: asyncpg.Record, size: int) -> str:
    return encode_cursor([row[f"k{i}"] for i in range(size)])


async def list_users(pool: asyncpg.Pool, f: UserFilter) -> UserPage:
    if not f.mode:
        f = replace(f, mode=await search_mode(pool))
    sql, args, backwards = user_query(f)
    rows = list(await pool.fetch(sql, *args))
    more = len(rows) > f.limit
    rows = rows[: f.limit]
    if backwards:
        rows.reverse()
    size = len(SORTS[f.sort])
    has_next = more if not backwards else True
    has_prev = bool(f.after) if not backwards else more
    count_sql, count_args = count_query(f)
    total = await pool.fetchval(count_sql, *count_args)
    return UserPage(
        accounts=[account_from_row(r) for r in rows],
        next_cursor=_cursor(rows[-1], size) if rows and has_next else None,
        prev_cursor=_cursor(rows[0], size) if rows and has_prev else None,
        total=min(total, COUNT_CAP),
        total_capped=total > COUNT_CAP,
    )


async def iter_users(pool: asyncpg.Pool, f: UserFilter, batch: int = 1000) -> AsyncIterator[Account]:
    """Every account matching ``f``, in keyset batches (a CSV export never holds the whole
    table in memory)."""
    f = replace(f, limit=batch, after="", before="", mode=f.mode or await search_mode(pool))
    size = len(SORTS[f.sort])
    while True:
        sql, args, _ = user_query(f)
        rows = await pool.fetch(sql, *args)
        for row in rows[:batch]:
            yield account_from_row(row)
        if len(rows) <= batch:
            return
        f = replace(f, after=_cursor(rows[batch - 1], size))


# ---------------------------------------------------------------- dashboard


async def state_totals(pool: asyncpg.Pool) -> dict[str, dict[str, int]]:
    """Per state: accounts, tokens used this cycle, cycle budget (one pass over accounts)."""
    rows = await pool.fetch(
        "SELECT state, count(*) AS accounts, COALESCE(sum(used_cycle), 0)::bigint AS used,"
        " COALESCE(sum(cycle_budget), 0)::bigint AS budget FROM accounts GROUP BY state")
    return {r["state"]: {"accounts": r["accounts"], "used": r["used"], "budget": r["budget"]}
            for r in rows}


async def daily_usage(pool: asyncpg.Pool, start: date, end: date) -> dict[date, tuple[int, int]]:
    """Usage entries per UTC day in [start, end): (requests, tokens debited)."""
    rows = await pool.fetch(
        "SELECT (created_at AT TIME ZONE 'UTC')::date AS day, count(*) AS requests,"
        " COALESCE(sum(-tokens), 0)::bigint AS tokens FROM ledger_entries"
        " WHERE kind = 'usage' AND created_at >= ($1::date)::timestamp AT TIME ZONE 'UTC'"
        "   AND created_at < ($2::date)::timestamp AT TIME ZONE 'UTC'"
        " GROUP BY 1",
        start, end)
    return {r["day"]: (r["requests"], r["tokens"]) for r in rows}


async def top_consumers(pool: asyncpg.Pool, limit: int = 10) -> list[Account]:
    rows = await pool.fetch(
        f"SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.used_cycle > 0"
        " ORDER BY a.used_cycle DESC, a.user_id LIMIT $1", limit)
    return [account_from_row(r) for r in rows]


async def recent_blocks(pool: asyncpg.Pool, limit: int = 10) -> list[tuple[Account, datetime]]:
    """Blocked and suspended accounts, most recently changed first (served by the state index:
    such accounts are few)."""
    rows = await pool.fetch(
        f"SELECT {ACCOUNT_COLUMNS}, a.updated_at FROM accounts a"
        " WHERE a.state IN ('blocked', 'suspended') ORDER BY a.updated_at DESC LIMIT $1", limit)
    return [(account_from_row(r), r["updated_at"]) for r in rows]


# ---------------------------------------------------------------- one user


async def get_account(pool: asyncpg.Pool, user_id: str) -> Account | None:
    row = await pool.fetchrow(f"SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.user_id = $1", user_id)
    return None if row is None else account_from_row(row)


async def accounts_by_email(pool: asyncpg.Pool, address: str, limit: int = 5) -> list[Account]:
    """Accounts signed in with this address (served by the accounts_email index)."""
    rows = await pool.fetch(
        f"SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE lower(a.email) = lower($1)"
        " ORDER BY a.user_id LIMIT $2", address, limit)
    return [account_from_row(r) for r in rows]


ENTRY_COLUMNS = (
    "id, kind, tokens, allowance_delta, credits_delta, balance_after, exchange_id, request_id,"
    " model, prompt_tokens, completion_tokens, estimate, real_tokens, flags, actor, reason,"
    " reason_code, reason_params, cycle_start, created_at"
)


@dataclass(frozen=True)
class EntryPage:
    entries: list[dict[str, Any]]
    older: int | None  # before_id of the next (older) page
    newer: int | None  # after_id of the previous (newer) page


async def entries_page(pool: asyncpg.Pool, user_id: str, *, limit: int = 50,
                       before_id: int | None = None, after_id: int | None = None) -> EntryPage:
    """A page of the statement, newest first, by keyset on the entry id (served by the
    ledger_entries_user index)."""
    if after_id is not None:
        rows = list(await pool.fetch(
            f"SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE user_id = $1 AND id > $2"
            " ORDER BY id ASC LIMIT $3", user_id, after_id, limit + 1))
        more_newer = len(rows) > limit
        rows = rows[:limit][::-1]
        return EntryPage([dict(r) for r in rows],
                         older=rows[-1]["id"] if rows else None,
                         newer=rows[0]["id"] if rows and more_newer else None)
    rows = list(await pool.fetch(
        f"SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE user_id = $1"
        " AND ($2::bigint IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
        user_id, before_id, limit + 1))
    more_older = len(rows) > limit
    rows = rows[:limit]
    return EntryPage([dict(r) for r in rows],
                     older=rows[-1]["id"] if rows and more_older else None,
                     newer=rows[0]["id"] if rows and before_id is not None else None)


async def iter_entries(pool: asyncpg.Pool, user_id: str, batch: int = 1000
                       ) -> AsyncIterator[dict[str, Any]]:
    before: int | None = None
    while True:
        rows = await pool.fetch(
            f"SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE user_id = $1"
            " AND ($2::bigint IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
            user_id, before, batch)
        for row in rows:
            yield dict(row)
        if len(rows) < batch:
            return
        before = rows[-1]["id"]


async def alerts(pool: asyncpg.Pool, user_id: str, limit: int = 50) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT id, cycle_start, cycle_end, threshold, used_pct, used, budget, remaining, state,"
        " attempts, last_error, created_at, sent_at FROM alert_outbox WHERE user_id = $1"
        " ORDER BY cycle_start DESC, threshold DESC LIMIT $2", user_id, limit)
    return [dict(r) for r in rows]


# ---------------------------------------------------------------- audit log


@dataclass(frozen=True)
class AuditFilter:
    actor: str = ""
    action: str = ""
    target: str = ""
    since: date | None = None
    until: date | None = None  # inclusive day
    before_id: int | None = None
    limit: int = 50


async def audit_page(pool: asyncpg.Pool, f: AuditFilter) -> tuple[list[dict[str, Any]], int | None]:
    """Newest first; returns the rows and the before_id of the next (older) page."""
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    where = []
    if f.actor:
        where.append(f"actor = {arg(f.actor)}")
    if f.action:
        where.append(f"action = {arg(f.action)}")
    if f.target:
        where.append(f"target = {arg(f.target)}")
    if f.since:
        where.append(f"created_at >= ({arg(f.since)}::date)::timestamp AT TIME ZONE 'UTC'")
    if f.until:
        where.append(f"created_at < ({arg(f.until + timedelta(days=1))}::date)::timestamp AT TIME ZONE 'UTC'")
    if f.before_id is not None:
        where.append(f"id < {arg(f.before_id)}")
    rows = list(await pool.fetch(
        "SELECT id, actor, action, target, before, after, reason, reason_code, reason_params, source_ip,"
        " created_at"
        f" FROM audit_log{' WHERE ' + ' AND '.join(where) if where else ''}"
        f" ORDER BY id DESC LIMIT {arg(f.limit + 1)}", *args))
    more = len(rows) > f.limit
    out = []
    for r in rows[: f.limit]:
        item = dict(r)
        item["before"] = json.loads(r["before"]) if r["before"] else None
        item["after"] = json.loads(r["after"]) if r["after"] else None
        out.append(item)
    return out, (out[-1]["id"] if out and more else None)


async def audit_actions(pool: asyncpg.Pool) -> list[str]:
    """Distinct actions, for the filter's choices (a loose index scan over audit_log_action)."""
    rows = await pool.fetch(
        "WITH RECURSIVE t AS ("
        " (SELECT action FROM audit_log ORDER BY action LIMIT 1)"
        " UNION ALL SELECT (SELECT action FROM audit_log WHERE action > t.action ORDER BY action LIMIT 1)"
        " FROM t WHERE t.action IS NOT NULL)"
        " SELECT action FROM t WHERE action IS NOT NULL")
    return [r["action"] for r in rows]


# ---------------------------------------------------------------- web sessions


SESSION_COLUMNS = "sid_sha256 AS id, kind, subject, created_at, last_used_at, expires_at, source_ip, user_agent"
MAX_SESSIONS = 500  # a page lists live sessions only; more than this means something is wrong


async def live_sessions(pool: asyncpg.Pool, kind: str, subject: str | None, now: datetime,
                        limit: int = MAX_SESSIONS) -> list[dict[str, Any]]:
    """Sessions of ``kind`` (of one ``subject`` when given) neither revoked nor expired, by
    subject then most recent use (served by the web_sessions_subject index)."""
    rows = await pool.fetch(
        f"SELECT {SESSION_COLUMNS} FROM web_sessions WHERE kind = $1 AND ($2::text IS NULL OR subject = $2)"
        " AND revoked_at IS NULL AND expires_at > $3 ORDER BY subject, last_used_at DESC LIMIT $4",
        kind, subject, now, limit)
    return [dict(r) for r in rows]
