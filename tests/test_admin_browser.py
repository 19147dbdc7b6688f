"""The console in a real browser: Debian's Chromium driven by Playwright's async API (the
processor runs in this test's event loop, so a blocking sync call would starve it).

Skipped, with the reason, where /usr/bin/chromium is missing; `make test` installs it.
Screenshots of the dashboard and the user detail are written to docs/screenshots/."""

from __future__ import annotations

import csv
import io
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from support.gate import open_account, spend
from support.mail import SmtpServer, link_in, start_mail_service
from support.web import HOSTILE

from extproc.app import Service
from extproc.identity import mint_token
from extproc.settings import Settings

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is not installed (apt-get install chromium; make test does)")
pytest.importorskip("playwright.async_api", reason="the playwright package (test extra) is not installed")


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield chromium
        await chromium.close()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True,
                                        locale="pt-BR")
    tab = await context.new_page()
    tab.set_default_timeout(15_000)
    # Everything must work under the pages' strict CSP: no inline script or style anywhere.
    violations: list[str] = []
    tab.on("console", lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None)
    yield tab
    await context.close()
    assert not violations, violations


@pytest.fixture
async def mail_service(settings: Settings, smtp: SmtpServer) -> AsyncIterator[Service]:
    svc = await start_mail_service(settings, smtp, "pt-BR")
    yield svc
    await svc.stop(grace=1)


async def sign_in_admin(page: Any, url: str, credential: str) -> None:
    await page.goto(url + "/admin")
    await page.get_by_label("Token de administrador ou JWT").fill(credential)
    await page.get_by_role("button", name="Entrar").click()


async def no_horizontal_overflow(page: Any) -> bool:
    return bool(await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"))


async def test_admin_adds_credits_and_sees_balance_audit_and_csv(page, envoy, service, settings, tmp_path):
    tag = uuid.uuid4().hex[:6]
    user = f"maria-{tag}"
    email = f"maria.{tag}@example.com"
    await open_account(service, user, email=email, name=f"Maria {tag}")
    await spend(service, user, 60_000, 22_000)  # 82 %: warned
    for i in range(3):
        await open_account(service, f"other-{tag}-{i}", email=f"o{i}.{tag}@example.com")
        await spend(service, f"other-{tag}-{i}", 1_000 * (i + 1), 500)

    await sign_in_admin(page, envoy.url, settings.admin_token)
    await page.get_by_role("heading", name="Painel").wait_for()
    assert await page.get_by_text("Tokens usados neste ciclo").is_visible()
    assert await page.locator(".chart svg rect.tokens").count() == 30
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / "dashboard.png"), full_page=True)

    await page.get_by_role("link", name="Usuários").click()
    await page.get_by_label("Buscar").fill(f"maria.{tag}")
    await page.get_by_role("button", name="Filtrar").click()
    await page.get_by_text("1 conta", exact=True).wait_for()
    row = page.locator("table.users tbody tr")
    assert await row.count() == 1
    assert "82,0%" in await row.inner_text()
    await page.screenshot(path=str(SCREENSHOTS / "users.png"), full_page=True)
    await row.get_by_role("link", name=user).click()

    await page.locator("#available").wait_for()
    assert (await page.locator("#available").inner_text()).strip() == "18.000"
    assert "Alerta 80%" in await page.locator("#state").inner_text()
    await page.get_by_role("link", name="Adicionar créditos").click()
    dialog = page.get_by_role("dialog", name="Adicionar créditos")
    await dialog.wait_for()
    # validation: a negative amount is refused with a message, the dialog stays open
    await dialog.get_by_label("Quantidade de tokens").fill("-5")
    await dialog.get_by_label("Motivo (obrigatório)").fill("teste")
    await dialog.get_by_role("button", name="Adicionar").click()
    await page.get_by_text("A quantidade deve ser maior que zero.").wait_for()
    dialog = page.get_by_role("dialog", name="Adicionar créditos")
    assert await dialog.is_visible()
    await dialog.get_by_label("Quantidade de tokens").fill("50.000")
    await dialog.get_by_label("Motivo (obrigatório)").fill("bônus de boas-vindas")
    await dialog.get_by_role("button", name="Adicionar").click()
    await page.get_by_text("Créditos adicionados.").wait_for()
    assert (await page.locator("#available").inner_text()).strip() == "68.000"
    assert (await page.locator("#credits").inner_text()).strip() == "50.000"
    assert "Saldo disponível: 68.000 tokens." in await page.locator("#notice").inner_text()
    statement = page.locator("table.statement tbody tr").first
    assert "+50.000" in await statement.inner_text() and "bônus de boas-vindas" in await statement.inner_text()
    audit = page.locator("table.audit tbody tr").first
    audit_text = await audit.inner_text()
    assert "Crédito" in audit_text and "admin-token" in audit_text and "0 → 50.000" in audit_text
    await page.screenshot(path=str(SCREENSHOTS / "user-detail.png"), full_page=True)

    async with page.expect_download() as info:
        await page.get_by_role("link", name="Baixar CSV").click()
    download = await info.value
    saved = tmp_path / "statement.csv"
    await download.save_as(str(saved))
    rows = list(csv.DictReader(io.StringIO(saved.read_text())))
    assert [r["kind"] for r in rows] == ["grant", "usage", "cycle_reset"]
    assert rows[0]["tokens"] == "50000" and rows[0]["reason"] == "bônus de boas-vindas"

    await page.get_by_role("link", name="Auditoria").first.click()
    await page.get_by_label("Alvo").fill(user)
    await page.get_by_role("button", name="Filtrar").click()
    assert "bônus de boas-vindas" in await page.locator("table.audit tbody").inner_text()
    await page.screenshot(path=str(SCREENSHOTS / "audit.png"), full_page=True)

    await page.goto(envoy.url + f"/admin/users?q=other-{tag}&sort=usage&order=desc")
    async with page.expect_download() as info:
        await page.get_by_role("link", name="Exportar CSV").click()
    saved = tmp_path / "users.csv"
    await (await info.value).save_as(str(saved))
    users = list(csv.DictReader(io.StringIO(saved.read_text())))
    assert [u["user_id"] for u in users] == [f"other-{tag}-2", f"other-{tag}-1", f"other-{tag}-0"]

    await page.get_by_role("button", name="Sair").click()
    await page.get_by_label("Token de administrador ou JWT").wait_for()
    await page.goto(envoy.url + "/admin/users")
    assert await page.get_by_label("Token de administrador ou JWT").is_visible()


