"""Envoy's ext_proc protocol, and nothing else: one gRPC stream per HTTP request, its
messages turned into calls on the ``Gate`` and the Gate's plain replies turned back into
Envoy's messages (header and body mutations, immediate responses, mode overrides).

request headers  -> route check, identity (401), rate limit (429)
request body     -> parse, estimate, admit/reserve in the ledger (402/403/503), body mutation;
                    dynamic metadata for a stream Envoy may read (gate.handoff)
response headers -> JSON stays buffered; text/event-stream switches to STREAMED (mode_override),
                    or is handed to Envoy (gate.handoff: no body messages, this stream ends)
response body    -> read usage and settle exactly once (the exchange id is minted here); the
                    rare answer due an in-chat notice is rewritten, the others pass unchanged
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2

from ..errors import GateError
from . import handoff
from .decisions import Gate
from .exchange import Exchange
from .replies import Continue, Refuse, Reply

log = logging.getLogger(__name__)

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_MODE = processing_mode_pb2.ProcessingMode
STREAM_RESPONSE_BODY = _MODE(response_body_mode=_MODE.STREAMED)
# Pass-through: no request body, no response headers or body to see.
NOTHING_MORE = _MODE(request_body_mode=_MODE.NONE, response_header_mode=_MODE.SKIP,
                     response_body_mode=_MODE.NONE)
PHASES = ("request_headers", "request_body", "response_headers", "response_body")

CONTINUE_REQUEST_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
CONTINUE_REQUEST_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
CONTINUE_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    # Envoy reads raw_value (``value`` stays empty).
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE)


def header_mutation(set_headers: tuple[tuple[str, str], ...] = (),
                    remove_headers: tuple[str, ...] = ()) -> pb.HeaderMutation:
    return pb.HeaderMutation(set_headers=[_header(k, v) for k, v in set_headers],
                             remove_headers=list(remove_headers))


def immediate(error: GateError) -> pb.ProcessingResponse:
    headers = (("content-type", "application/json"), *error.headers)
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=error.status),
        headers=header_mutation(headers), body=error.body(),
        # the prefix tells envoy.yaml's local_reply_config this reply is ours, not Envoy's
        details=f"solaris_{error.code}"))


def _build(phase: str, reply: Continue) -> pb.ProcessingResponse:
    changes: dict[str, Any] = {}
    if reply.set_headers or reply.remove_headers:
        changes["header_mutation"] = header_mutation(reply.set_headers, reply.remove_headers)
    if reply.body is not None:
        changes["body_mutation"] = pb.BodyMutation(body=reply.body)
    common = pb.CommonResponse(**changes) if changes else None
    if phase in ("request_headers", "response_headers"):
        message = pb.ProcessingResponse(**{phase: pb.HeadersResponse(response=common)})
    else:
        message = pb.ProcessingResponse(**{phase: pb.BodyResponse(response=common)})
    if reply.metadata:
        message.dynamic_metadata.update({handoff.NAMESPACE: dict(reply.metadata)})
    if reply.stream_response:
        message.mode_override.CopyFrom(STREAM_RESPONSE_BODY)
    elif reply.done:
        message.mode_override.CopyFrom(NOTHING_MORE)
    return message


class MessageCache:
    """Envoy messages of the gate's replies. Replies without a body repeat (the credential
    swap, plain continues, the same rate-limit headers): each is built once and reused."""

    MAX_CACHED = 4096

    def __init__(self) -> None:
        self._built: dict[tuple[str, Continue], pb.ProcessingResponse] = {}

    def of(self, phase: str, reply: Reply) -> pb.ProcessingResponse:
        if isinstance(reply, Refuse):
            return immediate(reply.error)
        if reply.body is not None or reply.metadata:
            return _build(phase, reply)  # one exchange's own: never repeats
        key = (phase, reply)
        message = self._built.get(key)
        if message is None:
            if len(self._built) >= self.MAX_CACHED:
                self._built.clear()  # bounded: header values (rate-limit counts) vary
            message = self._built[key] = _build(phase, reply)
        return message


def headers_map(msg: pb.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in msg.headers.headers:
        out[h.key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


class Processor(pb_grpc.ExternalProcessorServicer):
    """The gRPC face of the Gate: dispatches each ProcessingRequest to its phase."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.replies = MessageCache()
        observe = gate.metrics.phase_latency
        self._timers = {p: observe.labels(p) for p in (*PHASES, "other")}
        self._chunks = gate.metrics.stream_chunks
        self.active = 0  # ext_proc streams in progress (a graceful stop waits for them)

    async def _dispatch(self, ex: Exchange, phase: str, req: pb.ProcessingRequest) -> Reply | None:
        gate = self.gate
        if phase == "request_headers":
            msg = req.request_headers
            return await gate.request_headers(ex, headers_map(msg), msg.end_of_stream)
        if phase == "request_body":
            return await gate.request_body(ex, req.request_body.body, req.request_body.end_of_stream)
        if phase == "response_headers":
            msg = req.response_headers
            return gate.response_headers(ex, headers_map(msg), msg.end_of_stream)
        return await gate.response_body(ex, req.response_body.body, req.response_body.end_of_stream)

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        gate = self.gate
        ex = Exchange()
        chunks = self._chunks
        self.active += 1
        try:
            async for req in request_iterator:
                phase = req.WhichOneof("request") or "other"
                if phase == "response_body" and ex.plain_stream:
                    # The hot loop of a streamed answer (hundreds of chunks): no coroutine,
                    # no reply to build, a counter instead of a latency histogram.
                    body = req.response_body
                    try:
                        gate.stream_chunk(ex, body.body, body.end_of_stream)
                    except Exception:
                        log.exception("ext_proc stream chunk failed")  # passed on regardless
                    chunks.inc()
                    yield CONTINUE_RESPONSE_BODY
                    continue
                started = time.perf_counter()
                message: pb.ProcessingResponse | None = None
                try:
                    if phase in PHASES:
                        reply = await self._dispatch(ex, phase, req)
                        message = None if reply is None else self.replies.of(phase, reply)
                    elif phase == "request_trailers":
                        message = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                    elif phase == "response_trailers":
                        message = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
                    else:
                        phase = "other"
                except Exception:
                    # A bug must not crash the stream silently: fail this request with a
                    # clean 500 in the user's language, and hold nothing for it.
                    log.exception("ext_proc phase %s failed", phase)
                    gate.decide(ex, "500", "internal_error")
                    gate.fail(ex)
                    message = immediate(gate.messages.internal())
                self._timers.get(phase, self._timers["other"]).observe(time.perf_counter() - started)
                if message is not None:
                    yield message
                    if message.HasField("immediate_response"):
                        return
        finally:
            self.active -= 1
            gate.abandon(ex)


class NoopProcessor(pb_grpc.ExternalProcessorServicer):
    """`serve --noop`: answers every phase and touches nothing (the benchmark's baseline)."""

    _REPLIES: ClassVar[dict[str, pb.ProcessingResponse]] = {
        "request_headers": CONTINUE_REQUEST_HEADERS,
        "request_body": CONTINUE_REQUEST_BODY,
        "response_headers": CONTINUE_RESPONSE_HEADERS,
        "response_body": CONTINUE_RESPONSE_BODY,
    }

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        async for req in request_iterator:
            reply = self._REPLIES.get(req.WhichOneof("request") or "")
            if reply is not None:
                yield reply
