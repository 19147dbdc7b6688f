"""Answers handed to Envoy (GATE_STREAM_USAGE, GATE_JSON_USAGE, docs/streams.md): a bounded
Chat Completions stream's chunks, or a bounded JSON answer's body, pass without a message to the
processor; Envoy reads the usage and its access log brings the exchange's end back for the
settle. Through a real Envoy, the processor, PostgreSQL and the fake upstream; the access-log
entries are Envoy's own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import yaml
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import struct_pb2, wrappers_pb2
from multidict import CIMultiDict
from support.gate import (
    CHAT,
    balance,
    chat,
    first_usage_entries,
    gate_settings,
    handoffs,
    ledger_sums,
    post,
    settled,
    usage_entries,
)
from support.wait import eventually

from extproc.gate import handoff
from extproc.gate.access_log import StreamLog
from extproc.settings import Settings


def chunks_seen(service: Any) -> float:
    return service.gate.metrics.stream_chunks._value.get()


@pytest.fixture
def processor_reads(service: Any) -> Iterator[None]:
    """GATE_STREAM_USAGE=processor for one test."""
    with gate_settings(service, stream_usage="processor"):
        yield


async def read_stream(http: aiohttp.ClientSession, envoy: Any, headers: dict[str, str],
                      body: dict[str, Any]) -> tuple[int, CIMultiDict[str], str]:
    async with http.post(envoy.url + CHAT, json=body, headers=headers) as resp:
        return resp.status, CIMultiDict(resp.headers), (await resp.read()).decode()


async def test_a_bounded_stream_is_settled_from_envoys_reading(http, envoy, service, upstream, auth, user, settings):
    chunks, handed = chunks_seen(service), handoffs(service, "handed")
    status, headers, text = await read_stream(http, envoy, auth(user), chat(
        stream=True, max_tokens=200, x_test={"prompt": 11, "completion": 22, "chunks": 40}))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert text.count("data: ") == 42 and "word39" in text and text.endswith("data: [DONE]\n\n")
    assert "x-ratelimit-remaining-requests" in headers  # the rate headers still come
    # the chunks never reached the processor; one handoff
    assert chunks_seen(service) == chunks and handoffs(service, "handed") == handed + 1
    await settled(service)
    [entry] = await usage_entries(service, user)
    assert (entry["prompt_tokens"], entry["completion_tokens"], list(entry["flags"])) == (11, 22, ["envoy"])
    assert entry["estimate"] == 6 + 200 and entry["prompt_chars"] == 14
    account = await balance(service, user)
    assert account.balance == settings.default_monthly_tokens - 33 and account.reserved == 0
    bal, reserved, total = await ledger_sums(service, user)
    assert bal == total and reserved == 0


async def test_the_gate_enforcing_max_tokens_makes_a_stream_bounded(http, envoy, service, upstream, auth, user):
    handed = handoffs(service, "handed")
    with gate_settings(service, enforce_max_tokens=True):
        status, _, _ = await read_stream(http, envoy, auth(user), chat(stream=True, x_test={"chunks": 3}))
    assert status == 200 and handoffs(service, "handed") == handed + 1
    assert upstream.requests[-1]["body"]["max_tokens"] == service.gate.settings.default_completion_tokens
    await settled(service)
    [entry] = await usage_entries(service, user)
    assert entry["real_tokens"] == 12


async def test_unbounded_streams_and_the_processor_setting_keep_the_chunk_path(
        http, envoy, service, auth, user, processor_reads):
    """Without a max-token limit the processor must count the output a cut stream showed (it may
    exceed the reservation); GATE_STREAM_USAGE=processor keeps every stream on that path."""
    handed = handoffs(service, "handed")
    for body in (chat(stream=True, x_test={"chunks": 5}), chat(stream=True, max_tokens=50, x_test={"chunks": 5})):
        chunks = chunks_seen(service)
        status, _, _ = await read_stream(http, envoy, auth(user), body)
        assert status == 200 and chunks_seen(service) > chunks
    assert handoffs(service, "handed") == handed
    await settled(service)
    assert [e["real_tokens"] for e in await usage_entries(service, user)] == [12, 12]


async def test_an_unbounded_stream_is_not_handed_off(http, envoy, service, auth, user):
    handed, chunks = handoffs(service, "handed"), chunks_seen(service)
    await read_stream(http, envoy, auth(user), chat(stream=True, x_test={"chunks": 4}))
    assert handoffs(service, "handed") == handed and chunks_seen(service) > chunks


async def test_a_client_leaving_a_handed_off_stream_is_charged_the_reservation(envoy, service, auth, user):
    """The bounded request's reservation covers any output the model produced; Envoy's entry
    says the client went away."""
    async with aiohttp.ClientSession() as own:
        resp = await own.post(envoy.url + CHAT, headers=auth(user), json=chat(
            stream=True, max_tokens=300, x_test={"chunks": 30, "chunk_delay": 0.1}))
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        resp.close()
    [entry] = await first_usage_entries(service, user)
    assert list(entry["flags"]) == ["no_usage", "abandoned", "reservation", "envoy"]
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (6, 300)
    assert (await balance(service, user)).reserved == 0


async def test_an_upstream_cut_before_the_usage_event_is_charged_the_reservation(http, envoy, service, auth, user):
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(envoy.url + CHAT, headers=auth(user), json=chat(
                stream=True, max_tokens=100, x_test={"chunks": 6, "abort_after": 3, "chunk_delay": 0.1})) as resp:
            await resp.read()
    await asyncio.sleep(0.3)  # room for a second (wrong) entry to show
    # the settle follows the processor's own view of the cut, which can trail the client's
    [entry] = await first_usage_entries(service, user)
    assert "no_usage" in entry["flags"] and "reservation" in entry["flags"]
    assert entry["completion_tokens"] == 100 and -entry["tokens"] == entry["estimate"]


async def test_a_client_gone_while_the_hand_off_reply_is_on_its_way(envoy, service, auth, user, monkeypatch):
    """The processor hands the stream off, but the client leaves before its reply reaches Envoy,
    which then drops the reply: the access-log entry still carries the admission's fields, so
    the exchange is settled once and nothing stays held (with the fields in the reply, as first
    built, it stayed held until the sweep)."""
    original = service.processor._dispatch
    holding, released = asyncio.Event(), asyncio.Event()

    async def slow(ex: Any, phase: str, req: Any) -> Any:
        reply = await original(ex, phase, req)
        if phase == "response_headers":
            holding.set()
            try:
                await asyncio.sleep(1.0)  # the client gives up meanwhile
            finally:
                released.set()
        return reply

    monkeypatch.setattr(service.processor, "_dispatch", slow)
    handed = handoffs(service, "handed")
    async with aiohttp.ClientSession() as own:
        request = asyncio.create_task(own.post(envoy.url + CHAT, headers=auth(user), json=chat(
            stream=True, max_tokens=100, x_test={"chunks": 3})))
        # The client leaves while the reply is held (not after a fixed time, which a loaded
        # machine could spend before the processor even decided).
        await asyncio.wait_for(holding.wait(), 30)
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request
    assert handoffs(service, "handed") == handed + 1  # the processor let go of it
    await asyncio.wait_for(released.wait(), 30)
    await settled(service)
    [entry] = await usage_entries(service, user)
    assert entry["real_tokens"] in (12, entry["estimate"])  # the usage Envoy read, or the reservation
    assert (await balance(service, user)).reserved == 0


@pytest.mark.parametrize("usage", ["garbled", {"prompt_tokens": 5, "completion_tokens": 2.5},
                                   {"prompt_tokens": 10**12, "completion_tokens": 1}])
async def test_usage_envoy_read_is_checked_like_any_usage(http, envoy, service, auth, user, settings, usage):
    """Non-integers and negatives are never a debit (nor a credit): the reservation is; an
    absurd number is capped and flagged."""
    await read_stream(http, envoy, auth(user), chat(stream=True, max_tokens=100, x_test={"usage": usage}))
    await settled(service)
    [entry] = await usage_entries(service, user)
    if isinstance(usage, dict) and usage["prompt_tokens"] == 10**12:
        assert "capped" in entry["flags"] and entry["real_tokens"] == settings.max_usage_tokens
    else:
        assert list(entry["flags"]) == ["no_usage", "reservation", "envoy"]
        assert -entry["tokens"] == entry["estimate"]


async def test_an_upstream_error_stays_with_the_processor(http, envoy, service, auth, user):
    handed = handoffs(service, "handed")
    status, _, _ = await read_stream(http, envoy, auth(user), chat(stream=True, max_tokens=10, x_test={"status": 500}))
    assert status == 500
    assert handoffs(service, "handed") == handed
    await settled(service)
    assert await usage_entries(service, user) == []  # an error with no output: released
    assert (await balance(service, user)).reserved == 0


# ---------------------------------------------------------------- the access-log side


def entry(metadata: dict[str, dict[str, Any]], *, status: int = 200, content_type: str = "text/event-stream",
          **flags: bool) -> accesslog_pb2.HTTPAccessLogEntry:
    common = accesslog_pb2.AccessLogCommon(response_flags=accesslog_pb2.ResponseFlags(**flags))
    for namespace, values in metadata.items():
        struct = struct_pb2.Struct()
        struct.update(values)
        common.metadata.filter_metadata[namespace].CopyFrom(struct)
    return accesslog_pb2.HTTPAccessLogEntry(
        common_properties=common,
        response=accesslog_pb2.HTTPResponseProperties(response_code=wrappers_pb2.UInt32Value(value=status),
                                                      response_headers={"content-type": content_type}))


async def test_a_repeated_entry_settles_once_and_foreign_entries_are_ignored(service, user):
    """Exactly once by the processor-minted exchange id, whatever Envoy sends twice; an entry
    that is not a handed-off exchange (or not the stream's end) moves no money. The entry alone
    decides: this one's exchange was never settled by an ext_proc stream, as when the client left
    while the processor's "hand off" reply was on its way (Envoy dropped it; the admission's
    fields were already there)."""
    assert service.ledger is not None and service.gate is not None
    admission = await service.ledger.admit(user, 50, "ex-logged-1")
    assert admission.outcome == "ok"
    fields = {"exchange_id": "ex-logged-1", "user_id": user, "model": "gpt-4o-mini", "request_id": "",
              "estimate": 50, "prompt_estimate": 10, "prompt_chars": 30}
    log = StreamLog(service.gate)
    good = entry({handoff.NAMESPACE: fields, handoff.USAGE_NAMESPACE: {"prompt_tokens": 9, "completion_tokens": 4}})
    tasks = [log.entry(good), log.entry(good)]
    await asyncio.gather(*[t for t in tasks if t is not None])
    unreadable = handoffs(service, "unreadable")
    assert log.entry(entry({"other": {"x": 1}})) is None
    assert log.entry(entry({handoff.NAMESPACE: {**fields, "estimate": -1}})) is None
    assert handoffs(service, "unreadable") == unreadable + 2
    intermediate = entry({handoff.NAMESPACE: {**fields, "exchange_id": "ex-logged-2"}})
    intermediate.common_properties.intermediate_log_entry = True
    assert log.entry(intermediate) is None
    # a candidate whose answer was JSON or an error: its own ext_proc stream settles it
    for other in (entry({handoff.NAMESPACE: {**fields, "exchange_id": "ex-logged-3"}}, content_type="application/json"),
                  entry({handoff.NAMESPACE: {**fields, "exchange_id": "ex-logged-4"}}, status=500)):
        assert log.entry(other) is None
    await settled(service)
    [row] = await usage_entries(service, user)
    assert (row["exchange_id"], row["real_tokens"], row["tokens"], list(row["flags"])) == (
        "ex-logged-1", 13, -13, ["envoy"])
    assert (await balance(service, user)).reserved == 0


async def test_an_entry_that_held_nothing_moves_no_money(service, user):
    """The entry comes over the network: one whose exchange never held a reservation (forged,
    or garbled) neither debits an account nor opens one; only a hold is closed or trued up."""
    assert service.ledger is not None and service.gate is not None
    await service.ledger.admit(user, 50, "ex-real-hold")  # the user exists and holds something
    log = StreamLog(service.gate)
    fields = {"model": "gpt-4o-mini", "request_id": "", "estimate": 50, "prompt_estimate": 10, "prompt_chars": 3}
    usage = {"prompt_tokens": 900, "completion_tokens": 100}
    stranger = "never-seen-" + user
    for forged in ({**fields, "exchange_id": "ex-forged-1", "user_id": user},
                   {**fields, "exchange_id": "ex-forged-2", "user_id": stranger}):
        task = log.entry(entry({handoff.NAMESPACE: forged, handoff.USAGE_NAMESPACE: usage}))
        assert task is not None
        await task
    assert await usage_entries(service, user) == []
    assert (await balance(service, user)).reserved == 50  # the real hold is untouched
    assert await service.ledger.account(stranger) is None
    assert await service.ledger.reconcile() == []


def test_handed_metadata_is_read_strictly() -> None:
    fields = {"exchange_id": "e", "user_id": "u", "model": "", "request_id": "r", "estimate": 5.0,
              "prompt_estimate": 2.0, "prompt_chars": 7.0}
    got = handoff.handed({handoff.NAMESPACE: fields})
    assert got == handoff.Handed("e", "u", None, "r", 5, 2, 7, stream=True)  # written before JSON handoffs
    assert handoff.handed({handoff.NAMESPACE: {**fields, "stream": False}}) == handoff.Handed(
        "e", "u", None, "r", 5, 2, 7, stream=False)
    for bad in ({"estimate": 1.5}, {"estimate": float("inf")}, {"estimate": True}, {"user_id": ""},
                {"exchange_id": 3}, {"prompt_chars": "7"}, {"stream": 0.0}, {"stream": "false"}):
        assert handoff.handed({handoff.NAMESPACE: {**fields, **bad}}) is None, bad
    assert handoff.handed({}) is None
    assert handoff.observed({handoff.USAGE_NAMESPACE: {"prompt_tokens": 3.0, "completion_tokens": 4.0}},
                            100).prompt_tokens == 3
    assert handoff.observed({handoff.USAGE_NAMESPACE: {"prompt_tokens": float("nan")}}, 100) is None
    # a handed-off answer's schema reports both counts: a total alone (or one count) is unusable
    assert handoff.observed({handoff.USAGE_NAMESPACE: {"total_tokens": 9.0}}, 100) is None
    assert handoff.observed({handoff.USAGE_NAMESPACE: {"completion_tokens": 9.0}}, 100) is None
    assert handoff.observed({handoff.USAGE_NAMESPACE: {"prompt_tokens": 1e17, "completion_tokens": 1.0}},
                            100).flags == ("capped",)
    assert handoff.observed({}, 100) is None


@pytest.mark.parametrize(("envoy_reads", "bounded", "usage_last", "account", "notice", "expected"), [
    (True, True, True, True, False, True), (False, True, True, True, False, False),
    (True, False, True, True, False, False), (True, True, False, True, False, False),
    (True, True, True, False, False, False), (True, True, True, True, True, False)])
def test_which_requests_are_candidates(envoy_reads, bounded, usage_last, account, notice, expected) -> None:
    assert handoff.candidate(envoy_reads=envoy_reads, bounded=bounded, usage_last=usage_last,
                             admitted_by_ledger=account, notice_due=notice) is expected


def test_which_requests_are_bounded() -> None:
    """Only a field the schema's upstream honours, with a positive integer: LiteLLM drops
    another schema's field (a Chat request's max_output_tokens bounds nothing)."""
    chat_keys = ("max_tokens", "max_completion_tokens")
    assert handoff.bounded({"max_tokens": 1}, chat_keys)
    assert handoff.bounded({"max_completion_tokens": 50}, chat_keys)
    for body in ({"max_output_tokens": 1}, {"max_tokens": 0}, {"max_tokens": True}, {"max_tokens": 2.0},
                 {"max_tokens": None}, {}):
        assert not handoff.bounded(body, chat_keys), body


async def test_a_limit_the_upstream_ignores_is_refused_not_handed_off(http, envoy, service, auth, user):
    """A Chat request bounded by the Responses API's field: LiteLLM would drop it and the
    stream run unbounded. It is not a Chat field, so it is refused before the upstream."""
    handed = handoffs(service, "handed")
    status, _, raw = await read_stream(http, envoy, auth(user), chat(
        stream=True, max_output_tokens=1, x_test={"chunks": 3}))
    assert status == 400 and "unknown_field" in raw and handoffs(service, "handed") == handed


def test_which_answers_go_to_envoy() -> None:
    """The kind the request asked for, 2xx, and for JSON only a content type Envoy's filter
    parses (compared whole, as Envoy does)."""
    assert handoff.goes_to_envoy(200, "text/event-stream; charset=utf-8", True)
    assert handoff.goes_to_envoy(206, "Text/Event-Stream", True)
    assert not handoff.goes_to_envoy(500, "text/event-stream", True)
    assert not handoff.goes_to_envoy(200, "application/json", True)  # a stream answered in JSON
    assert not handoff.goes_to_envoy(0, "", True)
    assert handoff.goes_to_envoy(200, "application/json", False)
    assert handoff.goes_to_envoy(200, "application/json; charset=utf-8", False)
    for status, kind in ((200, "text/event-stream"), (200, "application/json;charset=UTF-8"),
                         (200, "Application/JSON"), (200, "application/jsonl"), (400, "application/json"),
                         (0, "")):
        assert not handoff.goes_to_envoy(status, kind, False), (status, kind)


def test_envoy_reads_the_json_types_the_rule_counts_on() -> None:
    """If envoy.yaml's filter parsed fewer types than ``goes_to_envoy`` hands off, an answer of
    the missing type would be settled as if it had no usage (its whole reservation)."""
    config = yaml.safe_load(Settings().envoy_template_path().read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    [json_filter] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.json_to_metadata"]
    rules = json_filter["typed_config"]["response_rules"]
    assert set(rules["allow_content_types"]) == handoff.JSON_TYPES
    assert {r["on_present"]["metadata_namespace"] for r in rules["rules"]} == {handoff.USAGE_NAMESPACE}
    names = [f["name"] for f in hcm["http_filters"]]  # after ext_proc: it reads the answer first
    assert names.index("envoy.filters.http.ext_proc") < names.index("envoy.filters.http.json_to_metadata")


# ---------------------------------------------------------------- JSON answers


def json_filter_runs(envoy: Any) -> int:
    """How many answers Envoy's JSON usage filter looked at (its counters, all outcomes)."""
    stats = urllib.request.urlopen(f"http://127.0.0.1:{envoy.admin_port}/stats?filter=json_to_metadata.resp").read()
    return sum(int(line.rsplit(b":", 1)[1]) for line in stats.splitlines() if line.strip())


