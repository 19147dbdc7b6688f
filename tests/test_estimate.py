"""The estimate rules of docs/estimate.md, called as plain functions, plus a property test:
for random bodies of each API schema the estimate is never below the documented rule and
never 0."""

from __future__ import annotations

import ast
import base64
import dataclasses
import importlib.util
import json
import math
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.gate import billable as e
from extproc.gate.translators import TRANSLATORS, Limits

FACTOR = 0.376
LIMITS = Limits(default_completion=1024, max_completion=131072, server_context_tokens=32768)
BY_KIND = {t.kind: t for t in TRANSLATORS}


def est(kind: str, body: dict) -> e.Estimate:
    """The estimate of ``body`` by the translator of API schema ``kind``."""
    return BY_KIND[kind].estimate(body, LIMITS)


def png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)))


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def wav(seconds: float, rate: int = 16000) -> bytes:
    data = b"\x00\x00" * int(rate * seconds)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
            + fmt + b"data" + struct.pack("<I", len(data)) + data)


# ---------------------------------------------------------------- one test per rule


def test_text_everywhere_a_provider_bills_it() -> None:
    body = {"model": "m", "system": "sys", "messages": [
        {"role": "system", "content": "abc"},
        {"role": "user", "content": [{"type": "text", "text": "de"}], "name": "ana"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "result"}],
        "unknown_future_field": "xyz"}
    # "system" (another provider's field) and the future field are refused unless the operator
    # allows them (test_unknown_fields_are_refused_unless_the_operator_allows_them); allowed,
    # their text is billed like any other.
    found = BY_KIND["chat"].estimate(body, dataclasses.replace(
        LIMITS, extra_fields=frozenset({"system", "unknown_future_field"})))
    # sys + abc + de + ana + c1 + f + {} + c1 + result + xyz (labels role/type are not billed)
    assert found.text_chars == 3 + 3 + 2 + 3 + 2 + 1 + 2 + 2 + 6 + 3
    assert found.completion == 1024 and found.completions == 1


def test_responses_input_items_and_instructions() -> None:
    body = {"model": "m", "instructions": "be brief", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hello"}]},
        {"type": "function_call_output", "call_id": "x", "output": "42"}]}
    assert est("responses", body).text_chars == len("be brief") + 5 + 1 + 2


def test_schemas_count_their_whole_json() -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {f"field_{i}": {"type": "string", "description": "d" * 50}
                                         for i in range(200)}}}}]
    schema = {"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"}}}
    found = est("chat", {"model": "m", "messages": [], "tools": tools, "response_format": schema})
    compact = len(json.dumps(tools, separators=(",", ":"))) + len(json.dumps(schema, separators=(",", ":")))
    assert found.text_chars == compact > 15_000


def test_token_ids_one_token_each() -> None:
    assert est("completions", {"model": "m", "prompt": list(range(500))}).input_tokens == 500
    assert est("embeddings", {"model": "m", "input": [[1, 2, 3], [4, 5]]}).input_tokens == 5
    assert est("embeddings", {"model": "m", "input": [[1, 2, 3], [4, 5]]}).completion == 0


@pytest.mark.parametrize("part,tokens", [
    ({"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}, 85),
    ({"type": "image_url", "image_url": {"url": "https://x/y.png"}}, 1445),
    ({"type": "image_url", "image_url": {"url": data_url(png(1024, 1024))}}, 765),
    ({"type": "image_url", "image_url": {"url": data_url(png(100, 100)), "detail": "high"}}, 255),
    ({"type": "image_url", "image_url": {"url": data_url(png(4096, 2048))}}, 85 + 170 * 6),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}, 1445),
    ({"type": "input_image", "image_url": "https://x/y.png", "detail": "low"}, 85),
    ({"type": "input_image", "file_id": "file-1"}, 1445),
])
def test_images(part: dict, tokens: int) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [part]}]}
    assert est("chat", body).input_tokens == tokens


def test_image_headers_of_each_format() -> None:
    gif = b"GIF89a" + struct.pack("<HH", 300, 200)
    jpeg = (b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9
            + b"\xff\xc0" + struct.pack(">HBHH", 17, 8, 600, 800) + b"\x00" * 12)
    webp = b"RIFF" + b"\x00" * 4 + b"WEBPVP8X" + b"\x00" * 8 + (639).to_bytes(3, "little") + (479).to_bytes(3, "little")
    assert e.image_size(png(10, 20)) == (10, 20)
    assert e.image_size(gif) == (300, 200)
    assert e.image_size(jpeg) == (800, 600)
    assert e.image_size(webp) == (640, 480)
    assert e.image_size(b"nonsense") is None


