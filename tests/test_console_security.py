"""Console hardening: server-side sessions (listed, revoked, expired, signed out), the sign-in
limits per address and per account (429 page, Retry-After, Redis down), and the Secure cookie
rule. Real processor, PostgreSQL and Redis; the browser flow is in Chromium.

The sign-in limits are tested on services of their own (own Redis key prefix, small limits):
the suite's shared service lets everyone in from 127.0.0.1 (tests/conftest.py)."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml
from redis.asyncio import Redis
from support.browser import DESKTOP, PHONE, axe_violations, findings, missing_tools, report, tab_to
from support.gate import open_account
from support.web import admin_browser, api, base, csrf_of
from yarl import URL

from extproc.app import Service
from extproc.identity import mint_token
from extproc.settings import Settings
from extproc.web import security
from extproc.web.sessions import (
    ADMIN_COOKIE,
    ME_COOKIE,
    Signer,
    WebSession,
    new_session,
    open_session,
    session_cookie,
    sid_hash,
)


def client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def me_client(svc: Service, user: str) -> tuple[aiohttp.ClientSession, WebSession]:
    """A browser signed in to /me as ``user`` (the cookie and row the e-mailed link gives)."""
    session = new_session(user, 3600, "test")
    await open_session(svc.pool, "me", session, source_ip="198.51.100.7", user_agent="TestBrowser/1.0",
                       now=svc.clock())
    browser = client()
    browser.cookie_jar.update_cookies({ME_COOKIE: session_cookie(Signer(svc.settings), "me", session)},
                                      response_url=URL(base(svc) + "/me"))
    return browser, session


async def sign_in(svc: Service, credential: str, **headers: str) -> aiohttp.ClientSession:
    """An admin browser signed in with ``credential`` (asserts the sign-in worked)."""
    s = client()
    status, _ = await login_attempt(s, svc, credential, **headers)
    assert status == 303
    return s


async def login_attempt(s: aiohttp.ClientSession, svc: Service, credential: str,
                        **headers: str) -> tuple[int, aiohttp.ClientResponse]:
    """One sign-in with the form's CSRF token, as a visitor not yet signed in."""
    s.cookie_jar.clear(lambda cookie: cookie.key == ADMIN_COOKIE)
    async with s.get(base(svc) + "/admin/login") as resp:
        page = await resp.text()
    async with s.post(base(svc) + "/admin/login", allow_redirects=False, headers=headers,
                      data={"csrf": csrf_of(page), "token": credential, "next": "/admin"}) as resp:
        await resp.read()
        return resp.status, resp


async def status_of(s: aiohttp.ClientSession, url: str) -> int:
    async with s.get(url, allow_redirects=False) as resp:
        await resp.read()
        return resp.status


async def row(svc: Service, sid: str) -> asyncpg.Record:
    return await svc.pool.fetchrow("SELECT * FROM web_sessions WHERE sid_sha256 = $1", sid_hash(sid))


def admin_sid(s: aiohttp.ClientSession, svc: Service) -> str:
    """The session id inside a signed-in admin browser's cookie."""
    cookie = s.cookie_jar.filter_cookies(URL(base(svc) + "/admin"))[ADMIN_COOKIE].value
    payload = Signer(svc.settings).verify("session:admin", cookie)
    assert payload is not None
    return str(payload["sid"])


# ---------------------------------------------------------------- sessions on the server


