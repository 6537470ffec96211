"""What the gateways saw lately, kept in the store so every gateway's console shows the whole cluster.

Three records, all bounded:

- live gateways: each gateway writes a heartbeat (id, start time, version,
  address, requests in flight) every few seconds with a TTL; one that stops,
  or is killed, drops out of the list when its TTL passes;
- refusals (429, 403, overloaded): per account, a capped list kept for a
  retention period (a customer's own 429 history), and per model and reason,
  counters in time buckets (the operator's "refused in the last minutes");
- per model, the recent capacity waits and times to first token, a capped
  list of samples from which nearest-rank p50/p95 over the window are taken.

`Observations` is the interface both stores implement (`store.observations`):
Redis for any number of gateways (cluster/observations_redis.py), memory for
the embedded store's single process (cluster/observations_memory.py). Both
pass tests/test_observations_contract.py. Event times are the recording
gateway's clock, taken when the event happened (events are written in
batches, after the answer).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from pydantic import Field, model_validator

from cluster.settings import StrictModel


class SampleKind(StrEnum):
    WAIT = "wait"  # time an admitted request waited for a free sequence of its model
    TTFT = "ttft"  # time from dispatch to the first generated token


@dataclass(frozen=True)
class GatewayBeat:
    gateway_id: str
    started_ms: int
    version: str
    address: str  # host:port it serves on, or host and pid when the port is not its own
    in_flight: int
    seen_ms: int = 0  # when this heartbeat was written (store time)
    expires_ms: int = 0  # dropped from the live list at this time unless beaten again

    def encode(self) -> str:
        return json.dumps([self.gateway_id, self.started_ms, self.version, self.address, self.in_flight],
                          separators=(",", ":"))

    @staticmethod
    def decode(text: str | bytes, seen_ms: int, expires_ms: int) -> GatewayBeat:
        gateway_id, started, version, address, in_flight = json.loads(text)
        return GatewayBeat(str(gateway_id), int(started), str(version), str(address), int(in_flight), seen_ms,
                           expires_ms)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RefusalEvent:
    ts_ms: int
    account_id: str
    key_id: str
    model: str
    reason: str  # policies.admission.Reason value, a key-access code, or "overloaded"
    status: int

    def encode(self) -> str:
        return json.dumps([self.ts_ms, self.key_id, self.model, self.reason, self.status], separators=(",", ":"))

    @staticmethod
    def decode(account_id: str, text: str | bytes) -> RefusalEvent:
        ts, key_id, model, reason, status = json.loads(text)
        return RefusalEvent(int(ts), account_id, str(key_id), str(model), str(reason), int(status))

    def to_json(self) -> dict[str, Any]:
        return {"ts_ms": self.ts_ms, "key_id": self.key_id, "model": self.model, "reason": self.reason,
                "status": self.status}


@dataclass(frozen=True)
class Sample:
    ts_ms: int
    model: str
    kind: SampleKind
    ms: int


@dataclass(frozen=True)
class Bounds:
    """How much is kept: the window of the per-model figures, its bucket, the accounts' retention, the caps."""

    window_ms: int
    bucket_ms: int
    retention_ms: int
    per_account: int
    per_model: int

    def buckets(self, since_ms: int, until_ms: int) -> range:
        """The bucket numbers covering [since_ms, until_ms]."""
        return range(since_ms // self.bucket_ms, until_ms // self.bucket_ms + 1)


@dataclass(frozen=True)
class ModelRecent:
    """One model's samples (oldest first) and refusals by reason, within a window."""

    waits: tuple[int, ...] = ()
    ttfts: tuple[int, ...] = ()
    refusals: Mapping[str, int] = field(default_factory=dict)


class ObservationSettings(StrictModel):
    """The `console` block of the config: what the store keeps for the console, and how often it is written."""

    window_s: int = Field(600, ge=60, le=86_400, description="per-model percentiles and refusal counts")
    bucket_s: int = Field(60, ge=1, le=3600, description="refusal counters' time bucket")
    refusal_retention_s: int = Field(86_400, ge=60, le=30 * 86_400, description="an account's refusal list")
    refusals_per_account: int = Field(100, ge=1, le=10_000)
    samples_per_model: int = Field(2000, ge=10, le=100_000, description="per model and kind (wait, ttft)")
    # Events are written in one batch at most this often, after the answers they describe (0: at once).
    flush_interval_s: float = Field(1.0, ge=0, le=60)
    heartbeat_interval_s: float = Field(5.0, gt=0, le=300)
    heartbeat_ttl_s: float = Field(15.0, gt=0, le=3600, description="a silent gateway is gone after this")

    @model_validator(mode="after")
    def _ttl_outlives_interval(self) -> ObservationSettings:
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("console.heartbeat_ttl_s must be longer than console.heartbeat_interval_s")
        if self.bucket_s > self.window_s:
            raise ValueError("console.bucket_s must not be longer than console.window_s")
        return self

    def bounds(self) -> Bounds:
        return Bounds(self.window_s * 1000, self.bucket_s * 1000, self.refusal_retention_s * 1000,
                      self.refusals_per_account, self.samples_per_model)

    @property
    def heartbeat_ttl_ms(self) -> int:
        return int(self.heartbeat_ttl_s * 1000)


class Observations(Protocol):
    # Gateways: `beat` writes (or replaces) one gateway's heartbeat, live until
    # `ttl_ms` from now; `gateways` lists the live ones by start time; a
    # gateway stopping cleanly calls `gateway_gone`.
    async def beat(self, beat: GatewayBeat, ttl_ms: int, now_ms: int | None = None) -> GatewayBeat: ...
    async def gateways(self, now_ms: int | None = None) -> list[GatewayBeat]: ...
    async def gateway_gone(self, gateway_id: str) -> None: ...

    # Events, written in one batch (one round trip on Redis).
    async def record(self, refusals: Sequence[RefusalEvent], samples: Sequence[Sample], bounds: Bounds) -> None: ...
    # An account's refusals at or after `since_ms`, newest first, at most `limit`.
    async def account_refusals(self, account_id: str, since_ms: int, limit: int) -> list[RefusalEvent]: ...
    # Per model: samples at or after `since_ms`, refusals counted in the buckets from since_ms to until_ms.
    async def recent(self, since_ms: int, until_ms: int, bounds: Bounds) -> dict[str, ModelRecent]: ...
    async def forget_account(self, account_id: str) -> None: ...


def percentile(values: Sequence[int], q: int) -> int | None:
    """The nearest-rank q-th percentile (q in 0..100) of whole milliseconds; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-q * len(ordered) // 100))  # ceil(q/100 * n), at least the first
    return ordered[rank - 1]


def model_summary(recent: Mapping[str, ModelRecent]) -> dict[str, dict[str, Any]]:
    """The admin stats' per-model body: p50/p95 wait and TTFT in ms, requests served, refusals by reason."""
    return {model: {"wait_p50_ms": percentile(r.waits, 50), "wait_p95_ms": percentile(r.waits, 95),
                    "ttft_p50_ms": percentile(r.ttfts, 50), "ttft_p95_ms": percentile(r.ttfts, 95),
                    "served": len(r.ttfts), "refusals": dict(sorted(r.refusals.items()))}
            for model, r in sorted(recent.items())}
