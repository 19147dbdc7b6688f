"""Envoy's access-log service (gRPC ALS), and nothing else: the final entry of each exchange
that could be handed to Envoy (``gate.handoff``) goes to the Gate, which settles those that were.
envoy.yaml sends only those entries (a metadata filter on ``handoff.NAMESPACE``), with their
content type, to the processors' own gRPC port."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import json_format

from . import handoff
from .decisions import MAX_PENDING_SETTLES, Gate

log = logging.getLogger(__name__)

# The stream ended before its end was sent: the client left, the upstream reset, a timeout.
CUT_FLAGS = ("downstream_connection_termination", "downstream_remote_reset", "upstream_remote_reset",
             "upstream_connection_termination", "local_reset", "stream_idle_timeout",
             "upstream_request_timeout", "duration_timeout", "upstream_max_stream_duration_reached",
             "downstream_protocol_error", "upstream_protocol_error", "overload_manager")
_NAMESPACES = (handoff.NAMESPACE, handoff.USAGE_NAMESPACE)
# Entries written when the stream ends (Envoy may also log periodically or at other points when
# configured to: those are not the end of anything).
_FINAL = (accesslog_pb2.NotSet, accesslog_pb2.DownstreamEnd)


class StreamLog(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.streams: set[asyncio.Task[Any]] = set()

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        current = asyncio.current_task()
        if current is not None:
            self.streams.add(current)
        try:
            async for message in request_iterator:
                for entry in message.http_logs.log_entry:
                    task = self.entry(entry)
                    if task is not None and self.gate.pending_settles > MAX_PENDING_SETTLES:
                        # Backpressure: Envoy's log stream waits, not an unbounded backlog here.
                        await asyncio.shield(task)
        finally:
            self.streams.discard(current)  # type: ignore[arg-type]
        return als_pb2.StreamAccessLogsResponse()

    def close(self) -> None:
        """End Envoy's log streams (a stopping processor): Envoy opens new ones to another
        processor. Envoy never ends them itself, so a graceful stop would otherwise wait its
        whole grace period for them."""
        for stream in self.streams:
            stream.cancel()

    def entry(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> asyncio.Task[Any] | None:
        common = entry.common_properties
        if common.intermediate_log_entry or common.access_log_type not in _FINAL:
            return None
        metadata = {ns: json_format.MessageToDict(struct)
                    for ns, struct in common.metadata.filter_metadata.items() if ns in _NAMESPACES}
        flags = common.response_flags
        cut = any(getattr(flags, name) for name in CUT_FLAGS)
        try:
            return self.gate.settle_logged(
                metadata, status=entry.response.response_code.value,
                content_type=entry.response.response_headers.get("content-type", ""), cut=cut,
                duration=common.duration.ToTimedelta().total_seconds())
        except Exception:
            # A bug must not end Envoy's log stream (the next entries are other users' settles);
            # the hold of this one is charged by the sweep.
            log.exception("settle of a logged stream failed")
            return None