async def test_a_valid_cookie_needs_a_live_row(service, settings):
    s = await admin_browser(service, settings)
    try:
        sid = admin_sid(s, service)
        stored = await row(service, sid)
        # The table keeps only the SHA-256 of the id: a copy of it signs nobody in.
        assert stored["kind"] == "admin" and stored["subject"] == "admin-token"
        assert await service.pool.fetchval("SELECT count(*) FROM web_sessions WHERE sid_sha256 = $1", sid) == 0
        assert await status_of(s, base(service) + "/admin") == 200
        # revoked in the database: the well-signed cookie is refused from the next request on
        await service.pool.execute("UPDATE web_sessions SET revoked_at = now() WHERE sid_sha256 = $1",
                                   sid_hash(sid))
        async with s.get(base(service) + "/admin") as resp:
            assert resp.status == 401
            # the dead cookie is dropped from the browser
            assert resp.cookies[ADMIN_COOKIE].value == "" and resp.cookies[ADMIN_COOKIE]["max-age"] == "0"
    finally:
        await s.close()

    # expired row (its cookie still within its own expiry): refused
    s = await admin_browser(service, settings)
    try:
        sid = admin_sid(s, service)
        assert await status_of(s, base(service) + "/admin/users") == 200
        await service.pool.execute("UPDATE web_sessions SET expires_at = now() - interval '1 second'"
                                   " WHERE sid_sha256 = $1", sid_hash(sid))
        assert await status_of(s, base(service) + "/admin/users") == 401
    finally:
        await s.close()

    # a cookie signed with the right key for a session that was never opened: refused
    forged = client()
    try:
        cookie = session_cookie(Signer(settings), "admin", new_session("admin-token", 3600, "token"))
        forged.cookie_jar.update_cookies({ADMIN_COOKIE: cookie}, response_url=URL(base(service) + "/admin"))
        assert await status_of(forged, base(service) + "/admin") == 401
    finally:
        await forged.close()


async def test_a_session_of_one_kind_is_not_a_session_of_another(service, settings, user):
    """A /me row does not make an admin cookie valid, even for the same id and subject."""
    await open_account(service, user)
    browser, session = await me_client(service, user)
    try:
        admin_cookie = session_cookie(Signer(settings), "admin", session)
        browser.cookie_jar.update_cookies({ADMIN_COOKIE: admin_cookie}, response_url=URL(base(service) + "/admin"))
        assert await status_of(browser, base(service) + "/admin") == 401
        assert await status_of(browser, base(service) + "/me") == 200
    finally:
        await browser.close()


async def test_last_use_is_written_at_most_once_a_minute(service, settings):
    s = await admin_browser(service, settings)
    try:
        sid = admin_sid(s, service)
        first = (await row(service, sid))["last_used_at"]
        for _ in range(3):
            assert await status_of(s, base(service) + "/admin/sessions") == 200
        assert (await row(service, sid))["last_used_at"] == first  # within the minute: no write
        await service.pool.execute("UPDATE web_sessions SET last_used_at = last_used_at - interval '2 minutes'"
                                   " WHERE sid_sha256 = $1", sid_hash(sid))
        assert await status_of(s, base(service) + "/admin/sessions") == 200
        assert (await row(service, sid))["last_used_at"] > first - timedelta(seconds=1)
        assert (await row(service, sid))["last_used_at"] >= first
    finally:
        await s.close()


async def test_sign_out_revokes_the_row(service, settings, user):
    s = await admin_browser(service, settings)
    try:
        sid = admin_sid(s, service)
        kept = s.cookie_jar.filter_cookies(URL(base(service) + "/admin"))[ADMIN_COOKIE].value
        async with s.get(base(service) + "/admin") as resp:
            page = await resp.text()
        async with s.post(base(service) + "/admin/logout", allow_redirects=False,
                          data={"csrf": csrf_of(page)}) as resp:
            assert resp.status == 303
        assert (await row(service, sid))["revoked_at"] is not None
    finally:
        await s.close()
    replay = client()  # a copy of the cookie kept from before the sign-out
    try:
        replay.cookie_jar.update_cookies({ADMIN_COOKIE: kept}, response_url=URL(base(service) + "/admin"))
        assert await status_of(replay, base(service) + "/admin") == 401
    finally:
        await replay.close()

    await open_account(service, user)
    browser, session = await me_client(service, user)
    try:
        async with browser.get(base(service) + "/me") as resp:
            page = await resp.text()
        async with browser.post(base(service) + "/me/logout", allow_redirects=False,
                                data={"csrf": csrf_of(page)}) as resp:
            assert resp.status == 303
        assert (await row(service, session.sid))["revoked_at"] is not None
    finally:
        await browser.close()


