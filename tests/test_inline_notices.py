"""The in-chat notices (docs/notices.md) through the real Envoy, the processor and the fake
upstream: once at 80 % and once at 90 % of the effective limit, on the answer after the one
that crossed, with the exact tokens left (under a personal cap too); never in a tool call, a JSON-format answer, an
embedding, an n > 1 answer or an error; off by default; and never counted as model output.

Numbers: each account gets a cycle budget of 1,000 tokens (the default allowance minus an
adjustment); the fake upstream reports the usage each request asks for, so every debit and
every "tokens left" is known exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from support.gate import CHAT, balance, chat, handoffs, ledger_sums, open_account, post, settled, usage_entries
from support.stack import GATE_KEY

from extproc.gate import notices
from extproc.gate.translators import BY_PATH

BUDGET = 1_000
ME = "http://localhost:8080/me"


@pytest.fixture
def notices_on(service) -> Iterator[None]:
    """GATE_INLINE_NOTICES=true on the session's processor for one test (read per request)."""
    before = service.gate.settings
    service.gate.settings = before.replace(inline_notices=True)
    yield
    service.gate.settings = before


async def small_account(service, user, settings) -> None:
    await open_account(service, user)
    await service.ledger.grant(user, BUDGET - settings.default_monthly_tokens, actor="test",
                               reason="a 1,000-token cycle", kind="adjustment")
    account = await balance(service, user)
    assert (account.cycle_budget, account.used_cycle, account.inline_notice) == (BUDGET, 0, 0)


def notice(threshold: int, left: int) -> str:
    """The Portuguese notice as the chat shows it."""
    left_text = f"{left:,}".replace(",", ".")
    if threshold == 80:
        return (f"[Solaris] Você já usou 80% do seu limite de tokens neste ciclo: restam {left_text} tokens."
                f" Acompanhe seu uso em {ME}.")
    return (f"[Solaris] Você já usou 90% do seu limite de tokens neste ciclo: restam apenas {left_text}"
            f" tokens. Acompanhe seu uso em {ME}.")