def test_audio_wav_by_duration_other_by_size() -> None:
    two_seconds = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav(2)).decode(), "format": "wav"}}
    mp3_data = base64.b64encode(b"\xff\xfb" * 5000).decode()
    mp3 = {"type": "input_audio", "input_audio": {"data": mp3_data, "format": "mp3"}}
    # 2 s of samples plus the 44-byte header, at 32,000 bytes/s, x 50 tokens/s, rounded up
    assert est("chat", {"model": "m", "messages": [{"role": "user", "content": [two_seconds]}]}).input_tokens == 101
    # 10 kB at 1 kB/s = 10 s = 500 tokens
    assert est("chat", {"model": "m", "messages": [{"role": "user", "content": [mp3]}]}).input_tokens == 500


def test_files() -> None:
    pdf = b"%PDF-1.4\n1 0 obj << /Type /Pages /Count 3 >>\n" + b"<< /Type /Page >>" * 3
    part = {"type": "file", "file": {"file_data": data_url(pdf, "application/pdf"), "filename": "a.pdf"}}
    found = est("chat", {"model": "m", "messages": [{"role": "user", "content": [part]}]})
    assert found.input_tokens == 3 * 2500 and found.text_chars == len("a.pdf")
    text = {"type": "input_file", "file_data": data_url(b"x" * 1000, "text/plain")}
    assert est("responses", {"model": "m", "input": [{"role": "user", "content": [text]}]}).text_chars == 1000
    by_id = {"type": "input_file", "file_id": "file-abc"}
    assert est("responses", {"model": "m", "input": [{"role": "user", "content": [by_id]}]}).input_tokens == 32768


def test_server_side_context() -> None:
    assert est("responses", {"model": "m", "input": "hi", "previous_response_id": "resp_1"}).input_tokens == 32768
    template = {"model": "m", "prompt": {"id": "pmpt_1", "variables": {"city": "Recife"}}}
    found = est("responses", template)
    assert (found.input_tokens, found.text_chars) == (32768, len("Recife"))


def test_completion_allowance_takes_the_largest_field() -> None:
    body = {"model": "m", "messages": [], "max_completion_tokens": 1, "max_tokens": 5000}
    assert est("chat", body).completion == 5000
    with pytest.raises(e.Refusal) as refused:
        e.completion_allowance({"max_completion_tokens": 200_000}, 1024, 131072)
    assert refused.value.code == "max_tokens_above"
    for bad in (-1, 1.5, True, "9"):
        with pytest.raises(e.Refusal):
            e.completion_allowance({"max_tokens": bad}, 1024, 131072)
    assert e.completion_allowance({"max_tokens": None}, 1024, 131072) == 1024


def test_completions_multiply() -> None:
    assert est("chat", {"model": "m", "messages": [], "n": 3}).completions == 3
    assert est("completions", {"model": "m", "prompt": "x", "n": 2, "best_of": 5}).completions == 5
    assert est("completions", {"model": "m", "prompt": ["a", "b", "c"], "n": 2}).completions == 6
    assert est("responses", {"model": "m", "input": "x"}).completions == 1
    with pytest.raises(e.Refusal) as refused:  # not a field of the Responses API
        est("responses", {"model": "m", "input": "x", "n": 9})
    assert (refused.value.code, refused.value.detail) == ("unknown_field", "n")
    with pytest.raises(e.Refusal):
        est("chat", {"model": "m", "messages": [], "n": 0})
    with pytest.raises(e.Refusal):
        est("chat", {"model": "m", "messages": [], "n": 10_000})


def test_never_zero() -> None:
    assert est("embeddings", {"model": "m", "input": ""}).tokens(FACTOR) == 1
    assert est("chat", {"model": "m", "messages": [], "max_tokens": 0}).tokens(FACTOR) == 1


@pytest.mark.parametrize("model,code", [
    ("gpt-4o,gpt-4o-mini", "model_list"), ("", "model_required"), (None, "model_required"),
    (7, "model_required"), ("other", "model_not_allowed"),
])
def test_model_checks(model: object, code: str) -> None:
    with pytest.raises(e.Refusal) as refused:
        e.check_model(model, frozenset({"gpt-4o"}))
    assert refused.value.code == code
    assert e.check_model("gpt-4o", frozenset({"gpt-4o"})) == "gpt-4o"
    assert e.check_model("anything", frozenset()) == "anything"


