"""Credit purchases with Stripe (issue #7): users buy credit packs with Stripe Checkout; a
signed webhook adds the credits exactly once and claws them back on refund or card dispute
(chargeback).

Switch: billing is on only when both ``STRIPE_SECRET_KEY`` and ``STRIPE_WEBHOOK_SECRET`` are set
(checkout without a webhook secret would take money that could never be credited). When it is
off, none of the billing routes exists (404), /me shows no button and the 402 carries no link.

HTTP: ``web.billing`` serves the routes (packs, checkout, the webhook, the /me form) and turns
the outcomes below into answers; nothing here knows HTTP requests (aiohttp appears only as
the Stripe library's transport).

Checkout: the session is created with the official ``stripe`` library through a per-service
``StripeClient`` (``STRIPE_API_BASE`` overrides its API address; no module-level configuration)
using the library's aiohttp client and its ``*_async`` methods, so nothing blocks the event
loop. mode=payment, one line item with ``price_data`` (currency, unit_amount, product name),
success/cancel URLs under ``GATE_PUBLIC_URL/me``, ``client_reference_id`` = user id and
``metadata`` = {user_id, pack, tokens} (also on the PaymentIntent, for Stripe's dashboard).
Only a user with an account (one request made) who is not suspended may start a purchase.
Idempotency key sent to Stripe: with the client's ``Idempotency-Key`` header, a hash of (user,
that key): a retried request gets the same session, the same key for another pack gets 409.
Without it, a hash of (user, pack, current UTC minute): a double click reuses the session;
two purchases of one pack in the same minute are one purchase (wait a minute).

Fulfilment (webhook):
- The signature is checked by ``StripeClient.construct_event`` (the library's default
  tolerance, 300 s): missing, malformed, wrong-secret, tampered or old -> 400, nothing recorded.
- ``stripe_events`` keeps every processed event id and what was done with it; a redelivered
  event id answers 200 "duplicate" without work. The row is written after the work, so a crash
  in between only means the work is redone, which is idempotent.
- ``checkout.session.completed`` with ``payment_status == "paid"`` and
  ``checkout.session.async_payment_succeeded`` credit the tokens recorded in the session's
  metadata when it was created (never a client value, never the current pack table, which may
  have changed since) with ``Ledger.grant(kind="purchase", actor="stripe")`` keyed by
  ``stripe:checkout:<session id>``. The ledger's UNIQUE idempotency key, checked under the
  account's row lock, is what makes it exactly once whatever the order, number or concurrency
  of deliveries; the entry and its audit row are one transaction (I4), so the purchase shows in
  the statement, the admin user view and the audit trail (actor ``stripe``) like any credit.
  A completed-but-unpaid session (boleto, Pix) waits for ``async_payment_succeeded``.
- A session without our metadata (another product on the same Stripe account) is ignored.
  A paid session whose user has no account cannot come from our checkout (it requires one):
  it is logged as an error, recorded (outcome ``unknown_user``, and in billing_payments) and
  answered 200 so Stripe stops retrying; an operator grants by hand after looking.
- A buyer erased (LGPD) after checkout is still named by the session's metadata: fulfilment
  files the payment, and credits the purchase, under the pseudonym their account lives under
  (``erased_users``), never under the erased id. A purchase credited before the erasure is
  found by its key (no second credit), and its refunds and disputes claw back from the
  pseudonym; one paid after the erasure (a boleto) is credited there and logged for a refund.
- ``charge.refunded`` claws back proportionally: tokens x amount_refunded / amount (rounded
  down) of the purchase, as kind 'refund' (negative; the balance may go below zero and the
  account is then blocked until it is positive again). A charge names its PaymentIntent, not
  the session, so fulfilment records PaymentIntent -> (session, user, tokens) in
  ``billing_payments`` (migrations/20261125000004_billing.sql). Stripe reports the cumulative
  amount refunded; the highest value seen is kept, and under a per-payment lock the clawback
  is brought up to tokens x highest / amount, what was already clawed back being read from the
  ledger entries themselves (keys ``stripe:refund:<payment intent>:<cumulative amount>``). So
  each refund is applied once, replays and out-of-order partial refunds converge to the same
  total, and a crash between the ledger entry and anything else is healed by the retry.
  A refund that arrives before its purchase is recorded and applied when the purchase is
  fulfilled (order never matters). A refund that fails later (amount_refunded going down) does
  not give credits back: an admin grants them.
- ``charge.dispute.*`` (created, updated, funds_withdrawn, funds_reinstated, closed): a card
  dispute (chargeback) claws back the whole pack while it is open or lost, whatever its
  amount (the pack is one line item, and a dispute's amount can differ from the charge's by
  currency conversion). Every event carries the whole Dispute, so only its status matters,
  that of the newest event (``created``; events of the same second ordered by how far along
  the dispute's life the status is): a late delivery never moves a dispute back. ``won``,
  ``warning_closed`` (an inquiry that closed without becoming a chargeback) and ``prevented``
  give back what the dispute took; ``lost`` keeps it, and so does any status this code does
  not know (an admin can grant). Inquiries (``warning_*``) claw back too: the cardholder asked
  the bank to reverse the charge, and the close gives the credits back. A dispute names its
  PaymentIntent, so it is matched through ``billing_payments`` like a refund and kept in
  ``billing_disputes`` (migrations/20261129000001_disputes.sql); one that arrives before its
  purchase is applied when the purchase is fulfilled.
- Refunds and disputes of one payment are settled together (``Ledger.settle_payment``, under
  the payment's lock, from the ledger's own entries): the clawback is the whole pack while any
  dispute holds it, else the refunded share. So the total never exceeds the pack, a refund
  during a dispute takes nothing more, a dispute after a partial refund takes only the rest,
  and a dispute won after a refund gives back only what the dispute took beyond the refund.
  The clawback is a ledger entry of kind 'refund' (the cardholder got the money back, as for
  a refund: statements and reports net it against the purchase), its return one of kind
  'adjustment' (it undoes a clawback; it is not money going to the card), keyed
  ``stripe:dispute:<payment intent>:<n>:<dispute id>``, n counting the payment's dispute
  entries: exactly once each, even for a dispute given back and later held again (won, then
  reopened by an appeal).
  Outcomes recorded in stripe_events: ``dispute_clawed_back``, ``dispute_reinstated``,
  ``dispute_awaiting_purchase``, ``dispute_recorded`` (nothing to change), ``not_ours``.
- Any other event type: 200, logged, recorded as ``ignored``. A database outage: 503 (Stripe
  retries with backoff for days).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import stripe

from . import reasons
from .formats import fmt_int
from .i18n import catalogue, supported
from .ledger import Account, Clawback, Ledger, PaymentSettled, UnknownUser, purchase_key
from .metrics import Metrics
from .settings import Settings

__all__ = ["Checkout", "CheckoutFailed", "Pack", "Purchases", "checkout_idempotency_key", "enabled",
           "parse_packs"]

log = logging.getLogger(__name__)

ACTOR = "stripe"
CHECKOUT_WINDOW_SECONDS = 60  # a double click within the same minute reuses the session
MAX_CLIENT_KEY = 200
MAX_PACK_TOKENS = 10**12
STRIPE_TIMEOUT_SECONDS = 30
FULFIL_TYPES = ("checkout.session.completed", "checkout.session.async_payment_succeeded")
DISPUTE_PREFIX = "charge.dispute."  # created, updated, funds_withdrawn, funds_reinstated, closed
# How far along a dispute's life a status is: breaks ties between events of the same second
# (Stripe's `created` has one-second resolution) so that a late delivery never moves a dispute
# back. Unknown statuses rank lowest: they never override a known one of the same second.
DISPUTE_RANK = {"warning_needs_response": 1, "warning_under_review": 2, "warning_closed": 3,
                "needs_response": 4, "under_review": 5, "won": 6, "lost": 6, "prevented": 6,
                "appeal_needs_response": 7, "appeal_under_review": 8}
_PACK_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_DIGITS = re.compile(r"[0-9]+")

# ---------------------------------------------------------------- packs and prices


@dataclass(frozen=True)
class Pack:
    id: str
    tokens: int
    price: int  # minor units (cents), as Stripe's unit_amount
    currency: str  # ISO 4217, lower case, as Stripe writes it

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "tokens": self.tokens, "price": self.price, "currency": self.currency}


def parse_packs(text: str) -> tuple[Pack, ...]:
    """``id:tokens:price-in-cents:currency,...`` -> packs; ValueError names the bad item."""
    packs: list[Pack] = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        parts = [p.strip() for p in item.split(":")]
        if len(parts) != 4:
            raise ValueError(f"GATE_CREDIT_PACKS: {item!r} is not id:tokens:price-in-cents:currency")
        pack_id, tokens, price, currency = parts[0], parts[1], parts[2], parts[3].lower()
        if not _PACK_ID.fullmatch(pack_id):
            raise ValueError(f"GATE_CREDIT_PACKS: bad pack id {pack_id!r} (a-z, 0-9, _ and -)")
        if not (_DIGITS.fullmatch(tokens) and 0 < int(tokens) <= MAX_PACK_TOKENS):
            raise ValueError(f"GATE_CREDIT_PACKS: {pack_id}: tokens must be a positive integer")
        if not (_DIGITS.fullmatch(price) and int(price) > 0):
            raise ValueError(f"GATE_CREDIT_PACKS: {pack_id}: price must be a positive integer (cents)")
        if not re.fullmatch(r"[a-z]{3}", currency):
            raise ValueError(f"GATE_CREDIT_PACKS: {pack_id}: currency must be an ISO 4217 code")
        if any(p.id == pack_id for p in packs):
            raise ValueError(f"GATE_CREDIT_PACKS: pack {pack_id!r} is listed twice")
        packs.append(Pack(pack_id, int(tokens), int(price), currency))
    if not packs:
        raise ValueError("GATE_CREDIT_PACKS lists no pack")
    return tuple(packs)


def enabled(settings: Settings) -> bool:
    return bool(settings.stripe_secret_key and settings.stripe_webhook_secret)


def checkout_idempotency_key(user_id: str, pack_id: str, client_key: str | None, now: float) -> str:
    """The Idempotency-Key sent to Stripe (see the module docstring)."""
    if client_key:
        material = f"client\0{user_id}\0{client_key}"
    else:
        material = f"window\0{user_id}\0{pack_id}\0{int(now // CHECKOUT_WINDOW_SECONDS)}"
    return "solaris-checkout-" + hashlib.sha256(material.encode()).hexdigest()


def _id(value: Any) -> str | None:
    """A Stripe reference: an id string, or an expanded object's id."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Mapping) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class CheckoutFailed(Exception):
    def __init__(self, status: int, code: str) -> None:
        super().__init__(code)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Checkout:
    id: str
    url: str
    pack: Pack


