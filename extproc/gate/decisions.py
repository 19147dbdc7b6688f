"""The gate's decisions for one exchange, phase after phase, on plain values: who is calling,
may they spend (rate limit, estimate, reservation; or the ledger's refusals, the user's own
cap and erasure among them), what did the exchange cost (settle, release), and the in-chat
notice its answer carries (docs/notices.md). Envoy's protocol is ``gate.envoy``'s business;
each API schema's knowledge is its translator's; the money rules are in ``accounting``,
``gate.billable`` and the ledger.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Coroutine, Mapping
from typing import Any

from .. import accounting
from ..errors import GateError, Messages
from ..identity import Authenticator, Identity, IdentityError
from ..ledger import FROM_ACCESS_LOG, Admission, Ledger, LedgerUnavailable, Usage
from ..metrics import Metrics
from ..ratelimit import PlanLimits, RateLimiter
from ..settings import Settings
from ..spool import Spool
from . import billable, handoff, notices
from .exchange import Exchange
from .replies import CONTINUE, Continue, Refuse, Reply
from .translators import BY_PATH, Limits
from .usage import Observed, StreamTap, count_tokens, parse_object, read_body

log = logging.getLogger(__name__)

MODELS = ("/v1/models", "/models")
# LiteLLM reads request headers of this prefix to pick another model (x-litellm-model), retry
# (x-litellm-num-retries), change timeouts or authenticate with another key: none of that is a
# client's to steer behind a gate that prices the body's model, so they never reach it.
STEERING_HEADER_PREFIX = "x-litellm-"
# Settles run after the reply; beyond this many not yet committed, replies wait for theirs
# (backpressure: the backlog, and with it what a crash could leave to the sweep, is bounded).
MAX_PENDING_SETTLES = 256
# Handed-off streams remembered for a graceful stop; past this, the oldest are forgotten (with
# several processors, an entry may come back to another one and never clear here).
MAX_HANDED_TRACKED = 100_000
# An in-chat notice's claim holds its answer's last chunk: past this, the answer goes out
# without the notice (Envoy gives each ext_proc message 1 s; a notice is never worth a reset).
NOTICE_CLAIM_TIMEOUT_SECONDS = 0.5


def upstream_credentials(key: str, jwt_header: str = "authorization") -> Continue:
    """The request-headers change that swaps the client's credentials (our JWT or gateway
    key, never meant for LiteLLM, in whichever header GATE_JWT_HEADER names) for the
    upstream's own key."""
    # accept-encoding: the gate reads the upstream's answer, so it must come uncompressed.
    remove = tuple(sorted({"x-api-key", "accept-encoding", jwt_header.lower()} - {"authorization"}))
    if key:
        return Continue(set_headers=(("authorization", f"Bearer {key}"),), remove_headers=remove)
    return Continue(remove_headers=("authorization", *remove))


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
        self.me_url = f"{settings.public_url.rstrip('/')}/me"  # the user's own page
        self.messages = Messages(settings.language, purchase_url=self.me_url
                                 if settings.stripe_secret_key and settings.stripe_webhook_secret else None)
        self.open_paths = tuple(settings.open_path_list())
        self.limits = limits or PlanLimits(settings.rate_limit_per_minute)
        self.weights = settings.weights()
        self.allowed_models = settings.allowed_model_set()
        self.estimate_limits = Limits(settings.default_completion_tokens,
                                      settings.max_completion_tokens, settings.server_context_tokens,
                                      billable.operator_fields(settings.extra_body_field_set()))
        self.tasks: set[asyncio.Task[Any]] = set()
        self.pending_settles = 0
        # Answers this process handed to Envoy whose access-log entry has not come back here
        # yet, oldest first (an ordered set): a graceful stop waits for them (gate.handoff).
        # exchange id -> (a stream, else a JSON answer; when it was handed off, time.monotonic())
        self.handed: dict[str, tuple[bool, float]] = {}
        credentials = upstream_credentials(settings.upstream_api_key, settings.jwt_header)
        # The body the gate priced is read as JSON, so the upstream must read it as JSON too:
        # LiteLLM parses a form-encoded body as a form, where "&model=..." hidden in a JSON
        # string would become the request it runs.
        self.admit_headers = Continue(
            set_headers=(*credentials.set_headers, ("content-type", "application/json")),
            remove_headers=credentials.remove_headers)
        # Unmetered pass-through (GET /v1/models): nothing more to see on this stream.
        self.pass_through = Continue(set_headers=credentials.set_headers,
                                     remove_headers=credentials.remove_headers, done=True)

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

    def reject(self, ex: Exchange, error: GateError) -> Refuse:
        self.decide(ex, str(error.status), error.code)
        return Refuse(error)

    # ------------------------------------------------------------ request headers

    async def request_headers(self, ex: Exchange, headers: Mapping[str, str], end_of_stream: bool) -> Reply:
        path, has_query, _ = headers.get(":path", "").partition("?")
        method = headers.get(":method", "")
        ex.translator = BY_PATH.get(path)
        # The client's own id when it sent one (kept for correlation): bounded like the model.
        ex.request_id = (headers.get("x-request-id") or "")[:200] or None
        passthrough = method == "GET" and (
            path in MODELS or path.startswith(tuple(m + "/" for m in MODELS)))
        if ex.translator is None and not passthrough and not path_is_under(path, self.open_paths):
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
        steering = tuple(k for k in headers if k.startswith(STEERING_HEADER_PREFIX))
        if ex.translator is None:
            self.decide(ex, "passthrough")
            return self._without(self.pass_through, steering)
        if method != "POST":
            return self.reject(ex, self.messages.refused("method_not_allowed", method))
        if has_query:
            # LiteLLM takes ?model=... over the body's model: the gate would price one model
            # and the upstream run another. No metered API of OpenAI's uses the query string.
            return self.reject(ex, self.messages.refused("query_not_allowed"))
        if end_of_stream:
            return self.reject(ex, self.messages.refused("empty_body"))
        return self._without(self.admit_headers, steering)

    @staticmethod
    def _without(reply: Continue, headers: tuple[str, ...]) -> Continue:
        """``reply`` that also removes ``headers`` (only requests that carry them pay for a
        reply of their own)."""
        if not headers:
            return reply
        return Continue(set_headers=reply.set_headers, remove_headers=reply.remove_headers + headers,
                        done=reply.done)

    # ------------------------------------------------------------ request body

    async def request_body(self, ex: Exchange, chunk: bytes, end_of_stream: bool) -> Reply | None:
        if ex.translator is None:
            return CONTINUE
        ex.body += chunk
        limit = self.settings.max_body_bytes
        if len(ex.body) > limit:
            return self.reject(ex, self.messages.too_large(len(ex.body), limit))
        if not end_of_stream:
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
        assert ex.translator is not None and ex.identity is not None
        try:
            ex.model = billable.check_model(body.get("model"), self.allowed_models)[:200]
            user = body.get("user")
            if user is not None and user != "" and user != ex.identity.user_id:
                return m.user_mismatch()
            found = ex.translator.estimate(body, self.estimate_limits)
        except billable.Refusal as refusal:
            return m.refused(refusal.code, refusal.detail)
        except RecursionError:
            return m.refused("too_deep")
        except Exception:
            # A body shape the rules did not foresee: refused (400) rather than a 500, and
            # logged whole-stack so the rule gets fixed.
            log.exception("estimate failed on a request body")
            return m.refused("unreadable")
        factor = self.settings.conversion_factor
        ex.stream = body.get("stream") is True
        ex.prompt_chars = found.text_chars
        ex.prompt_estimate = found.prompt_tokens(factor)
        ex.estimate = found.tokens(factor)
        # The weight applies at admission as at settle: the hold is in the units the debit
        # will be, so a weighted model cannot be admitted on a tenth of what it costs.
        ex.reserve = accounting.weighted_cost(ex.estimate, ex.model, self.weights)
        return body

    def _release_orphan(self, done: asyncio.Task[Any], ex: Exchange) -> None:
        if done.cancelled() or done.exception() is not None or done.result().outcome == "ok":
            self.spawn(self._void(ex))

    async def _void(self, ex: Exchange) -> None:
        """Release this exchange's hold, if any, without a debit: an upstream error with no
        output, or an admission whose exchange will never be answered (the client left during
        admission, or a commit whose reply was lost leaves a hold the sweep would charge).
        Release is a no-op when nothing is held; a release that cannot run now is spooled as
        a zero-cost settle (after a sweep, its true-up gives the charge back)."""
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

    async def _admit(self, ex: Exchange, body: dict[str, Any]) -> Reply:
        ident = ex.identity
        assert ident is not None and ex.translator is not None
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
            self.spawn(self._void(ex))  # answered 500 by the adapter: nothing may stay held
            raise
        finally:
            self.metrics.ledger_latency.labels("admit").observe(time.perf_counter() - started)
        if admission is not None and admission.outcome != "ok":
            return self._refuse_admission(ex, admission)
        if admission is not None:
            self.limits.learn(ident.user_id, admission.account.plan)
        ex.admitted = True
        ex.account = admission.account if admission is not None else None
        ex.reserved = admission.reserved if admission is not None else 0
        if ex.reserved:
            self.metrics.reservations_held.inc()
        if ex.account is not None and self.settings.inline_notices and ex.translator.notice_allowed(body):
            ex.notice = notices.due(ex.account)
        self.decide(ex, "allowed" if admission is not None else "allowed_fail_open")
        s = self.settings
        changed = ex.translator.mutate(body, stream=ex.stream, enforce_limit=s.enforce_max_tokens,
                                       default_completion=s.default_completion_tokens)
        ex.candidate = handoff.candidate(
            envoy_reads=(s.stream_usage if ex.stream else s.json_usage) == "envoy",
            bounded=handoff.bounded(body, ex.translator.limit_keys),
            usage_last=ex.translator.asks_for_stream_usage, admitted_by_ledger=ex.account is not None,
            notice_due=bool(ex.notice))
        # A candidate's fields ride with the admission (gate.handoff: why not later).
        metadata = handoff.fields(ex) if ex.candidate else ()
        if not changed:
            return Continue(metadata=metadata) if metadata else CONTINUE
        try:
            new_body = json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a lone surrogate (\ud800) JSON allows: keep it escaped
            new_body = json.dumps(body).encode()
        return Continue(set_headers=(("content-length", str(len(new_body))),), body=new_body, metadata=metadata)

    def _refuse_admission(self, ex: Exchange, admission: Admission) -> Refuse:
        """The ledger's "no", before the upstream and without a debit: nothing was held."""
        acc = admission.account
        if admission.outcome == "erased" or acc is None:
            return self.reject(ex, self.messages.erased())
        assert ex.identity is not None
        self.limits.learn(ex.identity.user_id, acc.plan)
        if admission.outcome == "suspended":
            return self.reject(ex, self.messages.suspended())
        if admission.outcome == "personal_cap" and acc.personal_cap is not None:
            return self.reject(ex, self.messages.personal_cap(
                acc.personal_cap, acc.used_cycle, ex.reserve, acc.cycle_end, self.me_url))
        return self.reject(ex, self.messages.quota_exceeded(acc.available, ex.reserve, acc.cycle_end))

    # ------------------------------------------------------------ response

    def response_headers(self, ex: Exchange, headers: Mapping[str, str], end_of_stream: bool) -> Reply:
        try:
            ex.status = int(headers.get(":status", "0"))
        except ValueError:
            ex.status = 0
        if not ex.admitted:
            return CONTINUE
        rate = ex.rate.headers() if ex.rate else ()
        content_type = headers.get("content-type", "")
        if ex.candidate and handoff.goes_to_envoy(ex.status, content_type, ex.stream):
            # Envoy reads the usage and its access log brings it back (gate.handoff): the
            # body no longer waits on this process, whose stream ends here. (The settling
            # side applies the same rule to the entry's status and content type.)
            self._hand_off(ex)
            return Continue(set_headers=rate, done=True)
        if ex.notice and (end_of_stream or not 200 <= ex.status < 300):
            ex.notice = 0  # never on an error, nor on an empty answer
        if content_type.startswith("text/event-stream"):
            ex.tap = StreamTap(self._usage_cap(ex))
            ex.plain_stream = not ex.notice
            if end_of_stream:
                self._finish(ex)
            if ex.notice:
                # The stream will grow by the notice's event: a length it may carry would
                # be wrong, and Envoy needs it gone to mutate a streamed body.
                return Continue(set_headers=rate, remove_headers=("content-length",), stream_response=True)
            return Continue(set_headers=rate, stream_response=True)
        if not content_type.startswith("application/json"):
            ex.notice = 0
        if end_of_stream:  # no body at all
            self._finish(ex)
        return Continue(set_headers=rate)

    def _hand_off(self, ex: Exchange) -> None:
        """This exchange's settle is the access log's now (gate.handoff)."""
        ex.closed = True  # this stream's end settles nothing
        if len(self.handed) >= MAX_HANDED_TRACKED:
            del self.handed[next(iter(self.handed))]  # the oldest: its entry went elsewhere
        self.handed[ex.exchange_id] = (ex.stream, time.monotonic())
        if ex.reserved:
            self.metrics.reservations_held.dec()
        self.metrics.handoffs.labels("handed").inc()

    def settle_logged(self, metadata: Mapping[str, Any], *, status: int, content_type: str, cut: bool,
                      duration: float = 0.0) -> asyncio.Task[Any] | None:
        """Settle a handed-off stream from its access-log entry (its dynamic metadata, status,
        content type and whether it was cut): Envoy's reading of the usage event, else the rules
        of ``_observed`` for a stream without usage (the request was bounded: the reservation
        covers whatever output went out). None for an entry whose exchange the processor that
        admitted it settles itself (``handoff.goes_to_envoy`` says no), or that carries none."""
        handed = handoff.handed(metadata)
        if handed is None:
            self.metrics.handoffs.labels("unreadable").inc()
            log.warning("access-log entry without a candidate exchange: ignored")
            return None
        if not handoff.goes_to_envoy(status, content_type, handed.stream):
            return None  # not handed off: settled by its own ext_proc stream
        self.handed.pop(handed.exchange_id, None)
        ex = Exchange(exchange_id=handed.exchange_id, identity=Identity(user_id=handed.user_id),
                      request_id=handed.request_id, model=handed.model, estimate=handed.estimate,
                      prompt_estimate=handed.prompt_estimate, prompt_chars=handed.prompt_chars,
                      status=status, stream=handed.stream, admitted=True, closed=True,
                      started=time.perf_counter() - duration)  # the log line's latency: Envoy's
        # Without usage: the request was bounded, so no output is counted past the reservation,
        # and a 2xx answer is never released.
        observed = handoff.observed(metadata, self._usage_cap(ex)) or self._unreported(ex, cut, 0)
        assert observed is not None
        self.metrics.handoffs.labels("no_usage" if "no_usage" in observed.flags else "settled").inc()
        observed = dataclasses.replace(observed, flags=(*observed.flags, FROM_ACCESS_LOG))
        return self.spawn(self._close(ex, self._usage(ex, observed)))

    async def response_body(self, ex: Exchange, chunk: bytes, end_of_stream: bool) -> Reply:
        if not ex.admitted or ex.closed:
            return CONTINUE
        if ex.tap is not None:
            if ex.notice:
                return await self._stream_notice(ex, chunk, end_of_stream)
            self.stream_chunk(ex, chunk, end_of_stream)
            return CONTINUE
        ex.body += chunk
        if not end_of_stream:
            return CONTINUE
        # The upstream's own bytes: what the settle reads, whatever the client is sent.
        upstream_body = bytes(ex.body) if ex.notice else b""
        # Reply now and settle right after (a tracked task: drained on shutdown, spooled if
        # the ledger is down), so the debit's transaction is not on the user's latency path;
        # past MAX_PENDING_SETTLES the reply waits for its settle (backpressure, bounded lag).
        task, usage = self._finish(ex)
        if self.pending_settles > MAX_PENDING_SETTLES:
            await asyncio.shield(task)
        if ex.account is None or usage is None:
            return CONTINUE
        cost = accounting.weighted_cost(usage.real_tokens, usage.model, self.weights)
        acc = ex.account
        remaining, pct = accounting.balance_after(
            available=acc.available, reserved=ex.reserved, used=acc.used_cycle, budget=acc.effective_limit,
            cost=cost)
        # Under a personal cap, what is left is the room under it when that is less.
        remaining = accounting.spendable(remaining, acc.used_cycle + cost, acc.personal_cap)
        headers = (("x-solaris-tokens-remaining", str(remaining)), ("x-solaris-quota-used-pct", f"{pct:.2f}"))
        noticed = await self._json_notice(ex, upstream_body, usage, cost) if ex.notice else None
        if noticed is None:
            return Continue(set_headers=headers)
        # Envoy sends the headers of a buffered body with it: its length must be the new one.
        return Continue(set_headers=(*headers, ("content-length", str(len(noticed)))), body=noticed)

    # ------------------------------------------------------------ in-chat notices

    async def _json_notice(self, ex: Exchange, raw: bytes, usage: Usage, cost: int) -> bytes | None:
        """The buffered answer with its notice appended, once claimed; None to send it as is
        (an answer that is not one plain-text reply, a usage counted by us, a lost claim)."""
        assert ex.translator is not None
        data = parse_object(raw)
        if data is None or "no_usage" in usage.flags:
            return None
        threshold, ex.notice = ex.notice, 0
        if not ex.translator.append_notice(data, self._notice_text(ex, threshold, cost)):
            return None
        if not await self._claim_notice(ex, threshold):
            return None
        try:
            return json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a lone surrogate the upstream sent escaped: keep it so
            return json.dumps(data).encode()

    async def _stream_notice(self, ex: Exchange, chunk: bytes, end_of_stream: bool) -> Reply:
        """A chunk of an SSE answer due a notice (the slow path, once per threshold and cycle):
        the tap keeps the upstream's bytes; the notice's event goes before ``data: [DONE]``
        (or at the end of a stream without one), once claimed."""
        assert ex.tap is not None
        if ex.closed:
            return CONTINUE
        ex.tap.feed(chunk)
        at = notices.insertion_point(chunk, end_of_stream)
        if at == len(chunk) and notices.has_done(b"".join(ex.tap.chunks[-2:])):
            at = None  # a [DONE] split across two chunks went out already: no notice, none claimed
        event = b""
        if at is not None:  # the answer ends here: decided now, whatever comes after passes
            threshold, ex.notice, ex.plain_stream = ex.notice, 0, True
            event = await self._notice_event(ex, threshold)
        if end_of_stream:
            self._finish(ex)
        if not event or at is None:
            return CONTINUE
        return Continue(body=notices.insert(chunk, at, event))

    async def _notice_event(self, ex: Exchange, threshold: int) -> bytes:
        """The notice as one more ``data:`` event of this stream, once claimed; b"" when the
        stream reported no usage or is not one plain-text reply."""
        assert ex.tap is not None and ex.translator is not None
        usage, _ = ex.tap.result(ex.translator)
        if usage is None:
            return b""
        cost = accounting.weighted_cost(usage.prompt_tokens + usage.completion_tokens, ex.model, self.weights)
        event = ex.translator.notice_event(ex.tap.events(), self._notice_text(ex, threshold, cost))
        if event is None or not await self._claim_notice(ex, threshold):
            return b""
        return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"

    def _notice_text(self, ex: Exchange, threshold: int, cost: int) -> str:
        assert ex.account is not None
        # The user's own language when they chose one on /me (the notice is addressed to them),
        # else the gate's.
        language = ex.account.language or self.settings.language
        return notices.text(language, threshold, notices.remaining(ex.account, cost), self.me_url)

    async def _claim_notice(self, ex: Exchange, threshold: int) -> bool:
        """Whether this answer is the one that shows the notice: the ledger lets one answer
        per user, cycle and threshold through. A ledger that cannot say (down, or slower than
        NOTICE_CLAIM_TIMEOUT_SECONDS) means no notice on this answer: a notice never fails an
        answer. (A claim that timed out may still have been written: that notice is lost.)"""
        assert ex.account is not None and ex.identity is not None
        try:
            return await asyncio.wait_for(self.ledger.claim_inline_notice(
                ex.identity.user_id, threshold, ex.account.cycle_start), NOTICE_CLAIM_TIMEOUT_SECONDS)
        except Exception as exc:  # TimeoutError included
            log.warning("in-chat notice not claimed for %s: %s", ex.exchange_id, exc)
            return False

    def stream_chunk(self, ex: Exchange, chunk: bytes, end_of_stream: bool) -> None:
        """A chunk of an admitted SSE answer: kept for the settle, passed on unchanged (the
        reply is always "continue", so the adapter answers it without waiting on anything)."""
        if ex.closed or ex.tap is None:
            return
        ex.tap.feed(chunk)
        if end_of_stream:
            # Answer the last chunk first; the settle must not delay the user's stream.
            self._finish(ex)

    def _observed(self, ex: Exchange, abandoned: bool) -> Observed | None:
        """What the exchange cost; None for "release without debit".

        The upstream's usage when it could be read. Otherwise, once the upstream was called,
        the conservative rules of ``accounting.unreported_charge``: an error reply with no
        output is released (providers do not bill it); anything else (a 2xx whose usage is
        missing or unreadable, a stream cut before its usage event, a client that went away
        before the answer) is charged the full reservation, or the output seen if larger."""
        assert ex.translator is not None
        counted = 0
        if ex.tap is not None:
            usage, text = ex.tap.result(ex.translator)
        else:
            raw, ex.body = bytes(ex.body), bytearray()
            usage, text = read_body(ex.translator, raw, self._usage_cap(ex))
        if usage is not None:
            return usage
        if text:
            counted, _ = count_tokens(text, self.settings.conversion_factor)
            if ex.tap is not None:
                counted += ex.tap.dropped_tokens(self.settings.conversion_factor)
        return self._unreported(ex, abandoned, counted)

    @staticmethod
    def _unreported(ex: Exchange, abandoned: bool, counted: int) -> Observed | None:
        """An exchange without a usable usage, by ``accounting.unreported_charge``; None:
        release without debit."""
        charge = accounting.unreported_charge(
            status=ex.status, abandoned=abandoned,
            prompt_estimate=ex.prompt_estimate, estimate=ex.estimate, counted_output=counted)
        if charge is None:
            return None
        return Observed(charge.prompt_tokens, charge.completion_tokens, charge.flags)

    def _usage_cap(self, ex: Exchange) -> int:
        """Reported usage above this is capped and flagged: never below what the request was
        admitted for (n=128 completions of the largest allowance are a legitimate 16 M)."""
        return max(self.settings.max_usage_tokens, ex.estimate)

    def _finish(self, ex: Exchange, abandoned: bool = False) -> tuple[asyncio.Task[Any], Usage | None]:
        """Close the exchange once: settle what it cost, or release its hold, in a task."""
        ex.closed = True
        usage = self._usage(ex, self._observed(ex, abandoned))
        return self.spawn(self._close(ex, usage)), usage

    def _usage(self, ex: Exchange, observed: Observed | None) -> Usage | None:
        """The settle of what was observed; None for "release without debit"."""
        if observed is None:
            return None
        assert ex.identity is not None
        self.metrics.settles.labels("counted" if "no_usage" in observed.flags else "usage").inc()
        return Usage(
            exchange_id=ex.exchange_id, user_id=ex.identity.user_id, model=ex.model,
            request_id=ex.request_id, prompt_tokens=observed.prompt_tokens,
            completion_tokens=observed.completion_tokens, estimate=ex.estimate,
            prompt_chars=ex.prompt_chars, flags=observed.flags, email=ex.identity.email)

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
        self.pending_settles += 1
        self.metrics.settle_backlog.set(self.pending_settles)
        try:
            if usage is None:
                await self._void(ex)  # release, or spool it as a zero-cost settle
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
            assert usage is not None  # (_void spools a failed release itself)
            await self._spool(ex, usage, exc)
        finally:
            self.pending_settles -= 1
            self.metrics.settle_backlog.set(self.pending_settles)
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
