"""Prometheus metrics, registered on a registry the caller owns (no global state).

Label sets are bounded: decisions by outcome, tokens by model (models are configured in
LiteLLM, a short list) and kind, latencies by phase. Never a user id as a label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "solaris_decisions_total", "Admission decisions by outcome.", ["outcome"], registry=r)
        self.tokens = Counter(
            "solaris_tokens_debited_total", "Real tokens debited, by model and kind.",
            ["model", "kind"], registry=r)
        self.estimate_ratio = Histogram(
            "solaris_real_to_estimate_ratio", "Real tokens divided by the admission estimate.",
            buckets=RATIO_BUCKETS, registry=r)
        self.phase_latency = Histogram(
            "solaris_extproc_phase_seconds", "Time to answer one ext_proc message, by phase.",
            ["phase"], buckets=LATENCY_BUCKETS, registry=r)
        self.ledger_latency = Histogram(
            "solaris_ledger_transaction_seconds", "Ledger transaction latency, by operation.",
            ["operation"], buckets=LATENCY_BUCKETS, registry=r)
        self.settles = Counter(
            "solaris_settles_total", "Settled exchanges by how usage was known.",
            ["source"], registry=r)
        self.reservations_expired = Counter(
            "solaris_reservations_expired_total", "Reservations swept after expiry.", registry=r)
        self.reservations_held = Gauge(
            "solaris_reservations_held", "Reservations currently held by this process.",
            registry=r)
        self.spooled = Counter(
            "solaris_spooled_settles_total", "Settles written to the local spool.", registry=r)
        self.stream_chunks = Counter(
            "solaris_stream_chunks_total", "SSE chunks of admitted answers passed through.",
            registry=r)
        self.handoffs = Counter(
            "solaris_stream_handoffs_total",
            "Answers (streams and JSON) whose usage Envoy reads (docs/streams.md), by event: "
            "handed (the processor let the body pass), settled (from the access log, with "
            "usage), no_usage (settled by the reservation), unreadable (an entry that was not "
            "the processor's).",
            ["event"], registry=r)
        self.settle_backlog = Gauge(
            "solaris_settle_backlog",
            "Settles handed over and not yet committed (bounded: past the limit, replies wait).",
            registry=r)
        self.settles_lost = Counter(
            "solaris_settles_not_spooled_total",
            "Settles neither applied nor spooled (written to the error log only): page someone.",
            registry=r)
        self.spool_pending = Gauge(
            "solaris_spool_pending", "Settles in this process's spool file, not yet in the ledger.",
            registry=r)
        self.spool_replayed = Counter(
            "solaris_spool_replayed_total", "Spooled settles replayed into the ledger.",
            registry=r)
        self.spool_quarantined = Counter(
            "solaris_spool_quarantined_total",
            "Spooled settles the ledger rejected (not an outage), set aside in the spool's quarantine table.",
            registry=r)
        self.db_errors = Counter(
            "solaris_db_errors_total", "Ledger operations that failed to reach PostgreSQL.",
            registry=r)
        self.redis_errors = Counter(
            "solaris_redis_errors_total", "Redis operations that failed.", registry=r)
        self.ratelimit_fallbacks = Counter(
            "solaris_ratelimit_fallback_total",
            "Rate-limit checks answered by the in-process limiter (Redis unavailable).",
            registry=r)
        self.ratelimit_leased = Counter(
            "solaris_ratelimit_leased_total",
            "Rate-limit checks answered from a lease this process took from Redis (no round trip; "
            "GATE_RATE_LIMIT_LEASE).",
            registry=r)
        self.alerts = Counter(
            "solaris_alerts_total", "Threshold alerts by threshold and event.",
            ["threshold", "event"], registry=r)
        self.outbox_depth = Gauge(
            "solaris_alert_outbox_pending", "Alerts waiting for delivery.", registry=r)
        self.purchases = Counter(
            "solaris_purchases_total",
            "Credit purchases (Stripe): checkout sessions created and webhook events by outcome.",
            ["event"], registry=r)
        self.purchase_tokens = Counter(
            "solaris_purchase_tokens_total",
            "Purchase tokens by kind: credited (purchase), clawed back by refunds (refund) and "
            "disputes/chargebacks (dispute), given back when a dispute is won or closed "
            "(dispute_released).",
            ["kind"], registry=r)

    def watch_batches(self, counts: Callable[[], Mapping[str, tuple[int, int]]]) -> None:
        """Export the ledger's group commit, read at scrape time (nothing on the hot path):
        ``counts()`` gives, per operation, (batches run, operations they carried)."""
        self.registry.register(_Batches(counts))


class _Batches(Collector):
    def __init__(self, counts: Callable[[], Mapping[str, tuple[int, int]]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        batches = CounterMetricFamily(
            "solaris_ledger_batches", "Ledger statements run for queued operations, by operation "
            "(group commit: the operations per batch is the ratio of the two counters).",
            labels=["operation"])
        carried = CounterMetricFamily(
            "solaris_ledger_batched_operations", "Operations those batches carried, by operation.",
            labels=["operation"])
        for operation, (runs, operations) in self.counts().items():
            batches.add_metric([operation], runs)
            carried.add_metric([operation], operations)
        yield batches
        yield carried
