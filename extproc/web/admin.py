"""The admin console: HTML pages under /admin (session cookie + CSRF) and the JSON API under
/api/admin (Authorization: Bearer <GATE_ADMIN_TOKEN or an admin JWT>).

Both faces share the validation and the reads below, and every change goes through the
Ledger's admin methods, which write the audit row in the same transaction (I4)."""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from .. import accounting
from ..formats import group_separator
from ..ledger import Account, Ledger, UnknownPlan, UnknownUser
from . import queries as q
from .kit import (
    DIGITS,
    MAX_ID,
    SERVICES,
    WEB,
    Invalid,
    WebContext,
    client_ip,
    entries_json,
    field_messages,
    json_body,
    json_error,
    json_response,
    parse_day,
    parse_int,
    path_segment,
    statement_csv_response,
    stream_csv,
    validation_error,
)
from .sessions import (
    ADMIN_COOKIE,
    ADMIN_SESSION_SECONDS,
    PRE_COOKIE,
    AuthFailure,
    WebSession,
    admin_from_credential,
    clear_cookie,
    end_session,
    new_session,
    open_session,
    read_session,
    session_cookie,
    set_cookie,
)

__all__ = ["ROUTES", "parse_amount", "setup"]

MAX_GRANT = 10**12  # far below bigint, far above any sane top-up: a typo guard
MAX_REASON = 500
MAX_KEY = 200
CHART_DAYS = 30

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# ---------------------------------------------------------------- validation


def parse_amount(raw: Any, lang: str, *, from_form: bool) -> int:
    """A positive whole number of tokens. Forms may group thousands the locale's way
    ("100.000" in pt-BR, "100,000" in en); JSON must be an integer."""
    if from_form:
        text = str(raw or "").strip().replace(" ", "").replace("\u00a0", "")
        if not text:
            raise Invalid({"tokens": "required"})
        sep = group_separator(lang)
        negative = text.startswith("-")
        body = text[1:] if negative else text
        groups = body.split(sep)
        grouped = len(groups) > 1 and 1 <= len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:])
        if not all(DIGITS.fullmatch(g) for g in groups) or (len(groups) > 1 and not grouped):
            raise Invalid({"tokens": "not_integer"})
        value = int("".join(groups)) * (-1 if negative else 1)
    else:
        if raw is None:
            raise Invalid({"tokens": "required"})
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise Invalid({"tokens": "not_integer"})
        value = raw
    if value <= 0:
        raise Invalid({"tokens": "not_positive"})
    if value > MAX_GRANT:
        raise Invalid({"tokens": "too_large"})
    return value


def parse_reason(raw: Any) -> str:
    if raw is not None and not isinstance(raw, str):
        raise Invalid({"reason": "required"})
    text = " ".join((raw or "").split())  # one line: it is shown in tables and CSV
    if not text:
        raise Invalid({"reason": "required"})
    if len(text) > MAX_REASON:
        raise Invalid({"reason": "too_long"})
    return text


def parse_key(raw: Any) -> str | None:
    if raw in (None, ""):
        return None
    if not isinstance(raw, str) or len(raw) > MAX_KEY or not raw.isprintable():
        raise Invalid({"idempotency_key": "invalid"})
    # Namespaced so an admin's key can never collide with a Stripe session id.
    return f"admin:{raw}"


def user_filter(query: Mapping[str, str]) -> q.UserFilter:
    f = q.UserFilter(
        q=query.get("q", "").strip(), state=query.get("state", ""), plan=query.get("plan", ""),
        band=query.get("band", ""), sort=query.get("sort", "") or "user",
        desc=query.get("order", "") == "desc",
        limit=parse_int(query.get("limit"), "limit", low=1, high=q.MAX_PAGE) or 50,
        after=query.get("after", ""), before=query.get("before", ""),
    )
    errors = f.validate()
    if errors:
        raise Invalid(errors)
    return f


