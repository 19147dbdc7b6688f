"""The billable inputs of a request, turned into tokens by documented rules: what admission
reserves. Pure functions: no I/O, no settings object, no clock.

The rules of ``docs/estimate.md`` (the table there is the contract; keep the two in step).
This module knows the *kinds* of input (text, schemas, images, audio, files, token ids,
server-side context) and how each is priced; which keys of a body hold them, and how many
completions a request asks for, is each API schema's business (``translators``).

A request shape whose cost cannot be bounded before the call (model lists, client-side
routing or fallbacks that make several upstream calls) is refused with a ``Refusal``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

# ---------------------------------------------------------------- constants of the rules

IMAGE_LOW_TOKENS = 85          # the cheapest image a provider bills (OpenAI, detail: low)
IMAGE_TILE_TOKENS = 170        # per 512-px tile at detail high/auto
IMAGE_MAX_TILES = 8            # 2048x768 after OpenAI's scaling: the most tiles an image makes
IMAGE_UNKNOWN_TOKENS = IMAGE_LOW_TOKENS + IMAGE_TILE_TOKENS * IMAGE_MAX_TILES  # 1,445
AUDIO_TOKENS_PER_SECOND = 50   # twice the highest published audio-input rate (~25/s)
AUDIO_MIN_BYTES_PER_SECOND = 1_000  # compressed audio never goes below 8 kbit/s
PDF_PAGE_TOKENS = 2_500        # a page's image (765 at 2x2 tiles) plus a dense page of text
PDF_BYTES_PER_PAGE = 50_000    # pages assumed when a PDF's page count cannot be read
MAX_CHOICES = 128              # OpenAI's own limit on n
MAX_BEST_OF = 20

# Top-level keys that steer generation and are never billed as input. Every other accepted
# key's strings count as prompt text (a field the operator added included).
CONTROL_KEYS = frozenset({
    "model", "stream", "stream_options", "temperature", "top_p", "top_k", "n", "best_of",
    "max_tokens", "max_completion_tokens", "max_output_tokens", "presence_penalty",
    "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "seed", "stop", "user",
    "store", "service_tier", "parallel_tool_calls", "reasoning_effort", "reasoning",
    "modalities", "echo", "encoding_format", "dimensions", "truncation", "include",
    "background", "metadata", "previous_response_id", "conversation", "prompt_cache_key",
    "safety_identifier", "verbosity", "max_tool_calls",
})
# Context held by the upstream, out of the gate's sight: a configured allowance each.
SERVER_CONTEXT_KEYS = ("previous_response_id", "conversation")
# Definitions the provider serializes into the prompt: their whole JSON counts (keys too).
SCHEMA_KEYS = frozenset({"tools", "functions", "response_format", "text", "tool_choice",
                         "function_call", "prediction", "audio"})
# Inside content: labels, not billed text.
LABEL_KEYS = frozenset({"role", "type", "detail", "format", "mime_type"})
# Body keys that make LiteLLM call several models or deployments for one request (model
# lists, client-side routing, retries, fallbacks, timeouts that retry), point it at other
# credentials or providers, or change the provider's request behind the gate's back
# (``extra_body`` is merged into it: a second ``n``, max-token field or even ``model``;
# ``additional_drop_params`` strips the limit or the ``include_usage`` the gate wrote).
# Refused with a message saying so; the schemas' allow-lists refuse them too, and an
# operator cannot allow one (GATE_EXTRA_BODY_FIELDS).
FAN_OUT_KEYS = frozenset({
    "fastest_response", "user_config", "router_settings_override", "fallbacks",
    "context_window_fallbacks", "content_policy_fallbacks", "context_window_fallback_dict",
    "num_retries", "max_retries", "timeout", "request_timeout", "stream_timeout",
    "model_group_retry_policy", "mock_testing_fallbacks", "api_key", "api_base", "base_url",
    "api_version", "deployment_id", "custom_llm_provider", "extra_body", "extra_headers",
    "extra_query", "model_list", "additional_drop_params", "drop_params", "allowed_openai_params",
    "headers", "litellm_credential_name", "litellm_params", "litellm_metadata", "specific_deployment",
    "tags", "guardrails", "mock_response", "mock_tool_calls", "mock_timeout", "mock_delay",
    "caching", "cache",
})
# The top-level fields of each API schema that the gate knows and accepts (OpenAI's API);
# any other key is refused before the upstream (``check_fields``): LiteLLM acts on dozens of
# its own body parameters (credentials, routing, parameter dropping, per-provider settings),
# and a list of what to refuse would always trail it. Keys an operator needs beyond these
# (a provider's own parameter) are added with GATE_EXTRA_BODY_FIELDS, and billed as text.
_SAMPLING = frozenset({"model", "stream", "stream_options", "temperature", "top_p", "top_k", "n", "stop",
                       "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "seed", "user"})
_CACHING = frozenset({"prompt_cache_key", "prompt_cache_options", "prompt_cache_retention"})
CHAT_FIELDS = _SAMPLING | _CACHING | frozenset({
    "messages", "max_tokens", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
    "parallel_tool_calls", "functions", "function_call", "response_format", "audio", "modalities",
    "prediction", "reasoning_effort", "metadata", "store", "service_tier", "safety_identifier",
    "verbosity", "moderation",
})
COMPLETIONS_FIELDS = _SAMPLING | frozenset({"prompt", "suffix", "max_tokens", "best_of", "echo"})
EMBEDDINGS_FIELDS = frozenset({"model", "input", "dimensions", "encoding_format", "user"})
RESPONSES_FIELDS = _CACHING | frozenset({
    "model", "input", "instructions", "stream", "stream_options", "temperature", "top_p", "top_logprobs",
    "max_output_tokens", "max_tool_calls", "tools", "tool_choice", "parallel_tool_calls", "text",
    "reasoning", "metadata", "store", "service_tier", "include", "background", "background_options",
    "truncation", "previous_response_id", "conversation", "prompt", "safety_identifier", "user",
    "moderation", "context_management", "image", "access_programs",
})
# OpenAI fields left out of the lists on purpose, and why (tests/test_estimate.py checks that
# every field of the installed OpenAI SDK is in a list or here).
REFUSED_OPENAI_FIELDS = {
    "web_search_options": "a web search has a per-call fee besides its tokens: no estimate covers it "
                          "(an operator who accepts that adds it with GATE_EXTRA_BODY_FIELDS)",
}
# The tools a request may declare: the model calls them and the client runs them, so their cost
# is tokens (functions, custom tools, OpenAI's computer use and local shell, Anthropic's
# versioned computer, bash and text editor tools). Every other type (the Responses API's
# web_search, file_search, code_interpreter, image_generation, mcp; a tool without a type, as
# Vertex AI's googleSearch) is run by the provider, which charges per call or per session
# besides the tokens: no estimate covers it, and LiteLLM passes the tool on.
ALLOWED_TOOL_TYPES = frozenset({"function", "custom", "computer_use_preview", "local_shell"})
ALLOWED_TOOL_PREFIXES = ("computer_20", "bash_20", "text_editor_20")
# OpenAI's ``metadata``: at most 16 string pairs. LiteLLM reads its own controls from a chat
# request's metadata (``tags`` route to tagged deployments, ``guardrails`` pick guardrails),
# so names it uses are refused there too.
METADATA_MAX_PAIRS, METADATA_MAX_KEY, METADATA_MAX_VALUE = 16, 64, 512
METADATA_RESERVED = ("tags", "guardrail", "litellm", "user_api_key", "spend_logs", "model_group",
                     "disable_fallbacks", "prompt_id", "prompt_variables")
# Names LiteLLM reads whole: without a `user`, it takes `user_id` as the end user's id (its
# budgets and attribution).
METADATA_RESERVED_NAMES = frozenset({"user_id"})
# Every body parameter LiteLLM 1.63 itself acts on (``litellm.types.utils.all_litellm_params``,
# checked against the installed LiteLLM by tests/test_estimate.py) and the prefixes of its
# per-provider credentials and settings: an operator cannot allow one (GATE_EXTRA_BODY_FIELDS).
LITELLM_PARAMS = frozenset({
    "acompletion", "aimg_generation", "allowed_model_region", "api_base", "api_key", "api_version",
    "assistant_continue_message", "atext_completion", "azure", "azure_ad_token_provider",
    "azure_password", "azure_username", "base_model", "bos_token", "budget_duration", "cache",
    "cache_key", "caching", "caching_groups", "client", "client_id", "client_secret",
    "complete_response", "configurable_clientside_auth_params", "context_window_fallback_dict",
    "cooldown_time", "custom_llm_provider", "disable_add_transform_inline_image_block",
    "ensure_alternating_roles", "eos_token", "fallback_depth", "fallbacks", "fastest_response",
    "final_prompt_value", "force_timeout", "gcs_bucket_name", "gcs_path_service_account", "headers",
    "hf_model_name", "humanloop_api_key", "id", "input_cost_per_second", "input_cost_per_token",
    "langfuse_host", "langfuse_public_key", "langfuse_secret", "langfuse_secret_key",
    "langsmith_api_key", "langsmith_base_url", "langsmith_project", "litellm_call_id",
    "litellm_credential_name", "litellm_logging_obj", "litellm_metadata", "litellm_trace_id",
    "logger_fn", "max_budget", "max_fallbacks", "max_parallel_requests", "max_retries",
    "merge_reasoning_content_in_choices", "metadata", "mock_response", "mock_timeout", "model_config",
    "model_info", "model_list", "no-log", "num_retries", "output_cost_per_second",
    "output_cost_per_token", "preset_cache_key", "prompt_id", "prompt_variables",
    "provider_specific_header", "proxy_server_request", "region_name", "request_timeout",
    "retry_policy", "retry_strategy", "roles", "rpm", "self", "stream_timeout",
    "supports_system_message", "tags", "tenant_id", "text_completion", "tpm", "ttl",
    "turn_off_message_logging", "use_client", "use_in_pass_through", "user_continue_message",
    "verbose", "weight",
})
LITELLM_PREFIXES = ("aws_", "vertex_", "azure_", "watsonx_", "litellm_", "mock_", "api_", "extra_")
# Service tiers priced as the standard one (or cheaper); a dearer tier is refused.
SERVICE_TIERS = frozenset({"auto", "default", "flex"})
IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})
AUDIO_PART_TYPES = frozenset({"input_audio", "audio"})
FILE_PART_TYPES = frozenset({"file", "input_file", "document"})
# The keys of a media part that its rule prices (the rest of the part is walked as usual).
IMAGE_PAYLOAD_KEYS = frozenset({"image_url", "file_id", "url"})
AUDIO_PAYLOAD_KEYS = frozenset({"input_audio", "data"})
FILE_PAYLOAD_KEYS = frozenset({"file", "file_data", "file_id", "file_url"})
MAX_TOKEN_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class Refusal(ValueError):
    """A request refused before it reaches the upstream (400): ``code`` names the rule,
    ``detail`` is the offending field (shown to the user inside a translated message)."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Estimate:
    """The billable inputs of one request, before the conversion factor."""

    text_chars: int = 0        # characters billed as text (schemas included)
    input_tokens: int = 0      # tokens counted directly: ids, images, audio, files, context
    completion: int = 0        # completion allowance of one completion
    completions: int = 1       # completions produced: n, best_of, several prompts

    def prompt_tokens(self, factor: float) -> int:
        return math.ceil(self.text_chars * factor) + self.input_tokens

    def tokens(self, factor: float) -> int:
        """What admission reserves (before the model's weight); never 0, so an account at or
        below zero is refused on every metered path."""
        return max(1, self.prompt_tokens(factor) + self.completion * self.completions)


