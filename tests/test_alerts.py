"""Threshold alerts end to end against real components: the Ledger writing the outbox in its
settle transaction, PostgreSQL (an isolated, migrated database per test), a real SMTP server
(aiosmtpd) and a real HTTP webhook receiver (aiohttp). Time is an injected clock wherever
backoff matters, so an hour of SMTP outage takes milliseconds."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from support.clock import Clock
from support.mail import SmtpServer, html_of, text_of

from extproc.alerts.render import Alert, AlertTemplates
from extproc.alerts.webhook import sign, verify_signature
from extproc.alerts.worker import NO_CHANNEL, AlertWorker, backoff, worker_main
from extproc.ledger import Ledger, Usage
from extproc.mail import parse_smtp_url
from extproc.metrics import Metrics
from extproc.migrate import dbmate, migrations_dir
from extproc.settings import Settings
from extproc_dev.devstack import free_port

SECRET = "whsec-test-0123456789"
ADMINS = "boss@solaris.test, ops@solaris.test"
MIGRATION = "20261125000002"


# ---------------------------------------------------------------- a real webhook receiver


class Receiver:
    """Answers each POST with the next status in ``statuses`` (then 200) and keeps them all."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="ok" if status < 300 else "receiver unhappy")


@pytest.fixture
async def hook() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"  # type: ignore[union-attr]
    yield receiver
    await runner.cleanup()


# ---------------------------------------------------------------- database and ledger


@pytest.fixture
def db_url(make_database: Any) -> str:
    """A migrated database of this test's own: no other test's outbox rows, no in-serve worker."""
    return make_database()


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(db_url, min_size=2, max_size=30)
    yield pool
    await pool.close()


@pytest.fixture
def base(settings: Settings, db_url: str, smtp: SmtpServer) -> Settings:
    return settings.replace(
        database_url=db_url, smtp_url=smtp.url, admin_emails=ADMINS, language="pt-BR",
        public_url="https://gate.solaris.test", mail_from="Solaris <alertas@solaris.test>",
    )


async def spend(ledger: Ledger, user: str, tokens: int, **identity: Any) -> tuple[int, ...]:
    """One exchange: reserve 1 token, settle ``tokens``. Returns the thresholds it crossed."""
    x = uuid.uuid4().hex
    admission = await ledger.admit(user, 1, x, **identity)
    assert admission.outcome == "ok", admission
    settled = await ledger.settle(Usage(exchange_id=x, user_id=user, completion_tokens=tokens))
    assert settled is not None
    return settled.alerts


