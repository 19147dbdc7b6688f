"""What the web surfaces share: the handler modules (``admin``, ``me``, ``billing``) import this
module and ``sessions``, never each other.

- the service they use (``Services``, typed) and the app keys that carry it;
- ``WebContext``: templates, language, the error page and the CSRF check of a form;
- request parsing (``Invalid``, ``parse_int``, ``json_body``...) and JSON/CSV answers;
- the reader's language (``page_language``: the user's choice, the browser's, the deployment's);
- the user's identity on /me, /api/me and billing (session cookie; JWT or gateway key + headers);
- the statement ("extrato") as JSON pages and CSV, shared by the admin console and /me.

Pages are server-rendered Jinja2 with autoescape on (identity values are attacker-chosen
text), no front-end build and nothing loaded from another origin (the CSP says so)."""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from aiohttp import web
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from .. import reasons
from ..formats import fmt_date, fmt_day_month, fmt_dt, fmt_int, fmt_pct, fmt_signed, fmt_value, group_separator
from ..i18n import LANGUAGES, catalogue, supported
from ..identity import Authenticator, IdentityError
from ..settings import Settings
from . import queries as q
from .sessions import (
    ME_COOKIE,
    PRE_COOKIE,
    PRE_SESSION_SECONDS,
    AuthFailure,
    Signer,
    WebSession,
    admin_from_credential,
    pre_session,
    printable,
    read_session,
    set_cookie,
)

if TYPE_CHECKING:  # annotations only: the service's parts are read, never built, here
    import asyncpg

    from ..ledger import Account, Clock, Ledger
    from ..metrics import Metrics

__all__ = [
    "CSP", "OFFER", "SERVICES", "STATIC", "TEMPLATES", "WEB", "Invalid", "Offer", "OfferSource", "Services",
    "WebContext", "accepted_language", "admin_actor", "api_identity", "client_ip", "connecting_address", "csv_cell",
    "current_session", "download_name",
    "entries_json", "field_messages", "json_body", "json_error", "json_response", "page_language", "parse_day",
    "parse_int", "parse_tokens", "path_segment", "reader_context", "settings_from_json", "settings_json",
    "signin_page", "statement_csv_response", "stream_csv", "validation_error", "with_caller",
]