def spend(prompt: int, completion: int, steer: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A chat body whose answer reports this usage; ``steer``: more of the upstream's x_test."""
    return chat(x_test={"prompt": prompt, "completion": completion, **(steer or {})}, **{"max_tokens": 50, **extra})


async def ask(http, envoy, auth, user, service, body: dict[str, Any], path: str = CHAT) -> dict[str, Any]:
    """A buffered answer, checked for a correct content-length, as JSON."""
    status, headers, raw = await post(http, envoy, auth(user), body, path=path, service=service)
    assert status == 200, raw
    assert int(headers["content-length"]) == len(raw)
    return json.loads(raw)


async def ask_stream(http, envoy, auth, user, service, body: dict[str, Any]) -> list[str]:
    """A streamed answer's ``data:`` payloads, in order."""
    async with http.post(envoy.url + CHAT, json={**body, "stream": True}, headers=auth(user)) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = (await resp.read()).decode()
    await settled(service)
    return [line[5:].strip() for line in text.split("\n") if line.startswith("data:")]


def content(answer: dict[str, Any]) -> str:
    return answer["choices"][0]["message"]["content"]


def streamed_text(payloads: list[str]) -> str:
    parts = []
    for payload in payloads:
        if payload != "[DONE]":
            for choice in json.loads(payload)["choices"]:
                parts.append(choice["delta"].get("content") or "")
    return "".join(parts)


async def debits(service, user) -> list[int]:
    return [-e["tokens"] for e in await usage_entries(service, user)]


async def assert_balanced(service, user) -> None:
    bal, reserved, total = await ledger_sums(service, user)
    assert (reserved, bal) == (0, total)


# ---------------------------------------------------------------- buffered answers


async def test_buffered_answers_get_one_notice_at_80_then_one_at_90(
        http, envoy, service, auth, user, settings, notices_on):
    await small_account(service, user, settings)
    plain = "hello there"
    # The crossing answer itself carries nothing: its usage is known only at its end.
    assert content(await ask(http, envoy, auth, user, service, spend(700, 100))) == plain
    # The next answer does, once: 1,000 - 800 - 15 tokens left after it.
    assert content(await ask(http, envoy, auth, user, service, spend(10, 5))) == f"{plain}\n\n{notice(80, 185)}"
    assert content(await ask(http, envoy, auth, user, service, spend(10, 5))) == plain
    assert content(await ask(http, envoy, auth, user, service, spend(60, 20))) == plain  # crosses 90
    assert content(await ask(http, envoy, auth, user, service, spend(10, 5))) == f"{plain}\n\n{notice(90, 75)}"
    assert content(await ask(http, envoy, auth, user, service, spend(10, 5))) == plain
    # The ledger debited the upstream's usage, with or without the notice in the answer.
    assert await debits(service, user) == [800, 15, 15, 80, 15, 15]
    account = await balance(service, user)
    assert (account.used_cycle, account.inline_notice) == (940, 90)
    await assert_balanced(service, user)


async def test_a_jump_past_90_shows_only_the_90_notice(http, envoy, service, auth, user, settings, notices_on):
    await small_account(service, user, settings)
    await ask(http, envoy, auth, user, service, spend(900, 5))
    assert content(await ask(http, envoy, auth, user, service, spend(1, 1))).endswith(notice(90, 93))
    for _ in range(2):  # and 80 is never due after it
        assert "[Solaris]" not in content(await ask(http, envoy, auth, user, service, spend(1, 1)))


async def test_notices_are_off_by_default(http, envoy, service, auth, user, settings):
    assert settings.inline_notices is False
    await small_account(service, user, settings)
    for prompt, completion in ((900, 5), (1, 1), (1, 1)):
        assert content(await ask(http, envoy, auth, user, service, spend(prompt, completion))) == "hello there"
    assert (await balance(service, user)).inline_notice == 0


# ---------------------------------------------------------------- streamed answers


async def test_streamed_answers_get_one_notice_event_before_done(
        http, envoy, service, auth, user, settings, notices_on):
    await small_account(service, user, settings)
    words = "word0 word1 word2 "
    assert streamed_text(await ask_stream(http, envoy, auth, user, service, spend(700, 100))) == words
    payloads = await ask_stream(http, envoy, auth, user, service, spend(10, 5))
    assert streamed_text(payloads) == f"{words}\n\n{notice(80, 185)}"
    # 3 chunks, the usage chunk, the notice, [DONE]: one extra event, as one of the stream's own.
    assert len(payloads) == 6 and payloads[-1] == "[DONE]"
    extra = json.loads(payloads[-2])
    assert extra == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
                     "choices": [{"index": 0, "delta": {"content": f"\n\n{notice(80, 185)}"},
                                  "finish_reason": None}]}
    assert json.loads(payloads[-3])["usage"]["total_tokens"] == 15
    assert streamed_text(await ask_stream(http, envoy, auth, user, service, spend(10, 5))) == words
    assert streamed_text(await ask_stream(http, envoy, auth, user, service, spend(60, 20))) == words
    payloads = await ask_stream(http, envoy, auth, user, service, spend(10, 5))
    assert streamed_text(payloads) == f"{words}\n\n{notice(90, 75)}"
    assert streamed_text(await ask_stream(http, envoy, auth, user, service, spend(10, 5))) == words
    assert await debits(service, user) == [800, 15, 15, 80, 15, 15]
    await assert_balanced(service, user)


async def test_only_the_stream_due_a_notice_leaves_the_fast_path(
        http, envoy, service, auth, user, settings, notices_on):
    """Bounded streams are handed to Envoy (docs/streams.md: no chunk reaches the processor;
    unbounded ones take the adapter's per-chunk fast path, tests/test_stream_handoff.py); the
    one answer that carries a notice is not: the processor rewrites its end."""
    await small_account(service, user, settings)
    chunks = service.gate.metrics.stream_chunks

    async def path(prompt: int, completion: int) -> tuple[float, float]:
        before, handed = chunks._value.get(), handoffs(service, "handed")
        await ask_stream(http, envoy, auth, user, service, spend(prompt, completion))
        return chunks._value.get() - before, handoffs(service, "handed") - handed

    assert await path(700, 100) == (0, 1)    # crosses 80 %: nothing due yet; handed to Envoy
    assert await path(10, 5) == (0, 0)       # carries the notice
    assert await path(10, 5) == (0, 1)


async def test_a_stream_without_usage_is_charged_without_the_notice_text(
        http, envoy, service, auth, user, settings, notices_on):
    """No usage: the charge is the reservation or the visible text counted, whichever is
    larger; the notice is neither shown (nothing exact to say) nor counted."""
    await small_account(service, user, settings)
    await ask(http, envoy, auth, user, service, spend(800, 5))
    payloads = await ask_stream(http, envoy, auth, user, service, chat(
        max_tokens=50, x_test={"usage": "none", "chunks": 3}))
    assert "[Solaris]" not in streamed_text(payloads)
    [_, entry] = await usage_entries(service, user)
    assert "no_usage" in entry["flags"] and -entry["tokens"] == entry["estimate"]
    # Not claimed: the next answer with usage shows it.
    assert content(await ask(http, envoy, auth, user, service, spend(1, 1))).endswith(
        notice(80, BUDGET - 805 - entry["estimate"] - 2))


