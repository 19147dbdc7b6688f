"""Per-user request rate limits: GCRA in Redis, with an in-process fallback.

GCRA (generic cell rate algorithm) keeps one number per user, the theoretical arrival time
(TAT). Each request pushes the TAT one emission interval (60 s / limit) into the future, and a
request is refused if that would put the TAT more than 60 s ahead of now. A user who was idle
can therefore send ``limit`` requests at once, then one per interval. Unlike fixed windows there
is no window edge, so a user can never get 2 x limit across a boundary.

Redis holds the TAT so that every ext_proc process shares one limit. Redis is never allowed to
slow a request down or take the gateway down with it: every call is bounded by ``timeout`` (of
Redis's time: the processor's own loop lag extends it, at most 5 x, see _redis_call), and
after a failure the limiter answers from process memory for ``retry_interval`` seconds (circuit
breaker), so a dead Redis costs nothing per request. While Redis is down each process enforces
the limit on its own, so N processes allow up to N x limit: a deliberate trade against refusing
everyone or letting everyone through.

Leases take Redis off the path of users far below their limit. With ``lease`` > 1 a process
may ask for several cells (requests) in one call; the script grants them only while the user
keeps at least half of the minute's burst after the grant, else it decides the one request
exactly as without leases. The process then answers the user's next requests from the lease, in
memory, until the lease is spent or ``lease_seconds`` have passed (unspent cells are dropped:
charged, not served, which only ever tightens the limit). Since a lease is charged in Redis
before its requests are made, a request served from a lease counts as if it came up to
``lease_seconds`` earlier: with N processes, at most N x lease requests beyond the limit in any
window (each process holds at most one lease per user), and never while the user is in the
upper half of the limit, where every request is decided by Redis. A lease is at most 1/20 of the
limit (1/20 of a minute's requests per process), and grows from 1 (doubling) only while the
user spends each lease within its validity, so a user sending a request now and then gets one
exact Redis call per request, as without leases.

Arithmetic is done in integer microseconds. Milliseconds as floats would accumulate rounding
over a burst (``limit`` additions of 60000/limit), which shows up as an off-by-one in the last
request of a burst. Integers below 2**53 are exact in Lua's doubles as well, so the Lua and the
Python compute bit-identical answers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .metrics import Metrics

log = logging.getLogger(__name__)


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

WINDOW_US = 60_000_000  # the limit is "per minute"
DEFAULT_MAX_ENTRIES = 100_000

GcraResult = tuple[bool, float, int, int, int]

# KEEP IN SYNC with gcra() below: same rounding, same clamps, same order of operations.
# tests/test_ratelimit.py runs both on one sequence of timestamps and demands identical output.
#
# KEYS[1]  the user's TAT key; its value is the TAT in milliseconds, "%.3f" (exact microseconds).
# ARGV[1]  limit per minute, an integer >= 1.
# ARGV[2]  now in milliseconds, for tests only. Production omits it (or sends "") and the script
#          reads the Redis clock, so that every process (whatever its own clock says) judges
#          against one clock. TIME followed by a write is allowed because scripts are replicated
#          by effects (default since Redis 5, the only mode since 7).
# ARGV[3]  optional: cells wanted (a lease, >= 1); granted only while the user keeps at least
#          half of the burst after it, else one cell, decided exactly as without it.
# Returns  {allowed 1|0, TAT after the call (string), remaining, reset ms, retry-after ms}, and
#          with ARGV[3] the cells granted (0 when refused) as a sixth element.
GCRA_LUA = """
local limit = tonumber(ARGV[1])
local want = tonumber(ARGV[3] or '1')
local now
if ARGV[2] and ARGV[2] ~= '' then
  now = math.floor(tonumber(ARGV[2]) * 1000 + 0.5)
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local interval = math.max(1, math.floor(60000000 / limit))
local window = interval * limit
local raw = redis.call('GET', KEYS[1])
local tat = now
if raw then
  tat = math.floor(tonumber(raw) * 1000 + 0.5)
  if tat < now then tat = now end
  if tat > now + window then tat = now + window end