PACKAGE = Path(__file__).resolve().parent.parent  # extproc: templates/ and static/ stay there
TEMPLATES = PACKAGE / "templates"
STATIC = PACKAGE / "static"
CSP = ("default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:;"
       " form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
MAX_ID = 2**62  # bound of an entry or audit id in a query string


# ---------------------------------------------------------------- the service the handlers use


class Services(Protocol):
    """What the web surfaces use of the running service (``extproc.app.Service``, whose pool
    and ledger exist once it has started, before it builds the web app; tests pass stand-ins
    with the attributes their routes touch). Read at request time, never copied."""

    settings: Settings
    pool: asyncpg.Pool
    ledger: Ledger
    metrics: Metrics
    clock: Clock

    async def redis_status(self) -> str: ...

    async def refresh_gauges(self) -> None: ...


@dataclass(frozen=True)
class Offer:
    """The "buy credits" section of the /me page (the template reads its fields)."""

    packs: list[dict[str, Any]]  # id, tokens, price and button label of each pack
    text: Mapping[str, str]  # the section's wording
    notice: str | None  # after coming back from Stripe: paid or cancelled
    csp: str  # the page's Content-Security-Policy (the form's redirect goes to Stripe)


class OfferSource(Protocol):
    """Set under OFFER by ``billing`` when billing is on; /me shows no offer without it."""

    def __call__(self, request: web.Request, lang: str) -> Offer: ...  # lang: the page's


# ---------------------------------------------------------------- language, templates, errors


def path_segment(value: str) -> str:
    """A user id as one URL path segment (ids may contain '/', '?', '#', spaces, anything)."""
    return quote(value, safe="")


@dataclass
class WebContext:
    """What the console's handlers share, built once per application from the settings."""

    settings: Settings
    signer: Signer
    authenticator: Authenticator
    jinja: Environment
    messages: Mapping[str, str]  # the catalogue's texts in ``lang``
    lang: str
    secure_cookies: bool
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    # Whole past days of the dashboard chart never change (usage is written at "now"):
    # computed once per process, only today is queried on every view.
    daily_cache: dict[date, tuple[int, int]] = field(default_factory=dict)
    # The same context in each language, sharing the signer, the authenticator and the
    # background tasks: a page is rendered in its reader's language (``reader_context``).
    languages: dict[str, WebContext] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, settings: Settings, authenticator: Authenticator | None = None) -> WebContext:
        """``authenticator``: the service's own (one JWKS cache and its background refresh
        for the gate and the console alike); a fresh one for tests that build pages alone.
        Answers the context in GATE_LANGUAGE; ``in_language`` gives the others."""
        signer, authenticator = Signer(settings), authenticator or Authenticator(settings)
        secure = settings.public_url.lower().startswith("https://")
        first = None
        for lang in LANGUAGES:
            ctx = cls(settings=settings, signer=signer, authenticator=authenticator,
                      jinja=cls._jinja(lang), messages=catalogue().texts(lang), lang=lang, secure_cookies=secure)
            if first is None:
                first = ctx
            else:  # one set of tasks, one chart cache and one table of languages for all
                ctx.tasks, ctx.daily_cache, ctx.languages = first.tasks, first.daily_cache, first.languages
            first.languages[lang] = ctx
            ctx._bind()
        assert first is not None
        return first.languages[supported(settings.language)]

    @staticmethod
    def _jinja(lang: str) -> Environment:
        jinja = Environment(
            loader=FileSystemLoader(TEMPLATES),
            autoescape=select_autoescape(enabled_extensions=("html", "svg", "xml"),
                                         disabled_extensions=("txt",), default_for_string=True,
                                         default=True),
            undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        )
        jinja.filters.update(
            num=lambda v: fmt_int(v, lang), signed=lambda v: fmt_signed(v, lang),
            pct=lambda v: fmt_pct(v, lang), dt=lambda v: fmt_dt(v, lang),
            day=lambda v: fmt_date(v, lang), daymonth=lambda v: fmt_day_month(v, lang), seg=path_segment,
            value=lambda v: fmt_value(v, lang),
        )
        return jinja

    def _bind(self) -> None:
        self.jinja.globals.update(t=self.t, t_or=self.t_or, lang=self.lang, html_lang=self.lang)

    def in_language(self, lang: str | None) -> WebContext:
        """This context in ``lang`` (itself when ``lang`` is not a language of the catalogue)."""
        return self.languages.get(lang or "", self)

    def t(self, key: str, **kwargs: Any) -> str:
        text = self.messages.get(key, key)
        return text.format(**kwargs) if kwargs else text

    def t_or(self, key: str, default: str) -> str:
        return self.messages.get(key, default)

    def readable(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Statement or audit rows with ``reason`` in the reader's language (coded reasons
        rendered, see ``extproc.reasons``; the code columns dropped). Changes the rows in place."""
        for row in rows:
            row["reason"] = reasons.display(row.get("reason"), row.pop("reason_code", None),
                                            row.pop("reason_params", None), self.lang)
        return rows

    def render(self, name: str, context: dict[str, Any], *, status: int = 200,
               headers: dict[str, str] | None = None) -> web.Response:
        body = self.jinja.get_template(name).render(**context)
        return web.Response(text=body, status=status, content_type="text/html", headers=headers)

    def error_page(self, message: str, *, status: int, nav: dict[str, Any] | None = None) -> web.Response:
        """The one error page of the console and /me; ``nav``: the admin header, if signed in."""
        return self.render("error.html", {"title": self.t("error.title"), "message": message, "nav": nav},
                           status=status)

    def csrf_ok(self, form: Mapping[str, Any], binding: str | None) -> bool:
        """Whether a posted form carries the CSRF token of ``binding`` (a session id, or the
        pre-session cookie of a sign-in form)."""
        token = form.get("csrf")
        return self.signer.csrf_ok(binding, token if isinstance(token, str) else None)

    def render_with_pre(self, request: web.Request, template: str, context: dict[str, Any], *,
                        status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        """Render a sign-in form whose CSRF token is bound to the visitor's pre-session cookie
        (set now when missing)."""
        pre, fresh = pre_session(request)
        response = self.render(template, {**context, "csrf": self.signer.csrf(pre)}, status=status,
                               headers=headers)
        if fresh:
            set_cookie(response, PRE_COOKIE, pre, path="/", max_age=PRE_SESSION_SECONDS,
                       secure=self.secure_cookies)
        return response

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


SERVICES = web.AppKey("services", Services)
WEB = web.AppKey("web", WebContext)
OFFER = web.AppKey("me_offer", OfferSource)


# ---------------------------------------------------------------- the reader's language


def accepted_language(header: str | None) -> str | None:
    """The first language of the catalogue in an Accept-Language header, by preference
    ("pt", "pt-PT" and "pt-BR" all read pt-BR; "en-GB" reads en); None when it names none."""
    ranked: list[tuple[float, int, str]] = []
    for position, item in enumerate((header or "")[:1000].split(",")[:40]):
        tag, _, params = item.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        primary = tag.strip().lower().split("-")[0]
        match = {"pt": "pt-BR", "en": "en"}.get(primary)
        if match and quality > 0:
            ranked.append((-quality, position, match))
    return min(ranked)[2] if ranked else None


def page_language(request: web.Request, account: Account | None = None) -> str:
    """The language of a page (and of the API's texts) for this reader: the language the user
    chose in their settings, else the browser's Accept-Language when it names Portuguese or
    English, else the deployment's GATE_LANGUAGE."""
    if account is not None and account.language in LANGUAGES:
        return account.language
    return accepted_language(request.headers.get("accept-language")) or request.app[WEB].lang


def reader_context(request: web.Request, account: Account | None = None) -> WebContext:
    """The web context in ``page_language(request, account)``."""
    return request.app[WEB].in_language(page_language(request, account))


# ---------------------------------------------------------------- request parsing


class Invalid(Exception):
    """Field -> error code; rendered as messages in the page's or the API's language."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(", ".join(f"{k}: {v}" for k, v in fields.items()))
        self.fields = fields


DIGITS = re.compile(r"[0-9]+")  # ASCII only: int() would take other scripts' digits too


def parse_int(raw: str | None, name: str, *, low: int, high: int) -> int | None:
    if raw in (None, ""):
        return None
    assert raw is not None
    if not DIGITS.fullmatch(raw.strip()):
        raise Invalid({name: "not_integer"})
    value = int(raw)
    if not low <= value <= high:
        raise Invalid({name: "out_of_range"})
    return value


def parse_tokens(raw: Any, lang: str, name: str, *, from_form: bool, low: int = 1,
                 high: int | None = None) -> int:
    """A whole number of tokens in [low, high]. Forms may group thousands the locale's way
    ("100.000" in pt-BR, "100,000" in en); JSON must be an integer. Codes: required,
    not_integer, not_positive (below ``low`` >= 1), negative (below ``low`` = 0), too_large."""
    if from_form:
        text = str(raw or "").strip().replace(" ", "").replace("\u00a0", "")
        if not text:
            raise Invalid({name: "required"})
        negative = text.startswith("-")
        groups = (text[1:] if negative else text).split(group_separator(lang))
        grouped = len(groups) > 1 and 1 <= len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:])
        if not all(DIGITS.fullmatch(g) for g in groups) or (len(groups) > 1 and not grouped):
            raise Invalid({name: "not_integer"})
        value = int("".join(groups)) * (-1 if negative else 1)
    else:
        if raw is None:
            raise Invalid({name: "required"})
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise Invalid({name: "not_integer"})
        value = raw
    if value < low:
        raise Invalid({name: "not_positive" if low >= 1 else "negative"})
    if high is not None and value > high:
        raise Invalid({name: "too_large"})
    return value


# ---------------------------------------------------------------- a user's settings (/api/me and the admin API)


MAX_CAP = 10**15  # the ledger's bound; a cap must anyway fit under the cycle's budget
API_SETTINGS = frozenset({"personal_cap", "alerts", "language"})
ALERTS = {"80": "notify_80", "90": "notify_90"}  # the e-mails a user may turn off; 100 % always goes out


def checked_cap(cap: int | None, account: Account) -> int | None:
    """A cap above this cycle's budget would never bind: refused with the budget named, rather
    than saved and silently useless. (0 is allowed: a user may stop their own use.)"""
    if cap is not None and cap > account.cycle_budget:
        raise Invalid({"personal_cap": "above_budget"})
    return cap


def settings_from_json(data: Mapping[str, Any], account: Account, *,
                       own: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The settings body of PUT /api/me/settings and of the admin's PUT .../settings ->
    ``Ledger.set_settings`` keywords (only the keys given); Invalid naming each bad field: an
    unknown key, a wrong type, a value out of range. ``own``: keys the caller reads itself
    (the admin's "reason")."""
    errors: dict[str, str] = {str(key)[:64]: "unknown_field" for key in data if key not in API_SETTINGS | own}
    values: dict[str, Any] = {}
    if "personal_cap" in data:
        try:
            cap = data["personal_cap"]
            values["personal_cap"] = checked_cap(
                None if cap is None else parse_tokens(cap, "en", "personal_cap", from_form=False, low=0,
                                                      high=MAX_CAP), account)
        except Invalid as exc:
            errors.update(exc.fields)
    if "alerts" in data:
        alerts = data["alerts"]
        if not isinstance(alerts, dict):
            errors["alerts"] = "not_object"
        else:
            for key, value in alerts.items():
                if key not in ALERTS:
                    errors[f"alerts.{str(key)[:8]}"] = "unknown_field"
                elif not isinstance(value, bool):
                    errors[f"alerts.{key}"] = "not_boolean"
                else:
                    values[ALERTS[key]] = value
    if "language" in data:
        if data["language"] is not None and data["language"] not in LANGUAGES:
            errors["language"] = "invalid_choice"
        else:
            values["language"] = data["language"]
    if errors:
        raise Invalid(errors)
    return values


def settings_json(account: Account) -> dict[str, Any]:
    """The settings in PUT /api/me/settings' own shape."""
    return {"personal_cap": account.personal_cap,
            "alerts": {"80": account.notify_80, "90": account.notify_90}, "language": account.language}


def parse_day(raw: str | None, name: str) -> date | None:
    if not raw:
        return None
    try:
        return date.fromisoformat(raw.strip())
    except ValueError:
        raise Invalid({name: "invalid_date"}) from None


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; Invalid({"body": "invalid_json"}) otherwise."""
    try:
        data = await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError):
        raise Invalid({"body": "invalid_json"}) from None
    if not isinstance(data, dict):
        raise Invalid({"body": "invalid_json"})
    return data


def field_messages(ctx: WebContext, fields: Mapping[str, str]) -> dict[str, str]:
    return {name: ctx.t(f"err.{code}") for name, code in fields.items()}


def connecting_address(request: web.Request) -> str:
    """The address the connection to Envoy came from: the last X-Forwarded-For hop, which
    Envoy appends itself (``use_remote_address``), else the TCP peer (a direct connection).
    What a client writes in X-Forwarded-For comes before it, so a limit keyed on this address
    cannot be dodged by writing another one. The web port itself is never published: only
    Envoy reaches it (docker-compose.yml)."""
    forwarded = request.headers.get("x-forwarded-for", "")
    last = forwarded.rsplit(",", 1)[-1].strip() if forwarded else ""
    if last and len(last) <= 64 and all(c.isalnum() or c in ".:[]" for c in last):
        return last
    return request.remote or "unknown"


def client_ip(request: web.Request) -> str:
    """The audit log's source address: the TCP peer, plus X-Forwarded-For as it arrived (what
    the client wrote, then the address Envoy appended; ``connecting_address`` is the one hop a
    client cannot choose)."""
    peer = request.remote or "unknown"
    forwarded = request.headers.get("x-forwarded-for", "").strip()
    if forwarded:
        return f"{printable(forwarded, 200) or ''} via {peer}"
    return peer


# ---------------------------------------------------------------- JSON and CSV


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=json.dumps(data, default=_json_default, ensure_ascii=False), status=status,
                        content_type="application/json", headers=headers)


def json_error(status: int, code: str, message: str, *, fields: dict[str, Any] | None = None,
               headers: dict[str, str] | None = None) -> web.Response:
    """OpenAI-shaped, like every other error of the gate."""
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            503: "service_unavailable"}.get(status, "invalid_request_error")
    error: dict[str, Any] = {"message": message, "type": kind, "code": code}
    if fields:
        error["fields"] = fields
    return json_response({"error": error}, status=status, headers=headers)


def validation_error(ctx: WebContext, fields: Mapping[str, str],
                     messages: Mapping[str, str] | None = None) -> web.Response:
    """400 validation_failed with each field's code and message (``messages``: code -> text
    for codes the page catalogue does not have)."""
    messages = messages or {}
    return json_error(400, "validation_failed", ctx.t("err.validation_failed"),
                      fields={k: {"code": v, "message": messages.get(v) or ctx.t(f"err.{v}")}
                              for k, v in fields.items()})


def csv_cell(value: Any) -> Any:
    """Spreadsheet-safe: text starting with = + - @ (a formula to Excel or Sheets) is prefixed
    with a quote, so a hostile name cannot run in the admin's spreadsheet."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, list | tuple):
        value = " ".join(str(v) for v in value)
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


