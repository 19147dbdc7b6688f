"""Where the tokens went: usage by UTC day and model over two cycles, exact against the ledger
entries written (two models, a sweep trued up by a late settle), through the function the
admin page uses (estimate vs real), /api/me/usage (JWT and the gateway key with LibreChat's
headers), the CSV and the chart on /me."""

from __future__ import annotations

import csv
import io
import re
import uuid
from datetime import UTC, date, datetime, timedelta

import pytest
from support.clock import Clock
from support.web import api, base, me_signed_in

from extproc import accounting
from extproc.app import Service
from extproc.identity import mint_token
from extproc.ledger import Ledger, Usage
from extproc.settings import Settings
from extproc.web import usage

A, B = "gpt-4o-mini", "claude-3-haiku"


def midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


class History:
    """One user's exchanges written at chosen moments by a ledger on a settable clock: the
    account opens 45 days ago, so the previous cycle is whole and today is in the current one."""

    def __init__(self, service: Service, settings: Settings, user: str) -> None:
        self.now = datetime.now(UTC)
        self.opened = (self.now - timedelta(days=45)).replace(hour=9, minute=0, second=0, microsecond=0)
        self.clock = Clock(self.opened)
        assert service.pool is not None
        self.ledger = Ledger(service.pool, settings, self.clock)
        self.user = user

    async def open(self) -> None:
        exchange = f"open-{uuid.uuid4().hex}"
        assert (await self.ledger.admit(self.user, 0, exchange)).outcome == "ok"
        await self.ledger.release(exchange)

    async def spend(self, when: datetime, model: str, prompt: int, completion: int, estimate: int) -> str:
        self.clock.now = when
        exchange = f"ex-{uuid.uuid4().hex}"
        assert (await self.ledger.admit(self.user, estimate, exchange, model=model)).outcome == "ok"
        await self.ledger.settle(Usage(exchange, self.user, model=model, prompt_tokens=prompt,
                                       completion_tokens=completion, estimate=estimate))
        return exchange

    async def swept_then_reported(self, when: datetime, model: str, estimate: int, prompt: int,
                                  completion: int) -> None:
        """An exchange the sweep charged its whole hold (as ``sweep_reservations`` does, for this
        exchange only), whose real usage arrives an hour later: a true-up gives back the rest."""
        self.clock.now = when
        exchange = f"ex-{uuid.uuid4().hex}"
        assert (await self.ledger.admit(self.user, estimate, exchange, model=model)).outcome == "ok"
        await self.ledger.settle(Usage(exchange, self.user, model=model, completion_tokens=estimate,
                                       estimate=estimate, flags=("expired",), cost=estimate),
                                 reservation_state="expired")
        self.clock.now = when + timedelta(hours=1)
        await self.ledger.settle(Usage(exchange, self.user, model=model, prompt_tokens=prompt,
                                       completion_tokens=completion, estimate=estimate))


@pytest.fixture
async def history(service: Service, settings: Settings, user: str) -> History:
    """Previous cycle: day 2 two exchanges of A and one of B, day 10 one of A, day 12 one of B
    swept (400) and trued up to its real 150. Current cycle: day 1 one of B, today one of A."""
    h = History(service, settings, user)
    await h.open()
    d0 = h.opened.date()
    day2 = midnight(d0 + timedelta(days=2))
    await h.spend(day2 + timedelta(hours=10), A, 1_000, 500, 2_000)
    await h.spend(day2 + timedelta(hours=11), A, 200, 300, 600)
    await h.spend(day2 + timedelta(hours=23, minutes=59), B, 700, 300, 1_200)
    await h.spend(midnight(d0 + timedelta(days=10)), A, 100, 100, 300)
    await h.swept_then_reported(midnight(d0 + timedelta(days=12)) + timedelta(hours=8), B, 400, 100, 50)
    h.current_start = accounting.add_months(midnight(d0), 1, d0.day)
    await h.spend(h.current_start + timedelta(days=1, hours=3), B, 2_000, 0, 2_500)
    await h.spend(midnight(h.now.date()) + timedelta(seconds=1), A, 50, 50, 100)
    return h


