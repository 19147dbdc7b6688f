"""Accessibility of the console and /me in real Chromium, through a real Envoy and processor.

1. Every page, at desktop (1280×800) and phone (390×844) widths, in the states a person meets
   (results, an empty search, a filter, each dialog open, a validation error, error pages):
   axe-core — the npm package pinned by package.json, its script injected by Playwright — finds
   no violation of WCAG 2.0/2.1 A and AA. A page is one line of ``PAGES``.
2. The main flows by keyboard alone (``keyboard.press``/``type``, no click): the admin signs in,
   searches, opens a user, grants credits through the dialog (focus moves in, Escape closes it
   and gives focus back) and signs out; a user asks for a link, signs in, reaches the statement
   and its CSV by the skip link, sets a personal cap, and signs out. Every element the focus
   reaches shows a visible indicator.
3. What axe cannot see: reflow at 320 CSS px, unique ids and present id references, named
   tables.

Skipped, with the reason, without Chromium or without node_modules/axe-core (`make test`
installs both). Screenshots of every page checked go to ``A11Y_SHOTS`` (not docs/screenshots).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.browser import (
    AXE_TAGS,
    DESKTOP,
    PHONE,
    PHONE_TAGS,
    REFLOW,
    axe_violations,
    chromium,
    csp_checked_tab,
    dom_problems,
    findings,
    focus_outline,
    missing_tools,
    page_turns_true,
    report,
    tab_to,
    visible_focus,
)
from support.gate import open_account, spend
from support.mail import SmtpServer, link_in
from support.stripe_api import SECRET_KEY, WEBHOOK_SECRET, FakeStripe

from extproc.app import Service
from extproc.identity import mint_token
from extproc.settings import Settings
from extproc_dev import devstack

pytestmark = pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")
pytest.importorskip("playwright.async_api", reason="the playwright package (test extra) is not installed")

A11Y_SHOTS = Path(os.environ.get("A11Y_SHOTS", Path(tempfile.gettempdir()) / "solaris-a11y"))
WIDTHS = {"desktop": DESKTOP, "phone": PHONE}


# ---------------------------------------------------------------- the stack and its people


@dataclass
class Stack:
    service: Service
    url: str  # Envoy's: every page goes through the proxy, like in production
    smtp: SmtpServer
    tag: str
    admin_state: dict[str, Any]  # a signed-in admin's cookies (Playwright storage state)
    me_state: dict[str, Any]  # a signed-in /me user's cookies
    confirm_link: str  # an unused sign-in link (its confirmation page)
    erased: str  # the pseudonym of an account whose personal data was erased

    @property
    def user(self) -> str:
        return f"maria-{self.tag}"

    @property
    def me_user(self) -> str:
        return f"bia-{self.tag}"


@pytest.fixture(scope="module")
def shots() -> Path:
    A11Y_SHOTS.mkdir(parents=True, exist_ok=True)
    return A11Y_SHOTS


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    async with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
async def stack(settings: Settings, upstream: Any, browser: Any,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """A processor with e-mail and Stripe on (the /me billing section shows), behind its own
    Envoy; accounts with a statement long enough for a pager; an admin and a user signed in."""
    smtp = SmtpServer().start()
    stripe = FakeStripe()
    await stripe.start()
    envoy_port = devstack.free_port()
    svc = Service(settings.replace(
        smtp_url=smtp.url, http_port=devstack.free_port(), public_url=f"http://127.0.0.1:{envoy_port}",
        # Every page here signs in or asks for links from 127.0.0.1: only the per-account limit
        # is reached, on purpose, by the 429 page; own counters, whatever other modules spent.
        signin_attempts_per_address=10_000, signin_attempts_per_account=3,
        redis_prefix=f"solaris-a11y-{uuid.uuid4().hex[:8]}:",
        stripe_secret_key=SECRET_KEY, stripe_webhook_secret=WEBHOOK_SECRET, stripe_api_base=stripe.url))
    await svc.start()
    proxy = devstack.Envoy(tmp_path_factory.mktemp("a11y-envoy"), upstream=("127.0.0.1", upstream.port),
                           extproc=[("127.0.0.1", svc.grpc_port)], http=("127.0.0.1", svc.http_port),
                           listen_port=envoy_port)
    proxy.start()
    try:
        tag = uuid.uuid4().hex[:6]
        erased = await people(svc, tag)
        admin_state = await signed_in_admin(browser, proxy.url, settings.admin_token)
        me_state = await signed_in_user(browser, proxy.url, smtp, f"bia.{tag}@example.com")
        await svc.ledger.grant(f"caio-{tag}", 1, actor="test", reason="link")
        confirm_link = await requested_link(browser, proxy.url, smtp, f"caio.{tag}@example.com")
        yield Stack(svc, proxy.url, smtp, tag, admin_state, me_state, confirm_link, erased)
    finally:
        proxy.stop()
        await svc.stop(grace=1)
        await stripe.stop()
        smtp.stop()


async def people(svc: Service, tag: str) -> str:
    """Maria (warned, with credits, statement, alerts, audit), Bia (a /me user whose statement
    needs a pager), Caio (an unused link), Zé (erased: returns his pseudonym), and a few others
    for the lists."""
    await open_account(svc, f"maria-{tag}", email=f"maria.{tag}@example.com", name=f"Maria {tag}")
    await spend(svc, f"maria-{tag}", 60_000, 22_000)  # 82 %: warned
    await svc.ledger.grant(f"maria-{tag}", 5_000, actor="admin-token", reason="bônus")
    await open_account(svc, f"bia-{tag}", email=f"bia.{tag}@example.com", name="Bia")
    for i in range(30):  # more than one page (25 rows)
        await spend(svc, f"bia-{tag}", 100 + i, 50)
    await svc.ledger.grant(f"bia-{tag}", 2_000, actor="admin-token", reason="crédito de teste")
    await open_account(svc, f"caio-{tag}", email=f"caio.{tag}@example.com")
    for i in range(3):
        await open_account(svc, f"outro-{tag}-{i}", email=f"o{i}.{tag}@example.com")
        await spend(svc, f"outro-{tag}-{i}", 30_000 * (i + 1), 1_000)
    await open_account(svc, f"ze-{tag}", email=f"ze.{tag}@example.com", name="Zé")
    await spend(svc, f"ze-{tag}", 2_000, 500)
    return await svc.ledger.erase(f"ze-{tag}", actor="admin-token", reason="pedido do titular (LGPD)")


async def cookies_after_form(browser: Any, start: str, action: str, landing: str,
                             fields: dict[str, str] | None = None) -> dict[str, Any]:
    """Open ``start`` in a fresh browser, fill ``fields`` (selector -> text), send the form
    posting to ``action``, check it lands on ``landing``: the cookies it leaves."""
    context = await browser.new_context()
    page = await context.new_page()
    try:
        await page.goto(start)
        for selector, text in (fields or {}).items():
            await page.locator(selector).fill(text)
        async with page.expect_navigation():
            await page.locator(f"form[action='{action}'] button[type=submit]").click()
        assert page.url.endswith(landing), f"{action} failed: {page.url}\n{await page.inner_text('body')}"
        return await context.storage_state()
    finally:
        await context.close()


async def signed_in_admin(browser: Any, url: str, token: str) -> dict[str, Any]:
    return await cookies_after_form(browser, url + "/admin/login", "/admin/login", "/admin", {"#token": token})


async def requested_link(browser: Any, url: str, smtp: SmtpServer, email: str) -> str:
    await cookies_after_form(browser, url + "/me", "/me/login", "/me/login", {"#email": email})
    return link_in(await smtp.mailbox.wait_for(email))


async def signed_in_user(browser: Any, url: str, smtp: SmtpServer, email: str) -> dict[str, Any]:
    link = await requested_link(browser, url, smtp, email)
    return await cookies_after_form(browser, link, "/me/login/confirm", "/me")


# ---------------------------------------------------------------- the pages


Visit = Callable[[Any, Stack], Awaitable[Any]]


@dataclass(frozen=True)
class Page:
    name: str
    who: str  # "admin", "me" or "" (nobody signed in)
    visit: Visit
    lang: str = "pt-BR"  # the browser's language (Accept-Language), which the page must declare


def goto(path: str | Callable[[Stack], str]) -> Visit:
    async def visit(page: Any, s: Stack) -> None:
        await page.goto(s.url + (path(s) if callable(path) else path))
    return visit


def with_dialog(name: str) -> Visit:
    """The user page with a dialog opened the way a person does: its button, pressed."""
    async def visit(page: Any, s: Stack) -> None:
        await page.goto(f"{s.url}/admin/users/{s.user}")
        await page.locator(f"a[data-dialog='{name}-dialog']").click()
        await page.locator(f"#{name}-dialog[open]").wait_for()
    return visit


async def credits_refused(page: Any, s: Stack) -> None:
    await with_dialog("credits")(page, s)
    await page.locator("#tokens").fill("-5")
    await page.locator("#credit-reason").fill("teste")
    await page.locator("#credits-dialog button.primary").click()
    await page.locator("#tokens-error").wait_for()


def dialog_refused(name: str, fields: dict[str, str]) -> Visit:
    """A dialog sent with values the server refuses: it comes back open, with the errors."""
    async def visit(page: Any, s: Stack) -> None:
        await with_dialog(name)(page, s)
        for selector, value in fields.items():
            if await page.locator(selector).evaluate("e => e.tagName") == "SELECT":
                await page.locator(selector).select_option(value)
            else:
                await page.locator(selector).fill(value)
        await page.locator(f"#{name}-dialog button[type=submit]:not([formmethod])").click()
        await page.locator(f"#{name}-dialog[open] .field-error").first.wait_for()
    return visit


async def admin_login_refused(page: Any, s: Stack) -> None:
    """A signed JWT of someone who is not an admin: refused with a message. (A wrong token
    would count against the admin token's own sign-in limit, which the other tests need.)"""
    await page.goto(s.url + "/admin/login")
    await page.locator("#token").fill(mint_token(s.service.settings, f"joao-{uuid.uuid4().hex[:6]}"))
    await page.locator("form[action='/admin/login'] button[type=submit]").click()
    await page.locator("#login-error").wait_for()


async def me_signin_refused(page: Any, s: Stack) -> None:
    await page.goto(s.url + "/me")
    await page.locator("#email").fill("bia@localhost")  # the browser takes it, the server does not
    await page.locator("form[action='/me/login'] button[type=submit]").click()
    await page.locator("#email-error").wait_for()


async def link_sent(page: Any, s: Stack) -> None:
    await page.goto(s.url + "/me")
    await page.locator("#email").fill(f"ninguem.{s.tag}@example.com")
    await page.locator("form[action='/me/login'] button[type=submit]").click()
    await page.wait_for_url(s.url + "/me/login")


def forged_post(path: str) -> Visit:
    """A form posted with a wrong CSRF token: the 403 page."""
    async def visit(page: Any, s: Stack) -> None:
        await page.goto(s.url + ("/admin" if path.startswith("/admin") else "/me"))
        async with page.expect_navigation():
            await page.evaluate("""path => {
                const f = document.createElement('form'); f.method = 'post'; f.action = path;
                const i = document.createElement('input'); i.name = 'csrf'; i.value = 'forged'; f.append(i);
                document.body.append(f); f.submit(); }""", path)
    return visit


def opened(path: str, summary: str) -> Visit:
    """A page with a <details> (a chart's table) opened."""
    async def visit(page: Any, s: Stack) -> None:
        await page.goto(s.url + path)
        await page.locator(summary).first.click()
    return visit


async def settings_refused(page: Any, s: Stack) -> None:
    await page.goto(s.url + "/me/settings")
    await page.locator("#personal_cap").fill("muito")
    await page.locator("form[action='/me/settings'] button[type=submit]").click()
    await page.locator("#personal_cap-error").wait_for()


async def too_many_requests(page: Any, s: Stack) -> None:
    """The sign-in limit's 429 page: link requests for one address past its limit."""
    email = f"pressa.{uuid.uuid4().hex[:6]}@example.com"
    for _ in range(s.service.settings.signin_attempts_per_account + 1):
        await page.goto(s.url + "/me")
        await page.locator("#email").fill(email)
        await page.locator("form[action='/me/login'] button[type=submit]").click()
        await page.wait_for_load_state()
    assert await page.locator("h1").inner_text() != "", await page.content()


async def older_statement(page: Any, s: Stack) -> None:
    await page.goto(s.url + "/me")
    await page.locator("nav.pager a[rel=next]").click()
    await page.locator("nav.pager a[rel=prev]").wait_for()


PAGES = [
    Page("admin-login", "", goto("/admin/login")),
    Page("admin-login-refused", "", admin_login_refused),
    Page("dashboard", "admin", goto("/admin")),
    Page("users", "admin", goto(lambda s: f"/admin/users?q={s.tag}")),
    Page("users-empty-search", "admin", goto("/admin/users?q=ninguem-com-este-nome")),
    Page("users-filtered", "admin", goto("/admin/users?state=warned_80&sort=usage&order=desc")),
    Page("users-invalid-filter", "admin", goto("/admin/users?band=nenhuma")),
    Page("user", "admin", goto(lambda s: f"/admin/users/{s.user}")),
    Page("user-credits-dialog", "admin", with_dialog("credits")),
    Page("user-plan-dialog", "admin", with_dialog("plan")),
    Page("user-suspension-dialog", "admin", with_dialog("suspension")),
    Page("user-credits-refused", "admin", credits_refused),
    Page("user-allowance-dialog", "admin", with_dialog("allowance")),
    Page("user-allowance-refused", "admin", dialog_refused(
        "allowance", {"#allowance-mode": "custom", "#allowance-tokens": "muitos", "#allowance-reason": "teste"})),
    Page("user-cap-dialog", "admin", with_dialog("cap")),
    Page("user-cap-refused", "admin", dialog_refused("cap", {"#cap-tokens": "-1", "#cap-reason": "teste"})),
    Page("user-erase-dialog", "admin", with_dialog("erase")),
    Page("user-erase-refused", "admin", dialog_refused(
        "erase", {"#erase-confirm": "outra-pessoa", "#erase-reason": "teste"})),
    Page("user-dialog-by-address", "admin", goto(lambda s: f"/admin/users/{s.user}?dialog=plan")),  # no script ran
    Page("user-erased", "admin", goto(lambda s: f"/admin/users/{s.erased}")),
    Page("audit", "admin", goto("/admin/audit")),
    Page("audit-invalid-date", "admin", goto("/admin/audit?since=ontem")),
    Page("admin-404-user", "admin", goto("/admin/users/ninguem-com-este-id")),
    Page("admin-404-path", "admin", goto("/admin/nao-existe")),
    Page("admin-403-csrf", "admin", forged_post("/admin/logout")),
    Page("dashboard-table-open", "admin", opened("/admin", "details summary")),
    Page("admin-sessions", "admin", goto("/admin/sessions")),
    Page("user-sessions", "admin", goto(lambda s: f"/admin/users/{s.me_user}/sessions")),
    Page("me-signin", "", goto("/me")),
    Page("me-signin-refused", "", me_signin_refused),
    Page("me-link-sent", "", link_sent),
    Page("me-link-invalid", "", goto("/me/login?token=nao-e-um-link")),
    Page("me-confirm", "", goto(lambda s: s.confirm_link.removeprefix(s.url))),
    Page("me-statement", "me", goto("/me")),  # with the billing section: Stripe is on
    Page("me-statement-older", "me", older_statement),
    Page("me-purchase-notice", "me", goto("/me?purchase=success")),
    Page("me-403-csrf", "me", forged_post("/me/logout")),
    Page("me-405", "me", goto("/me/logout")),  # a POST-only address, opened
    Page("me-usage-table-open", "me", opened("/me", ".usage-cycle details summary")),
    Page("me-settings", "me", goto("/me/settings")),
    Page("me-settings-refused", "me", settings_refused),
    Page("me-429", "", too_many_requests),
    Page("me-signin-en", "", goto("/me"), lang="en"),
    Page("me-statement-en", "me", goto("/me"), lang="en"),
]


# ---------------------------------------------------------------- axe on every page


async def checked_context(browser: Any, s: Stack, spec: Page, viewport: dict[str, int]) -> Any:
    state = {"admin": s.admin_state, "me": s.me_state}.get(spec.who)
    return await browser.new_context(viewport=viewport, storage_state=state, locale=spec.lang,
                                      bypass_csp=True, is_mobile=viewport is PHONE, has_touch=viewport is PHONE)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("spec", PAGES, ids=[p.name for p in PAGES])
async def test_no_axe_violations(browser, stack, shots: Path, spec: Page, width: str):
    context = await checked_context(browser, stack, spec, WIDTHS[width])
    page = await context.new_page()
    page.set_default_timeout(15_000)
    try:
        await spec.visit(page, stack)
        await page.wait_for_load_state()
        await page.screenshot(path=str(shots / f"{spec.name}-{width}.png"), full_page=True)
        tags = PHONE_TAGS if width == "phone" else AXE_TAGS
        rows = findings(await axe_violations(page, tags)) + await dom_problems(page)
        assert not rows, (f"{spec.name} at {width} width ({page.url}): {len(rows)} WCAG 2.1 AA findings\n"
                          + report(rows))
        assert await page.evaluate("document.documentElement.lang") == spec.lang
        assert await page.evaluate(SIDEWAYS) == [], f"{spec.name} scrolls sideways at {width} width"
    finally:
        await context.close()


# Text that runs past the window's right edge: the page would scroll sideways. A table wider
# than the window scrolls inside its own region (.table-wrap) instead, which 1.4.10 allows
# for content that needs two dimensions.
SIDEWAYS = """() => document.documentElement.scrollWidth <= window.innerWidth + 1 ? [] :
    [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > window.innerWidth + 1
        && !e.closest('.table-wrap')).slice(0, 5).map(e => e.outerHTML.slice(0, 120))"""


async def test_reflow_at_320_css_pixels(browser, stack, shots: Path):
    """WCAG 1.4.10 (reflow), which axe cannot see: at 320 CSS px wide (a 1280 px screen at
    400 % zoom) no page scrolls sideways."""
    sideways = {}
    for spec in PAGES:
        context = await checked_context(browser, stack, spec, REFLOW)
        page = await context.new_page()
        try:
            await spec.visit(page, stack)
            await page.wait_for_load_state()
            if found := await page.evaluate(SIDEWAYS):
                sideways[spec.name] = found
                await page.screenshot(path=str(shots / f"{spec.name}-320.png"), full_page=True)
        finally:
            await context.close()
    assert not sideways, "pages that scroll sideways at 320 px: " + "\n".join(
        f"  {name}: {elements}" for name, elements in sideways.items())


async def test_axe_reports_what_it_finds(browser, stack):
    """The check can fail: a page broken on purpose (a field without its label, grey on white,
    no lang) is reported rule by rule, with the element and the help text."""
    context = await checked_context(browser, stack, PAGES[0], DESKTOP)
    page = await context.new_page()
    try:
        await page.goto(stack.url + "/admin/login")
        await page.evaluate("""() => {
            document.querySelector('label[for=token]').remove();
            document.querySelector('.help').style.color = '#bbb';
            document.documentElement.removeAttribute('lang'); }""")
        rows = findings(await axe_violations(page))
    finally:
        await context.close()
    assert {r[0] for r in rows} >= {"label", "color-contrast", "html-has-lang"}, rows
    text = report(rows)
    assert "[label] (critical) #token" in text and "Form elements must have labels" in text, text


# ---------------------------------------------------------------- keyboard only


@pytest.fixture
async def keyboard_page(browser: Any) -> AsyncIterator[Any]:
    """A tab with the pages' own CSP in force (no bypass): the flows must work under it."""
    async with csp_checked_tab(browser, viewport=DESKTOP, locale="pt-BR", accept_downloads=True) as page:
        yield page


async def focused(page: Any, selector: str) -> bool:
    return bool(await page.evaluate("s => document.activeElement.matches(s)", selector))


async def skip_to_main(page: Any) -> None:
    """The first Tab of a page reaches the skip link, shown on screen; Enter moves the focus
    to the main content."""
    await page.keyboard.press("Tab")
    assert await focused(page, "a.skip[href='#main']"), await focus_outline(page)
    box = await page.locator("a.skip").bounding_box()
    assert box is not None and box["x"] >= 0 and box["y"] >= 0, f"the focused skip link is off screen: {box}"
    assert visible_focus(await focus_outline(page))
    await page.keyboard.press("Enter")
    assert await focused(page, "main#main")


async def test_admin_by_keyboard_alone(keyboard_page, stack):
    page, s = keyboard_page, stack
    await page.goto(s.url + "/admin/login")
    assert await focused(page, "#token")  # the form's only field has the focus
    await page.keyboard.type(s.service.settings.admin_token)
    async with page.expect_navigation():
        await page.keyboard.press("Enter")
    assert page.url == s.url + "/admin"

    await skip_to_main(page)
    await tab_to(page, "a[href='/admin/users']", backwards=True)
    async with page.expect_navigation():
        await page.keyboard.press("Enter")
    await tab_to(page, "#q")
    await page.keyboard.type(f"maria.{s.tag}")
    async with page.expect_navigation():
        await page.keyboard.press("Enter")
    assert "1 conta" in await page.locator("p.count").inner_text()
    await tab_to(page, f"a[href='/admin/users/{s.user}']")
    async with page.expect_navigation():
        await page.keyboard.press("Enter")

    opener = "a[data-dialog='credits-dialog']"
    await tab_to(page, opener)
    before = (await page.locator("#credits").inner_text()).strip()
    await page.keyboard.press("Enter")
    dialog = page.locator("#credits-dialog")
    await dialog.wait_for()
    assert await focused(page, "#credits-dialog *"), "the focus did not move into the dialog"
    assert await focused(page, "#tokens")
    await page.keyboard.press("Escape")
    await dialog.wait_for(state="hidden")
    assert await focused(page, opener), "the focus did not return to the button that opened the dialog"

    await page.keyboard.press("Enter")
    await dialog.wait_for()
    await page.keyboard.type("1234")
    await page.keyboard.press("Tab")
    assert await focused(page, "#credit-reason")
    assert visible_focus(await focus_outline(page))
    await page.keyboard.type("ajuda por teclado")
    async with page.expect_navigation():
        await page.keyboard.press("Enter")
    await page.locator("#notice").wait_for()
    assert (await page.locator("#credits").inner_text()).strip() != before
    assert "ajuda por teclado" in await page.locator("table.statement tbody tr").first.inner_text()

    # A dialog the server opened (as after a refused form): Escape, and the focus is on its button.
    await page.goto(f"{s.url}/admin/users/{s.user}?dialog=plan")
    assert await focused(page, "#plan-dialog *")
    await page.keyboard.press("Escape")
    await page.locator("#plan-dialog").wait_for(state="hidden")
    # The dialog's close event (which moves the focus) is a task after the dialog hides.
    await page_turns_true(page, "document.activeElement && document.activeElement.matches("
                                "\"a[data-dialog='plan-dialog']\")")

    await tab_to(page, "form.logout button", backwards=True)
    async with page.expect_navigation():
        await page.keyboard.press("Enter")
    await page.goto(s.url + "/admin/users")
    assert await page.locator("#token").is_visible(), "still signed in after signing out"


async def test_user_by_keyboard_alone(keyboard_page, stack):
    page, s = keyboard_page, stack
    email = f"teclado.{s.tag}@example.com"
    await open_account(s.service, f"teclado-{s.tag}", email=email, name="Teclado")
    await spend(s.service, f"teclado-{s.tag}", 500, 120)
    await page.goto(s.url + "/me")
    assert await focused(page, "#email")
    await page.keyboard.type(email)
    async with page.expect_navigation():
        await page.keyboard.press("Enter")
    await page.locator("[role=status]").wait_for()

    await page.goto(link_in(await s.smtp.mailbox.wait_for(email)))  # the e-mailed link, opened
    assert await focused(page, "form[action='/me/login/confirm'] button")
    async with page.expect_navigation():
        await page.keyboard.press("Enter")
    assert page.url == s.url + "/me"

    await skip_to_main(page)
    await tab_to(page, "a[href='/me/statement.csv']")
    async with page.expect_download() as info:
        await page.keyboard.press("Enter")
    assert (await info.value).suggested_filename.endswith(".csv")

    await tab_to(page, "a[href='/me/settings']", backwards=True)  # the header's link
    async with page.expect_navigation():
        await page.keyboard.press("Enter")
    await tab_to(page, "#personal_cap")
    await page.keyboard.type("50000")
    async with page.expect_navigation():
        await page.keyboard.press("Enter")
    await page.locator("#settings-notice").wait_for()
    assert (await s.service.ledger.account(f"teclado-{s.tag}")).personal_cap == 50_000

    await tab_to(page, "form.logout button", backwards=True)
    async with page.expect_navigation():
        await page.keyboard.press("Enter")
    await page.goto(s.url + "/me")
    assert await page.locator("#email").is_visible(), "still signed in after signing out"


async def test_wide_table_scrolls_by_keyboard_on_a_phone(browser, stack):
    """A table wider than the phone scrolls in its own region: the region takes the focus (named
    after its table) and the arrow keys scroll it; on a desktop, where nothing scrolls, it is no
    tab stop."""
    async with csp_checked_tab(browser, viewport=PHONE, locale="pt-BR", storage_state=stack.me_state,
                               is_mobile=True, has_touch=True) as page:
        await page.goto(stack.url + "/me")
        await tab_to(page, ".table-wrap[data-scrolls]:has(table.statement)")
        assert await page.evaluate("document.activeElement.getAttribute('aria-label')") == "Extrato"
        for _ in range(5):
            await page.keyboard.press("ArrowRight")
        # Keyboard scrolling is animated: wait for it rather than read it at once.
        await page_turns_true(page, "document.activeElement.scrollLeft > 0")
    async with csp_checked_tab(browser, viewport=DESKTOP, locale="pt-BR", storage_state=stack.me_state) as page:
        await page.goto(stack.url + "/me")
        assert await page.locator(".table-wrap:has(table.statement)").get_attribute("tabindex") is None
