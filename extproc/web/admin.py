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
from ..formats import fmt_int
from ..ledger import Account, Ledger, UnknownPlan, UnknownUser
from . import queries as q
from . import usage as usage_
from .kit import (
    MAX_ID,
    SERVICES,
    WEB,
    Invalid,
    WebContext,
    admin_actor,
    checked_cap,
    client_ip,
    entries_json,
    field_messages,
    json_body,
    json_error,
    json_response,
    parse_day,
    parse_int,
    parse_tokens,
    path_segment,
    settings_from_json,
    settings_json,
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
    """A positive whole number of tokens to grant (forms may group thousands the locale's way)."""
    return parse_tokens(raw, lang, "tokens", from_form=from_form, low=1, high=MAX_GRANT)


def parse_monthly(raw: Any, lang: str, field: str, *, from_form: bool) -> int | None:
    """A monthly allowance or personal cap: tokens, 0 allowed (a user with no monthly tokens
    still spends credits); an empty form field or JSON null means none (the plan's allowance,
    no cap). Bounded like a grant: a typo guard, far above any real month."""
    if raw is None or (from_form and not str(raw).strip()):
        return None
    return parse_tokens(raw, lang, field, from_form=from_form, low=0, high=MAX_GRANT)


def parse_reason(raw: Any) -> str:
    if raw is not None and not isinstance(raw, str):
        raise Invalid({"reason": "required"})
    text = " ".join((raw or "").split())  # one line: it is shown in tables and CSV
    if not text:
        raise Invalid({"reason": "required"})
    if not text.isprintable():  # control characters (PostgreSQL refuses NUL in text: a 500)
        raise Invalid({"reason": "invalid"})
    if len(text) > MAX_REASON:
        raise Invalid({"reason": "too_long"})
    return text


def parse_settings(data: Mapping[str, Any], account: Account) -> dict[str, Any]:
    """The body of PUT /api/admin/users/{id}/settings: /api/me/settings' body (its rules and
    codes: ``kit.settings_from_json``) plus "reason", and at least one setting to change."""
    changes = settings_from_json(data, account, own=frozenset({"reason"}))
    if not changes:
        raise Invalid({"body": "no_settings"})
    return changes


def check_confirmation(account: Account, typed: Any) -> None:
    """An erasure needs the user id typed again: the one guard between a slip and an
    irreversible loss of the account's personal data."""
    if not isinstance(typed, str) or not typed.strip():
        raise Invalid({"confirm": "required"})
    if typed != account.user_id and typed.strip() != account.user_id:
        raise Invalid({"confirm": "confirm_mismatch"})


# Codes of this module's forms and API that the shared err.* catalogue lacks: code -> key.
OWN_MESSAGES = {
    "negative": "user.err_negative", "unknown_field": "user.err_unknown_field",
    "not_boolean": "user.err_not_boolean", "no_settings": "cap.err_no_settings",
    "same_allowance": "allowance.err_same", "same_cap": "cap.err_same", "not_object": "cap.err_not_object",
    "above_budget": "cap.err_above_budget",
    "confirm_mismatch": "erase.err_mismatch", "already_erased": "erase.err_already",
}


def own_messages(ctx: WebContext, account: Account | None = None) -> dict[str, str]:
    return {code: _own(ctx, key, account) for code, key in OWN_MESSAGES.items()}


def messages(ctx: WebContext, fields: Mapping[str, str], account: Account | None = None) -> dict[str, str]:
    """Field -> sentence in the page's language (``field_messages`` plus this module's codes)."""
    return {name: _own(ctx, OWN_MESSAGES[code], account) if code in OWN_MESSAGES else ctx.t(f"err.{code}")
            for name, code in fields.items()}


def _own(ctx: WebContext, key: str, account: Account | None) -> str:
    """A text of this module; "{budget}" is the account's cycle budget, written the reader's way."""
    if account is None or "{budget}" not in ctx.messages.get(key, ""):
        return ctx.t(key)
    return ctx.t(key, budget=fmt_int(account.cycle_budget, ctx.lang))


def parse_key(raw: Any) -> str | None:
    if raw in (None, ""):
        return None
    if not isinstance(raw, str) or len(raw) > MAX_KEY or not raw.isprintable():
        raise Invalid({"idempotency_key": "invalid"})
    # Namespaced so an admin's key can never collide with a Stripe session id.
    return f"admin:{raw}"


def no_nul(query: Mapping[str, str]) -> None:
    """PostgreSQL's text cannot hold NUL: a parameter carrying one is refused here (400), not
    sent to the database (a 500)."""
    bad = {k[:64].replace("\x00", ""): "invalid" for k, v in query.items() if "\x00" in k or "\x00" in v}
    if bad:
        raise Invalid(bad)


def user_filter(query: Mapping[str, str]) -> q.UserFilter:
    no_nul(query)
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
    no_nul(query)
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
    """The fields an audited change moved, for the audit table; nested objects (an account's
    preferences) by their leaves, so a turned-off alert reads "preferences.alerts.90: true → false"."""
    old, new = _leaves(before or {}), _leaves(after or {})
    skip = {"used_pct", "cycle_start", "cycle_end"}
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if k not in skip and old.get(k) != new.get(k)]