def expected_rows(h: History) -> tuple[list[tuple], list[tuple]]:
    """(previous, current) as (day, model, requests, tokens, estimate, real_tokens)."""
    d0 = h.opened.date()
    previous = [(d0 + timedelta(days=2), B, 1, 1_000, 1_200, 1_000),
                (d0 + timedelta(days=2), A, 2, 2_000, 2_600, 2_000),
                (d0 + timedelta(days=10), A, 1, 200, 300, 200),
                (d0 + timedelta(days=12), B, 1, 150, 400, 150)]
    current = [(h.current_start.date() + timedelta(days=1), B, 1, 2_000, 2_500, 2_000),
               (h.now.date(), A, 1, 100, 100, 100)]
    return previous, current


def as_tuples(rows: list[usage.UsageRow]) -> list[tuple]:
    return [(r.day, r.model, r.requests, r.tokens, r.estimate, r.real_tokens) for r in rows]


async def test_cycles_are_exact_with_estimate_and_real_for_admins(service, history):
    account = await service.ledger.account(history.user)
    assert account.cycle_start == history.current_start
    current, previous = await usage.cycles(service.pool, account, history.now)
    want_previous, want_current = expected_rows(history)
    assert (current.key, previous.key) == ("current", "previous")
    assert as_tuples(previous.rows) == want_previous  # ordered by day, then model
    assert as_tuples(current.rows) == want_current
    assert previous.start == accounting.add_months(current.start, -1, history.opened.day)
    # the true-up is no request of its own, and the sweep's 400 is not counted as real tokens
    assert [(m["model"], m["requests"], m["tokens"], m["estimate"], m["real"]) for m in previous.models] == [
        (A, 3, 2_200, 2_900, 2_200), (B, 2, 1_150, 1_600, 1_150)]
    assert (previous.requests, previous.tokens) == (5, 3_350)
    # the tokens shown add up to the ledger's usage debits of the cycle
    debited = await service.pool.fetchval(
        "SELECT -sum(tokens) FROM ledger_entries WHERE user_id = $1 AND kind = 'usage' AND created_at < $2",
        history.user, current.start)
    assert debited == previous.tokens
    # the chart: one column per day of the previous cycle, today the current one's last column
    assert len(previous.chart["columns"]) == (current.start - previous.start).days
    assert current.chart["columns"][-1]["day"] == current.last_day  # the whole cycle, days to come included
    today = next(c for c in current.chart["columns"] if c["day"] == history.now.date())
    assert today["today"] and today["label"] and not any(c["today"] for c in previous.chart["columns"])
    busiest = next(c for c in previous.chart["columns"] if c["day"] == want_previous[0][0])
    assert [(s["model"], s["tokens"], s["pattern"]) for s in busiest["segments"]] == [(A, 2_000, 0), (B, 1_000, 1)]
    assert previous.chart["peak"] == 3_000
    assert previous.rows[0].as_json(include_estimates=True) == {
        "day": want_previous[0][0].isoformat(), "model": B, "requests": 1, "tokens": 1_000,
        "estimate": 1_200, "real_tokens": 1_000}
    assert "estimate" not in previous.rows[0].as_json()


