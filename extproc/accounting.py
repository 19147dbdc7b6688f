"""Accounting rules as pure functions: no I/O, no clock, no settings object.

The ledger module calls these inside its transactions; tests call them directly.
Every number of money here is an ``int`` of tokens.
"""

from __future__ import annotations

import calendar
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

STATES = ("active", "warned_80", "warned_90", "blocked", "suspended")


# ---------------------------------------------------------------- exchanges without usage
# (the estimate itself is computed in ``estimate``: one rule per billable input)


TIMEOUT_STATUSES = frozenset({408, 504})


@dataclass(frozen=True)
class Charge:
    """The debit of an exchange whose real usage is unknown, and why (ledger flags)."""

    prompt_tokens: int
    completion_tokens: int
    flags: tuple[str, ...]


def unreported_charge(*, status: int, abandoned: bool, prompt_estimate: int,
                      estimate: int, counted_output: int) -> Charge | None:
    """What an exchange costs when the upstream's usage could not be read; None = release.

    * An upstream error reply (non-2xx) with no visible output is released: providers do not
      bill a refused request. One with output is charged the prompt estimate plus that output.
      A timeout (408, 504) is not a refusal: charged like an abandoned exchange.
    * Anything else happened after the upstream was called and may have produced output the
      gate never saw (a 2xx with missing or garbled usage, a stream cut before its usage
      event, a client gone before the answer, reasoning tokens that are never visible): it is
      charged the full reservation, or the output counted when that is larger.
    """
    flags = ("no_usage", "abandoned") if abandoned else ("no_usage",)
    if status in TIMEOUT_STATUSES:
        # The upstream gave up waiting, not the provider refusing: the provider may well have
        # produced (and billed) the answer nobody received.
        flags = (*flags, "timeout")
    elif status and not 200 <= status < 300:
        if counted_output <= 0:
            return None
        return Charge(prompt_estimate, counted_output, (*flags, "counted"))
    reserved_output = max(estimate - prompt_estimate, 0)
    if counted_output > reserved_output:
        return Charge(prompt_estimate, counted_output, (*flags, "counted"))
    return Charge(prompt_estimate, reserved_output, (*flags, "reservation"))


# ---------------------------------------------------------------- usage and states


def effective_limit(budget: int, personal_cap: int | None) -> int:
    """What the user may spend this cycle: the cycle budget, or the user's own monthly cap when
    one is set and lower. Usage %, states and alert thresholds are measured against it, so a
    user who capped themselves at 10 000 tokens is warned at 8 000, not at 80 % of the plan."""
    return budget if personal_cap is None else min(budget, personal_cap)


def usage_pct(used: int, budget: int) -> float:
    """The cycle's usage percentage: the one definition used by headers, alerts and views.

    ``budget`` is the effective limit (``effective_limit``: the cycle budget, i.e. allowance at
    cycle start + credits available in the cycle, or the user's lower personal cap). A cycle
    with nothing to spend reads 100 %.
    """
    if budget <= 0:
        return 100.0
    return round(100.0 * used / budget, 2)


def balance_after(*, available: int, reserved: int, used: int, budget: int, cost: int) -> tuple[int, float]:
    """(tokens remaining, usage %) after an exchange that held ``reserved`` cost ``cost``,
    from the account as its admission left it: informational (the ``x-solaris-*`` headers);
    concurrent exchanges of the same user are not reflected."""
    return max(available + reserved - cost, 0), usage_pct(used + cost, budget)


def spendable(balance: int, used: int, personal_cap: int | None) -> int:
    """Tokens the user can still spend this cycle (an alert's "remaining"): the balance, or
    less when the personal cap leaves less room."""
    if personal_cap is None:
        return balance
    return max(min(balance, personal_cap - used), 0)


def state_for(current: str, balance: int, pct: float) -> str:
    """The account state a balance and usage % imply; ``suspended`` is sticky (admin only)."""
    if current == "suspended":
        return "suspended"
    if balance <= 0:
        return "blocked"
    if pct >= 90:
        return "warned_90"
    if pct >= 80:
        return "warned_80"
    return "active"


def crossings(before_pct: float, after_pct: float, thresholds: Iterable[int]) -> list[int]:
    """Thresholds t crossed by a change of usage: before < t <= after."""
    return [t for t in thresholds if before_pct < t <= after_pct]


def weighted_cost(real_tokens: int, model: str | None, weights: Mapping[str, float]) -> int:
    """Tokens debited for real usage: the model's weight (matched exactly; ``*`` is the weight
    of every model not listed, default 1), rounded up."""
    weight = weights.get(model or "", weights.get("*", 1.0))
    return real_tokens if weight == 1.0 else math.ceil(real_tokens * weight)


@dataclass(frozen=True)
class Split:
    """How a change of balance splits between the monthly allowance and credits."""

    allowance_delta: int
    credits_delta: int

    @property
    def tokens(self) -> int:
        return self.allowance_delta + self.credits_delta


