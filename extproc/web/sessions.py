"""Web sign-in: server-side sessions behind signed cookies, CSRF tokens, single-use magic
links, admin credentials.

Every secret here is derived from GATE_JWT_SECRET and GATE_ADMIN_TOKEN with HMAC-SHA256 and
a purpose label, so one key never serves two purposes (a /me session cookie is not an admin
cookie, a magic link is not a cookie) and rotating either secret signs everyone out.
Signatures and credentials are compared in constant time.

A session is a random id (``secrets.token_urlsafe(32)``) carried by the signed cookie and a
``web_sessions`` row that keeps only the id's SHA-256: a request is signed in only when the
signature verifies AND the row exists, is not revoked and not expired. The row is what lets
an admin list sessions with their last use and revoke them (the cookie alone could not be
taken back before it expires). The check runs once per request in the console's middleware
(``extproc.web.security``), which leaves its verdict on the request for ``read_session``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import jwt
from aiohttp import web

from ..identity import Authenticator, IdentityError
from ..ledger import audit
from ..settings import Settings

ADMIN_COOKIE = "solaris_admin"
ME_COOKIE = "solaris_me"
PRE_COOKIE = "solaris_pre"  # binds the CSRF token of a sign-in form before any session exists
ADMIN_SESSION_SECONDS = 8 * 3600
ME_SESSION_SECONDS = 24 * 3600
PRE_SESSION_SECONDS = 3600
MAGIC_LINK_SECONDS = 15 * 60
MAGIC_LINK_INTERVAL = timedelta(seconds=60)  # at most one link per user per minute
# last_used_at is written at most once a minute per session: the list shows "last use" to
# the minute, and a page view does not cost a write.
TOUCH_INTERVAL = timedelta(seconds=60)
# Rows expired (or revoked and expired) this long ago are deleted when a session opens: the
# audit log keeps every revocation, the table only what is still worth listing.
SESSION_RETENTION = timedelta(days=7)
MAX_USER_AGENT = 300


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """HMAC signing with purpose-bound keys derived from the deployment's secrets."""

    def __init__(self, settings: Settings) -> None:
        # Without either secret anyone could mint a cookie: web sign-in is then disabled.
        self.enabled = bool(settings.jwt_secret or settings.admin_token)
        material = f"{settings.jwt_secret}\0{settings.admin_token}".encode()
        self._root = hmac.new(material, b"solaris-web-v1", hashlib.sha256).digest()

    def _mac(self, purpose: str, data: bytes) -> bytes:
        key = hmac.new(self._root, purpose.encode(), hashlib.sha256).digest()
        return hmac.new(key, data, hashlib.sha256).digest()

    def sign(self, purpose: str, payload: dict[str, Any]) -> str:
        body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        return f"{body}.{_b64(self._mac(purpose, body.encode()))}"

    def verify(self, purpose: str, token: str | None, now: float | None = None) -> dict[str, Any] | None:
        """The payload of a token signed for ``purpose`` and not expired, else None."""
        if not self.enabled or not token or len(token) > 4096 or token.count(".") != 1:
            return None
        body, sig = token.split(".")
        if not hmac.compare_digest(sig.encode(), _b64(self._mac(purpose, body.encode())).encode()):
            return None
        try:
            payload = json.loads(_unb64(body))
        except ValueError:
            return None
        if not isinstance(payload, dict) or not isinstance(payload.get("exp"), int | float):
            return None
        if payload["exp"] < (time.time() if now is None else now):
            return None
        return payload

    def csrf(self, binding: str) -> str:
        """The CSRF token of forms shown to the holder of session (or pre-session) ``binding``."""
        return _b64(self._mac("csrf", binding.encode()))

    def csrf_ok(self, binding: str | None, token: str | None) -> bool:
        if not binding or not token:
            return False
        return hmac.compare_digest(token.encode(), self.csrf(binding).encode())


@dataclass(frozen=True)
class WebSession:
    subject: str  # admin: the actor recorded in the audit log; me: the user id
    sid: str  # random per sign-in: what CSRF tokens are bound to
    expires: int
    via: str = ""


# Where the middleware leaves its verdict on a request: audience -> the session, or None.
VERIFIED = web.RequestKey("solaris_sessions", dict[str, WebSession | None])


def new_session(subject: str, ttl: int, via: str = "", *, not_after: int | None = None,
                now: int | None = None) -> WebSession:
    """A fresh session (not yet usable: ``open_session`` writes its row). ``now``: the
    instant the caller also computes the cookie's Max-Age from (``expires - now``), so the
    two agree whatever the row's insert takes."""
    expires = (int(time.time()) if now is None else now) + ttl
    if not_after is not None:
        expires = min(expires, not_after)
    return WebSession(subject, secrets.token_urlsafe(32), expires, via)


def sid_hash(sid: str) -> str:
    """What the table keeps of a session id (and what the console shows as its id)."""
    return hashlib.sha256(sid.encode()).hexdigest()


