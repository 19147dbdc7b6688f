"""The failure policy (docs/architecture.md) with real faults: PostgreSQL cut off by a TCP
proxy between the processor and the database, at admission and at settle."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from support.gate import CHAT, settled
from support.wait import eventually

from extproc.app import Service
from extproc.settings import Settings
from extproc_dev import devstack


class TcpProxy:
    """Forwards a local port to PostgreSQL; cut() drops every connection and refuses new
    ones (what a crashed or partitioned database looks like to the pool)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = devstack.free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()

    async def restore(self) -> None:
        await self.start()


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit((parts.scheme, f"{auth}127.0.0.1:{port}", parts.path, parts.query, ""))


@pytest.fixture
async def faulty(settings: Settings, upstream, tmp_path: Path) -> AsyncIterator[Any]:
    """Builds (proxy, service, envoy) stacks whose ledger goes through a cuttable proxy."""
    built: list[tuple[TcpProxy, Service, devstack.Envoy]] = []

    async def make(**overrides: Any) -> tuple[TcpProxy, Service, devstack.Envoy]:
        parts = urlsplit(settings.database_url)
        if parts.scheme not in ("postgresql", "postgres") or not parts.port:
            pytest.skip("needs a TCP PostgreSQL")
        proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port)
        await proxy.start()
        svc = Service(settings.replace(database_url=_via(settings.database_url, proxy.port),
                                       spool_dir=str(tmp_path / f"spool-{proxy.port}"), **overrides))
        await svc.start()
        proxy_envoy = devstack.Envoy(tmp_path, upstream=("127.0.0.1", upstream.port),
                                     extproc=[("127.0.0.1", svc.grpc_port)], http=("127.0.0.1", svc.http_port))
        await asyncio.to_thread(proxy_envoy.start)
        built.append((proxy, svc, proxy_envoy))
        return proxy, svc, proxy_envoy

    yield make
    for proxy, svc, proxy_envoy in built:
        proxy_envoy.stop()
        await proxy.restore() if proxy.server is None or not proxy.server.is_serving() else None
        await svc.stop(grace=1)


async def _post(http, envoy: devstack.Envoy, headers: dict[str, str], body: dict) -> tuple[int, dict]:
    async with http.post(envoy.url + CHAT, json=body, headers=headers) as resp:
        return resp.status, json.loads(await resp.read())


def _chat(**x_test: Any) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "oi"}], "max_tokens": 10,
            "x_test": x_test}


async def test_fail_closed_answers_503_then_recovers(faulty, http, auth, user, service):
    proxy, svc, proxy_envoy = await faulty()
    assert (await _post(http, proxy_envoy, auth(user), _chat()))[0] == 200
    await proxy.cut()
    status, body = await _post(http, proxy_envoy, auth(user), _chat())
    assert status == 503
    assert body["error"]["code"] == "ledger_unavailable"
    async with http.get(f"http://127.0.0.1:{svc.http_port}/readyz") as resp:
        assert resp.status == 503
    await proxy.restore()
    assert (await _post(http, proxy_envoy, auth(user), _chat()))[0] == 200
    assert await service.ledger.reconcile() == []


async def test_fail_open_admits_and_settles_later_from_the_spool(faulty, http, auth, user, service):
    proxy, svc, proxy_envoy = await faulty(fail_mode="open")
    assert (await _post(http, proxy_envoy, auth(user), _chat(prompt=2, completion=3)))[0] == 200
    await settled(svc)
    await proxy.cut()
    for _ in range(3):
        status, _ = await _post(http, proxy_envoy, auth(user), _chat(prompt=10, completion=20))
        assert status == 200
    await settled(svc)  # the settles (spooled: the database is away) run after each reply
    assert svc.spool.pending() == 3
    async with http.get(f"http://127.0.0.1:{svc.http_port}/metrics") as resp:
        assert "solaris_spool_pending 3.0" in await resp.text()
    await proxy.restore()
    await svc.maintain_once()
    assert svc.spool.pending() == 0
    rows = await service.pool.fetch(
        "SELECT real_tokens, flags FROM ledger_entries WHERE user_id = $1 AND kind = 'usage' ORDER BY id", user)
    assert [r["real_tokens"] for r in rows] == [5, 30, 30, 30]
    assert all("unreserved" in r["flags"] for r in rows[1:])
    account = await service.ledger.account(user)
    assert (account.balance, account.reserved) == (100_000 - 95, 0)
    assert await service.ledger.reconcile() == []


async def test_settle_during_outage_is_spooled_and_replayed_once(faulty, http, auth, user, service, upstream):
    """Admitted with a reservation, the database goes away while the upstream answers: the
    debit waits in the spool; after replay the ledger is what an uninterrupted run gives."""
    proxy, svc, proxy_envoy = await faulty()
    before = len(upstream.requests)
    request = asyncio.create_task(_post(http, proxy_envoy, auth(user), _chat(prompt=40, completion=2, delay=1.0)))
    # Cut once the upstream has the request (so it was admitted, its reservation held) and
    # while it takes 1 s to answer, not after a fixed sleep a loaded machine may outlast.
    await eventually(lambda: len(upstream.requests) > before, "the request reaching the upstream")
    await proxy.cut()
    status, _ = await request
    assert status == 200  # the user got the answer; the debit is owed, not lost
    await settled(svc)
    assert svc.spool.pending() == 1
    held = await service.ledger.account(user)
    assert held.reserved > 0
    await proxy.restore()
    await svc.maintain_once()
    await svc.maintain_once()  # a second replay finds nothing to do
    rows = await service.pool.fetch(
        "SELECT real_tokens, flags FROM ledger_entries WHERE user_id = $1 AND kind = 'usage'", user)
    # a bounded JSON answer: Envoy read its usage; its settle went through the same spool
    assert [(r["real_tokens"], list(r["flags"])) for r in rows] == [(42, ["envoy"])]
    account = await service.ledger.account(user)
    assert (account.balance, account.reserved) == (100_000 - 42, 0)
    assert await service.ledger.reconcile() == []


async def test_processor_down_fails_closed_with_openai_shaped_503(faulty, http, auth, user, upstream):
    """failure_mode_allow is false: without the processor nothing reaches the model."""
    _, svc, proxy_envoy = await faulty()
    assert svc.grpc_server is not None
    await svc.grpc_server.stop(0)
    before = len(upstream.requests)
    status, body = await _post(http, proxy_envoy, auth(user), _chat())
    assert status == 503
    assert body["error"]["code"] == "gateway_unavailable"
    assert body["error"]["message"].startswith("O controle de tokens está indisponível")  # pt-BR
    assert len(upstream.requests) == before
