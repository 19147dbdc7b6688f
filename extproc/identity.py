"""Who is calling: a verified JWT, or LibreChat's identity headers proven by the gateway key.

An identity header without proof is never trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt

from .settings import Settings

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 8192
MAX_ID_CHARS = 256
MAX_EMAIL_CHARS = 320
ASYMMETRIC_ALGS = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]


@dataclass(frozen=True)
class Identity:
    user_id: str
    email: str | None = None
    name: str | None = None
    admin: bool = False
    via: str = "jwt"


class IdentityError(Exception):
    """401: the message is safe to show (it never echoes the token)."""


def _clean(value: str | None, limit: int, what: str) -> str | None:
    """Identity values end up in SQL parameters, HTML and e-mail headers: refuse control
    characters, unexpanded LibreChat placeholders and absurd lengths."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if "{{" in value or "}}" in value:
        raise IdentityError(f"{what} is an unexpanded placeholder")
    if len(value) > limit:
        raise IdentityError(f"{what} is too long")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise IdentityError(f"{what} contains control characters")
    return value


def bearer(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    if value[:7].lower() == "bearer ":
        return value[7:].strip()
    return value


class JwksCache:
    """Signing keys from a JWKS URL, kept fresh in the background.

    Envoy gives the processor one second per message, so the request path never waits on a
    slow identity provider: a known ``kid`` is answered from memory even when the keys are
    past ``ttl`` (a refresh is started, the old keys keep serving until it succeeds); an
    unknown ``kid`` starts at most one fetch per ``min_refresh`` seconds and waits for it at
    most ``wait`` seconds, then fails with 401 instead of stalling the request. ``start()``
    runs a loop that refreshes before expiry, so requests normally never see a fetch at all.
    """

    def __init__(self, url: str, ttl: float = 300.0, min_refresh: float = 10.0, wait: float = 0.5,
                 fetch_timeout: float = 5.0, max_bytes: int = 1024 * 1024) -> None:
        self.url = url
        self.ttl = ttl
        self.min_refresh = min_refresh
        self.wait = wait
        self.fetch_timeout = fetch_timeout
        self.max_bytes = max_bytes
        self._keys: dict[str, Any] = {}
        self._fetched = 0.0  # monotonic time of the last successful fetch; 0: never
        self._attempted = float("-inf")  # monotonic time the last fetch started
        self._failures = 0  # consecutive failed fetches (the background loop backs off)
        self._inflight: asyncio.Task[bool] | None = None  # the one fetch in progress, shared
        self._runner: asyncio.Task[None] | None = None

    async def _fetch(self) -> dict[str, Any]:
        # aiohttp rather than urllib in a thread: a fetch that is given up on is really
        # cancelled, not left holding a worker thread for its whole timeout.
        timeout = aiohttp.ClientTimeout(total=self.fetch_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(self.url) as resp:
            resp.raise_for_status()
            body = await resp.content.read(self.max_bytes + 1)
        if len(body) > self.max_bytes:
            raise ValueError("JWKS document too large")
        data = json.loads(body)
        keys = {}
        for jwk in data.get("keys", []) if isinstance(data, dict) else []:
            if not isinstance(jwk, dict):
                continue
            try:
                keys[str(jwk.get("kid", ""))] = jwt.PyJWK(jwk)
            except jwt.PyJWTError as exc:
                log.warning("ignoring unusable JWKS key %s: %s", jwk.get("kid"), exc)
        if not keys:
            # An empty answer is far more likely a broken endpoint than a provider that stopped
            # signing: keep the keys we have.
            raise ValueError("JWKS holds no usable key")
        return keys

    async def _refresh_once(self) -> bool:
        try:
            keys = await self._fetch()
        except Exception as exc:  # any failure keeps the old keys; never crash a request
            self._failures += 1
            log.warning("JWKS fetch failed (%s): %s", type(exc).__name__, exc)
            return False
        self._keys = keys
        self._fetched = time.monotonic()
        self._failures = 0
        return True

    def refresh(self) -> asyncio.Task[bool]:
        """The fetch in progress, or a new one: concurrent callers share a single fetch."""
        task = self._inflight
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            self._attempted = time.monotonic()
            task = self._inflight = asyncio.create_task(self._refresh_once(), name="jwks-refresh")
        return task

    def _fetching(self) -> asyncio.Task[bool] | None:
        task = self._inflight
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            return None
        return task

    async def key(self, kid: str) -> Any:
        now = time.monotonic()
        if (self._fetched and now - self._fetched >= self.ttl and not self._fetching()
                and now - self._attempted >= self.min_refresh):
            # Stale: refresh behind the request and answer from the keys we hold (at most one
            # attempt per min_refresh, so a provider that is down is not hit per request).
            self.refresh()
        if kid in self._keys:
            return self._keys[kid]
        # Unknown kid: a key rotation, or nothing fetched yet. Join the fetch in progress, or
        # start one (at most one per min_refresh: random kids cannot hammer the provider).
        task = self._fetching()
        if task is None and now - self._attempted >= self.min_refresh:
            task = self.refresh()
        if task is not None:
            try:
                # shield: giving up on the wait must not cancel the shared fetch.
                await asyncio.wait_for(asyncio.shield(task), self.wait)
            except TimeoutError:
                raise IdentityError("signing key unavailable") from None
        if kid in self._keys:
            return self._keys[kid]
        if not self._fetched:
            raise IdentityError("signing key unavailable")
        raise IdentityError("unknown signing key")

    def _next_delay(self) -> float:
        if self._failures:  # back off: min_refresh, doubling, never beyond half the ttl
            return max(0.05, min(self.ttl / 2, self.min_refresh * 2 ** min(self._failures - 1, 10)))
        if not self._fetched:
            return 0.0
        # At 80 % of the ttl: the new keys are in before the old ones count as stale.
        return max(0.05, self._fetched + self.ttl * 0.8 - time.monotonic())

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._next_delay())
            await asyncio.shield(self.refresh())

    def start(self) -> None:
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self.run(), name="jwks-refresher")

    async def close(self) -> None:
        tasks = [t for t in (self._runner, self._inflight) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._runner = self._inflight = None


class VerifiedCache:
    """Tokens verified in the last minute (LibreChat sends the same one on every message), so
    the signature check is not repeated per request. Only successes are kept, never past the
    token's own ``exp``, and for at most ``ttl`` seconds (a JWKS key rotation takes effect)."""

    def __init__(self, ttl: float = 60.0, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Identity]] = {}

    def get(self, token: str) -> Identity | None:
        hit = self._entries.get(token)
        if hit is None:
            return None
        if hit[0] <= time.time():
            del self._entries[token]
            return None
        return hit[1]

    def put(self, token: str, identity: Identity, exp: float) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # bounded memory; the next requests re-verify
        self._entries[token] = (min(exp, time.time() + self.ttl), identity)


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        if settings.jwks_url and not settings.jwt_audience:
            # Settings.validate() refuses this at start; repeated here because Settings built
            # in code skip validate(), and without an audience every token the (often shared)
            # identity provider issues for any other application would be accepted here.
            raise ValueError(AUDIENCE_REQUIRED)
        self.settings = settings
        self.mode = settings.identity_mode
        self.jwt_header = settings.jwt_header.lower()
        self._gate_key = settings.gate_key.encode()
        self._jwks = JwksCache(settings.jwks_url) if settings.jwks_url else None
        self._options: dict[str, Any] = {"require": ["exp"]}
        self._verified = VerifiedCache()
        self.admin_rule = AdminRule.from_settings(settings)

    async def start(self) -> None:
        """Background JWKS refresh (optional: without it keys are refreshed on demand)."""
        if self._jwks is not None:
            self._jwks.start()

    async def close(self) -> None:
        if self._jwks is not None:
            await self._jwks.close()

    async def authenticate(self, headers: Mapping[str, str]) -> Identity:
        """Identity of a request from its (lower-cased) headers, or IdentityError."""
        token = bearer(headers.get(self.jwt_header))
        if self.mode in ("jwt", "both") and token and token.count(".") == 2:
            return await self.verify_jwt(token)
        if self.mode == "jwt":
            raise IdentityError("missing token")
        return self._trusted_headers(headers)

    def _trusted_headers(self, headers: Mapping[str, str]) -> Identity:
        key = bearer(headers.get("authorization")) or headers.get("x-api-key") or ""
        if not self._gate_key or not hmac.compare_digest(key.encode(), self._gate_key):
            raise IdentityError("missing or invalid gateway key")
        user_id = _clean(headers.get("x-user-id"), MAX_ID_CHARS, "X-User-Id")
        if not user_id:
            raise IdentityError("missing X-User-Id")
        email = _clean(headers.get("x-user-email"), MAX_EMAIL_CHARS, "X-User-Email")
        name = _clean(headers.get("x-user-name"), MAX_ID_CHARS, "X-User-Name")
        return Identity(user_id, email, name, via="trusted-headers")

    async def verify_jwt(self, token: str) -> Identity:
        if len(token) > MAX_TOKEN_BYTES:
            raise IdentityError("token too large")
        cached = self._verified.get(token)
        if cached is not None:
            return cached
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise IdentityError("malformed token") from None
        alg = header.get("alg")
        kwargs: dict[str, Any] = {"options": self._options, "leeway": 5}
        if self.settings.jwt_audience:
            kwargs["audience"] = self.settings.jwt_audience
        else:
            kwargs["options"] = {**self._options, "verify_aud": False}
        if self.settings.jwt_issuer:
            kwargs["issuer"] = self.settings.jwt_issuer
        # The algorithm family is chosen by which key we hold, never by the token: an RS256
        # public key can never be used as an HS256 secret.
        if alg == "HS256" and self.settings.jwt_secret:
            key: Any = self.settings.jwt_secret
            algorithms = ["HS256"]
        elif alg in ASYMMETRIC_ALGS and self._jwks is not None:
            key = await self._jwks.key(str(header.get("kid", "")))
            algorithms = [alg]
        else:
            raise IdentityError("unsupported token algorithm")
        try:
            claims = jwt.decode(token, key, algorithms=algorithms, **kwargs)
        except jwt.ExpiredSignatureError:
            raise IdentityError("token expired") from None
        except jwt.PyJWTError:
            raise IdentityError("invalid token") from None
        identity = identity_from_claims(claims, self.admin_rule)
        self._verified.put(token, identity, float(claims["exp"]))
        return identity


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    """A claim by name; a dotted name not present as such is a path (``realm_access.roles``)."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


@dataclass(frozen=True)
class AdminRule:
    """Who is a console admin by JWT: a user id in GATE_ADMIN_USERS, or a token whose
    GATE_ADMIN_CLAIM equals (or, for a list claim, contains) GATE_ADMIN_CLAIM_VALUE, compared
    exactly. Nothing is configured by default, so no JWT is an admin: a generic ``role: admin``
    means admin of whatever application the issuer serves, not of this ledger. (LibreChat's own
    JWT carries only id, username, provider and email; GATE_ADMIN_USERS is the way there.)"""

    claim: str = ""
    value: str = ""
    users: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings) -> AdminRule:
        users = frozenset(u.strip() for u in settings.admin_users.split(",") if u.strip())
        return cls(settings.admin_claim.strip(), settings.admin_claim_value, users)

    def grants(self, user_id: str, claims: Mapping[str, Any]) -> bool:
        if user_id in self.users:
            return True
        if not self.claim or not self.value:
            return False
        found = _claim(claims, self.claim)
        if isinstance(found, str):
            return found == self.value
        if isinstance(found, list):
            return any(isinstance(v, str) and v == self.value for v in found)
        return False


NO_ADMINS = AdminRule()
AUDIENCE_REQUIRED = ("GATE_JWT_AUDIENCE is required when GATE_JWKS_URL is set: an identity provider "
                     "serves other applications too, and without an audience their tokens (and "
                     "their admins) would be accepted here")


def identity_from_claims(claims: Mapping[str, Any], admin_rule: AdminRule = NO_ADMINS) -> Identity:
    raw_id = claims.get("id") or claims.get("sub")
    if not isinstance(raw_id, str | int) or isinstance(raw_id, bool):
        raise IdentityError("token has no user id")
    user_id = _clean(str(raw_id), MAX_ID_CHARS, "user id")
    if not user_id:
        raise IdentityError("token has no user id")
    email = claims.get("email")
    name = claims.get("name") or claims.get("username")
    return Identity(
        user_id,
        _clean(email, MAX_EMAIL_CHARS, "email") if isinstance(email, str) else None,
        _clean(name, MAX_ID_CHARS, "name") if isinstance(name, str) else None,
        admin=admin_rule.grants(user_id, claims),
    )


def mint_token(settings: Settings, user_id: str, *, email: str | None = None,
               admin: bool = False, ttl: int = 3600, now: float | None = None) -> str:
    """A HS256 token in LibreChat's claim shape, signed with GATE_JWT_SECRET (CLI and tests).

    ``admin=True`` adds what the configured admin rule accepts (GATE_ADMIN_CLAIM), and is
    refused when no rule would make this token an admin, rather than minting a token that
    only looks like one."""
    if not settings.jwt_secret:
        raise ValueError("GATE_JWT_SECRET is not set")
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {"id": user_id, "iat": issued, "exp": issued + ttl}
    if email:
        claims["email"] = email
    if admin:
        rule = AdminRule.from_settings(settings)
        if rule.claim and rule.value:
            claims[rule.claim] = rule.value
        if not rule.grants(user_id, claims):
            raise ValueError("no admin rule accepts this token: set GATE_ADMIN_CLAIM and "
                             "GATE_ADMIN_CLAIM_VALUE, or list the user in GATE_ADMIN_USERS")
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    return jwt.encode(claims, settings.jwt_secret, algorithm="HS256")