def download_name(prefix: str, user_id: str, ext: str) -> str:
    """A download's file name for one user: ids are arbitrary text, a file name in a header
    must not be (quotes, slashes, control characters), so anything else becomes "_"."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", user_id)[:64] or "user"
    return f"{prefix}-{safe}.{ext}"


async def stream_csv(request: web.Request, filename: str, header: Sequence[str],
                     rows: AsyncIterator[Sequence[Any]]) -> web.StreamResponse:
    """Write rows as they come (exports of 100 000 accounts never sit in memory whole)."""
    response = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": f'attachment; filename="{filename}"',
        "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
    })
    await response.prepare(request)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header)
    count = 0
    async for row in rows:
        writer.writerow([csv_cell(v) for v in row])
        count += 1
        if count % 500 == 0:
            await response.write(buffer.getvalue().encode())
            buffer.seek(0)
            buffer.truncate()
    await response.write(buffer.getvalue().encode())
    await response.write_eof()
    return response


# ---------------------------------------------------------------- the user's identity (/me, billing)


def current_session(request: web.Request) -> WebSession | None:
    """The /me session cookie's user, if signed in."""
    return read_session(request.app[WEB].signer, "me", request, ME_COOKIE)


def signin_page(request: web.Request, *, status: int = 200, errors: dict[str, str] | None = None,
                email: str = "") -> web.Response:
    """The /me sign-in form (asks for a link by e-mail), in the browser's language."""
    ctx = reader_context(request)
    return ctx.render_with_pre(request, "me/signin.html", {
        "title": ctx.t("me.signin_title"), "errors": errors or {}, "email": email}, status=status)


