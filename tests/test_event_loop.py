"""`extproc serve` chooses its event loop (GATE_EVENT_LOOP): uvloop by default, asyncio's on
request or when uvloop cannot be imported (with a warning), and a bad value refuses to start.

Real processes: the gate served on each loop takes a buffered and a streamed exchange through
Envoy, debits each exactly once and stops gracefully on SIGTERM; the "serving" log line says
which loop ran it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from support.gate import CHAT, chat
from support.stack import JWT_SECRET, start_serve

from extproc.identity import mint_token
from extproc.settings import Settings
from extproc_dev import devstack


def _log_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            continue
    return lines


def _serving_loop(path: Path) -> str:
    serving = [line for line in _log_lines(path) if line.get("msg") == "serving"]
    assert len(serving) == 1, path.read_text()
    return serving[0]["event_loop"]


def _start_noop(tmp_path: Path, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
    """`extproc serve --noop` (no database, no Redis: only the loop is under test); returns once
    its gRPC port accepts connections and its "serving" line is in the log (the port opens
    first: a loaded machine can read the log in between)."""
    port = devstack.free_port()
    log = tmp_path / f"noop-{port}.log"
    full = {**os.environ, "GATE_GRPC_PORT": str(port), "GATE_HTTP_PORT": str(devstack.free_port()), **env}
    proc = subprocess.Popen([sys.executable, "-m", "extproc.cli", "serve", "--noop"], env=full,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    devstack.wait_until(lambda: devstack.port_open("127.0.0.1", port), 30, "extproc serve --noop", proc)
    devstack.wait_until(lambda: any(line.get("msg") == "serving" for line in _log_lines(log)), 30,
                        "the serving log line", proc)
    return proc, log


@pytest.mark.parametrize(("configured", "expected"), [("", "uvloop"), ("asyncio", "asyncio")])
async def test_gate_served_on_the_configured_loop_meters_exchanges(
        configured, expected, http, make_database, redis_url, upstream, tmp_path):
    database = make_database()
    # "" is unset (the default); an inherited GATE_EVENT_LOOP must not decide the case.
    proc, grpc_port, http_port = await asyncio.to_thread(
        start_serve, database, redis_url, tmp_path, GATE_EVENT_LOOP=configured)
    proxy = devstack.Envoy(tmp_path, upstream=("127.0.0.1", upstream.port), extproc=[("127.0.0.1", grpc_port)],
                           http=("127.0.0.1", http_port), health_check=False)
    user = f"loop-{expected}-{uuid.uuid4().hex[:6]}"
    headers = {"authorization": f"Bearer {mint_token(Settings(jwt_secret=JWT_SECRET), user)}"}
    try:
        await asyncio.to_thread(proxy.start)
        async with http.post(proxy.url + CHAT, json=chat(x_test={"prompt": 7, "completion": 5}),
                             headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            assert "x-solaris-tokens-remaining" in resp.headers  # it went through the gate
        async with http.post(proxy.url + CHAT, json=chat(stream=True, x_test={"chunks": 40, "prompt": 3,
                                                                               "completion": 40}),
                             headers=headers) as resp:
            assert resp.status == 200
            body = await resp.read()
        assert body.count(b"data: ") >= 40 and b"[DONE]" in body
        proc.send_signal(signal.SIGTERM)  # the loop's signal handler: graceful stop, settles done
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        proxy.stop()
        devstack.stop_process(proc)
    assert _serving_loop(tmp_path / f"serve-{grpc_port}.log") == expected
    conn = await asyncpg.connect(database)
    try:
        rows = await conn.fetch("SELECT real_tokens FROM ledger_entries WHERE user_id = $1 AND kind = 'usage'"
                                " ORDER BY id", user)
        assert [r["real_tokens"] for r in rows] == [12, 43]
        assert await conn.fetchval("SELECT reserved FROM accounts WHERE user_id = $1", user) == 0
    finally:
        await conn.close()


def test_uvloop_configured_explicitly(tmp_path):
    proc, log = _start_noop(tmp_path, GATE_EVENT_LOOP="uvloop")
    try:
        assert _serving_loop(log) == "uvloop"
    finally:
        devstack.stop_process(proc)
    assert proc.returncode == 0  # SIGTERM through uvloop's signal handler: a clean exit


def test_missing_uvloop_falls_back_to_asyncio_with_a_warning(tmp_path):
    # A module named uvloop that fails to import, first on the path: as on a platform without
    # uvloop's wheel.
    shadow = tmp_path / "no-uvloop"
    shadow.mkdir()
    (shadow / "uvloop.py").write_text('raise ImportError("uvloop is not installed here")\n')
    path = os.pathsep.join(filter(None, [str(shadow), os.environ.get("PYTHONPATH", "")]))
    proc, log = _start_noop(tmp_path, GATE_EVENT_LOOP="", PYTHONPATH=path)
    try:
        assert _serving_loop(log) == "asyncio"
        warnings = [line for line in _log_lines(log) if line.get("level") == "warning"]
        assert any("uvloop cannot be imported" in w["msg"] and "asyncio" in w["msg"] for w in warnings), warnings
    finally:
        devstack.stop_process(proc)
    assert proc.returncode == 0


@pytest.mark.parametrize("value", ["bogus", "UVLOOP", "trio"])
def test_bad_event_loop_refuses_to_start(value, tmp_path):
    port = devstack.free_port()
    env = {**os.environ, "GATE_GRPC_PORT": str(port), "GATE_EVENT_LOOP": value}
    proc = subprocess.run([sys.executable, "-m", "extproc.cli", "serve", "--noop"], env=env,
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2
    assert "GATE_EVENT_LOOP must be uvloop or asyncio" in proc.stderr
    assert not devstack.port_open("127.0.0.1", port)


def test_setting_validated():
    assert Settings().event_loop == "uvloop"
    assert Settings.from_env({"GATE_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
    with pytest.raises(ValueError, match="GATE_EVENT_LOOP"):
        Settings.from_env({"GATE_EVENT_LOOP": "libuv"})