async def outbox(pool: asyncpg.Pool, user: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM alert_outbox WHERE user_id = $1 ORDER BY cycle_start, threshold", user)


async def deliveries(pool: asyncpg.Pool, user: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT d.*, o.threshold FROM alert_deliveries d JOIN alert_outbox o ON o.id = d.outbox_id"
        " WHERE o.user_id = $1 ORDER BY o.threshold, d.channel, d.audience, d.recipient", user)


async def drain(worker: AlertWorker) -> None:
    for _ in range(100):
        if await worker.run_once() == 0:
            return
    raise AssertionError("the worker never ran out of work")


def counted(metrics: Metrics, threshold: int, event: str) -> float:
    value = metrics.registry.get_sample_value(
        "solaris_alerts_total", {"threshold": str(threshold), "event": event})
    return value or 0.0


def depth(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("solaris_alert_outbox_pending") or 0.0


# ---------------------------------------------------------------- exactly once


async def test_concurrent_settles_and_two_workers_alert_exactly_once(pool, base, smtp, hook, user):
    settings = base.replace(webhook_url=hook.url, webhook_secret=SECRET)
    ledger = Ledger(pool, settings)
    address = f"{user}@example.com"
    assert await spend(ledger, user, 70_000, email=address) == ()  # 70 %: nothing crossed yet
    xs = [uuid.uuid4().hex for _ in range(50)]
    admissions = await asyncio.gather(*(ledger.admit(user, 1, x) for x in xs))
    assert {a.outcome for a in admissions} == {"ok"}

    # Two workers polling hard while 50 settles race across 80, 90 and 100 %.
    m1, m2 = Metrics(), Metrics()
    workers = [AlertWorker(pool, settings, m, concurrency=4) for m in (m1, m2)]
    tasks = [asyncio.create_task(w.run_forever(interval=0.005)) for w in workers]
    started = time.perf_counter()
    settled = await asyncio.gather(*(
        ledger.settle(Usage(exchange_id=x, user_id=user, completion_tokens=700)) for x in xs))
    settle_seconds = time.perf_counter() - started
    # 70 000 + 50 x 700 = 105 000 of 100 000: each threshold crossed by exactly one settle.
    assert sorted(t for s in settled if s for t in s.alerts) == [80, 90, 100]
    rows = await outbox(pool, user)
    assert [r["threshold"] for r in rows] == [80, 90, 100]

    deadline = time.monotonic() + 30
    while await pool.fetchval("SELECT count(*) FROM alert_outbox WHERE state = 'pending'"):
        assert time.monotonic() < deadline, "alerts not delivered in time"
        await asyncio.sleep(0.02)
    for w in workers:
        w.stop()
    await asyncio.gather(*tasks)
    for w in workers:
        await w.refresh_depth()
        await w.aclose()
    print(f"\n50 concurrent settles: {settle_seconds * 1000:.0f} ms; all delivered "
          f"{(time.perf_counter() - started) * 1000:.0f} ms after the first settle")

    assert {r["state"] for r in await outbox(pool, user)} == {"sent"}
    ds = await deliveries(pool, user)
    # user x 3 thresholds, both admins for 100 %, the webhook x 3; each claimed exactly once.
    assert [(d["threshold"], d["channel"], d["audience"]) for d in ds] == [
        (80, "email", "user"), (80, "webhook", "admin"),
        (90, "email", "user"), (90, "webhook", "admin"),
        (100, "email", "admin"), (100, "email", "admin"), (100, "email", "user"), (100, "webhook", "admin"),
    ]
    assert all(d["state"] == "sent" and d["attempts"] == 1 for d in ds)
    assert len(smtp.mailbox.to(address)) == 3
    assert len(smtp.mailbox.to("boss@solaris.test")) == len(smtp.mailbox.to("ops@solaris.test")) == 1
    assert smtp.mailbox.count() == 5
    assert len({m["Message-ID"] for _, m in smtp.mailbox.messages}) == 5
    assert sorted(h["X-Solaris-Event-Id"] for h, _ in hook.requests) == sorted(
        f"alert-{r['id']}" for r in rows)
    sent = sum(counted(m, t, "sent") for m in (m1, m2) for t in (80, 90, 100))
    assert sent == 8
    assert depth(m1) == depth(m2) == 0


async def test_two_workers_share_a_backlog_without_duplicates(pool, base, smtp, hook, user):
    """A backlog (e.g. after an outage) drained by two workers at once: 40 users x (3 user
    e-mails + 2 admin e-mails + 3 webhooks) = 320 deliveries, each sent exactly once."""
    settings = base.replace(webhook_url=hook.url, webhook_secret=SECRET)
    ledger = Ledger(pool, settings)
    users = [f"{user}-{i}" for i in range(40)]
    await asyncio.gather(*(spend(ledger, u, 100_000, email=f"{u}@example.com") for u in users))
    assert await pool.fetchval("SELECT count(*) FROM alert_outbox") == 120
    workers = [AlertWorker(pool, settings, Metrics(), concurrency=8) for _ in range(2)]
    started = time.perf_counter()
    await asyncio.gather(*(drain(w) for w in workers))
    elapsed = time.perf_counter() - started
    print(f"\nbacklog of 320 deliveries drained by two workers in {elapsed * 1000:.0f} ms")
    counts = await pool.fetch("SELECT state, attempts, count(*) FROM alert_deliveries GROUP BY 1, 2")
    assert [tuple(r) for r in counts] == [("sent", 1, 320)]
    assert smtp.mailbox.count() == 40 * 3 + 40 * 2
    assert len({m["Message-ID"] for _, m in smtp.mailbox.messages}) == 200
    assert len(hook.requests) == 120
    assert len({h["X-Solaris-Event-Id"] for h, _ in hook.requests}) == 120
    for u in users:
        assert len(smtp.mailbox.to(f"{u}@example.com")) == 3
    assert len(smtp.mailbox.to("boss@solaris.test")) == 40
    for w in workers:
        await w.aclose()


# ---------------------------------------------------------------- SMTP outage


async def test_smtp_down_for_an_hour_then_up_delivers_exactly_once(pool, base, hook, user):
    port = free_port()  # nothing listens here yet: the SMTP server is "down"
    settings = base.replace(smtp_url=f"smtp://127.0.0.1:{port}", webhook_url=hook.url, webhook_secret=SECRET)
    clock = Clock(datetime.now(UTC).replace(microsecond=0))
    ledger = Ledger(pool, settings, clock)
    address = f"{user}@example.com"
    assert await spend(ledger, user, 85_000, email=address) == (80,)
    metrics = Metrics()
    worker = AlertWorker(pool, settings, metrics, clock=clock)

    assert await worker.run_once() == 3  # planned, the e-mail failed, the webhook went out
    (alert,) = await outbox(pool, user)
    assert (alert["state"], alert["attempts"]) == ("pending", 1)
    assert alert["last_error"].startswith(f"email {address}: SMTPConnectError")
    assert depth(metrics) == 1
    assert await worker.run_once() == 0  # backing off: not due again yet

    start = clock.now
    attempts_at = [0.0]
    while True:  # an hour of outage: retry whenever due
        (mail,) = [d for d in await deliveries(pool, user) if d["channel"] == "email"]
        assert (mail["state"], mail["attempts"]) == ("pending", len(attempts_at))
        assert mail["last_error"] and "SMTPConnectError" in mail["last_error"]
        if mail["next_attempt_at"] - start > timedelta(hours=1):
            break
        clock.now = mail["next_attempt_at"]
        attempts_at.append((clock.now - start).total_seconds())
        assert await worker.run_once() == 1
    # 30 s, then doubling: 0, 30, 90, 210, 450, 930, 1890 s; the next one is at 3810 s.
    assert attempts_at == [0, 30, 90, 210, 450, 930, 1890]
    assert (await outbox(pool, user))[0]["state"] == "pending"
    assert counted(metrics, 80, "failed") == 7

    server = SmtpServer(port).start()  # SMTP is back
    try:
        clock.now = mail["next_attempt_at"]
        assert await worker.run_once() == 1
        clock.advance(86_400)
        assert await worker.run_once() == 0
        assert len(server.mailbox.to(address)) == 1
        assert server.mailbox.count() == 1
    finally:
        server.stop()
    (alert,) = await outbox(pool, user)
    assert (alert["state"], alert["attempts"]) == ("sent", 8)
    assert alert["sent_at"] == clock.now - timedelta(seconds=86_400)
    assert "SMTPConnectError" in alert["last_error"]  # the history stays readable
    assert len(hook.requests) == 1  # the webhook was not re-sent by the e-mail's retries
    assert counted(metrics, 80, "sent") == 2  # the e-mail and the webhook
    assert depth(metrics) == 0
    await worker.aclose()


async def test_gives_up_after_max_attempts_and_stays_visible(pool, base, user):
    settings = base.replace(smtp_url=f"smtp://127.0.0.1:{free_port()}")
    clock = Clock(datetime.now(UTC))
    ledger = Ledger(pool, settings, clock)
    await spend(ledger, user, 85_000, email=f"{user}@example.com")
    metrics = Metrics()
    worker = AlertWorker(pool, settings, metrics, clock=clock, max_attempts=3)
    for _ in range(3):
        await worker.run_once()
        clock.advance(3600)
    assert await worker.run_once() == 0
    (alert,) = await outbox(pool, user)
    assert (alert["state"], alert["attempts"]) == ("failed", 3)
    assert "SMTPConnectError" in alert["last_error"]
    (mail,) = await deliveries(pool, user)
    assert (mail["state"], mail["attempts"]) == ("failed", 3)
    assert counted(metrics, 80, "failed") == 3
    assert counted(metrics, 80, "gave_up") == 1
    assert depth(metrics) == 0


async def test_a_worker_that_dies_mid_send_loses_its_lease_not_the_alert(pool, base, smtp, user):
    clock = Clock(datetime.now(UTC))
    ledger = Ledger(pool, base, clock)
    address = f"{user}@example.com"
    await spend(ledger, user, 85_000, email=address)
    dead = AlertWorker(pool, base, Metrics(), clock=clock)
    live = AlertWorker(pool, base, Metrics(), clock=clock)
    await dead._plan(10, clock.now)
    job = await dead._claim(clock.now)  # claimed, then the process died before sending
    assert job is not None and job.attempts == 1
    assert await live.run_once() == 0  # leased: nobody else may send it
    clock.advance(179)
    assert await live.run_once() == 0
    clock.advance(2)  # the 180 s lease ran out
    assert await live.run_once() == 1
    assert len(smtp.mailbox.to(address)) == 1
    # The dead worker's late outcome cannot overwrite the newer claim (the attempts fence).
    assert not await dead._record(job.delivery_id, job.alert.outbox_id, job.attempts, "pending",
                                  "late", clock.now, clock.now)
    (mail,) = await deliveries(pool, user)
    assert (mail["state"], mail["attempts"], mail["last_error"]) == ("sent", 2, None)

    # Dying during the last allowed attempt: recorded as failed once the lease ran out.
    other = f"{user}-2"
    await spend(ledger, other, 85_000, email=f"{other}@example.com")
    last = AlertWorker(pool, base, Metrics(), clock=clock, max_attempts=1)
    await last._plan(10, clock.now)
    assert await last._claim(clock.now) is not None
    clock.advance(181)
    assert await last.run_once() == 1
    (alert,) = await outbox(pool, other)
    assert alert["state"] == "failed"
    assert alert["last_error"].endswith("worker stopped during the last attempt")
    assert len(smtp.mailbox.to(f"{other}@example.com")) == 0


# ---------------------------------------------------------------- content


async def test_templates_numbers_dates_and_language(pool, base, smtp, user):
    # 1 234 567 tokens a month, the cycle from 10/03/2026 to 10/04/2026.
    settings = base.replace(default_monthly_tokens=1_234_567)
    ledger = Ledger(pool, settings, Clock(datetime(2026, 3, 10, 12, tzinfo=UTC)))
    name = "<script>alert(1)</script> Zé & Cia"
    pt_user, en_user = f"{user}-pt", f"{user}-en"

    assert await spend(ledger, pt_user, 987_654, email=f"{pt_user}@example.com", name=name) == (80,)
    await drain(AlertWorker(pool, settings, Metrics()))
    assert await spend(ledger, en_user, 987_654, email=f"{en_user}@example.com", name=name) == (80,)
    await drain(AlertWorker(pool, settings.replace(language="en"), Metrics()))

    (pt,) = smtp.mailbox.to(f"{pt_user}@example.com")
    assert pt["Subject"] == "Solaris: você já usou 80 % dos seus tokens deste ciclo"
    assert pt["Content-Language"] == "pt-BR"
    assert pt["From"] == "Solaris <alertas@solaris.test>"
    assert pt["Reply-To"] == "boss@solaris.test, ops@solaris.test"
    assert pt["Auto-Submitted"] == "auto-generated"
    assert pt.get_content_type() == "multipart/alternative"
    for part in (text_of(pt), html_of(pt)):
        for expected in ("987.654", "1.234.567", "246.913", "10/04/2026", "https://gate.solaris.test/me"):
            assert expected in part
        assert "Você já usou" in part
        assert "bloquead" not in part
    assert "Olá, <script>alert(1)</script> Zé & Cia!" in text_of(pt)
    assert "<script>" not in html_of(pt)  # autoescaped: a name is data, never markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt; Zé &amp; Cia" in html_of(pt)

    (en,) = smtp.mailbox.to(f"{en_user}@example.com")
    assert en["Subject"] == "Solaris: you have used 80% of this cycle's tokens"
    assert en["Content-Language"] == "en"
    for part in (text_of(en), html_of(en)):
        for expected in ("987,654", "1,234,567", "246,913", "April 10, 2026", "https://gate.solaris.test/me"):
            assert expected in part
        assert "You have used" in part
        assert "Você" not in part


async def test_blocked_alert_goes_to_the_user_and_the_admins(pool, base, smtp, user):
    address = f"{user}@example.com"
    # The user is also on the admin list (another case): one e-mail to that address, the user's.
    settings = base.replace(admin_emails=f"{ADMINS}, {address.upper()}")
    ledger = Ledger(pool, settings, Clock(datetime(2026, 3, 10, 12, tzinfo=UTC)))
    assert await spend(ledger, user, 120_000, email=address, name="Ana") == (80, 90, 100)
    metrics = Metrics()
    await drain(AlertWorker(pool, settings, metrics))

    mails = smtp.mailbox.to(address)
    assert len(mails) == 3
    blocked = next(m for m in mails if "bloqueado" in m["Subject"])
    text = text_of(blocked)
    assert "sua conta está bloqueada" in text
    assert "10/04/2026" in text
    assert "120.000 dos 100.000 tokens" in text
    assert "fale com o administrador (boss@solaris.test, ops@solaris.test" in text
    assert "https://gate.solaris.test/me" in text and "https://gate.solaris.test/me" in html_of(blocked)
    assert "compre créditos" not in text  # no billing configured

    for admin in ("boss@solaris.test", "ops@solaris.test"):
        (mail,) = smtp.mailbox.to(admin)
        assert mail["Subject"] == f"Solaris: Ana <{address}> esgotou os tokens do ciclo e está bloqueado"
        assert f"O usuário {user} (Ana), e-mail {address}" in text_of(mail)
        assert f"extproc grant {user} TOKENS" in text_of(mail)
        assert "https://gate.solaris.test/admin" in html_of(mail)
    assert smtp.mailbox.count() == 5
    assert counted(metrics, 100, "sent") == 3
    assert counted(metrics, 80, "sent") == counted(metrics, 90, "sent") == 1

    # With billing configured, the blocked e-mail also offers the purchase page.
    alert = Alert(1, user, address, "Ana", 100, 120.0, 120_000, 100_000, -20_000,
                  datetime(2026, 3, 10, tzinfo=UTC), datetime(2026, 4, 10, tzinfo=UTC), datetime.now(UTC))
    for language, offer in (("pt-BR", "ou compre créditos em:"), ("en", "or buy credits at:")):
        billing = AlertTemplates(settings.replace(stripe_secret_key="sk_test_x", language=language))
        _, text, html = billing.render("user_alert", alert)
        assert offer in text and "https://gate.solaris.test/me" in html


def test_an_alert_against_the_users_own_cap_says_so_and_not_to_ask_the_admin(settings):
    """Measured against a personal cap (the alert's budget is the cap): the e-mail names the
    cap and where to change it; at 100 % it does not say the account is blocked or to ask an
    administrator for credits, since raising their own cap is all the user needs."""
    start, end = datetime(2026, 3, 10, tzinfo=UTC), datetime(2026, 4, 10, tzinfo=UTC)
    templates = AlertTemplates(settings.replace(public_url="https://gate.solaris.test", admin_emails="boss@x.test"))
    capped = Alert(1, "u", "u@x.test", "Ana", 100, 100.0, 40_000, 40_000, 0, start, end, start,
                   personal_cap=40_000)
    subject, text, html = templates.render("user_alert", capped, "pt-BR")
    assert subject == "Solaris: você chegou ao limite pessoal que definiu para este ciclo"
    assert "seu limite pessoal de 40.000 tokens por ciclo, definido por você" in text
    assert "https://gate.solaris.test/me" in text and "limite pessoal de 40.000 tokens</strong>" in html
    assert "bloqueada" not in text + html and "pedir mais créditos" not in text + html
    subject, text, _ = templates.render("user_alert", replace(capped, threshold=80, used_pct=80.0, used=32_000,
                                                              remaining=8_000), "en")
    assert subject == "Solaris: you have used 80% of this cycle's tokens"
    assert "your personal cap of 40,000 tokens a cycle, which you set yourself" in text
    # A cap above the cycle's budget is not what the alert was measured against: no mention.
    uncapped = replace(capped, personal_cap=90_000, budget=50_000)
    subject, text, _ = templates.render("user_alert", uncapped, "en")
    assert "personal cap" not in subject + text and "your account is blocked" in text


# ---------------------------------------------------------------- the user's preferences


async def test_user_turns_off_80_and_90_but_100_always_goes_out(pool, base, smtp, hook, user):
    """notify_80/notify_90 off: the alerts are recorded once per cycle, the user's e-mails for
    them are not planned, the webhook (the admins') still fires; 100 % always reaches the user."""
    settings = base.replace(webhook_url=hook.url, webhook_secret=SECRET)
    ledger = Ledger(pool, settings, Clock(datetime(2026, 3, 10, 12, tzinfo=UTC)))
    address = f"{user}@example.com"
    assert await spend(ledger, user, 1, email=address) == ()
    await ledger.set_settings(user, notify_80=False, notify_90=False, actor=f"user:{user}")
    assert await spend(ledger, user, 95_000) == (80, 90)
    metrics = Metrics()
    await drain(AlertWorker(pool, settings, metrics))
    assert smtp.mailbox.to(address) == []
    assert len(hook.requests) == 2
    assert [(r["threshold"], r["state"]) for r in await outbox(pool, user)] == [(80, "sent"), (90, "sent")]
    assert [(d["threshold"], d["channel"]) for d in await deliveries(pool, user)] == [(80, "webhook"), (90, "webhook")]
    assert counted(metrics, 80, "skipped") == counted(metrics, 90, "skipped") == 1
    assert await spend(ledger, user, 5_000) == (100,)
    await drain(AlertWorker(pool, settings, metrics))
    (blocked,) = smtp.mailbox.to(address)
    assert "bloqueado" in blocked["Subject"]


async def test_only_the_chosen_threshold_is_skipped_and_an_alert_with_nothing_to_send_is_skipped(
        pool, base, smtp, user):
    ledger = Ledger(pool, base, Clock(datetime(2026, 3, 10, 12, tzinfo=UTC)))
    address = f"{user}@example.com"
    await spend(ledger, user, 1, email=address)
    await ledger.set_settings(user, notify_90=False, actor=f"user:{user}")
    assert await spend(ledger, user, 92_000) == (80, 90)
    await drain(AlertWorker(pool, base, Metrics()))
    (mail,) = smtp.mailbox.to(address)
    assert "80 %" in mail["Subject"]
    # No webhook, no admin e-mail below 100 %: the 90 % alert has nothing to deliver.
    assert [(r["threshold"], r["state"]) for r in await outbox(pool, user)] == [(80, "sent"), (90, "skipped")]
    assert [d["threshold"] for d in await deliveries(pool, user)] == [80]


async def test_users_email_in_their_language_admins_in_the_deployments(pool, base, smtp, user):
    ledger = Ledger(pool, base, Clock(datetime(2026, 3, 10, 12, tzinfo=UTC)))
    address = f"{user}@example.com"
    await spend(ledger, user, 1, email=address, name="Ana")
    await ledger.set_settings(user, language="en", actor=f"user:{user}")
    assert await spend(ledger, user, 119_999) == (80, 90, 100)
    await drain(AlertWorker(pool, base, Metrics()))  # GATE_LANGUAGE is pt-BR
    # The worker may deliver the three in any order: find each by its subject.
    mails = sorted(smtp.mailbox.to(address), key=lambda m: str(m["Subject"]))
    assert len(mails) == 3 and {m["Content-Language"] for m in mails} == {"en"}
    subjects = [str(m["Subject"]) for m in mails]
    assert subjects == ["Solaris: you have used 80% of this cycle's tokens",
                        "Solaris: you have used 90% of this cycle's tokens",
                        "Solaris: you have used up this cycle's tokens and access is blocked"]
    assert "120,000" in text_of(mails[2]) and "120.000" not in text_of(mails[2])
    (boss,) = smtp.mailbox.to("boss@solaris.test")
    assert boss["Content-Language"] == "pt-BR" and "esgotou os tokens" in boss["Subject"]


# ---------------------------------------------------------------- webhook


async def test_webhook_is_signed_and_a_non_2xx_is_retried(pool, base, smtp, hook, user):
    settings = base.replace(webhook_url=hook.url, webhook_secret=SECRET)
    clock = Clock(datetime.now(UTC).replace(microsecond=0))
    ledger = Ledger(pool, settings, clock)
    address = f"{user}@example.com"
    await spend(ledger, user, 85_000, email=address)
    hook.statuses = [500, 503]
    metrics = Metrics()
    worker = AlertWorker(pool, settings, metrics, clock=clock)

    assert await worker.run_once() == 3
    mail, webhook = await deliveries(pool, user)
    assert (mail["channel"], mail["state"], mail["attempts"]) == ("email", "sent", 1)
    assert (webhook["channel"], webhook["state"], webhook["attempts"]) == ("webhook", "pending", 1)
    assert webhook["last_error"] == "WebhookError: HTTP 500 receiver unhappy"
    (alert,) = await outbox(pool, user)
    assert alert["state"] == "pending"
    assert alert["last_error"] == "webhook: WebhookError: HTTP 500 receiver unhappy"

    clock.advance(30)
    assert await worker.run_once() == 1  # 503: retried again later
    clock.advance(60)
    assert await worker.run_once() == 1
    assert await worker.run_once() == 0
    assert (await outbox(pool, user))[0]["state"] == "sent"
    assert len(smtp.mailbox.to(address)) == 1  # the webhook's retries never re-sent the e-mail
    assert counted(metrics, 80, "failed") == 2

    assert len(hook.requests) == 3
    for attempt, (headers, body) in enumerate(hook.requests, start=1):
        # What a receiver does, written out independently of extproc.alerts.
        fields = dict(item.split("=", 1) for item in headers["X-Solaris-Signature"].split(","))
        expected = hmac.new(SECRET.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(fields["v1"], expected)
        assert abs(int(fields["t"]) - clock.now.timestamp()) <= 90  # timestamped per attempt
        assert headers["X-Solaris-Event-Id"] == f"alert-{alert['id']}"  # stable: receivers dedupe
        assert headers["X-Solaris-Attempt"] == str(attempt)
        assert headers["Content-Type"].startswith("application/json")
    headers, body = hook.requests[-1]
    payload = json.loads(body)
    assert payload["id"] == f"alert-{alert['id']}"
    assert payload["type"] == "quota.threshold_crossed"
    assert (payload["threshold"], payload["blocked"]) == (80, False)
    assert payload["user"] == {"id": user, "email": address, "name": None}
    assert (payload["used"], payload["budget"], payload["remaining"]) == (85_000, 100_000, 15_000)
    assert "usou 80 % dos tokens do ciclo (85.000 de 100.000; restam 15.000" in payload["text"]

    now = int(clock.now.timestamp())
    signature = headers["X-Solaris-Signature"]
    assert verify_signature(SECRET, signature, body, now=now)
    assert not verify_signature("wrong-secret", signature, body, now=now)
    assert not verify_signature(SECRET, signature, body + b" ", now=now)
    assert not verify_signature(SECRET, signature, body, now=now + 301)  # a replay, later
    assert not verify_signature(SECRET, "garbage", body, now=now)
    assert sign(SECRET, b"{}", 1) == "t=1,v1=" + hmac.new(SECRET.encode(), b"1.{}", hashlib.sha256).hexdigest()
    await worker.aclose()


# ---------------------------------------------------------------- undeliverable


async def test_no_email_or_refused_mailbox_is_undeliverable_not_retried(pool, base, smtp, user):
    clock = Clock(datetime.now(UTC))
    ledger = Ledger(pool, base, clock)
    nobody, ghost, broken = f"{user}-nobody", f"{user}-ghost", f"{user}-broken"
    smtp.mailbox.refuse.add(f"{ghost}@example.com")
    await spend(ledger, nobody, 85_000)  # no e-mail known for this user
    await spend(ledger, broken, 85_000, email="not an address")
    await spend(ledger, ghost, 85_000, email=f"{ghost}@example.com")
    metrics = Metrics()
    worker = AlertWorker(pool, base, metrics, clock=clock)
    await drain(worker)

    (mail,) = await deliveries(pool, nobody)
    assert (mail["state"], mail["attempts"], mail["last_error"]) == (
        "undeliverable", 0, "no e-mail address on the account")
    (alert,) = await outbox(pool, nobody)
    assert (alert["state"], alert["last_error"]) == ("undeliverable", "email: no e-mail address on the account")

    (mail,) = await deliveries(pool, ghost)
    assert (mail["state"], mail["attempts"]) == ("undeliverable", 1)
    assert "550" in mail["last_error"]
    assert (await outbox(pool, ghost))[0]["state"] == "undeliverable"

    (mail,) = await deliveries(pool, broken)
    assert (mail["state"], mail["attempts"], mail["recipient"], mail["last_error"]) == (
        "undeliverable", 0, "not an address", "invalid e-mail address")

    clock.advance(7 * 86_400)  # a week later: still nothing retried
    assert await worker.run_once() == 0
    assert [d["attempts"] for u in (nobody, ghost, broken) for d in await deliveries(pool, u)] == [0, 1, 0]
    assert smtp.mailbox.count() == 0
    assert counted(metrics, 80, "undeliverable") == 3
    assert counted(metrics, 80, "failed") == 0
    assert depth(metrics) == 0


async def test_no_channel_configured_is_recorded_not_queued_forever(pool, base, user):
    settings = base.replace(smtp_url="", webhook_url="")
    ledger = Ledger(pool, settings)
    await spend(ledger, user, 85_000, email=f"{user}@example.com")
    metrics = Metrics()
    assert await AlertWorker(pool, settings, metrics).run_once() == 1
    (alert,) = await outbox(pool, user)
    assert (alert["state"], alert["last_error"]) == ("undeliverable", NO_CHANNEL)
    assert await deliveries(pool, user) == []
    assert depth(metrics) == 0


async def test_run_forever_survives_a_failing_round_and_stops_cleanly(db_url, base, caplog):
    broken = await asyncpg.create_pool(db_url, min_size=1, max_size=1)
    await broken.close()  # every round now fails, as with the database down
    worker = AlertWorker(broken, base, Metrics())
    task = asyncio.create_task(worker.run_forever(interval=0.01))
    await asyncio.sleep(0.1)
    assert not task.done()  # still looping
    worker.stop()
    await asyncio.wait_for(task, 5)
    assert "alert round failed" in caplog.text


# ---------------------------------------------------------------- cycles and grants


async def test_grant_does_not_rearm_a_threshold_but_a_new_cycle_does(pool, base, smtp, user):
    clock = Clock(datetime(2026, 3, 10, 12, tzinfo=UTC))
    ledger = Ledger(pool, base, clock)
    address = f"{user}@example.com"
    assert await spend(ledger, user, 85_000, email=address) == (80,)
    await ledger.grant(user, 50_000, actor="test", reason="top-up")  # 85 000 / 150 000: 56.7 %
    assert (await ledger.account(user)).used_pct < 80
    assert await spend(ledger, user, 40_000) == (80,)  # 125 000 / 150 000: crossed again...
    assert [r["threshold"] for r in await outbox(pool, user)] == [80]  # ...but not re-alerted
    worker = AlertWorker(pool, base, Metrics())
    await drain(worker)
    assert len(smtp.mailbox.to(address)) == 1

    clock.now = datetime(2026, 4, 10, 12, tzinfo=UTC)  # a new cycle re-arms every threshold
    assert await spend(ledger, user, 105_000) == (80,)  # budget 100 000 + 25 000 credits: 84 %
    rows = await outbox(pool, user)
    assert [(r["threshold"], r["cycle_start"]) for r in rows] == [
        (80, datetime(2026, 3, 10, tzinfo=UTC)), (80, datetime(2026, 4, 10, tzinfo=UTC))]
    await drain(worker)
    mails = smtp.mailbox.to(address)
    assert len(mails) == 2
    assert "10/05/2026" in text_of(mails[1])  # the new cycle's end


# ---------------------------------------------------------------- SMTP connection rules


def test_smtp_url_rules():
    c = parse_smtp_url("smtp://mail.example.com")
    assert (c.hostname, c.port, c.use_tls, c.start_tls, c.username, c.password) == (
        "mail.example.com", 25, False, None, None, None)
    assert parse_smtp_url("smtp://mail.example.com:587").start_tls is True
    assert parse_smtp_url("smtp://mail.example.com:2525?starttls=1").start_tls is True
    assert parse_smtp_url("smtp://mail.example.com:587?starttls=0").start_tls is False
    c = parse_smtp_url("smtps://gate%40corp:p%40ss%3Aw%2Frd@mail.example.com?verify=0&timeout=5")
    assert (c.port, c.use_tls, c.start_tls, c.validate_certs, c.timeout) == (465, True, False, False, 5.0)
    assert (c.username, c.password) == ("gate@corp", "p@ss:w/rd")
    for bad in ("http://mail.example.com", "smtp://", "smtp://h?starttls=maybe", "smtp://h?timeout=x"):
        with pytest.raises(ValueError):
            parse_smtp_url(bad)


@pytest.fixture(scope="module")
def tls_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A self-signed certificate for 127.0.0.1, as an internal relay would have."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    d: Path = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(d / "cert.pem", d / "key.pem")
    return context


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
@pytest.mark.parametrize("mode", ["starttls", "smtps"])
async def test_smtp_auth_over_starttls_and_implicit_tls(pool, base, user, tls_context, mode):
    auth = {"authenticator": True, "auth_required": True}
    if mode == "starttls":
        server = SmtpServer(tls_context=tls_context, require_starttls=True, **auth).start()
        url = f"smtp://gate:p%40ss%3Aw%2Frd@127.0.0.1:{server.port}?starttls=1&verify=0"
    else:
        # aiosmtpd cannot tell that an implicit-TLS session is encrypted, so it would refuse AUTH.
        server = SmtpServer(ssl_context=tls_context, auth_require_tls=False, **auth).start()
        url = f"smtps://gate:p%40ss%3Aw%2Frd@127.0.0.1:{server.port}?verify=0"
    try:
        settings = base.replace(smtp_url=url)
        await spend(Ledger(pool, settings), user, 85_000, email=f"{user}@example.com")
        await drain(AlertWorker(pool, settings, Metrics()))
        assert len(server.mailbox.to(f"{user}@example.com")) == 1
        assert server.mailbox.logins == [(b"gate", b"p@ss:w/rd")]
        assert server.mailbox.ciphers[0] is not None  # the message travelled encrypted
        (mail,) = await deliveries(pool, user)
        assert (mail["state"], mail["attempts"]) == ("sent", 1)
    finally:
        server.stop()


# ---------------------------------------------------------------- entry point and schema


async def test_worker_main_once_delivers_and_bad_config_exits_2(pool, base, smtp, user):
    await spend(Ledger(pool, base), user, 85_000, email=f"{user}@example.com")
    # worker_main runs its own event loop, as `extproc worker` does: give it a thread.
    assert await asyncio.to_thread(worker_main, base, once=True) == 0
    assert len(smtp.mailbox.to(f"{user}@example.com")) == 1
    assert (await outbox(pool, user))[0]["state"] == "sent"
    assert worker_main(base.replace(smtp_url="mailto:nobody"), once=True) == 2


async def test_migration_round_trips(db_url):
    later = [p for p in migrations_dir().glob("*.sql") if p.name.split("_", 1)[0] >= MIGRATION]

    async def has_schema() -> tuple[bool, bool]:
        conn = await asyncpg.connect(db_url)
        try:
            table = await conn.fetchval("SELECT to_regclass('alert_deliveries') IS NOT NULL")
            column = await conn.fetchval(
                "SELECT count(*) = 1 FROM information_schema.columns"
                " WHERE table_name = 'alert_outbox' AND column_name = 'planned_at'")
            return table, column
        finally:
            await conn.close()

    assert await has_schema() == (True, True)
    for _ in later:  # down to the migration before this one (and any written after it)
        dbmate(db_url, "rollback")
    assert await has_schema() == (False, False)
    dbmate(db_url, "up")
    assert await has_schema() == (True, True)


def test_backoff_schedule():
    assert [backoff(n).total_seconds() for n in (1, 2, 3, 7, 8, 48)] == [30, 60, 120, 1920, 3600, 3600]
    waits = sum((backoff(n) for n in range(1, 48)), timedelta())
    assert waits > timedelta(days=1)  # the default 48 attempts span more than a day (about 41 h)
