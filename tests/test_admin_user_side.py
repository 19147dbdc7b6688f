"""The admin's side of the user's controls (issue 14) over real HTTP against the real web app
and PostgreSQL: a per-user monthly allowance (from the next cycle), the user's personal cap
set by an admin, LGPD erasure, and usage by model and day. Every write leaves an audit row;
bad input is a 400 (JSON for the API, a page in the console's language), never a 500."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from support.clock import Clock
from support.gate import open_account, spend
from support.web import HOSTILE, admin_browser, api, base, csrf_of

from extproc.app import Service
from extproc.settings import Settings


@pytest.fixture
async def clocked(settings: Settings) -> AsyncIterator[tuple[Service, Clock]]:
    """A processor of its own whose clock the test moves (a month passes in no time), its
    console in English (so the "page's language" is checked in the other language too)."""
    clock = Clock(datetime.now(UTC).replace(microsecond=0))
    svc = Service(settings.replace(language="en"), clock=clock)
    await svc.start()
    yield svc, clock
    await svc.stop(grace=1)


async def audit_rows(service: Service, user_id: str, action: str) -> list[Any]:
    assert service.pool is not None
    return await service.pool.fetch(
        "SELECT * FROM audit_log WHERE target = $1 AND action = $2 ORDER BY id", user_id, action)


async def form_post(browser: aiohttp.ClientSession, service: Service, user_id: str, what: str,
                    data: dict[str, str], *, csrf: bool = True) -> tuple[int, str, str]:
    """Post a dialog's form of the user page as a browser does: (status, final URL, page)."""
    page_url = f"{base(service)}/admin/users/{user_id}"
    async with browser.get(page_url) as resp:
        token = csrf_of(await resp.text())
    async with browser.post(f"{page_url}/{what}", data={**({"csrf": token} if csrf else {}), **data}) as resp:
        return resp.status, str(resp.url), await resp.text()


# ---------------------------------------------------------------- the allowance


async def test_allowance_by_api_is_audited_and_applies_from_the_next_cycle(http, clocked, settings, user):
    service, clock = clocked
    assert service.ledger is not None
    await open_account(service, user)
    url = f"{base(service)}/api/admin/users/{user}/allowance"
    status, body = await api(http, url, "PUT", settings.admin_token, {"tokens": 250_000, "reason": "projeto X"})
    assert status == 200, body
    account = body["account"]
    assert account["allowance_override"] == 250_000
    # This cycle keeps what the user was told; the override waits for the next one.
    assert account["allowance"] == settings.default_monthly_tokens
    assert account["budget"] == settings.default_monthly_tokens
    (row,) = await audit_rows(service, user, "allowance")
    assert (row["actor"], row["reason"]) == ("admin-token", "projeto X")

    before = await service.ledger.account(user)
    clock.now = before.cycle_end + timedelta(seconds=1)
    await open_account(service, user)  # the next request rolls the cycle
    rolled = await service.ledger.account(user)
    assert rolled.cycle_start >= before.cycle_end
    assert rolled.allowance == 250_000 and rolled.cycle_budget == 250_000

    # null: back to the plan's allowance, again from the next cycle.
    status, body = await api(http, url, "PUT", settings.admin_token, {"tokens": None, "reason": "fim do projeto"})
    assert status == 200 and body["account"]["allowance_override"] is None
    assert body["account"]["allowance"] == 250_000
    clock.now = rolled.cycle_end + timedelta(seconds=1)
    await open_account(service, user)
    assert (await service.ledger.account(user)).allowance == settings.default_monthly_tokens
    assert [r["reason"] for r in await audit_rows(service, user, "allowance")] == ["projeto X", "fim do projeto"]


