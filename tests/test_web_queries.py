"""The admin list's usage % in SQL (web.queries.USED_PCT) against the one definition,
accounting.usage_pct: equal, except by 0.01 where the exact value is a tie at the third
decimal (SQL rounds the exact decimal half away from zero, Python the binary float)."""

from __future__ import annotations

import random
from decimal import Decimal

import asyncpg

from extproc import accounting
from extproc.web import queries as q


def pairs() -> list[tuple[int, int]]:
    """(used, budget): small budgets densely (every tie class), then large ones at random."""
    out = [(used, budget) for budget in range(1, 401) for used in range(0, 2 * budget + 2, max(1, budget // 60))]
    out += [(5, 0), (0, 0), (7, -3), (1, 800), (79_995, 100_000), (2 * 10**9, 10**9)]
    rng = random.Random(20261125)
    for _ in range(20_000):
        budget = rng.randint(1, 10**10)
        out.append((rng.randint(0, 2 * budget), budget))
    return out


def exact_tie(used: int, budget: int) -> bool:
    """Whether 100 x used / budget is exactly some xx.xx5."""
    return budget > 0 and (100_000 * used) % budget == 0 and (100_000 * used // budget) % 10 == 5


async def test_sql_usage_pct_agrees_with_accounting(database_url: str) -> None:
    data = pairs()
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            f"SELECT {q.USED_PCT} AS pct FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) WITH ORDINALITY"
            " AS a(used_cycle, cycle_budget, personal_cap, n) ORDER BY n",
            [u for u, _ in data], [b for _, b in data], [None] * len(data))
    finally:
        await conn.close()
    assert len(rows) == len(data)
    differ = []
    for (used, budget), row in zip(data, rows, strict=True):
        in_sql, in_python = row["pct"], accounting.usage_pct(used, budget)
        assert isinstance(in_sql, Decimal)
        if in_sql != Decimal(str(in_python)):
            assert exact_tie(used, budget), (used, budget, in_sql, in_python)
            assert abs(in_sql - Decimal(str(in_python))) == Decimal("0.01"), (used, budget, in_sql, in_python)
            differ.append((used, budget))
    # The documented difference is real (0.125 is exact in binary: Python rounds half to even).
    assert (1, 800) in differ


async def test_sql_usage_pct_counts_against_the_personal_cap(database_url: str) -> None:
    """A personal cap below the budget is the denominator (accounting.effective_limit); one
    above it changes nothing; a cap of 0 reads 100 %."""
    data = [(800, 10_000, 1_000), (800, 1_000, 10_000), (5, 1_000, 0), (250, 1_000, None), (1, 3, 2)]
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            f"SELECT {q.USED_PCT} AS pct FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) WITH ORDINALITY"
            " AS a(used_cycle, cycle_budget, personal_cap, n) ORDER BY n",
            [u for u, _, _ in data], [b for _, b, _ in data], [c for _, _, c in data])
    finally:
        await conn.close()
    assert [float(r["pct"]) for r in rows] == [80.0, 80.0, 100.0, 25.0, 50.0]
    assert [accounting.usage_pct(u, accounting.effective_limit(b, c)) for u, b, c in data] == [
        80.0, 80.0, 100.0, 25.0, 50.0]


def test_like_patterns_take_wildcards_literally():
    assert q.like_prefix("a_b%") == "a\\_b\\%%"
    assert q.like_substring("50%_off\\") == "%50\\%\\_off\\\\%"
    assert q.like_substring("") == "%%"
