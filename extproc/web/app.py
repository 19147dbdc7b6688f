"""The processor's HTTP side (port 8081): health, readiness, metrics, and the shared machinery
of the admin console (``admin``) and the user's statement page (``me``): templates, language,
number formats, security headers, JSON errors and CSV streaming.

Pages are server-rendered Jinja2 with autoescape on (identity values are attacker-chosen
text), no front-end build and nothing loaded from another origin (the CSP says so)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
from aiohttp import web
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..identity import Authenticator
from ..ledger import UNAVAILABLE_ERRORS, LedgerUnavailable
from ..migrate import expected_versions
from ..settings import Settings
from .sessions import Signer

log = logging.getLogger(__name__)

SERVICE = web.AppKey("service", Any)
HERE = Path(__file__).resolve().parent.parent  # the extproc package: templates/, static/
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
# Prefixes of the console's own pages and API: they get the security headers below.
UI_PREFIXES = ("/admin", "/me", "/api/admin", "/api/me")
CSP = ("default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:;"
       " form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


# ---------------------------------------------------------------- health, readiness, metrics


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when PostgreSQL answers and its schema is at the latest migration; Redis is
    reported but not required (money never depends on it)."""
    service = request.app[SERVICE]
    body: dict[str, Any] = {}
    ready = True
    try:
        applied = {r["version"] for r in await service.pool.fetch(
            "SELECT version FROM schema_migrations")}
        missing = [v for v in expected_versions() if v not in applied]
        body["postgres"] = "ok" if not missing else f"migrations pending: {', '.join(missing)}"
        ready = not missing
    except asyncpg.UndefinedTableError:
        body["postgres"] = "not migrated: run `extproc migrate`"
        ready = False
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        body["postgres"] = f"unavailable: {type(exc).__name__}"
        ready = False
    body["redis"] = await service.redis_status()
    body["status"] = "ready" if ready else "not ready"
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    await service.refresh_gauges()
    return web.Response(body=generate_latest(service.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


# ---------------------------------------------------------------- language and formats


def load_messages() -> dict[str, dict[str, str]]:
    with (TEMPLATES / "i18n.json").open(encoding="utf-8") as fh:
        data: dict[str, dict[str, str]] = json.load(fh)
    return data


def _swap_separators(text: str, lang: str) -> str:
    return text.translate(str.maketrans({",": ".", ".": ","})) if lang == "pt-BR" else text


def fmt_int(value: int | Decimal | None, lang: str) -> str:
    """100000 -> "100.000" (pt-BR) / "100,000" (en)."""
    if value is None:
        return "—"
    return _swap_separators(f"{int(value):,}", lang)


def fmt_signed(value: int | None, lang: str) -> str:
    if value is None:
        return "—"
    return ("+" if value > 0 else "") + fmt_int(value, lang)


def fmt_pct(value: float | Decimal | None, lang: str) -> str:
    if value is None:
        return "—"
    return _swap_separators(f"{float(value):,.1f}", lang) + "%"


def fmt_dt(value: datetime | None, lang: str) -> str:
    if value is None:
        return "—"
    value = value.astimezone(UTC)
    return value.strftime("%d/%m/%Y %H:%M UTC" if lang == "pt-BR" else "%Y-%m-%d %H:%M UTC")


def fmt_date(value: datetime | date | None, lang: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, datetime):
        value = value.astimezone(UTC).date()
    return value.strftime("%d/%m/%Y" if lang == "pt-BR" else "%Y-%m-%d")


def fmt_value(value: Any, lang: str) -> str:
    """Any JSON value of an audit row's before/after, for display."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return fmt_int(value, lang)
    return str(value)


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
    messages: dict[str, str]
    lang: str
    secure_cookies: bool
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    # Whole past days of the dashboard chart never change (usage is written at "now"):
    # computed once per process, only today is queried on every view.
    daily_cache: dict[date, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: Settings, authenticator: Authenticator | None = None) -> WebContext:
        """``authenticator``: the service's own (one JWKS cache and its background refresh
        for the gate and the console alike); a fresh one for tests that build pages alone."""
        lang = settings.language if settings.language in ("pt-BR", "en") else "pt-BR"
        all_messages = load_messages()
        messages = {**all_messages["en"], **all_messages.get(lang, {})}
        jinja = Environment(
            loader=FileSystemLoader(TEMPLATES),
            autoescape=select_autoescape(enabled_extensions=("html", "svg", "xml"),
                                         disabled_extensions=("txt",), default_for_string=True,
                                         default=True),
            undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        )
        ctx = cls(settings=settings, signer=Signer(settings),
                  authenticator=authenticator or Authenticator(settings),
                  jinja=jinja, messages=messages, lang=lang,
                  secure_cookies=settings.public_url.lower().startswith("https://"))
        jinja.globals.update(t=ctx.t, t_or=ctx.t_or, lang=lang, html_lang=lang)
        jinja.filters.update(
            num=lambda v: fmt_int(v, lang), signed=lambda v: fmt_signed(v, lang),
            pct=lambda v: fmt_pct(v, lang), dt=lambda v: fmt_dt(v, lang),
            day=lambda v: fmt_date(v, lang), seg=path_segment, value=lambda v: fmt_value(v, lang),
        )
        return ctx

    def t(self, key: str, **kwargs: Any) -> str:
        text = self.messages.get(key, key)
        return text.format(**kwargs) if kwargs else text

    def t_or(self, key: str, default: str) -> str:
        return self.messages.get(key, default)

    def render(self, name: str, context: dict[str, Any], *, status: int = 200,
               headers: dict[str, str] | None = None) -> web.Response:
        body = self.jinja.get_template(name).render(**context)
        return web.Response(text=body, status=status, content_type="text/html", headers=headers)

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


WEB = web.AppKey("web", WebContext)


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


def client_ip(request: web.Request) -> str:
    """The audit log's source address: the TCP peer, plus what the proxy says it forwarded
    for (Envoy passes X-Forwarded-For through; only the peer is not client-controlled)."""
    peer = request.remote or "unknown"
    forwarded = request.headers.get("x-forwarded-for", "").strip()
    if forwarded:
        forwarded = "".join(c for c in forwarded if c.isprintable())[:200]
        return f"{forwarded} via {peer}"
    return peer


# ---------------------------------------------------------------- middleware


def _wants_json(request: web.Request) -> bool:
    return request.path.startswith("/api/")


@web.middleware
async def ui_middleware(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Security headers on the console's responses, and a page (not a stack trace) when the
    database is down or a handler fails."""
    if not request.path.startswith(UI_PREFIXES):
        return await handler(request)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        _secure(request, exc.headers)
        raise
    except (LedgerUnavailable, *UNAVAILABLE_ERRORS) as exc:
        log.warning("console: database unavailable: %s", type(exc).__name__)
        response = _failure(request, 503, "unavailable")
    except Exception:
        log.exception("console: unhandled error on %s %s", request.method, request.path)
        response = _failure(request, 500, "internal")
    if not response.prepared:
        _secure(request, response.headers)
    return response


def _secure(request: web.Request, headers: Any) -> None:
    headers.setdefault("Content-Security-Policy", CSP)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    # no-referrer: a magic link's token in the URL never leaks to another site.
    headers.setdefault("Referrer-Policy", "no-referrer")
    if not request.path.startswith(("/admin/static/", "/me/static/")):
        headers.setdefault("Cache-Control", "no-store")


def _failure(request: web.Request, status: int, code: str) -> web.StreamResponse:
    ctx = request.app[WEB]
    message = ctx.t(f"error.{code}")
    if _wants_json(request):
        return json_error(status, code, message)
    return ctx.render("error.html", {"title": ctx.t("error.title"), "message": message, "nav": None},
                      status=status)


# ---------------------------------------------------------------- the application


def build_app(service: Any) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024, middlewares=[ui_middleware])
    app[SERVICE] = service
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    ctx = WebContext.build(service.settings, getattr(service, "authenticator", None))
    app[WEB] = ctx
    # Imported here: those modules use this one's helpers.
    from .. import purchases as billing
    from . import admin, me

    admin.setup(app)
    me.setup(app)
    billing.setup(app)  # mounts nothing when billing is off (no Stripe keys)
    # Served under both prefixes because Envoy routes only /admin, /me and /api here.
    app.router.add_static("/admin/static/", STATIC, name="admin_static")
    app.router.add_static("/me/static/", STATIC, name="me_static")

    async def finish_background(_: web.Application) -> None:
        for task in list(ctx.tasks):
            task.cancel()
        for task in list(ctx.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    app.on_cleanup.append(finish_background)
    return app