async def test_allowance_api_refuses_bad_input_with_400_and_unknown_users_with_404(http, service, settings, user):
    await open_account(service, user)
    url = f"{base(service)}/api/admin/users/{user}/allowance"
    token = settings.admin_token
    cases: list[tuple[Any, str, str]] = [
        ({"tokens": -1, "reason": "x"}, "tokens", "negative"),
        ({"tokens": "abc", "reason": "x"}, "tokens", "not_integer"),
        ({"tokens": "1000", "reason": "x"}, "tokens", "not_integer"),
        ({"tokens": 1.5, "reason": "x"}, "tokens", "not_integer"),
        ({"tokens": True, "reason": "x"}, "tokens", "not_integer"),
        ({"tokens": 10**13, "reason": "x"}, "tokens", "too_large"),
        ({"reason": "x"}, "tokens", "required"),
        ({"tokens": 10}, "reason", "required"),
        ({"tokens": 10, "reason": " "}, "reason", "required"),
        ({"tokens": 10, "reason": "x" * 501}, "reason", "too_long"),
    ]
    for body, field, code in cases:
        status, answer = await api(http, url, "PUT", token, body)
        assert status == 400, (body, answer)
        assert answer["error"]["fields"][field]["code"] == code, (body, answer)
        assert answer["error"]["fields"][field]["message"], answer
    assert (await api(http, url, "PUT", token, raw=b"[1]"))[0] == 400
    status, answer = await api(http, f"{base(service)}/api/admin/users/nobody-{uuid.uuid4().hex}/allowance",
                               "PUT", token, {"tokens": 10, "reason": "x"})
    assert status == 404 and answer["error"]["code"] == "unknown_user"
    assert (await api(http, url, "PUT", None, {"tokens": 10, "reason": "x"}))[0] == 401
    assert await audit_rows(service, user, "allowance") == []
    # 0 is a real choice (the user spends only credits), unlike a grant of 0.
    status, answer = await api(http, url, "PUT", token, {"tokens": 0, "reason": "só créditos"})
    assert status == 200 and answer["account"]["allowance_override"] == 0


async def test_allowance_by_the_console_form(service, settings, user):
    await open_account(service, user)
    browser = await admin_browser(service, settings)
    try:
        status, _, page = await form_post(browser, service, user, "allowance",
                                          {"mode": "custom", "tokens": "-5", "reason": "x"})
        assert status == 400 and "O número não pode ser negativo." in page
        assert 'id="allowance-dialog" aria-labelledby="allowance-title" open' in page
        status, _, page = await form_post(browser, service, user, "allowance",
                                          {"mode": "custom", "tokens": "", "reason": "x"})
        assert status == 400 and "Campo obrigatório." in page
        status, _, page = await form_post(browser, service, user, "allowance", {"mode": "plan", "reason": "x"})
        assert status == 400 and "O usuário já tem esta franquia." in page
        status, _, page = await form_post(browser, service, user, "allowance",
                                          {"mode": "custom", "tokens": "150.000", "reason": ""})
        assert status == 400 and "Campo obrigatório." in page
        status, _, page = await form_post(browser, service, user, "allowance",
                                          {"mode": "custom", "tokens": "150.000", "reason": "x"}, csrf=False)
        assert status == 403
        assert await audit_rows(service, user, "allowance") == []

        status, final, page = await form_post(browser, service, user, "allowance",
                                              {"mode": "custom", "tokens": "150.000", "reason": HOSTILE})
        assert status == 200 and final.endswith("?done=allowance")
        assert "Franquia mensal alterada; vale a partir do próximo ciclo." in page
        assert 'id="monthly-allowance">150.000<' in page
        assert HOSTILE not in page and "&lt;script&gt;" in page  # the reason, in the audit table, inert
        (row,) = await audit_rows(service, user, "allowance")
        assert row["reason"] == HOSTILE and row["after"]  # the reason is kept as typed
        assert (await service.ledger.account(user)).allowance_override == 150_000
    finally:
        await browser.close()


# ---------------------------------------------------------------- the personal cap


async def test_admin_sets_and_clears_the_personal_cap_audited(http, service, settings, user):
    await open_account(service, user)
    await spend(service, user, 5_000, 3_000)
    url = f"{base(service)}/api/admin/users/{user}/settings"
    status, body = await api(http, url, "PUT", settings.admin_token,
                             {"personal_cap": 10_000, "alerts": {"90": False}, "language": "en",
                              "reason": "pedido do usuário"})
    assert status == 200, body
    assert body["settings"] == {"personal_cap": 10_000, "alerts": {"80": True, "90": False}, "language": "en"}
    assert body["account"]["personal_cap"] == 10_000
    assert body["account"]["used_pct"] == 80.0  # 8 000 of the 10 000 cap, not of the allowance
    (row,) = await audit_rows(service, user, "settings")
    assert row["actor"] == "admin-token" and row["reason"] == "pedido do usuário"

    browser = await admin_browser(service, settings)
    try:
        async with browser.get(f"{base(service)}/admin/users/{user}") as resp:
            page = await resp.text()
        assert 'id="personal-cap">10.000<' in page and 'id="effective-limit">10.000<' in page
        assert 'id="alert-90">Desligado<' in page and 'id="language">Inglês<' in page
        # The audit table names the preference that moved, not the whole object.
        assert "preferences.alerts.90</span>: true → false" in page
        status, _, page = await form_post(browser, service, user, "cap", {"personal_cap": "10.000", "reason": "x"})
        assert status == 400 and "O usuário já tem este limite." in page
        status, _, page = await form_post(browser, service, user, "cap", {"personal_cap": "dez mil", "reason": "x"})
        assert status == 400 and "Informe um número inteiro de tokens" in page
        status, final, page = await form_post(browser, service, user, "cap", {"personal_cap": "", "reason": "liberar"})
        assert status == 200 and final.endswith("?done=cap") and 'id="personal-cap">Nenhum<' in page
    finally:
        await browser.close()
    assert (await service.ledger.account(user)).personal_cap is None
    assert [r["actor"] for r in await audit_rows(service, user, "settings")] == ["admin-token", "admin-token"]