async def test_admin_lists_and_revokes_admin_sessions_audited(service, settings):
    admin = f"ana-{uuid.uuid4().hex[:8]}"
    credential = mint_token(settings, admin, admin=True)
    first = await sign_in(service, credential, **{"user-agent": "FirstBrowser/1.0"})
    second = await sign_in(service, credential, **{"user-agent": "SecondBrowser/2.0"})
    try:
        async with second.get(base(service) + "/admin/sessions") as resp:
            assert resp.status == 200
            page = await resp.text()
        assert "FirstBrowser/1.0" in page and "SecondBrowser/2.0" in page
        assert f"jwt:{admin}" in page and "esta sessão" in page and 'href="/admin/sessions"' in page
        first_id = sid_hash(admin_sid(first, service))
        async with second.post(base(service) + "/admin/sessions/revoke", allow_redirects=False,
                               data={"csrf": csrf_of(page), "kind": "admin", "subject": f"jwt:{admin}",
                                     "id": first_id}) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/admin/sessions?done=revoked"
        assert await status_of(first, base(service) + "/admin") == 401  # signed out on its next request
        # an id revokes only a session of the kind and subject the form names
        second_id = sid_hash(admin_sid(second, service))
        async with second.post(base(service) + "/admin/sessions/revoke", allow_redirects=False,
                               data={"csrf": csrf_of(page), "kind": "me", "subject": f"jwt:{admin}",
                                     "id": second_id}) as resp:
            assert resp.status == 303 and resp.headers["Location"].endswith("done=none")
        assert await status_of(second, base(service) + "/admin") == 200
        audit = await service.pool.fetchrow(
            "SELECT * FROM audit_log WHERE action = 'session_revoke' AND actor = $1 ORDER BY id DESC LIMIT 1",
            f"jwt:{admin}")
        assert audit is not None and f'"subject": "jwt:{admin}"' in audit["after"]
        assert first_id[:16] in audit["after"]

        # sign out everywhere: every session of this admin, the current one included
        third = await sign_in(service, credential)
        try:
            async with second.get(base(service) + "/admin/sessions") as resp:
                page = await resp.text()
            async with second.post(base(service) + "/admin/sessions/revoke", allow_redirects=False,
                                   data={"csrf": csrf_of(page), "kind": "admin", "subject": f"jwt:{admin}"}) as resp:
                assert resp.status == 303
            assert await status_of(second, base(service) + "/admin") == 401
            assert await status_of(third, base(service) + "/admin") == 401
            audit = await service.pool.fetchrow(
                "SELECT * FROM audit_log WHERE action = 'session_revoke_all' AND actor = $1", f"jwt:{admin}")
            assert audit is not None and '"revoked": 2' in audit["after"]
        finally:
            await third.close()
    finally:
        await first.close()
        await second.close()


async def test_admin_revokes_a_users_me_sessions(service, settings, user):
    await open_account(service, user, email=f"{user}@example.com")
    browser, session = await me_client(service, user)
    other, _ = await me_client(service, user)
    admin = await admin_browser(service, settings)
    try:
        assert await status_of(browser, base(service) + "/me") == 200
        async with admin.get(base(service) + f"/admin/users/{user}") as resp:
            assert f'href="/admin/users/{user}/sessions"' in await resp.text()
        async with admin.get(base(service) + f"/admin/users/{user}/sessions") as resp:
            assert resp.status == 200
            page = await resp.text()
        assert "TestBrowser/1.0" in page and "198.51.100.7" in page and sid_hash(session.sid) in page
        async with admin.post(base(service) + "/admin/sessions/revoke", allow_redirects=False,
                              data={"csrf": csrf_of(page), "kind": "me", "subject": user,
                                    "id": sid_hash(session.sid)}) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == f"/admin/users/{user}/sessions?done=revoked"
        async with browser.get(base(service) + "/me") as resp:  # the sign-in form again
            assert 'name="email"' in await resp.text()
        assert await status_of(other, base(service) + "/me/statement.csv") == 200
        audit = await service.pool.fetchrow(
            "SELECT * FROM audit_log WHERE action = 'session_revoke' AND target = $1", user)
        assert audit is not None and audit["actor"] == "admin-token"

        # the API twin: list, revoke the other one, then nothing is left
        status, body = await api(admin, base(service) + f"/api/admin/sessions?kind=me&subject={user}",
                                 token=settings.admin_token)
        assert status == 200 and len(body["sessions"]) == 1
        listed = body["sessions"][0]
        assert set(listed) == {"id", "kind", "subject", "created_at", "last_used_at", "expires_at",
                               "source_ip", "user_agent"}
        status, body = await api(admin, base(service) + "/api/admin/sessions/revoke", "POST",
                                 token=settings.admin_token, body={"id": listed["id"]})
        assert status == 200 and body == {"revoked": 1}
        assert await status_of(other, base(service) + "/me/statement.csv") == 401
        status, body = await api(admin, base(service) + "/api/admin/sessions/revoke", "POST",
                                 token=settings.admin_token, body={"id": listed["id"]})
        assert status == 404 and body["error"]["code"] == "unknown_session"
        status, body = await api(admin, base(service) + "/api/admin/sessions/revoke", "POST",
                                 token=settings.admin_token, body={"kind": "me", "subject": user})
        assert status == 200 and body == {"revoked": 0}
    finally:
        for s in (browser, other, admin):
            await s.close()