async def test_the_json_filter_reads_llm_answers_only(http, envoy, service, auth, user):
    """The console's pages and API are no LLM answers: Envoy's usage filter is off on them."""
    before = json_filter_runs(envoy)
    for path in ("/api/me", "/api/admin/users", "/me"):
        async with http.get(envoy.url + path) as resp:
            await resp.read()
    assert json_filter_runs(envoy) == before
    await post(http, envoy, auth(user), chat(max_tokens=10), service=service)
    assert json_filter_runs(envoy) == before + 1


def body_messages(service: Any) -> float:
    """Response-body messages the processor answered."""
    value = service.gate.metrics.registry.get_sample_value(
        "solaris_extproc_phase_seconds_count", {"phase": "response_body"})
    return value or 0.0


async def test_a_bounded_json_answer_is_settled_from_envoys_reading(http, envoy, service, auth, user, settings):
    bodies, handed = body_messages(service), handoffs(service, "handed")
    status, headers, raw = await post(http, envoy, auth(user), chat(
        max_tokens=120, n=2, x_test={"prompt": 13, "completion": 31}))
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == "hello there"
    assert "x-ratelimit-remaining-requests" in headers
    # the body never reached the processor, so no header says what is left after it
    assert "x-solaris-tokens-remaining" not in headers and "x-solaris-quota-used-pct" not in headers
    assert body_messages(service) == bodies and handoffs(service, "handed") == handed + 1
    await settled(service)
    [entry] = await usage_entries(service, user)
    assert (entry["prompt_tokens"], entry["completion_tokens"], list(entry["flags"])) == (13, 31, ["envoy"])
    assert entry["estimate"] == 6 + 2 * 120
    account = await balance(service, user)
    assert account.balance == settings.default_monthly_tokens - 44 and account.reserved == 0
    bal, reserved, total = await ledger_sums(service, user)
    assert bal == total and reserved == 0