end
local new_tat = tat + interval
if new_tat - now > window then
  local refused = {0, raw, 0, math.ceil((tat - now) / 1000), math.ceil((new_tat - window - now) / 1000)}
  if ARGV[3] then refused[6] = 0 end
  return refused
end
local granted = 1
if want > 1 and 2 * (tat + want * interval - now) <= window then
  new_tat = tat + want * interval
  granted = want
end
local stored = string.format('%.3f', new_tat / 1000)
local ttl = math.ceil((new_tat - now) / 1000)
redis.call('SET', KEYS[1], stored, 'PX', ttl)
local reply = {1, stored, math.floor((window - (new_tat - now)) / interval), ttl, 0}
if ARGV[3] then reply[6] = granted end
return reply
"""


def _to_us(ms: float) -> int:
    # floor(x + 0.5) rather than round(): Python rounds halves to even, Lua has no round().
    return math.floor(ms * 1000 + 0.5)


def _ceil_ms(us: int) -> int:
    # True division then ceil, exactly as the Lua does it (the quotient is correctly rounded in
    # both languages, and us / 1000 never rounds onto an integer it is not).
    return math.ceil(us / 1000)


def gcra(tat_ms: float | None, now_ms: float, limit: int) -> GcraResult:
    """One GCRA step: (allowed, new_tat_ms, remaining, reset_ms, retry_after_ms).

    ``new_tat_ms`` is the TAT to keep after this call (unchanged when refused). ``reset_ms`` is
    the time until the full burst is available again; ``retry_after_ms`` the time until the next
    request would pass (0 when allowed). KEEP IN SYNC with GCRA_LUA.
    """
    return gcra_lease(tat_ms, now_ms, limit, 1)[0]


def gcra_lease(tat_ms: float | None, now_ms: float, limit: int, want: int) -> tuple[GcraResult, int]:
    """gcra() asking for ``want`` cells at once: (result, cells granted). ``want`` is granted when
    the user keeps at least half of the burst after it, else one cell is decided exactly as by
    gcra(); 0 when refused. KEEP IN SYNC with GCRA_LUA (its ARGV[3])."""
    if limit < 1:
        raise ValueError("gcra needs a limit >= 1")
    now = _to_us(now_ms)
    # Whole microseconds keep the maths exact. Rounding down (not up) keeps the window within
    # 60 s, so "reset" never reads 61 s; it is generous by under 1 us per request. Python's //
    # equals Lua's floor(a / b) here: the quotient is never within rounding of an integer.
    interval = max(1, WINDOW_US // limit)
    window = interval * limit
    tat = now
    if tat_ms is not None:
        # A TAT in the past means "idle": same as no TAT. A TAT more than a window ahead can only
        # come from a clock that jumped backwards; clamping keeps users from being locked out
        # until the clock catches up.
        tat = min(max(_to_us(tat_ms), now), now + window)
    new_tat = tat + interval
    if new_tat - now > window:
        assert tat_ms is not None  # a fresh user always fits: interval <= window
        return (False, tat_ms, 0, _ceil_ms(tat - now), _ceil_ms(new_tat - window - now)), 0
    granted = 1
    if want > 1 and 2 * (tat + want * interval - now) <= window:
        new_tat = tat + want * interval
        granted = want
    remaining = (window - (new_tat - now)) // interval
    return (True, new_tat / 1000, remaining, _ceil_ms(new_tat - now), 0), granted


def _decision(limit: int, allowed: bool, remaining: int, reset_ms: int,
              retry_ms: int) -> RateDecision:
    # Headers and Retry-After speak whole seconds; round up so a client that waits exactly
    # retry_after is never refused again.
    return RateDecision(
        allowed=allowed,
        limit=limit,
        remaining=remaining,
        reset_seconds=-(-reset_ms // 1000),
        retry_after=0 if allowed else max(1, -(-retry_ms // 1000)),
    )


def _refuse_all(limit: int) -> RateDecision:
    # A limit of 0 (or less) per minute is read literally: no requests. Redis is not consulted.
    return RateDecision(False, max(limit, 0), 0, 60, 60)


class LocalRateLimiter:
    """GCRA over a dict in process memory: the fallback, and a limiter for single-process use."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self._clock = clock
        self.max_entries = max_entries
        # user -> TAT in ms. Insertion order doubles as recency order (entries are re-inserted
        # on every update), so eviction drops the least recently seen users first.
        self._tat: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._tat)

    async def hit(self, user_id: str, limit_per_minute: int) -> RateDecision:
        return self.hit_now(user_id, limit_per_minute)

    def hit_now(self, user_id: str, limit_per_minute: int) -> RateDecision:
        if limit_per_minute < 1:
            return _refuse_all(limit_per_minute)
        now_ms = self._clock() * 1000
        allowed, tat, remaining, reset_ms, retry_ms = gcra(
            self._tat.get(user_id), now_ms, limit_per_minute)
        if allowed:
            self._store(user_id, tat, now_ms)
        return _decision(limit_per_minute, allowed, remaining, reset_ms, retry_ms)

    def seed(self, user_id: str, tat_ms: float) -> None:
        """Remember the TAT Redis reported, so a failover does not hand out a fresh burst."""
        self._store(user_id, tat_ms, self._clock() * 1000)

    def _store(self, user_id: str, tat_ms: float, now_ms: float) -> None:
        self._tat.pop(user_id, None)
        self._tat[user_id] = tat_ms
        if len(self._tat) > self.max_entries:
            self._prune(now_ms)

    def _prune(self, now_ms: float) -> None:
        # A TAT in the past means the same as no entry, so dropping those loses nothing. If that
        # is not enough, forget the least recently seen users (they get a fresh burst, which is
        # the lesser evil next to unbounded memory). Going down to 3/4 makes pruning amortised
        # O(1) instead of a full scan on every insert once the dict sits at the bound.
        self._tat = {u: t for u, t in self._tat.items() if t > now_ms}
        target = self.max_entries * 3 // 4
        excess = len(self._tat) - target
        if excess > 0:
            for user in list(self._tat)[:excess]:
                del self._tat[user]


