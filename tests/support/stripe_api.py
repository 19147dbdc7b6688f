"""A local stand-in for Stripe's API (the part the gate calls: creating Checkout Sessions), and
webhook events signed with the stripe library's own helper.

The real ``stripe`` library talks to it (``STRIPE_API_BASE``), so the tests see the exact wire
parameters and headers it sends. Like Stripe, a repeated Idempotency-Key with the same
parameters returns the first session, and with other parameters is an ``idempotency_error``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import stripe
from aiohttp import web

from extproc_dev.devstack import free_port

SECRET_KEY = "sk_test_solaris_0123456789abcdef"
WEBHOOK_SECRET = "whsec_solaris_test_0123456789abcdef"


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    params: dict[str, str]  # the form body, keys as sent: "line_items[0][price_data][currency]"


@dataclass
class FakeStripe:
    port: int = field(default_factory=free_port)
    requests: list[Recorded] = field(default_factory=list)
    by_key: dict[str, tuple[dict[str, str], dict[str, Any]]] = field(default_factory=dict)
    fail_with: int | None = None  # answer the next checkout with this HTTP status
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/checkout/sessions", self.create_session)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def create_session(self, request: web.Request) -> web.Response:
        params = dict(parse_qsl(await request.text(), keep_blank_values=True, strict_parsing=True))
        self.requests.append(Recorded(request.path, dict(request.headers), params))
        if self.fail_with is not None:
            status, self.fail_with = self.fail_with, None
            return web.json_response({"error": {"type": "api_error", "message": "boom"}}, status=status,
                                     headers={"Stripe-Should-Retry": "false"})
        if request.headers.get("Authorization") != f"Bearer {SECRET_KEY}":
            return web.json_response({"error": {"type": "invalid_request_error", "message": "bad key"}},
                                     status=401)
        key = request.headers.get("Idempotency-Key", "")
        if key in self.by_key:
            first, session = self.by_key[key]
            if first != params:
                return web.json_response({"error": {
                    "type": "idempotency_error",
                    "message": "Keys for idempotent requests can only be used with the same parameters"}},
                    status=400)
            return web.json_response(session, headers={"Idempotent-Replayed": "true"})
        session_id = f"cs_test_{uuid.uuid4().hex}"
        session = {
            "id": session_id, "object": "checkout.session", "mode": params.get("mode"),
            "url": f"{self.url}/c/pay/{session_id}", "payment_status": "unpaid", "status": "open",
            "client_reference_id": params.get("client_reference_id"),
            "amount_total": int(params.get("line_items[0][price_data][unit_amount]", "0")),
            "currency": params.get("line_items[0][price_data][currency]"),
            "metadata": {k[9:-1]: v for k, v in params.items() if k.startswith("metadata[")},
        }
        if key:
            self.by_key[key] = (params, session)
        return web.json_response(session)

    def sessions(self) -> list[Recorded]:
        return [r for r in self.requests if r.path == "/v1/checkout/sessions"]


# ---------------------------------------------------------------- events


def event(kind: str, obj: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    return {"id": event_id or f"evt_{uuid.uuid4().hex}", "object": "event", "type": kind,
            "api_version": "2026-10-28.endive", "created": int(time.time()), "livemode": False,
            "pending_webhooks": 1, "data": {"object": obj}}


def checkout_session(user_id: str, *, pack: str = "small", tokens: int = 100_000, amount: int = 2990,
                     paid: bool = True, session_id: str | None = None,
                     payment_intent: str | None = None) -> dict[str, Any]:
    session_id = session_id or f"cs_test_{uuid.uuid4().hex}"
    return {
        "id": session_id, "object": "checkout.session", "mode": "payment",
        "payment_status": "paid" if paid else "unpaid", "status": "complete",
        "amount_total": amount, "currency": "brl", "client_reference_id": user_id,
        "payment_intent": payment_intent or f"pi_{uuid.uuid4().hex[:24]}",
        "metadata": {"user_id": user_id, "pack": pack, "tokens": str(tokens)},
    }


def refunded_charge(payment_intent: str | None, *, amount: int, refunded: int,
                    charge_id: str | None = None) -> dict[str, Any]:
    return {"id": charge_id or f"ch_{uuid.uuid4().hex[:24]}", "object": "charge", "amount": amount,
            "amount_refunded": refunded, "refunded": refunded >= amount, "currency": "brl",
            "payment_intent": payment_intent, "status": "succeeded", "metadata": {}}


def signed(body: dict[str, Any] | str, *, secret: str = WEBHOOK_SECRET,
           timestamp: int | None = None) -> tuple[bytes, dict[str, str]]:
    """The body as Stripe sends it and its Stripe-Signature header (the library's own helper)."""
    payload = body if isinstance(body, str) else json.dumps(body, indent=2)
    header = stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp)
    return payload.encode(), {"Stripe-Signature": header, "Content-Type": "application/json; charset=utf-8"}