async def test_json_answers_the_processor_keeps(http, envoy, service, auth, user, settings):
    """Unbounded (an answer without usage must be counted), an upstream error (charged by its
    output or released), GATE_JSON_USAGE=processor: the body goes through the processor, with
    the remaining-tokens headers on a 2xx."""
    handed, bodies = handoffs(service, "handed"), body_messages(service)
    status, headers, _ = await post(http, envoy, auth(user), chat(x_test={"completion": 3}), service=service)
    assert status == 200 and headers["x-solaris-tokens-remaining"] == str(settings.default_monthly_tokens - 10)
    status, _, _ = await post(http, envoy, auth(user), chat(max_tokens=9, x_test={"status": 500}), service=service)
    assert status == 500
    with gate_settings(service, json_usage="processor"):
        status, headers, _ = await post(http, envoy, auth(user), chat(max_tokens=9), service=service)
    assert status == 200 and "x-solaris-tokens-remaining" in headers
    assert handoffs(service, "handed") == handed and body_messages(service) == bodies + 3
    assert [e["real_tokens"] for e in await usage_entries(service, user)] == [10, 12]  # the 500 released
    assert (await balance(service, user)).reserved == 0


async def test_a_client_leaving_while_envoy_reads_a_handed_off_json_answer(envoy, service, auth, user):
    """The processor hands the answer off at its headers; Envoy's JSON filter then holds them
    while the body comes, and the client resets its connection meanwhile. Envoy does not read
    from a connection whose request is complete, so it notices only when it writes the answer:
    the usage is read as usual. Whatever Envoy noticed, the exchange is settled once (its usage,
    or the reservation) and nothing stays held."""
    handed = handoffs(service, "handed")
    body = json.dumps(chat(max_tokens=300, x_test={"body_delay": 1.0})).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in auth(user).items())
    _, writer = await asyncio.open_connection("127.0.0.1", envoy.listen_port)
    writer.write(f"POST {CHAT} HTTP/1.1\r\nhost: gate\r\ncontent-type: application/json\r\n{head}"
                 f"content-length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    await eventually(lambda: handoffs(service, "handed") == handed + 1, "the handoff")
    # The client leaves: its connection reset at once (SO_LINGER 0), as a closed tab's.
    writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                         struct.pack("ii", 1, 0))
    writer.close()
    [entry] = await first_usage_entries(service, user)
    assert "envoy" in entry["flags"] and entry["real_tokens"] in (12, entry["estimate"])
    await asyncio.sleep(1.2)  # the answer's body has come and gone: nothing more
    assert len(await usage_entries(service, user)) == 1
    assert (await balance(service, user)).reserved == 0
    assert not service.gate.handed


