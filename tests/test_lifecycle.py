"""The processor as a real process: graceful SIGTERM finishes in-flight streams and settles
them; SIGKILL mid-stream leaks no reservation (the sweeper charges it once)."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import aiohttp
import pytest
from conftest import JWT_SECRET, start_serve

from extproc import devstack
from extproc.identity import mint_token
from extproc.ledger import Ledger
from extproc.settings import Settings

CHAT = "/v1/chat/completions"


async def _start(database: str, redis_url: str, tmp_path: Path, upstream_port: int, **env: str):
    proc, grpc_port, http_port = await asyncio.to_thread(start_serve, database, redis_url, tmp_path, **env)
    proxy = devstack.Envoy(tmp_path, upstream=("127.0.0.1", upstream_port), extproc=[("127.0.0.1", grpc_port)],
                           http=("127.0.0.1", http_port), health_check=False)
    await asyncio.to_thread(proxy.start)
    return proc, proxy


def _stream_body(**x_test) -> dict:
    return {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "conte"}],
            "max_tokens": 50, "x_test": x_test}


async def _usage_rows(pool, user: str) -> list:
    return await pool.fetch("SELECT real_tokens, flags FROM ledger_entries WHERE user_id = $1 AND kind = 'usage'",
                            user)


async def test_sigterm_finishes_in_flight_stream_and_settles(
        http, make_database, redis_url, upstream, tmp_path, service):
    database = make_database()
    proc, proxy = await _start(database, redis_url, tmp_path, upstream.port)
    user = f"graceful-{uuid.uuid4().hex[:6]}"
    headers = {"authorization": f"Bearer {mint_token(Settings(jwt_secret=JWT_SECRET), user)}"}
    try:
        async with http.post(proxy.url + CHAT, json=_stream_body(chunks=5, chunk_delay=0.3, prompt=4,
                                                                  completion=9), headers=headers) as resp:
            first = await resp.content.readuntil(b"\n\n")
            proc.send_signal(signal.SIGTERM)  # mid-stream
            rest = await resp.read()
        assert b"word0" in first and b"[DONE]" in rest and b'"usage"' in rest
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        proxy.stop()
        devstack.stop_process(proc)
    import asyncpg

    pool = await asyncpg.create_pool(database, min_size=1, max_size=1)
    try:
        assert [(r["real_tokens"], list(r["flags"])) for r in await _usage_rows(pool, user)] == [(13, [])]
        assert await pool.fetchval("SELECT reserved FROM accounts WHERE user_id = $1", user) == 0
    finally:
        await pool.close()


async def test_sigkill_mid_stream_leaks_no_reservation(http, make_database, redis_url, upstream, tmp_path):
    database = make_database()
    proc, proxy = await _start(database, redis_url, tmp_path, upstream.port, GATE_RESERVATION_TTL_SECONDS="1")
    user = f"killed-{uuid.uuid4().hex[:6]}"
    headers = {"authorization": f"Bearer {mint_token(Settings(jwt_secret=JWT_SECRET), user)}"}
    try:
        with pytest.raises(aiohttp.ClientError):
            async with http.post(proxy.url + CHAT, json=_stream_body(chunks=20, chunk_delay=0.2),
                                 headers=headers) as resp:
                await resp.content.readuntil(b"\n\n")
                proc.kill()
                await resp.read()
        await asyncio.to_thread(proc.wait, 10)
    finally:
        proxy.stop()
        devstack.stop_process(proc)
    import asyncpg

    pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
    try:
        reserved = await pool.fetchval("SELECT reserved FROM accounts WHERE user_id = $1", user)
        assert reserved > 0  # held by the dead process
        await asyncio.sleep(1.1)
        settings = Settings(database_url=database, reservation_ttl_seconds=1)
        swept = await asyncio.gather(Ledger(pool, settings).sweep_reservations(),
                                     Ledger(pool, settings).sweep_reservations())
        assert sum(swept) == 1  # two sweepers, one charge
        rows = await _usage_rows(pool, user)
        assert [(r["real_tokens"], list(r["flags"])) for r in rows] == [(reserved, ["expired"])]
        assert await pool.fetchval("SELECT reserved FROM accounts WHERE user_id = $1", user) == 0
        assert await Ledger(pool, settings).reconcile() == []
    finally:
        await pool.close()