async def test_sessions_api_refuses_bad_input_and_strangers(service, settings, http):
    url = base(service) + "/api/admin/sessions"
    status, body = await api(http, url)
    assert status == 401
    status, body = await api(http, url, token=mint_token(settings, "not-an-admin"))
    assert status == 403
    status, body = await api(http, url + "?kind=root", token=settings.admin_token)
    assert status == 400 and body["error"]["code"] == "validation_failed"
    for bad in ({"id": "short"}, {"id": 7}, {"kind": "admin"}, {"kind": "x", "subject": "y"},
                {"id": "a" * 64, "kind": "me", "subject": "y"}, [1]):
        status, body = await api(http, url + "/revoke", "POST", token=settings.admin_token, body=bad)
        assert status == 400, bad
    status, body = await api(http, url + "/revoke", "POST", token=settings.admin_token, raw=b"{nope")
    assert status == 400


async def test_sessions_page_needs_a_session_and_csrf(service, settings):
    s = client()
    try:
        async with s.get(base(service) + "/admin/sessions", allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"].startswith("/admin/login?next=")
    finally:
        await s.close()
    s = await admin_browser(service, settings)
    try:
        async with s.post(base(service) + "/admin/sessions/revoke",
                          data={"kind": "admin", "subject": "admin-token"}) as resp:
            assert resp.status == 403
        assert await status_of(s, base(service) + "/admin") == 200  # nothing was revoked
        async with s.get(base(service) + "/admin/users/nobody-at-all/sessions") as resp:
            assert resp.status == 404
    finally:
        await s.close()


# ---------------------------------------------------------------- sign-in limits


@pytest.fixture
async def limited(settings: Settings) -> AsyncIterator[Service]:
    """A processor with small sign-in limits and counters of its own."""
    svc = Service(settings.replace(http_port=0, redis_prefix=f"solaris-limits-{uuid.uuid4().hex[:8]}:",
                                   signin_attempts_per_address=4, signin_attempts_per_account=3))
    await svc.start()
    yield svc
    await svc.stop(grace=1)


def addr(n: int) -> dict[str, str]:
    return {"x-forwarded-for": f"203.0.113.{n}"}


async def test_admin_sign_in_is_limited_per_account(limited):
    s = client()
    try:
        # three failures for the admin token, each from another address
        for n in range(3):
            status, _ = await login_attempt(s, limited, "wrong-token", **addr(10 + n))
            assert status == 401
        status, resp = await login_attempt(s, limited, "wrong-token", **addr(20))
        assert status == 429
        retry = int(resp.headers["Retry-After"])
        assert 0 < retry <= security.SIGNIN_WINDOW_SECONDS
        async with s.get(base(limited) + "/admin/login") as page_resp:
            page = await page_resp.text()
        async with s.post(base(limited) + "/admin/login", headers=addr(21),
                          data={"csrf": csrf_of(page), "token": limited.settings.admin_token}) as resp:
            # even the right token waits: the account is paused, whoever asks
            assert resp.status == 429
            text = await resp.text()
        assert "Muitas tentativas de entrar" in text and "min" in text
        assert resp.headers["Retry-After"].isdigit()
        # another admin account is not affected
        other = mint_token(limited.settings, f"ana-{uuid.uuid4().hex[:6]}", admin=True)
        status, _ = await login_attempt(s, limited, other, **addr(22))
        assert status == 303
    finally:
        await s.close()


async def test_admin_sign_in_is_limited_per_address_and_success_is_not_counted(limited):
    s = client()
    admin = f"rui-{uuid.uuid4().hex[:6]}"
    good = mint_token(limited.settings, admin, admin=True)
    # A token of this admin's name that does not verify: a failed attempt on that account.
    forged = mint_token(limited.settings.replace(jwt_secret="another-secret-entirely-32-bytes-long"), admin, admin=True)
    try:
        # successes, however many, count neither for the address nor for the account
        for _ in range(6):
            status, _ = await login_attempt(s, limited, good, **addr(50))
            assert status == 303
        for _ in range(2):
            status, _ = await login_attempt(s, limited, forged, **addr(50))
            assert status == 401
        status, _ = await login_attempt(s, limited, good, **addr(50))
        assert status == 303  # 2 failures < 3: still allowed, and the success took nothing
        # per address: failures against four different accounts from one address
        for n in range(2):
            status, _ = await login_attempt(s, limited, mint_token(limited.settings, f"x{n}"), **addr(50))
            assert status == 403  # a valid JWT, not an admin: a failure
        status, resp = await login_attempt(s, limited, "guess", **addr(50))
        assert status == 429 and int(resp.headers["Retry-After"]) > 0
        status, _ = await login_attempt(s, limited, "guess", **addr(51))  # another address
        assert status == 401
        # a form without its CSRF token is refused before any credential is looked at: no count
        for _ in range(5):
            async with s.post(base(limited) + "/admin/login", headers=addr(52), data={"token": "x"}) as resp:
                assert resp.status == 403
        status, _ = await login_attempt(s, limited, good, **addr(52))
        assert status == 303
    finally:
        await s.close()


async def test_the_address_limit_counts_the_hop_envoy_appended_not_what_the_client_wrote(limited):
    """Envoy appends the address it accepted to X-Forwarded-For (use_remote_address): a client
    that writes another address of its own before it on every attempt is still one address."""
    s = client()
    try:
        for n in range(4):
            status, _ = await login_attempt(s, limited, mint_token(limited.settings, f"y{n}"),
                                            **{"x-forwarded-for": f"198.51.100.{n}, 203.0.113.70"})
            assert status == 403
        status, _ = await login_attempt(s, limited, "guess", **{"x-forwarded-for": "198.51.100.99, 203.0.113.70"})
        assert status == 429
        status, _ = await login_attempt(s, limited, "guess", **{"x-forwarded-for": "203.0.113.70, 203.0.113.71"})
        assert status == 401  # the hop Envoy saw is another one
    finally:
        await s.close()


def test_the_gateway_appends_the_connecting_address():
    root = Path(__file__).resolve().parent.parent
    for path in (root / "extproc/envoy.yaml", root / "deploy/envoy.compose.yaml"):
        config = yaml.safe_load(path.read_text())
        manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        assert manager["use_remote_address"] is True, path


async def test_me_link_requests_are_limited_whether_the_address_is_known_or_not(limited):
    user = f"bia-{uuid.uuid4().hex[:6]}"
    known = f"{user}@example.com"
    await open_account(limited, user, email=known)
    s = client()

    async def ask(email: str, n: int) -> tuple[int, str, aiohttp.ClientResponse]:
        async with s.get(base(limited) + "/me") as resp:
            page = await resp.text()
        async with s.post(base(limited) + "/me/login", headers=addr(n),
                          data={"csrf": csrf_of(page), "email": email}) as resp:
            return resp.status, await resp.text(), resp

    try:
        answers = set()
        for n, email in enumerate([known, known.upper(), f"  {known}"]):  # one account, three ways
            status, text, _ = await ask(email, 60 + n)
            assert status == 200
            answers.add(re.sub(r'value="[^"]*"', "", text))
        status, text, resp = await ask(known, 70)
        assert status == 429 and "Muitas tentativas de entrar" in text and int(resp.headers["Retry-After"]) > 0
        # an unknown address gets the same answers, and the same limit
        stranger = f"ninguem-{uuid.uuid4().hex[:6]}@example.com"
        for n in range(3):
            status, text, _ = await ask(stranger, 80 + n)
            assert status == 200
            answers.add(re.sub(r'value="[^"]*"', "", text))
        assert len(answers) == 1
        status, _, _ = await ask(stranger, 90)
        assert status == 429
        # the page speaks the /me reader's language
        async with s.get(base(limited) + "/me") as resp:
            page = await resp.text()
        async with s.post(base(limited) + "/me/login", headers={**addr(91), "accept-language": "en-US,en;q=0.9"},
                          data={"csrf": csrf_of(page), "email": stranger}) as resp:
            assert resp.status == 429
            english = await resp.text()
        assert "Too many sign-in attempts" in english and '<html lang="en">' in english
        # per address: four different e-mails from one address, then 429
        for n in range(4):
            status, _, _ = await ask(f"p{n}-{uuid.uuid4().hex[:6]}@example.com", 100)
            assert status == 200
        status, _, _ = await ask(f"q-{uuid.uuid4().hex[:6]}@example.com", 100)
        assert status == 429
    finally:
        await s.close()


async def test_the_limiter_counts_in_memory_when_redis_is_down():
    dead = Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.05, socket_timeout=0.05)
    limiter = security.SigninLimiter(dead, "solaris-test:")
    try:
        verdicts = [await limiter.attempt([("addr:1", 5), ("acct:a", 2)]) for _ in range(3)]
        assert [v.allowed for v in verdicts] == [True, True, False]
        assert 0 < verdicts[-1].retry_after <= security.SIGNIN_WINDOW_SECONDS
        await limiter.forgive(["addr:1", "acct:a"])
        assert (await limiter.attempt([("acct:b", 2)])).allowed
        assert (await limiter.attempt([("addr:1", 0)])).allowed  # a limit below 1 is off
    finally:
        await dead.aclose()