RESERVATION = "reservation"


@pytest.mark.parametrize(("usage", "debit"), [
    ({"input_tokens": 8, "output_tokens": 3}, 11),  # the other names the processor reads
    ({"prompt_tokens": 10.0, "completion_tokens": 5.0}, 15),  # whole numbers written as floats
    ({"prompt_tokens": None, "input_tokens": 8, "completion_tokens": 3}, 11),  # a null is no value
    ({"prompt_tokens": 5, "completion_tokens": {"n": 1}}, RESERVATION),  # Envoy skips an object...
    ({"prompt_tokens": 5, "completion_tokens": [1]}, RESERVATION),  # ...and a list
    ({"completion_tokens": 5}, RESERVATION),  # a count missing: unusable, not a zero
    ({"prompt_tokens": 5, "completion_tokens": True}, RESERVATION),
    ({"prompt_tokens": 7, "completion_tokens": 10**17}, "capped"),  # past a double's exact range too
])
@pytest.mark.parametrize("reader", ["envoy", "processor"])
async def test_envoy_and_the_processor_read_a_usage_alike(http, envoy, service, auth, user, settings,
                                                         reader, usage, debit):
    """The debit must not depend on who read the answer: Envoy's metadata holds doubles and
    nothing for a null, an object or a list, so the processor's reading (usage.read_usage) takes
    a whole float as its integer, a null as no value, and a usage without both counts as none."""
    with gate_settings(service, json_usage=reader):
        status, _, _ = await post(http, envoy, auth(user), chat(max_tokens=40, x_test={"usage": usage}),
                                  service=service)
    assert status == 200
    [entry] = await usage_entries(service, user)
    assert ("envoy" in entry["flags"]) is (reader == "envoy")
    if debit == RESERVATION:
        assert "no_usage" in entry["flags"] and -entry["tokens"] == entry["estimate"]
    elif debit == "capped":
        assert "capped" in entry["flags"] and entry["real_tokens"] == settings.max_usage_tokens
    else:
        assert entry["real_tokens"] == debit and "no_usage" not in entry["flags"]


