"""Prometheus metrics of one gateway process (its own registry, so tests can run many)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from serve_apps.engines.types import TokenUsage

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("packserve_requests", "Finished requests", ["model", "protocol", "status"],
                                registry=r)
        self.refusals = Counter("packserve_refusals", "Requests refused at admission", ["reason"], registry=r)
        self.errors = Counter("packserve_client_errors", "Requests rejected before admission", ["status", "code"],
                              registry=r)
        self.tokens = Counter("packserve_tokens", "Tokens processed", ["model", "kind"], registry=r)
        self.ttft = Histogram("packserve_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("packserve_queue_wait_seconds", "Time admitted requests spent queued",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("packserve_queue_depth", "Requests waiting for a concurrency slot", registry=r)
        self.active_leases = Gauge("packserve_active_leases", "Admitted requests in flight in this gateway",
                                   registry=r)
        self.outbox = Gauge("packserve_settlements_pending", "Settlements waiting for the store", registry=r)

    def bind(self, queue_depth: Callable[[], float], active: Callable[[], float], outbox: Callable[[], float]) -> None:
        self.queue_depth.set_function(queue_depth)
        self.active_leases.set_function(active)
        self.outbox.set_function(outbox)

    def observe_finished(self, model: str, protocol: str, status: str, usage: TokenUsage) -> None:
        self.requests.labels(model, protocol, status).inc()
        self.tokens.labels(model, "prompt_uncached").inc(usage.uncached_prompt_tokens)
        self.tokens.labels(model, "prompt_cached").inc(usage.cached_tokens)
        self.tokens.labels(model, "completion").inc(usage.completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