async def test_keyboard_only_suspend_and_hostile_text_at_phone_width(browser, envoy, service, settings):
    tag = uuid.uuid4().hex[:6]
    user = f"{HOSTILE}-{tag}"
    long_email = f"{'muito.comprido.' * 8}{tag}@subdominio-extremamente-longo.example.com.br"
    await open_account(service, user, email=long_email, name=HOSTILE)
    await service.ledger.grant(user, 100_000_000, actor="test", reason="saldo grande")
    context = await browser.new_context(viewport={"width": 375, "height": 800}, is_mobile=True, has_touch=True)
    page = await context.new_page()
    page.set_default_timeout(15_000)
    try:
        await sign_in_admin(page, envoy.url, mint_token(settings, "ana", admin=True))
        await page.get_by_role("heading", name="Painel").wait_for()
        await page.goto(envoy.url + "/admin/users?q=" + quote(user, safe=""))
        assert await page.evaluate("window.pwned") is None
        await page.get_by_role("link", name=user).click()
        await page.locator("#available").wait_for()
        assert await page.evaluate("window.pwned") is None
        assert HOSTILE in await page.locator("h1").inner_text()
        assert (await page.locator("#available").inner_text()).strip() == "100.100.000"
        assert await no_horizontal_overflow(page), "the page scrolls sideways at phone width"
        await page.screenshot(path=str(SCREENSHOTS / "user-detail-phone.png"), full_page=True)

        # keyboard only: focus the action, Enter opens the dialog, type, Tab, type, Enter submits
        await page.get_by_role("link", name="Suspender").focus()
        await page.keyboard.press("Enter")
        dialog = page.get_by_role("dialog", name="Suspender")
        await dialog.wait_for()
        await page.keyboard.press("Escape")
        await dialog.wait_for(state="hidden")
        await page.get_by_role("link", name="Suspender").focus()
        await page.keyboard.press("Enter")
        await page.keyboard.press("Tab")
        focused = await page.evaluate("document.activeElement.id")
        if focused != "suspension-reason":  # the reason field is the dialog's first input
            await page.get_by_role("dialog", name="Suspender").get_by_label("Motivo (obrigatório)").focus()
        await page.keyboard.type("uso indevido")
        await page.keyboard.press("Enter")
        await page.get_by_text("Usuário suspenso.").wait_for()
        assert "Suspenso" in await page.locator("#state").inner_text()
        audit = await page.locator("table.audit tbody tr").first.inner_text()
        assert "jwt:ana" in audit and "uso indevido" in audit
    finally:
        await context.close()


