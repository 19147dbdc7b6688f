"""`extproc dev` (what `make run` runs) as a real subprocess: it reaches `ready`, the demo
request it prints works through Envoy and is debited, Ctrl-C stops everything and exits 0."""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from extproc_dev import devstack

PORT_VARS = [name for name, _ in devstack.PORTS]


class Output:
    """The lines a child prints, read on a thread so waiting can time out."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        stream = proc.stdout

        def pump() -> None:
            for line in stream:
                self._queue.put(line.rstrip("\n"))
            self._queue.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def until(self, predicate: Any, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no such line after {timeout:.0f}s:\n" + self.text())
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError("extproc dev exited:\n" + self.text())
            self.lines.append(line)
            if predicate(line):
                return line

    def text(self) -> str:
        return "\n".join(self.lines)


def demo_request(curl_line: str) -> tuple[int, dict[str, Any]]:
    """Run a printed `curl ... -H ... -d ...` line with urllib."""
    args = shlex.split(curl_line)
    assert args[0] == "curl"
    url = next(a for a in args if a.startswith("http"))
    headers = dict(args[i + 1].split(": ", 1) for i, a in enumerate(args) if a == "-H")
    data = args[args.index("-d") + 1].encode()
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=30) as resp:
        return resp.status, json.loads(resp.read())


def balance(env: dict[str, str], user: str) -> dict[str, Any]:
    result = subprocess.run([devstack.binary("extproc"), "balance", user, "--json"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def settled_balance(env: dict[str, str], user: str, seconds: float = 30.0) -> dict[str, Any]:
    """The balance once nothing is held: the settle runs right after the reply, off its path,
    so a machine under load can show the reservation a moment longer."""
    deadline = time.monotonic() + seconds
    while (account := balance(env, user))["reserved"] and time.monotonic() < deadline:
        time.sleep(0.2)
    return account


def test_extproc_dev_ready_demo_request_and_ctrl_c(make_database, redis_url, tmp_path: Path):
    # NB: tmp_path contains "ready" (the test's name): nothing naming the workdir may be
    # printed before the real `ready` line, or a script waiting for it would start too early.
    started = time.monotonic()
    ports = {name: devstack.free_port() for name in PORT_VARS}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATE_", "LITELLM_"))}
    env.update({name: str(port) for name, port in ports.items()},
               DATABASE_URL=make_database(migrate=False), REDIS_URL=redis_url,
               PYTHONUNBUFFERED="1")
    workdir = tmp_path / "dev"
    proc = subprocess.Popen([devstack.binary("extproc"), "dev", "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = Output(proc)
    children: list[psutil.Process] = []
    try:
        ready_line = out.until(lambda line: "ready" in line, timeout=120)
        ready_after = time.monotonic() - started
        assert ready_line.startswith("Solaris dev stack ready"), out.text()
        out.until(lambda line: line.strip().startswith("X-User-Email"), timeout=10)
        text = out.text()
        # every development default is printed, the JWT secret persisted in the workdir
        secret = (workdir / "jwt-secret").read_text().strip()
        assert f"GATE_JWT_SECRET={secret}" in text
        assert "GATE_KEY=solaris-dev-gate-key" in text
        assert "GATE_ADMIN_TOKEN=solaris-dev-admin-token" in text
        assert f'baseURL: "http://localhost:{ports["GATE_LISTEN_PORT"]}/v1"' in text
        assert f"http://127.0.0.1:{ports['GATE_HTTP_PORT']}/metrics" in text
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3  # LiteLLM, the processor, Envoy

        curls = [line.strip() for line in out.lines if line.strip().startswith("curl ")]
        assert len(curls) == 2, text  # the JWT and the trusted-headers variants
        for curl in curls:
            assert f"http://127.0.0.1:{ports['GATE_LISTEN_PORT']}/v1/chat/completions" in curl
        status, body = demo_request(curls[0])
        assert status == 200
        assert body["choices"][0]["message"]["content"].startswith("Olá!")
        first = body["usage"]["total_tokens"]
        account = settled_balance(env, "demo-user")
        assert account["used"] == first and account["reserved"] == 0
        assert account["available"] == account["allowance"] == 1_000_000 - first

        status, body = demo_request(curls[1])
        assert status == 200
        account = settled_balance(env, "demo-user")
        assert account["used"] == first + body["usage"]["total_tokens"]

        # the printed admin-JWT command works as printed (from a shell without GATE_*): its
        # token is a console admin's, because the stack makes user `admin` one
        assert "GATE_ADMIN_USERS=admin" in text
        [hint] = [line.split("admin JWT: ", 1)[1] for line in out.lines if "admin JWT: " in line]
        words = shlex.split(hint)
        assigned = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
        assert assigned == {"GATE_JWT_SECRET": secret, "GATE_ADMIN_USERS": "admin"}
        minted = subprocess.run(words[len(assigned):], env={**env, **assigned}, capture_output=True,
                                text=True, timeout=60)
        assert minted.returncode == 0, minted.stderr
        request = urllib.request.Request(
            f"http://127.0.0.1:{ports['GATE_HTTP_PORT']}/api/admin/plans",
            headers={"Authorization": f"Bearer {minted.stdout.strip()}"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200

        stop_started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0, out.text()
        stopped_after = time.monotonic() - stop_started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    for name, port in ports.items():
        assert not devstack.port_open("127.0.0.1", port), f"{name}={port} still open"
    print(f"ready after {ready_after:.1f}s, stopped in {stopped_after:.1f}s")


def test_extproc_dev_stops_everything_when_a_child_dies(make_database, redis_url, tmp_path: Path):
    """`--upstream` (no LiteLLM to wait for): kill the processor, the stack must stop the rest
    and exit non-zero naming the processor's log file."""
    ports = {name: devstack.free_port() for name in PORT_VARS}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATE_", "LITELLM_"))}
    env.update({name: str(port) for name, port in ports.items()},
               DATABASE_URL=make_database(), REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
    nothing_there = f"http://127.0.0.1:{devstack.free_port()}/v1"
    proc = subprocess.Popen(
        [devstack.binary("extproc"), "dev", "--upstream", nothing_there, "--workdir",
         str(tmp_path / "dev")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = Output(proc)
    try:
        out.until(lambda line: "ready" in line, timeout=60)
        assert "LITELLM_MASTER_KEY" not in out.text()  # no mock LiteLLM with --upstream
        children = {p.pid: p for p in psutil.Process(proc.pid).children()}
        [processor] = [p for p in children.values() if "serve" in p.cmdline()]
        processor.kill()
        assert proc.wait(timeout=20) == 1
        out.until(lambda line: line.startswith("Stopped"), timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert f"error: extproc exited unexpectedly with code -9; its log is {tmp_path / 'dev'}/extproc.log" \
        in out.text()
    assert not [c for c in children.values() if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    for name, port in ports.items():
        assert not devstack.port_open("127.0.0.1", port), f"{name}={port} still open"