# A lease is at most this share of the per-minute limit (1/20: 5 requests of 100 per minute).
LEASE_SHARE = 20
# A Redis call's deadline (see _redis_call): loop rounds granted before it is cut off, and how
# often a deadline the loop ran late grants the call its timeout again.
DEADLINE_ROUNDS = 3
MAX_EXTENSIONS = 4


# Redis calls nobody waits for any more (see abandon): referenced until they end.
ABANDONED: set[asyncio.Task[Any]] = set()


def abandon(call: asyncio.Task[Any]) -> None:
    """Stop caring about a Redis call: cancel it, keep it referenced until it ends (a task only
    the loop holds may be collected mid-flight) and read its outcome, so the loop never logs it
    as never retrieved. Callers wait for their Redis calls in a task of their own, because a
    cancel can be lost inside redis-py (Python 3.11's asyncio.wait_for, see _redis_call)."""
    if not call.done():
        call.cancel()
    ABANDONED.add(call)
    call.add_done_callback(_forget)  # on a call already done: soon, still referenced meanwhile


def _forget(call: asyncio.Task[Any]) -> None:
    ABANDONED.discard(call)
    if not call.cancelled():
        call.exception()


class _Lease:
    """Cells a process took from Redis for one user, spent from memory."""

    __slots__ = ("expires", "left", "limit", "remaining", "reset_ms", "size")

    def __init__(self, limit: int, size: int, left: int, expires: float, remaining: int,
                 reset_ms: int) -> None:
        self.limit = limit
        self.size = size  # cells asked for last time: grows while spent in time, shrinks if not
        self.left = left
        self.expires = expires
        self.remaining = remaining  # what Redis said was left after the grant
        self.reset_ms = reset_ms


