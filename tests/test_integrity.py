"""Billing integrity end to end (docs/estimate.md): one test per class of request that could
be answered without the ledger paying for it, through the real Envoy and processor, with
exact numbers. Each of these failed before commit 95d52f1 (n ignored, the first max-token
key won, tools/images/token ids estimated 0, zero estimates admitted at balance 0, weights
applied only at settle, model lists passed through, unreadable usage charged the prompt
only, abandoned buffered requests released, streams cut before usage charged the visible
text, late settles after a sweep discarded, a first e-mail on a known account a 500).

Numbers: the default prompt "Olá, tudo bem?" is 14 characters, ceil(14 x 0.376) = 6 tokens;
``x_test`` (the fake upstream's steering object) carries only numbers and booleans here, so
it adds no billable text.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import shutil
import struct
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.gate import CHAT, balance, chat, gate_settings, ledger_sums, post, settled, spend, usage_entries
from support.stack import GATE_KEY

from extproc.errors import MESSAGES
from extproc.ledger import Usage

HELLO = "Olá, tudo bem?"
HELLO_TOKENS = 6  # ceil(14 x 0.376)
EMBEDDINGS = "/v1/embeddings"
COMPLETIONS = "/v1/completions"


# ---------------------------------------------------------------- helpers


async def open_account(http, envoy, service, auth, user, settings, available: int) -> None:
    """Create the account with a free exchange, then set its available balance exactly."""
    status, _, body = await post(http, envoy, auth(user), chat(
        max_tokens=0, x_test={"prompt": 0, "completion": 0}), service=service)
    assert status == 200, body
    delta = available - settings.default_monthly_tokens
    if delta:
        await service.ledger.grant(user, delta, actor="test", reason="set balance",
                                   kind="adjustment")
    assert (await balance(service, user)).available == available


async def reservation(service, exchange_id: str) -> tuple[int, str]:
    """What the exchange's reservation held and how it ended. A settled hold is deleted and
    its tokens kept on the usage entry (``held``); released and expired holds keep their row."""
    row = await service.pool.fetchrow(
        "SELECT tokens, state FROM reservations WHERE exchange_id = $1", exchange_id)
    if row is not None:
        return row["tokens"], row["state"]
    held = await service.pool.fetchval(
        "SELECT held FROM ledger_entries WHERE exchange_id = $1 AND kind = 'usage'", exchange_id)
    assert held is not None, exchange_id
    return held, "settled"


async def assert_invariants(service, user) -> None:
    """I2/I3 for this user: columns agree with entries and held reservations; nothing held."""
    await settled(service)
    assert [r for r in await service.ledger.reconcile() if r["user_id"] == user] == []
    bal, reserved, total = await ledger_sums(service, user)
    assert reserved == 0
    assert bal == total
    assert (await balance(service, user)).reserved == 0


def pt(n: int) -> str:
    """A number as the Portuguese messages print it (1.030)."""
    return f"{n:,}".replace(",", ".")


def refusal(body: bytes) -> dict[str, Any]:
    return json.loads(body)["error"]


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature and IHDR chunk (all the estimate reads of an image)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF))


async def wait_for(predicate, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


# ---------------------------------------------------------------- 1. n completions


async def test_n_multiplies_the_completion_allowance(
        http, envoy, service, upstream, auth, user, settings):
    await open_account(http, envoy, service, auth, user, settings, available=200)
    body = chat(n=3, max_tokens=100, x_test={"prompt": 6, "completion": 250})
    expected = HELLO_TOKENS + 3 * 100  # 306: one allowance would be 106, under 200
    before = len(upstream.requests)
    status, _, raw = await post(http, envoy, auth(user), body)
    assert status == 402, raw
    error = refusal(raw)
    assert error["code"] == "quota_exceeded"
    assert f"restam 200 tokens e esta mensagem precisa de cerca de {expected}." in error["message"]
    assert len(upstream.requests) == before

    await service.ledger.grant(user, 200, actor="test", reason="top up", kind="adjustment")
    status, _, raw = await post(http, envoy, auth(user), body, service=service)
    assert status == 200, raw
    assert len(upstream.requests) == before + 1
    assert upstream.requests[-1]["body"]["n"] == 3
    [_, entry] = await usage_entries(service, user)
    assert entry["estimate"] == expected
    assert await reservation(service, entry["exchange_id"]) == (expected, "settled")
    assert entry["tokens"] == -256
    assert (await balance(service, user)).available == 400 - 256
    await assert_invariants(service, user)


# ---------------------------------------------------------------- 2. max-token fields


async def test_the_largest_max_token_field_is_reserved(
        http, envoy, service, upstream, auth, user, settings):
    small_first = {"max_completion_tokens": 1, "max_tokens": 5000}
    large_first = {"max_tokens": 1, "max_completion_tokens": 5000}
    for fields in (small_first, large_first):
        status, _, raw = await post(http, envoy, auth(user), chat(
            **fields, x_test={"prompt": 6, "completion": 1}), service=service)
        assert status == 200, raw
    entries = await usage_entries(service, user)
    assert [e["estimate"] for e in entries] == [HELLO_TOKENS + 5000] * 2
    for e in entries:
        assert await reservation(service, e["exchange_id"]) == (HELLO_TOKENS + 5000, "settled")
        assert e["tokens"] == -7

    limit = settings.max_completion_tokens
    before = len(upstream.requests)
    for fields in ({"max_completion_tokens": 1, "max_tokens": limit + 1},
                   {"max_tokens": 1, "max_completion_tokens": limit + 1}):
        status, _, raw = await post(http, envoy, auth(user), chat(**fields))
        assert status == 400, raw
        error = refusal(raw)
        assert error["code"] == "max_tokens_above"
        assert error["message"] == (
            f"Requisição inválida: o limite de tokens de resposta pedido passa de {limit}.")
    assert len(upstream.requests) == before
    assert (await balance(service, user)).balance == settings.default_monthly_tokens - 14
    await assert_invariants(service, user)


# ---------------------------------------------------------------- 3. tool schemas


def big_tools() -> list[dict[str, Any]]:
    properties = {
        f"field_{j}": {"type": "string", "description": f"The value of field {j}, in full detail."}
        for j in range(12)
    }
    return [{"type": "function", "function": {
        "name": f"tool_{i}", "description": f"Tool number {i}: does something useful.",
        "parameters": {"type": "object", "properties": properties,
                       "required": list(properties)}}} for i in range(27)]


async def test_tool_schemas_are_billed_as_prompt(http, envoy, service, auth, user, settings):
    tools = big_tools()
    compact = len(json.dumps(tools, ensure_ascii=False, separators=(",", ":")))
    assert 33_000 < compact < 35_000, compact
    status, _, raw = await post(http, envoy, auth(user), chat(
        tools=tools, max_tokens=10, x_test={"prompt": 9000, "completion": 3}), service=service)
    assert status == 200, raw
    [entry] = await usage_entries(service, user)
    assert entry["prompt_chars"] == 14 + compact
    assert entry["estimate"] == math.ceil((14 + compact) * settings.conversion_factor) + 10
    assert entry["estimate"] >= math.ceil(compact * settings.conversion_factor) + 10
    assert entry["tokens"] == -9003
    await assert_invariants(service, user)


# ---------------------------------------------------------------- 4. images


async def test_images_are_billed_by_tiles(http, envoy, service, auth, user, settings):
    png = "data:image/png;base64," + base64.b64encode(png_header(1024, 1024)).decode()
    images = [
        ({"url": "https://example.com/cat.png", "detail": "low"}, 85),
        ({"url": png}, 765),  # 1024x1024 -> 768x768 -> 2x2 tiles: 85 + 4 x 170
        ({"url": "https://example.com/cat.png"}, 1445),  # size unknown: 8 tiles
    ]
    for image, _ in images:
        content = [{"type": "text", "text": HELLO}, {"type": "image_url", "image_url": image}]
        status, _, raw = await post(http, envoy, auth(user), {
            "model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}],
            "max_tokens": 10, "x_test": {"prompt": 50, "completion": 5}}, service=service)
        assert status == 200, raw
    entries = await usage_entries(service, user)
    assert [e["estimate"] for e in entries] == [HELLO_TOKENS + t + 10 for _, t in images]
    assert [e["estimate"] for e in entries] == [101, 781, 1461]
    assert (await balance(service, user)).balance == settings.default_monthly_tokens - 3 * 55
    await assert_invariants(service, user)


# ---------------------------------------------------------------- 5. token ids


async def test_token_id_inputs_count_one_token_per_id(http, envoy, service, auth, user, settings):
    status, _, raw = await post(http, envoy, auth(user), {
        "model": "gpt-3.5-turbo-instruct", "prompt": list(range(1, 501)), "max_tokens": 10,
        "x_test": {"prompt": 500, "completion": 10}}, path=COMPLETIONS, service=service)
    assert status == 200, raw
    status, _, raw = await post(http, envoy, auth(user), {
        "model": "text-embedding-3-small", "input": [[1, 2, 3], [4, 5]],
        "x_test": {"usage": {"prompt_tokens": 5, "total_tokens": 5}}},
        path=EMBEDDINGS, service=service)
    assert status == 200, raw
    completion, embedding = await usage_entries(service, user)
    assert completion["estimate"] == 500 + 10
    assert embedding["estimate"] == 5
    assert (completion["tokens"], embedding["tokens"]) == (-510, -5)
    assert (await balance(service, user)).balance == settings.default_monthly_tokens - 515
    await assert_invariants(service, user)


# ---------------------------------------------------------------- 6. nothing is free at 0


async def test_zero_balance_refuses_every_metered_path(
        http, envoy, service, upstream, auth, user, settings):
    await open_account(http, envoy, service, auth, user, settings, available=0)
    before = len(upstream.requests)
    cases = [
        (CHAT, chat(), HELLO_TOKENS + settings.default_completion_tokens),
        (CHAT, chat("", max_tokens=0), 1),
        (EMBEDDINGS, {"model": "text-embedding-3-small", "input": ""}, 1),
        (COMPLETIONS, {"model": "gpt-3.5-turbo-instruct", "prompt": "", "max_tokens": 0}, 1),
    ]
    for path, body, needed in cases:
        status, _, raw = await post(http, envoy, auth(user), body, path=path)
        assert status == 402, (path, body, raw)
        error = refusal(raw)
        assert error["code"] == "quota_exceeded"
        assert f"restam 0 tokens e esta mensagem precisa de cerca de {pt(needed)}." in error["message"]
    assert len(upstream.requests) == before
    account = await balance(service, user)
    assert (account.balance, account.available) == (0, 0)
    assert len(await usage_entries(service, user)) == 1  # the opening exchange only
    await assert_invariants(service, user)


# ---------------------------------------------------------------- 7. weights at admission


async def test_weight_applies_to_the_reservation_and_the_debit(
        http, envoy, service, upstream, auth, user, settings, monkeypatch):
    monkeypatch.setattr(service.gate, "weights", {"heavy-model": 10.0})
    monkeypatch.setattr(service.ledger, "_weights", {"heavy-model": 10.0})
    await open_account(http, envoy, service, auth, user, settings, available=500)
    body = {**chat(max_tokens=100, x_test={"prompt": 6, "completion": 50}), "model": "heavy-model"}
    estimate = HELLO_TOKENS + 100  # 106 would fit in 500; x 10 = 1,060 does not
    before = len(upstream.requests)
    status, _, raw = await post(http, envoy, auth(user), body)
    assert status == 402, raw
    assert "restam 500 tokens e esta mensagem precisa de cerca de 1.060." in refusal(raw)["message"]
    assert len(upstream.requests) == before

    await service.ledger.grant(user, 1000, actor="test", reason="top up", kind="adjustment")
    with gate_settings(service, json_usage="processor"):  # the remaining-tokens header is its
        status, headers, raw = await post(http, envoy, auth(user), body, service=service)
    assert status == 200, raw
    assert len(upstream.requests) == before + 1
    [_, entry] = await usage_entries(service, user)
    assert entry["estimate"] == estimate
    assert await reservation(service, entry["exchange_id"]) == (10 * estimate, "settled")
    assert entry["real_tokens"] == 56
    assert entry["tokens"] == -math.ceil(56 * 10.0) == -560
    assert headers["x-solaris-tokens-remaining"] == str(1500 - 560)
    assert (await balance(service, user)).available == 1500 - 560
    await assert_invariants(service, user)


# ---------------------------------------------------------------- 8. fan-out refused


async def test_model_lists_and_fan_out_keys_are_refused(
        http, envoy, service, upstream, auth, user):
    before = len(upstream.requests)
    cases = [
        ({**chat(), "model": "a,b"}, "model_list",
         "Requisição inválida: uma lista de modelos ('a,b') dispara várias chamadas e não é "
         "aceita; escolha um modelo."),
        (chat(fallbacks=["gpt-4o"]), "fan_out",
         "Requisição inválida: o campo 'fallbacks' muda como o proxy chama o modelo (outros "
         "modelos, credenciais, repetições ou parâmetros do provedor) e não é aceito."),
        (chat(api_base="http://attacker.example/v1"), "fan_out",
         "Requisição inválida: o campo 'api_base' muda como o proxy chama o modelo (outros "
         "modelos, credenciais, repetições ou parâmetros do provedor) e não é aceito."),
    ]
    for body, code, message in cases:
        status, _, raw = await post(http, envoy, auth(user), body)
        assert status == 400, raw
        error = refusal(raw)
        assert (error["type"], error["code"], error["message"]) == (
            "invalid_request_error", code, message)
    assert len(upstream.requests) == before
    assert await balance(service, user) is None  # refused before admission: no account


async def test_litellm_body_parameters_never_reach_it(http, envoy, service, upstream, auth, user):
    """Found by an adversarial review against a real LiteLLM: ``model_list`` sent the request
    to the client's own server with the operator's provider key (and a model the gate did not
    price), ``additional_drop_params`` stripped the completion limit and the ``include_usage``
    the gate wrote. Refused now, as is every field the schema does not have; a model name with
    a NUL or a lone surrogate is a 400, not the 500 it was."""
    before = len(upstream.requests)
    planted = [{"model_name": "gpt-4o-mini", "litellm_params": {
        "model": "openai/gpt-4o", "api_base": "http://attacker.example/v1"}}]
    cases = [
        (chat(model_list=planted), "fan_out", "o campo 'model_list' muda como o proxy chama o modelo"),
        (chat(stream=True, max_tokens=1, additional_drop_params=["max_tokens", "stream_options"]), "fan_out",
         "o campo 'additional_drop_params' muda como o proxy chama o modelo"),
        (chat(aws_secret_access_key="x", aws_region_name="us-east-1"), "unknown_field",
         "o campo 'aws_secret_access_key' não é aceito neste gateway"),
        (chat(thinking={"type": "enabled", "budget_tokens": 100_000}), "unknown_field",
         "o campo 'thinking' não é aceito neste gateway"),
        # found by an audit of LiteLLM's nested readings: hosted tools are passed on, billed per call
        (chat(tools=[{"type": "web_search_preview"}]), "tool_not_allowed",
         "ferramentas do tipo 'web_search_preview' não são aceitas"),
        (chat(metadata={"user_id": "someone-else"}), "bad_metadata", "'metadata.user_id' não é aceito"),
    ]
    for body, code, message in cases:
        status, _, raw = await post(http, envoy, auth(user), body)
        assert status == 400, raw
        error = refusal(raw)
        assert error["code"] == code and message in error["message"], error
    # Raw JSON: a lone surrogate is valid JSON text; quoted back in the refusal it must not
    # turn the error reply itself into a 500.
    raw_cases = [('"model": "gpt-4o-mini\\u0000"', "model_invalid"), ('"model": "gpt-4o-mini\\ud800"', "model_invalid"),
                 ('"model": "gpt-4o-mini\\u001b[2J"', "model_invalid"), ('"model": "a,\\ud800"', "model_invalid"),
                 ('"model": "gpt-4o-mini", "\\ud800x": 1', "unknown_field"),
                 ('"model": "gpt-4o-mini", "service_tier": "\\ud800"', "service_tier"),
                 ('"model": "gpt-4o-mini", "metadata": {"tags": "premium"}', "bad_metadata")]
    for raw_model, code in raw_cases:
        raw_body = json.dumps(chat()).replace('"model": "gpt-4o-mini"', raw_model).encode()
        status, _, answer = await post(http, envoy, auth(user), raw_body)
        assert status == 400, (raw_model, answer)
        assert refusal(answer)["code"] == code, (raw_model, answer)
    assert len(upstream.requests) == before
    assert await balance(service, user) is None


# ---------------------------------------------------------------- 9. unreadable usage


@pytest.mark.parametrize("reader", ["processor", "envoy"])
async def test_2xx_json_list_is_charged_the_reservation(
        http, envoy, service, upstream, auth, user, settings, reader):
    before = len(upstream.requests)
    with gate_settings(service, json_usage=reader):
        status, _, raw = await post(http, envoy, auth(user), chat(
            max_tokens=100, x_test={"json_list": True}), service=service)
    assert status == 200, raw
    assert isinstance(json.loads(raw), list)
    assert len(upstream.requests) == before + 1
    [entry] = await usage_entries(service, user)
    assert list(entry["flags"]) == ["no_usage", "reservation"] + (["envoy"] if reader == "envoy" else [])
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (HELLO_TOKENS, 100)
    assert entry["tokens"] == -106 == -entry["estimate"]
    assert (await balance(service, user)).balance == settings.default_monthly_tokens - 106
    await assert_invariants(service, user)


# ---------------------------------------------------------------- 10. abandoned, buffered


async def test_abandoned_buffered_request_is_charged_the_reservation(
        envoy, service, upstream, auth, user, settings):
    before = len(upstream.requests)

    async def in_flight() -> bool:
        return len(upstream.requests) > before

    async with aiohttp.ClientSession() as own:
        request = asyncio.create_task(own.post(envoy.url + CHAT, headers=auth(user), json=chat(
            max_tokens=50, x_test={"delay": 1.0})))
        await wait_for(in_flight)  # the upstream was called; its answer takes 1 s
        await asyncio.sleep(0.1)
        assert not request.done()
        request.cancel()  # the client gives up and closes its connection
        with pytest.raises(asyncio.CancelledError):
            await request

    async def charged() -> bool:
        return bool(await usage_entries(service, user))

    await wait_for(charged)
    assert len(upstream.requests) == before + 1
    [entry] = await usage_entries(service, user)
    assert list(entry["flags"]) == ["no_usage", "abandoned", "reservation"]
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (HELLO_TOKENS, 50)
    assert entry["tokens"] == -56 == -entry["estimate"]
    assert await reservation(service, entry["exchange_id"]) == (56, "settled")
    assert (await balance(service, user)).balance == settings.default_monthly_tokens - 56
    await asyncio.sleep(1.0)  # the upstream's late answer changes nothing
    await assert_invariants(service, user)
    assert len(await usage_entries(service, user)) == 1


# ---------------------------------------------------------------- 11. stream cut before usage


async def test_stream_cut_after_stop_before_usage_is_charged_the_reservation(
        http, envoy, service, upstream, auth, user, settings):
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(envoy.url + CHAT, headers=auth(user), json=chat(
                stream=True, max_tokens=100,
                x_test={"chunks": 2, "abort_before_usage": True})) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_any():
                received += chunk
    assert b"word1" in received and b'"finish_reason": "stop"' in received
    assert b'"usage"' not in received

    async def charged() -> bool:
        return bool(await usage_entries(service, user))

    await wait_for(charged)
    [entry] = await usage_entries(service, user)
    # the visible text ("word0 word1 ") would be 4 tokens: the reservation is charged (bounded:
    # the stream was handed to Envoy, docs/streams.md, which charges the same)
    assert list(entry["flags"]) == ["no_usage", "abandoned", "reservation", "envoy"]
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (HELLO_TOKENS, 100)
    assert entry["tokens"] == -106 == -entry["estimate"]
    assert (await balance(service, user)).balance == settings.default_monthly_tokens - 106
    await assert_invariants(service, user)


# ---------------------------------------------------------------- 12. late settle true-up (I5)


async def test_late_settle_after_sweep_is_trued_up_once(
        http, envoy, service, upstream, auth, user, settings):
    ledger = service.ledger
    before = len(upstream.requests)
    request = asyncio.create_task(post(http, envoy, auth(user), chat(
        max_tokens=100, x_test={"delay": 1.5, "prompt": 20, "completion": 30})))

    async def in_flight() -> bool:
        return len(upstream.requests) > before

    await wait_for(in_flight)
    # Only this user's hold is made to expire (a clock moved forward would sweep every other
    # test's holds in the shared session database too).
    await service.pool.execute(
        "UPDATE reservations SET expires_at = $2 WHERE user_id = $1 AND state = 'held'",
        user, ledger.clock() - timedelta(seconds=1))
    assert await ledger.sweep_reservations() >= 1
    [swept] = await usage_entries(service, user)
    assert list(swept["flags"]) == ["expired"] and swept["tokens"] == -106
    assert await reservation(service, swept["exchange_id"]) == (106, "expired")
    assert not request.done()

    status, _, raw = await request
    assert status == 200, raw
    assert json.loads(raw)["usage"]["total_tokens"] == 50
    await settled(service)
    entries = await usage_entries(service, user)
    assert len(entries) == 2
    trueup = entries[1]
    assert "trueup" in trueup["flags"]
    assert trueup["idempotency_key"] == f"trueup:{swept['exchange_id']}"
    assert trueup["tokens"] == 106 - 50  # gives back what the sweep over-charged
    assert sum(e["tokens"] for e in entries) == -50
    account = await balance(service, user)
    assert account.balance == settings.default_monthly_tokens - 50

    replay = Usage(exchange_id=swept["exchange_id"], user_id=user, model="gpt-4o-mini",
                   prompt_tokens=20, completion_tokens=30, estimate=106)
    assert await ledger.settle(replay) is None
    assert [dict(e) for e in await usage_entries(service, user)] == [dict(e) for e in entries]
    assert (await balance(service, user)).balance == settings.default_monthly_tokens - 50
    await assert_invariants(service, user)


# ---------------------------------------------------------------- 13. identity details change


async def test_identity_details_appearing_and_changing_never_500(
        http, envoy, service, auth, user, settings):
    import openai

    body = chat(max_tokens=10, x_test={"prompt": 1, "completion": 1})
    status, _, raw = await post(http, envoy, auth(user), body, service=service)  # JWT, no e-mail
    assert status == 200, raw
    account = await balance(service, user)
    assert (account.email, account.name) == (None, None)

    status, _, raw = await post(http, envoy, auth(user, via="headers", email="ana@example.com"),
                                body, service=service)
    assert status == 200, raw
    assert (await balance(service, user)).email == "ana@example.com"

    client = openai.AsyncOpenAI(
        base_url=envoy.url + "/v1", api_key=GATE_KEY, max_retries=0,
        default_headers={"x-user-id": user, "x-user-email": "ana.souza@example.com"})
    async with client:
        answer = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": HELLO}], max_tokens=10,
            extra_body={"x_test": {"prompt": 1, "completion": 1}})
    assert answer.usage is not None and answer.usage.total_tokens == 2
    await settled(service)
    assert (await balance(service, user)).email == "ana.souza@example.com"

    headers = {**auth(user, via="headers", email="ana.souza@example.com"),
               "x-user-name": "Ana Souza"}
    status, _, raw = await post(http, envoy, headers, body, service=service)
    assert status == 200, raw
    account = await balance(service, user)
    assert (account.email, account.name) == ("ana.souza@example.com", "Ana Souza")
    assert account.balance == settings.default_monthly_tokens - 4 * 2
    await assert_invariants(service, user)


# ---------------------------------------------------------------- 14. internal error


async def test_internal_error_is_a_translated_500_and_releases_the_hold(
        http, envoy, service, upstream, auth, user, settings, monkeypatch):
    def boom(ex: Any, headers: Any, end_of_stream: bool) -> Any:
        raise RuntimeError("bug at response time")

    monkeypatch.setattr(service.gate, "response_headers", boom)
    before = len(upstream.requests)
    status, headers, raw = await post(http, envoy, auth(user), chat(
        max_tokens=100, x_test={"prompt": 6, "completion": 50}), service=service)
    monkeypatch.undo()
    assert status == 500, raw
    assert headers["content-type"] == "application/json"
    assert json.loads(raw) == {"error": {
        "message": MESSAGES["pt-BR"]["internal_error"], "type": "api_error",
        "code": "internal_error"}}
    assert "Nada foi cobrado" in MESSAGES["pt-BR"]["internal_error"]
    assert len(upstream.requests) == before + 1
    assert await usage_entries(service, user) == []
    held = await service.pool.fetch(
        "SELECT tokens, state FROM reservations WHERE user_id = $1", user)
    assert [(r["tokens"], r["state"]) for r in held] == [(106, "released")]
    account = await balance(service, user)
    assert (account.balance, account.reserved) == (settings.default_monthly_tokens, 0)
    await assert_invariants(service, user)


# ---------------------------------------------------------------- 15. LangChain, as LibreChat


async def test_langchain_chatopenai_as_a_librechat_custom_endpoint(
        envoy, service, upstream, auth, user, settings):
    """LibreChat drives a custom endpoint with LangChain's ChatOpenAI: its gateway key as the
    API key, the user's identity in headers, streaming with usage, tools bound. The account
    was first seen by JWT without an e-mail (the case that used to answer 500 forever)."""
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    async with aiohttp.ClientSession() as own:
        status, _, raw = await post(own, envoy, auth(user), chat(
            max_tokens=1, x_test={"prompt": 1, "completion": 1}), service=service)
    assert status == 200, raw

    def lookup_order(order_id: str) -> str:
        """Look up an order by its id."""
        return order_id

    model = ChatOpenAI(
        model="gpt-4o-mini", base_url=envoy.url + "/v1", api_key=GATE_KEY, streaming=True,
        stream_usage=True, max_tokens=50, max_retries=0,
        default_headers={"X-User-Id": user, "X-User-Email": "bia@example.com", "X-User-Name": "Bia"},
        extra_body={"x_test": {"prompt": 40, "completion": 9, "chunks": 3}},
    ).bind_tools([lookup_order])
    before = len(upstream.requests)
    chunks = [c async for c in model.astream([HumanMessage(content="Onde está o pedido 42?")])]
    assert "".join(str(c.content) for c in chunks).startswith("word0")
    sent = upstream.requests[before]["body"]
    assert sent["stream_options"]["include_usage"] is True and sent["tools"]
    await settled(service)
    entries = await usage_entries(service, user)
    assert [-e["tokens"] for e in entries] == [2, 49]  # the stream's reported usage, exactly
    tools_chars = len(json.dumps(sent["tools"], separators=(",", ":"), ensure_ascii=False))
    assert entries[1]["prompt_chars"] >= tools_chars  # the bound tool schema was estimated
    account = await balance(service, user)
    assert (account.email, account.name) == ("bia@example.com", "Bia")
    assert account.balance == settings.default_monthly_tokens - 51
    await assert_invariants(service, user)


NODE_SDK = Path(__file__).resolve().parent.parent / "node_modules" / "openai"
NODE_SCRIPT = Path(__file__).resolve().parent / "support" / "openai_node.mjs"


@pytest.mark.skipif(shutil.which("node") is None or not NODE_SDK.is_dir(),
                    reason="needs node and node_modules/openai (make test runs npm ci)")
async def test_the_openai_node_sdk(envoy, service, upstream, user, settings):
    """A Node.js application with the official OpenAI SDK, identities in LibreChat's headers:
    its answer and its stream are debited exactly what they reported, and a user without
    balance gets the SDK's own APIError with status 402 and the gate's message, which the
    application shows (nothing reaches the upstream for them)."""
    broke = f"{user}-broke"
    await spend(service, broke, settings.default_monthly_tokens, 0)
    config = {
        "baseURL": envoy.url + "/v1", "apiKey": GATE_KEY,
        "user": {"x-user-id": user, "x-user-email": "caio@example.com"},
        "broke": {"x-user-id": broke},
        "answer": {"prompt": 12, "completion": 7},
        "stream": {"prompt": 9, "completion": 4, "chunks": 4},
    }
    before = len(upstream.requests)
    node = await asyncio.create_subprocess_exec(
        "node", str(NODE_SCRIPT), json.dumps(config), cwd=NODE_SDK.parent.parent,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(node.communicate(), 60)
    except TimeoutError:
        node.kill()
        await node.wait()
        raise
    assert node.returncode == 0, err.decode()
    seen = json.loads(out)
    assert len(upstream.requests) == before + 2  # the refused request never left the gate
    assert seen["answer"]["content"] == "hello there" and seen["answer"]["usage"]["total_tokens"] == 19
    assert seen["stream"]["text"] == "word0 word1 word2 word3 " and seen["stream"]["usage"]["total_tokens"] == 13
    refused = seen["refused"]
    assert refused["message"].startswith("Seu saldo de tokens acabou: restam 0 tokens"), refused
    assert {**refused, "message": ""} == {
        "sdkError": True, "status": 402, "type": "insufficient_quota", "code": "quota_exceeded", "message": ""}
    await settled(service)
    # both handed to Envoy: their settles come in one access-log flush, in either order
    assert sorted(-e["tokens"] for e in await usage_entries(service, user)) == [13, 19]
    account = await balance(service, user)
    assert account.email == "caio@example.com" and account.balance == settings.default_monthly_tokens - 32
    assert (await balance(service, broke)).balance == 0
    await assert_invariants(service, user)


# ---------------------------------------------------------------- 16. found in review


async def test_the_upstream_reads_the_body_the_gate_priced(http, envoy, service, upstream, auth, user):
    """A form-encoded body with "&model=dear" hidden in a JSON string: LiteLLM would parse
    the form and run "dear". The gate forwards it as the JSON it priced."""
    before = len(upstream.requests)
    raw = json.dumps(chat(metadata={"a": "&model=dear&max_tokens=100000&"})).encode()
    async with http.post(envoy.url + CHAT, data=raw, headers={
            **auth(user), "content-type": "application/x-www-form-urlencoded"}) as resp:
        assert resp.status == 200
    forwarded = {k.lower(): v for k, v in upstream.requests[before]["headers"].items()}
    assert forwarded["content-type"] == "application/json"
    assert upstream.requests[before]["body"]["model"] == "gpt-4o-mini"
    await assert_invariants(service, user)


async def test_a_model_in_the_query_string_is_refused(http, envoy, upstream, auth, user):
    before = len(upstream.requests)
    status, _, raw = await post(http, envoy, auth(user), chat(), path=CHAT + "?model=dear")
    assert status == 400 and refusal(raw)["code"] == "query_not_allowed"
    assert "parâmetros na URL" in refusal(raw)["message"]
    assert len(upstream.requests) == before


async def test_a_lone_surrogate_in_a_streamed_request_is_served(http, envoy, service, auth, user):
    raw = b'{"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    headers = {**auth(user), "content-type": "application/json"}
    async with http.post(envoy.url + CHAT, data=raw, headers=headers) as resp:
        assert resp.status == 200
        await resp.read()
    await settled(service)
    [entry] = await usage_entries(service, user)
    assert entry["real_tokens"] == 12  # the fake upstream's default usage
    await assert_invariants(service, user)


async def test_an_upstream_timeout_is_charged_not_released(http, envoy, service, auth, user, settings):
    status, _, _ = await post(http, envoy, auth(user), chat(max_tokens=100, x_test={"status": 504}),
                              service=service)
    assert status == 504
    [entry] = await usage_entries(service, user)
    assert list(entry["flags"]) == ["no_usage", "timeout", "reservation"]
    assert -entry["tokens"] == entry["estimate"] == HELLO_TOKENS + 100
    await assert_invariants(service, user)