def audit_filter(query: Mapping[str, str]) -> q.AuditFilter:
    return q.AuditFilter(
        actor=query.get("actor", "").strip()[:300], action=query.get("action", "").strip()[:64],
        target=query.get("target", "").strip()[:300],
        since=parse_day(query.get("since"), "since"), until=parse_day(query.get("until"), "until"),
        before_id=parse_int(query.get("before_id"), "before_id", low=1, high=MAX_ID),
        limit=parse_int(query.get("limit"), "limit", low=1, high=q.MAX_PAGE) or 50,
    )


# ---------------------------------------------------------------- reads


def ledger_of(request: web.Request) -> Ledger:
    return request.app[SERVICES].ledger


async def dashboard_data(request: web.Request) -> dict[str, Any]:
    service = request.app[SERVICES]
    ctx = request.app[WEB]
    pool = service.pool
    totals = await q.state_totals(pool)
    used = sum(v["used"] for v in totals.values())
    budget = sum(v["budget"] for v in totals.values())
    count = {s: totals.get(s, {}).get("accounts", 0) for s in accounting.STATES}
    today = service.clock().date()
    days = [today - timedelta(days=CHART_DAYS - 1 - i) for i in range(CHART_DAYS)]
    missing = [d for d in days[:-1] if d not in ctx.daily_cache]
    if missing:
        found = await q.daily_usage(pool, min(missing), today)
        for d in missing:
            ctx.daily_cache[d] = found.get(d, (0, 0))
    current = (await q.daily_usage(pool, today, today + timedelta(days=1))).get(today, (0, 0))
    daily = [{"day": d, "requests": ctx.daily_cache.get(d, (0, 0))[0] if d != today else current[0],
              "tokens": ctx.daily_cache.get(d, (0, 0))[1] if d != today else current[1]} for d in days]
    return {
        "cycle": {"used": used, "budget": budget, "used_pct": accounting.usage_pct(used, budget)},
        "accounts": {
            "total": sum(count.values()), "active": count["active"],
            "warned": count["warned_80"] + count["warned_90"], "blocked": count["blocked"],
            "suspended": count["suspended"],
        },
        "daily": daily,
        "top": await q.top_consumers(pool),
        "recent_blocks": await q.recent_blocks(pool),
    }


def chart(daily: list[dict[str, Any]], width: int = 720, height: int = 220) -> dict[str, Any]:
    """Geometry of the server-rendered SVG: token bars, a requests line on its own scale."""
    left, right, top, bottom = 8, 8, 12, 28
    inner_w, inner_h = width - left - right, height - top - bottom
    max_tokens = max((d["tokens"] for d in daily), default=0) or 1
    max_requests = max((d["requests"] for d in daily), default=0) or 1
    step = inner_w / max(len(daily), 1)
    bars, points = [], []
    for i, d in enumerate(daily):
        h = inner_h * d["tokens"] / max_tokens
        x = left + i * step
        bars.append({"x": round(x + step * 0.15, 1), "y": round(top + inner_h - h, 1),
                     "w": round(step * 0.7, 1), "h": round(h, 1), **d, "label": i % 5 == 4 or i == 0})
        cy = top + inner_h - inner_h * d["requests"] / max_requests
        points.append(f"{round(x + step / 2, 1)},{round(cy, 1)}")
    return {"width": width, "height": height, "bars": bars, "line": " ".join(points),
            "baseline": top + inner_h, "max_tokens": max_tokens if any(d["tokens"] for d in daily) else 0,
            "max_requests": max_requests if any(d["requests"] for d in daily) else 0}


