"""An answer handed to Envoy: the rule for which answers qualify, what the processor leaves in
Envoy's dynamic metadata for the settle, and how that settle reads it back (docs/streams.md).

A plain SSE answer is the gate's costliest exchange: every chunk is an ext_proc message that
waits on the processor, only for the processor to keep a copy and read the usage event at the
end. When the usage is the small last event of the stream (Chat Completions, Completions) and
the request bounds the answer's length, Envoy can do that reading itself: its sse_to_metadata
filter writes the usage event's numbers into ``USAGE_NAMESPACE``, and Envoy's access log (gRPC,
to the processors) carries them with the exchange's fields (``NAMESPACE``) when the stream ends.
A JSON answer of the same schemas is one buffered message, but still a fourth ext_proc message
and a parse in Python for three numbers: Envoy's json_to_metadata filter reads the same
``usage`` fields into the same namespace, and the same access log brings them back.
The settle is the same exactly-once ``Ledger.settle`` keyed by the exchange id the processor
minted.

Who settles is decided by one rule both sides apply to the same facts, so that exactly one of
them does even when the client leaves at the worst moment: the processor writes the exchange's
fields at admission, only for a ``candidate``, with the kind of answer the request asked for
(``stream``); the answer is handed to Envoy when it ``goes_to_envoy`` (2xx, of that kind: SSE
for a stream, JSON otherwise), which the processor sees in the response headers and the
settling processor in the access-log entry. (Envoy drops a reply that arrives after the client
left, so a mark written with the response headers' reply could be missing from an entry whose
exchange the processor already handed off: the mark is the admission's instead.)

Pure values here; Envoy's protocols are ``gate.envoy`` (ext_proc) and ``gate.access_log``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .usage import Observed, read_usage, whole

if TYPE_CHECKING:
    from .exchange import Exchange

# Dynamic metadata namespaces: the processor writes NAMESPACE (ext_proc receiving namespace),
# Envoy's sse_to_metadata and json_to_metadata write USAGE_NAMESPACE; envoy.yaml names both.
NAMESPACE = "solaris.exchange"
USAGE_NAMESPACE = "solaris.usage"
# The JSON answers Envoy reads: its json_to_metadata filter compares the whole content type
# with its list (envoy.yaml's allow_content_types, kept equal to this by a test), so an answer
# of another spelling stays with the processor rather than be charged as if it had no usage.
JSON_TYPES = frozenset({"application/json", "application/json; charset=utf-8"})


@dataclass(frozen=True)
class Handed:
    """What the access log needs to settle without the processor that admitted the exchange (it
    may be another process): identifiers and numbers, never a credential or an e-mail field."""

    exchange_id: str
    user_id: str
    model: str | None
    request_id: str | None
    estimate: int
    prompt_estimate: int
    prompt_chars: int
    # The kind of answer the request asked for: SSE (True) or JSON. An entry without it was
    # written by a processor that handed off streams only.
    stream: bool = True


def candidate(*, envoy_reads: bool, bounded: bool, usage_last: bool, admitted_by_ledger: bool,
              notice_due: bool) -> bool:
    """Whether an admitted request's answer may be handed to Envoy (decided at admission).

    * ``envoy_reads``: the deployment lets Envoy read this kind of answer (GATE_STREAM_USAGE
      for streams, GATE_JSON_USAGE for JSON answers).
    * ``bounded``: the request carries a max-token limit its upstream honours (``bounded``; the
      client's, or the one the gate wrote under GATE_ENFORCE_MAX_TOKENS). A stream cut before
      its usage event (or a JSON answer without a readable usage) is then charged its
      reservation, which covers any output; without a limit the processor must count the
      output seen, since it may exceed the reservation.
    * ``usage_last``: the schema reports usage in a small last event (Chat Completions,
      Completions), not inside a final event that repeats the whole answer (Responses); its
      JSON answers keep it in ``usage.prompt_tokens``/``completion_tokens``, where envoy.yaml
      looks.
    * ``admitted_by_ledger``: the account exists (a fail-open admission's settle may have to
      open it, with the e-mail the metadata never carries).
    * not ``notice_due``: an in-chat notice is written into the answer by the processor.
    """
    return envoy_reads and bounded and usage_last and admitted_by_ledger and not notice_due


def goes_to_envoy(status: int, content_type: str, stream: bool) -> bool:
    """Whether a candidate's answer is handed to Envoy: a 2xx answer of the kind the request
    asked for, an SSE stream for a stream and a JSON body of a type Envoy's filter parses
    otherwise (the filter reading the other kind is not the one the rule counted on). An error
    answer with output is charged by the output seen (accounting.unreported_charge), which only
    the processor can count."""
    if not 200 <= status < 300:
        return False
    if stream:
        return content_type.lower().startswith("text/event-stream")
    return content_type in JSON_TYPES


def bounded(body: Mapping[str, Any], limit_keys: tuple[str, ...]) -> bool:
    """Whether the request bounds its answer: one of the fields its schema's upstream honours
    (translator.limit_keys) holds a positive integer."""
    return any(isinstance(v := body.get(k), int) and not isinstance(v, bool) and v >= 1 for k in limit_keys)


def fields(ex: Exchange) -> tuple[tuple[str, str | int], ...]:
    """The metadata the processor leaves for the settle."""
    assert ex.identity is not None
    values = Handed(exchange_id=ex.exchange_id, user_id=ex.identity.user_id, model=ex.model,
                    request_id=ex.request_id, estimate=ex.estimate, prompt_estimate=ex.prompt_estimate,
                    prompt_chars=ex.prompt_chars, stream=ex.stream)
    return tuple((name, "" if value is None else value) for name, value in dataclasses.asdict(values).items())


def _count(value: Any) -> int | None:
    """A non-negative integer from metadata (where numbers are doubles: a whole one is the
    integer it stands for), else None."""
    value = whole(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def handed(metadata: Mapping[str, Any]) -> Handed | None:
    """The candidate exchange behind an access-log entry, or None when the entry carries none
    (or its fields are not what the processor wrote)."""
    values = metadata.get(NAMESPACE)
    if not isinstance(values, Mapping):
        return None
    exchange_id, user_id = values.get("exchange_id"), values.get("user_id")
    numbers = [_count(values.get(name)) for name in ("estimate", "prompt_estimate", "prompt_chars")]
    if not (isinstance(exchange_id, str) and exchange_id and isinstance(user_id, str) and user_id):
        return None
    if any(n is None for n in numbers):
        return None
    stream = values.get("stream", True)
    if not isinstance(stream, bool):
        return None
    estimate, prompt_estimate, prompt_chars = (int(n or 0) for n in numbers)
    model, request_id = values.get("model"), values.get("request_id")
    return Handed(exchange_id=exchange_id, user_id=user_id,
                  model=model if isinstance(model, str) and model else None,
                  request_id=request_id if isinstance(request_id, str) and request_id else None,
                  estimate=estimate, prompt_estimate=prompt_estimate, prompt_chars=prompt_chars,
                  stream=stream)


def observed(metadata: Mapping[str, Any], cap: int) -> Observed | None:
    """The usage Envoy read (a stream's last usage event, a JSON answer's ``usage``), by the
    same rules as a usage the processor reads (read_usage: whole numbers only, a metadata
    double included, never negative, capped and flagged)."""
    values = metadata.get(USAGE_NAMESPACE)
    if not isinstance(values, Mapping) or not values:
        return None
    # Only Chat Completions and Completions answers are handed off: their usage has both counts.
    return read_usage(dict(values), cap, pair=True)


def awaited(handed: Mapping[str, tuple[bool, float]], now: float, json_wait: float) -> bool:
    """Whether a stopping processor should still wait for an entry of its handoffs (``handed``:
    exchange id -> (a stream, when it was handed off)): a stream may run for minutes; a JSON
    answer was whole when handed off, so its entry comes within a few log flushes or went to
    another processor: it is waited for until ``json_wait`` after its handoff."""
    return any(stream or now - handed_at < json_wait for stream, handed_at in handed.values())