def split_debit(allowance: int, cost: int) -> Split:
    """Allowance is spent before credits; what the allowance cannot cover comes from credits
    (which may go negative: the bounded overspend B1 of the ledger)."""
    from_allowance = min(max(allowance, 0), max(cost, 0))
    return Split(-from_allowance, -(max(cost, 0) - from_allowance))


def split_trueup(allowance: int, delta: int, *, swept_from_credits: int, same_cycle: bool) -> Split:
    """The correction of a sweep's charge by ``delta`` (real cost - swept charge).

    More cost is a debit like any other. Less cost gives back the difference where the sweep
    took it from, in reverse: credits first (up to what the sweep took from credits), then
    the allowance; when the cycle has rolled since the sweep, the allowance the sweep took
    belonged to a cycle that is over, so its share comes back as credits rather than swelling
    the new cycle's allowance. Either way the exchange's final debit is its real cost (I5).
    """
    if delta >= 0:
        return split_debit(allowance, delta)
    back = -delta
    to_credits = min(back, max(swept_from_credits, 0))
    rest = back - to_credits
    if same_cycle:
        return Split(rest, to_credits)
    return Split(0, to_credits + rest)


@dataclass(frozen=True)
class Debited:
    """An account's columns after one settle's split, and what that settle crossed."""

    allowance: int
    credits: int
    used: int
    state: str
    used_pct: float
    crossed: tuple[int, ...]
    limit: int  # the effective limit the usage % was measured against

    @property
    def balance(self) -> int:
        return self.allowance + self.credits


def apply_split(*, allowance: int, credits: int, used: int, budget: int, state: str, split: Split,
                thresholds: Iterable[int], this_cycle: bool = True,
                personal_cap: int | None = None) -> Debited:
    """The account after ``split``: this cycle's usage moves by what the balance moved (not
    when ``this_cycle`` is False: a give-back for a sweep of an ended cycle), then the state
    and the alert thresholds crossed follow from the new usage %, measured against the
    effective limit (``budget``, or ``personal_cap`` when lower)."""
    limit = effective_limit(budget, personal_cap)
    new_used = max(used - split.tokens, 0) if this_cycle else used
    before, after = usage_pct(used, limit), usage_pct(new_used, limit)
    new_allowance, new_credits = allowance + split.allowance_delta, credits + split.credits_delta
    return Debited(new_allowance, new_credits, new_used,
                   state_for(state, new_allowance + new_credits, after), after,
                   tuple(crossings(before, after, thresholds)), limit)


# ---------------------------------------------------------------- cycles


def _clamped(year: int, month: int, day: int) -> datetime:
    last = calendar.monthrange(year, month)[1]
    return datetime(year, month, min(day, last), tzinfo=UTC)


def add_months(start: datetime, months: int, anchor_day: int) -> datetime:
    """The anchored date ``months`` after ``start``: a 31st anchor lands on the month's last day."""
    index = start.year * 12 + (start.month - 1) + months
    return _clamped(index // 12, index % 12 + 1, anchor_day)


def first_cycle(now: datetime) -> tuple[int, datetime, datetime]:
    """(anchor day, start, end) of a new account's first cycle: anchored at its creation day."""
    start = datetime(now.year, now.month, now.day, tzinfo=UTC)
    return now.day, start, add_months(start, 1, now.day)


def current_cycle(anchor_day: int, cycle_start: datetime, now: datetime) -> tuple[datetime, datetime]:
    """The cycle containing ``now`` for an account whose last known cycle began at
    ``cycle_start``; idle accounts skip whole months at once."""
    start = cycle_start
    while True:
        end = add_months(start, 1, anchor_day)
        if now < end:
            return start, end
        start = end


@dataclass(frozen=True)
class CycleReset:
    start: datetime
    end: datetime
    allowance: int
    budget: int
    split: Split


def roll_cycle(
    *,
    anchor_day: int,
    cycle_start: datetime,
    cycle_end: datetime,
    allowance: int,
    credits: int,
    plan_tokens: int,
    rollover: bool,
    now: datetime,
) -> CycleReset | None:
    """The reset due at ``now``, or None if the cycle has not ended.

    New allowance = the plan's monthly tokens (+ the unused allowance when the plan rolls
    over). Credits survive resets untouched. The budget restarts at allowance + positive credits.
    """
    if now < cycle_end:
        return None
    start, end = current_cycle(anchor_day, cycle_start, now)
    new_allowance = plan_tokens + (allowance if rollover else 0)
    return CycleReset(
        start=start,
        end=end,
        allowance=new_allowance,
        budget=new_allowance + max(credits, 0),
        split=Split(new_allowance - allowance, 0),
    )


def reservation_expiry(now: datetime, ttl_seconds: int) -> datetime:
    return now + timedelta(seconds=ttl_seconds)