def test_unknown_fields_are_refused_unless_the_operator_allows_them() -> None:
    """Each schema accepts its own fields only: LiteLLM acts on dozens of body parameters of
    its own (a model list with another server and the operator's key, parameters dropped
    after the gate wrote them), so what the gate does not know does not pass. An operator
    adds a provider's field with GATE_EXTRA_BODY_FIELDS; a field that changes how the proxy
    calls the model cannot be added (the service refuses to start)."""
    for kind, body in (("chat", {"model": "m", "messages": [], "thinking": {"type": "enabled"}}),
                       ("completions", {"model": "m", "prompt": "x", "messages": []}),
                       ("embeddings", {"model": "m", "input": "x", "max_tokens": 5}),
                       ("responses", {"model": "m", "input": "x", "max_tokens": 5})):
        with pytest.raises(e.Refusal) as refused:
            est(kind, body)
        assert refused.value.code == "unknown_field" and refused.value.detail in body
    allowed = dataclasses.replace(LIMITS, extra_fields=e.operator_fields(frozenset({"thinking", "system"})))
    found = BY_KIND["chat"].estimate({"model": "m", "messages": [], "thinking": {"type": "enabled"},
                                      "system": "be brief"}, allowed)
    assert found.text_chars == len("be brief")  # an allowed field's text is billed
    with pytest.raises(ValueError, match="model_list"):
        e.operator_fields(frozenset({"thinking", "model_list"}))


def test_the_field_lists_follow_the_openai_sdk() -> None:
    """Every request field the installed OpenAI SDK knows for a schema is accepted by that
    schema, or refused on purpose (REFUSED_OPENAI_FIELDS, with the reason): a new OpenAI
    field shows up here as a failure rather than as 400s for real clients."""
    from openai.types import completion_create_params, embedding_create_params
    from openai.types.chat import completion_create_params as chat_params
    from openai.types.responses import response_create_params

    sdk = {
        "chat": chat_params.CompletionCreateParamsBase,
        "completions": completion_create_params.CompletionCreateParamsBase,
        "embeddings": embedding_create_params.EmbeddingCreateParams,
        "responses": response_create_params.ResponseCreateParamsBase,
    }
    for kind, params in sdk.items():
        missing = set(params.__annotations__) - BY_KIND[kind].fields - set(e.REFUSED_OPENAI_FIELDS)
        assert not missing, f"{kind}: OpenAI fields neither accepted nor refused on purpose: {sorted(missing)}"
    with pytest.raises(e.Refusal) as refused:
        est("chat", {"model": "m", "messages": [], "web_search_options": {}})
    assert refused.value.code == "unknown_field"