@dataclass
class Count:
    """A running total of billable inputs."""

    chars: int = 0
    tokens: int = 0


# ---------------------------------------------------------------- request checks


def check_model(model: object, allowed: frozenset[str] = frozenset()) -> str:
    """The requested model, or a Refusal: required, one model (a comma makes LiteLLM fan the
    request out to every listed model), printable (a control character or a lone surrogate
    cannot be stored with the exchange, nor be a model's name), and on the allow-list when
    one is configured."""
    if not isinstance(model, str) or not model.strip():
        raise Refusal("model_required")
    if not model.isprintable():  # control, format and surrogate characters are not
        raise Refusal("model_invalid", model[:200])
    if "," in model:
        raise Refusal("model_list", model[:200])
    if allowed and model not in allowed:
        raise Refusal("model_not_allowed", model[:200])
    return model


def check_fields(body: Mapping[str, object], fields: frozenset[str], extra: frozenset[str]) -> None:
    """Refuse the first top-level key that is neither one of the schema's ``fields`` nor one of
    the operator's ``extra`` (looked up in both: no union built per request), a tool the
    provider runs itself (``ALLOWED_TOOL_TYPES``), and a ``metadata`` that is not OpenAI's
    (string pairs) or names one of LiteLLM's own controls."""
    for key in body:
        if key not in fields and key not in extra:
            raise Refusal("unknown_field", key[:100])
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise Refusal("tool_not_allowed", "tools")
        for tool in tools:
            kind = tool.get("type") if isinstance(tool, Mapping) else None
            if not isinstance(kind, str):
                raise Refusal("tool_not_allowed", "tools")
            if kind not in ALLOWED_TOOL_TYPES and not kind.startswith(ALLOWED_TOOL_PREFIXES):
                raise Refusal("tool_not_allowed", kind[:64])
    metadata = body.get("metadata")
    if metadata is None:
        return
    if not isinstance(metadata, Mapping) or len(metadata) > METADATA_MAX_PAIRS:
        raise Refusal("bad_metadata", "metadata")
    for key, value in metadata.items():
        if (not isinstance(value, str) or len(key) > METADATA_MAX_KEY or len(value) > METADATA_MAX_VALUE
                or key.lower().startswith(METADATA_RESERVED) or key in METADATA_RESERVED_NAMES):
            raise Refusal("bad_metadata", f"metadata.{key[:64]}")


