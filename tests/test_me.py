"""/me and /api/me: sign-in by e-mailed single-use link (a real SMTP server, aiosmtpd), JWT for
the API, and the rule that a user never sees another user's data."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import re
import time
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
from support.gate import open_account, spend
from support.mail import SmtpServer, link_in, start_mail_service
from support.web import HOSTILE, api, base, csrf_of
from yarl import URL

from extproc.app import Service
from extproc.identity import mint_token
from extproc.settings import Settings
from extproc.web.sessions import MagicLinks, Signer


@pytest.fixture
async def mail_service(settings: Settings, smtp: SmtpServer) -> AsyncIterator[Service]:
    svc = await start_mail_service(settings, smtp, "en")
    yield svc
    await svc.stop(grace=1)


def client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def ask_link(s: aiohttp.ClientSession, svc: Service, email: str) -> tuple[int, str]:
    async with s.get(base(svc) + "/me") as resp:
        page = await resp.text()
    async with s.post(base(svc) + "/me/login", data={"csrf": csrf_of(page), "email": email}) as resp:
        return resp.status, await resp.text()


async def sign_in(s: aiohttp.ClientSession, link: str) -> aiohttp.ClientResponse:
    async with s.get(link) as resp:
        assert resp.status == 200, await resp.text()
        page = await resp.text()
    token = re.search(r'name="token" value="([^"]+)"', page).group(1)
    async with s.post(link.split("/me/login")[0] + "/me/login/confirm", allow_redirects=False,
                      data={"csrf": csrf_of(page), "token": token}) as resp:
        await resp.read()
        return resp


# ---------------------------------------------------------------- /api/me


async def test_api_me_shows_only_the_callers_account(http, envoy, service, settings):
    alice, bob = f"alice-{uuid.uuid4().hex[:8]}", f"bob-{uuid.uuid4().hex[:8]}"
    await open_account(service, alice, email=f"{alice}@example.com")
    await open_account(service, bob, email=f"{bob}@example.com")
    await spend(service, alice, 300, 200)
    await service.ledger.grant(bob, 7_000, actor="admin-token", reason="segredo do bob")
    alice_jwt = mint_token(settings, alice)
    status, body = await api(http, envoy.url + "/api/me", token=alice_jwt)
    assert status == 200 and body["account"]["user_id"] == alice
    assert body["account"]["available"] == settings.default_monthly_tokens - 500
    # parameters never choose the user
    status, body = await api(http, envoy.url + f"/api/me?user_id={bob}&id={bob}", token=alice_jwt)
    assert body["account"]["user_id"] == alice
    status, body = await api(http, envoy.url + "/api/me/entries", token=alice_jwt)
    assert status == 200 and [e["kind"] for e in body["entries"]] == ["usage", "cycle_reset"]
    assert all("actor" not in e for e in body["entries"])
    async with http.get(envoy.url + "/api/me/statement.csv", headers={"authorization": f"Bearer {alice_jwt}"}) as resp:
        text = await resp.text()
    assert "segredo do bob" not in text and "actor" not in text.splitlines()[0]
    assert [r["kind"] for r in csv.DictReader(io.StringIO(text))] == ["usage", "cycle_reset"]
    # no credentials, the admin API token (not a user) or a forged token: 401
    assert (await api(http, envoy.url + "/api/me"))[0] == 401
    assert (await api(http, envoy.url + "/api/me", token=settings.admin_token))[0] == 401
    forged = mint_token(settings.replace(jwt_secret="x" * 40), bob)
    assert (await api(http, envoy.url + "/api/me", token=forged))[0] == 401
    status, body = await api(http, envoy.url + "/api/me", token=mint_token(settings, f"new-{uuid.uuid4().hex}"))
    assert status == 404 and body["error"]["code"] == "no_account"
    status, body = await api(http, envoy.url + "/api/me/entries?limit=abc", token=alice_jwt)
    assert status == 400


async def test_api_statement_reasons_speak_the_users_language(http, envoy, service, settings):
    """A pt-BR gate; this user chose English: the coded reasons of their statement (API page
    and CSV) are in English; before the choice, in the gate's Portuguese."""
    user = f"eve-{uuid.uuid4().hex[:8]}"
    await open_account(service, user)
    token = mint_token(settings, user)
    _, body = await api(http, envoy.url + "/api/me/entries", token=token)
    assert [e["reason"] for e in body["entries"]] == ["conta aberta"]
    await service.ledger.set_settings(user, language="en", actor=f"user:{user}")
    _, body = await api(http, envoy.url + "/api/me/entries", token=token)
    assert [e["reason"] for e in body["entries"]] == ["account opened"]
    async with http.get(envoy.url + "/api/me/statement.csv", headers={"authorization": f"Bearer {token}"}) as resp:
        assert [r["reason"] for r in csv.DictReader(io.StringIO(await resp.text()))] == ["account opened"]


# ---------------------------------------------------------------- the e-mailed link