CallerHandler = Callable[[web.Request, str], Awaitable[web.StreamResponse]]


def with_caller(
    identify: Callable[[web.Request], Awaitable[str | web.Response]],
) -> Callable[[CallerHandler], Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """An API route whose handler gets who calls (``identify``'s answer: a user id for
    /api/me, an admin for /api/admin), or answers ``identify``'s refusal (401/403) itself."""

    def decorate(handler: CallerHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        @functools.wraps(handler)
        async def wrapped(request: web.Request) -> web.StreamResponse:
            caller = await identify(request)
            if isinstance(caller, web.Response):
                return caller
            return await handler(request, caller)

        return wrapped

    return decorate


async def admin_actor(request: web.Request) -> str | web.Response:
    """The admin behind ``Authorization: Bearer <admin token or admin JWT>`` (/api/admin),
    or the 401 / 403 to answer. Cookies are not accepted there, so the API needs no CSRF."""
    ctx = request.app[WEB]
    header = request.headers.get("authorization", "")
    credential = header[7:] if header[:7].lower() == "bearer " else ""
    try:
        admin = await admin_from_credential(ctx.settings, ctx.authenticator, credential)
    except AuthFailure as exc:
        return json_error(exc.status, exc.code, ctx.t(f"login.{exc.code}"),
                          headers={"WWW-Authenticate": 'Bearer realm="solaris-admin"'}
                          if exc.status == 401 else None)
    return admin.actor


async def api_identity(request: web.Request) -> str | web.Response:
    """The caller of /api/me*, identified as the gate identifies them (GATE_IDENTITY_MODE): a
    verified JWT, or LibreChat's X-User-Id proven by the gateway key (compared in constant
    time; the headers alone are never trusted). The user id, or the 401 to answer."""
    ctx = reader_context(request)
    headers = {"WWW-Authenticate": 'Bearer realm="solaris-me"'}
    given = (request.headers.get(name) for name in (ctx.authenticator.jwt_header, "authorization", "x-api-key"))
    if not any(given):
        return json_error(401, "missing_credentials", ctx.t("me.api_missing_credentials"), headers=headers)
    try:
        identity = await ctx.authenticator.authenticate(request.headers)
    except IdentityError:
        return json_error(401, "invalid_credentials", ctx.t("me.api_invalid_credentials"), headers=headers)
    return identity.user_id


# ---------------------------------------------------------------- the statement (admin and /me)


STATEMENT_HEADER = ["id", "created_at", "kind", "tokens", "allowance_delta", "credits_delta",
                    "balance_after", "model", "prompt_tokens", "completion_tokens", "request_id", "reason"]


def statement_row(e: Mapping[str, Any], *, include_actor: bool) -> list[Any]:
    row = [e["id"], e["created_at"], e["kind"], e["tokens"], e["allowance_delta"], e["credits_delta"],
           e["balance_after"], e["model"], e["prompt_tokens"], e["completion_tokens"], e["request_id"],
           e["reason"]]
    return [*row, e["actor"]] if include_actor else row


async def statement_csv_response(request: web.Request, user_id: str, *, include_actor: bool,
                                 ctx: WebContext | None = None) -> web.StreamResponse:
    """The whole statement of ``user_id`` as CSV (``include_actor``: the admin's view), its
    reasons in ``ctx``'s language (default: the console's)."""
    pool, ctx = request.app[SERVICES].pool, ctx or request.app[WEB]

    async def rows() -> AsyncIterator[list[Any]]:
        async for e in q.iter_entries(pool, user_id):
            yield statement_row(ctx.readable([e])[0], include_actor=include_actor)

    header = [*STATEMENT_HEADER, "actor"] if include_actor else STATEMENT_HEADER
    return await stream_csv(request, download_name("statement", user_id, "csv"), header, rows())


async def entries_json(request: web.Request, user_id: str, *, include_actor: bool,
                       ctx: WebContext | None = None) -> dict[str, Any]:
    """One statement page for the API (/api/me hides the admin's name: ``include_actor``), its
    reasons in ``ctx``'s language (default: the console's)."""
    query = request.query
    page = await q.entries_page(
        request.app[SERVICES].pool, user_id,
        limit=parse_int(query.get("limit"), "limit", low=1, high=q.MAX_PAGE) or 50,
        before_id=parse_int(query.get("before_id"), "before_id", low=1, high=MAX_ID),
        after_id=parse_int(query.get("after_id"), "after_id", low=1, high=MAX_ID))
    entries = [e if include_actor else {k: v for k, v in e.items() if k != "actor"}
               for e in (ctx or request.app[WEB]).readable(page.entries)]
    return {"entries": entries, "next_before_id": page.older, "prev_after_id": page.newer}