def _leaves(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, Mapping) and item:
            out.update(_leaves(item, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = item
    return out


USERS_HEADER = ["user_id", "email", "name", "plan", "state", "state_reason", "available", "balance",
                "allowance", "credits", "reserved", "used", "budget", "used_pct", "cycle_start", "cycle_end",
                "created_at", "allowance_override", "personal_cap", "effective_limit", "erased_at"]


def user_row(a: Account) -> list[Any]:
    return [a.user_id, a.email, a.name, a.plan, a.state, a.state_reason, a.available, a.balance, a.allowance,
            a.credits, a.reserved, a.used_cycle, a.cycle_budget, a.used_pct, a.cycle_start, a.cycle_end,
            a.created_at, a.allowance_override, a.personal_cap, a.effective_limit, a.erased_at]


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
    now = int(time.time())
    session = new_session(admin.actor, ADMIN_SESSION_SECONDS, admin.via, not_after=admin.expires, now=now)
    await open_session(request.app[SERVICES].pool, "admin", session, source_ip=client_ip(request),
                       user_agent=request.headers.get("user-agent"), now=request.app[SERVICES].clock())
    response = web.HTTPSeeOther(next_url)
    set_cookie(response, ADMIN_COOKIE, session_cookie(ctx.signer, "admin", session), path="/admin",
               max_age=session.expires - now, secure=ctx.secure_cookies)
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
    plans = await ledger_of(request).plans()
    periods = await usage_.cycles(pool, account, request.app[SERVICES].clock())
    return {
        "title": account.user_id, "nav": nav(ctx, session, "users"), "a": account,
        "plans": plans, "plan_tokens": next((p.monthly_tokens for p in plans if p.name == account.plan), None),
        "entries": entries, "usage": periods,
        "alerts": await q.alerts(pool, account.user_id), "audit": audit_rows, "changes": changes,
        "url": f"/admin/users/{path_segment(account.user_id)}", "errors": {}, "values": {},
        "dialog": request.query.get("dialog", ""), "notice": notice(ctx, request.query),
        "idempotency_key": uuid.uuid4().hex,
    }


def notice(ctx: WebContext, query: Mapping[str, str]) -> str | None:
    done = query.get("done", "")
    if done in ("credits", "credits_duplicate", "plan", "suspend", "unsuspend"):
        return ctx.t(f"notice.{done}")
    if done in ("allowance", "cap", "erase"):
        return ctx.t(f"{done}.done")
    return None


async def path_account(request: web.Request) -> Account | None:
    """The account the path names; None for an id no account can have (NUL: see ``no_nul``)."""
    user_id = request.match_info["user_id"]
    return None if "\x00" in user_id else await q.get_account(request.app[SERVICES].pool, user_id)


async def account_or_404(request: web.Request, session: WebSession | None) -> Account:
    account = await path_account(request)
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


@page
async def usage_csv(request: web.Request, session: WebSession) -> web.StreamResponse:
    """The usage behind the user page's charts (both cycles), with estimate and real tokens."""
    account = await account_or_404(request, session)
    periods = await usage_.cycles(request.app[SERVICES].pool, account, request.app[SERVICES].clock())
    return await usage_.usage_csv(request, account.user_id, periods, include_estimates=True)


async def _form_failure(request: web.Request, session: WebSession, account: Account, dialog: str,
                        fields: dict[str, str], values: Mapping[str, Any]) -> web.Response:
    ctx = request.app[WEB]
    context = await user_context(request, session, account)
    context.update(dialog=dialog, errors=messages(ctx, fields, account), values=dict(values),
                   idempotency_key=str(values.get("idempotency_key") or context["idempotency_key"]))
    return ctx.render("admin/user.html", context, status=400)


def _done(account: Account, done: str) -> str:
    return f"/admin/users/{path_segment(account.user_id)}?done={done}"


Apply = Callable[[Account, dict[str, str], str], Awaitable[str]]


async def _dialog_post(request: web.Request, session: WebSession, dialog: str, names: tuple[str, ...],
                       apply: Apply) -> web.StreamResponse:
    """A dialog's form on the user page: its fields read, ``apply(account, values, actor)`` run
    (it validates, writes and returns where to go next), or on a refusal the page again, 400,
    with the dialog open, the values kept and each field's message."""
    account = await account_or_404(request, session)
    form = await request.post()
    values = {k: str(form.get(k, "")) for k in names}
    try:
        location = await apply(account, values, session.subject)
    except Invalid as exc:
        return await _form_failure(request, session, account, dialog, exc.fields, values)
    except UnknownUser:  # erased or gone since the page was read
        return await _form_failure(request, session, account, dialog, {"user": "unknown_user"}, values)
    raise web.HTTPSeeOther(location)


@page
async def credits_post(request: web.Request, session: WebSession) -> web.StreamResponse:
    ctx = request.app[WEB]

    async def apply(account: Account, values: dict[str, str], actor: str) -> str:
        tokens = parse_amount(values["tokens"], ctx.lang, from_form=True)
        reason = parse_reason(values["reason"])
        key = parse_key(values["idempotency_key"])
        _, applied = await ledger_of(request).grant(account.user_id, tokens, actor=actor, reason=reason,
                                                    idempotency_key=key, source_ip=client_ip(request))
        return _done(account, "credits" if applied else "credits_duplicate")

    return await _dialog_post(request, session, "credits", ("tokens", "reason", "idempotency_key"), apply)


@page
async def plan_post(request: web.Request, session: WebSession) -> web.StreamResponse:
    async def apply(account: Account, values: dict[str, str], actor: str) -> str:
        plan = await _checked_plan(request, account, values["plan"])
        reason = parse_reason(values["reason"])
        try:
            await ledger_of(request).set_plan(account.user_id, plan, actor=actor, reason=reason,
                                              source_ip=client_ip(request))
        except UnknownPlan:
            raise Invalid({"plan": "unknown_plan"}) from None
        return _done(account, "plan")

    return await _dialog_post(request, session, "plan", ("plan", "reason"), apply)


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
    async def apply(account: Account, values: dict[str, str], actor: str) -> str:
        if values["action"] not in ("suspend", "unsuspend"):
            raise Invalid({"action": "invalid_choice"})
        suspend = values["action"] == "suspend"
        _checked_suspension(account, suspend)
        reason = parse_reason(values["reason"])
        await ledger_of(request).set_suspended(account.user_id, suspend, actor=actor, reason=reason,
                                               source_ip=client_ip(request))
        return _done(account, values["action"])

    return await _dialog_post(request, session, "suspension", ("action", "reason"), apply)


@page
async def allowance_post(request: web.Request, session: WebSession) -> web.StreamResponse:
    ctx = request.app[WEB]

    async def apply(account: Account, values: dict[str, str], actor: str) -> str:
        if values["mode"] not in ("plan", "custom"):
            raise Invalid({"mode": "invalid_choice"})
        tokens = None
        if values["mode"] == "custom":
            tokens = parse_monthly(values["tokens"], ctx.lang, "tokens", from_form=True)
            if tokens is None:
                raise Invalid({"tokens": "required"})
        if tokens == account.allowance_override:
            raise Invalid({"tokens": "same_allowance"})
        reason = parse_reason(values["reason"])
        await ledger_of(request).set_allowance(account.user_id, tokens, actor=actor, reason=reason,
                                               source_ip=client_ip(request))
        return _done(account, "allowance")

    return await _dialog_post(request, session, "allowance", ("mode", "tokens", "reason"), apply)


@page
async def cap_post(request: web.Request, session: WebSession) -> web.StreamResponse:
    ctx = request.app[WEB]

    async def apply(account: Account, values: dict[str, str], actor: str) -> str:
        cap = checked_cap(parse_monthly(values["personal_cap"], ctx.lang, "personal_cap", from_form=True), account)
        if cap == account.personal_cap:
            raise Invalid({"personal_cap": "same_cap"})
        reason = parse_reason(values["reason"])
        await _set_settings(request, account, {"personal_cap": cap}, actor=actor, reason=reason)
        return _done(account, "cap")

    return await _dialog_post(request, session, "cap", ("personal_cap", "reason"), apply)


async def _set_settings(request: web.Request, account: Account, changes: dict[str, Any], *, actor: str,
                        reason: str) -> Account:
    """``Ledger.set_settings`` as an admin: the ledger's own refusal of a value (ValueError)
    is the same 400 as ours, never a 500."""
    try:
        return await ledger_of(request).set_settings(account.user_id, **changes, actor=actor, reason=reason,
                                                     source_ip=client_ip(request))
    except ValueError:
        raise Invalid({next(iter(changes)): "invalid"}) from None


@page
async def erase_post(request: web.Request, session: WebSession) -> web.StreamResponse:
    async def apply(account: Account, values: dict[str, str], actor: str) -> str:
        if account.erased_at is not None:
            raise Invalid({"confirm": "already_erased"})
        check_confirmation(account, values["confirm"])
        reason = parse_reason(values["reason"])
        pseudonym = await ledger_of(request).erase(account.user_id, actor=actor, reason=reason,
                                                   source_ip=client_ip(request))
        # The old id no longer exists: the account lives on under its pseudonym, amounts and all.
        return f"/admin/users/{path_segment(pseudonym)}?done=erase"

    return await _dialog_post(request, session, "erase", ("confirm", "reason"), apply)


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
        actor = await admin_actor(request)
        if isinstance(actor, web.Response):
            return actor
        try:
            return await handler(request, actor)
        except Invalid as exc:
            return validation_error(ctx, exc.fields, own_messages(ctx))
        except q.BadCursor:
            return validation_error(ctx, {"cursor": "bad_cursor"})
        except UnknownUser:  # no such id, or erased or gone while the request ran
            return json_error(404, "unknown_user", ctx.t("err.unknown_user"))

    return wrapped


async def api_account(request: web.Request) -> Account:
    """The path's account; UnknownUser (the API's 404) when there is none."""
    account = await path_account(request)
    if account is None:
        raise UnknownUser(request.match_info["user_id"])
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
    return json_response({"account": account.as_json(),
                          "alerts": await q.alerts(request.app[SERVICES].pool, account.user_id)})


@api
async def api_entries(request: web.Request, actor: str) -> web.StreamResponse:
    account = await api_account(request)
    return json_response(await entries_json(request, account.user_id, include_actor=True))


@api
async def api_statement_csv(request: web.Request, actor: str) -> web.StreamResponse:
    account = await api_account(request)
    return await statement_csv_response(request, account.user_id, include_actor=True)


@api
async def api_credits(request: web.Request, actor: str) -> web.StreamResponse:
    ctx = request.app[WEB]
    data = await json_body(request)
    account = await api_account(request)
    tokens = parse_amount(data.get("tokens"), ctx.lang, from_form=False)
    reason = parse_reason(data.get("reason"))
    key = parse_key(data.get("idempotency_key"))
    updated, applied = await ledger_of(request).grant(
        account.user_id, tokens, actor=actor, reason=reason, idempotency_key=key, source_ip=client_ip(request))
    return json_response({"account": updated.as_json(), "applied": applied})


@api
async def api_plan(request: web.Request, actor: str) -> web.StreamResponse:
    data = await json_body(request)
    account = await api_account(request)
    plan = await _checked_plan(request, account, data.get("plan"))
    reason = parse_reason(data.get("reason"))
    try:
        updated = await ledger_of(request).set_plan(account.user_id, plan, actor=actor, reason=reason,
                                                    source_ip=client_ip(request))
    except UnknownPlan:
        raise Invalid({"plan": "unknown_plan"}) from None
    return json_response({"account": updated.as_json()})


async def _api_suspension(request: web.Request, actor: str, suspend: bool) -> web.StreamResponse:
    data = await json_body(request)
    account = await api_account(request)
    _checked_suspension(account, suspend)
    reason = parse_reason(data.get("reason"))
    updated = await ledger_of(request).set_suspended(account.user_id, suspend, actor=actor, reason=reason,
                                                     source_ip=client_ip(request))
    return json_response({"account": updated.as_json()})


@api
async def api_suspend(request: web.Request, actor: str) -> web.StreamResponse:
    return await _api_suspension(request, actor, True)


@api
async def api_unsuspend(request: web.Request, actor: str) -> web.StreamResponse:
    return await _api_suspension(request, actor, False)


@api
async def api_allowance(request: web.Request, actor: str) -> web.StreamResponse:
    ctx = request.app[WEB]
    data = await json_body(request)
    account = await api_account(request)
    if "tokens" not in data:  # null is "back to the plan's": absent is a mistake, not a choice
        raise Invalid({"tokens": "required"})
    tokens = parse_monthly(data["tokens"], ctx.lang, "tokens", from_form=False)
    reason = parse_reason(data.get("reason"))
    try:
        updated = await ledger_of(request).set_allowance(account.user_id, tokens, actor=actor, reason=reason,
                                                         source_ip=client_ip(request))
    except ValueError:  # the ledger's own bound: the same 400 as ours, never a 500
        raise Invalid({"tokens": "invalid"}) from None
    return json_response({"account": updated.as_json()})


@api
async def api_settings(request: web.Request, actor: str) -> web.StreamResponse:
    ctx = request.app[WEB]
    data = await json_body(request)
    account = await api_account(request)
    try:
        changes = parse_settings(data, account)
        reason = parse_reason(data.get("reason"))
        # Like /me: a save that changes nothing writes nothing (no audit row for a no-op).
        moved = {k: v for k, v in changes.items() if getattr(account, k) != v}
        updated = await _set_settings(request, account, moved, actor=actor, reason=reason) if moved else account
    except Invalid as exc:  # here, not in ``api``: the cap's message names this account's budget
        return validation_error(ctx, exc.fields, own_messages(ctx, account))
    return json_response({"account": updated.as_json(), "settings": settings_json(updated)})


@api
async def api_erase(request: web.Request, actor: str) -> web.StreamResponse:
    ctx = request.app[WEB]
    data = await json_body(request)
    account = await api_account(request)
    if account.erased_at is not None:  # the pseudonym itself: nothing personal is left to erase
        return json_error(409, "already_erased", ctx.t("erase.err_already"))
    reason = parse_reason(data.get("reason"))
    pseudonym = await ledger_of(request).erase(account.user_id, actor=actor, reason=reason,
                                               source_ip=client_ip(request))
    return json_response({"pseudonym": pseudonym})


@api
async def api_usage(request: web.Request, actor: str) -> web.StreamResponse:
    """Usage by UTC day and model; an admin also gets each row's estimate and real tokens."""
    days = usage_.parse_days(request.query.get("days"))
    account = await api_account(request)
    service = request.app[SERVICES]
    rows = await usage_.last_days(service.pool, account.user_id, days, service.clock())
    return json_response([r.as_json(include_estimates=True) for r in rows])


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
    Route("GET", "/admin/users/{user_id}/usage.csv", usage_csv),
    Route("POST", "/admin/users/{user_id}/credits", credits_post),
    Route("POST", "/admin/users/{user_id}/plan", plan_post),
    Route("POST", "/admin/users/{user_id}/suspension", suspension_post),
    Route("POST", "/admin/users/{user_id}/allowance", allowance_post),
    Route("POST", "/admin/users/{user_id}/cap", cap_post),
    Route("POST", "/admin/users/{user_id}/erase", erase_post),
    Route("GET", "/admin/audit", audit_html),
    Route("GET", "/api/admin/dashboard", api_dashboard),
    Route("GET", "/api/admin/users", api_users),
    Route("GET", "/api/admin/users.csv", api_users_csv),
    Route("GET", "/api/admin/users/{user_id}", api_user),
    Route("GET", "/api/admin/users/{user_id}/entries", api_entries),
    Route("GET", "/api/admin/users/{user_id}/statement.csv", api_statement_csv),
    Route("GET", "/api/admin/users/{user_id}/usage", api_usage),
    Route("POST", "/api/admin/users/{user_id}/credits", api_credits),
    Route("POST", "/api/admin/users/{user_id}/plan", api_plan),
    Route("POST", "/api/admin/users/{user_id}/suspend", api_suspend),
    Route("POST", "/api/admin/users/{user_id}/unsuspend", api_unsuspend),
    Route("PUT", "/api/admin/users/{user_id}/allowance", api_allowance),
    Route("PUT", "/api/admin/users/{user_id}/settings", api_settings),
    Route("POST", "/api/admin/users/{user_id}/erase", api_erase),
    Route("GET", "/api/admin/plans", api_plans),
    Route("GET", "/api/admin/audit", api_audit),
)


def setup(app: web.Application) -> None:
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