def test_litellm_own_parameters_cannot_be_allowed_by_the_operator() -> None:
    """LITELLM_PARAMS is LiteLLM's own list (the installed version's, kept in step here);
    none of it, nor a provider credential, can be added with GATE_EXTRA_BODY_FIELDS."""
    # Read from the installed LiteLLM's source: importing litellm here would load its whole
    # proxy machinery into the test process.
    spec = importlib.util.find_spec("litellm")
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).parent / "types" / "utils.py"
    # There: all_litellm_params = [<names>] + list(StandardCallbackDynamicParams.__annotations__)
    tree = ast.parse(source.read_text()).body
    [listed] = [node.value for node in tree if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "all_litellm_params" for t in node.targets)]
    assert isinstance(listed, ast.BinOp) and isinstance(listed.left, ast.List)
    [callbacks] = [node for node in tree
                   if isinstance(node, ast.ClassDef) and node.name == "StandardCallbackDynamicParams"]
    theirs = set(ast.literal_eval(listed.left)) | {
        n.target.id for n in callbacks.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    assert theirs and theirs <= e.LITELLM_PARAMS, sorted(theirs - e.LITELLM_PARAMS)
    for name in ("prompt_variables", "input_cost_per_token", "aws_secret_access_key", "vertex_credentials",
                 "azure_ad_token", "litellm_trace_id", "mock_tool_calls", "model_list"):
        with pytest.raises(ValueError, match=name):
            e.operator_fields(frozenset({name}))
    assert e.operator_fields(frozenset({"system", "thinking"})) == {"system", "thinking"}


@pytest.mark.parametrize("metadata,detail", [
    ({"tags": "paid-tier"}, "metadata.tags"), ({"guardrails": "none"}, "metadata.guardrails"),
    ({"litellm_trace_id": "x"}, "metadata.litellm_trace_id"), ({"team": ["a"]}, "metadata.team"),
    ({"k": "v" * 513}, "metadata.k"), ({f"k{i}": "v" for i in range(17)}, "metadata"), ("tags", "metadata"),
    ({"user_id": "someone-else"}, "metadata.user_id"),
])
def test_metadata_is_openais_not_litellms(metadata: object, detail: str) -> None:
    """OpenAI's metadata is up to 16 string pairs; on a chat request LiteLLM also reads its own
    controls from it (tags route to tagged deployments, guardrails pick guardrails)."""
    for kind in ("chat", "responses"):
        body = {"model": "m", "metadata": metadata, **({"messages": []} if kind == "chat" else {"input": "x"})}
        with pytest.raises(e.Refusal) as refused:
            est(kind, body)
        assert (refused.value.code, refused.value.detail) == ("bad_metadata", detail)
    assert est("chat", {"model": "m", "messages": [], "metadata": {"conversation": "c-1", "team": "sales",
                                                                  "user_identifier": "u"}})


@pytest.mark.parametrize(("tool", "detail"), [
    ({"type": "web_search_preview"}, "web_search_preview"), ({"type": "web_search"}, "web_search"),
    ({"type": "file_search", "vector_store_ids": ["vs_1"]}, "file_search"), ({"type": "code_interpreter"},
                                                                             "code_interpreter"),
    ({"type": "image_generation"}, "image_generation"), ({"type": "mcp", "server_url": "https://x"}, "mcp"),
    ({"function": {"name": "f"}}, "tools"), ("function", "tools"), ({"type": 3}, "tools"), ({"type": {}}, "tools"),
    ({"googleSearch": {}}, "tools"),  # Vertex AI's, without a type
])
def test_tools_the_provider_runs_are_refused(tool: object, detail: str) -> None:
    """A tool the provider runs itself has a fee per call that no token estimate covers (LiteLLM
    passes the Responses API's tools on unchanged); function and custom tools are tokens."""
    for kind in ("chat", "responses"):
        body = {"model": "m", "tools": [{"type": "function", "name": "ok"}, tool],
                **({"messages": []} if kind == "chat" else {"input": "x"})}
        with pytest.raises(e.Refusal) as refused:
            est(kind, body)
        assert (refused.value.code, refused.value.detail) == ("tool_not_allowed", detail)
    fine = [{"type": "function", "function": {"name": "f", "parameters": {}}},
            {"type": "custom", "custom": {"name": "g"}},
            # run by the client, billed as tokens
            {"type": "computer_20241022", "name": "computer"}, {"type": "bash_20250124", "name": "bash"},
            {"type": "text_editor_20250124", "name": "str_replace_editor"}, {"type": "computer_use_preview"},
            {"type": "local_shell"}]
    assert est("chat", {"model": "m", "messages": [], "tools": fine})
    with pytest.raises(e.Refusal) as refused:
        est("chat", {"model": "m", "messages": [], "tools": {"type": "function"}})
    assert refused.value.code == "tool_not_allowed"
    assert est("responses", {"model": "m", "input": "x", "tools": [{"type": "function", "name": "f"}]})


@pytest.mark.parametrize("key", sorted(e.FAN_OUT_KEYS))
def test_fan_out_keys_refused(key: str) -> None:
    with pytest.raises(e.Refusal) as refused:
        est("chat", {"model": "m", "messages": [], key: ["x"]})
    assert (refused.value.code, refused.value.detail) == ("fan_out", key)


# ---------------------------------------------------------------- the property


@st.composite
def parts(draw: st.DrawFn) -> tuple[object, int, int]:
    """A content part and the (characters, tokens) the documented rule bills for it at least."""
    kind = draw(st.sampled_from(["text", "image_low", "image_url", "image_data", "audio", "file_id"]))
    if kind == "text":
        text = draw(st.text(max_size=200))
        return {"type": "text", "text": text}, len(text), 0
    if kind == "image_low":
        return {"type": "image_url", "image_url": {"url": "https://h/i.png", "detail": "low"}}, 0, 85
    if kind == "image_url":
        detail = draw(st.sampled_from(["high", "auto", None]))
        inner = {"url": "https://h/i.png", **({"detail": detail} if detail else {})}
        return {"type": "image_url", "image_url": inner}, 0, 85
    if kind == "image_data":
        w, h = draw(st.integers(1, 5000)), draw(st.integers(1, 5000))
        return {"type": "image_url", "image_url": {"url": data_url(png(w, h))}}, 0, 85
    if kind == "audio":
        seconds = draw(st.floats(0.1, 3))
        data = base64.b64encode(wav(seconds, 8000)).decode()
        return ({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}, 0,
                math.floor(seconds * 25))  # at least the highest published rate
    return {"type": "file", "file": {"file_id": "file-1"}}, 0, 1


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, dict, int, int, int]:
    """(kind, body, minimum characters, minimum direct tokens, minimum completion tokens)."""
    kind = draw(st.sampled_from(["chat", "completions", "embeddings", "responses"]))
    chars = tokens = 0
    body: dict = {"model": "m"}
    if kind == "chat":
        messages = []
        for _ in range(draw(st.integers(0, 4))):
            content = draw(st.lists(parts(), max_size=4))
            messages.append({"role": "user", "content": [p for p, _, _ in content]})
            chars += sum(c for _, c, _ in content)
            tokens += sum(t for _, _, t in content)
        body["messages"] = messages
    elif kind == "responses":
        text = draw(st.text(max_size=300))
        body["input"] = [{"role": "user", "content": [{"type": "input_text", "text": text}]}]
        body["instructions"] = draw(st.text(max_size=50))
        chars += len(text) + len(body["instructions"])
    else:
        if draw(st.booleans()):
            ids = draw(st.lists(st.integers(0, 100_000), min_size=1, max_size=300))
            body["prompt" if kind == "completions" else "input"] = ids
            tokens += len(ids)
        else:
            text = draw(st.text(max_size=300))
            body["prompt" if kind == "completions" else "input"] = text
            chars += len(text)
    if kind in ("chat", "responses") and draw(st.booleans()):
        tools = [{"type": "function", "function": {"name": draw(st.text("abc", min_size=1, max_size=20)),
                                                   "parameters": {"type": "object"}}}]
        body["tools"] = tools
        chars += len(json.dumps(tools, separators=(",", ":"), ensure_ascii=False))
    own = {"chat": ("max_tokens", "max_completion_tokens"), "completions": ("max_tokens",),
           "responses": ("max_output_tokens",), "embeddings": ()}[kind]
    maxes = {k: draw(st.none() | st.integers(0, 5000)) for k in own}
    body.update({k: v for k, v in maxes.items() if v is not None})
    present = [v for v in maxes.values() if v is not None]
    per_completion = max(present) if present else 1024
    completions = 1
    if kind in ("chat", "completions"):
        completions = draw(st.integers(1, 5))
        body["n"] = completions
    completion = 0 if kind == "embeddings" else per_completion * completions
    return kind, body, chars, tokens, completion


