"""The processor's HTTP side (port 8081): health, readiness and metrics.

The admin console, /me and billing mount their routes on the same application."""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .migrate import expected_versions

SERVICE = web.AppKey("service", Any)


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


def build_app(service: Any) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024)
    app[SERVICE] = service
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