def operator_fields(names: frozenset[str]) -> frozenset[str]:
    """GATE_EXTRA_BODY_FIELDS, checked: a key LiteLLM acts on itself (its parameters, the
    fan-out keys, its per-provider credentials and settings) cannot be allowed (the service
    refuses to start). ``metadata`` is OpenAI's too: the schemas that have it check its shape."""
    refused = sorted(n for n in names if n in FAN_OUT_KEYS or n in LITELLM_PARAMS or n.startswith(LITELLM_PREFIXES))
    if refused:
        raise ValueError(f"GATE_EXTRA_BODY_FIELDS: {', '.join(refused)} change how the proxy calls the model "
                         "and cannot be accepted")
    return names


def check_fan_out(body: Mapping[str, object]) -> None:
    for key in body:  # a body has a handful of keys; FAN_OUT_KEYS has dozens
        if key in FAN_OUT_KEYS:
            raise Refusal("fan_out", key)
    tier = body.get("service_tier")
    if tier is not None and tier not in SERVICE_TIERS:
        raise Refusal("service_tier", str(tier)[:40])


def count_field(body: Mapping[str, object], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Refusal("bad_integer", key)
    return value


def completion_allowance(body: Mapping[str, object], default: int, limit: int) -> int:
    """The completion budget of one completion: the LARGEST of the max-token fields present
    (a tiny one must not hide a huge one the upstream may honour), else ``default``."""
    values = [count_field(body, k, 0, 2**53) for k in MAX_TOKEN_KEYS]
    present = [v for v in values if v is not None]
    allowance = max(present) if present else default
    if allowance > limit:
        raise Refusal("max_tokens_above", str(limit))
    return allowance


# ---------------------------------------------------------------- counting a body


def count_inputs(body: Mapping[str, object], server_context_tokens: int,
                 skip: frozenset[str] = frozenset()) -> Count:
    """Characters and direct tokens of every billable input in ``body``: control keys are
    skipped, schema definitions count as their JSON, every other key's content is walked
    (an unknown key a provider might bill is counted, not skipped); ``skip`` names keys the
    schema's translator prices itself."""
    count = Count()
    for key, value in body.items():
        if key in CONTROL_KEYS or key in skip:
            continue
        if key in SCHEMA_KEYS:
            count.chars += len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
        else:
            walk(value, count, server_context_tokens)
    for key in SERVER_CONTEXT_KEYS:
        if body.get(key):
            count.tokens += server_context_tokens
    return count


def is_token_ids(value: list[object]) -> bool:
    return bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def walk(value: object, count: Count, server_context_tokens: int) -> None:
    if isinstance(value, str):
        count.chars += len(value)
    elif isinstance(value, list):
        if is_token_ids(value):
            count.tokens += len(value)  # token-id input: one token per id
            return
        for item in value:
            walk(item, count, server_context_tokens)
    elif isinstance(value, Mapping):
        kind = value.get("type")
        kind = kind if isinstance(kind, str) else None
        # A media part's payload is priced by its rule; every other key of the same object
        # is still walked, so text next to a payload (or under a media "type") is counted.
        payload: frozenset[str] = frozenset()
        if kind in IMAGE_PART_TYPES or (kind is None and "image_url" in value):
            count.tokens += image_tokens(value, server_context_tokens)
            payload = IMAGE_PAYLOAD_KEYS
        elif kind in AUDIO_PART_TYPES and ("input_audio" in value or "data" in value):
            count.tokens += audio_tokens(value)
            payload = AUDIO_PAYLOAD_KEYS
        elif kind in FILE_PART_TYPES:
            file_cost(value, count, server_context_tokens)
            payload = FILE_PAYLOAD_KEYS
        for key, item in value.items():
            if key not in LABEL_KEYS and key not in payload:
                walk(item, count, server_context_tokens)


# ---------------------------------------------------------------- images


def image_tokens(part: Mapping[str, object], server_context_tokens: int = 0) -> int:
    """Tokens of one image part (chat ``image_url`` or Responses ``input_image``)."""
    inner = part.get("image_url")
    detail: object = part.get("detail")
    url: object = inner
    if isinstance(inner, Mapping):
        url = inner.get("url")
        detail = inner.get("detail", detail)
    if detail == "low":
        return IMAGE_LOW_TOKENS
    if isinstance(url, str) and url.startswith("data:"):
        size = image_size(_data_bytes(url, 512 * 1024))
        if size is not None:
            return tile_tokens(*size)
    return IMAGE_UNKNOWN_TOKENS


def tile_tokens(width: int, height: int) -> int:
    """OpenAI's rule at detail high/auto: fit in 2048x2048, then the short side to 768 px,
    then 170 tokens per 512-px tile plus 85."""
    if width <= 0 or height <= 0:
        return IMAGE_UNKNOWN_TOKENS
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return IMAGE_LOW_TOKENS + IMAGE_TILE_TOKENS * min(tiles, IMAGE_MAX_TILES)


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, GIF, JPEG or WebP; None if unreadable."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", data[6:10])
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_size(data)
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
    except struct.error:
        return None
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + length
    return None


