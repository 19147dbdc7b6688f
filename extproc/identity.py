"""Who is calling: a verified JWT, or LibreChat's identity headers proven by the gateway key.

An identity header without proof is never trusted (DESIGN.md section 2).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
    """Signing keys from a JWKS URL, fetched off the event loop and cached; an unknown
    ``kid`` triggers at most one refresh per ``min_refresh`` seconds."""

    def __init__(self, url: str, ttl: float = 300.0, min_refresh: float = 10.0) -> None:
        self.url = url
        self.ttl = ttl
        self.min_refresh = min_refresh
        self._keys: dict[str, Any] = {}
        self._fetched = 0.0
        self._lock = asyncio.Lock()

    def _fetch(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url, timeout=5) as resp:
            data = json.load(resp)
        keys = {}
        for jwk in data.get("keys", []):
            try:
                keys[jwk.get("kid", "")] = jwt.PyJWK(jwk)
            except jwt.PyJWTError as exc:
                log.warning("ignoring unusable JWKS key %s: %s", jwk.get("kid"), exc)
        return keys

    async def key(self, kid: str) -> Any:
        fresh = time.monotonic() - self._fetched < self.ttl
        if kid in self._keys and fresh:
            return self._keys[kid]
        async with self._lock:
            if kid not in self._keys or time.monotonic() - self._fetched >= self.ttl:
                if time.monotonic() - self._fetched >= self.min_refresh or not self._keys:
                    try:
                        self._keys = await asyncio.to_thread(self._fetch)
                        self._fetched = time.monotonic()
                    except (OSError, ValueError) as exc:
                        log.warning("JWKS fetch failed: %s", exc)
        if kid not in self._keys:
            raise IdentityError("unknown signing key")
        return self._keys[kid]


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
        self.settings = settings
        self.mode = settings.identity_mode
        self.jwt_header = settings.jwt_header.lower()
        self._gate_key = settings.gate_key.encode()
        self._jwks = JwksCache(settings.jwks_url) if settings.jwks_url else None
        self._options: dict[str, Any] = {"require": ["exp"]}
        self._verified = VerifiedCache()

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
        identity = identity_from_claims(claims)
        self._verified.put(token, identity, float(claims["exp"]))
        return identity


def identity_from_claims(claims: Mapping[str, Any]) -> Identity:
    raw_id = claims.get("id") or claims.get("sub")
    if not isinstance(raw_id, str | int) or isinstance(raw_id, bool):
        raise IdentityError("token has no user id")
    user_id = _clean(str(raw_id), MAX_ID_CHARS, "user id")
    if not user_id:
        raise IdentityError("token has no user id")
    email = claims.get("email")
    name = claims.get("name") or claims.get("username")
    role = claims.get("role")
    roles = claims.get("roles")
    admin = (isinstance(role, str) and role.lower() == "admin") or (
        isinstance(roles, list) and "admin" in [str(r).lower() for r in roles])
    return Identity(
        user_id,
        _clean(email, MAX_EMAIL_CHARS, "email") if isinstance(email, str) else None,
        _clean(name, MAX_ID_CHARS, "name") if isinstance(name, str) else None,
        admin=admin,
    )


def mint_token(settings: Settings, user_id: str, *, email: str | None = None,
               admin: bool = False, ttl: int = 3600, now: float | None = None) -> str:
    """A HS256 token in LibreChat's claim shape, signed with GATE_JWT_SECRET (CLI and tests)."""
    if not settings.jwt_secret:
        raise ValueError("GATE_JWT_SECRET is not set")
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {"id": user_id, "iat": issued, "exp": issued + ttl}
    if email:
        claims["email"] = email
    if admin:
        claims["role"] = "admin"
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    return jwt.encode(claims, settings.jwt_secret, algorithm="HS256")
