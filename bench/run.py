#!/usr/bin/env python3
"""The gate's benchmark: the same load against three stacks, on this machine, in one go.

  (a) direct  Envoy straight to the fast upstream (tests/support/upstream.py), no ext_proc filter
  (b) noop    Envoy + `extproc serve --noop` (answers every phase, touches nothing)
  (c) gate    Envoy + `extproc serve` (JWT, Redis rate limit, Postgres reserve and settle)

The processors run on uvloop (GATE_EVENT_LOOP's default); `noop-asyncio` and `gate-asyncio` are the
same stacks on asyncio's standard loop, to compare the loops within one run (--mode), and
`gate-nolease` is the gate with one Redis call per request (GATE_RATE_LIMIT_LEASE=0), and
`gate-chunks` the gate reading every stream's chunks itself (GATE_STREAM_USAGE=processor; the
default hands bounded streams to Envoy, docs/streams.md), and `gate-jsonproc` the gate reading
every JSON answer itself (GATE_JSON_USAGE=processor; the default hands bounded JSON answers to
Envoy). Requests carry max_tokens (bounded, as SDK clients send them; --json-max-tokens 0 sends
JSON requests without it); the no-op's Envoy has no usage filter or access log.

Each stack runs three passes of POST /v1/chat/completions, rotating over --users users' JWTs:
  throughput  --concurrency connections flat out (closed loop): requests/s, p50, p99
  latency     one connection flat out: the per-request latency with nothing queued
  paced       --concurrency connections with exponential think times, offering about
              --paced-fraction of the gate's throughput ("moderate load"): p50, p99

Passes are interleaved over the stacks (all stacks stay up, idle when not measured), so slow
drift in background load hits every stack alike. The processors' CPU seconds per request
(/proc/<pid>/stat) are reported for the throughput pass, with Envoy's, the upstream's,
the Postgres backends' and Redis's. After the gate's passes its processors are stopped
gracefully, `extproc reconcile` must find no drift, and the ledger must hold one usage
entry per exchange (at least one per 200 the load generator saw).

Everything is set up here and torn down at the end (also on Ctrl-C): a fresh database on
DATABASE_URL's server (migrated with dbmate, dropped at the end), REDIS_URL, embedded
PostgreSQL/Redis when those do not answer. `make bench` runs it with the defaults; see
bench/README.md for options and measured numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from extproc.identity import mint_token
from extproc.migrate import dbmate
from extproc.settings import Settings
from extproc_dev import devstack

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LUA = BENCH / "chat.lua"
# SSE chunks per streamed answer (--stream-chunks), read by both load generators.
STREAM_CHUNKS = [3]
# Streamed requests bound their answers, as SDK clients do (and bench/chat.lua's body says).
STREAM_MAX_TOKENS = 256
# JSON requests' max_tokens (--json-max-tokens; 0: none, an unbounded answer the processor reads).
JSON_MAX_TOKENS = [256]
UPSTREAM = ROOT / "tests" / "support" / "upstream.py"
PATH = "/v1/chat/completions"
PROMPT = "Say hello to the Solaris benchmark in one short sentence, please."
SCENARIOS = ("direct", "noop-asyncio", "noop", "gate-asyncio", "gate-nolease", "gate-chunks", "gate-jsonproc",
             "gate")
DEFAULT_SCENARIOS = ("direct", "noop", "gate")
LABELS = {"direct": "(a) envoy direct", "noop": "(b) envoy + noop", "gate": "(c) envoy + gate",
          "noop-asyncio": "(b) noop, asyncio", "gate-asyncio": "(c) gate, asyncio",
          "gate-nolease": "(c) gate, no lease", "gate-chunks": "(c) gate, chunks",
          "gate-jsonproc": "(c) gate, JSON by processor"}
# The variants' settings (the processors' environment) on top of the defaults.
SCENARIO_ENV = {"noop-asyncio": {"GATE_EVENT_LOOP": "asyncio"}, "gate-asyncio": {"GATE_EVENT_LOOP": "asyncio"},
                "gate-nolease": {"GATE_RATE_LIMIT_LEASE": "0"},
                "gate-chunks": {"GATE_STREAM_USAGE": "processor"},
                "gate-jsonproc": {"GATE_JSON_USAGE": "processor"}}
# Short names in the ratios: c/b is the issue's figure (gate over the four-message no-op).
KEYS = {"direct": "a", "noop-asyncio": "b_asyncio", "noop": "b", "gate-asyncio": "c_asyncio",
        "gate-nolease": "c_nolease", "gate-chunks": "c_chunks", "gate-jsonproc": "c_jsonproc", "gate": "c"}
RATIO_PAIRS = (("c", "b"), ("c", "a"), ("b", "a"), ("c_asyncio", "b_asyncio"), ("c_asyncio", "a"),
               ("b_asyncio", "a"), ("c", "b_asyncio"), ("c", "c_asyncio"), ("b", "b_asyncio"),
               ("c_nolease", "b"), ("c", "c_nolease"), ("c_chunks", "b"), ("c_chunks", "a"),
               ("c", "c_chunks"), ("c_jsonproc", "b"), ("c", "c_jsonproc"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
COMPONENTS = ("processors", "envoy", "upstream", "postgres", "redis", "loadgen")
GOAL_THROUGHPUT = 0.70  # c >= 70 % of b
GOAL_P50_MS = 2.0  # p50(c) - p50(a) under 2 ms at moderate load


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- measurements


@dataclass
class Load:
    """One load-generator run."""

    requests: int = 0  # completed responses, any status
    seconds: float = 0.0
    non2xx: int = 0  # non-2xx/3xx responses
    socket_errors: int = 0  # connect/read/write errors and timeouts (no response)
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    mean_ms: float = 0.0
    loadgen_cpu_s: float = 0.0
    concurrency: int = 0
    think_ms: float = 0.0
    round: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds during the run, by component
    metrics: dict[str, float] = field(default_factory=dict)  # the gate's /metrics deltas over the run

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> int:
        return self.requests - self.non2xx

    @property
    def failed(self) -> int:
        return self.non2xx + self.socket_errors

    def cpu_ms_per_request(self) -> dict[str, float]:
        n = max(self.requests, 1)
        return {k: v * 1000 / n for k, v in self.cpu_s.items() if k in COMPONENTS}

    @property
    def foreign_cores(self) -> float:
        """Cores busy with processes that are not part of the measured stack (other users of the
        machine), on average over the run: machine-wide busy time minus the stack's own."""
        if "machine" not in self.cpu_s or not self.seconds:
            return 0.0
        ours = sum(v for k, v in self.cpu_s.items() if k in COMPONENTS)
        return max(0.0, self.cpu_s["machine"] - ours) / self.seconds


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


