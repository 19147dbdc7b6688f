"""The gate's answer to one phase, as plain values; ``gate.envoy`` turns them into Envoy's
protocol messages. Frozen and hashable, so the adapter can reuse the message of a reply it
has already built."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GateError


@dataclass(frozen=True, slots=True)
class Continue:
    """Let the exchange go on, with these changes."""

    set_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    body: bytes | None = None     # a replacement body (request body phase)
    stream_response: bool = False  # the response body streams through from now on (SSE)
    done: bool = False             # nothing more of this exchange to see (pass-through)
    # Envoy dynamic metadata for the rest of the exchange, (key, value) pairs under
    # handoff.NAMESPACE: what the settle of a stream Envoy may read needs (gate.handoff).
    metadata: tuple[tuple[str, str | int], ...] = ()


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer the client now with ``error``; the upstream is not called (or not further)."""

    error: GateError


Reply = Continue | Refuse
CONTINUE = Continue()
