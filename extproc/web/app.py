"""The web application (port 8081): assembly of the surfaces, their security headers and
failure pages, and the service's own endpoints: health, readiness and Prometheus metrics.

Layers: this module mounts ``admin``, ``me``, ``billing`` and ``security`` (each
``setup(app)``; ``security`` also brings the session check and the sign-in limits as
middleware); those import only ``kit`` and ``sessions`` (and ``queries``, ``purchases`` and the
core below them), never one another nor this module."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..ledger import UNAVAILABLE_ERRORS, LedgerUnavailable
from ..migrate import expected_versions
from . import admin, billing, me, security
from .kit import CSP, SERVICES, STATIC, WEB, Services, WebContext, json_error, reader_context

__all__ = ["build_app"]

log = logging.getLogger(__name__)

# Prefixes of the console's own pages and API: they get the security headers below.
UI_PREFIXES = ("/admin", "/me", "/api/admin", "/api/me")


# ---------------------------------------------------------------- health, readiness, metrics


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when PostgreSQL answers and its schema is at the latest migration; Redis is
    reported but not required (money never depends on it)."""
    service = request.app[SERVICES]
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
    service = request.app[SERVICES]
    await service.refresh_gauges()
    return web.Response(body=generate_latest(service.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


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
        if exc.status not in (404, 405) or exc.content_type == "text/html" or _wants_json(request):
            _secure(request, exc.headers)
            raise
        # aiohttp's answer to a path or method no route takes is plain text: the console's
        # error page instead (a title, the page's language, a way back), like every other page.
        response = _error_page(request, exc.status, "a11y.not_found")
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
    if _wants_json(request):
        return json_error(status, code, request.app[WEB].t(f"error.{code}"))
    return _error_page(request, status, f"error.{code}")


def _error_page(request: web.Request, status: int, key: str) -> web.Response:
    """The error page of the area the path is in, with that area's header and way back (no
    handler ran, so no signed-in header); /me's in the reader's language, like its pages."""
    area = "admin" if request.path.startswith("/admin") else "me"
    ctx = request.app[WEB] if area == "admin" else reader_context(request)
    return ctx.render("error.html", {"title": ctx.t("error.title"), "message": ctx.t(key), "nav": None,
                                     "area": area}, status=status)


# ---------------------------------------------------------------- the application


def build_app(service: Services) -> web.Application:
    # ui_middleware first: a database failure inside the session check still gets its page.
    app = web.Application(client_max_size=1024 * 1024, middlewares=[ui_middleware, *security.MIDDLEWARES])
    app[SERVICES] = service
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    # getattr: stand-ins of tests that build pages alone have no authenticator of their own.
    ctx = WebContext.build(service.settings, getattr(service, "authenticator", None))
    app[WEB] = ctx
    admin.setup(app)
    me.setup(app)
    billing.setup(app)  # mounts nothing when billing is off (no Stripe keys)
    security.setup(app)
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