async def test_the_openai_sdk_reads_answers_with_a_notice(envoy, service, user, settings, notices_on):
    import openai

    await small_account(service, user, settings)
    client = openai.AsyncOpenAI(base_url=envoy.url + "/v1", api_key=GATE_KEY, max_retries=0,
                                default_headers={"x-user-id": user})
    messages = [{"role": "user", "content": "Olá"}]
    async with client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=50,
                                             extra_body={"x_test": {"prompt": 790, "completion": 10}})
        await settled(service)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, max_tokens=50, stream=True,
            stream_options={"include_usage": True}, extra_body={"x_test": {"prompt": 10, "completion": 5}})
        chunks = [chunk async for chunk in stream]
        await settled(service)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == f"word0 word1 word2 \n\n{notice(80, 185)}"
        assert [c.usage.total_tokens for c in chunks if c.usage] == [15]
        assert {c.id for c in chunks} == {"chatcmpl-1"}
        await client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=50,
                                             extra_body={"x_test": {"prompt": 80, "completion": 10}})
        await settled(service)
        answer = await client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, max_tokens=50,
            extra_body={"x_test": {"prompt": 3, "completion": 2}})
    assert answer.choices[0].message.content == f"hello there\n\n{notice(90, BUDGET - 905 - 5)}"
    await settled(service)
    assert await debits(service, user) == [800, 15, 90, 5]


async def test_a_claim_the_ledger_cannot_answer_never_fails_the_answer(
        http, envoy, service, auth, user, settings, notices_on, monkeypatch):
    """A ledger down or slow at the claim: the answer goes out whole, without the notice,
    debited exactly; the next answer shows it."""
    import asyncio

    from extproc.ledger import LedgerUnavailable

    await small_account(service, user, settings)
    await ask(http, envoy, auth, user, service, spend(800, 5))
    claim = service.ledger.claim_inline_notice

    async def down(*args: Any) -> bool:
        raise LedgerUnavailable("connection refused")

    async def slow(*args: Any) -> bool:
        await asyncio.sleep(5)
        return await claim(*args)

    for fault in (down, slow):
        monkeypatch.setattr(service.ledger, "claim_inline_notice", fault)
        assert content(await ask(http, envoy, auth, user, service, spend(1, 1))) == "hello there"
        assert streamed_text(await ask_stream(http, envoy, auth, user, service, spend(1, 1))) == "word0 word1 word2 "
    monkeypatch.undo()
    assert content(await ask(http, envoy, auth, user, service, spend(1, 1))).endswith(notice(80, 1_000 - 815))
    assert await debits(service, user) == [805, 2, 2, 2, 2, 2]
    await assert_balanced(service, user)


# ---------------------------------------------------------------- against the personal cap


async def test_the_notice_counts_against_the_personal_cap(http, envoy, service, auth, user, notices_on):
    """A user who capped themselves at 2,000 tokens is told at 1,600, not at 80 % of the plan;
    setting the cap below what is used already makes the next answer say so."""
    await open_account(service, user)
    await service.ledger.set_settings(user, personal_cap=2_000, actor=f"user:{user}")

    async def answer(prompt: int, completion: int) -> str:
        return content(await ask(http, envoy, auth, user, service, spend(prompt, completion)))

    assert await answer(1_500, 100) == "hello there"  # crosses 80 % of 2,000
    assert await answer(10, 10) == f"hello there\n\n{notice(80, 380)}"
    # The user lowers the cap to 1,700, so the 1,620 used are past 90 %: the next answer says so.
    await service.ledger.set_settings(user, personal_cap=1_700, actor=f"user:{user}")
    assert await answer(10, 10) == f"hello there\n\n{notice(90, 60)}"
    assert await answer(10, 10) == "hello there"


# ---------------------------------------------------------------- answers that never get one


