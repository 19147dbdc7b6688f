"""The gate's side of the user's own settings, through the real Envoy, processor and ledger:
a request past the personal cap is a 402 that names the cap and where to change it, an
erased id is a 403 and is never opened again; neither reaches the upstream nor is debited.
(The in-chat notices against a personal cap: tests/test_inline_notices.py.)"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from support.gate import balance, chat, gate_settings, ledger_sums, post, settled, usage_entries

from extproc.errors import Messages
from extproc.formats import fmt_date_text

ME = "http://localhost:8080/me"


def pt(n: int) -> str:
    return f"{n:,}".replace(",", ".")


async def nothing_held_or_debited(service, user: str, entries_before: int) -> None:
    await settled(service)
    assert len(await usage_entries(service, user)) == entries_before
    bal, reserved, total = await ledger_sums(service, user)
    assert (reserved, bal) == (0, total)


async def test_past_the_personal_cap_is_a_402_naming_the_cap(http, envoy, service, upstream, auth, user):
    status, _, raw = await post(http, envoy, auth(user), chat(max_tokens=100, x_test={
        "prompt": 300, "completion": 100}), service=service)
    assert status == 200, raw
    await service.ledger.set_settings(user, personal_cap=1_000, actor=f"user:{user}")
    before = len(upstream.requests)
    # used 400 + this estimate (6 + 1,000) would pass the user's 1,000.
    status, headers, raw = await post(http, envoy, auth(user), chat(max_tokens=1_000), service=service)
    assert status == 402, raw
    assert headers["content-type"] == "application/json"
    account = await balance(service, user)
    renews = fmt_date_text(account.cycle_end, "pt-BR")
    assert json.loads(raw) == {"error": {
        "type": "insufficient_quota", "code": "personal_cap_reached",
        "message": f"Você atingiu o limite pessoal que você mesmo definiu: {pt(1_000)} tokens por ciclo. Já usou"
                   f" 400 e esta mensagem precisa de cerca de {pt(1_006)}. Um novo ciclo começa em {renews}."
                   f" Para mudar esse limite, acesse {ME}."}}
    assert len(upstream.requests) == before
    await nothing_held_or_debited(service, user, 1)
    # A request that fits under the cap still goes through, and is debited exactly (read by the
    # processor, whose reply says what is left).
    with gate_settings(service, json_usage="processor"):
        status, headers, raw = await post(http, envoy, auth(user), chat(max_tokens=100, x_test={
            "prompt": 6, "completion": 4}), service=service)
    assert status == 200, raw
    assert [-e["tokens"] for e in await usage_entries(service, user)] == [400, 10]
    # What is left, and the usage %, are the cap's: 1,000 - 410.
    assert (headers["x-solaris-tokens-remaining"], headers["x-solaris-quota-used-pct"]) == ("590", "41.00")
    # The user lifts the cap: the same request is served.
    await service.ledger.set_settings(user, personal_cap=None, actor=f"user:{user}")
    status, _, raw = await post(http, envoy, auth(user), chat(max_tokens=1_000), service=service)
    assert status == 200, raw


def test_the_personal_cap_refusal_in_english():
    end = datetime(2026, 2, 1, tzinfo=UTC)
    error = Messages("en").personal_cap(12_500, 12_000, 1_030, end, "https://gate.example.com/me")
    assert (error.status, error.code, error.type) == (402, "personal_cap_reached", "insufficient_quota")
    assert error.message == (
        "You reached the personal limit you set for yourself: 12,500 tokens per cycle. You have used 12,000"
        " and this message needs about 1,030. A new cycle starts on February 1, 2026. To change your limit,"
        " go to https://gate.example.com/me.")
    erased = Messages("en").erased()
    assert (erased.status, erased.code, erased.type) == (403, "account_erased", "permission_denied")
    assert "erased at the user's request" in erased.message and "administrator" in erased.message


async def test_an_erased_id_is_refused_and_never_opened_again(http, envoy, service, upstream, auth, user):
    status, _, raw = await post(http, envoy, auth(user, via="headers", email="ana@example.com"), chat(
        max_tokens=10, x_test={"prompt": 5, "completion": 5}), service=service)
    assert status == 200, raw
    pseudonym = await service.ledger.erase(user, actor="admin", reason="LGPD request")
    before = len(upstream.requests)
    for headers in (auth(user), auth(user, via="headers", email="ana@example.com")):
        status, _, raw = await post(http, envoy, headers, chat(), service=service)
        assert status == 403, raw
        assert json.loads(raw) == {"error": {
            "type": "permission_denied", "code": "account_erased",
            "message": "Os dados desta conta foram apagados a pedido do usuário, e ela não pode mais usar o"
                       " assistente. Fale com o administrador."}}
    assert len(upstream.requests) == before
    assert await service.ledger.account(user) is None  # not re-created
    erased = await service.ledger.account(pseudonym)
    assert erased is not None and erased.email is None and erased.reserved == 0
    assert [-e["tokens"] for e in await usage_entries(service, pseudonym)] == [10]