@settings(max_examples=300, deadline=None)
@given(bodies())
def test_estimate_never_below_the_rule_and_never_zero(case: tuple[str, dict, int, int, int]) -> None:
    kind, body, chars, tokens, completion = case
    found = est(kind, body)
    reserved = found.tokens(FACTOR)
    assert reserved >= 1
    assert reserved >= math.ceil(chars * FACTOR) + tokens + completion
    assert found.text_chars >= chars



def test_text_beside_a_media_payload_is_still_counted() -> None:
    text = "x" * 10_000
    as_image = {"model": "m", "messages": [{"role": "user", "type": "image", "content": text}]}
    with_key = {"model": "m", "messages": [{"role": "user", "image_url": "https://h/i", "content": text}]}
    as_file = {"model": "m", "messages": [{"role": "user", "type": "file", "content": text}]}
    for body in (as_image, with_key, as_file):
        assert est("chat", body).text_chars >= len(text)


@pytest.mark.parametrize("part", [
    {"type": ["x"], "text": "abc"},                                     # an unhashable type
    {"type": "input_audio", "input_audio": {"data": base64.b64encode(
        b"RIFF\x00\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00").decode()}},  # fmt cut short
])
def test_malformed_parts_are_estimated_not_crashed(part: dict) -> None:
    assert est("chat", {"model": "m", "messages": [{"role": "user", "content": [part]}]}).tokens(FACTOR) >= 1


def test_pdf_pages_never_below_its_size() -> None:
    lying = b"%PDF-1.4 /Count 1 " + b"x" * 500_000
    assert e.pdf_pages(lying) == 11  # 500,018 bytes at one page per 50 kB, rounded up


@pytest.mark.parametrize("key,value", [
    ("extra_body", {"n": 128}), ("timeout", 1), ("max_retries", 4), ("request_timeout", 1),
    ("stream_timeout", 1), ("custom_llm_provider", "openai"), ("extra_headers", {}),
])
def test_keys_that_change_the_providers_request_are_refused(key: str, value: object) -> None:
    with pytest.raises(e.Refusal) as refused:
        est("chat", {"model": "m", "messages": [], key: value})
    assert refused.value.code == "fan_out"


def test_service_tiers() -> None:
    for tier in ("auto", "default", "flex", None):
        est("chat", {"model": "m", "messages": [], "service_tier": tier})
    with pytest.raises(e.Refusal) as refused:
        est("chat", {"model": "m", "messages": [], "service_tier": "priority"})
    assert refused.value.code == "service_tier"
