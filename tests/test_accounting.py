"""The accounting rules, called as plain functions (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc import accounting as acc


def d(y: int, m: int, day: int, h: int = 0) -> datetime:
    return datetime(y, m, day, h, tzinfo=UTC)


@pytest.mark.parametrize("status,abandoned,counted,expected", [
    (500, False, 0, None),                                   # upstream error, no output: release
    (429, True, 0, None),                                    # refused upstream, client gone: release
    (502, False, 40, (10, 40, ("no_usage", "counted"))),     # error with output: what was seen
    (200, False, 0, (10, 90, ("no_usage", "reservation"))),  # 2xx, usage unreadable: the hold
    (200, False, 5, (10, 90, ("no_usage", "reservation"))),  # visible text below the hold
    (200, False, 500, (10, 500, ("no_usage", "counted"))),   # more seen than held: all of it
    (0, True, 0, (10, 90, ("no_usage", "abandoned", "reservation"))),  # gone before any answer
    (200, True, 3, (10, 90, ("no_usage", "abandoned", "reservation"))),  # gone mid-stream
])
def test_unreported_charge(status, abandoned, counted, expected) -> None:
    charge = acc.unreported_charge(status=status, abandoned=abandoned, prompt_estimate=10,
                                   estimate=100, counted_output=counted)
    if expected is None:
        assert charge is None
    else:
        assert (charge.prompt_tokens, charge.completion_tokens, charge.flags) == expected


def test_split_trueup_reverses_where_the_sweep_took_from() -> None:
    same = {"swept_from_credits": 0, "same_cycle": True}
    assert acc.split_trueup(50, 80, **same) == acc.Split(-50, -30)  # a larger cost: a debit
    assert acc.split_trueup(0, -70, **same) == acc.Split(70, 0)     # taken from allowance
    # the sweep took 40 from credits: those come back first, the rest to the allowance
    assert acc.split_trueup(0, -70, swept_from_credits=40, same_cycle=True) == acc.Split(30, 40)
    # the cycle rolled since: nothing swells the new cycle's allowance
    assert acc.split_trueup(900, -70, swept_from_credits=0, same_cycle=False) == acc.Split(0, 70)
    assert acc.split_trueup(10, 0, **same).tokens == 0


def test_timeouts_are_charged_like_abandoned_exchanges() -> None:
    for status in (408, 504):
        charge = acc.unreported_charge(status=status, abandoned=False, prompt_estimate=10,
                                       estimate=100, counted_output=0)
        assert charge is not None and charge.flags == ("no_usage", "timeout", "reservation")
        assert (charge.prompt_tokens, charge.completion_tokens) == (10, 90)


def test_usage_pct_is_against_cycle_budget() -> None:
    assert acc.usage_pct(800, 1000) == 80.0
    assert acc.usage_pct(1, 3) == 33.33
    assert acc.usage_pct(0, 0) == 100.0  # nothing to spend reads as fully used
    assert acc.usage_pct(1500, 1000) == 150.0


def test_effective_limit_is_the_lower_of_budget_and_personal_cap() -> None:
    assert acc.effective_limit(10_000, None) == 10_000
    assert acc.effective_limit(10_000, 4_000) == 4_000
    assert acc.effective_limit(3_000, 4_000) == 3_000
    assert acc.effective_limit(10_000, 0) == 0
    assert acc.usage_pct(800, acc.effective_limit(10_000, 1_000)) == 80.0


def test_spendable_is_the_room_left_under_the_cap() -> None:
    assert acc.spendable(5_000, 800, None) == 5_000
    assert acc.spendable(5_000, 800, 1_000) == 200
    assert acc.spendable(100, 800, 1_000) == 100
    assert acc.spendable(5_000, 1_200, 1_000) == 0


def test_apply_split_measures_thresholds_against_the_personal_cap() -> None:
    """Budget 10 000, cap 1 000: 700 -> 850 used crosses 80 % of the cap (8.5 % of the budget)."""
    new = acc.apply_split(allowance=9_300, credits=0, used=700, budget=10_000, state="active",
                          split=acc.split_debit(9_300, 150), thresholds=(80, 90, 100), personal_cap=1_000)
    assert (new.used, new.used_pct, new.crossed, new.limit, new.state) == (850, 85.0, (80,), 1_000, "warned_80")
    uncapped = acc.apply_split(allowance=9_300, credits=0, used=700, budget=10_000, state="active",
                               split=acc.split_debit(9_300, 150), thresholds=(80, 90, 100))
    assert (uncapped.used_pct, uncapped.crossed, uncapped.limit, uncapped.state) == (8.5, (), 10_000, "active")


@pytest.mark.parametrize("current,balance,pct,expected", [
    ("active", 100, 10.0, "active"), ("active", 100, 80.0, "warned_80"),
    ("warned_80", 100, 90.0, "warned_90"), ("warned_90", 0, 100.0, "blocked"),
    ("blocked", 500, 50.0, "active"), ("suspended", 500, 10.0, "suspended"),
    ("active", -5, 100.0, "blocked"),
])
def test_state_for(current: str, balance: int, pct: float, expected: str) -> None:
    assert acc.state_for(current, balance, pct) == expected


def test_crossings_are_half_open() -> None:
    assert acc.crossings(79.99, 80.0, (80, 90, 100)) == [80]
    assert acc.crossings(80.0, 85.0, (80, 90, 100)) == []
    assert acc.crossings(10.0, 100.0, (80, 90, 100)) == [80, 90, 100]
    assert acc.crossings(95.0, 90.0, (80, 90, 100)) == []


def test_split_spends_allowance_before_credits() -> None:
    assert acc.split_debit(100, 30) == acc.Split(-30, 0)
    assert acc.split_debit(100, 130) == acc.Split(-100, -30)
    assert acc.split_debit(0, 50) == acc.Split(0, -50)
    assert acc.split_debit(100, 0).tokens == 0


def test_weighted_cost() -> None:
    assert acc.weighted_cost(100, "gpt-4o", {"gpt-4o": 2.5}) == 250
    assert acc.weighted_cost(3, "gpt-4o", {"gpt-4o": 0.5}) == 2
    assert acc.weighted_cost(100, None, {"gpt-4o": 2.5}) == 100


# ---------------------------------------------------------------- cycles


@pytest.mark.parametrize("start,anchor,expected", [
    (d(2026, 1, 31), 31, d(2026, 2, 28)),
    (d(2028, 1, 31), 31, d(2028, 2, 29)),  # leap year
    (d(2026, 2, 28), 31, d(2026, 3, 31)),  # the anchor comes back after a short month
    (d(2026, 12, 15), 15, d(2027, 1, 15)),
    (d(2026, 4, 30), 30, d(2026, 5, 30)),
    (d(2026, 1, 29), 29, d(2026, 2, 28)),
])
def test_add_months_clamps_to_month_end(start: datetime, anchor: int, expected: datetime) -> None:
    assert acc.add_months(start, 1, anchor) == expected


def test_first_cycle_anchors_on_creation_day() -> None:
    anchor, start, end = acc.first_cycle(d(2026, 1, 31, 15))
    assert (anchor, start, end) == (31, d(2026, 1, 31), d(2026, 2, 28))


def test_current_cycle_skips_idle_months() -> None:
    assert acc.current_cycle(31, d(2026, 1, 31), d(2026, 5, 2)) == (d(2026, 4, 30), d(2026, 5, 31))
    assert acc.current_cycle(15, d(2026, 12, 15), d(2027, 1, 15)) == (d(2027, 1, 15), d(2027, 2, 15))


def test_roll_cycle_rules() -> None:
    common = dict(anchor_day=1, cycle_start=d(2026, 1, 1), cycle_end=d(2026, 2, 1),
                  plan_tokens=1000, now=d(2026, 2, 1))
    assert acc.roll_cycle(**{**common, "now": d(2026, 1, 31, 23)}, allowance=5, credits=0,
                          rollover=False) is None
    reset = acc.roll_cycle(**common, allowance=300, credits=50, rollover=False)
    assert reset is not None
    assert (reset.allowance, reset.budget, reset.split) == (1000, 1050, acc.Split(700, 0))
    assert (reset.start, reset.end) == (d(2026, 2, 1), d(2026, 3, 1))
    rolled = acc.roll_cycle(**common, allowance=300, credits=-20, rollover=True)
    assert rolled is not None
    assert (rolled.allowance, rolled.budget, rolled.split.tokens) == (1300, 1300, 1000)


# ---------------------------------------------------------------- properties


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                    timezones=st.just(UTC)),
       st.integers(min_value=0, max_value=40))
def test_cycles_tile_time_without_gaps(created: datetime, months: int) -> None:
    """Cycle ends are strictly increasing, each cycle lasts 28-31 days, and the anchor day
    is kept whenever the month has it."""
    anchor, start, end = acc.first_cycle(created)
    for _ in range(months):
        assert 28 <= (end - start).days <= 31
        assert end.day == anchor or end.day < anchor
        start, end = end, acc.add_months(end, 1, anchor)
        assert end > start


@given(st.lists(st.tuples(st.sampled_from(["debit", "grant", "reset"]),
                          st.integers(min_value=0, max_value=10_000)), max_size=60))
def test_split_and_reset_keep_balance_equal_to_sum_of_deltas(ops: list[tuple[str, int]]) -> None:
    """I2 at the level of the rules: applying the deltas the functions return keeps
    allowance, credits and the sum of entries in step, and the allowance never negative."""
    allowance, credits, entries = 1000, 0, [1000]
    for op, n in ops:
        if op == "debit":
            split = acc.split_debit(allowance, n)
            allowance += split.allowance_delta
            credits += split.credits_delta
            entries.append(split.tokens)
        elif op == "grant":
            credits += n
            entries.append(n)
        else:
            reset = acc.roll_cycle(anchor_day=1, cycle_start=d(2026, 1, 1), cycle_end=d(2026, 2, 1),
                                   allowance=allowance, credits=credits, plan_tokens=1000,
                                   rollover=n % 2 == 0, now=d(2026, 2, 1))
            assert reset is not None
            allowance += reset.split.allowance_delta
            entries.append(reset.split.tokens)
        assert allowance >= 0
        assert allowance + credits == sum(entries)
