"""Threshold alerts: the outbox worker that plans, claims, sends and records deliveries.

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
* The user's preferences (``accounts.notify_80``, ``notify_90``) turn off the user's own e-mail
  for a threshold below 100 %: ``notify_90`` governs thresholds from 90 % up, ``notify_80``
  those below. The alert is still recorded in the outbox (once per cycle holds), only the
  user's e-mail is not planned; the webhook (for the admins) is unchanged, and an alert left
  with no delivery at all is 'skipped'. The 100 % alert always goes out. The user's e-mail is
  written in ``accounts.language`` when set, else GATE_LANGUAGE (``alerts.render``).
* The outbox row's state is the roll-up of its deliveries: 'pending' while any is pending, then
  the worst outcome (failed > undeliverable > sent); its attempts is the largest of theirs and
  its last_error the most recent error, prefixed with the channel and recipient.
* A worker that dies after a send but before recording it: the lease expires and the delivery
  is sent again (at-least-once in that window only). E-mails carry a stable Message-ID and
  webhooks a stable ``X-Solaris-Event-Id`` so receivers can drop the duplicate.

Where the rest lives: the messages in ``alerts.render``, the webhook's signature and POST in
``alerts.webhook``, SMTP in ``mail``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from ..ledger import Clock, create_pool, utcnow
from ..mail import MailSender, Undeliverable, smtp_sender, usable_address
from ..metrics import Metrics
from ..settings import Settings
from .render import Alert, AlertTemplates, event_id
from .webhook import HttpWebhook, WebhookPoster, request_headers

__all__ = ["NO_CHANNEL", "AlertWorker", "Job", "backoff", "user_wants", "worker_main"]

log = logging.getLogger(__name__)

NO_CHANNEL = "no alert channel configured (GATE_SMTP_URL, GATE_WEBHOOK_URL)"
ERROR_LIMIT = 500  # characters of an error kept in last_error


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


def user_wants(threshold: int, *, notify_80: bool, notify_90: bool) -> bool:
    """Whether the user's own e-mail for ``threshold`` is wanted: 100 % always; from 90 % up
    as ``notify_90`` says; below, as ``notify_80`` says."""
    if threshold >= 100:
        return True
    return notify_90 if threshold >= 90 else notify_80


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
       o.cycle_end, o.created_at, a.email, a.name, a.language, a.personal_cap
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
        if sender is None:
            sender = smtp_sender(settings.smtp_url)
        if webhook is None and settings.webhook_url:
            webhook = HttpWebhook(settings.webhook_url)
        self.sender = sender
        self.webhook = webhook
        self.templates = AlertTemplates(settings)
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

    def _deliveries_for(self, threshold: int, email: str | None,
                        wanted: bool = True) -> list[tuple[str, str, str, str, str | None]]:
        """(channel, audience, recipient, state, error) rows of one alert; ``wanted``: whether
        the user wants this threshold's e-mail (``user_wants``)."""
        rows: list[tuple[str, str, str, str, str | None]] = []
        if self.sender is not None and wanted:
            address = usable_address(email)
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
                "SELECT o.id, o.threshold, a.email, a.notify_80, a.notify_90 FROM alert_outbox o"
                " JOIN accounts a ON a.user_id = o.user_id"
                " WHERE o.planned_at IS NULL AND o.state = 'pending'"
                " ORDER BY o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED",
                limit,
            )
            if not outbox:
                return 0
            columns: tuple[list[Any], ...] = ([], [], [], [], [], [])
            skipped: list[int] = []  # the user turned this e-mail off and nothing else is due
            for row in outbox:
                wanted = user_wants(row["threshold"], notify_80=row["notify_80"], notify_90=row["notify_90"])
                deliveries = self._deliveries_for(row["threshold"], row["email"], wanted)
                if not wanted:
                    self.metrics.alerts.labels(str(row["threshold"]), "skipped").inc()
                    if not deliveries and (self.sender is not None or self.webhook is not None):
                        skipped.append(row["id"])
                for delivery in deliveries:
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
            await conn.execute("UPDATE alert_outbox SET state = 'skipped' WHERE id = ANY($1::bigint[])", skipped)
            for outbox_id in ids:
                if outbox_id not in skipped:
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
            cycle_end=row["cycle_end"], created_at=row["created_at"], language=row["language"],
            personal_cap=row["personal_cap"],
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
        body = self.templates.webhook_body(job.alert)
        headers = request_headers(body, event_id=event_id(job.alert), attempt=job.attempts,
                                  secret=self.settings.webhook_secret, now=int(now.timestamp()))
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
        smtp_sender(settings.smtp_url)  # fail before connecting to anything
    except ValueError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_work(settings, once, interval, make_worker))
