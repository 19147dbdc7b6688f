"""Assembles the service: pool, Redis, ledger, gate, gRPC server, HTTP app, background loops.

Everything is built from one Settings object and passed down explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import grpc
import redis.asyncio as aioredis
from aiohttp import web
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from . import web as webapp
from .alerts import AlertWorker
from .gate import handoff, usage
from .gate.access_log import StreamLog
from .gate.decisions import Gate
from .gate.envoy import NoopProcessor, Processor
from .identity import Authenticator
from .ledger import Clock, Ledger, create_pool, utcnow
from .metrics import Metrics
from .ratelimit import RedisRateLimiter
from .settings import Settings
from .spool import Spool

log = logging.getLogger(__name__)

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# Room for a buffered body at Envoy's buffer limit plus protobuf framing.
GRPC_MESSAGE_LIMIT = 64 * 1024 * 1024


class Service:
    def __init__(self, settings: Settings, *, clock: Clock = utcnow, noop: bool = False) -> None:
        self.settings = settings
        self.clock = clock
        self.noop = noop
        self.metrics = Metrics()
        self.pool: asyncpg.Pool | None = None
        self.admit_pool: asyncpg.Pool | None = None
        self.redis: aioredis.Redis | None = None
        self.ledger: Ledger | None = None
        self.gate: Gate | None = None
        self.processor: Processor | None = None
        self.stream_log: StreamLog | None = None
        self.authenticator: Authenticator | None = None
        self.spool = Spool(settings.spool_dir)
        self.grpc_server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.http_runner: web.AppRunner | None = None
        self.background: list[asyncio.Task[Any]] = []
        self.alerts: AlertWorker | None = None
        self.grpc_port = settings.grpc_port
        self.http_port = settings.http_port

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        s = self.settings
        if not self.noop:
            # Loading the tokenizer takes a moment: do it now, off the event loop, not on
            # the first stream that lacks usage.
            await asyncio.to_thread(usage.encoder, s.tiktoken_cache_dir)
            self.pool = await create_pool(s)
            self.admit_pool = await create_pool(s, asynchronous_commit=True)
            # No client-side retries: a dead Redis must fail fast so the limiter's circuit
            # breaker can take over (money never waits on Redis). The read timeout is only a
            # backstop above the limiter's own bound (at most 5 x 50 ms, see below): redis-py's
            # timer, like any, also fires for loop lag, which must not count as a Redis fault.
            self.redis = aioredis.Redis.from_url(
                s.redis_url, socket_timeout=0.3, socket_connect_timeout=0.05,
                retry=Retry(NoBackoff(), 0))
            self.ledger = Ledger(self.pool, s, self.clock, admit_pool=self.admit_pool)
            self.metrics.watch_batches(self.ledger.batch_counts)
            # 50 ms of Redis time: the limiter does not count the loop's lag (a deadline the
            # loop runs late is extended, up to 5 x), so a busy processor keeps the shared limit
            # instead of dropping to per-process ones (N processes = N x the limit). A dead Redis
            # still costs one request per second at most (circuit breaker). Leases keep users
            # far below their limit off Redis (GATE_RATE_LIMIT_LEASE).
            limiter = RedisRateLimiter(self.redis, self.metrics, prefix=s.redis_prefix, timeout=0.05,
                                       lease=s.rate_limit_lease)
            # One per service: its background JWKS refresh is started here, closed in stop().
            self.authenticator = Authenticator(s)
            await self.authenticator.start()
            self.gate = Gate(s, self.ledger, self.authenticator, limiter, self.metrics, self.spool)
            try:
                await self.maintain_once()  # replays a spool left by a crash, loads plans
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # Not fatal: /readyz reports why (e.g. migrations pending) and the loop retries.
                log.error("start-up maintenance failed: %s", exc)
            self.processor = Processor(self.gate)
            servicer: pb_grpc.ExternalProcessorServicer = self.processor
        else:
            servicer = NoopProcessor()
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", GRPC_MESSAGE_LIMIT),
            ("grpc.max_send_message_length", GRPC_MESSAGE_LIMIT),
            ("grpc.so_reuseport", 1),
        ])
        pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
        if self.gate is not None:
            # The settles of streams handed to Envoy arrive as its access-log entries.
            self.stream_log = StreamLog(self.gate)
            als_pb2_grpc.add_AccessLogServiceServicer_to_server(self.stream_log, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.grpc_port = server.add_insecure_port(f"0.0.0.0:{s.grpc_port}")
        await server.start()
        self.grpc_server = server
        for name in ("", EXT_PROC_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if not self.noop:
            self.http_runner = web.AppRunner(webapp.build_app(self), access_log=None)
            await self.http_runner.setup()
            site = web.TCPSite(self.http_runner, "0.0.0.0", s.http_port, reuse_port=True)
            await site.start()
            self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.background.append(asyncio.create_task(self._maintenance()))
            assert self.pool is not None
            self.alerts = AlertWorker(self.pool, s, self.metrics, clock=self.clock)
            self.background.append(asyncio.create_task(self.alerts.run_forever(interval=5.0)))
        log.info("serving", extra={"grpc_port": self.grpc_port, "http_port": self.http_port,
                                   "noop": self.noop, "event_loop": loop_name()})

    async def stop(self, grace: float = 10.0) -> None:
        """Graceful: stop taking streams, let in-flight ones finish (bounded), settle, exit."""
        await self.health.enter_graceful_shutdown()
        if self.grpc_server is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            # Still taking streams meanwhile: Envoy may open a new log stream for the entries.
            await self._await_handed_off(deadline)
            await self.grpc_server.stop(max(deadline - loop.time(), 0.1))
        if self.gate is not None and self.gate.tasks:
            await asyncio.wait(set(self.gate.tasks), timeout=grace)
        if self.alerts is not None:
            self.alerts.stop()  # in-flight sends finish; nothing new is claimed
        for task in self.background:
            task.cancel()
        for task in self.background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.alerts is not None:
            await self.alerts.aclose()
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        if self.authenticator is not None:
            await self.authenticator.close()
        if self.redis is not None:
            await self.redis.aclose()
        for pool in (self.admit_pool, self.pool):
            if pool is not None:
                await pool.close()
        # Last: settles still finishing above may spool. Off the loop, since close() waits
        # for the spool's lock (a worker thread may be mid-append). A later use reopens it.
        await asyncio.to_thread(self.spool.close)

    async def _await_handed_off(self, deadline: float) -> None:
        """Answers handed to Envoy (gate.handoff) settle when Envoy's access log brings their
        end: wait (until the loop's clock reads ``deadline``) for the ext_proc streams in
        progress to end and for the entries of this process's handoffs, then end Envoy's log
        streams (the gRPC server would wait for them: Envoy never ends them).

        A handed-off stream may run for minutes, so its entry is waited for until the deadline.
        A JSON answer was whole when it was handed off: its entry follows within a log flush,
        or went to another processor (with several, Envoy's log stream may reach any) and is
        not coming here; so each is waited for until ``JSON_ENTRY_WAIT`` after its handoff
        (otherwise every stop of one of several processors would wait its whole grace period)."""
        if self.gate is None or self.processor is None or self.stream_log is None:
            return
        loop = asyncio.get_running_loop()
        # Polled: counters that many places change, once at shutdown.
        while loop.time() < deadline:
            if not self.processor.active and not handoff.awaited(self.gate.handed, time.monotonic(),
                                                                 JSON_ENTRY_WAIT):
                break
            await asyncio.sleep(0.05)
        if self.gate.handed:
            log.warning("stopping with %d handed-off answer(s) not settled here: their entries went to "
                        "another processor, or the sweep charges their reservations", len(self.gate.handed))
        self.stream_log.close()

    # ------------------------------------------------------------ background work

    async def maintain_once(self) -> None:
        """One round of the periodic work: spool replay, expired reservations, idle cycles."""
        assert self.ledger is not None and self.gate is not None
        self.gate.limits.load({p.name: p.requests_per_minute for p in await self.ledger.plans()})
        # Every round, not only when this process spooled: the directory may hold rows from a
        # crashed run, a legacy file or another process. Quarantined rows were rejected by the
        # ledger for a reason other than an outage (they wait in the spool's quarantine table).
        replay = await self.spool.replay(self.ledger)
        self.metrics.spool_replayed.inc(replay.replayed)
        self.metrics.spool_quarantined.inc(replay.quarantined)
        self.metrics.spool_pending.set(replay.left)
        self.metrics.reservations_expired.inc(await self.ledger.sweep_reservations())
        await self.ledger.roll_idle_cycles()

    async def _maintenance(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval_seconds)
            try:
                await self.maintain_once()
            except Exception:  # keep the loop alive; the next round retries
                log.exception("maintenance round failed")

    # ------------------------------------------------------------ status for HTTP

    async def redis_status(self) -> str:
        if self.redis is None:
            return "not configured"
        try:
            await asyncio.wait_for(self.redis.ping(), 0.2)
            return "ok"
        except (OSError, TimeoutError, aioredis.RedisError) as exc:
            return f"unavailable: {type(exc).__name__}"

    async def refresh_gauges(self) -> None:
        if self.alerts is None:
            return
        self.metrics.spool_pending.set(self.spool.pending())  # includes lines left by a crash
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await self.alerts.refresh_depth()


# How long after handing off a JSON answer a stopping processor still waits for its access-log
# entry: ten of Envoy's 0.1 s log flushes (envoy.yaml).
JSON_ENTRY_WAIT = 1.0


def loop_name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """`uvloop` or `asyncio`: the implementation of the running (or given) loop."""
    loop = loop or asyncio.get_running_loop()
    return type(loop).__module__.partition(".")[0]


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the loop `serve` runs on (None: asyncio's default).

    uvloop runs the same coroutines on libuv with callbacks, handles and transports in C: the
    processor's profile is half event loop (a Python callback per gRPC message, timer and
    socket event), which is what it makes cheaper. grpc.aio (poller thread), asyncpg, redis-py
    and aiohttp all run on it. Missing uvloop (a platform without its wheel) is no reason not to
    serve: the standard loop does the same work, slower, and the log says so."""
    if choice != "uvloop":
        return None
    try:
        import uvloop
    except ImportError as exc:
        log.warning("GATE_EVENT_LOOP=uvloop but uvloop cannot be imported (%s): serving on asyncio's "
                    "event loop", exc)
        return None
    return uvloop.new_event_loop


def run(settings: Settings, *, noop: bool = False) -> None:
    """`extproc serve`: serve() on the configured event loop, until SIGTERM/SIGINT."""
    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
        runner.run(serve(settings, noop=noop))


async def serve(settings: Settings, *, noop: bool = False) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    import signal

    service = Service(settings, noop=noop)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await service.stop()
