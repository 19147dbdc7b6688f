"""The admin user search: by substring on pg_trgm's trigram indexes
(migrations/20261129000004_search.sql), by prefix where the extension is missing; keyset
paging works with both, and at 100 000 accounts the plan uses the indexes."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from extproc.web import queries as q

ACCOUNTS = 100_000
MIGRATION = Path(q.__file__).resolve().parents[1] / "migrations" / "20261129000004_search.sql"


@pytest.fixture(scope="module")
async def big(make_database) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Pool]]:
    """A database of its own with 100 000 accounts (one generate_series statement) and a few
    whose names the tests search for."""
    url = make_database()
    conn = await asyncpg.connect(url)
    await conn.execute(
        "INSERT INTO accounts (user_id, email, name, cycle_anchor_day, cycle_start, cycle_end, cycle_budget)"
        " SELECT 'u' || lpad(i::text, 6, '0'), 'user' || i || '@example.com', 'Name ' || i, 1,"
        " now() - interval '10 days', now() + interval '20 days', 100000"
        " FROM generate_series(1, $1::int) i", ACCOUNTS)
    await conn.executemany(
        "INSERT INTO accounts (user_id, email, name, cycle_anchor_day, cycle_start, cycle_end)"
        " VALUES ($1, $2, $3, 1, now(), now() + interval '30 days')",
        [("lib-7f3a", "maria.silva@solaris.example", "Maria da Silva"),
         ("lib-8e21", "joao@solaris.example", "João SILVA Souza"),
         ("lib-9c04", "ana@solaris.example", "Ana Carvalho"),
         ("lib-100%", "percent@solaris.example", "Cem por cento"),
         ("lib_under", "under@solaris.example", "Sub_linha"),
         ("LIB-upper", None, None)])
    await conn.execute("ANALYZE accounts")
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    yield conn, pool
    await pool.close()
    await conn.close()


async def plan_of(conn: asyncpg.Connection, f: q.UserFilter) -> str:
    sql, args, _ = q.user_query(f)
    plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
    return json.dumps(json.loads(plan) if isinstance(plan, str) else plan)


async def ids(pool: asyncpg.Pool, term: str, mode: str = "") -> list[str]:
    page = await q.list_users(pool, q.UserFilter(q=term, limit=q.MAX_PAGE, mode=mode))
    return [a.user_id for a in page.accounts]


async def test_the_migration_made_the_trigram_indexes_and_search_finds_substrings(big):
    conn, pool = big
    assert await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'pg_trgm'") == 1
    assert await q.search_mode(pool) == "substring"
    assert await ids(pool, "silva") == ["lib-7f3a", "lib-8e21"]  # e-mail, and name in any case
    assert await ids(pool, "DA SIL") == ["lib-7f3a"]
    assert await ids(pool, "7f3") == ["lib-7f3a"]  # the middle of a user id
    assert await ids(pool, "upper") == ["LIB-upper"]  # no e-mail, no name: the id alone
    # LIKE's wildcards in a term are literal characters
    assert await ids(pool, "100%") == ["lib-100%"]
    assert await ids(pool, "b_u") == ["lib_under"]
    assert await ids(pool, "_linha") == ["lib_under"]
    assert await ids(pool, "b%u") == []
    assert await ids(pool, "\\") == []


async def test_substring_search_at_100k_accounts_uses_the_trigram_indexes(big):
    conn, pool = big
    plan = await plan_of(conn, q.UserFilter(q="ser4242@", mode="substring"))
    for index in q.TRGM_INDEXES:
        assert f'"Index Name": "{index}"' in plan, plan
    assert '"Node Type": "Bitmap Index Scan"' in plan and '"Seq Scan"' not in plan, plan
    found = await ids(pool, "ser4242@")
    assert found == ["u004242"]
    found = await ids(pool, "ame 4242")  # "Name 4242", "Name 42420"...: eleven names
    assert found[:2] == ["u004242", "u042420"] and len(found) == 11


async def test_keyset_paging_of_a_substring_search(big):
    _, pool = big
    want = await ids(pool, "ser777")  # user777@, user1777@... user99777@: 111 accounts
    assert len(want) == 111
    for sort, desc in (("user", False), ("email", True), ("name", False), ("created", True)):
        seen, cursor = [], ""
        while True:
            page = await q.list_users(pool, q.UserFilter(q="ser777", limit=7, sort=sort, desc=desc, after=cursor))
            seen += [a.user_id for a in page.accounts]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert sorted(seen) == sorted(want) and len(seen) == len(set(seen)), sort
        back = await q.list_users(pool, q.UserFilter(q="ser777", limit=7, sort=sort, desc=desc,
                                                     before=page.prev_cursor or ""))
        assert [a.user_id for a in back.accounts] == seen[-len(page.accounts) - 7:-len(page.accounts)]
    assert (await q.list_users(pool, q.UserFilter(q="ser777"))).total == 111


async def test_the_prefix_fallback(big, make_database):
    conn, pool = big
    # forced: the documented fallback's meaning (prefixes only) and its btree indexes
    assert await ids(pool, "silva", mode="prefix") == []
    assert await ids(pool, "maria", mode="prefix") == ["lib-7f3a"]
    assert await ids(pool, "lib-", mode="prefix") == ["lib-100%", "lib-7f3a", "lib-8e21", "lib-9c04"]
    plan = await plan_of(conn, q.UserFilter(q="user4242", mode="prefix"))
    assert "accounts_email_c" in plan and '"Seq Scan"' not in plan, plan
    paged = await q.list_users(pool, q.UserFilter(q="user77", mode="prefix", limit=5))
    rest = await q.list_users(pool, q.UserFilter(q="user77", mode="prefix", limit=5, after=paged.next_cursor or ""))
    assert len(paged.accounts) == len(rest.accounts) == 5
    assert not {a.user_id for a in paged.accounts} & {a.user_id for a in rest.accounts}

    # detected: a database without the trigram indexes searches by prefix
    url = make_database()
    bare = await asyncpg.connect(url)
    try:
        for index in q.TRGM_INDEXES:
            await bare.execute(f"DROP INDEX {index}")
        await bare.execute(
            "INSERT INTO accounts (user_id, email, cycle_anchor_day, cycle_start, cycle_end)"
            " VALUES ('x1', 'maria.silva@example.com', 1, now(), now() + interval '30 days')")
    finally:
        await bare.close()
    other = await asyncpg.create_pool(url, min_size=1, max_size=1)
    try:
        assert await q.search_mode(other) == "prefix"
        assert await ids(other, "silva") == [] and await ids(other, "maria") == ["x1"]
    finally:
        await other.close()


def test_a_search_mode_is_one_of_two():
    assert q.UserFilter(mode="fuzzy").validate() == {"mode": "invalid_choice"}
    assert q.UserFilter(mode="prefix").validate() == {}


async def test_the_migration_goes_on_when_the_role_may_not_create_the_extension(make_database):
    """A role without CREATE on the database: pg_trgm is not created, the migration still
    succeeds (with a notice), no trigram index is made, and search is by prefix."""
    url = make_database(migrate=False)
    up = MIGRATION.read_text().split("-- migrate:up")[1].split("-- migrate:down")[0]
    role = f"solaris_nocreate_{uuid.uuid4().hex[:8]}"
    owner = await asyncpg.connect(url)
    try:
        assert await owner.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'pg_trgm'") == 0
        await owner.execute("CREATE TABLE accounts (user_id text PRIMARY KEY, email text, name text)")
        await owner.execute(f'CREATE ROLE "{role}" LOGIN')
        await owner.execute(f'GRANT ALL ON accounts TO "{role}"')
        limited = await asyncpg.connect(url, user=role)
        notices: list[str] = []
        limited.add_log_listener(lambda _conn, message: notices.append(message.message))
        try:
            await limited.execute(up)
        finally:
            await limited.close()
        assert any("stays by prefix" in n for n in notices), notices
        assert await owner.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'pg_trgm'") == 0
        assert await owner.fetchval("SELECT count(*) FROM pg_indexes WHERE indexname LIKE '%trgm'") == 0
        # The same body run by a role that may: extension and indexes.
        await owner.execute(up)
        assert await owner.fetchval("SELECT count(*) FROM pg_indexes WHERE indexname = ANY($1::text[])",
                                    list(q.TRGM_INDEXES)) == 3
    finally:
        await owner.execute(f'DROP OWNED BY "{role}"; DROP ROLE IF EXISTS "{role}"')
        await owner.close()