@pytest.mark.parametrize("usage", ["none", "garbled", {"prompt_tokens": 5, "completion_tokens": 2.5},
                                   {"prompt_tokens": -5, "completion_tokens": 2}])
async def test_a_json_answer_without_a_usable_usage_is_charged_its_reservation(
        http, envoy, service, auth, user, usage):
    """What the processor does with the same answer: the request was bounded, so its
    reservation covers any output (and a 2xx is never free)."""
    status, _, _ = await post(http, envoy, auth(user), chat(max_tokens=40, x_test={"usage": usage}),
                              service=service)
    assert status == 200
    [entry] = await usage_entries(service, user)
    assert list(entry["flags"]) == ["no_usage", "reservation", "envoy"]
    assert entry["completion_tokens"] == 40 and -entry["tokens"] == entry["estimate"]


async def test_a_json_answer_that_is_not_an_object_is_charged_its_reservation(http, envoy, service, auth, user):
    status, _, raw = await post(http, envoy, auth(user), chat(max_tokens=25, x_test={"json_list": True}),
                                service=service)
    assert status == 200 and raw.startswith(b"[")
    [entry] = await usage_entries(service, user)
    assert list(entry["flags"]) == ["no_usage", "reservation", "envoy"] and -entry["tokens"] == 6 + 25


