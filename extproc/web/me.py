"""/me: a user's own balance, usage and statement ("extrato"), where the tokens went, their
settings (personal cap, alert e-mails, language) and their data; and /api/me.

Who the user is comes only from a session cookie (set by a single-use e-mailed link), or on
/api/me from the gate's own identity (a verified JWT, or LibreChat's headers proven by the
gateway key) — never from a parameter, so no URL shows another user's data. Pages speak the
reader's language (``kit.page_language``); every change of a setting goes through
``Ledger.set_settings``, which audits it as ``user:<id>`` in the same transaction.
Asking for a link answers the same page, at the same speed, whether or not the address is
known: the lookup and the e-mail happen in the background."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

from aiohttp import web

from ..formats import fmt_int
from ..i18n import LANGUAGES
from ..ledger import Account, UnknownUser, erased_pseudonym
from ..mail import smtp_sender
from . import queries as q
from . import usage as u
from .kit import (
    MAX_CAP,
    MAX_ID,
    OFFER,
    SERVICES,
    WEB,
    Invalid,
    WebContext,
    api_identity,
    checked_cap,
    client_ip,
    current_session,
    download_name,
    entries_json,
    field_messages,
    json_body,
    json_error,
    json_response,
    parse_int,
    parse_tokens,
    reader_context,
    settings_from_json,
    settings_json,
    signin_page,
    statement_csv_response,
    validation_error,
    with_caller,
)
from .sessions import (
    MAGIC_LINK_SECONDS,
    ME_COOKIE,
    ME_SESSION_SECONDS,
    PRE_COOKIE,
    MagicLinks,
    WebSession,
    clear_cookie,
    end_session,
    new_session,
    open_session,
    session_cookie,
    set_cookie,
)

__all__ = ["setup"]

log = logging.getLogger(__name__)

MAX_EMAIL = 320


def valid_email(raw: Any) -> str:
    text = raw.strip() if isinstance(raw, str) else ""
    if not text:
        raise Invalid({"email": "required"})
    local, at, domain = text.rpartition("@")
    if (len(text) > MAX_EMAIL or not at or not local or "." not in domain or domain.startswith(".")
            or any(c.isspace() or not c.isprintable() for c in text)):
        raise Invalid({"email": "invalid_email"})
    return text


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PageHandler = Callable[[web.Request, WebSession, Account], Awaitable[web.StreamResponse]]
ApiHandler = Callable[[web.Request, str], Awaitable[web.StreamResponse]]


def signed_in(status: int = 200) -> Callable[[PageHandler], Handler]:
    """A /me page for the session's user: the handler gets the session and the account; without
    them the sign-in page answers (with ``status``: 401 for downloads), and an account that is
    gone (e.g. erased) makes the session mean nothing any more."""

    def decorate(handler: PageHandler) -> Handler:
        @functools.wraps(handler)
        async def wrapped(request: web.Request) -> web.StreamResponse:
            session = current_session(request)
            if session is None:
                return signin_page(request, status=status)
            account = await q.get_account(request.app[SERVICES].pool, session.subject)
            if account is None:
                response = signin_page(request, status=status)
                clear_cookie(response, ME_COOKIE, path="/me", secure=request.app[WEB].secure_cookies)
                return response
            return await handler(request, session, account)

        return wrapped

    return decorate


# An /api/me route: the handler gets the caller's user id (``kit.api_identity``), or 401.
api_caller = with_caller(api_identity)


def api_account(handler: Callable[[web.Request, Account], Awaitable[web.StreamResponse]]) -> Handler:
    """An /api/me route about the caller's account: 404 no_account before their first request;
    403 account_erased, as at the gate, for an id whose data was erased (LGPD)."""

    @api_caller
    @functools.wraps(handler)
    async def wrapped(request: web.Request, user_id: str) -> web.StreamResponse:
        pool = request.app[SERVICES].pool
        account = await q.get_account(pool, user_id)
        if account is None:
            ctx = reader_context(request)
            async with pool.acquire() as conn:
                if await erased_pseudonym(conn, user_id) is not None:
                    return json_error(403, "account_erased", ctx.t("refusal.account_erased"))
            return json_error(404, "no_account", ctx.t("me.no_account"))
        return await handler(request, account)

    return wrapped


@signed_in()
async def me_page(request: web.Request, session: WebSession, account: Account) -> web.StreamResponse:
    ctx = reader_context(request, account)
    service = request.app[SERVICES]
    try:
        before_id = parse_int(request.query.get("before_id"), "before_id", low=1, high=MAX_ID)
        after_id = parse_int(request.query.get("after_id"), "after_id", low=1, high=MAX_ID)
    except Invalid:
        before_id = after_id = None
    entries = await q.entries_page(service.pool, account.user_id, limit=25, before_id=before_id,
                                   after_id=after_id)
    ctx.readable(entries.entries)
    source = request.app.get(OFFER)  # absent when billing is off: no "buy credits" section at all
    offer = source(request, ctx.lang) if source is not None else None
    return ctx.render("me/statement.html", {
        "title": ctx.t("me.title"), "a": account, "entries": entries, "csrf": ctx.signer.csrf(session.sid),
        "offer": offer, "usage": await u.cycles(service.pool, account, service.clock())},
        headers={"Content-Security-Policy": offer.csp} if offer else None)


async def request_link(request: web.Request) -> web.StreamResponse:
    ctx = reader_context(request)
    form = await request.post()
    email = str(form.get("email", ""))
    if not ctx.csrf_ok(form, request.cookies.get(PRE_COOKIE)):
        return signin_page(request, status=403, errors={"form": ctx.t("error.csrf")}, email=email)
    try:
        address = valid_email(email)
    except Invalid as exc:
        return signin_page(request, status=400, errors=field_messages(ctx, exc.fields), email=email)
    if ctx.signer.enabled:
        ctx.spawn(send_links(request.app, address))
    return ctx.render("me/sent.html", {"title": ctx.t("me.sent_title"), "minutes": MAGIC_LINK_SECONDS // 60})


async def send_links(app: web.Application, address: str) -> None:
    """Mail a sign-in link to each account with this address (errors are logged: the visitor
    was already told "if the address is known, a link is on its way")."""
    ctx = app[WEB]
    service = app[SERVICES]
    try:
        accounts = await q.accounts_by_email(service.pool, address)
        if not accounts:
            return
        sender = smtp_sender(ctx.settings.smtp_url)
        if sender is None:
            log.warning("sign-in link not sent: GATE_SMTP_URL is not set")
            return
        links = MagicLinks(service.pool, ctx.signer)
        for account in accounts:
            token = await links.issue(account.user_id, service.clock())
            if token is None or not account.email:
                continue
            await sender.send(link_message(ctx.in_language(account.language), account, token))
    except Exception:
        log.exception("sign-in link delivery failed")


def link_message(ctx: WebContext, account: Account, token: str) -> EmailMessage:
    url = f"{ctx.settings.public_url.rstrip('/')}/me/login?token={token}"
    message = EmailMessage()
    message["From"] = ctx.settings.mail_from
    message["To"] = account.email or ""
    message["Subject"] = ctx.t("me.mail_subject")
    message["Message-ID"] = make_msgid(domain="solaris.invalid")
    message.set_content(ctx.jinja.get_template("me/login_email.txt").render(
        url=url, account=account, minutes=MAGIC_LINK_SECONDS // 60))
    return message


async def confirm_page(request: web.Request) -> web.StreamResponse:
    """The link lands here and only shows a button: signing in takes a POST, so a mail
    scanner that fetches the link does not use it up."""
    ctx = reader_context(request)
    token = request.query.get("token", "")
    if MagicLinks(request.app[SERVICES].pool, ctx.signer).peek(token) is None:
        return ctx.render("me/link_invalid.html", {"title": ctx.t("me.link_invalid_title")}, status=400)
    return ctx.render_with_pre(request, "me/confirm.html", {"title": ctx.t("me.confirm_title"), "token": token})


async def confirm_post(request: web.Request) -> web.StreamResponse:
    ctx = reader_context(request)
    service = request.app[SERVICES]
    form = await request.post()
    if not ctx.csrf_ok(form, request.cookies.get(PRE_COOKIE)):
        return ctx.error_page(ctx.t("error.csrf"), status=403)
    token = form.get("token")
    user_id = await MagicLinks(service.pool, ctx.signer).consume(
        token if isinstance(token, str) else None, service.clock())
    if user_id is None:
        return ctx.render("me/link_invalid.html", {"title": ctx.t("me.link_invalid_title")}, status=400)
    now = int(time.time())
    session = new_session(user_id, ME_SESSION_SECONDS, "link", now=now)
    await open_session(service.pool, "me", session, source_ip=client_ip(request),
                       user_agent=request.headers.get("user-agent"), now=service.clock())
    response = web.HTTPSeeOther("/me")
    set_cookie(response, ME_COOKIE, session_cookie(ctx.signer, "me", session), path="/me",
               max_age=session.expires - now, secure=ctx.secure_cookies)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    ctx = request.app[WEB]
    session = current_session(request)
    form = await request.post()
    if session is not None and not ctx.csrf_ok(form, session.sid):
        return ctx.error_page(ctx.t("error.csrf"), status=403)
    if session is not None:
        await end_session(request.app[SERVICES].pool, "me", session, request.app[SERVICES].clock())
    response = web.HTTPSeeOther("/me")
    clear_cookie(response, ME_COOKIE, path="/me", secure=ctx.secure_cookies)
    raise response


@signed_in(status=401)
async def statement_csv(request: web.Request, session: WebSession, account: Account) -> web.StreamResponse:
    return await statement_csv_response(request, account.user_id, include_actor=False,
                                        ctx=reader_context(request, account))


async def reader_of(request: web.Request, user_id: str) -> WebContext:
    """The context in the caller's language (their saved choice, else Accept-Language, else
    GATE_LANGUAGE), for the API's texts about their own statement."""
    return reader_context(request, await q.get_account(request.app[SERVICES].pool, user_id))