# ---------------------------------------------------------------- load generators


class Wrk:
    name = "wrk"

    def __init__(self, tokens_file: Path, threads: int) -> None:
        self.tokens_file = tokens_file
        self.threads = threads

    def run(self, url: str, concurrency: int, duration: float, stream_ratio: float,
            think_ms: float = 0.0) -> Load:
        threads = max(1, min(self.threads, concurrency))
        cmd = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration))}s",
               "--timeout", "10s", "--latency", "-s", str(LUA), url + PATH]
        env = child_env(BENCH_TOKENS_FILE=str(self.tokens_file),
                        BENCH_STREAM_RATIO=str(stream_ratio), BENCH_THINK_MS=str(think_ms),
                        BENCH_STREAM_CHUNKS=str(STREAM_CHUNKS[0]),
                        BENCH_JSON_MAX_TOKENS=str(JSON_MAX_TOKENS[0]))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()}\n{proc.stdout}")
        data = json.loads(line.split(" ", 1)[1])
        return Load(
            requests=data["requests"], seconds=data["duration_us"] / 1e6, non2xx=data["status"],
            socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
            p50_ms=data["p50"] / 1000, p90_ms=data["p90"] / 1000, p99_ms=data["p99"] / 1000,
            max_ms=data["max"] / 1000, mean_ms=data["mean"] / 1000,
            loadgen_cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            concurrency=concurrency, think_ms=think_ms)


class PythonLoad:
    """Fallback when wrk is unavailable: aiohttp in this process. It costs far more CPU per
    request than wrk, CPU the stacks under test then do not get: compare ratios, not
    absolute numbers."""

    name = "python-aiohttp"

    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens = list(tokens)

    def run(self, url: str, concurrency: int, duration: float, stream_ratio: float,
            think_ms: float = 0.0) -> Load:
        before = resource.getrusage(resource.RUSAGE_SELF)
        load = asyncio.run(self._run(url + PATH, concurrency, duration, stream_ratio, think_ms))
        after = resource.getrusage(resource.RUSAGE_SELF)
        load.loadgen_cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        return load

    async def _run(self, url: str, concurrency: int, duration: float, stream_ratio: float,
                   think_ms: float) -> Load:
        import aiohttp

        bounded = {"max_tokens": JSON_MAX_TOKENS[0]} if JSON_MAX_TOKENS[0] else {}
        bodies = [json.dumps({"model": "gpt-4o-mini",
                              **({"stream": True, "max_tokens": STREAM_MAX_TOKENS,
                                  "x_test": {"chunks": STREAM_CHUNKS[0]}} if s else bounded),
                              "messages": [{"role": "user", "content": PROMPT}]}).encode()
                  for s in (False, True)]
        headers = [{"Content-Type": "application/json", "Authorization": f"Bearer {t}"}
                   for t in self.tokens]
        latencies: list[float] = []
        counts = {"non2xx": 0, "errors": 0, "n": 0}
        started = time.perf_counter()
        deadline = started + duration
        connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def worker() -> None:
                while time.perf_counter() < deadline:
                    if think_ms > 0:
                        await asyncio.sleep(random.expovariate(1000 / think_ms))
                    i = counts["n"]
                    counts["n"] += 1
                    stream = int((i + 1) * stream_ratio) > int(i * stream_ratio)
                    t0 = time.perf_counter()
                    try:
                        async with session.post(url, data=bodies[stream],
                                                headers=headers[i % len(headers)]) as resp:
                            await resp.read()
                            status = resp.status
                    except (aiohttp.ClientError, OSError, TimeoutError):
                        counts["errors"] += 1
                        continue
                    latencies.append(time.perf_counter() - t0)
                    if not 200 <= status < 400:
                        counts["non2xx"] += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        lat = sorted(x * 1000 for x in latencies)
        return Load(
            requests=len(lat), seconds=elapsed, non2xx=counts["non2xx"], socket_errors=counts["errors"],
            p50_ms=percentile(lat, 50), p90_ms=percentile(lat, 90), p99_ms=percentile(lat, 99),
            max_ms=lat[-1] if lat else 0.0, mean_ms=sum(lat) / len(lat) if lat else 0.0,
            concurrency=concurrency, think_ms=think_ms)


def ensure_wrk(allow_install: bool) -> bool:
    if shutil.which("wrk"):
        return True
    if not allow_install:
        return False
    log("wrk not found; trying `apt-get install -y wrk`")
    env = child_env(DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "install", "-y", "-qq", "wrk"],
                ["sh", "-c", "apt-get update -qq && apt-get install -y -qq wrk"]):
        with contextlib.suppress(OSError):
            subprocess.run(cmd, env=env, capture_output=True, check=False, timeout=300)
        if shutil.which("wrk"):
            return True
    log("could not install wrk; falling back to the Python (aiohttp) load generator")
    return False


# ---------------------------------------------------------------- the stacks


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def http_status(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return 0


class Processor:
    """One `extproc serve [--noop]` child process on its own ports."""

    def __init__(self, env: dict[str, str], noop: bool, logdir: Path, index: int, name: str = "") -> None:
        self.noop = noop
        self.grpc_port = devstack.free_port()
        self.http_port = devstack.free_port()
        self.env = {**env, "GATE_GRPC_PORT": str(self.grpc_port), "GATE_HTTP_PORT": str(self.http_port),
                    **SCENARIO_ENV.get(name, {})}
        self.log_path = logdir / f"{name or ('noop' if noop else 'gate')}-{index}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Processor:
        cmd = [devstack.binary("extproc"), "serve", *(["--noop"] if self.noop else [])]
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 90.0) -> None:
        def ready() -> bool:
            if not devstack.port_open("127.0.0.1", self.grpc_port):
                return False
            return self.noop or http_status(f"http://127.0.0.1:{self.http_port}/readyz") == 200

        try:
            devstack.wait_until(ready, timeout, f"processor {self.log_path.name}", self.proc)
        except (RuntimeError, TimeoutError):
            sys.stderr.write(self.log_path.read_text(errors="replace")[-4000:])
            raise

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None:
            devstack.stop_process(self.proc, timeout)


