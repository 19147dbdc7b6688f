"""Rate limits through a real Envoy: 429 and its headers, per-plan limits, two processor
processes sharing one Redis limit, and a Redis that stops mid-test."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from support.gate import CHAT
from support.stack import JWT_SECRET, start_serve

from extproc.identity import mint_token
from extproc_dev import devstack

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "oi"}], "max_tokens": 5}


async def test_per_plan_limit_gives_429_with_headers(http, envoy, service, auth, user, upstream):
    assert service.ledger is not None and service.gate is not None
    async with http.post(envoy.url + CHAT, json=BODY, headers=auth(user)) as resp:
        assert resp.status == 200
        assert int(resp.headers["x-ratelimit-limit-requests"]) == 100_000
        assert int(resp.headers["x-ratelimit-remaining-requests"]) < 100_000
    await service.ledger.upsert_plan("tiny", monthly_tokens=None, requests_per_minute=2,
                                     rollover=False, actor="test")
    await service.ledger.set_plan(user, "tiny", actor="test", reason="test")
    await service.maintain_once()
    statuses, limited = [], None
    before = len(upstream.requests)
    for _ in range(6):
        async with http.post(envoy.url + CHAT, json=BODY, headers=auth(user)) as resp:
            statuses.append(resp.status)
            if resp.status == 429 and limited is None:
                limited = (dict(resp.headers), await resp.json())
    assert 429 in statuses and statuses[0] == 200
    assert statuses.count(200) <= 3  # the request that learnt the plan + a burst of 2
    headers, body = limited
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["type"] == "rate_limit_error"
    assert "2 por minuto" in body["error"]["message"]
    assert int(headers["Retry-After"]) >= 1
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert len(upstream.requests) - before == statuses.count(200)


# ---------------------------------------------------------------- two processes, one Redis


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """A redis-server of our own, so the test can stop and restart it."""
    port = devstack.free_port()

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [devstack.binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        devstack.wait_until(lambda: devstack.port_open("127.0.0.1", port), 10, "redis", proc)
        return proc

    state = {"proc": start()}
    yield state, port, start  # type: ignore[misc]
    devstack.stop_process(state["proc"])


async def _scrape(http: aiohttp.ClientSession, port: int, name: str) -> float:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


async def test_two_processes_share_limit_and_survive_redis_stop(
        http, make_database, private_redis, upstream, tmp_path):
    state, redis_port, start_redis = private_redis
    database = make_database()
    started = await asyncio.gather(*[asyncio.to_thread(
        start_serve, database, f"redis://127.0.0.1:{redis_port}/0", tmp_path, GATE_RATE_LIMIT_PER_MINUTE="5")
        for _ in range(2)])
    procs = [proc for proc, _, _ in started]
    ports = [(g, h) for _, g, h in started]
    proxy = None
    try:
        proxy = devstack.Envoy(tmp_path, upstream=("127.0.0.1", upstream.port),
                               extproc=[("127.0.0.1", g) for g, _ in ports],
                               http=("127.0.0.1", ports[0][1]), health_check=False)
        await asyncio.to_thread(proxy.start)
        from extproc.settings import Settings

        user = f"shared-{uuid.uuid4().hex[:8]}"
        token = mint_token(Settings(jwt_secret=JWT_SECRET), user)
        headers = {"authorization": f"Bearer {token}"}

        async def one() -> int:
            async with http.post(proxy.url + CHAT, json=BODY, headers=headers) as resp:
                await resp.read()
                return resp.status

        async def fallbacks_now() -> float:
            return sum([await _scrape(http, hp, "solaris_ratelimit_fallback_total") for _, hp in ports])

        async def shared_burst(n: int, name: str, before: Callable[[], Awaitable[bool]] | None = None) -> list[int]:
            """n requests of one user, the limit shared through Redis. A Redis call slower
            than the limiter's 50 ms (a loaded machine, a Redis just restarted) makes that
            process count alone for a second, by design: such a burst proves nothing about
            sharing, so it is run again (a new user, ``before`` again) until none fell back."""
            nonlocal headers
            for _ in range(5):
                fresh = f"{name}-{uuid.uuid4().hex[:8]}"
                headers = {"authorization": f"Bearer {mint_token(Settings(jwt_secret=JWT_SECRET), fresh)}"}
                seen = await fallbacks_now()
                ready = before is None or await before()
                statuses = [await one() for _ in range(n)]
                if ready and await fallbacks_now() == seen:
                    return statuses
                await asyncio.sleep(1.1)  # the breaker's interval
            raise AssertionError("every burst met a Redis slower than the limiter's bound")

        statuses = await shared_burst(10, "shared")
        assert statuses.count(200) == 5 and statuses.count(429) == 5, statuses
        # both processes took part (round robin over the two endpoints)
        served = [await _scrape(http, hp, "solaris_decisions_total") for _, hp in ports]
        assert all(n > 0 for n in served), served

        # Redis goes away: requests are still served, by the in-process limiter, quickly.
        devstack.stop_process(state["proc"])
        other = f"after-redis-{uuid.uuid4().hex[:8]}"
        headers = {"authorization": f"Bearer {mint_token(Settings(jwt_secret=JWT_SECRET), other)}"}
        loop = asyncio.get_running_loop()
        started = loop.time()
        after = [await one() for _ in range(4)]
        assert after == [200] * 4
        assert loop.time() - started < 5
        assert await fallbacks_now() >= 4
        async with http.get(f"http://127.0.0.1:{ports[0][1]}/readyz") as resp:
            ready = await resp.json()
        assert resp.status == 200 and ready["redis"].startswith("unavailable")

        # Redis comes back: the shared limit applies again.
        state["proc"] = start_redis()
        await asyncio.sleep(1.5)  # the limiter's circuit breaker retries after 1 s
        statuses = await shared_burst(8, "back")
        assert statuses.count(200) == 5 and statuses.count(429) == 3, statuses

        # Redis flushed: the limit's state is gone (the user gets a fresh burst, as documented);
        # money never lived there, so the ledger is untouched.
        import redis.asyncio as aioredis

        async def spent_then_flushed() -> bool:
            spent = [await one() for _ in range(6)].count(429) >= 1  # this user's limit is spent
            client = aioredis.Redis(port=redis_port)
            await client.flushall()
            await client.aclose()
            return spent

        statuses = await shared_burst(8, "flushed", spent_then_flushed)
        assert statuses.count(200) == 5 and statuses.count(429) == 3, statuses
        import asyncpg

        await asyncio.sleep(0.5)  # settles run right after each reply, in the serving processes
        conn = await asyncpg.connect(database)
        try:
            answered = await conn.fetchval("SELECT count(*) FROM ledger_entries WHERE kind = 'usage'")
            drift = await conn.fetchval(
                "SELECT count(*) FROM accounts a WHERE a.allowance + a.credits <>"
                " (SELECT COALESCE(SUM(tokens), 0) FROM ledger_entries e WHERE e.user_id = a.user_id)")
        finally:
            await conn.close()
        assert drift == 0 and answered >= 5 + 4 + 5
    finally:
        if proxy is not None:
            proxy.stop()
        for proc in procs:
            devstack.stop_process(proc)
    for proc in procs:
        assert proc.returncode == 0, "extproc serve must exit cleanly on SIGTERM"