async def test_magic_link_sign_in_is_single_use_and_never_reveals_addresses(mail_service, smtp, settings):
    inbox = smtp.mailbox
    user = f"mia-{uuid.uuid4().hex[:8]}"
    email = f"{user}@example.com"
    await open_account(mail_service, user, email=email, name=HOSTILE)
    await spend(mail_service, user, 40_000, 2_345)
    async with client() as s:
        status, known = await ask_link(s, mail_service, email.upper())  # case does not matter
        assert status == 200
        status, unknown = await ask_link(s, mail_service, f"nobody-{uuid.uuid4().hex}@example.com")
        assert status == 200
        assert known == unknown  # the same page whether or not the address is known
        assert "If the address is registered" in known
        status, page = await ask_link(s, mail_service, "not-an-address")
        assert status == 400 and "Invalid e-mail address" in page

        message = await inbox.wait_for(email)
        assert message["Subject"] == "Your Solaris balance sign-in link"
        assert message["From"] == settings.mail_from
        body = message.get_body(("plain",)).get_content()
        assert HOSTILE in body  # plain text: the name as it is, no HTML escaping needed
        link = link_in(message)
        assert link.startswith(base(mail_service) + "/me/login?token=")

        # asking again within a minute sends nothing more
        await ask_link(s, mail_service, email)
        await asyncio.sleep(0.3)
        assert len(inbox.to(email)) == 1

        resp = await sign_in(s, link)
        assert resp.status == 303 and resp.headers["Location"] == "/me"
        cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/me" in cookie
        async with s.get(base(mail_service) + "/me") as r:
            page = await r.text()
        assert r.status == 200
        assert "57,655" in page  # 100,000 - 42,345, English separators
        assert "<script>window.pwned" not in page
        async with s.get(base(mail_service) + "/me/statement.csv") as r:
            rows = list(csv.DictReader(io.StringIO(await r.text())))
        assert [row["kind"] for row in rows] == ["usage", "cycle_reset"] and "actor" not in rows[0]

    async with client() as other:
        async with other.get(link) as r:
            assert r.status == 200  # still well-signed: the page only offers the button
            page = await r.text()
        token = re.search(r'name="token" value="([^"]+)"', page).group(1)
        async with other.post(base(mail_service) + "/me/login/confirm",
                              data={"csrf": csrf_of(page), "token": token}) as r:
            assert r.status == 400 and "already used" in await r.text()
        async with other.post(base(mail_service) + "/me/login/confirm", data={"token": token}) as r:
            assert r.status == 403  # no CSRF token
        async with other.get(base(mail_service) + "/me/login?token=" + token[:-3] + "abc") as r:
            assert r.status == 400
        async with other.get(base(mail_service) + "/me") as r:
            assert "Send sign-in link" in await r.text()  # still signed out


async def test_expired_and_tampered_links_and_cookies(mail_service, settings):
    alice, bob = f"al-{uuid.uuid4().hex[:8]}", f"bo-{uuid.uuid4().hex[:8]}"
    await open_account(mail_service, alice, email=f"{alice}@example.com")
    await open_account(mail_service, bob, email=f"{bob}@example.com")
    signer = Signer(mail_service.settings)
    links = MagicLinks(mail_service.pool, signer)
    expired = signer.sign("magic-link", {"uid": alice, "n": "x" * 20, "exp": int(time.time()) - 1})
    assert links.peek(expired) is None
    token = await links.issue(alice, mail_service.clock())
    assert token is not None
    async with client() as s:
        async with s.get(base(mail_service) + "/me/login?token=" + expired) as r:
            assert r.status == 400
        # a link re-signed for another user with another purpose's key does not verify
        wrong = signer.sign("session:me", {"uid": bob, "n": "y", "exp": int(time.time()) + 60})
        async with s.get(base(mail_service) + "/me/login?token=" + wrong) as r:
            assert r.status == 400
        resp = await sign_in(s, base(mail_service) + "/me/login?token=" + token)
        assert resp.status == 303
        async with s.get(base(mail_service) + "/me") as r:
            page = await r.text()
        assert alice in page and bob not in page
        # swap the cookie's subject for bob's: the signature no longer matches
        cookie = s.cookie_jar.filter_cookies(URL(base(mail_service) + "/me"))["solaris_me"].value
        payload, sig = cookie.split(".")
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        data["sub"] = bob
        forged = base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=") + "." + sig
        async with client() as attacker:
            attacker.cookie_jar.update_cookies({"solaris_me": forged})
            async with attacker.get(base(mail_service) + "/me") as r:
                text = await r.text()
            assert bob not in text and "Send sign-in link" in text
            async with attacker.get(base(mail_service) + "/me/statement.csv") as r:
                assert r.status == 401
        # logout needs the session's CSRF token, then clears the cookie
        async with s.post(base(mail_service) + "/me/logout", data={"csrf": "nope"}) as r:
            assert r.status == 403
        async with s.post(base(mail_service) + "/me/logout", allow_redirects=False,
                          data={"csrf": csrf_of(page)}) as r:
            assert r.status == 303 and "Max-Age=0" in r.headers["Set-Cookie"]
        async with s.get(base(mail_service) + "/me") as r:
            assert "Send sign-in link" in await r.text()


async def test_me_routes_through_envoy_default_language(http, envoy):
    async with http.get(envoy.url + "/me") as resp:
        assert resp.status == 200
        page = await resp.text()
    assert 'lang="pt-BR"' in page and "Enviar link de acesso" in page and '<label for="email">' in page
    async with http.get(envoy.url + "/me/static/app.css") as resp:
        assert resp.status == 200 and "text/css" in resp.headers["Content-Type"]


async def test_the_sign_in_link_is_written_in_the_users_language(mail_service, smtp):
    """The deployment speaks English (mail_service); a user who chose Portuguese gets the link
    in Portuguese, whatever the language of the browser that asked for it."""
    user = f"leo-{uuid.uuid4().hex[:8]}"
    email = f"{user}@example.com"
    await open_account(mail_service, user, email=email)
    await mail_service.ledger.set_settings(user, language="pt-BR", actor=f"user:{user}")
    async with client() as s:
        status, page = await ask_link(s, mail_service, email)
    assert status == 200 and "If the address is registered" in page  # the asker's page: English
    message = await smtp.mailbox.wait_for(email)
    assert message["Subject"] == "Seu link de acesso ao saldo Solaris"