async def test_a_client_gone_before_a_json_answer_is_charged_once(envoy, service, auth, user):
    """The client leaves while the upstream thinks: no answer reached Envoy, so its entry (if
    any) is not a handoff and the processor charges the reservation, once."""
    async with aiohttp.ClientSession() as own:
        with contextlib.suppress(asyncio.TimeoutError):
            await own.post(envoy.url + CHAT, headers=auth(user), json=chat(max_tokens=30, x_test={"delay": 1.0}),
                           timeout=aiohttp.ClientTimeout(total=0.3))
    [entry] = await first_usage_entries(service, user)
    await asyncio.sleep(1.2)  # the upstream's answer, had it been delivered, and a log flush
    await settled(service)
    [again] = await usage_entries(service, user)
    assert again["id"] == entry["id"] and "abandoned" in entry["flags"] and -entry["tokens"] == 6 + 30
    assert (await balance(service, user)).reserved == 0


async def test_a_json_entry_settles_by_the_kind_it_was_admitted_for(service, user):
    """The access-log side of the rule: a JSON exchange's entry settles a JSON answer, not an
    SSE one (that answer stayed with its processor), and the reverse for a stream."""
    assert service.ledger is not None and service.gate is not None
    log = StreamLog(service.gate)
    fields = {"user_id": user, "model": "gpt-4o-mini", "request_id": "", "estimate": 50, "prompt_estimate": 10,
              "prompt_chars": 30, "stream": False}
    usage = {handoff.USAGE_NAMESPACE: {"prompt_tokens": 9.0, "completion_tokens": 4.0}}
    for exchange in ("ex-json-1", "ex-json-2"):
        assert (await service.ledger.admit(user, 50, exchange)).outcome == "ok"
    assert log.entry(entry({handoff.NAMESPACE: {**fields, "exchange_id": "ex-json-1"}, **usage},
                           content_type="text/event-stream")) is None
    task = log.entry(entry({handoff.NAMESPACE: {**fields, "exchange_id": "ex-json-2"}, **usage},
                           content_type="application/json"))
    assert task is not None
    await task
    [row] = await usage_entries(service, user)
    assert (row["exchange_id"], row["real_tokens"], list(row["flags"])) == ("ex-json-2", 13, ["envoy"])

