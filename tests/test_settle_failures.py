"""Every settle is applied, spooled or recorded, never dropped: the ledger failing at settle
time in ways other than "unreachable" (read-only during a failover, a data error), a
release that cannot reach the ledger, and a spool that cannot be written."""

from __future__ import annotations

import json
import logging

import asyncpg
import pytest
from support.gate import balance, chat, post, settled, usage_entries

from extproc.gate.decisions import path_is_under, upstream_credentials
from extproc.ledger import LedgerUnavailable, Usage


@pytest.fixture
def broken(service, monkeypatch):
    """Make one ledger method raise ``exc`` until the test restores it."""

    def breaking(method: str, exc: BaseException) -> None:
        async def fail(*args, **kwargs):
            raise exc

        monkeypatch.setattr(service.ledger, method, fail)

    return breaking


async def test_read_only_database_at_settle_is_spooled_then_applied(
        http, envoy, service, auth, user, broken, monkeypatch, settings):
    await post(http, envoy, auth(user), chat(x_test={"prompt": 1, "completion": 1}), service=service)
    before = service.metrics.spooled._value.get()
    broken("settle", asyncpg.exceptions.ReadOnlySQLTransactionError("read-only transaction"))
    status, _, _ = await post(http, envoy, auth(user), chat(x_test={"prompt": 30, "completion": 70}),
                              service=service)
    assert status == 200
    assert service.metrics.spooled._value.get() == before + 1
    monkeypatch.undo()
    result = await service.spool.replay(service.ledger)
    assert result.replayed >= 1 and result.quarantined == 0
    debits = sorted(-e["tokens"] for e in await usage_entries(service, user))
    assert debits == [2, 100]
    account = await balance(service, user)
    assert account.balance == settings.default_monthly_tokens - 102 and account.reserved == 0
    assert await service.ledger.reconcile() == []


async def test_release_that_cannot_reach_the_ledger_is_spooled_at_zero_cost(
        http, envoy, service, auth, user, broken, monkeypatch, settings):
    broken("release", LedgerUnavailable("connection refused"))
    status, _, _ = await post(http, envoy, auth(user), chat(x_test={"status": 500}), service=service)
    assert status == 500
    monkeypatch.undo()
    held = (await balance(service, user)).reserved
    assert held > 0  # the release did not happen: the hold is still there
    await service.spool.replay(service.ledger)
    account = await balance(service, user)
    assert (account.balance, account.reserved) == (settings.default_monthly_tokens, 0)
    [entry] = await usage_entries(service, user)
    assert (entry["tokens"], list(entry["flags"])) == (0, ["released"])
    assert await service.ledger.reconcile() == []


async def test_settle_neither_applied_nor_spooled_is_logged_whole(
        http, envoy, service, auth, user, broken, monkeypatch, caplog):
    broken("settle", LedgerUnavailable("down"))

    async def disk_gone(usage):
        raise OSError("no space left on device")

    monkeypatch.setattr(service.spool, "append", disk_gone)
    lost = service.metrics.settles_lost._value.get()
    with caplog.at_level(logging.ERROR, logger="extproc.gate.decisions"):
        status, _, _ = await post(
            http, envoy, auth(user, via="headers", email="ana@example.com"),
            chat(x_test={"prompt": 3, "completion": 4}), service=service)
        await settled(service)
    assert status == 200
    assert service.metrics.settles_lost._value.get() == lost + 1
    [line] = [r for r in caplog.records if "SETTLE NOT SPOOLED" in r.getMessage()]
    text = line.getMessage()
    assert user in text and '"prompt_tokens": 3' in text and '"completion_tokens": 4' in text
    assert "ana@example.com" not in text  # the record, without personal data
    monkeypatch.undo()
    # the logged record is enough for an operator to apply the settle by hand
    record = json.loads(text.split("SETTLE NOT SPOOLED ", 1)[1].splitlines()[0])
    assert await service.ledger.settle(Usage.from_json(record)) is not None
    account = await balance(service, user)
    assert (account.reserved, -(await usage_entries(service, user))[0]["tokens"]) == (0, 7)


@pytest.mark.parametrize("path,opened", [
    ("/v1/audio", True), ("/v1/audio/speech", True), ("/v1/audiobook", False),
    ("/v1/audio-x/y", False), ("/v1", False),
])
def test_open_paths_match_whole_segments(path: str, opened: bool) -> None:
    assert path_is_under(path, ("/v1/audio",)) is opened
    assert path_is_under(path, ("/v1/audio/",)) is opened
    assert path_is_under(path, ()) is False


