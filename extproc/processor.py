"""The Envoy ext_proc service: one gRPC stream per HTTP request, four phases.

request headers  -> route check, identity (401), rate limit (429)
request body     -> parse, estimate, admit/reserve in the ledger (402/403/503), body mutation
response headers -> JSON stays buffered; text/event-stream switches to STREAMED (mode_override)
response body    -> read usage and settle exactly once (the exchange id is minted here)

This module speaks Envoy's protocol; the rules live in accounting/ledger/identity/usage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2

from . import accounting, estimate
from .errors import GateError, Messages
from .identity import Authenticator, Identity, IdentityError
from .ledger import Ledger, LedgerUnavailable, Usage
from .metrics import Metrics
from .settings import Settings
from .spool import Spool
from .usage import Observed, StreamTap, count_tokens, usage_from_json

log = logging.getLogger(__name__)

# Metered endpoints (with and without /v1): path -> kind.
METERED = {
    "/v1/chat/completions": "chat", "/chat/completions": "chat",
    "/v1/completions": "completions", "/completions": "completions",
    "/v1/embeddings": "embeddings", "/embeddings": "embeddings",
    "/v1/responses": "responses", "/responses": "responses",
}
MODELS = ("/v1/models", "/models")
# LiteLLM reads request headers of this prefix to pick another model (x-litellm-model), retry
# (x-litellm-num-retries), change timeouts or authenticate with another key: none of that is a
# client's to steer behind a gate that prices the body's model, so they never reach it.
STEERING_HEADER_PREFIX = "x-litellm-"

# Settles run after the reply; beyond this many in flight, replies wait for theirs.
MAX_PENDING_SETTLES = 64
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
_NONE = processing_mode_pb2.ProcessingMode.NONE
_SKIP = processing_mode_pb2.ProcessingMode.SKIP


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int
    retry_after: int = 0

    def headers(self) -> tuple[tuple[str, str], ...]:
        return (
            ("x-ratelimit-limit-requests", str(self.limit)),
            ("x-ratelimit-remaining-requests", str(self.remaining)),
            ("x-ratelimit-reset-requests", f"{self.reset_seconds}s"),
        )


class RateLimiter(Protocol):
    async def hit(self, user_id: str, limit_per_minute: int) -> RateDecision: ...


class PlanLimits:
    """Requests-per-minute of each user's plan, known without a database round trip at
    request headers: plans are reloaded by the maintenance loop, and a user's plan is learnt
    from each admission (a plan change applies from the user's next request after that)."""

    MAX_USERS = 200_000

    def __init__(self, default_rpm: int) -> None:
        self.default_rpm = default_rpm
        self.by_plan: dict[str, int] = {}
        self.user_plan: dict[str, str] = {}

    def load(self, plans: dict[str, int]) -> None:
        self.by_plan = dict(plans)

    def learn(self, user_id: str, plan: str) -> None:
        if self.user_plan.get(user_id) != plan:
            if len(self.user_plan) >= self.MAX_USERS:
                self.user_plan.clear()  # bounded memory; entries are relearnt on admission
            self.user_plan[user_id] = plan

    def limit_for(self, user_id: str) -> int:
        plan = self.user_plan.get(user_id, "default")
        return self.by_plan.get(plan) or self.by_plan.get("default") or self.default_rpm


@dataclass
class Exchange:
    """What one ext_proc stream knows about its HTTP exchange."""

    exchange_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)
    kind: str = ""
    identity: Identity | None = None
    request_id: str | None = None
    model: str | None = None
    stream: bool = False
    estimate: int = 0          # tokens the request may cost (estimate.Estimate.tokens)
    prompt_estimate: int = 0   # of which the prompt
    prompt_chars: int = 0      # billable text characters (for `extproc calibrate`)
    reserve: int = 0           # what admission asks the ledger to hold: estimate x weight
    admitted: bool = False
    reserved: int = 0
    status: int = 0
    sse: bool = False
    tap: StreamTap | None = None
    body: bytearray = field(default_factory=bytearray)
    rate: RateDecision | None = None
    account: Any = None  # the account as admission left it (after this reservation)
    closed: bool = False


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    # Envoy reads raw_value (value stays empty), DESIGN.md section 11.
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE)