# ---------------------------------------------------------------- audio and files

_DATA_URL = re.compile(r"data:[^;,]*(;[^,]*)?,")


def _b64_payload(value: str) -> str:
    match = _DATA_URL.match(value)
    return value[match.end():] if match else value


def _data_bytes(value: str, limit: int | None = None) -> bytes:
    """Decoded bytes of base64 data (a data URL or bare), at most ``limit`` of them."""
    payload = _b64_payload(value)
    if limit is not None:
        payload = payload[: (limit // 3 + 1) * 4]
    payload = payload[: len(payload) - len(payload) % 4]
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        return b""


def _decoded_length(value: str) -> int:
    payload = _b64_payload(value).rstrip("=")
    return len(payload) * 3 // 4


def audio_tokens(part: Mapping[str, object]) -> int:
    """Tokens of one audio input: WAV by the duration in its header, other formats by
    size at the lowest bitrate any codec uses (so never fewer seconds than it may hold)."""
    inner = part.get("input_audio", part)
    data = inner.get("data") if isinstance(inner, Mapping) else None
    if not isinstance(data, str) or not data:
        return AUDIO_TOKENS_PER_SECOND  # a reference to audio elsewhere: a second's worth
    head = _data_bytes(data, 4096)
    seconds = wav_seconds(head, _decoded_length(data))
    if seconds is None:
        seconds = _decoded_length(data) / AUDIO_MIN_BYTES_PER_SECOND
    return max(AUDIO_TOKENS_PER_SECOND, math.ceil(seconds * AUDIO_TOKENS_PER_SECOND))


def wav_seconds(head: bytes, total: int) -> float | None:
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    i = 12
    while i + 8 <= len(head):
        chunk, size = head[i:i + 4], struct.unpack("<I", head[i + 4:i + 8])[0]
        if chunk == b"fmt " and i + 20 <= len(head):
            byte_rate = struct.unpack("<I", head[i + 16:i + 20])[0]
            return total / byte_rate if byte_rate > 0 else None
        i += 8 + size + (size & 1)
    return None


def file_cost(part: Mapping[str, object], count: Count, server_context_tokens: int) -> None:
    """A file part: a PDF costs its pages, other inline data its bytes as text; a file known
    only by id or URL is server-side context."""
    inner = part.get("file", part)
    if not isinstance(inner, Mapping):
        count.tokens += server_context_tokens
        return
    data = inner.get("file_data")
    if isinstance(data, str) and data:
        raw = _data_bytes(data)
        if raw[:5] == b"%PDF-":
            count.tokens += pdf_pages(raw) * PDF_PAGE_TOKENS
        else:
            count.chars += len(raw)
    else:
        count.tokens += server_context_tokens
    name = inner.get("filename")
    if inner is not part and isinstance(name, str):
        count.chars += len(name)  # (a file's own keys beside file_data are walked by walk())


_PAGE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")
_COUNT = re.compile(rb"/Count\s+(\d{1,7})")


def pdf_pages(raw: bytes) -> int:
    """Pages of a PDF: the largest of its page objects, its page-tree counts and one page per
    50 kB (page objects hide in compressed object streams, and a ``/Count`` can be any text,
    so none of them alone is a floor)."""
    found = len(_PAGE.findall(raw))
    counts = [int(m) for m in _COUNT.findall(raw)]
    return max([1, found, *counts, math.ceil(len(raw) / PDF_BYTES_PER_PAGE)])