# ---------------------------------------------------------------- /api/me (the gate's identity)


@api_account
async def api_me(request: web.Request, account: Account) -> web.StreamResponse:
    return json_response({"account": account.as_json()})


@api_caller
async def api_entries(request: web.Request, user_id: str) -> web.StreamResponse:
    ctx = request.app[WEB]
    try:
        return json_response(await entries_json(request, user_id, include_actor=False,
                                                ctx=await reader_of(request, user_id)))
    except Invalid as exc:
        return validation_error(ctx, exc.fields)


@api_caller
async def api_statement_csv(request: web.Request, user_id: str) -> web.StreamResponse:
    return await statement_csv_response(request, user_id, include_actor=False, ctx=await reader_of(request, user_id))


# ---------------------------------------------------------------- settings, usage and data (pages)


SETTINGS_DONE = "saved"  # ?done= after a successful save: the page shows the notice


def settings_values(account: Account) -> dict[str, Any]:
    """The settings as the ledger names them (Ledger.set_settings' keywords)."""
    return {"personal_cap": account.personal_cap, "notify_80": account.notify_80,
            "notify_90": account.notify_90, "language": account.language}


def settings_from_form(form: Any, lang: str, account: Account) -> dict[str, Any]:
    """The settings form -> ledger keywords; Invalid with every bad field at once."""
    errors: dict[str, str] = {}
    values: dict[str, Any] = {"notify_80": form.get("notify_80") == "on",
                              "notify_90": form.get("notify_90") == "on"}
    raw_cap = str(form.get("personal_cap", "")).strip()
    try:
        values["personal_cap"] = checked_cap(
            parse_tokens(raw_cap, lang, "personal_cap", from_form=True, low=0, high=MAX_CAP) if raw_cap else None,
            account)
    except Invalid as exc:
        errors.update(exc.fields)
    language = str(form.get("language", ""))
    if language and language not in LANGUAGES:
        errors["language"] = "invalid_choice"
    values["language"] = language or None
    if errors:
        raise Invalid(errors)
    return values


