"""Where the tokens went: a user's usage by day and model, for /me, the admin's user page and
their APIs — the query, the chart's geometry and the CSV.

What is counted is what the ledger debited: the user's ``usage`` entries, so the numbers add up
to the statement (a true-up entry corrects its exchange's debit without being a request of its
own). Days are UTC days, the time zone of the ledger's cycles (``accounting``), so a cycle is a
whole number of days here.

For admins (``include_estimates``) each row also carries what admission reserved (``estimate``,
once per request) and the tokens the upstream reported (``real_tokens``, before model weights);
for an exchange the sweep charged and a late settle trued up, the true-up's report counts, not
the sweep's reservation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .. import accounting
from .kit import Invalid, download_name, parse_int, stream_csv

if TYPE_CHECKING:
    import asyncpg

    from ..ledger import Account

__all__ = [
    "DEFAULT_DAYS", "MAX_DAYS", "CycleUsage", "UsageRow", "chart", "cycles", "last_days", "parse_days",
    "usage_csv", "usage_rows",
]

DEFAULT_DAYS = 31  # GET .../usage without ?days=
MAX_DAYS = 400  # a little over a year: enough to compare a cycle with the same month last year
MAX_MODELS_CHARTED = 6  # the chart's patterns; further models share the last one, "other"

_USAGE_SQL = (
    "SELECT (e.created_at AT TIME ZONE 'UTC')::date AS day, COALESCE(e.model, '') AS model,"
    " count(*) FILTER (WHERE e.exchange_id IS NOT NULL) AS requests,"
    " COALESCE(sum(-e.tokens), 0)::bigint AS tokens,"
    " COALESCE(sum(e.estimate) FILTER (WHERE e.exchange_id IS NOT NULL), 0)::bigint AS estimate,"
    " COALESCE(sum(e.real_tokens) FILTER (WHERE NOT ('expired' = ANY (e.flags) AND EXISTS ("
    "   SELECT 1 FROM ledger_entries t WHERE t.idempotency_key = 'trueup:' || e.exchange_id))),"
    "   0)::bigint AS real_tokens"
    " FROM ledger_entries e"
    " WHERE e.user_id = $1 AND e.kind = 'usage' AND e.created_at >= $2 AND e.created_at < $3"
    " GROUP BY 1, 2 ORDER BY 1, 2"
)


@dataclass(frozen=True)
class UsageRow:
    """One (UTC day, model): requests, tokens debited; for admins, estimate and real tokens."""

    day: date
    model: str  # "" when the ledger has none (an exchange that failed before naming one)
    requests: int
    tokens: int
    estimate: int = 0
    real_tokens: int = 0

    def as_json(self, *, include_estimates: bool = False) -> dict[str, Any]:
        row: dict[str, Any] = {"day": self.day.isoformat(), "model": self.model, "requests": self.requests,
                               "tokens": self.tokens}
        if include_estimates:
            row.update(estimate=self.estimate, real_tokens=self.real_tokens)
        return row


async def usage_rows(pool: asyncpg.Pool, user_id: str, start: datetime, end: datetime) -> list[UsageRow]:
    """The user's usage per (UTC day, model) in [start, end), oldest day first."""
    rows = await pool.fetch(_USAGE_SQL, user_id, start, end)
    return [UsageRow(r["day"], r["model"], r["requests"], r["tokens"], r["estimate"], r["real_tokens"])
            for r in rows]


def parse_days(raw: str | None) -> int:
    """``?days=``: 1..MAX_DAYS, DEFAULT_DAYS when absent; Invalid({"days": ...}) otherwise."""
    days = parse_int(raw, "days", low=1, high=MAX_DAYS)
    return DEFAULT_DAYS if days is None else days


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


async def last_days(pool: asyncpg.Pool, user_id: str, days: int, now: datetime) -> list[UsageRow]:
    """The last ``days`` UTC days, today included (the API's ``?days=N``)."""
    if not 1 <= days <= MAX_DAYS:
        raise Invalid({"days": "out_of_range"})
    today = now.astimezone(UTC).date()
    return await usage_rows(pool, user_id, _midnight(today - timedelta(days=days - 1)),
                            _midnight(today + timedelta(days=1)))


# ---------------------------------------------------------------- the two cycles of the pages


@dataclass(frozen=True)
class CycleUsage:
    """One cycle's usage for the pages: its rows, totals per model and the chart."""

    key: str  # "current" or "previous": ids in the page and the CSV's "cycle" column
    start: datetime
    end: datetime
    rows: list[UsageRow]
    models: list[dict[str, Any]]  # per model, most tokens first: model, requests, tokens, estimate, real, pattern
    requests: int
    tokens: int
    chart: dict[str, Any]

    @property
    def last_day(self) -> date:
        return (self.end - timedelta(days=1)).date()