# ---------------------------------------------------------------- the service object


class Purchases:
    """Checkout and fulfilment for one service instance (its own Stripe client)."""

    def __init__(self, settings: Settings, *, pool: asyncpg.Pool, ledger: Ledger, metrics: Metrics,
                 clock: Callable[[], datetime]) -> None:
        self.settings = settings
        self.packs = {p.id: p for p in parse_packs(settings.credit_packs)}
        self.pool = pool
        self.ledger = ledger
        self.metrics = metrics
        self.clock = clock
        self.lang = supported(settings.language)
        self.text = catalogue().section(self.lang, "billing")  # what the /me offer and the errors say
        self.public_url = settings.public_url.rstrip("/")
        self.http_client = stripe.AIOHTTPClient(timeout=aiohttp.ClientTimeout(total=STRIPE_TIMEOUT_SECONDS))
        base = {"api": settings.stripe_api_base.rstrip("/")} if settings.stripe_api_base else None
        # The library retries network failures and 5xx itself, with the same idempotency key.
        self.client = stripe.StripeClient(settings.stripe_secret_key, base_addresses=base,  # type: ignore[arg-type]
                                          http_client=self.http_client, max_network_retries=2)

    async def close(self) -> None:
        await self.http_client.close_async()

    # ------------------------------------------------------------ checkout

    def checkout_params(self, account: Account, pack: Pack) -> dict[str, Any]:
        metadata = {"user_id": account.user_id, "pack": pack.id, "tokens": str(pack.tokens)}
        params: dict[str, Any] = {
            "mode": "payment",
            "line_items": [{
                "price_data": {
                    "currency": pack.currency,
                    "unit_amount": pack.price,
                    "product_data": {"name": self.text["product"].format(tokens=fmt_int(pack.tokens, self.lang))},
                },
                "quantity": 1,
            }],
            "success_url": f"{self.public_url}/me?purchase=success",
            "cancel_url": f"{self.public_url}/me?purchase=cancelled",
            "client_reference_id": account.user_id,
            "metadata": metadata,
            "payment_intent_data": {"metadata": metadata},
            "locale": self.lang,
        }
        if account.email:
            params["customer_email"] = account.email
        return params

    async def checkout(self, user_id: str, pack_id: Any, client_key: str | None) -> Checkout:
        """A Stripe Checkout Session for ``user_id`` buying ``pack_id``; CheckoutFailed says why not."""
        pack = self.packs.get(pack_id) if isinstance(pack_id, str) else None
        if pack is None:
            raise CheckoutFailed(400, "unknown_pack")
        if client_key is not None and (not client_key or len(client_key) > MAX_CLIENT_KEY
                                       or not client_key.isprintable()):
            raise CheckoutFailed(400, "invalid_key")
        account = await self.ledger.account(user_id)
        if account is None:
            raise CheckoutFailed(404, "no_account")
        if account.state == "suspended":
            raise CheckoutFailed(403, "suspended")
        key = checkout_idempotency_key(user_id, pack.id, client_key, time.time())
        try:
            session = await self.client.v1.checkout.sessions.create_async(
                self.checkout_params(account, pack),  # type: ignore[arg-type]
                {"idempotency_key": key})
        except stripe.IdempotencyError:
            raise CheckoutFailed(409, "conflict") from None
        except stripe.StripeError as exc:
            log.error("stripe checkout failed: %s", type(exc).__name__,
                      extra={"user_id": user_id, "pack": pack.id, "stripe_error": str(exc)[:300]})
            raise CheckoutFailed(502, "provider") from None
        if not session.id or not session.url:
            log.error("stripe checkout session without id or url", extra={"user_id": user_id})
            raise CheckoutFailed(502, "provider")
        self.metrics.purchases.labels(event="checkout").inc()
        log.info("checkout session created", extra={"user_id": user_id, "pack": pack.id, "session": session.id})
        return Checkout(session.id, session.url, pack)

    # ------------------------------------------------------------ webhook

    def verify(self, raw: bytes, header: str | None) -> dict[str, Any]:
        """The event of a correctly signed, recent body; SignatureVerificationError or
        ValueError otherwise (HMAC and JSON only: no I/O, fine on the event loop)."""
        event = self.client.construct_event(raw, header, self.settings.stripe_webhook_secret)
        data = event.to_dict()
        if not isinstance(data.get("id"), str) or not isinstance(data.get("type"), str):
            raise ValueError("not a Stripe event")
        return data

    async def process(self, event: Mapping[str, Any], source_ip: str | None = None) -> str:
        """Do what ``event`` asks, once; returns the outcome recorded in stripe_events."""
        event_id, kind = str(event["id"]), str(event["type"])
        if await self.pool.fetchval("SELECT 1 FROM stripe_events WHERE event_id = $1", event_id):
            self.metrics.purchases.labels(event="duplicate").inc()
            return "duplicate"
        data = event.get("data")
        obj = data.get("object") if isinstance(data, Mapping) else None
        if not isinstance(obj, Mapping):
            obj = {}
        if kind == "checkout.session.completed" and obj.get("payment_status") != "paid":
            outcome = "awaiting_payment"  # boleto, Pix...: async_payment_succeeded follows
        elif kind in FULFIL_TYPES:
            outcome = await self.fulfil(obj, source_ip)
        elif kind == "charge.refunded":
            outcome = await self.refund(obj, source_ip)
        elif kind.startswith(DISPUTE_PREFIX):
            outcome = await self.dispute(obj, event.get("created"), source_ip)
        else:
            outcome = "ignored"
            log.info("stripe event ignored", extra={"event_id": event_id, "type": kind})
        await self.pool.execute(
            "INSERT INTO stripe_events (event_id, type, outcome, object_id, received_at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING",
            event_id, kind[:200], outcome, _id(obj.get("id")), self.clock())
        self.metrics.purchases.labels(event=outcome).inc()
        return outcome

    async def fulfil(self, session: Mapping[str, Any], source_ip: str | None) -> str:
        session_id = _id(session.get("id"))
        meta = session.get("metadata")
        meta = meta if isinstance(meta, Mapping) else {}
        user_id, pack, tokens_text = meta.get("user_id"), meta.get("pack"), meta.get("tokens")
        if (not session_id or session.get("mode") != "payment" or not isinstance(user_id, str) or not user_id
                or not isinstance(pack, str) or not isinstance(tokens_text, str)):
            log.info("checkout session without Solaris metadata ignored", extra={"session": session_id})
            return "not_ours"
        reference = session.get("client_reference_id")
        if (not _DIGITS.fullmatch(tokens_text) or not 0 < int(tokens_text) <= MAX_PACK_TOKENS
                or (reference is not None and reference != user_id)):
            log.error("checkout session with inconsistent metadata", extra={"session": session_id})
            return "invalid"
        tokens = int(tokens_text)
        amount = _count(session.get("amount_total"))
        currency = str(session.get("currency") or "").lower()
        payment_intent = _id(session.get("payment_intent"))
        if not payment_intent:
            log.warning("paid checkout session without a payment intent: refunds cannot be matched",
                        extra={"session": session_id})
        reason = reasons.coded(reasons.PURCHASE, {"pack": pack, "amount": amount, "currency": currency or None,
                                                  "session": session_id}, self.lang)
        # The metadata names the buyer's id as it was at checkout. If they were erased since
        # (before this event, or before a re-delivery of one already credited), the payment
        # and its credit belong to the account under its pseudonym, and the erased id is never
        # written again. Looked up again once when the account is missing: an erasure may
        # commit between the look-up and the grant.
        for last_try in (False, True):
            pseudonym = await self.ledger.pseudonym_of(user_id)
            owner = pseudonym or user_id
            if payment_intent:
                # Before the grant: a refund racing this purchase finds the row.
                await self.pool.execute(
                    "INSERT INTO billing_payments (payment_intent, session_id, user_id, pack, tokens, amount,"
                    " currency, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)"
                    " ON CONFLICT (payment_intent) DO UPDATE SET session_id = EXCLUDED.session_id,"
                    # Whose payment it is never changes, except from the erased id to its pseudonym.
                    " user_id = CASE WHEN billing_payments.user_id IS NULL OR billing_payments.user_id = $9"
                    "  THEN EXCLUDED.user_id ELSE billing_payments.user_id END,"
                    " pack = EXCLUDED.pack, tokens = EXCLUDED.tokens,"
                    " amount = COALESCE(billing_payments.amount, EXCLUDED.amount),"
                    " currency = EXCLUDED.currency, updated_at = EXCLUDED.updated_at",
                    payment_intent, session_id, owner, pack, tokens, amount, currency or None, self.clock(), user_id)
            try:
                _, applied = await self.ledger.grant(
                    owner, tokens, actor=ACTOR, kind="purchase", idempotency_key=purchase_key(session_id),
                    reason=reason, source_ip=source_ip)
                break
            except UnknownUser:
                if last_try or pseudonym is not None:
                    log.error("paid checkout session for a user without an account: not credited",
                              extra={"session": session_id, "user_id": owner, "tokens": tokens})
                    return "unknown_user"
        if applied:
            self.metrics.purchase_tokens.labels(kind="purchase").inc(tokens)
            log.info("purchase credited", extra={"session": session_id, "user_id": owner, "tokens": tokens})
            if pseudonym is not None:
                # Paid after the erasure (a boleto or Pix paid days later): nobody can spend it.
                log.warning("purchase paid after its buyer's erasure, credited to the pseudonym: refund it in Stripe",
                            extra={"session": session_id, "user_id": owner, "tokens": tokens})
        if payment_intent:
            await self.settle_payment(payment_intent, source_ip)  # a refund or dispute that arrived first
        return "fulfilled" if applied else "already_fulfilled"

    async def refund(self, charge: Mapping[str, Any], source_ip: str | None) -> str:
        payment_intent = _id(charge.get("payment_intent"))
        amount, refunded = _count(charge.get("amount")), _count(charge.get("amount_refunded"))
        if not payment_intent or refunded is None:
            log.info("refund without a payment intent ignored", extra={"charge": _id(charge.get("id"))})
            return "not_ours"
        await self.pool.execute(
            "INSERT INTO billing_payments (payment_intent, charge_id, amount, amount_refunded, created_at, updated_at)"
            " VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (payment_intent) DO UPDATE SET"
            " charge_id = COALESCE(EXCLUDED.charge_id, billing_payments.charge_id),"
            " amount = COALESCE(EXCLUDED.amount, billing_payments.amount),"
            " amount_refunded = GREATEST(billing_payments.amount_refunded, EXCLUDED.amount_refunded),"
            " updated_at = EXCLUDED.updated_at",
            payment_intent, _id(charge.get("id")), amount, refunded, self.clock())
        settled = await self.settle_payment(payment_intent, source_ip)
        # Nothing clawed back now: already done, purchase not known yet, or an open dispute
        # has already taken the whole pack.
        return "refunded" if settled.change < 0 else "refund_recorded"

    async def dispute(self, dispute: Mapping[str, Any], created: Any, source_ip: str | None) -> str:
        """Any ``charge.dispute.*`` event: record the dispute's status, then settle its payment.
        Every event of a dispute carries the whole Dispute object, so the event type does not
        matter, only the status of the newest event (see ledger.DISPUTE_RELEASED and the migration)."""
        dispute_id = _id(dispute.get("id"))
        payment_intent = _id(dispute.get("payment_intent"))
        status = dispute.get("status")
        if not dispute_id or not payment_intent or not isinstance(status, str) or not status:
            # Our checkout always makes a PaymentIntent: a dispute without one is not about us.
            log.info("dispute without a payment intent or status ignored", extra={"dispute": dispute_id})
            return "not_ours"
        status = status[:64]
        if status not in DISPUTE_RANK:
            log.warning("unknown dispute status: the purchase stays clawed back",
                        extra={"dispute": dispute_id, "status": status})
        # The event's creation time orders a dispute's events (deliveries may be out of order).
        seconds = _count(created)
        at = datetime.fromtimestamp(seconds, UTC) if seconds is not None else self.clock()
        reason = dispute.get("reason")
        currency = dispute.get("currency")
        await self.pool.execute(
            "INSERT INTO billing_disputes (dispute_id, payment_intent, charge_id, amount, currency, status,"
            " status_rank, status_at, reason, created_at, updated_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) ON CONFLICT (dispute_id) DO UPDATE SET"
            " charge_id = COALESCE(EXCLUDED.charge_id, billing_disputes.charge_id),"
            " amount = COALESCE(EXCLUDED.amount, billing_disputes.amount),"
            " currency = COALESCE(EXCLUDED.currency, billing_disputes.currency),"
            " reason = COALESCE(EXCLUDED.reason, billing_disputes.reason),"
            # The row lock of ON CONFLICT serializes concurrent deliveries; the newest event wins.
            " status = CASE WHEN (EXCLUDED.status_at, EXCLUDED.status_rank)"
            "   >= (billing_disputes.status_at, billing_disputes.status_rank)"
            "   THEN EXCLUDED.status ELSE billing_disputes.status END,"
            " status_rank = CASE WHEN (EXCLUDED.status_at, EXCLUDED.status_rank)"
            "   >= (billing_disputes.status_at, billing_disputes.status_rank)"
            "   THEN EXCLUDED.status_rank ELSE billing_disputes.status_rank END,"
            " status_at = GREATEST(EXCLUDED.status_at, billing_disputes.status_at),"
            " updated_at = EXCLUDED.updated_at",
            dispute_id, payment_intent, _id(dispute.get("charge")), _count(dispute.get("amount")),
            currency.lower()[:16] if isinstance(currency, str) and currency else None, status,
            DISPUTE_RANK.get(status, 0), at, reason[:100] if isinstance(reason, str) else None, self.clock())
        settled = await self.settle_payment(payment_intent, source_ip)
        if settled.change < 0:
            return "dispute_clawed_back"
        if settled.change > 0:
            return "dispute_reinstated"
        if not settled.credited:
            log.info("dispute before its purchase: applied when the purchase is fulfilled",
                     extra={"dispute": dispute_id, "payment_intent": payment_intent})
            return "dispute_awaiting_purchase"
        return "dispute_recorded"  # nothing to change: already applied, or a status that keeps it

    async def settle_payment(self, payment_intent: str, source_ip: str | None) -> PaymentSettled:
        """Bring the payment's clawback to what its refunds and disputes say (the rule and its
        entries: ``Ledger.settle_payment``), then count and log what changed."""
        settled = await self.ledger.settle_payment(payment_intent, actor=ACTOR, reason=self.clawback_reason,
                                                   source_ip=source_ip)
        move = settled.move
        if move is None:
            return settled
        if not settled.applied:
            log.warning("clawback already applied under its key", extra={"payment_intent": payment_intent,
                                                                         "key": move.key})
            return settled
        self.metrics.purchase_tokens.labels(kind=move.cause).inc(abs(move.tokens))
        log.info("purchase clawback changed", extra={"payment_intent": payment_intent, "tokens": move.tokens,
                                                      "cause": move.cause})
        return settled

    def clawback_reason(self, move: Clawback) -> reasons.Reason:
        """The ledger reason of a clawback movement (its text in the deployment's language)."""
        money = {"amount": move.amount, "currency": move.currency}
        if move.cause == "dispute":
            params = {**money, "dispute": move.dispute_id, "payment": move.payment_intent}
            return reasons.coded(reasons.DISPUTE, params, self.lang)
        if move.cause == "refund":
            params = {**money, "refunded": move.refunded, "payment": move.payment_intent}
            return reasons.coded(reasons.REFUND, params, self.lang)
        params = {"status": move.status, "dispute": move.dispute_id, "payment": move.payment_intent}
        return reasons.coded(reasons.DISPUTE_RELEASED, params, self.lang)
