"""What an exchange really cost, read from the upstream's answer (JSON or SSE), whatever
the schema: the number rules shared by every translator, the stream tap, and the tokenizer
that counts visible output when the upstream reports none.

Usage numbers come from the upstream, so they are validated like any input: non-integers
and negatives are refused (never a credit through a negative usage), absurd values are capped
and flagged. The same rules read the usage Envoy hands back for an answer it read itself
(gate.handoff), so a debit does not depend on who read the answer (for a stream that reports
its usage once: Envoy merges the fields of several usage events, docs/streams.md). Where a
schema keeps its usage and its visible text is each translator's business (``translators``),
passed in as a ``Reader``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

# Streams keep their bytes for one parse at the end; past this, only the tail is kept (the
# usage chunk is last) and the dropped part is counted by characters.
STREAM_KEEP_BYTES = 4 * 1024 * 1024
STREAM_TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class Observed:
    prompt_tokens: int
    completion_tokens: int
    flags: tuple[str, ...] = ()


def _tiktoken_dir() -> str | None:
    """The encodings the LiteLLM wheel ships (named by the SHA-1 of their URL, as tiktoken's
    cache expects), when it is installed."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers"
    return str(path) if path.is_dir() else None


_encoder: list[Any] = []  # empty until loaded, then [cl100k_base or None]
_encoder_lock = threading.Lock()


def encoder(cache_dir: str = "") -> Any | None:
    """cl100k_base, or None offline; loaded by the first call, which the processor makes at
    start-up (off the event loop) with TIKTOKEN_CACHE_DIR from its settings. Later calls get
    the same encoder whatever they pass.

    tiktoken downloads encodings on first use, which fails offline, unless its cache directory
    holds them: ``cache_dir``, else the files the LiteLLM wheel ships."""
    if _encoder:
        return _encoder[0]
    with _encoder_lock:
        if not _encoder:
            _encoder.append(_load_encoder(cache_dir or _tiktoken_dir() or ""))
        return _encoder[0]


def _load_encoder(cache_dir: str) -> Any | None:
    if cache_dir:
        os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir  # tiktoken reads it from nowhere else
    try:
        import tiktoken

        return tiktoken.get_encoding("cl100k_base")
    except Exception as exc:  # network error, missing file: fall back, never fail a settle
        log.warning("tiktoken unavailable, counting by characters: %s", exc)
        return None


def count_tokens(text: str, factor: float) -> tuple[int, str]:
    """Tokens in ``text`` and how they were counted (``tiktoken`` or ``chars``)."""
    enc = encoder()
    if enc is not None:
        return len(enc.encode(text, disallowed_special=())), "tiktoken"
    return math.ceil(len(text) * factor), "chars"


def whole(value: Any) -> Any:
    """A whole number written as a float (``10.0``, ``1e1``; every number in Envoy's metadata is
    a double) as the integer it stands for; anything else unchanged, for the caller to check."""
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    return value


def _int_field(usage: dict[str, Any], *names: str) -> int | None:
    """The first of ``names`` that holds a value. A null is no value (Envoy's JSON filter writes
    nothing for one either); a whole number written as a float (``10.0``, ``1e1``) is that
    integer, as it is in Envoy's metadata, where every number is a double."""
    for name in names:
        value = whole(usage.get(name))
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"usage.{name} is not an integer")
        if value < 0:
            raise ValueError(f"usage.{name} is negative")
        return value
    return None


def read_usage(usage: Any, cap: int, *, pair: bool = False) -> Observed | None:
    """(prompt, completion) from an OpenAI/Responses ``usage`` object; None if unusable.

    ``pair``: the schema always reports both (Chat Completions, Completions), so a usage
    missing one of them is unusable rather than a zero. This also keeps the processor's
    reading and Envoy's (gate.handoff) the same where Envoy's filter cannot say why a value is
    missing: it writes nothing for a null, an object or a list."""
    if not isinstance(usage, dict):
        return None
    try:
        prompt = _int_field(usage, "prompt_tokens", "input_tokens")
        completion = _int_field(usage, "completion_tokens", "output_tokens")
        total = _int_field(usage, "total_tokens")
    except ValueError as exc:
        log.warning("garbled usage from upstream: %s", exc)
        return None
    if pair and (prompt is None or completion is None):
        log.warning("usage from upstream without its prompt or completion count")
        return None
    if prompt is None and completion is None:
        if total is None:
            return None
        prompt = total  # embeddings report prompt/total only
    prompt, completion = prompt or 0, completion or 0
    flags: tuple[str, ...] = ()
    if prompt + completion > cap:
        flags = ("capped",)
        prompt = min(prompt, cap)
        completion = min(completion, cap - prompt)
    return Observed(prompt, completion, flags)


class Reader(Protocol):
    """What a schema's translator tells the tap about one decoded JSON event or body."""

    def usage_of(self, data: dict[str, Any], cap: int) -> Observed | None: ...

    def text_of(self, data: dict[str, Any]) -> str: ...


def parse_object(raw: bytes) -> dict[str, Any] | None:
    """A JSON object, or None for anything else (not JSON, a list, a number...)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def read_body(reader: Reader, raw: bytes, cap: int) -> tuple[Observed | None, str]:
    """Usage of a buffered JSON response, plus its visible text for the fallback count."""
    data = parse_object(raw)
    if data is None:
        return None, ""
    return reader.usage_of(data, cap), reader.text_of(data)


@dataclass
class StreamTap:
    """Collects an SSE response as it passes (cheap per chunk: an append), parsed once."""

    cap: int
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    dropped_chars: int = 0

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.chunks.append(chunk)
        self.size += len(chunk)
        if self.size > STREAM_KEEP_BYTES:
            data = b"".join(self.chunks)
            tail = data[-STREAM_TAIL_BYTES:]
            cut = tail.find(b"\n\n")
            tail = tail[cut + 2:] if cut >= 0 else tail
            self.dropped_chars += len(data) - len(tail)
            self.chunks = [tail]
            self.size = len(tail)

    @property
    def seen_anything(self) -> bool:
        return self.size > 0 or self.dropped_chars > 0

    def dropped_tokens(self, factor: float) -> int:
        """The output dropped from memory on a very long stream, counted by characters."""
        return math.ceil(self.dropped_chars * factor)

    def result(self, reader: Reader) -> tuple[Observed | None, str]:
        """The usage of the stream's last usage event (None if it never came or could not be
        read) and, only when there is no usage, the visible text seen, for the fallback rules.

        The usage event is last: the lines are searched from the end and only those that
        mention usage are decoded, so a 200-chunk answer costs one JSON parse, not 200."""
        lines = b"".join(self.chunks).split(b"\n")
        for line in reversed(lines):
            if b"usage" in line:
                event = _event(line)
                usage = reader.usage_of(event, self.cap) if event is not None else None
                if usage is not None:
                    return usage, ""
        text: list[str] = []
        for line in lines:
            event = _event(line)
            if event is not None:
                text.append(reader.text_of(event))
        return None, "".join(text)

    def events(self) -> list[dict[str, Any]]:
        """Every JSON ``data:`` event kept so far, in order (one parse of the whole stream:
        only for the rare answer that gets an in-chat notice)."""
        events = (_event(line) for line in b"".join(self.chunks).split(b"\n"))
        return [event for event in events if event is not None]


def _event(line: bytes) -> dict[str, Any] | None:
    """The JSON object of one SSE ``data:`` line, or None."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    payload = line[5:].strip()
    if payload == b"[DONE]" or not payload:
        return None
    return parse_object(payload)
