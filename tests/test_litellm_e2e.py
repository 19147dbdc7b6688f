"""The happy path through the REAL LiteLLM proxy (mock models of extproc_dev/litellm.yaml, no
network): Envoy → processor → LiteLLM. The debit must equal the `usage` LiteLLM reports."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.gate import CHAT, handoffs, settled, usage_entries
from support.stack import UPSTREAM_KEY

from extproc.app import Service
from extproc_dev import devstack

MASTER_KEY = UPSTREAM_KEY


@pytest.fixture(scope="session")
def litellm(workdir: Path) -> Iterator[devstack.LiteLLM]:
    proxy = devstack.LiteLLM(workdir / "litellm", master_key=MASTER_KEY)
    try:
        proxy.start(timeout=90)
    except (RuntimeError, TimeoutError):
        proxy.stop()
        raise
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def litellm_envoy(workdir: Path, service: Service, litellm: devstack.LiteLLM
                  ) -> Iterator[devstack.Envoy]:
    proxy = devstack.Envoy(
        workdir / "litellm-envoy", upstream=("127.0.0.1", litellm.port),
        extproc=[("127.0.0.1", service.grpc_port)], http=("127.0.0.1", service.http_port))
    proxy.start()
    yield proxy
    proxy.stop()


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Olá, tudo bem?"}],
            **extra}


async def assert_debited(service: Service, user_id: str, usage: dict[str, int], flags: tuple[str, ...] = ()) -> None:
    await settled(service)
    entries = await usage_entries(service, user_id)
    assert len(entries) == 1, entries
    entry = entries[0]
    total = usage["prompt_tokens"] + usage["completion_tokens"]
    assert total == usage["total_tokens"] > 0
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"])
    assert entry["real_tokens"] == total
    assert entry["tokens"] == -total
    assert list(entry["flags"]) == list(flags)
    assert service.ledger is not None
    account = await service.ledger.account(user_id)
    assert account.reserved == 0
    assert account.balance == service.settings.default_monthly_tokens - total


def final_usage(sse: str) -> dict[str, int]:
    """The usage of an SSE stream: LiteLLM sends it in the last chunk before [DONE]."""
    events = [line[len("data: "):] for line in sse.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    with_usage = [c for c in chunks if c.get("usage")]
    assert len(with_usage) == 1 and with_usage[0] is chunks[-1], chunks[-2:]
    return with_usage[0]["usage"]


async def test_litellm_json_debit_equals_usage(http, litellm_envoy, service, auth, user):
    async with http.post(litellm_envoy.url + CHAT, json=chat(), headers=auth(user)) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        remaining = resp.headers["x-solaris-tokens-remaining"]
    assert body["choices"][0]["message"]["content"].startswith("Olá!")
    usage = body["usage"]
    await assert_debited(service, user, usage)
    assert int(remaining) == service.settings.default_monthly_tokens - usage["total_tokens"]


async def test_litellm_bounded_json_is_read_by_envoy(http, litellm_envoy, service, auth, user):
    """A bounded JSON answer of the real LiteLLM is handed to Envoy (its content type is one
    Envoy's JSON filter parses) and debited exactly the usage LiteLLM reported."""
    handed = handoffs(service, "handed")
    async with http.post(litellm_envoy.url + CHAT, json=chat(max_tokens=64), headers=auth(user)) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert "x-solaris-tokens-remaining" not in resp.headers
    assert body["choices"][0]["message"]["content"].startswith("Olá!")
    assert handoffs(service, "handed") == handed + 1
    await assert_debited(service, user, body["usage"], flags=("envoy",))


async def test_litellm_stream_debit_equals_final_chunk_usage(
        http, litellm_envoy, service, auth, user):
    # No stream_options: the processor injects include_usage, LiteLLM must honour it.
    async with http.post(litellm_envoy.url + CHAT, json=chat(stream=True),
                         headers=auth(user)) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = (await resp.read()).decode()
    content = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                      for line in text.splitlines()
                      if line.startswith("data: {") and json.loads(line[6:])["choices"])
    assert content.startswith("Olá!")
    await assert_debited(service, user, final_usage(text))


async def test_litellm_bounded_stream_is_read_by_envoy(http, litellm_envoy, service, auth, user):
    """With max_tokens the stream is handed to Envoy (docs/streams.md): Envoy's SSE filter reads
    LiteLLM's own usage chunk and the access log brings it to the settle."""
    handed = handoffs(service, "handed")
    async with http.post(litellm_envoy.url + CHAT, json=chat(stream=True, max_tokens=300),
                         headers=auth(user)) as resp:
        assert resp.status == 200, await resp.text()
        text = (await resp.read()).decode()
    assert handoffs(service, "handed") == handed + 1
    await assert_debited(service, user, final_usage(text), flags=("envoy",))


async def test_litellm_stream_gpt_4o_trusted_headers(http, litellm_envoy, service, auth, user):
    """LibreChat's way: gateway key + X-User-Id, its own include_usage, the other model."""
    body = chat(model="gpt-4o", stream=True, stream_options={"include_usage": True})
    async with http.post(litellm_envoy.url + CHAT, json=body,
                         headers=auth(user, via="headers", email="ana@example.com")) as resp:
        assert resp.status == 200, await resp.text()
        text = (await resp.read()).decode()
    await assert_debited(service, user, final_usage(text))
    [entry] = await usage_entries(service, user)
    assert entry["model"] == "gpt-4o"


async def test_litellm_models_listing_unmetered(http, litellm_envoy, service, auth, user):
    async with http.get(litellm_envoy.url + "/v1/models", headers=auth(user)) as resp:
        assert resp.status == 200, await resp.text()
        ids = {m["id"] for m in (await resp.json())["data"]}
    assert {"gpt-4o-mini", "gpt-4o"} <= ids
    assert service.ledger is not None
    assert await service.ledger.account(user) is None


async def test_litellm_refuses_client_credentials_directly(http, litellm, auth, user):
    """Why Envoy replaces Authorization upstream: LiteLLM itself accepts only its key."""
    async with http.post(litellm.url + CHAT, json=chat(), headers=auth(user)) as resp:
        assert resp.status in (400, 401), await resp.text()
    async with http.post(litellm.url + CHAT, json=chat(),
                         headers={"authorization": f"Bearer {MASTER_KEY}"}) as resp:
        assert resp.status == 200
