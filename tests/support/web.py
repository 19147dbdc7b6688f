"""HTTP helpers for the console, /me and the admin API (straight to the processor's HTTP port,
or through Envoy where the test passes Envoy's URL)."""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp

from extproc.app import Service
from extproc.settings import Settings
from extproc.web.sessions import MagicLinks, Signer

HOSTILE = '<script>window.pwned=1</script>"\'&'  # a name, reason or address that must render inert


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def base(service: Service) -> str:
    return f"http://127.0.0.1:{service.http_port}"


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


async def admin_browser(service: Service, settings: Settings) -> aiohttp.ClientSession:
    """An HTTP client signed in to /admin with the admin token (cookie + CSRF like a browser)."""
    session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with session.get(base(service) + "/admin/login") as resp:
        page = await resp.text()
    async with session.post(base(service) + "/admin/login", allow_redirects=False,
                            data={"csrf": csrf_of(page), "token": settings.admin_token, "next": "/admin"}) as resp:
        assert resp.status == 303, await resp.text()
    return session


async def api(http: aiohttp.ClientSession, url: str, method: str = "GET", token: str | None = None,
              body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    """A JSON API call: (status, the parsed body, or its text when it is not JSON)."""
    headers = bearer(token) if token else {}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        headers["content-type"] = "application/json"
    async with http.request(method, url, headers=headers, data=data) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def me_signed_in(service: Service, user_id: str, **session_options: Any) -> aiohttp.ClientSession:
    """An HTTP client signed in to /me as ``user_id`` the way a browser gets there: a sign-in
    link issued for the user, its page fetched and its button posted (so the session exists on
    the server as for a real sign-in). ``session_options``: e.g. ``headers`` (Accept-Language)."""
    token = await MagicLinks(service.pool, Signer(service.settings)).issue(user_id, service.clock())
    assert token is not None, "a link was issued for this user within the last minute"
    client = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), **session_options)
    async with client.get(base(service) + "/me/login?token=" + token) as resp:
        page = await resp.text()
    async with client.post(base(service) + "/me/login/confirm", allow_redirects=False,
                           data={"csrf": csrf_of(page), "token": token}) as resp:
        assert resp.status == 303, await resp.text()
    return client
