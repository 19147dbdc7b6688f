"""The user's settings on /me and /api/me/settings (personal cap, 80/90 % e-mails, language),
the language a page is read in, and the data export: the real web app and PostgreSQL, through
Envoy for the API, and the main flow in real Chromium. Every change writes its audit row."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.browser import DESKTOP, PHONE, axe_violations, findings, missing_tools, report, tab_to
from support.gate import open_account, spend
from support.web import HOSTILE, api, base, csrf_of, me_signed_in

from extproc.app import Service
from extproc.identity import mint_token
from extproc.web.kit import accepted_language
from extproc.web.sessions import MagicLinks, Signer

SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
NO_CHROMIUM = not os.path.exists(CHROMIUM)  # only the browser test is skipped without it


async def audit_rows(service: Service, user: str) -> list[dict[str, Any]]:
    rows = await service.pool.fetch(
        "SELECT actor, action, target, before, after, source_ip FROM audit_log"
        " WHERE target = $1 AND action = 'settings' ORDER BY id", user)
    return [{**dict(r), "before": json.loads(r["before"]), "after": json.loads(r["after"])} for r in rows]


async def settings_of(service: Service, user: str) -> tuple[Any, ...]:
    row = await service.pool.fetchrow(
        "SELECT personal_cap, notify_80, notify_90, language FROM accounts WHERE user_id = $1", user)
    return tuple(row)


async def post_settings(client: aiohttp.ClientSession, service: Service, **form: str) -> tuple[int, str, str]:
    """Post the settings form as a browser does (unchecked boxes are not sent)."""
    async with client.get(base(service) + "/me/settings") as resp:
        page = await resp.text()
    async with client.post(base(service) + "/me/settings", data={"csrf": csrf_of(page), **form},
                           allow_redirects=False) as resp:
        return resp.status, resp.headers.get("Location", ""), await resp.text()


def field_error(page: str, name: str) -> str | None:
    found = re.search(rf'<p class="field-error" id="{name}-error" role="alert">([^<]*)</p>', page)
    return found.group(1) if found else None


# ---------------------------------------------------------------- the form


async def test_settings_form_sets_and_clears_the_cap_and_alerts_audited(service, user):
    await open_account(service, user, email=f"{user}@example.com")
    await spend(service, user, 3_000, 1_000)
    async with await me_signed_in(service, user) as client:
        async with client.get(base(service) + "/me/settings") as resp:
            page = await resp.text()
        assert resp.status == 200 and 'lang="pt-BR"' in page
        assert "O aviso de 100% (saldo esgotado) é sempre enviado." in page
        assert "Seu orçamento neste ciclo é de 100.000 tokens, dos quais você já usou 4.000." in page
        assert 'name="notify_80" id="notify_80" value="on" checked' in page
        assert 'id="personal_cap" name="personal_cap"' in page and 'value=""' in page

        status, location, _ = await post_settings(client, service, personal_cap="50.000", notify_80="on",
                                                  language="")
        assert (status, location) == (303, "/me/settings?done=saved")
        assert await settings_of(service, user) == (50_000, True, False, None)
        async with client.get(base(service) + location) as resp:
            page = await resp.text()
        assert 'role="status" id="settings-notice">Preferências salvas.' in page
        assert 'value="50.000"' in page and 'name="notify_90" id="notify_90" value="on">' in page
        rows = await audit_rows(service, user)
        assert len(rows) == 1 and (rows[0]["actor"], rows[0]["target"]) == (f"user:{user}", user)
        assert (rows[0]["before"]["personal_cap"], rows[0]["after"]["personal_cap"]) == (None, 50_000)
        assert rows[0]["after"]["preferences"]["alerts"] == {"80": True, "90": False}
        assert rows[0]["source_ip"]
        async with client.get(base(service) + "/me") as resp:
            page = await resp.text()
        assert '<p class="big num" id="cap-value">50.000' in page
        # the usage card measures against the cap, in its words as in its percentage
        assert "4.000 de 50.000 tokens" in page and "8,0%" in page

        # bad values: the message next to the field, in the page's language; nothing written
        for value, message in (
                ("-5", "O limite não pode ser negativo."),
                ("abc", "Informe um número inteiro de tokens (ex.: 50.000), ou deixe em branco."),
                ("1,5", "Informe um número inteiro de tokens (ex.: 50.000), ou deixe em branco."),
                ("100.001", "O limite não pode passar do seu orçamento neste ciclo (100.000 tokens): "
                            "acima dele, não teria efeito."),
                ("9" * 20, "Número grande demais (máximo 1.000.000.000.000.000).")):
            status, _, page = await post_settings(client, service, personal_cap=value, notify_80="on",
                                                  notify_90="on", language="en")
            assert status == 400, value
            assert field_error(page, "personal_cap") == message, value
            assert 'aria-invalid="true"' in page and f'value="{value}"' in page
            assert 'lang="pt-BR"' in page  # the language was not saved either
        status, _, page = await post_settings(client, service, personal_cap=HOSTILE, language="fr")
        assert status == 400 and field_error(page, "language") == "Escolha português, inglês ou automático."
        assert HOSTILE not in page and "&lt;script&gt;" in page
        assert await settings_of(service, user) == (50_000, True, False, None)
        assert len(await audit_rows(service, user)) == 1

        # the same values again change nothing and write nothing
        status, _, _ = await post_settings(client, service, personal_cap="50000", notify_80="on")
        assert status == 303 and len(await audit_rows(service, user)) == 1
        # the cap may equal the budget, or be 0 (a user may stop their own use)
        await post_settings(client, service, personal_cap="100.000", notify_80="on")
        assert (await settings_of(service, user))[0] == 100_000
        await post_settings(client, service, personal_cap="0", notify_80="on")
        assert (await settings_of(service, user))[0] == 0
        admission = await service.ledger.admit(user, 10, f"x-{uuid.uuid4().hex}")
        assert admission.status == "personal_cap"
        # cleared: an empty field is no cap
        status, _, _ = await post_settings(client, service, personal_cap="", notify_80="on", notify_90="on")
        assert status == 303 and await settings_of(service, user) == (None, True, True, None)
        rows = await audit_rows(service, user)
        assert len(rows) == 4 and rows[-1]["after"]["personal_cap"] is None
        assert {r["actor"] for r in rows} == {f"user:{user}"}

        # without the form's CSRF token: refused
        async with client.post(base(service) + "/me/settings", data={"personal_cap": "5"}) as resp:
            assert resp.status == 403
    assert len(await audit_rows(service, user)) == 4
    # signed out: the sign-in page, nothing written
    async with aiohttp.ClientSession() as stranger, stranger.post(
            base(service) + "/me/settings", data={"personal_cap": "5"}) as resp:
        assert "Enviar link de acesso" in await resp.text()
    assert len(await audit_rows(service, user)) == 4


async def test_the_saved_language_then_the_browsers_then_the_deployments(service, user):
    await open_account(service, user, email=f"{user}@example.com")
    assert accepted_language("fr-FR, en-GB;q=0.8, pt;q=0.9") == "pt-BR"
    assert accepted_language("de, en;q=0.5") == "en"
    assert accepted_language("pt-PT;q=0, en;q=0.1") == "en"
    assert accepted_language("de, *") is None and accepted_language("") is None
    async with await me_signed_in(service, user) as client:
        async with client.get(base(service) + "/me") as resp:  # no Accept-Language: GATE_LANGUAGE
            assert 'lang="pt-BR"' in await resp.text()
        async with client.get(base(service) + "/me", headers={"accept-language": "en-US,en;q=0.9"}) as resp:
            page = await resp.text()
        assert 'lang="en"' in page and "Where your tokens went" in page
        status, location, _ = await post_settings(client, service, language="en", notify_80="on", notify_90="on")
        assert status == 303
        async with client.get(base(service) + location) as resp:
            page = await resp.text()
        assert 'lang="en"' in page and "Settings saved." in page and "The 100% alert" in page
        async with client.get(base(service) + "/me", headers={"accept-language": "pt-BR"}) as resp:
            page = await resp.text()  # the saved choice wins over the browser
        assert 'lang="en"' in page and "Your data" in page and "Download my data (JSON)" in page
        # English forms read English digit groups; errors in English
        status, _, page = await post_settings(client, service, personal_cap="1.000", language="en")
        assert status == 400 and field_error(page, "personal_cap") == \
            "Enter a whole number of tokens (e.g. 50,000), or leave it empty."
        status, _, _ = await post_settings(client, service, personal_cap="1,000", language="en")
        assert status == 303 and (await settings_of(service, user))[:1] == (1_000,)
        # back to automatic: the browser decides again
        await post_settings(client, service, language="", personal_cap="1,000")
        async with client.get(base(service) + "/me", headers={"accept-language": "pt-BR"}) as resp:
            assert 'lang="pt-BR"' in await resp.text()
    # the sign-in page, before any account is known, follows the browser
    async with aiohttp.ClientSession(headers={"accept-language": "en"}) as stranger, stranger.get(
            base(service) + "/me") as resp:
        assert "Send sign-in link" in await resp.text()


# ---------------------------------------------------------------- the API


async def test_api_settings_with_jwt_or_gateway_key(service, settings, http, envoy, user):
    await open_account(service, user, email=f"{user}@example.com")
    url = envoy.url + "/api/me/settings"
    jwt = mint_token(settings, user)
    status, body = await api(http, envoy.url + "/api/me", token=jwt)
    assert status == 200 and body["account"]["personal_cap"] is None
    assert body["account"]["preferences"] == {"alerts": {"80": True, "90": True}, "language": None}

    status, body = await api(http, url, "PUT", jwt, {"personal_cap": 30_000, "alerts": {"80": False},
                                                     "language": "en"})
    assert status == 200, body
    assert body == {"personal_cap": 30_000, "alerts": {"80": False, "90": True}, "language": "en"}
    status, body = await api(http, envoy.url + "/api/me", token=jwt)
    assert body["account"]["personal_cap"] == 30_000
    assert body["account"]["preferences"] == {"alerts": {"80": False, "90": True}, "language": "en"}

    # LibreChat's headers, proven by the gateway key
    key = {"authorization": f"Bearer {settings.gate_key}", "x-user-id": user, "content-type": "application/json"}
    async with http.put(url, headers=key, data=json.dumps({"personal_cap": None, "alerts": {"90": False}})) as resp:
        assert resp.status == 200
        assert await resp.json() == {"personal_cap": None, "alerts": {"80": False, "90": False}, "language": "en"}
    async with http.get(envoy.url + "/api/me", headers=key) as resp:
        assert (await resp.json())["account"]["user_id"] == user
    rows = await audit_rows(service, user)
    assert [r["actor"] for r in rows] == [f"user:{user}"] * 2
    assert rows[0]["after"]["preferences"]["language"] == "en" and rows[1]["after"]["personal_cap"] is None

    # no identity, the headers without the key, a wrong key, the admin token: 401, nothing written
    for headers in ({}, {"x-user-id": user}, {"authorization": "Bearer not-the-key", "x-user-id": user},
                    {"authorization": f"Bearer {settings.admin_token}", "x-user-id": user}):
        async with http.put(url, headers={**headers, "content-type": "application/json"},
                            data=b'{"personal_cap": 1}') as resp:
            assert resp.status == 401, headers
    # bad values: 400 naming the field; nothing written
    for payload, field, code in (
            ({"personal_cap": -1}, "personal_cap", "negative"),
            ({"personal_cap": "1000"}, "personal_cap", "not_integer"),
            ({"personal_cap": 1.5}, "personal_cap", "not_integer"),
            ({"personal_cap": True}, "personal_cap", "not_integer"),
            ({"personal_cap": 10**16}, "personal_cap", "too_large"),
            ({"personal_cap": 100_001}, "personal_cap", "above_budget"),
            ({"alerts": {"80": "yes"}}, "alerts.80", "not_boolean"),
            ({"alerts": {"70": True}}, "alerts.70", "unknown_field"),
            ({"alerts": [True]}, "alerts", "not_object"),
            ({"language": "fr"}, "language", "invalid_choice"),
            ({"language": 1}, "language", "invalid_choice"),
            ({"cap": 5}, "cap", "unknown_field")):
        status, body = await api(http, url, "PUT", jwt, payload)
        assert status == 400, payload
        assert body["error"]["code"] == "validation_failed"
        assert body["error"]["fields"][field]["code"] == code, payload
        assert body["error"]["fields"][field]["message"]
    status, body = await api(http, url, "PUT", jwt, {"personal_cap": 100_001})
    # the user chose English: the messages are English
    assert body["error"]["fields"]["personal_cap"]["message"] == \
        "The cap cannot be above your budget this cycle (100,000 tokens): above it, it would have no effect."
    for raw in (b"not json", b"[1, 2]"):
        status, body = await api(http, url, "PUT", jwt, raw=raw)
        assert status == 400 and body["error"]["fields"]["body"]["code"] == "invalid_json"
    assert len(await audit_rows(service, user)) == 2
    # {} changes nothing, writes nothing, answers the settings
    status, body = await api(http, url, "PUT", jwt, {})
    assert status == 200 and body["alerts"] == {"80": False, "90": False}
    assert len(await audit_rows(service, user)) == 2
    # no account yet: 404
    status, body = await api(http, url, "PUT", mint_token(settings, f"new-{uuid.uuid4().hex}"), {"language": "en"})
    assert status == 404 and body["error"]["code"] == "no_account"


# ---------------------------------------------------------------- the data export


async def test_export_holds_the_users_data_only(service, settings, http, envoy, user):
    other = f"other-{uuid.uuid4().hex[:8]}"
    await open_account(service, user, email=f"{user}@example.com", name="Ana")
    await open_account(service, other, email=f"{other}@example.com")
    await spend(service, user, 1_200, 345)
    await service.ledger.grant(other, 999, actor="admin-token", reason=f"segredo-{other}")
    jwt = mint_token(settings, user)
    async with http.get(envoy.url + "/api/me/export", headers={"authorization": f"Bearer {jwt}"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/json")
        assert resp.headers["Content-Disposition"] == f'attachment; filename="solaris-data-{user}.json"'
        data = await resp.json()
    assert (data["account"]["user_id"], data["account"]["email"], data["account"]["name"]) == (
        user, f"{user}@example.com", "Ana")
    assert [(e["kind"], e["tokens"]) for e in data["ledger_entries"]] == [("cycle_reset", 100_000), ("usage", -1_545)]
    text = json.dumps(data)
    assert other not in text and f"segredo-{other}" not in text
    async with await me_signed_in(service, user) as client:
        async with client.get(base(service) + "/me") as resp:
            page = await resp.text()
        assert 'href="/me/export.json" download' in page and 'href="#privacy"' in page
        async with client.get(base(service) + "/me/export.json") as resp:
            assert resp.status == 200 and "attachment" in resp.headers["Content-Disposition"]
            again = await resp.json()
    # the same document, now also listing the /me session it was downloaded from
    assert (again["account"], again["ledger_entries"]) == (data["account"], data["ledger_entries"])
    assert len(again["sessions"]) == 1 and again["sessions"][0]["revoked_at"] is None
    async with http.get(envoy.url + "/api/me/export") as resp:
        assert resp.status == 401


# ---------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    if NO_CHROMIUM:
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium; make test does)")
    playwright = pytest.importorskip("playwright.async_api", reason="the playwright package is not installed")
    async with playwright.async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield chromium
        await chromium.close()


async def test_user_sets_a_cap_alerts_and_language_in_chromium(browser, service, settings, envoy, user, tmp_path):
    await open_account(service, user, email=f"{user}@example.com", name="Bia")
    await spend(service, user, 6_000, 1_500)
    await spend(service, user, 300, 200, model="claude-3-haiku")
    context = await browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True,
                                        locale="pt-BR")
    violations: list[str] = []
    page = await context.new_page()
    page.set_default_timeout(15_000)
    page.on("console", lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None)
    try:
        token = await MagicLinks(service.pool, Signer(service.settings)).issue(user, service.clock())
        await page.goto(envoy.url + "/me/login?token=" + token)  # through Envoy, as users reach it
        await page.get_by_role("button", name="Entrar").click()
        await page.get_by_role("heading", name="Meu saldo e extrato").wait_for()
        # where the tokens went: a named chart per cycle, the models written out beside it
        chart = page.get_by_role("img", name=re.compile("Tokens por dia e por modelo"))
        assert await chart.count() == 1  # the previous cycle has no usage: no chart, a sentence
        legend = await page.locator("#usage .usage-cycle").first.locator(".usage-legend").inner_text()
        assert "gpt-4o-mini: 7.500 tokens; requisições: 1" in legend and "claude-3-haiku: 500 tokens" in legend
        await page.get_by_text("Tabela: uso por dia e modelo", exact=False).first.click()
        assert await page.locator(".usage-table").first.is_visible()

        await page.get_by_role("navigation", name="Minha conta").get_by_role("link", name="Preferências").click()
        await page.get_by_role("heading", name="Preferências").wait_for()
        cap = page.get_by_label("Limite mensal (tokens)")
        await cap.fill("-5")
        await page.get_by_role("button", name="Salvar preferências").click()
        await page.get_by_text("O limite não pode ser negativo.").wait_for()
        assert await page.get_by_label("Limite mensal (tokens)").get_attribute("aria-invalid") == "true"
        await page.get_by_label("Limite mensal (tokens)").fill("40.000")
        await page.get_by_label("Avisar quando eu usar 90% do limite").uncheck()
        await page.get_by_label("Idioma das páginas e dos e-mails").select_option("en")
        await page.get_by_role("button", name="Salvar preferências").click()
        await page.get_by_text("Settings saved.").wait_for()
        assert await page.evaluate("document.documentElement.lang") == "en"
        assert await page.get_by_label("Monthly cap (tokens)").input_value() == "40,000"
        assert not await page.get_by_label("Tell me when I have used 90% of my limit").is_checked()
        assert await page.get_by_label("Tell me when I have used 80% of my limit").is_checked()
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(SCREENSHOTS / "me-settings.png"), full_page=True)
        assert await settings_of(service, user) == (40_000, True, False, "en")

        await page.get_by_role("link", name="Balance and statement").click()
        await page.get_by_role("heading", name="Where your tokens went").wait_for()
        assert (await page.locator("#cap-value").inner_text()).startswith("40,000")
        await page.screenshot(path=str(SCREENSHOTS / "me-usage.png"), full_page=True)
        async with page.expect_download() as info:
            await page.get_by_role("link", name="Download my data (JSON)").click()
        saved = tmp_path / "data.json"
        await (await info.value).save_as(str(saved))
        assert user in saved.read_text()
        async with page.expect_download() as info:
            await page.get_by_role("link", name="Download usage as CSV").click()
        saved = tmp_path / "usage.csv"
        await (await info.value).save_as(str(saved))
        assert saved.read_text().splitlines()[0] == "cycle,day,model,requests,tokens"
    finally:
        await context.close()
    assert not violations, violations
    rows = await audit_rows(service, user)
    assert len(rows) == 1 and rows[0]["actor"] == f"user:{user}"


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
async def test_me_pages_have_no_axe_violations(browser, service, user, viewport):
    """/me with its charts and tables open, and /me/settings clean and with an error shown:
    no WCAG 2.1 AA violation (axe-core), no sideways scrolling at phone width."""
    if missing_tools():
        pytest.skip(missing_tools())
    await open_account(service, user, email=f"{user}@example.com", name="Bia")
    await spend(service, user, 6_000, 1_500)
    await spend(service, user, 300, 200, model="claude-3-haiku")
    # axe's script is injected: the CSP is bypassed here (the flow test above keeps it)
    context = await browser.new_context(viewport=viewport, locale="pt-BR", bypass_csp=True,
                                        is_mobile=viewport is PHONE, has_touch=viewport is PHONE)
    page = await context.new_page()
    page.set_default_timeout(15_000)
    try:
        token = await MagicLinks(service.pool, Signer(service.settings)).issue(user, service.clock())
        await page.goto(base(service) + "/me/login?token=" + token)
        await page.get_by_role("button", name="Entrar").click()
        await page.get_by_role("heading", name="Meu saldo e extrato").wait_for()
        for summary in await page.locator("#usage details summary").all():
            await summary.click()
        checks = [("/me", await axe_violations(page))]
        await page.goto(base(service) + "/me/settings")
        checks.append(("/me/settings", await axe_violations(page)))
        await page.get_by_label("Limite mensal (tokens)").fill("-5")
        await page.get_by_role("button", name="Salvar preferências").click()
        await page.get_by_text("O limite não pode ser negativo.").wait_for()
        checks.append(("/me/settings with an error", await axe_violations(page)))
        for where, violations in checks:
            rows = findings(violations)
            assert not rows, f"{where}: {len(rows)} WCAG 2.1 AA violations\n" + report(rows)
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        await page.goto(base(service) + "/me")
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    finally:
        await context.close()


async def test_after_an_erasure_the_old_id_sees_nothing(service, settings, http, envoy, user):
    """The user's data erased (LGPD): their /me session signs in no one, the API says the
    account was erased (as the gate does), the export has nothing left under the old id."""
    await open_account(service, user, email=f"{user}@example.com", name="Ana")
    await spend(service, user, 1_000, 500)
    jwt = mint_token(settings, user)
    client = await me_signed_in(service, user)
    async with client:
        pseudonym = await service.ledger.erase(user, actor="admin-token", reason="pedido LGPD")
        async with client.get(base(service) + "/me") as resp:
            page = await resp.text()
        assert "Enviar link de acesso" in page and user not in page and pseudonym not in page
        async with client.get(base(service) + "/me/export.json") as resp:
            assert resp.status == 401
    for path in ("/api/me", "/api/me/export"):
        status, body = await api(http, envoy.url + path, token=jwt)
        assert status == 403 and body["error"]["code"] == "account_erased", path
    status, body = await api(http, envoy.url + "/api/me/settings", "PUT", jwt, {"language": "en"})
    assert status == 403 and body["error"]["code"] == "account_erased"
    status, body = await api(http, envoy.url + "/api/me/usage", token=jwt)
    assert status == 200 and body == []  # the usage lives on under the pseudonym, not this id
    assert await service.pool.fetchval("SELECT count(*) FROM audit_log WHERE action = 'settings'"
                                       " AND target = $1", user) == 0


async def test_settings_by_keyboard_alone(browser, service, user):
    """The settings flow without a mouse: from the page's top, Tab to the settings link, the cap,
    the 90 % box (Space), the language (arrow keys) and the button (Enter); every stop shows
    its focus. The strict CSP stays on."""
    await open_account(service, user, email=f"{user}@example.com")
    context = await browser.new_context(viewport=DESKTOP, locale="pt-BR")
    page = await context.new_page()
    page.set_default_timeout(15_000)
    try:
        token = await MagicLinks(service.pool, Signer(service.settings)).issue(user, service.clock())
        await page.goto(base(service) + "/me/login?token=" + token)
        await tab_to(page, "button[type=submit]")
        await page.keyboard.press("Enter")
        await page.get_by_role("heading", name="Meu saldo e extrato").wait_for()
        await tab_to(page, "a[href='/me/settings']")
        await page.keyboard.press("Enter")
        await page.get_by_role("heading", name="Preferências").wait_for()
        await tab_to(page, "#personal_cap")
        await page.keyboard.type("12.345")
        await tab_to(page, "#notify_90")
        await page.keyboard.press("Space")
        await tab_to(page, "#language")
        await page.keyboard.press("ArrowDown")  # automatic -> Português (Brasil)
        await tab_to(page, "button[type=submit]")
        await page.keyboard.press("Enter")
        await page.get_by_text("Preferências salvas.").wait_for()
    finally:
        await context.close()
    assert await settings_of(service, user) == (12_345, True, False, "pt-BR")
