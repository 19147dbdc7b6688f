"""The processor as a real process: graceful SIGTERM finishes in-flight streams and settles
them; SIGKILL mid-stream leaks no reservation (the sweeper charges it once)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
from support.gate import CHAT
from support.stack import JWT_SECRET, start_serve
from support.wait import eventually

from extproc.identity import mint_token
from extproc.ledger import Ledger
from extproc.settings import Settings
from extproc_dev import devstack


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
        # bounded (max_tokens): read by Envoy, whose entry came while the processor waited for it
        assert [(r["real_tokens"], list(r["flags"])) for r in await _usage_rows(pool, user)] == [(13, ["envoy"])]
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


@pytest.mark.parametrize("bounded", [False, True])
async def test_sigkill_before_a_json_answer_delivers_nothing(
        http, make_database, redis_url, upstream, tmp_path, bounded):
    """The processor dies after the admission, while the upstream thinks: Envoy never delivers
    the answer (failure_mode_allow is off; a bounded one would have been handed off only at the
    response headers), so the user gets Envoy's error, and the hold left behind is the sweep's,
    as for a stream cut by the same death (docs/scaling.md relies on this)."""
    database = make_database()
    proc, proxy = await _start(database, redis_url, tmp_path, upstream.port)
    user = f"killed-json-{uuid.uuid4().hex[:6]}"
    headers = {"authorization": f"Bearer {mint_token(Settings(jwt_secret=JWT_SECRET), user)}"}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "conte"}],
            "x_test": {"delay": 1.0, "completion": 9}, **({"max_tokens": 50} if bounded else {})}
    before = len(upstream.requests)
    try:
        answer = asyncio.create_task(http.post(proxy.url + CHAT, json=body, headers=headers))
        await eventually(lambda: len(upstream.requests) > before, "the request reaching the upstream")
        proc.kill()
        async with await answer as resp:
            status, raw = resp.status, await resp.read()
        await asyncio.to_thread(proc.wait, 10)
    finally:
        proxy.stop()
        devstack.stop_process(proc)
    assert status >= 500 and b"hello there" not in raw and b"gateway_unavailable" in raw, (status, raw)
    import asyncpg

    pool = await asyncpg.create_pool(database, min_size=1, max_size=1)
    try:
        assert await _usage_rows(pool, user) == []
        assert await pool.fetchval("SELECT reserved FROM accounts WHERE user_id = $1", user) > 0  # the sweep's
    finally:
        await pool.close()


async def test_restart_under_load_admits_nothing_unreserved_and_debits_once(
        http, make_database, redis_url, upstream, tmp_path):
    """Two processors behind one Envoy; one is restarted (SIGTERM, then started again on the
    same ports) while 300 requests from 30 users flow. Refused requests are refused before any
    reservation; every answered one is debited exactly once, against its reservation."""
    database = make_database()
    started = await asyncio.gather(*[asyncio.to_thread(start_serve, database, redis_url, tmp_path)
                                     for _ in range(2)])
    procs = [p for p, _, _ in started]
    ports = [(g, h) for _, g, h in started]
    proxy = devstack.Envoy(tmp_path, upstream=("127.0.0.1", upstream.port),
                           extproc=[("127.0.0.1", g) for g, _ in ports], http=("127.0.0.1", ports[0][1]),
                           health_check=False)
    await asyncio.to_thread(proxy.start)
    users = [f"restart-{uuid.uuid4().hex[:6]}-{i}" for i in range(30)]
    tokens = [mint_token(Settings(jwt_secret=JWT_SECRET), u) for u in users]
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "oi"}], "max_tokens": 20,
            "x_test": {"prompt": 3, "completion": 4, "delay": 0.02}}
    statuses: list[int] = []
    gate = asyncio.Semaphore(20)

    async def one(i: int) -> None:
        async with gate:
            try:
                async with http.post(proxy.url + CHAT, json=body,
                                     headers={"authorization": f"Bearer {tokens[i % 30]}"}) as resp:
                    await resp.read()
                    statuses.append(resp.status)
            except aiohttp.ClientError:
                statuses.append(0)

    async def restart() -> None:
        await asyncio.sleep(0.3)
        procs[0].send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(procs[0].wait, 20) == 0
        procs[0], _, _ = await asyncio.to_thread(start_serve, database, redis_url, tmp_path, ports[0])

    try:
        await asyncio.gather(restart(), *[one(i) for i in range(300)])
    finally:
        proxy.stop()
        for proc in procs:
            devstack.stop_process(proc)  # graceful: in-flight settles finish
    assert len(statuses) == 300 and set(statuses) <= {200, 503, 0}, set(statuses)
    import asyncpg

    pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
    try:
        rows = await pool.fetch("SELECT exchange_id, flags FROM ledger_entries WHERE kind = 'usage'")
        # half the traffic meets the restarting process (no retries configured): refused, unpaid
        assert len(rows) == statuses.count(200) >= 100
        assert len({r["exchange_id"] for r in rows}) == len(rows)
        assert not [r for r in rows if "unreserved" in r["flags"]]
        assert await pool.fetchval("SELECT count(*) FROM reservations WHERE state = 'held'") == 0
        assert await Ledger(pool, Settings(database_url=database)).reconcile() == []
    finally:
        await pool.close()


@pytest.mark.parametrize("case", ["old json", "fresh json", "stream", "json handed while stopping", "nothing"])
async def test_a_stop_waits_for_handed_off_streams_not_for_json_entries_gone_elsewhere(case):
    """With several processors a JSON answer's entry may reach another one and never clear here:
    a stop gives each JSON answer a few log flushes after its handoff (also one handed off while
    the stop waits, as Envoy keeps sending requests until its health checks mark the processor
    down), not its whole grace period; a handed-off stream may still be running, and is waited
    for until the deadline."""
    from types import SimpleNamespace

    from extproc.app import JSON_ENTRY_WAIT, Service

    now = time.monotonic()
    handed = {"old json": {"j0": (False, now - 5)}, "fresh json": {"j0": (False, now - 5), "j1": (False, now)},
              "stream": {"s1": (True, now - 5)}, "json handed while stopping": {"j0": (False, now - 0.2)},
              "nothing": {}}[case]
    closed: list[bool] = []
    fake = SimpleNamespace(gate=SimpleNamespace(handed=dict(handed)), processor=SimpleNamespace(active=0),
                           stream_log=SimpleNamespace(close=lambda: closed.append(True)))

    async def a_request_meanwhile() -> None:
        """Envoy sends one more request (its health checks have not yet marked the processor
        down) while the stop waits for j0's entry; its answer is handed off at 0.9 s."""
        await asyncio.sleep(0.5)
        fake.processor.active = 1
        await asyncio.sleep(0.4)
        fake.gate.handed["j2"] = (False, time.monotonic())
        fake.processor.active = 0

    grace = JSON_ENTRY_WAIT + 1.5
    meanwhile = asyncio.create_task(a_request_meanwhile()) if case == "json handed while stopping" else None
    loop = asyncio.get_running_loop()
    started = loop.time()
    await Service._await_handed_off(fake, started + grace)  # type: ignore[arg-type]
    took = loop.time() - started
    expected = {"old json": 0.0, "fresh json": JSON_ENTRY_WAIT, "stream": grace,
                "json handed while stopping": 0.9 + JSON_ENTRY_WAIT, "nothing": 0.0}[case]
    assert expected - 0.05 <= took < expected + 0.4 and closed == [True]
    if meanwhile is not None:
        await meanwhile