async def test_non_admin_gets_403(page, envoy, settings):
    await sign_in_admin(page, envoy.url, mint_token(settings, f"joao-{uuid.uuid4().hex[:6]}"))
    await page.get_by_text("Este usuário não tem permissão de administrador.").wait_for()
    response = await page.goto(envoy.url + "/admin/users")
    assert response is not None and response.status == 401
    response = await page.request.get(envoy.url + "/api/admin/users",
                                      headers={"authorization": "Bearer " + mint_token(settings, "joao")})
    assert response.status == 403


async def test_user_signs_in_by_emailed_link_and_sees_only_own_statement(page, mail_service, smtp, settings,
                                                                          tmp_path):
    inbox = smtp.mailbox
    tag = uuid.uuid4().hex[:6]
    user, other = f"bia-{tag}", f"caio-{tag}"
    email = f"bia.{tag}@example.com"
    await open_account(mail_service, user, email=email, name="Bia")
    await open_account(mail_service, other, email=f"caio.{tag}@example.com")
    await spend(mail_service, user, 1_200, 345)
    await mail_service.ledger.grant(other, 999, actor="admin-token", reason=f"segredo-{tag}")

    base_url = f"http://127.0.0.1:{mail_service.http_port}"
    await page.goto(base_url + "/me")
    await page.get_by_label("E-mail").fill(email)
    await page.get_by_role("button", name="Enviar link de acesso").click()
    await page.get_by_role("heading", name="Verifique seu e-mail").wait_for()
    link = link_in(await inbox.wait_for(email))
    await page.goto(link)
    await page.get_by_role("button", name="Entrar").click()
    await page.get_by_role("heading", name="Meu saldo e extrato").wait_for()
    assert (await page.locator("#available").inner_text()).startswith("98.455")
    body = await page.locator("main").inner_text()
    assert "Extrato" in body and other not in body and f"segredo-{tag}" not in body
    assert await no_horizontal_overflow(page)
    await page.screenshot(path=str(SCREENSHOTS / "me.png"), full_page=True)
    async with page.expect_download() as info:
        await page.get_by_role("link", name="Baixar CSV").click()
    saved = tmp_path / "extrato.csv"
    await (await info.value).save_as(str(saved))
    rows = list(csv.DictReader(io.StringIO(saved.read_text())))
    assert [r["kind"] for r in rows] == ["usage", "cycle_reset"] and "actor" not in rows[0]
    # the link was single-use
    await page.get_by_role("button", name="Sair").click()
    await page.goto(link)
    await page.get_by_role("button", name="Entrar").click()
    await page.get_by_role("heading", name="Link inválido ou expirado").wait_for()


