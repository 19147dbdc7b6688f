"""The admin JSON API and the admin HTML forms over real HTTP (through Envoy where routing
matters): authentication, validation, idempotent grants, audit rows, paging, CSV, and the
user-list queries at 100 000 accounts."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from support.gate import open_account, spend
from support.web import HOSTILE, admin_browser, api, base, bearer, csrf_of
from yarl import URL

from extproc import accounting
from extproc.formats import fmt_int, fmt_pct
from extproc.identity import mint_token
from extproc.web import queries as q
from extproc.web.admin import parse_amount
from extproc.web.kit import WebContext, csv_cell

# ---------------------------------------------------------------- authentication


async def test_api_auth_through_envoy(http, envoy, service, settings, user):
    await open_account(service, user)
    url = envoy.url + "/api/admin/users/" + user
    async with http.get(url) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await resp.json())["error"]["code"] == "missing_credentials"
    assert (await api(http, url, token="not-the-token"))[0] == 401
    assert (await api(http, url, token=settings.admin_token + "x"))[0] == 401
    user_jwt = mint_token(settings, user)
    status, body = await api(http, url, token=user_jwt)
    assert status == 403 and body["error"]["code"] == "not_admin"
    expired = mint_token(settings, "boss", admin=True, now=time.time() - 7200, ttl=60)
    assert (await api(http, url, token=expired))[0] == 401
    forged = mint_token(settings.replace(jwt_secret="another-secret-0123456789abcdef0123"), "boss", admin=True)
    assert (await api(http, url, token=forged))[0] == 401
    status, body = await api(http, url, token=settings.admin_token)
    assert status == 200 and body["account"]["user_id"] == user
    status, body = await api(http, url, token=mint_token(settings, "boss", admin=True))
    assert status == 200 and body["account"]["available"] == settings.default_monthly_tokens
    # Cookies are not credentials for the API (so the API needs no CSRF token).
    async with http.get(url, headers={"cookie": "solaris_admin=anything"}) as resp:
        assert resp.status == 401


async def test_every_api_route_requires_admin(http, service, settings, user):
    await open_account(service, user)
    user_jwt = mint_token(settings, user)
    for method, path in [("GET", "/api/admin/dashboard"), ("GET", "/api/admin/users"),
                         ("GET", "/api/admin/users.csv"), ("GET", f"/api/admin/users/{user}/entries"),
                         ("GET", f"/api/admin/users/{user}/statement.csv"), ("GET", "/api/admin/plans"),
                         ("GET", "/api/admin/audit"), ("POST", f"/api/admin/users/{user}/credits"),
                         ("POST", f"/api/admin/users/{user}/plan"), ("POST", f"/api/admin/users/{user}/suspend"),
                         ("POST", f"/api/admin/users/{user}/unsuspend"),
                         ("PUT", f"/api/admin/users/{user}/allowance"), ("PUT", f"/api/admin/users/{user}/settings"),
                         ("POST", f"/api/admin/users/{user}/erase"), ("GET", f"/api/admin/users/{user}/usage")]:
        assert (await api(http, base(service) + path, method))[0] == 401, path
        assert (await api(http, base(service) + path, method, token=user_jwt, body={}))[0] == 403, path


# ---------------------------------------------------------------- grants


async def test_grant_validation_never_500(http, service, settings, user):
    await open_account(service, user)
    url = f"{base(service)}/api/admin/users/{user}/credits"
    token = settings.admin_token
    cases: list[tuple[Any, str, str]] = [
        ({"tokens": -5, "reason": "x"}, "tokens", "not_positive"),
        ({"tokens": 0, "reason": "x"}, "tokens", "not_positive"),
        ({"tokens": "abc", "reason": "x"}, "tokens", "not_integer"),
        ({"tokens": "1000", "reason": "x"}, "tokens", "not_integer"),
        ({"tokens": 1.5, "reason": "x"}, "tokens", "not_integer"),
        ({"tokens": True, "reason": "x"}, "tokens", "not_integer"),
        ({"tokens": 10**13, "reason": "x"}, "tokens", "too_large"),
        ({"reason": "x"}, "tokens", "required"),
        ({"tokens": 10}, "reason", "required"),
        ({"tokens": 10, "reason": "   "}, "reason", "required"),
        ({"tokens": 10, "reason": 42}, "reason", "required"),
        ({"tokens": 10, "reason": "x" * 501}, "reason", "too_long"),
        ({"tokens": 10, "reason": "x", "idempotency_key": 7}, "idempotency_key", "invalid"),
    ]
    for body, field, code in cases:
        status, answer = await api(http, url, "POST", token, body)
        assert status == 400, (body, answer)
        assert answer["error"]["fields"][field]["code"] == code, (body, answer)
        assert answer["error"]["fields"][field]["message"]  # a sentence, in Portuguese by default
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        status, answer = await api(http, url, "POST", token, raw=raw)
        assert status == 400 and answer["error"]["fields"]["body"]["code"] == "invalid_json"
    status, answer = await api(http, f"{base(service)}/api/admin/users/nobody-{uuid.uuid4().hex}/credits",
                               "POST", token, {"tokens": 10, "reason": "x"})
    assert status == 404 and answer["error"]["code"] == "unknown_user"
    account = await service.ledger.account(user)
    assert account.credits == 0  # nothing of the above moved money


async def test_grant_is_idempotent_and_audited(http, service, settings, user):
    await open_account(service, user)
    url = f"{base(service)}/api/admin/users/{user}/credits"
    body = {"tokens": 25_000, "reason": "compensação pela queda", "idempotency_key": uuid.uuid4().hex}
    status, first = await api(http, url, "POST", settings.admin_token, body)
    assert status == 200 and first["applied"] is True
    assert first["account"]["available"] == settings.default_monthly_tokens + 25_000
    status, second = await api(http, url, "POST", settings.admin_token, body)
    assert status == 200 and second["applied"] is False
    assert second["account"]["available"] == first["account"]["available"]
    status, audit = await api(http, f"{base(service)}/api/admin/audit?target={user}", token=settings.admin_token)
    grants = [r for r in audit["entries"] if r["action"] == "grant"]
    assert len(grants) == 1
    row = grants[0]
    assert row["actor"] == "admin-token" and row["reason"] == "compensação pela queda"
    assert row["before"]["credits"] == 0 and row["after"]["credits"] == 25_000
    assert row["source_ip"].startswith("127.0.0.1")
    # An admin JWT is recorded as its user.
    status, _ = await api(http, url, "POST", mint_token(settings, "ana.admin", admin=True),
                          {"tokens": 1, "reason": "um token"})
    assert status == 200
    status, audit = await api(http, f"{base(service)}/api/admin/audit?target={user}&actor=jwt:ana.admin",
                              token=settings.admin_token)
    assert [r["action"] for r in audit["entries"]] == ["grant"]
    status, entries = await api(http, f"{base(service)}/api/admin/users/{user}/entries", token=settings.admin_token)
    assert [e["kind"] for e in entries["entries"]] == ["grant", "grant", "cycle_reset"]
    assert entries["entries"][0]["actor"] == "jwt:ana.admin"


async def test_plan_and_suspension(http, service, settings, user):
    await open_account(service, user)
    plan = f"pro-{uuid.uuid4().hex[:6]}"
    await service.ledger.upsert_plan(plan, monthly_tokens=500_000, requests_per_minute=None, rollover=False,
                                     actor="test")
    token = settings.admin_token
    root = f"{base(service)}/api/admin/users/{user}"
    status, answer = await api(http, root + "/plan", "POST", token, {"plan": "nope", "reason": "x"})
    assert status == 400 and answer["error"]["fields"]["plan"]["code"] == "unknown_plan"
    status, answer = await api(http, root + "/plan", "POST", token, {"plan": "default", "reason": "x"})
    assert status == 400 and answer["error"]["fields"]["plan"]["code"] == "same_plan"
    status, answer = await api(http, root + "/plan", "POST", token, {"plan": plan})
    assert status == 400 and answer["error"]["fields"]["reason"]["code"] == "required"
    status, answer = await api(http, root + "/plan", "POST", token, {"plan": plan, "reason": "upgrade"})
    assert status == 200 and answer["account"]["plan"] == plan
    status, plans = await api(http, f"{base(service)}/api/admin/plans", token=token)
    assert plan in [p["name"] for p in plans["plans"]]

    status, answer = await api(http, root + "/suspend", "POST", token, {"reason": ""})
    assert status == 400 and answer["error"]["fields"]["reason"]["code"] == "required"
    status, answer = await api(http, root + "/unsuspend", "POST", token, {"reason": "x"})
    assert status == 400 and answer["error"]["fields"]["action"]["code"] == "not_suspended"
    status, answer = await api(http, root + "/suspend", "POST", token, {"reason": "abuso"})
    assert status == 200 and answer["account"]["state"] == "suspended"
    assert answer["account"]["state_reason"] == "abuso"
    status, answer = await api(http, root + "/suspend", "POST", token, {"reason": "again"})
    assert status == 400 and answer["error"]["fields"]["action"]["code"] == "already_suspended"
    status, answer = await api(http, root + "/unsuspend", "POST", token, {"reason": "resolvido"})
    assert status == 200 and answer["account"]["state"] == "active"
    status, audit = await api(http, f"{base(service)}/api/admin/audit?target={user}", token=token)
    assert [r["action"] for r in audit["entries"]] == ["unsuspend", "suspend", "plan"]
    status, audit = await api(http, f"{base(service)}/api/admin/audit?target={user}&action=suspend", token=token)
    assert [r["reason"] for r in audit["entries"]] == ["abuso"]
    status, answer = await api(http, f"{base(service)}/api/admin/audit?since=yesterday", token=token)
    assert status == 400 and answer["error"]["fields"]["since"]["code"] == "invalid_date"


# ---------------------------------------------------------------- lists, paging, CSV


async def test_user_list_search_filters_and_keyset_paging(http, service, settings):
    tag = uuid.uuid4().hex[:8]
    ids = [f"page-{tag}-{i:02d}" for i in range(7)]
    for i, uid in enumerate(ids):
        await open_account(service, uid, email=f"Paging.{tag}.{i}@Example.com", name=f"Zé {tag} {i}")
    await spend(service, ids[3], 60_000, 25_000)  # 85 %: warned_80
    token = settings.admin_token
    url = f"{base(service)}/api/admin/users"

    async def get(**params: Any) -> dict[str, Any]:
        status, body = await api(http, url + "?" + "&".join(f"{k}={v}" for k, v in params.items()), token=token)
        assert status == 200, body
        return body

    seen: list[str] = []
    page = await get(q=f"page-{tag}", limit=3)
    assert page["total"] == 7 and page["prev"] is None
    pages = [page]
    while page["next"]:
        page = await get(q=f"page-{tag}", limit=3, after=page["next"])
        pages.append(page)
    for p in pages:
        seen += [u["user_id"] for u in p["users"]]
    assert seen == ids and len(pages) == 3
    back = await get(q=f"page-{tag}", limit=3, before=pages[2]["prev"])
    assert [u["user_id"] for u in back["users"]] == ids[3:6]
    # search is case-insensitive on e-mail and name prefixes
    assert (await get(q=f"paging.{tag}"))["total"] == 7
    assert (await get(q=f"zé {tag} 4"))["users"][0]["user_id"] == ids[4]
    # LIKE wildcards are literal
    assert (await get(q=f"page-{tag}%"))["total"] == 0
    assert (await get(q=f"page_{tag}"))["total"] == 0
    # filters and sorting
    warned = await get(q=f"page-{tag}", state="warned_80")
    assert [u["user_id"] for u in warned["users"]] == [ids[3]]
    assert warned["users"][0]["used_pct"] == 85.0
    assert [u["user_id"] for u in (await get(q=f"page-{tag}", band="80to90"))["users"]] == [ids[3]]
    assert (await get(q=f"page-{tag}", band="lt50"))["total"] == 6
    top = await get(q=f"page-{tag}", sort="usage", order="desc", limit=2)
    assert top["users"][0]["user_id"] == ids[3]
    by_email = await get(q=f"page-{tag}", sort="email", order="desc", limit=7)
    assert [u["user_id"] for u in by_email["users"]] == ids[::-1]
    assert (await get(q=f"page-{tag}", plan="default"))["total"] == 7
    for sort in ("created", "usage", "name"):  # every sort pages through all rows once
        for order in ("asc", "desc"):
            page, got = await get(q=f"page-{tag}", sort=sort, order=order, limit=2), []
            got += [u["user_id"] for u in page["users"]]
            while page["next"]:
                page = await get(q=f"page-{tag}", sort=sort, order=order, limit=2, after=page["next"])
                got += [u["user_id"] for u in page["users"]]
            assert sorted(got) == ids, (sort, order, got)

    for params, field in [({"state": "happy"}, "state"), ({"band": "x"}, "band"), ({"sort": "balance"}, "sort"),
                          ({"limit": "0"}, "limit"), ({"limit": "abc"}, "limit"), ({"limit": "201"}, "limit"),
                          ({"after": "!!!"}, "cursor"), ({"after": "WyJhIl0", "sort": "email"}, "cursor"),
                          ({"after": q.encode_cursor(["yesterday", "x"]), "sort": "created"}, "cursor"),
                          ({"after": q.encode_cursor(["NaN", "x"]), "sort": "usage"}, "cursor"),
                          ({"after": q.encode_cursor(["2026-01-01T00:00:00", "x"]), "sort": "created"}, "cursor")]:
        status, body = await api(http, url + "?" + "&".join(f"{k}={v}" for k, v in params.items()), token=token)
        assert status == 400, (params, body)
        assert field in body["error"]["fields"], (params, body)


async def test_csv_exports_are_complete_and_spreadsheet_safe(http, service, settings):
    tag = uuid.uuid4().hex[:8]
    evil = f"csv-{tag}-evil"
    await open_account(service, evil, email=f"csv.{tag}@example.com", name="=HYPERLINK(\"http://x\")")
    await open_account(service, f"csv-{tag}-good", name=HOSTILE)
    await spend(service, evil, 100, 23)
    token = settings.admin_token
    async with http.get(f"{base(service)}/api/admin/users.csv?q=csv-{tag}", headers=bearer(token)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/csv")
        assert "attachment" in resp.headers["Content-Disposition"]
        rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert [r["user_id"] for r in rows] == [evil, f"csv-{tag}-good"]
    assert rows[0]["name"] == "'=HYPERLINK(\"http://x\")"
    assert rows[0]["available"] == str(settings.default_monthly_tokens - 123)
    assert rows[1]["name"] == HOSTILE
    async with http.get(f"{base(service)}/api/admin/users/{evil}/statement.csv", headers=bearer(token)) as resp:
        statement = list(csv.DictReader(io.StringIO(await resp.text())))
    assert [r["kind"] for r in statement] == ["usage", "cycle_reset"]
    assert statement[0]["tokens"] == "-123" and statement[0]["actor"] == "gateway"
    assert csv_cell("-5") == "'-5" and csv_cell(-5) == -5 and csv_cell(None) == ""


async def test_dashboard_api(http, service, settings, user):
    await open_account(service, user, email="dash@example.com")
    await spend(service, user, 1000, 500)
    status, body = await api(http, f"{base(service)}/api/admin/dashboard", token=settings.admin_token)
    assert status == 200
    assert len(body["daily"]) == 30
    assert body["daily"][-1]["requests"] >= 1 and body["daily"][-1]["tokens"] >= 1500
    cycle = body["cycle"]
    assert cycle["used_pct"] == accounting.usage_pct(cycle["used"], cycle["budget"])
    accounts = body["accounts"]
    assert accounts["total"] >= accounts["active"] + accounts["warned"] + accounts["blocked"] + accounts["suspended"]
    assert any(a["user_id"] == user for a in body["top"]) or len(body["top"]) == 10


async def test_unknown_user_and_bad_parameters_are_4xx(http, service, settings, user):
    await open_account(service, user)
    token = settings.admin_token
    assert (await api(http, f"{base(service)}/api/admin/users/ghost-{uuid.uuid4().hex}", token=token))[0] == 404
    for path in (f"/api/admin/users/{user}/entries?before_id=x", f"/api/admin/users/{user}/entries?limit=-1",
                 "/api/admin/audit?before_id=0", "/api/admin/audit?until=2026-13-01"):
        status, body = await api(http, base(service) + path, token=token)
        assert status == 400, (path, body)
    # ids with slashes, spaces and markup are one path segment
    odd = f"weird/{uuid.uuid4().hex[:6]} <b>?#"
    await open_account(service, odd)
    from urllib.parse import quote

    status, body = await api(http, f"{base(service)}/api/admin/users/{quote(odd, safe='')}", token=token)
    assert status == 200 and body["account"]["user_id"] == odd


# ---------------------------------------------------------------- HTML forms (cookie + CSRF)


async def test_the_session_cookie_lives_as_long_as_the_session_whatever_the_insert_takes(
        service, settings, monkeypatch):
    """The cookie's Max-Age and the session's expiry come from one instant: a sign-in whose
    session row takes over a second to write (a loaded database) still sets Max-Age to the
    full 8 hours, not 28799 (found by a flake hunt under load)."""
    from extproc.web import admin as admin_module

    written = admin_module.open_session

    async def slow_open_session(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(1.1)
        return await written(*args, **kwargs)

    monkeypatch.setattr(admin_module, "open_session", slow_open_session)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.get(base(service) + "/admin/login") as resp:
            page = await resp.text()
        async with s.post(base(service) + "/admin/login", allow_redirects=False,
                          data={"csrf": csrf_of(page), "token": settings.admin_token}) as resp:
            assert resp.status == 303
            assert "Max-Age=28800" in resp.headers["Set-Cookie"]


async def test_admin_login_session_cookie_and_csrf(service, settings, user):
    await open_account(service, user)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.get(base(service) + "/admin/users") as resp:
            assert resp.status == 401  # the sign-in form, at the URL that was asked for
            page = await resp.text()
            assert 'name="token"' in page and '<label for="token">' in page
            assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
            assert resp.headers["X-Frame-Options"] == "DENY"
        # no CSRF token: refused
        async with s.post(base(service) + "/admin/login", data={"token": settings.admin_token}) as resp:
            assert resp.status == 403
        async with s.post(base(service) + "/admin/login", allow_redirects=False,
                          data={"csrf": csrf_of(page), "token": "wrong", "next": "/admin/users"}) as resp:
            assert resp.status == 401
            assert "Token inválido" in await resp.text()
        user_jwt = mint_token(settings, user)
        async with s.post(base(service) + "/admin/login", allow_redirects=False,
                          data={"csrf": csrf_of(page), "token": user_jwt}) as resp:
            assert resp.status == 403
            assert "não tem permissão" in await resp.text()
        async with s.post(base(service) + "/admin/login", allow_redirects=False,
                          data={"csrf": csrf_of(page), "token": settings.admin_token,
                                "next": "//evil.example/admin"}) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/admin"
            cookie = resp.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/admin" in cookie
            assert "Max-Age=28800" in cookie
        async with s.get(base(service) + "/admin") as resp:
            assert resp.status == 200
            dashboard = await resp.text()
        # a tampered cookie is no session
        value = s.cookie_jar.filter_cookies(URL(base(service) + "/admin"))["solaris_admin"].value
        forged = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        try:
            body, sig = value.split(".")
            forged.cookie_jar.update_cookies({"solaris_admin": body + "." + sig[::-1]})
            async with forged.get(base(service) + "/admin") as resp:
                assert resp.status == 401
        finally:
            await forged.close()
        async with s.post(base(service) + "/admin/logout", allow_redirects=False,
                          data={"csrf": csrf_of(dashboard)}) as resp:
            assert resp.status == 303
            assert "Max-Age=0" in resp.headers["Set-Cookie"]
        async with s.get(base(service) + "/admin") as resp:
            assert resp.status == 401


async def test_admin_forms_validate_and_grant_once(service, settings, user):
    await open_account(service, user, email=f"{user}@example.com", name=HOSTILE)
    s = await admin_browser(service, settings)
    try:
        page_url = f"{base(service)}/admin/users/{user}"
        async with s.get(page_url) as resp:
            assert resp.status == 200
            page = await resp.text()
        # identity values are escaped, never markup
        assert "<script>window.pwned" not in page and "&lt;script&gt;window.pwned=1&lt;/script&gt;" in page
        assert "100.000" in page  # pt-BR thousands separator
        csrf = csrf_of(page)
        key = re.search(r'name="idempotency_key" value="([^"]+)"', page).group(1)
        for tokens, reason, message in [("-5", "x", "maior que zero"), ("abc", "x", "número inteiro"),
                                        ("1.5", "x", "número inteiro"), ("", "x", "Campo obrigatório"),
                                        ("10", " ", "Campo obrigatório")]:
            async with s.post(page_url + "/credits", data={"csrf": csrf, "tokens": tokens, "reason": reason,
                                                           "idempotency_key": key}) as resp:
                assert resp.status == 400, tokens
                text = await resp.text()
                assert message in text, tokens
                assert '<dialog id="credits-dialog" aria-labelledby="credits-title" open>' in text
        async with s.post(page_url + "/credits", data={"tokens": "10", "reason": "x"}) as resp:
            assert resp.status == 403  # no CSRF token
        form = {"csrf": csrf, "tokens": "50.000", "reason": "bônus", "idempotency_key": key}
        async with s.post(page_url + "/credits", data=form, allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"].endswith("?done=credits")
        async with s.post(page_url + "/credits", data=form, allow_redirects=False) as resp:  # the double click
            assert resp.status == 303 and resp.headers["Location"].endswith("?done=credits_duplicate")
        account = await service.ledger.account(user)
        assert account.credits == 50_000
        async with s.get(page_url + "?done=credits") as resp:
            assert "Saldo disponível: 150.000 tokens." in await resp.text()
        async with s.post(f"{base(service)}/admin/users/ghost-{uuid.uuid4().hex}/credits",
                          data={**form, "idempotency_key": uuid.uuid4().hex}) as resp:
            assert resp.status == 404
        async with s.post(page_url + "/suspension", data={"csrf": csrf, "action": "suspend", "reason": ""}) as resp:
            assert resp.status == 400 and "Campo obrigatório" in await resp.text()
        async with s.post(page_url + "/suspension", allow_redirects=False,
                          data={"csrf": csrf, "action": "suspend", "reason": "teste"}) as resp:
            assert resp.status == 303
        async with s.post(page_url + "/plan", data={"csrf": csrf, "plan": "default", "reason": "x"}) as resp:
            assert resp.status == 400 and "já está neste plano" in await resp.text()
        assert (await service.ledger.account(user)).state == "suspended"
        for path in ("/admin", "/admin/users?q=" + user, "/admin/audit?target=" + user, "/admin/users?limit=x",
                     "/admin/audit?since=x", page_url.removeprefix(base(service)) + "?before_id=abc"):
            async with s.get(base(service) + path) as resp:
                assert resp.status in (200, 400), path
                assert "<script>window.pwned" not in await resp.text()
        async with s.get(base(service) + "/admin/users.csv?q=" + user) as resp:
            assert resp.status == 200 and user in await resp.text()
    finally:
        await s.close()


# ---------------------------------------------------------------- pure helpers


def test_number_formats_and_amount_parsing():
    assert fmt_int(100_000, "pt-BR") == "100.000" and fmt_int(100_000, "en") == "100,000"
    assert fmt_pct(85.5, "pt-BR") == "85,5%" and fmt_pct(85.5, "en") == "85.5%"
    assert fmt_pct(1234.5, "pt-BR") == "1.234,5%" and fmt_pct(1234.5, "en") == "1,234.5%"
    assert parse_amount("100.000", "pt-BR", from_form=True) == 100_000
    assert parse_amount("100,000", "en", from_form=True) == 100_000
    assert parse_amount(" 7 ", "en", from_form=True) == 7
    for bad in ("1.5", "1.0000", "1,000", "1e3", "0x10", "١٢"):
        with pytest.raises(Exception, match="tokens"):
            parse_amount(bad, "pt-BR", from_form=True)


def test_english_labels(settings):
    ctx = WebContext.build(settings.replace(language="en"))
    assert ctx.t("nav.users") == "Users" and ctx.t("err.not_positive").startswith("The amount")
    html = ctx.jinja.from_string("{{ 100000|num }} {{ 12.5|pct }} {{ name }}").render(name=HOSTILE)
    assert html.startswith("100,000 12.5% &lt;script&gt;")
    pt = WebContext.build(settings)
    assert set(pt.messages) == set(ctx.messages)  # every label exists in both languages


async def test_sql_usage_pct_matches_the_one_definition(service, user):
    """USED_PCT (for filters and sorting) is Account.used_pct in SQL, personal cap included:
    the same number for the same row, with and without a cap, and with nothing to spend."""
    await open_account(service, user)
    await spend(service, user, 60_000, 25_000)

    async def both() -> tuple[float, float]:
        sql_pct = await service.pool.fetchval(f"SELECT {q.USED_PCT} FROM accounts a WHERE a.user_id = $1", user)
        return float(sql_pct), (await service.ledger.account(user)).used_pct

    for cap in (None, 200_000, 90_000, 1):
        await service.ledger.set_settings(user, personal_cap=cap, actor="test")
        sql_pct, py_pct = await both()
        assert sql_pct == py_pct, cap
    await service.ledger.set_settings(user, personal_cap=0, actor="test")
    assert await both() == (100.0, 100.0)
    assert accounting.usage_pct(85_000, 100_000) == 85.0 and accounting.usage_pct(1, 0) == 100.0


# ---------------------------------------------------------------- scale


async def test_user_list_at_100k_accounts_uses_indexes(make_database):
    url = make_database()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO accounts (user_id, email, name, cycle_anchor_day, cycle_start, cycle_end, cycle_budget,"
            " used_cycle, allowance, state, created_at)"
            " SELECT 'u' || lpad(i::text, 6, '0'), 'user' || i || '@example.com', 'Name ' || i, 1,"
            " now() - interval '10 days', now() + interval '20 days', 100000, (i * 37) % 100000,"
            " 100000 - (i * 37) % 100000, CASE WHEN i % 50 = 0 THEN 'blocked' ELSE 'active' END,"
            " now() - make_interval(secs => i)"
            " FROM generate_series(1, 100000) i")
        await conn.execute("ANALYZE accounts")

        async def explain(f: q.UserFilter) -> str:
            sql, args, _ = q.user_query(f)
            plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
            return json.dumps(json.loads(plan) if isinstance(plan, str) else plan)

        first = q.UserFilter(limit=50)
        sql, args, _ = q.user_query(first)
        rows = await conn.fetch(sql, *args)
        deep = q.UserFilter(limit=50, after=q.encode_cursor([rows[-1]["k0"]]))
        for f in (first, deep, q.UserFilter(q="user777"), q.UserFilter(q="Name 4242"),
                  q.UserFilter(sort="email", desc=True), q.UserFilter(sort="created"),
                  q.UserFilter(state="blocked"), q.UserFilter(plan="default", sort="name")):
            plan = await explain(f)
            assert "Seq Scan" not in plan, (f, plan)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:
            started = time.perf_counter()
            page = await q.list_users(pool, q.UserFilter(limit=50))
            page2 = await q.list_users(pool, q.UserFilter(limit=50, after=page.next_cursor or ""))
            found = await q.list_users(pool, q.UserFilter(q="user4242"))
            elapsed = time.perf_counter() - started
            assert page.total_capped and page.total == q.COUNT_CAP
            assert page2.accounts[0].user_id == "u000051"
            assert {a.user_id for a in found.accounts} >= {"u004242", "u042420"}
            assert elapsed < 1.0, elapsed  # three pages with counts, typically ~20 ms in all
        finally:
            await pool.close()
    finally:
        await conn.close()


def test_openapi_documents_every_api_route(settings):
    """Every /api route the application serves (billing on) is in docs/openapi.yaml, and
    nothing documented is missing from the application."""
    from types import SimpleNamespace

    import yaml

    from extproc.web import build_app

    spec = yaml.safe_load((Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml").read_text())
    service = SimpleNamespace(settings=settings.replace(stripe_secret_key="sk_test_x", stripe_webhook_secret="whsec_x"),
                              pool=None, ledger=None, metrics=None, clock=None)
    app = build_app(service)
    served = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith("/api/") and r.method != "HEAD"}
    documented = {(m, p) for p, item in spec["paths"].items() for m in item
                  if m in ("get", "post", "put", "patch", "delete")}
    assert served == documented


async def test_database_down_is_503_not_500(settings):
    """The console answers 503 (JSON for the API, a page for HTML) when PostgreSQL is gone."""
    from aiohttp.test_utils import TestClient, TestServer

    from extproc.ledger import Ledger
    from extproc.web import build_app

    class DownPool:
        async def fetch(self, *args: Any, **kwargs: Any) -> Any:
            raise ConnectionRefusedError("database is down")

        fetchrow = fetchval = fetch

    class DownService:
        def __init__(self) -> None:
            self.settings = settings
            self.pool = DownPool()
            self.ledger = Ledger(self.pool, settings)  # type: ignore[arg-type]

    async with TestClient(TestServer(build_app(DownService()))) as c:
        resp = await c.get("/api/admin/users", headers=bearer(settings.admin_token))
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "unavailable"
        resp = await c.get("/api/me", headers=bearer(mint_token(settings, "someone")))
        assert resp.status == 503
        resp = await c.get("/me")  # the sign-in form needs no database
        assert resp.status == 200
