"""Prometheus metrics move as requests flow; health endpoints and the gRPC health service."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from support.gate import settled


async def scrape(http, service) -> dict[tuple[str, tuple], float]:
    async with http.get(f"http://127.0.0.1:{service.http_port}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_follow_requests(http, envoy, service, auth, user):
    before = await scrape(http, service)
    body = {"model": "metrics-model", "messages": [{"role": "user", "content": "x"}],
            "x_test": {"prompt": 3, "completion": 4}}
    async with http.post(envoy.url + "/v1/chat/completions", json=body, headers=auth(user)) as resp:
        assert resp.status == 200
    async with http.post(envoy.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 401
    await settled(service)  # tokens are counted by the settle that follows the reply
    after = await scrape(http, service)
    assert value(after, "solaris_decisions_total", outcome="allowed") == value(
        before, "solaris_decisions_total", outcome="allowed") + 1
    assert value(after, "solaris_decisions_total", outcome="401") == value(
        before, "solaris_decisions_total", outcome="401") + 1
    assert value(after, "solaris_tokens_debited_total", model="metrics-model", kind="prompt") == 3
    assert value(after, "solaris_tokens_debited_total", model="metrics-model", kind="completion") == 4
    for phase in ("request_headers", "request_body", "response_headers", "response_body"):
        assert value(after, "solaris_extproc_phase_seconds_count", phase=phase) > value(
            before, "solaris_extproc_phase_seconds_count", phase=phase)
    assert value(after, "solaris_ledger_transaction_seconds_count", operation="settle") > 0
    assert value(after, "solaris_real_to_estimate_ratio_count") > 0
    assert ("solaris_alert_outbox_pending", ()) in after
    # no user id ever becomes a label
    assert not any(user in str(labels) for _, labels in after)


async def test_group_commit_is_exported(http, service, user):
    """Operators see the ledger's batching (read at scrape time: nothing on the hot path): every
    admission and settle is carried by exactly one batch; 20 submitted at once take one statement
    per batch in flight plus one for all that queued behind them."""
    from extproc.ledger import Usage

    ledger = service.ledger
    assert ledger is not None
    before = await scrape(http, service)
    ids = [f"batch-{user}-{i}" for i in range(20)]
    admissions = await asyncio.gather(*[ledger.admit(user, 10, i) for i in ids])
    assert all(a.outcome == "ok" for a in admissions)
    await asyncio.gather(*[ledger.settle(Usage(exchange_id=i, user_id=user, prompt_tokens=1, completion_tokens=1))
                           for i in ids])
    after = await scrape(http, service)

    def delta(name: str, operation: str) -> float:
        return value(after, name, operation=operation) - value(before, name, operation=operation)

    # admissions: two batches in flight at most, so the first two go alone and 18 share one
    assert (delta("solaris_ledger_batched_operations_total", "admit"),
            delta("solaris_ledger_batches_total", "admit")) == (20, 3)
    # settles: one in flight, the other 19 share the next
    assert (delta("solaris_ledger_batched_operations_total", "settle"),
            delta("solaris_ledger_batches_total", "settle")) == (20, 2)


async def test_health_endpoints(http, service):
    async with http.get(f"http://127.0.0.1:{service.http_port}/healthz") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ok"
    async with http.get(f"http://127.0.0.1:{service.http_port}/readyz") as resp:
        ready = await resp.json()
        assert resp.status == 200
        assert ready == {"postgres": "ok", "redis": "ok", "status": "ready"}


async def test_grpc_health_service(service):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_readyz_reports_pending_migrations(http, settings, make_database):
    from extproc.app import Service

    svc = Service(settings.replace(database_url=make_database(migrate=False)))
    await svc.start()
    try:
        async with http.get(f"http://127.0.0.1:{svc.http_port}/readyz") as resp:
            body = await resp.json()
        assert resp.status == 503 and body["status"] == "not ready"
        assert body["postgres"] == "not migrated: run `extproc migrate`"
    finally:
        await svc.stop(grace=1)
