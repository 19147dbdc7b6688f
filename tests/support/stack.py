"""The test stack's secrets, and ``extproc serve`` as a real child process.

conftest.py builds the session's Settings from these; tests that check what a secret does (or
that it never reaches a log) import them from here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from extproc_dev import devstack

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
            "GATE_SPOOL_DIR": str(logdir / f"spool-{grpc_port}"), **env}
    proc = subprocess.Popen([sys.executable, "-m", "extproc.cli", "serve"], env=full,
                            stdout=(logdir / f"serve-{grpc_port}.log").open("ab"), stderr=subprocess.STDOUT)
    devstack.wait_until(lambda: devstack.http_ok(f"http://127.0.0.1:{http_port}/readyz"), 30, "extproc serve", proc)
    return proc, grpc_port, http_port