async def test_settings_api_refuses_bad_input(http, service, settings, user):
    await open_account(service, user)
    url = f"{base(service)}/api/admin/users/{user}/settings"
    cases: list[tuple[Any, str, str]] = [
        ({"personal_cap": -1, "reason": "x"}, "personal_cap", "negative"),
        ({"personal_cap": "10", "reason": "x"}, "personal_cap", "not_integer"),
        ({"personal_cap": 10**16, "reason": "x"}, "personal_cap", "too_large"),
        ({"alerts": {"80": "no"}, "reason": "x"}, "alerts.80", "not_boolean"),
        ({"personal_cap": 100_001, "reason": "x"}, "personal_cap", "above_budget"),
        ({"alerts": {"100": False}, "reason": "x"}, "alerts.100", "unknown_field"),
        ({"alerts": [], "reason": "x"}, "alerts", "not_object"),
        ({"language": "fr", "reason": "x"}, "language", "invalid_choice"),
        ({"cap": 10, "reason": "x"}, "cap", "unknown_field"),
        ({"reason": "x"}, "body", "no_settings"),
        ({"personal_cap": 10}, "reason", "required"),
    ]
    for body, field, code in cases:
        status, answer = await api(http, url, "PUT", settings.admin_token, body)
        assert status == 400, (body, answer)
        assert answer["error"]["fields"][field]["code"] == code, (body, answer)
        assert answer["error"]["fields"][field]["message"], answer
    status, answer = await api(http, f"{base(service)}/api/admin/users/nobody-{uuid.uuid4().hex}/settings",
                               "PUT", settings.admin_token, {"personal_cap": 10, "reason": "x"})
    assert status == 404
    status, answer = await api(http, url, "PUT", settings.admin_token, {"personal_cap": 100_001, "reason": "x"})
    assert answer["error"]["fields"]["personal_cap"]["message"] == (
        "O limite não pode passar do orçamento deste ciclo (100.000 tokens): acima dele, não teria efeito.")
    # A save that changes nothing writes nothing, like the user's own.
    status, answer = await api(http, url, "PUT", settings.admin_token, {"alerts": {"80": True}, "reason": "x"})
    assert status == 200 and answer["settings"]["alerts"]["80"] is True
    assert await audit_rows(service, user, "settings") == []


# ---------------------------------------------------------------- erasure


async def test_erase_by_api(http, service, settings, user):
    email = f"{user}@example.com"
    await open_account(service, user, email=email, name="Fulana de Tal")
    await spend(service, user, 1_000, 500)
    await service.ledger.grant(user, 7_000, actor="admin-token", reason="bônus")
    url = f"{base(service)}/api/admin/users/{user}/erase"
    status, answer = await api(http, url, "POST", settings.admin_token, {})
    assert status == 400 and answer["error"]["fields"]["reason"]["code"] == "required"
    assert (await api(http, url, "POST", None, {"reason": "x"}))[0] == 401

    status, answer = await api(http, url, "POST", settings.admin_token, {"reason": "pedido LGPD nº 12"})
    assert status == 200, answer
    pseudonym = answer["pseudonym"]
    assert pseudonym.startswith("erased-") and user not in pseudonym
    assert (await api(http, f"{base(service)}/api/admin/users/{user}", token=settings.admin_token))[0] == 404
    status, answer = await api(http, url, "POST", settings.admin_token, {"reason": "de novo"})
    assert status == 404 and answer["error"]["code"] == "unknown_user"

    status, body = await api(http, f"{base(service)}/api/admin/users/{pseudonym}", token=settings.admin_token)
    assert status == 200
    account = body["account"]
    assert account["email"] is None and account["name"] is None and account["erased_at"]
    assert account["credits"] == 7_000 and account["used"] == 1_500  # amounts stay
    browser = await admin_browser(service, settings)
    try:
        async with browser.get(f"{base(service)}/admin/users?q={pseudonym}") as resp:
            listed = await resp.text()
        assert pseudonym in listed and "Dados pessoais apagados (LGPD)" in listed
    finally:
        await browser.close()
    status, answer = await api(http, f"{base(service)}/api/admin/users/{pseudonym}/erase", "POST",
                               settings.admin_token, {"reason": "de novo"})
    assert status == 409 and answer["error"]["code"] == "already_erased"

    status, audit = await api(http, f"{base(service)}/api/admin/audit?target={pseudonym}&limit=200",
                              token=settings.admin_token)
    assert status == 200
    assert audit["entries"][0]["action"] == "erase"
    assert email not in str(audit) and "Fulana" not in str(audit) and user not in str(audit)


