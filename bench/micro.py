#!/usr/bin/env python3
"""What one gated request costs, piece by piece, inside one Python process (no Envoy, no gRPC).

    .venv/bin/python bench/micro.py [--iterations 2000] [--users 100] [--seconds 5]

Runs the real Service (its pool, Redis client, Ledger, Authenticator, rate limiter, Gate) on
a fresh database and times, one at a time, each step a gated request takes: JWT verification,
the Redis rate-limit call, Postgres round trips (bare, through the pool, BEGIN/COMMIT), the
ledger's admit and settle, the "settled" log line, protobuf, and then whole exchanges through
Processor.Process fed with the four messages Envoy would send (sequentially, and 16 at a time).
Wall time is per operation; CPU is this process's CPU per operation (Postgres' and Redis' own
CPU is not included). Pair it with bench/run.py, which measures the real stack end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from run import proc_cpu_seconds  # bench/run.py, beside this script

from extproc.app import Service
from extproc.gate.envoy import NoopProcessor, Processor
from extproc.identity import mint_token
from extproc.ledger import Ledger, Usage
from extproc.logs import JsonFormatter
from extproc.migrate import dbmate
from extproc.settings import Settings
from extproc_dev import devstack

BODY = json.dumps({"model": "gpt-4o-mini", "messages": [
    {"role": "user", "content": "Say hello to the Solaris benchmark in one short sentence, please."}]}).encode()
ANSWER = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello there"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}).encode()


def with_database(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def headers(pairs: dict[str, str], end: bool = False) -> pb.HttpHeaders:
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]), end_of_stream=end)


def exchange_messages(token: str) -> list[pb.ProcessingRequest]:
    """The four messages Envoy sends for one buffered chat completion."""
    return [
        pb.ProcessingRequest(request_headers=headers({
            ":method": "POST", ":path": "/v1/chat/completions", ":authority": "gate", ":scheme": "http",
            "content-type": "application/json", "authorization": f"Bearer {token}",
            "x-request-id": secrets.token_hex(16), "content-length": str(len(BODY))})),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=BODY, end_of_stream=True)),
        pb.ProcessingRequest(response_headers=headers({
            ":status": "200", "content-type": "application/json; charset=utf-8",
            "content-length": str(len(ANSWER))})),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=ANSWER, end_of_stream=True)),
    ]


async def feed(messages: list[pb.ProcessingRequest]) -> AsyncIterator[pb.ProcessingRequest]:
    for m in messages:
        yield m


class Timer:
    """Times an operation n times in a row; also counts the Postgres round trips it made
    (asyncpg's per-connection query counter, summed over the watched pools)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float, float, int, float]] = []
        self.pools: list[asyncpg.Pool] = []

    def round_trips(self) -> int:
        return sum(h._con._protocol.queries_count for pool in self.pools  # asyncpg internals
                   for h in pool._holders if h._con is not None)

    async def measure(self, name: str, op: Callable[[int], Awaitable[Any]], n: int) -> None:
        for i in range(min(50, n)):  # warm caches, prepared statements
            await op(i)
        walls = []
        rt0 = self.round_trips()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        for i in range(n):
            s = time.perf_counter()
            await op(i)
            walls.append(time.perf_counter() - s)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        rts = (self.round_trips() - rt0) / n
        self.rows.append((name, statistics.median(walls) * 1e6, elapsed / n * 1e6, cpu / n * 1e6, n, rts))
        print(f"  {name:58} p50 {self.rows[-1][1]:8.1f} us  mean {self.rows[-1][2]:8.1f} us"
              f"  CPU {self.rows[-1][3]:8.1f} us  PG round trips {rts:4.1f}", flush=True)


async def main_async(args: argparse.Namespace, database_url: str, redis_url: str, workdir: Path) -> dict[str, Any]:
    settings = Settings(
        database_url=database_url, redis_url=redis_url, redis_prefix=f"solaris-micro-{secrets.token_hex(4)}:",
        grpc_port=0, http_port=0, jwt_secret=secrets.token_hex(32), rate_limit_per_minute=10_000_000,
        default_monthly_tokens=10**15, spool_dir=str(workdir / "spool"), sweep_interval_seconds=3600)
    service = Service(settings)
    await service.start()
    try:
        return await measure_all(args, service, settings)
    finally:
        await service.stop(grace=5)


async def measure_all(args: argparse.Namespace, service: Service, settings: Settings) -> dict[str, Any]:
    gate, pool, ledger = service.gate, service.pool, service.ledger
    assert gate is not None and pool is not None and ledger is not None and service.redis is not None
    users = [f"micro-{i:05d}" for i in range(args.users)]
    tokens = [mint_token(settings, u, ttl=3600) for u in users]
    n = args.iterations
    t = Timer()
    t.pools = [p for p in {id(x): x for x in (pool, getattr(ledger, "admit_pool", pool))}.values()]
    processor = Processor(gate)

    async def exchange(i: int) -> None:
        async for _ in processor.Process(feed(exchange_messages(tokens[i % len(tokens)])), None):
            pass

    for i in range(len(users)):  # onboard every user (the slow admission path) first
        await exchange(i)
    await asyncio.sleep(0.1)

    print("one operation at a time:")
    auth_headers = [{"authorization": f"Bearer {tok}"} for tok in tokens]
    await t.measure("JWT verification (Authenticator.authenticate)",
                    lambda i: gate.auth.authenticate(auth_headers[i % len(users)]), n)
    await t.measure("Redis rate limit (RedisRateLimiter.hit, 1 round trip)",
                    lambda i: gate.limiter.hit(users[i % len(users)], 10_000_000), n)
    await t.measure("Redis PING (bare round trip)", lambda i: service.redis.ping(), n)
    async with pool.acquire() as conn:
        await t.measure("Postgres SELECT 1 on a held connection (1 round trip)", lambda i: conn.fetchval("SELECT 1"), n)

        async def empty_tx(i: int) -> None:
            async with conn.transaction():
                pass

        await t.measure("Postgres empty transaction BEGIN+COMMIT (2 round trips)", empty_tx, n)
    await t.measure("Postgres pool.fetchval SELECT 1 (acquire, query, reset query)",
                    lambda i: pool.fetchval("SELECT 1"), n)

    async def acquire_only(i: int) -> None:
        async with pool.acquire():
            pass

    await t.measure("Postgres pool acquire+release only (the reset query)", acquire_only, n)

    async def no_reset(conn: asyncpg.Connection) -> None:
        return None

    # The same pool settings, but create_pool(reset=...) skips asyncpg's reset query (the gate
    # uses no LISTEN, advisory locks, cursors or SET; an open transaction is still rolled back).
    lean_pool = await asyncpg.create_pool(settings.database_url, min_size=2, max_size=20, command_timeout=10,
                                          reset=no_reset)
    lean_pools = [lean_pool]
    t.pools.append(lean_pool)
    if getattr(ledger, "admit_pool", ledger.pool) is not ledger.pool:
        # The ledger admits on its own pool (synchronous_commit = off): mirror that.
        lean_admit = await asyncpg.create_pool(settings.database_url, min_size=2, max_size=20, command_timeout=10,
                                               reset=no_reset, server_settings={"synchronous_commit": "off"})
        lean_pools.append(lean_admit)
        t.pools.append(lean_admit)
        lean_ledger = Ledger(lean_pool, settings, admit_pool=lean_admit)  # type: ignore[call-arg]
    else:
        lean_ledger = Ledger(lean_pool, settings)

    async def lean_acquire_only(i: int) -> None:
        async with lean_pool.acquire():
            pass

    await t.measure("  same, create_pool(reset=no-op)", lean_acquire_only, n)

    ids: list[str] = []

    async def admit(i: int) -> None:
        xid = secrets.token_hex(16)
        ids.append(xid)
        await ledger.admit(users[i % len(users)], 1049, xid, request_id="r", model="gpt-4o-mini")

    await t.measure("Ledger.admit (fast path)", admit, n)
    pending = list(ids)

    async def settle(i: int) -> None:
        xid = pending[i]
        await ledger.settle(Usage(exchange_id=xid, user_id=users[i % len(users)], model="gpt-4o-mini",
                                  request_id="r", prompt_tokens=7, completion_tokens=5, estimate=1049,
                                  prompt_chars=66))

    # settle() of the warm-up admits is measured too: settle each admitted exchange once.
    await t.measure("Ledger.settle", settle, len(pending) - 50)
    ids.clear()

    async def lean_admit(i: int) -> None:
        xid = secrets.token_hex(16)
        ids.append(xid)
        await lean_ledger.admit(users[i % len(users)], 1049, xid, request_id="r", model="gpt-4o-mini")

    await t.measure("  Ledger.admit, pool without reset query", lean_admit, n)
    pending = list(ids)

    async def lean_settle(i: int) -> None:
        xid = pending[i]
        await lean_ledger.settle(Usage(exchange_id=xid, user_id=users[i % len(users)], model="gpt-4o-mini",
                                       request_id="r", prompt_tokens=7, completion_tokens=5, estimate=1049,
                                       prompt_chars=66))

    await t.measure("  Ledger.settle, pool without reset query", lean_settle, len(pending) - 50)
    ledger_sql = await postgres_cpu_per_request(ledger, pool, users, n)

    stream = io.StringIO()
    logger = logging.getLogger("micro.settled")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)

    async def log_line(i: int) -> None:
        logger.info("settled", extra={"exchange_id": "x" * 32, "request_id": "r" * 32, "user_id": users[0],
                                      "tokens": 12, "estimate": 1049})
        if i % 1000 == 0:
            stream.seek(0)
            stream.truncate()

    await t.measure("one JSON log line (the 'settled' line)", log_line, n)
    wire = [m.SerializeToString() for m in exchange_messages(tokens[0])]

    async def protobuf(i: int) -> None:
        for raw in wire:
            pb.ProcessingRequest.FromString(raw)
        for _ in range(4):
            pb.ProcessingResponse(request_body=pb.BodyResponse()).SerializeToString()

    await t.measure("protobuf: parse 4 requests + serialize 4 replies", protobuf, n)

    async def body_json(i: int) -> None:
        json.loads(BODY)
        json.loads(ANSWER)

    await t.measure("JSON: parse request body + response body", body_json, n)
    noop = NoopProcessor()

    async def noop_exchange(i: int) -> None:
        async for _ in noop.Process(feed(exchange_messages(tokens[i % len(tokens)])), None):
            pass

    await t.measure("NoopProcessor.Process, 4 messages (no gRPC)", noop_exchange, n)
    await t.measure("Processor.Process, whole exchange (no gRPC)", exchange, n)
    gate.ledger = lean_ledger
    await t.measure("  same, pool without reset query", exchange, n)
    gate.ledger = ledger
    await asyncio.sleep(0.2)

    async def concurrent(label: str) -> dict[str, float]:
        done = 0
        stop_at = time.perf_counter() + args.seconds

        async def worker(w: int) -> None:
            nonlocal done
            i = w
            while time.perf_counter() < stop_at:
                await exchange(i)
                done += 1
                i += args.concurrency

        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
        if gate.tasks:  # settles still running
            await asyncio.wait(set(gate.tasks))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        print(f"  {label:40} {done / elapsed:8.1f} exchanges/s, CPU {cpu / done * 1e6:8.1f} us per exchange "
              f"({cpu / elapsed * 100:.0f} % of a core)", flush=True)
        return {"exchanges_per_s": done / elapsed, "cpu_us_per_exchange": cpu / done * 1e6}

    print(f"whole exchanges, {args.concurrency} at a time, {args.seconds:.0f} s each (no gRPC):")
    default = await concurrent("as configured")
    gate.ledger = lean_ledger
    lean = await concurrent("pool without reset query")
    gate.ledger = ledger
    for lp in lean_pools:
        await lp.close()
    return {"ops": [{"name": r[0], "p50_us": r[1], "mean_us": r[2], "cpu_us": r[3], "n": r[4], "pg_round_trips": r[5]}
                    for r in t.rows],
            "concurrent": {"concurrency": args.concurrency, "default": default, "no_reset_pool": lean},
            "postgres_cpu_us_per_request": ledger_sql}


