"""The alert webhook: signing and posting one JSON payload (GATE_WEBHOOK_URL, GATE_WEBHOOK_SECRET).

A JSON POST per alert (every threshold), with a ``text`` field so Slack/Teams incoming webhooks
show it as is (the payload is built by ``alerts.render``). Signed: ``X-Solaris-Signature:
t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>" keyed with the secret>``; receivers
should check the HMAC in constant time and reject a ``t`` older than a few minutes
(``verify_signature`` does both). Any non-2xx answer, a timeout or a refused connection is
retried like an e-mail (by the worker).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Protocol

import aiohttp

__all__ = ["DEFAULT_TIMEOUT", "HttpWebhook", "WebhookError", "WebhookPoster", "request_headers", "sign",
           "verify_signature"]

DEFAULT_TIMEOUT = 10.0  # seconds for one POST, connection included
REPLAY_TOLERANCE = 300  # seconds a receiver accepts a signature's timestamp for
ERROR_BODY_LIMIT = 200  # characters of a refusing receiver's answer kept in the error


class WebhookError(Exception):
    """The webhook receiver answered with something other than 2xx."""


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The X-Solaris-Signature value: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(secret: str, header: str, body: bytes, *, now: int,
                     tolerance: int = REPLAY_TOLERANCE) -> bool:
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
    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT) -> None:
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
                text = (await resp.text(errors="replace"))[:ERROR_BODY_LIMIT]
                raise WebhookError(f"HTTP {resp.status} {text}".strip())

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def request_headers(body: bytes, *, event_id: str, attempt: int, secret: str | None, now: int) -> dict[str, str]:
    """The headers of one delivery attempt: a stable event id (a receiver drops duplicates by
    it), the attempt number and, with a secret, a signature re-made on every attempt (its
    timestamp is fresh, so a retry hours later is not taken for a replay)."""
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": "solaris-token-gate",
        "X-Solaris-Event-Id": event_id,
        "X-Solaris-Attempt": str(attempt),
    }
    if secret:
        headers["X-Solaris-Signature"] = sign(secret, body, now)
    return headers