@dataclass
class Stack:
    name: str
    processors: list[Processor]
    envoy: devstack.Envoy
    rounds: dict[str, list[Load]] = field(default_factory=dict)  # pass name -> one Load per round
    extra_ok: int = 0  # 2xx outside the measured passes (smoke, warm-up)
    runs: list[tuple[int, float]] = field(default_factory=list)  # (concurrency, wall-clock end) per run

    @property
    def url(self) -> str:
        return self.envoy.url

    @property
    def is_gate(self) -> bool:
        return self.name.startswith("gate")

    picked: dict[str, int] = field(default_factory=dict)  # pass name -> round reported (--pick quietest)

    @property
    def loads(self) -> dict[str, Load]:
        """The reported run of each pass: the picked round, else the median round (by requests/s
        for throughput, by p50 otherwise)."""
        out = {}
        for pass_name, loads in self.rounds.items():
            if pass_name in self.picked:
                out[pass_name] = next(x for x in loads if x.round == self.picked[pass_name])
            elif pass_name == "throughput":
                out[pass_name] = sorted(loads, key=lambda x: x.rps)[len(loads) // 2]
            else:
                out[pass_name] = sorted(loads, key=lambda x: x.p50_ms)[(len(loads) - 1) // 2]
        return out

    def all_loads(self) -> list[Load]:
        return [x for loads in self.rounds.values() for x in loads]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stack = contextlib.ExitStack()
        self.workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="solaris-bench-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logdir = self.workdir / "logs"
        self.logdir.mkdir(exist_ok=True)
        self.run_id = secrets.token_hex(4)
        self.secret = secrets.token_hex(32)
        self.database_url = ""
        self.redis_url = ""
        self.stacks: dict[str, Stack] = {}
        self.failures: list[str] = []
        self.money: dict[str, Any] = {}
        self.profile: dict[str, Any] = {}
        self.loadgen: Wrk | PythonLoad | None = None
        self.upstream_pid = 0

    # ------------------------------------------------------------ setup

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        log("tearing down")
        self.stack.close()
        # Logs are kept when the run broke (exception, Ctrl-C) or on request; failed checks
        # are printed in full above and need no logs.
        if not self.args.keep and not self.args.workdir and exc[0] is None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            log(f"logs kept in {self.workdir}")

    def setup_services(self) -> None:
        args = self.args
        server = os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"
        if not devstack.postgres_reachable(server):
            log(f"{server} does not answer; starting an embedded PostgreSQL")
            pg, server = devstack.embedded_postgres(self.workdir / "pg")
            self.stack.callback(pg.cleanup)
        name = f"solaris_bench_{self.run_id}"
        admin_url = with_database(server, "postgres")

        async def admin(sql: str) -> None:
            conn = await asyncpg.connect(admin_url)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
        if not args.keep_db:
            self.stack.callback(lambda: asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')))
        self.database_url = with_database(server, name)
        dbmate(self.database_url, "up")
        log(f"database {name} created and migrated")

        self.redis_url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
        if not devstack.redis_reachable(self.redis_url):
            log(f"{self.redis_url} does not answer; starting an embedded Redis")
            rd, self.redis_url = devstack.embedded_redis(self.workdir / "redis")
            self.stack.callback(rd.shutdown)

        settings = Settings(jwt_secret=self.secret)
        tokens = [mint_token(settings, f"bench-{self.run_id}-{i:05d}",
                             email=f"bench{i}@example.test", ttl=args.token_ttl)
                  for i in range(args.users)]
        tokens_file = self.workdir / "tokens.txt"
        tokens_file.write_text("\n".join(tokens) + "\n")
        if args.loadgen != "python" and ensure_wrk(args.loadgen == "auto"):
            self.loadgen = Wrk(tokens_file, args.wrk_threads)
        elif args.loadgen == "wrk":
            raise SystemExit("--loadgen wrk: wrk is not installed")
        else:
            self.loadgen = PythonLoad(tokens)
        log(f"load generator: {self.loadgen.name}; {args.users} users")

    def processor_env(self) -> dict[str, str]:
        return child_env(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            GATE_JWT_SECRET=self.secret,
            GATE_RATE_LIMIT_PER_MINUTE=str(self.args.rate_limit),
            GATE_DEFAULT_MONTHLY_TOKENS=str(10**15),
            GATE_SPOOL_DIR=str(self.workdir / "spool"),
            GATE_LOG_LEVEL=self.args.log_level,
            GATE_EXTRA_BODY_FIELDS="x_test",  # the fake upstream's steering object (stream chunks)
            # The defaults, whatever this shell says; the variants set their own (SCENARIO_ENV).
            GATE_EVENT_LOOP="", GATE_RATE_LIMIT_LEASE="",
        )

    def start_upstream(self) -> tuple[str, int]:
        port = devstack.free_port()
        with (self.logdir / "upstream.log").open("wb") as out:
            proc = subprocess.Popen([sys.executable, str(UPSTREAM), "--port", str(port)],
                                    stdout=out, stderr=subprocess.STDOUT)
        self.stack.callback(devstack.stop_process, proc)
        devstack.wait_until(lambda: devstack.port_open("127.0.0.1", port), 30, "fake upstream", proc)
        self.upstream_pid = proc.pid
        return ("127.0.0.1", port)

    def start_stack(self, name: str, upstream: tuple[str, int]) -> Stack:
        procs: list[Processor] = []
        if name != "direct":
            env = self.processor_env()
            procs = [Processor(env, name.startswith("noop"), self.logdir, i, name).start()
                     for i in range(self.args.processors)]
            for p in procs:
                self.stack.callback(p.stop)
            for p in procs:
                p.wait_ready()
        http = ("127.0.0.1", procs[0].http_port) if name.startswith("gate") else upstream
        envoy = devstack.Envoy(
            self.workdir / f"envoy-{name}", upstream=upstream,
            extproc=[("127.0.0.1", p.grpc_port) for p in procs] if procs else None,
            http=http, concurrency=self.args.envoy_concurrency,
            stream_usage=name.startswith("gate"))
        self.stack.callback(envoy.stop)
        envoy.start(timeout=60)
        stack = Stack(name, procs, envoy)
        self.smoke(stack)
        return stack

    def smoke(self, stack: Stack) -> None:
        """One request by hand: a bench where everything is refused measures nothing."""
        token = self.workdir.joinpath("tokens.txt").read_text().split("\n", 1)[0]
        body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]})
        req = urllib.request.Request(stack.url + PATH, data=body.encode(), method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status, headers, text = resp.status, resp.headers, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            status, headers, text = exc.code, exc.headers, exc.read().decode(errors="replace")
        if status != 200:
            raise RuntimeError(f"smoke request through {stack.name} got {status}: {text[:500]}")
        # The gate adds the rate-limit headers to every answer it admitted (a JSON answer handed
        # to Envoy carries no remaining-tokens header).
        if stack.is_gate and "x-ratelimit-remaining-requests" not in headers:
            raise RuntimeError("smoke request through the gate lacks x-ratelimit-remaining-requests: "
                               "it did not pass the gate")
        stack.extra_ok += 1

    # ------------------------------------------------------------ passes

    def cpu_snapshot(self, stack: Stack) -> dict[str, float]:
        """CPU seconds so far of the stack's processes; Postgres backends as "pg:<pid>" (the pool
        may open connections during a run), and the whole machine's busy time."""
        snap = {"processors": sum(proc_cpu_seconds(p.pid) for p in stack.processors),
                "envoy": proc_cpu_seconds(stack.envoy.proc.pid) if stack.envoy.proc else 0.0,
                "upstream": proc_cpu_seconds(self.upstream_pid)}
        if stack.is_gate:
            snap.update({f"pg:{pid}": proc_cpu_seconds(pid) for pid in self.postgres_backends()})
            snap["redis"] = self.redis_cpu()
        snap["machine"] = machine_busy_seconds()
        return snap

    @staticmethod
    def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, value in after.items():
            name = "postgres" if key.startswith("pg:") else key
            out[name] = out.get(name, 0.0) + value - before.get(key, 0.0)
        return out

    def redis_cpu(self) -> float:
        import redis

        try:
            client = redis.Redis.from_url(self.redis_url, socket_timeout=1)
            info = client.info("cpu")
            client.close()
            return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        except (OSError, redis.RedisError):
            return 0.0

    def postgres_backends(self) -> list[int]:
        """PIDs of the server processes serving the bench database (the processors' pools)."""

        async def fetch() -> list[int]:
            conn = await asyncpg.connect(self.database_url)
            try:
                rows = await conn.fetch("SELECT pid FROM pg_stat_activity"
                                        " WHERE datname = current_database() AND pid <> pg_backend_pid()")
                return [r["pid"] for r in rows]
            finally:
                await conn.close()

        pids = asyncio.run(fetch())
        return [p for p in pids if Path(f"/proc/{p}").exists()]  # local server only

    def load(self, stack: Stack, pass_name: str, concurrency: int, duration: float,
             think_ms: float = 0.0, round_no: int = 0) -> Load:
        """One load-generator run against a stack, with the CPU each component spent and the
        gate's own counters over exactly that run."""
        assert self.loadgen is not None
        metrics_before = self.scrape(stack)
        cpu_before = self.cpu_snapshot(stack)
        load = self.loadgen.run(stack.url, concurrency, duration, self.args.stream_ratio, think_ms)
        cpu_after = self.cpu_snapshot(stack)
        stack.runs.append((concurrency, time.time()))
        load.round = round_no
        load.cpu_s = self.cpu_delta(cpu_before, cpu_after)
        load.cpu_s["loadgen"] = load.loadgen_cpu_s
        if metrics_before:
            after = self.scrape(stack)
            load.metrics = {k: v - metrics_before.get(k, 0.0) for k, v in after.items()}
        if pass_name != "warmup":
            stack.rounds.setdefault(pass_name, []).append(load)
            self.report_load(stack, pass_name, load)
        return load

    def scrape(self, stack: Stack) -> dict[str, float]:
        """The gate processors' own counters (/metrics), summed over the processes."""
        if not stack.is_gate:
            return {}
        out: dict[str, float] = {}
        for p in stack.processors:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{p.http_port}/metrics", timeout=5) as resp:
                    text = resp.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("solaris_") and not line.startswith(("#", "solaris_alert")):
                    key, _, value = line.rpartition(" ")
                    if key.endswith(("_sum", "_count", "_total")) or any(
                            f"{suffix}{{" in key for suffix in ("_count", "_sum", "_total")):
                        with contextlib.suppress(ValueError):
                            out[key] = out.get(key, 0.0) + float(value)
        return out

    def warm_up(self, stack: Stack) -> None:
        if self.args.warmup > 0:
            load = self.load(stack, "warmup", self.args.concurrency, self.args.warmup)
            stack.extra_ok += load.ok
            if load.failed:
                log(f"  warm-up of {stack.name}: {load.non2xx} non-2xx, {load.socket_errors} socket errors")

    def throughput_pass(self, stack: Stack, round_no: int) -> None:
        args = self.args
        profile = args.profile and stack.is_gate and round_no == 0
        profiler = self.start_profiler(stack) if profile else None
        self.load(stack, "throughput", args.concurrency, args.duration, round_no=round_no)
        if profiler is not None:
            self.finish_profiler(stack, *profiler)

    def report_load(self, stack: Stack, pass_name: str, load: Load) -> None:
        log(f"  {stack.name:6} {pass_name:10} c={load.concurrency:<3} {load.rps:8.1f} req/s"
            f"  p50 {load.p50_ms:7.2f} ms  p99 {load.p99_ms:7.2f} ms"
            f"  non-2xx {load.non2xx}  socket errors {load.socket_errors}"
            f"  (other processes: {load.foreign_cores:.2f} cores)")
        if load.failed:
            msg = (f"{stack.name}/{pass_name}: {load.non2xx} non-2xx responses and "
                   f"{load.socket_errors} socket errors out of {load.requests}")
            self.failures.append(msg)
            log("!" * 20 + " " + msg)

    def run(self) -> int:
        args = self.args
        self.setup_services()
        upstream = self.start_upstream()
        for name in args.modes:
            log(f"starting stack {name}")
            self.stacks[name] = self.start_stack(name, upstream)
        for stack in self.stacks.values():
            self.warm_up(stack)
        rate = 0.0
        for r in range(args.rounds):
            if args.rounds > 1:
                log(f"round {r + 1} of {args.rounds}")
            log(f"throughput pass: {args.concurrency} connections, {args.duration:.0f} s each")
            for stack in self.stacks.values():
                self.throughput_pass(stack, r)
            if args.latency_duration > 0:
                log(f"latency pass: 1 connection, {args.latency_duration:.0f} s each")
                for stack in self.stacks.values():
                    self.load(stack, "latency", 1, args.latency_duration, round_no=r)
            rate = rate or self.paced_rate()  # fixed after the first round
            if rate > 0 and args.duration > 0:
                think = args.concurrency * 1000 / rate
                log(f"paced pass: {args.concurrency} connections offering ~{rate:.0f} req/s "
                    f"(mean think time {think:.1f} ms), {args.duration:.0f} s each")
                for stack in self.stacks.values():
                    self.load(stack, "paced", args.concurrency, args.duration, think, round_no=r)
        if args.pick == "quietest":
            self.pick_quietest()
        gates = [s for s in self.stacks.values() if s.is_gate]
        if gates:
            self.verify_money(gates)
        self.print_report()
        if args.json:
            Path(args.json).write_text(json.dumps(self.as_json(), indent=2, default=str))
        return 1 if self.failures else 0

    def pick_quietest(self) -> None:
        """Per pass, report the round in which other processes disturbed the stacks least (the
        largest foreign CPU of any stack in that round), the same round for every stack."""
        passes = {p for s in self.stacks.values() for p in s.rounds}
        for pass_name in passes:
            rounds = range(self.args.rounds)

            def noise(r: int, pass_name: str = pass_name) -> float:
                return max((x.foreign_cores for s in self.stacks.values() for x in s.rounds.get(pass_name, [])
                            if x.round == r), default=0.0)

            best = min(rounds, key=noise)
            for stack in self.stacks.values():
                stack.picked[pass_name] = best

    def paced_rate(self) -> float:
        if self.args.rate:
            return float(self.args.rate)
        tp = [s.loads["throughput"].rps for s in self.stacks.values() if "throughput" in s.loads]
        gate = self.stacks.get("gate") or next((s for s in self.stacks.values() if s.is_gate), None)
        base = gate.loads["throughput"].rps if gate is not None else min(tp or [0])
        return round(base * self.args.paced_fraction)

    # ------------------------------------------------------------ profiling

    def start_profiler(self, stack: Stack) -> tuple[list[subprocess.Popen[bytes]], list[Path]]:
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(pyspy).exists():
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
        procs, outs = [], []
        for i, p in enumerate(stack.processors):
            out = self.workdir / f"profile-{stack.name}-{i}.txt"
            cmd = [pyspy, "record", "--pid", str(p.pid), "--duration", str(round(self.args.duration)),
                   "--rate", str(self.args.profile_rate), "--format", "raw", "--output", str(out)]
            # --native must pause the process to unwind C frames; without it, sample politely.
            cmd.append("--native" if self.args.profile_native else "--nonblocking")
            with (self.logdir / f"py-spy-{stack.name}-{i}.log").open("wb") as err:
                procs.append(subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT))
            outs.append(out)
        return procs, outs

    def finish_profiler(self, stack: Stack, procs: list[subprocess.Popen[bytes]], outs: list[Path]) -> None:
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        stacks: list[tuple[list[str], int]] = []
        for i, out in enumerate(outs):
            if not out.exists():
                log(f"py-spy wrote no profile: {devstack.tail(self.logdir / f'py-spy-{stack.name}-{i}.log', 5)}")
            else:
                for line in out.read_text(errors="replace").splitlines():
                    frames, _, count = line.rpartition(" ")
                    if frames and count.isdigit():
                        stacks.append((frames.split(";"), int(count)))
        self.profile[stack.name] = summarize_profile(stacks)
        dest = Path(self.args.profile)
        dest.mkdir(parents=True, exist_ok=True)
        for out in outs:
            if out.exists():
                shutil.copy(out, dest / out.name)
        (dest / f"summary-{stack.name}.json").write_text(json.dumps(self.profile[stack.name], indent=2))
        log(f"profile (collapsed stacks, for flamegraph.pl or speedscope) in {dest}")

    # ------------------------------------------------------------ money

    def verify_money(self, stacks: Sequence[Stack]) -> None:
        """Stop the gates' processors gracefully (in-flight settles finish), then: reconcile
        finds no drift, every exchange appears once, no reservation is left held, and there is a
        usage entry for every 2xx the load generator saw. The gate stacks (one per event loop)
        share the database and the users: the counts are over all of them."""
        log("stopping the gate's processors gracefully, then Envoy, then checking the ledger")
        # Processors first, Envoy still running: the answers in flight when the load stopped
        # end, and Envoy's access log brings the entries of those handed off (each flush, 0.1 s)
        # while the processors wait for them. Envoy exits at once on SIGTERM, dropping the
        # entries it buffered: stopped first, it left those holds to the sweep.
        for stack in stacks:
            for p in stack.processors:
                p.stop()
            stack.envoy.stop()
        env = self.processor_env()
        rec = subprocess.run([devstack.binary("extproc"), "reconcile"], env=env,
                             capture_output=True, text=True, check=False)

        async def counts() -> dict[str, Any]:
            conn = await asyncpg.connect(self.database_url)
            try:
                row = await conn.fetchrow(
                    "SELECT count(*) FILTER (WHERE kind = 'usage') AS usage_entries,"
                    " count(DISTINCT exchange_id) FILTER (WHERE kind = 'usage') AS distinct_exchanges,"
                    " COALESCE(SUM(tokens) FILTER (WHERE kind = 'usage'), 0) AS tokens_debited"
                    " FROM ledger_entries")
                states = await conn.fetch("SELECT state, count(*) AS n FROM reservations GROUP BY state")
                held = await conn.fetch("SELECT created_at FROM reservations WHERE state = 'held'")
                accounts = await conn.fetchval("SELECT count(*) FROM accounts")
                return {**dict(row), "reservations": {r["state"]: r["n"] for r in states},
                        "accounts": accounts, "held_at": [r["created_at"].timestamp() for r in held]}
            finally:
                await conn.close()

        data = asyncio.run(counts())
        ok = sum(stack.extra_ok + sum(load.ok for load in stack.all_loads()) for stack in stacks)
        runs = [run for stack in stacks for run in stack.runs]
        cutoff_bound = sum(c for c, _ in runs)  # requests in flight when a load run stopped
        held_at = data.pop("held_at")
        # A reservation made in the last moments of a load run (the load generator stops
        # mid-request): an exchange in flight then, whose settle was lost.
        data["held_at_cutoff"] = sum(any(0 <= end - t < 2.0 for _, end in runs) for t in held_at)
        data.update({
            "reconcile_exit": rec.returncode, "reconcile_output": (rec.stdout + rec.stderr).strip(),
            "ok_responses": ok, "cutoff_bound": cutoff_bound,
        })
        self.money = data
        entries = data["usage_entries"]
        if rec.returncode != 0:
            self.failures.append(f"extproc reconcile exited {rec.returncode}: {data['reconcile_output'][:500]}")
        if entries != data["distinct_exchanges"]:
            self.failures.append(f"{entries} usage entries but {data['distinct_exchanges']} exchanges")
        if held_at:
            self.failures.append(
                f"{len(held_at)} reservations still held after a graceful stop ({data['held_at_cutoff']} made"
                " within 2 s before a load run stopped); the sweep will charge each its estimate, not its"
                " usage (see bench/README.md)")
        if entries < ok:
            self.failures.append(f"{ok} responses were 2xx but only {entries} usage entries exist")
        elif entries > ok + cutoff_bound:
            self.failures.append(f"{entries} usage entries for {ok} 2xx responses (+{cutoff_bound} cut off)")

    # ------------------------------------------------------------ report

    def print_report(self) -> None:
        args = self.args
        gen = self.loadgen.name if self.loadgen else "?"
        print()
        print(f"Solaris gate benchmark — {os.cpu_count()} CPUs shared by everything; load generator {gen}; "
              f"{args.users} users; {args.processors} processor process(es); "
              f"stream ratio {args.stream_ratio} x {args.stream_chunks} chunks; "
              f"JSON max_tokens {args.json_max_tokens or 'none'}; "
              f"Envoy --concurrency {args.envoy_concurrency}")
        if args.rounds > 1 and args.pick == "quietest":
            picked = next(iter(self.stacks.values())).picked
            which = ", ".join(f"{p}: round {r + 1}" for p, r in sorted(picked.items()))
            print(f"Quietest of {args.rounds} rounds per pass ({which}); every round is in the log above.")
        elif args.rounds > 1:
            print(f"Median of {args.rounds} rounds (by req/s for throughput, by p50 otherwise); "
                  "every round is in the log above.")
        header = (f"{'scenario':19} {'pass':10} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} "
                  f"{'p99 ms':>8} {'non-2xx':>8} {'sock err':>8} {'other cores':>11}")
        print(header)
        print("-" * len(header))
        for pass_name in ("throughput", "paced", "latency"):
            for name, stack in self.stacks.items():
                load = stack.loads.get(pass_name)
                if load is None:
                    continue
                print(f"{LABELS[name]:19} {pass_name:10} {load.concurrency:>5} {load.rps:>9.1f} "
                      f"{load.p50_ms:>8.2f} {load.p90_ms:>8.2f} {load.p99_ms:>8.2f} {load.non2xx:>8} "
                      f"{load.socket_errors:>8} {load.foreign_cores:>11.2f}")
        print("(other cores: CPU used meanwhile by processes outside the stack, e.g. other users' jobs)")
        print()
        print("CPU per request in the throughput pass (ms of CPU; all share the same cores):")
        print(f"{'scenario':19} " + " ".join(f"{c:>10}" for c in COMPONENTS) + f" {'total':>8}")
        for name, stack in self.stacks.items():
            if "throughput" not in stack.loads:
                continue
            cpu = stack.loads["throughput"].cpu_ms_per_request()
            cells = " ".join(f"{cpu[c]:>10.3f}" if c in cpu else f"{'-':>10}" for c in COMPONENTS)
            print(f"{LABELS[name]:19} {cells} {sum(cpu.values()):>8.3f}")
        self.print_ratios()
        for stack in self.stacks.values():
            if stack.is_gate:
                self.print_gate_view(stack)
        if self.money:
            m = self.money
            print()
            print(f"Money check (gate): extproc reconcile exit {m['reconcile_exit']} "
                  f"({m['reconcile_output'].splitlines()[-1] if m['reconcile_output'] else ''}); "
                  f"{m['usage_entries']} usage entries, {m['distinct_exchanges']} distinct exchange ids, "
                  f"{m['ok_responses']} 2xx responses seen by the load generator "
                  f"(+{m['usage_entries'] - m['ok_responses']} settled for requests cut off when a load run "
                  f"stopped; at most {m['cutoff_bound']}); reservations {m['reservations']}; "
                  f"{m['accounts']} accounts; {-m['tokens_debited']} tokens debited")
        for name, profile in self.profile.items():
            print()
            print(f"{LABELS[name]}:")
            print_profile(profile)
        print()
        if self.failures:
            print("FAILURES:")
            for f in self.failures:
                print(f"  - {f}")
        else:
            print("All requests answered 2xx; ledger consistent.")

    def print_gate_view(self, stack: Stack) -> None:
        """Mean time per ext_proc phase and per ledger call as the gate measured them, how often
        the rate limiter gave up on Redis (its timeout is short by design), and how many
        admissions and settles the ledger's batches carried on average (group commit)."""
        print()
        print(f"The gate's own view, {LABELS[stack.name]} (/metrics deltas; mean ms per message / per call):")
        phases = ("request_headers", "request_body", "response_headers", "response_body")
        ops = ("admit", "settle")
        print(f"{'pass':10} " + " ".join(f"{p:>16}" for p in phases) + " " + " ".join(f"{o:>8}" for o in ops)
              + f" {'rl-fallback':>11} {'redis-err':>9} {'db-err':>6} {'per batch: admit':>16} {'settle':>6}")
        for pass_name in ("throughput", "paced", "latency"):
            load = stack.loads.get(pass_name)
            m = load.metrics if load is not None else None
            if not m:
                continue

            def mean(metric: str, label: str, value: str, m: dict[str, float] = m) -> str:
                total = m.get(f'{metric}_sum{{{label}="{value}"}}', 0.0)
                count = m.get(f'{metric}_count{{{label}="{value}"}}', 0.0)
                return f"{1000 * total / count:.3f}" if count else "-"

            cells = [mean("solaris_extproc_phase_seconds", "phase", p) for p in phases]
            cells += [mean("solaris_ledger_transaction_seconds", "operation", o) for o in ops]
            fallback = m.get("solaris_ratelimit_fallback_total", 0.0)
            redis_err = m.get("solaris_redis_errors_total", 0.0)
            db_err = m.get("solaris_db_errors_total", 0.0)
            def per_batch(operation: str, m: dict[str, float] = m) -> str:
                runs = m.get(f'solaris_ledger_batches_total{{operation="{operation}"}}', 0.0)
                carried = m.get(f'solaris_ledger_batched_operations_total{{operation="{operation}"}}', 0.0)
                return f"{carried / runs:.2f}" if runs else "-"

            print(f"{pass_name:10} " + " ".join(f"{c:>16}" for c in cells[:4]) + " "
                  + " ".join(f"{c:>8}" for c in cells[4:])
                  + f" {fallback:>11.0f} {redis_err:>9.0f} {db_err:>6.0f}"
                  + f" {per_batch('admit'):>16} {per_batch('settle'):>6}")

    def ratios(self) -> dict[str, float]:
        """Throughput ratios of the pairs present (c/b is the issue's: gate over the four-message
        no-op) and p50/p99 overheads over bare Envoy; keys name stacks a, b, c, b_asyncio, c_asyncio."""
        out: dict[str, float] = {}
        tp = {KEYS[n]: s.loads["throughput"] for n, s in self.stacks.items() if "throughput" in s.loads}
        for x, y in RATIO_PAIRS:
            if x in tp and y in tp and tp[y].rps:
                out[f"throughput_{x}_over_{y}"] = tp[x].rps / tp[y].rps
        for pass_name in ("paced", "latency", "throughput"):
            loads = {KEYS[n]: s.loads[pass_name] for n, s in self.stacks.items() if pass_name in s.loads}
            if "a" not in loads:
                continue
            for key, load in loads.items():
                if key != "a":
                    out[f"p50_overhead_{key}_minus_a_{pass_name}_ms"] = load.p50_ms - loads["a"].p50_ms
                    out[f"p99_overhead_{key}_minus_a_{pass_name}_ms"] = load.p99_ms - loads["a"].p99_ms
        return out

    def print_ratios(self) -> None:
        r = self.ratios()
        if not r:
            return
        print()
        for x, y in RATIO_PAIRS:
            value = r.get(f"throughput_{x}_over_{y}")
            if value is None:
                continue
            goal = ""
            if x.startswith("c") and y.startswith("b"):
                goal = f"  ({'meets' if value >= GOAL_THROUGHPUT else 'MISSES'} the goal >= {GOAL_THROUGHPUT:.2f})"
            print(f"throughput {x}/{y} = {value:.2f}{goal}")
        for pass_name, what in (("paced", "moderate load (paced)"), ("latency", "1 connection"),
                                ("throughput", "saturation")):
            parts = []
            for key in KEYS.values():
                value = r.get(f"p50_overhead_{key}_minus_a_{pass_name}_ms")
                if value is None:
                    continue
                goal = ""
                if pass_name == "paced" and key.startswith("c"):
                    goal = f" ({'meets' if value < GOAL_P50_MS else 'MISSES'} the goal < {GOAL_P50_MS:.0f} ms)"
                parts.append(f"{key}-a {value:+.2f} ms{goal}")
            if parts:
                print(f"p50 overhead at {what}: " + ", ".join(parts))

    def as_json(self) -> dict[str, Any]:
        return {
            "args": {k: v for k, v in vars(self.args).items()},
            "loadgen": self.loadgen.name if self.loadgen else None,
            "cpus": os.cpu_count(),
            "scenarios": {n: {"median": {p: {**asdict(x), "rps": x.rps, "foreign_cores": x.foreign_cores,
                                                 "cpu_ms_per_request": x.cpu_ms_per_request()}
                                             for p, x in s.loads.items()},
                              "rounds": {p: [{**asdict(x), "rps": x.rps} for x in xs] for p, xs in s.rounds.items()}}
                          for n, s in self.stacks.items()},
            "ratios": self.ratios(),
            "money": self.money,
            "profile": self.profile,
            "failures": self.failures,
        }


