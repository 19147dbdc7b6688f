"""/me: a user's own balance, usage and statement ("extrato"), and /api/me.

Who the user is comes only from a signed session cookie (set by a single-use e-mailed link)
or a verified JWT (Bearer) — never from a parameter, so no URL shows another user's data.
Asking for a link answers the same page, at the same speed, whether or not the address is
known: the lookup and the e-mail happen in the background."""

from __future__ import annotations

import logging
import time
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

from aiohttp import web

from ..ledger import Account
from ..mail import smtp_sender
from . import queries as q
from .kit import (
    MAX_ID,
    OFFER,
    SERVICES,
    WEB,
    Invalid,
    WebContext,
    api_identity,
    client_ip,
    current_session,
    entries_json,
    field_messages,
    json_error,
    json_response,
    parse_int,
    signin_page,
    statement_csv_response,
    validation_error,
)
from .sessions import (
    MAGIC_LINK_SECONDS,
    ME_COOKIE,
    ME_SESSION_SECONDS,
    PRE_COOKIE,
    MagicLinks,
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


async def me_page(request: web.Request) -> web.StreamResponse:
    ctx = request.app[WEB]
    session = current_session(request)
    if session is None:
        return signin_page(request)
    pool = request.app[SERVICES].pool
    account = await q.get_account(pool, session.subject)
    if account is None:  # the account is gone: the session means nothing any more
        response = signin_page(request)
        clear_cookie(response, ME_COOKIE, path="/me", secure=ctx.secure_cookies)
        return response
    try:
        before_id = parse_int(request.query.get("before_id"), "before_id", low=1, high=MAX_ID)
        after_id = parse_int(request.query.get("after_id"), "after_id", low=1, high=MAX_ID)
    except Invalid:
        before_id = after_id = None
    entries = await q.entries_page(pool, account.user_id, limit=25, before_id=before_id, after_id=after_id)
    ctx.readable(entries.entries)
    source = request.app.get(OFFER)  # absent when billing is off: no "buy credits" section at all
    offer = source(request) if source is not None else None
    return ctx.render("me/statement.html", {
        "title": ctx.t("me.title"), "a": account, "entries": entries, "csrf": ctx.signer.csrf(session.sid),
        "offer": offer}, headers={"Content-Security-Policy": offer.csp} if offer else None)


async def request_link(request: web.Request) -> web.StreamResponse:
    ctx = request.app[WEB]
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
            await sender.send(link_message(ctx, account, token))
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
    ctx = request.app[WEB]
    token = request.query.get("token", "")
    if MagicLinks(request.app[SERVICES].pool, ctx.signer).peek(token) is None:
        return ctx.render("me/link_invalid.html", {"title": ctx.t("me.link_invalid_title")}, status=400)
    return ctx.render_with_pre(request, "me/confirm.html", {"title": ctx.t("me.confirm_title"), "token": token})


async def confirm_post(request: web.Request) -> web.StreamResponse:
    ctx = request.app[WEB]
    service = request.app[SERVICES]
    form = await request.post()
    if not ctx.csrf_ok(form, request.cookies.get(PRE_COOKIE)):
        return ctx.error_page(ctx.t("error.csrf"), status=403)
    token = form.get("token")
    user_id = await MagicLinks(service.pool, ctx.signer).consume(
        token if isinstance(token, str) else None, service.clock())
    if user_id is None:
        return ctx.render("me/link_invalid.html", {"title": ctx.t("me.link_invalid_title")}, status=400)
    session = new_session(user_id, ME_SESSION_SECONDS, "link")
    await open_session(service.pool, "me", session, source_ip=client_ip(request),
                       user_agent=request.headers.get("user-agent"), now=service.clock())
    response = web.HTTPSeeOther("/me")
    set_cookie(response, ME_COOKIE, session_cookie(ctx.signer, "me", session), path="/me",
               max_age=session.expires - int(time.time()), secure=ctx.secure_cookies)
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


async def statement_csv(request: web.Request) -> web.StreamResponse:
    ctx = request.app[WEB]
    session = current_session(request)
    if session is None:
        return signin_page(request, status=401)
    if await q.get_account(request.app[SERVICES].pool, session.subject) is None:
        return ctx.error_page(ctx.t("me.no_account"), status=404)
    return await statement_csv_response(request, session.subject, include_actor=False)


# ---------------------------------------------------------------- /api/me (Bearer JWT)


async def api_me(request: web.Request) -> web.StreamResponse:
    ctx = request.app[WEB]
    user_id = await api_identity(request)
    if isinstance(user_id, web.Response):
        return user_id
    account = await q.get_account(request.app[SERVICES].pool, user_id)
    if account is None:
        return json_error(404, "no_account", ctx.t("me.no_account"))
    return json_response({"account": account.as_json()})


async def api_entries(request: web.Request) -> web.StreamResponse:
    ctx = request.app[WEB]
    user_id = await api_identity(request)
    if isinstance(user_id, web.Response):
        return user_id
    try:
        return json_response(await entries_json(request, user_id, include_actor=False))
    except Invalid as exc:
        return validation_error(ctx, exc.fields)


async def api_statement_csv(request: web.Request) -> web.StreamResponse:
    user_id = await api_identity(request)
    if isinstance(user_id, web.Response):
        return user_id
    return await statement_csv_response(request, user_id, include_actor=False)


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