def settings_message(ctx: WebContext, code: str, account: Account) -> str:
    """An error code's text in the page's language (the settings' own texts first)."""
    return ctx.t_or(f"settings.error_{code}", ctx.t(f"err.{code}")).format(
        budget=fmt_int(account.cycle_budget, ctx.lang), maximum=fmt_int(MAX_CAP, ctx.lang))


async def save_settings(request: web.Request, account: Account, values: dict[str, Any]) -> Account:
    """Write what changed (one audited transaction, actor user:<id>); nothing changed, no write."""
    changed = {k: v for k, v in values.items() if settings_values(account)[k] != v}
    if not changed:
        return account
    return await request.app[SERVICES].ledger.set_settings(
        account.user_id, **changed, actor=f"user:{account.user_id}", source_ip=client_ip(request))


def render_settings(request: web.Request, session: WebSession, account: Account, *, status: int = 200,
                    errors: dict[str, str] | None = None, values: dict[str, Any] | None = None,
                    notice: str | None = None) -> web.Response:
    ctx = reader_context(request, account)
    shown = dict(values) if values is not None else {
        **settings_values(account),
        "personal_cap": "" if account.personal_cap is None else fmt_int(account.personal_cap, ctx.lang)}
    return ctx.render("me/settings.html", {
        "title": ctx.t("settings.title"), "a": account, "csrf": ctx.signer.csrf(session.sid),
        "values": shown, "errors": errors or {}, "notice": notice}, status=status)