async def test_the_limiter_shares_its_counts_through_redis(settings):
    prefix = f"solaris-shared-{uuid.uuid4().hex[:8]}:"
    one, two = Redis.from_url(settings.redis_url), Redis.from_url(settings.redis_url)
    try:
        a, b = security.SigninLimiter(one, prefix), security.SigninLimiter(two, prefix)
        assert (await a.attempt([("acct:z", 2)])).allowed
        assert (await b.attempt([("acct:z", 2)])).allowed
        refused = await a.attempt([("acct:z", 2)])
        assert not refused.allowed and refused.retry_after > 0
        keys = [k async for k in one.scan_iter(prefix + "*")]
        assert keys and all(b"acct" not in k for k in keys)  # names are hashed in Redis
        ttl = await one.ttl(keys[0])
        assert 0 < ttl <= security.SIGNIN_WINDOW_SECONDS
    finally:
        await one.aclose()
        await two.aclose()


# ---------------------------------------------------------------- the Secure cookie rule


async def test_cookies_are_secure_only_behind_an_https_public_url(settings):
    for public_url, secure in (("https://gate.example.com", True), ("http://localhost:8080", False)):
        svc = Service(settings.replace(http_port=0, public_url=public_url))
        await svc.start()
        # No cookie jar: a client would (rightly) not send a Secure cookie back over plain http.
        s = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        try:
            async with s.get(base(svc) + "/admin/login") as resp:
                page = await resp.text()
                pre = resp.cookies["solaris_pre"]
            async with s.post(base(svc) + "/admin/login", allow_redirects=False,
                              headers={"cookie": f"solaris_pre={pre.value}"},
                              data={"csrf": csrf_of(page), "token": settings.admin_token}) as resp:
                assert resp.status == 303
                session = resp.cookies[ADMIN_COOKIE]
            for cookie in (pre, session):
                assert bool(cookie["secure"]) is secure, cookie
                assert cookie["httponly"] and cookie["samesite"] == "Strict"
        finally:
            await s.close()
            await svc.stop(grace=1)


