"""Threshold alerts: the delivery worker (DESIGN.md section 6, issue #4).

How an alert travels
--------------------
1. ``Ledger.settle`` sees a crossing (before < t <= after) and inserts into ``alert_outbox`` in
   the same transaction as the debit. UNIQUE (user_id, cycle_start, threshold) makes it at most
   one row per threshold per cycle, however many settles race across the threshold.
2. ``AlertWorker`` *plans* each new outbox row: one ``alert_deliveries`` row per channel and
   recipient (the user's e-mail; the admins' e-mails for the blocking threshold; the webhook),
   from the configuration it runs with. One short transaction, SKIP LOCKED, idempotent (UNIQUE).
3. It *claims* one due delivery at a time: ``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP
   LOCKED LIMIT 1)`` sets attempts + 1 and next_attempt_at = now + lease, and commits at once.
   No lock is held while sending: the lease keeps other workers away, and each send is bounded
   by a timeout shorter than the lease, so two workers never send the same delivery.
4. It sends, then records the outcome in a second short transaction, fenced by the attempts
   number it claimed with (a worker whose lease ran out cannot overwrite a newer claim), and
   rolls the deliveries' outcome up into the outbox row.

Rules
-----
* Once per threshold per cycle. A grant or purchase that brings usage back below a threshold
  does NOT re-arm it: crossing it again in the same cycle sends nothing (the outbox key already
  exists; the account's state still moves). The next cycle (a new cycle_start) re-arms every
  threshold. So a user who is topped up after the 100 % alert and runs out again in the same
  cycle is blocked again without a second e-mail; the first one told them what to do.
* Retries: after the n-th failed attempt the delivery waits min(30 s x 2^(n-1), 1 h); after
  ``max_attempts`` (48: about 42 hours) it is 'failed' for good, still visible with its attempts
  and last_error. SMTP down for an hour costs about eight attempts and loses nothing.
* A user without an e-mail address, or whose address the server refuses permanently (5xx to
  RCPT), gets an 'undeliverable' e-mail delivery: recorded, never retried.
* No channel configured (neither GATE_SMTP_URL nor GATE_WEBHOOK_URL): the alert is marked
  'undeliverable' with that reason, so the outbox depth cannot grow forever unnoticed.
* The outbox row's state is the roll-up of its deliveries: 'pending' while any is pending, then
  the worst outcome (failed > undeliverable > sent); its attempts is the largest of theirs and
  its last_error the most recent error, prefixed with the channel and recipient.
* A worker that dies after a send but before recording it: the lease expires and the delivery
  is sent again (at-least-once in that window only). E-mails carry a stable Message-ID and
  webhooks a stable ``X-Solaris-Event-Id`` so receivers can drop the duplicate.

SMTP URL (GATE_SMTP_URL)
------------------------
``smtps://user:pass@host:port`` is TLS from the first byte (default port 465).
``smtp://user:pass@host:port`` (default port 25) uses STARTTLS: required with ``?starttls=1``
or on port 587, never with ``?starttls=0``, otherwise opportunistic (upgraded when the server
offers it). User and password are percent-decoded and, when present, used to log in.
``?verify=0`` skips certificate verification (an internal relay with a self-signed
certificate); ``?timeout=SECONDS`` bounds each SMTP operation (default 30).

Webhook (GATE_WEBHOOK_URL, GATE_WEBHOOK_SECRET)
-----------------------------------------------
A JSON POST per alert (every threshold), with a ``text`` field so Slack/Teams incoming webhooks
show it as is. Signed: ``X-Solaris-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
"<t>.<raw body>" keyed with the secret>``; receivers should check the HMAC in constant time
and reject a ``t`` older than a few minutes (``verify_signature`` does both). Any non-2xx
answer, a timeout or a refused connection is retried like an e-mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import aiohttp
import aiosmtplib
import asyncpg
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from .ledger import Clock, create_pool, utcnow
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).with_name("templates") / "email"
MONTHS_EN = ("January", "February", "March", "April", "May", "June", "July", "August",
             "September", "October", "November", "December")
NO_CHANNEL = "no alert channel configured (GATE_SMTP_URL, GATE_WEBHOOK_URL)"
ERROR_LIMIT = 500  # characters of an error kept in last_error


# ---------------------------------------------------------------- errors


class Undeliverable(Exception):
    """A permanent failure: retrying cannot help (no address, a mailbox refused with 5xx)."""


class WebhookError(Exception):
    """The webhook receiver answered with something other than 2xx."""


# ---------------------------------------------------------------- SMTP


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"GATE_SMTP_URL: {name}={raw!r} is not a boolean")


@dataclass(frozen=True)
class SmtpConfig:
    hostname: str
    port: int
    username: str | None = None
    password: str | None = None
    use_tls: bool = False           # implicit TLS (smtps://)
    start_tls: bool | None = None   # True: required, False: never, None: if offered
    validate_certs: bool = True
    timeout: float = 30.0


def parse_smtp_url(url: str) -> SmtpConfig:
    """GATE_SMTP_URL → connection parameters (the rule is in the module docstring)."""
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps"):
        raise ValueError(f"GATE_SMTP_URL must start with smtp:// or smtps://, not {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError("GATE_SMTP_URL has no host")
    query = {k.lower(): v for k, v in parse_qsl(parts.query, keep_blank_values=True)}
    implicit = parts.scheme == "smtps"
    port = parts.port or (465 if implicit else 25)
    start_tls: bool | None
    if implicit:
        start_tls = False  # already encrypted; STARTTLS inside TLS is an error
    elif "starttls" in query:
        start_tls = _flag("starttls", query["starttls"])
    elif port == 587:
        start_tls = True  # the submission port: STARTTLS is the norm, refuse to send in clear
    else:
        start_tls = None
    try:
        timeout = float(query.get("timeout", "30"))
    except ValueError:
        raise ValueError(f"GATE_SMTP_URL: timeout={query['timeout']!r} is not a number") from None
    return SmtpConfig(
        hostname=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        use_tls=implicit,
        start_tls=start_tls,
        validate_certs=_flag("verify", query["verify"]) if "verify" in query else True,
        timeout=timeout,
    )


class MailSender(Protocol):
    async def send(self, message: EmailMessage) -> None:
        """Deliver one message to its To: recipients; raise Undeliverable when a retry cannot help."""


class SmtpSender:
    """One SMTP connection per message: alerts are rare, and a connection that is not kept
    cannot go stale while the server restarts."""

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config

    async def send(self, message: EmailMessage) -> None:
        c = self.config
        try:
            await aiosmtplib.send(
                message, hostname=c.hostname, port=c.port, username=c.username,
                password=c.password, use_tls=c.use_tls, start_tls=c.start_tls,
                validate_certs=c.validate_certs, timeout=c.timeout,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            # A 5xx to RCPT is the mailbox saying "never"; a 4xx (greylisting, full) is retried.
            if exc.recipients and all(500 <= r.code < 600 for r in exc.recipients):
                raise Undeliverable("; ".join(f"{r.code} {r.message}" for r in exc.recipients)) from exc
            raise
        except aiosmtplib.SMTPRecipientRefused as exc:
            if 500 <= exc.code < 600:
                raise Undeliverable(f"{exc.code} {exc.message}") from exc
            raise


# ---------------------------------------------------------------- webhook


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The X-Solaris-Signature value: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(secret: str, header: str, body: bytes, *, now: int, tolerance: int = 300) -> bool:
    """What a receiver does: the HMAC matches (constant time) and the timestamp is recent
    (a captured request cannot be replayed later)."""
    fields: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        fields.setdefault(key, []).append(value)
    try:
        timestamp = int(fields.get("t", [""])[0])
    except ValueError:
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, v) for v in fields.get("v1", []))


class WebhookPoster(Protocol):
    async def post(self, body: bytes, headers: Mapping[str, str]) -> None:
        """POST one signed payload; raise on anything but a 2xx."""

    async def aclose(self) -> None: ...


class HttpWebhook:
    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def post(self, body: bytes, headers: Mapping[str, str]) -> None:
        if self._session is None:  # created lazily: it must belong to the running loop
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        # No redirects: a 3xx is a misconfigured URL, retried (and visible) like any non-2xx.
        async with self._session.post(self.url, data=body, headers=dict(headers),
                                      allow_redirects=False) as resp:
            if not 200 <= resp.status < 300:
                text = (await resp.text(errors="replace"))[:200]
                raise WebhookError(f"HTTP {resp.status} {text}".strip())

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# ---------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Alert:
    outbox_id: int
    user_id: str
    email: str | None
    name: str | None
    threshold: int
    used_pct: float
    used: int
    budget: int
    remaining: int
    cycle_start: datetime
    cycle_end: datetime
    created_at: datetime

    @property
    def blocked(self) -> bool:
        return self.threshold >= 100


class Templates:
    """Jinja2 templates in extproc/templates/email, one file per message, language and part:
    ``<message>.<language>.txt`` (its ``subject`` is a ``{% set %}`` block) and ``.html``
    (autoescaped: a user's name is data, never markup)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.language = settings.language
        base = settings.public_url.rstrip("/")
        self.me_url = base + "/me"
        self.admin_url = base + "/admin"
        self.admins = settings.admin_email_list()
        self.env = Environment(
            loader=FileSystemLoader(TEMPLATE_DIR),
            autoescape=select_autoescape(["html"], default_for_string=False, default=False),
            undefined=StrictUndefined,  # a typo in a template fails the attempt, visibly
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        self.env.filters.update(num=self.num, pct=self.pct, date=self.date)

    # Formatting is explicit rather than via the OS locale: containers rarely have pt_BR.
    def num(self, value: int | float | Decimal) -> str:
        text = f"{int(value):,}"
        return text.replace(",", ".") if self.language == "pt-BR" else text

    def pct(self, value: float | Decimal) -> str:
        text = f"{float(value):.2f}".rstrip("0").rstrip(".")
        return text.replace(".", ",") if self.language == "pt-BR" else text

    def date(self, value: datetime) -> str:
        d = value.astimezone(UTC)
        if self.language == "pt-BR":
            return d.strftime("%d/%m/%Y")
        return f"{MONTHS_EN[d.month - 1]} {d.day}, {d.year}"

    def context(self, alert: Alert) -> dict[str, Any]:
        return {
            "lang": self.language,
            "user_id": alert.user_id,
            "name": alert.name or "",
            "email": alert.email or "",
            "threshold": alert.threshold,
            "used_pct": alert.used_pct,
            "used": alert.used,
            "budget": alert.budget,
            "remaining": max(alert.remaining, 0),  # overspend shows as 0, not a negative balance
            "cycle_start": alert.cycle_start,
            "cycle_end": alert.cycle_end,
            "blocked": alert.blocked,
            "me_url": self.me_url,
            "admin_url": self.admin_url,
            "admin_contacts": self.admins,
            "billing": bool(self.settings.stripe_secret_key),
        }

    def render(self, message: str, alert: Alert) -> tuple[str, str, str]:
        """(subject, text, html) of ``message`` ("user_alert" or "admin_alert")."""
        ctx = self.context(alert)
        module = self.env.get_template(f"{message}.{self.language}.txt").make_module(ctx)
        subject = " ".join(str(module.subject).split())  # one line: it becomes a header
        html = self.env.get_template(f"{message}.{self.language}.html").render(ctx, subject=subject)
        return subject, str(module), html

    def email(self, alert: Alert, audience: str, recipient: str, *, delivery_id: int,
              now: datetime) -> EmailMessage:
        subject, text, html = self.render("user_alert" if audience == "user" else "admin_alert", alert)
        msg = EmailMessage()
        msg["Subject"] = subject
        msg["From"] = self.settings.mail_from
        msg["To"] = recipient
        if audience == "user" and self.admins:
            msg["Reply-To"] = ", ".join(self.admins)  # "contact the admin" is a reply away
        msg["Date"] = format_datetime(now.astimezone(UTC))
        domain = parseaddr(self.settings.mail_from)[1].rpartition("@")[2] or "localhost"
        # Stable across retries: a duplicate after a crash mid-send can be recognised.
        msg["Message-ID"] = f"<solaris-alert-{alert.outbox_id}.{delivery_id}@{domain}>"
        msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation auto-replies
        msg.set_content(text)
        msg.add_alternative(html, subtype="html")
        msg["Content-Language"] = self.language  # after the body: set_content drops Content-* headers
        return msg

    def webhook_payload(self, alert: Alert) -> dict[str, Any]:
        text = self.env.get_template(f"webhook.{self.language}.txt").render(self.context(alert)).strip()
        return {
            "id": f"alert-{alert.outbox_id}",
            "type": "quota.threshold_crossed",
            "text": text,
            "threshold": alert.threshold,
            "blocked": alert.blocked,
            "user": {"id": alert.user_id, "email": alert.email, "name": alert.name},
            "used": alert.used,
            "budget": alert.budget,
            "remaining": alert.remaining,
            "used_pct": alert.used_pct,
            "cycle_start": alert.cycle_start.isoformat(),
            "cycle_end": alert.cycle_end.isoformat(),
            "created_at": alert.created_at.isoformat(),
            "admin_url": self.admin_url,
        }


# ---------------------------------------------------------------- the worker


@dataclass(frozen=True)
class Job:
    """One claimed delivery."""

    delivery_id: int
    channel: str
    audience: str
    recipient: str
    attempts: int  # after the claim's increment: the fence for recording the outcome
    alert: Alert


def backoff(attempts: int, base: float = 30.0, cap: float = 3600.0) -> timedelta:
    """Wait after the ``attempts``-th failed attempt: 30 s, 1 min, 2 min, ... capped at 1 h.
    Exponential so a long outage costs few attempts, capped so recovery is noticed within the hour."""
    return timedelta(seconds=min(base * 2 ** max(attempts - 1, 0), cap))


def _clean_address(raw: str | None) -> str | None:
    """The bare address when ``raw`` is a usable one, else None."""
    if not raw:
        return None
    address = parseaddr(raw)[1].strip()
    if not address or "@" not in address or any(c.isspace() for c in address):
        return None
    local, _, domain = address.rpartition("@")
    return address if local and "." in domain.strip(".") else None


def _error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if not text.startswith(type(exc).__name__):
        text = f"{type(exc).__name__}: {text}"
    return text[:ERROR_LIMIT]


_CLAIM = """
WITH c AS (
    UPDATE alert_deliveries d SET attempts = d.attempts + 1, next_attempt_at = $2, last_attempt_at = $1
    WHERE d.id = (SELECT id FROM alert_deliveries
                  WHERE state = 'pending' AND next_attempt_at <= $1 AND attempts < $3
                  ORDER BY next_attempt_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING d.id, d.outbox_id, d.channel, d.audience, d.recipient, d.attempts)
SELECT c.*, o.user_id, o.threshold, o.used_pct, o.used, o.budget, o.remaining, o.cycle_start,
       o.cycle_end, o.created_at, a.email, a.name
FROM c JOIN alert_outbox o ON o.id = c.outbox_id JOIN accounts a ON a.user_id = o.user_id
"""

# Recompute the outbox row from its deliveries. Callers hold the outbox row lock, taken before
# this statement, so in READ COMMITTED its snapshot sees every other worker's committed outcome.
_ROLL_UP = """
UPDATE alert_outbox o SET
    state = CASE WHEN s.total = 0 THEN 'undeliverable'
                 WHEN s.pending > 0 THEN 'pending'
                 WHEN s.failed > 0 THEN 'failed'
                 WHEN s.undeliverable > 0 THEN 'undeliverable'
                 ELSE 'sent' END,
    attempts = s.attempts,
    last_error = CASE WHEN s.total = 0 THEN $2 ELSE s.last_error END,
    next_attempt_at = COALESCE(s.next_at, o.next_attempt_at),
    sent_at = CASE WHEN s.pending = 0 THEN s.sent_at END
FROM (SELECT count(*) AS total,
             count(*) FILTER (WHERE state = 'pending') AS pending,
             count(*) FILTER (WHERE state = 'failed') AS failed,
             count(*) FILTER (WHERE state = 'undeliverable') AS undeliverable,
             COALESCE(max(attempts), 0) AS attempts,
             min(next_attempt_at) FILTER (WHERE state = 'pending') AS next_at,
             max(sent_at) AS sent_at,
             (SELECT channel || CASE WHEN recipient <> '' THEN ' ' || recipient ELSE '' END
                     || ': ' || last_error
              FROM alert_deliveries WHERE outbox_id = $1 AND last_error IS NOT NULL
              ORDER BY last_attempt_at DESC NULLS LAST, id DESC LIMIT 1) AS last_error
      FROM alert_deliveries WHERE outbox_id = $1) s
WHERE o.id = $1
RETURNING o.state
"""


class AlertWorker:
    """Plans, claims, sends and records alert deliveries (see the module docstring).

    Any number of workers may run against one database (inside each ``extproc serve`` and as
    ``extproc worker``): every step is a short transaction and claims use SKIP LOCKED.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        metrics: Metrics,
        *,
        clock: Clock = utcnow,
        sender: MailSender | None = None,
        webhook: WebhookPoster | None = None,
        max_attempts: int = 48,
        base_delay: float = 30.0,
        max_delay: float = 3600.0,
        lease: float = 180.0,
        send_timeout: float = 60.0,
        concurrency: int = 4,
    ) -> None:
        if send_timeout >= lease:
            # The lease is what keeps a second worker off a delivery being sent: a send that
            # could outlive it could be sent twice.
            raise ValueError("send_timeout must be shorter than the lease")
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        # None means "from the settings"; an unset URL disables the channel.
        if sender is None and settings.smtp_url:
            sender = SmtpSender(parse_smtp_url(settings.smtp_url))
        if webhook is None and settings.webhook_url:
            webhook = HttpWebhook(settings.webhook_url)
        self.sender = sender
        self.webhook = webhook
        self.templates = Templates(settings)
        self.admins = settings.admin_email_list()
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.lease = timedelta(seconds=lease)
        self.send_timeout = send_timeout
        self.concurrency = max(1, concurrency)
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------ loop

    def backoff(self, attempts: int) -> timedelta:
        return backoff(attempts, self.base_delay, self.max_delay)

    async def run_once(self, limit: int = 50) -> int:
        """One round: plan new alerts, then claim and deliver up to ``limit`` due deliveries
        (``concurrency`` at a time). Returns the number of alerts planned plus deliveries
        attempted; 0 means there was nothing to do."""
        done = await self._give_up_abandoned(self.clock())
        done += await self._plan(limit, self.clock())
        budget = limit

        async def lane() -> int:
            nonlocal budget
            count = 0
            while budget > 0 and not self._stopping.is_set():
                budget -= 1
                job = await self._claim(self.clock())
                if job is None:
                    budget = 0  # nothing due: the other lanes stop too
                    break
                await self._deliver(job)
                count += 1
            return count

        results = await asyncio.gather(*(lane() for _ in range(min(self.concurrency, max(limit, 1)))),
                                       return_exceptions=True)
        await self.refresh_depth()
        for result in results:  # raised only after every lane finished its in-flight send
            if isinstance(result, BaseException):
                raise result
        return done + sum(r for r in results if isinstance(r, int))

    async def run_forever(self, interval: float = 5.0, limit: int = 50) -> None:
        """Rounds until ``stop()``; a full round goes again at once, otherwise it waits
        ``interval``. A failing round (database down) is logged and retried next interval."""
        log.info("alert worker started", extra={
            "email": self.sender is not None, "webhook": self.webhook is not None})
        while not self._stopping.is_set():
            try:
                busy = await self.run_once(limit) >= limit
            except Exception:
                log.exception("alert round failed")
                busy = False
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), interval)

    def stop(self) -> None:
        """Finish the deliveries in flight, claim no more, and let run_forever return."""
        self._stopping.set()

    async def aclose(self) -> None:
        if self.webhook is not None:
            await self.webhook.aclose()

    async def refresh_depth(self) -> int:
        depth = await self.pool.fetchval("SELECT count(*) FROM alert_outbox WHERE state = 'pending'")
        self.metrics.outbox_depth.set(depth)
        return int(depth)

    # ------------------------------------------------------------ plan

    def _deliveries_for(self, threshold: int, email: str | None) -> list[tuple[str, str, str, str, str | None]]:
        """(channel, audience, recipient, state, error) rows of one alert."""
        rows: list[tuple[str, str, str, str, str | None]] = []
        if self.sender is not None:
            address = _clean_address(email)
            if address is not None:
                rows.append(("email", "user", address, "pending", None))
            elif email:
                rows.append(("email", "user", email[:320], "undeliverable", "invalid e-mail address"))
            else:
                rows.append(("email", "user", "", "undeliverable", "no e-mail address on the account"))
            if threshold >= 100:  # the blocking alert also goes to the admins
                seen = {address.lower()} if address else set()
                for admin in self.admins:
                    if admin.lower() not in seen:
                        seen.add(admin.lower())
                        rows.append(("email", "admin", admin, "pending", None))
        if self.webhook is not None:
            rows.append(("webhook", "admin", "", "pending", None))
        return rows

    async def _plan(self, limit: int, now: datetime) -> int:
        undeliverable: list[int] = []
        async with self.pool.acquire() as conn, conn.transaction():
            # FOR UPDATE OF o only: the account row is the settle path's lock, never taken here.
            outbox = await conn.fetch(
                "SELECT o.id, o.threshold, a.email FROM alert_outbox o"
                " JOIN accounts a ON a.user_id = o.user_id"
                " WHERE o.planned_at IS NULL AND o.state = 'pending'"
                " ORDER BY o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED",
                limit,
            )
            if not outbox:
                return 0
            columns: tuple[list[Any], ...] = ([], [], [], [], [], [])
            for row in outbox:
                for delivery in self._deliveries_for(row["threshold"], row["email"]):
                    for column, value in zip(columns, (row["id"], *delivery), strict=True):
                        column.append(value)
                    if delivery[3] == "undeliverable":
                        undeliverable.append(row["threshold"])
            await conn.execute(
                "INSERT INTO alert_deliveries (outbox_id, channel, audience, recipient, state,"
                " last_error, next_attempt_at, created_at)"
                " SELECT o, c, a, r, s, e, $7, $7 FROM unnest($1::bigint[], $2::text[], $3::text[],"
                " $4::text[], $5::text[], $6::text[]) AS t(o, c, a, r, s, e)"
                " ON CONFLICT (outbox_id, channel, recipient) DO NOTHING",
                *columns, now,
            )
            ids = [row["id"] for row in outbox]
            await conn.execute("UPDATE alert_outbox SET planned_at = $2 WHERE id = ANY($1::bigint[])", ids, now)
            for outbox_id in ids:
                await conn.fetchval(_ROLL_UP, outbox_id, NO_CHANNEL)
        for threshold in undeliverable:
            self.metrics.alerts.labels(str(threshold), "undeliverable").inc()
        if self.sender is None and self.webhook is None:
            log.warning("alerts undeliverable: %s", NO_CHANNEL, extra={"alerts": len(outbox)})
        return len(outbox)

    # ------------------------------------------------------------ claim, send, record

    async def _claim(self, now: datetime) -> Job | None:
        row = await self.pool.fetchrow(_CLAIM, now, now + self.lease, self.max_attempts)
        if row is None:
            return None
        alert = Alert(
            outbox_id=row["outbox_id"], user_id=row["user_id"], email=row["email"], name=row["name"],
            threshold=row["threshold"], used_pct=float(row["used_pct"]), used=row["used"],
            budget=row["budget"], remaining=row["remaining"], cycle_start=row["cycle_start"],
            cycle_end=row["cycle_end"], created_at=row["created_at"],
        )
        return Job(row["id"], row["channel"], row["audience"], row["recipient"], row["attempts"], alert)

    async def _send(self, job: Job, now: datetime) -> None:
        if job.channel == "email":
            if self.sender is None:
                raise RuntimeError("e-mail channel no longer configured (GATE_SMTP_URL)")
            await self.sender.send(self.templates.email(
                job.alert, job.audience, job.recipient, delivery_id=job.delivery_id, now=now))
            return
        if self.webhook is None:
            raise RuntimeError("webhook no longer configured (GATE_WEBHOOK_URL)")
        body = json.dumps(self.templates.webhook_payload(job.alert), ensure_ascii=False,
                          separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "solaris-token-gate",
            "X-Solaris-Event-Id": f"alert-{job.alert.outbox_id}",
            "X-Solaris-Attempt": str(job.attempts),
        }
        if self.settings.webhook_secret:  # re-signed on every attempt: the timestamp is fresh
            headers["X-Solaris-Signature"] = sign(self.settings.webhook_secret, body, int(now.timestamp()))
        await self.webhook.post(body, headers)

    async def _deliver(self, job: Job) -> None:
        threshold = str(job.alert.threshold)
        now = self.clock()
        try:
            await asyncio.wait_for(self._send(job, now), self.send_timeout)
        except Undeliverable as exc:
            state, error, next_at = "undeliverable", _error_text(exc), None
        except Exception as exc:  # any other failure is worth another attempt
            error = _error_text(exc)
            if job.attempts >= self.max_attempts:
                state, next_at = "failed", None
            else:
                state, next_at = "pending", self.clock() + self.backoff(job.attempts)
        else:
            state, error, next_at = "sent", None, None
        recorded = await self._record(job.delivery_id, job.alert.outbox_id, job.attempts, state, error,
                                      next_at, self.clock())
        extra = {"delivery": job.delivery_id, "alert": job.alert.outbox_id, "channel": job.channel,
                 "attempts": job.attempts, "state": state}
        if state == "sent":
            self.metrics.alerts.labels(threshold, "sent").inc()
            log.info("alert delivered", extra=extra)
        elif state == "undeliverable":
            self.metrics.alerts.labels(threshold, "undeliverable").inc()
            log.warning("alert undeliverable: %s", error, extra=extra)
        else:
            self.metrics.alerts.labels(threshold, "failed").inc()
            if state == "failed":
                self.metrics.alerts.labels(threshold, "gave_up").inc()
            log.warning("alert attempt failed: %s", error, extra=extra)
        if not recorded:
            # Only if a send outlived the lease and another worker claimed the row meanwhile.
            log.error("alert outcome not recorded: lease lost", extra=extra)

    async def _record(self, delivery_id: int, outbox_id: int, attempts: int, state: str,
                      error: str | None, next_at: datetime | None, now: datetime) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            # Outbox row first, then the delivery: the lock order every writer here follows.
            await conn.execute("SELECT 1 FROM alert_outbox WHERE id = $1 FOR UPDATE", outbox_id)
            recorded = await conn.fetchval(
                "UPDATE alert_deliveries SET state = $3, last_error = COALESCE($4, last_error),"
                " next_attempt_at = COALESCE($5, next_attempt_at), last_attempt_at = $6,"
                " sent_at = CASE WHEN $3 = 'sent' THEN $6::timestamptz END"
                " WHERE id = $1 AND attempts = $2 AND state = 'pending' RETURNING true",
                delivery_id, attempts, state, error, next_at, now,
            )
            if recorded:
                await conn.fetchval(_ROLL_UP, outbox_id, NO_CHANNEL)
            return bool(recorded)

    async def _give_up_abandoned(self, now: datetime) -> int:
        """A worker that died during the last allowed attempt leaves a pending row no one may
        claim; once its lease has run out, record it as failed so it stays visible."""
        rows = await self.pool.fetch(
            "SELECT d.id, d.outbox_id, d.attempts, o.threshold FROM alert_deliveries d"
            " JOIN alert_outbox o ON o.id = d.outbox_id"
            " WHERE d.state = 'pending' AND d.attempts >= $2 AND d.next_attempt_at <= $1",
            now, self.max_attempts,
        )
        for row in rows:
            if await self._record(row["id"], row["outbox_id"], row["attempts"], "failed",
                                  "worker stopped during the last attempt", None, now):
                self.metrics.alerts.labels(str(row["threshold"]), "gave_up").inc()
        return len(rows)


# ---------------------------------------------------------------- entry point


async def _work(settings: Settings, once: bool, interval: float,
                make_worker: Callable[[asyncpg.Pool], AlertWorker] | None) -> int:
    pool = await create_pool(settings, min_size=1, max_size=6)
    try:
        worker = make_worker(pool) if make_worker else AlertWorker(pool, settings, Metrics())
        try:
            if once:
                while await worker.run_once() > 0:
                    pass
                return 0
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, worker.stop)
            await worker.run_forever(interval)
            return 0
        finally:
            await worker.aclose()
    finally:
        await pool.close()


def worker_main(settings: Settings, *, once: bool = False, interval: float = 5.0,
                make_worker: Callable[[asyncpg.Pool], AlertWorker] | None = None) -> int:
    """``extproc worker [--once]``: deliver alerts until SIGTERM/SIGINT (or, with ``once``,
    until nothing is due). Returns the process exit code (2: bad configuration)."""
    try:
        if settings.smtp_url:
            parse_smtp_url(settings.smtp_url)  # fail before connecting to anything
    except ValueError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_work(settings, once, interval, make_worker))
