"""Prometheus metrics of one gateway process (its own registry, so tests can run many)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from serve_apps.engines.types import TokenUsage

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# A sim replica starts in seconds, a small vLLM model in tens of seconds, a large one in minutes.
COLD_START_BUCKETS = (1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("packserve_requests", "Finished requests", ["model", "protocol", "status"],
                                registry=r)
        self.refusals = Counter("packserve_refusals", "Requests refused at admission", ["reason"], registry=r)
        # `route` is the matched route's template (or "unmatched"), never the raw path, so a client
        # probing random paths cannot grow the label set.
        self.errors = Counter("packserve_client_errors", "Requests rejected with an error status",
                              ["route", "status", "code"], registry=r)
        self.tokens = Counter("packserve_tokens", "Tokens processed", ["model", "kind"], registry=r)
        self.ttft = Histogram("packserve_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("packserve_queue_wait_seconds", "Time admitted requests spent queued",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("packserve_queue_depth", "Requests waiting for a concurrency slot", registry=r)
        self.active_leases = Gauge("packserve_active_leases", "Admitted requests in flight in this gateway",
                                   registry=r)
        self.outbox = Gauge("packserve_settlements_pending", "Settlements waiting for the store", registry=r)
        # Cold starts: how long requests waited for a model at zero replicas
        # (outcome ready / timeout / client_closed), how many wait right now,
        # and dispatches that found a model gone to zero after admission (a
        # warm flag up to one replica-watch poll stale) and went back to wait.
        self.cold_start_wait = Histogram("packserve_cold_start_wait_seconds",
                                         "Time requests waited for a model to start from zero replicas",
                                         ["model", "outcome"], buckets=COLD_START_BUCKETS, registry=r)
        self.cold_starts_waiting = Gauge("packserve_cold_starts_waiting",
                                         "Requests waiting for a model to start from zero replicas", registry=r)
        # The capacity scheduler (SPEC §4): each model's sequences as the store sees them across all
        # gateways (refreshed when /metrics is read), this gateway's waits and overload refusals.
        self.model_capacity = Gauge("packserve_model_capacity", "Sequences the model runs at once (all replicas)",
                                    ["model"], registry=r)
        self.model_in_flight = Gauge("packserve_model_in_flight", "Requests dispatched on the model (all gateways)",
                                     ["model"], registry=r)
        self.model_waiting = Gauge("packserve_model_waiting", "Admitted requests waiting for the model's capacity "
                                   "(all gateways)", ["model"], registry=r)
        self.capacity_wait = Histogram("packserve_capacity_wait_seconds",
                                       "Time admitted requests waited for a free sequence of their model",
                                       ["model", "outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self.overloaded = Counter("packserve_overloaded", "Requests refused because their model stayed at "
                                  "capacity past the wait bound", ["model"], registry=r)
        self.preemptions = Counter("packserve_preemptions", "Requests dispatched over a full model, their engine "
                                   "pausing another account's sequence (scheduler.preempt)", ["model"], registry=r)
        self.cold_redispatches = Counter("packserve_cold_redispatches",
                                         "Admitted requests that found their model at zero replicas, were "
                                         "released uncharged and waited for the cold start", ["model"], registry=r)

    def bind(self, queue_depth: Callable[[], float], active: Callable[[], float], outbox: Callable[[], float],
             cold_starts_waiting: Callable[[], float]) -> None:
        self.queue_depth.set_function(queue_depth)
        self.active_leases.set_function(active)
        self.outbox.set_function(outbox)
        self.cold_starts_waiting.set_function(cold_starts_waiting)

    def observe_finished(self, model: str, protocol: str, status: str, usage: TokenUsage) -> None:
        self.requests.labels(model, protocol, status).inc()
        self.tokens.labels(model, "prompt_uncached").inc(usage.uncached_prompt_tokens)
        self.tokens.labels(model, "prompt_cached").inc(usage.cached_tokens)
        self.tokens.labels(model, "completion").inc(usage.completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