def changes(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> list[tuple[str, Any, Any]]:
    """The fields an audited change moved, for the audit table."""
    before, after = before or {}, after or {}
    skip = {"used_pct", "cycle_start", "cycle_end"}
    return [(k, before.get(k), after.get(k)) for k in sorted(set(before) | set(after))
            if k not in skip and before.get(k) != after.get(k)]


USERS_HEADER = ["user_id", "email", "name", "plan", "state", "state_reason", "available", "balance",
                "allowance", "credits", "reserved", "used", "budget", "used_pct", "cycle_start", "cycle_end",
                "created_at"]


def user_row(a: Account) -> list[Any]:
    return [a.user_id, a.email, a.name, a.plan, a.state, a.state_reason, a.available, a.balance, a.allowance,
            a.credits, a.reserved, a.used_cycle, a.cycle_budget, a.used_pct, a.cycle_start, a.cycle_end,
            a.created_at]


async def users_csv_response(request: web.Request, f: q.UserFilter) -> web.StreamResponse:
    pool = request.app[SERVICES].pool

    async def rows() -> AsyncIterator[list[Any]]:
        async for a in q.iter_users(pool, f):
            yield user_row(a)

    return await stream_csv(request, "users.csv", USERS_HEADER, rows())


# ---------------------------------------------------------------- HTML: auth


def safe_next(raw: str | None) -> str:
    """Only a path of this console: never an open redirect to another site."""
    if raw and raw.startswith("/admin") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return "/admin"


def login_response(request: web.Request, *, status: int = 200, error: str | None = None,
                   next_url: str | None = None) -> web.Response:
    ctx = request.app[WEB]
    return ctx.render_with_pre(request, "admin/login.html", {
        "title": ctx.t("login.title"), "nav": None, "error": error, "next": safe_next(next_url or request.path_qs),
    }, status=status, headers={"WWW-Authenticate": 'Bearer realm="solaris-admin"'} if status == 401 else None)


def page(handler: Callable[[web.Request, WebSession], Awaitable[web.StreamResponse]]) -> Handler:
    """An admin page: a valid session cookie, else the sign-in form (401); POSTs must carry
    the session's CSRF token (403 otherwise)."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        ctx = request.app[WEB]
        session = read_session(ctx.signer, "admin", request, ADMIN_COOKIE)
        if session is None:
            return login_response(request, status=401,
                                  next_url=request.path_qs if request.method == "GET" else "/admin")
        if request.method == "POST":
            if not ctx.csrf_ok(await request.post(), session.sid):
                return ctx.error_page(ctx.t("error.csrf"), status=403, nav=nav(ctx, session, ""))
        return await handler(request, session)

    return wrapped


def nav(ctx: WebContext, session: WebSession, current: str) -> dict[str, Any]:
    return {"current": current, "actor": session.subject, "csrf": ctx.signer.csrf(session.sid)}


async def login_page(request: web.Request) -> web.StreamResponse:
    ctx = request.app[WEB]
    if read_session(ctx.signer, "admin", request, ADMIN_COOKIE) is not None:
        raise web.HTTPSeeOther(safe_next(request.query.get("next")))
    return login_response(request, next_url=request.query.get("next"))


async def login_post(request: web.Request) -> web.StreamResponse:
    ctx = request.app[WEB]
    form = await request.post()
    next_url = safe_next(str(form.get("next", "")))
    if not ctx.csrf_ok(form, request.cookies.get(PRE_COOKIE)):
        return login_response(request, status=403, error=ctx.t("error.csrf"), next_url=next_url)
    if not ctx.signer.enabled:
        return login_response(request, status=503, error=ctx.t("login.disabled"), next_url=next_url)
    credential = form.get("token")
    try:
        admin = await admin_from_credential(ctx.settings, ctx.authenticator,
                                            credential if isinstance(credential, str) else "")
    except AuthFailure as exc:
        return login_response(request, status=exc.status, error=ctx.t(f"login.{exc.code}"), next_url=next_url)
    session = new_session(admin.actor, ADMIN_SESSION_SECONDS, admin.via, not_after=admin.expires)
    await open_session(request.app[SERVICES].pool, "admin", session, source_ip=client_ip(request),
                       user_agent=request.headers.get("user-agent"), now=request.app[SERVICES].clock())
    response = web.HTTPSeeOther(next_url)
    set_cookie(response, ADMIN_COOKIE, session_cookie(ctx.signer, "admin", session), path="/admin",
               max_age=session.expires - int(time.time()), secure=ctx.secure_cookies)
    raise response


@page
async def logout_post(request: web.Request, session: WebSession) -> web.StreamResponse:
    ctx = request.app[WEB]
    await end_session(request.app[SERVICES].pool, "admin", session, request.app[SERVICES].clock())
    response = web.HTTPSeeOther("/admin/login")
    clear_cookie(response, ADMIN_COOKIE, path="/admin", secure=ctx.secure_cookies)
    raise response


# ---------------------------------------------------------------- HTML: pages


@page
async def dashboard_page(request: web.Request, session: WebSession) -> web.StreamResponse:
    ctx = request.app[WEB]
    data = await dashboard_data(request)
    return ctx.render("admin/dashboard.html", {
        "title": ctx.t("dash.title"), "nav": nav(ctx, session, "dashboard"), "d": data,
        "chart": chart(data["daily"]),
    })


@page
async def users_page(request: web.Request, session: WebSession) -> web.StreamResponse:
    ctx = request.app[WEB]
    plans = await ledger_of(request).plans()
    base = {"title": ctx.t("users.title"), "nav": nav(ctx, session, "users"), "plans": plans,
            "states": accounting.STATES, "bands": list(q.USAGE_BANDS), "query": dict(request.query),
            "link": query_link("/admin/users", request.query),
            "csv_link": query_link("/admin/users.csv", request.query, ("after", "before", "limit"))()}
    try:
        f = user_filter(request.query)
        result = await q.list_users(request.app[SERVICES].pool, f)
    except Invalid as exc:
        return ctx.render("admin/users.html", {**base, "f": q.UserFilter(), "page": None,
                                               "errors": field_messages(ctx, exc.fields)}, status=400)
    except q.BadCursor:
        return ctx.render("admin/users.html", {**base, "f": q.UserFilter(), "page": None,
                                               "errors": {"cursor": ctx.t("err.bad_cursor")}}, status=400)
    return ctx.render("admin/users.html", {**base, "f": f, "page": result, "errors": {}})


def query_link(path: str, query: Mapping[str, str], drop: tuple[str, ...] = ()) -> Callable[..., str]:
    """URL builder for the list's links: the current query with some parameters changed."""

    def link(**changes: str) -> str:
        params = {k: v for k, v in {**query, **changes}.items() if v and k not in drop}
        return path + ("?" + urlencode(params) if params else "")

    return link


@page
async def users_csv(request: web.Request, session: WebSession) -> web.StreamResponse:
    ctx = request.app[WEB]
    try:
        f = user_filter(request.query)
    except Invalid as exc:
        return ctx.error_page("; ".join(field_messages(ctx, exc.fields).values()), status=400,
                              nav=nav(ctx, session, "users"))
    return await users_csv_response(request, f)


async def user_context(request: web.Request, session: WebSession, account: Account) -> dict[str, Any]:
    ctx = request.app[WEB]
    pool = request.app[SERVICES].pool
    before_id = parse_int(request.query.get("before_id"), "before_id", low=1, high=MAX_ID)
    after_id = parse_int(request.query.get("after_id"), "after_id", low=1, high=MAX_ID)
    entries = await q.entries_page(pool, account.user_id, limit=25, before_id=before_id, after_id=after_id)
    ctx.readable(entries.entries)
    audit_rows, _ = await q.audit_page(pool, q.AuditFilter(target=account.user_id, limit=10))
    ctx.readable(audit_rows)
    return {
        "title": account.user_id, "nav": nav(ctx, session, "users"), "a": account,
        "plans": await ledger_of(request).plans(), "entries": entries,
        "alerts": await q.alerts(pool, account.user_id), "audit": audit_rows, "changes": changes,
        "url": f"/admin/users/{path_segment(account.user_id)}", "errors": {}, "values": {},
        "dialog": request.query.get("dialog", ""), "notice": notice(ctx, request.query),
        "idempotency_key": uuid.uuid4().hex,
    }


def notice(ctx: WebContext, query: Mapping[str, str]) -> str | None:
    done = query.get("done", "")
    if done in ("credits", "credits_duplicate", "plan", "suspend", "unsuspend"):
        return ctx.t(f"notice.{done}")
    return None


async def account_or_404(request: web.Request, session: WebSession | None) -> Account:
    account = await q.get_account(request.app[SERVICES].pool, request.match_info["user_id"])
    if account is None:
        ctx = request.app[WEB]
        page_ = ctx.error_page(ctx.t("err.unknown_user"), status=404,
                               nav=nav(ctx, session, "users") if session else None)
        raise web.HTTPNotFound(text=page_.text, content_type="text/html")
    return account


@page
async def user_page(request: web.Request, session: WebSession) -> web.StreamResponse:
    ctx = request.app[WEB]
    account = await account_or_404(request, session)
    try:
        context = await user_context(request, session, account)
    except Invalid as exc:
        return ctx.error_page("; ".join(field_messages(ctx, exc.fields).values()), status=400,
                              nav=nav(ctx, session, "users"))
    return ctx.render("admin/user.html", context)


@page
async def statement_csv(request: web.Request, session: WebSession) -> web.StreamResponse:
    account = await account_or_404(request, session)
    return await statement_csv_response(request, account.user_id, include_actor=True)


async def _form_failure(request: web.Request, session: WebSession, account: Account, dialog: str,
                        fields: dict[str, str], values: Mapping[str, Any]) -> web.Response:
    ctx = request.app[WEB]
    context = await user_context(request, session, account)
    context.update(dialog=dialog, errors=field_messages(ctx, fields), values=dict(values),
                   idempotency_key=str(values.get("idempotency_key") or context["idempotency_key"]))
    return ctx.render("admin/user.html", context, status=400)


def _redirect_done(account: Account, done: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(f"/admin/users/{path_segment(account.user_id)}?done={done}")


@page
async def credits_post(request: web.Request, session: WebSession) -> web.StreamResponse:
    ctx = request.app[WEB]
    account = await account_or_404(request, session)
    form = await request.post()
    values = {k: str(form.get(k, "")) for k in ("tokens", "reason", "idempotency_key")}
    try:
        tokens = parse_amount(values["tokens"], ctx.lang, from_form=True)
        reason = parse_reason(values["reason"])
        key = parse_key(values["idempotency_key"])
    except Invalid as exc:
        return await _form_failure(request, session, account, "credits", exc.fields, values)
    try:
        _, applied = await ledger_of(request).grant(
            account.user_id, tokens, actor=session.subject, reason=reason, idempotency_key=key,
            source_ip=client_ip(request))
    except UnknownUser:
        return await _form_failure(request, session, account, "credits", {"user": "unknown_user"}, values)
    raise _redirect_done(account, "credits" if applied else "credits_duplicate")


@page
async def plan_post(request: web.Request, session: WebSession) -> web.StreamResponse:
    account = await account_or_404(request, session)
    form = await request.post()
    values = {k: str(form.get(k, "")) for k in ("plan", "reason")}
    try:
        plan = await _checked_plan(request, account, values["plan"])
        reason = parse_reason(values["reason"])
        await ledger_of(request).set_plan(account.user_id, plan, actor=session.subject, reason=reason,
                                          source_ip=client_ip(request))
    except Invalid as exc:
        return await _form_failure(request, session, account, "plan", exc.fields, values)
    except UnknownPlan:
        return await _form_failure(request, session, account, "plan", {"plan": "unknown_plan"}, values)
    raise _redirect_done(account, "plan")


async def _checked_plan(request: web.Request, account: Account, plan: Any) -> str:
    if not isinstance(plan, str) or not plan:
        raise Invalid({"plan": "required"})
    if plan not in {p.name for p in await ledger_of(request).plans()}:
        raise Invalid({"plan": "unknown_plan"})
    if plan == account.plan:
        raise Invalid({"plan": "same_plan"})
    return plan


def _checked_suspension(account: Account, suspend: bool) -> None:
    if suspend and account.state == "suspended":
        raise Invalid({"action": "already_suspended"})
    if not suspend and account.state != "suspended":
        raise Invalid({"action": "not_suspended"})


@page
async def suspension_post(request: web.Request, session: WebSession) -> web.StreamResponse:
    account = await account_or_404(request, session)
    form = await request.post()
    values = {k: str(form.get(k, "")) for k in ("action", "reason")}
    suspend = values["action"] == "suspend"
    try:
        if values["action"] not in ("suspend", "unsuspend"):
            raise Invalid({"action": "invalid_choice"})
        _checked_suspension(account, suspend)
        reason = parse_reason(values["reason"])
        await ledger_of(request).set_suspended(account.user_id, suspend, actor=session.subject, reason=reason,
                                               source_ip=client_ip(request))
    except Invalid as exc:
        return await _form_failure(request, session, account, "suspension", exc.fields, values)
    except UnknownUser:
        return await _form_failure(request, session, account, "suspension", {"user": "unknown_user"}, values)
    raise _redirect_done(account, values["action"])


@page
async def audit_html(request: web.Request, session: WebSession) -> web.StreamResponse:
    ctx = request.app[WEB]
    pool = request.app[SERVICES].pool
    base = {"title": ctx.t("audit.title"), "nav": nav(ctx, session, "audit"), "query": dict(request.query),
            "actions": await q.audit_actions(pool), "changes": changes,
            "link": query_link("/admin/audit", request.query)}
    try:
        f = audit_filter(request.query)
    except Invalid as exc:
        return ctx.render("admin/audit.html", {**base, "audit": [], "older": None,
                                               "errors": field_messages(ctx, exc.fields)}, status=400)
    rows, older = await q.audit_page(pool, f)
    return ctx.render("admin/audit.html", {**base, "audit": ctx.readable(rows), "older": older, "errors": {}})


# ---------------------------------------------------------------- JSON API


def api(handler: Callable[[web.Request, str], Awaitable[web.StreamResponse]]) -> Handler:
    """An API endpoint: Authorization: Bearer <admin token or admin JWT>; 401 / 403 otherwise.
    Cookies are not accepted here, so the API needs no CSRF token."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        ctx = request.app[WEB]
        header = request.headers.get("authorization", "")
        credential = header[7:] if header[:7].lower() == "bearer " else ""
        try:
            admin = await admin_from_credential(ctx.settings, ctx.authenticator, credential)
        except AuthFailure as exc:
            return json_error(exc.status, exc.code, ctx.t(f"login.{exc.code}"),
                              headers={"WWW-Authenticate": 'Bearer realm="solaris-admin"'}
                              if exc.status == 401 else None)
        try:
            return await handler(request, admin.actor)
        except Invalid as exc:
            return validation_error(ctx, exc.fields)
        except q.BadCursor:
            return validation_error(ctx, {"cursor": "bad_cursor"})

    return wrapped


async def api_account(request: web.Request) -> Account | web.Response:
    account = await q.get_account(request.app[SERVICES].pool, request.match_info["user_id"])
    if account is None:
        ctx = request.app[WEB]
        return json_error(404, "unknown_user", ctx.t("err.unknown_user"))
    return account


@api
async def api_dashboard(request: web.Request, actor: str) -> web.StreamResponse:
    data = await dashboard_data(request)
    data["top"] = [a.as_json() for a in data["top"]]
    data["recent_blocks"] = [{**a.as_json(), "changed_at": when} for a, when in data["recent_blocks"]]
    return json_response(data)


@api
async def api_users(request: web.Request, actor: str) -> web.StreamResponse:
    result = await q.list_users(request.app[SERVICES].pool, user_filter(request.query))
    return json_response({"users": [a.as_json() for a in result.accounts], "next": result.next_cursor,
                          "prev": result.prev_cursor, "total": result.total, "total_capped": result.total_capped})


@api
async def api_users_csv(request: web.Request, actor: str) -> web.StreamResponse:
    return await users_csv_response(request, user_filter(request.query))


@api
async def api_user(request: web.Request, actor: str) -> web.StreamResponse:
    account = await api_account(request)
    if isinstance(account, web.Response):
        return account
    return json_response({"account": account.as_json(),
                          "alerts": await q.alerts(request.app[SERVICES].pool, account.user_id)})


@api
async def api_entries(request: web.Request, actor: str) -> web.StreamResponse:
    account = await api_account(request)
    if isinstance(account, web.Response):
        return account
    return json_response(await entries_json(request, account.user_id, include_actor=True))


@api
async def api_statement_csv(request: web.Request, actor: str) -> web.StreamResponse:
    account = await api_account(request)
    if isinstance(account, web.Response):
        return account
    return await statement_csv_response(request, account.user_id, include_actor=True)


@api
async def api_credits(request: web.Request, actor: str) -> web.StreamResponse:
    ctx = request.app[WEB]
    data = await json_body(request)
    account = await api_account(request)
    if isinstance(account, web.Response):
        return account
    tokens = parse_amount(data.get("tokens"), ctx.lang, from_form=False)
    reason = parse_reason(data.get("reason"))
    key = parse_key(data.get("idempotency_key"))
    try:
        updated, applied = await ledger_of(request).grant(
            account.user_id, tokens, actor=actor, reason=reason, idempotency_key=key, source_ip=client_ip(request))
    except UnknownUser:
        return json_error(404, "unknown_user", ctx.t("err.unknown_user"))
    return json_response({"account": updated.as_json(), "applied": applied})


@api
async def api_plan(request: web.Request, actor: str) -> web.StreamResponse:
    data = await json_body(request)
    account = await api_account(request)
    if isinstance(account, web.Response):
        return account
    plan = await _checked_plan(request, account, data.get("plan"))
    reason = parse_reason(data.get("reason"))
    try:
        updated = await ledger_of(request).set_plan(account.user_id, plan, actor=actor, reason=reason,
                                                    source_ip=client_ip(request))
    except UnknownPlan:
        raise Invalid({"plan": "unknown_plan"}) from None
    return json_response({"account": updated.as_json()})


async def _api_suspension(request: web.Request, actor: str, suspend: bool) -> web.StreamResponse:
    ctx = request.app[WEB]
    data = await json_body(request)
    account = await api_account(request)
    if isinstance(account, web.Response):
        return account
    _checked_suspension(account, suspend)
    reason = parse_reason(data.get("reason"))
    try:
        updated = await ledger_of(request).set_suspended(account.user_id, suspend, actor=actor, reason=reason,
                                                         source_ip=client_ip(request))
    except UnknownUser:
        return json_error(404, "unknown_user", ctx.t("err.unknown_user"))
    return json_response({"account": updated.as_json()})


@api
async def api_suspend(request: web.Request, actor: str) -> web.StreamResponse:
    return await _api_suspension(request, actor, True)


@api
async def api_unsuspend(request: web.Request, actor: str) -> web.StreamResponse:
    return await _api_suspension(request, actor, False)


@api
async def api_plans(request: web.Request, actor: str) -> web.StreamResponse:
    return json_response({"plans": [p.as_json() for p in await ledger_of(request).plans()]})


@api
async def api_audit(request: web.Request, actor: str) -> web.StreamResponse:
    rows, older = await q.audit_page(request.app[SERVICES].pool, audit_filter(request.query))
    return json_response({"entries": request.app[WEB].readable(rows), "next_before_id": older})


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler


ROUTES = (
    Route("GET", "/admin", dashboard_page),
    Route("GET", "/admin/", dashboard_page),
    Route("GET", "/admin/login", login_page),
    Route("POST", "/admin/login", login_post),
    Route("POST", "/admin/logout", logout_post),
    Route("GET", "/admin/users", users_page),
    Route("GET", "/admin/users.csv", users_csv),
    Route("GET", "/admin/users/{user_id}", user_page),
    Route("GET", "/admin/users/{user_id}/statement.csv", statement_csv),
    Route("POST", "/admin/users/{user_id}/credits", credits_post),
    Route("POST", "/admin/users/{user_id}/plan", plan_post),
    Route("POST", "/admin/users/{user_id}/suspension", suspension_post),
    Route("GET", "/admin/audit", audit_html),
    Route("GET", "/api/admin/dashboard", api_dashboard),
    Route("GET", "/api/admin/users", api_users),
    Route("GET", "/api/admin/users.csv", api_users_csv),
    Route("GET", "/api/admin/users/{user_id}", api_user),
    Route("GET", "/api/admin/users/{user_id}/entries", api_entries),
    Route("GET", "/api/admin/users/{user_id}/statement.csv", api_statement_csv),
    Route("POST", "/api/admin/users/{user_id}/credits", api_credits),
    Route("POST", "/api/admin/users/{user_id}/plan", api_plan),
    Route("POST", "/api/admin/users/{user_id}/suspend", api_suspend),
    Route("POST", "/api/admin/users/{user_id}/unsuspend", api_unsuspend),
    Route("GET", "/api/admin/plans", api_plans),
    Route("GET", "/api/admin/audit", api_audit),
)


def setup(app: web.Application) -> None:
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
