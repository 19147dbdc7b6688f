"""Reading usage from upstream responses: validated like any input."""

from __future__ import annotations

import json

import pytest

from extproc.gate import usage as u
from extproc.gate.translators.chat import Chat
from extproc.gate.translators.responses import Responses


def sse(*events: object) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n"
                    for e in events)


@pytest.mark.parametrize("raw,expected", [
    ({"prompt_tokens": 3, "completion_tokens": 4}, (3, 4, ())),
    ({"input_tokens": 5, "output_tokens": 6}, (5, 6, ())),          # Responses API
    ({"prompt_tokens": 9, "total_tokens": 9}, (9, 0, ())),          # embeddings
    ({"total_tokens": 9}, (9, 0, ())),
    ({"prompt_tokens": 10**9, "completion_tokens": 10**9}, (1000, 0, ("capped",))),
    ({"prompt_tokens": 10, "completion_tokens": 10**9}, (10, 990, ("capped",))),
])
def test_read_usage(raw: dict, expected: tuple) -> None:
    observed = u.read_usage(raw, cap=1000)
    assert observed is not None
    assert (observed.prompt_tokens, observed.completion_tokens, observed.flags) == expected


@pytest.mark.parametrize("raw", [
    None, "12", [], {}, {"prompt_tokens": -1, "completion_tokens": 5}, {"prompt_tokens": 1.5},
    {"prompt_tokens": True}, {"completion_tokens": "7"},
])
def test_unusable_usage_is_none_never_a_credit(raw: object) -> None:
    assert u.read_usage(raw, cap=1000) is None


def test_every_schema_that_completes_needs_both_counts() -> None:
    """A null is no value (Envoy's metadata cannot tell it from a missing key), so a schema that
    always reports both counts reads a usage missing one as no usage (its reservation), never as
    a zero; embeddings report a prompt count alone."""
    from extproc.gate.translators.completions import Completions
    from extproc.gate.translators.embeddings import Embeddings

    for reader, usage in ((Chat(), {"prompt_tokens": 100, "completion_tokens": None}),
                          (Completions(), {"prompt_tokens": 100}), (Chat(), {"total_tokens": 9}),
                          (Responses(), {"input_tokens": 100, "output_tokens": None}),
                          (Responses(), {"input_tokens": 100})):
        assert reader.usage_of({"usage": usage}, 1000) is None, (reader.kind, usage)
    stream_end = {"type": "response.completed", "response": {"usage": {"input_tokens": 100, "output_tokens": None}}}
    assert Responses().usage_of(stream_end, 1000) is None
    assert Embeddings().usage_of({"usage": {"prompt_tokens": 9, "total_tokens": 9}}, 1000).prompt_tokens == 9
    whole = Chat().usage_of({"usage": {"prompt_tokens": 3.0, "completion_tokens": 1e1}}, 1000)
    assert (whole.prompt_tokens, whole.completion_tokens) == (3, 10)


def test_read_body_shapes() -> None:
    from extproc.gate.translators.completions import Completions

    body = json.dumps({"choices": [{"message": {"content": "hi there"}}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 2}}).encode()
    observed, text = u.read_body(Chat(), body, 100)
    assert (observed.prompt_tokens, observed.completion_tokens, text) == (1, 2, "hi there")
    responses = json.dumps({"response": {"usage": {"input_tokens": 4, "output_tokens": 5}}}).encode()
    assert u.read_body(Responses(), responses, 100)[0].completion_tokens == 5
    assert u.read_body(Chat(), b"<html>bad gateway</html>", 100) == (None, "")
    assert u.read_body(Chat(), b"[1]", 100) == (None, "")
    old = json.dumps({"choices": [{"text": "old"}, 5]}).encode()
    assert u.read_body(Completions(), old, 100) == (None, "old")


def test_stream_tap_reads_final_usage_chunk() -> None:
    tap = u.StreamTap(cap=10**6)
    stream = sse({"choices": [{"delta": {"content": "a"}}]}, b"not json", [1, 2],
                 {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 8}}, b"[DONE]")
    for i in range(0, len(stream), 7):  # chunk boundaries anywhere
        tap.feed(stream[i:i + 7])
    tap.feed(b"")
    observed, text = tap.result(Chat())
    assert (observed.prompt_tokens, observed.completion_tokens, observed.flags) == (7, 8, ())
    assert text == ""  # with usage, the text is not needed (nor decoded)


def test_stream_tap_responses_api_completed_event() -> None:
    tap = u.StreamTap(cap=10**6)
    tap.feed(sse({"type": "response.output_text.delta", "delta": "Olá"},
                 {"type": "response.completed", "response": {"usage": {"input_tokens": 3, "output_tokens": 2}}}))
    observed, text = tap.result(Responses())
    assert (observed.prompt_tokens, observed.completion_tokens, text) == (3, 2, "")
    without = u.StreamTap(cap=10**6)
    without.feed(sse({"type": "response.output_text.delta", "delta": "Olá"}))
    assert without.result(Responses()) == (None, "Olá")


def test_stream_without_usage_gives_the_visible_text() -> None:
    tap = u.StreamTap(cap=10**6)
    tap.feed(sse({"choices": [{"delta": {"content": "hello world"}}]}))
    assert tap.result(Chat()) == (None, "hello world")
    assert u.StreamTap(cap=1).result(Chat()) == (None, "")


def test_huge_stream_keeps_the_tail_and_counts_the_rest(monkeypatch) -> None:
    monkeypatch.setattr(u, "STREAM_KEEP_BYTES", 2000)
    monkeypatch.setattr(u, "STREAM_TAIL_BYTES", 500)
    tap = u.StreamTap(cap=10**6)
    for _ in range(100):
        tap.feed(sse({"choices": [{"delta": {"content": "x" * 20}}]}))
    assert tap.size <= 2000 + 200 and tap.dropped_chars > 0
    observed, _ = tap.result(Chat())
    assert observed is None and tap.dropped_tokens(0.376) > 0
    tap.feed(sse({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}))
    assert tap.result(Chat())[0].completion_tokens == 1  # the final usage chunk survives


def test_count_tokens_falls_back_to_characters(monkeypatch) -> None:
    monkeypatch.setattr(u, "encoder", lambda: None)
    assert u.count_tokens("x" * 100, 0.376) == (38, "chars")


def test_a_long_stream_decodes_only_its_usage_event(monkeypatch) -> None:
    tap = u.StreamTap(cap=10**6)
    tap.feed(sse(*[{"choices": [{"delta": {"content": f"w{i} "}}]} for i in range(200)],
                 {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 200}}, b"[DONE]"))
    decoded = []
    real = u.parse_object
    monkeypatch.setattr(u, "parse_object", lambda raw: decoded.append(raw) or real(raw))
    assert tap.result(Chat())[0].completion_tokens == 200
    assert len(decoded) == 1