async def cycles(pool: asyncpg.Pool, account: Account, now: datetime) -> list[CycleUsage]:
    """The account's current cycle and the one before it, newest first; ``now`` marks today
    on the current cycle's chart."""
    # The anchor, not the start's day: a cycle anchored on the 31st starts on the 30th in April.
    anchor_day = await pool.fetchval("SELECT cycle_anchor_day FROM accounts WHERE user_id = $1",
                                     account.user_id) or account.cycle_start.day
    start, end = account.cycle_start, account.cycle_end
    previous = accounting.add_months(start, -1, anchor_day)
    rows = await usage_rows(pool, account.user_id, previous, end)
    today = now.astimezone(UTC).date()
    return [_cycle(key, a, b, [r for r in rows if a.date() <= r.day < b.date()], today)
            for key, (a, b) in (("current", (start, end)), ("previous", (previous, start)))]


def _cycle(key: str, start: datetime, end: datetime, rows: list[UsageRow], today: date) -> CycleUsage:
    totals: dict[str, dict[str, Any]] = {}
    for r in rows:
        t = totals.setdefault(r.model, {"model": r.model, "requests": 0, "tokens": 0, "estimate": 0, "real": 0})
        t["requests"] += r.requests
        t["tokens"] += r.tokens
        t["estimate"] += r.estimate
        t["real"] += r.real_tokens
    models = sorted(totals.values(), key=lambda t: (-t["tokens"], t["model"]))
    for i, t in enumerate(models):
        t["pattern"] = min(i, MAX_MODELS_CHARTED - 1)
    # Every day of the cycle, the days still to come included: the chart reads as the cycle's
    # calendar, and a cycle's first days do not stretch across the whole width.
    days = [start.date() + timedelta(days=i) for i in range((end.date() - start.date()).days)]
    return CycleUsage(key, start, end, rows, models, sum(t["requests"] for t in models),
                      sum(t["tokens"] for t in models), chart(days, rows, models, today))


def chart(days: Sequence[date], rows: Sequence[UsageRow], models: Sequence[dict[str, Any]],
          today: date | None = None, width: int = 720, height: int = 220) -> dict[str, Any]:
    """Stacked columns, one per day, one segment per model (each model its own pattern, so the
    chart never relies on colour alone; the template adds the legend and the table behind it).
    Only positive debits are drawn (a true-up that gave tokens back shows in the table).
    ``today``, when among ``days``, is labelled as such on the axis."""
    left, right, top, bottom = 8, 8, 12, 26
    inner_w, inner_h = width - left - right, height - top - bottom
    pattern = {t["model"]: t["pattern"] for t in models}
    per_day: dict[date, list[UsageRow]] = {}
    for r in rows:
        per_day.setdefault(r.day, []).append(r)
    heights = {d: sum(max(r.tokens, 0) for r in per_day.get(d, [])) for d in days}
    peak = max(heights.values(), default=0)
    step = inner_w / max(len(days), 1)
    label_every = max(1, round(len(days) / 8))
    # Today's column is labelled "today" on the axis; dates too close to it give way.
    today_i = next((i for i, d in enumerate(days) if d == today), None)
    columns = []
    for i, d in enumerate(days):
        x = left + i * step + step * 0.15
        y = top + inner_h
        segments = []
        for r in sorted(per_day.get(d, []), key=lambda r: pattern[r.model]):
            if r.tokens <= 0 or peak == 0:
                continue
            h = max(inner_h * r.tokens / peak, 0.5)
            y -= h
            segments.append({"model": r.model, "tokens": r.tokens, "requests": r.requests,
                             "pattern": pattern[r.model], "y": round(y, 2), "h": round(h, 2)})
        near_today = today_i is not None and abs(i - today_i) <= label_every // 2 + 1
        columns.append({"day": d, "x": round(x, 2), "w": round(step * 0.7, 2), "tokens": heights[d],
                        "segments": segments, "today": i == today_i,
                        "label": i == today_i or (i % label_every == 0 and not near_today)})
    return {"width": width, "height": height, "baseline": top + inner_h, "peak": peak, "columns": columns}


# ---------------------------------------------------------------- CSV


CSV_HEADER = ["cycle", "day", "model", "requests", "tokens"]


async def usage_csv(request: web.Request, user_id: str, periods: Sequence[CycleUsage], *,
                    include_estimates: bool) -> web.StreamResponse:
    """The rows behind the charts as CSV, one line per (cycle, day, model), oldest first."""

    async def lines() -> AsyncIterator[list[Any]]:
        for period in reversed(periods):
            for r in period.rows:
                line = [period.key, r.day.isoformat(), r.model, r.requests, r.tokens]
                yield [*line, r.estimate, r.real_tokens] if include_estimates else line

    header = [*CSV_HEADER, "estimate", "real_tokens"] if include_estimates else CSV_HEADER
    return await stream_csv(request, download_name("usage", user_id, "csv"), header, lines())