# ---------------------------------------------------------------- profile summary

# Where the gate's time goes: each py-spy sample is charged to the innermost frame that matches
# one of these (area, substrings) rules; frames read "function (file:line)", with project files
# as "processor.py" and libraries as "asyncpg/connection.py". Samples of other threads (grpc's
# poller, idle executor threads) are reported apart: py-spy's idle filter misses some of them.
AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("logging (a JSON line per settle)", ("(logging/", "(logs.py")),
    ("prometheus metrics", ("prometheus_client/",)),
    ("ledger: pool release = asyncpg reset query (1 round trip)",
     ("PoolConnectionHolder.release", "Pool.release", "Connection.reset")),
    ("ledger: BEGIN/COMMIT of settle (2 round trips)", ("Transaction.",)),
    ("ledger: settle statements", ("Ledger.settle", "Ledger._settle")),
    ("ledger: admit statement", ("Ledger.admit", "Ledger._admit")),
    ("ledger: other", ("(ledger.py",)),
    ("Redis rate limit (EVALSHA round trip)", ("(ratelimit.py", "redis/")),
    ("JWT verification", ("(identity.py", "jwt/", "cryptography/")),
    ("JSON parse/dump", ("json/",)),
    ("usage parsing / tiktoken", ("(usage.py", "tiktoken")),
    ("gate logic (processor.py, accounting, errors)", ("Gate.", "(accounting.py", "(errors.py", "headers_map",
                                                       "_mutation", "_header (processor")),
    ("grpc stream read/write + protobuf (Cython, under Processor.Process)", ("Processor.Process",)),
    ("asyncpg, caller not sampled (truncated stack)", ("asyncpg/",)),
    ("asyncio loop, tasks, callbacks (incl. grpc aio's Cython callbacks)", ("asyncio/", "selectors.py")),
)
SOCKET_WRITE = ("_SelectorSocketTransport.write", "socket.send", "send (libc")
_LINE = re.compile(r":\d+\)$")