@signed_in()
async def settings_page(request: web.Request, session: WebSession, account: Account) -> web.StreamResponse:
    ctx = reader_context(request, account)
    notice = ctx.t("settings.saved") if request.query.get("done") == SETTINGS_DONE else None
    return render_settings(request, session, account, notice=notice)


@signed_in()
async def settings_post(request: web.Request, session: WebSession, account: Account) -> web.StreamResponse:
    ctx = reader_context(request, account)
    form = await request.post()
    if not ctx.csrf_ok(form, session.sid):
        return ctx.error_page(ctx.t("error.csrf"), status=403)
    try:
        values = settings_from_form(form, ctx.lang, account)
        await save_settings(request, account, values)
    except Invalid as exc:
        shown = {"personal_cap": str(form.get("personal_cap", "")), "notify_80": form.get("notify_80") == "on",
                 "notify_90": form.get("notify_90") == "on", "language": str(form.get("language", ""))}
        return render_settings(request, session, account, status=400, values=shown,
                               errors={k: settings_message(ctx, c, account) for k, c in exc.fields.items()})
    except UnknownUser:  # erased or gone between the read and the write
        return signin_page(request, status=401)
    raise web.HTTPSeeOther(f"/me/settings?done={SETTINGS_DONE}")


@signed_in(status=401)
async def usage_csv(request: web.Request, session: WebSession, account: Account) -> web.StreamResponse:
    service = request.app[SERVICES]
    periods = await u.cycles(service.pool, account, service.clock())
    return await u.usage_csv(request, account.user_id, periods, include_estimates=False)


@signed_in(status=401)
async def export_download(request: web.Request, session: WebSession, account: Account) -> web.StreamResponse:
    return await export_response(request, account.user_id)


async def export_response(request: web.Request, user_id: str) -> web.Response:
    """Everything held about the user (Ledger.export) as a JSON file to save."""
    data = await request.app[SERVICES].ledger.export(user_id)
    if data is None:
        return json_error(404, "no_account", reader_context(request).t("me.no_account"))
    name = download_name("solaris-data", user_id, "json")
    return json_response(data, headers={"Content-Disposition": f'attachment; filename="{name}"'})


# ---------------------------------------------------------------- /api/me settings, usage and data


@api_account
async def api_settings(request: web.Request, account: Account) -> web.StreamResponse:
    ctx = reader_context(request, account)
    try:
        values = settings_from_json(await json_body(request), account)
        account = await save_settings(request, account, values)
    except Invalid as exc:
        return validation_error(ctx, exc.fields, {c: settings_message(ctx, c, account) for c in exc.fields.values()})
    except UnknownUser:
        return json_error(404, "no_account", ctx.t("me.no_account"))
    return json_response(settings_json(account))


@api_caller
async def api_usage(request: web.Request, user_id: str) -> web.StreamResponse:
    service = request.app[SERVICES]
    try:
        days = u.parse_days(request.query.get("days"))
    except Invalid as exc:
        return validation_error(reader_context(request), exc.fields)
    rows = await u.last_days(service.pool, user_id, days, service.clock())
    return json_response([r.as_json() for r in rows])


@api_account
async def api_export(request: web.Request, account: Account) -> web.StreamResponse:
    return await export_response(request, account.user_id)


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/me", me_page)
    r.add_get("/me/", me_page)
    r.add_get("/me/login", confirm_page)
    r.add_post("/me/login", request_link)
    r.add_post("/me/login/confirm", confirm_post)
    r.add_post("/me/logout", logout)
    r.add_get("/me/statement.csv", statement_csv)
    r.add_get("/api/me", api_me)
    r.add_get("/api/me/entries", api_entries)
    r.add_get("/api/me/statement.csv", api_statement_csv)
    r.add_get("/me/settings", settings_page)
    r.add_post("/me/settings", settings_post)
    r.add_get("/me/usage.csv", usage_csv)
    r.add_get("/me/export.json", export_download)
    r.add_put("/api/me/settings", api_settings)
    r.add_get("/api/me/usage", api_usage)
    r.add_get("/api/me/export", api_export)