def session_cookie(signer: Signer, audience: str, session: WebSession) -> str:
    return signer.sign(f"session:{audience}", {
        "sub": session.subject, "sid": session.sid, "exp": session.expires, "via": session.via})


def signed_session(signer: Signer, audience: str, request: web.Request, cookie: str) -> WebSession | None:
    """The session named by a well-signed, unexpired cookie (its row not yet checked)."""
    payload = signer.verify(f"session:{audience}", request.cookies.get(cookie))
    if payload is None or not isinstance(payload.get("sub"), str) or not isinstance(payload.get("sid"), str):
        return None
    return WebSession(payload["sub"], payload["sid"], int(payload["exp"]), str(payload.get("via", "")))


def read_session(signer: Signer, audience: str, request: web.Request, cookie: str) -> WebSession | None:
    """The request's session of ``audience`` as the middleware found it: signed, and its row
    alive. None when signed out, revoked, expired, or when no check ran (fail closed: a route
    the middleware did not see is never signed in). ``signer`` and ``cookie`` name what the
    middleware checked; kept so callers read as before."""
    verified = request.get(VERIFIED)
    return None if verified is None else verified.get(audience)


def printable(text: str | None, limit: int) -> str | None:
    """Client-written text fit to store and show: control characters dropped, at most ``limit``
    characters; None when nothing is left."""
    if not text:
        return None
    return "".join(c for c in text if c.isprintable())[:limit] or None


async def open_session(pool: asyncpg.Pool, kind: str, session: WebSession, *, source_ip: str | None,
                       user_agent: str | None, now: datetime) -> None:
    """Write the row that makes ``session`` usable (at sign-in, before its cookie is set)."""
    assert kind in ("admin", "me"), kind
    expires = datetime.fromtimestamp(session.expires, UTC)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM web_sessions WHERE expires_at < $1", now - SESSION_RETENTION)
        await conn.execute(
            "INSERT INTO web_sessions (sid_sha256, kind, subject, created_at, last_used_at, expires_at,"
            " source_ip, user_agent) VALUES ($1, $2, $3, $4, $4, $5, $6, $7)",
            sid_hash(session.sid), kind, session.subject, now, expires, printable(source_ip, 300),
            printable(user_agent, MAX_USER_AGENT))


async def session_alive(pool: asyncpg.Pool, kind: str, session: WebSession, now: datetime) -> bool:
    """Whether the row of a signed session exists, is not revoked and not expired, for the
    same kind and subject as the cookie; notes its use (at most once per TOUCH_INTERVAL)."""
    last = await pool.fetchval(
        "SELECT last_used_at FROM web_sessions WHERE sid_sha256 = $1 AND kind = $2 AND subject = $3"
        " AND revoked_at IS NULL AND expires_at > $4", sid_hash(session.sid), kind, session.subject, now)
    if last is None:
        return False
    if last <= now - TOUCH_INTERVAL:
        # Conditional: of concurrent requests (any process) one writes, the others match nothing.
        await pool.execute(
            "UPDATE web_sessions SET last_used_at = $2 WHERE sid_sha256 = $1 AND last_used_at <= $3",
            sid_hash(session.sid), now, now - TOUCH_INTERVAL)
    return True


async def end_session(pool: asyncpg.Pool, kind: str, session: WebSession, now: datetime) -> None:
    """Sign-out: the session's row is revoked, so its cookie is worthless even if kept."""
    await pool.execute(
        "UPDATE web_sessions SET revoked_at = $3 WHERE sid_sha256 = $1 AND kind = $2 AND revoked_at IS NULL",
        sid_hash(session.sid), kind, now)


def set_cookie(response: web.StreamResponse, name: str, value: str, *, path: str, max_age: int,
               secure: bool) -> None:
    # HttpOnly: scripts never see it; SameSite=Strict: no other site's page can make the
    # browser send it (the first line of CSRF defence; the form token is the second).
    response.set_cookie(name, value, path=path, max_age=max(max_age, 0), httponly=True,
                        samesite="Strict", secure=secure)


def clear_cookie(response: web.StreamResponse, name: str, *, path: str, secure: bool) -> None:
    response.set_cookie(name, "", path=path, max_age=0, expires="Thu, 01 Jan 1970 00:00:00 GMT",
                        httponly=True, samesite="Strict", secure=secure)


def pre_session(request: web.Request) -> tuple[str, bool]:
    """The pre-session id of a sign-in form's visitor: (id, whether it must be set now)."""
    current = request.cookies.get(PRE_COOKIE, "")
    if 16 <= len(current) <= 64 and current.replace("-", "").replace("_", "").isalnum():
        return current, False
    return secrets.token_urlsafe(24), True


# ---------------------------------------------------------------- admin credentials


class AuthFailure(Exception):
    def __init__(self, status: int, code: str) -> None:
        super().__init__(code)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Admin:
    actor: str  # as written to audit_log.actor
    via: str  # "token" or "jwt"
    expires: int | None = None  # a JWT's own expiry