def area_of(frames: Sequence[str]) -> str:
    if frames and frames[0].startswith("Thread._bootstrap"):
        return "other threads (grpc poller, executors; mostly waiting)"
    # Specific areas first (innermost match wins), the event loop only when nothing else matches:
    # a send() to Postgres is charged to the ledger call that made it, not to asyncio.
    for rules in (AREAS[:-2], AREAS[-2:-1], AREAS[-1:]):
        for frame in reversed(frames):
            for name, needles in rules:
                if any(n in frame for n in needles):
                    return name
    return "other"


def summarize_profile(stacks: Sequence[tuple[Sequence[str], int]]) -> dict[str, Any]:
    """Shares of all samples: by area (innermost matching frame), inclusive per gate function,
    and the part spent inside socket writes (send(2) to Postgres/Redis, with the wake-up of
    the receiver that the kernel does in the sender's time)."""
    total = sum(c for _, c in stacks) or 1
    areas: dict[str, int] = {}
    writes: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    for frames, count in stacks:
        area = area_of(frames)
        areas[area] = areas.get(area, 0) + count
        if frames and any(w in frames[-1] for w in SOCKET_WRITE):
            writes[area] = writes.get(area, 0) + count
        seen = set()
        for frame in frames:
            name = _LINE.sub(")", frame)
            if name not in seen and ("/" not in name.split("(")[-1] or "(logging/" in name):
                seen.add(name)
                inclusive[name] = inclusive.get(name, 0) + count

    def pct(v: int) -> float:
        return round(100 * v / total, 1)

    ranked = sorted(areas.items(), key=lambda kv: -kv[1])
    return {
        "samples": total,
        "areas_pct": [(k, pct(v), pct(writes.get(k, 0))) for k, v in ranked],
        "socket_write_pct": pct(sum(writes.values())),
        "inclusive_pct": [(k, pct(v)) for k, v in sorted(inclusive.items(), key=lambda kv: -kv[1])[:40]],
    }


