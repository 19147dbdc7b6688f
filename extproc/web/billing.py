"""The HTTP face of credit purchases (the rules: ``extproc.purchases``).

Mounted only when billing is on (both Stripe keys set); otherwise none of these routes exists
(404) and /me shows no offer.

Routes:
- ``GET /api/billing/packs``: the packs of ``GATE_CREDIT_PACKS`` (public: id, tokens, price in
  minor units, currency).
- ``POST /api/billing/checkout``: a user's JWT (``Authorization: Bearer``, as ``/api/me``) and
  JSON ``{"pack": id}`` -> ``{"id", "url", "pack"}``, the Stripe Checkout Session to send the
  user to. The browser path is the "buy" form of /me, ``POST /me/billing/checkout`` (session
  cookie + CSRF token like the other /me forms, then 303 to Stripe): the /me session cookie is
  scoped to ``Path=/me``, so a browser never sends it to ``/api``.
- ``POST /api/billing/stripe/webhook``: Stripe's events, signature checked on the raw body.
"""

from __future__ import annotations

import logging

import stripe
from aiohttp import web

from ..formats import fmt_int, format_price
from ..i18n import catalogue
from ..ledger import UNAVAILABLE_ERRORS, LedgerUnavailable
from ..purchases import CheckoutFailed, Purchases, enabled
from .kit import (
    CSP,
    OFFER,
    SERVICES,
    WEB,
    Invalid,
    Offer,
    WebContext,
    api_identity,
    client_ip,
    current_session,
    json_body,
    json_error,
    json_response,
    signin_page,
    validation_error,
)

__all__ = ["BILLING", "setup"]

log = logging.getLogger(__name__)

BILLING = web.AppKey("billing", Purchases)
CHECKOUT_ORIGIN = "https://checkout.stripe.com"  # where the /me form's redirect goes (CSP)


def _message(ctx: WebContext, billing: Purchases, code: str) -> str:
    if code == "no_account":
        return ctx.t("me.no_account")
    return billing.text.get(code, code)


async def api_packs(request: web.Request) -> web.StreamResponse:
    billing = request.app[BILLING]
    return json_response({"packs": [p.as_json() for p in billing.packs.values()]})


async def api_checkout(request: web.Request) -> web.StreamResponse:
    ctx, billing = request.app[WEB], request.app[BILLING]
    user_id = await api_identity(request)
    if isinstance(user_id, web.Response):
        return user_id
    try:
        body = await json_body(request)
    except Invalid as exc:
        return validation_error(ctx, exc.fields)
    try:
        checkout = await billing.checkout(user_id, body.get("pack"), request.headers.get("Idempotency-Key"))
    except (LedgerUnavailable, *UNAVAILABLE_ERRORS):
        return json_error(503, "unavailable", ctx.t("error.unavailable"))
    except CheckoutFailed as exc:
        if exc.code == "unknown_pack":
            return validation_error(ctx, {"pack": "unknown_pack"}, {"unknown_pack": billing.text["unknown_pack"]})
        code = {"suspended": "account_suspended", "provider": "payment_provider_error",
                "conflict": "idempotency_conflict"}.get(exc.code, exc.code)
        return json_error(exc.status, code, _message(ctx, billing, exc.code))
    return json_response({"id": checkout.id, "url": checkout.url, "pack": checkout.pack.as_json()})


async def me_checkout(request: web.Request) -> web.StreamResponse:
    """The /me "buy" form: session cookie + CSRF, then 303 to Stripe's payment page."""
    ctx, billing = request.app[WEB], request.app[BILLING]
    session = current_session(request)
    if session is None:
        return signin_page(request, status=401)
    form = await request.post()
    if not ctx.csrf_ok(form, session.sid):
        return ctx.error_page(ctx.t("error.csrf"), status=403)
    try:
        checkout = await billing.checkout(session.subject, form.get("pack"), None)
    except CheckoutFailed as exc:
        return ctx.error_page(_message(ctx, billing, exc.code), status=exc.status)
    raise web.HTTPSeeOther(checkout.url)


async def stripe_webhook(request: web.Request) -> web.StreamResponse:
    billing = request.app[BILLING]
    raw = await request.read()  # the signature covers these exact bytes
    try:
        event = billing.verify(raw, request.headers.get("Stripe-Signature"))
    except (stripe.SignatureVerificationError, ValueError) as exc:
        billing.metrics.purchases.labels(event="rejected").inc()
        log.warning("stripe webhook rejected: %s", str(exc)[:200], extra={"source_ip": client_ip(request)})
        return json_error(400, "invalid_signature", "Invalid or missing Stripe-Signature.")
    try:
        outcome = await billing.process(event, client_ip(request))
    except (LedgerUnavailable, *UNAVAILABLE_ERRORS):
        log.warning("stripe webhook: ledger unavailable, Stripe will retry", extra={"event_id": event["id"]})
        return json_error(503, "ledger_unavailable", "The ledger is unavailable; retry later.")
    except Exception:
        log.exception("stripe webhook failed", extra={"event_id": event["id"]})
        return json_error(500, "internal", "Internal error; retry later.")
    return json_response({"received": True, "outcome": outcome})


def me_offer(request: web.Request, lang: str) -> Offer:
    """What /me shows of billing, in the page's language ``lang`` (set under kit.OFFER only when
    billing is on)."""
    billing, text = request.app[BILLING], catalogue().section(lang, "billing")
    packs = [{"id": p.id, "tokens": p.tokens, "price": format_price(p.price, p.currency, lang),
              "label": text["buy_label"].format(tokens=fmt_int(p.tokens, lang),
                                                price=format_price(p.price, p.currency, lang))}
             for p in billing.packs.values()]
    purchase = request.query.get("purchase", "")
    return Offer(
        packs=packs, text=text,
        notice=text[purchase] if purchase in ("success", "cancelled") else None,
        # The form's 303 goes to Stripe: browsers check a redirect after a form against form-action.
        csp=CSP.replace("form-action 'self'", f"form-action 'self' {CHECKOUT_ORIGIN}"),
    )


def setup(app: web.Application) -> None:
    """Mount the billing routes when billing is on (both Stripe keys set); otherwise nothing."""
    service = app[SERVICES]
    settings = service.settings
    if not enabled(settings):
        if settings.stripe_secret_key or settings.stripe_webhook_secret:
            log.warning("billing is off: STRIPE_SECRET_KEY and STRIPE_WEBHOOK_SECRET must both be set")
        return
    billing = Purchases(settings, pool=service.pool, ledger=service.ledger, metrics=service.metrics,
                        clock=service.clock)
    app[BILLING] = billing
    app[OFFER] = me_offer
    r = app.router
    r.add_get("/api/billing/packs", api_packs)
    r.add_post("/api/billing/checkout", api_checkout)
    r.add_post("/api/billing/stripe/webhook", stripe_webhook)
    r.add_post("/me/billing/checkout", me_checkout)

    async def close(_: web.Application) -> None:
        await billing.close()

    app.on_cleanup.append(close)
