"""The test stack's secrets, ``extproc serve`` as a real child process, and Envoy in front of
the processor under test.

conftest.py builds the session's Settings from these; tests that check what a secret does (or
that it never reaches a log) import them from here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from extproc_dev import devstack

if TYPE_CHECKING:
    from extproc.app import Service
    from support.upstream import Upstream

JWT_SECRET = "test-jwt-secret-0123456789abcdef0123456789"
GATE_KEY = "test-gate-key-0123456789"
ADMIN_TOKEN = "test-admin-token-0123456789"
UPSTREAM_KEY = "sk-litellm-test-master-key-0123456789"  # what LiteLLM accepts; clients never hold it


def start_serve(database: str, redis_url: str, logdir: Path, ports: tuple[int, int] | None = None,
                **env: str) -> tuple[subprocess.Popen[bytes], int, int]:
    """`extproc serve` as a real child process; returns (process, grpc port, http port) once
    /readyz answers. Blocking: call it with asyncio.to_thread from async tests."""
    grpc_port, http_port = ports or (devstack.free_port(), devstack.free_port())
    full = {**os.environ, "DATABASE_URL": database, "REDIS_URL": redis_url, "GATE_GRPC_PORT": str(grpc_port),
            "GATE_HTTP_PORT": str(http_port), "GATE_JWT_SECRET": JWT_SECRET, "GATE_KEY": GATE_KEY,
            "GATE_SPOOL_DIR": str(logdir / f"spool-{grpc_port}"), "GATE_EXTRA_BODY_FIELDS": "x_test", **env}
    proc = subprocess.Popen([sys.executable, "-m", "extproc.cli", "serve"], env=full,
                            stdout=(logdir / f"serve-{grpc_port}.log").open("ab"), stderr=subprocess.STDOUT)
    devstack.wait_until(lambda: devstack.http_ok(f"http://127.0.0.1:{http_port}/readyz"), 30, "extproc serve", proc)
    return proc, grpc_port, http_port


def envoy_in_front(workdir: Path, service: Service, upstream: Upstream,
                   template: Path | None = None) -> Iterator[devstack.Envoy]:
    """An Envoy between the test client, the processor under test and the fake upstream,
    stopped when the generator is closed (a session fixture yields from it)."""
    proxy = devstack.Envoy(
        workdir, upstream=("127.0.0.1", upstream.port), template=template,
        extproc=[("127.0.0.1", service.grpc_port)], http=("127.0.0.1", service.http_port))
    proxy.start()
    yield proxy
    proxy.stop()