async def test_erase_by_the_console_needs_the_id_typed_again(service, settings, user):
    await open_account(service, user, email=f"{user}@example.com", name="Beltrano")
    browser = await admin_browser(service, settings)
    try:
        async with browser.get(f"{base(service)}/admin/users/{user}") as resp:
            page = await resp.text()
        assert 'id="danger-zone"' in page and "Zona de perigo" in page
        status, _, page = await form_post(browser, service, user, "erase",
                                          {"confirm": user + "x", "reason": "pedido LGPD"})
        assert status == 400
        assert "O texto digitado não é o identificador deste usuário; nada foi apagado." in page
        assert 'id="erase-dialog" aria-labelledby="erase-title" open' in page
        status, _, page = await form_post(browser, service, user, "erase", {"confirm": user, "reason": ""})
        assert status == 400 and "Campo obrigatório." in page
        status, _, _ = await form_post(browser, service, user, "erase", {"confirm": user, "reason": "x"},
                                       csrf=False)
        assert status == 403
        assert (await service.ledger.account(user)).email is not None  # nothing erased so far

        status, final, page = await form_post(browser, service, user, "erase",
                                              {"confirm": user, "reason": "pedido LGPD"})
        assert status == 200 and "/admin/users/erased-" in final and final.endswith("?done=erase")
        assert "Dados pessoais apagados. Não há como desfazer" in page
        assert 'id="erased"' in page and 'id="danger-zone"' not in page and 'id="credits-dialog"' not in page
        assert "Beltrano" not in page and f"{user}@example.com" not in page
        async with browser.get(f"{base(service)}/admin/users/{user}") as resp:
            assert resp.status == 404
            assert "Usuário não encontrado." in await resp.text()
        async with browser.post(f"{base(service)}/admin/users/{user}/erase",
                                data={"csrf": csrf_of(page), "confirm": user, "reason": "de novo"}) as resp:
            assert resp.status == 404
    finally:
        await browser.close()


async def test_console_pages_speak_the_consoles_language(clocked, settings, user):
    service, _ = clocked
    await open_account(service, user)
    browser = await admin_browser(service, settings)
    try:
        status, _, page = await form_post(browser, service, user, "erase", {"confirm": "someone", "reason": "x"})
        assert status == 400 and "The text typed is not this user&#39;s id; nothing was erased." in page
        status, _, page = await form_post(browser, service, user, "cap", {"personal_cap": "-3", "reason": "x"})
        assert status == 400 and "The number cannot be negative." in page
        status, _, page = await form_post(browser, service, user, "allowance",
                                          {"mode": "custom", "tokens": "1,000", "reason": "x"})
        assert status == 200 and 'id="monthly-allowance">1,000<' in page
        assert "Monthly allowance changed; it applies from the next cycle." in page
    finally:
        await browser.close()


# ---------------------------------------------------------------- usage


async def test_usage_by_day_and_model_with_estimates_for_admins(http, service, settings, user):
    await open_account(service, user)
    await spend(service, user, 1_000, 200)
    await spend(service, user, 300, 100)
    await spend(service, user, 2_000, 500, model="gpt-4o")
    url = f"{base(service)}/api/admin/users/{user}/usage"
    status, rows = await api(http, url + "?days=7", token=settings.admin_token)
    assert status == 200, rows
    today = datetime.now(UTC).date().isoformat()
    by_model = {r["model"]: r for r in rows}
    assert set(by_model) == {"gpt-4o-mini", "gpt-4o"}
    mini = by_model["gpt-4o-mini"]
    assert {k: mini[k] for k in ("requests", "tokens")} == {"requests": 2, "tokens": 1_600}
    assert {"day", "model", "requests", "tokens", "estimate", "real_tokens"} == set(mini)
    assert mini["day"] == today and mini["real_tokens"] == 1_600
    assert (await api(http, url, token=settings.admin_token))[0] == 200  # days defaults
    for bad in ("0", "-1", "abc", "100000"):
        status, answer = await api(http, f"{url}?days={bad}", token=settings.admin_token)
        assert status == 400 and answer["error"]["fields"]["days"]["code"], (bad, answer)
    status, _ = await api(http, f"{base(service)}/api/admin/users/nobody-{uuid.uuid4().hex}/usage",
                          token=settings.admin_token)
    assert status == 404

    browser = await admin_browser(service, settings)
    try:
        async with browser.get(f"{base(service)}/admin/users/{user}") as resp:
            page = await resp.text()
        assert 'id="usage"' in page and "gpt-4o-mini" in page and "usage-table" in page
        async with browser.get(f"{base(service)}/admin/users/{user}/usage.csv") as resp:
            assert resp.status == 200 and resp.headers["content-type"].startswith("text/csv")
            lines = (await resp.text()).splitlines()
        assert lines[0] == "cycle,day,model,requests,tokens,estimate,real_tokens"
        assert any(",gpt-4o,1,2500," in line for line in lines[1:])
    finally:
        await browser.close()