class RedisRateLimiter:
    """GCRA in Redis (one EVALSHA per hit, or per lease), falling back to process memory when
    Redis fails."""

    def __init__(
        self,
        redis: Redis,
        metrics: Metrics,
        *,
        prefix: str = "solaris:",
        timeout: float = 0.005,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
        lease: int = 0,
        lease_seconds: float = 1.0,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self.redis = redis
        self.metrics = metrics
        self.prefix = prefix
        self.timeout = timeout
        self.retry_interval = retry_interval
        self._clock = clock
        self.lease = lease  # most cells per lease; below 2: one Redis call per request
        self.lease_seconds = lease_seconds
        self.max_entries = max_entries
        self._leases: dict[str, _Lease] = {}
        self._script = redis.register_script(GCRA_LUA)
        self.fallback = LocalRateLimiter(clock=clock)
        # Circuit breaker: Redis is skipped while opened_at <= now < opened_at + retry_interval.
        # opened_at is None while closed. A clock that jumps backwards closes it (see _breaker).
        self._opened_at: float | None = None
        self._last_warning: float | None = None
        self._suppressed = 0

    def key(self, user_id: str) -> str:
        return f"{self.prefix}rl:{user_id}"

    @property
    def degraded(self) -> bool:
        """True while the breaker is open (answers come from process memory)."""
        return self._breaker_open(self._clock())

    async def hit(self, user_id: str, limit_per_minute: int) -> RateDecision:
        if limit_per_minute < 1:
            return _refuse_all(limit_per_minute)
        now = self._clock()
        lease = self._leases.get(user_id)
        if lease is not None and lease.left > 0 and lease.limit == limit_per_minute and now < lease.expires:
            # Far below the limit (Redis granted the lease only then): no round trip.
            lease.left -= 1
            self.metrics.ratelimit_leased.inc()
            return _decision(limit_per_minute, True, lease.remaining + lease.left, lease.reset_ms, 0)
        want = self._want(lease, limit_per_minute, now)
        if not self._breaker_open(now):
            args: list[Any] = [limit_per_minute] if want < 2 else [limit_per_minute, "", want]
            try:
                reply = await self._redis_call(keys=[self.key(user_id)], args=args)
            except (RedisError, TimeoutError, OSError) as exc:
                self._trip(now, exc)
            else:
                return self._from_redis(user_id, limit_per_minute, reply, want, now)
        self.metrics.ratelimit_fallbacks.inc()
        return self.fallback.hit_now(user_id, limit_per_minute)

    def _lease_cap(self, limit: int) -> int:
        """The most cells one lease may hold for this limit: ``lease`` and limit/20; below 2,
        this limit is never leased (every request goes to Redis)."""
        return min(self.lease, limit // LEASE_SHARE)

    def _want(self, lease: _Lease | None, limit: int, now: float) -> int:
        """Cells to ask for: 1 for a user not seen lately; doubled when the last lease was spent
        before it expired, halved when it expired unspent; at most ``_lease_cap``."""
        cap = self._lease_cap(limit)
        if cap < 2:
            return 1
        if lease is None or lease.limit != limit:
            return 1
        if lease.left == 0 and now < lease.expires:
            return min(cap, lease.size * 2)
        if lease.left > 0:
            return max(1, min(cap, lease.size // 2))
        return min(cap, lease.size)

    async def _redis_call(self, *, keys: list[str], args: list[Any]) -> Any:
        """The script, cut off when Redis has not answered within ``timeout`` of the loop's own
        time. A busy loop runs due timers before it reads its sockets (uvloop always; asyncio's
        loop in the round where both are due), so a plain asyncio.timeout also measured the
        loop's lag: under load it threw away replies that had arrived in time and fell back to
        per-process limits for no fault of Redis. Here a deadline timer that runs late (the loop
        was busy) grants the call ``timeout`` again, at most MAX_EXTENSIONS times, and a deadline
        that stands still gives the loop DEADLINE_ROUNDS more rounds to read a reply that is
        already there. A Redis that does not answer on an idle loop is cut off after about
        ``timeout``; on a lagging one after at most (1 + MAX_EXTENSIONS) x ``timeout``.

        The call runs in a task of its own and the request stops waiting for it at the deadline,
        instead of cancelling the request's task: a cancel can be lost inside the client. redis-py
        sends every command through asyncio.wait_for(socket_timeout), and Python 3.11's wait_for
        swallows a cancel that lands in the loop round its inner write completes; the request
        then waited for the client's own read timeout (seen: 5 s with the default client, on a
        loaded machine, 1 call in 3-8). The abandoned call is cancelled and ends by itself at
        the latest at the client's socket timeout, holding one pooled connection until then."""
        loop = asyncio.get_running_loop()
        woken = loop.create_future()  # True: the call ended; False: the deadline passed

        def wake(answered: bool) -> None:
            if not woken.done():
                woken.set_result(answered)

        async def call_then_wake() -> Any:
            # Wakes the request in the step the reply is read (a done callback would take one
            # more loop round, which a deadline already running late may not grant).
            try:
                return await self._script(keys=keys, args=args)
            finally:
                wake(True)

        call = loop.create_task(call_then_wake())

        def deadline(due: float, extensions: int) -> None:
            if woken.done():
                return
            now = loop.time()
            if extensions and now - due > self.timeout / 2:
                handles.append(loop.call_at(now + self.timeout, deadline, now + self.timeout, extensions - 1))
                return
            rounds(DEADLINE_ROUNDS)

        def rounds(left: int) -> None:
            if woken.done():
                return
            if left:
                loop.call_soon(rounds, left - 1)
                return
            wake(False)

        due = loop.time() + self.timeout
        handles = [loop.call_at(due, deadline, due, MAX_EXTENSIONS)]
        try:
            answered = await woken
        except asyncio.CancelledError:  # the request itself was cancelled (its client left)
            abandon(call)
            raise
        finally:
            handles[-1].cancel()
        if not answered or not call.done():
            abandon(call)
            raise TimeoutError(f"Redis did not answer within {self.timeout * 1000:.0f} ms")
        return call.result()

    def _from_redis(self, user_id: str, limit: int, reply: Any, want: int, now: float) -> RateDecision:
        allowed, tat, remaining, reset_ms, retry_ms = reply[:5]
        if self._opened_at is not None:
            self._opened_at = None
            log.info("rate limiter: Redis is answering again, leaving in-process fallback")
        if isinstance(tat, bytes):
            tat = tat.decode()
        self.fallback.seed(user_id, float(tat))
        if self._lease_cap(limit) >= 2:
            granted = int(reply[5]) if len(reply) > 5 else int(bool(allowed))
            self._remember(user_id, _Lease(limit, want, max(0, granted - 1), now + self.lease_seconds,
                                           int(remaining), int(reset_ms)))
            remaining = int(remaining) + max(0, granted - 1)
        return _decision(limit, bool(allowed), int(remaining), int(reset_ms), int(retry_ms))

    def _remember(self, user_id: str, lease: _Lease) -> None:
        self._leases.pop(user_id, None)
        self._leases[user_id] = lease
        if len(self._leases) > self.max_entries:
            # Bounded memory: drop expired leases, then the least recently renewed ones (their
            # users start again at one cell per call).
            now = self._clock()
            self._leases = {u: x for u, x in self._leases.items() if x.expires > now}
            for user in list(self._leases)[:len(self._leases) - self.max_entries * 3 // 4]:
                del self._leases[user]

    def _breaker_open(self, now: float) -> bool:
        opened = self._opened_at
        return opened is not None and opened <= now < opened + self.retry_interval

    def _trip(self, now: float, exc: BaseException) -> None:
        self.metrics.redis_errors.inc()
        self._opened_at = now
        # Concurrent requests in flight when Redis dies all fail together; the breaker stops
        # later ones, this throttle stops that burst from becoming a burst of log lines.
        last = self._last_warning
        if last is None or not last <= now < last + self.retry_interval:
            self._last_warning = now
            more = f" ({self._suppressed} more failures not logged)" if self._suppressed else ""
            self._suppressed = 0
            log.warning(
                "rate limiter: Redis failed (%s: %s); answering from process memory, "
                "next try in %.1fs%s", type(exc).__name__, exc, self.retry_interval, more)
        else:
            self._suppressed += 1