async def admin_from_credential(settings: Settings, authenticator: Authenticator, credential: str) -> Admin:
    """The admin API token or an admin JWT -> Admin; AuthFailure 401 (not a valid credential)
    or 403 (valid, but not an admin)."""
    credential = credential.strip()
    if not credential:
        raise AuthFailure(401, "missing_credentials")
    if settings.admin_token and hmac.compare_digest(credential.encode(), settings.admin_token.encode()):
        return Admin("admin-token", "token")
    if credential.count(".") != 2:
        raise AuthFailure(401, "invalid_credentials")
    try:
        identity = await authenticator.verify_jwt(credential)
    except IdentityError:
        raise AuthFailure(401, "invalid_credentials") from None
    if not identity.admin:
        raise AuthFailure(403, "not_admin")
    exp = jwt.decode(credential, options={"verify_signature": False}).get("exp")
    return Admin(f"jwt:{identity.user_id}", "jwt", int(exp) if isinstance(exp, int | float) else None)


# ---------------------------------------------------------------- magic links


class MagicLinks:
    """Signed, expiring, single-use sign-in links for /me. The signature makes a link
    unforgeable; the magic_links row makes it usable once."""

    def __init__(self, pool: asyncpg.Pool, signer: Signer) -> None:
        self.pool = pool
        self.signer = signer

    async def issue(self, user_id: str, now: datetime) -> str | None:
        """A new link token for ``user_id``, or None when one was issued within the last
        minute (a flood of requests never becomes a flood of e-mails)."""
        nonce = secrets.token_urlsafe(24)
        expires = now + timedelta(seconds=MAGIC_LINK_SECONDS)
        async with self.pool.acquire() as conn, conn.transaction():
            # Housekeeping: links are useless a day after they expire.
            await conn.execute("DELETE FROM magic_links WHERE expires_at < $1", now - timedelta(days=1))
            inserted = await conn.fetchval(
                "INSERT INTO magic_links (nonce, user_id, created_at, expires_at)"
                " SELECT $1, $2, $3, $4 WHERE NOT EXISTS (SELECT 1 FROM magic_links"
                "   WHERE user_id = $2 AND created_at > $5) RETURNING true",
                nonce, user_id, now, expires, now - MAGIC_LINK_INTERVAL)
        if not inserted:
            return None
        return self.signer.sign("magic-link", {"uid": user_id, "n": nonce, "exp": int(expires.timestamp())})

    def peek(self, token: str | None) -> str | None:
        """The user id of a well-signed, unexpired link (not yet checked for reuse)."""
        payload = self.signer.verify("magic-link", token)
        if payload is None or not isinstance(payload.get("uid"), str) or not isinstance(payload.get("n"), str):
            return None
        return str(payload["uid"])

    async def consume(self, token: str | None, now: datetime) -> str | None:
        """The user id of a valid link, marking it used; None when invalid, expired or used."""
        payload = self.signer.verify("magic-link", token, now.timestamp())
        if payload is None or not isinstance(payload.get("uid"), str) or not isinstance(payload.get("n"), str):
            return None
        return await self.pool.fetchval(
            "UPDATE magic_links SET used_at = $3 WHERE nonce = $1 AND user_id = $2"
            " AND used_at IS NULL AND expires_at > $3 RETURNING user_id",
            payload["n"], payload["uid"], now)


async def revoke_sessions(pool: asyncpg.Pool, *, actor: str, source_ip: str | None, now: datetime,
                          sid_sha256: str | None = None, kind: str | None = None,
                          subject: str | None = None) -> int:
    """An admin revokes one session (by its id, the SHA-256 the console shows; ``kind`` and
    ``subject``, when given, must match it) or every live session of a subject ("sign out
    everywhere"), with the audit row in the same transaction (I4). Returns how many were
    revoked; nothing revoked writes no audit row."""
    assert sid_sha256 is not None or (kind is not None and subject is not None), "a session, or a subject"
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "UPDATE web_sessions SET revoked_at = $1 WHERE revoked_at IS NULL AND expires_at > $1"
            " AND ($2::text IS NULL OR sid_sha256 = $2) AND ($3::text IS NULL OR kind = $3)"
            " AND ($4::text IS NULL OR subject = $4)"
            " RETURNING sid_sha256, kind, subject, created_at, source_ip",
            now, sid_sha256, kind, subject)
        if not rows:
            return 0
        first = rows[0]
        # A /me session's target is the user (it shows on the user's audit list); an admin's
        # session has no account to point at: who it was is in "after".
        await audit(conn, actor, "session_revoke" if sid_sha256 else "session_revoke_all",
                    first["subject"] if first["kind"] == "me" else None, None,
                    {"kind": first["kind"], "subject": first["subject"], "revoked": len(rows),
                     "sessions": [r["sid_sha256"][:16] for r in rows]},
                    None, source_ip, now)
    return len(rows)