# ---------------------------------------------------------------- in Chromium


CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    playwright = pytest.importorskip("playwright.async_api")
    async with playwright.async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield chromium
        await chromium.close()


async def admin_tab(browser: Any, url: str, credential: str) -> Any:
    context = await browser.new_context(viewport={"width": 1280, "height": 900}, locale="pt-BR")
    tab = await context.new_page()
    tab.set_default_timeout(15_000)
    await tab.goto(url + "/admin")
    await tab.get_by_label("Token de administrador ou JWT").fill(credential)
    await tab.get_by_role("button", name="Entrar").click()
    await tab.get_by_role("heading", name="Painel").wait_for()
    return tab


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason=f"{CHROMIUM} is not installed (apt-get install chromium; make test does)")
async def test_revoking_sessions_in_chromium(browser, envoy, service, settings):
    admin = f"lia-{uuid.uuid4().hex[:6]}"
    credential = mint_token(settings, admin, admin=True)
    first = await admin_tab(browser, envoy.url, credential)
    second = await admin_tab(browser, envoy.url, credential)

    await second.get_by_role("link", name="Sessões").click()
    await second.get_by_role("heading", name="Sessões de administração").wait_for()
    group = second.get_by_role("region", name=f"jwt:{admin}")
    rows = group.locator("tbody tr")
    assert await rows.count() == 2
    assert await group.get_by_role("columnheader", name="Último uso").count() == 1
    assert re.search(r"\d{2}/\d{2}/\d{4}", await rows.first.locator("td").nth(1).inner_text())
    assert await group.locator("tr.current").count() == 1
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await second.screenshot(path=str(SCREENSHOTS / "sessions.png"), full_page=True)

    # revoke the first tab's session from the second: the first is signed out on its next request
    other = group.locator("tbody tr:not(.current)")
    await other.get_by_role("button", name="Revogar").click()
    await second.get_by_text("Sessão revogada.").wait_for()
    assert await second.get_by_role("region", name=f"jwt:{admin}").locator("tbody tr").count() == 1
    await first.reload()
    await first.get_by_label("Token de administrador ou JWT").wait_for()

    # sign out everywhere: the current session too
    await second.get_by_role("button", name=f"Sair de todos os lugares (jwt:{admin})").click()
    await second.get_by_label("Token de administrador ou JWT").wait_for()
    assert await service.pool.fetchval(
        "SELECT count(*) FROM web_sessions WHERE subject = $1 AND revoked_at IS NULL", f"jwt:{admin}") == 0
    for tab in (first, second):
        await tab.context.close()


@pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools()))
async def test_session_pages_and_the_429_page_pass_axe(browser, envoy, service, settings, limited, user):
    """WCAG 2.1 AA (axe-core) on the pages this module adds, at desktop and phone width."""
    await open_account(service, user, email=f"{user}@example.com")
    me, _ = await me_client(service, user)
    await me.close()
    credential = mint_token(settings, f"axe-{uuid.uuid4().hex[:6]}", admin=True)
    for viewport in (DESKTOP, PHONE):
        context = await browser.new_context(viewport=viewport, locale="pt-BR", bypass_csp=True)
        tab = await context.new_page()
        tab.set_default_timeout(15_000)
        try:
            await tab.goto(envoy.url + "/admin")
            await tab.get_by_label("Token de administrador ou JWT").fill(credential)
            await tab.get_by_role("button", name="Entrar").click()
            await tab.get_by_role("heading", name="Painel").wait_for()
            for path in ("/admin/sessions", f"/admin/users/{user}/sessions", "/admin/sessions?done=revoked"):
                await tab.goto(envoy.url + path)
                rows = findings(await axe_violations(tab))
                assert not rows, f"{path} at {viewport['width']}: \n" + report(rows)
                assert await tab.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), path
            email = f"axe-{uuid.uuid4().hex[:6]}@example.com"
            for _ in range(limited.settings.signin_attempts_per_account + 1):
                await tab.goto(base(limited) + "/me")
                await tab.get_by_label("E-mail").fill(email)
                await tab.get_by_role("button", name="Enviar link de acesso").click()
                await tab.wait_for_load_state()
            await tab.get_by_role("heading", name="Muitas tentativas de entrar").wait_for()
            rows = findings(await axe_violations(tab))
            assert not rows, f"429 page at {viewport['width']}: \n" + report(rows)
        finally:
            await context.close()


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason=f"{CHROMIUM} is not installed (apt-get install chromium; make test does)")
async def test_revoking_a_me_session_by_keyboard_alone(browser, envoy, service, settings, user):
    await open_account(service, user, email=f"{user}@example.com")
    me, session = await me_client(service, user)
    await me.close()
    tab = await admin_tab(browser, envoy.url, settings.admin_token)
    try:
        await tab.goto(envoy.url + f"/admin/users/{user}")
        await tab_to(tab, "#sessions-link")
        await tab.keyboard.press("Enter")
        await tab.get_by_role("heading", name=f"Sessões de {user}").wait_for()
        await tab_to(tab, "td form button[type=submit]")
        await tab.keyboard.press("Enter")
        await tab.get_by_text("Sessão revogada.").wait_for()
        assert (await row(service, session.sid))["revoked_at"] is not None
    finally:
        await tab.context.close()