async def test_admin_sets_allowance_and_cap_sees_usage_and_erases_the_user(page, envoy, service, settings):
    tag = uuid.uuid4().hex[:6]
    user = f"rita-{tag}"
    email = f"rita.{tag}@example.com"
    await open_account(service, user, email=email, name=f"Rita {tag}")
    await spend(service, user, 6_000, 2_000)
    await spend(service, user, 1_000, 500, model="gpt-4o")

    await sign_in_admin(page, envoy.url, settings.admin_token)
    await page.get_by_role("heading", name="Painel").wait_for()
    await page.goto(envoy.url + "/admin/users/" + quote(user, safe=""))
    await page.locator("#available").wait_for()

    # Usage by model and day: the chart's legend and the table behind it, estimates included.
    usage = page.locator("#usage")
    assert "gpt-4o-mini" in await usage.inner_text() and "gpt-4o" in await usage.inner_text()
    assert await usage.locator("svg[role=img]").count() >= 1

    # The per-user allowance: from the next cycle, with a validation error on the way.
    await page.get_by_role("link", name="Alterar franquia mensal").click()
    dialog = page.get_by_role("dialog", name="Alterar franquia mensal")
    await dialog.wait_for()
    await dialog.get_by_label("Franquia a partir do próximo ciclo").select_option("custom")
    await dialog.get_by_label("Tokens por mês (franquia própria)").fill("-10")
    await dialog.get_by_label("Motivo (obrigatório)").fill("projeto especial")
    await dialog.get_by_role("button", name="Salvar franquia").click()
    await page.get_by_text("O número não pode ser negativo.").wait_for()
    dialog = page.get_by_role("dialog", name="Alterar franquia mensal")
    await dialog.get_by_label("Tokens por mês (franquia própria)").fill("250.000")
    await dialog.get_by_role("button", name="Salvar franquia").click()
    await page.get_by_text("Franquia mensal alterada; vale a partir do próximo ciclo.").wait_for()
    assert (await page.locator("#monthly-allowance").inner_text()).strip() == "250.000"
    assert (await page.locator("#allowance").inner_text()).strip() == "90.500"  # this cycle: unchanged

    # The personal cap, keyboard only: the link, Enter, the first field has focus, Tab, Enter.
    await page.get_by_role("link", name="Alterar limite pessoal").focus()
    await page.keyboard.press("Enter")
    await page.get_by_role("dialog", name="Alterar limite pessoal").wait_for()
    assert await page.evaluate("document.activeElement.id") == "cap-tokens"
    await page.keyboard.type("20.000")
    await page.keyboard.press("Tab")
    await page.keyboard.type("pedido do usuário")
    await page.keyboard.press("Enter")
    await page.get_by_text("Limite pessoal alterado.").wait_for()
    assert (await page.locator("#personal-cap").inner_text()).strip() == "20.000"
    assert (await page.locator("#effective-limit").inner_text()).strip() == "20.000"
    audit = await page.locator("table.audit tbody").inner_text()
    assert "Limite e preferências" in audit and "Franquia mensal" in audit and "pedido do usuário" in audit

    # Erasure: the id typed again; a mismatch is refused with a readable message.
    await page.get_by_role("link", name="Apagar dados pessoais…").click()
    dialog = page.get_by_role("dialog", name="Apagar dados pessoais")
    await dialog.wait_for()
    await dialog.get_by_label("Digite o identificador do usuário para confirmar").fill(f"rita-{tag}x")
    await dialog.get_by_label("Motivo (obrigatório)").fill("pedido LGPD")
    await dialog.get_by_role("button", name="Apagar definitivamente").click()
    await page.get_by_text("O texto digitado não é o identificador deste usuário; nada foi apagado.").wait_for()
    dialog = page.get_by_role("dialog", name="Apagar dados pessoais")
    await dialog.get_by_label("Digite o identificador do usuário para confirmar").fill(user)
    await dialog.get_by_role("button", name="Apagar definitivamente").click()
    await page.get_by_text("Dados pessoais apagados. Não há como desfazer").wait_for()
    assert "/admin/users/erased-" in page.url
    main = await page.locator("main").inner_text()
    assert email not in main and f"Rita {tag}" not in main
    assert await page.locator("#danger-zone").count() == 0
    assert (await page.locator("#credits").inner_text()).strip() == "0"
    response = await page.goto(envoy.url + "/admin/users/" + quote(user, safe=""))
    assert response is not None and response.status == 404


async def test_the_user_sides_dialogs_and_the_erased_page_pass_axe(browser, envoy, service, settings):
    """axe-core (WCAG 2.1 AA) on what this part of the console adds: the allowance, cap and
    erase dialogs open, each with a validation error, and an erased account's page."""
    from support.browser import AXE, axe_violations, findings, report

    if not AXE.exists():
        pytest.skip(f"{AXE} is missing (make test runs npm ci)")
    tag = uuid.uuid4().hex[:6]
    user = f"axe-{tag}"
    await open_account(service, user, email=f"axe.{tag}@example.com", name="Axe")
    await spend(service, user, 3_000, 1_000)
    context = await browser.new_context(viewport={"width": 1280, "height": 900}, locale="pt-BR", bypass_csp=True)
    page = await context.new_page()
    page.set_default_timeout(15_000)
    found: dict[str, str] = {}

    async def check(name: str) -> None:
        rows = findings(await axe_violations(page))
        if rows:
            found[name] = report(rows)

    try:
        await sign_in_admin(page, envoy.url, settings.admin_token)
        await page.get_by_role("heading", name="Painel").wait_for()
        url = envoy.url + "/admin/users/" + quote(user, safe="")
        for name, field, bad in (("allowance", "#allowance-tokens", "-1"), ("cap", "#cap-tokens", "muito"),
                                 ("erase", "#erase-confirm", "outro")):
            await page.goto(url)
            await page.locator(f"a[data-dialog='{name}-dialog']").click()
            await page.locator(f"#{name}-dialog[open]").wait_for()
            await check(f"{name}-dialog")
            if name == "allowance":
                await page.locator("#allowance-mode").select_option("custom")
            await page.locator(field).fill(bad)
            await page.locator(f"#{name}-dialog input[name=reason]").fill("axe")
            await page.locator(f"#{name}-dialog button[type=submit]:not([formmethod])").click()
            await page.locator(f"#{name}-dialog[open] .field-error").wait_for()
            await check(f"{name}-refused")
        pseudonym = await service.ledger.erase(user, actor="test", reason="axe")
        await page.goto(envoy.url + "/admin/users/" + quote(pseudonym, safe="") + "?done=erase")
        await page.locator("#erased").wait_for()
        await check("erased-account")
    finally:
        await context.close()
    assert not found, "\n".join(f"{name}:\n{text}" for name, text in found.items())