async def test_tool_calls_json_formats_n_and_errors_never_get_one(
        http, envoy, service, auth, user, settings, notices_on):
    await small_account(service, user, settings)
    await ask(http, envoy, auth, user, service, spend(850, 5))
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    call = await ask(http, envoy, auth, user, service, spend(1, 1, {"tool_call": True}, tools=tools))
    assert call["choices"][0]["message"]["content"] is None
    assert call["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    payloads = await ask_stream(http, envoy, auth, user, service, spend(1, 1, {"tool_call": True}, tools=tools))
    assert "Solaris" not in "".join(payloads)
    as_json = await ask(http, envoy, auth, user, service, spend(
        1, 1, {"text": '{"a": 1}'}, response_format={"type": "json_object"}))
    assert content(as_json) == '{"a": 1}'
    payloads = await ask_stream(http, envoy, auth, user, service, spend(
        1, 1, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}))
    assert "Solaris" not in "".join(payloads)
    two = await ask(http, envoy, auth, user, service, spend(1, 1, n=2))
    assert "Solaris" not in json.dumps(two)
    status, _, raw = await post(http, envoy, auth(user), spend(1, 1, {"status": 500}), service=service)
    assert status == 500 and b"Solaris" not in raw
    embedding = await ask(http, envoy, auth, user, service, {
        "model": "gpt-4o-mini", "input": "Olá", "x_test": {"prompt": 1, "completion": 0}}, path="/v1/embeddings")
    assert "Solaris" not in json.dumps(embedding)
    assert (await balance(service, user)).inline_notice == 0  # nothing was claimed
    # A plain-text answer with tools offered and not called does get it, exactly once.
    answer = await ask(http, envoy, auth, user, service, spend(1, 1, tools=tools))
    used = (await balance(service, user)).used_cycle
    assert content(answer) == f"hello there\n\n{notice(80, BUDGET - used)}"
    assert await debits(service, user) == [855, 2, 2, 2, 2, 2, 1, 2]
    await assert_balanced(service, user)


# ---------------------------------------------------------------- the pieces


def test_the_notice_goes_before_done_or_at_the_end():
    event = b'data: {"n": 1}\n\n'
    chunk = b'data: {"a": 1}\n\ndata: [DONE]\n\n'
    at = notices.insertion_point(chunk, end_of_stream=False)
    assert notices.insert(chunk, at, event) == b'data: {"a": 1}\n\n' + event + b"data: [DONE]\n\n"
    assert notices.insertion_point(b"data:[DONE]\n\n", end_of_stream=False) == 0
    assert notices.insertion_point(b'data: {"a": 1}\n\n', end_of_stream=False) is None
    assert notices.insertion_point(b'data: {"text": "[DONE]"}\n\n', end_of_stream=False) is None
    assert notices.has_done(b"data: [DO" + b"NE]\n\n") and not notices.has_done(b'data: "[DONE]"\n\n')
    unterminated = b'data: {"a": 1}\n'
    at = notices.insertion_point(unterminated, end_of_stream=True)
    assert notices.insert(unterminated, at, event) == unterminated + b"\n" + event
    assert notices.insert(b"", 0, event) == event


def test_only_plain_text_chat_answers_take_a_notice():
    chat_t, responses, embeddings = BY_PATH[CHAT], BY_PATH["/v1/responses"], BY_PATH["/v1/embeddings"]
    assert chat_t.notice_allowed({"model": "m"})
    assert chat_t.notice_allowed({"n": 1, "response_format": {"type": "text"}})
    assert not chat_t.notice_allowed({"n": 2})
    assert not chat_t.notice_allowed({"response_format": {"type": "json_object"}})
    assert not responses.notice_allowed({"model": "m"}) and not embeddings.notice_allowed({"model": "m"})
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "oi", "function_call": None}}]}
    assert chat_t.append_notice(answer, "[Solaris] x") and content(answer) == "oi\n\n[Solaris] x"
    assert not chat_t.append_notice({"choices": [{"message": {"content": "", "tool_calls": []}}]}, "x")
    assert not chat_t.append_notice({"choices": [{"message": {"content": "a"}}, {"message": {"content": "b"}}]}, "x")
    events = [{"id": "c", "object": "chat.completion.chunk", "created": 5, "model": "m",
               "choices": [{"index": 0, "delta": {"content": "oi", "tool_calls": None}}]},
              {"id": "c", "choices": [], "usage": {"total_tokens": 2}}]
    assert chat_t.notice_event(events, "x") == {"id": "c", "object": "chat.completion.chunk", "created": 5,
                                                "model": "m", "choices": [{"index": 0, "delta": {
                                                    "content": "\n\nx"}, "finish_reason": None}]}
    called = [{"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]}]
    assert chat_t.notice_event(events + called, "x") is None
    assert chat_t.notice_event([{"error": {"message": "boom"}}, *events], "x") is None


async def test_the_notice_speaks_the_language_the_user_chose(http, envoy, service, auth, user, settings, notices_on):
    """A pt-BR gate; this user chose English on /me: their notice is in English."""
    await small_account(service, user, settings)
    await service.ledger.set_settings(user, language="en", actor=f"user:{user}")
    await ask(http, envoy, auth, user, service, spend(900, 5))
    assert content(await ask(http, envoy, auth, user, service, spend(1, 1))).endswith(
        f"[Solaris] You have used 90% of your token limit for this cycle: only 93 tokens left. See your usage at {ME}.")