async def test_odd_input_to_the_new_routes_is_never_a_500(http, service, settings, user):
    await open_account(service, user)
    token = settings.admin_token
    root = f"{base(service)}/api/admin/users"
    odd: list[Any] = [None, [], "x" * 10_000, {"a": {"b": {"c": []}}}, 10**400, -0.0, "１２３", "\u0000"]
    for path, method, key in (("allowance", "PUT", "tokens"), ("settings", "PUT", "personal_cap"),
                              ("settings", "PUT", "alerts"), ("settings", "PUT", "language")):
        for value in odd:
            status, answer = await api(http, f"{root}/{user}/{path}", method, token, {key: value, "reason": "x"})
            assert status in (200, 400), (path, key, value, status, answer)
            if status == 400:
                assert answer["error"]["code"] == "validation_failed"
    # Reasons: every one of these is refused (a NUL would have reached PostgreSQL, which refuses it).
    for reason in (None, [], "x" * 10_000, {"a": 1}, 10**400, -0.0, "\u0000", "a\u0000b", "\u0007"):
        for path, method, extra in (("erase", "POST", {}), ("allowance", "PUT", {"tokens": 5}),
                                    ("settings", "PUT", {"personal_cap": 5}), ("credits", "POST", {"tokens": 5})):
            status, answer = await api(http, f"{root}/{user}/{path}", method, token, {**extra, "reason": reason})
            assert status == 400 and "reason" in answer["error"]["fields"], (path, reason, status, answer)
    for raw in (b"", b"null", b"\xff", b"{" * 5_000):
        for path, method in (("allowance", "PUT"), ("settings", "PUT"), ("erase", "POST")):
            status, _ = await api(http, f"{root}/{user}/{path}", method, token, raw=raw)
            assert status == 400, (path, raw[:10])
    for days in ("1e3", "٣", " 7", "7.0", "-0"):
        status, _ = await api(http, f"{root}/{user}/usage?days={days}", token=token)
        assert status in (200, 400), days
    assert (await service.ledger.account(user)).erased_at is None  # nothing above erased anything
    # NUL cannot be stored in PostgreSQL's text: never sent to it, so a 404 or a 400, not a 500.
    for path in ("a%00b", "a%00b/usage", "a%00b/entries", "a%00b/statement.csv"):
        assert (await api(http, f"{root}/{path}", token=token))[0] == 404, path
    assert (await api(http, f"{root}/a%00b/erase", "POST", token, {"reason": "x"}))[0] == 404
    for query in ("users?q=a%00b", "users.csv?q=%00", "audit?target=a%00b", "audit?actor=%00"):
        assert (await api(http, f"{base(service)}/api/admin/{query}", token=token))[0] == 400, query
    browser = await admin_browser(service, settings)
    try:
        for what, data in (("allowance", {"mode": "custom", "tokens": "１２３", "reason": "x"}),
                           ("allowance", {"mode": "??", "reason": "x"}),
                           ("cap", {"personal_cap": "1.2.3", "reason": "x" * 600}),
                           ("erase", {"confirm": "\u0000", "reason": "x"}),
                           ("erase", {"confirm": user, "reason": "a\u0000b"})):
            status, _, page = await form_post(browser, service, user, what, data)
            assert status == 400 and 'role="alert"' in page, (what, data)
        for url, expected in (("/admin/users/a%00b", 404), ("/admin/users?q=a%00b", 400),
                              ("/admin/audit?target=%00", 400), ("/admin/users.csv?q=%00", 400)):
            async with browser.get(base(service) + url) as resp:
                assert resp.status == expected, url
    finally:
        await browser.close()