def print_profile(profile: dict[str, Any]) -> None:
    print(f"Gate processor profile (py-spy, {profile['samples']} samples, throughput pass); % of samples:")
    print(f"  {'all':>6} {'send()':>7}  area  (send(): of which inside socket writes)")
    for name, share, write in profile["areas_pct"]:
        print(f"  {share:6.1f} {write:7.1f}  {name}")
    print(f"  socket writes in total: {profile['socket_write_pct']:.1f} %")
    print("  inclusive, the gate's own functions:")
    shown = 0
    for name, share in profile["inclusive_pct"]:
        if name.startswith(("<module>", "main (", "cmd_serve")):
            continue
        print(f"  {share:6.1f}  {name}")
        shown += 1
        if shown == 18:
            break


# ---------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="all",
                   help="direct, noop, gate, noop-asyncio, gate-asyncio (the same on asyncio's loop), "
                        "gate-nolease (one Redis call per request), gate-chunks (every stream's "
                        "chunks through the processor), or a comma-separated list; "
                        "default (all): direct, noop, gate")
    p.add_argument("--processors", type=int, default=1, help="processor processes per stack (b, c)")
    p.add_argument("--users", type=int, default=100, help="distinct users (JWTs) the load rotates over")
    p.add_argument("--duration", type=float, default=12, help="seconds of the throughput and paced passes")
    p.add_argument("--latency-duration", type=float, default=6,
                   help="seconds of the one-connection latency pass (0: skip)")
    p.add_argument("--warmup", type=float, default=3, help="seconds of unmeasured load first (onboards users)")
    p.add_argument("--concurrency", type=int, default=16, help="connections of the throughput and paced passes")
    p.add_argument("--rounds", type=int, default=1, help="repeat the passes (interleaved over the stacks)")
    p.add_argument("--pick", choices=["median", "quietest"], default="median",
                   help="with --rounds: report the median round, or the round least disturbed by other processes")
    p.add_argument("--stream-ratio", type=float, default=0.0, help="share of requests with stream: true (0..1)")
    p.add_argument("--stream-chunks", type=int, default=3,
                   help="SSE chunks per streamed answer (realistic answers: 200 and more)")
    p.add_argument("--json-max-tokens", type=int, default=256,
                   help="max_tokens of JSON requests (0: none; the gate hands bounded JSON answers to Envoy)")
    p.add_argument("--paced-fraction", type=float, default=0.5,
                   help="the paced pass offers this share of the gate's throughput (0: skip)")
    p.add_argument("--rate", type=float, default=0, help="offered req/s of the paced pass (overrides the fraction)")
    p.add_argument("--envoy-concurrency", type=int, default=2, help="Envoy worker threads")
    p.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto",
                   help="auto: wrk (installed with apt-get if missing), else Python")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (1 leaves the most CPU to the stacks)")
    p.add_argument("--rate-limit", type=int, default=10_000_000,
                   help="GATE_RATE_LIMIT_PER_MINUTE for the gate (high: the limiter never refuses)")
    p.add_argument("--log-level", default="INFO", help="GATE_LOG_LEVEL of the processors")
    p.add_argument("--token-ttl", type=int, default=6 * 3600, help="validity of the users' JWTs (s)")
    p.add_argument("--profile", metavar="DIR",
                   help="py-spy record the gate's processors during its throughput pass into DIR")
    p.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--workdir", help="keep configs and logs here (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--keep-db", action="store_true", help="do not drop the bench database (for inspection)")
    args = p.parse_args(argv)
    modes = DEFAULT_SCENARIOS if args.mode == "all" else tuple(m.strip() for m in args.mode.split(",") if m.strip())
    unknown = [m for m in modes if m not in SCENARIOS]
    if unknown or not modes:
        p.error(f"--mode: unknown {unknown}; use {', '.join(SCENARIOS)} or all")
    args.modes = [m for m in SCENARIOS if m in modes]  # always a, b, c order
    if not 0 <= args.stream_ratio <= 1:
        p.error("--stream-ratio must be in [0, 1]")
    if args.stream_chunks < 1:
        p.error("--stream-chunks must be >= 1")
    STREAM_CHUNKS[0] = args.stream_chunks
    if args.json_max_tokens < 0:
        p.error("--json-max-tokens must be >= 0")
    JSON_MAX_TOKENS[0] = args.json_max_tokens
    if min(args.processors, args.users, args.concurrency, args.rounds) < 1:
        p.error("--processors, --users, --concurrency and --rounds must be >= 1")
    return args


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with sigterm_as_interrupt():
        try:
            with Bench(args) as bench:
                return bench.run()
        except KeyboardInterrupt:
            log("interrupted; everything was stopped")
            return 130


if __name__ == "__main__":
    sys.exit(main())