def _mutation(headers: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> pb.HeaderMutation:
    return pb.HeaderMutation(set_headers=[_header(k, v) for k, v in headers])


def immediate(error: GateError) -> pb.ProcessingResponse:
    headers = (("content-type", "application/json"), *error.headers)
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=error.status),
        headers=_mutation(headers), body=error.body(),
        # the prefix tells envoy.yaml's local_reply_config this reply is ours, not Envoy's
        details=f"solaris_{error.code}"))


def headers_map(msg: pb.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in msg.headers.headers:
        out[h.key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


CONTINUE_REQUEST_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
_PASS_THROUGH_MODE = processing_mode_pb2.ProcessingMode(
    request_body_mode=_NONE, response_header_mode=_SKIP, response_body_mode=_NONE)
CONTINUE_REQUEST_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
CONTINUE_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())


def upstream_credentials(key: str, jwt_header: str = "authorization") -> pb.CommonResponse:
    """The request-headers mutation that swaps the client's credentials (our JWT or gateway
    key, never meant for LiteLLM, in whichever header GATE_JWT_HEADER names) for the
    upstream's own key."""
    # accept-encoding: the gate reads the upstream's answer, so it must come uncompressed.
    remove = sorted({"x-api-key", "accept-encoding", jwt_header.lower()} - {"authorization"})
    if key:
        return pb.CommonResponse(header_mutation=pb.HeaderMutation(
            set_headers=[_header("authorization", f"Bearer {key}")], remove_headers=remove))
    return pb.CommonResponse(header_mutation=pb.HeaderMutation(remove_headers=["authorization", *remove]))


def path_is_under(path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``path`` is one of ``prefixes`` or below one of them, by whole segments
    (``/v1/audio`` opens ``/v1/audio/speech``, never ``/v1/audiobook``)."""
    return any(path == p.rstrip("/") or path.startswith(p.rstrip("/") + "/") for p in prefixes)


class Gate:
    """Decisions for one exchange at a time; holds no per-request state itself."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        authenticator: Authenticator,
        limiter: RateLimiter,
        metrics: Metrics,
        spool: Spool,
        limits: PlanLimits | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.auth = authenticator
        self.limiter = limiter
        self.metrics = metrics
        self.spool = spool
        self.messages = Messages(settings.language, purchase_url=f"{settings.public_url.rstrip('/')}/me"
                                 if settings.stripe_secret_key and settings.stripe_webhook_secret else None)
        self.open_paths = tuple(settings.open_path_list())
        self.limits = limits or PlanLimits(settings.rate_limit_per_minute)
        self.weights = settings.weights()
        self.allowed_models = settings.allowed_model_set()
        self.tasks: set[asyncio.Task[Any]] = set()
        credentials = upstream_credentials(settings.upstream_api_key, settings.jwt_header)
        self.admit_headers = pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=credentials))
        # Unmetered pass-through (GET /v1/models): nothing more to see on this stream.
        self.pass_through = pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(response=credentials), mode_override=_PASS_THROUGH_MODE)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run money work that must outlive a cancelled stream; drained on shutdown."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def decide(self, ex: Exchange, outcome: str, code: str = "") -> None:
        """Count the decision. Refusals are logged now; admitted exchanges once they close,
        with their tokens: one log line per request."""
        self.metrics.decisions.labels(outcome).inc()
        if not outcome.startswith("allowed"):
            self._log(ex, outcome, code=code)

    @staticmethod
    def _log(ex: Exchange, decision: str, **fields: Any) -> None:
        # Never a token, key, e-mail or body: identifiers and numbers only.
        log.info("decision", extra={
            "decision": decision, "exchange_id": ex.exchange_id, "request_id": ex.request_id,
            "user_id": ex.identity.user_id if ex.identity else None, "model": ex.model,
            "estimate": ex.estimate, "latency_ms": round((time.perf_counter() - ex.started) * 1000, 3),
            **fields})

    def reject(self, ex: Exchange, error: GateError) -> pb.ProcessingResponse:
        self.decide(ex, str(error.status), error.code)
        return immediate(error)

    # ------------------------------------------------------------ request headers

    async def on_request_headers(self, ex: Exchange, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        headers = headers_map(msg)
        path = headers.get(":path", "").split("?", 1)[0]
        method = headers.get(":method", "")
        ex.kind = METERED.get(path, "")
        ex.request_id = headers.get("x-request-id")
        passthrough = method == "GET" and (
            path in MODELS or path.startswith(tuple(m + "/" for m in MODELS)))
        if not ex.kind and not passthrough and not path_is_under(path, self.open_paths):
            return self.reject(ex, self.messages.not_found())
        try:
            ex.identity = await self.auth.authenticate(headers)
        except IdentityError as exc:
            return self.reject(ex, self.messages.unauthorized(str(exc)))
        user = ex.identity.user_id
        ex.rate = await self.limiter.hit(user, self.limits.limit_for(user))
        if not ex.rate.allowed:
            return self.reject(ex, self.messages.rate_limited(
                ex.rate.limit, ex.rate.retry_after, ex.rate.headers()))
        steering = [k for k in headers if k.startswith(STEERING_HEADER_PREFIX)]
        if not ex.kind:
            self.decide(ex, "passthrough")
            return self._without(self.pass_through, steering)
        if method != "POST":
            return self.reject(ex, self.messages.refused("method_not_allowed", method))
        if msg.end_of_stream:
            return self.reject(ex, self.messages.refused("empty_body"))
        return self._without(self.admit_headers, steering)

    @staticmethod
    def _without(reply: pb.ProcessingResponse, headers: list[str]) -> pb.ProcessingResponse:
        """``reply`` that also removes ``headers`` (rare: only requests that carry them pay
        for a copy of the precomputed reply)."""
        if not headers:
            return reply
        copy = pb.ProcessingResponse()
        copy.CopyFrom(reply)
        copy.request_headers.response.header_mutation.remove_headers.extend(headers)
        return copy

    # ------------------------------------------------------------ request body

    async def on_request_body(self, ex: Exchange, msg: pb.HttpBody) -> pb.ProcessingResponse | None:
        if not ex.kind:
            return CONTINUE_REQUEST_BODY
        ex.body += msg.body
        limit = self.settings.max_body_bytes
        if len(ex.body) > limit:
            return self.reject(ex, self.messages.too_large(len(ex.body), limit))
        if not msg.end_of_stream:
            return None  # more body to come (only if Envoy splits a buffered body)
        raw, ex.body = bytes(ex.body), bytearray()
        parsed = self._parse_body(ex, raw)
        if isinstance(parsed, GateError):
            return self.reject(ex, parsed)
        return await self._admit(ex, parsed)

    def _parse_body(self, ex: Exchange, raw: bytes) -> dict[str, Any] | GateError:
        m = self.messages
        try:
            body = json.loads(raw)
        except UnicodeDecodeError:
            return m.refused("not_utf8")
        except RecursionError:
            return m.refused("too_deep")
        except ValueError:
            return m.refused("not_json")
        if not isinstance(body, dict):
            return m.refused("not_object")
        s = self.settings
        try:
            ex.model = estimate.check_model(body.get("model"), self.allowed_models)[:200]
            user = body.get("user")
            assert ex.identity is not None
            if user is not None and user != "" and user != ex.identity.user_id:
                return m.user_mismatch()
            found = estimate.estimate(
                ex.kind, body, default_completion=s.default_completion_tokens,
                max_completion=s.max_completion_tokens, server_context_tokens=s.server_context_tokens)
        except estimate.Refusal as refusal:
            return m.refused(refusal.code, refusal.detail)
        except RecursionError:
            return m.refused("too_deep")
        ex.stream = body.get("stream") is True
        ex.prompt_chars = found.text_chars
        ex.prompt_estimate = found.prompt_tokens(s.conversion_factor)
        ex.estimate = found.tokens(s.conversion_factor)
        # The weight applies at admission as at settle: the hold is in the units the debit
        # will be, so a weighted model cannot be admitted on a tenth of what it costs.
        ex.reserve = accounting.weighted_cost(ex.estimate, ex.model, self.weights)
        return body

    def _mutated_body(self, ex: Exchange, body: dict[str, Any]) -> bytes | None:
        changed = False
        if ex.stream and ex.kind in ("chat", "completions"):
            options = body.get("stream_options")
            if not isinstance(options, dict):
                options = {}
            if options.get("include_usage") is not True:
                body["stream_options"] = {**options, "include_usage": True}
                changed = True
        if self.settings.enforce_max_tokens and ex.kind != "embeddings":
            keys = ("max_tokens", "max_completion_tokens", "max_output_tokens")
            if all(body.get(k) is None for k in keys):
                key = "max_output_tokens" if ex.kind == "responses" else "max_tokens"
                body[key] = self.settings.default_completion_tokens
                changed = True
        return json.dumps(body, ensure_ascii=False).encode() if changed else None

    def _release_orphan(self, done: asyncio.Task[Any], ex: Exchange) -> None:
        if done.cancelled() or done.exception() is not None or done.result().outcome == "ok":
            self.spawn(self._void(ex))

    async def _void(self, ex: Exchange) -> None:
        """Close any hold this exchange's admission may have made although it will never be
        answered: the client left during admission, or admission failed on our side of the
        wire (a commit whose reply was lost leaves a hold the sweep would charge). Release is
        a no-op when nothing is held; when it cannot run, a zero-cost settle is spooled."""
        try:
            await self.ledger.release(ex.exchange_id)
        except Exception as exc:  # every failure must end in the spool
            self.metrics.db_errors.inc()
            await self._spool(ex, self._zero_cost(ex), exc)

    @staticmethod
    def _zero_cost(ex: Exchange) -> Usage:
        """A release as a settle the spool can carry: closes a hold at 0, gives back a sweep's
        charge through its true-up, and does nothing where nothing was ever held (I5)."""
        assert ex.identity is not None
        return Usage(exchange_id=ex.exchange_id, user_id=ex.identity.user_id, model=ex.model,
                     request_id=ex.request_id, estimate=ex.estimate, flags=("released",), cost=0)

    async def _admit(self, ex: Exchange, body: dict[str, Any]) -> pb.ProcessingResponse:
        ident = ex.identity
        assert ident is not None
        started = time.perf_counter()
        # The admission runs as its own task: if Envoy cancels this stream meanwhile (the
        # client went away), a reservation that did get made is released, not left to expire
        # and be charged for an answer nobody received.
        task = self.spawn(self.ledger.admit(
            ident.user_id, ex.reserve, ex.exchange_id, email=ident.email, name=ident.name,
            request_id=ex.request_id, model=ex.model))
        try:
            admission = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda done: self._release_orphan(done, ex))
            raise
        except LedgerUnavailable as exc:
            self.metrics.db_errors.inc()
            if self.settings.fail_mode == "closed":
                log.error("ledger unavailable at admission, refusing: %s", exc)
                self.spawn(self._void(ex))
                return self.reject(ex, self.messages.unavailable())
            # Fail-open: the exchange goes on; its settle finds the hold if one was made.
            log.warning("ledger unavailable at admission, admitting (fail-open): %s", exc)
            admission = None
        except Exception:
            self.spawn(self._void(ex))  # answered 500 by Processor: nothing may stay held
            raise
        finally:
            self.metrics.ledger_latency.labels("admit").observe(time.perf_counter() - started)
        if admission is not None:
            self.limits.learn(ident.user_id, admission.account.plan)
        if admission is not None and admission.outcome == "suspended":
            return self.reject(ex, self.messages.suspended())
        if admission is not None and admission.outcome == "insufficient":
            acc = admission.account
            return self.reject(ex, self.messages.quota_exceeded(
                acc.available, ex.reserve, acc.cycle_end.date().isoformat()))
        ex.admitted = True
        ex.account = admission.account if admission is not None else None
        ex.reserved = admission.reserved if admission is not None else 0
        if ex.reserved:
            self.metrics.reservations_held.inc()
        self.decide(ex, "allowed" if admission is not None else "allowed_fail_open")
        new_body = self._mutated_body(ex, body)
        if new_body is None:
            return CONTINUE_REQUEST_BODY
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
            header_mutation=_mutation([("content-length", str(len(new_body)))]),
            body_mutation=pb.BodyMutation(body=new_body))))

    # ------------------------------------------------------------ response

    def on_response_headers(self, ex: Exchange, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        headers = headers_map(msg)
        try:
            ex.status = int(headers.get(":status", "0"))
        except ValueError:
            ex.status = 0
        if not ex.admitted:
            return CONTINUE_RESPONSE_HEADERS
        rate = pb.CommonResponse(header_mutation=_mutation(ex.rate.headers())) if ex.rate else None
        if headers.get("content-type", "").startswith("text/event-stream"):
            ex.sse = True
            ex.tap = StreamTap(self.settings.max_usage_tokens)
            if msg.end_of_stream:
                self._finish(ex)
            return pb.ProcessingResponse(
                response_headers=pb.HeadersResponse(response=rate),
                mode_override=processing_mode_pb2.ProcessingMode(response_body_mode=_STREAMED))
        if msg.end_of_stream:  # no body at all: nothing was produced
            self._finish(ex)
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=rate))

    async def on_response_body(self, ex: Exchange, msg: pb.HttpBody) -> pb.ProcessingResponse:
        if not ex.admitted or ex.closed:
            return CONTINUE_RESPONSE_BODY
        if ex.sse:
            assert ex.tap is not None
            ex.tap.feed(msg.body)
            if msg.end_of_stream:
                # Answer the last chunk first; the settle must not delay the user's stream.
                self._finish(ex)
            return CONTINUE_RESPONSE_BODY
        ex.body += msg.body
        if not msg.end_of_stream:
            return CONTINUE_RESPONSE_BODY
        # Reply now and settle right after (a tracked task: drained on shutdown, spooled if
        # the ledger is down), so the debit's transaction is not on the user's latency path;
        # past MAX_PENDING_SETTLES the reply waits for its settle (backpressure, bounded lag).
        task, usage = self._finish(ex)
        if len(self.tasks) > MAX_PENDING_SETTLES:
            await asyncio.shield(task)
        if ex.account is None or usage is None:
            return CONTINUE_RESPONSE_BODY
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(
            header_mutation=_mutation(self._budget_headers(ex.account, ex.reserved, self._cost(usage))))))

    def _cost(self, usage: Usage) -> int:
        return accounting.weighted_cost(usage.real_tokens, usage.model, self.weights)

    @staticmethod
    def _budget_headers(account: Any, reserved: int, cost: int) -> list[tuple[str, str]]:
        """The balance after this exchange's debit, from the account as its admission left it
        (concurrent exchanges of the same user are not reflected: informational headers)."""
        remaining = account.available + reserved - cost
        pct = accounting.usage_pct(account.used_cycle + cost, account.cycle_budget)
        return [("x-solaris-tokens-remaining", str(max(remaining, 0))),
                ("x-solaris-quota-used-pct", f"{pct:.2f}")]

    def _observed(self, ex: Exchange, abandoned: bool) -> Observed | None:
        """What the exchange cost; None for "release without debit".

        The upstream's usage when it could be read. Otherwise, once the upstream was called,
        the conservative rules of ``accounting.unreported_charge``: an error reply with no
        output is released (providers do not bill it); anything else (a 2xx whose usage is
        missing or unreadable, a stream cut before its usage event, a client that went away
        before the answer) is charged the full reservation, or the output seen if larger."""
        counted = 0
        usage: Observed | None = None
        if ex.tap is not None:
            usage, text = ex.tap.result()
        else:
            raw, ex.body = bytes(ex.body), bytearray()
            usage, text = usage_from_json(raw, self.settings.max_usage_tokens)
        if usage is not None:
            return usage
        if text:
            counted, _ = count_tokens(text, self.settings.conversion_factor)
            if ex.tap is not None:
                counted += ex.tap.dropped_tokens(self.settings.conversion_factor)
        charge = accounting.unreported_charge(
            status=ex.status, abandoned=abandoned,
            prompt_estimate=ex.prompt_estimate, estimate=ex.estimate, counted_output=counted)
        if charge is None:
            return None
        return Observed(charge.prompt_tokens, charge.completion_tokens, charge.flags)

    def _finish(self, ex: Exchange, abandoned: bool = False) -> tuple[asyncio.Task[Any], Usage | None]:
        """Close the exchange once: settle what it cost, or release its hold, in a task."""
        ex.closed = True
        observed = self._observed(ex, abandoned)
        usage: Usage | None = None
        if observed is not None:
            assert ex.identity is not None
            self.metrics.settles.labels("counted" if "no_usage" in observed.flags else "usage").inc()
            usage = Usage(
                exchange_id=ex.exchange_id, user_id=ex.identity.user_id, model=ex.model,
                request_id=ex.request_id, prompt_tokens=observed.prompt_tokens,
                completion_tokens=observed.completion_tokens, estimate=ex.estimate,
                prompt_chars=ex.prompt_chars, flags=observed.flags, email=ex.identity.email)
        return self.spawn(self._close(ex, usage)), usage

    def abandon(self, ex: Exchange) -> None:
        """The stream ended before the response did (client abort, Envoy reset, upstream
        timeout): the upstream was called, so the exchange is charged by the rules of
        ``_observed`` (released only on an upstream error with no output)."""
        if ex.admitted and not ex.closed:
            self._finish(ex, abandoned=True)

    def fail(self, ex: Exchange) -> None:
        """A bug of ours ended the exchange: the user gets no answer, so the hold is released
        (the gateway's operator bears this exchange's cost, logged as ``internal_error``)."""
        if ex.admitted and not ex.closed:
            ex.closed = True
            self.spawn(self._close(ex, None))

    async def _close(self, ex: Exchange, usage: Usage | None) -> None:
        """Settle or release. Whatever the ledger cannot take now (down, read-only during a
        failover, a serialization or data error) goes to the durable spool, whose replay
        applies it or quarantines it: a settle is applied, spooled or recorded, never dropped."""
        if ex.reserved:
            self.metrics.reservations_held.dec()
        started = time.perf_counter()
        cost: int | None = None
        try:
            if usage is None:
                await self.ledger.release(ex.exchange_id)
            elif (settled := await self.ledger.settle(usage)) is not None:
                cost = settled.cost
                self.metrics.tokens.labels(usage.model or "", "prompt").inc(usage.prompt_tokens)
                self.metrics.tokens.labels(usage.model or "", "completion").inc(usage.completion_tokens)
                if ex.estimate:
                    self.metrics.estimate_ratio.observe(usage.real_tokens / ex.estimate)
                for threshold in settled.alerts:
                    self.metrics.alerts.labels(str(threshold), "queued").inc()
        except Exception as exc:  # every failure must end in the spool
            self.metrics.db_errors.inc()
            # A release that did not happen would let the sweep charge the hold: spool it as
            # a zero-cost settle (after a sweep, its true-up gives the charge back).
            usage = usage or self._zero_cost(ex)
            await self._spool(ex, usage, exc)
        finally:
            self.metrics.ledger_latency.labels("settle").observe(time.perf_counter() - started)
            self._log(ex, "allowed", status=ex.status, tokens=cost,
                      flags=list(usage.flags) if usage is not None else ["released"])

    async def _spool(self, ex: Exchange, usage: Usage, exc: BaseException) -> None:
        kind = "unavailable" if isinstance(exc, LedgerUnavailable) else type(exc).__name__
        log.error("ledger refused the settle of %s (%s), spooling", ex.exchange_id, kind)
        try:
            await self.spool.append(usage)
            self.metrics.spooled.inc()
        except Exception:
            # The last record: the whole settle in the error log (no e-mail), for an operator
            # to apply by hand. The spool's disk is gone if this line is ever written.
            log.exception("SETTLE NOT SPOOLED %s", json.dumps({**usage.to_json(), "email": None}))
            self.metrics.settles_lost.inc()