async def test_api_usage_by_days_with_jwt_or_gateway_key(service, settings, http, envoy, history):
    previous, current = expected_rows(history)
    every = [{"day": d.isoformat(), "model": m, "requests": n, "tokens": t} for d, m, n, t, _, _ in previous + current]
    jwt = mint_token(settings, history.user)
    status, body = await api(http, envoy.url + "/api/me/usage?days=400", token=jwt)
    assert status == 200 and body == every
    today = history.now.date()
    for days, query in ((31, ""), (14, "?days=14"), (1, "?days=1")):
        status, body = await api(http, envoy.url + "/api/me/usage" + query, token=jwt)
        assert status == 200
        assert body == [r for r in every if date.fromisoformat(r["day"]) > today - timedelta(days=days)], days
    assert body == [every[-1]]
    # LibreChat's identity headers, proven by the gateway key, as at the gate
    key = {"authorization": f"Bearer {settings.gate_key}", "x-user-id": history.user}
    async with http.get(envoy.url + "/api/me/usage?days=400", headers=key) as resp:
        assert resp.status == 200 and await resp.json() == every
    for headers in ({"x-user-id": history.user}, {"authorization": "Bearer wrong-key", "x-user-id": history.user},
                    {"x-api-key": "wrong", "x-user-id": history.user}, {}):
        async with http.get(envoy.url + "/api/me/usage", headers=headers) as resp:
            assert resp.status == 401, headers
            assert (await resp.json())["error"]["type"] == "authentication_error"
    for bad in ("0", "401", "abc", "-1", "1.5", "٣"):
        status, body = await api(http, envoy.url + "/api/me/usage?days=" + bad, token=jwt)
        assert status == 400 and body["error"]["code"] == "validation_failed", bad
        assert body["error"]["fields"]["days"]["code"] in ("out_of_range", "not_integer")
    # someone else's usage is never shown: another user sees only their own (none)
    status, body = await api(http, envoy.url + "/api/me/usage?days=400",
                             token=mint_token(settings, f"other-{uuid.uuid4().hex[:8]}"))
    assert status == 200 and body == []


async def test_me_page_chart_table_and_csv(service, history):
    previous, current = expected_rows(history)
    async with await me_signed_in(service, history.user) as client:
        async with client.get(base(service) + "/me") as resp:
            page = await resp.text()
        assert resp.status == 200
        async with client.get(base(service) + "/me/usage.csv") as resp:
            assert resp.status == 200 and "attachment" in resp.headers["Content-Disposition"]
            rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert "Para onde foram seus tokens" in page
    # two charts, each named and described, with the totals per model in text beside them
    charts = re.findall(r'<svg viewBox="0 0 720 220" role="img" aria-labelledby="([^"]+)"', page)
    assert charts == ["usage-current-svg usage-current-desc", "usage-previous-svg usage-previous-desc"]
    assert "<strong>gpt-4o-mini</strong>: 2.200 tokens; requisições: 3" in page
    assert "<strong>claude-3-haiku</strong>: 1.150 tokens; requisições: 2" in page
    assert 'fill="url(#usage-previous-p1)"' in page  # the second model's pattern, not a colour alone
    assert "Estimado" not in page  # estimates are for admins
    # the table behind the chart: one row per day and model, newest first
    table = page[page.index('<table class="usage-table">', page.index('id="usage-previous-title"')):]
    table = table[:table.index("</table>")]
    cells = re.findall(r"<tr><td class=\"nowrap\">([^<]+)</td><td class=\"wrap\">([^<]+)</td>"
                       r"<td class=\"n\">([^<]+)</td><td class=\"n\">([^<]+)</td></tr>", table)
    assert cells == [(d.strftime("%d/%m/%Y"), m, f"{n:,}".replace(",", "."), f"{t:,}".replace(",", "."))
                     for d, m, n, t, _, _ in reversed(previous)]
    assert rows == [{"cycle": cycle, "day": d.isoformat(), "model": m, "requests": str(n), "tokens": str(t)}
                    for cycle, part in (("previous", previous), ("current", current))
                    for d, m, n, t, _, _ in part]


async def test_usage_csv_needs_a_session(service, http):
    for path in ("/me/usage.csv", "/me/export.json"):
        async with http.get(base(service) + path) as resp:
            assert resp.status == 401 and "Enviar link de acesso" in await resp.text()