def is_local_process(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


async def postgres_cpu_per_request(ledger: Ledger, pool: asyncpg.Pool, users: list[str], n: int,
                                   batch: int = 10) -> dict[str, float] | None:
    """PostgreSQL's own CPU (its backends' utime + stime, from /proc: a local server only) and
    the WAL it wrote per request admitted alone and settled in a group commit of ``batch``, the
    ledger's statements as shipped: what bench/run.py's "postgres" column measures, without Envoy, the processor's
    event loop or other stacks around it. Run it with PYTHONPATH at another checkout to compare
    two versions of the ledger on one machine, alternating. The WAL position is the server's:
    on a server others use at the same time, their writes count too. The checkpointer, WAL
    writer and autovacuum are not counted, as in bench/run.py."""

    async def backends() -> dict[int, float]:
        pids = await pool.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
        return {r["pid"]: proc_cpu_seconds(r["pid"]) for r in pids}

    before = await backends()
    wal_before = await pool.fetchval("SELECT pg_current_wal_insert_lsn()")
    if not all(map(is_local_process, before)):
        print("PostgreSQL CPU per request: the server is not local, not measured")
        return None
    m = max(n // batch, 1) * batch
    for start in range(0, m, batch):
        held = []
        for i in range(start, start + batch):
            xid = secrets.token_hex(16)
            await ledger.admit(users[i % len(users)], 1049, xid, request_id="r", model="gpt-4o-mini")
            held.append(Usage(exchange_id=xid, user_id=users[i % len(users)], model="gpt-4o-mini", request_id="r",
                              prompt_tokens=7, completion_tokens=5, estimate=1049, prompt_chars=66))
        await asyncio.gather(*(ledger.settle(u) for u in held))
    after = await backends()
    wal = await pool.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1)", wal_before)
    us = sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items()) / m * 1e6
    print(f"PostgreSQL's own CPU per request (admitted alone, settled {batch} at a time): {us:.1f} us,"
          f" WAL {float(wal) / m:.0f} bytes", flush=True)
    return {"cpu_us": us, "wal_bytes": float(wal) / m}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="solaris-micro-"))
    server = os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"
    cleanup: list[Callable[[], Any]] = []
    try:
        if not devstack.postgres_reachable(server):
            pg, server = devstack.embedded_postgres(workdir / "pg")
            cleanup.append(pg.cleanup)
        redis_url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
        if not devstack.redis_reachable(redis_url):
            rd, redis_url = devstack.embedded_redis(workdir / "redis")
            cleanup.append(rd.shutdown)
        name = f"solaris_bench_micro_{secrets.token_hex(4)}"

        async def admin(sql: str) -> None:
            conn = await asyncpg.connect(with_database(server, "postgres"))
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
        cleanup.append(lambda: asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')))
        url = with_database(server, name)
        dbmate(url, "up")
        result = asyncio.run(main_async(args, url, redis_url, workdir))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    finally:
        for fn in reversed(cleanup):
            fn()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
