"""Console hardening: the server-side session check, sign-in rate limits, and the pages and
API where an admin lists and revokes sessions.

- ``session_check`` (middleware): once per request under /admin and /me, a signed session
  cookie counts only if its ``web_sessions`` row is alive (``sessions.session_alive``); the
  verdict is left on the request, where ``sessions.read_session`` (hence the admin pages and
  ``kit.current_session``) reads it.
- ``signin_limits`` (middleware): POST /admin/login and POST /me/login are limited per client
  address and per account (admin name, e-mail address) in fixed 15-minute windows held in
  Redis, in process memory while Redis is down; over the limit the answer is a 429 page in
  the page's language with ``Retry-After``.
- /admin/sessions, /admin/users/{id}/sessions and /api/admin/sessions: live sessions with
  their creation, last use, address and browser; revoke one, or all of a subject ("sign out
  everywhere"), each revocation audited (``sessions.revoke_sessions``).

Mounted by ``app``; imports ``kit``, ``sessions`` and ``queries``, never another handler."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import jwt
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..ratelimit import abandon
from . import queries as q
from .kit import (
    SERVICES,
    WEB,
    Invalid,
    WebContext,
    admin_actor,
    client_ip,
    connecting_address,
    json_body,
    json_error,
    json_response,
    path_segment,
    reader_context,
    with_caller,
)
from .sessions import (
    ADMIN_COOKIE,
    ME_COOKIE,
    PRE_COOKIE,
    VERIFIED,
    WebSession,
    clear_cookie,
    read_session,
    revoke_sessions,
    session_alive,
    sid_hash,
    signed_session,
)

__all__ = ["MIDDLEWARES", "SIGNIN_WINDOW_SECONDS", "SigninLimiter", "setup"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SIGNIN_WINDOW_SECONDS = 15 * 60
# While Redis fails, it is skipped for this long (one slow call per interval at most).
REDIS_RETRY_SECONDS = 1.0
REDIS_TIMEOUT_SECONDS = 0.2  # a sign-in may wait this long for Redis, never longer
MAX_LOCAL_COUNTERS = 50_000  # the in-memory fallback's bound (expired windows pruned first)
SID_HEX = 64


# ---------------------------------------------------------------- the session check


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


# Which cookie each area's pages read; the cookies' own paths match (sessions.set_cookie).
AREAS = (("admin", ADMIN_COOKIE, "/admin"), ("me", ME_COOKIE, "/me"))


@web.middleware
async def session_check(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Checks the session cookies of /admin and /me against their rows, once per request."""
    verified: dict[str, WebSession | None] = {}
    request[VERIFIED] = verified
    path = request.path
    if path.startswith(("/admin/static/", "/me/static/")):  # files: no database round trip
        return await handler(request)
    for audience, cookie, prefix in AREAS:
        if _under(path, prefix) and cookie in request.cookies:
            service, ctx = request.app[SERVICES], request.app[WEB]
            session = signed_session(ctx.signer, audience, request, cookie)
            alive = session is not None and await session_alive(service.pool, audience, session,
                                                                service.clock())
            verified[audience] = session if alive else None
    response = await handler(request)
    # A cookie whose row is gone is dropped from the browser, so it stops costing a lookup
    # (unless this very response signs in again).
    dead = [(cookie, prefix) for audience, cookie, prefix in AREAS
            if audience in verified and verified[audience] is None and cookie not in response.cookies]
    if dead and not response.prepared:
        secure = request.app[WEB].secure_cookies
        for cookie, prefix in dead:
            clear_cookie(response, cookie, path=prefix, secure=secure)
    return response


# ---------------------------------------------------------------- sign-in rate limits


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int = 0  # seconds until the fullest window ends (0 when allowed)