class Processor(pb_grpc.ExternalProcessorServicer):
    """The gRPC face of the Gate: dispatches each ProcessingRequest to its phase."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        observe = gate.metrics.phase_latency
        self._timers = {p: observe.labels(p) for p in (
            "request_headers", "request_body", "response_headers", "response_body", "other")}

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        gate = self.gate
        ex = Exchange()
        try:
            async for req in request_iterator:
                started = time.perf_counter()
                phase = req.WhichOneof("request")
                reply: pb.ProcessingResponse | None
                try:
                    if phase == "request_headers":
                        reply = await gate.on_request_headers(ex, req.request_headers)
                    elif phase == "request_body":
                        reply = await gate.on_request_body(ex, req.request_body)
                    elif phase == "response_headers":
                        reply = gate.on_response_headers(ex, req.response_headers)
                    elif phase == "response_body":
                        reply = await gate.on_response_body(ex, req.response_body)
                    elif phase == "request_trailers":
                        reply = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                    elif phase == "response_trailers":
                        reply = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
                    else:
                        phase = "other"
                        reply = None
                except Exception:
                    # A bug must not crash the stream silently: fail this request with a
                    # clean 500 (no money has moved unless admission finished, which the
                    # abandon path below settles or releases).
                    log.exception("ext_proc phase %s failed", phase)
                    gate.decide(ex, "500", "internal_error")
                    gate.fail(ex)
                    reply = immediate(gate.messages.internal())
                self._timers.get(phase, self._timers["other"]).observe(
                    time.perf_counter() - started)
                if reply is not None:
                    yield reply
                    if reply.HasField("immediate_response"):
                        return
        finally:
            gate.abandon(ex)
