"""Requests through Envoy to the gate, and what they left in the ledger.

Settles run right after the reply, off the request's path: every reader here waits for them
(``settled``) before it looks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import asyncpg
from multidict import CIMultiDict

from extproc.app import Service
from extproc.ledger import Usage
from extproc_dev.devstack import Envoy
from support.wait import eventually

CHAT = "/v1/chat/completions"


@contextlib.contextmanager
def gate_settings(service: Service, **changes: Any) -> Iterator[None]:
    """The gate's settings changed for a while (it reads them per exchange)."""
    assert service.gate is not None
    before = service.gate.settings
    service.gate.settings = before.replace(**changes)
    try:
        yield
    finally:
        service.gate.settings = before


def chat(content: str = "Olá, tudo bem?", **extra: Any) -> dict[str, Any]:
    """A chat-completions body; ``x_test`` in ``extra`` steers the fake upstream."""
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **extra}


async def post(http: aiohttp.ClientSession, envoy: Envoy, headers: dict[str, str],
               body: Any, path: str = CHAT, service: Service | None = None) -> tuple[int, CIMultiDict[str], bytes]:
    """POST through Envoy; with ``service``, also wait for the settle that follows the reply."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(envoy.url + path, data=data,
                         headers={"content-type": "application/json", **headers}) as resp:
        result = resp.status, CIMultiDict(resp.headers), await resp.read()
    if service is not None:
        await settled(service)
    return result


def handoffs(service: Service, event: str) -> float:
    """The gate's count of streams handed to Envoy (docs/streams.md), by event."""
    assert service.gate is not None
    return service.gate.metrics.handoffs.labels(event)._value.get()


async def settled(service: Service) -> None:
    """Settles run right after the reply (the last chunk, the buffered body), or when Envoy's
    access log brings a handed-off stream's end (up to its 0.1 s flush): wait for them."""
    assert service.gate is not None
    for _ in range(300):
        if not service.gate.tasks and not service.gate.handed:
            return
        await asyncio.sleep(0.01)


async def balance(service: Service, user_id: str) -> Any:
    assert service.ledger is not None
    await settled(service)
    return await service.ledger.account(user_id)


async def ledger_sums(service: Service, user_id: str) -> tuple[int, int, int]:
    """(balance, reserved, the sum of the user's ledger entries)."""
    assert service.pool is not None
    await settled(service)
    row = await service.pool.fetchrow(
        "SELECT a.allowance + a.credits AS balance, a.reserved,"
        " (SELECT COALESCE(SUM(tokens), 0) FROM ledger_entries e WHERE e.user_id = a.user_id) AS s"
        " FROM accounts a WHERE user_id = $1", user_id)
    return row["balance"], row["reserved"], row["s"]


async def usage_entries(service: Service, user_id: str) -> list[asyncpg.Record]:
    assert service.pool is not None
    await settled(service)
    return await service.pool.fetch(
        "SELECT * FROM ledger_entries WHERE user_id = $1 AND kind = 'usage' ORDER BY id", user_id)


async def first_usage_entries(service: Service, user_id: str) -> list[asyncpg.Record]:
    """The user's usage entries once there is one: a stream the client left is settled when
    Envoy ends it, after the test has moved on."""
    found: list[asyncpg.Record] = []

    async def some() -> bool:
        found[:] = await usage_entries(service, user_id)
        return bool(found)

    await eventually(some, f"a usage entry of {user_id}")
    return found


async def open_account(service: Service, user_id: str, *, email: str | None = None,
                       name: str | None = None) -> None:
    """Create an account the way the gate does on a first request (a zero reservation)."""
    assert service.ledger is not None
    exchange = f"open-{uuid.uuid4().hex}"
    admission = await service.ledger.admit(user_id, 0, exchange, email=email, name=name)
    assert admission.outcome == "ok"
    await service.ledger.release(exchange)


async def spend(service: Service, user_id: str, prompt: int, completion: int, model: str = "gpt-4o-mini") -> None:
    """One exchange admitted and settled straight on the ledger (no Envoy, no upstream)."""
    assert service.ledger is not None
    exchange = f"ex-{uuid.uuid4().hex}"
    await service.ledger.admit(user_id, prompt + completion, exchange, model=model)
    await service.ledger.settle(Usage(exchange_id=exchange, user_id=user_id, model=model,
                                      prompt_tokens=prompt, completion_tokens=completion,
                                      request_id=f"req-{exchange[-6:]}"))