# KEYS: the counters of one attempt; ARGV[1]: the window in ms. Each counter is incremented,
# and its window starts with its first attempt. Returns {count, ms left} per key.
ATTEMPT_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  local n = redis.call('INCR', key)
  if n == 1 then redis.call('PEXPIRE', key, ARGV[1]) end
  local ttl = redis.call('PTTL', key)
  if ttl < 0 then redis.call('PEXPIRE', key, ARGV[1]); ttl = tonumber(ARGV[1]) end
  out[#out + 1] = n
  out[#out + 1] = ttl
end
return out
"""

# A successful admin sign-in takes back the attempt it counted.
FORGIVE_LUA = """
for i, key in ipairs(KEYS) do
  local n = tonumber(redis.call('GET', key) or '0')
  if n > 0 then redis.call('DECR', key) end
end
return {}
"""


class SigninLimiter:
    """Fixed-window attempt counters, shared by every process through Redis.

    A fixed window (not GCRA): the limits read "N attempts per 15 minutes", and a refused
    visitor is told when the window ends. Counter names are hashed, so neither e-mail
    addresses nor admin names sit in Redis. When Redis fails, each process counts in its own
    memory for REDIS_RETRY_SECONDS before trying again (as the gate's limiter does): N
    processes then allow up to N x the limit, the same trade."""

    def __init__(self, redis: Redis | None, prefix: str, *, window: int = SIGNIN_WINDOW_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.prefix = prefix
        self.window = window
        self._clock = clock
        self._attempt = redis.register_script(ATTEMPT_LUA) if redis is not None else None
        self._forgive = redis.register_script(FORGIVE_LUA) if redis is not None else None
        self._local: dict[str, list[float]] = {}  # key -> [count, window end]
        self._skip_redis_until = 0.0

    def key(self, counter: str) -> str:
        digest = hashlib.sha256(counter.encode()).hexdigest()[:32]
        return f"{self.prefix}signin:{digest}"

    async def attempt(self, counters: Sequence[tuple[str, int]]) -> Verdict:
        """Counts one attempt on each (counter, limit); refused when any counter is past its
        limit. A limit below 1 means that counter is off."""
        counters = [(c, limit) for c, limit in counters if limit >= 1]
        if not counters:
            return Verdict(True)
        keys = [self.key(c) for c, _ in counters]
        found = await self._redis(self._attempt, keys, [self.window * 1000])
        if found is None:
            found = self._local_attempt(keys)
        waits = [math.ceil(int(ms_left) / 1000)
                 for (count, ms_left), (_, limit) in zip(zip(found[::2], found[1::2], strict=True), counters,
                                                         strict=True)
                 if int(count) > limit]
        # Retry-After speaks whole seconds, at least one: waiting it out always finds a new window.
        return Verdict(False, max(1, *waits)) if waits else Verdict(True)

    async def forgive(self, counters: Sequence[str]) -> None:
        keys = [self.key(c) for c in counters]
        if await self._redis(self._forgive, keys, []) is None:
            for key in keys:
                entry = self._local.get(key)
                if entry and entry[0] > 0:
                    entry[0] -= 1

    async def _redis(self, script: Any, keys: list[str], args: list[Any]) -> list[Any] | None:
        now = self._clock()
        if script is None or now < self._skip_redis_until:
            return None
        # In a task of its own, abandoned at the timeout: a cancel can be lost inside redis-py
        # (ratelimit.abandon), and the sign-in must not wait for the client's socket timeout.
        call = asyncio.ensure_future(script(keys=keys, args=args))
        try:
            await asyncio.wait({call}, timeout=REDIS_TIMEOUT_SECONDS)
            if not call.done():
                raise TimeoutError("Redis did not answer")
            return list(call.result())
        except (RedisError, TimeoutError, OSError) as exc:
            self._skip_redis_until = now + REDIS_RETRY_SECONDS
            log.warning("sign-in limiter: Redis failed (%s); counting in process memory", type(exc).__name__)
            return None
        finally:
            abandon(call)  # nothing when it ended; cancelled and read when it did not

    def _local_attempt(self, keys: list[str]) -> list[Any]:
        now = self._clock()
        if len(self._local) > MAX_LOCAL_COUNTERS:
            self._local = {k: v for k, v in self._local.items() if v[1] > now}
            if len(self._local) > MAX_LOCAL_COUNTERS:
                self._local.clear()  # bounded memory beats remembering every address
        out: list[Any] = []
        for key in keys:
            entry = self._local.get(key)
            if entry is None or entry[1] <= now:
                entry = self._local[key] = [0, now + self.window]
            entry[0] += 1
            out += [entry[0], (entry[1] - now) * 1000]
        return out


SIGNIN = web.AppKey("signin_limiter", SigninLimiter)
SIGNIN_ROUTES = {"/admin/login": "admin", "/me/login": "me"}


def admin_account(credential: Any) -> str:
    """The account a sign-in attempt aims at: a JWT's (unverified) user id, else the admin
    token (anything not JWT-shaped is a guess at it)."""
    text = credential.strip() if isinstance(credential, str) else ""
    if text.count(".") == 2:
        try:
            claims = jwt.decode(text, options={"verify_signature": False})
        except jwt.PyJWTError:
            return "jwt:?"
        if isinstance(claims, dict):
            return f"jwt:{claims.get('id') or claims.get('sub') or '?'}"
    return "admin-token"


def signin_counters(area: str, form: Mapping[str, Any], request: web.Request) -> list[str]:
    address = f"addr:{connecting_address(request)}"
    if area == "admin":
        return [address, f"admin:{admin_account(form.get('token'))}"]
    email = form.get("email")
    return [address, "email:" + (email.strip().lower() if isinstance(email, str) else "")]


@web.middleware
async def signin_limits(request: web.Request, handler: Handler) -> web.StreamResponse:
    """429 past the sign-in limits. Admin sign-ins count when they fail (a success takes its
    attempt back); /me link requests always count, known address or not (the answer must not
    tell them apart). Over the limit, even the right credential waits for the window to end:
    otherwise the limit would not slow down guessing."""
    area = SIGNIN_ROUTES.get(request.path) if request.method == "POST" else None
    if area is None:
        return await handler(request)
    ctx = request.app[WEB]
    settings, limiter = ctx.settings, request.app[SIGNIN]
    form = await request.post()
    if not ctx.csrf_ok(form, request.cookies.get(PRE_COOKIE)):
        # Refused by the handler before any credential is looked at: not an attempt (and a
        # page from another site cannot spend a visitor's attempts).
        return await handler(request)
    counters = signin_counters(area, form, request)
    verdict = await limiter.attempt([(counters[0], settings.signin_attempts_per_address),
                                     (counters[1], settings.signin_attempts_per_account)])
    if not verdict.allowed:
        return too_many(request, area, verdict.retry_after)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if area == "admin" and exc.status < 400:  # signed in: a redirect to the console
            await limiter.forgive(counters)
        raise
    if area == "admin" and response.status < 400:
        await limiter.forgive(counters)
    return response


def too_many(request: web.Request, area: str, retry_after: int) -> web.Response:
    """The 429 page, in the language of the page it answers: the console's, or /me's reader's."""
    ctx = request.app[WEB] if area == "admin" else reader_context(request)
    minutes = max(1, math.ceil(retry_after / 60))
    return ctx.render("too_many.html", {
        "title": ctx.t("limit.title"), "message": ctx.t("limit.message", minutes=minutes), "area": area,
        "nav": None}, status=429, headers={"Retry-After": str(retry_after)})


# ---------------------------------------------------------------- admin pages


def admin_page(handler: Callable[[web.Request, WebSession], Awaitable[web.StreamResponse]]) -> Handler:
    """A console page: signed in (else to the sign-in form, coming back here after), and a
    POST carries the session's CSRF token."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        ctx = request.app[WEB]
        session = read_session(ctx.signer, "admin", request, ADMIN_COOKIE)
        if session is None:
            back = request.path_qs if request.method == "GET" else "/admin/sessions"
            raise web.HTTPSeeOther("/admin/login?" + urlencode({"next": back}))
        if request.method == "POST" and not ctx.csrf_ok(await request.post(), session.sid):
            return ctx.error_page(ctx.t("error.csrf"), status=403, nav=nav(ctx, session))
        return await handler(request, session)

    return wrapped


def nav(ctx: WebContext, session: WebSession) -> dict[str, Any]:
    return {"current": "sessions", "actor": session.subject, "csrf": ctx.signer.csrf(session.sid)}


def grouped(rows: list[dict[str, Any]], current: WebSession | None) -> list[tuple[str, list[dict[str, Any]]]]:
    """Rows by subject (they come sorted by subject), the current session marked."""
    mine = sid_hash(current.sid) if current else None
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["subject"], []).append({**row, "current": row["id"] == mine})
    return list(groups.items())


def notice(ctx: WebContext, query: Mapping[str, str]) -> str | None:
    done = query.get("done", "")
    if done in ("revoked", "revoked_all", "none"):
        return ctx.t(f"sessions.done_{done}")
    return None


def sessions_url(kind: str, subject: str) -> str:
    return "/admin/sessions" if kind == "admin" else f"/admin/users/{path_segment(subject)}/sessions"


@admin_page
async def admin_sessions_page(request: web.Request, session: WebSession) -> web.StreamResponse:
    ctx, service = request.app[WEB], request.app[SERVICES]
    rows = await q.live_sessions(service.pool, "admin", None, service.clock())
    return ctx.render("admin/sessions.html", {
        "title": ctx.t("sessions.title"), "nav": nav(ctx, session), "kind": "admin", "subject": None,
        "groups": grouped(rows, session), "notice": notice(ctx, request.query)})


@admin_page
async def user_sessions_page(request: web.Request, session: WebSession) -> web.StreamResponse:
    ctx, service = request.app[WEB], request.app[SERVICES]
    user_id = request.match_info["user_id"]
    rows = await q.live_sessions(service.pool, "me", user_id, service.clock())
    if not rows and await q.get_account(service.pool, user_id) is None:
        return ctx.error_page(ctx.t("err.unknown_user"), status=404, nav=nav(ctx, session))
    return ctx.render("admin/sessions.html", {
        "title": ctx.t("sessions.user_title", user=user_id), "nav": nav(ctx, session), "kind": "me",
        "subject": user_id, "groups": grouped(rows, None), "notice": notice(ctx, request.query)})


@admin_page
async def revoke_post(request: web.Request, session: WebSession) -> web.StreamResponse:
    """One form for both pages: ``id`` revokes that session of ``kind`` and ``subject``;
    without ``id``, all of them ("sign out everywhere"). The redirect goes back to the page
    of that kind and subject."""
    ctx, service = request.app[WEB], request.app[SERVICES]
    form = await request.post()
    kind, subject, sid = (str(form.get(k, "")) for k in ("kind", "subject", "id"))
    if kind not in ("admin", "me") or not subject or (sid and len(sid) != SID_HEX):
        return ctx.error_page(ctx.t("sessions.bad_request"), status=400, nav=nav(ctx, session))
    revoked = await revoke_sessions(
        service.pool, actor=session.subject, source_ip=client_ip(request), now=service.clock(),
        sid_sha256=sid or None, kind=kind, subject=subject)
    done = "none" if not revoked else "revoked" if sid else "revoked_all"
    raise web.HTTPSeeOther(f"{sessions_url(kind, subject)}?done={done}")


# ---------------------------------------------------------------- JSON API


# Authorization: Bearer <admin token or admin JWT>, as the rest of /api/admin.
admin_api = with_caller(admin_actor)


def _bad(ctx: WebContext, field: str) -> web.Response:
    return json_error(400, "validation_failed", ctx.t("sessions.bad_request"),
                      fields={field: {"code": "invalid", "message": ctx.t("sessions.bad_request")}})


@admin_api
async def api_sessions(request: web.Request, actor: str) -> web.StreamResponse:
    ctx, service = request.app[WEB], request.app[SERVICES]
    kind = request.query.get("kind", "admin")
    if kind not in ("admin", "me"):
        return _bad(ctx, "kind")
    subject = request.query.get("subject") or None
    rows = await q.live_sessions(service.pool, kind, subject, service.clock())
    return json_response({"sessions": rows})


@admin_api
async def api_revoke(request: web.Request, actor: str) -> web.StreamResponse:
    """{"id": "<session id>"} or {"kind": "admin"|"me", "subject": "..."} (all of them)."""
    ctx, service = request.app[WEB], request.app[SERVICES]
    try:
        data = await json_body(request)
    except Invalid:
        return _bad(ctx, "body")
    sid, kind, subject = data.get("id"), data.get("kind"), data.get("subject")
    common = {"actor": actor, "source_ip": client_ip(request), "now": service.clock()}
    if sid is not None:
        if not isinstance(sid, str) or len(sid) != SID_HEX or kind is not None or subject is not None:
            return _bad(ctx, "id")
        revoked = await revoke_sessions(service.pool, sid_sha256=sid.lower(), **common)
        if not revoked:
            return json_error(404, "unknown_session", ctx.t("sessions.unknown"))
    else:
        if kind not in ("admin", "me"):
            return _bad(ctx, "kind")
        if not isinstance(subject, str) or not subject:
            return _bad(ctx, "subject")
        revoked = await revoke_sessions(service.pool, kind=kind, subject=subject, **common)
    return json_response({"revoked": revoked})


# ---------------------------------------------------------------- mounting


MIDDLEWARES = (session_check, signin_limits)


def setup(app: web.Application) -> None:
    service = app[SERVICES]
    # getattr: stand-ins of tests that build pages alone have no Redis (memory counts then).
    app[SIGNIN] = SigninLimiter(getattr(service, "redis", None), service.settings.redis_prefix)
    r = app.router
    r.add_get("/admin/sessions", admin_sessions_page)
    r.add_post("/admin/sessions/revoke", revoke_post)
    r.add_get("/admin/users/{user_id}/sessions", user_sessions_page)
    r.add_get("/api/admin/sessions", api_sessions)
    r.add_post("/api/admin/sessions/revoke", api_revoke)
