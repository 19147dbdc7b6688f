"""The gate end to end: a real Envoy, the processor, real PostgreSQL, a fast fake upstream."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import jwt
import pytest
from support.gate import CHAT, balance, chat, first_usage_entries, ledger_sums, post, settled, usage_entries
from support.stack import GATE_KEY, JWT_SECRET, UPSTREAM_KEY

# ---------------------------------------------------------------- happy paths


async def test_json_debit_equals_usage(http, envoy, service, upstream, auth, user, settings):
    status, headers, body = await post(
        http, envoy, auth(user), chat(x_test={"prompt": 40, "completion": 60}))
    assert status == 200, body
    assert json.loads(body)["usage"]["total_tokens"] == 100
    account = await balance(service, user)
    assert account.balance == settings.default_monthly_tokens - 100
    assert account.reserved == 0
    assert headers["x-solaris-tokens-remaining"] == str(settings.default_monthly_tokens - 100)
    assert headers["x-solaris-quota-used-pct"] == "0.10"
    entries = await usage_entries(service, user)
    assert len(entries) == 1
    e = entries[0]
    assert (e["prompt_tokens"], e["completion_tokens"], e["real_tokens"], e["tokens"]) == (
        40, 60, 100, -100)
    # estimate = ceil(len("Olá, tudo bem?") * 0.376) + the default completion allowance
    assert e["estimate"] == 6 + settings.default_completion_tokens
    assert e["prompt_chars"] == 14
    bal, reserved, total = await ledger_sums(service, user)
    assert bal == total and reserved == 0


async def test_sse_stream_debit_and_include_usage_injection(
        http, envoy, service, upstream, auth, user, settings):
    before = len(upstream.requests)
    async with http.post(envoy.url + CHAT, json=chat(stream=True, x_test={
            "prompt": 11, "completion": 22, "chunks": 4}), headers=auth(user)) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = (await resp.read()).decode()
    assert text.count("data: ") == 6  # 4 chunks + usage + [DONE]
    assert '"usage"' in text
    forwarded = upstream.requests[before]["body"]
    assert forwarded["stream_options"] == {"include_usage": True}
    await settled(service)
    entries = await usage_entries(service, user)
    assert [(e["real_tokens"], list(e["flags"])) for e in entries] == [(33, [])]
    account = await balance(service, user)
    assert account.balance == settings.default_monthly_tokens - 33 and account.reserved == 0


async def test_stream_keeps_existing_stream_options(http, envoy, upstream, auth, user):
    before = len(upstream.requests)
    async with http.post(envoy.url + CHAT, headers=auth(user), json=chat(
            stream=True, stream_options={"include_usage": False, "other": 1})) as resp:
        await resp.read()
    assert upstream.requests[before]["body"]["stream_options"] == {
        "include_usage": True, "other": 1}


async def test_stream_is_not_buffered(http, envoy, auth, user):
    """Chunks reach the client as the upstream writes them, not at the end."""
    async with http.post(envoy.url + CHAT, headers=auth(user), json=chat(
            stream=True, x_test={"chunks": 3, "chunk_delay": 0.4})) as resp:
        started = time.monotonic()
        first = await resp.content.readuntil(b"\n\n")
        first_at = time.monotonic() - started
        await resp.read()
        total = time.monotonic() - started
    assert b"word0" in first
    assert first_at < total - 0.6, (first_at, total)


async def test_stream_without_usage_is_charged_the_reservation(http, envoy, service, auth, user):
    """No usage event: the visible text is not the cost (reasoning tokens are never visible),
    so the exchange is charged what it reserved, flagged."""
    async with http.post(envoy.url + CHAT, headers=auth(user), json=chat(
            stream=True, max_tokens=300, x_test={"usage": "none", "chunks": 5})) as resp:
        assert resp.status == 200
        await resp.read()
    await settled(service)
    [entry] = await usage_entries(service, user)
    assert list(entry["flags"]) == ["no_usage", "reservation", "envoy"]  # bounded: read by Envoy
    # prompt: ceil((14 + len("none")) * 0.376) = 7; the completion: the whole allowance
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (7, 300)
    assert entry["tokens"] == -307 == -entry["estimate"]


async def test_models_listing_passes_through_unmetered(http, envoy, service, auth, user):
    async with http.get(envoy.url + "/v1/models", headers=auth(user)) as resp:
        assert resp.status == 200
        assert (await resp.json())["data"][0]["id"] == "fake"
    assert await balance(service, user) is None  # no account, no money moved


async def test_unmetered_paths_are_refused(http, envoy, upstream, auth, user):
    before = len(upstream.requests)
    for path in ("/v1/images/generations", "/key/generate", "/spend/logs", "/user/new"):
        status, _, body = await post(http, envoy, auth(user), {"model": "x"}, path=path)
        assert status == 404, path
        assert json.loads(body)["error"]["code"] == "not_found"
    assert len(upstream.requests) == before


async def test_embeddings_metered_prompt_only(http, envoy, service, auth, user):
    status, _, body = await post(http, envoy, auth(user), {
        "model": "text-embedding-3-small", "input": "abc",
        "x_test": {"usage": {"prompt_tokens": 3, "total_tokens": 3}}}, path="/v1/embeddings")
    assert status == 200, body
    [entry] = await usage_entries(service, user)
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (3, 0)
    assert entry["estimate"] == 2  # ceil(3 * 0.376), no completion allowance


async def test_trusted_headers_identity_with_email(http, envoy, service, auth, user, upstream):
    before = len(upstream.requests)
    status, _, _ = await post(http, envoy, {**auth(user, via="headers", email="ana@example.com"),
                                            "x-api-key": "client-key"}, chat())
    assert status == 200
    # the client's credentials never reach the upstream: it gets the upstream's own key
    forwarded = {k.lower(): v for k, v in upstream.requests[before]["headers"].items()}
    assert forwarded["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "x-api-key" not in forwarded
    account = await balance(service, user)
    assert account.email == "ana@example.com"


# ---------------------------------------------------------------- budget


async def test_exhausted_balance_gets_402_and_upstream_not_called(
        http, envoy, service, upstream, auth, user, settings):
    await post(http, envoy, auth(user), chat(x_test={"prompt": 1, "completion": 1}))
    assert service.ledger is not None
    await service.ledger.grant(user, -(settings.default_monthly_tokens - 50), actor="test",
                               reason="drain", kind="adjustment")
    before = len(upstream.requests)
    status, headers, body = await post(http, envoy, auth(user), chat())
    assert status == 402
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["type"] == "insufficient_quota" and error["code"] == "quota_exceeded"
    assert "Seu saldo de tokens acabou" in error["message"]
    assert len(upstream.requests) == before
    # a small request still fits the 48 tokens left
    status, _, _ = await post(http, envoy, auth(user), chat("oi", max_tokens=10))
    assert status == 200


async def test_suspended_user_gets_403(http, envoy, service, auth, user):
    await post(http, envoy, auth(user), chat())
    assert service.ledger is not None
    await service.ledger.set_suspended(user, True, actor="test", reason="abuse")
    status, _, body = await post(http, envoy, auth(user), chat())
    assert status == 403
    assert json.loads(body)["error"]["code"] == "account_suspended"
    await service.ledger.set_suspended(user, False, actor="test", reason="ok")
    status, _, _ = await post(http, envoy, auth(user), chat())
    assert status == 200


async def test_onboarding_creates_account_with_default_allowance(
        http, envoy, service, auth, user, settings):
    assert await balance(service, user) is None
    status, _, _ = await post(http, envoy, auth(user), chat(x_test={"prompt": 0, "completion": 0}))
    assert status == 200
    account = await balance(service, user)
    assert account.allowance == settings.default_monthly_tokens
    assert account.plan == "default" and account.state == "active"


# ---------------------------------------------------------------- identity: 401 matrix


def _now() -> int:
    return int(time.time())


@pytest.mark.parametrize("case", [
    "none", "bad_signature", "alg_none", "expired", "wrong_gate_key", "header_without_proof",
    "placeholder", "no_id_claim", "garbage",
])
async def test_401_matrix(http, envoy, upstream, settings, user, case):
    claims = {"id": user, "exp": _now() + 60}
    headers: dict[str, str] = {
        "none": {},
        "bad_signature": {"authorization": "Bearer " + jwt.encode(claims, "wrong-secret-0123456789abcdef0123456789")},
        "alg_none": {"authorization": "Bearer " + jwt.encode(claims, None, algorithm="none")},
        "expired": {"authorization": "Bearer " + jwt.encode(
            {"id": user, "exp": _now() - 3600}, JWT_SECRET)},
        "wrong_gate_key": {"authorization": "Bearer wrong-key", "x-user-id": user},
        "header_without_proof": {"x-user-id": user, "x-user-email": "a@b.c"},
        "placeholder": {"authorization": f"Bearer {GATE_KEY}", "x-user-id": "{{LIBRECHAT_USER_ID}}"},
        "no_id_claim": {"authorization": "Bearer " + jwt.encode({"exp": _now() + 60}, JWT_SECRET)},
        "garbage": {"authorization": "Bearer abc.def.ghi"},
    }[case]
    before = len(upstream.requests)
    status, _, body = await post(http, envoy, headers, chat())
    assert status == 401, body
    assert json.loads(body)["error"]["code"] == "invalid_token"
    assert len(upstream.requests) == before


async def test_body_user_must_match_identity(http, envoy, auth, user, upstream):
    before = len(upstream.requests)
    status, _, body = await post(http, envoy, auth(user), chat(user="someone-else"))
    assert status == 401
    assert "user" in json.loads(body)["error"]["message"]
    assert len(upstream.requests) == before
    status, _, _ = await post(http, envoy, auth(user), chat(user=user))
    assert status == 200


# ---------------------------------------------------------------- exactly once


async def test_same_client_request_id_twice_is_two_debits(http, envoy, service, auth, user):
    headers = {**auth(user), "x-request-id": "client-chosen-id-1"}
    for _ in range(2):
        status, _, _ = await post(http, envoy, headers, chat(x_test={"prompt": 5, "completion": 5}))
        assert status == 200
    entries = await usage_entries(service, user)
    assert len(entries) == 2
    assert {e["request_id"] for e in entries} == {"client-chosen-id-1"}
    assert len({e["exchange_id"] for e in entries}) == 2


async def test_replayed_settle_debits_once(http, envoy, service, auth, user):
    from extproc.ledger import Usage

    await post(http, envoy, auth(user), chat(x_test={"prompt": 5, "completion": 5}))
    [entry] = await usage_entries(service, user)
    assert service.ledger is not None
    replay = Usage(exchange_id=entry["exchange_id"], user_id=user, prompt_tokens=5,
                   completion_tokens=5, model="gpt-4o-mini")
    assert await service.ledger.settle(replay) is None
    assert await service.ledger.settle(replay) is None
    assert len(await usage_entries(service, user)) == 1


# ---------------------------------------------------------------- bad input


async def test_bad_inputs_get_clear_errors_and_no_debit(http, envoy, service, auth, user, upstream):
    await post(http, envoy, auth(user), chat(x_test={"prompt": 1, "completion": 1}))
    start = await balance(service, user)
    before = len(upstream.requests)
    cases = [
        (b"not json at all", 400),
        (b"\xff\xfe\x00garbage", 400),
        (b"[1, 2, 3]", 400),
        (json.dumps({"messages": []}).encode(), 400),  # no model
        (b"[" * 100_000 + b"]" * 100_000, 400),  # deeply nested
        (json.dumps(chat(max_tokens=-5)).encode(), 400),
        (json.dumps(chat(max_tokens="lots")).encode(), 400),
        (json.dumps(chat(max_tokens=10**12)).encode(), 400),
    ]
    for raw, expected in cases:
        status, _, body = await post(http, envoy, auth(user), raw)
        assert status == expected, (raw[:40], status, body[:200])
        assert "error" in json.loads(body)
    assert len(upstream.requests) == before
    after = await balance(service, user)
    assert (after.balance, after.reserved) == (start.balance, 0)


async def test_body_over_limit_is_413(http, envoy, auth, user, settings, upstream):
    before = len(upstream.requests)
    big = chat("x" * (settings.max_body_bytes + 10))
    status, _, body = await post(http, envoy, auth(user), big)
    assert status == 413
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large"
    assert "Inicie uma nova conversa" in error["message"]  # the processor's own reply, kept
    huge = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"y" * (50 << 20) + b'"}]}'
    status, _, body = await post(http, envoy, auth(user), huge)
    assert status == 413
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert len(upstream.requests) == before


async def test_upstream_500_releases_without_debit(http, envoy, service, auth, user):
    await post(http, envoy, auth(user), chat(x_test={"prompt": 1, "completion": 1}))
    start = await balance(service, user)
    status, _, _ = await post(http, envoy, auth(user), chat(x_test={"status": 500}))
    assert status == 500
    after = await balance(service, user)
    assert (after.balance, after.reserved) == (start.balance, 0)
    assert len(await usage_entries(service, user)) == 1


@pytest.mark.parametrize("usage", ["none", "garbled"])
async def test_json_without_usable_usage_is_charged_the_reservation(
        http, envoy, service, auth, user, usage, settings):
    status, _, _ = await post(http, envoy, auth(user), chat(
        x_test={"usage": usage, "text": "one two three four"}))
    assert status == 200
    [entry] = await usage_entries(service, user)
    assert list(entry["flags"]) == ["no_usage", "reservation"]
    assert entry["completion_tokens"] == settings.default_completion_tokens
    assert -entry["tokens"] == entry["estimate"] == entry["prompt_tokens"] + settings.default_completion_tokens
    account = await balance(service, user)
    assert account.reserved == 0
    assert account.balance == settings.default_monthly_tokens - entry["estimate"]


async def test_enormous_usage_is_capped(http, envoy, service, auth, user, settings):
    status, _, _ = await post(http, envoy, auth(user), chat(x_test={
        "usage": {"prompt_tokens": 10**15, "completion_tokens": 5}}))
    assert status == 200
    [entry] = await usage_entries(service, user)
    assert "capped" in entry["flags"]
    assert entry["real_tokens"] == settings.max_usage_tokens


async def test_upstream_abort_mid_stream_debits_what_was_seen(http, envoy, service, auth, user):
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(envoy.url + CHAT, headers=auth(user), json=chat(
                stream=True, x_test={"chunks": 6, "abort_after": 3, "chunk_delay": 0.1})) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_any():
                received += chunk
    assert b"word2" in received
    await asyncio.sleep(0.2)  # room for a second (wrong) entry to show
    # the settle follows the processor's own view of the cut, which can trail the client's
    [entry] = await first_usage_entries(service, user)
    # cut before the usage event: the model may have produced more than was passed on
    assert list(entry["flags"]) == ["no_usage", "abandoned", "reservation"]
    assert entry["completion_tokens"] == 1024 and -entry["tokens"] == entry["estimate"]
    account = await balance(service, user)
    assert account.reserved == 0


# ---------------------------------------------------------------- concurrency


async def test_100_concurrent_requests_small_balance(http, patient_envoy, service, auth, user, settings):
    """B1 (the overspend bound): with the full estimate reserved at admission, concurrent requests cannot
    push the balance below zero unless real usage exceeds the estimate; here each costs
    exactly 30 and reserves 6 + 24 = 30, so the bound is zero and exactly floor(B/30) pass.
    (Through an Envoy that waits 10 s per message: a burst on a loaded machine can outlast the
    shipped 1 s, and a 504 is Envoy's answer to a slow processor, not the ledger's.)"""
    envoy = patient_envoy
    assert service.ledger is not None
    await post(http, envoy, auth(user), chat(max_tokens=0, x_test={"prompt": 0, "completion": 0}))
    await service.ledger.grant(user, -(settings.default_monthly_tokens - 1000), actor="test",
                               reason="small balance", kind="adjustment")
    body = chat(max_tokens=24, x_test={"prompt": 6, "completion": 24})
    results = await asyncio.gather(*[post(http, envoy, auth(user), body) for _ in range(100)])
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 402}
    assert statuses.count(200) == 1000 // 30
    bal, reserved, total = await ledger_sums(service, user)
    assert bal == 1000 - 30 * (1000 // 30)
    assert bal >= 0 and reserved == 0
    assert bal == total
    assert service.ledger is not None
    assert await service.ledger.reconcile() == []


async def test_client_abort_mid_stream_is_charged_the_reservation(envoy, service, auth, user):
    """The client hangs up after the first chunks: Envoy resets the ext_proc stream. The
    upstream was called and may go on producing (the provider bills it), so the exchange is
    charged its reservation, flagged; it is not free to hang up."""
    async with aiohttp.ClientSession() as own:
        resp = await own.post(envoy.url + CHAT, headers=auth(user), json=chat(
            stream=True, x_test={"chunks": 30, "chunk_delay": 0.1}))
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        second = await resp.content.readuntil(b"\n\n")
        resp.close()  # drop the connection mid-stream
    assert b"word0" in first and b"word1" in second
    [entry] = await first_usage_entries(service, user)
    assert list(entry["flags"]) == ["no_usage", "abandoned", "reservation"]
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (6, 1024)
    assert (await balance(service, user)).reserved == 0