def test_a_custom_jwt_header_is_not_forwarded() -> None:
    swap = upstream_credentials("sk-up", "X-Solaris-Token")
    assert swap.set_headers == (("authorization", "Bearer sk-up"),)
    assert set(swap.remove_headers) == {"x-api-key", "x-solaris-token", "accept-encoding"}
    without_key = upstream_credentials("", "authorization")
    assert set(without_key.remove_headers) == {"authorization", "x-api-key", "accept-encoding"}


async def test_upstream_steering_headers_and_compression_never_reach_litellm(
        http, envoy, upstream, auth, user):
    before = len(upstream.requests)
    headers = {**auth(user), "x-litellm-model": "expensive-model", "X-LiteLLM-Num-Retries": "5",
               "x-litellm-api-key": "sk-other", "accept-encoding": "gzip, br"}
    status, _, _ = await post(http, envoy, headers, chat())
    assert status == 200
    forwarded = {k.lower() for k in upstream.requests[before]["headers"]}
    assert not {h for h in forwarded if h.startswith("x-litellm-")}
    assert "accept-encoding" not in forwarded
    # the pass-through reply carries the same removal (a copy of the precomputed one)
    async with http.get(envoy.url + "/v1/models", headers={**auth(user), "x-litellm-model": "m"}) as resp:
        assert resp.status == 200


def _admit_then_lose_the_reply(service, monkeypatch, exc: BaseException) -> None:
    """The admission commits in PostgreSQL, but the processor never hears back (a connection
    cut after the commit): the hold exists while the client is refused."""
    real_admit = service.ledger.admit

    async def admit(*args, **kwargs):
        await real_admit(*args, **kwargs)
        raise exc

    monkeypatch.setattr(service.ledger, "admit", admit)


async def test_admission_whose_reply_was_lost_holds_nothing(
        http, envoy, service, upstream, auth, user, monkeypatch, settings):
    _admit_then_lose_the_reply(service, monkeypatch, LedgerUnavailable("connection lost"))
    before = len(upstream.requests)
    status, _, body = await post(http, envoy, auth(user), chat(), service=service)
    assert status == 503 and json.loads(body)["error"]["code"] == "ledger_unavailable"
    assert len(upstream.requests) == before
    account = await balance(service, user)
    assert (account.balance, account.reserved) == (settings.default_monthly_tokens, 0)
    assert await usage_entries(service, user) == []
    assert await service.ledger.reconcile() == []


async def test_admission_bug_after_commit_is_a_500_that_holds_nothing(
        http, envoy, service, auth, user, monkeypatch, settings):
    _admit_then_lose_the_reply(service, monkeypatch, RuntimeError("bug after the commit"))
    status, _, body = await post(http, envoy, auth(user), chat(), service=service)
    assert status == 500 and json.loads(body)["error"]["code"] == "internal_error"
    account = await balance(service, user)
    assert (account.balance, account.reserved) == (settings.default_monthly_tokens, 0)


async def test_lost_admission_reply_with_the_ledger_down_is_given_back_after_a_sweep(
        http, envoy, service, auth, user, monkeypatch, settings):
    _admit_then_lose_the_reply(service, monkeypatch, LedgerUnavailable("connection lost"))

    async def down(*args, **kwargs):
        raise LedgerUnavailable("still down")

    monkeypatch.setattr(service.ledger, "release", down)
    status, _, _ = await post(http, envoy, auth(user), chat(), service=service)
    assert status == 503
    monkeypatch.undo()
    held = (await balance(service, user)).reserved
    assert held > 0
    # the hold outlives its TTL before the spool is replayed: the sweep charges it ...
    await service.pool.execute(
        "UPDATE reservations SET expires_at = now() - interval '1 second' WHERE user_id = $1", user)
    await service.ledger.sweep_reservations()
    assert (await balance(service, user)).balance == settings.default_monthly_tokens - held
    # ... and the spooled release gives it back, once
    await service.spool.replay(service.ledger)
    await service.spool.replay(service.ledger)
    account = await balance(service, user)
    assert (account.balance, account.reserved) == (settings.default_monthly_tokens, 0)
    assert sum(e["tokens"] for e in await usage_entries(service, user)) == 0
    assert await service.ledger.reconcile() == []


async def test_a_spooled_release_where_nothing_was_held_writes_nothing(service, user):
    assert await service.ledger.settle(
        Usage(exchange_id="never-held-" + user, user_id=user, flags=("released",), cost=0)) is None
    assert await service.ledger.account(user) is None  # no account opened for it
